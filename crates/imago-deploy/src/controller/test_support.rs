//! What the controller's tests start from.

use crate::state::StateDb;

/// A fresh state database in a temporary directory (kept alive by the returned guard) and a
/// runtime with one worker thread for the controller's probes and data plane calls.
pub(super) fn db_and_runtime() -> (tempfile::TempDir, StateDb, tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let db = StateDb::open(&dir.path().join("state.db")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    (dir, db, runtime)
}

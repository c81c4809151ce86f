//! Garbage-collection roots from deployments: every retained release's image stays in the store,
//! so a rollback never finds its image deleted.

use std::path::PathBuf;

use imago_oci::Digest;
use imago_store::GcRoots;

use crate::state::StateDb;

/// How many releases per service are retained for rollback (and kept from gc).
pub const DEFAULT_HISTORY_LIMIT: u64 = 10;

/// The images of the newest `keep` releases of every service in the state database at `path`.
#[derive(Debug, Clone)]
pub struct ReleaseRoots {
    pub path: PathBuf,
    pub keep: u64,
}

impl GcRoots for ReleaseRoots {
    fn describe(&self) -> String {
        format!(
            "the last {} releases of every service ({})",
            self.keep,
            self.path.display()
        )
    }

    fn roots(&self) -> Result<Vec<Digest>, Box<dyn std::error::Error + Send + Sync>> {
        if !self.path.exists() {
            return Ok(Vec::new());
        }
        let db = StateDb::open(&self.path)?;
        Ok(db.retained_digests(self.keep)?)
    }
}

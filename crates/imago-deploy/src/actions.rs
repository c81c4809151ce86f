//! The write actions that the CLI and the HTTP API both perform: one code path each, so a
//! rollback asked for in the console is the rollback `imago rollback` makes.

use imago_store::Store;

use crate::DeployError;
use crate::state::{Release, StateDb};

/// Records the release that rolls `service` back: to release `to`, or (without it) to the
/// release [`StateDb::rollback_target`] picks. The new release copies the target's image digest
/// and configuration; the controller rolls it out like any other. Returns the new release and
/// the number of the one it restores.
pub fn rollback(
    db: &mut StateDb,
    store: &Store,
    service: &str,
    to: Option<u64>,
    actor: &str,
) -> Result<(Release, u64), DeployError> {
    let current = db
        .desired(service)?
        .ok_or_else(|| DeployError::NoService(service.to_owned()))?;
    let target = db.rollback_target(&current, to)?;
    if !store.has_blob(&target.image_digest) {
        return Err(DeployError::ImageGone {
            service: service.to_owned(),
            number: target.number,
            digest: target.image_digest,
        });
    }
    let reason = format!("rollback to release {}", target.number);
    let (release, _) = db.record_release(
        service,
        &target.spec,
        &target.image_digest,
        &reason,
        Some(target.number),
        actor,
    )?;
    Ok((release, target.number))
}

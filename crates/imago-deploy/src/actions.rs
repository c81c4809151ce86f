//! The write actions that the CLI and the HTTP API both perform: one code path each, so a
//! rollback asked for in the console is the rollback `imago rollback` makes, and so on for
//! restart, pause and resume.

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
    let release = db.record_restored(&target, &reason, actor)?;
    Ok((release, target.number))
}

/// Records a restart of `service`: new instances of the desired release's image and
/// configuration, rolled out like an update (same waves, health gate and automatic rollback).
/// Returns the new release.
pub fn restart(db: &mut StateDb, service: &str, actor: &str) -> Result<Release, DeployError> {
    db.record_restart(service, actor)
}

/// Pauses (`pause`) or resumes the rollouts of `service`; returns whether that changed
/// anything (pausing a paused service does not). While paused, the controller launches and
/// retires nothing for it, whatever its releases say; a restarted controller reads it again.
pub fn set_paused(
    db: &StateDb,
    service: &str,
    pause: bool,
    actor: &str,
) -> Result<bool, DeployError> {
    if db.desired(service)?.is_none() {
        return Err(DeployError::NoService(service.to_owned()));
    }
    if pause {
        db.pause(service, actor)
    } else {
        db.resume(service, actor)
    }
}

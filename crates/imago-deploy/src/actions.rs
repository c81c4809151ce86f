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
/// On a kubernetes target the controller holds the Deployment (`spec.paused`) from its next
/// pass; a swarm target is refused (see [`imago_spec::EngineKind::holds_rollouts`]).
pub fn set_paused(
    db: &StateDb,
    service: &str,
    pause: bool,
    actor: &str,
) -> Result<bool, DeployError> {
    let Some(desired) = db.desired(service)? else {
        return Err(DeployError::NoService(service.to_owned()));
    };
    // A pause the controller cannot hold must not be recorded as if it did: a swarm keeps
    // rolling on its own. Resuming stays allowed (it only clears).
    if let (true, Some(target)) = (pause, desired.spec.cluster_target())
        && !target.spec.engine.holds_rollouts()
    {
        return Err(DeployError::PauseUnsupported {
            service: service.to_owned(),
            engine: target.spec.engine.as_str().to_owned(),
            target: target.name.clone(),
        });
    }
    if pause {
        db.pause(service, actor)
    } else {
        db.resume(service, actor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ServiceSpec;
    use imago_oci::Digest;

    #[test]
    fn a_pause_on_a_swarm_target_is_refused_and_on_a_kubernetes_target_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = StateDb::open(&dir.path().join("state.db")).unwrap();
        let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "image": "web",
            "target": {"name": "prod", "engine": "swarm"},
        }))
        .unwrap();
        assert!(spec.cluster_target().is_some());
        db.record_release("web", &spec, &Digest::of(b"v1"), "apply", None, "test")
            .unwrap();
        let err = set_paused(&db, "web", true, "test").unwrap_err();
        assert!(
            matches!(&err, DeployError::PauseUnsupported { target, .. } if target == "prod"),
            "{err}"
        );
        assert!(err.to_string().contains("swarm target prod"), "{err}");
        assert_eq!(db.paused("web").unwrap(), None);
        // A local service is paused as before.
        let local: ServiceSpec =
            serde_json::from_value(serde_json::json!({"image": "api"})).unwrap();
        db.record_release("api", &local, &Digest::of(b"v1"), "apply", None, "test")
            .unwrap();
        assert!(set_paused(&db, "api", true, "test").unwrap());
        assert!(db.paused("api").unwrap().is_some());
        // Kubernetes holds a Deployment (spec.paused): recorded, and the controller applies it.
        let kube: ServiceSpec = serde_json::from_value(serde_json::json!({
            "image": "shop",
            "target": {"name": "k8s", "engine": "kubernetes"},
        }))
        .unwrap();
        db.record_release("shop", &kube, &Digest::of(b"v1"), "apply", None, "test")
            .unwrap();
        assert!(set_paused(&db, "shop", true, "test").unwrap());
        assert_eq!(db.paused("shop").unwrap().unwrap().actor, "test");
        assert!(set_paused(&db, "shop", false, "test").unwrap());
        assert_eq!(db.paused("shop").unwrap(), None);
    }
}

//! The status document: what `imago status --json` prints and what the API serves under
//! `/v1/status` and `/v1/services[/NAME]`. One builder for both, so the CLI and the API never
//! disagree on a field.

use std::collections::BTreeMap;

use imago_oci::Digest;
use imago_runtime::Instance;
use serde::Serialize;

use crate::DeployError;
use crate::cluster::TaskPhase;
use crate::controller::{LABEL_REVISION, LABEL_SERVICE, cluster_service};
use crate::drift::ClusterEngines;
use crate::state::{Event, Outcome, Release, ReleaseOutcome, StateDb};

/// How many of a service's latest events the document carries.
const RECENT_EVENTS: u64 = 10;

/// One instance of a service, as the runtime reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct InstanceRow {
    pub id: String,
    pub status: String,
    pub revision: Option<String>,
    pub address: Option<String>,
    pub image: Digest,
}

/// One service: its desired release, how that release's rollout ended (if it did), the last
/// failed rollout, its instances and its latest events.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub desired: Option<Release>,
    pub outcome: Option<Outcome>,
    pub last_completed: Option<u64>,
    /// The most recent failed rollout of the service, if any: which release and why.
    pub last_failure: Option<Outcome>,
    /// Why the controller cannot reconcile the service right now (its port is held by another
    /// process, say), since when; `None` while it reconciles.
    pub fault: Option<Fault>,
    /// Its rollouts are paused (`imago pause`): since when and by whom; `None` when not.
    pub paused: Option<crate::state::Paused>,
    pub instances: Vec<InstanceRow>,
    /// The tasks of a service on a cluster target, as its engine reports them (filled by
    /// [`add_cluster_tasks`]; absent from the document otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskRow>,
    pub recent_events: Vec<Event>,
}

/// One task (replica) of a service on a cluster target.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TaskRow {
    pub id: String,
    /// "starting", "running", "failed" or "done".
    pub phase: &'static str,
    /// The engine still wants it running (false: it is being retired).
    pub desired_running: bool,
    /// Its node's address (with the published port, when the service publishes one).
    pub node: Option<String>,
    pub address: Option<String>,
    /// The release whose revision it runs.
    pub release: Option<u64>,
    pub revision: Option<String>,
    /// The digest of the image its spec pins.
    pub image_digest: Option<String>,
    pub error: Option<String>,
}

/// Adds to every one of `services` on a cluster target the tasks its engine reports (for
/// `imago status` and the API's status documents alike).
pub fn add_cluster_tasks(
    db: &StateDb,
    services: &mut [ServiceStatus],
    engines: &mut ClusterEngines<'_>,
) -> Result<(), DeployError> {
    for service in services {
        add_service_tasks(db, service, engines)?;
    }
    Ok(())
}

/// Adds to `service`, if it is on a cluster target, the tasks its engine reports.
fn add_service_tasks(
    db: &StateDb,
    service: &mut ServiceStatus,
    engines: &mut ClusterEngines<'_>,
) -> Result<(), DeployError> {
    let Some(release) = &service.desired else {
        return Ok(());
    };
    let Some(target) = release.spec.cluster_target() else {
        return Ok(());
    };
    let desired = cluster_service(release, target);
    let Some(observed) = engines.engine(target)?.observe(&desired)? else {
        return Ok(());
    };
    let mut releases: BTreeMap<String, Option<u64>> = BTreeMap::new();
    for task in observed.tasks {
        let release = match &task.revision {
            Some(revision) => match releases.get(revision) {
                Some(number) => *number,
                None => {
                    let number = db
                        .release_with_revision(&service.name, revision)?
                        .map(|r| r.number);
                    releases.insert(revision.clone(), number);
                    number
                }
            },
            None => None,
        };
        service.tasks.push(TaskRow {
            id: task.id,
            phase: match task.phase {
                TaskPhase::Starting => "starting",
                TaskPhase::Running => "running",
                TaskPhase::Failed => "failed",
                TaskPhase::Done => "done",
            },
            desired_running: task.desired_running,
            node: task.address.map(|a| a.ip().to_string()),
            address: task.address.map(|a| a.to_string()),
            release,
            revision: task.revision,
            image_digest: task
                .image
                .split_once('@')
                .map(|(_, digest)| digest.to_owned()),
            error: task.error,
        });
    }
    Ok(())
}

/// A fault of one service, as the controller recorded it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Fault {
    pub reason: String,
    pub since_ms: u64,
}

/// Every service of a home (or the one asked for), and whether a controller runs for it.
#[derive(Debug, Clone, Serialize)]
pub struct StatusDocument {
    pub controller_running: bool,
    pub services: Vec<ServiceStatus>,
}

/// The status of `name` as the database records it, with the instances of `instances` that
/// carry its label.
pub fn service_status(
    db: &StateDb,
    name: &str,
    instances: &[Instance],
) -> Result<ServiceStatus, DeployError> {
    let desired = db.desired(name)?;
    let outcome = match &desired {
        Some(r) => db.outcome_of(name, r.number)?,
        None => None,
    };
    let last_failure = db
        .outcomes(name)?
        .into_iter()
        .rev()
        .find(|o| o.outcome == ReleaseOutcome::Failed);
    let instances = instances
        .iter()
        .filter(|i| i.labels.get(LABEL_SERVICE).map(String::as_str) == Some(name))
        .map(|i| InstanceRow {
            id: i.id.clone(),
            status: i.status_text(),
            revision: i.labels.get(LABEL_REVISION).cloned(),
            address: i.address.map(|a| a.to_string()),
            image: i.image.clone(),
        })
        .collect();
    Ok(ServiceStatus {
        name: name.to_owned(),
        last_completed: db.last_completed(name)?.map(|r| r.number),
        desired,
        outcome,
        last_failure,
        fault: db
            .service_fault(name)?
            .map(|(reason, since_ms)| Fault { reason, since_ms }),
        paused: db.paused(name)?,
        instances,
        tasks: Vec::new(),
        recent_events: db.recent_events(name, RECENT_EVENTS)?,
    })
}

/// The document for `only` (a deployed service; `NoService` otherwise) or for every service the
/// database knows.
pub fn status_document(
    db: &StateDb,
    only: Option<&str>,
    instances: &[Instance],
    controller_running: bool,
) -> Result<StatusDocument, DeployError> {
    let names = match only {
        Some(name) => {
            if db.desired(name)?.is_none() {
                return Err(DeployError::NoService(name.to_owned()));
            }
            vec![name.to_owned()]
        }
        None => db.services()?,
    };
    let services = names
        .iter()
        .map(|name| service_status(db, name, instances))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(StatusDocument {
        controller_running,
        services,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::spec::ServiceSpec;

    #[test]
    fn a_service_fault_is_in_the_document_until_it_clears() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = StateDb::open(&dir.path().join("state.db")).unwrap();
        let spec: ServiceSpec =
            serde_json::from_value(serde_json::json!({"image": "web"})).unwrap();
        db.record_release("web", &spec, &Digest::of(b"v1"), "apply", None, "test")
            .unwrap();
        let fault = |db: &StateDb| {
            status_document(db, Some("web"), &[], true)
                .unwrap()
                .services[0]
                .fault
                .clone()
        };
        assert_eq!(fault(&db), None);
        db.set_fault("web", "port 127.0.0.1:1 is already in use by pid 1 (init)")
            .unwrap();
        let shown = fault(&db).expect("the fault is shown");
        assert!(shown.reason.contains("pid 1 (init)"), "{shown:?}");
        db.clear_fault("web").unwrap();
        assert_eq!(fault(&db), None);
        let err = status_document(&db, Some("nothing"), &[], true).unwrap_err();
        assert!(
            err.to_string().contains("no deployed service nothing"),
            "{err}"
        );
    }
}

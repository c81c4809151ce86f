//! The status document: what `imago status --json` prints and what the API serves under
//! `/v1/status` and `/v1/services[/NAME]`. One builder for both, so the CLI and the API never
//! disagree on a field.

use imago_oci::Digest;
use imago_runtime::Instance;
use serde::Serialize;

use crate::DeployError;
use crate::controller::{LABEL_REVISION, LABEL_SERVICE};
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
    pub instances: Vec<InstanceRow>,
    pub recent_events: Vec<Event>,
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
        instances,
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

//! `/metrics`: what the controller has done and sees, in the Prometheus (OpenMetrics) text
//! format.
//!
//! Everything that the state database records (rollouts by outcome, rollout durations, drift
//! events) is counted from it at scrape time, so the counters survive a restarted controller and
//! never disagree with `imago history`. What only exists while a process runs (how long
//! controller passes and health checks take) is observed into histograms of this process,
//! [`live`], by the controller loop and the probe tasks.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::time::Duration;

use imago_runtime::Instance;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::DeployError;
use crate::controller::{LABEL_REVISION, LABEL_SERVICE};
use crate::state::StateDb;

/// The media type of what [`render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;

/// Histograms of this process (the controller), shared by everything that observes into them.
pub struct Live {
    pass_duration: Histogram,
    pass_part_duration: Family<Labels, Histogram>,
    health_check_duration: Family<Labels, Histogram>,
}

/// The controller process's live histograms.
pub fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| Live {
        // 1 ms .. about 16 s.
        pass_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        // 0.1 ms .. about 3 s.
        pass_part_duration: Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 15))
        }),
        health_check_duration: Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        }),
    })
}

impl Live {
    /// One controller pass over every service took `took`.
    pub fn observe_pass(&self, took: Duration) {
        self.pass_duration.observe(took.as_secs_f64());
    }

    /// One part of a controller pass (`part`: "list", "observe", "launch", ...) took `took`:
    /// where the time of a slow pass goes.
    pub fn observe_pass_part(&self, part: &'static str, took: Duration) {
        self.pass_part_duration
            .get_or_create(&vec![("part".to_owned(), part.to_owned())])
            .observe(took.as_secs_f64());
    }

    /// One health check of `kind` ("http", "tcp", "command") took `took` and ended `result`
    /// ("healthy" or "unhealthy").
    pub fn observe_health_check(&self, kind: &str, result: &str, took: Duration) {
        self.health_check_duration
            .get_or_create(&vec![
                ("probe".to_owned(), kind.to_owned()),
                ("result".to_owned(), result.to_owned()),
            ])
            .observe(took.as_secs_f64());
    }
}

/// Rollout durations, in seconds: 100 ms .. about 1.7 h.
fn rollout_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.1, 2.0, 17)
}

/// The metrics text for the state in `db`, the instances the provider lists, the data plane's
/// open connections per endpoint (`connections`: service to count, when the data plane
/// answered) and this process's live histograms.
pub fn render(
    db: &StateDb,
    instances: &[Instance],
    connections: Option<&BTreeMap<String, u64>>,
    live: &Live,
) -> Result<String, DeployError> {
    let mut registry = Registry::with_prefix("imago");

    let rollouts = Family::<Labels, Counter>::default();
    let rollout_duration =
        Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(rollout_buckets()));
    for (service, outcome, took_ms) in db.rollout_ends()? {
        let labels = vec![
            ("service".to_owned(), service),
            ("outcome".to_owned(), outcome.as_str().to_owned()),
        ];
        rollouts.get_or_create(&labels).inc();
        rollout_duration
            .get_or_create(&labels)
            .observe(took_ms as f64 / 1000.0);
    }
    registry.register(
        "rollouts",
        "Rollouts that ended, by service and outcome",
        rollouts,
    );
    registry.register(
        "rollout_duration_seconds",
        "Time from a release's creation to the end of its rollout",
        rollout_duration,
    );

    let drift = Family::<Labels, Counter>::default();
    for (service, count) in db.event_counts("drift")? {
        drift
            .get_or_create(&vec![("service".to_owned(), service)])
            .inc_by(count);
    }
    registry.register(
        "drift_events",
        "Drift found (instances that died, run the wrong digest or configuration, were modified or nobody deployed)",
        drift,
    );

    // An instance's release: the newest release of its service with the instance's revision.
    let mut release_of: HashMap<(String, String), u64> = HashMap::new();
    for service in db.services()? {
        for release in db.history(&service)? {
            release_of.insert((service.clone(), release.revision), release.number);
        }
    }
    let by_state = Family::<Labels, Gauge>::default();
    for instance in instances {
        let Some(service) = instance.labels.get(LABEL_SERVICE) else {
            continue;
        };
        let release = instance
            .labels
            .get(LABEL_REVISION)
            .and_then(|rev| release_of.get(&(service.clone(), rev.clone())))
            .map(u64::to_string)
            .unwrap_or_default();
        by_state
            .get_or_create(&vec![
                ("service".to_owned(), service.clone()),
                ("release".to_owned(), release),
                ("state".to_owned(), instance.status.to_string()),
            ])
            .inc();
    }
    registry.register(
        "instances",
        "Instances by service, release and state",
        by_state,
    );

    if let Some(connections) = connections {
        let open = Family::<Labels, Gauge>::default();
        for (service, count) in connections {
            open.get_or_create(&vec![("service".to_owned(), service.clone())])
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
        registry.register(
            "endpoint_connections",
            "Open connections to a service's instances through its endpoint",
            open,
        );
    }

    registry.register(
        "controller_pass_duration_seconds",
        "How long one controller pass over every service took",
        live.pass_duration.clone(),
    );
    registry.register(
        "controller_pass_part_duration_seconds",
        "How long each part of a controller pass took, by part",
        live.pass_part_duration.clone(),
    );
    registry.register(
        "health_check_duration_seconds",
        "How long one health check took, by probe kind and result",
        live.health_check_duration.clone(),
    );

    let mut text = String::new();
    encode(&mut text, &registry).map_err(|_| DeployError::Encode {
        what: "the metrics",
        source: serde_json::Error::io(std::io::Error::other("formatting failed")),
    })?;
    Ok(text)
}

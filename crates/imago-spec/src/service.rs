//! `[service.NAME]` in `imago.toml`: what a service is, as the user wrote it, and its validation.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::volume::VolumeMount;

/// One service as declared. Every field that changes what an instance runs is part of the
/// release's configuration hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// An image of the same file (`web`), or any store reference (`web:v2`, `sha256:...`).
    pub image: String,
    #[serde(default = "one")]
    pub replicas: u32,
    /// Replaces the image's entrypoint + cmd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The service's stable endpoint on the host (127.0.0.1:port by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The port the instances listen on; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// Where the endpoint listens instead of 127.0.0.1:`port`: `"0.0.0.0:80"` (every IPv4
    /// address of the host, so remote clients reach it), `"[::]:80"` (IPv6), a single address,
    /// or a list of them.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "one_or_many"
    )]
    #[schemars(with = "Option<BindAddresses>")]
    pub bind: Vec<String>,
    /// Host names this service answers on its endpoint, routed by the HTTP `Host` header (and
    /// TLS SNI for the certificate): `"shop.example"`, or `"*.shop.example"` for any one label in
    /// front of it. Several services may then share one `bind` address, each with its own hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// TLS termination at the endpoint with a certificate chain and private key from PEM files
    /// (paths relative to imago.toml). The files are read when the endpoint starts and again
    /// whenever they change on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    #[schemars(with = "NetworkName")]
    pub network: NetworkMode,
    #[serde(default)]
    pub resources: Resources,
    /// `NAME:/path` (a named volume shared by the service's instances) or `/host/path:/path`,
    /// optionally `:ro`. The image's declared volumes get an anonymous volume per instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// The syscall filter: "default" (Docker's default profile), "unconfined" (none), or the
    /// path of a profile file (OCI `linux.seccomp` JSON, relative to imago.toml), whose content
    /// is read when the file is loaded and becomes part of the release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub seccomp: Option<SeccompSetting>,
    /// Runs a tiny init (tini) as each instance's PID 1, as `docker run --init`: it forwards
    /// the stop signal to the program (one that ignores SIGTERM as PID 1, such as busybox httpd,
    /// would otherwise wait out its whole stop grace) and reaps orphaned zombies. On unless
    /// `init = false`. Instances on this host only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    #[serde(default)]
    pub rollout: RolloutSettings,
    /// Where the service runs: the name of a `[target.NAME]` table (default: this host).
    /// `imago plan/apply --target NAME` sets it for every service of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub target: Option<crate::target::TargetRef>,
    /// Time between the stop signal and SIGKILL when an instance is retired.
    #[serde(default = "default_stop_grace", with = "humantime_serde_compat")]
    #[schemars(with = "DurationText")]
    pub stop_grace_period: Duration,
    /// Which nodes of a cluster target the replicas may run on, and how they spread.
    #[serde(default, skip_serializing_if = "Placement::is_empty")]
    pub placement: Placement,
    /// Never written in `imago.toml` (refused there): the paths the image of a release on a
    /// kubernetes target declares as volumes (its config's `Volumes`), recorded by apply from
    /// the stored image of the release's digest. Each pod gets an `emptyDir` there, as each
    /// local instance gets an anonymous volume. Kept in the release, so that a rollback and a
    /// restarted controller render them again without the image, and `render` is byte-stable.
    /// Serialized with the rest (the configuration hash covers it), but read back only by
    /// [`ServiceSpec::from_recorded_json`]: the file's form does not know the key, so no error
    /// about the file ever names it.
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    #[schemars(skip)]
    pub image_volumes: Vec<String>,
}

/// `tls = { cert = "certs/shop.pem", key = "certs/shop.key" }`: PEM files, the certificate
/// chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
}

/// Whether `host` (a lowercase name, no port) is one of `patterns`: equal to one, or under a
/// `*.` pattern by exactly one label, as a wildcard certificate matches.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

/// Checks one `hosts` entry: a DNS name of letters, digits and `-` in lowercase, optionally
/// behind `*.`.
fn check_host(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a host name like \"shop.example\" or \"*.shop.example\" (lowercase, no port)"
        ))
    }
}

/// `[service.NAME.placement]`: where the replicas of a service on a cluster target run. This
/// host is one node: a service on it refuses every key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Node constraints as Docker writes them, all of which a node must meet:
    /// `node.role==worker`, `node.hostname!=n1`, `node.labels.zone==a`, `node.platform.os==linux`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// At most this many replicas on one node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas_per_node: Option<u32>,
    /// Node labels whose values the replicas spread over evenly, in order of preference:
    /// `node.labels.zone`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spread: Vec<String>,
}

/// One placement constraint, parsed: `KEY==VALUE` or `KEY!=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint<'a> {
    pub key: &'a str,
    pub equal: bool,
    pub value: &'a str,
}

impl Placement {
    pub fn is_empty(&self) -> bool {
        self == &Placement::default()
    }

    /// The constraints, parsed; an error names the one that is not `KEY==VALUE` or
    /// `KEY!=VALUE` with a key Docker knows.
    pub fn parsed_constraints(&self) -> Result<Vec<Constraint<'_>>, String> {
        self.constraints
            .iter()
            .map(|text| {
                let (key, equal, value) = match (text.split_once("=="), text.split_once("!=")) {
                    (Some((k, v)), None) => (k, true, v),
                    (None, Some((k, v))) => (k, false, v),
                    _ => {
                        return Err(format!("{text:?} is not KEY==VALUE or KEY!=VALUE"));
                    }
                };
                let (key, value) = (key.trim(), value.trim());
                let known = matches!(
                    key,
                    "node.id"
                        | "node.hostname"
                        | "node.role"
                        | "node.platform.os"
                        | "node.platform.arch"
                ) || key
                    .strip_prefix("node.labels.")
                    .is_some_and(|l| !l.is_empty())
                    || key
                        .strip_prefix("engine.labels.")
                        .is_some_and(|l| !l.is_empty());
                if !known || value.is_empty() {
                    return Err(format!(
                        "{text:?}: the key is one of node.id, node.hostname, node.role, \
                         node.platform.os, node.platform.arch, node.labels.NAME or \
                         engine.labels.NAME, and the value is not empty"
                    ));
                }
                Ok(Constraint { key, equal, value })
            })
            .collect()
    }
}

/// `bind = "ADDR:PORT"` or `bind = ["ADDR:PORT", ...]`.
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
enum BindAddresses {
    One(String),
    Many(Vec<String>),
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match BindAddresses::deserialize(d)? {
        BindAddresses::One(address) => vec![address],
        BindAddresses::Many(addresses) => addresses,
    })
}

fn default_stop_grace() -> Duration {
    Duration::from_secs(5)
}

fn one() -> u32 {
    1
}

/// A service's `seccomp` key: as written, or with a profile file's content in place of its path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SeccompSetting {
    /// `default`, `unconfined`, or a profile (inline, or read from its file: what a release
    /// keeps).
    Resolved(SeccompFilter),
    /// The path of a profile file, not read yet.
    File(String),
}

/// Which seccomp filter the instances run under, in the runtime's serialized form
/// (`"default"`, `"unconfined"`, `{"profile": {...}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompFilter {
    Default,
    Unconfined,
    /// An OCI `linux.seccomp` profile; its keys and shape are checked by the runtime when the
    /// definition file is loaded.
    Profile(serde_json::Value),
}

/// The instance network: `"private"` (own network namespace and address per instance) or
/// `"host"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    #[default]
    Private,
    Host,
}

// The schema of [`NetworkMode`]: its name and description are the ones published while the
// type lived in the runtime (kept word for word, so that the schema does not change).
#[derive(JsonSchema)]
#[schemars(
    description = "The schema of [`NetworkMode`] (which lives in the runtime, which knows nothing of schemas)."
)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum NetworkName {
    /// Own network namespace and address per instance.
    Private,
    /// The host's network namespace.
    Host,
}

/// A duration as written in imago.toml: "500ms", "2s", "1m 30s".
#[derive(JsonSchema)]
#[allow(dead_code)]
struct DurationText(String);

/// The JSON Schema of one `[service.NAME]` table.
pub fn service_json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(ServiceSpec)).unwrap_or_default()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Memory limit, e.g. "64M", "1G".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU limit in cores, e.g. 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

/// `[service.NAME.health]`: `type = "http" | "tcp" | "command"` and the fields of that type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: ProbeKind,
    /// http: the path to GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// http: the status that means healthy (200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// http, tcp: the port to probe (default: the instance port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// command: run inside the instance; exit 0 means healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default = "default_interval", with = "humantime_serde_compat")]
    #[schemars(with = "DurationText")]
    pub interval: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde_compat")]
    #[schemars(with = "DurationText")]
    pub timeout: Duration,
    #[serde(default = "one")]
    pub healthy_threshold: u32,
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
    #[serde(default, with = "humantime_serde_compat")]
    #[schemars(with = "DurationText")]
    pub start_period: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    Http,
    Tcp,
    Command,
}

fn three() -> u32 {
    3
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

/// A health probe with its type-specific fields checked and defaulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Http {
        path: String,
        port: u16,
        status: u16,
    },
    Tcp {
        port: u16,
    },
    Command {
        command: Vec<String>,
    },
}

impl HealthCheck {
    /// The probe to run, or why the fields do not make one. `instance_port` is the service's
    /// port inside the instance.
    pub fn probe(&self, instance_port: Option<u16>) -> Result<Probe, (String, String)> {
        let field = |f: &str, reason: &str| Err((format!("health.{f}"), reason.to_owned()));
        let port = self.port.or(instance_port);
        match self.kind {
            ProbeKind::Http | ProbeKind::Tcp if self.command.is_some() => {
                field("command", "only applies to type = \"command\"")
            }
            ProbeKind::Tcp if self.path.is_some() || self.status.is_some() => {
                field("path", "and status only apply to type = \"http\"")
            }
            ProbeKind::Http | ProbeKind::Tcp if port.is_none() => field(
                "port",
                "is needed: an http or tcp check needs a port (set `port`, `target_port` or `health.port`)",
            ),
            ProbeKind::Http => Ok(Probe::Http {
                path: self.path.clone().unwrap_or_else(|| "/".into()),
                port: port.unwrap_or_default(),
                status: self.status.unwrap_or(200),
            }),
            ProbeKind::Tcp => Ok(Probe::Tcp {
                port: port.unwrap_or_default(),
            }),
            ProbeKind::Command => match &self.command {
                Some(c) if !c.is_empty() && self.path.is_none() && self.port.is_none() => {
                    Ok(Probe::Command { command: c.clone() })
                }
                Some(c) if !c.is_empty() => {
                    field("path", "and port do not apply to type = \"command\"")
                }
                _ => field(
                    "command",
                    "is needed and must not be empty for type = \"command\"",
                ),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    Rolling,
    BlueGreen,
}

/// A count or a percentage of the replicas ("25%").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Amount {
    Count(u32),
    Percent(String),
}

impl Amount {
    /// Resolves against `replicas`; percentages round up for surge and down for unavailability,
    /// as Kubernetes does, so that a rollout can always make progress.
    pub fn resolve(&self, replicas: u32, round_up: bool) -> Result<u32, String> {
        match self {
            Amount::Count(n) => Ok(*n),
            Amount::Percent(text) => {
                let number = text
                    .strip_suffix('%')
                    .and_then(|n| n.trim().parse::<u32>().ok())
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| {
                        format!("{text:?} is neither a count nor a percentage like \"25%\"")
                    })?;
                let scaled = u64::from(replicas) * u64::from(number);
                let value = if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                };
                Ok(u32::try_from(value).unwrap_or(u32::MAX))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutSettings {
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default = "default_surge")]
    pub max_surge: Amount,
    #[serde(default = "default_unavailable")]
    pub max_unavailable: Amount,
    /// How long a new instance must stay healthy before it counts as available.
    #[serde(default, with = "humantime_serde_compat")]
    #[schemars(with = "DurationText")]
    pub min_ready: Duration,
    /// A rollout with no progress for this long has failed.
    #[serde(default = "default_deadline", with = "humantime_serde_compat")]
    #[schemars(with = "DurationText")]
    pub progress_deadline: Duration,
    #[serde(default = "yes")]
    pub auto_rollback: bool,
    /// How long a retired instance keeps serving its open connections after it stops getting
    /// new ones.
    #[serde(default = "default_drain", with = "humantime_serde_compat")]
    #[schemars(with = "DurationText")]
    pub drain: Duration,
}

fn default_surge() -> Amount {
    Amount::Percent("25%".into())
}
fn default_unavailable() -> Amount {
    Amount::Count(0)
}
fn default_deadline() -> Duration {
    Duration::from_secs(60)
}
fn default_drain() -> Duration {
    Duration::from_secs(2)
}
fn yes() -> bool {
    true
}

impl Default for RolloutSettings {
    fn default() -> Self {
        RolloutSettings {
            strategy: Strategy::default(),
            max_surge: default_surge(),
            max_unavailable: default_unavailable(),
            min_ready: Duration::ZERO,
            progress_deadline: default_deadline(),
            auto_rollback: true,
            drain: default_drain(),
        }
    }
}

/// Surge and unavailability resolved to instance counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub replicas: u32,
    pub max_surge: u32,
    pub max_unavailable: u32,
}

impl ServiceSpec {
    /// Reads a spec as a release records it (its JSON serialization): the file's form, plus
    /// `image_volumes`, which only imago writes and which the file's form does not read.
    pub fn from_recorded_json(text: &str) -> Result<ServiceSpec, serde_json::Error> {
        let mut fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)?;
        let image_volumes = match fields.remove("image_volumes") {
            Some(paths) => serde_json::from_value(paths)?,
            None => Vec::new(),
        };
        let mut spec: ServiceSpec = serde_json::from_value(serde_json::Value::Object(fields))?;
        spec.image_volumes = image_volumes;
        Ok(spec)
    }

    /// Checks what can be checked without the store or the runtime; errors name the service
    /// and the field.
    pub fn validate(&self, service: &str) -> Result<Limits, SpecError> {
        let bad = |field: &str, reason: String| SpecError::InvalidService {
            service: service.to_owned(),
            field: field.to_owned(),
            reason,
        };
        self.placement
            .parsed_constraints()
            .map_err(|reason| bad("placement.constraints", reason))?;
        if self.placement.max_replicas_per_node == Some(0) {
            return Err(bad(
                "placement.max_replicas_per_node",
                "must be at least 1".into(),
            ));
        }
        if let Some(label) = self
            .placement
            .spread
            .iter()
            .find(|l| l.strip_prefix("node.labels.").is_none_or(str::is_empty))
        {
            return Err(bad(
                "placement.spread",
                format!("{label:?} is not a node label (node.labels.NAME)"),
            ));
        }
        if self.replicas == 0 {
            return Err(bad(
                "replicas",
                "must be at least 1 (use `imago destroy` to remove a service)".into(),
            ));
        }
        if self.image.trim().is_empty() {
            return Err(bad("image", "is empty".into()));
        }
        let max_surge = self
            .rollout
            .max_surge
            .resolve(self.replicas, true)
            .map_err(|r| bad("rollout.max_surge", r))?;
        let max_unavailable = self
            .rollout
            .max_unavailable
            .resolve(self.replicas, false)
            .map_err(|r| bad("rollout.max_unavailable", r))?;
        if max_surge == 0 && max_unavailable == 0 && self.rollout.strategy == Strategy::Rolling {
            return Err(bad(
                "rollout",
                "max_surge and max_unavailable are both 0: a rolling update could never replace an instance"
                    .into(),
            ));
        }
        if let Some(health) = &self.health {
            if health.interval.is_zero() {
                return Err(bad("health.interval", "must be greater than 0".into()));
            }
            if health.timeout.is_zero() {
                return Err(bad("health.timeout", "must be greater than 0".into()));
            }
            if health.healthy_threshold == 0 || health.unhealthy_threshold == 0 {
                return Err(bad("health", "thresholds must be at least 1".into()));
            }
            health
                .probe(self.instance_port())
                .map_err(|(field, reason)| bad(&field, reason))?;
        }
        if let Some(cpus) = self.resources.cpus
            && !(cpus > 0.0 && cpus.is_finite())
        {
            return Err(bad(
                "resources.cpus",
                format!("{cpus} is not a positive number of cores"),
            ));
        }
        self.volume_mounts()
            .map_err(|reason| bad("volumes", reason))?;
        let addresses = self
            .endpoint_addresses()
            .map_err(|reason| bad("bind", reason))?;
        for (index, host) in self.hosts.iter().enumerate() {
            check_host(host).map_err(|reason| bad("hosts", reason))?;
            if self.hosts[..index].contains(host) {
                return Err(bad("hosts", format!("{host:?} is listed twice")));
            }
        }
        if (!self.hosts.is_empty() || self.tls.is_some()) && addresses.is_empty() {
            return Err(bad(
                "hosts",
                "and tls need an endpoint: give `bind` (or `port`)".into(),
            ));
        }
        if let Some(tls) = &self.tls
            && (tls.cert.trim().is_empty() || tls.key.trim().is_empty())
        {
            return Err(bad("tls", "needs both `cert` and `key` files".into()));
        }
        if self.rollout.progress_deadline.is_zero() {
            return Err(bad(
                "rollout.progress_deadline",
                "must be greater than 0".into(),
            ));
        }
        Ok(Limits {
            replicas: self.replicas,
            max_surge,
            max_unavailable,
        })
    }

    /// The parsed `volumes`, checked together (no two at one path).
    pub fn volume_mounts(&self) -> Result<Vec<VolumeMount>, String> {
        let mut mounts: Vec<VolumeMount> = Vec::new();
        for text in &self.volumes {
            let mount: VolumeMount = text.parse().map_err(|e: crate::VolumeError| e.0)?;
            if mounts.iter().any(|m| m.target == mount.target) {
                return Err(format!("two volumes are mounted at {}", mount.target));
            }
            mounts.push(mount);
        }
        Ok(mounts)
    }

    /// The port instances listen on.
    pub fn instance_port(&self) -> Option<u16> {
        self.target_port.or(self.port).or_else(|| {
            self.endpoint_addresses()
                .ok()
                .and_then(|a| a.first().map(|a| a.port()))
        })
    }

    /// Where the service's endpoint listens: the `bind` addresses, else 127.0.0.1:`port`, else
    /// nowhere (the service publishes no endpoint).
    pub fn endpoint_addresses(&self) -> Result<Vec<SocketAddr>, String> {
        if self.bind.is_empty() {
            return Ok(self
                .port
                .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
                .into_iter()
                .collect());
        }
        let mut addresses: Vec<SocketAddr> = Vec::with_capacity(self.bind.len());
        for text in &self.bind {
            let address: SocketAddr = text.parse().map_err(|_| {
                format!(
                    "{text:?} is not an address with a port, like \"0.0.0.0:80\" or \"[::]:80\""
                )
            })?;
            if address.port() == 0 {
                return Err(format!("{text:?} has no port"));
            }
            if self.port.is_some_and(|p| p != address.port()) {
                return Err(format!(
                    "{text:?} is on another port than `port` ({}): give one port, in `bind`",
                    self.port.unwrap_or_default()
                ));
            }
            if addresses.contains(&address) {
                return Err(format!("{text:?} is listed twice"));
            }
            addresses.push(address);
        }
        Ok(addresses)
    }

    /// The ports of the service's endpoint, one each.
    pub fn endpoint_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .endpoint_addresses()
            .unwrap_or_default()
            .iter()
            .map(SocketAddr::port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// Checks what involves several services: no two publish the same port, unless both route by
/// host name on the same addresses of that port (see [`shared_address_conflict`]).
pub fn validate_all(
    services: &BTreeMap<String, ServiceSpec>,
) -> Result<BTreeMap<String, Limits>, SpecError> {
    let mut ports: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    let mut limits = BTreeMap::new();
    for (name, spec) in services {
        limits.insert(name.clone(), spec.validate(name)?);
        // By port whatever the addresses: 0.0.0.0:80 and 127.0.0.1:80 overlap.
        for port in spec.endpoint_ports() {
            let sharing = ports.entry(port).or_default();
            for other in sharing.iter() {
                let first = &services[*other];
                if first.hosts.is_empty() && spec.hosts.is_empty() {
                    return Err(SpecError::PortConflict {
                        port,
                        first: (*other).to_owned(),
                        second: name.clone(),
                    });
                }
                if let Some((address, reason)) = shared_address_conflict(first, spec, port) {
                    return Err(SpecError::SharedAddress {
                        address,
                        first: (*other).to_owned(),
                        second: name.clone(),
                        reason,
                    });
                }
            }
            sharing.push(name);
        }
    }
    Ok(limits)
}

/// Why `first` and `second`, which both publish `port`, cannot share it: one endpoint serves
/// both only if both route by host name, on the very same addresses of that port, both with
/// TLS or both without, and no host name goes to both. The address is the one they collide on.
fn shared_address_conflict(
    first: &ServiceSpec,
    second: &ServiceSpec,
    port: u16,
) -> Option<(String, String)> {
    let on_port = |spec: &ServiceSpec| -> Vec<SocketAddr> {
        let mut addresses: Vec<SocketAddr> = spec
            .endpoint_addresses()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.port() == port)
            .collect();
        addresses.sort_unstable();
        addresses
    };
    let (a, b) = (on_port(first), on_port(second));
    let address = a
        .iter()
        .find(|x| b.contains(x))
        .or(a.first())
        .map_or_else(|| format!("port {port}"), SocketAddr::to_string);
    let reason = if first.hosts.is_empty() || second.hosts.is_empty() {
        "only services that both declare `hosts` can share an address".to_owned()
    } else if a != b {
        "services sharing a port must bind the same addresses of it".to_owned()
    } else if first.tls.is_some() != second.tls.is_some() {
        "one terminates TLS and the other does not: give both `tls` or neither".to_owned()
    } else if let Some(host) = first.hosts.iter().find(|h| second.hosts.contains(h)) {
        format!("both claim host {host:?}")
    } else {
        return None;
    };
    Some((address, reason))
}

/// serde support for durations written as "500ms", "2s", "1m 30s".
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {e} (try \"500ms\", \"2s\", \"1m\")"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn parse(text: &str) -> ServiceSpec {
        let value: toml_like::Value = toml_like::from_str(text);
        serde_json::from_value(value).unwrap()
    }

    /// Tests write specs as JSON (the TOML front end lives in the builder's loader).
    mod toml_like {
        pub type Value = serde_json::Value;
        pub fn from_str(text: &str) -> Value {
            serde_json::from_str(text).unwrap()
        }
    }

    /// A release recorded with the image's declared volumes (as every imago has written them)
    /// reads back with them and equal to what was recorded, so its configuration hash holds;
    /// the recorded form stays as strict as the file's about other keys.
    #[test]
    fn a_recorded_spec_reads_back_with_its_image_volumes() {
        let recorded =
            r#"{"image":"web@sha256:0123","replicas":2,"image_volumes":["/data","/www/"]}"#;
        let spec = ServiceSpec::from_recorded_json(recorded).unwrap();
        assert_eq!(spec.image_volumes, ["/data", "/www/"]);
        assert_eq!(spec.replicas, 2);
        let written = serde_json::to_string(&spec).unwrap();
        assert!(
            written.contains(r#""image_volumes":["/data","/www/"]"#),
            "{written}"
        );
        assert_eq!(ServiceSpec::from_recorded_json(&written).unwrap(), spec);
        let without = ServiceSpec::from_recorded_json(r#"{"image":"web"}"#).unwrap();
        assert!(without.image_volumes.is_empty());
        let err = ServiceSpec::from_recorded_json(r#"{"image":"web","replica":2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `replica`"), "{err}");
    }

    #[test]
    fn services_share_a_port_only_when_both_route_by_host_on_the_same_addresses() {
        let services = |specs: &[(&str, &str)]| -> BTreeMap<String, ServiceSpec> {
            specs
                .iter()
                .map(|(name, json)| ((*name).to_owned(), parse(json)))
                .collect()
        };
        let shop = r#"{"image": "web", "bind": "0.0.0.0:443", "hosts": ["shop.example", "*.shop.example"], "tls": {"cert": "a.pem", "key": "a.key"}}"#;
        let blog = r#"{"image": "web", "bind": "0.0.0.0:443", "hosts": ["blog.example"], "tls": {"cert": "b.pem", "key": "b.key"}}"#;
        validate_all(&services(&[("shop", shop), ("blog", blog)])).unwrap();
        let conflicts = [
            (
                r#"{"image": "web", "bind": "0.0.0.0:443"}"#,
                "only services that both declare `hosts`",
            ),
            (
                r#"{"image": "web", "bind": "0.0.0.0:443", "hosts": ["blog.example"]}"#,
                "one terminates TLS and the other does not",
            ),
            (
                r#"{"image": "web", "bind": "127.0.0.1:443", "hosts": ["blog.example"], "tls": {"cert": "b.pem", "key": "b.key"}}"#,
                "must bind the same addresses",
            ),
            (
                r#"{"image": "web", "bind": "0.0.0.0:443", "hosts": ["shop.example"], "tls": {"cert": "b.pem", "key": "b.key"}}"#,
                "both claim host \"shop.example\"",
            ),
        ];
        for (other, says) in conflicts {
            let err = validate_all(&services(&[("shop", shop), ("zblog", other)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("shop")
                    && err.contains("zblog")
                    && err.contains("443")
                    && err.contains(says),
                "{err}"
            );
        }
        for bad in [
            r#"["Shop.example"]"#,
            r#"["shop.example:443"]"#,
            r#"["a.*.example"]"#,
        ] {
            let spec = parse(&format!(
                r#"{{"image": "web", "port": 80, "hosts": {bad}}}"#
            ));
            let err = spec.validate("web").unwrap_err().to_string();
            assert!(
                err.contains("hosts") && err.contains("not a host name"),
                "{err}"
            );
        }
        let no_endpoint = parse(r#"{"image": "web", "hosts": ["shop.example"]}"#);
        assert!(no_endpoint.validate("web").is_err());
        assert!(host_matches("*.shop.example", "www.shop.example"));
        assert!(!host_matches("*.shop.example", "a.www.shop.example"));
        assert!(!host_matches("*.shop.example", "shop.example"));
    }

    #[test]
    fn defaults_follow_kubernetes_and_nomad_conventions() {
        let spec = parse(r#"{"image": "web"}"#);
        assert_eq!(spec.replicas, 1);
        assert_eq!(spec.rollout.strategy, Strategy::Rolling);
        assert!(spec.rollout.auto_rollback);
        let limits = parse(r#"{"image": "web", "replicas": 10}"#)
            .validate("web")
            .unwrap();
        assert_eq!(
            (limits.max_surge, limits.max_unavailable),
            (3, 0),
            "25% of 10 rounds up"
        );
    }

    #[test]
    fn percentages_round_up_for_surge_and_down_for_unavailable() {
        let a = Amount::Percent("25%".into());
        assert_eq!(a.resolve(3, true).unwrap(), 1);
        assert_eq!(a.resolve(3, false).unwrap(), 0);
        assert!(Amount::Percent("lots".into()).resolve(3, true).is_err());
        assert!(Amount::Percent("150%".into()).resolve(3, true).is_err());
    }

    #[test]
    fn plan_time_errors_name_the_service_and_field() {
        let zero = parse(r#"{"image": "web", "replicas": 0}"#)
            .validate("web")
            .unwrap_err()
            .to_string();
        assert!(zero.contains("web") && zero.contains("replicas"), "{zero}");
        let stuck = parse(r#"{"image": "web", "rollout": {"max_surge": 0, "max_unavailable": 0}}"#)
            .validate("web")
            .unwrap_err()
            .to_string();
        assert!(
            stuck.contains("max_surge and max_unavailable are both 0"),
            "{stuck}"
        );
        let no_port = parse(r#"{"image": "web", "health": {"type": "http"}}"#)
            .validate("web")
            .unwrap_err()
            .to_string();
        assert!(no_port.contains("needs a port"), "{no_port}");
        let volume = parse(r#"{"image": "web", "volumes": ["data:/srv", "logs:/srv/"]}"#)
            .validate("web")
            .unwrap_err()
            .to_string();
        assert!(
            volume.contains("volumes") && volume.contains("two volumes are mounted at /srv"),
            "{volume}"
        );
        let volume = parse(r#"{"image": "web", "volumes": ["data:srv"]}"#)
            .validate("web")
            .unwrap_err()
            .to_string();
        assert!(volume.contains("\"srv\""), "{volume}");
        assert!(
            parse(r#"{"image": "web", "volumes": ["data:/srv", "/etc/hosts:/etc/hosts:ro"]}"#)
                .validate("web")
                .is_ok()
        );
        let bad_duration: Result<ServiceSpec, _> = serde_json::from_value(
            serde_json::json!({"image": "web", "rollout": {"min_ready": "soon"}}),
        );
        assert!(
            bad_duration
                .unwrap_err()
                .to_string()
                .contains("invalid duration \"soon\"")
        );
    }

    #[test]
    fn bind_takes_one_address_or_a_list_and_replaces_the_loopback_default() {
        let default = parse(r#"{"image": "web", "port": 8080}"#);
        assert_eq!(
            default.endpoint_addresses().unwrap(),
            vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        let one = parse(r#"{"image": "web", "bind": "0.0.0.0:80", "target_port": 8080}"#);
        assert_eq!(one.bind, vec!["0.0.0.0:80"]);
        assert_eq!(
            one.endpoint_addresses().unwrap(),
            vec!["0.0.0.0:80".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(one.instance_port(), Some(8080));
        let both = parse(r#"{"image": "web", "bind": ["0.0.0.0:80", "[::]:80"]}"#);
        assert!(both.validate("web").is_ok());
        assert_eq!(both.endpoint_ports(), vec![80]);
        assert_eq!(
            both.instance_port(),
            Some(80),
            "the bind port, as `port` would"
        );
        // Unchanged releases keep their configuration hash: no `bind` key is written.
        assert!(!serde_json::to_string(&default).unwrap().contains("bind"));
        for (bad, says) in [
            (r#"["0.0.0.0"]"#, "not an address with a port"),
            (r#"["0.0.0.0:0"]"#, "has no port"),
            (r#"["0.0.0.0:80", "0.0.0.0:80"]"#, "listed twice"),
            (r#"["0.0.0.0:81"]"#, "another port than `port`"),
        ] {
            let spec = parse(&format!(r#"{{"image": "web", "port": 80, "bind": {bad}}}"#));
            let err = spec.validate("web").unwrap_err().to_string();
            assert!(err.contains("bind") && err.contains(says), "{err}");
        }
    }

    #[test]
    fn two_services_on_one_port_conflict() {
        let mut services = BTreeMap::new();
        services.insert("a".to_string(), parse(r#"{"image": "web", "port": 8080}"#));
        services.insert("b".to_string(), parse(r#"{"image": "api", "port": 8080}"#));
        let err = validate_all(&services).unwrap_err().to_string();
        assert!(
            err.contains("8080") && err.contains('a') && err.contains('b'),
            "{err}"
        );
        services.insert(
            "b".to_string(),
            parse(r#"{"image": "api", "bind": "0.0.0.0:8080"}"#),
        );
        assert!(
            validate_all(&services).is_err(),
            "a bind port conflicts too"
        );
    }

    #[test]
    fn health_checks_parse_all_three_probes() {
        let http = parse(
            r#"{"image":"w","port":80,"health":{"type":"http","path":"/up","interval":"500ms"}}"#,
        );
        let health = http.health.unwrap();
        assert_eq!(health.interval, Duration::from_millis(500));
        assert_eq!(
            health.probe(Some(80)).unwrap(),
            Probe::Http {
                path: "/up".into(),
                port: 80,
                status: 200
            }
        );
        let tcp = parse(r#"{"image":"w","health":{"type":"tcp","port":9000}}"#);
        assert!(tcp.validate("w").is_ok());
        let cmd = parse(r#"{"image":"w","health":{"type":"command","command":["/bin/true"]}}"#);
        assert!(cmd.validate("w").is_ok());
        let mixed = parse(r#"{"image":"w","health":{"type":"tcp","port":1,"command":["x"]}}"#);
        assert!(
            mixed
                .validate("w")
                .unwrap_err()
                .to_string()
                .contains("health.command")
        );
        let unknown: Result<ServiceSpec, _> = serde_json::from_value(
            serde_json::json!({"image":"w","health":{"type":"tcp","paht":"/"}}),
        );
        assert!(unknown.unwrap_err().to_string().contains("paht"));
    }
}

//! `[target.NAME]` in `imago.toml`: where a service runs. Without a target a service runs on
//! this host (the local engine, as always); a target names a cluster engine (Docker Swarm,
//! Kubernetes) that imago drives from the outside: it renders, applies and watches, and keeps
//! its own guarantees on top.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::SpecError;
use crate::service::{ProbeKind, ServiceSpec, Strategy};

/// Which engine runs a target's services.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// This host, with imago's own runtime.
    #[default]
    Local,
    /// A Docker Swarm, through a manager's Docker API.
    Swarm,
    /// A Kubernetes cluster.
    Kubernetes,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Local => "local",
            EngineKind::Swarm => "swarm",
            EngineKind::Kubernetes => "kubernetes",
        }
    }
}

impl EngineKind {
    /// Whether imago can hold a rollout on this engine (`imago pause`): locally the controller
    /// launches nothing; Kubernetes holds a Deployment with `spec.paused`. Docker Swarm cannot:
    /// its API has no client-controlled pause of a service update (`UpdateStatus.State` is
    /// set only by the daemon's `failure_action`; moby/moby#26159 and #37256 ask for one), so
    /// the update would go on while imago showed it paused.
    pub fn holds_rollouts(self) -> bool {
        matches!(self, EngineKind::Local | EngineKind::Kubernetes)
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `[target.NAME]` table as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub engine: EngineKind,
    /// swarm: a Docker API URL (`unix:///var/run/docker.sock`, the default, or
    /// `tcp://HOST:PORT`, with TLS when `DOCKER_TLS_VERIFY` is set, or
    /// `ssh://[USER@]HOST[:PORT]`, through `ssh HOST docker system dial-stdio`); kubernetes: the
    /// kubeconfig file and context, `PATH#CONTEXT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `HOST[:PORT]/PREFIX` where images are pushed for this target; the cluster's nodes pull
    /// them from there by digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// kubernetes only: the namespace of the target's objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// The Docker API a swarm target talks to when it names none.
pub const DEFAULT_DOCKER_ENDPOINT: &str = "unix:///var/run/docker.sock";

impl TargetSpec {
    /// Checks the table on its own; `at` says where it is (`imago.toml:12:1: target prod`).
    pub fn validate(&self) -> Result<(), String> {
        match self.engine {
            EngineKind::Local => {
                for (key, set) in [
                    ("endpoint", self.endpoint.is_some()),
                    ("registry", self.registry.is_some()),
                    ("namespace", self.namespace.is_some()),
                ] {
                    if set {
                        return Err(format!("{key} does not apply to engine = \"local\""));
                    }
                }
            }
            EngineKind::Swarm | EngineKind::Kubernetes => {
                if self.namespace.is_some() && self.engine == EngineKind::Swarm {
                    return Err("namespace applies to engine = \"kubernetes\" only".into());
                }
                match self.registry.as_deref() {
                    None | Some("") => {
                        return Err(format!(
                            "registry is needed for engine = \"{}\": the cluster's nodes pull images from it",
                            self.engine
                        ));
                    }
                    Some(r) if r.contains('@') || r.ends_with('/') => {
                        return Err(format!(
                            "registry {r:?} must be HOST[:PORT] or HOST[:PORT]/PREFIX, without a tag or digest"
                        ));
                    }
                    Some(_) => {}
                }
                if let Some(endpoint) = &self.endpoint
                    && self.engine == EngineKind::Swarm
                    && !endpoint.starts_with("unix://")
                    && !endpoint.starts_with("tcp://")
                    && !endpoint.starts_with("ssh://")
                {
                    return Err(format!(
                        "endpoint {endpoint:?}: a Docker API endpoint is unix:///PATH, tcp://HOST:PORT or ssh://[USER@]HOST[:PORT]"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A service's `target`: the name as written, or the table it names, resolved when the file is
/// loaded (what a release keeps, so that the release alone says where it runs and moving a
/// service to another cluster is a new release).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetRef {
    Resolved(ResolvedTarget),
    Name(String),
}

/// A target with its name, as a release records it (`deny_unknown_fields` does not combine with
/// `flatten`: the table's own keys were checked when the file was read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedTarget {
    pub name: String,
    #[serde(flatten)]
    pub spec: TargetSpec,
}

impl ResolvedTarget {
    /// The Docker API URL of a swarm target.
    pub fn docker_endpoint(&self) -> &str {
        self.spec
            .endpoint
            .as_deref()
            .unwrap_or(DEFAULT_DOCKER_ENDPOINT)
    }
}

impl ServiceSpec {
    /// The resolved target, if the service has one that is not this host.
    pub fn cluster_target(&self) -> Option<&ResolvedTarget> {
        match &self.target {
            Some(TargetRef::Resolved(t)) if t.spec.engine != EngineKind::Local => Some(t),
            _ => None,
        }
    }

    /// The engine that runs the service.
    pub fn engine(&self) -> EngineKind {
        match &self.target {
            Some(TargetRef::Resolved(t)) => t.spec.engine,
            _ => EngineKind::Local,
        }
    }

    /// The repository (below the target's registry) the service's image is pushed to: the
    /// image's name without registry, tag or digest, else the service's name.
    pub fn cluster_repository(&self, service: &str) -> String {
        let image = self.image.split('@').next().unwrap_or_default();
        let last = image.rsplit('/').next().unwrap_or_default();
        let name = last.split(':').next().unwrap_or_default();
        let valid = !name.is_empty()
            && name != "sha256"
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if valid {
            name.to_owned()
        } else {
            service.to_ascii_lowercase()
        }
    }

    /// The keys this service sets that `engine` cannot honour: each one an error naming the key
    /// and the engine (never a silent drop). The local engine honours every key.
    pub fn check_engine(&self, service: &str) -> Result<(), SpecError> {
        let engine = self.engine();
        let unsupported = |key: &str, reason: &str| {
            Err(SpecError::UnsupportedOnEngine {
                service: service.to_owned(),
                key: key.to_owned(),
                engine: engine.as_str(),
                reason: reason.to_owned(),
            })
        };
        if engine == EngineKind::Local && !self.placement.is_empty() {
            return unsupported(
                "placement",
                "this host is one node; placement is for services on a cluster target",
            );
        }
        if engine != EngineKind::Swarm {
            return Ok(());
        }
        if !matches!(
            self.seccomp,
            None | Some(crate::SeccompSetting::Resolved(
                crate::SeccompFilter::Default
            ))
        ) {
            return unsupported(
                "seccomp",
                "the Docker API of a swarm (1.41) cannot set a service's seccomp profile",
            );
        }
        if self.rollout.strategy == Strategy::BlueGreen {
            return unsupported(
                "rollout.strategy",
                "blue-green needs a second service behind a switched published port; use \
                 strategy = \"rolling\" with max_unavailable = 0 (start-first) instead (see docs/swarm.md)",
            );
        }
        if let Some(health) = &self.health {
            if health.healthy_threshold > 1 {
                return unsupported(
                    "health.healthy_threshold",
                    "a Docker health check counts a task healthy on its first success; set it to 1",
                );
            }
            if health.kind == ProbeKind::Http && health.status.is_some_and(|s| s != 200) {
                return unsupported(
                    "health.status",
                    "the http check runs `wget` in the task, which tells only 2xx from the rest",
                );
            }
        }
        let limits = self.validate(service)?;
        if limits.max_surge > 0 && limits.max_unavailable > 0 {
            return unsupported(
                "rollout.max_surge",
                "a swarm update either starts new tasks first (max_unavailable = 0) or stops old \
                 ones first (max_surge = 0), never both: set one of them to 0",
            );
        }
        if self.rollout.drain > self.stop_grace_period {
            return unsupported(
                "rollout.drain",
                "a swarm stops a retired task after stop_grace_period: a longer drain would be cut short",
            );
        }
        Ok(())
    }
}

/// The JSON Schema of one `[target.NAME]` table.
pub fn target_json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(TargetSpec)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use crate::{EngineKind, TargetRef, parse_services_for};

    const FILE: &str = r#"
[target.prod]
engine = "swarm"
registry = "127.0.0.1:5000/team"

[service.web]
image = "web"
target = "prod"

[service.api]
image = "api"
"#;

    fn parse(text: &str, target: Option<&str>) -> Result<Vec<(String, EngineKind)>, String> {
        parse_services_for(Path::new("imago.toml"), text, &[], target)
            .map(|specs| {
                specs
                    .into_iter()
                    .map(|(name, spec)| (name, spec.engine()))
                    .collect()
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_service_s_target_resolves_to_its_table_and_the_flag_overrides_it() {
        let specs = parse_services_for(Path::new("imago.toml"), FILE, &[], None).unwrap();
        let Some(TargetRef::Resolved(t)) = &specs["web"].target else {
            panic!("unresolved: {:?}", specs["web"].target)
        };
        assert_eq!(t.name, "prod");
        assert_eq!(t.docker_endpoint(), "unix:///var/run/docker.sock");
        assert_eq!(specs["api"].engine(), EngineKind::Local);
        assert_eq!(
            parse(FILE, Some("prod")).unwrap(),
            vec![
                ("api".into(), EngineKind::Swarm),
                ("web".into(), EngineKind::Swarm)
            ]
        );
    }

    #[test]
    fn bad_targets_are_errors_at_their_line_and_column() {
        let unknown = parse(
            &FILE.replace("target = \"prod\"", "target = \"stage\""),
            None,
        )
        .unwrap_err();
        assert_eq!(
            unknown,
            "imago.toml:8:10: no target stage; the file defines: prod"
        );
        let no_registry = parse(
            &FILE.replace("registry = \"127.0.0.1:5000/team\"\n", ""),
            None,
        )
        .unwrap_err();
        assert!(
            no_registry.starts_with("imago.toml:2:1: target prod: registry is needed"),
            "{no_registry}"
        );
        let unknown_key = parse(
            &FILE.replace("engine = \"swarm\"", "engine = \"swarm\"\ncolour = 1"),
            None,
        )
        .unwrap_err();
        assert!(
            unknown_key.contains("imago.toml:4:1") && unknown_key.contains("colour"),
            "{unknown_key}"
        );
        let namespace = parse(
            &FILE.replace(
                "engine = \"swarm\"",
                "engine = \"swarm\"\nnamespace = \"x\"",
            ),
            None,
        )
        .unwrap_err();
        assert!(
            namespace.contains("namespace applies to engine = \"kubernetes\" only"),
            "{namespace}"
        );
    }

    #[test]
    fn keys_the_engine_cannot_honour_name_the_key_and_the_engine() {
        let text = FILE.replace(
            "target = \"prod\"",
            "target = \"prod\"\nseccomp = \"unconfined\"",
        );
        let specs = parse_services_for(Path::new("imago.toml"), &text, &[], None).unwrap();
        let err = specs["web"].check_engine("web").unwrap_err().to_string();
        assert!(
            err.starts_with("service web: seccomp cannot be honoured by engine swarm"),
            "{err}"
        );
        assert!(
            specs["api"].check_engine("api").is_ok(),
            "local honours every key"
        );
        let both = FILE.replace(
            "target = \"prod\"",
            "target = \"prod\"\n[service.web.rollout]\nmax_surge = 1\nmax_unavailable = 1",
        );
        let specs = parse_services_for(Path::new("imago.toml"), &both, &[], None).unwrap();
        let err = specs["web"].check_engine("web").unwrap_err().to_string();
        assert!(err.contains("rollout.max_surge"), "{err}");
    }

    #[test]
    fn placement_is_checked_and_refused_on_this_host() {
        let placed = format!(
            "{FILE}[service.web.placement]\nconstraints = [\"node.role==worker\"]\n\
             max_replicas_per_node = 1\nspread = [\"node.labels.zone\"]\n\
             [service.api.placement]\nmax_replicas_per_node = 1\n"
        );
        let specs = parse_services_for(Path::new("imago.toml"), &placed, &[], None).unwrap();
        assert!(
            specs["web"].check_engine("web").is_ok(),
            "the swarm honours it"
        );
        let err = specs["api"].check_engine("api").unwrap_err().to_string();
        assert!(
            err.starts_with("service api: placement cannot be honoured by engine local"),
            "{err}"
        );
        for (bad, key) in [
            (
                "constraints = [\"node.role=worker\"]",
                "placement.constraints",
            ),
            (
                "constraints = [\"node.colour==red\"]",
                "placement.constraints",
            ),
            (
                "max_replicas_per_node = 0",
                "placement.max_replicas_per_node",
            ),
            ("spread = [\"zone\"]", "placement.spread"),
        ] {
            let text = format!("{FILE}[service.web.placement]\n{bad}\n");
            let specs = parse_services_for(Path::new("imago.toml"), &text, &[], None).unwrap();
            let err = specs["web"].validate("web").unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }
}

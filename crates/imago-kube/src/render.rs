//! A release as Kubernetes objects: one Deployment, and a Service when the service has a port.
//! Every key of `[service.NAME]` is either mapped here or refused with
//! [`KubeError::Unsupported`]; docs/kubernetes.md holds the same table in prose.

use std::collections::BTreeMap;
use std::time::Duration;

use imago_oci::Digest;
use imago_spec::{
    Amount, HealthCheck, NetworkMode, Probe as SpecProbe, SeccompFilter, SeccompSetting,
    ServiceSpec, SpecError, Strategy, VolumeSource,
};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    PodAffinityTerm, PodAntiAffinity, TopologySpreadConstraint,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, ExecAction,
    HTTPGetAction, HostPathVolumeSource, Lifecycle, LifecycleHandler,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec as KubeServiceSpec,
    SleepAction, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use crate::KubeError;
use crate::quantity;

/// The label every object of a service carries, and the pods' selector (with `managed-by`).
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "imago";
/// The release number, on the objects and on the pod template.
pub const LABEL_RELEASE: &str = "imago.dev/release";
/// The release's revision (digest + configuration): pods with equal revisions are
/// interchangeable, and imago's gate counts the pods of the revision it rolls out.
pub const LABEL_REVISION: &str = "imago.dev/revision";
/// The configuration hash's first 32 hex digits: a label value holds at most 63 characters.
pub const LABEL_CONFIG: &str = "imago.dev/config";
/// The whole configuration hash (`sha256:...`).
pub const ANNOTATION_CONFIG_HASH: &str = "imago.dev/config-hash";
/// The container port's name, which the Service targets.
pub(crate) const PORT_NAME: &str = "main";

/// An image in a registry the cluster's nodes pull from, pinned by its manifest digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedImage {
    /// `registry.example:5000/team/web`: no tag, no digest.
    pub repository: String,
    pub digest: Digest,
}

impl PinnedImage {
    /// `repository@sha256:...`: what the pods run, whatever a tag points at later.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }
}

/// What one release of one service is made of, as the deployment layer knows it.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseInput<'a> {
    pub service: &'a str,
    pub spec: &'a ServiceSpec,
    pub release: u64,
    /// imago's revision of the release (16 hex digits of digest + configuration hash).
    pub revision: &'a str,
    pub config_hash: &'a Digest,
    pub image: &'a PinnedImage,
    /// The paths the image's config declares as volumes: locally each instance gets an
    /// anonymous volume there, so each pod gets an `emptyDir` (the root is read-only).
    pub image_volumes: &'a [String],
    pub namespace: &'a str,
    /// The rollouts are paused (`imago pause`): the Deployment is rendered with
    /// `spec.paused: true`, which stops the deployment controller's rollout and its progress
    /// deadline (what `kubectl rollout pause` sets). Absent, not `false`, when not paused: the
    /// rendering of an unpaused release stays the same bytes.
    pub paused: bool,
}

/// The objects of one release, as applied and as kept for a later rollback. Stored whole
/// (JSON through serde), so that a rollback re-applies exactly what ran, not a re-rendering by
/// a newer imago.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderedRelease {
    pub service: String,
    pub namespace: String,
    pub release: u64,
    pub deployment: Deployment,
    /// Absent when the service has no port.
    pub endpoint: Option<Service>,
    /// PersistentVolumeClaims the pods mount (named volumes), which must exist before apply.
    pub volume_claims: Vec<String>,
}

/// The least a pod that publishes a port keeps serving after its deletion, whatever
/// `rollout.drain` says (`drain = "0s"` too), as a preStop sleep. Kubernetes sends SIGTERM once
/// the kubelet sees the deletion, and takes the pod out of the Service's endpoints (imago's
/// endpoint takes it out of its routes) at the same time, not before: without a margin the pod
/// stops while new connections still reach it, and they fail (Kubernetes' own advice is a
/// preStop sleep). 2 s: the stop delay a swarm gives every retired task, within which imago's
/// endpoint has stopped routing to it. A service without a port is reached through no
/// endpoint: no margin.
pub const STOP_MARGIN_SECONDS: i32 = 2;

/// Renders a release, or names the first key Kubernetes cannot honour.
pub fn render(input: &ReleaseInput<'_>) -> Result<RenderedRelease, KubeError> {
    let service = input.service;
    let spec = input.spec;
    let refuse = |key: &str, reason: String| KubeError::Unsupported {
        service: service.to_owned(),
        key: key.to_owned(),
        reason,
    };
    check_dns_label(service, "service name").map_err(|r| refuse("service name", r))?;
    check_dns_label(input.namespace, "namespace").map_err(|r| refuse("target.namespace", r))?;
    if !is_label_value(input.revision) {
        return Err(KubeError::InvalidValue {
            service: service.to_owned(),
            key: "revision".into(),
            reason: format!("{:?} is not a kubernetes label value", input.revision),
        });
    }
    spec.validate(service).map_err(|e| match e {
        SpecError::InvalidService { field, reason, .. } => KubeError::InvalidValue {
            service: service.to_owned(),
            key: field,
            reason,
        },
        other => KubeError::InvalidValue {
            service: service.to_owned(),
            key: "service".into(),
            reason: other.to_string(),
        },
    })?;

    let seconds = |key: &str, d: Duration| whole_seconds(d).map_err(|r| refuse(key, r));
    if spec.init == Some(true) {
        return Err(refuse(
            "init",
            "a pod's containers get no init from Kubernetes; put one (tini) in the image as its \
             entrypoint, or leave init unset"
                .into(),
        ));
    }

    // Keys handled in the order of ServiceSpec's fields, so that a new field is noticed here.
    let replicas = i32::try_from(spec.replicas).map_err(|_| {
        refuse(
            "replicas",
            format!("{} is more than a Deployment holds", spec.replicas),
        )
    })?;
    let command = match &spec.command {
        Some(c) if c.is_empty() => {
            return Err(KubeError::InvalidValue {
                service: service.to_owned(),
                key: "command".into(),
                reason: "is empty".into(),
            });
        }
        other => other.clone(),
    };
    let env: Vec<EnvVar> = spec
        .env
        .iter()
        .map(|(name, value)| EnvVar {
            name: name.clone(),
            value: Some(value.clone()),
            value_from: None,
        })
        .collect();
    let instance_port = spec.instance_port();
    let (host_network, dns_policy) = match spec.network {
        NetworkMode::Private => (None, None),
        NetworkMode::Host => (Some(true), Some("ClusterFirstWithHostNet".to_owned())),
    };
    let resources = render_resources(service, spec, &refuse)?;
    let (volumes, mounts, volume_claims) = render_volumes(input, &refuse)?;
    let seccomp_type = match &spec.seccomp {
        None | Some(SeccompSetting::Resolved(SeccompFilter::Default)) => "RuntimeDefault",
        Some(SeccompSetting::Resolved(SeccompFilter::Unconfined)) => "Unconfined",
        Some(SeccompSetting::Resolved(SeccompFilter::Profile(_)) | SeccompSetting::File(_)) => {
            return Err(refuse(
                "seccomp",
                "a custom profile must already be a file on every node (type Localhost); imago carries the profile in the release and cannot place it there".into(),
            ));
        }
    };
    let probes = match &spec.health {
        Some(health) => Some(render_probes(health, instance_port, &refuse, &seconds)?),
        None => None,
    };
    let rollout = &spec.rollout;
    if rollout.strategy == Strategy::BlueGreen {
        return Err(refuse(
            "rollout.strategy",
            "a Deployment only rolls (old and new pods serve side by side); blue-green would need a second Deployment and a Service switch, which imago does not render yet".into(),
        ));
    }
    let min_ready = seconds("rollout.min_ready", rollout.min_ready)?;
    let progress_deadline = seconds("rollout.progress_deadline", rollout.progress_deadline)?;
    if progress_deadline <= min_ready {
        return Err(refuse(
            "rollout.progress_deadline",
            "must be longer than rollout.min_ready (the API server refuses it otherwise)".into(),
        ));
    }
    // `auto_rollback` is imago's own: it re-applies the last complete release's objects.
    let drain = seconds("rollout.drain", rollout.drain)?;
    // A pod with a port is reached through endpoints (imago's, the Service's) that learn of
    // its deletion while the kubelet already stops it: it keeps serving the stop margin.
    let drain = if instance_port.is_some() {
        drain.max(STOP_MARGIN_SECONDS)
    } else {
        drain
    };
    let stop_grace = seconds("stop_grace_period", spec.stop_grace_period)?;

    let selector = selector_labels(service);
    let (affinity, topology_spread_constraints) =
        render_placement(&spec.placement, &selector, &refuse)?;
    let mut labels = selector.clone();
    labels.insert(LABEL_RELEASE.into(), input.release.to_string());
    labels.insert(LABEL_REVISION.into(), input.revision.to_owned());
    labels.insert(LABEL_CONFIG.into(), config_label(input.config_hash));
    let annotations = BTreeMap::from([(
        ANNOTATION_CONFIG_HASH.to_owned(),
        input.config_hash.to_string(),
    )]);
    let meta = ObjectMeta {
        name: Some(service.to_owned()),
        namespace: Some(input.namespace.to_owned()),
        labels: Some(labels.clone()),
        annotations: Some(annotations.clone()),
        ..ObjectMeta::default()
    };

    // Capabilities: none, except binding a port below 1024, which the spec asks for by its port.
    let add_caps = instance_port
        .filter(|p| *p < 1024)
        .map(|_| vec!["NET_BIND_SERVICE".to_owned()]);
    let container = Container {
        name: service.to_owned(),
        image: Some(input.image.reference()),
        // The reference is a digest: a node pulls it once and never again.
        image_pull_policy: Some("IfNotPresent".into()),
        command,
        env: (!env.is_empty()).then_some(env),
        ports: instance_port.map(|p| {
            vec![ContainerPort {
                name: Some(PORT_NAME.into()),
                container_port: i32::from(p),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]
        }),
        resources,
        security_context: Some(SecurityContext {
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: add_caps,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: seccomp_type.into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        readiness_probe: probes.as_ref().map(|p| p.readiness.clone()),
        liveness_probe: probes.as_ref().map(|p| p.liveness.clone()),
        startup_probe: probes.and_then(|p| p.startup),
        // Drain: the pod leaves the Service's endpoints first, then keeps serving open
        // connections this long (at least the stop margin) before it gets SIGTERM.
        lifecycle: (drain > 0).then(|| Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: i64::from(drain),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        host_network,
        dns_policy,
        // The grace period counts from the start of the preStop hook: drain, then stop grace.
        termination_grace_period_seconds: Some(i64::from(drain) + i64::from(stop_grace)),
        // An instance gets the env its spec names, no API token and no other services'
        // addresses: as on the local engine.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        volumes: (!volumes.is_empty()).then_some(volumes),
        affinity,
        topology_spread_constraints,
        ..PodSpec::default()
    };
    let deployment = Deployment {
        metadata: meta.clone(),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(int_or_percent(&rollout.max_surge)),
                    max_unavailable: Some(int_or_percent(&rollout.max_unavailable)),
                }),
            }),
            min_ready_seconds: Some(min_ready),
            progress_deadline_seconds: Some(progress_deadline),
            paused: input.paused.then_some(true),
            ..DeploymentSpec::default()
        }),
        status: None,
    };
    let endpoint = instance_port.map(|target| Service {
        metadata: meta,
        spec: Some(KubeServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: i32::from(spec.port.unwrap_or(target)),
                target_port: Some(IntOrString::String(PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..KubeServiceSpec::default()
        }),
        status: None,
    });
    Ok(RenderedRelease {
        service: service.to_owned(),
        namespace: input.namespace.to_owned(),
        release: input.release,
        deployment,
        endpoint,
        volume_claims,
    })
}

/// The labels that select a service's pods: the same for every release, so that a new
/// release's ReplicaSet replaces the old one's pods.
pub fn selector_labels(service: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_owned(), service.to_owned()),
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
    ])
}

/// The label selector text of [`selector_labels`].
pub fn selector_text(service: &str) -> String {
    format!("{LABEL_NAME}={service},{LABEL_MANAGED_BY}={MANAGED_BY}")
}

fn config_label(hash: &Digest) -> String {
    hash.hex().chars().take(32).collect()
}

fn int_or_percent(amount: &Amount) -> IntOrString {
    match amount {
        Amount::Count(n) => IntOrString::Int(i32::try_from(*n).unwrap_or(i32::MAX)),
        Amount::Percent(text) => IntOrString::String(text.trim().to_owned()),
    }
}

/// Kubernetes counts these durations in whole seconds; rounding would change what the user
/// asked for, so a fraction is refused.
fn whole_seconds(d: Duration) -> Result<i32, String> {
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "kubernetes counts this in whole seconds and {d:?} is not one"
        ));
    }
    i32::try_from(d.as_secs()).map_err(|_| format!("{d:?} is too long"))
}

/// A label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with an
/// alphanumeric character.
fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric())
}

/// A name that must be an RFC 1123 label: lowercase letters, digits and '-', at most 63.
fn check_dns_label(name: &str, what: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} is not a kubernetes object name (lowercase letters, digits and '-', at most 63, not starting or ending with '-')"
        ))
    }
}
/// `placement` where Kubernetes has the same meaning: constraints on node labels, the
/// hostname and the OS as required node affinity (`In`/`NotIn`, all of them to be met, as in a
/// swarm); at most one replica per node as required pod anti-affinity on the hostname; spread
/// over a node label as a topology spread constraint that, like a swarm's spread preference,
/// never blocks scheduling. The rest has no counterpart and is refused.
fn render_placement(
    placement: &imago_spec::Placement,
    selector: &BTreeMap<String, String>,
    refuse: &dyn Fn(&str, String) -> KubeError,
) -> Result<(Option<Affinity>, Option<Vec<TopologySpreadConstraint>>), KubeError> {
    let constraints = placement
        .parsed_constraints()
        .map_err(|r| refuse("placement.constraints", r))?;
    let mut requirements = Vec::new();
    for c in constraints {
        let key = if let Some(label) = c.key.strip_prefix("node.labels.") {
            label.to_owned()
        } else if c.key == "node.hostname" {
            "kubernetes.io/hostname".to_owned()
        } else if c.key == "node.platform.os" {
            "kubernetes.io/os".to_owned()
        } else {
            return Err(refuse(
                "placement.constraints",
                format!(
                    "{}: kubernetes nodes have no such attribute of a swarm's kind; constrain \
                     on node.labels.NAME, node.hostname or node.platform.os",
                    c.key
                ),
            ));
        };
        requirements.push(NodeSelectorRequirement {
            key,
            operator: if c.equal { "In" } else { "NotIn" }.to_owned(),
            values: Some(vec![c.value.to_owned()]),
        });
    }
    let pods = || LabelSelector {
        match_labels: Some(selector.clone()),
        match_expressions: None,
    };
    let anti_affinity = match placement.max_replicas_per_node {
        None => None,
        Some(1) => Some(PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                label_selector: Some(pods()),
                topology_key: "kubernetes.io/hostname".to_owned(),
                ..PodAffinityTerm::default()
            }]),
            preferred_during_scheduling_ignored_during_execution: None,
        }),
        Some(n) => {
            return Err(refuse(
                "placement.max_replicas_per_node",
                format!(
                    "{n}: kubernetes caps replicas per node only at 1 (pod anti-affinity); a \
                     topology spread's skew is not a cap"
                ),
            ));
        }
    };
    let affinity = (!requirements.is_empty() || anti_affinity.is_some()).then(|| Affinity {
        node_affinity: (!requirements.is_empty()).then(|| NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(requirements),
                    match_fields: None,
                }],
            }),
            preferred_during_scheduling_ignored_during_execution: None,
        }),
        pod_anti_affinity: anti_affinity,
        pod_affinity: None,
    });
    let spread: Vec<TopologySpreadConstraint> = placement
        .spread
        .iter()
        .filter_map(|label| label.strip_prefix("node.labels."))
        .map(|label| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: label.to_owned(),
            when_unsatisfiable: "ScheduleAnyway".to_owned(),
            label_selector: Some(pods()),
            ..TopologySpreadConstraint::default()
        })
        .collect();
    Ok((affinity, (!spread.is_empty()).then_some(spread)))
}

fn render_resources(
    service: &str,
    spec: &ServiceSpec,
    refuse: &dyn Fn(&str, String) -> KubeError,
) -> Result<Option<ResourceRequirements>, KubeError> {
    let resources = &spec.resources;
    if resources.pids.is_some() {
        return Err(refuse(
            "resources.pids",
            "a pod's process limit is a node setting (the kubelet's podPidsLimit), not part of a pod".into(),
        ));
    }
    let mut limits = BTreeMap::new();
    if let Some(memory) = &resources.memory {
        let bytes = quantity::parse_memory(memory).map_err(|reason| KubeError::InvalidValue {
            service: service.to_owned(),
            key: "resources.memory".into(),
            reason,
        })?;
        limits.insert("memory".to_owned(), Quantity(quantity::binary_bytes(bytes)));
    }
    if let Some(cpus) = resources.cpus {
        let millis = quantity::cpu_millis(cpus).map_err(|r| refuse("resources.cpus", r))?;
        limits.insert("cpu".to_owned(), Quantity(quantity::cpu_text(millis)));
    }
    // Requests left out: the API server sets them to the limits, as the local engine reserves
    // what it limits.
    Ok((!limits.is_empty()).then(|| ResourceRequirements {
        limits: Some(limits),
        ..ResourceRequirements::default()
    }))
}

type Mounts = (Vec<Volume>, Vec<VolumeMount>, Vec<String>);

fn render_volumes(
    input: &ReleaseInput<'_>,
    refuse: &dyn Fn(&str, String) -> KubeError,
) -> Result<Mounts, KubeError> {
    let parsed = input
        .spec
        .volume_mounts()
        .map_err(|r| refuse("volumes", r))?;
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut claims = Vec::new();
    for (index, mount) in parsed.iter().enumerate() {
        let name = format!("volume-{index}");
        let mut volume = Volume {
            name: name.clone(),
            ..Volume::default()
        };
        match &mount.source {
            // A named volume is shared by all instances: a claim the operator provisions
            // (imago.toml has no size or storage class to create one from).
            VolumeSource::Named { name: claim } => {
                if check_dns_subdomain(claim).is_err() {
                    return Err(refuse(
                        "volumes",
                        format!(
                            "volume {claim:?} must name a PersistentVolumeClaim: lowercase letters, digits, '-' and '.'"
                        ),
                    ));
                }
                volume.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: mount.read_only.then_some(true),
                });
                claims.push(claim.clone());
            }
            // A host path is the node's path: the same meaning as locally, on whichever node.
            VolumeSource::Host { path } => {
                volume.host_path = Some(HostPathVolumeSource {
                    path: path.display().to_string(),
                    type_: None,
                });
            }
        }
        volumes.push(volume);
        mounts.push(VolumeMount {
            name,
            mount_path: mount.target.clone(),
            read_only: mount.read_only.then_some(true),
            ..VolumeMount::default()
        });
    }
    let mut declared: Vec<&String> = input.image_volumes.iter().collect();
    declared.sort();
    declared.dedup();
    let uncovered = declared
        .into_iter()
        .map(|path| path.trim_end_matches('/'))
        .filter(|path| !parsed.iter().any(|m| m.target == *path));
    for (index, path) in uncovered.enumerate() {
        let name = format!("image-volume-{index}");
        volumes.push(Volume {
            name: name.clone(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: path.to_owned(),
            ..VolumeMount::default()
        });
    }
    claims.sort();
    claims.dedup();
    Ok((volumes, mounts, claims))
}

fn check_dns_subdomain(name: &str) -> Result<(), ()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|part| check_dns_label(part, "").is_ok());
    if ok { Ok(()) } else { Err(()) }
}

struct Probes {
    readiness: Probe,
    liveness: Probe,
    startup: Option<Probe>,
}

fn render_probes(
    health: &HealthCheck,
    instance_port: Option<u16>,
    refuse: &dyn Fn(&str, String) -> KubeError,
    seconds: &dyn Fn(&str, Duration) -> Result<i32, KubeError>,
) -> Result<Probes, KubeError> {
    if let Some(status) = health.status {
        return Err(refuse(
            "health.status",
            format!(
                "kubernetes counts any status from 200 to 399 as healthy and cannot require {status}"
            ),
        ));
    }
    // The spec's validate already accepted the fields; a mismatch here is the same error.
    let probe = health
        .probe(instance_port)
        .map_err(|(key, reason)| refuse(&key, reason))?;
    let mut base = Probe::default();
    match probe {
        SpecProbe::Http { path, port, .. } => {
            base.http_get = Some(HTTPGetAction {
                path: Some(path),
                port: IntOrString::Int(i32::from(port)),
                scheme: Some("HTTP".into()),
                ..HTTPGetAction::default()
            });
        }
        SpecProbe::Tcp { port } => {
            base.tcp_socket = Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(port)),
                host: None,
            });
        }
        SpecProbe::Command { command } => {
            base.exec = Some(ExecAction {
                command: Some(command),
            });
        }
    }
    let interval = seconds("health.interval", health.interval)?;
    base.period_seconds = Some(interval);
    base.timeout_seconds = Some(seconds("health.timeout", health.timeout)?);
    let threshold =
        |key: &str, n: u32| i32::try_from(n).map_err(|_| refuse(key, format!("{n} is too large")));
    let unhealthy = threshold("health.unhealthy_threshold", health.unhealthy_threshold)?;
    base.failure_threshold = Some(unhealthy);
    let readiness = Probe {
        success_threshold: Some(threshold(
            "health.healthy_threshold",
            health.healthy_threshold,
        )?),
        ..base.clone()
    };
    // Liveness replaces an instance that turned unhealthy, as the local controller does; the
    // API server requires its success threshold to be 1.
    let liveness = Probe {
        success_threshold: Some(1),
        ..base.clone()
    };
    // During the start period failures do not count: a startup probe that allows that many
    // failed checks, after which the liveness probe takes over.
    let start_period = seconds("health.start_period", health.start_period)?;
    let startup = (start_period > 0).then(|| Probe {
        success_threshold: Some(1),
        failure_threshold: Some(
            i32::try_from(
                (i64::from(start_period) + i64::from(interval.max(1)) - 1)
                    / i64::from(interval.max(1))
                    + i64::from(unhealthy),
            )
            .unwrap_or(i32::MAX),
        ),
        ..base
    });
    Ok(Probes {
        readiness,
        liveness,
        startup,
    })
}

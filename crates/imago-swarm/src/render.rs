//! A release rendered as a swarm service spec, and the comparison of a live spec with it.

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum,
    EndpointSpec, HealthConfig, Limit, Mount, MountType, NetworkAttachmentConfig, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, ServiceSpecUpdateConfig,
    ServiceSpecUpdateConfigFailureActionEnum, ServiceSpecUpdateConfigOrderEnum, TaskSpec,
    TaskSpecContainerSpec, TaskSpecPlacement, TaskSpecPlacementPreferences,
    TaskSpecPlacementSpread, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum,
};
use imago_spec::cluster::{
    ClusterService, EngineError, LABEL_CONFIG_HASH, LABEL_RELEASE, LABEL_REVISION, LABEL_SERVICE,
};
use imago_spec::{NetworkMode, Probe, VolumeSource};

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// `64M`, `1G`, `512k` or a byte count, as the local engine reads `resources.memory`.
fn memory_bytes(text: &str) -> Option<i64> {
    let t = text.trim();
    let unit = t.chars().last().filter(char::is_ascii_alphabetic);
    let shift = match unit.map(|c| c.to_ascii_lowercase()) {
        None | Some('b') => 0,
        Some('k') => 10,
        Some('m') => 20,
        Some('g') => 30,
        Some(_) => return None,
    };
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    digits
        .parse::<i64>()
        .ok()?
        .checked_mul(1 << shift)
        .filter(|v| *v > 0)
}

/// What Docker's health check timeout allows beyond the check's own `timeout`: Docker runs the
/// check as an exec in the task (dockerd, containerd, runc, then the command) and counts the
/// start of that process against the timeout. On a loaded two-core machine (three swarm stress
/// tests at once, load average 20-35) starting it took 1.15 s at the median and 3.65 s at worst
/// while the `wget` it ran took 0.02 s and 0.72 s: with the timeout alone, three slow starts in
/// a row marked healthy tasks unhealthy, the swarm killed them and imago's gate failed good
/// releases. The check's `timeout` is meant for the application's answer, as when imago probes
/// a local instance itself; a check that hangs still fails, this much later.
const HEALTH_EXEC_ALLOWANCE: Duration = Duration::from_secs(5);

/// The swarm-scoped network that the tasks of a `network = "private"` service are attached to
/// (a bridge on each node unless made otherwise before imago's first apply; see
/// `SwarmEngine::apply`).
pub const TASK_NETWORK: &str = "imago-tasks";

/// The labels that tie a swarm object to its release.
pub fn release_labels(desired: &ClusterService) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_SERVICE.to_owned(), desired.service.clone()),
        (LABEL_RELEASE.to_owned(), desired.release.to_string()),
        (LABEL_REVISION.to_owned(), desired.revision.clone()),
        (LABEL_CONFIG_HASH.to_owned(), desired.config_hash.clone()),
    ])
}

/// The swarm service spec of a release (docs/swarm.md has the mapping table).
pub fn render(desired: &ClusterService) -> Result<ServiceSpec, EngineError> {
    let spec = &desired.spec;
    let bad = |reason: String| EngineError::Render {
        service: desired.service.clone(),
        reason,
    };
    spec.check_engine(&desired.service)
        .map_err(|e| bad(e.to_string()))?;
    let limits = spec
        .validate(&desired.service)
        .map_err(|e| bad(e.to_string()))?;
    let health_check = match &spec.health {
        None => None,
        Some(health) => {
            let probe = health
                .probe(spec.instance_port())
                .map_err(|(field, reason)| bad(format!("{field} {reason}")))?;
            // Docker runs the check inside the task: busybox's (or any) wget and nc.
            let test = match probe {
                Probe::Http { path, port, .. } => vec![
                    "CMD".to_owned(),
                    "wget".into(),
                    "-q".into(),
                    "-O".into(),
                    "/dev/null".into(),
                    format!("http://127.0.0.1:{port}{path}"),
                ],
                Probe::Tcp { port } => vec![
                    "CMD".to_owned(),
                    "nc".into(),
                    "-z".into(),
                    "127.0.0.1".into(),
                    port.to_string(),
                ],
                Probe::Command { command } => {
                    std::iter::once("CMD".to_owned()).chain(command).collect()
                }
            };
            Some(HealthConfig {
                test: Some(test),
                interval: Some(nanos(health.interval)),
                timeout: Some(nanos(health.timeout + HEALTH_EXEC_ALLOWANCE)),
                retries: Some(i64::from(health.unhealthy_threshold)),
                start_period: Some(nanos(health.start_period)),
                start_interval: None,
            })
        }
    };
    let mounts = spec
        .volume_mounts()
        .map_err(|r| bad(format!("volumes {r}")))?
        .into_iter()
        .map(|m| {
            let (typ, source) = match m.source {
                VolumeSource::Named { name } => (MountType::VOLUME, name),
                VolumeSource::Host { path } => (MountType::BIND, path.display().to_string()),
            };
            Mount {
                target: Some(m.target),
                source: Some(source),
                typ: Some(typ),
                read_only: Some(m.read_only),
                ..Default::default()
            }
        })
        .collect::<Vec<_>>();
    let memory = spec
        .resources
        .memory
        .as_deref()
        .map(|m| memory_bytes(m).ok_or_else(|| bad(format!("resources.memory {m:?} is no size"))))
        .transpose()?;
    let labels = release_labels(desired);
    let container = TaskSpecContainerSpec {
        image: Some(desired.image.clone()),
        labels: Some(labels.clone()),
        // `command` replaces the image's entrypoint and cmd, as on the local engine.
        command: spec.command.clone(),
        args: spec.command.as_ref().map(|_| Vec::new()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        read_only: Some(true),
        // Docker's own `--init` (tini as PID 1), on by default as for local instances.
        init: Some(spec.init.unwrap_or(true)),
        mounts: (!mounts.is_empty()).then_some(mounts),
        stop_grace_period: Some(nanos(spec.stop_grace_period)),
        health_check,
        ..Default::default()
    };
    // Old tasks keep serving until new ones are healthy when nothing may be unavailable.
    let (order, parallelism) = if limits.max_unavailable == 0 {
        (
            ServiceSpecUpdateConfigOrderEnum::START_FIRST,
            limits.max_surge,
        )
    } else {
        (
            ServiceSpecUpdateConfigOrderEnum::STOP_FIRST,
            limits.max_unavailable,
        )
    };
    let ports = spec.instance_port().map(|port| {
        vec![EndpointPortConfig {
            protocol: Some(EndpointPortConfigProtocolEnum::TCP),
            target_port: Some(i64::from(port)),
            // Host mode (no routing mesh), on a port the node picks: several tasks of a service
            // can then share a node, and imago's endpoint routes to each task's own port.
            published_port: None,
            publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
            ..Default::default()
        }]
    });
    Ok(ServiceSpec {
        name: Some(desired.service.clone()),
        labels: Some(labels),
        task_template: Some(TaskSpec {
            container_spec: Some(container),
            resources: Some(TaskSpecResources {
                limits: Some(Limit {
                    nano_cpus: spec.resources.cpus.map(|c| (c * 1e9).round() as i64),
                    memory_bytes: memory,
                    pids: spec.resources.pids.map(i64::from),
                }),
                ..Default::default()
            }),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                ..Default::default()
            }),
            placement: (!spec.placement.is_empty()).then(|| TaskSpecPlacement {
                constraints: Some(spec.placement.constraints.clone()).filter(|c| !c.is_empty()),
                preferences: Some(
                    spec.placement
                        .spread
                        .iter()
                        .map(|label| TaskSpecPlacementPreferences {
                            spread: Some(TaskSpecPlacementSpread {
                                spread_descriptor: Some(label.clone()),
                            }),
                        })
                        .collect::<Vec<_>>(),
                )
                .filter(|p| !p.is_empty()),
                max_replicas: spec.placement.max_replicas_per_node.map(i64::from),
                ..Default::default()
            }),
            // Never the default bridge: the swarm stops a task on it at once when it retires
            // it, while imago's endpoint may still route to it. A task on any other network is
            // first taken out of service and stopped 2 s later (docs/swarm.md, "Retired tasks").
            networks: Some(vec![NetworkAttachmentConfig {
                target: Some(
                    match spec.network {
                        NetworkMode::Host => "host",
                        NetworkMode::Private => TASK_NETWORK,
                    }
                    .into(),
                ),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(i64::from(spec.replicas)),
            }),
            ..Default::default()
        }),
        update_config: Some(ServiceSpecUpdateConfig {
            parallelism: Some(i64::from(parallelism.max(1))),
            delay: Some(0),
            // imago's gate decides and rolls back image and configuration together: the
            // engine only stops.
            failure_action: Some(ServiceSpecUpdateConfigFailureActionEnum::PAUSE),
            monitor: Some(nanos(spec.rollout.min_ready)),
            max_failure_ratio: Some(0.0),
            order: Some(order),
        }),
        endpoint_spec: ports.map(|ports| EndpointSpec {
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The live health check as the rendering would write it: a service applied by an imago from
/// before [`HEALTH_EXEC_ALLOWANCE`] carries the check's own timeout, which is the same check,
/// not drift (else every such service would be applied again at once after an upgrade, a
/// rollover of the whole fleet); it takes the new form at its next release. Any other timeout,
/// and any other change, stays as it is and so is drift (a timeout set by hand to exactly the
/// service's `timeout` cannot be told from the older form).
fn older_health_form(
    live: Option<&HealthConfig>,
    rendered: Option<&HealthConfig>,
) -> Option<HealthConfig> {
    let mut live = live.cloned()?;
    let rendered_timeout = rendered.and_then(|r| r.timeout);
    let older = live
        .timeout
        .and_then(|t| t.checked_add(nanos(HEALTH_EXEC_ALLOWANCE)));
    if older.is_some() && older == rendered_timeout {
        live.timeout = rendered_timeout;
    }
    Some(live)
}

/// `items` each shown by `show`, sorted, as one comparable text (none: `[]`).
fn sorted<T>(items: Option<Vec<T>>, show: impl Fn(T) -> String) -> String {
    let mut shown: Vec<String> = items.unwrap_or_default().into_iter().map(show).collect();
    shown.sort();
    format!("{shown:?}")
}

/// The fields imago manages whose live value differs from the rendered one, each as
/// `FIELD: LIVE != RENDERED`.
pub fn differences(live: &ServiceSpec, rendered: &ServiceSpec) -> Vec<String> {
    differences_named(live, rendered, &HashMap::new())
}

/// As [`differences`], the networks of `live` named by `network_names` (id -> name) where it
/// knows them: the daemon keeps a network's id in the spec, a rendering names it.
pub(crate) fn differences_named(
    live: &ServiceSpec,
    rendered: &ServiceSpec,
    network_names: &HashMap<String, String>,
) -> Vec<String> {
    let container = |s: &ServiceSpec| {
        s.task_template
            .as_ref()
            .and_then(|t| t.container_spec.clone())
            .unwrap_or_default()
    };
    let (lc, rc) = (container(live), container(rendered));
    let replicas = |s: &ServiceSpec| {
        s.mode
            .as_ref()
            .and_then(|m| m.replicated.as_ref())
            .and_then(|r| r.replicas)
    };
    let env = |c: &TaskSpecContainerSpec| {
        let mut e = c.env.clone().unwrap_or_default();
        e.sort();
        e
    };
    let limits = |s: &ServiceSpec| {
        s.task_template
            .as_ref()
            .and_then(|t| t.resources.as_ref())
            .and_then(|r| r.limits.clone())
            .map(|l| {
                (
                    l.nano_cpus.unwrap_or(0),
                    l.memory_bytes.unwrap_or(0),
                    l.pids.unwrap_or(0),
                )
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    let mut compare = |field: &str, live: String, rendered: String| {
        if live != rendered {
            out.push(format!("{field}: {live} != {rendered}"));
        }
    };
    compare(
        "image",
        lc.image.clone().unwrap_or_default(),
        rc.image.clone().unwrap_or_default(),
    );
    compare(
        "replicas",
        format!("{:?}", replicas(live)),
        format!("{:?}", replicas(rendered)),
    );
    compare("env", format!("{:?}", env(&lc)), format!("{:?}", env(&rc)));
    compare(
        "command",
        format!("{:?}", lc.command.clone().filter(|c| !c.is_empty())),
        format!("{:?}", rc.command.clone().filter(|c| !c.is_empty())),
    );
    compare(
        "read_only",
        format!("{:?}", lc.read_only.unwrap_or(false)),
        format!("{:?}", rc.read_only.unwrap_or(false)),
    );
    compare(
        "init",
        format!("{:?}", lc.init.unwrap_or(false)),
        format!("{:?}", rc.init.unwrap_or(false)),
    );
    compare(
        "resources",
        format!("{:?}", limits(live)),
        format!("{:?}", limits(rendered)),
    );
    // Read back through `service_from_json`: bollard alone would never see the live one.
    let health = |h: Option<&HealthConfig>| {
        h.map(|h| {
            format!(
                "{:?} interval {} timeout {} retries {} start_period {}",
                h.test.clone().unwrap_or_default(),
                h.interval.unwrap_or(0),
                h.timeout.unwrap_or(0),
                h.retries.unwrap_or(0),
                h.start_period.unwrap_or(0)
            )
        })
    };
    let rendered_health = health(rc.health_check.as_ref()).unwrap_or_else(|| "none".into());
    let as_rendered = older_health_form(lc.health_check.as_ref(), rc.health_check.as_ref());
    if health(as_rendered.as_ref()).unwrap_or_else(|| "none".into()) != rendered_health {
        // Shown as it is live.
        let live_health = health(lc.health_check.as_ref()).unwrap_or_else(|| "none".into());
        compare("health", live_health, rendered_health);
    }
    let placement = |s: &ServiceSpec| {
        let p = s
            .task_template
            .as_ref()
            .and_then(|t| t.placement.clone())
            .unwrap_or_default();
        let spread: Vec<String> = p
            .preferences
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.spread?.spread_descriptor)
            .collect();
        format!(
            "constraints {:?} max_replicas_per_node {} spread {spread:?}",
            p.constraints.unwrap_or_default(),
            p.max_replicas.unwrap_or(0),
        )
    };
    compare("placement", placement(live), placement(rendered));
    // By name: the engine names the live spec's networks as the rendering does (the daemon
    // keeps their ids; `SwarmEngine::learn_network_names`). A network added by hand
    // (`--network-add`) or removed (`--network-rm`, which leaves a task on the node's default
    // bridge) changes what retiring a task does (docs/swarm.md, "Retired tasks").
    let networks = |s: &ServiceSpec| {
        let attached = s.task_template.as_ref().and_then(|t| t.networks.as_ref());
        sorted(attached.map(|a| a.iter().collect()), |n| {
            let target = n.target.as_deref().unwrap_or_default();
            network_names
                .get(target)
                .map_or(target, String::as_str)
                .to_owned()
        })
    };
    compare("networks", networks(live), networks(rendered));
    // The published ports the endpoint routes to: a port published by hand
    // (`--publish-add`), or one moved to the routing mesh, is not what imago rendered.
    let ports = |s: &ServiceSpec| {
        let ports = s.endpoint_spec.as_ref().and_then(|e| e.ports.clone());
        sorted(ports, |p| {
            format!(
                "{}/{} published {} mode {}",
                p.target_port.unwrap_or(0),
                p.protocol.map_or("tcp".into(), |p| p.to_string()),
                p.published_port.unwrap_or(0),
                p.publish_mode.map_or("ingress".into(), |m| m.to_string()),
            )
        })
    };
    compare("ports", ports(live), ports(rendered));
    let mounts = |c: &TaskSpecContainerSpec| {
        sorted(c.mounts.clone(), |m| {
            let read_only = if m.read_only.unwrap_or(false) {
                ":ro"
            } else {
                ""
            };
            format!(
                "{}:{}:{}{read_only}",
                m.typ.map_or("volume".into(), |t| t.to_string()),
                m.source.unwrap_or_default(),
                m.target.unwrap_or_default(),
            )
        })
    };
    compare("volumes", mounts(&lc), mounts(&rc));
    compare(
        "stop_grace_period",
        format!("{}", lc.stop_grace_period.unwrap_or(0)),
        format!("{}", rc.stop_grace_period.unwrap_or(0)),
    );
    // The rollout settings the swarm's updater follows (imago's gate relies on them: order,
    // parallelism, monitor, and `pause` on failure so that imago, not the swarm, rolls back).
    let update = |s: &ServiceSpec| {
        s.update_config.as_ref().map(|u| {
            format!(
                "parallelism {} delay {} order {} monitor {} failure_action {} max_failure_ratio {}",
                u.parallelism.unwrap_or(0),
                u.delay.unwrap_or(0),
                u.order.map_or("stop-first".into(), |o| o.to_string()),
                u.monitor.unwrap_or(0),
                u.failure_action.map_or("pause".into(), |a| a.to_string()),
                u.max_failure_ratio.unwrap_or(0.0),
            )
        })
    };
    compare(
        "update_config",
        update(live).unwrap_or_else(|| "none".into()),
        update(rendered).unwrap_or_else(|| "none".into()),
    );
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use imago_spec::ServiceSpec as Spec;

    fn desired(json: serde_json::Value) -> ClusterService {
        ClusterService {
            service: "web".into(),
            release: 3,
            revision: "abcd".into(),
            config_hash: "sha256:00".into(),
            image: "127.0.0.1:5000/web@sha256:11".into(),
            spec: serde_json::from_value::<Spec>(json).unwrap(),
            paused: false,
        }
    }

    #[test]
    fn a_release_renders_pinned_labelled_and_start_first_without_unavailability() {
        let d = desired(serde_json::json!({
            "image": "web", "replicas": 4, "port": 80, "target_port": 8080,
            "env": {"B": "2", "A": "1"}, "command": ["/bin/httpd", "-f"],
            "resources": {"memory": "64M", "cpus": 0.5, "pids": 100},
            "health": {"type": "http", "path": "/up", "interval": "2s", "unhealthy_threshold": 2},
            "rollout": {"max_surge": 2, "max_unavailable": 0, "min_ready": "3s"},
            "stop_grace_period": "7s", "volumes": ["data:/srv"]
        }));
        let s = render(&d).unwrap();
        let c = s
            .task_template
            .as_ref()
            .unwrap()
            .container_spec
            .as_ref()
            .unwrap();
        assert_eq!(c.image.as_deref(), Some("127.0.0.1:5000/web@sha256:11"));
        assert_eq!(c.labels.as_ref().unwrap()[LABEL_RELEASE], "3");
        assert_eq!(s.labels.as_ref().unwrap()[LABEL_REVISION], "abcd");
        assert_eq!(c.env.as_ref().unwrap(), &["A=1", "B=2"]);
        assert_eq!(c.read_only, Some(true));
        assert_eq!(
            c.init,
            Some(true),
            "an init by default, as for local instances"
        );
        assert_eq!(c.stop_grace_period, Some(7_000_000_000));
        let h = c.health_check.as_ref().unwrap();
        assert_eq!(
            h.test.as_ref().unwrap().last().unwrap(),
            "http://127.0.0.1:8080/up"
        );
        assert_eq!((h.retries, h.interval), (Some(2), Some(2_000_000_000)));
        assert_eq!(
            h.timeout,
            Some(nanos(Duration::from_secs(1) + HEALTH_EXEC_ALLOWANCE)),
            "the default timeout of 1 s, and the time Docker takes to start the check"
        );
        let u = s.update_config.as_ref().unwrap();
        assert_eq!(u.order, Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST));
        assert_eq!(u.parallelism, Some(2));
        assert_eq!(u.monitor, Some(3_000_000_000));
        assert_eq!(
            u.failure_action,
            Some(ServiceSpecUpdateConfigFailureActionEnum::PAUSE)
        );
        let l = s
            .task_template
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(
            (l.memory_bytes, l.nano_cpus, l.pids),
            (Some(64 << 20), Some(500_000_000), Some(100))
        );
        let p = &s.endpoint_spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(p.target_port, Some(8080));
        assert_eq!(
            p.publish_mode,
            Some(EndpointPortConfigPublishModeEnum::HOST)
        );
        assert_eq!(differences(&s, &s), Vec::<String>::new());
        // Not the default bridge, whose tasks the swarm stops the moment it retires them.
        let networks = |s: &ServiceSpec| -> Vec<String> {
            let t = s.task_template.as_ref().unwrap();
            t.networks
                .iter()
                .flatten()
                .filter_map(|n| n.target.clone())
                .collect()
        };
        assert_eq!(networks(&s), [TASK_NETWORK]);
        let mut host = d.clone();
        host.spec.network = NetworkMode::Host;
        assert_eq!(networks(&render(&host).unwrap()), ["host"]);
    }

    #[test]
    fn unavailability_renders_stop_first_and_keys_the_engine_cannot_honour_are_errors() {
        let d = desired(serde_json::json!({
            "image": "web", "replicas": 4,
            "rollout": {"max_surge": 0, "max_unavailable": 2}
        }));
        let u = render(&d).unwrap().update_config.unwrap();
        assert_eq!(u.order, Some(ServiceSpecUpdateConfigOrderEnum::STOP_FIRST));
        assert_eq!(u.parallelism, Some(2));
        let mut bg =
            desired(serde_json::json!({"image": "web", "rollout": {"strategy": "blue-green"}}));
        bg.spec.target = Some(imago_spec::TargetRef::Resolved(
            imago_spec::ResolvedTarget {
                name: "prod".into(),
                spec: imago_spec::TargetSpec {
                    engine: imago_spec::EngineKind::Swarm,
                    endpoint: None,
                    registry: Some("127.0.0.1:5000".into()),
                    namespace: None,
                },
            },
        ));
        let err = render(&bg).unwrap_err().to_string();
        assert!(
            err.contains("rollout.strategy") && err.contains("engine swarm"),
            "{err}"
        );
    }

    #[test]
    fn a_hand_made_health_check_change_is_a_difference() {
        let d = desired(serde_json::json!({
            "image": "web", "port": 80, "target_port": 8080,
            "health": {"type": "http", "path": "/up"}
        }));
        let rendered = render(&d).unwrap();
        let mut live = rendered.clone();
        let container = live
            .task_template
            .as_mut()
            .unwrap()
            .container_spec
            .as_mut()
            .unwrap();
        container.health_check.as_mut().unwrap().test = Some(vec!["CMD".into(), "true".into()]);
        let diff = differences(&live, &rendered);
        assert_eq!(diff.len(), 1, "{diff:?}");
        assert!(
            diff[0].starts_with("health: [\"CMD\", \"true\"]"),
            "{diff:?}"
        );
        live.task_template
            .as_mut()
            .unwrap()
            .container_spec
            .as_mut()
            .unwrap()
            .health_check = None;
        assert!(differences(&live, &rendered)[0].starts_with("health: none != "));
    }

    /// A service applied before the exec allowance carries the service's own timeout: no
    /// difference, so that an upgrade does not re-apply every service at once; a timeout,
    /// interval or retry count changed by hand still is one, with or without the older form.
    #[test]
    fn the_health_timeout_of_an_older_imago_is_no_difference_and_a_hand_made_one_is() {
        let d = desired(serde_json::json!({
            "image": "web", "port": 80, "target_port": 8080,
            "health": {"type": "http", "path": "/up", "interval": "2s", "timeout": "3s",
                       "unhealthy_threshold": 4}
        }));
        let rendered = render(&d).unwrap();
        fn health_of(s: &mut ServiceSpec) -> &mut HealthConfig {
            let t = s.task_template.as_mut().unwrap();
            let c = t.container_spec.as_mut().unwrap();
            c.health_check.as_mut().unwrap()
        }
        let secs = |n: i64| n * 1_000_000_000;
        // (timeout, interval, retries) live; what the difference must say of the live check.
        let with = |timeout: Option<i64>, interval: i64, retries: i64| {
            let mut live = rendered.clone();
            let h = health_of(&mut live);
            (h.timeout, h.interval, h.retries) = (timeout, Some(interval), Some(retries));
            differences(&live, &rendered)
        };
        // As this imago renders it, and as an older one did: `timeout` alone.
        assert_eq!(with(Some(secs(8)), secs(2), 4), Vec::<String>::new());
        assert_eq!(with(Some(secs(3)), secs(2), 4), Vec::<String>::new());
        for (timeout, interval, retries, said) in [
            (
                Some(secs(4)),
                secs(2),
                4,
                "interval 2000000000 timeout 4000000000 retries 4 ",
            ),
            (Some(secs(9)), secs(2), 4, "timeout 9000000000 "),
            (Some(secs(2)), secs(2), 4, "timeout 2000000000 "),
            (None, secs(2), 4, "timeout 0 "),
            (
                Some(secs(3)),
                secs(5),
                4,
                "interval 5000000000 timeout 3000000000 ",
            ),
            (Some(secs(3)), secs(2), 1, "timeout 3000000000 retries 1 "),
            (Some(secs(8)), secs(2), 1, "timeout 8000000000 retries 1 "),
        ] {
            let found = with(timeout, interval, retries);
            assert_eq!(found.len(), 1, "{said}: {found:?}");
            let (live, _) = found[0].split_once(" != ").unwrap();
            assert!(live.starts_with("health: "), "{found:?}");
            assert!(live.contains(said), "{said}: {found:?}");
        }
        // The older form of another service's timeout is no match: 3 s + 5 s is not 1 s + 5 s.
        let other = desired(serde_json::json!({
            "image": "web", "port": 80, "target_port": 8080,
            "health": {"type": "http", "path": "/up", "interval": "2s", "timeout": "1s",
                       "unhealthy_threshold": 4}
        }));
        let mut older_live = rendered.clone();
        health_of(&mut older_live).timeout = Some(secs(3));
        assert_eq!(differences(&older_live, &render(&other).unwrap()).len(), 1);
        // A service rendered with no health check at all: the live one is a difference.
        let none = desired(serde_json::json!({"image": "web", "port": 80, "target_port": 8080}));
        let found = differences(&older_live, &render(&none).unwrap());
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].ends_with("!= none"), "{found:?}");
    }

    #[test]
    fn placement_renders_as_the_swarm_s_and_a_hand_made_change_is_a_difference() {
        let d = desired(serde_json::json!({
            "image": "web", "replicas": 2,
            "target": {"name": "prod", "engine": "swarm", "registry": "127.0.0.1:5000/t"},
            "placement": {"constraints": ["node.role==worker", "node.labels.zone!=b"],
                          "max_replicas_per_node": 1, "spread": ["node.labels.rack"]}
        }));
        let s = render(&d).unwrap();
        let p = s.task_template.as_ref().unwrap().placement.clone().unwrap();
        assert_eq!(
            p.constraints.as_deref().unwrap(),
            ["node.role==worker", "node.labels.zone!=b"]
        );
        assert_eq!(p.max_replicas, Some(1));
        let spread = p.preferences.as_ref().unwrap()[0].spread.clone().unwrap();
        assert_eq!(
            spread.spread_descriptor.as_deref(),
            Some("node.labels.rack")
        );
        assert!(differences(&s, &s).is_empty());
        let mut live = s.clone();
        live.task_template.as_mut().unwrap().placement = Some(TaskSpecPlacement {
            constraints: Some(vec!["node.role==manager".into()]),
            ..p
        });
        let found = differences(&live, &s);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("placement: "), "{found:?}");
        let none = render(&desired(serde_json::json!({"image": "web"}))).unwrap();
        assert!(none.task_template.unwrap().placement.is_none());
    }

    /// What `docker service update --network-add/--network-rm/--publish-add/--mount-add/
    /// --stop-grace-period/--update-parallelism` change by hand; the zeros and falses the
    /// daemon leaves out of a spec it gives back are no difference.
    #[test]
    fn hand_made_network_port_volume_stop_and_update_changes_are_differences() {
        let d = desired(serde_json::json!({
            "image": "web", "port": 80, "target_port": 8080, "volumes": ["data:/srv"],
            "stop_grace_period": "7s"
        }));
        let rendered = render(&d).unwrap();
        let mut as_read = rendered.clone();
        {
            let t = as_read.task_template.as_mut().unwrap();
            let c = t.container_spec.as_mut().unwrap();
            c.mounts.as_mut().unwrap()[0].read_only = None;
            let u = as_read.update_config.as_mut().unwrap();
            u.delay = None;
            u.max_failure_ratio = None;
        }
        assert_eq!(differences(&as_read, &rendered), Vec::<String>::new());
        let changed = |change: &dyn Fn(&mut ServiceSpec)| {
            let mut live = as_read.clone();
            change(&mut live);
            differences(&live, &rendered)
        };
        fn networks(s: &mut ServiceSpec) -> &mut Option<Vec<NetworkAttachmentConfig>> {
            &mut s.task_template.as_mut().unwrap().networks
        }
        let added = changed(&|s| {
            networks(s).as_mut().unwrap().push(NetworkAttachmentConfig {
                target: Some("other".into()),
                ..Default::default()
            })
        });
        assert_eq!(
            added,
            [r#"networks: ["imago-tasks", "other"] != ["imago-tasks"]"#]
        );
        // As the daemon keeps it: by id, named as the engine looked it up.
        let mut by_id = as_read.clone();
        networks(&mut by_id).as_mut().unwrap()[0].target = Some("q5x2kd0id".into());
        assert_eq!(differences(&by_id, &rendered).len(), 1);
        let names = HashMap::from([("q5x2kd0id".to_owned(), TASK_NETWORK.to_owned())]);
        assert_eq!(
            differences_named(&by_id, &rendered, &names),
            Vec::<String>::new()
        );
        let removed = changed(&|s| *networks(s) = None);
        assert_eq!(removed, [r#"networks: [] != ["imago-tasks"]"#]);
        let published = changed(&|s| {
            let ports = s.endpoint_spec.as_mut().unwrap().ports.as_mut().unwrap();
            ports[0].published_port = Some(30080);
        });
        assert_eq!(published.len(), 1, "{published:?}");
        assert!(
            published[0].starts_with("ports: [\"8080/tcp published 30080 mode host\"]"),
            "{published:?}"
        );
        let mounted = changed(&|s| {
            let c = s.task_template.as_mut().unwrap().container_spec.as_mut();
            c.unwrap().mounts.as_mut().unwrap().push(Mount {
                target: Some("/etc/x".into()),
                source: Some("/etc".into()),
                typ: Some(MountType::BIND),
                ..Default::default()
            });
        });
        assert_eq!(mounted.len(), 1, "{mounted:?}");
        assert!(mounted[0].starts_with("volumes: "), "{mounted:?}");
        let grace = changed(&|s| {
            let c = s.task_template.as_mut().unwrap().container_spec.as_mut();
            c.unwrap().stop_grace_period = Some(1);
        });
        assert_eq!(grace, ["stop_grace_period: 1 != 7000000000"]);
        let update = changed(&|s| s.update_config.as_mut().unwrap().parallelism = Some(5));
        assert_eq!(update.len(), 1, "{update:?}");
        assert!(
            update[0].starts_with("update_config: parallelism 5 "),
            "{update:?}"
        );
    }

    #[test]
    fn a_hand_made_image_change_is_a_difference() {
        let d = desired(serde_json::json!({"image": "web"}));
        let rendered = render(&d).unwrap();
        let mut live = rendered.clone();
        live.task_template
            .as_mut()
            .unwrap()
            .container_spec
            .as_mut()
            .unwrap()
            .image = Some("other@sha256:22".into());
        let diff = differences(&live, &rendered);
        assert_eq!(diff.len(), 1, "{diff:?}");
        assert!(
            diff[0].starts_with("image: other@sha256:22 != "),
            "{diff:?}"
        );
    }
}

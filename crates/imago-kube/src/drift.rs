//! Drift: a live object compared with the rendered one on the fields imago renders. Maps are
//! compared as subsets (the server adds defaults, other controllers add annotations), lists
//! whole (an env var or a container added by hand changes what runs), list items by their name,
//! and resource quantities by value.

use serde::Serialize;
use serde_json::Value;

use crate::quantity::nano_units;

/// One way a live object differs from its release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Drift {
    /// The release's object does not exist.
    Missing { object: String },
    /// An object imago manages exists though the release has none (a Service after the port
    /// was removed).
    Unexpected { object: String },
    /// A field differs; `path` like `spec.template.spec.containers[web].image`, values as JSON
    /// (`absent` when there is none).
    Changed {
        object: String,
        path: String,
        expected: String,
        live: String,
    },
}

/// The differences of `live` from `rendered` on every field `rendered` sets.
pub fn compare(object: &str, rendered: &Value, live: &Value) -> Vec<Drift> {
    let mut found = Vec::new();
    walk(object, String::new(), rendered, Some(live), &mut found);
    found
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn shown(value: Option<&Value>) -> String {
    value.map_or_else(|| "absent".to_owned(), Value::to_string)
}

fn walk(
    object: &str,
    path: String,
    rendered: &Value,
    live: Option<&Value>,
    found: &mut Vec<Drift>,
) {
    let changed = |found: &mut Vec<Drift>, path: String| {
        found.push(Drift::Changed {
            object: object.to_owned(),
            path,
            expected: rendered.to_string(),
            live: shown(live),
        });
    };
    match (rendered, live) {
        (Value::Object(fields), Some(Value::Object(live_fields))) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            for key in keys {
                if let Some(value) = fields.get(key) {
                    walk(object, join(&path, key), value, live_fields.get(key), found);
                }
            }
        }
        (Value::Array(items), Some(Value::Array(live_items))) => {
            match (keyed(items), keyed(live_items)) {
                (Some(rendered_keyed), Some(live_keyed)) => {
                    for (key, item) in &rendered_keyed {
                        let live_item = live_keyed.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
                        walk(object, format!("{path}[{key}]"), item, live_item, found);
                    }
                    for (key, item) in &live_keyed {
                        if !rendered_keyed.iter().any(|(k, _)| k == key) {
                            found.push(Drift::Changed {
                                object: object.to_owned(),
                                path: format!("{path}[{key}]"),
                                expected: "absent".into(),
                                live: item.to_string(),
                            });
                        }
                    }
                }
                _ if items.len() == live_items.len() => {
                    for (index, (item, live_item)) in items.iter().zip(live_items).enumerate() {
                        walk(
                            object,
                            format!("{path}[{index}]"),
                            item,
                            Some(live_item),
                            found,
                        );
                    }
                }
                _ => changed(found, path),
            }
        }
        (Value::String(a), Some(Value::String(b))) if is_quantity_path(&path) => {
            if a != b && (nano_units(a).is_none() || nano_units(a) != nano_units(b)) {
                changed(found, path);
            }
        }
        (value, Some(live_value)) if value == live_value => {}
        _ => changed(found, path),
    }
}

/// The network settings imago leaves at Kubernetes' defaults, which the rendering therefore
/// does not carry and [`compare`] cannot see changed: a pod put on its node's network
/// (`hostNetwork`, for a service whose `network` is `"private"`) or given another DNS policy,
/// a container port bound on the node (`hostPort`, `hostIP`), a Service given external
/// addresses (`externalIPs`). A live value other than the default is drift; a field the
/// rendering sets is [`compare`]'s.
pub fn network_defaults(object: &str, rendered: &Value, live: &Value) -> Vec<Drift> {
    let mut found = Vec::new();
    let mut kept = |path: String, rendered: &Value, live: &Value, key: &str, defaults: &[Value]| {
        if rendered.get(key).is_some() {
            return;
        }
        if let Some(value) = live.get(key)
            && !defaults.contains(value)
        {
            found.push(Drift::Changed {
                object: object.to_owned(),
                path: join(&path, key),
                expected: "absent".into(),
                live: value.to_string(),
            });
        }
    };
    let pod = "/spec/template/spec";
    if let (Some(r), Some(l)) = (rendered.pointer(pod), live.pointer(pod)) {
        let path = "spec.template.spec";
        kept(path.into(), r, l, "hostNetwork", &[Value::Bool(false)]);
        kept(path.into(), r, l, "dnsPolicy", &["ClusterFirst".into()]);
        // Borrowed: the objects are only read.
        fn list<'v>(v: &'v Value, key: &str) -> &'v [Value] {
            v.get(key)
                .and_then(Value::as_array)
                .map_or(&[], Vec::as_slice)
        }
        fn named<'v>(items: &'v [Value], name: &str) -> Option<&'v Value> {
            items
                .iter()
                .find(|i| i.get("name").and_then(Value::as_str) == Some(name))
        }
        let live_containers = list(l, "containers");
        for container in list(r, "containers") {
            let Some(name) = container.get("name").and_then(Value::as_str) else {
                continue;
            };
            let Some(live_container) = named(live_containers, name) else {
                continue;
            };
            let live_ports = list(live_container, "ports");
            for port in list(container, "ports") {
                let Some(port_name) = port.get("name").and_then(Value::as_str) else {
                    continue;
                };
                let Some(live_port) = named(live_ports, port_name) else {
                    continue;
                };
                let path = format!("{path}.containers[{name}].ports[{port_name}]");
                kept(path.clone(), port, live_port, "hostPort", &[0.into()]);
                kept(path, port, live_port, "hostIP", &["".into()]);
            }
        }
    }
    if rendered.pointer(pod).is_none()
        && let (Some(r), Some(l)) = (rendered.get("spec"), live.get("spec"))
    {
        kept(
            "spec".into(),
            r,
            l,
            "externalIPs",
            &[Value::Array(Vec::new())],
        );
    }
    found
}

/// Items keyed by `name` (containers, env, volumes, mounts, ports), or `None` for a list of
/// scalars or of unnamed items, which is compared position by position.
fn keyed(items: &[Value]) -> Option<Vec<(String, &Value)>> {
    items
        .iter()
        .map(|item| {
            item.get("name")
                .and_then(Value::as_str)
                .map(|name| (name.to_owned(), item))
        })
        .collect()
}

fn is_quantity_path(path: &str) -> bool {
    path.contains("resources.limits.") || path.contains("resources.requests.")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn server_defaults_and_respelled_quantities_are_not_drift() {
        let rendered = json!({"spec": {"containers": [{"name": "web", "image": "a@sha256:1",
            "resources": {"limits": {"memory": "1Gi"}}}]}});
        let live = json!({"spec": {"containers": [{"name": "web", "image": "a@sha256:1",
            "terminationMessagePath": "/dev/termination-log",
            "resources": {"limits": {"memory": "1024Mi"}}}], "schedulerName": "default"}});
        assert_eq!(compare("Deployment x/web", &rendered, &live), vec![]);
    }

    #[test]
    fn a_pod_moved_onto_its_node_s_network_or_a_port_bound_on_the_node_is_drift() {
        let rendered = json!({"spec": {"template": {"spec": {"containers": [{"name": "web",
            "ports": [{"name": "main", "containerPort": 8080}]}]}}}});
        // As the server gives it back: defaults filled in, which are no drift.
        let defaults = json!({"spec": {"template": {"spec": {"dnsPolicy": "ClusterFirst",
            "containers": [{"name": "web", "ports": [{"name": "main", "containerPort": 8080,
            "protocol": "TCP"}]}]}}}});
        assert_eq!(network_defaults("d", &rendered, &defaults), vec![]);
        let mut live = defaults.clone();
        live["spec"]["template"]["spec"]["hostNetwork"] = json!(true);
        live["spec"]["template"]["spec"]["containers"][0]["ports"][0]["hostPort"] = json!(80);
        let paths: Vec<String> = network_defaults("d", &rendered, &live)
            .into_iter()
            .map(|d| match d {
                Drift::Changed { path, live, .. } => format!("{path} = {live}"),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            paths,
            [
                "spec.template.spec.hostNetwork = true",
                "spec.template.spec.containers[web].ports[main].hostPort = 80"
            ]
        );
        // A host-network service renders the field: the field walk's, not this check's.
        let host = json!({"spec": {"template": {"spec": {"hostNetwork": true,
            "dnsPolicy": "ClusterFirstWithHostNet", "containers": []}}}});
        assert_eq!(network_defaults("d", &host, &host), vec![]);
        let service = json!({"spec": {"type": "ClusterIP"}});
        let exposed = json!({"spec": {"type": "ClusterIP", "externalIPs": ["192.0.2.1"]}});
        assert_eq!(network_defaults("s", &service, &service), vec![]);
        assert_eq!(network_defaults("s", &service, &exposed).len(), 1);
    }

    #[test]
    fn a_changed_field_and_an_added_list_item_are_drift() {
        let rendered = json!({"env": [{"name": "A", "value": "1"}], "image": "a@sha256:1"});
        let live = json!({"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
            "image": "a@sha256:2"});
        let drift = compare("Deployment x/web", &rendered, &live);
        assert_eq!(drift.len(), 2, "{drift:?}");
        assert!(drift.contains(&Drift::Changed {
            object: "Deployment x/web".into(),
            path: "env[B]".into(),
            expected: "absent".into(),
            live: r#"{"name":"B","value":"2"}"#.into(),
        }));
        assert!(drift.contains(&Drift::Changed {
            object: "Deployment x/web".into(),
            path: "image".into(),
            expected: r#""a@sha256:1""#.into(),
            live: r#""a@sha256:2""#.into(),
        }));
        let removed = compare("o", &json!({"command": ["a", "b"]}), &json!({}));
        assert_eq!(removed.len(), 1);
    }
}

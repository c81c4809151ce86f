//! `[service.*]` of `imago.toml`: a whole file is read and every service checked, alone and
//! together. Nothing may panic; every refusal names where: the file, a line and column inside
//! the text, or the service (both services for a shared port). A service that passes its
//! checks reads back unchanged from the JSON a release stores.
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use imago_spec::{ServiceSpec, SpecError, parse_services, validate_all};
use libfuzzer_sys::fuzz_target;

const FILE: &str = "dir/imago.toml";

fn check_parse_error(error: &SpecError, text: &str) {
    let lines = text.matches('\n').count() + 1;
    match error {
        SpecError::ServiceTable {
            path, line, column, ..
        } => {
            assert_eq!(path, Path::new(FILE), "{error}");
            assert!(
                (1..=lines).contains(line) && *column >= 1,
                "{error} points outside the {lines} lines of the text"
            );
        }
        SpecError::NoServices { path } | SpecError::UnknownService { path, .. } => {
            assert_eq!(path, Path::new(FILE), "{error}");
        }
        other => panic!("reading the file gave a checking error: {other}"),
    }
    assert!(error.to_string().starts_with(FILE), "{error}");
}

fn check_validate_error(error: &SpecError, specs: &BTreeMap<String, ServiceSpec>) {
    match error {
        SpecError::InvalidService { service, .. } => {
            assert!(specs.contains_key(service), "{error}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("service {service}: ")),
                "{error}"
            );
        }
        SpecError::PortConflict {
            port,
            first,
            second,
        } => {
            assert!(first != second, "{error}");
            for name in [first, second] {
                assert_eq!(specs[name].port, Some(*port), "{error}");
            }
        }
        other => panic!("checking gave a reading error: {other}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let specs = match parse_services(Path::new(FILE), text, &[]) {
        Ok(specs) => specs,
        Err(e) => {
            check_parse_error(&e, text);
            return;
        }
    };
    assert!(!specs.is_empty());
    for (name, spec) in &specs {
        match spec.validate(name) {
            Ok(limits) => {
                assert_eq!(limits.replicas, spec.replicas);
                assert!(limits.replicas >= 1);
                let mounts = spec.volume_mounts().unwrap_or_else(|e| {
                    panic!("service {name} passed its checks, but not its volumes: {e}")
                });
                for mount in &mounts {
                    // What `imago inspect` shows parses back to the same mount.
                    let shown = mount.to_string();
                    assert_eq!(
                        shown.parse::<imago_spec::VolumeMount>().as_ref(),
                        Ok(mount),
                        "{shown}"
                    );
                }
                if let Some(health) = &spec.health {
                    health.probe(spec.instance_port()).unwrap_or_else(|e| {
                        panic!("service {name} passed its checks, but not its probe: {e:?}")
                    });
                }
                let json = serde_json::to_string(spec)
                    .unwrap_or_else(|e| panic!("service {name} does not encode: {e}"));
                let back: ServiceSpec = serde_json::from_str(&json)
                    .unwrap_or_else(|e| panic!("service {name} does not read back: {e}\n{json}"));
                assert_eq!(&back, spec, "{json}");
            }
            Err(e) => check_validate_error(&e, &specs),
        }
    }
    match validate_all(&specs) {
        Ok(limits) => assert_eq!(limits.len(), specs.len()),
        Err(e) => check_validate_error(&e, &specs),
    }
    // Reading one service by name gives that service alone.
    if let Some(name) = specs.keys().next() {
        let one = parse_services(Path::new(FILE), text, std::slice::from_ref(name))
            .unwrap_or_else(|e| panic!("the file read whole, not for {name}: {e}"));
        assert_eq!(one.len(), 1);
        assert_eq!(one.get(name), specs.get(name));
    }
});

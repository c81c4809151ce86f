//! The `[service.*]` tables of `imago.toml`, and the plan-time checks of a service against the
//! ports its image listens on. The builder owns the rest of the file; the caller hands over its
//! text (already read and checked as TOML) and the ports of the file's images.

use std::collections::BTreeMap;
use std::path::Path;

use imago_oci::Digest;
use imago_store::Store;

use crate::error::DeployError;
use crate::spec::{Probe, SeccompFilter, SeccompSetting, ServiceSpec};

/// The services of the definition file at `path` (whose content is `text`), limited to `only`
/// unless it is empty, as [`imago_spec::parse_services`] reads them, with their seccomp
/// profiles read and checked: a file's relative to the definition file, an inline one as it is.
pub fn parse_services(
    path: &Path,
    text: &str,
    only: &[String],
) -> Result<BTreeMap<String, ServiceSpec>, DeployError> {
    parse_services_for(path, text, only, None)
}

/// [`parse_services`] with every service's target resolved, and `target` (`--target NAME`)
/// in place of the one each names when it is given.
pub fn parse_services_for(
    path: &Path,
    text: &str,
    only: &[String],
    target: Option<&str>,
) -> Result<BTreeMap<String, ServiceSpec>, DeployError> {
    let mut specs = imago_spec::parse_services_for(path, text, only, target)?;
    // A profile file is read now: the release keeps its content, so that changing the file
    // makes a new release and a restart changes nothing. An inline profile is checked as a
    // file's is (unknown keys refused) and kept in the runtime's form, as a file's.
    let base = path.parent().unwrap_or(Path::new(""));
    for spec in specs.values_mut() {
        resolve_tls_files(spec, base)?;
    }
    for (name, spec) in &mut specs {
        let bad = |reason: String| DeployError::InvalidService {
            service: name.clone(),
            field: "seccomp".into(),
            reason,
        };
        let seccomp = match &spec.seccomp {
            Some(SeccompSetting::File(file)) => imago_runtime::Seccomp::from_setting(file, base)
                .map_err(|e| {
                    bad(match e {
                        imago_runtime::RuntimeError::SeccompProfile { path, reason } => {
                            format!("profile {}: {reason}", path.display())
                        }
                        other => other.to_string(),
                    })
                })?,
            Some(SeccompSetting::Resolved(SeccompFilter::Profile(profile))) => {
                imago_runtime::Seccomp::from_profile(profile.clone())
                    .map_err(|reason| bad(format!("profile: {reason}")))?
            }
            _ => continue,
        };
        spec.seccomp = Some(crate::spec::seccomp_setting(&seccomp).map_err(bad)?);
    }
    Ok(specs)
}

/// Makes a service's TLS files absolute (relative to the definition file's directory `base`),
/// so that the data plane finds them whatever its working directory, and checks that they load
/// now: a bad file fails `plan` and `apply`, naming it. The release keeps the paths, not the
/// content: the data plane reloads the files when they change.
fn resolve_tls_files(spec: &mut ServiceSpec, base: &Path) -> Result<(), DeployError> {
    let Some(tls) = &mut spec.tls else {
        return Ok(());
    };
    let absolute = |file: &str| {
        let joined = base.join(file);
        std::path::absolute(&joined).unwrap_or(joined)
    };
    let paths = crate::router::TlsPaths {
        cert: absolute(&tls.cert),
        key: absolute(&tls.key),
    };
    crate::router::load_certified_key(&paths)?;
    tls.cert = paths.cert.display().to_string();
    tls.key = paths.key.display().to_string();
    Ok(())
}

/// The TCP port numbers of image port declarations (`80`, `80/tcp`; `53/udp` is left out).
pub fn tcp_ports<'a>(ports: impl IntoIterator<Item = &'a str>) -> Vec<u16> {
    ports
        .into_iter()
        .filter(|p| !p.ends_with("/udp"))
        .filter_map(|p| p.split('/').next().and_then(|n| n.parse().ok()))
        .collect()
}

/// The TCP ports the stored image `digest` says it listens on (`ExposedPorts`).
pub fn exposed_ports(store: &Store, digest: &Digest) -> Result<Vec<u16>, DeployError> {
    let image = store.load_image(digest)?;
    let ports = image
        .config
        .config()
        .as_ref()
        .and_then(|c| c.exposed_ports().clone())
        .unwrap_or_default();
    Ok(tcp_ports(ports.iter().map(String::as_str)))
}

/// Plan-time checks that need the image: the instance and health-check ports must be ones the
/// image exposes (when it declares any). `image` names the image in the error.
pub fn check_ports(
    service: &str,
    spec: &ServiceSpec,
    image: &str,
    exposed: &[u16],
) -> Result<(), DeployError> {
    if exposed.is_empty() {
        return Ok(());
    }
    let not_exposed = |user: &'static str, port: u16| DeployError::PortNotExposed {
        service: service.to_owned(),
        user,
        port,
        image: image.to_owned(),
        exposed: exposed
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    if let Some(health) = &spec.health
        && let Ok(Probe::Http { port, .. } | Probe::Tcp { port }) =
            health.probe(spec.instance_port())
        && !exposed.contains(&port)
    {
        return Err(not_exposed("the health check probes", port));
    }
    if let Some(port) = spec.instance_port().filter(|p| !exposed.contains(p)) {
        return Err(not_exposed("instances are expected on", port));
    }
    Ok(())
}

/// A process listening on a TCP port, as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortHolder {
    pub pid: u32,
    /// Its program name (`comm`).
    pub program: String,
}

/// The processes with a listening TCP socket on `port` (any address, IPv4 or IPv6): the socket
/// inodes from /proc/net/tcp and tcp6, then the processes whose descriptors name them. Only
/// what this process may read is seen (all of it as root).
pub fn tcp_port_holders(port: u16) -> Vec<PortHolder> {
    let mut inodes = std::collections::BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... uid timeout inode; 0A is LISTEN.
            let (Some(local), Some("0A"), Some(inode)) =
                (fields.get(1), fields.get(3).copied(), fields.get(9))
            else {
                continue;
            };
            let listens_on = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if listens_on == Some(port) && *inode != "0" {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let mut holders = Vec::new();
    if inodes.is_empty() {
        return holders;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return holders;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| inodes.contains(target.to_string_lossy().as_ref()))
        });
        if holds {
            let program = std::fs::read_to_string(entry.path().join("comm"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_default();
            holders.push(PortHolder { pid, program });
        }
    }
    holders
}

/// A service's endpoint addresses (its `bind`, else loopback) must not be held by a process
/// other than `ours` (this home's controller and data plane).
pub fn check_endpoint_of(
    service: &str,
    spec: &ServiceSpec,
    ours: &[u32],
) -> Result<(), DeployError> {
    for addr in spec.endpoint_addresses().unwrap_or_default() {
        check_endpoint_free(service, addr, ours)?;
    }
    Ok(())
}

/// Checks that `service`'s endpoint can listen on `addr`: nothing listens there, or only the
/// processes in `ours` (the running controller, which already serves it). Found before any
/// release is recorded, so `plan` shows it and `apply` refuses at once instead of recording a
/// release the controller cannot serve.
pub fn check_endpoint_free(
    service: &str,
    addr: std::net::SocketAddr,
    ours: &[u32],
) -> Result<(), DeployError> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
        // Not a conflict with another process (no permission for a low port, say): the
        // controller reports what it meets when it binds.
        Err(_) => return Ok(()),
    }
    let holders = tcp_port_holders(addr.port());
    if !holders.is_empty() && holders.iter().all(|h| ours.contains(&h.pid)) {
        return Ok(());
    }
    // No holder found: the socket may have closed between the bind and the look-up (a process
    // that just exited). Free now means free.
    if holders.is_empty() && std::net::TcpListener::bind(addr).is_ok() {
        return Ok(());
    }
    let holder = holders.iter().find(|h| !ours.contains(&h.pid)).map_or_else(
        || "another process".to_owned(),
        |h| format!("pid {} ({})", h.pid, h.program),
    );
    Err(DeployError::PortInUse {
        service: service.to_owned(),
        addr,
        holder,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const FILE: &str = r#"
[image.web]
from = "scratch"

[service.web]
image = "web"
port = 8080

[service.api]
image = "api:v1"
target_port = 9000
health = { type = "tcp" }
"#;

    fn parse(text: &str, only: &[&str]) -> Result<BTreeMap<String, ServiceSpec>, DeployError> {
        let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
        parse_services(Path::new("dir/imago.toml"), text, &only)
    }

    #[test]
    fn services_are_read_beside_the_builders_tables_and_filtered_by_name() {
        let all = parse(FILE, &[]).unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["api", "web"]);
        assert_eq!(all["web"].port, Some(8080));
        assert_eq!(all["api"].instance_port(), Some(9000));
        let one = parse(FILE, &["api"]).unwrap();
        assert_eq!(one.keys().collect::<Vec<_>>(), ["api"]);
    }

    #[test]
    fn errors_name_the_file_and_where_in_it() {
        let typo = "[service.web]\nimage = \"web\"\nreplica = 2\n";
        assert_eq!(
            parse(typo, &[]).unwrap_err().to_string(),
            "dir/imago.toml:3:1: unknown field `replica`, expected one of `image`, `replicas`, \
             `command`, `env`, `port`, `target_port`, `bind`, `hosts`, `tls`, `network`, `resources`, \
             `volumes`, `seccomp`, `init`, `health`, `rollout`, `target`, `stop_grace_period`, \
             `placement`"
        );
        let bad_type = "[service.web]\nimage = \"web\"\nreplicas = \"two\"\n";
        let err = parse(bad_type, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("dir/imago.toml:3:12: invalid type"),
            "{err}"
        );
        assert_eq!(
            parse("[image.web]\nfrom = \"scratch\"\n", &[])
                .unwrap_err()
                .to_string(),
            "dir/imago.toml defines no service ([service.NAME] tables)"
        );
        assert_eq!(
            parse(FILE, &["web", "db"]).unwrap_err().to_string(),
            "dir/imago.toml has no service db; it defines: api, web"
        );
    }

    /// Release 1 of service "web" with `spec`.
    fn release(spec: &ServiceSpec) -> crate::state::Release {
        crate::state::Release {
            service: "web".into(),
            number: 1,
            image_digest: Digest::of(b"image"),
            config_hash: Digest::of(b"config"),
            revision: "0123456789abcdef".into(),
            spec: spec.clone(),
            created_ms: 0,
            reason: "apply".into(),
            rollback_of: None,
            restart: 0,
        }
    }

    /// Services run their instances under an init unless `init = false`; the key is part of
    /// the release (a changed setting is a new configuration), and leaving it out keeps a
    /// release's stored spec as it was.
    #[test]
    fn instances_of_a_service_run_under_an_init_unless_it_says_init_false() {
        let toml = std::path::Path::new("/nonexistent/imago.toml");
        let text =
            "[service.web]\nimage = \"web\"\n\n[service.bare]\nimage = \"web\"\ninit = false\n";
        let specs = parse_services(toml, text, &[]).unwrap();
        assert_eq!(specs["web"].init, None);
        assert_eq!(specs["bare"].init, Some(false));
        assert!(
            !serde_json::to_string(&specs["web"])
                .unwrap()
                .contains("init")
        );
        let engine = imago_runtime::Engine::Runc;
        let with = crate::controller::instance_spec(&release(&specs["web"]), engine).unwrap();
        let without = crate::controller::instance_spec(&release(&specs["bare"]), engine).unwrap();
        assert!(with.init);
        assert!(!without.init);
        assert_ne!(with.spec_hash().unwrap(), without.spec_hash().unwrap());
        let schema = imago_spec::service_json_schema().to_string();
        assert!(schema.contains("\"init\""), "the schema lacks init");
    }

    #[test]
    fn a_seccomp_profile_file_is_read_relative_to_the_definition_file() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("imago.toml");
        let text = "[service.web]\nimage = \"web\"\nseccomp = \"profiles/p.json\"\n\n\
                    [service.open]\nimage = \"web\"\nseccomp = \"unconfined\"\n";
        let err = parse_services(&toml, text, &[]).unwrap_err().to_string();
        let file = dir.path().join("profiles/p.json");
        assert!(
            err.starts_with("service web: seccomp cannot read")
                && err.contains(&file.display().to_string()),
            "{err}"
        );
        std::fs::create_dir(dir.path().join("profiles")).unwrap();
        std::fs::write(
            &file,
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "archMap": []}"#,
        )
        .unwrap();
        let err = parse_services(&toml, text, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "service web: seccomp profile {}: unknown field \"archMap\"",
                file.display()
            )),
            "{err}"
        );
        std::fs::write(&file, r#"{"defaultAction": "SCMP_ACT_ALLOW"}"#).unwrap();
        let specs = parse_services(&toml, text, &[]).unwrap();
        let web = &specs["web"];
        let Some(SeccompSetting::Resolved(SeccompFilter::Profile(_))) = &web.seccomp else {
            panic!("{:?}", web.seccomp);
        };
        // What a release stores reads back as the same setting, content and all.
        for spec in specs.values() {
            let json = serde_json::to_string(spec).unwrap();
            let back: ServiceSpec = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, spec, "{json}");
        }
        assert_eq!(
            specs["open"].seccomp,
            Some(SeccompSetting::Resolved(SeccompFilter::Unconfined))
        );
        // And the instances of a release run under it.
        let engine = imago_runtime::Engine::Embedded;
        let instance = |spec: &ServiceSpec| {
            crate::controller::instance_spec(&release(spec), engine)
                .unwrap()
                .seccomp
        };
        assert_eq!(instance(&specs["open"]), imago_runtime::Seccomp::Unconfined);
        assert!(matches!(instance(web), imago_runtime::Seccomp::Profile(_)));
        let mut plain = web.clone();
        plain.seccomp = None;
        assert_eq!(instance(&plain), imago_runtime::Seccomp::Default);
        plain.seccomp = Some(SeccompSetting::File("p.json".into()));
        let err = crate::controller::instance_spec(&release(&plain), engine).unwrap_err();
        assert!(err.to_string().contains("p.json"), "{err}");
    }

    #[test]
    fn an_inline_seccomp_profile_with_an_unknown_key_is_refused_naming_the_key_and_service() {
        let text = |profile: &str| {
            format!(
                "[service.web]\nimage = \"web\"\n\n[service.api]\nimage = \"api\"\n\
                 seccomp = {{ profile = {{ {profile} }} }}\n"
            )
        };
        let typo = text(r#"defaultAction = "SCMP_ACT_ALLOW", syscals = []"#);
        let err = parse(&typo, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("service api: seccomp profile: unknown field \"syscals\""),
            "{err}"
        );
        let nested = text(
            r#"defaultAction = "SCMP_ACT_ALLOW", syscalls = [{ names = ["mount"], action = "SCMP_ACT_ERRNO", errnoret = 1 }]"#,
        );
        let err = parse(&nested, &[]).unwrap_err().to_string();
        assert!(
            err.contains("service api") && err.contains("\"errnoret\" in syscalls[0]"),
            "{err}"
        );
        // A correct inline profile is kept in the runtime's form, as a file's content is, and
        // its instances run under it.
        let good = text(
            r#"defaultAction = "SCMP_ACT_ALLOW", syscalls = [{ names = ["mount"], action = "SCMP_ACT_ERRNO" }]"#,
        );
        let specs = parse(&good, &[]).unwrap();
        let seccomp = crate::spec::runtime_seccomp(specs["api"].seccomp.as_ref()).unwrap();
        let imago_runtime::Seccomp::Profile(profile) = &seccomp else {
            panic!("{seccomp:?}");
        };
        assert_eq!(
            specs["api"].seccomp,
            Some(crate::spec::seccomp_setting(&seccomp).unwrap())
        );
        assert_eq!(profile.syscalls().as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn udp_and_unparsable_ports_are_left_out() {
        assert_eq!(
            tcp_ports(["80/tcp", "53/udp", "8080", "http/tcp", "9000/sctp"]),
            [80, 8080, 9000]
        );
    }

    #[test]
    fn instance_and_health_ports_must_be_exposed_when_the_image_declares_ports() {
        let all = parse(FILE, &[]).unwrap();
        let (web, api) = (&all["web"], &all["api"]);
        assert!(
            check_ports("web", web, "abc123", &[]).is_ok(),
            "no ports declared"
        );
        assert!(check_ports("web", web, "abc123", &[80, 8080]).is_ok());
        assert_eq!(
            check_ports("web", web, "abc123", &[80, 443])
                .unwrap_err()
                .to_string(),
            "service web: instances are expected on port 8080, but image abc123 listens on 80, 443"
        );
        assert_eq!(
            check_ports("api", api, "api:v1", &[80])
                .unwrap_err()
                .to_string(),
            "service api: the health check probes port 9000, but image api:v1 listens on 80"
        );
        let mut elsewhere = api.clone();
        elsewhere.health.as_mut().unwrap().port = Some(9100);
        assert_eq!(
            check_ports("api", &elsewhere, "api:v1", &[9000])
                .unwrap_err()
                .to_string(),
            "service api: the health check probes port 9100, but image api:v1 listens on 9000"
        );
    }

    #[test]
    fn a_port_held_by_another_process_is_refused_naming_its_pid_and_program() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let me = std::process::id();
        let err = check_endpoint_free("a", addr, &[]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, DeployError::PortInUse { .. }), "{err:?}");
        assert!(
            text.contains(&format!("port {addr} is already in use by pid {me} (")),
            "{text}"
        );
        let holders = tcp_port_holders(addr.port());
        assert!(holders.iter().any(|h| h.pid == me && !h.program.is_empty()));
        // The running controller's own endpoint is no conflict.
        check_endpoint_free("a", addr, &[me]).unwrap();
        drop(listener);
        check_endpoint_free("a", addr, &[]).unwrap();
    }
}

//! The OCI runtime bundle of an instance: `config.json` generated from the image config and the
//! instance spec. The same bundle is run by the embedded engine and by `runc`.

use std::fs;
use std::path::Path;

use imago_oci::spec::ImageConfiguration;
use serde_json::{Value, json};

use crate::volumes::MountedVolume;
use crate::{InstanceSpec, NetworkMode, RuntimeError};

/// Capabilities an instance keeps: runc's default set minus MKNOD, NET_RAW, SYS_CHROOT,
/// AUDIT_WRITE and SETFCAP. Never NET_ADMIN or SYS_ADMIN.
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
];

/// runc's default masked paths, and Docker's `/sys/devices/virtual/powercap` (the RAPL energy
/// counters, a power side channel: CVE-2020-8694). A path the host lacks is skipped by both
/// engines.
pub(crate) const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// runc's default read-only paths.
pub(crate) const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Size of each writable tmpfs (/tmp, /run).
const TMPFS_SIZE: &str = "size=16m";

/// The instance's own small writable tmpfs mounts and their modes: with volumes, the only
/// writable places. Volume targets below them need no mount point in the image.
pub(crate) const TMPFS_MOUNTS: &[(&str, &str)] = &[("/tmp", "1777"), ("/run", "755")];

/// Inputs that are not in the spec: where things are on this host.
#[derive(Debug, Clone)]
pub struct BundleContext<'a> {
    pub id: &'a str,
    pub rootfs: &'a Path,
    /// `/var/run/netns/<name>` of the instance's network namespace (private network).
    pub netns_path: Option<&'a Path>,
    pub cgroups_path: &'a str,
    /// Bound after the standard mounts, in this order.
    pub volumes: &'a [MountedVolume],
    /// The host's static init, bound read-only at [`INIT_TARGET`] and run as PID 1 (the
    /// instance's program becomes its child) when the spec asks for an init.
    pub init: Option<&'a Path>,
}

/// Where an instance's init is bound inside it: on the tmpfs /dev that every instance gets,
/// so the mount point is never created in the image's read-only, shared root filesystem (and a
/// volume can never be mounted over it: volumes under /dev are refused).
pub const INIT_TARGET: &str = "/dev/init";

/// The process the instance runs: entrypoint + cmd, each overridable, like docker.
pub fn process_args(spec: &InstanceSpec, image: &ImageConfiguration) -> Vec<String> {
    let cfg = image.config().as_ref();
    let entrypoint = spec
        .entrypoint
        .clone()
        .or_else(|| cfg.and_then(|c| c.entrypoint().clone()))
        .unwrap_or_default();
    let cmd = spec
        .args
        .clone()
        .or_else(|| cfg.and_then(|c| c.cmd().clone()))
        .unwrap_or_default();
    entrypoint.into_iter().chain(cmd).collect()
}

fn process_env(spec: &InstanceSpec, image: &ImageConfiguration) -> Vec<String> {
    let mut env: Vec<String> = image
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    for (k, v) in &spec.env {
        let prefix = format!("{k}=");
        env.retain(|e| !e.starts_with(&prefix));
        env.push(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_owned());
    }
    env
}

/// Resolves the image's `User` (uid, uid:gid, name, name:group) against the rootfs.
fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let (uid, primary_gid) = match u.parse::<u32>() {
        Ok(uid) => {
            let gid = passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 3 && f[2] == u)
                .and_then(|f| f[3].parse().ok())
                .unwrap_or(uid);
            (uid, gid)
        }
        Err(_) => passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == u)
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .ok_or_else(|| format!("user {u:?} not found in the image's /etc/passwd"))?,
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => fs::read_to_string(rootfs.join("etc/group"))
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 2 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("group {g:?} not found in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

/// The mounts every container gets (runc's defaults): /proc, a tmpfs /dev with its pts, shm
/// and mqueue, and a read-only /sys. Instances and build steps alike.
pub(crate) fn default_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ]
}

/// Builds the OCI runtime `config.json` value.
pub fn runtime_config(
    spec: &InstanceSpec,
    image: &ImageConfiguration,
    ctx: &BundleContext<'_>,
) -> Result<Value, RuntimeError> {
    let cfg = image.config().as_ref();
    let mut args = process_args(spec, image);
    if args.is_empty() {
        return Err(RuntimeError::InvalidSpec(format!(
            "image {} has no entrypoint or cmd and no arguments were given",
            spec.image
        )));
    }
    if ctx.init.is_some() {
        // tini's own options end at `--`: the program's arguments are never read as tini's.
        args.splice(0..0, [INIT_TARGET.to_owned(), "--".to_owned()]);
    }
    let user = cfg.and_then(|c| c.user().clone()).unwrap_or_default();
    let (uid, gid) =
        resolve_user(&user, ctx.rootfs).map_err(|reason| RuntimeError::InvalidImage {
            digest: spec.image.clone(),
            reason,
        })?;
    let cwd = cfg
        .and_then(|c| c.working_dir().clone())
        .filter(|d| d.starts_with('/'))
        .unwrap_or_else(|| "/".to_owned());

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    match (spec.network, ctx.netns_path) {
        (NetworkMode::Private, Some(path)) => {
            namespaces.push(json!({"type": "network", "path": path}))
        }
        (NetworkMode::Private, None) => namespaces.push(json!({"type": "network"})),
        (NetworkMode::Host, _) => {}
    }

    let mut resources = json!({
        "devices": [{"allow": false, "access": "rwm"}],
    });
    if let Some(m) = spec.resources.memory_bytes {
        resources["memory"] = json!({"limit": m});
    }
    if let Some(c) = spec.resources.cpu_millis {
        resources["cpu"] = json!({"quota": c * 100, "period": 100_000u64});
    }
    if let Some(p) = spec.resources.pids {
        resources["pids"] = json!({"limit": p});
    }

    let caps = CAPABILITIES;
    let hostname = spec.name.clone().unwrap_or_else(|| ctx.id.to_owned());
    let hostname: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();

    let mut mounts = default_mounts();
    for (destination, mode) in TMPFS_MOUNTS {
        mounts.push(
            json!({"destination": destination, "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", format!("mode={mode}"), TMPFS_SIZE]}),
        );
    }
    if let Some(init) = ctx.init {
        mounts.push(json!({
            "destination": INIT_TARGET,
            "type": "bind",
            "source": init,
            "options": ["bind", "ro", "nosuid", "nodev"],
        }));
    }
    // Parents before children, whatever order they were given in: a volume at /data bound
    // after one at /data/sub would hide it (docker sorts the same way).
    let mut volumes: Vec<&MountedVolume> = ctx.volumes.iter().collect();
    volumes.sort_by_key(|v| v.target.split('/').filter(|p| !p.is_empty()).count());
    for volume in volumes {
        mounts.push(json!({
            "destination": volume.target,
            "type": "bind",
            "source": volume.source,
            "options": ["rbind", "nosuid", "nodev", if volume.read_only { "ro" } else { "rw" }],
        }));
    }

    let mut config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": process_env(spec, image),
            "cwd": cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024u64, "soft": 1024u64}],
            "noNewPrivileges": true,
        },
        "root": {"path": ctx.rootfs, "readonly": true},
        "hostname": hostname,
        "mounts": mounts,
        "annotations": {
            "org.imago.instance.id": ctx.id,
            "org.imago.image.digest": spec.image.to_string(),
        },
        "linux": {
            "cgroupsPath": ctx.cgroups_path,
            "namespaces": namespaces,
            "resources": resources,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    });
    if let Some(seccomp) = spec.seccomp.oci_section(spec.engine)? {
        config["linux"]["seccomp"] = seccomp;
    }
    Ok(config)
}

/// Writes `<bundle>/config.json`. The root filesystem is the shared cache entry (by absolute path).
pub fn write_bundle(bundle: &Path, config: &Value) -> Result<(), RuntimeError> {
    fs::create_dir_all(bundle).map_err(RuntimeError::io("cannot create", bundle))?;
    // Checked here so that a config the engines would reject fails before anything starts.
    let _: oci_spec::runtime::Spec =
        serde_json::from_value(config.clone()).map_err(|source| RuntimeError::Json {
            path: bundle.join("config.json"),
            source,
        })?;
    crate::state::write_json_unsynced(&bundle.join("config.json"), config)
}

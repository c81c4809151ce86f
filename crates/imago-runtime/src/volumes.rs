//! Volumes: with /tmp and /run, the only writable places of an instance.
//!
//! Three kinds, all bind-mounted: named volumes under `<home>/volumes/<name>` (they outlive
//! instances), host paths, and an anonymous per-instance volume for every path the image declares
//! (`Volumes` in its config) that no explicit mount covers; anonymous volumes live in the
//! instance's directory and go away with `rm`. New named and anonymous volumes start with a copy
//! of what the image has at the target, as docker does.
//!
//! The shared rootfs cache is never written: a target must already exist in the image (the
//! cache creates the image's declared volume paths at unpack time) unless it lies on one of the
//! instance's own tmpfs mounts (/tmp, /run).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use imago_oci::spec::ImageConfiguration;
use serde::{Deserialize, Serialize};

use crate::spec::{VolumeMount, VolumeSource};
use crate::{InstanceSpec, RuntimeError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    Named,
    Host,
    Anonymous,
}

/// A volume as mounted into one instance (recorded with the instance, shown by inspect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountedVolume {
    pub kind: VolumeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The host path that is bound.
    pub source: PathBuf,
    pub target: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// The volume paths an image declares, normalized (no trailing slash), sorted, without `/`.
pub fn declared_volumes(image: &ImageConfiguration) -> Vec<String> {
    let mut out: BTreeSet<String> = BTreeSet::new();
    if let Some(volumes) = image.config().as_ref().and_then(|c| c.volumes().as_ref()) {
        for v in volumes {
            let t = v.trim_end_matches('/');
            if t.starts_with('/') {
                out.insert(t.to_owned());
            }
        }
    }
    out.into_iter().collect()
}

/// Creates the directories of `path` (absolute, inside the image) under `root`, never following a
/// symlink: a path that runs into a symlink or a non-directory is left alone. Used on a private
/// tree before it is published, so nothing can race it.
pub(crate) fn create_mount_point(root: &Path, path: &str) -> Result<(), RuntimeError> {
    let mut current = root.to_path_buf();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if part == ".." || part == "." {
            return Ok(());
        }
        current.push(part);
        match fs::symlink_metadata(&current) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(&current).map_err(RuntimeError::io("cannot create", &current))?;
                fs::set_permissions(&current, fs::Permissions::from_mode(0o755))
                    .map_err(RuntimeError::io("cannot chmod", &current))?;
            }
            Err(e) => {
                return Err(RuntimeError::Io {
                    action: "cannot inspect",
                    path: current,
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// What the image has at `target`: `Some(true)` a directory, `Some(false)` a file, `None`
/// nothing usable (missing, or reached through a symlink, which could point anywhere).
fn image_entry(rootfs: &Path, target: &str) -> Option<bool> {
    let mut current = rootfs.to_path_buf();
    let mut is_dir = true;
    for part in target.split('/').filter(|p| !p.is_empty()) {
        if !is_dir {
            return None;
        }
        current.push(part);
        let m = fs::symlink_metadata(&current).ok()?;
        if m.file_type().is_symlink() {
            return None;
        }
        is_dir = m.is_dir();
    }
    Some(is_dir)
}

fn on_own_tmpfs(target: &str) -> bool {
    crate::bundle::TMPFS_MOUNTS
        .iter()
        .any(|(t, _)| Path::new(target).starts_with(t) && target != *t)
}

/// Resolves every volume of one instance, creating named and anonymous volumes as needed.
/// `volumes_dir` is `<home>/volumes`; anonymous volumes go to `<instance_dir>/volumes`.
pub fn prepare(
    spec: &InstanceSpec,
    image: &ImageConfiguration,
    rootfs: &Path,
    volumes_dir: &Path,
    instance_dir: &Path,
) -> Result<Vec<MountedVolume>, RuntimeError> {
    let mut mounted = Vec::new();
    for volume in &spec.volumes {
        mounted.push(prepare_explicit(spec, volume, rootfs, volumes_dir)?);
    }
    let covered: BTreeSet<&str> = spec.volumes.iter().map(|v| v.target.as_str()).collect();
    let declared: Vec<String> = declared_volumes(image)
        .into_iter()
        .filter(|t| !covered.contains(t.as_str()))
        .collect();
    for (index, target) in declared.into_iter().enumerate() {
        let in_image = image_entry(rootfs, &target) == Some(true);
        if !in_image && !on_own_tmpfs(&target) {
            return Err(RuntimeError::InvalidImage {
                digest: spec.image.clone(),
                reason: format!(
                    "the image declares volume {target} but has no directory there (a symlink or a file is in the way)"
                ),
            });
        }
        let source = instance_dir.join("volumes").join(index.to_string());
        fs::create_dir_all(&source).map_err(RuntimeError::io("cannot create", &source))?;
        if in_image {
            seed_from_image(&image_dir(rootfs, &target), &source)?;
        }
        mounted.push(MountedVolume {
            kind: VolumeKind::Anonymous,
            name: None,
            source,
            target,
            read_only: false,
        });
    }
    Ok(mounted)
}

fn prepare_explicit(
    spec: &InstanceSpec,
    volume: &VolumeMount,
    rootfs: &Path,
    volumes_dir: &Path,
) -> Result<MountedVolume, RuntimeError> {
    let target = volume.target.as_str();
    let in_image = image_entry(rootfs, target);
    let target_is_dir = match in_image {
        Some(is_dir) => is_dir,
        None if on_own_tmpfs(target) => true,
        None => {
            return Err(RuntimeError::InvalidSpec(format!(
                "volume target {target} does not exist in image {} (or is reached through a symlink); \
                 instances never add files to the shared image tree: mount at a directory the image \
                 has, declare the volume in the image (`volumes = [\"{target}\"]`), or use a path under /tmp",
                spec.image
            )));
        }
    };
    match &volume.source {
        VolumeSource::Named { name } => {
            if !target_is_dir {
                return Err(RuntimeError::InvalidSpec(format!(
                    "volume {name} cannot be mounted at {target}: the image has a file there, not a directory"
                )));
            }
            let seed = (in_image == Some(true)).then(|| image_dir(rootfs, target));
            let source = ensure_named(volumes_dir, name, seed.as_deref())?;
            Ok(MountedVolume {
                kind: VolumeKind::Named,
                name: Some(name.clone()),
                source,
                target: target.to_owned(),
                read_only: volume.read_only,
            })
        }
        VolumeSource::Host { path } => {
            let meta = fs::metadata(path).map_err(|e| {
                RuntimeError::InvalidSpec(format!(
                    "host path {} of volume {volume} cannot be used: {e}",
                    path.display()
                ))
            })?;
            if meta.is_dir() != target_is_dir {
                return Err(RuntimeError::InvalidSpec(format!(
                    "volume {volume}: the host path is a {} but the image has a {} at {target}",
                    if meta.is_dir() { "directory" } else { "file" },
                    if target_is_dir { "directory" } else { "file" },
                )));
            }
            Ok(MountedVolume {
                kind: VolumeKind::Host,
                name: None,
                source: path.clone(),
                target: target.to_owned(),
                read_only: volume.read_only,
            })
        }
    }
}

/// `<volumes_dir>/<name>`, created (seeded from the image's directory `seed`, if any) if it does
/// not exist yet. Creation is atomic: a temporary directory renamed into place, so concurrent
/// launches agree on one volume.
fn ensure_named(
    volumes_dir: &Path,
    name: &str,
    seed: Option<&Path>,
) -> Result<PathBuf, RuntimeError> {
    let path = volumes_dir.join(name);
    if path.is_dir() {
        return Ok(path);
    }
    fs::create_dir_all(volumes_dir).map_err(RuntimeError::io("cannot create", volumes_dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(&leftover_name(".tmp", name, "-"))
        .tempdir_in(volumes_dir)
        .map_err(RuntimeError::io(
            "cannot create a temporary directory in",
            volumes_dir,
        ))?;
    if let Some(seed) = seed {
        seed_from_image(seed, tmp.path())?;
    }
    let tmp_path = tmp.keep();
    if let Err(e) = fs::rename(&tmp_path, &path) {
        let _ = fs::remove_dir_all(&tmp_path);
        // Another launch created it first: use theirs.
        if !path.is_dir() {
            return Err(RuntimeError::Io {
                action: "cannot rename into place",
                path,
                source: e,
            });
        }
    }
    Ok(path)
}

/// The name of a volume `name` while it is created (`kind` `.tmp`, then a random suffix) or
/// removed (`.rm`): `<kind>.<pid>.<start>.<name><end>`, naming this process by its pid and
/// start time, so that [`remove_killed_leftovers`] tells what a killed creation or removal
/// left from one under way, even once the pid is reused. Without a start time, the older
/// names: `.tmp-<name>-` (nobody named: never swept) and `.rm-<name>-<pid>` (judged by pid).
fn leftover_name(kind: &str, name: &str, end: &str) -> String {
    let me = std::process::id();
    match crate::state::own_start_time() {
        Some(start) => format!("{kind}.{me}.{start}.{name}{end}"),
        None if kind == ".rm" => format!(".rm-{name}-{me}"),
        None => format!("{kind}-{name}{end}"),
    }
}

/// Whether the volumes-directory entry `entry` is what a creation or removal whose process is
/// dead left ([`leftover_name`]; an older imago's `.rm-<name>-<pid>` by its pid). The older
/// `.tmp-<name>-*` names nobody: never taken.
fn left_by_the_dead(entry: &str) -> bool {
    let named = entry
        .strip_prefix(".tmp.")
        .or_else(|| entry.strip_prefix(".rm."));
    if let Some(rest) = named {
        let mut fields = rest.splitn(3, '.');
        let pid = fields.next().and_then(|p| p.parse::<i32>().ok());
        let start = fields.next().and_then(|s| s.parse::<u64>().ok());
        return match (pid, start, fields.next()) {
            (Some(pid), Some(start), Some(_)) => !crate::state::is_alive(pid, start),
            _ => false,
        };
    }
    entry
        .strip_prefix(".rm-")
        .and_then(|rest| rest.rsplit_once('-'))
        .and_then(|(_, pid)| pid.parse::<i32>().ok())
        .is_some_and(|pid| crate::state::process_start_time(pid).is_none())
}

/// Removes what creations and removals of named volumes killed midway left in `volumes_dir`
/// (a tree not yet renamed into place, or one renamed away and not yet deleted) whose process
/// is dead; those of live processes are under way. How many it removed.
pub fn remove_killed_leftovers(volumes_dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(volumes_dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| left_by_the_dead(&e.file_name().to_string_lossy()))
        .filter(|e| fs::remove_dir_all(e.path()).is_ok())
        .count()
}

/// Where the image's directory `target` is in the unpacked tree.
fn image_dir(rootfs: &Path, target: &str) -> PathBuf {
    rootfs.join(target.trim_start_matches('/'))
}

/// Copies the image's directory `src` into the new volume `dest`: directories, regular files and
/// symlinks with their modes and owners. `dest` itself takes the mode and owner of `src`.
fn seed_from_image(src: &Path, dest: &Path) -> Result<(), RuntimeError> {
    copy_attributes(src, dest)?;
    copy_dir_contents(src, dest)
}

fn copy_attributes(src: &Path, dest: &Path) -> Result<(), RuntimeError> {
    let meta = fs::symlink_metadata(src).map_err(RuntimeError::io("cannot inspect", src))?;
    std::os::unix::fs::lchown(dest, Some(meta.uid()), Some(meta.gid()))
        .map_err(RuntimeError::io("cannot chown", dest))?;
    if !meta.file_type().is_symlink() {
        fs::set_permissions(dest, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(RuntimeError::io("cannot chmod", dest))?;
    }
    Ok(())
}

fn copy_dir_contents(src: &Path, dest: &Path) -> Result<(), RuntimeError> {
    let entries = fs::read_dir(src).map_err(RuntimeError::io("cannot read", src))?;
    for entry in entries {
        let entry = entry.map_err(RuntimeError::io("cannot read", src))?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        let kind = entry
            .file_type()
            .map_err(RuntimeError::io("cannot inspect", &from))?;
        if kind.is_symlink() {
            let link = fs::read_link(&from).map_err(RuntimeError::io("cannot read", &from))?;
            std::os::unix::fs::symlink(&link, &to)
                .map_err(RuntimeError::io("cannot create", &to))?;
        } else if kind.is_dir() {
            fs::create_dir(&to).map_err(RuntimeError::io("cannot create", &to))?;
            copy_dir_contents(&from, &to)?;
        } else if kind.is_file() {
            fs::copy(&from, &to).map_err(RuntimeError::io("cannot copy", &from))?;
        } else {
            // Devices, fifos and sockets are not data.
            continue;
        }
        copy_attributes(&from, &to)?;
    }
    Ok(())
}

/// A named volume and the instances (running or not, until removed) that mount it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedVolume {
    pub name: String,
    pub path: PathBuf,
    pub instances: Vec<String>,
}

fn users_of(name: &str, instances: &[crate::Instance]) -> Vec<String> {
    instances
        .iter()
        .filter(|i| {
            i.volumes
                .iter()
                .any(|v| v.kind == VolumeKind::Named && v.name.as_deref() == Some(name))
        })
        .map(|i| i.id.clone())
        .collect()
}

/// The named volumes in `volumes_dir`, sorted by name, with the instances that mount them.
pub fn list_named(
    volumes_dir: &Path,
    instances: &[crate::Instance],
) -> Result<Vec<NamedVolume>, RuntimeError> {
    let entries = match fs::read_dir(volumes_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(RuntimeError::Io {
                action: "cannot list",
                path: volumes_dir.to_owned(),
                source: e,
            });
        }
    };
    let mut list = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Volumes being created or removed are hidden directories (`.tmp*`, `.rm*`).
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        list.push(NamedVolume {
            instances: users_of(&name, instances),
            path: entry.path(),
            name,
        });
    }
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(list)
}

/// Deletes the named volume `name` and its data, unless one of `instances` mounts it.
pub fn remove_named(
    volumes_dir: &Path,
    name: &str,
    instances: &[crate::Instance],
) -> Result<(), RuntimeError> {
    crate::spec::validate_volume_name(name)?;
    let path = volumes_dir.join(name);
    if !path.is_dir() {
        return Err(RuntimeError::Volume(format!("no such volume {name}")));
    }
    let using = users_of(name, instances);
    if !using.is_empty() {
        return Err(RuntimeError::Volume(format!(
            "volume {name} is mounted by instance(s) {}; remove them first",
            using.join(", ")
        )));
    }
    // Renamed away first, so the name is gone at once even if the removal is cut short;
    // leftovers start with a dot and are never listed.
    let doomed = volumes_dir.join(leftover_name(".rm", name, ""));
    fs::rename(&path, &doomed).map_err(RuntimeError::io("cannot remove", &path))?;
    fs::remove_dir_all(&doomed).map_err(RuntimeError::io("cannot remove", &doomed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imago_oci::Digest;

    fn image_with_volumes(volumes: &[&str]) -> ImageConfiguration {
        let vols: serde_json::Map<String, serde_json::Value> = volumes
            .iter()
            .map(|v| (v.to_string(), serde_json::json!({})))
            .collect();
        serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Volumes": vols},
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
        .unwrap()
    }

    #[test]
    fn resolves_named_host_and_anonymous_volumes() {
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = tmp.path().join("rootfs");
        fs::create_dir_all(rootfs.join("data/sub")).unwrap();
        fs::write(rootfs.join("data/sub/seed"), "from image").unwrap();
        fs::create_dir_all(rootfs.join("cache")).unwrap();
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::write(rootfs.join("etc/app.conf"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", rootfs.join("link")).unwrap();
        let host_file = tmp.path().join("host.conf");
        fs::write(&host_file, "host").unwrap();
        let image = image_with_volumes(&["/data/", "/cache"]);
        let mut spec = InstanceSpec::new(Digest::of(b"img"));
        spec.volumes = vec![
            "store:/data".parse().unwrap(),
            format!("{}:/etc/app.conf:ro", host_file.display())
                .parse()
                .unwrap(),
        ];
        let vols = tmp.path().join("volumes");
        let inst = tmp.path().join("instance");
        let mounted = prepare(&spec, &image, &rootfs, &vols, &inst).unwrap();
        assert_eq!(mounted.len(), 3, "{mounted:?}");
        assert_eq!(mounted[0].kind, VolumeKind::Named);
        assert_eq!(mounted[0].source, vols.join("store"));
        assert_eq!(
            fs::read_to_string(vols.join("store/sub/seed")).unwrap(),
            "from image",
            "a new named volume starts with the image's content"
        );
        assert_eq!(mounted[1].kind, VolumeKind::Host);
        assert!(mounted[1].read_only);
        assert_eq!(mounted[2].kind, VolumeKind::Anonymous);
        assert_eq!(mounted[2].target, "/cache");
        assert!(mounted[2].source.starts_with(&inst));

        // An existing named volume is used as it is, never re-seeded.
        fs::remove_file(vols.join("store/sub/seed")).unwrap();
        prepare(&spec, &image, &rootfs, &vols, &inst).unwrap();
        assert!(!vols.join("store/sub/seed").exists());

        // Targets the image lacks, or reaches through a symlink, are refused; /tmp is fine.
        for (volume, expect) in [
            ("v:/nope", "does not exist"),
            ("v:/link", "does not exist"),
            ("v:/etc/app.conf", "a file there"),
        ] {
            spec.volumes = vec![volume.parse().unwrap()];
            let err = prepare(&spec, &image, &rootfs, &vols, &inst)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{volume}: {err}");
        }
        spec.volumes = vec!["scratch:/tmp/scratch".parse().unwrap()];
        prepare(&spec, &image, &rootfs, &vols, &inst).unwrap();
        spec.volumes = vec!["/no/such/host/dir:/data".parse().unwrap()];
        let err = prepare(&spec, &image, &rootfs, &vols, &inst)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such/host/dir"), "{err}");
    }

    /// Regression: a named volume's creation or removal killed midway left its hidden tree in
    /// `<home>/volumes` for good (a removal's named by its pid alone, a creation's by nobody).
    /// Both name their process by pid and start time now, and the sweep takes those of dead
    /// processes (a reused pid is another process), and an older imago's removals by pid; the
    /// older creations name nobody and stay, as do those under way.
    #[test]
    fn the_sweep_takes_what_killed_volume_creations_and_removals_left() {
        let real = || {
            std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap()
        };
        let identity = |child: &std::process::Child| {
            let pid = i32::try_from(child.id()).unwrap();
            (pid, crate::state::process_start_time(pid).unwrap())
        };
        let mut live = real();
        let (live_pid, live_start) = identity(&live);
        let mut gone = real();
        let (dead_pid, dead_start) = identity(&gone);
        gone.kill().unwrap();
        gone.wait().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let vols = tmp.path();
        // This process's own names: its pid and start time.
        let mine = leftover_name(".tmp", "data", "-");
        assert_eq!(
            mine,
            format!(
                ".tmp.{}.{}.data-",
                std::process::id(),
                crate::state::own_start_time().unwrap()
            )
        );
        let kept = [
            format!("{mine}AbC123"),
            format!(".rm.{live_pid}.{live_start}.data"),
            format!(".rm-data-{live_pid}"),
            ".tmp-data-XyZ123".to_owned(),
            "data".to_owned(),
            format!(".rm.{live_pid}.x.data"),
        ];
        let taken = [
            format!(".tmp.{dead_pid}.{dead_start}.data-AbC123"),
            format!(".rm.{dead_pid}.{dead_start}.my.vol-1"),
            format!(".rm.{live_pid}.{}.data", live_start + 1),
            format!(".rm-data-{dead_pid}"),
            format!(".rm-my-vol.2-{dead_pid}"),
        ];
        for name in kept.iter().chain(&taken) {
            fs::create_dir_all(vols.join(name).join("sub")).unwrap();
            fs::write(vols.join(name).join("sub/file"), b"x").unwrap();
        }
        assert_eq!(remove_killed_leftovers(vols), taken.len());
        let mut left: Vec<String> = fs::read_dir(vols)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut expected = kept.to_vec();
        expected.sort();
        assert_eq!(left, expected);
        assert_eq!(remove_killed_leftovers(vols), 0);
        // A removal renames to its own name and deletes: nothing left.
        remove_named(vols, "data", &[]).unwrap();
        assert!(!vols.join("data").exists());
        live.kill().unwrap();
        live.wait().unwrap();
        assert_eq!(
            remove_killed_leftovers(vols),
            2,
            "the live process's, now dead"
        );
    }

    #[test]
    fn mount_points_never_follow_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("var")).unwrap();
        create_mount_point(&root, "/var/lib/data").unwrap();
        assert!(
            !outside.join("lib").exists(),
            "followed a symlink out of the tree"
        );
        create_mount_point(&root, "/srv/data").unwrap();
        assert!(root.join("srv/data").is_dir());
    }
}

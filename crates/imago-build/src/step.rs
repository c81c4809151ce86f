//! Provisioning steps: `run` layers.
//!
//! A `run` layer is made by running its command in the sandbox of imago-runtime on the root the
//! earlier layers make (unpacked once per chain of layer digests under `<work>/chains/`), then
//! writing the difference the step made (the overlay's upper directory compared with that
//! root) with the same deterministic layer writer as every other layer.
//!
//! What the step changed is decided by content, never by timestamps: a file the step only
//! touched, or rewrote with the same bytes, mode and owner, is not in the layer. Deleted paths
//! become OCI whiteouts (`.wh.NAME`), a directory the step replaced becomes an opaque one
//! (`.wh..wh..opq`). Hard links between files of the layer are kept (link entries to the first
//! path in layer order); device files are refused; fifos and sockets are left out with a
//! warning; extended attributes are never written (reproducibility.md: none unless allowed).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use imago_layer::writer::Meta;
use imago_oci::Digest;
use sha2::Digest as _;

use crate::BuildError;
use crate::definition::{DefinitionFile, LayerDef, MountKind, StepNetwork};
use crate::plan::{Context, image_path};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_MEMORY: u64 = 4 << 30;
pub const DEFAULT_PIDS: u64 = 4096;
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A validated `run` step.
#[derive(Debug, Clone)]
pub struct StepPlan {
    pub commands: Vec<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// The image's build arguments with their values for this build (set by the builder).
    pub args: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub network: StepNetwork,
    pub timeout: Duration,
    pub memory_bytes: u64,
    pub pids: u64,
    pub mounts: Vec<PlannedMount>,
    /// The `run` key in imago.toml.
    pub span: Range<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedMount {
    /// A directory of the context, read-only; `rel` is its path in the context.
    Bind {
        source: PathBuf,
        rel: String,
        dest: String,
    },
    Cache {
        id: String,
        dest: String,
    },
    Tmpfs {
        dest: String,
    },
}

impl PlannedMount {
    pub fn dest(&self) -> &str {
        match self {
            PlannedMount::Bind { dest, .. }
            | PlannedMount::Cache { dest, .. }
            | PlannedMount::Tmpfs { dest } => dest,
        }
    }
}

/// Checks a layer's step keys: `None` for a layer of files (which must then set none of them).
pub fn plan_step(
    file: &DefinitionFile,
    context: &Context,
    layer: &LayerDef,
) -> Result<Option<StepPlan>, BuildError> {
    let Some(run) = &layer.run else {
        let stray = [&layer.workdir, &layer.user, &layer.timeout, &layer.memory]
            .into_iter()
            .flatten()
            .next()
            .map(|s| s.span())
            .or_else(|| layer.mounts.first().map(|m| m.dest.span()));
        if let Some(span) = stray {
            return Err(file.error(
                span,
                "this key belongs to a `run` step, but the layer has no `run`",
                "add `run = [...]` to the layer, or remove the key",
            ));
        }
        return Ok(None);
    };
    let span = run.span();
    if !(layer.copy.is_empty()
        && layer.file.is_empty()
        && layer.symlink.is_empty()
        && layer.dir.is_empty())
    {
        return Err(file.error(
            span,
            "a layer is either files (copy, file, symlink, dir) or one `run` step, not both",
            "put the files in a layer of their own before or after the step",
        ));
    }
    let commands = run.get_ref().commands();
    if commands.is_empty()
        || commands
            .iter()
            .any(|c| c.is_empty() || c[0].is_empty() || c.iter().any(|a| a.contains('\0')))
    {
        return Err(file.error(
            span,
            "run needs a command: a non-empty program, and no NUL bytes",
            "write run = [\"/bin/sh\", \"-c\", \"...\"] or run = \"shell command\"",
        ));
    }
    for key in layer.env.keys() {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(file.error(
                span,
                format!("invalid environment variable name {key:?} in the step's env"),
                "names may not be empty or contain `=`",
            ));
        }
    }
    let workdir = match &layer.workdir {
        Some(w) => {
            image_path(file, w, true)?;
            Some(w.get_ref().clone())
        }
        None => None,
    };
    let (uid, gid) = match &layer.user {
        None => (0, 0),
        Some(u) => {
            let text = u.get_ref();
            let parsed = match text.split_once(':') {
                Some((a, b)) => a.parse().ok().zip(b.parse().ok()),
                None => text.parse().ok().map(|a| (a, a)),
            };
            parsed.ok_or_else(|| {
                file.error(
                    u.span(),
                    format!("invalid user {text:?}"),
                    "use numeric ids, \"uid:gid\" or \"uid\": the build never looks up users",
                )
            })?
        }
    };
    let timeout = match &layer.timeout {
        None => DEFAULT_TIMEOUT,
        Some(t) => parse_duration(t.get_ref()).ok_or_else(|| {
            file.error(
                t.span(),
                format!("invalid timeout {:?}", t.get_ref()),
                "write a number with a unit: \"90s\", \"10m\", \"1h\"",
            )
        })?,
    };
    let memory_bytes = match &layer.memory {
        None => DEFAULT_MEMORY,
        Some(m) => parse_memory(m.get_ref())
            .filter(|b| *b >= 4 << 20)
            .ok_or_else(|| {
                file.error(
                    m.span(),
                    format!("invalid memory limit {:?}", m.get_ref()),
                    "write a size of at least 4M: \"512M\", \"2G\"",
                )
            })?,
    };
    let pids = match layer.pids {
        Some(0) => {
            return Err(file.error(span, "pids must be at least 1", ""));
        }
        Some(p) => p,
        None => DEFAULT_PIDS,
    };
    let mut mounts = Vec::new();
    let mut dests: Vec<String> = Vec::new();
    for m in &layer.mounts {
        let dest_span = &m.dest;
        let dest = format!(
            "/{}",
            String::from_utf8_lossy(&image_path(file, dest_span, false)?)
        );
        if dests.contains(&dest) {
            return Err(file.error(
                dest_span.span(),
                format!("two mounts of the step are at {dest}"),
                "give each mount its own dest",
            ));
        }
        dests.push(dest.clone());
        let misplaced = match m.kind {
            MountKind::Bind => m.id.is_some(),
            MountKind::Cache => m.src.is_some(),
            MountKind::Tmpfs => m.id.is_some() || m.src.is_some(),
        };
        if misplaced {
            return Err(file.error(
                dest_span.span(),
                "`src` belongs only to bind mounts and `id` only to cache mounts",
                "bind: { type, src, dest }; cache: { type, id, dest }; tmpfs: { type, dest }",
            ));
        }
        mounts.push(match m.kind {
            MountKind::Bind => {
                let Some(src) = &m.src else {
                    return Err(file.error(
                        dest_span.span(),
                        "a bind mount needs `src`, a directory of the build context",
                        "",
                    ));
                };
                let rel = src.get_ref();
                let source = context.root.join(rel);
                let inside = fs::canonicalize(&source)
                    .ok()
                    .filter(|c| c.starts_with(&context.root));
                let Some(source) = inside.filter(|c| c.is_dir()) else {
                    return Err(file.error(
                        src.span(),
                        format!(
                            "bind mount source {rel} is not a directory inside the build context {}",
                            context.root.display()
                        ),
                        "bind sources are directories relative to the context",
                    ));
                };
                PlannedMount::Bind {
                    source,
                    rel: rel.clone(),
                    dest,
                }
            }
            MountKind::Cache => {
                let id = m.id.clone().unwrap_or_default();
                let ok = !id.is_empty()
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    && !id.starts_with('.');
                if !ok {
                    return Err(file.error(
                        dest_span.span(),
                        format!("invalid or missing cache mount id {id:?}"),
                        "give the cache an `id` of letters, digits, `-`, `_` and `.`",
                    ));
                }
                PlannedMount::Cache { id, dest }
            }
            MountKind::Tmpfs => PlannedMount::Tmpfs { dest },
        });
    }
    Ok(Some(StepPlan {
        commands,
        env: layer.env.clone(),
        args: BTreeMap::new(),
        workdir,
        uid,
        gid,
        network: layer.network.unwrap_or_default(),
        timeout,
        memory_bytes,
        pids,
        mounts,
        span,
    }))
}

/// `"90s"`, `"10m"`, `"1h"`, `"500ms"`, or plain seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

fn parse_memory(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" => 10,
        "m" | "mb" | "mi" => 20,
        "g" | "gb" | "gi" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

impl StepPlan {
    /// The step's environment: the image's so far, the build arguments, the step's own, then
    /// SOURCE_DATE_EPOCH; PATH is added when nothing set it.
    pub fn environment(&self, image_env: &[String], source_date_epoch: u64) -> Vec<String> {
        let mut env: Vec<String> = image_env.to_vec();
        let mut set = |k: &str, v: &str| {
            let prefix = format!("{k}=");
            env.retain(|e| !e.starts_with(&prefix));
            env.push(format!("{k}={v}"));
        };
        for (k, v) in self.args.iter().chain(&self.env) {
            set(k, v);
        }
        set("SOURCE_DATE_EPOCH", &source_date_epoch.to_string());
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(0, PATH.to_owned());
        }
        env
    }

    /// Everything that decides what the step does, hashed: the parent chain, the command and
    /// its whole environment, the user, workdir, network mode, the mounts, and the content of
    /// every bind mount. The cache finds a step's layer under it.
    pub fn key(
        &self,
        parents: &[Digest],
        env: &[String],
        cwd: &str,
        compression: &str,
        mtime: u64,
    ) -> Result<Digest, BuildError> {
        let mut h = imago_oci::Sha256::new();
        let mut put = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        put(b"imago-run-key-v1");
        put(compression.as_bytes());
        put(&mtime.to_le_bytes());
        for p in parents {
            put(p.to_string().as_bytes());
        }
        put(b"commands");
        for c in &self.commands {
            put(&(c.len() as u64).to_le_bytes());
            for a in c {
                put(a.as_bytes());
            }
        }
        put(b"env");
        for e in env {
            put(e.as_bytes());
        }
        put(cwd.as_bytes());
        put(&self.uid.to_le_bytes());
        put(&self.gid.to_le_bytes());
        put(match self.network {
            StepNetwork::None => b"none",
            StepNetwork::Host => b"host",
        });
        for m in &self.mounts {
            match m {
                PlannedMount::Bind { source, rel, dest } => {
                    put(b"bind");
                    put(rel.as_bytes());
                    put(dest.as_bytes());
                    put(tree_digest(source)?.as_bytes());
                }
                PlannedMount::Cache { id, dest } => {
                    put(b"cache");
                    put(id.as_bytes());
                    put(dest.as_bytes());
                }
                PlannedMount::Tmpfs { dest } => {
                    put(b"tmpfs");
                    put(dest.as_bytes());
                }
            }
        }
        Ok(Digest::from_hasher(h))
    }
}

/// BLAKE3 of a directory tree: every path (sorted byte-wise), type, permission bits and
/// content. Timestamps and owners do not enter: a bind mount is read-only input, like a copy.
pub fn tree_digest(root: &Path) -> Result<String, BuildError> {
    let mut hasher = blake3::Hasher::new();
    walk_tree(root, b"", &mut hasher)?;
    Ok(hasher.finalize().to_hex().to_string())
}

fn walk_tree(dir: &Path, rel: &[u8], h: &mut blake3::Hasher) -> Result<(), BuildError> {
    let mut children = read_sorted(dir)?;
    for (name, path) in children.drain(..) {
        let md = fs::symlink_metadata(&path).map_err(|e| io_error(&path, e))?;
        let mut child = rel.to_vec();
        child.push(b'/');
        child.extend_from_slice(&name);
        h.update(&(child.len() as u64).to_le_bytes());
        h.update(&child);
        h.update(&(md.mode() & 0o7777).to_le_bytes());
        let ft = md.file_type();
        if ft.is_dir() {
            h.update(b"d");
            walk_tree(&path, &child, h)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).map_err(|e| io_error(&path, e))?;
            h.update(b"l");
            h.update(target.as_os_str().as_bytes());
        } else if ft.is_file() {
            h.update(b"f");
            h.update(&md.size().to_le_bytes());
            let f = File::open(&path).map_err(|e| io_error(&path, e))?;
            h.update_reader(f).map_err(|e| io_error(&path, e))?;
        } else {
            h.update(b"o");
        }
    }
    Ok(())
}

fn read_sorted(dir: &Path) -> Result<Vec<(Vec<u8>, PathBuf)>, BuildError> {
    let mut children: Vec<(Vec<u8>, PathBuf)> = fs::read_dir(dir)
        .map_err(|e| io_error(dir, e))?
        .map(|item| item.map(|i| (i.file_name().as_bytes().to_vec(), i.path())))
        .collect::<Result<_, _>>()
        .map_err(|e| io_error(dir, e))?;
    children.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(children)
}

fn io_error(path: &Path, source: io::Error) -> BuildError {
    BuildError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One entry of a step's layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffKind {
    Dir,
    File {
        source: PathBuf,
        size: u64,
    },
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    /// An empty regular file: `.wh.NAME` or `.wh..wh..opq`.
    Whiteout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffEntry {
    /// Relative to the root, no leading or trailing `/`.
    pub path: Vec<u8>,
    pub kind: DiffKind,
    pub meta: Meta,
}

/// What the step changed, in the layer writer's order. `upper` is the overlay upper
/// directory (or, with `full_copy`, the whole root the step ran on: then every path missing
/// from it is a deletion, and a replaced directory shows as the whiteouts of its old entries),
/// `lower` the root the step started from, `mount_points` the step's mount
/// destinations and the runtime's own (relative paths): made by the runtime, not the step, so
/// when they are new and hold nothing they are not part of the layer. `warn` hears of the
/// fifos and sockets left out.
pub fn diff(
    (image, layer): (&str, &str),
    lower: &Path,
    upper: &Path,
    full_copy: bool,
    mount_points: &[Vec<u8>],
    warn: &mut dyn FnMut(String),
) -> Result<Vec<DiffEntry>, BuildError> {
    let mut out = Vec::new();
    let mut walk = DiffWalk {
        image,
        layer,
        full_copy,
        mount_points,
        warn,
        out: &mut out,
    };
    walk.dir(lower, upper, b"", true)?;
    let mut entries: Vec<(Vec<u8>, DiffEntry, Option<Inode>)> = out
        .into_iter()
        .map(|(e, ino)| {
            (
                imago_layer::writer::entry_sort_key(&e.path, e.kind == DiffKind::Dir),
                e,
                ino,
            )
        })
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    // Hard links: the first path of an inode in layer order holds the content.
    let mut first: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut result = Vec::with_capacity(entries.len());
    for (_, mut entry, ino) in entries {
        if let Some(ino) = ino {
            match first.get(&ino) {
                Some(target) => entry.kind = DiffKind::Hardlink(target.clone()),
                None => {
                    first.insert(ino, entry.path.clone());
                }
            }
        }
        result.push(entry);
    }
    Ok(result)
}

/// (device, inode) of a file with several links.
type Inode = (u64, u64);

struct DiffWalk<'a> {
    image: &'a str,
    layer: &'a str,
    full_copy: bool,
    mount_points: &'a [Vec<u8>],
    warn: &'a mut dyn FnMut(String),
    /// Entries, with (dev, ino) for files that have other links.
    out: &'a mut Vec<(DiffEntry, Option<(u64, u64)>)>,
}

const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

fn meta_of(md: &fs::Metadata) -> Meta {
    Meta {
        mode: md.mode() & 0o7777,
        uid: u64::from(md.uid()),
        gid: u64::from(md.gid()),
    }
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        return name.to_vec();
    }
    let mut p = rel.to_vec();
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

impl DiffWalk<'_> {
    /// The OCI whiteout of `name` in directory `rel`: `.wh.NAME`; the name `.wh..opq` gives
    /// the opaque marker `.wh..wh..opq` (the directory's whole lower content).
    fn whiteout(&mut self, rel: &[u8], name: &[u8]) {
        let mut wh = b".wh.".to_vec();
        wh.extend_from_slice(name);
        let meta = Meta {
            mode: 0,
            uid: 0,
            gid: 0,
        };
        let entry = DiffEntry {
            path: join(rel, &wh),
            kind: DiffKind::Whiteout,
            meta,
        };
        self.out.push((entry, None));
    }

    /// Walks the upper directory `upper` (at `rel`); `lower_dir` is whether `lower` is a
    /// directory whose entries still show through (not replaced, not opaque). Returns whether
    /// anything was emitted below, and whether everything found below was a pruned mount point.
    fn dir(
        &mut self,
        lower: &Path,
        upper: &Path,
        rel: &[u8],
        lower_dir: bool,
    ) -> Result<(bool, bool), BuildError> {
        let mut emitted = false;
        let mut only_mount_points = true;
        // Files with several links: emitted all together if any of them changed, so that the
        // link survives (overlay copies a lower file up before linking it).
        let mut linked: Vec<(DiffEntry, (u64, u64), bool)> = Vec::new();
        for (name, upath) in read_sorted(upper)? {
            let path = join(rel, &name);
            let umd = fs::symlink_metadata(&upath).map_err(|e| io_error(&upath, e))?;
            let lpath = lower.join(std::ffi::OsStr::from_bytes(&name));
            let lmd = if lower_dir {
                fs::symlink_metadata(&lpath).ok()
            } else {
                None
            };
            let ft = umd.file_type();
            let meta = meta_of(&umd);
            let shown = String::from_utf8_lossy(&path).into_owned();
            if ft.is_char_device() && umd.rdev() == 0 {
                // An overlay whiteout: the step deleted what the lower root had here.
                if lmd.is_some() {
                    self.whiteout(rel, &name);
                    emitted = true;
                }
                only_mount_points = false;
                continue;
            }
            if ft.is_dir() {
                let lower_is_dir = lmd.as_ref().is_some_and(|m| m.is_dir());
                let opaque = rustix::fs::lgetxattr(&upath, OPAQUE_XATTR, &mut [0u8; 4])
                    .is_ok_and(|n| n == 1)
                    && lower_is_dir;
                let mount_point = self.mount_points.contains(&path);
                let (below, below_only_mounts) = if mount_point {
                    (false, true)
                } else {
                    self.dir(&lpath, &upath, &path, lower_is_dir && !opaque)?
                };
                let is_new = !lower_is_dir;
                let changed = match &lmd {
                    Some(l) if lower_is_dir => meta_of(l) != meta,
                    _ => true,
                };
                let pruned = is_new
                    && !below
                    && (mount_point || below_only_mounts_nonempty(&upath, below_only_mounts));
                if pruned {
                    continue;
                }
                only_mount_points = false;
                if below || changed || opaque || is_new {
                    self.out.push((
                        DiffEntry {
                            path: path.clone(),
                            kind: DiffKind::Dir,
                            meta,
                        },
                        None,
                    ));
                    emitted = true;
                }
                if opaque {
                    self.whiteout(&path, b".wh..opq");
                }
                continue;
            }
            // A file mount point the runtime had to make (an empty new file) is not the step's.
            if ft.is_file() && lmd.is_none() && umd.size() == 0 && self.mount_points.contains(&path)
            {
                continue;
            }
            only_mount_points = false;
            if ft.is_fifo() || ft.is_socket() {
                (self.warn)(format!(
                    "/{shown} is a {} and is left out of the layer",
                    if ft.is_fifo() { "fifo" } else { "socket" }
                ));
                continue;
            }
            if ft.is_char_device() || ft.is_block_device() {
                return Err(BuildError::Step {
                    image: self.image.to_owned(),
                    layer: self.layer.to_owned(),
                    message: format!(
                        "the step made a device file /{shown}; device files are refused in layers"
                    ),
                });
            }
            if ft.is_symlink() {
                let target = fs::read_link(&upath).map_err(|e| io_error(&upath, e))?;
                let target = target.as_os_str().as_bytes().to_vec();
                let same = lmd.as_ref().is_some_and(|l| {
                    l.file_type().is_symlink()
                        && meta_of(l).uid == meta.uid
                        && meta_of(l).gid == meta.gid
                        && fs::read_link(&lpath)
                            .is_ok_and(|t| t.as_os_str().as_bytes() == target.as_slice())
                });
                if !same {
                    self.out.push((
                        DiffEntry {
                            path,
                            kind: DiffKind::Symlink(target),
                            meta: Meta {
                                mode: 0o777,
                                ..meta
                            },
                        },
                        None,
                    ));
                    emitted = true;
                }
                continue;
            }
            // A regular file.
            let same = match &lmd {
                Some(l) if l.file_type().is_file() => {
                    meta_of(l) == meta && l.size() == umd.size() && same_content(&lpath, &upath)?
                }
                _ => false,
            };
            let entry = DiffEntry {
                path,
                kind: DiffKind::File {
                    source: upath.clone(),
                    size: umd.size(),
                },
                meta,
            };
            if umd.nlink() > 1 {
                linked.push((entry, (umd.dev(), umd.ino()), !same));
                continue;
            }
            if !same {
                self.out.push((entry, None));
                emitted = true;
            }
        }
        if self.full_copy && lower_dir {
            // Without overlay whiteouts, a deletion is a path the lower root has and the copy
            // does not.
            let present: std::collections::HashSet<Vec<u8>> = read_sorted(upper)?
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            for (name, _) in read_sorted(lower)? {
                if present.contains(&name) {
                    continue;
                }
                self.whiteout(rel, &name);
                emitted = true;
                only_mount_points = false;
            }
        }
        // A linked group is kept whole when any of its paths changed (links may span
        // directories: a group is judged within each directory here, and across directories
        // the inode key joins what was emitted).
        let changed_inodes: Vec<(u64, u64)> = linked
            .iter()
            .filter(|(_, _, changed)| *changed)
            .map(|(_, ino, _)| *ino)
            .collect();
        for (entry, ino, _) in linked {
            if changed_inodes.contains(&ino) {
                self.out.push((entry, Some(ino)));
                emitted = true;
            }
        }
        Ok((emitted, only_mount_points && !emitted))
    }
}

/// A new directory that holds only mount points (made by the runtime as their parents).
fn below_only_mounts_nonempty(dir: &Path, only_mounts: bool) -> bool {
    only_mounts && fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

fn same_content(a: &Path, b: &Path) -> Result<bool, BuildError> {
    let mut fa = File::open(a).map_err(|e| io_error(a, e))?;
    let mut fb = File::open(b).map_err(|e| io_error(b, e))?;
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let n = read_full(&mut fa, &mut ba).map_err(|e| io_error(a, e))?;
        let m = read_full(&mut fb, &mut bb).map_err(|e| io_error(b, e))?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Result<Option<StepPlan>, String> {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("src")).unwrap();
        let short = |e: BuildError| {
            let text = e.to_string();
            text.split_once("imago.toml:")
                .map_or(text.clone(), |(_, rest)| rest.to_owned())
        };
        let file = DefinitionFile::parse(&dir.path().join("imago.toml"), text.to_owned())
            .map_err(short)?;
        let context = Context::open(dir.path()).unwrap();
        let image = file.definition.image.values().next().unwrap();
        plan_step(&file, &context, &image.layers[0]).map_err(short)
    }

    #[test]
    fn the_three_forms_of_run() {
        let one = plan("[[image.a.layer]]\nrun = \"make all\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(one.commands, [["/bin/sh", "-c", "make all"]]);
        let exec = plan("[[image.a.layer]]\nrun = [\"/bin/make\", \"all\"]\n")
            .unwrap()
            .unwrap();
        assert_eq!(exec.commands, [["/bin/make", "all"]]);
        let many = plan("[[image.a.layer]]\nrun = [[\"/a\"], [\"/b\", \"x\"]]\n")
            .unwrap()
            .unwrap();
        assert_eq!(many.commands, vec![vec!["/a"], vec!["/b", "x"]]);
        assert_eq!(many.timeout, DEFAULT_TIMEOUT);
        assert_eq!(many.network, StepNetwork::None);
    }

    #[test]
    fn errors_name_the_line() {
        let err =
            plan("[[image.a.layer]]\ncopy = [{ src = \"src\", dest = \"/x\" }]\nrun = \"true\"\n")
                .unwrap_err();
        assert!(err.starts_with("3:7: a layer is either files"), "{err}");
        let err = plan("[[image.a.layer]]\nrun = \"true\"\ntimeout = \"soon\"\n").unwrap_err();
        assert!(err.starts_with("3:11: invalid timeout"), "{err}");
        let err = plan("[[image.a.layer]]\nrun = \"true\"\nuser = \"root\"\n").unwrap_err();
        assert!(err.starts_with("3:8: invalid user"), "{err}");
        let err = plan("[[image.a.layer]]\nworkdir = \"/x\"\n").unwrap_err();
        assert!(
            err.starts_with("2:11: this key belongs to a `run` step"),
            "{err}"
        );
        let err = plan(
            "[[image.a.layer]]\nrun = \"true\"\nmounts = [{ type = \"bind\", src = \"../..\", dest = \"/s\" }]\n",
        )
        .unwrap_err();
        assert!(
            err.contains("is not a directory inside the build context"),
            "{err}"
        );
        assert!(err.starts_with("3:"), "{err}");
        let err = plan(
            "[[image.a.layer]]\nrun = \"true\"\nmounts = [{ type = \"cache\", dest = \"/c\" }]\n",
        )
        .unwrap_err();
        assert!(err.contains("cache mount id"), "{err}");
        let err = plan("[[image.a.layer]]\nrun = \"true\"\nnetwork = \"bridge\"\n").unwrap_err();
        assert!(err.starts_with("3:11: unknown variant"), "{err}");
        let err = plan("[[image.a.layer]]\nrun = []\n").unwrap_err();
        assert!(err.starts_with("2:7: run needs a command"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("5 days"), None);
    }
}

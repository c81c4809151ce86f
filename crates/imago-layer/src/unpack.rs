//! Applying layer tar streams to a directory, with OCI whiteouts, without ever creating,
//! changing or removing anything outside that directory.
//!
//! # How containment is enforced
//!
//! The root is opened once as a directory fd. Every entry's parent directory is opened from that
//! fd with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`: symlinks met on the way are
//! followed only while they stay beneath the root, and an absolute symlink or a `..` that climbs
//! out fails with EXDEV, which becomes [`UnpackError::Escape`]. The final component is then
//! created relative to that parent fd and never followed (`O_CREAT|O_EXCL|O_NOFOLLOW` after
//! removing what was there, `mkdirat`, `symlinkat`, `mknodat`, `linkat` without
//! `AT_SYMLINK_FOLLOW`). Trees are removed by walking directory fds opened with `O_NOFOLLOW`.
//! No path is ever joined onto the root's path.
//!
//! # Policy
//!
//! - Absolute entry paths and any `..` component are refused rather than rewritten (a layer
//!   writer never produces them, and `a/..` means something else when `a` is a symlink); `./`
//!   prefixes and repeated slashes are dropped. The `./` entry applies its metadata to the root
//!   directory itself.
//! - Absolute symlinks are escapes when followed (RESOLVE_BENEATH, not RESOLVE_IN_ROOT), even if
//!   the same path exists under the root: an entry written through one is refused. Storing such
//!   a symlink is fine.
//! - Character and block devices are refused: a layer must not hand a container a device node.
//!   With [`UnpackOptions::skip_devices`] they are left out instead (what was at the path is
//!   still removed, as the entry replaces it) and named in [`ApplyStats::skipped_devices`]: for
//!   roots whose `/dev` the runtime provides anyway, such as a build step's. FIFOs are created: they give access to nothing beyond the pipe itself and real images ship
//!   them. GNU sparse files and unknown entry types are refused. PAX global headers are skipped.
//! - Of the xattrs (PAX `SCHILY.xattr.NAME` records) only `security.capability`, a file
//!   capability such as Debian's `ping` has (`cap_net_raw`), is applied, as Docker does: on a
//!   regular file, after its owner and mode (chown clears it), through the file's own fd, and
//!   only when ownership is kept ([`UnpackOptions::preserve_ownership`]: a capability on a file
//!   the caller owns instead of root is not what the image said). Its value must be a
//!   well-formed `vfs_cap_data` (revision 1, 2 or 3 at its exact size, at most
//!   [`MAX_CAPABILITY_SIZE`] bytes); anything else, or one on a directory, symlink or fifo, is
//!   refused ([`UnpackError::Header`] naming the entry). On a hard link entry it is ignored: the
//!   link shares its target's inode, which has what its own entry gave it. Every other xattr
//!   (`user.*`, `trusted.*`, `security.selinux`, ACLs, ...) is ignored. Under
//!   no-new-privileges (every imago instance) file capabilities confer nothing at exec.
//! - Permission bits are kept as the archive gives them, setuid, setgid and sticky included
//!   (set after the owner, since chown clears setuid/setgid).
//! - One path may appear several times in a layer (the last one wins) only with the same kind;
//!   a file that becomes a directory, or any other change of kind, is refused, and so is a
//!   non-directory at a path that earlier entries used as a directory. Later entries may go
//!   through a symlink of the same layer, as long as resolution stays beneath the root.
//! - Missing parent directories are created 0755, owned by the caller. A dangling symlink in
//!   the way of one is an error, not replaced.
//! - Whiteouts only hide what lower layers left: a `.wh.NAME` or `.wh..wh..opq` spares every
//!   path this layer writes, before or after the whiteout, and the directories holding them.
//! - Directory mode, owner and mtime are applied after the whole layer is written, so children
//!   written later do not bump the mtime and a read-only directory can still be filled.
//! - Hard links must name a regular file already present beneath the root (from this layer or
//!   a lower one); the link shares that inode and its metadata.
//! - An entry larger than [`MAX_ENTRY_SIZE`] is refused before anything is written; a stream
//!   that ends inside an entry is [`UnpackError::Truncated`]. Bytes after the end-of-archive
//!   marker are read and ignored. GNU long-name/long-link records and PAX extended headers,
//!   which the `tar` crate reads whole into memory, are refused above
//!   [`crate::tar_limits::MAX_EXTENSION_SIZE`] (1 MiB) before their data is read, so a small
//!   compressed layer cannot make the unpacker allocate gigabytes.
//! - Tree removal holds one directory fd per level, so a tree deeper than the fd limit fails
//!   with EMFILE. Without root, removing a read-only lower directory fails with EACCES.

mod fsops;
mod path;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;
use tar::EntryType;

use self::fsops::{DIR_FLAGS, os};
use self::path::{PathProblem, RelPath, child_key};
use crate::tar_limits::ExtensionLimit;

/// The largest entry accepted: far beyond any sane file in an image, small enough that a forged
/// size is caught before it turns into hours of copying or a full disk.
pub const MAX_ENTRY_SIZE: u64 = 64 << 30;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const COPY_BUFFER: usize = 128 * 1024;
/// The PAX record of a file capability.
const CAPABILITY_RECORD: &[u8] = b"SCHILY.xattr.security.capability";
/// The largest `vfs_cap_data` (revision 3, with its root uid).
pub const MAX_CAPABILITY_SIZE: usize = 24;

/// How a layer is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Give entries the uid and gid from the archive. Needs root (or CAP_CHOWN); without it
    /// everything belongs to the calling user.
    pub preserve_ownership: bool,
    /// Leave character and block devices out (listed in the stats) instead of refusing the
    /// layer. Bases made by debootstrap-like tools and some docker images ship `/dev/*` nodes.
    pub skip_devices: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            preserve_ownership: rustix::process::geteuid().is_root(),
            skip_devices: false,
        }
    }
}

/// What one [`apply_layer`] call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Archive entries applied, whiteouts included (PAX/GNU extension records are not entries).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Device entries left out (with [`UnpackOptions::skip_devices`]), by archive path.
    pub skipped_devices: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    #[error("cannot open unpack root {}: {source}", root.display())]
    OpenRoot { root: PathBuf, source: io::Error },

    #[error("cannot read layer archive for {} {}: {source}", root.display(), After(.after))]
    Archive {
        root: PathBuf,
        /// The last entry read completely, if any.
        after: Option<String>,
        source: io::Error,
    },

    #[error("layer entry {entry:?} for {}: invalid header: {source}", root.display())]
    Header {
        entry: String,
        root: PathBuf,
        source: io::Error,
    },

    #[error("layer entry {entry:?} for {}: unsafe path: {reason}", root.display())]
    UnsafePath {
        entry: String,
        root: PathBuf,
        reason: &'static str,
    },

    #[error("layer entry {entry:?} for {}: {path:?} leads outside the root", root.display())]
    Escape {
        entry: String,
        root: PathBuf,
        /// The part of the entry's path whose resolution left the root.
        path: String,
    },

    #[error("layer entry {entry:?} for {}: {path:?} is not a directory", root.display())]
    NotADirectory {
        entry: String,
        root: PathBuf,
        path: String,
    },

    #[error("layer entry {entry:?} for {}: unsupported entry type: {kind}", root.display())]
    Unsupported {
        entry: String,
        root: PathBuf,
        kind: String,
    },

    #[error("layer entry {entry:?} for {}: hard link target {target:?} {reason}", root.display())]
    HardlinkTarget {
        entry: String,
        root: PathBuf,
        target: String,
        reason: &'static str,
    },

    #[error(
        "layer entry {entry:?} for {}: is a {now} but an earlier entry of this layer made it a {earlier}",
        root.display()
    )]
    Conflict {
        entry: String,
        root: PathBuf,
        earlier: &'static str,
        now: &'static str,
    },

    #[error("layer entry {entry:?} for {}: size {size} exceeds the limit of {limit} bytes", root.display())]
    TooLarge {
        entry: String,
        root: PathBuf,
        size: u64,
        limit: u64,
    },

    #[error(
        "layer entry {entry:?} for {}: archive is truncated: {written} of {size} bytes present",
        root.display()
    )]
    Truncated {
        entry: String,
        root: PathBuf,
        size: u64,
        written: u64,
    },

    #[error("layer entry {entry:?} for {}: cannot {op}: {source}", root.display())]
    Io {
        entry: String,
        root: PathBuf,
        op: &'static str,
        source: io::Error,
    },
}

impl UnpackError {
    /// The archive entry the error is about, as named in the archive (lossily decoded). For a
    /// failure to read the archive itself, the last entry read completely.
    pub fn entry(&self) -> Option<&str> {
        match self {
            UnpackError::OpenRoot { .. } => None,
            UnpackError::Archive { after, .. } => after.as_deref(),
            UnpackError::Header { entry, .. }
            | UnpackError::UnsafePath { entry, .. }
            | UnpackError::Escape { entry, .. }
            | UnpackError::NotADirectory { entry, .. }
            | UnpackError::Unsupported { entry, .. }
            | UnpackError::HardlinkTarget { entry, .. }
            | UnpackError::Conflict { entry, .. }
            | UnpackError::TooLarge { entry, .. }
            | UnpackError::Truncated { entry, .. }
            | UnpackError::Io { entry, .. } => Some(entry),
        }
    }

    /// The directory the layer was being applied to.
    pub fn root(&self) -> &Path {
        match self {
            UnpackError::OpenRoot { root, .. }
            | UnpackError::Archive { root, .. }
            | UnpackError::Header { root, .. }
            | UnpackError::UnsafePath { root, .. }
            | UnpackError::Escape { root, .. }
            | UnpackError::NotADirectory { root, .. }
            | UnpackError::Unsupported { root, .. }
            | UnpackError::HardlinkTarget { root, .. }
            | UnpackError::Conflict { root, .. }
            | UnpackError::TooLarge { root, .. }
            | UnpackError::Truncated { root, .. }
            | UnpackError::Io { root, .. } => root,
        }
    }
}

struct After<'a>(&'a Option<String>);

impl fmt::Display for After<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(entry) => write!(f, "after entry {entry:?}"),
            None => f.write_str("before its first entry"),
        }
    }
}

/// Applies ONE layer (an uncompressed tar stream) on top of `root`, which must exist.
///
/// Consumes `tar` to EOF (including the trailing zero blocks and padding) so that a
/// [`imago_oci::HashingReader`] wrapped around it sees every byte, as diff_id computation needs.
/// On error it stops at once: what was already written inside `root` stays (callers unpack into
/// a scratch directory and discard it), nothing outside `root` has been touched.
pub fn apply_layer(
    tar: impl Read,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<ApplyStats, UnpackError> {
    let root_fd =
        rustix::fs::open(root, DIR_FLAGS, Mode::empty()).map_err(|e| UnpackError::OpenRoot {
            root: root.to_path_buf(),
            source: e.into(),
        })?;
    let mut applier = Applier {
        root_fd,
        root,
        opts,
        marks: HashMap::new(),
        dir_meta: HashMap::new(),
        parent_cache: None,
        buf: vec![0; COPY_BUFFER],
        stats: ApplyStats::default(),
    };

    let mut archive = tar::Archive::new(ExtensionLimit::new(tar));
    let mut after: Option<String> = None;
    let archive_error = |after: &Option<String>, source: io::Error| UnpackError::Archive {
        root: root.to_path_buf(),
        after: after.clone(),
        source,
    };
    for entry in archive.entries().map_err(|e| archive_error(&after, e))? {
        let mut entry = entry.map_err(|e| archive_error(&after, e))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        applier.apply_entry(&mut entry, &name)?;
        after = Some(name);
    }
    // tar stops at the first zero block; the second one and the record padding are still
    // unread, and the caller's digest must cover them.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(|e| archive_error(&after, e))?;

    applier.finish_dirs()?;
    Ok(applier.stats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    /// A device node left out (`skip_devices`).
    Device,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Dir => "directory",
            Kind::File => "regular file",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
            Kind::Device => "device",
        }
    }
}

/// What this layer did at a path, by archive path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// An entry of this layer names the path.
    Entry(Kind),
    /// Not named itself, but a later part of the path is: it is a directory this layer uses.
    Ancestor,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timespec,
    /// A `security.capability` value (checked well-formed), and its length.
    capability: Option<([u8; MAX_CAPABILITY_SIZE], usize)>,
}

/// Checks a `security.capability` value: a little-endian magic whose high byte is the
/// revision (1: 12 bytes, 2: 20, 3: 24 with the root uid), at exactly that size.
fn check_capability(value: &[u8]) -> Result<([u8; MAX_CAPABILITY_SIZE], usize), String> {
    let too_long = || {
        format!(
            "security.capability of {} bytes (at most {MAX_CAPABILITY_SIZE})",
            value.len()
        )
    };
    if value.len() > MAX_CAPABILITY_SIZE {
        return Err(too_long());
    }
    let magic = value
        .get(..4)
        .and_then(|m| <[u8; 4]>::try_from(m).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| format!("security.capability of {} bytes", value.len()))?;
    let expected = match magic >> 24 {
        1 => 12,
        2 => 20,
        3 => 24,
        revision => return Err(format!("security.capability of revision {revision}")),
    };
    if value.len() != expected {
        return Err(format!(
            "security.capability of revision {} has {} bytes, not {expected}",
            magic >> 24,
            value.len()
        ));
    }
    let mut bytes = [0; MAX_CAPABILITY_SIZE];
    bytes[..value.len()].copy_from_slice(value);
    Ok((bytes, value.len()))
}

struct Applier<'a> {
    root_fd: OwnedFd,
    root: &'a Path,
    opts: &'a UnpackOptions,
    marks: HashMap<Vec<u8>, Mark>,
    /// Directory metadata to apply once the layer's content is in place; the last entry wins.
    dir_meta: HashMap<Vec<u8>, Meta>,
    /// Layers list a directory's files together, so the last parent is usually the next one.
    parent_cache: Option<(Vec<u8>, Rc<OwnedFd>)>,
    buf: Vec<u8>,
    stats: ApplyStats,
}

impl Applier<'_> {
    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), UnpackError> {
        let entry_type = entry.header().entry_type();
        if entry_type == EntryType::XGlobalHeader {
            // Archive-wide PAX defaults (comments, charset): nothing this unpacker uses.
            return Ok(());
        }
        self.stats.entries += 1;

        let size = entry.size();
        if size > MAX_ENTRY_SIZE {
            return Err(UnpackError::TooLarge {
                entry: name.to_owned(),
                root: self.root.to_path_buf(),
                size,
                limit: MAX_ENTRY_SIZE,
            });
        }
        let path = RelPath::parse(&entry.path_bytes()).map_err(|p| self.unsafe_path(name, p))?;
        if path.file_name().starts_with(WHITEOUT_PREFIX) {
            return self.whiteout(&path, name);
        }

        match entry_type {
            EntryType::Regular | EntryType::Continuous => {
                let meta = self.meta(entry, name)?;
                self.write_file(entry, &path, size, meta, name)
            }
            EntryType::Directory => {
                let meta = self.meta(entry, name)?;
                self.make_dir(&path, meta, name)
            }
            EntryType::Symlink => {
                let meta = self.meta(entry, name)?;
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.make_symlink(&path, &target, meta, name)
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.make_hardlink(&path, &target, name)
            }
            EntryType::Fifo => {
                let meta = self.meta(entry, name)?;
                self.make_fifo(&path, meta, name)
            }
            EntryType::Char | EntryType::Block if self.opts.skip_devices => {
                self.skip_device(&path, name)
            }
            EntryType::Char => Err(self.unsupported(name, "character device")),
            EntryType::Block => Err(self.unsupported(name, "block device")),
            EntryType::GNUSparse => Err(self.unsupported(name, "gnu sparse file")),
            other => Err(self.unsupported(
                name,
                &format!("type byte {:?}", char::from(other.as_byte())),
            )),
        }
    }

    // ---- entry kinds ----

    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &RelPath,
        size: u64,
        meta: Meta,
        name: &str,
    ) -> Result<(), UnpackError> {
        if path.is_root() {
            return Err(self.root_not_dir(name));
        }
        self.mark(path, Kind::File, name)?;
        let dir = self.parent_dir(path, name)?;
        let file_name = path.file_name();
        let create = || {
            rustix::fs::openat(
                dir.as_fd(),
                os(file_name),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        };
        // Creating first and clearing only on EEXIST saves an lstat per file in the common case
        // of a fresh path; O_EXCL never follows or reuses whatever is there.
        let fd = match create() {
            Err(Errno::EXIST) => {
                self.clear_slot(dir.as_fd(), file_name, name)?;
                create()
            }
            result => result,
        }
        .map_err(|e| self.io(name, "create file", e))?;
        let mut file = File::from(fd);

        let mut buf = std::mem::take(&mut self.buf);
        let copied = copy_data(entry, &mut file, &mut buf);
        self.buf = buf;
        let written = copied.map_err(|(op, e)| self.io(name, op, e))?;
        if written != size {
            return Err(UnpackError::Truncated {
                entry: name.to_owned(),
                root: self.root.to_path_buf(),
                size,
                written,
            });
        }
        self.stats.bytes += written;
        self.set_meta(file.as_fd(), meta, name)?;
        // Last: a chown or a write after it would clear it.
        match meta.capability {
            Some((value, len)) if self.opts.preserve_ownership => rustix::fs::fsetxattr(
                file.as_fd(),
                "security.capability",
                &value[..len],
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(|e| self.io(name, "set security.capability", e)),
            _ => Ok(()),
        }
    }

    fn make_dir(&mut self, path: &RelPath, meta: Meta, name: &str) -> Result<(), UnpackError> {
        if !path.is_root() {
            self.mark(path, Kind::Dir, name)?;
            let dir = self.parent_dir(path, name)?;
            let file_name = path.file_name();
            let existing = fsops::lstat_at(dir.as_fd(), file_name)
                .map_err(|e| self.io(name, "inspect existing path", e))?;
            let is_dir = existing.is_some_and(|s| fsops::file_type(&s) == FileType::Directory);
            if !is_dir {
                self.clear_slot(dir.as_fd(), file_name, name)?;
                // Owner-only until the deferred metadata pass sets the real mode.
                rustix::fs::mkdirat(dir.as_fd(), os(file_name), Mode::from_raw_mode(0o700))
                    .map_err(|e| self.io(name, "create directory", e))?;
            }
        }
        self.dir_meta.insert(path.key().to_vec(), meta);
        Ok(())
    }

    fn make_symlink(
        &mut self,
        path: &RelPath,
        target: &[u8],
        meta: Meta,
        name: &str,
    ) -> Result<(), UnpackError> {
        if path.is_root() {
            return Err(self.root_not_dir(name));
        }
        if target.is_empty() {
            return Err(self.unsupported(name, "symlink without a target"));
        }
        self.mark(path, Kind::Symlink, name)?;
        let dir = self.parent_dir(path, name)?;
        let file_name = path.file_name();
        self.clear_slot(dir.as_fd(), file_name, name)?;
        // The target is stored verbatim, even if absolute or escaping: a symlink is harmless
        // until followed, and this unpacker only follows links that stay beneath the root.
        rustix::fs::symlinkat(os(target), dir.as_fd(), os(file_name))
            .map_err(|e| self.io(name, "create symlink", e))?;
        if self.opts.preserve_ownership {
            rustix::fs::chownat(
                dir.as_fd(),
                os(file_name),
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.io(name, "set symlink owner", e))?;
        }
        rustix::fs::utimensat(
            dir.as_fd(),
            os(file_name),
            &timestamps(meta.mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io(name, "set symlink mtime", e))
    }

    fn make_hardlink(
        &mut self,
        path: &RelPath,
        target_raw: &[u8],
        name: &str,
    ) -> Result<(), UnpackError> {
        let target_name = String::from_utf8_lossy(target_raw).into_owned();
        let bad_target = |reason: &'static str| UnpackError::HardlinkTarget {
            entry: name.to_owned(),
            root: self.root.to_path_buf(),
            target: target_name.clone(),
            reason,
        };
        if path.is_root() {
            return Err(self.root_not_dir(name));
        }
        let target = RelPath::parse(target_raw).map_err(|p| bad_target(p.reason()))?;
        if target.is_root() {
            return Err(bad_target("is the root directory"));
        }
        let target_dir =
            match fsops::open_beneath(self.root_fd.as_fd(), target.parent().key(), DIR_FLAGS) {
                Ok(fd) => fd,
                Err(Errno::XDEV) => return Err(bad_target("leads outside the root")),
                Err(Errno::NOENT | Errno::NOTDIR) => return Err(bad_target("does not exist")),
                Err(e) => return Err(self.io(name, "resolve hard link target", e)),
            };
        let target_file = target.file_name();
        match fsops::lstat_at(target_dir.as_fd(), target_file)
            .map_err(|e| self.io(name, "inspect hard link target", e))?
        {
            None => return Err(bad_target("does not exist")),
            Some(s) if fsops::file_type(&s) != FileType::RegularFile => {
                return Err(bad_target("is not a regular file"));
            }
            Some(_) => {}
        }
        self.mark(path, Kind::File, name)?;
        if target.key() == path.key() {
            return Ok(());
        }
        let dir = self.parent_dir(path, name)?;
        let file_name = path.file_name();
        self.clear_slot(dir.as_fd(), file_name, name)?;
        // No AT_SYMLINK_FOLLOW: even if the target name were swapped for a symlink after the
        // check above, linkat would link the symlink itself, never what it points to.
        rustix::fs::linkat(
            target_dir.as_fd(),
            os(target_file),
            dir.as_fd(),
            os(file_name),
            AtFlags::empty(),
        )
        .map_err(|e| self.io(name, "create hard link", e))
    }

    /// A device entry that is not created: it still replaces what a lower layer had there.
    fn skip_device(&mut self, path: &RelPath, name: &str) -> Result<(), UnpackError> {
        if path.is_root() {
            return Err(self.root_not_dir(name));
        }
        self.mark(path, Kind::Device, name)?;
        let dir = self.parent_dir(path, name)?;
        self.clear_slot(dir.as_fd(), path.file_name(), name)?;
        self.stats.skipped_devices.push(name.to_owned());
        Ok(())
    }

    fn make_fifo(&mut self, path: &RelPath, meta: Meta, name: &str) -> Result<(), UnpackError> {
        if path.is_root() {
            return Err(self.root_not_dir(name));
        }
        self.mark(path, Kind::Fifo, name)?;
        let dir = self.parent_dir(path, name)?;
        let file_name = path.file_name();
        self.clear_slot(dir.as_fd(), file_name, name)?;
        rustix::fs::mknodat(
            dir.as_fd(),
            os(file_name),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .map_err(|e| self.io(name, "create fifo", e))?;
        if self.opts.preserve_ownership {
            rustix::fs::chownat(
                dir.as_fd(),
                os(file_name),
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.io(name, "set fifo owner", e))?;
        }
        // fchmod needs an open fd and opening a fifo blocks; chmodat would follow a symlink, but
        // the name was created just now under a held dirfd in a tree only this call writes.
        rustix::fs::chmodat(
            dir.as_fd(),
            os(file_name),
            Mode::from_raw_mode(meta.mode),
            AtFlags::empty(),
        )
        .map_err(|e| self.io(name, "set fifo mode", e))?;
        rustix::fs::utimensat(
            dir.as_fd(),
            os(file_name),
            &timestamps(meta.mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io(name, "set fifo mtime", e))
    }

    // ---- whiteouts ----

    fn whiteout(&mut self, path: &RelPath, name: &str) -> Result<(), UnpackError> {
        let file_name = path.file_name();
        let parent = path.parent();
        let target = &file_name[WHITEOUT_PREFIX.len()..];
        let opaque = file_name == OPAQUE_MARKER;
        if !opaque && target.starts_with(WHITEOUT_PREFIX) {
            // Other `.wh..wh.` names are aufs bookkeeping (hard-link dirs, plinks), not
            // whiteouts; Docker and containerd skip them too.
            return Ok(());
        }
        if !opaque && (target.is_empty() || target == b"." || target == b"..") {
            return Err(self.unsafe_path_reason(name, "whiteout does not name a file"));
        }
        self.stats.whiteouts += 1;
        self.parent_cache = None;

        let dir = match fsops::open_beneath(self.root_fd.as_fd(), parent.key(), DIR_FLAGS) {
            Ok(fd) => fd,
            // Nothing below a missing directory or a file to hide.
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(()),
            Err(e) => return Err(self.resolve_error(e, parent.key(), name)),
        };
        if opaque {
            let children = fsops::children(dir.as_fd())
                .map_err(|e| self.io(name, "list opaque directory", e))?;
            for (child, _) in children {
                self.remove_lower(dir.as_fd(), &child, child_key(parent.key(), &child), name)?;
            }
            Ok(())
        } else {
            self.remove_lower(dir.as_fd(), target, child_key(parent.key(), target), name)
        }
    }

    /// Removes `name` under `dir` (archive path `key`) as far as lower layers put it there:
    /// what this layer wrote stays, and so do the directories leading to it.
    fn remove_lower(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        key: Vec<u8>,
        entry: &str,
    ) -> Result<(), UnpackError> {
        match self.marks.get(&key) {
            None => {
                fsops::remove_at(dir, name).map_err(|e| self.io(entry, "remove whiteout target", e))
            }
            Some(Mark::Entry(kind)) if *kind != Kind::Dir => Ok(()),
            Some(_) => {
                let is_dir = fsops::lstat_at(dir, name)
                    .map_err(|e| self.io(entry, "inspect whiteout target", e))?
                    .is_some_and(|s| fsops::file_type(&s) == FileType::Directory);
                if !is_dir {
                    // A symlink this layer wrote through: removing it would hide this layer's
                    // own files, so it stays.
                    return Ok(());
                }
                let sub = fsops::open_child_dir(dir, name)
                    .map_err(|e| self.io(entry, "open whiteout target", e))?;
                let children = fsops::children(sub.as_fd())
                    .map_err(|e| self.io(entry, "list whiteout target", e))?;
                for (child, _) in children {
                    let child_key = child_key(&key, &child);
                    self.remove_lower(sub.as_fd(), &child, child_key, entry)?;
                }
                Ok(())
            }
        }
    }

    // ---- bookkeeping and resolution ----

    /// Records that this layer writes `path` as `kind`, refusing a change of kind within the
    /// layer: the result would depend on entry order and hide part of the layer.
    fn mark(&mut self, path: &RelPath, kind: Kind, name: &str) -> Result<(), UnpackError> {
        for key in path.ancestor_keys() {
            match self.marks.get(key) {
                Some(Mark::Entry(earlier @ (Kind::File | Kind::Fifo | Kind::Device))) => {
                    return Err(self.conflict(name, *earlier, Kind::Dir));
                }
                // Its ancestors were marked when it was. A symlink of this layer may lead on to
                // a directory: resolution decides whether that stays beneath the root.
                Some(_) => break,
                None => {
                    self.marks.insert(key.to_vec(), Mark::Ancestor);
                }
            }
        }
        match self.marks.get(path.key()).copied() {
            None | Some(Mark::Ancestor) if kind == Kind::Dir => {
                self.marks.insert(path.key().to_vec(), Mark::Entry(kind));
            }
            None => {
                self.marks.insert(path.key().to_vec(), Mark::Entry(kind));
            }
            Some(Mark::Ancestor) => return Err(self.conflict(name, Kind::Dir, kind)),
            Some(Mark::Entry(earlier)) if earlier != kind => {
                return Err(self.conflict(name, earlier, kind));
            }
            Some(Mark::Entry(_)) => {}
        }
        Ok(())
    }

    /// The directory that will hold `path`, created (0755, owned by the caller) where missing.
    fn parent_dir(&mut self, path: &RelPath, name: &str) -> Result<Rc<OwnedFd>, UnpackError> {
        let parent = path.parent();
        if let Some((key, fd)) = &self.parent_cache
            && key.as_slice() == parent.key()
        {
            return Ok(Rc::clone(fd));
        }
        let fd = match fsops::open_beneath(self.root_fd.as_fd(), parent.key(), DIR_FLAGS) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => self.create_parents(&parent, name)?,
            Err(e) => return Err(self.resolve_error(e, parent.key(), name)),
        };
        let fd = Rc::new(fd);
        self.parent_cache = Some((parent.key().to_vec(), Rc::clone(&fd)));
        Ok(fd)
    }

    fn create_parents(&self, dir_path: &RelPath, name: &str) -> Result<OwnedFd, UnpackError> {
        let root = self.root_fd.as_fd();
        let mut dir = fsops::open_beneath(root, b"", DIR_FLAGS)
            .map_err(|e| self.resolve_error(e, b"", name))?;
        for (component, prefix) in dir_path.components().zip(dir_path.prefix_keys()) {
            dir = match fsops::open_beneath(root, prefix, DIR_FLAGS) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    // EEXIST here means a dangling symlink is in the way; it is not replaced,
                    // because it may belong to a lower layer that meant it.
                    rustix::fs::mkdirat(dir.as_fd(), os(component), Mode::from_raw_mode(0o700))
                        .map_err(|e| self.io(name, "create parent directory", e))?;
                    let fd = fsops::open_child_dir(dir.as_fd(), component)
                        .map_err(|e| self.io(name, "open parent directory", e))?;
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                        .map_err(|e| self.io(name, "set parent directory mode", e))?;
                    fd
                }
                Err(e) => return Err(self.resolve_error(e, prefix, name)),
            };
        }
        Ok(dir)
    }

    /// Makes room for a new entry at `file_name` under `dir`, removing whatever is there (a
    /// directory with all its contents). Never follows a symlink found there.
    fn clear_slot(
        &mut self,
        dir: BorrowedFd<'_>,
        file_name: &[u8],
        name: &str,
    ) -> Result<(), UnpackError> {
        let Some(stat) = fsops::lstat_at(dir, file_name)
            .map_err(|e| self.io(name, "inspect existing path", e))?
        else {
            return Ok(());
        };
        match fsops::file_type(&stat) {
            FileType::Directory => {
                self.parent_cache = None;
                fsops::remove_tree_at(dir, file_name)
                    .map_err(|e| self.io(name, "remove existing directory", e))
            }
            kind => {
                if kind == FileType::Symlink {
                    // The cached parent may have been reached through this symlink.
                    self.parent_cache = None;
                }
                rustix::fs::unlinkat(dir, os(file_name), AtFlags::empty())
                    .map_err(|e| self.io(name, "remove existing path", e))
            }
        }
    }

    fn set_meta(&self, fd: BorrowedFd<'_>, meta: Meta, name: &str) -> Result<(), UnpackError> {
        // chown before chmod: chown clears setuid/setgid bits.
        if self.opts.preserve_ownership {
            rustix::fs::fchown(
                fd,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )
            .map_err(|e| self.io(name, "set owner", e))?;
        }
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))
            .map_err(|e| self.io(name, "set mode", e))?;
        rustix::fs::futimens(fd, &timestamps(meta.mtime)).map_err(|e| self.io(name, "set mtime", e))
    }

    /// Applies directory metadata once nothing more is written into the directories. Changing a
    /// child's metadata does not touch its parent's mtime, so the order does not matter; the
    /// sort only makes errors reproducible.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        let mut dirs: Vec<(Vec<u8>, Meta)> = self.dir_meta.drain().collect();
        dirs.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, meta) in dirs {
            let name = if key.is_empty() {
                "./".to_owned()
            } else {
                String::from_utf8_lossy(&key).into_owned()
            };
            let fd = fsops::open_beneath(self.root_fd.as_fd(), &key, DIR_FLAGS | OFlags::NOFOLLOW)
                .map_err(|e| self.resolve_error(e, &key, &name))?;
            self.set_meta(fd.as_fd(), meta, &name)?;
        }
        Ok(())
    }

    fn meta<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
    ) -> Result<Meta, UnpackError> {
        let header_error = |source: io::Error| UnpackError::Header {
            entry: name.to_owned(),
            root: self.root.to_path_buf(),
            source,
        };
        let invalid = |what: &str| header_error(io::Error::new(io::ErrorKind::InvalidData, what));
        let header = entry.header();
        let regular = matches!(
            header.entry_type(),
            EntryType::Regular | EntryType::Continuous
        );
        let mode = header.mode().map_err(header_error)? & 0o7777;
        // u32::MAX is "leave unchanged" to chown, so it is no valid id either.
        let uid = u32::try_from(header.uid().map_err(header_error)?)
            .ok()
            .filter(|&id| id != u32::MAX)
            .ok_or_else(|| invalid("uid out of range"))?;
        let gid = u32::try_from(header.gid().map_err(header_error)?)
            .ok()
            .filter(|&id| id != u32::MAX)
            .ok_or_else(|| invalid("gid out of range"))?;
        let seconds = i64::try_from(header.mtime().map_err(header_error)?)
            .map_err(|_| invalid("mtime out of range"))?;
        let mut mtime = Timespec {
            tv_sec: seconds,
            tv_nsec: 0,
        };
        let mut capability = None;
        if let Some(extensions) = entry.pax_extensions().map_err(header_error)? {
            for extension in extensions {
                let extension = extension.map_err(header_error)?;
                match extension.key_bytes() {
                    b"mtime" => {
                        mtime = parse_pax_time(extension.value_bytes())
                            .ok_or_else(|| invalid("invalid pax mtime"))?;
                    }
                    CAPABILITY_RECORD => {
                        capability = Some(
                            check_capability(extension.value_bytes()).map_err(|e| invalid(&e))?,
                        );
                    }
                    _ => {}
                }
            }
        }
        if capability.is_some() && !regular {
            return Err(invalid(
                "security.capability on an entry that is no regular file",
            ));
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime,
            capability,
        })
    }

    // ---- errors ----

    fn io(&self, entry: &str, op: &'static str, errno: Errno) -> UnpackError {
        UnpackError::Io {
            entry: entry.to_owned(),
            root: self.root.to_path_buf(),
            op,
            source: errno.into(),
        }
    }

    fn resolve_error(&self, errno: Errno, key: &[u8], entry: &str) -> UnpackError {
        let path = String::from_utf8_lossy(key).into_owned();
        match errno {
            Errno::XDEV => UnpackError::Escape {
                entry: entry.to_owned(),
                root: self.root.to_path_buf(),
                path,
            },
            Errno::NOTDIR => UnpackError::NotADirectory {
                entry: entry.to_owned(),
                root: self.root.to_path_buf(),
                path,
            },
            errno => self.io(entry, "resolve directory", errno),
        }
    }

    fn unsafe_path(&self, entry: &str, problem: PathProblem) -> UnpackError {
        self.unsafe_path_reason(entry, problem.reason())
    }

    fn unsafe_path_reason(&self, entry: &str, reason: &'static str) -> UnpackError {
        UnpackError::UnsafePath {
            entry: entry.to_owned(),
            root: self.root.to_path_buf(),
            reason,
        }
    }

    fn root_not_dir(&self, entry: &str) -> UnpackError {
        self.unsafe_path_reason(entry, "only a directory entry may name the root")
    }

    fn unsupported(&self, entry: &str, kind: &str) -> UnpackError {
        UnpackError::Unsupported {
            entry: entry.to_owned(),
            root: self.root.to_path_buf(),
            kind: kind.to_owned(),
        }
    }

    fn conflict(&self, entry: &str, earlier: Kind, now: Kind) -> UnpackError {
        UnpackError::Conflict {
            entry: entry.to_owned(),
            root: self.root.to_path_buf(),
            earlier: earlier.describe(),
            now: now.describe(),
        }
    }
}

/// Copies an entry's data, telling read failures (the archive) from write failures (the disk).
fn copy_data(
    from: &mut impl Read,
    to: &mut File,
    buf: &mut [u8],
) -> Result<u64, (&'static str, Errno)> {
    let mut total = 0u64;
    loop {
        let n = match from.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(("read file data from the archive", io_errno(&e))),
        };
        to.write_all(&buf[..n])
            .map_err(|e| ("write file data", io_errno(&e)))?;
        total += n as u64;
    }
}

fn io_errno(e: &io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error)
}

fn timestamps(mtime: Timespec) -> Timestamps {
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

/// A PAX time: decimal seconds with an optional fraction, possibly negative.
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let text = std::str::from_utf8(value).ok()?;
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: i64 = whole.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in fraction.bytes().take(9).enumerate() {
        nanos += i64::from(digit - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if !negative {
        Timespec {
            tv_sec: seconds,
            tv_nsec: nanos,
        }
    } else if nanos == 0 {
        Timespec {
            tv_sec: -seconds,
            tv_nsec: 0,
        }
    } else {
        Timespec {
            tv_sec: -seconds - 1,
            tv_nsec: 1_000_000_000 - nanos,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("12.5"), Some((12, 500_000_000)));
        assert_eq!(t("12.0000000019"), Some((12, 1)));
        assert_eq!(t("-1.25"), Some((-2, 750_000_000)));
        assert_eq!(t("-3"), Some((-3, 0)));
        assert_eq!(t(""), None);
        assert_eq!(t("1e9"), None);
        assert_eq!(t(".5"), None);
    }
}

//! The directory-fd primitives the unpacker is built from. Every path handed to the kernel here
//! is either resolved from the root fd with `RESOLVE_BENEATH` or is a single component under a
//! directory fd obtained that way, and no final component is ever followed if it is a symlink.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

/// Magic links (`/proc/self/fd/N` style) could jump anywhere, whatever the prefix check says.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// openat2 fails with EAGAIN when a concurrent rename might have made `..` checks unreliable;
/// nothing renames inside a fresh unpack directory, so a few retries are plenty.
const EAGAIN_RETRIES: usize = 16;

pub(crate) const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);

pub(crate) fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

/// Opens `key` (a validated relative path, empty for the root itself) beneath `root`.
/// Symlinks on the way are followed only while they stay beneath `root`; an escape is EXDEV.
pub(crate) fn open_beneath(
    root: BorrowedFd<'_>,
    key: &[u8],
    flags: OFlags,
) -> Result<OwnedFd, Errno> {
    let path = if key.is_empty() { b"." as &[u8] } else { key };
    for _ in 0..EAGAIN_RETRIES {
        match rustix::fs::openat2(
            root,
            os(path),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Err(Errno::AGAIN) => continue,
            result => return result,
        }
    }
    Err(Errno::AGAIN)
}

/// Opens the directory `name` directly under `dir`, refusing to follow a symlink.
pub(crate) fn open_child_dir(dir: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(dir, os(name), DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty())
}

/// `lstat` of `name` under `dir`; `None` when it does not exist.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<Option<Stat>, Errno> {
    match rustix::fs::statat(dir, os(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(stat)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn file_type(stat: &Stat) -> FileType {
    FileType::from_raw_mode(stat.st_mode)
}

/// The names and types of the entries of a directory, without `.` and `..`.
pub(crate) fn children(dir: BorrowedFd<'_>) -> Result<Vec<(Vec<u8>, FileType)>, Errno> {
    let mut out = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let mut kind = entry.file_type();
        if kind == FileType::Unknown {
            // Some file systems do not fill d_type.
            match lstat_at(dir, name)? {
                Some(stat) => kind = file_type(&stat),
                None => continue,
            }
        }
        out.push((name.to_vec(), kind));
    }
    Ok(out)
}

/// Removes `name` under `dir` whatever it is; a directory goes with everything beneath it.
/// Symlinks are removed, never followed. A missing entry is not an error.
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    match lstat_at(dir, name)? {
        None => Ok(()),
        Some(stat) if file_type(&stat) == FileType::Directory => remove_tree_at(dir, name),
        Some(_) => unlink_missing_ok(dir, name, AtFlags::empty()),
    }
}

/// Removes the directory `name` under `dir` and its contents, walking with directory fds
/// opened with O_NOFOLLOW so that a symlink in the tree can never redirect the walk. Holds one
/// fd per level: a tree deeper than the fd limit fails with EMFILE rather than misbehaving.
pub(crate) fn remove_tree_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    let fd = open_child_dir(dir, name)?;
    for (child, kind) in children(fd.as_fd())? {
        if kind == FileType::Directory {
            remove_tree_at(fd.as_fd(), &child)?;
        } else {
            unlink_missing_ok(fd.as_fd(), &child, AtFlags::empty())?;
        }
    }
    drop(fd);
    unlink_missing_ok(dir, name, AtFlags::REMOVEDIR)
}

fn unlink_missing_ok(dir: BorrowedFd<'_>, name: &[u8], flags: AtFlags) -> Result<(), Errno> {
    match rustix::fs::unlinkat(dir, os(name), flags) {
        Err(Errno::NOENT) => Ok(()),
        result => result,
    }
}

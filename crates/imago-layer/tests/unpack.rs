//! Integration tests of `imago_layer::unpack::apply_layer`. They run as root (ownership is
//! checked with non-zero ids); every malicious archive is applied inside a sandbox whose
//! surroundings are snapshotted before and compared after.

// clippy.toml allows expect in #[test] functions only; the harness helpers here are test code too.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Cursor, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use imago_layer::unpack::{ApplyStats, MAX_ENTRY_SIZE, UnpackError, UnpackOptions, apply_layer};
use imago_oci::{Digest, HashingReader};
use tar::{EntryType, Header};

const MTIME: u64 = 1_600_000_000;

// ---------------------------------------------------------------------------------------------
// harness

/// A layer under construction, written with explicit headers.
struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

fn header(kind: EntryType, mode: u32) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    h
}

impl Layer {
    fn new() -> Layer {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn dir(mut self, path: &str, mode: u32) -> Layer {
        let mut h = header(EntryType::Directory, mode);
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .expect("append dir");
        self
    }

    fn file(self, path: &str, mode: u32, data: &[u8]) -> Layer {
        self.file_owned(path, mode, 0, 0, data)
    }

    fn file_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Layer {
        let mut h = header(EntryType::Regular, mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(data.len() as u64);
        self.builder
            .append_data(&mut h, path, data)
            .expect("append file");
        self
    }

    fn symlink(mut self, path: &str, target: &str) -> Layer {
        let mut h = header(EntryType::Symlink, 0o777);
        self.builder
            .append_link(&mut h, path, target)
            .expect("append symlink");
        self
    }

    fn hardlink(mut self, path: &str, target: &str) -> Layer {
        let mut h = header(EntryType::Link, 0o644);
        self.builder
            .append_link(&mut h, path, target)
            .expect("append hardlink");
        self
    }

    fn whiteout(self, path: &str) -> Layer {
        self.file(path, 0o644, b"")
    }

    /// An entry with the name and link name written byte for byte into the header, for names
    /// the `tar` crate refuses to write (`..`, absolute paths).
    fn raw(mut self, name: &[u8], kind: EntryType, link: &[u8], data: &[u8]) -> Layer {
        let mut h = header(kind, 0o644);
        {
            let old = h.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name);
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.builder.append(&h, data).expect("append raw");
        self
    }

    fn device(mut self, path: &str, kind: EntryType, major: u32, minor: u32) -> Layer {
        let mut h = header(kind, 0o666);
        h.set_device_major(major).expect("major");
        h.set_device_minor(minor).expect("minor");
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .expect("append device");
        self
    }

    fn fifo(mut self, path: &str, mode: u32) -> Layer {
        let mut h = header(EntryType::Fifo, mode);
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .expect("append fifo");
        self
    }

    /// A PAX extended header for the next entry.
    fn pax(mut self, records: &[(&str, &[u8])]) -> Layer {
        let mut data = Vec::new();
        for (key, value) in records {
            // The length prefix counts itself: grow it until it is consistent.
            let rest = key.len() + value.len() + 3;
            let mut len = rest + 1;
            while len.to_string().len() + rest != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let mut h = header(EntryType::XHeader, 0o644);
        h.set_size(data.len() as u64);
        self.builder
            .append_data(&mut h, "PaxHeaders/x", &data[..])
            .expect("append pax");
        self
    }

    fn finish(self) -> Vec<u8> {
        self.builder.into_inner().expect("finish tar")
    }
}

/// A scratch directory holding `target/` (where layers go) and a sibling `outside/` that no
/// archive may touch.
struct Sandbox {
    tmp: tempfile::TempDir,
}

const SENTINEL: &[u8] = b"do not touch\n";

impl Sandbox {
    fn new() -> Sandbox {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::create_dir(tmp.path().join("target")).expect("target");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("dir")).expect("outside");
        fs::write(outside.join("sentinel"), SENTINEL).expect("sentinel");
        fs::write(outside.join("dir/inner"), b"inner\n").expect("inner");
        Sandbox { tmp }
    }

    fn target(&self) -> PathBuf {
        self.tmp.path().join("target")
    }

    fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }

    fn apply(&self, tar: &[u8]) -> Result<ApplyStats, UnpackError> {
        apply_layer(tar, &self.target(), &UnpackOptions::default())
    }

    /// Every path of the sandbox except `target/`'s contents (the target directory itself is
    /// only created by the test), with type, mode, owner, size, mtime, link count and content.
    fn surroundings(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        snapshot(self.tmp.path(), self.tmp.path(), &mut out, true);
        out
    }

    /// Applies a malicious layer and checks that it fails, that the error names `entry`, and
    /// that nothing around the target changed.
    fn assert_refused(&self, tar: &[u8], entry: &str) -> UnpackError {
        let before = self.surroundings();
        let passwd_before = file_state(Path::new("/etc/passwd"));
        let err = self
            .apply(tar)
            .expect_err("malicious layer must be refused");
        let message = err.to_string();
        assert!(
            message.contains(&format!("{entry:?}")),
            "error {message:?} does not name entry {entry:?}"
        );
        assert!(
            message.contains(&self.target().display().to_string()),
            "error {message:?} does not name the root"
        );
        assert_eq!(err.entry(), Some(entry));
        assert_eq!(err.root(), self.target());
        assert_eq!(before, self.surroundings(), "surroundings changed");
        assert_eq!(passwd_before, file_state(Path::new("/etc/passwd")));
        assert_eq!(
            fs::read(self.outside().join("sentinel")).expect("sentinel"),
            SENTINEL
        );
        err
    }
}

fn file_state(path: &Path) -> String {
    match fs::symlink_metadata(path) {
        Ok(m) => {
            let content = if m.is_file() {
                Digest::of(&fs::read(path).expect("read")).to_string()
            } else {
                String::new()
            };
            format!(
                "{:o} {}:{} n{} {} {}.{} {}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                content
            )
        }
        Err(e) => format!("missing: {e}"),
    }
}

fn snapshot(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>, top: bool) {
    let rel = dir.strip_prefix(base).expect("prefix").to_path_buf();
    out.insert(rel, file_state(dir));
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if top && path.file_name() == Some("target".as_ref()) {
            continue;
        }
        let meta = fs::symlink_metadata(&path).expect("lstat");
        let rel = path.strip_prefix(base).expect("prefix").to_path_buf();
        if meta.is_dir() {
            snapshot(base, &path, out, false);
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).expect("readlink");
            out.insert(rel, format!("symlink -> {}", target.display()));
        } else {
            out.insert(rel, file_state(&path));
        }
    }
}

/// Every path under `root`, relative, sorted, directories with a trailing `/`.
fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("prefix")
                .display()
                .to_string();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            if meta.is_dir() {
                out.push(format!("{rel}/"));
                walk(root, &path, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// malicious archives

#[test]
fn dotdot_escape_is_refused() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .raw(b"../outside/evil", EntryType::Regular, b"", b"pwned")
        .finish();
    let err = sb.assert_refused(&tar, "../outside/evil");
    assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err:?}");
    // Also a `..` that would stay inside after lexical cleaning: refused all the same.
    let tar = Layer::new()
        .dir("a/", 0o755)
        .raw(
            b"a/../../outside/sentinel",
            EntryType::Regular,
            b"",
            b"pwned",
        )
        .finish();
    sb.assert_refused(&tar, "a/../../outside/sentinel");
}

#[test]
fn absolute_path_is_refused() {
    let sb = Sandbox::new();
    let abs = sb.outside().join("evil").display().to_string();
    let tar = Layer::new()
        .raw(abs.as_bytes(), EntryType::Regular, b"", b"pwned")
        .finish();
    let err = sb.assert_refused(&tar, &abs);
    assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err:?}");
    assert!(!sb.target().join(abs.trim_start_matches('/')).exists());
}

#[test]
fn file_through_symlink_to_outside_is_refused() {
    for absolute in [true, false] {
        let sb = Sandbox::new();
        let link_target = if absolute {
            sb.outside().display().to_string()
        } else {
            "../outside".to_owned()
        };
        let tar = Layer::new()
            .symlink("link", &link_target)
            .file("link/sentinel", 0o644, b"pwned")
            .finish();
        let err = sb.assert_refused(&tar, "link/sentinel");
        assert!(matches!(err, UnpackError::Escape { .. }), "{err:?}");
        // The symlink itself may exist (it is harmless inside the root), nothing else.
        assert_eq!(tree(&sb.target()), vec!["link".to_owned()]);
    }
}

#[test]
fn nested_symlink_escape_is_refused() {
    // A chain that starts inside and only leaves on the second hop.
    let sb = Sandbox::new();
    let tar = Layer::new()
        .dir("a/", 0o755)
        .symlink("a/up", "..")
        .symlink("a/out", "up/../outside")
        .file("a/out/new", 0o644, b"pwned")
        .finish();
    sb.assert_refused(&tar, "a/out/new");
    assert!(!sb.outside().join("new").exists());
}

#[test]
fn hardlink_through_symlink_to_outside_is_refused() {
    let sb = Sandbox::new();
    let outside = sb.outside().display().to_string();
    let tar = Layer::new()
        .symlink("link", &outside)
        .hardlink("stolen", "link/sentinel")
        .finish();
    let err = sb.assert_refused(&tar, "stolen");
    assert!(matches!(err, UnpackError::HardlinkTarget { .. }), "{err:?}");
    assert!(!sb.target().join("stolen").exists());

    // The link's own parent through the escaping symlink.
    let sb = Sandbox::new();
    let outside = sb.outside().display().to_string();
    let tar = Layer::new()
        .file("inside", 0o644, b"x")
        .symlink("link", &outside)
        .hardlink("link/planted", "inside")
        .finish();
    let err = sb.assert_refused(&tar, "link/planted");
    assert!(matches!(err, UnpackError::Escape { .. }), "{err:?}");
}

#[test]
fn hardlink_to_etc_passwd_is_refused() {
    for target in [&b"/etc/passwd"[..], b"../../../../../../../../etc/passwd"] {
        let sb = Sandbox::new();
        let tar = Layer::new()
            .raw(b"passwd", EntryType::Link, target, b"")
            .finish();
        let err = sb.assert_refused(&tar, "passwd");
        assert!(matches!(err, UnpackError::HardlinkTarget { .. }), "{err:?}");
        assert!(!sb.target().join("passwd").exists());
    }
}

#[test]
fn hardlink_to_non_regular_file_is_refused() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .dir("d/", 0o755)
        .hardlink("dirlink", "d")
        .finish();
    let err = sb.assert_refused(&tar, "dirlink");
    assert!(err.to_string().contains("not a regular file"), "{err}");

    let sb = Sandbox::new();
    let tar = Layer::new()
        .symlink("s", "../outside/sentinel")
        .hardlink("slink", "s")
        .finish();
    let err = sb.assert_refused(&tar, "slink");
    assert!(err.to_string().contains("not a regular file"), "{err}");

    let sb = Sandbox::new();
    let tar = Layer::new().hardlink("ghost", "missing").finish();
    let err = sb.assert_refused(&tar, "ghost");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn device_nodes_are_refused() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .dir("dev/", 0o755)
        .device("dev/null", EntryType::Char, 1, 3)
        .finish();
    let err = sb.assert_refused(&tar, "dev/null");
    assert!(matches!(err, UnpackError::Unsupported { .. }), "{err:?}");
    assert!(!sb.target().join("dev/null").exists());

    let sb = Sandbox::new();
    let tar = Layer::new().device("sda", EntryType::Block, 8, 0).finish();
    sb.assert_refused(&tar, "sda");
    assert!(!sb.target().join("sda").exists());
}

#[test]
fn device_nodes_are_left_out_when_asked_and_still_replace_what_was_there() {
    let sb = Sandbox::new();
    let lower = Layer::new()
        .dir("dev/", 0o755)
        .file("dev/console", 0o644, b"a file of a lower layer")
        .finish();
    apply_layer(&lower[..], &sb.target(), &UnpackOptions::default()).expect("lower");
    let tar = Layer::new()
        .device("dev/console", EntryType::Char, 5, 1)
        .device("dev/sda", EntryType::Block, 8, 0)
        .file("etc/kept", 0o644, b"kept")
        .finish();
    let opts = UnpackOptions {
        skip_devices: true,
        ..UnpackOptions::default()
    };
    let stats = apply_layer(&tar[..], &sb.target(), &opts).expect("apply");
    assert_eq!(stats.skipped_devices, ["dev/console", "dev/sda"]);
    assert_eq!(stats.entries, 3);
    let t = sb.target();
    assert!(fs::symlink_metadata(t.join("dev/console")).is_err());
    assert!(fs::symlink_metadata(t.join("dev/sda")).is_err());
    assert!(t.join("dev").is_dir());
    assert_eq!(fs::read(t.join("etc/kept")).expect("kept"), b"kept");
    // A device is still a non-directory: a later entry below it is a conflict.
    let sb = Sandbox::new();
    let tar = Layer::new()
        .device("d", EntryType::Char, 1, 3)
        .file("d/x", 0o644, b"x")
        .finish();
    let err = apply_layer(&tar[..], &sb.target(), &opts).expect_err("conflict");
    assert!(matches!(err, UnpackError::Conflict { .. }), "{err:?}");
}

#[test]
fn conflicting_kinds_in_one_layer_are_refused() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .dir("x/", 0o755)
        .file("x", 0o644, b"file")
        .dir("x/", 0o755)
        .finish();
    let err = sb.assert_refused(&tar, "x");
    assert!(matches!(err, UnpackError::Conflict { .. }), "{err:?}");

    // A path used as a directory by earlier entries cannot become a file either.
    let sb = Sandbox::new();
    let tar = Layer::new()
        .file("y/child", 0o644, b"c")
        .symlink("y", "../outside")
        .file("y/evil", 0o644, b"pwned")
        .finish();
    let err = sb.assert_refused(&tar, "y");
    assert!(matches!(err, UnpackError::Conflict { .. }), "{err:?}");
}

#[test]
fn absurd_size_is_refused() {
    let sb = Sandbox::new();
    let mut h = header(EntryType::Regular, 0o644);
    h.set_path("huge").expect("path");
    h.set_size(1 << 40);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[0u8; 4096]);
    let err = sb.assert_refused(&tar, "huge");
    assert!(
        matches!(err, UnpackError::TooLarge { size, limit, .. } if size == 1 << 40 && limit == MAX_ENTRY_SIZE),
        "{err:?}"
    );
    assert!(!sb.target().join("huge").exists());
}

#[test]
fn truncated_stream_is_refused() {
    let sb = Sandbox::new();
    let data = vec![7u8; 10_000];
    let tar = Layer::new()
        .file("first", 0o644, b"ok")
        .file("big", 0o644, &data)
        .finish();
    // Cut in the middle of big's data: the second header is at 1024.
    let cut = &tar[..1024 + 512 + 5000];
    let err = sb.assert_refused(cut, "big");
    assert!(
        matches!(
            err,
            UnpackError::Truncated {
                size: 10_000,
                written: 5000,
                ..
            }
        ),
        "{err:?}"
    );

    // Cut in the middle of big's header: the error names the last complete entry.
    let sb = Sandbox::new();
    let err = sb.assert_refused(&tar[..1024 + 100], "first");
    assert!(matches!(err, UnpackError::Archive { .. }), "{err:?}");
}

#[test]
fn whiteout_through_symlink_to_outside_is_refused() {
    let sb = Sandbox::new();
    let outside = sb.outside().display().to_string();
    let tar = Layer::new()
        .symlink("link", &outside)
        .whiteout("link/.wh.sentinel")
        .finish();
    let err = sb.assert_refused(&tar, "link/.wh.sentinel");
    assert!(matches!(err, UnpackError::Escape { .. }), "{err:?}");

    let sb = Sandbox::new();
    let tar = Layer::new()
        .symlink("link", "../outside")
        .whiteout("link/.wh..wh..opq")
        .finish();
    sb.assert_refused(&tar, "link/.wh..wh..opq");
}

#[test]
fn dangerous_lower_symlinks_are_replaced_not_followed() {
    // A lower layer left symlinks pointing outside; an upper layer writes files, directories
    // and whiteouts at those very names. Each must replace the symlink, never follow it.
    let sb = Sandbox::new();
    let outside = sb.outside().display().to_string();
    let lower = Layer::new()
        .symlink("file", &format!("{outside}/sentinel"))
        .symlink("dir", &format!("{outside}/dir"))
        .symlink("gone", &format!("{outside}/dir"))
        .finish();
    sb.apply(&lower).expect("lower");
    let before = sb.surroundings();
    let upper = Layer::new()
        .file("file", 0o644, b"new")
        .dir("dir/", 0o755)
        .file("dir/inner", 0o644, b"new inner")
        .whiteout(".wh.gone")
        .finish();
    sb.apply(&upper).expect("upper");
    assert_eq!(before, sb.surroundings());
    assert_eq!(fs::read(sb.target().join("file")).expect("file"), b"new");
    assert!(
        fs::symlink_metadata(sb.target().join("dir"))
            .expect("dir")
            .is_dir()
    );
    assert_eq!(
        fs::read(sb.target().join("dir/inner")).expect("inner"),
        b"new inner"
    );
    assert!(fs::symlink_metadata(sb.target().join("gone")).is_err());
    assert_eq!(
        fs::read(sb.outside().join("dir/inner")).expect("outer"),
        b"inner\n"
    );
}

// ---------------------------------------------------------------------------------------------
// normal layers

#[test]
fn files_modes_owners_and_mtimes() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .dir("bin/", 0o755)
        .file_owned("bin/su", 0o4755, 0, 0, b"#!/bin/true\n")
        .dir("shared/", 0o2775)
        .dir("tmp/", 0o1777)
        .file_owned("home/user/notes", 0o640, 1234, 5678, b"hello")
        .file("empty", 0o600, b"")
        .finish();
    let stats = sb.apply(&tar).expect("apply");
    assert_eq!(
        stats,
        ApplyStats {
            entries: 6,
            bytes: 17,
            whiteouts: 0,
            skipped_devices: Vec::new(),
        }
    );
    let t = sb.target();
    let mode = |p: &str| {
        fs::symlink_metadata(t.join(p))
            .expect(p)
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("bin/su"), 0o4755);
    assert_eq!(mode("shared"), 0o2775);
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("home/user/notes"), 0o640);
    assert_eq!(mode("empty"), 0o600);
    // Implicit parents are created 0755 whatever the umask.
    assert_eq!(mode("home"), 0o755);
    assert_eq!(mode("home/user"), 0o755);
    let notes = fs::metadata(t.join("home/user/notes")).expect("notes");
    assert_eq!((notes.uid(), notes.gid()), (1234, 5678));
    assert_eq!(fs::read(t.join("home/user/notes")).expect("read"), b"hello");
    for p in ["bin", "bin/su", "shared", "tmp", "home/user/notes", "empty"] {
        let m = fs::symlink_metadata(t.join(p)).expect(p);
        assert_eq!((m.mtime(), m.mtime_nsec()), (MTIME as i64, 0), "{p}");
    }
}

#[test]
fn ownership_is_left_alone_when_not_preserved() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .file_owned("f", 0o644, 1234, 5678, b"x")
        .finish();
    let opts = UnpackOptions {
        preserve_ownership: false,
        skip_devices: false,
    };
    apply_layer(&tar[..], &sb.target(), &opts).expect("apply");
    let m = fs::metadata(sb.target().join("f")).expect("f");
    assert_eq!(m.uid(), rustix::process::geteuid().as_raw());
}

#[test]
fn directory_mtime_survives_its_children() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .dir("d/", 0o755)
        .file("d/a", 0o644, b"a")
        .dir("d/sub/", 0o700)
        .file("d/sub/b", 0o644, b"b")
        .symlink("d/link", "a")
        .finish();
    sb.apply(&tar).expect("apply");
    for p in ["d", "d/sub", "d/link"] {
        let m = fs::symlink_metadata(sb.target().join(p)).expect(p);
        assert_eq!(m.mtime(), MTIME as i64, "{p}");
    }
    // The deferred mode still lets the unpacker fill a read-only directory.
    let sb = Sandbox::new();
    let tar = Layer::new()
        .dir("ro/", 0o555)
        .file("ro/f", 0o444, b"f")
        .finish();
    sb.apply(&tar).expect("apply");
    let m = fs::metadata(sb.target().join("ro")).expect("ro");
    assert_eq!(m.permissions().mode() & 0o7777, 0o555);
}

#[test]
fn root_entry_sets_root_metadata() {
    let sb = Sandbox::new();
    fs::set_permissions(sb.target(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let tar = Layer::new()
        .dir("./", 0o755)
        .file("./f", 0o644, b"f")
        .finish();
    sb.apply(&tar).expect("apply");
    let m = fs::metadata(sb.target()).expect("root");
    assert_eq!(m.permissions().mode() & 0o7777, 0o755);
    assert_eq!(m.mtime(), MTIME as i64);
    assert!(sb.target().join("f").is_file());
}

#[test]
fn symlinks_hardlinks_and_fifos() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .dir("usr/lib/", 0o755)
        .file("usr/lib/libc.so.6", 0o755, b"ELF")
        .symlink("lib", "usr/lib")
        // written through a symlink that stays inside
        .file("lib/libm.so.6", 0o755, b"ELF2")
        .symlink("usr/lib/libc.so", "libc.so.6")
        .symlink("usr/share", "../etc")
        .symlink("abs", "/etc/passwd")
        .hardlink("usr/lib/libc-copy", "lib/libc.so.6")
        .fifo("run/fifo", 0o620)
        .finish();
    sb.apply(&tar).expect("apply");
    let t = sb.target();
    assert_eq!(
        fs::read_link(t.join("lib")).expect("lib"),
        Path::new("usr/lib")
    );
    assert_eq!(
        fs::read(t.join("usr/lib/libm.so.6")).expect("libm"),
        b"ELF2"
    );
    assert_eq!(
        fs::read_link(t.join("abs")).expect("abs"),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::read_link(t.join("usr/share")).expect("share"),
        Path::new("../etc")
    );
    let a = fs::metadata(t.join("usr/lib/libc.so.6")).expect("libc");
    let b = fs::metadata(t.join("usr/lib/libc-copy")).expect("copy");
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    let fifo = fs::symlink_metadata(t.join("run/fifo")).expect("fifo");
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.permissions().mode() & 0o7777, 0o620);
}

#[test]
fn long_names() {
    let sb = Sandbox::new();
    let dir = format!("{}/{}", "d".repeat(90), "e".repeat(90));
    let file = format!("{dir}/{}", "f".repeat(120));
    let link = format!("{dir}/{}", "l".repeat(120));
    let hard = format!("{dir}/{}", "h".repeat(120));
    assert!(file.len() > 100 && file.len() < 4096);
    let tar = Layer::new()
        .dir(&dir, 0o755)
        .file(&file, 0o644, b"long")
        .symlink(&link, &file)
        .hardlink(&hard, &file)
        .finish();
    sb.apply(&tar).expect("apply");
    let t = sb.target();
    assert_eq!(fs::read(t.join(&file)).expect("file"), b"long");
    assert_eq!(
        fs::read_link(t.join(&link)).expect("link"),
        Path::new(&file)
    );
    assert_eq!(fs::read(t.join(&hard)).expect("hard"), b"long");
}

#[test]
fn whiteouts_remove_lower_files_and_trees() {
    let sb = Sandbox::new();
    let lower = Layer::new()
        .dir("a/", 0o755)
        .file("a/file", 0o644, b"x")
        .file("a/keep", 0o644, b"k")
        .dir("tree/", 0o755)
        .dir("tree/x/", 0o755)
        .file("tree/x/y", 0o644, b"y")
        .symlink("tree/x/out", "../../../outside")
        .finish();
    sb.apply(&lower).expect("lower");
    let before = sb.surroundings();
    let upper = Layer::new()
        .whiteout("a/.wh.file")
        .whiteout(".wh.tree")
        .whiteout(".wh.never-existed")
        .whiteout("missing-dir/.wh.x")
        .finish();
    let stats = sb.apply(&upper).expect("upper");
    assert_eq!(stats.whiteouts, 4);
    assert_eq!(tree(&sb.target()), vec!["a/", "a/keep"]);
    assert_eq!(before, sb.surroundings());
}

#[test]
fn whiteout_spares_this_layers_own_files() {
    let sb = Sandbox::new();
    sb.apply(
        &Layer::new()
            .file("f", 0o644, b"lower")
            .dir("d/", 0o755)
            .file("d/old", 0o644, b"o")
            .finish(),
    )
    .expect("lower");
    // Whiteout after the layer's own file: the file stays. Whiteout before: lower removed,
    // new one written. A whited-out directory keeps only this layer's children.
    let upper = Layer::new()
        .file("f", 0o644, b"upper")
        .whiteout(".wh.f")
        .file("d/new", 0o644, b"n")
        .whiteout(".wh.d")
        .whiteout(".wh.g")
        .file("g", 0o644, b"g")
        .finish();
    sb.apply(&upper).expect("upper");
    assert_eq!(fs::read(sb.target().join("f")).expect("f"), b"upper");
    assert_eq!(tree(&sb.target()), vec!["d/", "d/new", "f", "g"]);
}

#[test]
fn opaque_directory_keeps_this_layers_children_in_any_order() {
    let orders: [&[&str]; 3] = [
        &["d/", "d/.wh..wh..opq", "d/new", "d/sub/new2"],
        &["d/", "d/new", "d/sub/new2", "d/.wh..wh..opq"],
        &["d/new", "d/.wh..wh..opq", "d/sub/new2", "d/"],
    ];
    for order in orders {
        let sb = Sandbox::new();
        let lower = Layer::new()
            .dir("d/", 0o755)
            .file("d/old1", 0o644, b"1")
            .file("d/new", 0o644, b"lower version")
            .dir("d/sub/", 0o755)
            .file("d/sub/old2", 0o644, b"2")
            .dir("d/gone/", 0o755)
            .file("d/gone/old3", 0o644, b"3")
            .file("other", 0o644, b"o")
            .finish();
        sb.apply(&lower).expect("lower");
        let mut upper = Layer::new();
        for name in order {
            upper = match *name {
                "d/" => upper.dir("d/", 0o750),
                "d/.wh..wh..opq" => upper.whiteout(name),
                other => upper.file(other, 0o644, b"upper"),
            };
        }
        sb.apply(&upper.finish()).expect("upper");
        assert_eq!(
            tree(&sb.target()),
            vec!["d/", "d/new", "d/sub/", "d/sub/new2", "other"],
            "order {order:?}"
        );
        assert_eq!(fs::read(sb.target().join("d/new")).expect("new"), b"upper");
        let mode = fs::metadata(sb.target().join("d"))
            .expect("d")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o750);
    }
}

#[test]
fn existing_entries_of_another_kind_are_replaced() {
    let sb = Sandbox::new();
    let lower = Layer::new()
        .dir("p/", 0o755)
        .file("p/child", 0o644, b"c")
        .file("q", 0o644, b"q")
        .symlink("r", "q")
        .dir("keep/", 0o700)
        .file("keep/child", 0o644, b"k")
        .finish();
    sb.apply(&lower).expect("lower");
    let upper = Layer::new()
        .file("p", 0o644, b"now a file")
        .dir("q/", 0o755)
        .file("r", 0o644, b"now a file too")
        .dir("keep/", 0o755)
        .finish();
    sb.apply(&upper).expect("upper");
    let t = sb.target();
    assert_eq!(fs::read(t.join("p")).expect("p"), b"now a file");
    assert!(fs::symlink_metadata(t.join("q")).expect("q").is_dir());
    assert_eq!(fs::read(t.join("r")).expect("r"), b"now a file too");
    assert_eq!(fs::read(t.join("q")).ok(), None);
    assert_eq!(fs::read(t.join("keep/child")).expect("child"), b"k");
    let keep = fs::metadata(t.join("keep")).expect("keep");
    assert_eq!(keep.permissions().mode() & 0o7777, 0o755);
}

#[test]
fn hashing_reader_sees_every_byte() {
    let sb = Sandbox::new();
    let mut tar = Layer::new()
        .dir("d/", 0o755)
        .file("d/f", 0o644, &[1u8; 1000])
        .finish();
    // Pad to a 10 KiB record like GNU tar does: bytes after the end-of-archive marker.
    tar.resize(10240, 0);
    let mut reader = HashingReader::new(Cursor::new(tar.clone()));
    apply_layer(&mut reader, &sb.target(), &UnpackOptions::default()).expect("apply");
    let (digest, count, mut rest) = reader.finish();
    assert_eq!(count, tar.len() as u64);
    assert_eq!(digest, Digest::of(&tar));
    let mut leftover = Vec::new();
    rest.read_to_end(&mut leftover).expect("read");
    assert!(leftover.is_empty());
}

#[test]
fn ten_thousand_small_files() {
    let sb = Sandbox::new();
    let mut layer = Layer::new().dir("many/", 0o755);
    for i in 0..10_000 {
        layer = layer.file(&format!("many/{:02}/f{i}", i % 50), 0o644, b"x");
    }
    let stats = sb.apply(&layer.finish()).expect("apply");
    assert_eq!(stats.entries, 10_001);
    assert_eq!(stats.bytes, 10_000);
    assert_eq!(
        fs::read(sb.target().join("many/49/f9999")).expect("last"),
        b"x"
    );
}

#[test]
fn missing_root_is_an_error() {
    let sb = Sandbox::new();
    let tar = Layer::new().file("f", 0o644, b"x").finish();
    let err = apply_layer(
        &tar[..],
        &sb.target().join("nope"),
        &UnpackOptions::default(),
    )
    .expect_err("missing root");
    assert!(matches!(err, UnpackError::OpenRoot { .. }), "{err:?}");
    assert!(err.to_string().contains("nope"));
}

#[test]
fn harness_notices_changes_outside() {
    let sb = Sandbox::new();
    let before = sb.surroundings();
    fs::write(sb.outside().join("dir/inner"), b"inner\n").expect("rewrite same bytes");
    assert_ne!(before, sb.surroundings(), "an mtime change must show");
    let before = sb.surroundings();
    fs::write(sb.tmp.path().join("new-sibling"), b"").expect("sibling");
    assert_ne!(
        before,
        sb.surroundings(),
        "a new sibling of target must show"
    );
    let before = sb.surroundings();
    fs::write(sb.target().join("inside"), b"").expect("inside");
    assert_eq!(
        before,
        sb.surroundings(),
        "target's contents are not surroundings"
    );
}

#[test]
fn setuid_survives_chown_to_another_user() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .file_owned("suid", 0o4750, 1234, 5678, b"x")
        .file_owned("sgid", 0o2755, 1234, 5678, b"x")
        .finish();
    sb.apply(&tar).expect("apply");
    for (name, mode) in [("suid", 0o4750), ("sgid", 0o2755)] {
        let m = fs::metadata(sb.target().join(name)).expect(name);
        assert_eq!((m.uid(), m.gid()), (1234, 5678), "{name}");
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{name}");
    }
}

#[test]
fn non_directory_entry_naming_the_root_is_refused() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .raw(b"./", EntryType::Regular, b"", b"x")
        .finish();
    let err = sb.assert_refused(&tar, "./");
    assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err:?}");
    assert!(sb.target().is_dir());
}

#[test]
fn absolute_symlink_inside_the_root_is_not_followed() {
    // RESOLVE_BENEATH, not RESOLVE_IN_ROOT: an absolute symlink is an escape even when the
    // same path exists under the root.
    let sb = Sandbox::new();
    let tar = Layer::new()
        .dir("usr/lib/", 0o755)
        .symlink("lib", "/usr/lib")
        .file("lib/libz.so", 0o644, b"z")
        .finish();
    let err = sb.assert_refused(&tar, "lib/libz.so");
    assert!(matches!(err, UnpackError::Escape { .. }), "{err:?}");
    assert!(!sb.target().join("usr/lib/libz.so").exists());
}

#[test]
fn pax_path_and_fractional_mtime() {
    let sb = Sandbox::new();
    let long = format!("{}/{}", "p".repeat(150), "q".repeat(150));
    let tar = Layer::new()
        .pax(&[("path", long.as_bytes()), ("mtime", b"1600000000.25")])
        .file("short-name-ignored", 0o644, b"pax")
        .finish();
    sb.apply(&tar).expect("apply");
    assert!(!sb.target().join("short-name-ignored").exists());
    let m = fs::metadata(sb.target().join(&long)).expect("long");
    assert_eq!((m.mtime(), m.mtime_nsec()), (MTIME as i64, 250_000_000));
    assert_eq!(fs::read(sb.target().join(&long)).expect("read"), b"pax");
}

#[test]
fn pax_path_escape_is_refused() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .pax(&[("path", b"../outside/evil")])
        .file("innocent", 0o644, b"pwned")
        .finish();
    let err = sb.assert_refused(&tar, "../outside/evil");
    assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err:?}");
}

#[test]
fn non_utf8_names() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let sb = Sandbox::new();
    let name = OsStr::from_bytes(b"caf\xe9");
    let mut h = header(EntryType::Regular, 0o644);
    h.set_size(1);
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut h, name, &b"x"[..])
        .expect("append");
    let tar = builder.into_inner().expect("finish");
    sb.apply(&tar).expect("apply");
    assert_eq!(fs::read(sb.target().join(name)).expect("read"), b"x");
}

#[test]
fn layers_stack() {
    // The same path rewritten by an upper layer gets a new inode: a hard link made by a lower
    // layer keeps the old content, as in overlayfs.
    let sb = Sandbox::new();
    sb.apply(
        &Layer::new()
            .file("a", 0o644, b"v1")
            .hardlink("b", "a")
            .finish(),
    )
    .expect("lower");
    sb.apply(&Layer::new().file("a", 0o600, b"v2").finish())
        .expect("upper");
    assert_eq!(fs::read(sb.target().join("a")).expect("a"), b"v2");
    assert_eq!(fs::read(sb.target().join("b")).expect("b"), b"v1");
    let mode = fs::metadata(sb.target().join("b"))
        .expect("b")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644);
}

/// xorshift64*: a fixed-seed generator, so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a, T: ?Sized>(&mut self, items: &[&'a T]) -> &'a T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn random_hostile_layers_never_touch_the_surroundings() {
    // Mostly plain names, so that layers get far enough to build a symlink and then use it;
    // the refused spellings are rare for the same reason.
    const COMPONENTS: &[&str] = &[
        "a",
        "b",
        "link",
        "a",
        "b",
        "link",
        "a",
        "b",
        "link",
        "sentinel",
        "dir",
        ".wh.a",
        ".wh.link",
        ".wh..wh..opq",
        "..",
        ".",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut outcomes = [0usize; 2];
    for _ in 0..100 {
        let sb = Sandbox::new();
        let outside = sb.outside().display().to_string();
        let abs_sentinel = format!("{outside}/sentinel");
        let link_targets: [&str; 10] = [
            "../outside",
            &outside,
            &abs_sentinel,
            "..",
            ".",
            "a",
            "b/a",
            "../../outside/dir",
            "/",
            "/etc",
        ];
        let before = sb.surroundings();
        let passwd = file_state(Path::new("/etc/passwd"));
        for _layer in 0..3 {
            let mut layer = Layer::new();
            for _ in 0..(rng.next() % 16) {
                let depth = 1 + rng.next() % 3;
                let name: Vec<&str> = (0..depth).map(|_| rng.pick(COMPONENTS)).collect();
                let name = name.join("/");
                layer = match rng.next() % 6 {
                    0 | 1 => layer.raw(name.as_bytes(), EntryType::Regular, b"", b"pwned"),
                    2 => layer.raw(
                        format!("{name}/").as_bytes(),
                        EntryType::Directory,
                        b"",
                        b"",
                    ),
                    3 => {
                        let target = rng.pick(&link_targets);
                        layer.raw(name.as_bytes(), EntryType::Symlink, target.as_bytes(), b"")
                    }
                    4 => {
                        let target = rng.pick(&[
                            "a",
                            "b/a",
                            "link/sentinel",
                            "link/a",
                            "/etc/passwd",
                            "../outside/sentinel",
                        ]);
                        layer.raw(name.as_bytes(), EntryType::Link, target.as_bytes(), b"")
                    }
                    _ => layer.raw(name.as_bytes(), EntryType::Fifo, b"", b""),
                };
            }
            let result = sb.apply(&layer.finish());
            outcomes[usize::from(result.is_ok())] += 1;
            assert_eq!(before, sb.surroundings(), "after {result:?}");
            assert_eq!(passwd, file_state(Path::new("/etc/passwd")));
        }
    }
    // The generator must exercise both paths for the test to mean anything.
    assert!(outcomes[0] > 10 && outcomes[1] > 10, "{outcomes:?}");
}

/// Counts the bytes a reader handed out, shared with the test after the reader is consumed.
struct Counted<R> {
    inner: R,
    count: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// The `tar` crate reads GNU long names and PAX headers whole into memory: a 4 GiB record of
/// zeros is a few megabytes of gzip or zstd. Such a layer is refused after about the record's
/// header, not after reading (and holding) its 4 GiB, and the error names the entry before it.
#[test]
fn compressed_extension_record_bombs_are_refused_before_their_data_is_read() {
    use imago_layer::compression::{Compression, decompress};
    use imago_layer::tar_limits::MAX_EXTENSION_SIZE;

    const BOMB: u64 = 4 << 30;
    for compression in [Compression::Gzip, Compression::Zstd] {
        for (kind, what) in [
            (EntryType::GNULongName, "GNU long name record"),
            (EntryType::XHeader, "PAX extended header"),
        ] {
            let sb = Sandbox::new();
            let before = sb.surroundings();
            let mut prefix = Layer::new().file("first", 0o644, b"ok\n").finish();
            // Drop the end-of-archive blocks of the finished tar.
            prefix.truncate(prefix.len() - 1024);
            let mut h = header(kind, 0o644);
            h.set_path("././@LongLink").expect("path");
            h.set_size(BOMB);
            h.set_cksum();
            prefix.extend_from_slice(h.as_bytes());
            let count = std::rc::Rc::new(std::cell::Cell::new(0));
            let source = Counted {
                inner: Cursor::new(prefix).chain(std::io::repeat(0).take(BOMB + 1024)),
                count: count.clone(),
            };
            let compressed: Box<dyn Read> = match compression {
                Compression::Gzip => Box::new(flate2::read::GzEncoder::new(
                    source,
                    flate2::Compression::fast(),
                )),
                _ => Box::new(zstd::stream::read::Encoder::new(source, 1).expect("zstd encoder")),
            };
            let stream = decompress(compression, compressed).expect("decompressor");
            let err = apply_layer(stream, &sb.target(), &UnpackOptions::default())
                .expect_err("bomb refused");
            let message = err.to_string();
            assert!(
                matches!(err, UnpackError::Archive { .. }) && err.entry() == Some("first"),
                "{compression:?} {what}: {err:?}"
            );
            assert!(
                message.contains(what) && message.contains(&MAX_EXTENSION_SIZE.to_string()),
                "{compression:?}: {message}"
            );
            assert!(
                count.get() < 64 << 20,
                "{compression:?} {what}: {} bytes of the layer were read before it was refused",
                count.get()
            );
            assert_eq!(before, sb.surroundings(), "surroundings changed");
        }
    }
}

/// Records up to the limit are what real archives carry (long paths, xattrs): they still apply.
#[test]
fn long_names_up_to_the_extension_limit_apply() {
    let sb = Sandbox::new();
    let deep: String = (0..200).map(|i| format!("d{i:03}/")).collect::<String>() + "leaf";
    let tar = Layer::new().file(&deep, 0o644, b"deep\n").finish();
    sb.apply(&tar).expect("long name applies");
    assert_eq!(fs::read(sb.target().join(&deep)).expect("leaf"), b"deep\n");
}

// ---------------------------------------------------------------------------------------------
// file capabilities (`SCHILY.xattr.security.capability`)

const CAP_RECORD: &str = "SCHILY.xattr.security.capability";

/// `cap_net_raw=ep` as `setcap` writes it: revision 2 with the effective flag, permitted bit 13.
const NET_RAW_EP: [u8; 20] = [
    0x01, 0, 0, 0x02, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
        Ok(len) => Some(buf[..len].to_vec()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("lgetxattr {name} of {}: {e}", path.display()),
    }
}

#[test]
fn file_capability_is_kept_and_other_xattrs_are_not() {
    let sb = Sandbox::new();
    let tar = Layer::new().file("bin/ping", 0o755, b"lower ping").finish();
    sb.apply(&tar).expect("lower layer");
    // The capability must survive the owner and mode being set (chown clears it), for a file
    // owned by root and by another user, and replace a lower file without one.
    let tar = Layer::new()
        .pax(&[
            (CAP_RECORD, &NET_RAW_EP[..]),
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            ("SCHILY.xattr.user.note", b"hello"),
            ("SCHILY.xattr.security.ima", b"\x03\x02"),
        ])
        .file("bin/ping", 0o4755, b"ping")
        .pax(&[(CAP_RECORD, &NET_RAW_EP[..])])
        .file_owned("bin/tool", 0o750, 1000, 1000, b"tool")
        .file("bin/plain", 0o755, b"plain")
        .finish();
    sb.apply(&tar).expect("apply");
    let t = sb.target();
    assert_eq!(
        xattr(&t.join("bin/ping"), "security.capability"),
        Some(NET_RAW_EP.to_vec())
    );
    assert_eq!(
        xattr(&t.join("bin/tool"), "security.capability"),
        Some(NET_RAW_EP.to_vec())
    );
    assert_eq!(xattr(&t.join("bin/plain"), "security.capability"), None);
    for other in ["trusted.overlay.opaque", "user.note", "security.ima"] {
        assert_eq!(
            xattr(&t.join("bin/ping"), other),
            None,
            "{other} was applied"
        );
    }
    let m = fs::metadata(t.join("bin/tool")).expect("tool");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1000, 0o750));
    assert_eq!(
        fs::metadata(t.join("bin/ping")).expect("ping").mode() & 0o7777,
        0o4755
    );
    // What the system's own tool reads, where it is installed.
    if let Ok(out) = std::process::Command::new("getcap")
        .arg(t.join("bin/ping"))
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("cap_net_raw=ep"), "getcap: {text}");
    }
}

#[test]
fn file_capability_is_not_applied_without_ownership() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .pax(&[(CAP_RECORD, &NET_RAW_EP[..])])
        .file("bin/ping", 0o755, b"ping")
        .finish();
    let opts = UnpackOptions {
        preserve_ownership: false,
        ..UnpackOptions::default()
    };
    apply_layer(&tar[..], &sb.target(), &opts).expect("apply");
    assert_eq!(
        xattr(&sb.target().join("bin/ping"), "security.capability"),
        None
    );
    assert_eq!(
        fs::read(sb.target().join("bin/ping")).expect("read"),
        b"ping"
    );
}

#[test]
fn malformed_file_capabilities_are_refused() {
    let mut v3 = [0u8; 24];
    v3[..4].copy_from_slice(&0x0300_0001u32.to_le_bytes());
    let mut v2_long = NET_RAW_EP.to_vec();
    v2_long.extend_from_slice(&[0; 4]);
    let mut revision_4 = NET_RAW_EP;
    revision_4[3] = 0x04;
    let huge = vec![0x02u8; 512 << 10];
    for (what, value) in [
        ("huge", &huge[..]),
        ("25 bytes", &[0x02; 25][..]),
        ("revision 2 with 24 bytes", &v2_long[..]),
        ("revision 4", &revision_4[..]),
        ("empty", &[][..]),
        ("3 bytes", &[1, 0, 0][..]),
        ("revision 3 with 20 bytes", &v3[..20]),
    ] {
        let sb = Sandbox::new();
        let tar = Layer::new()
            .pax(&[(CAP_RECORD, value)])
            .file("bin/ping", 0o755, b"ping")
            .finish();
        let err = sb.assert_refused(&tar, "bin/ping");
        assert!(
            matches!(err, UnpackError::Header { .. })
                && err.to_string().contains("security.capability"),
            "{what}: {err}"
        );
    }
    // A well-formed revision 3 (namespaced, root uid 0) is applied.
    let sb = Sandbox::new();
    let tar = Layer::new()
        .pax(&[(CAP_RECORD, &v3[..])])
        .file("bin/ping", 0o755, b"ping")
        .finish();
    sb.apply(&tar).expect("revision 3");
    assert!(xattr(&sb.target().join("bin/ping"), "security.capability").is_some());
}

#[test]
fn file_capability_on_other_entries_is_refused_or_ignored() {
    // On a directory, a symlink or a fifo it is a forgery: refused, naming the entry.
    for (entry, layer) in [
        (
            "d/",
            Layer::new()
                .pax(&[(CAP_RECORD, &NET_RAW_EP[..])])
                .dir("d/", 0o755),
        ),
        (
            "l",
            Layer::new()
                .pax(&[(CAP_RECORD, &NET_RAW_EP[..])])
                .symlink("l", "target"),
        ),
        (
            "f",
            Layer::new()
                .pax(&[(CAP_RECORD, &NET_RAW_EP[..])])
                .fifo("f", 0o644),
        ),
    ] {
        let sb = Sandbox::new();
        let err = sb.assert_refused(&layer.finish(), entry);
        assert!(
            err.to_string()
                .contains("security.capability on an entry that is no regular file"),
            "{entry}: {err}"
        );
        assert!(
            !sb.target().join(entry).exists() || entry == "d/",
            "{entry} was made"
        );
    }
    // On a hard link it is ignored: the link cannot give the inode of its target a capability.
    let sb = Sandbox::new();
    let tar = Layer::new()
        .file("bin/plain", 0o755, b"plain")
        .pax(&[(CAP_RECORD, &NET_RAW_EP[..])])
        .hardlink("bin/alias", "bin/plain")
        .finish();
    sb.apply(&tar).expect("apply");
    assert_eq!(
        xattr(&sb.target().join("bin/alias"), "security.capability"),
        None
    );
    assert_eq!(
        xattr(&sb.target().join("bin/plain"), "security.capability"),
        None
    );
}

#[test]
fn file_capability_never_lands_outside_the_root() {
    let sb = Sandbox::new();
    let tar = Layer::new()
        .pax(&[
            (CAP_RECORD, &NET_RAW_EP[..]),
            ("path", b"../outside/sentinel"),
        ])
        .file("innocent", 0o755, b"pwned")
        .finish();
    let err = sb.assert_refused(&tar, "../outside/sentinel");
    assert!(matches!(err, UnpackError::UnsafePath { .. }), "{err:?}");
    let outside = sb.outside().display().to_string();
    let tar = Layer::new()
        .symlink("esc", &outside)
        .pax(&[(CAP_RECORD, &NET_RAW_EP[..])])
        .file("esc/sentinel", 0o755, b"pwned")
        .finish();
    let err = sb.assert_refused(&tar, "esc/sentinel");
    assert!(matches!(err, UnpackError::Escape { .. }), "{err:?}");
    assert_eq!(
        xattr(&sb.outside().join("sentinel"), "security.capability"),
        None
    );
}

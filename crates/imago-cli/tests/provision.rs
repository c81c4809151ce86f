//! `run` layers (issue 13): provisioning steps run in the sandbox, with the real kernel and
//! both engines. Every test builds its busybox base with imago itself from busybox-static, so
//! they need root, `/bin/busybox`, runc, umoci and skopeo: without them they fail, never skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Imago, Run};

const APPLETS: &[&str] = &[
    "sh", "ls", "cat", "rm", "mv", "mkdir", "touch", "ln", "mknod", "mkfifo", "sleep", "wget",
    "dd", "chmod", "chown", "wc", "head", "grep", "true", "date", "echo", "stat", "id", "ps", "nc",
];

/// A project whose `bb` image is busybox with its applets and an /etc with two files and a
/// directory for the steps to change, plus `app` from the caller.
fn project(app: &str) -> Imago {
    assert!(
        rustix::process::geteuid().is_root(),
        "the provisioning tests need root (they run containers)"
    );
    assert!(
        Path::new("/bin/busybox").is_file(),
        "the provisioning tests need busybox-static (/bin/busybox)"
    );
    let imago = Imago::new();
    write_definition(&imago, app);
    fs::create_dir_all(imago.dir.path().join("src")).unwrap();
    fs::write(imago.dir.path().join("src/input.txt"), "from the context\n").unwrap();
    imago
}

fn write_definition(imago: &Imago, app: &str) {
    let links: Vec<String> = APPLETS
        .iter()
        .map(|a| format!("{{ path = \"/bin/{a}\", target = \"busybox\" }}"))
        .collect();
    let text = format!(
        r#"[image.bb]
[[image.bb.layer]]
copy = [{{ src = "/bin/busybox", dest = "/bin/busybox", outside_context = true, mode = "0755" }}]
symlink = [{}]
file = [
  {{ path = "/etc/old", content = "old\n" }},
  {{ path = "/etc/keep", content = "keep\n" }},
  {{ path = "/etc/change", content = "before\n" }},
  {{ path = "/opt/d/x", content = "x\n" }},
  {{ path = "/opt/gone/y", content = "y\n" }},
  {{ path = "/opt/moved/m", content = "m\n" }},
  {{ path = "/etc/perm", content = "perm\n" }},
]

{app}
"#,
        links.join(", ")
    );
    fs::write(imago.dir.path().join("imago.toml"), text).unwrap();
}

/// An `app` image on `bb` whose one layer is the step `name`: `rest` holds its keys.
fn app_step(name: &str, rest: &str) -> String {
    format!("[image.app]\nfrom = \"bb\"\n[[image.app.layer]]\nname = \"{name}\"\n{rest}")
}

fn build(imago: &Imago, extra: &[&str]) -> Run {
    let mut args = vec!["build"];
    args.extend_from_slice(extra);
    imago.run(&args)
}

/// The entries of a layer blob: path -> (type, mode, uid:gid, size, link target).
fn layer_entries(imago: &Imago, image: &str, index: usize) -> BTreeMap<String, String> {
    let inspect = imago.run(&["--json", "inspect", image]).ok().json();
    let layers = inspect["layers"].as_array().unwrap();
    let digest = layers[index]["digest"].as_str().unwrap();
    let hex = digest.trim_start_matches("sha256:");
    let bytes = fs::read(imago.home.join("store/blobs/sha256").join(hex)).unwrap();
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut tar_bytes)
        .unwrap();
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut out = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => "dir",
            tar::EntryType::Regular => "file",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            _ => "other",
        };
        let link = entry
            .link_name()
            .unwrap()
            .map(|l| format!(" -> {}", l.display()))
            .unwrap_or_default();
        out.insert(
            entry.path().unwrap().display().to_string(),
            format!(
                "{kind} {:o} {}:{} {} mtime={}{link}",
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.size().unwrap(),
                h.mtime().unwrap()
            ),
        );
    }
    out
}

/// The digest of the last image built (`build` prints one per line, bases first).
fn digest_of(run: &Run) -> String {
    run.stdout().lines().last().unwrap().to_owned()
}

fn ran(run: &Run, marker: &str) -> bool {
    run.stderr().contains(&format!("| {marker}"))
}

#[test]
fn a_run_layer_holds_exactly_what_the_step_changed() {
    let imago = project(&app_step(
        "step",
        r#"run = """
set -e
echo STEP-RAN
rm /etc/old
touch /etc/keep
echo before > /etc/change.tmp && cat /etc/change.tmp > /etc/change && rm /etc/change.tmp
echo after > /etc/change
echo new > /etc/new
rm -r /opt/d && mkdir /opt/d && echo y > /opt/d/y
rm -r /opt/gone
mkdir -p /srv/empty
echo linked > /srv/a && ln /srv/a /srv/b
ln -s ../etc/new /srv/link
chmod 0750 /srv/empty
chown 7:8 /srv/a
mv /opt/moved /opt/renamed
chmod 0600 /etc/perm
"""
"#,
    ));
    let run = build(&imago, &["--json"]).ok();
    assert!(ran(&run, "STEP-RAN"), "{}", run.stderr());
    let entries = layer_entries(&imago, "app", 1);
    let paths: Vec<&str> = entries.keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        [
            "etc/",
            "etc/.wh.old",
            "etc/change",
            "etc/new",
            "etc/perm",
            "opt/",
            "opt/.wh.gone",
            "opt/.wh.moved",
            "opt/d/",
            "opt/d/.wh..wh..opq",
            "opt/d/y",
            "opt/renamed/",
            "opt/renamed/m",
            "srv/",
            "srv/a",
            "srv/b",
            "srv/empty/",
            "srv/link",
        ],
        "{entries:#?}"
    );
    // Kept: owner and mode; links; mtimes clamped to SOURCE_DATE_EPOCH (0 here).
    assert_eq!(entries["srv/a"], "file 644 7:8 7 mtime=0");
    assert_eq!(entries["srv/b"], "hardlink 644 7:8 0 mtime=0 -> srv/a");
    assert_eq!(entries["srv/empty/"], "dir 750 0:0 0 mtime=0");
    assert_eq!(
        entries["srv/link"],
        "symlink 777 0:0 0 mtime=0 -> ../etc/new"
    );
    assert_eq!(entries["etc/change"], "file 644 0:0 6 mtime=0");
    // A change of mode alone carries the whole file; a renamed directory its whole content.
    assert_eq!(entries["etc/perm"], "file 600 0:0 5 mtime=0");
    assert_eq!(entries["opt/renamed/m"], "file 644 0:0 2 mtime=0");

    // imago and umoci unpack the same tree.
    let ours = imago.dir.path().join("ours");
    imago.run(&["unpack", "app", ours.to_str().unwrap()]).ok();
    let archive = imago.dir.path().join("app.tar");
    imago
        .run(&["export", "app", "-o", archive.to_str().unwrap()])
        .ok();
    let layout = imago.dir.path().join("layout");
    fs::create_dir_all(&layout).unwrap();
    tool(
        "tar",
        &[
            "-xf",
            archive.to_str().unwrap(),
            "-C",
            layout.to_str().unwrap(),
        ],
    );
    let inspected = tool("skopeo", &["inspect", &format!("oci:{}", layout.display())]);
    assert!(inspected.contains("Layers"), "{inspected}");
    let bundle = imago.dir.path().join("umoci-bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:app:latest", layout.display()),
            bundle.to_str().unwrap(),
        ],
    );
    let theirs = bundle.join("rootfs");
    assert_eq!(tree(&ours), tree(&theirs));
    assert!(!ours.join("etc/old").exists());
    assert!(!ours.join("opt/gone").exists());
    assert!(!ours.join("opt/d/x").exists());
    assert_eq!(
        fs::read_to_string(ours.join("etc/change")).unwrap(),
        "after\n"
    );
}

/// Every path below `root` with its type, mode, owner and content.
fn tree(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for item in fs::read_dir(&dir).unwrap() {
            let item = item.unwrap();
            let path = item.path();
            let md = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let what = if md.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else if md.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&path).unwrap().display())
            } else {
                format!("{:?}", blake(&fs::read(&path).unwrap()))
            };
            out.insert(
                rel,
                format!("{what} {:o} {}:{}", md.mode() & 0o7777, md.uid(), md.gid()),
            );
        }
    }
    out
}

fn blake(bytes: &[u8]) -> String {
    imago_oci::Digest::of(bytes).to_string()
}

fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes to `archive` an oci-archive of a one-layer image whose root `fill` makes, packed by
/// umoci (as root: device nodes and owners are kept); `dir` is its scratch space.
fn umoci_archive(dir: &Path, archive: &Path, fill: impl FnOnce(&Path)) {
    let layout = dir.join("L");
    let image = format!("{}:base", layout.display());
    let bundle = dir.join("B");
    fs::create_dir_all(dir).unwrap();
    tool("umoci", &["init", "--layout", layout.to_str().unwrap()]);
    tool("umoci", &["new", "--image", &image]);
    tool(
        "umoci",
        &["unpack", "--image", &image, bundle.to_str().unwrap()],
    );
    fill(&bundle.join("rootfs"));
    tool(
        "umoci",
        &["repack", "--image", &image, bundle.to_str().unwrap()],
    );
    let (archive, layout) = (archive.to_str().unwrap(), layout.to_str().unwrap());
    tool("tar", &["-cf", archive, "-C", layout, "."]);
}

/// Serves one fixed answer on 127.0.0.1 until the test ends.
fn server() -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    let _ =
                        s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nFROM-THE-HOST");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    (port, handle)
}

#[test]
fn the_network_is_off_unless_the_step_asks_for_the_host() {
    let (port, _server) = server();
    let step = |network: &str| {
        app_step(
            "net",
            &format!(
                r#"network = "{network}"
run = "cat /proc/net/dev; echo GET | nc -w 3 127.0.0.1 {port} && grep -c nameserver /etc/resolv.conf"
"#
            ),
        )
    };
    let imago = project(&step("none"));
    let err = build(&imago, &[]).fails();
    assert!(err.contains("failed with exit code"), "{err}");
    // Only lo in the step's namespace.
    let interfaces: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("app/net | "))
        .filter_map(|l| l.trim_start().split_once(':'))
        .filter(|(name, counts)| {
            !name.contains(' ')
                && counts
                    .trim_start()
                    .starts_with(|c: char| c.is_ascii_digit())
        })
        .map(|(name, _)| name)
        .collect();
    assert_eq!(interfaces, ["lo"], "{err}");
    write_definition(&imago, &step("host"));
    let run = build(&imago, &[]).ok();
    assert!(run.stderr().contains("FROM-THE-HOST"), "{}", run.stderr());
    // The host's resolver configuration is lent to the step, and not kept in the layer.
    let entries = layer_entries(&imago, "app", 1);
    assert!(entries.is_empty(), "{entries:#?}");
}

#[test]
fn the_host_is_invisible_and_mounts_are_what_they_say() {
    let marker = tempfile::NamedTempFile::new().unwrap();
    let imago = project(&app_step(
        "mounts",
        &format!(
            r#"run = """
test ! -e {marker}
echo procs=$(ls /proc | grep -c '^[0-9]')
cat /src/input.txt
if touch /src/written 2>/dev/null; then echo BIND-WRITABLE; fi
echo run >> /cache/log
echo cache-lines=$(cat /cache/log | wc -l)
echo scratch > /scratch/file
"""
mounts = [
  {{ type = "bind", src = "src", dest = "/src" }},
  {{ type = "cache", id = "c1", dest = "/cache" }},
  {{ type = "tmpfs", dest = "/scratch" }},
]
"#,
            marker = marker.path().display()
        ),
    ));
    let run = build(&imago, &[]).ok();
    let err = run.stderr();
    assert!(err.contains("from the context"), "{err}");
    assert!(!err.contains("BIND-WRITABLE"), "{err}");
    assert!(err.contains("cache-lines=1"), "{err}");
    // The step's shell, its subshell and ls: never the host's processes.
    let procs: usize = err
        .lines()
        .find_map(|l| l.split("procs=").nth(1))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(procs <= 4, "{err}");
    let entries = layer_entries(&imago, "app", 1);
    assert!(
        entries.is_empty(),
        "mounts leaked into the layer: {entries:#?}"
    );
    assert!(!imago.dir.path().join("src/written").exists());
    // The cache mount persists: a forced rerun sees the first run's line.
    let run = build(&imago, &["--no-cache"]).ok();
    assert!(run.stderr().contains("cache-lines=2"), "{}", run.stderr());
}

#[test]
fn a_failing_step_names_its_exit_code_and_stores_nothing() {
    let imago = project(&app_step(
        "broken",
        r#"run = "echo some output; echo the reason >&2; exit 7"
"#,
    ));
    build(&imago, &["bb"]).ok();
    let blobs =
        |home: &Path| fs::read_dir(home.join("store/blobs/sha256")).map_or(0, |d| d.count());
    let before = blobs(&imago.home);
    let err = build(&imago, &["app"]).fails();
    assert!(err.contains("image app, layer broken"), "{err}");
    assert!(err.contains("exit code 7"), "{err}");
    assert!(err.contains("the reason"), "{err}");
    assert_eq!(blobs(&imago.home), before, "a failed step stored blobs");
    let images = imago.run(&["images"]).ok().stdout();
    assert!(!images.contains("app"), "{images}");
    // Several commands run in order in one step; the first failure ends it.
    write_definition(
        &imago,
        &app_step(
            "many",
            r#"run = [["/bin/sh", "-c", "echo FIRST"], ["/bin/sh", "-c", "exit 3"], ["/bin/sh", "-c", "echo NEVER"]]
"#,
        ),
    );
    let err = build(&imago, &["app", "--runtime", "runc"]).fails();
    assert!(
        err.contains("FIRST") && err.contains("exit code 3"),
        "{err}"
    );
    assert!(!err.contains("NEVER"), "{err}");
    assert_eq!(blobs(&imago.home), before, "a failed step stored blobs");
}

#[test]
fn a_step_is_killed_at_its_timeout_and_its_memory_limit() {
    let imago = project(&app_step(
        "slow",
        r#"timeout = "1s"
run = "sleep 60"
"#,
    ));
    for runtime in ["embedded", "runc"] {
        let start = Instant::now();
        let err = build(&imago, &["--runtime", runtime]).fails();
        assert!(err.contains("killed at its timeout"), "{runtime}: {err}");
        // Killed at 1 s, not when the step's `sleep 60` ends: well under 60 s however loaded.
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "{runtime}: {err}"
        );
    }
    write_definition(
        &imago,
        &app_step(
            "hungry",
            r#"memory = "16M"
run = "dd if=/dev/zero of=/dev/null bs=64M count=1"
"#,
        ),
    );
    let err = build(&imago, &[]).fails();
    assert!(err.contains("exit code 137"), "{err}");
}

#[test]
fn device_files_are_refused_and_fifos_dropped_with_a_warning() {
    let imago = project(&app_step(
        "fifo",
        r#"run = "mkfifo /pipe && echo kept > /kept"
"#,
    ));
    let run = build(&imago, &[]).ok();
    assert!(run.stderr().contains("/pipe is a fifo"), "{}", run.stderr());
    let entries = layer_entries(&imago, "app", 1);
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["kept"]);
    write_definition(
        &imago,
        &app_step(
            "dev",
            r#"run = "mknod /null2 c 1 3"
"#,
        ),
    );
    let err = build(&imago, &[]).fails();
    assert!(err.contains("device file /null2"), "{err}");
}

/// Bases made by mmdebstrap (and some docker images) ship `/dev/*` nodes: a step on such a base
/// runs, its root leaves the nodes out with a warning, and the layer holds only the step's work.
#[test]
fn a_base_with_device_nodes_runs_steps_without_them() {
    let imago = project("");
    let archive = imago.dir.path().join("devbase.tar");
    umoci_archive(&imago.dir.path().join("devbase"), &archive, |rootfs| {
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "test", "echo"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        fs::create_dir_all(rootfs.join("dev")).unwrap();
        fs::create_dir_all(rootfs.join("lib/udev")).unwrap();
        for (path, kind, major, minor) in [
            ("dev/null", "c", "1", "3"),
            ("dev/sda", "b", "8", "0"),
            ("lib/udev/zero", "c", "1", "5"),
        ] {
            let node = rootfs.join(path);
            tool("mknod", &[node.to_str().unwrap(), kind, major, minor]);
        }
    });
    write_definition(
        &imago,
        r#"[image.app]
from = "oci-archive:devbase.tar"
[[image.app.layer]]
name = "s"
run = "test -c /dev/null && test ! -e /lib/udev/zero && echo STEP-RAN && echo ok > /ok"
"#,
    );
    let run = build(&imago, &["app"]).ok();
    let err = run.stderr();
    assert!(ran(&run, "STEP-RAN"), "{err}");
    assert!(
        err.contains("device files, left out of the step's root"),
        "{err}"
    );
    for path in ["/dev/null", "/dev/sda", "/lib/udev/zero"] {
        assert!(err.contains(path), "{path}: {err}");
    }
    let entries = layer_entries(&imago, "app", 1);
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["ok"], "{entries:#?}");
    // The base's layers themselves are kept as they are: the image still has its nodes.
    let base_entries = layer_entries(&imago, "app", 0);
    assert!(base_entries.contains_key("dev/null"), "{base_entries:#?}");
}

/// The unpacked step roots (`build-work/chains/<hex>`), not counting lock files and scratch.
fn chains(imago: &Imago) -> Vec<String> {
    let dir = imago.home.join("build-work/chains");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.') && !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn gc_removes_step_roots_no_image_reaches_and_never_one_a_running_build_uses() {
    let imago = project(&app_step(
        "slow",
        r#"run = "echo STEP-STARTED; sleep 4; echo done > /done"
"#,
    ));
    build(&imago, &["bb"]).ok();
    let mut child = imago
        .cmd()
        .args(["build", "app"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (started_tx, started) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        let mut told = false;
        loop {
            let n = stderr.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if !told && String::from_utf8_lossy(&all).contains("| STEP-STARTED") {
                started_tx.send(()).unwrap();
                told = true;
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    started
        .recv_timeout(Duration::from_secs(30))
        .expect("the step never started");
    // While the step runs, no name reaches its root any more: gc must still keep it.
    imago.run(&["rmi", "bb"]).ok();
    assert_eq!(chains(&imago).len(), 1);
    let gc = imago.run(&["--json", "gc"]).ok().json();
    let status = child.wait().unwrap();
    let build_err = reader.join().unwrap();
    assert!(status.success(), "the build failed beside gc: {build_err}");
    assert_eq!(gc["build"]["chains_in_use"], 1, "{gc}");
    assert_eq!(gc["build"]["chains_removed"], 0, "{gc}");
    assert_eq!(chains(&imago).len(), 1);
    let entries = layer_entries(&imago, "app", 1);
    assert_eq!(entries.keys().collect::<Vec<_>>(), ["done"]);

    // app reaches the root (its first layer is bb's): kept. Without any name: removed, with
    // the step directories and the cache records of the deleted blobs.
    let gc = imago.run(&["--json", "gc"]).ok().json();
    assert_eq!(gc["build"]["chains_removed"], 0, "{gc}");
    assert_eq!(chains(&imago).len(), 1);
    imago.run(&["rmi", "app"]).ok();
    let gc = imago.run(&["--json", "gc"]).ok().json();
    assert_eq!(gc["build"]["chains_removed"], 1, "{gc}");
    assert!(
        gc["build"]["cache_records_removed"].as_u64().unwrap() >= 1,
        "{gc}"
    );
    assert!(chains(&imago).is_empty());
    let steps = imago.home.join("build-work/steps");
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::read_dir(&steps).unwrap().next().is_some() {
        // A finished step's detached `rm -rf` may still be at work; gc removes what it left.
        assert!(Instant::now() < deadline, "step directories stay behind");
        imago.run(&["gc"]).ok();
        std::thread::sleep(Duration::from_millis(100));
    }
    // The next build unpacks the root again and gives the same image.
    let again = build(&imago, &[]).ok();
    assert!(ran(&again, "STEP-STARTED"), "{}", again.stderr());
    assert_eq!(chains(&imago).len(), 1);

    // --keep-chains: of the roots images reach, only the most recently used ones stay.
    write_definition(
        &imago,
        &app_step(
            "slow",
            r#"run = "echo done > /done"
[[image.app.layer]]
name = "second"
run = "echo second > /second"
"#,
        ),
    );
    build(&imago, &[]).ok();
    assert_eq!(chains(&imago).len(), 2);
    let gc = imago
        .run(&["--json", "gc", "--keep-chains", "1"])
        .ok()
        .json();
    assert_eq!(gc["build"]["chains_removed"], 1, "{gc}");
    assert_eq!(chains(&imago).len(), 1);
}

#[test]
fn the_cache_reruns_a_step_exactly_when_an_input_changes() {
    let step = |extra: &str, command: &str| {
        app_step(
            "s",
            &format!(
                r#"run = "echo STEP-RAN; {command}"
{extra}
"#
            ),
        )
    };
    let base = r#"env = { A = "1" }
workdir = "/"
user = "0:0"
network = "none"
mounts = [{ type = "bind", src = "src", dest = "/src" }]"#;
    let imago = project(&step(base, "cat /src/input.txt > /out"));
    let first = build(&imago, &[]).ok();
    assert!(ran(&first, "STEP-RAN"));
    // A no-op rebuild runs no step and spends under 150 ms of CPU (best of three). CPU time, not
    // wall time: a loaded host (CI runs every test binary side by side on 2 cores) stretches
    // the wall time of any command past 150 ms; a rebuild that hashes or unpacks what it need
    // not still spends the CPU whatever the load.
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let (again, cpu) = common::run_with_cpu_time(imago.cmd().arg("build"));
        best = best.min(cpu);
        assert!(!ran(&again, "STEP-RAN"), "{}", again.stderr());
        assert_eq!(digest_of(&first), digest_of(&again));
    }
    assert!(best < Duration::from_millis(150), "{best:?} of CPU");
    let variants = [
        base.replace("A = \"1\"", "A = \"2\""),
        base.replace("workdir = \"/\"", "workdir = \"/etc\""),
        base.replace("user = \"0:0\"", "user = \"0:1\""),
        base.replace("network = \"none\"", "network = \"host\""),
        base.replace("\"/src\" }]", "\"/src2\" }]"),
    ];
    for variant in &variants {
        write_definition(&imago, &step(variant, "cat /src*/input.txt > /out"));
        let run = build(&imago, &[]).ok();
        assert!(ran(&run, "STEP-RAN"), "no rerun for {variant}");
        let run = build(&imago, &[]).ok();
        assert!(
            !ran(&run, "STEP-RAN"),
            "rerun without a change for {variant}"
        );
    }
    write_definition(&imago, &step(base, "cat /src/input.txt > /out"));
    let run = build(&imago, &[]).ok();
    assert!(
        !ran(&run, "STEP-RAN"),
        "the first definition's layer is cached"
    );
    // The content of a bind mount is an input.
    fs::write(imago.dir.path().join("src/input.txt"), "changed\n").unwrap();
    let run = build(&imago, &[]).ok();
    assert!(ran(&run, "STEP-RAN"));
    assert_ne!(digest_of(&run), digest_of(&first));
    // --no-cache forces it.
    let run = build(&imago, &["--no-cache"]).ok();
    assert!(ran(&run, "STEP-RAN"));
}

#[test]
fn the_same_step_gives_the_same_digest_in_another_home_cold_and_with_runc() {
    let app = r#"[image.app]
from = "bb"
[[image.app.layer]]
name = "s"
run = "mkdir -p /usr/share/x && echo data > /usr/share/x/f && ln -s f /usr/share/x/l && touch /etc/keep && rm -r /etc/old /opt/gone"
"#;
    let one = project(app);
    let first = digest_of(&build(&one, &[]).ok());
    let cold = digest_of(&build(&one, &["--no-cache"]).ok());
    assert_eq!(first, cold);
    let two = project(app);
    // Another umask: the step's files are made by the step, not by the umask of the build.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 077 && exec \"$0\" --home {} build --runtime runc",
            two.home.display()
        ))
        .arg(env!("CARGO_BIN_EXE_imago"))
        .current_dir(two.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().last().unwrap(), first);
    // Without overlayfs (a full copy of the root, compared in full): the same layer.
    let three = project(app);
    let mut cmd = three.cmd();
    cmd.env("IMAGO_SANDBOX_COPY", "1").arg("build");
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().last().unwrap(), first);
    let entries = layer_entries(&three, "app", 1);
    assert!(entries.contains_key("etc/.wh.old"), "{entries:#?}");
    assert!(entries.contains_key("opt/.wh.gone"), "{entries:#?}");
    assert!(!entries.contains_key("etc/keep"), "{entries:#?}");
}

#[test]
fn check_reruns_every_step_and_names_the_paths_that_differ() {
    let imago = project(&app_step(
        "stable",
        r#"run = "echo same > /same"
[[image.app.layer]]
name = "random"
network = "host"
run = "echo same > /same2 && head -c 16 /dev/urandom > /random && echo STEP-RAN"
"#,
    ));
    build(&imago, &[]).ok();
    let err = build(&imago, &["--check"]).fails();
    assert!(
        ran_text(&err, "STEP-RAN"),
        "--check did not rerun the step: {err}"
    );
    assert!(err.contains("app/stable: run step reproduced"), "{err}");
    assert!(
        err.contains("app/random: run step not reproducible (not hermetic: network = \"host\"): /random: content"),
        "{err}"
    );
    assert!(!err.contains("/same2"), "{err}");
    assert!(err.contains("check failed for app"), "{err}");
}

fn ran_text(stderr: &str, marker: &str) -> bool {
    stderr.contains(&format!("| {marker}"))
}

#[test]
fn build_args_reach_the_step_and_its_cache_key_and_a_filter_forces_a_rerun() {
    let imago = project(
        r#"[image.app]
from = "bb"
args = { GREETING = "hello" }
[[image.app.layer]]
name = "s"
run = "echo STEP-RAN $GREETING $SOURCE_DATE_EPOCH; echo $GREETING > /greeting"
"#,
    );
    let run = build(&imago, &[]).ok();
    assert!(ran(&run, "STEP-RAN hello 0"), "{}", run.stderr());
    assert!(!ran(&build(&imago, &[]).ok(), "STEP-RAN"));
    let run = build(&imago, &["--arg", "GREETING=hi"]).ok();
    assert!(ran(&run, "STEP-RAN hi"), "{}", run.stderr());
    assert!(!ran(
        &build(&imago, &["--arg", "GREETING=hi"]).ok(),
        "STEP-RAN"
    ));
    assert!(ran(
        &build(&imago, &["--no-cache-filter", "s"]).ok(),
        "STEP-RAN hello"
    ));
    let err = build(&imago, &["--arg", "NOPE=1"]).fails();
    assert!(err.contains("--arg NOPE is not declared"), "{err}");
    // The image's configuration does not carry build arguments.
    let config = imago.run(&["--json", "inspect", "app"]).ok().stdout();
    assert!(!config.contains("GREETING"), "{config}");
}

const DEBIAN_EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/debian-apt");

/// Stops what a deployment test started, however it ends.
struct Deployed<'a>(&'a Imago);

impl Drop for Deployed<'_> {
    fn drop(&mut self) {
        let _ = self.0.cmd().args(["destroy", "debian-web"]).output();
        let _ = self.0.cmd().args(["serve", "--stop"]).output();
    }
}

/// The issue's real-world image: a Debian base made here with mmdebstrap from the Debian
/// mirror, `apt-get install` in a host-network step, an application layer, deployed as a
/// service that answers. `--check` names what makes a naive apt step non-reproducible, and the
/// example (cache mounts, deleted logs) reproduces. Needs the mirror and about 3 minutes:
/// `scripts/test` runs it with `--ignored`.
#[test]
#[ignore = "needs the Debian mirror and mmdebstrap; scripts/test runs it"]
fn a_debian_image_with_an_apt_step_is_checked_made_reproducible_and_deployed() {
    assert!(rustix::process::geteuid().is_root(), "needs root");
    let imago = Imago::new();
    let dir = imago.dir.path().join("debian");
    fs::create_dir_all(&dir).unwrap();
    let rootfs = dir.join("rootfs.tar");
    let out = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet", "bookworm"])
        .arg(&rootfs)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("mmdebstrap (Debian package mmdebstrap) must be installed");
    assert!(
        out.status.success(),
        "mmdebstrap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The image is run as a service below, and the runtime's rootfs still refuses device
    // nodes: they stay out of this base (a step alone would take them, see
    // a_base_with_device_nodes_runs_steps_without_them).
    umoci_archive(&dir, &dir.join("debian-base.tar"), |root| {
        let (tree, root) = (rootfs.to_str().unwrap(), root.to_str().unwrap());
        tool("tar", &["-xf", tree, "-C", root, "--exclude=./dev/*"]);
    });
    let example = fs::read_to_string(Path::new(DEBIAN_EXAMPLE).join("imago.toml")).unwrap();
    let file = dir.join("imago.toml");
    let file_arg = file.to_str().unwrap().to_owned();
    let build = |extra: &[&str]| {
        let mut args = vec!["build", "-f", file_arg.as_str()];
        args.extend_from_slice(extra);
        imago.run(&args)
    };

    // The naive step: --check names apt's caches and the logs.
    let naive = example
        .replace("  { type = \"cache\", id = \"apt-archives\", dest = \"/var/cache/apt\" },\n", "")
        .replace("  { type = \"cache\", id = \"apt-lists\", dest = \"/var/lib/apt/lists\" },\n", "")
        .replace(
            "rm -rf /var/log/apt /var/log/dpkg.log /var/log/alternatives.log /var/cache/ldconfig/aux-cache \\\n  /var/lib/dpkg/*-old /var/cache/debconf/*-old\n",
            "",
        );
    assert_ne!(naive, example);
    fs::write(&file, &naive).unwrap();
    build(&[]).ok();
    let err = build(&["--check"]).fails();
    assert!(
        err.contains("debian-web/busybox: run step not reproducible (not hermetic"),
        "{err}"
    );
    assert!(err.contains("/var/log/"), "{err}");

    // The example reproduces, and deploys.
    let lease = common::lease_port();
    fs::write(
        &file,
        format!(
            "{example}\n[service.debian-web]\nimage = \"debian-web\"\nport = {}\ntarget_port = 8080\n",
            lease.port
        ),
    )
    .unwrap();
    build(&[]).ok();
    let checked = build(&["--check"]).ok();
    assert!(
        checked
            .stderr()
            .contains("debian-web/busybox: run step reproduced (not hermetic"),
        "{}",
        checked.stderr()
    );
    let _deployed = Deployed(&imago);
    imago.run(&["apply", "-f", &file_arg]).ok();
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        match http_get(lease.port) {
            Ok(body) => break body,
            Err(e) if Instant::now() > deadline => panic!("the service never answered: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert_eq!(answer, "hello from debian\n");
}

fn http_get(port: u16) -> Result<String, String> {
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    if !response.starts_with("HTTP/1.0 200") && !response.starts_with("HTTP/1.1 200") {
        return Err(format!("bad response: {:?}", response.lines().next()));
    }
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

//! Launch benchmarks (run as root, release build):
//! `cargo bench -p imago-cli --bench instances` (as root; `-- make-bench-home` builds a home for profiling)
//! Prints one JSON document with medians; the numbers go into BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{File, Imago, make_image};

const RUNS: usize = 30;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn busybox_files(busybox: &[u8]) -> Vec<File<'_>> {
    vec![File {
        path: "bin/busybox",
        content: busybox,
        mode: 0o755,
    }]
}

/// Median of `imago run` (command start to its exit, i.e. the container's process started).
fn imago_launch(imago: &Imago, image: &str, extra: &[&str]) -> f64 {
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let mut args = vec!["run", "-q"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[image, "--", "/bin/busybox", "sleep", "1000"]);
        let start = Instant::now();
        let out = imago.cmd().args(&args).output().unwrap();
        times.push(start.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        imago.run(&["stop", "--time", "0", &id]).ok();
        imago.run(&["rm", &id]).ok();
    }
    median(times)
}

/// Median of plain `runc run -d` of the bundle imago generated (host network).
fn plain_runc(imago: &Imago, image: &str) -> f64 {
    let id = String::from_utf8_lossy(
        &imago
            .run(&[
                "run",
                "-q",
                "--network",
                "host",
                image,
                "--",
                "/bin/busybox",
                "sleep",
                "1000",
            ])
            .ok()
            .output
            .stdout,
    )
    .trim()
    .to_owned();
    let bundle = imago.dir.path().join("plain-bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let config = std::fs::read(
        imago
            .home
            .join("instances")
            .join(&id)
            .join("bundle/config.json"),
    )
    .unwrap();
    std::fs::write(bundle.join("config.json"), config).unwrap();
    imago.run(&["stop", "--time", "0", &id]).ok();
    imago.run(&["rm", &id]).ok();
    let root = imago.dir.path().join("plain-runc-root");
    let mut times = Vec::new();
    for i in 0..RUNS {
        let cid = format!("plain-{i}");
        let start = Instant::now();
        let st = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg(&cid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        times.push(start.elapsed());
        assert!(st.success());
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["delete", "--force", &cid])
            .status();
    }
    median(times)
}

/// A field (in KiB) of `/proc/<pid>/smaps_rollup`: `Rss`, `Pss` (shared pages divided among
/// their users: the fair per-process share of the imago binary) or `Anonymous` (private heap).
fn smaps_kib(pid: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort();
    v[v.len() / 2]
}

fn launch_benchmarks() {
    let imago = Imago::new();
    let busybox = std::fs::read("/bin/busybox").unwrap();
    make_image(&imago.store(), "busybox:bench", &busybox_files(&busybox));
    let image = "busybox:bench";
    // Warm the rootfs cache.
    let id = String::from_utf8_lossy(
        &imago
            .run(&["run", "-q", image, "--", "/bin/busybox", "true"])
            .ok()
            .output
            .stdout,
    )
    .trim()
    .to_owned();
    std::thread::sleep(Duration::from_millis(100));
    imago.run(&["rm", "--force", &id]).ok();

    let embedded_host = imago_launch(&imago, image, &["--network", "host"]);
    let embedded_private = imago_launch(&imago, image, &[]);
    let runc_host = imago_launch(&imago, image, &["--runtime", "runc", "--network", "host"]);
    let runc_private = imago_launch(&imago, image, &["--runtime", "runc"]);
    let plain = plain_runc(&imago, image);

    // First launch of a new 100 MB digest (unpack included): incompressible content.
    let mut big = vec![0u8; 100 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let mut files = busybox_files(&busybox);
    files.push(File {
        path: "data/blob",
        content: &big,
        mode: 0o644,
    });
    make_image(&imago.store(), "big:bench", &files);
    let start = Instant::now();
    let out = imago
        .run(&[
            "run",
            "-q",
            "--network",
            "host",
            "big:bench",
            "--",
            "/bin/busybox",
            "true",
        ])
        .ok();
    let first_launch_100mb = start.elapsed().as_secs_f64() * 1000.0;
    let id = out.stdout().trim().to_owned();
    std::thread::sleep(Duration::from_millis(100));
    imago.run(&["rm", "--force", &id]).ok();

    // 50 instances at once: supervisor memory.
    let mut ids = Vec::new();
    for _ in 0..50 {
        let out = imago
            .run(&["run", "-q", image, "--", "/bin/busybox", "sleep", "1000"])
            .ok();
        ids.push(out.stdout().trim().to_owned());
    }
    let list = imago.run(&["ps", "--json"]).ok().json();
    let pids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["supervisor_pid"].to_string())
        .collect();
    let field = |name: &str| {
        pids.iter()
            .map(|p| smaps_kib(p, name))
            .collect::<Vec<u64>>()
    };
    let (rss, pss, anon) = (field("Rss"), field("Pss"), field("Anonymous"));
    for id in &ids {
        imago.run(&["stop", "--time", "0", id]).ok();
        imago.run(&["rm", id]).ok();
    }
    let doc = serde_json::json!({
        "runs": RUNS,
        "launch_ms_median": {
            "imago_embedded_host_network": embedded_host,
            "imago_embedded_private_network": embedded_private,
            "imago_runc_host_network": runc_host,
            "imago_runc_private_network": runc_private,
            "plain_runc_run_d_same_bundle": plain,
        },
        "first_launch_100mb_image_ms": first_launch_100mb,
        "supervisors_50": {
            "instances": pids.len(),
            "rss_kib_median": median_u64(rss.clone()),
            "pss_kib_median": median_u64(pss.clone()),
            "pss_kib_total": pss.iter().sum::<u64>(),
            "anonymous_kib_median": median_u64(anon),
        },
    });
    println!("{}", serde_json::to_string_pretty(&doc).unwrap());
}

/// Prepares a home with `busybox:bench` at `$IMAGO_BENCH_HOME`, for profiling by hand.
fn make_bench_home() {
    let Some(home) = std::env::var_os("IMAGO_BENCH_HOME") else {
        return;
    };
    let store = imago_store::Store::open(&std::path::Path::new(&home).join("store")).unwrap();
    let busybox = std::fs::read("/bin/busybox").unwrap();
    make_image(&store, "busybox:bench", &busybox_files(&busybox));
}

fn main() {
    if std::env::args().any(|a| a == "make-bench-home") {
        make_bench_home();
    } else {
        launch_benchmarks();
    }
}

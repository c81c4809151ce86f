//! Launch benchmarks (run as root, release build):
//! `cargo bench -p imago-cli --bench instances` (as root; `-- make-bench-home` builds a home for profiling)
//! Prints one JSON document with medians; the numbers go into BENCHMARKS.md.
//! `IMAGO_BENCH_BASELINE=/path/to/an/older/imago` also times that binary's `run` (e.g. a build
//! of the previous commit), in the same rounds as the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
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

/// Medians of several launchers, run in rounds (each once per round) so that every median saw
/// the same machine load: on a shared 2-core machine the load changes within seconds.
fn interleaved(launchers: &mut [&mut dyn FnMut() -> Duration]) -> Vec<f64> {
    let mut times = vec![Vec::new(); launchers.len()];
    for _ in 0..RUNS {
        for (launch, t) in launchers.iter_mut().zip(times.iter_mut()) {
            t.push(launch());
        }
    }
    times.into_iter().map(median).collect()
}

/// Times one `imago run` (command start to its exit, i.e. the container's program started)
/// of `program` (this build when `None`), then stops and removes the instance.
fn imago_launch(imago: &Imago, program: Option<&Path>, image: &str, extra: &[&str]) -> Duration {
    let mut cmd = match program {
        None => imago.cmd(),
        Some(p) => {
            let mut cmd = Command::new(p);
            cmd.arg("--home")
                .arg(&imago.home)
                .current_dir(imago.dir.path())
                .env_remove("IMAGO_HOME");
            cmd
        }
    };
    cmd.args(["run", "-q"])
        .args(extra)
        .args([image, "--", "/bin/busybox", "sleep", "1000"]);
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    imago.run(&["stop", "--time", "0", &id]).ok();
    imago.run(&["rm", &id]).ok();
    elapsed
}

/// A copy of the bundle imago generates for a host-network instance, for plain runc.
fn plain_bundle(imago: &Imago, image: &str) -> PathBuf {
    let out = imago
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
        .ok();
    let id = out.stdout().trim().to_owned();
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
    bundle
}

/// Times one plain `runc run -d` of `bundle`, then deletes the container.
fn plain_runc(root: &Path, bundle: &Path, cid: &str) -> Duration {
    let start = Instant::now();
    let st = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["run", "-d", "--bundle"])
        .arg(bundle)
        .arg(cid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let elapsed = start.elapsed();
    assert!(st.success());
    let _ = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["delete", "--force", cid])
        .status();
    elapsed
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

    let baseline = std::env::var_os("IMAGO_BENCH_BASELINE").map(PathBuf::from);
    let base = baseline.as_deref();
    let bundle = plain_bundle(&imago, image);
    let runc_root = imago.dir.path().join("plain-runc-root");
    let host = ["--network", "host"];
    let runc_host = ["--runtime", "runc", "--network", "host"];
    let mut round = 0;
    let host_medians = interleaved(&mut [
        &mut || imago_launch(&imago, None, image, &host),
        &mut || {
            round += 1;
            plain_runc(&runc_root, &bundle, &format!("plain-{round}"))
        },
        &mut || imago_launch(&imago, None, image, &runc_host),
        &mut || {
            base.map_or(Duration::ZERO, |b| {
                imago_launch(&imago, Some(b), image, &host)
            })
        },
    ]);
    let private_medians = interleaved(&mut [
        &mut || imago_launch(&imago, None, image, &[]),
        &mut || imago_launch(&imago, None, image, &["--runtime", "runc"]),
        &mut || {
            base.map_or(Duration::ZERO, |b| {
                imago_launch(&imago, Some(b), image, &[])
            })
        },
    ]);
    let [embedded_host, plain, runc_host, baseline_host] = host_medians[..] else {
        unreachable!()
    };
    let [embedded_private, runc_private, baseline_private] = private_medians[..] else {
        unreachable!()
    };
    let baseline_host = base.map(|_| baseline_host);
    let baseline_private = base.map(|_| baseline_private);

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
            "baseline_embedded_host_network": baseline_host,
            "baseline_embedded_private_network": baseline_private,
        },
        "baseline": baseline.map(|p| p.display().to_string()),
        "loadavg_after": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
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

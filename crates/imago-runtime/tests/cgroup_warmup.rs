//! `supervisor::warm_cgroup_lock`, the fork at the top of `imago run`: while it runs, a
//! `cgroup.procs` write (what the engine does for every container) must not wait an RCU grace
//! period; it must leave no zombie (this host's PID 1 reaps nothing), must not move its caller,
//! and must end by itself if its launcher never stops it (killed with -9). A multi-threaded
//! launcher gets the shared warm-up thread instead, with the same effect. A test binary without
//! libtest (`harness = false`), because libtest runs every test on a thread of its own and the
//! warm-up forks only a single-threaded process.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// fork(2) for the launcher killed with -9 below: this test process is single-threaded.
#![allow(unsafe_code)]

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use imago_runtime::supervisor::{
    CGROUP_WARMUP_LIMIT, CgroupLockWarmup, SharedCgroupWarmup, single_threaded, warm_cgroup_lock,
};
use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

/// The children of this process that are zombies.
fn zombie_children() -> Vec<String> {
    let me = std::process::id().to_string();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .collect();
            fields[0] == "Z" && fields[1] == me
        })
        .collect()
}

/// This process's cgroup2 `cgroup.procs`, if there is one (then, as root, the child's write of
/// `0` into it succeeds).
fn own_cgroup2_procs(cgroups: &str) -> Option<PathBuf> {
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(|root| {
            Path::new(root)
                .join(own.trim_start_matches('/'))
                .join("cgroup.procs")
        })
        .find(|procs| procs.is_file())
}

/// Median time of `n` writes of `0` into `procs` (this process moved to where it is, as the
/// engine moves a container's init), `gap` apart: longer than a grace period, so that without
/// a warm-up each would find the kernel's rcu_sync idle again.
fn median_procs_write(procs: &Path, n: usize, gap: Duration) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            std::thread::sleep(gap);
            let start = Instant::now();
            fs::File::options()
                .write(true)
                .open(procs)
                .unwrap()
                .write_all(b"0")
                .unwrap();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[n / 2]
}

fn still_running(warmup: &CgroupLockWarmup) -> bool {
    let child = warmup.pid().unwrap();
    waitpid(child, Some(WaitPidFlag::WNOHANG)) == Ok(WaitStatus::StillAlive)
}

fn main() {
    assert!(single_threaded(), "the test process has other threads");
    let cgroups = fs::read_to_string("/proc/self/cgroup").unwrap();

    // The test needs the cgroup2 tree (hybrid or pure v2) and root, as CI has: say so loudly.
    let procs = own_cgroup2_procs(&cgroups).expect("no cgroup2 cgroup.procs for this process");

    let warmup = warm_cgroup_lock();
    let child = warmup.pid().expect("a single-threaded caller forks");
    // While the warm-up runs, writes into cgroup.procs 30 ms apart (several grace periods) do
    // not wait for one. Untuned, a lone writer waits 5-20 ms here; tuned (favordynmods) every
    // write is fast and this holds trivially.
    let warm = median_procs_write(&procs, 15, Duration::from_millis(30));
    assert!(
        still_running(&warmup),
        "the warm-up stopped before it was told to"
    );
    assert_eq!(
        warmup.finish(),
        Some(true),
        "the child's writes into its cgroup.procs"
    );
    let cold = median_procs_write(&procs, 15, Duration::from_millis(30));
    println!(
        "cgroup.procs write, median of 15: {:.2} ms with the warm-up, {:.2} ms without",
        warm.as_secs_f64() * 1000.0,
        cold.as_secs_f64() * 1000.0
    );
    // Fast in absolute terms, or (under emulation, in the cgroup2 VM, where every syscall is
    // slow) far faster than the same writes without it, which wait a grace period each.
    assert!(
        warm < Duration::from_micros(2500) || warm * 4 < cold,
        "writes waited with the warm-up running: median {warm:?} (without: {cold:?})"
    );
    assert_eq!(
        waitpid(child, Some(WaitPidFlag::WNOHANG)),
        Err(Errno::ECHILD),
        "the child was not reaped"
    );

    // Dropped unfinished (a launch that failed early): reaped all the same.
    let dropped = warm_cgroup_lock();
    let child = dropped.pid().expect("a single-threaded caller forks");
    drop(dropped);
    assert_eq!(
        waitpid(child, Some(WaitPidFlag::WNOHANG)),
        Err(Errno::ECHILD)
    );
    assert!(zombie_children().is_empty(), "{:?}", zombie_children());
    assert_eq!(fs::read_to_string("/proc/self/cgroup").unwrap(), cgroups);

    // Its launcher killed with -9 (`imago run` killed mid-launch): the warm-up dies with it.
    // This process becomes the subreaper of the orphan, so that it can reap it here.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let (read, write) = nix::unistd::pipe().unwrap();
    // SAFETY: this process is single-threaded (asserted at the top), so the child is whole.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let warmup = warm_cgroup_lock();
            let pid = warmup.pid().map_or(0, |p| p.as_raw());
            // Time for the warm-up to arm its parent-death signal: otherwise it would find
            // its launcher gone and end at once, which this does not test.
            std::thread::sleep(Duration::from_millis(100));
            nix::unistd::write(&write, &pid.to_ne_bytes()).unwrap();
            std::thread::sleep(Duration::from_secs(10));
            std::process::exit(0);
        }
        nix::unistd::ForkResult::Parent { child: launcher } => {
            drop(write);
            let mut pid = [0u8; 4];
            nix::unistd::read(read.as_raw_fd(), &mut pid).unwrap();
            let keeper = nix::unistd::Pid::from_raw(i32::from_ne_bytes(pid));
            assert!(keeper.as_raw() > 0, "the launcher forked no warm-up");
            nix::sys::signal::kill(launcher, nix::sys::signal::Signal::SIGKILL).unwrap();
            let killed = Instant::now();
            waitpid(launcher, None).unwrap();
            assert_eq!(
                waitpid(keeper, None).unwrap(),
                WaitStatus::Signaled(keeper, nix::sys::signal::Signal::SIGKILL, false),
                "the orphaned warm-up did not die with its launcher"
            );
            // Killed by its parent-death signal (above), not ended at its own limit (exit 0
            // after CGROUP_WARMUP_LIMIT): what tells the two apart. A bound of 500 ms was a
            // loaded host's to overrun.
            assert!(
                killed.elapsed() < CGROUP_WARMUP_LIMIT,
                "the orphaned warm-up lived on for {:?}",
                killed.elapsed()
            );
        }
    }
    nix::sys::prctl::set_child_subreaper(false).unwrap();

    // Never stopped, its launcher alive (a launch that forgot it): it ends by itself at its limit.
    let forgotten = warm_cgroup_lock();
    let child = forgotten.pid().expect("a single-threaded caller forks");
    std::mem::forget(forgotten);
    // Polled up to 30 s past its limit (a loaded host may run it late; a fixed 500 ms was a
    // loaded host's to overrun): one that never ends is what this catches.
    let until = Instant::now() + CGROUP_WARMUP_LIMIT + Duration::from_secs(30);
    let mut ended = waitpid(child, Some(WaitPidFlag::WNOHANG));
    while ended == Ok(WaitStatus::StillAlive) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
        ended = waitpid(child, Some(WaitPidFlag::WNOHANG));
    }
    assert_eq!(
        ended,
        Ok(WaitStatus::Exited(child, 0)),
        "the unstopped warm-up did not end at its limit"
    );

    // A multi-threaded caller (the deploy controller) gets no fork at all.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || stopped.recv());
    let warmup = warm_cgroup_lock();
    assert_eq!(warmup.pid(), None);
    assert_eq!(warmup.finish(), None);

    // It gets a thread instead, shared by the launches under way (a controller's wave).
    let shared = SharedCgroupWarmup::default();
    let first = shared.hold();
    let second = shared.hold();
    let warm = median_procs_write(&procs, 15, Duration::from_millis(30));
    assert!(shared.running(), "the warm-up thread ended on its own");
    drop(first);
    assert!(shared.running(), "stopped while a launch still held it");
    drop(second);
    // It ends within one interval of being told; waited for, since a loaded host may not run
    // it for a while (a fixed 50 ms was overrun). Without the stop it would write forever.
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        !shared.running(),
        "the warm-up thread outlived the last launch by 30 s"
    );
    let cold = median_procs_write(&procs, 15, Duration::from_millis(30));
    println!(
        "multi-threaded: cgroup.procs write, median of 15: {:.2} ms with the shared warm-up, {:.2} ms without",
        warm.as_secs_f64() * 1000.0,
        cold.as_secs_f64() * 1000.0
    );
    assert!(
        warm < Duration::from_micros(2500) || warm * 4 < cold,
        "writes waited with the shared warm-up running: median {warm:?} (without: {cold:?})"
    );
    let again = shared.hold();
    std::thread::sleep(Duration::from_millis(10));
    assert!(shared.running(), "the next wave got no warm-up");
    drop(again);
    assert_eq!(fs::read_to_string("/proc/self/cgroup").unwrap(), cgroups);
    drop(stop);
    let _ = other.join();
    println!("cgroup_warmup: ok");
}

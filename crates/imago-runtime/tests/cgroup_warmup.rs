//! `supervisor::warm_cgroup_lock`, the fork at the top of `imago run`: it must leave no zombie
//! (this host's PID 1 reaps nothing) and must not move its caller. A test binary without
//! libtest (`harness = false`), because libtest runs every test on a thread of its own and the
//! warm-up forks only a single-threaded process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use imago_runtime::supervisor::{single_threaded, warm_cgroup_lock};
use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, waitpid};

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

/// Whether this process's cgroup2 `cgroup.procs` exists (then, as root, the child's write of
/// `0` into it succeeds).
fn own_cgroup2_procs_exists(cgroups: &str) -> bool {
    let Some(own) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .any(|root| {
            Path::new(root)
                .join(own.trim_start_matches('/'))
                .join("cgroup.procs")
                .is_file()
        })
}

fn main() {
    assert!(single_threaded(), "the test process has other threads");
    let cgroups = fs::read_to_string("/proc/self/cgroup").unwrap();

    let warmup = warm_cgroup_lock();
    let child = warmup.pid().expect("a single-threaded caller forks");
    assert_eq!(
        warmup.finish(),
        Some(own_cgroup2_procs_exists(&cgroups)),
        "the child's write into its cgroup.procs"
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

    // A multi-threaded caller (the deploy controller) gets no fork at all.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || stopped.recv());
    let warmup = warm_cgroup_lock();
    assert_eq!(warmup.pid(), None);
    assert_eq!(warmup.finish(), None);
    drop(stop);
    let _ = other.join();
    println!("cgroup_warmup: ok");
}

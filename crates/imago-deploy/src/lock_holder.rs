//! Who holds a flock, and whether that process is on its way out.
//!
//! A controller killed with SIGKILL keeps its lock until the kernel has closed its files, which
//! happens some time after `kill` returned. A command that looks in that window finds the lock
//! held and would take the dying process for a running controller, so nothing would start.
//! The kernel says who holds a flock (`/proc/locks`) and whether that process is exiting (a
//! SIGKILL pending, a thread past `exit_signals`, a zombie), which tells the two apart.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The holder of an exclusive flock, as far as `/proc` tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A live process that is not exiting.
    Running(u32),
    /// A process that is exiting or gone: the lock is released once its files are closed.
    Exiting(u32),
    /// No exclusive flock on the file in `/proc/locks` (released meanwhile, or held from
    /// another pid namespace): look again.
    Unknown,
}

/// How many times `/proc/locks` is read before a lock that is not in it counts as
/// [`Holder::Unknown`]: a read can miss a line while other locks come and go (see
/// [`read_proc_locks`]), several reads in a row practically never.
const LOOKS: usize = 4;

/// The holder of the exclusive flock on `file` (whose path is `path`, for errors).
pub fn exclusive_holder(file: &File, path: &Path) -> std::io::Result<Holder> {
    let meta = file.metadata().map_err(|e| with_path(e, path))?;
    let dev = meta.dev();
    for _ in 0..LOOKS {
        let locks = read_proc_locks()?;
        let writer = flock_writer(
            &locks,
            rustix::fs::major(dev),
            rustix::fs::minor(dev),
            meta.ino(),
        );
        match writer {
            Some(pid) if process_exiting(pid) => return Ok(Holder::Exiting(pid)),
            Some(pid) => return Ok(Holder::Running(pid)),
            None => {}
        }
    }
    Ok(Holder::Unknown)
}

/// What one `read(2)` of `/proc/locks` asks for: far more than the page the kernel fills per
/// read, so each read returns a whole page.
const LOCKS_READ: usize = 64 * 1024;

/// The text of `/proc/locks`, read a page at a time.
///
/// The kernel walks its list of locks anew for every `read(2)`, from the line number where
/// the previous read stopped, and new locks go to the front of the list: a lock released in
/// front of the reader's position between two reads moves every later line up by one, and the
/// line that moved across the boundary is in neither read. `read_to_string` reads 32 bytes,
/// then 32, 64, 128...: six boundaries in the first 2 KiB, while processes take and release
/// locks all the time (SQLite's POSIX locks, cargo's flocks). A running controller's lock was
/// missed that way (a look found no holder now and then). One read per page leaves no boundary
/// in the first page's lines, which on most hosts are all of them; a line missed at a later
/// boundary is found by the next look.
fn read_proc_locks() -> std::io::Result<String> {
    let mut file = File::open("/proc/locks")?;
    let mut chunk = vec![0u8; LOCKS_READ];
    let mut text = Vec::new();
    loop {
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn with_path(e: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// The pid of the exclusive (WRITE) FLOCK on inode `ino` of device `major:minor` in the text of
/// `/proc/locks`. Lines of waiters (`->`) are not holders; pid 0 is a holder of another pid
/// namespace, which cannot be looked at.
fn flock_writer(locks: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:2e:56789 0 EOF"
        let mut fields = line.split_whitespace().skip(1);
        let (kind, _, mode, pid, file) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        if kind != "FLOCK" || mode != "WRITE" {
            return None;
        }
        let mut id = file.split(':');
        let (lock_major, lock_minor, lock_ino) = (id.next()?, id.next()?, id.next()?);
        let same = u32::from_str_radix(lock_major, 16).ok()? == major
            && u32::from_str_radix(lock_minor, 16).ok()? == minor
            && lock_ino.parse::<u64>().ok()? == ino;
        let pid = pid.parse::<u32>().ok()?;
        (same && pid != 0).then_some(pid)
    })
}

/// SIGKILL's bit in the pending-signal masks of `/proc/PID/status`.
const SIGKILL_BIT: u64 = 1 << (9 - 1);
/// `PF_EXITING` in the flags field of `/proc/PID/stat`: set by the kernel's `exit_signals`, the
/// first step of a thread's exit, before its files are closed.
const PF_EXITING: u64 = 0x4;

/// Whether process `pid` is gone, a zombie, or on its way out: a SIGKILL (or a fatal signal,
/// which the kernel turns into a SIGKILL on every thread) is pending, or its main thread has
/// begun to exit. `kill` returns once the signal is queued, so this is true from then on.
///
/// Only the main thread (the thread group leader, whose files `/proc/PID/status` and `stat` are)
/// is read: the other threads of a live controller come and go (launch workers, blocking-pool
/// threads), and one of them ending sets `PF_EXITING` on that thread alone, which says nothing of
/// the process. A process killed or calling `exit_group` marks every thread, its leader included.
///
/// A SIGKILL pending on any thread still counts: the kernel queues it on every thread of a
/// killed process, and the main thread, once it has taken its own, shows neither the signal
/// nor `PF_EXITING` for a moment; nothing but a whole-process kill leaves a SIGKILL pending.
fn process_exiting(pid: u32) -> bool {
    let (Ok(status), Ok(stat)) = (
        std::fs::read_to_string(format!("/proc/{pid}/status")),
        std::fs::read_to_string(format!("/proc/{pid}/stat")),
    ) else {
        return true;
    };
    if task_exiting(&status, &stat) {
        return true;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("status"))
            .is_ok_and(|status| sigkill_pending(&status))
    })
}

/// Whether a task's `status` shows a SIGKILL pending (private or shared).
fn sigkill_pending(status: &str) -> bool {
    status.lines().any(|line| {
        line.split_once(':').is_some_and(|(key, value)| {
            matches!(key, "SigPnd" | "ShdPnd")
                && u64::from_str_radix(value.trim(), 16).is_ok_and(|mask| mask & SIGKILL_BIT != 0)
        })
    })
}

fn task_exiting(status: &str, stat: &str) -> bool {
    let dead = status.lines().any(|line| {
        line.split_once(':').is_some_and(|(key, value)| {
            key == "State" && matches!(value.trim().chars().next(), Some('Z' | 'X' | 'x'))
        })
    });
    let killed = dead || sigkill_pending(status);
    // The fields after the command name, which is in parentheses and may hold anything:
    // state, ppid, pgrp, session, tty_nr, tpgid, flags.
    let flags = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(6))
        .and_then(|flags| flags.parse::<u64>().ok());
    killed || flags.is_some_and(|flags| flags & PF_EXITING != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKS: &str = "\
1: FLOCK  ADVISORY  WRITE 4242 00:2e:1234 0 EOF
1: -> FLOCK  ADVISORY  WRITE 999 00:2e:1234 0 EOF
2: FLOCK  ADVISORY  READ 77 00:2e:555 0 EOF
3: POSIX  ADVISORY  WRITE 88 fd:01:555 0 EOF
4: FLOCK  ADVISORY  WRITE 0 fd:01:777 0 EOF
";

    #[test]
    fn the_writer_of_the_inode_is_found_and_waiters_readers_and_posix_locks_are_not() {
        assert_eq!(flock_writer(LOCKS, 0, 0x2e, 1234), Some(4242));
        assert_eq!(flock_writer(LOCKS, 0, 0x2e, 555), None, "a read lock");
        assert_eq!(flock_writer(LOCKS, 0xfd, 1, 555), None, "a posix lock");
        assert_eq!(
            flock_writer(LOCKS, 0xfd, 1, 777),
            None,
            "another pid namespace"
        );
        assert_eq!(flock_writer(LOCKS, 0, 0x2f, 1234), None, "another device");
    }

    const STAT: &str = "42 (imago (x) y) S 1 42 42 0 -1 4194560 0 0";

    #[test]
    fn a_pending_sigkill_exit_flag_or_zombie_state_means_exiting() {
        let quiet = "State:\tS (sleeping)\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n";
        assert!(!task_exiting(quiet, STAT));
        let killed = quiet.replace("ShdPnd:\t0000000000000000", "ShdPnd:\t0000000000000100");
        assert!(task_exiting(&killed, STAT));
        let thread_killed = quiet.replace("SigPnd:\t0000000000000000", "SigPnd:\t0000000000004100");
        assert!(task_exiting(&thread_killed, STAT));
        let term_only = quiet.replace("ShdPnd:\t0000000000000000", "ShdPnd:\t0000000000004000");
        assert!(
            !task_exiting(&term_only, STAT),
            "a handled SIGTERM is not an exit"
        );
        assert!(task_exiting(
            &quiet.replace("S (sleeping)", "Z (zombie)"),
            STAT
        ));
        let exiting = STAT.replace("4194560", &(4194560 | PF_EXITING).to_string());
        assert!(task_exiting(quiet, &exiting));
    }

    #[test]
    fn this_process_is_running_and_a_reaped_one_is_gone() {
        assert!(!process_exiting(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(process_exiting(pid));
    }

    #[test]
    fn a_held_lock_is_found_on_every_look_while_other_locks_come_and_go() {
        // A controller's own SQLite transactions take and release locks all the time; a look
        // that missed its flock among them made a running controller look like none (the
        // kill -9 test of imago-cli found no holder now and then).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held.lock");
        let held = File::create(&path).unwrap();
        rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let probe = File::open(&path).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn: Vec<_> = (0..2)
            .map(|n| {
                let stop = stop.clone();
                // Taken after the held lock, so they are in front of it in the kernel's list.
                let files: Vec<File> = (0..8)
                    .map(|i| File::create(dir.path().join(format!("churn-{n}-{i}"))).unwrap())
                    .collect();
                std::thread::spawn(move || {
                    let mut rounds = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        for file in &files {
                            rustix::fs::flock(file, rustix::fs::FlockOperation::LockExclusive)
                                .unwrap();
                        }
                        for file in &files {
                            rustix::fs::flock(file, rustix::fs::FlockOperation::Unlock).unwrap();
                        }
                        rounds += 1;
                    }
                    rounds
                })
            })
            .collect();
        let me = std::process::id();
        let mut missed = Vec::new();
        for look in 0..5_000 {
            let holder = exclusive_holder(&probe, &path).unwrap();
            if holder != Holder::Running(me) {
                missed.push((look, holder));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds: Vec<u32> = churn.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(
            rounds.iter().all(|&r| r > 100),
            "the other locks hardly moved: {rounds:?}"
        );
        assert_eq!(missed, vec![], "looks that did not find the holder");
    }

    #[test]
    fn threads_ending_in_a_live_process_do_not_make_it_exiting() {
        // A controller's launch workers end all the time; a command that took one of them for
        // the controller dying waited 10 s for a death that never came (found in CI when the
        // test threads of this binary ended during the check).
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let ended = std::sync::Arc::new(AtomicU32::new(0));
        let churn = {
            let (stop, ended) = (stop.clone(), ended.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::spawn(|| {}).join().unwrap();
                    ended.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // Until both sides did enough for the test to mean something: counts, not a time
        // (500 ms gave 8 threads and 2 checks on a loaded host).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut checks = 0u32;
        while (checks <= 100 || ended.load(Ordering::Relaxed) <= 100)
            && std::time::Instant::now() < deadline
        {
            assert!(
                !process_exiting(std::process::id()),
                "seen as exiting after {checks} checks"
            );
            checks += 1;
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        let ended = ended.load(Ordering::Relaxed);
        assert!(
            ended > 100 && checks > 100,
            "{ended} threads ended, {checks} checks"
        );
    }
}

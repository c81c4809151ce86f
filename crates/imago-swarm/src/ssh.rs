//! `ssh://[USER@]HOST[:PORT]` Docker endpoints, reached the way the docker CLI reaches them:
//! `ssh -- HOST docker system dial-stdio`, one ssh process per connection, whose stdin and stdout
//! are a byte stream to the remote daemon's socket. The user's ssh (its config, agent, keys and
//! known hosts) does the work, in batch mode: no prompt ever waits for a password or a host key.
//!
//! bollard has an `ssh` feature, but it starts an ssh master (openssh crate) per connection and
//! serves only bollard's own client, while this engine also speaks JSON through reqwest to the
//! same endpoint. So the engine owns a unix socket in a private temporary directory for its
//! lifetime; every connection accepted there gets its own ssh process, and both clients connect
//! to that socket as to a local daemon. Closing the tunnel ends every ssh process as a user's
//! ssh ends (stdin closed; SIGTERM, then SIGKILL, only for one that does not exit, each sent
//! through a pidfd opened at the spawn, never by a pid that may have been reused) and reaps
//! it, and dropping it removes the directory; the directory of a process that died without
//! dropping it is removed by the next tunnel made on the host (`sweep_abandoned`).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Where and as whom ssh connects, parsed from the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SshDestination {
    user: Option<String>,
    host: String,
    port: Option<u16>,
}

impl SshDestination {
    /// Parses `ssh://[USER@]HOST[:PORT]` as docker does: no password, path, query or fragment;
    /// the user and host percent-decoded (`ssh://deploy%40corp@host` is user `deploy@corp`).
    pub(crate) fn parse(endpoint: &str) -> Result<SshDestination, String> {
        // The URL parser drops tabs and newlines without a word: look at the text as written.
        if let Some(c) = endpoint.chars().find(|c| c.is_control()) {
            return Err(format!("a control character ({c:?}) in an ssh:// endpoint"));
        }
        let url = reqwest::Url::parse(endpoint).map_err(|e| format!("not a URL: {e}"))?;
        if url.scheme() != "ssh" {
            return Err("not an ssh:// URL".to_owned());
        }
        if url.password().is_some() {
            return Err(
                "a password in an ssh:// endpoint is not supported: use keys or an agent"
                    .to_owned(),
            );
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err("an ssh:// endpoint is ssh://[USER@]HOST[:PORT], with no path".to_owned());
        }
        // An IPv6 address comes in brackets, which ssh does not want.
        let host = match url.host_str() {
            Some(host) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']'),
            _ => return Err("an ssh:// endpoint needs a host".to_owned()),
        };
        Ok(SshDestination {
            user: Some(decoded("user", url.username())?).filter(|u| !u.is_empty()),
            host: decoded("host", host)?,
            port: url.port(),
        })
    }

    /// The arguments of `ssh` for one byte stream to the remote daemon: batch mode (a missing
    /// key or unknown host key fails at once instead of prompting), no terminal, and docker's
    /// own connect timeout.
    fn ssh_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-T"]
            .map(str::to_owned)
            .into();
        if let Some(user) = &self.user {
            args.extend(["-l".to_owned(), user.clone()]);
        }
        if let Some(port) = self.port {
            args.extend(["-p".to_owned(), port.to_string()]);
        }
        args.extend(["--", &self.host, "docker", "system", "dial-stdio"].map(str::to_owned));
        args
    }
}

/// `part` (the user or host of an ssh:// URL) percent-decoded, refused when ssh could read it as
/// something else: a control character, or a leading `-`, which ssh takes for an option.
fn decoded(what: &str, part: &str) -> Result<String, String> {
    let text = percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .map_err(|_| format!("the ssh {what} {part:?} is not UTF-8 once percent-decoded"))?;
    if text.chars().any(char::is_control) {
        return Err(format!("the ssh {what} {text:?} holds a control character"));
    }
    if text.starts_with('-') {
        return Err(format!(
            "the ssh {what} {text:?} starts with '-', which ssh would take for an option"
        ));
    }
    Ok(text.into_owned())
}

/// A local unix socket that forwards every connection over its own ssh process.
pub(crate) struct SshTunnel {
    dir: tempfile::TempDir,
    shutdown: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
    /// What the last ssh process that wrote to stderr said (trimmed): the reason when a
    /// connection closes before the daemon answered (host key, authentication, no docker).
    last_error: Arc<Mutex<String>>,
}

/// How many of ssh's last stderr lines an error quotes.
const ERROR_LINES: usize = 2;

/// How long an ssh process whose stdin is closed may take to exit before SIGTERM.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How long an ssh process may take to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(1);

/// How long ssh's stderr is still read after ssh exited, for what is left in the pipe.
const STDERR_AFTER_EXIT: Duration = Duration::from_millis(500);

/// How much of ssh's stderr is kept: its last lines are the reason.
const STDERR_KEPT: usize = 16 * 1024;

impl SshTunnel {
    /// Binds the socket and starts accepting, on `runtime`. Nothing connects over ssh yet.
    pub(crate) fn start(
        destination: &SshDestination,
        runtime: &tokio::runtime::Runtime,
    ) -> std::io::Result<SshTunnel> {
        let temp = std::env::temp_dir();
        sweep_abandoned(&temp);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TUNNEL_PREFIX}{}-", std::process::id()))
            .tempdir_in(&temp)?;
        // Whoever can connect to the socket speaks to the remote daemon with this user's ssh
        // credentials (root there): only this user may, whatever the umask. Empty until the
        // bind below, so nothing is reachable before the mode is set.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let listener = {
            let _context = runtime.enter();
            UnixListener::bind(dir.path().join("docker.sock"))?
        };
        let (shutdown, stopped) = watch::channel(false);
        let last_error = Arc::new(Mutex::new(String::new()));
        let accept = runtime.spawn(accept(
            listener,
            Arc::new(destination.ssh_args()),
            stopped,
            last_error.clone(),
        ));
        Ok(SshTunnel {
            dir,
            shutdown,
            accept: Some(accept),
            last_error,
        })
    }

    /// The socket the Docker clients connect to.
    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// What ssh last wrote to stderr, if anything.
    pub(crate) fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Ends (see [`end`]) and reaps every ssh process and stops accepting; the directory goes
    /// when `self` is dropped.
    pub(crate) fn close(&mut self, runtime: &tokio::runtime::Runtime) {
        let _ = self.shutdown.send(true);
        if let Some(accept) = self.accept.take() {
            let _ = runtime.block_on(accept);
        }
    }
}

/// The start of a tunnel directory's name, followed by the pid of the process it serves.
const TUNNEL_PREFIX: &str = "imago-ssh-";

/// Removes the tunnel directories in `temp` of processes that are gone. A process killed, or
/// a controller stopped with SIGTERM (it never returns), leaves its directory (its ssh
/// processes end with it: their stdin closes); the next engine of any imago process removes it.
fn sweep_abandoned(temp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TUNNEL_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && !alive(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether process `pid` runs (a zombie has ended: it only waits to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `PID (COMM) STATE ...`: COMM may hold spaces and parentheses.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

async fn accept(
    listener: UnixListener,
    ssh_args: Arc<Vec<String>>,
    mut stopped: watch::Receiver<bool>,
    last_error: Arc<Mutex<String>>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                // An accept error (out of descriptors) leaves the clients' connect to fail;
                // the tunnel stays for the next one.
                if let Ok((stream, _)) = accepted {
                    connections.spawn(forward(
                        stream,
                        ssh_args.clone(),
                        stopped.clone(),
                        last_error.clone(),
                    ));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// One connection: its bytes to ssh's stdin, ssh's stdout back, until ssh's stdout ends or the
/// tunnel closes. ssh is reaped before the connection is closed, and what it wrote to stderr is
/// kept first, so a client that sees the connection end can already read why.
async fn forward(
    stream: UnixStream,
    ssh_args: Arc<Vec<String>>,
    mut stopped: watch::Receiver<bool>,
    last_error: Arc<Mutex<String>>,
) {
    let spawned = Command::new("ssh")
        .args(ssh_args.as_slice())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            remember(&last_error, &format!("cannot run ssh: {e}"));
            return;
        }
    };
    // Before anything waits for it: until it is reaped, its pid is still this ssh's.
    let handle = SshHandle::of(&child);
    let (Some(mut stdin), Some(mut stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return;
    };
    let said = Arc::new(Mutex::new(Vec::new()));
    let mut reading = tokio::spawn(read_tail(stderr, said.clone()));
    let (mut from_client, mut to_client) = stream.into_split();
    {
        let upstream = async {
            let _ = tokio::io::copy(&mut from_client, &mut stdin).await;
            // The client is done sending: ssh's stdin closes, dial-stdio closes its write half.
            drop(stdin);
            std::future::pending::<()>().await
        };
        let downstream = tokio::io::copy(&mut stdout, &mut to_client);
        tokio::select! {
            _ = upstream => {},
            _ = downstream => {},
            _ = stopped.wait_for(|stop| *stop) => {},
        }
        // ssh's stdin is closed here, with the future that owned it.
    }
    end(&mut child, &handle, &mut stdout).await;
    // ssh is gone and what it said is in the pipe, but a process it started (a ProxyCommand
    // and its children) may hold the pipe open for as long as it lives: its end is not waited
    // for beyond a moment to read what is there.
    if tokio::time::timeout(STDERR_AFTER_EXIT, &mut reading)
        .await
        .is_err()
    {
        reading.abort();
    }
    let text = said.lock().map(|s| last_lines(&s)).unwrap_or_default();
    if !text.is_empty() {
        remember(&last_error, &text);
    }
    drop((from_client, to_client));
}

/// Ends an ssh whose stdin is closed, as a user's ssh ends: on its stdin's end it sends EOF,
/// dial-stdio closes its side, and ssh exits and says goodbye to the server (and ends its
/// ProxyCommand). One still running after [`EXIT_GRACE`] (a remote side that does not close,
/// a connection still being made) gets SIGTERM, on which ssh still says goodbye; SIGKILL only
/// after [`TERM_GRACE`] more. What ssh writes to stdout meanwhile is read and dropped: an ssh
/// blocked on a full pipe would never exit. The signals go through `handle`: never to a process
/// that took ssh's pid once ssh was reaped, by whoever reaped it.
async fn end(child: &mut Child, handle: &SshHandle, stdout: &mut ChildStdout) {
    let drain = async {
        let _ = tokio::io::copy(stdout, &mut tokio::io::sink()).await;
        std::future::pending::<()>().await
    };
    let exit = async {
        if tokio::time::timeout(EXIT_GRACE, child.wait()).await.is_ok() {
            return;
        }
        handle.signal(child, Signal::TERM);
        if tokio::time::timeout(TERM_GRACE, child.wait())
            .await
            .is_err()
        {
            handle.signal(child, Signal::KILL);
            let _ = child.wait().await;
        }
    };
    tokio::select! {
        _ = drain => {},
        _ = exit => {},
    }
}

/// How the signals of [`end`] reach one ssh process.
#[derive(Debug)]
enum SshHandle {
    /// A pidfd of the ssh process, opened while it was an unreaped child of this process: it
    /// names that process for good, and a signal sent through it after the process was reaped
    /// (by tokio, or by anyone waiting for any child) fails instead of reaching a process that
    /// took the pid.
    PidFd(OwnedFd),
    /// The ssh process had already exited and been reaped when the pidfd was to be opened:
    /// nothing to signal.
    Gone,
    /// No pidfd could be opened (Linux < 5.4, or no file descriptor left): signalled by pid
    /// while the child's handle says it is not reaped, which only another waiter for any child
    /// of this process could race.
    Pid,
}

impl SshHandle {
    fn of(child: &Child) -> SshHandle {
        let Some(pid) = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .and_then(Pid::from_raw)
        else {
            return SshHandle::Gone;
        };
        let fd = match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return SshHandle::Gone,
            // No pidfds here (ENOSYS), or none left (EMFILE): by pid, as before pidfds.
            Err(_) => return SshHandle::Pid,
        };
        // The pid could have been reused between the spawn and the open: the process behind
        // the pidfd must be a child of this process that no one reaped yet (waitid on another
        // process's child, or a reaped one, fails with ECHILD). Not consumed: NOWAIT.
        match rustix::process::waitid(
            WaitId::PidFd(fd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
        ) {
            Ok(_) => SshHandle::PidFd(fd),
            Err(rustix::io::Errno::CHILD) => SshHandle::Gone,
            Err(_) => SshHandle::Pid,
        }
    }

    /// Sends `signal` to the ssh process, if it is still there to get it.
    fn signal(&self, child: &Child, signal: Signal) {
        match self {
            SshHandle::PidFd(fd) => {
                // ESRCH: it was reaped meanwhile, and the pidfd reaches nobody else.
                let _ = rustix::process::pidfd_send_signal(fd, signal);
            }
            SshHandle::Gone => {}
            SshHandle::Pid => {
                // Not reaped by tokio yet (only `wait` reaps it), so the pid is still this
                // ssh's unless another waiter for any child took it.
                let pid = child.id().and_then(|pid| i32::try_from(pid).ok());
                if let Some(pid) = pid.and_then(Pid::from_raw) {
                    let _ = rustix::process::kill_process(pid, signal);
                }
            }
        }
    }
}

/// Reads ssh's stderr into `said` until it ends, keeping the last [`STDERR_KEPT`] bytes.
async fn read_tail(mut stderr: ChildStderr, said: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 4096];
    while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
        let Ok(mut said) = said.lock() else {
            return;
        };
        said.extend_from_slice(&chunk[..n]);
        let over = said.len().saturating_sub(STDERR_KEPT);
        said.drain(..over);
    }
}

/// The last [`ERROR_LINES`] non-empty lines of `said`, joined: the reason is at the end (a
/// changed host key is a banner of a dozen lines first).
fn last_lines(said: &[u8]) -> String {
    let text = String::from_utf8_lossy(said);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(ERROR_LINES)..].join("; ")
}

fn remember(last_error: &Mutex<String>, text: &str) {
    if let Ok(mut last) = last_error.lock() {
        text.clone_into(&mut last);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn an_ssh_endpoint_is_user_host_and_port_as_docker_reads_it() {
        let d = SshDestination::parse("ssh://deploy@manager.example:2222").unwrap();
        assert_eq!(
            d.ssh_args(),
            [
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=30",
                "-T",
                "-l",
                "deploy",
                "-p",
                "2222",
                "--",
                "manager.example",
                "docker",
                "system",
                "dial-stdio"
            ]
        );
        let d = SshDestination::parse("ssh://[::1]").unwrap();
        assert_eq!((d.user, d.host, d.port), (None, "::1".to_owned(), None));
        for bad in [
            "ssh://u:secret@h",
            "ssh://h/var/run/docker.sock",
            "ssh://h?x=1",
            "tcp://h:2375",
        ] {
            assert!(SshDestination::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn an_ssh_user_and_host_are_percent_decoded() {
        let d = SshDestination::parse("ssh://deploy%40corp@manager%2Eexample:22").unwrap();
        assert_eq!(d.user.as_deref(), Some("deploy@corp"));
        assert_eq!(d.host, "manager.example");
        let args = d.ssh_args();
        assert!(
            args.windows(2).any(|w| w == ["-l", "deploy@corp"]),
            "{args:?}"
        );
        assert!(
            args.windows(2).any(|w| w == ["--", "manager.example"]),
            "{args:?}"
        );
    }

    /// ssh would read a user or host that starts with `-` as an option, and a control character
    /// (a newline in a user) is never a name: refused, naming the endpoint as written and why.
    #[test]
    fn an_ssh_endpoint_ssh_could_misread_is_refused_naming_it() {
        let cases = [
            ("ssh://-oProxyCommand=x@host", "starts with '-'"),
            ("ssh://%2DoProxyCommand=x@host", "starts with '-'"),
            ("ssh://-oProxyCommand=x", "starts with '-'"),
            ("ssh://user@%2doProxyCommand=x", "starts with '-'"),
            ("ssh://deploy%0Acorp@host", "control character"),
            ("ssh://deploy%00@host", "control character"),
            ("ssh://host%09", "control character"),
            // The URL parser would drop these without a word.
            ("ssh://dep\tloy@host", "control character"),
            ("ssh://host\n", "control character"),
        ];
        for (endpoint, why) in cases {
            let error = crate::SwarmEngine::connect(endpoint)
                .expect_err(endpoint)
                .to_string();
            assert!(error.contains(endpoint), "{endpoint:?}: {error}");
            assert!(error.contains(why), "{endpoint:?}: {error}");
        }
        let error = SshDestination::parse("ssh://%FF@host").unwrap_err();
        assert!(error.contains("not UTF-8"), "{error}");
    }

    #[test]
    fn the_tunnel_socket_is_private_whatever_the_umask() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let d = SshDestination::parse("ssh://manager.example").unwrap();
        // umask is process-wide: 0 for the tunnel's creation only, put back at once.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let started = SshTunnel::start(&d, &runtime);
        nix::sys::stat::umask(old);
        let mut tunnel = started.unwrap();
        let socket = tunnel.socket();
        let dir = socket.parent().unwrap();
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
        let dir = dir.to_owned();
        tunnel.close(&runtime);
        drop(tunnel);
        assert!(!dir.exists(), "dropped: {} removed", dir.display());
    }

    /// A child process whose pid is `pid`, made by setting the pid namespace's last pid (root)
    /// before the spawn; `None` when another process of the host took that pid first.
    fn child_with_pid(pid: u32) -> Option<std::process::Child> {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("set ns_last_pid (the test runs as root)");
        let child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        if child.id() == pid {
            return Some(child);
        }
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
        None
    }

    /// ssh is reaped behind its handle's back (anyone in the process may wait for any child)
    /// and its pid taken by another process before `end` signals it: the signals reach nobody.
    /// By pid, the SIGKILL meant for a stuck ssh killed the process that took its pid.
    #[test]
    fn a_signal_for_an_ssh_reaped_elsewhere_never_reaches_the_process_that_took_its_pid() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let mut reused = 0;
        for _ in 0..20 {
            let ssh = Command::new("sleep").arg("60").spawn().unwrap();
            let handle = SshHandle::of(&ssh);
            assert!(matches!(handle, SshHandle::PidFd(_)), "{handle:?}");
            let pid = ssh.id().unwrap();
            let raw = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
            nix::sys::signal::kill(raw, nix::sys::signal::Signal::SIGKILL).unwrap();
            nix::sys::wait::waitpid(raw, None).unwrap();
            let Some(mut other) = child_with_pid(pid) else {
                continue;
            };
            reused += 1;
            handle.signal(&ssh, Signal::KILL);
            // Whichever signal reaches `other` first ends it: it must be this one.
            let other_pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
            nix::sys::signal::kill(other_pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let status = other.wait().unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(libc_sigterm()),
                "the process that took ssh's pid {pid} got ssh's SIGKILL: {status:?}"
            );
            // tokio's handle would wait for `pid` when dropped, which is no longer ssh's.
            std::mem::forget(ssh);
            if reused == 3 {
                break;
            }
        }
        assert!(reused > 0, "no pid was taken again in 20 tries");
    }

    fn libc_sigterm() -> i32 {
        nix::sys::signal::Signal::SIGTERM as i32
    }
}

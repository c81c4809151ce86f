//! Private networking: one network namespace per instance (`/var/run/netns/imago-<id>`), joined to
//! the host by a veth pair (`iv-<id>` on the host, `eth0` inside) with a /30 from 10.88.0.0/16.
//!
//! Addresses are host-wide (two imago homes on one machine must not collide), so they are
//! allocated by linking a complete lease file into place as `<ipam>/<index>` (which fails if the
//! name is taken): no lock, no daemon. A lease names its launcher until the instance's record
//! exists, so that the lease of a launcher killed in between can be reclaimed.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::RuntimeError;

/// Default directory of address leases (tmpfs: leases vanish with the namespaces on reboot).
pub const DEFAULT_IPAM_DIR: &str = "/run/imago/ipam";
const BASE: u32 = u32::from_be_bytes([10, 88, 0, 0]);
/// The range of the leases, as `ip route` writes it, and its prefix length.
pub const RANGE: &str = "10.88.0.0/16";
const RANGE_PREFIX_LEN: u8 = 16;
/// Number of /30 blocks in the /16 (block 0 is never used).
const BLOCKS: u32 = 1 << 14;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub index: u32,
    pub host: Ipv4Addr,
    pub instance: Ipv4Addr,
}

impl Lease {
    fn from_index(index: u32) -> Lease {
        let net = BASE + index * 4;
        Lease {
            index,
            host: Ipv4Addr::from(net + 1),
            instance: Ipv4Addr::from(net + 2),
        }
    }
}

pub fn netns_name(id: &str) -> String {
    format!("imago-{id}")
}

pub fn netns_path(id: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(netns_name(id))
}

/// Host side of the veth pair; at most 15 bytes (IFNAMSIZ).
pub fn host_veth(id: &str) -> String {
    format!("iv-{}", &id[..id.len().min(12)])
}

#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    /// Where this process's next search for a free block starts: after the block it took
    /// last. Every launch searching from block 1 tried every taken block first, so a
    /// controller launching N instances made O(N^2) `linkat` calls. Only a hint: the link
    /// that fails on a taken name is what makes a block one launch's.
    next: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Blocks tried (each a `linkat`), for the test that counts them.
    #[cfg(test)]
    tried: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// What a lease file says about who holds it: `<id>`, then (since leases became recoverable)
/// `launcher <pid> <start time>` and `state <path>`: the launcher holds the lease until the
/// instance's state file at `<path>` exists, from then on the record does (its `rm` or failed
/// launch gives the address back).
struct LeaseFile<'a> {
    id: &'a str,
    launcher: Option<(i32, u64)>,
    state: Option<&'a Path>,
}

impl<'a> LeaseFile<'a> {
    fn parse(text: &'a str) -> LeaseFile<'a> {
        let mut lines = text.splitn(3, '\n');
        let id = lines.next().unwrap_or_default();
        let launcher = lines.next().and_then(|l| {
            let mut it = l.strip_prefix("launcher ")?.split(' ');
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        });
        let state = lines
            .next()
            .and_then(|l| l.strip_prefix("state "))
            .map(|p| Path::new(p.strip_suffix('\n').unwrap_or(p)));
        LeaseFile {
            id,
            launcher,
            state,
        }
    }

    /// Whether the launch that took this lease died before the instance's record took it over:
    /// the launcher is gone and no state file (nor network namespace) of the instance exists.
    /// A lease that does not say all of this (written by an older imago, or whose state path
    /// is relative) is never judged abandoned.
    fn abandoned(&self) -> bool {
        let (Some((pid, start)), Some(state)) = (self.launcher, self.state) else {
            return false;
        };
        // The record's lease (the common case) is settled by one stat, without reading /proc.
        if !state.is_absolute() || !gone(state) || crate::state::is_alive(pid, start) {
            return false;
        }
        // The launcher is dead, so nobody can create either of these any more.
        gone(state) && gone(&netns_path(self.id))
    }
}

fn gone(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

impl Ipam {
    pub fn new(dir: impl Into<PathBuf>) -> Ipam {
        Ipam {
            dir: dir.into(),
            next: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1)),
            #[cfg(test)]
            tried: std::sync::Arc::default(),
        }
    }

    /// The blocks in the order a search tries them: from the hint to the end, then from block
    /// 1 up to the hint, so that a full /16 is still searched whole.
    fn search_order(&self) -> impl Iterator<Item = u32> + use<> {
        let start = self
            .next
            .load(std::sync::atomic::Ordering::Relaxed)
            .clamp(1, BLOCKS - 1);
        (start..BLOCKS).chain(1..start)
    }

    /// One block tried: the search moves past `index` once it is taken.
    fn tried(&self, index: u32, taken: bool) {
        #[cfg(test)]
        self.tried
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if taken {
            let next = if index + 1 >= BLOCKS { 1 } else { index + 1 };
            self.next.store(next, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Leases a free address block to instance `id` (the first free one after the block this
    /// process took last, wrapping around), whose state file will be `state`
    /// (absolute). Until that file exists the lease names this process as its holder, so that a
    /// launcher killed before it wrote the record leaves a lease [`Ipam::reclaim_abandoned`] can
    /// take back. If every block is taken, abandoned leases are reclaimed and the search runs
    /// once more.
    pub fn allocate(&self, id: &str, state: &Path) -> Result<Lease, RuntimeError> {
        fs::create_dir_all(&self.dir).map_err(RuntimeError::io("cannot create", &self.dir))?;
        let me = std::process::id() as i32;
        // Without this process's start time or a state path that reads back as written, the
        // lease names its id only: kept until its record's `rm`, never judged abandoned.
        let holder = match (crate::state::own_start_time(), state.to_str()) {
            (Some(start), Some(state)) => format!("{id}\nlauncher {me} {start}\nstate {state}\n"),
            _ => id.to_owned(),
        };
        if let Some(lease) = self.take_free_block(&holder)? {
            return Ok(lease);
        }
        if !self.reclaim_abandoned()?.is_empty()
            && let Some(lease) = self.take_free_block(&holder)?
        {
            return Ok(lease);
        }
        Err(RuntimeError::AddressesExhausted(
            self.dir.display().to_string(),
        ))
    }

    /// Creates the lease file of the next free block with `content`. The file appears whole:
    /// written unnamed (O_TMPFILE) and then linked into place, which fails if the name is
    /// taken; a launcher killed half-way leaves no lease file without its holder.
    fn take_free_block(&self, content: &str) -> Result<Option<Lease>, RuntimeError> {
        use std::os::unix::fs::OpenOptionsExt;
        let unnamed = fs::File::options()
            .write(true)
            .mode(0o644)
            .custom_flags(nix::libc::O_TMPFILE)
            .open(&self.dir);
        let mut unnamed = match unnamed {
            Ok(f) => f,
            // A file system without O_TMPFILE: name the file at once and fill it in (a kill
            // in between leaves an empty lease, kept as one of unknown holder).
            Err(_) => return self.take_free_block_named(content),
        };
        unnamed
            .write_all(content.as_bytes())
            .map_err(RuntimeError::io("cannot write a lease in", &self.dir))?;
        let fd_path = {
            use std::os::fd::AsRawFd;
            format!("/proc/self/fd/{}", unnamed.as_raw_fd())
        };
        for index in self.search_order() {
            let path = self.dir.join(index.to_string());
            let linked = nix::unistd::linkat(
                None,
                Path::new(&fd_path),
                None,
                path.as_path(),
                nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
            );
            self.tried(index, linked.is_ok());
            match linked {
                Ok(()) => return Ok(Some(Lease::from_index(index))),
                Err(nix::errno::Errno::EEXIST) => continue,
                Err(e) => {
                    return Err(RuntimeError::Io {
                        action: "cannot create",
                        path,
                        source: e.into(),
                    });
                }
            }
        }
        Ok(None)
    }

    fn take_free_block_named(&self, content: &str) -> Result<Option<Lease>, RuntimeError> {
        for index in self.search_order() {
            let path = self.dir.join(index.to_string());
            let created = fs::File::options().write(true).create_new(true).open(&path);
            self.tried(index, created.is_ok());
            match created {
                Ok(mut f) => {
                    f.write_all(content.as_bytes())
                        .map_err(RuntimeError::io("cannot write", &path))?;
                    return Ok(Some(Lease::from_index(index)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(RuntimeError::Io {
                        action: "cannot create",
                        path,
                        source: e,
                    });
                }
            }
        }
        Ok(None)
    }

    /// Frees `lease` if it still belongs to `id`.
    pub fn release(&self, id: &str, lease_host: Ipv4Addr) -> Result<(), RuntimeError> {
        let offset = u32::from(lease_host).wrapping_sub(BASE + 1);
        if offset % 4 != 0 {
            return Ok(());
        }
        let path = self.dir.join((offset / 4).to_string());
        match fs::read_to_string(&path) {
            Ok(owner) if LeaseFile::parse(&owner).id == id => {
                fs::remove_file(&path).map_err(RuntimeError::io("cannot remove", &path))
            }
            _ => Ok(()),
        }
    }

    /// Removes the leases of launches that died between taking the lease and writing the
    /// instance's record (see [`Ipam::allocate`]); returns their block indexes. Reclaimers
    /// exclude each other (a lock on the directory; one already at work makes this a no-op),
    /// and nobody else removes or replaces an abandoned lease, so the file judged is the file
    /// removed. Not run on every allocation: it reads every lease and its holder's `/proc`
    /// entry, which would grow the launch path with the number of instances.
    pub fn reclaim_abandoned(&self) -> Result<Vec<u32>, RuntimeError> {
        use nix::fcntl::{Flock, FlockArg};
        let dir = match fs::File::open(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(RuntimeError::Io {
                    action: "cannot open",
                    path: self.dir.clone(),
                    source: e,
                });
            }
        };
        let _lock = match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(Vec::new()),
            Err((_, e)) => {
                return Err(RuntimeError::Io {
                    action: "cannot lock",
                    path: self.dir.clone(),
                    source: e.into(),
                });
            }
        };
        let entries =
            fs::read_dir(&self.dir).map_err(RuntimeError::io("cannot list", &self.dir))?;
        let mut freed = Vec::new();
        for entry in entries.flatten() {
            let Some(index) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            if LeaseFile::parse(&text).abandoned() {
                fs::remove_file(&path).map_err(RuntimeError::io("cannot remove", &path))?;
                freed.push(index);
            }
        }
        freed.sort_unstable();
        Ok(freed)
    }
}

/// A freshly created network namespace of one instance, not configured yet. Its path exists,
/// so an engine can already join it while [`Namespace::configure`] runs.
pub struct Namespace {
    file: fs::File,
    inside: Rtnl,
}

/// Creates the instance's network namespace at [`netns_path`] (nothing else yet).
///
/// Split from [`Namespace::configure`] so that a launcher can let the engine create the
/// container in the namespace while it configures the links (see `LocalProvider::launch`).
pub fn create_namespace(id: &str) -> Result<Namespace, RuntimeError> {
    let path = netns_path(id);
    let result = create_netns(&path).and_then(|inside| {
        let file =
            fs::File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        Ok(Namespace { file, inside })
    });
    result.map_err(|reason| {
        teardown(id);
        RuntimeError::Network {
            id: id.to_owned(),
            reason,
        }
    })
}

impl Namespace {
    /// Creates the veth pair (its inside end directly in the namespace), addresses both ends
    /// and brings `lo` up inside. On failure everything of the instance's network is removed.
    ///
    /// Everything goes through rtnetlink from this process: the two `ip` processes this replaced
    /// cost 8-20 ms per launch (two fork+exec, each waiting for a CPU on a loaded machine).
    pub fn configure(self, id: &str, lease: &Lease) -> Result<(), RuntimeError> {
        self.configure_inner(id, lease).map_err(|reason| {
            teardown(id);
            RuntimeError::Network {
                id: id.to_owned(),
                reason,
            }
        })
    }

    fn configure_inner(&self, id: &str, lease: &Lease) -> Result<(), String> {
        let host = Rtnl::new().map_err(|e| format!("cannot open a netlink socket: {e}"))?;
        let veth = host_veth(id);
        host.add_veth_pair(&veth, INSIDE_IFNAME, &self.file)
            .map_err(|e| format!("cannot create the veth pair {veth}: {e}"))?;
        let host_index = host
            .link_index(&veth)
            .map_err(|e| format!("cannot find {veth}: {e}"))?;
        host.add_address(host_index, lease.host, PREFIX_LEN)
            .map_err(|e| format!("cannot address {veth}: {e}"))?;
        // Once per host (it stays, as the leases' range does): see `add_range_unreachable`.
        match host.add_range_unreachable() {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
            Err(e) => return Err(format!("cannot add the unreachable route of {RANGE}: {e}")),
        }
        // Once per host too: without it nothing beyond the host answers an instance.
        ensure_egress();
        let inside = &self.inside;
        let eth0 = inside.link_index(INSIDE_IFNAME).map_err(|e| {
            format!(
                "cannot find {INSIDE_IFNAME} in {}: {e}",
                netns_path(id).display()
            )
        })?;
        inside
            .add_address(eth0, lease.instance, PREFIX_LEN)
            .map_err(|e| format!("cannot address {INSIDE_IFNAME}: {e}"))?;
        inside
            .set_up(eth0)
            .map_err(|e| format!("cannot bring {INSIDE_IFNAME} up: {e}"))?;
        inside
            .set_up(LOOPBACK_INDEX)
            .map_err(|e| format!("cannot bring lo up: {e}"))?;
        inside
            .add_default_route(lease.host)
            .map_err(|e| format!("cannot add the default route: {e}"))?;
        Ok(())
    }
}

/// The host-wide nftables table that masquerades instances' traffic leaving the host.
pub const EGRESS_TABLE: &str = "imago_egress";
/// Written once the egress table is in place (tmpfs: gone on reboot, like the table).
const EGRESS_MARK: &str = "/run/imago/egress-v1";

/// The nft script of [`EGRESS_TABLE`], written whole in one transaction (declared, deleted,
/// defined again: rewriting it changes nothing). Packets from the leases' range that leave
/// through anything but an instance's veth get the outgoing interface's address, as Docker's
/// bridge does: without it they left with a 10.88.x.2 source that nothing outside routes back.
/// Instance to instance (out through an `iv-*`) keeps its source address.
pub fn egress_ruleset() -> String {
    format!(
        "table ip {EGRESS_TABLE}\ndelete table ip {EGRESS_TABLE}\ntable ip {EGRESS_TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {RANGE} oifname != \"iv-*\" masquerade\n  }}\n}}\n"
    )
}

/// Puts [`EGRESS_TABLE`] in place unless this boot already did ([`EGRESS_MARK`]): one `nft`
/// run per host, not per launch. Best effort: without nft (or with the host's forwarding off)
/// a private instance still reaches other instances and the host, nothing further, as before
/// the table existed; the next launch tries again.
fn ensure_egress() {
    if Path::new(EGRESS_MARK).exists() {
        return;
    }
    let written = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(egress_ruleset().as_bytes())?;
            }
            child.wait()
        });
    if matches!(written, Ok(status) if status.success()) {
        let _ = fs::create_dir_all("/run/imago");
        let _ = fs::write(EGRESS_MARK, b"");
    }
}

/// The ids of the instance network namespaces (`/var/run/netns/imago-<id>`) older than
/// `min_age` that no process is in. A namespace holds a process from the engine's create of
/// its container until the container's last process exits, so one without any is a launch in
/// its first milliseconds (which `min_age` leaves out), an instance that exited and is not
/// removed yet, or a leftover whose cleanup was cut short; the caller tells those apart by the
/// instance's records. Only a hint: errors leave a namespace out.
pub fn namespaces_without_processes(min_age: std::time::Duration) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir("/var/run/netns") else {
        return Vec::new();
    };
    let ours: Vec<(String, u64)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let id = name.strip_prefix("imago-")?.to_owned();
            // The nsfs inode mounted there (its times are the namespace's creation), or the
            // bare file if nothing is mounted.
            let meta = fs::metadata(e.path()).ok()?;
            let age = meta.modified().ok()?.elapsed().unwrap_or_default();
            (age >= min_age).then_some((id, meta.ino()))
        })
        .collect();
    if ours.is_empty() {
        return Vec::new();
    }
    let mut used = std::collections::HashSet::new();
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            if let Ok(meta) = fs::metadata(p.path().join("ns/net")) {
                used.insert(meta.ino());
            }
        }
    }
    ours.into_iter()
        .filter(|(_, ino)| !used.contains(ino))
        .map(|(id, _)| id)
        .collect()
}

/// Removes the veth pair and the namespace; quiet and idempotent (parts may already be gone).
pub fn teardown(id: &str) {
    let veth = host_veth(id);
    if Path::new("/sys/class/net").join(&veth).exists()
        && let Ok(host) = Rtnl::new()
    {
        // Deleting one end deletes its peer too.
        let _ = host.delete_link(&veth);
    }
    let path = netns_path(id);
    if path.exists() {
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&path);
    }
}

const INSIDE_IFNAME: &str = "eth0";
const PREFIX_LEN: u8 = 30;
/// `lo` is the first device of every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// Creates a named network namespace the way `ip netns add` does: an nsfs bind mount at
/// `path`, under a shared mount of its directory (so that the namespace's unmount reaches mount
/// namespaces copied in between). Returns a netlink socket that lives inside the namespace.
fn create_netns(path: &Path) -> Result<Rtnl, String> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    make_shared_mount(dir)?;
    fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let target = path.to_owned();
    // unshare(CLONE_NEWNET) moves only the calling thread, so a short-lived thread does it and
    // this process (possibly multi-threaded) stays where it is. A socket keeps the namespace it
    // was created in, so the thread hands one back for configuring the inside.
    let inside = std::thread::spawn(move || -> Result<Rtnl, String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("cannot create a network namespace: {e}"))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            format!(
                "cannot bind the network namespace to {}: {e}",
                target.display()
            )
        })?;
        Rtnl::new().map_err(|e| format!("cannot open a netlink socket: {e}"))
    })
    .join()
    .map_err(|_| "the network namespace thread panicked".to_owned())?;
    if inside.is_err() {
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_file(path);
    }
    inside
}

fn make_shared_mount(dir: &Path) -> Result<(), String> {
    use nix::mount::{MsFlags, mount};
    let shared = || {
        mount(
            Some(""),
            dir,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        // Not a mount point yet: make it one (a bind mount onto itself), then share it.
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| format!("cannot bind-mount {}: {e}", dir.display()))?;
            shared().map_err(|e| format!("cannot make {} shared: {e}", dir.display()))
        }
        Err(e) => Err(format!("cannot make {} shared: {e}", dir.display())),
    }
}

/// A synchronous rtnetlink socket: one request at a time, each acknowledged.
struct Rtnl {
    socket: netlink_sys::Socket,
}

impl Rtnl {
    fn new() -> std::io::Result<Rtnl> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
        socket.bind_auto()?;
        Ok(Rtnl { socket })
    }

    /// Sends `message` and waits for the kernel's acknowledgement; returns the replies before it.
    fn request(
        &self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> std::io::Result<Vec<RouteNetlinkMessage>> {
        let mut req = NetlinkMessage::from(message);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut replies = Vec::new();
        let mut rbuf = vec![0u8; 16384];
        loop {
            let n = self.socket.recv(&mut &mut rbuf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[offset..n])
                    .map_err(|e| std::io::Error::other(format!("bad netlink reply: {e}")))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            Some(_) => Err(e.to_io()),
                            None => Ok(replies),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }

    fn add_veth_pair(
        &self,
        name: &str,
        peer_name: &str,
        peer_netns: &fs::File,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // The peer cannot be created up (the kernel opens it before linking it to its pair:
        // ENOTCONN); the host end can, which saves a request.
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(peer_name.to_owned()));
        peer.attributes
            .push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
        let mut link = LinkMessage::default();
        link.header.flags |= LinkFlags::Up;
        link.header.change_mask |= LinkFlags::Up;
        link.attributes.push(LinkAttribute::IfName(name.to_owned()));
        link.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(link),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    fn link_index(&self, name: &str) -> std::io::Result<u32> {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(name.to_owned()));
        self.request(RouteNetlinkMessage::GetLink(link), 0)?
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
                _ => None,
            })
            .ok_or_else(|| std::io::Error::other("no such device"))
    }

    fn set_up(&self, index: u32) -> std::io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags |= LinkFlags::Up;
        link.header.change_mask |= LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(link), 0)
            .map(drop)
    }

    fn add_address(&self, index: u32, address: Ipv4Addr, prefix_len: u8) -> std::io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix_len;
        msg.header.index = index;
        msg.attributes
            .push(AddressAttribute::Local(IpAddr::V4(address)));
        msg.attributes
            .push(AddressAttribute::Address(IpAddr::V4(address)));
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    fn add_default_route(&self, gateway: Ipv4Addr) -> std::io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// An `unreachable` route for the whole range of the leases (`ip route add unreachable
    /// 10.88.0.0/16 metric 4294967295`), below every instance's own /30: the address of an
    /// instance that is gone (its veth and /30 went with it) fails at once with "no route to
    /// host", instead of following the host's default route out of the machine, where a
    /// connect waits seconds or reaches whatever answers there, while the endpoint still
    /// routes to it. The highest metric, so that another user of the range (podman's default
    /// network is this /16 too) keeps its own route.
    fn add_range_unreachable(&self) -> std::io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.destination_prefix_length = RANGE_PREFIX_LEN;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unreachable;
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                Ipv4Addr::from(BASE),
            )));
        msg.attributes.push(RouteAttribute::Priority(u32::MAX));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    fn delete_link(&self, name: &str) -> std::io::Result<()> {
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::IfName(name.to_owned()));
        self.request(RouteNetlinkMessage::DelLink(link), 0)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::Ordering;

    /// The egress table is written whole: writing it again (two launchers at once, a lost
    /// marker) leaves the one masquerade rule, never two.
    #[test]
    fn egress_table_rewritten_keeps_one_rule() {
        let apply = || {
            let mut child = std::process::Command::new("nft")
                .args(["-f", "-"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("nft (installed by scripts/setup)");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(egress_ruleset().as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success());
        };
        apply();
        apply();
        let out = std::process::Command::new("nft")
            .args(["list", "table", "ip", EGRESS_TABLE])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.matches("masquerade").count(), 1, "{text}");
        assert!(
            text.contains("ip saddr 10.88.0.0/16 oifname != \"iv-*\" masquerade"),
            "{text}"
        );
    }

    /// Every allocation searched from block 1, so a controller launching N instances tried
    /// N^2/2 taken blocks (500,500 `linkat` calls for 1,000). A search now starts after the
    /// block this process took last: N allocations try N blocks; blocks given back are found
    /// again once the search wraps around the /16, and no block is ever given out twice.
    #[test]
    fn allocating_n_leases_tries_about_n_blocks_and_wraps_around() {
        let tmp = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(tmp.path().join("ipam"));
        let state = tmp.path().join("instances/x/state.json");
        let mut held = BTreeMap::new();
        // `n` allocations by `ipam` for ids `<prefix><n>`, each a block no one holds; how many
        // blocks they tried.
        let allocate = |ipam: &Ipam, prefix: &str, n: usize, held: &mut BTreeMap<u32, Lease>| {
            let before = ipam.tried.load(Ordering::Relaxed);
            for n in 0..n {
                let lease = ipam.allocate(&format!("{prefix}{n}"), &state).unwrap();
                assert!(
                    held.insert(lease.index, lease).is_none(),
                    "a block given twice"
                );
            }
            ipam.tried.load(Ordering::Relaxed) - before
        };
        let tried = allocate(&ipam, "i", 1000, &mut held);
        assert_eq!(tried, 1000, "1,000 allocations tried {tried} blocks");

        // Every other block given back; another process (a restarted controller) starts from
        // block 1 and takes the gaps, then goes on after them, each gap tried once.
        for index in (1..=1000).step_by(2) {
            let lease = held.remove(&index).unwrap();
            ipam.release(&format!("i{}", index - 1), lease.host)
                .unwrap();
        }
        let other = Ipam::new(tmp.path().join("ipam"));
        let tried = allocate(&other, "j", 500, &mut held);
        assert!(tried <= 1000, "500 allocations tried {tried} blocks");

        // At the end of the /16 the search wraps around to the free blocks at its start.
        for (index, lease) in std::mem::take(&mut held).into_iter().take(10) {
            let owner = fs::read_to_string(tmp.path().join("ipam").join(index.to_string()));
            let owner = owner.unwrap();
            ipam.release(LeaseFile::parse(&owner).id, lease.host)
                .unwrap();
        }
        ipam.next.store(BLOCKS - 1, Ordering::Relaxed);
        let last = ipam.allocate("last", &state).unwrap();
        assert_eq!(last.index, BLOCKS - 1);
        let wrapped = ipam.allocate("wrapped", &state).unwrap();
        assert_eq!(wrapped.index, 1, "the search did not wrap around");
    }
}

//! Connect-time load balancing in the kernel, for clients on this host.
//!
//! A user-space TCP proxy costs every proxied connection a second TCP connection, an accept and
//! two wake-ups per message; on a small machine that is a third of the throughput of long
//! connections. For clients on the same host there is a cheaper way, the one Cilium calls
//! socket-based load balancing: a `cgroup/connect4` eBPF program, attached to the root of the
//! cgroup2 tree, rewrites the destination of a `connect(2)` to a service address into the address
//! of one of its backends before the kernel sends the SYN. The client's socket is then an
//! ordinary direct connection to the instance: no proxy hop, no NAT, no per-packet work. A
//! `cgroup/getpeername4` program rewrites the peer address back, so the client still sees only
//! the service address.
//!
//! What this does not cover, by design: clients on other machines (they would reach whatever
//! listens on the service address, the data plane's proxy), and clients in other network namespaces
//! (both programs act only on sockets of the network namespace the balancer was attached from:
//! `127.0.0.1` in an instance is that instance's own loopback). A backend that refuses a
//! connection is not skipped as the proxy skips it: the caller routes only ready backends.
//!
//! The programs are attached with BPF links held by this process: when the process ends, even by
//! `kill -9`, the kernel detaches them and frees their maps, so nothing outlives it. Nothing is
//! pinned: the process that holds the balancer is imago-deploy's data plane, a process of its own
//! that outlives the controller (which can then crash or be replaced without a connection being
//! refused) and ends only once it serves nothing.
//!
//! [`open_connections`] counts the host's TCP sockets connected to given addresses (sock_diag),
//! which is how a caller knows that an instance no longer serves any balanced connection.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;

/// Backends one service address can hold in the kernel map; a service with more is left to the
/// proxy (see [`ConnectBalancer::set`]).
pub const MAX_BACKENDS: usize = 256;
/// Service addresses (and, separately, backend addresses) one balancer can hold.
const MAX_ENTRIES: u32 = 4096;
/// Service map value: netns cookie (u64), backend count (u32), padding, then `MAX_BACKENDS` pairs
/// of (IPv4 address, port), both as the kernel keeps them in `struct bpf_sock_addr`.
const SERVICE_VALUE_SIZE: usize = 16 + 8 * MAX_BACKENDS;
/// Peer map value: netns cookie (u64), then the service's (address, port).
const PEER_VALUE_SIZE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("no cgroup2 file system is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("cannot open the cgroup2 root {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Kernel {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused the {program} program: {source}; verifier log: {log}")]
    Verifier {
        program: &'static str,
        #[source]
        source: io::Error,
        log: String,
    },
}

fn kernel(what: &'static str) -> impl FnOnce(io::Error) -> BalancerError {
    move |source| BalancerError::Kernel { what, source }
}

/// The balancer's maps and program links; dropping it detaches both programs.
#[derive(Debug)]
pub struct ConnectBalancer {
    services: OwnedFd,
    peers: OwnedFd,
    _links: [OwnedFd; 2],
    netns_cookie: u64,
    /// What the maps hold, so updates write only what changed.
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    services: BTreeMap<SocketAddrV4, Vec<SocketAddrV4>>,
    peers: BTreeMap<SocketAddrV4, SocketAddrV4>,
}

impl ConnectBalancer {
    /// Loads both programs and attaches them to the root of the cgroup2 tree (so every process
    /// of this host is covered), acting on sockets of the calling thread's network namespace.
    /// Needs root (CAP_BPF and CAP_NET_ADMIN) and a kernel with cgroup BPF.
    pub fn attach() -> Result<ConnectBalancer, BalancerError> {
        let cgroup = crate::supervisor::cgroup2_mount().ok_or(BalancerError::NoCgroup2)?;
        let dir = std::fs::File::open(&cgroup).map_err(|source| BalancerError::Cgroup {
            path: cgroup.clone(),
            source,
        })?;
        let services = sys::map_create(8, SERVICE_VALUE_SIZE as u32, MAX_ENTRIES, b"imago_svc")
            .map_err(kernel("create the service map"))?;
        let peers = sys::map_create(8, PEER_VALUE_SIZE as u32, MAX_ENTRIES, b"imago_peer")
            .map_err(kernel("create the peer map"))?;
        let load = |program: &'static str, insns: Vec<u64>, attach: u32| {
            sys::prog_load(&insns, attach, program.as_bytes()).map_err(|(source, log)| {
                BalancerError::Verifier {
                    program,
                    source,
                    log,
                }
            })
        };
        let connect = load(
            "connect4",
            program::connect4(services.as_raw_fd()),
            sys::ATTACH_CONNECT4,
        )?;
        let getpeername = load(
            "getpeername4",
            program::getpeername4(peers.as_raw_fd()),
            sys::ATTACH_GETPEERNAME4,
        )?;
        let netns_cookie =
            sys::netns_cookie().map_err(kernel("read this network namespace's cookie"))?;
        // Both maps are empty, so attaching changes no connection until a service is set.
        let connect_link = sys::link_create(&connect, &dir, sys::ATTACH_CONNECT4)
            .map_err(kernel("attach the connect4 program"))?;
        let peer_link = sys::link_create(&getpeername, &dir, sys::ATTACH_GETPEERNAME4)
            .map_err(kernel("attach the getpeername4 program"))?;
        Ok(ConnectBalancer {
            services,
            peers,
            _links: [connect_link, peer_link],
            netns_cookie,
            held: Mutex::default(),
        })
    }

    /// Makes new connections to `service` go to one of `backends`, picked at random per
    /// connection. An empty list, or one longer than [`MAX_BACKENDS`], removes the service from
    /// the kernel: its connections then reach whatever listens on `service` (the proxy). Each
    /// backend's peer address reads as `service` from then on ([`ConnectBalancer::keep_peers`]
    /// forgets it). Returns whether the kernel now balances `service`.
    pub fn set(
        &self,
        service: SocketAddrV4,
        backends: &[SocketAddrV4],
    ) -> Result<bool, BalancerError> {
        let mut held = self.lock();
        let balanced = !backends.is_empty() && backends.len() <= MAX_BACKENDS;
        for backend in backends {
            if held.peers.get(backend) != Some(&service) {
                let mut value = [0u8; PEER_VALUE_SIZE];
                value[..8].copy_from_slice(&self.netns_cookie.to_ne_bytes());
                value[8..16].copy_from_slice(&key(service));
                sys::map_update(&self.peers, &key(*backend), &value)
                    .map_err(kernel("write the peer map"))?;
                held.peers.insert(*backend, service);
            }
        }
        if !balanced {
            if held.services.remove(&service).is_some() {
                sys::map_delete(&self.services, &key(service))
                    .map_err(kernel("write the service map"))?;
            }
            return Ok(false);
        }
        if held.services.get(&service).map(Vec::as_slice) == Some(backends) {
            return Ok(true);
        }
        let mut value = vec![0u8; SERVICE_VALUE_SIZE];
        value[..8].copy_from_slice(&self.netns_cookie.to_ne_bytes());
        value[8..12].copy_from_slice(&(backends.len() as u32).to_ne_bytes());
        for (i, backend) in backends.iter().enumerate() {
            value[16 + 8 * i..24 + 8 * i].copy_from_slice(&key(*backend));
        }
        sys::map_update(&self.services, &key(service), &value)
            .map_err(kernel("write the service map"))?;
        held.services.insert(service, backends.to_vec());
        Ok(true)
    }

    /// Stops balancing `service` (its connections reach whatever listens on it).
    pub fn remove(&self, service: SocketAddrV4) -> Result<(), BalancerError> {
        self.set(service, &[]).map(|_| ())
    }

    /// Forgets the peer rewrite of every backend not in `keep` (an instance that is gone: its
    /// address may be given to another instance).
    pub fn keep_peers(&self, keep: &BTreeSet<SocketAddrV4>) -> Result<(), BalancerError> {
        let mut held = self.lock();
        let gone: Vec<SocketAddrV4> = held
            .peers
            .keys()
            .filter(|b| !keep.contains(b))
            .copied()
            .collect();
        for backend in gone {
            sys::map_delete(&self.peers, &key(backend)).map_err(kernel("write the peer map"))?;
            held.peers.remove(&backend);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // The maps are written before `held`, so a panic in between leaves `held` behind the
        // kernel, which the next update corrects.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An address as `struct bpf_sock_addr` holds it: the IPv4 address and the port, each in
/// network byte order in the first bytes of a 32-bit field.
fn key(addr: SocketAddrV4) -> [u8; 8] {
    let mut key = [0u8; 8];
    key[..4].copy_from_slice(&addr.ip().octets());
    key[4..6].copy_from_slice(&addr.port().to_be_bytes());
    key
}

/// Counts, for each of `addrs`, the TCP sockets of this network namespace connected (or
/// connecting) to it whose far end has not closed its side yet: the connections an instance at
/// that address may still have to serve.
pub fn open_connections(addrs: &[SocketAddrV4]) -> io::Result<Vec<usize>> {
    let mut counts = vec![0usize; addrs.len()];
    if addrs.is_empty() {
        return Ok(counts);
    }
    for dst in sock_diag::tcp_sockets(OPEN_STATES)? {
        for (i, addr) in addrs.iter().enumerate() {
            if *addr == dst {
                counts[i] += 1;
            }
        }
    }
    Ok(counts)
}

/// TCP states (as a sock_diag bit mask) of a client socket whose server may still send:
/// SYN_SENT (2), ESTABLISHED (1), and FIN_WAIT1/FIN_WAIT2 (4, 5: only the client has closed).
/// Not CLOSE_WAIT, LAST_ACK or CLOSING: the server has sent its FIN, so it is done with the
/// connection, however long the client keeps its socket; nor TIME_WAIT or CLOSE.
const OPEN_STATES: u32 = (1 << 1) | (1 << 2) | (1 << 4) | (1 << 5);

/// The two eBPF programs, assembled here (a handful of instructions, so no compiler and no ELF
/// loader are needed to build or run imago).
mod program {
    use super::MAX_BACKENDS;

    // Offsets in `struct bpf_sock_addr` (uapi linux/bpf.h).
    const USER_IP4: i16 = 4;
    const USER_PORT: i16 = 24;
    const PROTOCOL: i16 = 36;
    const IPPROTO_TCP: i32 = 6;
    // Helper function ids.
    const MAP_LOOKUP_ELEM: i32 = 1;
    const GET_PRANDOM_U32: i32 = 7;
    const GET_NETNS_COOKIE: i32 = 122;
    // Registers.
    const R0: u8 = 0;
    const R1: u8 = 1;
    const R2: u8 = 2;
    const R3: u8 = 3;
    const R6: u8 = 6;
    const R7: u8 = 7;
    const R8: u8 = 8;
    const FP: u8 = 10;

    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        u64::from(code)
            | (u64::from(dst & 0xf) << 8)
            | (u64::from(src & 0xf) << 12)
            | (u64::from(off as u16) << 16)
            | (u64::from(imm as u32) << 32)
    }
    fn load32(dst: u8, src: u8, off: i16) -> u64 {
        insn(0x61, dst, src, off, 0) // BPF_LDX | BPF_MEM | BPF_W
    }
    fn load64(dst: u8, src: u8, off: i16) -> u64 {
        insn(0x79, dst, src, off, 0) // BPF_LDX | BPF_MEM | BPF_DW
    }
    fn store32(dst: u8, off: i16, src: u8) -> u64 {
        insn(0x63, dst, src, off, 0) // BPF_STX | BPF_MEM | BPF_W
    }
    fn mov(dst: u8, src: u8) -> u64 {
        insn(0xbf, dst, src, 0, 0) // BPF_ALU64 | BPF_MOV | BPF_X
    }
    fn mov_imm(dst: u8, imm: i32) -> u64 {
        insn(0xb7, dst, 0, 0, imm)
    }
    fn add_imm(dst: u8, imm: i32) -> u64 {
        insn(0x07, dst, 0, 0, imm)
    }
    fn add(dst: u8, src: u8) -> u64 {
        insn(0x0f, dst, src, 0, 0)
    }
    fn shl_imm(dst: u8, imm: i32) -> u64 {
        insn(0x67, dst, 0, 0, imm)
    }
    fn rem(dst: u8, src: u8) -> u64 {
        insn(0x9f, dst, src, 0, 0) // BPF_ALU64 | BPF_MOD | BPF_X (unsigned)
    }
    fn call(helper: i32) -> u64 {
        insn(0x85, 0, 0, 0, helper)
    }
    fn exit() -> u64 {
        insn(0x95, 0, 0, 0, 0)
    }
    /// `r_dst = map` (two instruction slots; the loader replaces the fd by the map).
    fn load_map(dst: u8, map_fd: i32) -> [u64; 2] {
        [insn(0x18, dst, 1, 0, map_fd), 0] // BPF_LD | BPF_IMM | BPF_DW, BPF_PSEUDO_MAP_FD
    }

    /// Conditional jumps to a label, resolved by [`Asm::finish`].
    enum Jump {
        NeImm(u8, i32),
        EqImm(u8, i32),
        GeImm(u8, i32),
        NeReg(u8, u8),
    }

    #[derive(Default)]
    struct Asm {
        code: Vec<u64>,
        /// (instruction index, jump) to patch to the `allow` label.
        to_allow: Vec<(usize, Jump)>,
    }

    impl Asm {
        fn op(&mut self, insn: u64) -> &mut Self {
            self.code.push(insn);
            self
        }
        fn ops(&mut self, insns: &[u64]) -> &mut Self {
            self.code.extend_from_slice(insns);
            self
        }
        fn allow_if(&mut self, jump: Jump) -> &mut Self {
            self.to_allow.push((self.code.len(), jump));
            self.code.push(0);
            self
        }
        /// Appends `allow: r0 = 1; exit` (a sock_addr program lets the call go on with 1).
        fn finish(mut self) -> Vec<u64> {
            let allow = self.code.len();
            for (at, jump) in std::mem::take(&mut self.to_allow) {
                let off = (allow - at - 1) as i16;
                self.code[at] = match jump {
                    Jump::NeImm(r, imm) => insn(0x55, r, 0, off, imm),
                    Jump::EqImm(r, imm) => insn(0x15, r, 0, off, imm),
                    Jump::GeImm(r, imm) => insn(0x35, r, 0, off, imm),
                    Jump::NeReg(a, b) => insn(0x5d, a, b, off, 0),
                };
            }
            self.code.push(mov_imm(R0, 1));
            self.code.push(exit());
            self.code
        }
    }

    /// Looks the destination (address, port) up in `map` and leaves the value in r7, or goes to
    /// `allow` if it is not there, not TCP, or from another network namespace than the cookie in
    /// the value's first 8 bytes. Keeps the context in r6.
    fn lookup_own(asm: &mut Asm, map_fd: i32) {
        asm.op(mov(R6, R1))
            .op(load32(R2, R6, PROTOCOL))
            .allow_if(Jump::NeImm(R2, IPPROTO_TCP))
            .op(load32(R2, R6, USER_IP4))
            .op(store32(FP, -8, R2))
            .op(load32(R2, R6, USER_PORT))
            .op(store32(FP, -4, R2))
            .ops(&load_map(R1, map_fd))
            .op(mov(R2, FP))
            .op(add_imm(R2, -8))
            .op(call(MAP_LOOKUP_ELEM))
            .allow_if(Jump::EqImm(R0, 0))
            .op(mov(R7, R0))
            .op(mov(R1, R6))
            .op(call(GET_NETNS_COOKIE))
            .op(load64(R1, R7, 0))
            .allow_if(Jump::NeReg(R0, R1));
    }

    /// connect4: a service address becomes one of its backends, picked at random.
    pub(super) fn connect4(services_fd: i32) -> Vec<u64> {
        let mut asm = Asm::default();
        lookup_own(&mut asm, services_fd);
        asm.op(load32(R8, R7, 8))
            .allow_if(Jump::EqImm(R8, 0))
            .op(call(GET_PRANDOM_U32))
            .op(rem(R0, R8))
            // Also what lets the verifier see the read below stays inside the value.
            .allow_if(Jump::GeImm(R0, MAX_BACKENDS as i32))
            .op(shl_imm(R0, 3))
            .op(add(R7, R0))
            .op(load32(R2, R7, 16))
            .op(load32(R3, R7, 20))
            .op(store32(R6, USER_IP4, R2))
            .op(store32(R6, USER_PORT, R3));
        asm.finish()
    }

    /// getpeername4: a backend's address reads as its service's.
    pub(super) fn getpeername4(peers_fd: i32) -> Vec<u64> {
        let mut asm = Asm::default();
        lookup_own(&mut asm, peers_fd);
        asm.op(load32(R2, R7, 8))
            .op(load32(R3, R7, 12))
            .op(store32(R6, USER_IP4, R2))
            .op(store32(R6, USER_PORT, R3));
        asm.finish()
    }
}

/// The system calls: bpf(2) and SO_NETNS_COOKIE. The only unsafe code of
/// this module, each call with the argument layout of the uapi headers.
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use nix::libc;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    pub const ATTACH_CONNECT4: u32 = 10;
    pub const ATTACH_GETPEERNAME4: u32 = 29;
    const SO_NETNS_COOKIE: libc::c_int = 71;

    #[repr(C)]
    #[derive(Default)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }

    #[repr(C)]
    struct Elem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }

    fn name(bytes: &[u8]) -> [u8; 16] {
        let mut name = [0u8; 16];
        let n = bytes.len().min(15);
        name[..n].copy_from_slice(&bytes[..n]);
        name
    }

    /// bpf(cmd, attr): the attribute struct is passed with its own size; the kernel zero-fills
    /// the rest of its `union bpf_attr`.
    fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a live #[repr(C)] struct laid out as the first fields of the
        // kernel's `union bpf_attr` for `cmd`; its pointers (if any) point into buffers the
        // caller keeps alive for the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut A as *mut libc::c_void,
                std::mem::size_of::<A>(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret)
    }

    fn fd(ret: libc::c_long) -> io::Result<OwnedFd> {
        let raw = libc::c_int::try_from(ret).map_err(|_| io::Error::other("bpf returned no fd"))?;
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    pub fn map_create(
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_name: &[u8],
    ) -> io::Result<OwnedFd> {
        let mut attr = MapCreate {
            map_type: BPF_MAP_TYPE_HASH,
            key_size,
            value_size,
            max_entries,
            map_name: name(map_name),
            ..MapCreate::default()
        };
        fd(bpf(BPF_MAP_CREATE, &mut attr)?)
    }

    #[repr(C)]
    struct ObjInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    /// The first fields of the kernel's `struct bpf_map_info`; it fills no more than this.
    #[repr(C)]
    #[derive(Default)]
    struct MapInfo {
        map_type: u32,
        id: u32,
        key_size: u32,
        value_size: u32,
    }

    /// The key and value sizes the kernel gave `map` when it was created.
    fn map_sizes(map: &OwnedFd) -> io::Result<(usize, usize)> {
        let mut info = MapInfo::default();
        let mut attr = ObjInfo {
            bpf_fd: map.as_raw_fd() as u32,
            info_len: std::mem::size_of::<MapInfo>() as u32,
            info: &mut info as *mut MapInfo as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        Ok((info.key_size as usize, info.value_size as usize))
    }

    /// Refuses a key or value whose length is not the map's: the kernel reads (and, for a
    /// lookup, writes) exactly the map's sizes at the pointers it is given, whatever the
    /// slices behind them hold.
    fn check_sizes(map: &OwnedFd, key: &[u8], value: Option<&[u8]>) -> io::Result<()> {
        let (key_size, value_size) = map_sizes(map)?;
        let value_len = value.map_or(value_size, <[u8]>::len);
        if key.len() != key_size || value_len != value_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bpf map element of {}+{value_len} bytes for a map of {key_size}+{value_size}",
                    key.len()
                ),
            ));
        }
        Ok(())
    }

    pub fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
        check_sizes(map, key, Some(value))?;
        let mut attr = Elem {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags: 0, // BPF_ANY
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }

    /// Deletes `key`; a key that is not there is no error.
    pub fn map_delete(map: &OwnedFd, key: &[u8]) -> io::Result<()> {
        check_sizes(map, key, None)?;
        let mut attr = Elem {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: 0,
            flags: 0,
        };
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Loads a cgroup sock_addr program; on failure, the error and the verifier's log.
    pub fn prog_load(
        insns: &[u64],
        attach: u32,
        prog_name: &[u8],
    ) -> Result<OwnedFd, (io::Error, String)> {
        let license = b"Apache-2.0\0";
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name: name(prog_name),
            expected_attach_type: attach,
            ..ProgLoad::default()
        };
        bpf(BPF_PROG_LOAD, &mut attr).and_then(fd).map_err(|e| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            (e, String::from_utf8_lossy(&log[..end]).trim().to_owned())
        })
    }

    pub fn link_create(prog: &OwnedFd, cgroup: &std::fs::File, attach: u32) -> io::Result<OwnedFd> {
        let mut attr = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type: attach,
            flags: 0,
        };
        fd(bpf(BPF_LINK_CREATE, &mut attr)?)
    }

    /// The cookie the kernel gives the calling thread's network namespace.
    pub fn netns_cookie() -> io::Result<u64> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: `cookie` and `len` are live locals of the sizes passed.
        let ret = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                &mut cookie as *mut u64 as *mut libc::c_void,
                &mut len,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }
}

/// The sock_diag dump behind [`open_connections`], in the message types of
/// netlink-packet-sock-diag. A dump walks tables the kernel keeps changing; one that was
/// interrupted (`NLM_F_DUMP_INTR`) may have missed sockets, and a drain that counted too few
/// connections would stop an instance that still serves one, so such a dump is made again.
mod sock_diag {
    use std::io;
    use std::net::{IpAddr, SocketAddrV4};

    use netlink_packet_core_09::{
        NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_packet_sock_diag::constants::{AF_INET, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

    /// Dumps made before giving up on tables that change under every one of them.
    pub(super) const ATTEMPTS: u32 = 5;

    /// What one dump found.
    #[derive(Debug, Default)]
    pub(super) struct Dump {
        pub sockets: Vec<SocketAddrV4>,
        /// The kernel flagged a message of this dump `NLM_F_DUMP_INTR`.
        pub interrupted: bool,
        /// `NLMSG_DONE` was read.
        pub done: bool,
    }

    /// The destination of every IPv4 TCP socket of this network namespace in one of `states`
    /// (a bit mask of TCP states), from a dump that was not interrupted.
    pub fn tcp_sockets(states: u32) -> io::Result<Vec<SocketAddrV4>> {
        complete(|seq| dump(states, seq))
    }

    /// Makes dumps (each with its own sequence number) until one is not interrupted.
    pub(super) fn complete(
        mut dump: impl FnMut(u32) -> io::Result<Dump>,
    ) -> io::Result<Vec<SocketAddrV4>> {
        for seq in 1..=ATTEMPTS {
            let found = dump(seq)?;
            if !found.interrupted {
                return Ok(found.sockets);
            }
        }
        Err(io::Error::other(format!(
            "sock_diag: the socket dump was interrupted {ATTEMPTS} times in a row"
        )))
    }

    fn dump(states: u32, seq: u32) -> io::Result<Dump> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        socket.send(&request(states, seq), 0)?;
        let mut found = Dump::default();
        let mut buf = vec![0u8; 64 * 1024];
        while !found.done {
            let n = socket.recv(&mut &mut buf[..], 0)?;
            if n == 0 {
                return Err(io::Error::other(
                    "sock_diag: the dump ended without NLMSG_DONE",
                ));
            }
            parse(&buf[..n], seq, &mut found)?;
        }
        Ok(found)
    }

    /// An `inet_diag_req_v2` dump request for IPv4 TCP sockets in `states`.
    pub(super) fn request(states: u32, seq: u32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = seq;
        let mut message = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family: AF_INET,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::from_bits_truncate(states),
                socket_id: SocketId::new_v4(),
            })
            .into(),
        );
        message.finalize();
        let mut bytes = vec![0u8; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    /// Adds what one datagram of the answer to request `seq` holds to `found`.
    pub(super) fn parse(mut bytes: &[u8], seq: u32, found: &mut Dump) -> io::Result<()> {
        while !bytes.is_empty() && !found.done {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(bytes)
                .map_err(|e| io::Error::other(format!("sock_diag: {e}")))?;
            let len = message.header.length as usize;
            // NLMSG_ALIGN: the next message starts at a multiple of 4.
            bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
            if message.header.sequence_number != seq {
                continue;
            }
            if message.header.flags & NLM_F_DUMP_INTR != 0 {
                found.interrupted = true;
            }
            match message.payload {
                NetlinkPayload::Done(_) => found.done = true,
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let id = &response.header.socket_id;
                    if let IpAddr::V4(ip) = id.destination_address {
                        found
                            .sockets
                            .push(SocketAddrV4::new(ip, id.destination_port));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};

    /// A service address nothing on this host uses (all of 127/8 is loopback), so balancing it
    /// cannot touch other tests' connections.
    fn service_addr(last: u8) -> SocketAddrV4 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        SocketAddrV4::new(Ipv4Addr::new(127, 77, 0, last), port)
    }

    fn v4(addr: std::net::SocketAddr) -> SocketAddrV4 {
        match addr {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        }
    }

    /// A backend that answers each connection with its name and the peer address it saw.
    fn named_backend(name: &'static str) -> SocketAddrV4 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = v4(listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let _ = stream.write_all(name.as_bytes());
            }
        });
        addr
    }

    fn ask(addr: SocketAddrV4) -> io::Result<(String, SocketAddrV4)> {
        let mut s = TcpStream::connect(addr)?;
        let peer = v4(s.peer_addr()?);
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok((out, peer))
    }

    #[test]
    fn connections_to_a_service_address_reach_its_backends_directly_and_see_the_service() {
        let balancer = ConnectBalancer::attach().unwrap();
        let service = service_addr(1);
        // Nothing listens on the service address: only the kernel's rewrite can answer.
        assert!(ask(service).is_err());
        let a = named_backend("a");
        let b = named_backend("b");
        assert!(balancer.set(service, &[a, b]).unwrap());
        let mut seen = BTreeSet::new();
        for _ in 0..64 {
            let (name, peer) = ask(service).unwrap();
            assert_eq!(peer, service, "the client sees the backend's address");
            seen.insert(name);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a", "b"]);
        // Only b from now on.
        assert!(balancer.set(service, &[b]).unwrap());
        for _ in 0..8 {
            assert_eq!(ask(service).unwrap().0, "b");
        }
        // A direct connection to a backend still reads its service's address until forgotten.
        assert_eq!(ask(a).unwrap().1, service);
        balancer.keep_peers(&BTreeSet::from([b])).unwrap();
        assert_eq!(ask(a).unwrap().1, a);
        // Removed: the service address is what it was, and nothing listens there.
        balancer.remove(service).unwrap();
        assert!(ask(service).is_err());
        // Dropping the balancer detaches the programs: a set service stops being balanced.
        assert!(balancer.set(service, &[a]).unwrap());
        assert_eq!(ask(service).unwrap().0, "a");
        drop(balancer);
        assert!(
            ask(service).is_err(),
            "the programs outlived their balancer"
        );
    }

    #[test]
    fn no_backend_or_too_many_leave_the_service_to_its_listener() {
        let balancer = ConnectBalancer::attach().unwrap();
        let service = service_addr(2);
        let a = named_backend("a");
        assert!(!balancer.set(service, &[]).unwrap());
        let many = vec![a; MAX_BACKENDS + 1];
        assert!(!balancer.set(service, &many).unwrap());
        assert!(ask(service).is_err());
        let exactly = vec![a; MAX_BACKENDS];
        assert!(balancer.set(service, &exactly).unwrap());
        assert_eq!(ask(service).unwrap().0, "a");
    }

    #[test]
    fn other_network_namespaces_are_not_balanced() {
        let balancer = ConnectBalancer::attach().unwrap();
        let service = service_addr(3);
        let a = named_backend("a");
        assert!(balancer.set(service, &[a]).unwrap());
        // A thread in a network namespace of its own, as an instance is: the same address there
        // is its own loopback, served by its own listener.
        let answer = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(up.success());
            let listener = TcpListener::bind(service).unwrap();
            let server = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                s.write_all(b"own").unwrap();
            });
            let answer = ask(service).unwrap();
            server.join().unwrap();
            answer
        })
        .join()
        .unwrap();
        assert_eq!(answer, ("own".to_owned(), service));
        // And in this namespace the same address is still balanced.
        assert_eq!(ask(service).unwrap().0, "a");
    }

    #[test]
    fn map_writes_of_the_wrong_size_are_refused() {
        let map = sys::map_create(8, PEER_VALUE_SIZE as u32, 4, b"imago_test").unwrap();
        let value = [0u8; PEER_VALUE_SIZE];
        sys::map_update(&map, &[0u8; 8], &value).unwrap();
        for (key, value) in [(&[0u8; 4][..], &value[..]), (&[0u8; 8][..], &value[..8])] {
            let err = sys::map_update(&map, key, value).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        }
        let err = sys::map_delete(&map, &[0u8; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        sys::map_delete(&map, &[0u8; 8]).unwrap();
    }

    /// Runs the assembled programs on a small interpreter of the eBPF instructions they use,
    /// with the kernel's helpers and maps played by the test: what they do to a
    /// `struct bpf_sock_addr`, checked without root or a kernel.
    mod interpreter {
        use std::collections::HashMap;

        const TAG_SHIFT: u32 = 48;
        const CTX: u64 = 1 << TAG_SHIFT;
        const STACK: u64 = 2 << TAG_SHIFT;
        const VALUE: u64 = 3 << TAG_SHIFT;
        const MAP: u64 = 4 << TAG_SHIFT;
        const STACK_SIZE: usize = 512;
        /// `struct bpf_sock_addr` is 72 bytes (uapi linux/bpf.h).
        pub const CTX_SIZE: usize = 72;

        pub struct Machine {
            pub ctx: [u8; CTX_SIZE],
            /// (map fd, key) -> value.
            pub maps: HashMap<(i32, Vec<u8>), Vec<u8>>,
            pub random: u32,
            pub netns_cookie: u64,
            stack: [u8; STACK_SIZE],
            value: Vec<u8>,
            /// Writes the program made into the context: (offset, bytes).
            pub ctx_writes: Vec<(usize, usize)>,
        }

        impl Machine {
            pub fn new(ctx: [u8; CTX_SIZE], netns_cookie: u64) -> Machine {
                Machine {
                    ctx,
                    maps: HashMap::new(),
                    random: 0,
                    netns_cookie,
                    stack: [0; STACK_SIZE],
                    value: Vec::new(),
                    ctx_writes: Vec::new(),
                }
            }

            fn memory(&mut self, addr: u64, len: usize) -> &mut [u8] {
                let (tag, at) = (
                    addr >> TAG_SHIFT << TAG_SHIFT,
                    (addr & ((1 << TAG_SHIFT) - 1)) as usize,
                );
                let region: &mut [u8] = match tag {
                    CTX => &mut self.ctx,
                    STACK => &mut self.stack,
                    VALUE => &mut self.value,
                    _ => panic!("access to {addr:#x}, which is no memory"),
                };
                assert!(
                    at + len <= region.len(),
                    "access past the end of a region at {addr:#x}+{len}"
                );
                &mut region[at..at + len]
            }

            fn load(&mut self, addr: u64, len: usize) -> u64 {
                let mut bytes = [0u8; 8];
                bytes[..len].copy_from_slice(self.memory(addr, len));
                u64::from_le_bytes(bytes)
            }

            /// Runs `program` to its `exit`; returns r0.
            pub fn run(&mut self, program: &[u64]) -> u64 {
                let mut r = [0u64; 11];
                r[1] = CTX;
                r[10] = STACK + STACK_SIZE as u64;
                let mut pc = 0usize;
                for _ in 0..1000 {
                    let insn = program[pc];
                    let code = insn as u8;
                    let dst = ((insn >> 8) & 0xf) as usize;
                    let src = ((insn >> 12) & 0xf) as usize;
                    let off = (insn >> 16) as u16 as i16;
                    let imm = (insn >> 32) as u32 as i32;
                    let imm64 = imm as i64 as u64;
                    let at = |base: u64| base.wrapping_add(off as i64 as u64);
                    pc += 1;
                    let jump = |taken: bool, pc: &mut usize| {
                        if taken {
                            *pc = (*pc as i64 + i64::from(off)) as usize;
                        }
                    };
                    match code {
                        0x61 => r[dst] = self.load(at(r[src]), 4),
                        0x79 => r[dst] = self.load(at(r[src]), 8),
                        0x63 => {
                            let addr = at(r[dst]);
                            if addr >> TAG_SHIFT << TAG_SHIFT == CTX {
                                self.ctx_writes.push(((addr - CTX) as usize, 4));
                            }
                            let value = (r[src] as u32).to_le_bytes();
                            self.memory(addr, 4).copy_from_slice(&value);
                        }
                        0xbf => r[dst] = r[src],
                        0xb7 => r[dst] = imm64,
                        0x07 => r[dst] = r[dst].wrapping_add(imm64),
                        0x0f => r[dst] = r[dst].wrapping_add(r[src]),
                        0x67 => r[dst] <<= imm,
                        0x9f => {
                            if r[src] != 0 {
                                r[dst] %= r[src];
                            }
                        }
                        0x18 => {
                            assert_eq!(program[pc], 0, "second slot of a 64-bit load");
                            assert_eq!(src, 1, "only map fds are loaded as 64-bit immediates");
                            r[dst] = MAP | imm as u32 as u64;
                            pc += 1;
                        }
                        0x85 => {
                            r[0] = match imm {
                                1 => {
                                    assert_eq!(
                                        r[1] >> TAG_SHIFT << TAG_SHIFT,
                                        MAP,
                                        "lookup without a map"
                                    );
                                    let fd = (r[1] & 0xffff_ffff) as i32;
                                    let key = self.memory(r[2], 8).to_vec();
                                    match self.maps.get(&(fd, key)) {
                                        Some(value) => {
                                            self.value = value.clone();
                                            VALUE
                                        }
                                        None => 0,
                                    }
                                }
                                7 => u64::from(self.random),
                                122 => {
                                    assert_eq!(
                                        r[1], CTX,
                                        "netns cookie of something else than the context"
                                    );
                                    self.netns_cookie
                                }
                                other => panic!("helper {other} is not expected"),
                            };
                            // Helpers clobber r1-r5: a program must not rely on them after a call.
                            for reg in &mut r[1..=5] {
                                *reg = 0xdead_0000_0000_0000;
                            }
                        }
                        0x95 => return r[0],
                        0x55 => jump(r[dst] != imm64, &mut pc),
                        0x15 => jump(r[dst] == imm64, &mut pc),
                        0x35 => jump(r[dst] >= imm64, &mut pc),
                        0x5d => jump(r[dst] != r[src], &mut pc),
                        other => panic!("instruction {other:#04x} at {} is not expected", pc - 1),
                    }
                    assert!(pc < program.len(), "ran past the end of the program");
                }
                panic!("no exit after 1000 instructions");
            }
        }
    }

    const SERVICES_FD: i32 = 7;
    const PEERS_FD: i32 = 8;
    const COOKIE: u64 = 0x1122_3344_5566_7788;

    /// A TCP connect(2) context to `to`.
    fn sock_addr(to: SocketAddrV4, protocol: u32) -> [u8; interpreter::CTX_SIZE] {
        let mut ctx = [0u8; interpreter::CTX_SIZE];
        ctx[0..4].copy_from_slice(&(libc_af_inet()).to_ne_bytes());
        ctx[4..8].copy_from_slice(&to.ip().octets());
        ctx[24..26].copy_from_slice(&to.port().to_be_bytes());
        ctx[36..40].copy_from_slice(&protocol.to_ne_bytes());
        ctx
    }

    fn libc_af_inet() -> u32 {
        nix::libc::AF_INET as u32
    }

    fn destination(ctx: &[u8; interpreter::CTX_SIZE]) -> SocketAddrV4 {
        SocketAddrV4::new(
            Ipv4Addr::new(ctx[4], ctx[5], ctx[6], ctx[7]),
            u16::from_be_bytes([ctx[24], ctx[25]]),
        )
    }

    fn service_value(cookie: u64, backends: &[SocketAddrV4]) -> Vec<u8> {
        let mut value = vec![0u8; SERVICE_VALUE_SIZE];
        value[..8].copy_from_slice(&cookie.to_ne_bytes());
        value[8..12].copy_from_slice(&(backends.len() as u32).to_ne_bytes());
        for (i, backend) in backends.iter().enumerate() {
            value[16 + 8 * i..24 + 8 * i].copy_from_slice(&key(*backend));
        }
        value
    }

    #[test]
    fn connect4_sends_a_service_connection_to_the_backend_the_random_number_picks() {
        let service = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 8080);
        let backends: Vec<SocketAddrV4> = (2..5)
            .map(|last| SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, last), 80 + u16::from(last)))
            .collect();
        let program = program::connect4(SERVICES_FD);
        let machine = |ctx, value: Vec<u8>, random: u32| {
            let mut m = interpreter::Machine::new(ctx, COOKIE);
            m.maps.insert((SERVICES_FD, key(service).to_vec()), value);
            m.random = random;
            m
        };
        for random in [0u32, 1, 2, 3, 7, u32::MAX] {
            let mut m = machine(
                sock_addr(service, 6),
                service_value(COOKIE, &backends),
                random,
            );
            assert_eq!(
                m.run(&program),
                1,
                "a sock_addr program lets the call go on"
            );
            assert_eq!(
                destination(&m.ctx),
                backends[random as usize % 3],
                "random {random}"
            );
            assert_eq!(
                m.ctx_writes,
                [(4, 4), (24, 4)],
                "only the address and port are written"
            );
        }
        let untouched = |mut m: interpreter::Machine, why: &str| {
            let before = m.ctx;
            assert_eq!(m.run(&program), 1, "{why}");
            assert_eq!(m.ctx, before, "{why}: the destination was changed");
            assert!(m.ctx_writes.is_empty(), "{why}");
        };
        untouched(
            machine(sock_addr(service, 17), service_value(COOKIE, &backends), 1),
            "UDP",
        );
        untouched(
            machine(
                sock_addr(service, 6),
                service_value(COOKIE + 1, &backends),
                1,
            ),
            "another network namespace",
        );
        untouched(
            machine(sock_addr(service, 6), service_value(COOKIE, &[]), 1),
            "no backends",
        );
        let other = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 8081);
        untouched(
            machine(sock_addr(other, 6), service_value(COOKIE, &backends), 1),
            "an address that is no service",
        );
        // A count beyond the value (which the kernel's map would never hold, but the verifier
        // must be shown) still reads inside it: the program leaves such a call alone.
        let mut too_many = service_value(COOKIE, &backends);
        too_many[8..12].copy_from_slice(&(MAX_BACKENDS as u32 + 1).to_ne_bytes());
        untouched(
            machine(sock_addr(service, 6), too_many, MAX_BACKENDS as u32),
            "a backend index past the value",
        );
    }

    #[test]
    fn getpeername4_shows_a_backend_as_its_service() {
        let service = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 8080);
        let backend = SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, 2), 80);
        let program = program::getpeername4(PEERS_FD);
        let mut value = vec![0u8; PEER_VALUE_SIZE];
        value[..8].copy_from_slice(&COOKIE.to_ne_bytes());
        value[8..16].copy_from_slice(&key(service));
        for (cookie, to, expected) in [
            (COOKIE, backend, service),
            (COOKIE + 1, backend, backend),
            (COOKIE, service, service),
        ] {
            let mut m = interpreter::Machine::new(sock_addr(to, 6), cookie);
            m.maps
                .insert((PEERS_FD, key(backend).to_vec()), value.clone());
            assert_eq!(m.run(&program), 1);
            assert_eq!(
                destination(&m.ctx),
                expected,
                "peer {to}, cookie {cookie:#x}"
            );
        }
    }

    #[test]
    fn instructions_are_encoded_as_the_uapi_defines_them() {
        // Both programs end with `r0 = 1; exit`, and every jump lands inside the program.
        for (name, code) in [
            ("connect4", program::connect4(3)),
            ("getpeername4", program::getpeername4(3)),
        ] {
            let n = code.len();
            assert_eq!(code[n - 2], 0x0000_0001_0000_00b7, "{name}: r0 = 1");
            assert_eq!(code[n - 1], 0x0000_0000_0000_0095, "{name}: exit");
            // The map is loaded as BPF_LD|BPF_IMM|BPF_DW with src = BPF_PSEUDO_MAP_FD, fd in imm.
            let at = code.iter().position(|i| *i as u8 == 0x18).unwrap();
            assert_eq!(code[at] & 0xf000, 0x1000, "{name}: pseudo map fd");
            assert_eq!(code[at] >> 32, 3, "{name}: map fd");
            assert_eq!(code[at + 1], 0, "{name}: second slot");
            for (pc, insn) in code.iter().enumerate() {
                if matches!(*insn as u8, 0x55 | 0x15 | 0x35 | 0x5d) {
                    let off = (*insn >> 16) as u16 as i16;
                    assert_eq!(
                        pc as i64 + 1 + i64::from(off),
                        n as i64 - 2,
                        "{name}: jump at {pc}"
                    );
                }
            }
        }
    }

    /// One netlink message answering a sock_diag dump: an `inet_diag_msg` for a socket
    /// connected to `to`, or `NLMSG_DONE` when `to` is `None`.
    fn diag_message(seq: u32, flags: u16, to: Option<SocketAddrV4>) -> Vec<u8> {
        const NLM_F_MULTI: u16 = 2;
        let (kind, body) = match to {
            Some(to) => {
                let mut msg = vec![0u8; 72];
                msg[0] = 2; // AF_INET
                msg[1] = 1; // ESTABLISHED
                msg[4..6].copy_from_slice(&40000u16.to_be_bytes());
                msg[6..8].copy_from_slice(&to.port().to_be_bytes());
                msg[8..12].copy_from_slice(&[127, 0, 0, 1]);
                msg[24..28].copy_from_slice(&to.ip().octets());
                (20u16, msg)
            }
            None => (3u16, vec![0u8; 4]),
        };
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&(NLM_F_MULTI | flags).to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&body);
        bytes
    }

    #[test]
    fn sock_diag_answers_are_read_by_sequence_number_and_interrupted_dumps_are_seen() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, 2), 80);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, 3), 8080);
        let mut datagram = diag_message(1, 0, Some(a));
        datagram.extend(diag_message(9, 0, Some(b))); // an answer to another request
        datagram.extend(diag_message(1, 0, Some(b)));
        let mut found = sock_diag::Dump::default();
        sock_diag::parse(&datagram, 1, &mut found).unwrap();
        assert_eq!(found.sockets, [a, b]);
        assert!(!found.done && !found.interrupted);
        sock_diag::parse(&diag_message(1, 0, None), 1, &mut found).unwrap();
        assert!(found.done && !found.interrupted);

        const NLM_F_DUMP_INTR: u16 = 0x10;
        let mut found = sock_diag::Dump::default();
        let mut datagram = diag_message(2, NLM_F_DUMP_INTR, Some(a));
        datagram.extend(diag_message(2, NLM_F_DUMP_INTR, None));
        sock_diag::parse(&datagram, 2, &mut found).unwrap();
        assert!(found.done && found.interrupted);

        let request = sock_diag::request(OPEN_STATES, 7);
        assert_eq!(request.len(), 72, "nlmsghdr + inet_diag_req_v2");
        assert_eq!(u32::from_ne_bytes(request[8..12].try_into().unwrap()), 7);
        assert_eq!(
            u32::from_ne_bytes(request[20..24].try_into().unwrap()),
            OPEN_STATES
        );
    }

    #[test]
    fn an_interrupted_sock_diag_dump_is_made_again() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, 2), 80);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, 3), 80);
        let mut seqs = Vec::new();
        // The first dump missed a socket and says so; the second is whole.
        let sockets = sock_diag::complete(|seq| {
            seqs.push(seq);
            Ok(sock_diag::Dump {
                sockets: if seq == 1 { vec![a] } else { vec![a, b] },
                interrupted: seq == 1,
                done: true,
            })
        })
        .unwrap();
        assert_eq!(sockets, [a, b]);
        assert_eq!(seqs, [1, 2], "each dump has its own sequence number");
        let err = sock_diag::complete(|_| {
            Ok(sock_diag::Dump {
                sockets: vec![a],
                interrupted: true,
                done: true,
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
    }

    #[test]
    fn keys_hold_address_and_port_in_network_order() {
        let k = key(SocketAddrV4::new(Ipv4Addr::new(10, 88, 0, 5), 8080));
        assert_eq!(k, [10, 88, 0, 5, 0x1f, 0x90, 0, 0]);
    }

    #[test]
    fn the_cgroup2_root_is_found() {
        let root = crate::supervisor::cgroup2_mount().unwrap();
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    }

    #[test]
    fn open_connections_counts_connected_sockets_and_not_closed_ones() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("{other}"),
        };
        let other = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1);
        assert_eq!(open_connections(&[addr, other]).unwrap(), vec![0, 0]);
        let a = std::net::TcpStream::connect(addr).unwrap();
        let b = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(open_connections(&[addr, other]).unwrap(), vec![2, 0]);
        drop(a);
        drop(b);
        // The client side closed first: its sockets wait in FIN_WAIT2 until the server closes.
        let (s1, _) = listener.accept().unwrap();
        let (s2, _) = listener.accept().unwrap();
        drop(s1);
        drop(s2);
        let settles_at_zero = || {
            for _ in 0..100 {
                if open_connections(&[addr]).unwrap()[0] == 0 {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            false
        };
        assert!(settles_at_zero(), "closed connections still counted");
        // The server closes first: the client's socket stays open (CLOSE_WAIT), but the server
        // is done with it.
        let c = std::net::TcpStream::connect(addr).unwrap();
        let (s3, _) = listener.accept().unwrap();
        assert_eq!(open_connections(&[addr]).unwrap(), vec![1]);
        drop(s3);
        assert!(
            settles_at_zero(),
            "a connection the server closed still counted"
        );
        drop(c);
    }
}

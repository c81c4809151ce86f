//! The service endpoint: a small TCP proxy that forwards each new connection to one of the
//! instances the controller marked ready, and that counts open connections per instance so that a
//! retired instance is stopped only once it is drained.
//!
//! Clients never see which instance serves them, and never see an instance being replaced: a
//! connection is only ever sent to a routed backend, and if that backend refuses, the next one is
//! tried before the client notices anything.
//!
//! Cost per connection matters here (a backend that closes every connection makes the proxy pay
//! an accept, a connect and two closes per request), so: each endpoint runs on threads of its own
//! ([`spawn`]), one per CPU core, each with a current-thread runtime and its own listening socket
//! on the endpoint's port ([`bind`], `SO_REUSEPORT`): the kernel hands every new connection to one
//! thread, where accepting, connecting and relaying never wake another thread; the routed set is a
//! shared snapshot, so picking a backend allocates nothing; small messages are relayed with one
//! `recv` and one `send` through a pooled buffer; and a direction that fills the relay buffer (a
//! large body) switches to `splice(2)` through a pooled pipe, so the bytes never enter user space.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// How long connecting to one backend may take in all before the next backend is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Backends are instances on this host, which answer a SYN within microseconds: a connect still
/// pending after this long has lost its SYN (a full accept queue drops it without a word) and is
/// retried at once with a fresh one, instead of waiting for the kernel's retransmission one
/// second later. The wait doubles with every retry, within [`CONNECT_TIMEOUT`].
const FIRST_SYN_WAIT: Duration = Duration::from_millis(20);
/// One `recv` of this size carries a whole request or response of a typical small page; a read
/// that fills it marks a bulk transfer, which continues with `splice`.
const RELAY_BUFFER: usize = 16 * 1024;
/// Pipe capacity asked for bulk transfers (`/proc/sys/fs/pipe-max-size` is 1 MiB by default):
/// the larger the pipe, the fewer `splice` calls per megabyte.
const PIPE_SIZE: usize = 1 << 20;
/// Empty pipes kept per proxy thread for the next bulk transfer.
const PIPE_POOL: usize = 32;

#[derive(Debug)]
struct Backend {
    id: Arc<str>,
    addr: SocketAddr,
    active: Arc<AtomicUsize>,
    routed: bool,
}

#[derive(Debug, Clone)]
struct Target {
    /// The instance's id, for the messages that name it (shared: a new connection allocates
    /// nothing).
    id: Arc<str>,
    addr: SocketAddr,
    active: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct Table {
    backends: BTreeMap<String, Backend>,
    /// The routed backends in id order, rebuilt by [`Routes::set`] so that a new connection only
    /// clones an `Arc`.
    routed: Arc<[Target]>,
    next: usize,
}

/// The routing table of one endpoint, shared by the controller (writer) and the proxy (reader).
#[derive(Debug, Clone, Default)]
pub struct Routes {
    table: Arc<Mutex<Table>>,
}

impl Routes {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves a still-consistent table: keep serving.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `routed` (instance id -> address) the set that gets new connections. Instances
    /// no longer listed stop getting new connections but stay known until their last
    /// connection closes, so [`Routes::active_connections`] keeps counting them.
    pub fn set(&self, routed: &[(String, SocketAddr)]) {
        let mut table = self.lock();
        for backend in table.backends.values_mut() {
            backend.routed = false;
        }
        for (id, addr) in routed {
            let entry = table.backends.entry(id.clone()).or_insert_with(|| Backend {
                id: Arc::from(id.as_str()),
                addr: *addr,
                active: Arc::new(AtomicUsize::new(0)),
                routed: true,
            });
            entry.addr = *addr;
            entry.routed = true;
        }
        table
            .backends
            .retain(|_, b| b.routed || b.active.load(Ordering::SeqCst) > 0);
        table.routed = table
            .backends
            .values()
            .filter(|b| b.routed)
            .map(|b| Target {
                id: b.id.clone(),
                addr: b.addr,
                active: b.active.clone(),
            })
            .collect();
    }

    /// Ids that currently get new connections.
    pub fn routed(&self) -> Vec<String> {
        self.lock()
            .backends
            .iter()
            .filter(|(_, b)| b.routed)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Open connections to `id` (0 for an unknown id).
    pub fn active_connections(&self, id: &str) -> usize {
        self.lock()
            .backends
            .get(id)
            .map_or(0, |b| b.active.load(Ordering::SeqCst))
    }

    /// Open connections to all backends.
    pub fn open_connections(&self) -> usize {
        self.lock()
            .backends
            .values()
            .map(|b| b.active.load(Ordering::SeqCst))
            .sum()
    }

    /// Waits until `id` has no open connection or `timeout` passes; true if drained.
    pub async fn drain(&self, id: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.active_connections(id) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Counts one more request in flight on `backend` if it still gets new connections: the
    /// count is taken before the look, as [`connect_routed`] does, so that a drain that finds
    /// the backend idle after unrouting it never misses a request that reuses a connection to
    /// it. None (nothing counted) once it is no longer routed.
    pub(crate) fn hold(&self, backend: &BackendRef) -> Option<Count> {
        let count = Count::new(&backend.0.active);
        let routed = self.lock().routed.iter().any(|t| backend.is(t));
        routed.then_some(count)
    }

    /// Whether `other` is this very table (a clone of these routes).
    pub(crate) fn same(&self, other: &Routes) -> bool {
        Arc::ptr_eq(&self.table, &other.table)
    }

    /// The routed backends and the index to start from, round-robin.
    fn candidates(&self) -> (Arc<[Target]>, usize) {
        let mut table = self.lock();
        let routed = table.routed.clone();
        let start = match routed.len() {
            0 => 0,
            n => table.next % n,
        };
        table.next = table.next.wrapping_add(1);
        (routed, start)
    }
}

/// Proxy threads for one endpoint: one per CPU core (at most 4). A single thread would get one
/// scheduler share against the clients' and backends' many threads, and with long connections it
/// was the bottleneck (16 echo connections: 0.28 of direct throughput on one thread).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Binds the listening sockets of an endpoint on `addr`: `threads` sockets sharing the port with
/// `SO_REUSEPORT`, so the kernel spreads new connections over the proxy threads and wakes only the
/// one that gets each. A port already in use by anything else is refused, as a plain bind would
/// (`SO_REUSEPORT` alone would let this endpoint silently share a port another process of the same
/// user holds with that option too), unless `check_free` is false (the endpoint itself holds it).
/// An IPv6 address serves IPv6 only (`IPV6_V6ONLY`), so that `[::]:80` and `0.0.0.0:80` can both
/// be bound, as `bind` lists them.
pub fn bind(
    addr: SocketAddr,
    threads: usize,
    check_free: bool,
) -> io::Result<Vec<std::net::TcpListener>> {
    if addr.port() != 0 && check_free {
        // A plain bind fails on any holder of the port, reuseport or not; closed again at once.
        drop(plain_socket(addr, false)?);
    }
    let first = reuseport_listener(addr)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads.max(1) {
        listeners.push(reuseport_listener(addr)?);
    }
    Ok(listeners)
}

/// A TCP socket bound to `addr` (IPv6 only for an IPv6 address), not listening; with
/// `reuseport`, one of a group that share the port.
fn plain_socket(addr: SocketAddr, reuseport: bool) -> io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let socket = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    if addr.is_ipv6() {
        sockopt::set_ipv6_v6only(&socket, true)?;
    }
    sockopt::set_socket_reuseaddr(&socket, true)?;
    if reuseport {
        sockopt::set_socket_reuseport(&socket, true)?;
    }
    rustix::net::bind(&socket, &addr)?;
    Ok(socket)
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = plain_socket(addr, true)?;
    // A deep accept queue: a burst of new connections waits for the next accept instead of
    // being dropped (somaxconn caps it).
    rustix::net::listen(&socket, 4096)?;
    Ok(std::net::TcpListener::from(socket))
}

/// Runs [`serve`] for each listener (from [`bind`]) on a thread of its own with a current-thread
/// runtime, so the relay never competes with the controller's runtime (health probes, API) for a
/// worker and never pays a cross-thread wake-up. Each thread ends once `shutdown` turns true (or
/// its sender is dropped) and the connections it had open at that moment have closed.
pub fn spawn(
    listeners: Vec<std::net::TcpListener>,
    routes: Routes,
    shutdown: watch::Receiver<bool>,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    spawn_with(listeners, shutdown, move |listener, shutdown| {
        serve(listener, routes.clone(), shutdown)
    })
}

/// [`spawn`] with another server per listener (the host router's, [`crate::router`]).
pub(crate) fn spawn_with<F, Fut>(
    listeners: Vec<std::net::TcpListener>,
    shutdown: watch::Receiver<bool>,
    serve: F,
) -> io::Result<Vec<std::thread::JoinHandle<()>>>
where
    F: Fn(TcpListener, watch::Receiver<bool>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()>,
{
    let mut threads = Vec::with_capacity(listeners.len());
    for (index, listener) in listeners.into_iter().enumerate() {
        listener.set_nonblocking(true)?;
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let serve = serve.clone();
        let shutdown = shutdown.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("imago-proxy-{port}-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        // from_std fails only without a reactor, which this runtime has.
                        if let Ok(listener) = TcpListener::from_std(listener) {
                            serve(listener, shutdown).await;
                        }
                    });
                })?,
        );
    }
    Ok(threads)
}

/// Accepts connections on `listener` until `shutdown` turns true (or its sender is dropped),
/// forwarding each to a routed backend; then waits for the open connections to close. A
/// connection that no backend accepts is closed at once.
pub async fn serve(listener: TcpListener, routes: Routes, shutdown: watch::Receiver<bool>) {
    accept_loop(listener, shutdown, move |client| {
        forward(client, routes.clone())
    })
    .await;
}

/// Accepts connections on `listener` until `shutdown` turns true (or its sender is dropped),
/// each handled by a task of its own; then waits for those tasks to end.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() { break; }
                continue;
            }
        };
        let Ok((client, _)) = accepted else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let guard = Count::new(&open);
        let handling = handle(client);
        tokio::spawn(async move {
            handling.await;
            drop(guard);
        });
    }
    drop(listener);
    // Connections accepted before the shutdown are relayed to their end (they may be draining).
    while open.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One backend of a [`Routes`], as [`connect_routed_backend`] reached it.
#[derive(Debug, Clone)]
pub(crate) struct BackendRef(Target);

impl BackendRef {
    fn is(&self, target: &Target) -> bool {
        Arc::ptr_eq(&self.0.active, &target.active)
    }
}

/// The instance as messages name it: `ID at ADDRESS`.
impl std::fmt::Display for BackendRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.0.id, self.0.addr)
    }
}

/// Holds one unit of a counter for as long as it lives, also when its task is cancelled.
pub(crate) struct Count(Arc<AtomicUsize>);

impl Count {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Count(counter.clone())
    }
}

impl Drop for Count {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn forward(client: TcpStream, routes: Routes) {
    if let Some((upstream, _count)) = connect_routed(&routes).await {
        let _ = client.set_nodelay(true);
        let _ = relay(&client, &upstream).await;
    }
}

/// A connection to one of the routed backends, round-robin, the next one tried if one refuses;
/// counted for that backend (drains wait for it) for as long as the [`Count`] lives. None when
/// no routed backend accepts.
pub(crate) async fn connect_routed(routes: &Routes) -> Option<(TcpStream, Count)> {
    connect_routed_backend(routes, &[])
        .await
        .ok()
        .map(|(upstream, count, _)| (upstream, count))
}

/// Why no routed backend took a connection: the last one tried and what its connect said, or
/// None when none is routed.
pub(crate) type Unreachable = Option<(BackendRef, io::Error)>;

/// [`connect_routed`], with the backend it reached, for [`Routes::hold`] on later requests
/// over the same connection. The backends in `last` (ones that just failed a request) are tried
/// only after every other routed one. A routed set replaced while every backend of the one
/// picked from refused (an instance killed, its successor routed since) is tried too.
pub(crate) async fn connect_routed_backend(
    routes: &Routes,
    last: &[BackendRef],
) -> Result<(TcpStream, Count, BackendRef), Unreachable> {
    let (targets, start) = routes.candidates();
    let unreachable = match connect_first(&targets, start, last).await {
        Ok(connected) => return Ok(connected),
        Err(unreachable) => unreachable,
    };
    let (newer, start) = routes.candidates();
    if Arc::ptr_eq(&newer, &targets) {
        return Err(unreachable);
    }
    connect_first(&newer, start, last)
        .await
        .map_err(|newer| newer.or(unreachable))
}

/// The first of `targets` from `start` on (round-robin) that accepts a connection, those in
/// `last` after the others.
async fn connect_first(
    targets: &[Target],
    start: usize,
    last: &[BackendRef],
) -> Result<(TcpStream, Count, BackendRef), Unreachable> {
    let n = targets.len();
    let in_order = || targets.iter().cycle().skip(start).take(n);
    let failed = |target: &Target| last.iter().any(|b| b.is(target));
    let others = in_order().filter(|t| !failed(t));
    let mut unreachable = None;
    for target in others.chain(in_order().filter(|t| failed(t))) {
        // Count the connection before connecting, so a drain never misses one in flight.
        let count = Count::new(&target.active);
        match connect(target.addr).await {
            Ok(upstream) => return Ok((upstream, count, BackendRef(target.clone()))),
            Err(e) => unreachable = Some((BackendRef(target.clone()), e)),
        }
    }
    Err(unreachable)
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut wait = FIRST_SYN_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_nodelay(true)?;
        // A connection the kernel completed while this thread was busy wins over the timeout:
        // tokio polls the connect before the timer.
        if let Ok(connected) = tokio::time::timeout(wait.min(left), socket.connect(addr)).await {
            return connected;
        }
        wait = wait.saturating_mul(2);
    }
}

/// Relays both directions until both reached end of file (each end's write side is shut down
/// when its peer's read side ends) or one fails.
pub(crate) async fn relay(client: &TcpStream, upstream: &TcpStream) -> io::Result<()> {
    let client_done = AtomicBool::new(false);
    let upstream_done = AtomicBool::new(false);
    tokio::try_join!(
        pump(client, upstream, &client_done, &upstream_done),
        pump(upstream, client, &upstream_done, &client_done),
    )?;
    Ok(())
}

/// Copies `src` to `dst` until `src` ends, then shuts `dst`'s write side down, unless the other
/// direction has ended too: then both sockets are about to be closed, which sends the same FIN.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    done: &AtomicBool,
    other_done: &AtomicBool,
) -> io::Result<()> {
    let mut buf = Buffer::take();
    loop {
        src.readable().await?;
        let mut got = 0;
        let read = src.try_io(Interest::READABLE, || {
            got = rustix::net::recv(src, &mut buf[..], rustix::net::RecvFlags::empty())?.0;
            // A TCP recv that returns less than asked emptied the receive queue, so the next
            // one would only say EAGAIN: report "would block" now, which makes tokio forget
            // the readiness and wait for the next edge, saving that syscall per message.
            // Data arriving after this recv raises a new edge; an end of file that came with
            // this data stays visible (tokio never clears the closed state).
            if got > 0 && got < buf.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(got)
        });
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        write_all(dst, &buf[..n]).await?;
        if n == buf.len() {
            // Bulk from here on: the buffer goes back to the pool for the next connection.
            drop(buf);
            splice_all(src, dst).await?;
            break;
        }
    }
    done.store(true, Ordering::SeqCst);
    if !other_done.load(Ordering::SeqCst) {
        // ENOTCONN when the peer is gone already: nothing left to tell it.
        let _ = rustix::net::shutdown(dst, rustix::net::Shutdown::Write);
    }
    Ok(())
}

pub(crate) async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A relay buffer from a per-thread pool: a connection takes two, and allocating and zeroing
/// 32 KiB per connection showed up when every request is a new connection.
struct Buffer(Box<[u8]>);

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

impl Buffer {
    fn take() -> Buffer {
        let pooled = BUFFERS.with(|b| b.borrow_mut().pop());
        Buffer(pooled.unwrap_or_else(|| vec![0u8; RELAY_BUFFER].into_boxed_slice()))
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Drop for Buffer {
    /// Back to the pool (an empty box is left behind, which allocates nothing).
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        BUFFERS.with(|b| {
            let mut pool = b.borrow_mut();
            if pool.len() < 2 * PIPE_POOL {
                pool.push(buf);
            }
        });
    }
}

/// An empty pipe for [`splice_all`].
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(pipe);
        }
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Best effort: a smaller pipe only means more splice calls.
        let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE);
        Ok(Pipe { read, write })
    }

    /// Keeps an empty pipe for the next transfer (a pipe with bytes left in it is dropped).
    fn give_back(self) {
        PIPES.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < PIPE_POOL {
                pool.push(self);
            }
        });
    }
}

/// Moves everything `src` still sends to `dst` through a pipe with `splice(2)`: the kernel
/// hands the socket buffers' pages over without copying them through user space.
async fn splice_all(src: &TcpStream, dst: &TcpStream) -> io::Result<()> {
    let pipe = Pipe::take()?;
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    loop {
        src.readable().await?;
        let filled = src.try_io(Interest::READABLE, || {
            Ok(rustix::pipe::splice(
                src,
                None,
                &pipe.write,
                None,
                PIPE_SIZE,
                flags,
            )?)
        });
        let mut left = match filled {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        while left > 0 {
            dst.writable().await?;
            let sent = dst.try_io(Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(
                    &pipe.read, None, dst, None, left, flags,
                )?)
            });
            match sent {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    pipe.give_back();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend that answers every connection with its name and closes.
    async fn named_backend(name: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(name.as_bytes()).await;
                });
            }
        });
        addr
    }

    async fn ask(endpoint: SocketAddr) -> String {
        let mut s = TcpStream::connect(endpoint).await.unwrap();
        s.write_all(b"hi").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// An endpoint on its own thread, as the controller runs it.
    async fn endpoint(routes: Routes) -> (SocketAddr, watch::Sender<bool>) {
        let (addr, tx, _thread) = endpoint_thread(routes).await;
        (addr, tx)
    }

    /// Two threads, as on the 2-core machine, so that tests cross both of them.
    async fn endpoint_thread(
        routes: Routes,
    ) -> (
        SocketAddr,
        watch::Sender<bool>,
        Vec<std::thread::JoinHandle<()>>,
    ) {
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 2, true).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let threads = spawn(listeners, routes, rx).unwrap();
        (addr, tx, threads)
    }

    /// Deterministic bytes that no two offsets of a shifted copy share.
    fn pattern(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x1234_5678;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (x >> 24) as u8
            })
            .collect()
    }

    #[tokio::test]
    async fn large_bodies_cross_intact_in_both_directions_and_half_close_is_kept() {
        // A backend that reads the whole upload (until the client shuts its write side), then
        // answers with the upload reversed and closes.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.unwrap();
                    got.reverse();
                    s.write_all(&got).await.unwrap();
                });
            }
        });
        let routes = Routes::default();
        routes.set(&[("big".into(), backend)]);
        let (ep, _stop) = endpoint(routes.clone()).await;
        // Twice: the second transfer reuses the first one's pipes.
        for len in [3 * 1024 * 1024 + 17, 5 * 1024 * 1024] {
            let upload = pattern(len);
            let mut s = TcpStream::connect(ep).await.unwrap();
            s.write_all(&upload).await.unwrap();
            s.shutdown().await.unwrap();
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await.unwrap();
            let mut expected = upload;
            expected.reverse();
            assert_eq!(answer.len(), expected.len());
            assert!(answer == expected, "bytes changed on the way");
        }
        assert!(routes.drain("big", Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn a_stopped_endpoint_refuses_new_connections_and_finishes_open_ones() {
        // A backend that echoes until the client closes.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let routes = Routes::default();
        routes.set(&[("echo".into(), echo)]);
        let (ep, stop, threads) = endpoint_thread(routes.clone()).await;
        let mut open = TcpStream::connect(ep).await.unwrap();
        open.write_all(b"one").await.unwrap();
        let mut buf = [0u8; 3];
        open.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"one");
        stop.send(true).unwrap();
        let mut refused = false;
        for _ in 0..100 {
            if TcpStream::connect(ep).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "the endpoint still accepts after its shutdown");
        // The connection opened before the shutdown is still relayed.
        open.write_all(b"two").await.unwrap();
        open.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"two");
        // The thread holding the open connection still runs; the other one may have ended.
        assert!(threads.iter().any(|t| !t.is_finished()));
        drop(open);
        assert!(routes.drain("echo", Duration::from_secs(5)).await);
        for _ in 0..250 {
            if threads.iter().all(|t| t.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            threads.iter().all(|t| t.is_finished()),
            "a proxy thread outlived its last connection"
        );
    }

    #[tokio::test]
    async fn forwards_round_robin_to_routed_backends_only() {
        let a = named_backend("a").await;
        let b = named_backend("b").await;
        let c = named_backend("c").await;
        let routes = Routes::default();
        routes.set(&[("a".into(), a), ("b".into(), b)]);
        let (ep, _stop) = endpoint(routes.clone()).await;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..6 {
            seen.insert(ask(ep).await);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec!["a", "b"]);
        routes.set(&[("c".into(), c)]);
        for _ in 0..3 {
            assert_eq!(ask(ep).await, "c");
        }
    }

    #[tokio::test]
    async fn a_refusing_backend_is_skipped_without_the_client_noticing() {
        let good = named_backend("good").await;
        // A port nothing listens on.
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let routes = Routes::default();
        routes.set(&[("dead".into(), dead), ("good".into(), good)]);
        let (ep, _stop) = endpoint(routes).await;
        for _ in 0..4 {
            assert_eq!(ask(ep).await, "good");
        }
    }

    #[tokio::test]
    async fn drain_waits_for_open_connections_of_an_unrouted_backend() {
        // A backend that holds the connection open until the client closes it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let slow = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            while s.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
        });
        let routes = Routes::default();
        routes.set(&[("slow".into(), slow)]);
        let (ep, _stop) = endpoint(routes.clone()).await;
        let mut client = TcpStream::connect(ep).await.unwrap();
        client.write_all(b"x").await.unwrap();
        for _ in 0..100 {
            if routes.active_connections("slow") == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(routes.active_connections("slow"), 1);
        routes.set(&[]);
        assert!(routes.routed().is_empty());
        assert!(
            !routes.drain("slow", Duration::from_millis(100)).await,
            "still open"
        );
        drop(client);
        assert!(routes.drain("slow", Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn a_syn_lost_to_a_full_accept_queue_is_sent_again_without_waiting_a_second() {
        // A backend whose accept queue holds one connection, filled by a direct client, so the
        // kernel drops the proxy's first SYN; it starts accepting 100 ms later.
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let socket = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        rustix::net::bind(&socket, &any).unwrap();
        rustix::net::listen(&socket, 0).unwrap();
        let listener = TcpListener::from_std(std::net::TcpListener::from(socket)).unwrap();
        let backend = listener.local_addr().unwrap();
        let _queued = TcpStream::connect(backend).await.unwrap();
        let routes = Routes::default();
        routes.set(&[("full".into(), backend)]);
        let (ep, _stop) = endpoint(routes).await;
        let started = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(b"served").await;
                });
            }
        });
        assert_eq!(ask(ep).await, "served");
        // The kernel alone would send the SYN again only after its initial timeout, 1 s after
        // the first SYN, which went after `started`: an answer within 1 s can only come from a
        // SYN the proxy sent again (900 ms was missed at load 50 by the scheduling alone).
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
    }

    #[test]
    fn a_port_held_by_anything_else_is_refused_even_if_it_shares_with_reuseport() {
        // Another holder that allows sharing: SO_REUSEPORT alone would let the endpoint join it.
        let other = bind("127.0.0.1:0".parse().unwrap(), 1, true).unwrap();
        let port = other[0].local_addr().unwrap();
        let err = bind(port, 2, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // Once it is gone, the port can be bound with one socket per thread.
        drop(other);
        let mine = bind(port, 2, true).unwrap();
        assert_eq!(mine.len(), 2);
        assert!(mine.iter().all(|l| l.local_addr().unwrap() == port));
    }

    #[tokio::test]
    async fn no_backend_closes_the_connection() {
        let routes = Routes::default();
        let (ep, _stop) = endpoint(routes).await;
        let mut s = TcpStream::connect(ep).await.unwrap();
        let mut out = Vec::new();
        let n = s.read_to_end(&mut out).await.unwrap_or(0);
        assert_eq!(n, 0);
    }
}

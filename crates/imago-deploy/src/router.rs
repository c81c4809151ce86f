//! Host-routed endpoints: several services on one address, each HTTP/1.1 request sent to the
//! service that its own `Host` names, optionally behind TLS terminated here with certificates
//! from files (chosen by SNI).
//!
//! One [`Front`] serves one address for every service that declares `hosts` on it. It runs on
//! the proxy's threads ([`crate::proxy::spawn_with`]: one per core, `SO_REUSEPORT`) and sends a
//! request only to a routed instance of the chosen service, counted in that service's
//! [`Routes`] from before it is sent until its response body is relayed, so health gating and
//! drains are the plain proxy's with a request in flight where the proxy has a connection.
//!
//! Both sides speak HTTP/1.1 through hyper, as a reverse proxy in HTTP mode does (Traefik,
//! Caddy, HAProxy `mode http`): every request of a keep-alive connection is routed by its own
//! host (an unknown one gets 404 and the connection goes on), and the client's connection is
//! not pinned to an instance: the connection to the instance that the last request used is
//! reused while that instance is routed and the request goes to the same service, else the next
//! request connects anew, round-robin. So a retired instance drains as soon as its requests in
//! flight are answered, whatever its clients' idle keep-alive connections do, and a client
//! keeps its connection when an instance closes its own (busybox httpd closes after every
//! response). Each side frames its own messages (hop-by-hop headers are dropped, a body of
//! unknown length goes chunked); pipelined requests are answered one after the other; a switch
//! of protocols (websocket) is relayed as bytes, pinned to its instance and counted on it until
//! it ends. A request that fails at an instance goes again on a new connection when it may
//! (nothing of it sent, or an idempotent one whose body was not sent: [`Client::answer`]), and
//! one that cannot is a 502 naming the instance. HTTP/2 is not spoken: TLS selects no ALPN
//! protocol, so clients fall back to HTTP/1.1. A TLS front's catch-all service (no `hosts`) may
//! speak any protocol: its connections are relayed as bytes to one instance.
//!
//! The kernel path (balancer, nftables DNAT) cannot read a `Host` header or terminate TLS, so a
//! host-routed endpoint is never given to it: local and remote clients alike go through here.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot, watch};
use tokio_rustls::TlsAcceptor;

use crate::error::DeployError;
use crate::proxy::{self, BackendRef, Count, Routes};
use crate::spec::ServiceSpec;

/// A request head larger than this is refused (431), as nginx's default buffers would.
const MAX_HEAD: usize = 16 * 1024;
/// A request head with more header fields than this is refused (431).
const MAX_HEADERS: usize = 64;
/// How long a keep-alive connection may stay idle between requests (from the end of a response
/// to the end of the next request head), as Caddy's and Traefik's idle timeouts (HAProxy's
/// `timeout http-keep-alive`); then it is closed. 3 s in unit tests, which wait it out.
const IDLE_TIMEOUT: Duration = Duration::from_secs(if cfg!(test) { 3 } else { 60 });
/// How long a kept connection to an instance may take to be ready for the next request before
/// a new one is made instead (it is ready at once unless the instance is closing it).
const REUSE_WAIT: Duration = Duration::from_millis(500);
/// How many times a request may go again after a try failed at an instance, each time on a
/// new connection (HAProxy's `retries`, 3 by default).
const RETRIES: usize = 3;
/// A request that could not go again if its instance closed the connection as it came (one of a
/// method that is not idempotent, or with a body) takes a kept connection only if that
/// connection's last response came within this long; else it goes on a new one. Instances
/// close idle connections after a timeout of their own (gunicorn after 2 s, Apache and Node
/// after 5 s), and a request written as one does is lost.
const UNSAFE_REUSE_IDLE: Duration = Duration::from_secs(1);
/// How long a client may take for the TLS handshake and its first request head together, as
/// HAProxy's `timeout http-request` (nginx's `client_header_timeout`): a client that opens
/// connections and sends nothing must not hold them forever.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections of one source (an IPv4 address, an IPv6 /64) that may wait for their first
/// request head at once; a new one beyond closes that source's longest-waiting one. A real client
/// sends its head within a round trip of connecting, so only a client that opens connections
/// faster than it uses them (slowloris) meets this.
const WAITING_PER_SOURCE: usize = 128;
/// Connections of the whole data plane that may wait for their first request head at once, as
/// a share of the open-files limit (each takes a descriptor, and a routed one takes a second
/// for its instance); a new one beyond closes the longest-waiting one, whatever its source, so
/// that many sources opening idle connections slow down real clients but never lock them out.
const WAITING_SHARE_OF_OPEN_FILES: usize = 4;
/// The least [`HeadLimits::total`], whatever the open-files limit says.
const WAITING_TOTAL_FLOOR: usize = 64;
/// How often a TLS front's loader thread looks at its certificate files (their inode, size and
/// modification time) for a replacement.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// How a service's endpoint routes: by host name, through TLS, or both. Neither: the plain TCP
/// proxy of [`crate::proxy`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsPaths>,
}

/// The PEM files of a service's certificate chain and key, absolute (resolved against the
/// definition file when it was read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Routing {
    pub fn of(spec: &ServiceSpec) -> Routing {
        Routing {
            hosts: spec.hosts.clone(),
            tls: spec.tls.as_ref().map(|t| TlsPaths {
                cert: PathBuf::from(&t.cert),
                key: PathBuf::from(&t.key),
            }),
        }
    }

    /// Neither hosts nor TLS: served by the plain proxy (and the kernel path).
    pub fn is_plain(&self) -> bool {
        self.hosts.is_empty() && self.tls.is_none()
    }
}

fn tls_error(path: &Path, reason: impl std::fmt::Display) -> DeployError {
    DeployError::Tls {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Reads and checks a certificate chain and its key: every error names the file at fault.
pub fn load_certified_key(paths: &TlsPaths) -> Result<Arc<CertifiedKey>, DeployError> {
    let chain = CertificateDer::pem_file_iter(&paths.cert)
        .map_err(|e| tls_error(&paths.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(&paths.cert, e))?;
    if chain.is_empty() {
        return Err(tls_error(&paths.cert, "holds no PEM CERTIFICATE"));
    }
    let key = PrivateKeyDer::from_pem_file(&paths.key).map_err(|e| tls_error(&paths.key, e))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| tls_error(&paths.key, e))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        tls_error(
            &paths.key,
            format!("does not belong to {}: {e}", paths.cert.display()),
        )
    })?;
    Ok(Arc::new(certified))
}

/// Identity of a file's content as far as a look at its metadata tells: a replacement (rename
/// over, or a rewrite) changes one of these.
type Stamp = Option<(u64, u64, SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.ino(), meta.len(), meta.modified().ok()?))
}

/// Messages for the controller's event log, taken with [`Front::take_failures`].
type Failures = Arc<Mutex<Vec<String>>>;

/// A service's certificate, reloaded when its files change on disk.
#[derive(Debug)]
struct CertFiles {
    service: String,
    paths: TlsPaths,
    state: Mutex<CertState>,
    failures: Failures,
}

#[derive(Debug)]
struct CertState {
    key: Arc<CertifiedKey>,
    stamps: [Stamp; 2],
    /// The files as they were when they last failed to load: reported once per change.
    failed: Option<[Stamp; 2]>,
}

impl CertFiles {
    fn load(service: &str, paths: &TlsPaths, failures: Failures) -> Result<CertFiles, DeployError> {
        let stamps = [stamp(&paths.cert), stamp(&paths.key)];
        let key = load_certified_key(paths)?;
        Ok(CertFiles {
            service: service.to_owned(),
            paths: paths.clone(),
            state: Mutex::new(CertState {
                key,
                stamps,
                failed: None,
            }),
            failures,
        })
    }

    fn lock(&self) -> MutexGuard<'_, CertState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The certificate to serve, as last loaded: a handshake on a proxy thread never touches
    /// the files (a slow or hung file system stalls the loader thread only).
    fn current(&self) -> Arc<CertifiedKey> {
        self.lock().key.clone()
    }

    /// Loads the files again if they changed since the last look (run by the front's loader
    /// thread, [`watch_certificates`]). A pair that does not load (a new chain next to the old
    /// key while both are being replaced, a broken file) leaves the last good one served and is
    /// tried again at the next look; its error is reported once for each state of the files.
    fn refresh(&self) {
        let stamps = [stamp(&self.paths.cert), stamp(&self.paths.key)];
        {
            let state = self.lock();
            if stamps == state.stamps {
                return;
            }
        }
        // Read without the lock: handshakes keep taking the current key meanwhile.
        let loaded = load_certified_key(&self.paths);
        let mut state = self.lock();
        match loaded {
            Ok(key) => {
                state.key = key;
                state.stamps = stamps;
                state.failed = None;
            }
            Err(_) if state.failed == Some(stamps) => {}
            Err(e) => {
                state.failed = Some(stamps);
                self.failures
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(format!(
                        "service {}: {e}; the last certificate that loaded is still served",
                        self.service
                    ));
            }
        }
    }
}

/// The loader thread of a TLS front: every [`RELOAD_CHECK`], refreshes the certificate of each
/// service on the front, until the front is dropped (`shutdown` turns true or its sender goes).
fn watch_certificates(
    table: Arc<FrontTable>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("imago-certificates".into())
        .spawn(move || {
            loop {
                std::thread::sleep(RELOAD_CHECK);
                if shutdown.has_changed().is_err() || *shutdown.borrow_and_update() {
                    return;
                }
                for service in table.snapshot().values() {
                    if let Some(certs) = &service.certs {
                        certs.refresh();
                    }
                }
            }
        })
}

/// Caps on connections still waiting for their first request head (and, over TLS, for their
/// handshake), shared by every front of a data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Waiting connections of one source (an IPv4 address or an IPv6 /64).
    pub per_source: usize,
    /// Waiting connections in all.
    pub total: usize,
}

impl HeadLimits {
    /// The defaults: [`WAITING_PER_SOURCE`] per source, a quarter of the open-files limit in
    /// all (read now: the data plane raises its limit first).
    pub fn for_open_files() -> HeadLimits {
        let open_files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(1024);
        let total = (open_files / WAITING_SHARE_OF_OPEN_FILES).max(WAITING_TOTAL_FLOOR);
        HeadLimits {
            per_source: WAITING_PER_SOURCE.min(total),
            total,
        }
    }
}

/// Where a connection comes from, for [`HeadLimits::per_source`]: an IPv6 client usually holds
/// a whole /64, so its addresses count as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(std::net::Ipv4Addr),
    V6Prefix(u64),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6Prefix((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

/// The connections waiting for their first head, oldest first, with the signal that closes
/// each: admitting one past a cap evicts the oldest under that cap.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: HeadLimits,
    waiting: Mutex<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    next: u64,
    /// By admission order: the first entry has waited longest.
    queue: BTreeMap<u64, (Source, Arc<Notify>)>,
    by_source: HashMap<Source, VecDeque<u64>>,
}

impl Waiting {
    /// Forgets `id` (evicted, or its head came); its eviction signal, if it was still here.
    fn forget(&mut self, id: u64) -> Option<Arc<Notify>> {
        let (source, evict) = self.queue.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&source) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(evict)
    }
}

impl Default for Admission {
    fn default() -> Admission {
        Admission::new(HeadLimits::for_open_files())
    }
}

impl Admission {
    pub(crate) fn new(limits: HeadLimits) -> Admission {
        Admission {
            limits,
            waiting: Mutex::new(Waiting::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a new connection from `ip` as waiting, evicting the oldest one of its source, then
    /// the oldest of all, when a cap is reached.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> WaitingForHead {
        let source = Source::of(ip);
        let evict = Arc::new(Notify::new());
        let mut waiting = self.lock();
        let mut evicted = Vec::new();
        let oldest_of_source = waiting
            .by_source
            .get(&source)
            .filter(|ids| ids.len() >= self.limits.per_source.max(1))
            .and_then(|ids| ids.front().copied());
        if let Some(id) = oldest_of_source {
            evicted.extend(waiting.forget(id));
        }
        while waiting.queue.len() >= self.limits.total.max(1) {
            let Some(id) = waiting.queue.keys().next().copied() else {
                break;
            };
            evicted.extend(waiting.forget(id));
        }
        let id = waiting.next;
        waiting.next += 1;
        waiting.queue.insert(id, (source, evict.clone()));
        waiting.by_source.entry(source).or_default().push_back(id);
        drop(waiting);
        for notify in evicted {
            // Kept as a permit when its task is not waiting on it yet.
            notify.notify_one();
        }
        WaitingForHead {
            admission: self.clone(),
            id,
            evict,
        }
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lock().queue.len()
    }
}

/// One connection counted as waiting for its head until dropped.
pub(crate) struct WaitingForHead {
    admission: Arc<Admission>,
    id: u64,
    evict: Arc<Notify>,
}

impl WaitingForHead {
    /// Returns once a newer connection took this one's place.
    async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for WaitingForHead {
    fn drop(&mut self) {
        self.admission.lock().forget(self.id);
    }
}

/// One service on a front.
#[derive(Debug, Clone)]
struct FrontService {
    hosts: Vec<String>,
    routes: Routes,
    certs: Option<Arc<CertFiles>>,
}

impl FrontService {
    /// `service`'s entry, its certificate loaded now; reload failures go to `failures`.
    fn new(
        service: &str,
        routing: &Routing,
        routes: &Routes,
        failures: &Failures,
    ) -> Result<FrontService, DeployError> {
        let certs = match &routing.tls {
            Some(paths) => Some(Arc::new(CertFiles::load(service, paths, failures.clone())?)),
            None => None,
        };
        Ok(FrontService {
            hosts: routing.hosts.clone(),
            routes: routes.clone(),
            certs,
        })
    }
}

/// The services of one address, as its proxy threads see them: replaced whole as a snapshot,
/// so a connection looks up its host without holding a lock.
#[derive(Debug, Default)]
struct FrontTable {
    services: Mutex<Arc<BTreeMap<String, FrontService>>>,
}

impl FrontTable {
    fn lock(&self) -> MutexGuard<'_, Arc<BTreeMap<String, FrontService>>> {
        self.services
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn snapshot(&self) -> Arc<BTreeMap<String, FrontService>> {
        self.lock().clone()
    }

    fn update(&self, change: impl FnOnce(&mut BTreeMap<String, FrontService>)) {
        let mut services = self.lock();
        let mut next = (**services).clone();
        change(&mut next);
        *services = Arc::new(next);
    }
}

/// The service `host` goes to: an exact name first, then a `*.` pattern.
fn find<'a>(
    services: &'a BTreeMap<String, FrontService>,
    host: &str,
) -> Option<(&'a String, &'a FrontService)> {
    services
        .iter()
        .find(|(_, s)| s.hosts.iter().any(|h| h == host))
        .or_else(|| {
            services.iter().find(|(_, s)| {
                s.hosts
                    .iter()
                    .any(|h| h.starts_with("*.") && imago_spec::host_matches(h, host))
            })
        })
}

/// The service that takes every connection of its front: one without `hosts` (TLS only),
/// which the plan lets no other service share an address with.
fn catch_all(services: &BTreeMap<String, FrontService>) -> Option<&FrontService> {
    services.values().find(|s| s.hosts.is_empty())
}

/// Picks the certificate by SNI: the service whose hosts match the name, else (no SNI, an
/// unknown name) the first service's, so that such a client still gets a handshake and then a
/// 404 for its host.
#[derive(Debug)]
struct SniResolver(Arc<FrontTable>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let services = self.0.snapshot();
        // rustls hands the name over lowercase already.
        let named = hello
            .server_name()
            .and_then(|name| find(&services, name))
            .and_then(|(_, s)| s.certs.as_ref());
        named
            .or_else(|| services.values().find_map(|s| s.certs.as_ref()))
            .map(|certs| certs.current())
    }
}

/// One address served for host-routed services; dropped, it stops accepting (open connections
/// are relayed to their end).
pub struct Front {
    table: Arc<FrontTable>,
    addr: SocketAddr,
    tls: bool,
    failures: Failures,
    gateway: Arc<GatewayLog>,
    accepting: watch::Sender<bool>,
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.accepting.send(true);
    }
}

impl Front {
    /// Listens on `addr` (see [`proxy::bind`] for `check_free`), with TLS or without, for
    /// `service` first: it is in the table before the first connection is accepted, so that no
    /// request meets an empty front (a 404, or a handshake without a certificate) while a
    /// service moves onto a port its earlier endpoint still serves. Connections waiting for
    /// their first head are counted in `admission`, shared with the data plane's other fronts.
    pub(crate) fn start(
        addr: SocketAddr,
        tls: bool,
        check_free: bool,
        admission: Arc<Admission>,
        first: (&str, &Routing, &Routes),
    ) -> Result<Front, DeployError> {
        let listen_error = |e: io::Error| DeployError::InvalidService {
            service: first.0.to_owned(),
            field: "hosts".into(),
            reason: format!("cannot listen on {addr}: {e}"),
        };
        let listeners =
            proxy::bind(addr, proxy::default_threads(), check_free).map_err(listen_error)?;
        let bound = match listeners.first() {
            Some(listener) => listener.local_addr().map_err(listen_error)?,
            None => addr,
        };
        let table = Arc::new(FrontTable::default());
        let failures = Failures::default();
        let (service, routing, routes) = first;
        let entry = FrontService::new(service, routing, routes, &failures)?;
        table.update(|services| {
            services.insert(service.to_owned(), entry);
        });
        let acceptor = if tls {
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| listen_error(io::Error::other(e)))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver(table.clone())));
            // No ALPN answer at all: HTTP/2 is not spoken, and a client that offers `h2` and
            // `http/1.1` falls back to HTTP/1.1 without one; offering only `http/1.1` made
            // rustls abort every client that offers nothing else (gRPC's `h2`, PostgreSQL's
            // direct TLS with `postgresql`), which a front for any TCP protocol must serve.
            Some(TlsAcceptor::from(Arc::new(config)))
        } else {
            None
        };
        let (accepting, shutdown) = watch::channel(false);
        if tls {
            watch_certificates(table.clone(), shutdown.clone()).map_err(listen_error)?;
        }
        let shared = table.clone();
        let gateway = Arc::new(GatewayLog::default());
        let logged = gateway.clone();
        proxy::spawn_with(listeners, shutdown, move |listener, shutdown| {
            let table = shared.clone();
            let acceptor = acceptor.clone();
            let admission = admission.clone();
            let gateway = logged.clone();
            proxy::accept_loop(listener, shutdown, move |client| {
                let shared = Shared {
                    table: table.clone(),
                    admission: admission.clone(),
                    gateway: gateway.clone(),
                };
                handle(client, shared, acceptor.clone())
            })
        })
        .map_err(listen_error)?;
        Ok(Front {
            table,
            addr: bound,
            tls,
            failures,
            gateway,
            accepting,
        })
    }

    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The address it listens on (its port chosen by the system when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Certificate files that failed to reload since the last call, one message each, and the
    /// instances that failed requests (502), one message per instance at most every
    /// [`GATEWAY_REPORT_EVERY`].
    pub fn take_failures(&self) -> Vec<String> {
        let mut failures = std::mem::take(&mut *locked(&self.failures));
        failures.extend(self.gateway.take(Instant::now()));
        failures
    }

    /// Serves `service` here from now on: its hosts, its routes (shared with its other
    /// addresses, so counts add up) and its certificate, loaded now.
    pub fn set(
        &self,
        service: &str,
        routing: &Routing,
        routes: &Routes,
    ) -> Result<(), DeployError> {
        let entry = FrontService::new(service, routing, routes, &self.failures)?;
        self.table.update(|services| {
            services.insert(service.to_owned(), entry);
        });
        Ok(())
    }

    /// Stops routing `service` here; true if no other service is left, and then the table is
    /// left as it is: the front is about to be dropped, and the connections it accepted until
    /// then must still reach the service, not meet an empty table (404).
    pub fn leave(&self, service: &str) -> bool {
        let services = self.table.snapshot();
        if !services.contains_key(service) {
            return services.is_empty();
        }
        if services.len() == 1 {
            return true;
        }
        self.table.update(|services| {
            services.remove(service);
        });
        false
    }

    /// Which service of this front, other than `service`, already answers one of `hosts` (or
    /// takes every host), if one does.
    pub fn claimed(&self, service: &str, hosts: &[String]) -> Option<(String, String)> {
        let services = self.table.snapshot();
        services
            .iter()
            .filter(|(name, _)| name.as_str() != service)
            .find_map(|(name, other)| {
                if other.hosts.is_empty() || hosts.is_empty() {
                    return Some((name.clone(), "every host".to_owned()));
                }
                hosts
                    .iter()
                    .find(|h| other.hosts.contains(h))
                    .map(|h| (name.clone(), format!("host {h:?}")))
            })
    }
}

/// Why a request is answered here instead of by an instance.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    BadRequest(&'static str),
    UnknownHost(String),
    NoInstance(String),
    /// The TLS server name (SNI) picked another service's certificate than the `Host` names.
    Misdirected(String),
    /// An instance failed the request (closed or reset the connection before a whole response
    /// head, after every try the request could have), or answered what was not asked.
    BadGateway(GatewayFailure),
    /// No routed instance took a connection; the failure is the last one tried's.
    Unreachable(GatewayFailure),
}

/// Which instance of which service failed a request, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GatewayFailure {
    service: String,
    /// `ID at ADDRESS`.
    instance: String,
    reason: String,
}

impl Refusal {
    fn status_and_body(&self) -> (StatusCode, String) {
        match self {
            Refusal::BadRequest(why) => (StatusCode::BAD_REQUEST, format!("{why}\n")),
            Refusal::UnknownHost(host) => (
                StatusCode::NOT_FOUND,
                format!("no service for host {host:?}\n"),
            ),
            Refusal::NoInstance(service) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("service {service} has no ready instance\n"),
            ),
            Refusal::Misdirected(host) => (
                StatusCode::MISDIRECTED_REQUEST,
                format!("host {host:?} is not served on this TLS connection\n"),
            ),
            Refusal::BadGateway(failure) => (
                StatusCode::BAD_GATEWAY,
                format!(
                    "instance {} of service {} failed the request: {}\n",
                    failure.instance, failure.service, failure.reason
                ),
            ),
            Refusal::Unreachable(failure) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "no instance of service {} took the connection (the last tried, {}: {})\n",
                    failure.service, failure.instance, failure.reason
                ),
            ),
        }
    }

    /// The answer as bytes, for a connection that is closed after it (a TLS front's catch-all
    /// service, which relays bytes and speaks no HTTP itself).
    fn response(&self) -> Vec<u8> {
        let (status, body) = self.status_and_body();
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// The answer to one request of a keep-alive connection, which goes on after it, except
    /// after a request whose `Host` cannot be trusted (400).
    fn answer(&self) -> Response<Answer> {
        let (status, body) = self.status_and_body();
        let mut response = Response::new(Answer::Local(Some(Bytes::from(body))));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(self, Refusal::BadRequest(_)) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// The host of a `Host` header value: lowercase, without port or trailing dot (borrowed when it
/// is lowercase already, as clients send it: no allocation per request).
fn host_name(value: &[u8]) -> Option<Cow<'_, str>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let host = if text.starts_with('[') {
        text.split_inclusive(']').next().unwrap_or(text)
    } else {
        match text.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => text,
        }
    };
    let host = host.trim_end_matches('.');
    if host.is_empty() {
        return None;
    }
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// The service one request goes to: the one its host names (the authority of an absolute-form
/// target, else its one `Host` header, RFC 9112 section 3.2.2). On TLS, `sni` is the server
/// name the client asked for (lowercase: rustls lowers it before anyone sees it): a `Host` of
/// another service than that name's (whose certificate
/// the client was given) is refused with 421, as RFC 9110 section 15.5.20 has it, instead of
/// served under a certificate that does not name it.
fn route<'a>(
    services: &'a BTreeMap<String, FrontService>,
    uri: &Uri,
    headers: &HeaderMap,
    sni: Option<&str>,
) -> Result<(&'a String, &'a FrontService), Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    // Two Host headers: which one a backend believes is anyone's guess (RFC 9112 section 3.2:
    // answer 400).
    if hosts.next().is_some() {
        return Err(Refusal::BadRequest("more than one Host header"));
    }
    let host = match uri.authority() {
        Some(authority) => host_name(authority.as_str().as_bytes()),
        None => host.and_then(|h| host_name(h.as_bytes())),
    }
    .ok_or(Refusal::BadRequest("no Host header"))?;
    let Some((name, service)) = find(services, &host) else {
        return Err(Refusal::UnknownHost(host.into_owned()));
    };
    let sni_service = sni.and_then(|sni| find(services, sni));
    if sni_service.is_some_and(|(sni_name, _)| sni_name != name) {
        return Err(Refusal::Misdirected(host.into_owned()));
    }
    Ok((name, service))
}

/// Whether a request asks to switch protocols (websocket): an `Upgrade` header named by
/// `Connection`.
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(connection_tokens)
            .any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The tokens of one `Connection` header value, as they are written (compared without case).
fn connection_tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the headers that `value` (a `Connection` header's) names, except `Upgrade` when
/// `upgrade`: looked up as they are, without a new name allocated per request.
fn remove_named(headers: &mut HeaderMap, value: &HeaderValue, upgrade: bool) {
    for token in connection_tokens(value) {
        // Never what routes or frames the message, whatever a client lists.
        let kept = ["host", "content-length"]
            .iter()
            .any(|k| token.eq_ignore_ascii_case(k))
            || (upgrade && token.eq_ignore_ascii_case("upgrade"));
        if !kept {
            headers.remove(token);
        }
    }
}

/// Removes the headers that describe one hop's connection (RFC 9110 section 7.6.1), the ones
/// `Connection` names included: each side of the router frames and keeps alive its own
/// connection. `upgrade` keeps `Upgrade` and says `Connection: upgrade` again.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Taken out whole (one value, as clients send it, moves out without a copy).
    if headers.get_all(header::CONNECTION).iter().nth(1).is_some() {
        let values: Vec<HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect();
        headers.remove(header::CONNECTION);
        for value in &values {
            remove_named(headers, value, upgrade);
        }
    } else if let Some(value) = headers.remove(header::CONNECTION) {
        remove_named(headers, &value, upgrade);
    }
    for name in [header::TE, header::TRAILER, header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Readies a client's request for an instance: origin-form target (the authority of an
/// absolute-form one becomes the `Host`), no hop-by-hop headers, HTTP/1.1, and
/// `X-Forwarded-For` / `X-Forwarded-Proto` / `X-Forwarded-Host` set from this connection. The
/// client's own `X-Forwarded-*` headers are dropped, not appended to, as Traefik and Caddy do
/// for clients they do not trust: nothing in front of a front vouches for them. `peer` is the
/// client's address as a header value, made once per connection.
fn prepare(request: &mut Request<Incoming>, peer: &HeaderValue, tls: bool, upgrade: bool) {
    if request.uri().scheme().is_some() {
        let uri = request.uri().clone();
        if let Some(authority) = uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            request.headers_mut().insert(header::HOST, host);
        }
        if let Some(origin) = uri.path_and_query().and_then(|p| p.as_str().parse().ok()) {
            *request.uri_mut() = origin;
        }
    }
    *request.version_mut() = Version::HTTP_11;
    let headers = request.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    let forwarded_host = headers.get(header::HOST).cloned();
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        headers.remove(name);
    }
    headers.insert("x-forwarded-for", peer.clone());
    let proto = if tls { "https" } else { "http" };
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Some(host) = forwarded_host {
        headers.insert("x-forwarded-host", host);
    }
}

/// A response body as the client gets it: an instance's, with its request counted on that
/// instance until the body is sent or dropped, or one answered here.
enum Answer {
    Relayed { body: Incoming, _count: Count },
    Local(Option<Bytes>),
}

impl Answer {
    fn empty() -> Answer {
        Answer::Local(None)
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Answer::Relayed { body, .. } => Pin::new(body).poll_frame(cx),
            Answer::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answer::Relayed { body, .. } => body.is_end_stream(),
            Answer::Local(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Answer::Relayed { body, .. } => body.size_hint(),
            Answer::Local(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// A request's body as it goes to an instance.
enum Outgoing {
    /// None at all (most requests): a request without one can always be made again.
    Empty,
    /// The client's body, as it comes: its request goes again only if no byte of it was sent.
    Streamed(Incoming),
    /// The client's body of an idempotent request, kept where a failed try can take it back
    /// for the next one, as long as no frame of it was sent.
    Kept(Arc<Mutex<KeptBody>>),
}

struct KeptBody {
    body: Option<Incoming>,
    /// A frame of it went to an instance: it cannot be sent again.
    sent: bool,
}

impl Body for Outgoing {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Outgoing::Empty => Poll::Ready(None),
            Outgoing::Streamed(body) => Pin::new(body).poll_frame(cx),
            Outgoing::Kept(kept) => {
                let mut kept = locked(kept);
                let Some(body) = kept.body.as_mut() else {
                    return Poll::Ready(None);
                };
                let frame = Pin::new(body).poll_frame(cx);
                if let Poll::Ready(Some(_)) = frame {
                    kept.sent = true;
                }
                frame
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Outgoing::Empty => true,
            Outgoing::Streamed(body) => body.is_end_stream(),
            Outgoing::Kept(kept) => locked(kept).body.as_ref().is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Outgoing::Empty => SizeHint::with_exact(0),
            Outgoing::Streamed(body) => body.size_hint(),
            Outgoing::Kept(kept) => locked(kept)
                .body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
        }
    }
}

/// What an idempotent request (RFC 9110 section 9.2.2: GET, HEAD, OPTIONS, TRACE, PUT,
/// DELETE) needs to go again after an instance may have seen it: its head, and its body while
/// no frame of it was sent. A request of another method goes again only when hyper gives it
/// back unsent.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Option<Arc<Mutex<KeptBody>>>,
}

impl Replay {
    /// `request` as it goes to an instance, and what it takes to send it again if it may.
    fn split(request: Request<Incoming>) -> (Request<Outgoing>, Option<Replay>) {
        let (parts, body) = request.into_parts();
        let idempotent = parts.method.is_idempotent();
        let (body, kept) = if body.is_end_stream() {
            (Outgoing::Empty, None)
        } else if idempotent {
            let kept = Arc::new(Mutex::new(KeptBody {
                body: Some(body),
                sent: false,
            }));
            (Outgoing::Kept(kept.clone()), Some(kept))
        } else {
            (Outgoing::Streamed(body), None)
        };
        let replay = idempotent.then(|| Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            body: kept,
        });
        (Request::from_parts(parts, body), replay)
    }

    /// Whether a failure after the head was sent would still leave the request whole for
    /// another try: an idempotent request without a body.
    fn whole(replay: Option<&Replay>) -> bool {
        replay.is_some_and(|r| r.body.is_none())
    }

    /// The request again, for another try; None once a frame of its body was sent.
    fn again(&mut self) -> Option<Request<Outgoing>> {
        let body = match &self.body {
            None => Outgoing::Empty,
            Some(kept) => {
                let body = {
                    let mut kept = locked(kept);
                    if kept.sent {
                        return None;
                    }
                    kept.body.take()?
                };
                let kept = Arc::new(Mutex::new(KeptBody {
                    body: Some(body),
                    sent: false,
                }));
                self.body = Some(kept.clone());
                Outgoing::Kept(kept)
            }
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        Some(request)
    }
}

/// A connection to an instance, kept between the requests of one client connection.
struct Upstream {
    routes: Routes,
    backend: BackendRef,
    sender: SendRequest<Outgoing>,
    /// When its last request's response head came: a request that could not go again after a
    /// failure is sent on it only within [`UNSAFE_REUSE_IDLE`].
    used: Instant,
}

impl Upstream {
    /// A new connection to a routed instance of `routes`, counted for one request; instances in
    /// `failed` (which failed this request) only when no other accepts.
    async fn connect(
        routes: &Routes,
        failed: &[BackendRef],
    ) -> Result<(Upstream, Count), proxy::Unreachable> {
        let (stream, count, backend) = proxy::connect_routed_backend(routes, failed).await?;
        let handshake = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await;
        let (sender, connection) = match handshake {
            Ok(handshake) => handshake,
            Err(e) => return Err(Some((backend, io::Error::other(e)))),
        };
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        Ok((
            Upstream {
                routes: routes.clone(),
                backend,
                sender,
                used: Instant::now(),
            },
            count,
        ))
    }

    /// Whether the connection takes a request now, or within [`REUSE_WAIT`] (a connection that
    /// the instance is closing never does).
    async fn ready(&mut self) -> bool {
        if self.sender.is_ready() {
            return true;
        }
        matches!(
            tokio::time::timeout(REUSE_WAIT, self.sender.ready()).await,
            Ok(Ok(()))
        )
    }
}

/// Why a try of a request failed, as a 502 and the endpoint event say it: hyper's words and the
/// system's under them.
fn failure_reason(error: &hyper::Error) -> String {
    use std::error::Error as _;
    match error.source() {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// One client connection of a host-routed front, shared by its requests (which hyper serves
/// one at a time, so its locks are never contended).
struct Client {
    table: Arc<FrontTable>,
    /// The TLS server name, lowercase (as rustls hands it over).
    sni: Option<String>,
    /// The client's address as `X-Forwarded-For` says it, made once for all its requests.
    forwarded_for: HeaderValue,
    tls: bool,
    /// Where 502s are counted for the endpoint's events.
    gateway: Arc<GatewayLog>,
    /// Told at the first request: the connection no longer waits for its first head.
    first: Mutex<Option<oneshot::Sender<()>>>,
    /// The connection to an instance that the last request used: the next request of the same
    /// service reuses it while that instance is routed, else connects anew (round-robin).
    upstream: Mutex<Option<Upstream>>,
    /// Upgraded connections (websocket) relayed beside the HTTP connection.
    upgraded: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Client {
    /// Answers one request: routed by its own host to a routed instance of its service.
    ///
    /// A try that fails goes again on a new connection, at most [`RETRIES`] times, when it
    /// may: when nothing of it was sent (hyper gives it back: the instance closed or reset the
    /// connection first, on a kept connection or a fresh one), or, for an idempotent request,
    /// when the instance closed the connection before a response head and no byte of its body
    /// was sent (a kept connection the instance closed as the request came). A fresh connection
    /// that failed sends the next try to another routed instance if one accepts (HAProxy's
    /// `option redispatch`). Any other failure is a 502 naming the instance.
    async fn answer(self: Arc<Self>, mut request: Request<Incoming>) -> Response<Answer> {
        if let Some(first) = locked(&self.first).take() {
            let _ = first.send(());
        }
        let services = self.table.snapshot();
        let (name, routes) = match route(
            &services,
            request.uri(),
            request.headers(),
            self.sni.as_deref(),
        ) {
            Ok((name, service)) => (name, &service.routes),
            Err(refusal) => return refusal.answer(),
        };
        let upgrade = wants_upgrade(request.headers());
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut request));
        prepare(&mut request, &self.forwarded_for, self.tls, upgrade);
        let (mut request, mut replay) = Replay::split(request);
        // The last request's connection, if it went to this service and its instance is still
        // routed: counted first, then looked at (`Routes::hold`), so a drain cannot miss it. A
        // request that could not go again if the instance closed that connection as it came
        // takes it only if it was used just now.
        let whole = Replay::whole(replay.as_ref());
        let kept = locked(&self.upstream).take();
        let mut reuse = kept
            .filter(|up| up.routes.same(routes))
            .filter(|up| whole || up.used.elapsed() < UNSAFE_REUSE_IDLE)
            .and_then(|up| routes.hold(&up.backend).map(|count| (up, count)));
        // Instances whose fresh connection failed this request: tried last.
        let mut failed: Vec<BackendRef> = Vec::new();
        let mut last: Option<GatewayFailure> = None;
        let mut tries = 0;
        loop {
            let reused = reuse.is_some();
            let (mut up, count) = match reuse.take() {
                Some(kept) => kept,
                None => match Upstream::connect(routes, &failed).await {
                    Ok(new) => new,
                    Err(unreachable) => {
                        let refusal = match (last, unreachable) {
                            // Every routed instance refused: the failure of the last try stands.
                            (Some(failure), _) => Refusal::BadGateway(failure),
                            (None, Some((backend, e))) => Refusal::Unreachable(GatewayFailure {
                                service: name.clone(),
                                instance: backend.to_string(),
                                reason: e.to_string(),
                            }),
                            (None, None) => return Refusal::NoInstance(name.clone()).answer(),
                        };
                        return self.failed(refusal, tries);
                    }
                },
            };
            if reused && !up.ready().await {
                // Closed by the instance while idle (or not idle yet): a new connection.
                continue;
            }
            let mut error = match up.sender.try_send_request(request).await {
                Ok(response) => return self.relay(response, up, count, client_side, name),
                Err(error) => error,
            };
            let failure = GatewayFailure {
                service: name.clone(),
                instance: up.backend.to_string(),
                reason: failure_reason(error.error()),
            };
            if !reused {
                failed.push(up.backend.clone());
            }
            drop((up, count));
            let again = match error.take_message() {
                Some(unsent) => Some(unsent),
                None => replay.as_mut().and_then(Replay::again),
            };
            match again {
                Some(next) if tries < RETRIES => {
                    tries += 1;
                    request = next;
                    last = Some(failure);
                }
                _ => return self.failed(Refusal::BadGateway(failure), tries),
            }
        }
    }

    /// The answer to a request that failed at an instance after `tries` tries again (a 502,
    /// or a 503 when no instance took a connection), counted for the endpoint's events.
    fn failed(&self, refusal: Refusal, tries: usize) -> Response<Answer> {
        if let Refusal::BadGateway(failure) | Refusal::Unreachable(failure) = &refusal {
            let (status, _) = refusal.status_and_body();
            self.gateway.record(failure, status.as_u16(), tries + 1);
        }
        refusal.answer()
    }

    /// An instance's response, as the client gets it; a switch of protocols relays the two
    /// upgraded connections beside, pinned to the instance and counted on it until they end.
    fn relay(
        &self,
        mut response: Response<Incoming>,
        mut up: Upstream,
        count: Count,
        client_side: Option<hyper::upgrade::OnUpgrade>,
        name: &str,
    ) -> Response<Answer> {
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        *response.version_mut() = Version::HTTP_11;
        strip_hop_by_hop(response.headers_mut(), switching);
        if switching {
            let Some(client_side) = client_side else {
                let failure = GatewayFailure {
                    service: name.to_owned(),
                    instance: up.backend.to_string(),
                    reason: "it switched protocols though the client asked for no upgrade".into(),
                };
                return self.failed(Refusal::BadGateway(failure), 0);
            };
            let instance_side = hyper::upgrade::on(&mut response);
            let relaying = tokio::spawn(async move {
                let _count = count;
                let _up = up;
                if let (Ok(client), Ok(instance)) = tokio::join!(client_side, instance_side) {
                    let _ = tokio::io::copy_bidirectional(
                        &mut TokioIo::new(client),
                        &mut TokioIo::new(instance),
                    )
                    .await;
                }
            });
            locked(&self.upgraded).push(relaying);
            return response.map(|_| Answer::empty());
        }
        up.used = Instant::now();
        *locked(&self.upstream) = Some(up);
        response.map(|body| Answer::Relayed {
            body,
            _count: count,
        })
    }
}

/// How long the endpoint's events leave between two reports of 502s from one instance.
const GATEWAY_REPORT_EVERY: Duration = Duration::from_secs(10);

/// The 502s (and 503s of instances that refused) of a front by instance, reported through [`Front::take_failures`] as endpoint
/// events: the first of an instance at the next report, later ones at most every
/// [`GATEWAY_REPORT_EVERY`], counted, so a failing instance cannot flood the event log.
#[derive(Debug, Default)]
struct GatewayLog {
    by_instance: Mutex<BTreeMap<(String, String), GatewayCount>>,
}

#[derive(Debug)]
struct GatewayCount {
    requests: u64,
    /// The last one's status: 502, or 503 when no instance took a connection.
    status: u16,
    tries: usize,
    reason: String,
    reported: Option<Instant>,
}

impl GatewayLog {
    fn record(&self, failure: &GatewayFailure, status: u16, tries: usize) {
        let mut by_instance = locked(&self.by_instance);
        let key = (failure.service.clone(), failure.instance.clone());
        let count = by_instance.entry(key).or_insert_with(|| GatewayCount {
            requests: 0,
            status,
            tries: 0,
            reason: String::new(),
            reported: None,
        });
        count.requests += 1;
        count.status = status;
        count.tries = tries;
        count.reason.clone_from(&failure.reason);
    }

    /// Messages for the instances due a report; forgets those quiet since their last one.
    fn take(&self, now: Instant) -> Vec<String> {
        let mut by_instance = locked(&self.by_instance);
        let due = |c: &GatewayCount| {
            c.reported
                .is_none_or(|at| now.duration_since(at) >= GATEWAY_REPORT_EVERY)
        };
        by_instance.retain(|_, c| c.requests > 0 || !due(c));
        let mut messages = Vec::new();
        for ((service, instance), count) in by_instance.iter_mut() {
            if count.requests == 0 || !due(count) {
                continue;
            }
            let requests = match count.requests {
                1 => "a request".to_owned(),
                n => format!("{n} requests"),
            };
            let tries = match count.tries {
                1 => "one try".to_owned(),
                n => format!("{n} tries"),
            };
            messages.push(format!(
                "service {service}: {requests} answered {}: instance {instance} failed them \
                 ({}; the last after {tries})",
                count.status, count.reason
            ));
            count.requests = 0;
            count.reported = Some(now);
        }
        messages
    }
}

/// The name of the service whose routes are `routes` on `table`, for a 503's body.
fn service_of(table: &FrontTable, routes: &Routes) -> String {
    table
        .snapshot()
        .iter()
        .find(|(_, s)| s.routes.same(routes))
        .map_or_else(String::new, |(name, _)| name.clone())
}

/// How long, and how much, a refused client's further input is read and dropped before its
/// connection is closed.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S, refusal: Refusal) {
    let _ = client.write_all(&refusal.response()).await;
    let _ = client.shutdown().await;
    // Closing a socket with unread input sends a reset, which may reach the client before
    // the answer and destroy it: read what the client still sends, for a moment and within a
    // bound, as a lingering close in HTTP servers does.
    let _ = tokio::time::timeout(LINGER, async {
        let mut dropped = 0;
        let mut buf = [0u8; 8192];
        while dropped < LINGER_BYTES {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => dropped += n,
            }
        }
    })
    .await;
}

/// What every connection of a front shares.
struct Shared {
    table: Arc<FrontTable>,
    admission: Arc<Admission>,
    gateway: Arc<GatewayLog>,
}

/// The routes of the front's catch-all service (TLS without hosts), if it has one.
fn catch_all_routes(table: &FrontTable) -> Option<Routes> {
    catch_all(&table.snapshot()).map(|s| s.routes.clone())
}

/// Serves one connection of a front: TLS handshake and first request head (counted as waiting
/// in `admission`, within [`HEAD_TIMEOUT`], closed at once when evicted), then its requests,
/// each routed by its own host ([`serve_http`]); a catch-all service's connections are relayed
/// as bytes to one instance instead.
async fn handle(client: TcpStream, shared: Shared, acceptor: Option<TlsAcceptor>) {
    let _ = client.set_nodelay(true);
    let Ok(peer) = client.peer_addr() else {
        return;
    };
    let waiting = shared.admission.admit(peer.ip());
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    let Some(acceptor) = acceptor else {
        return serve_http(client, shared, None, peer.ip(), waiting, deadline).await;
    };
    let accepted = tokio::select! {
        () = waiting.evicted() => return,
        accepted = tokio::time::timeout_at(deadline, acceptor.accept(client)) => accepted,
    };
    let Ok(Ok(mut client)) = accepted else {
        return;
    };
    let Some(routes) = catch_all_routes(&shared.table) else {
        let sni = client.get_ref().1.server_name().map(str::to_owned);
        let tls = Some(sni);
        return serve_http(client, shared, tls, peer.ip(), waiting, deadline).await;
    };
    drop(waiting);
    let Some((mut upstream, _count)) = proxy::connect_routed(&routes).await else {
        let service = service_of(&shared.table, &routes);
        return refuse(&mut client, Refusal::NoInstance(service)).await;
    };
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Serves the HTTP/1.1 requests of one client connection (plain, or TLS with the server name
/// the client asked for, if any), each routed by its own host ([`Client::answer`]); the connection counts as waiting in
/// `admission` until its first request head, which must come before `deadline`, and is closed
/// once idle for [`IDLE_TIMEOUT`] between requests.
async fn serve_http<S>(
    io: S,
    shared: Shared,
    tls: Option<Option<String>>,
    peer: IpAddr,
    waiting: WaitingForHead,
    deadline: tokio::time::Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (first, first_came) = oneshot::channel();
    // Made once here, not per request (nor is the server name lowered per request: rustls
    // hands it over lowercase).
    let forwarded_for = HeaderValue::from_str(&peer.to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    let client = Arc::new(Client {
        table: shared.table,
        tls: tls.is_some(),
        sni: tls.flatten(),
        forwarded_for,
        gateway: shared.gateway,
        first: Mutex::new(Some(first)),
        upstream: Mutex::new(None),
        upgraded: Mutex::new(Vec::new()),
    });
    let serving = client.clone();
    let service = hyper::service::service_fn(move |request| {
        let client = serving.clone();
        async move { Ok::<_, Infallible>(client.answer(request).await) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // Also the idle time between requests: hyper starts it when it waits for a head.
    http.timer(TokioTimer::new())
        .header_read_timeout(IDLE_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS);
    let connection = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let admitted = async move {
        let came = tokio::select! {
            () = waiting.evicted() => false,
            () = tokio::time::sleep_until(deadline) => false,
            came = first_came => came.is_ok(),
        };
        drop(waiting);
        if came {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = connection => {}
        () = admitted => {}
    }
    let upgraded = std::mem::take(&mut *locked(&client.upgraded));
    for relaying in upgraded {
        let _ = relaying.await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn host_header_values_lose_port_case_and_trailing_dot() {
        assert_eq!(
            host_name(b"Shop.Example:8443").as_deref(),
            Some("shop.example")
        );
        assert_eq!(host_name(b"shop.example.").as_deref(), Some("shop.example"));
        assert_eq!(host_name(b"[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(host_name(b"").as_deref(), None);
    }

    #[test]
    fn an_exact_host_wins_over_a_wildcard_and_a_wildcard_takes_one_label() {
        let service = |hosts: &[&str]| FrontService {
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            routes: Routes::default(),
            certs: None,
        };
        let mut services = BTreeMap::new();
        services.insert("a-wild".to_owned(), service(&["*.shop.example"]));
        services.insert("b-api".to_owned(), service(&["api.shop.example"]));
        let name = |host: &str| find(&services, host).map(|(n, _)| n.clone());
        assert_eq!(name("api.shop.example").as_deref(), Some("b-api"));
        assert_eq!(name("www.shop.example").as_deref(), Some("a-wild"));
        assert_eq!(name("a.b.shop.example"), None);
        assert_eq!(name("shop.example"), None);
    }

    #[test]
    fn a_second_host_header_or_a_host_of_another_certificate_is_refused() {
        let service = |hosts: &[&str]| FrontService {
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            routes: Routes::default(),
            certs: None,
        };
        let mut services = BTreeMap::new();
        services.insert("shop".to_owned(), service(&["shop.example"]));
        services.insert("blog".to_owned(), service(&["blog.example"]));
        let routed = |target: &str, hosts: &[&str], sni: Option<&str>| {
            let mut headers = HeaderMap::new();
            for host in hosts {
                headers.append(header::HOST, HeaderValue::from_str(host).unwrap());
            }
            let uri: Uri = target.parse().unwrap();
            route(&services, &uri, &headers, sni).map(|(name, _)| name.clone())
        };
        let shop = Ok("shop".to_owned());
        assert_eq!(routed("/", &["shop.example"], None), shop);
        assert_eq!(routed("/", &["shop.example"], Some("shop.example")), shop);
        assert_eq!(routed("/", &["shop.example"], Some("SHOP.example")), shop);
        // An SNI no service has: the client got the default certificate; the Host decides.
        assert_eq!(routed("/", &["shop.example"], Some("other.example")), shop);
        assert_eq!(
            routed("/", &["shop.example"], Some("blog.example")),
            Err(Refusal::Misdirected("shop.example".to_owned()))
        );
        assert_eq!(
            routed("/", &["shop.example", "blog.example"], None),
            Err(Refusal::BadRequest("more than one Host header"))
        );
        assert_eq!(
            routed("/", &[], None),
            Err(Refusal::BadRequest("no Host header"))
        );
        // An absolute-form target names the host, whatever the header says (RFC 9112 3.2.2).
        assert_eq!(
            routed("http://blog.example/", &["shop.example"], None),
            Ok("blog".to_owned())
        );
        assert_eq!(
            routed("/", &["news.example"], None),
            Err(Refusal::UnknownHost("news.example".to_owned()))
        );
    }

    #[test]
    fn a_source_over_its_cap_or_everyone_over_the_total_evicts_the_longest_waiting() {
        use futures::FutureExt;
        let admission = Arc::new(Admission::new(HeadLimits {
            per_source: 2,
            total: 4,
        }));
        let evicted = |w: &WaitingForHead| w.evicted().now_or_never().is_some();
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let a1 = admission.admit(ip("192.0.2.1"));
        let a2 = admission.admit(ip("192.0.2.1"));
        let a3 = admission.admit(ip("192.0.2.1"));
        assert!(evicted(&a1), "a source past its cap loses its oldest");
        assert!(!evicted(&a2) && !evicted(&a3));
        // One IPv6 /64 is one source.
        let b1 = admission.admit(ip("2001:db8::1"));
        let b2 = admission.admit(ip("2001:db8::2"));
        assert!(!evicted(&b1) && !evicted(&b2));
        assert_eq!(admission.waiting(), 4);
        // The total reached: the longest-waiting of all goes, whatever its source.
        let c1 = admission.admit(ip("2001:db8:1::1"));
        assert!(evicted(&a2));
        assert!(!evicted(&a3) && !evicted(&b1) && !evicted(&c1));
        assert_eq!(admission.waiting(), 4);
        // A connection that got its head (dropped here) makes room.
        drop(b1);
        let d1 = admission.admit(ip("198.51.100.7"));
        assert!(!evicted(&a3) && !evicted(&b2) && !evicted(&c1) && !evicted(&d1));
        drop((a1, a2, a3, b2, c1, d1));
        assert_eq!(admission.waiting(), 0);
    }

    /// A real HTTP/1.1 server on loopback standing in for an instance (hyper, as a web
    /// framework would be): `/who` says who it is and what it was told, `/slow` answers after
    /// 600 ms, `/echo` streams the request body back (chunked when the request's was), and a
    /// request with `Upgrade` switches to echoing bytes.
    async fn instance(name: &'static str) -> SocketAddr {
        journaled(name).await.0
    }

    /// Each request body an instance got, as it got it, in order.
    type Journal = Arc<Mutex<Vec<String>>>;

    /// [`instance`], which also writes down the body of each `/post` request, whole, and
    /// answers it with `NAME got BODY`.
    async fn journaled(name: &'static str) -> (SocketAddr, Journal) {
        use http_body_util::{BodyExt, Full};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let journal = Journal::default();
        let written = journal.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let journal = written.clone();
                let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                    let journal = journal.clone();
                    async move {
                        let text = |s: String| {
                            Full::new(Bytes::from(s))
                                .map_err(|never| match never {})
                                .boxed()
                        };
                        if request.headers().contains_key(header::UPGRADE) {
                            let upgrading = hyper::upgrade::on(&mut request);
                            tokio::spawn(async move {
                                let io = TokioIo::new(upgrading.await.unwrap());
                                let (mut from, mut to) = tokio::io::split(io);
                                let _ = tokio::io::copy(&mut from, &mut to).await;
                            });
                            let switching = Response::builder()
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header(header::UPGRADE, "echo")
                                .header(header::CONNECTION, "upgrade")
                                .body(text(String::new()))
                                .unwrap();
                            return Ok::<_, Infallible>(switching);
                        }
                        match request.uri().path() {
                            "/echo" => return Ok(Response::new(request.into_body().boxed())),
                            "/slow" => tokio::time::sleep(Duration::from_millis(600)).await,
                            "/post" => {
                                let body = request.into_body().collect().await.unwrap();
                                let body = String::from_utf8(body.to_bytes().to_vec()).unwrap();
                                journal.lock().unwrap().push(body.clone());
                                return Ok(Response::new(text(format!("{name} got {body}"))));
                            }
                            _ => {}
                        }
                        let told = |name: &str| {
                            request
                                .headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_owned()
                        };
                        Ok(Response::new(text(format!(
                            "{name} host={} for={} proto={}",
                            told("host"),
                            told("x-forwarded-for"),
                            told("x-forwarded-proto")
                        ))))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades(),
                );
            }
        });
        (addr, journal)
    }

    /// A plain front on a free loopback port for `services` (NAME serves NAME.example).
    fn front_for(services: &[(&str, &Routes)]) -> Front {
        let routing = |name: &str| Routing {
            hosts: vec![format!("{name}.example")],
            tls: None,
        };
        let admission = Arc::new(Admission::new(HeadLimits {
            per_source: 128,
            total: 1024,
        }));
        let (first, routes) = services[0];
        let front = Front::start(
            "127.0.0.1:0".parse().unwrap(),
            false,
            true,
            admission,
            (first, &routing(first), routes),
        )
        .unwrap();
        for (name, routes) in &services[1..] {
            front.set(name, &routing(name), routes).unwrap();
        }
        front
    }

    fn routes_to(instances: &[(&str, SocketAddr)]) -> Routes {
        let routes = Routes::default();
        set_routes(&routes, instances);
        routes
    }

    fn set_routes(routes: &Routes, instances: &[(&str, SocketAddr)]) {
        let routed: Vec<(String, SocketAddr)> = instances
            .iter()
            .map(|(id, addr)| ((*id).to_owned(), *addr))
            .collect();
        routes.set(&routed);
    }

    /// One response as a client reads it off the wire: status, headers (names lowercase) and
    /// the body, unframed by its own rules (none after HEAD, 1xx, 204 and 304; chunked;
    /// Content-Length; else to the end).
    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    type Wire = tokio::io::BufReader<TcpStream>;

    async fn open(front: &Front) -> Wire {
        tokio::io::BufReader::new(TcpStream::connect(front.local_addr()).await.unwrap())
    }

    async fn line(wire: &mut Wire) -> String {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        wire.read_line(&mut line).await.unwrap();
        line.trim_end().to_owned()
    }

    async fn read_reply(wire: &mut Wire, head_request: bool) -> Reply {
        let status_line = line(wire).await;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let field = line(wire).await;
            if field.is_empty() {
                break;
            }
            let (name, value) = field.split_once(':').unwrap();
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request || status < 200 || status == 204 || status == 304 {
            return reply;
        }
        if reply.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&line(wire).await, 16).unwrap();
                if size == 0 {
                    while !line(wire).await.is_empty() {}
                    break;
                }
                let mut chunk = vec![0; size + 2];
                wire.read_exact(&mut chunk).await.unwrap();
                reply.body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(length) = reply.header("content-length") {
            reply.body = vec![0; length.parse().unwrap()];
            wire.read_exact(&mut reply.body).await.unwrap();
        } else {
            wire.read_to_end(&mut reply.body).await.unwrap();
        }
        reply
    }

    async fn ask(wire: &mut Wire, host: &str, path: &str) -> Reply {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        wire.get_mut().write_all(request.as_bytes()).await.unwrap();
        read_reply(wire, false).await
    }

    #[tokio::test]
    async fn every_request_of_a_keep_alive_connection_goes_to_the_service_of_its_own_host() {
        let shop = routes_to(&[("shop-1", instance("shop-1").await)]);
        let blog = routes_to(&[("blog-1", instance("blog-1").await)]);
        let front = front_for(&[("shop", &shop), ("blog", &blog)]);
        let mut wire = open(&front).await;
        // The client's own X-Forwarded-* are dropped: this connection's peer is what counts.
        let spoofed = "GET /who HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 203.0.113.9\r\n\
                       X-Forwarded-Proto: https\r\n\r\n";
        wire.get_mut().write_all(spoofed.as_bytes()).await.unwrap();
        let reply = read_reply(&mut wire, false).await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "shop-1 host=shop.example for=127.0.0.1 proto=http")
        );
        let reply = ask(&mut wire, "blog.example:8080", "/who").await;
        assert_eq!(
            reply.text(),
            "blog-1 host=blog.example:8080 for=127.0.0.1 proto=http"
        );
        let reply = ask(&mut wire, "news.example", "/who").await;
        assert_eq!(reply.status, 404, "{}", reply.text());
        assert!(reply.text().contains("news.example"), "{}", reply.text());
        let reply = ask(&mut wire, "shop.example", "/who").await;
        assert!(reply.text().starts_with("shop-1 "), "{}", reply.text());
        // Pipelined: answered in order, each by its own host's service.
        let two = "GET /who HTTP/1.1\r\nHost: blog.example\r\n\r\n\
                   GET /who HTTP/1.1\r\nHost: shop.example\r\n\r\n";
        wire.get_mut().write_all(two.as_bytes()).await.unwrap();
        assert!(
            read_reply(&mut wire, false)
                .await
                .text()
                .starts_with("blog-1 ")
        );
        assert!(
            read_reply(&mut wire, false)
                .await
                .text()
                .starts_with("shop-1 ")
        );
        assert_eq!(shop.open_connections() + blog.open_connections(), 0);
    }

    #[tokio::test]
    async fn a_retired_instance_drains_once_its_requests_are_answered_and_the_client_moves_on() {
        let (a, b) = (instance("shop-a").await, instance("shop-b").await);
        let shop = routes_to(&[("shop-a", a)]);
        let front = front_for(&[("shop", &shop)]);
        let mut wire = open(&front).await;
        assert!(
            ask(&mut wire, "shop.example", "/who")
                .await
                .text()
                .starts_with("shop-a ")
        );
        // A request in flight counts on its instance, and a drain waits for it.
        let slow = "GET /slow HTTP/1.1\r\nHost: shop.example\r\n\r\n";
        wire.get_mut().write_all(slow.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(shop.active_connections("shop-a"), 1);
        set_routes(&shop, &[("shop-b", b)]);
        assert!(!shop.drain("shop-a", Duration::from_millis(100)).await);
        let reply = read_reply(&mut wire, false).await;
        assert!(reply.text().starts_with("shop-a "), "{}", reply.text());
        // Answered: drained, although the client keeps its connection open and idle.
        assert!(shop.drain("shop-a", Duration::from_secs(2)).await);
        let reply = ask(&mut wire, "shop.example", "/who").await;
        assert!(reply.text().starts_with("shop-b "), "{}", reply.text());
        assert_eq!(shop.active_connections("shop-a"), 0);
    }

    async fn post(wire: &mut Wire, host: &str, body: &str) -> Reply {
        let request = format!(
            "POST /post HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        wire.get_mut().write_all(request.as_bytes()).await.unwrap();
        read_reply(wire, false).await
    }

    /// POSTs `body` to shop.example: answered by the instance that says `NAME got BODY` (and
    /// written down in `answered`), or a 502 that names `instance` (`ID at ADDRESS`).
    async fn post_answered(
        wire: &mut Wire,
        body: &str,
        name: &str,
        instance: &str,
        answered: &mut Vec<String>,
    ) {
        let reply = post(wire, "shop.example", body).await;
        match reply.status {
            200 => {
                assert_eq!(reply.text(), format!("{name} got {body}"));
                answered.push(body.to_owned());
            }
            502 => assert!(
                reply.text().contains(&format!("instance {instance} ")),
                "{}",
                reply.text()
            ),
            _ => panic!("{reply:?}"),
        }
    }

    /// An instance that resets each connection it accepts, `after` accepting it, without reading
    /// a byte of it, as the kernel resets what the listener of an instance killed between the
    /// router's pick and its connect still held; counts the connections it reset.
    async fn resetting(after: Duration) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let resets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = resets.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let counted = counted.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    stream.set_zero_linger().unwrap();
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        (addr, resets)
    }

    /// An instance that answers one request per connection, as HTTP/1.1 keep-alive (no
    /// `Connection: close`), and closes the connection `idle` after its answer without reading
    /// what came meanwhile: an instance's idle timeout that fires as a request comes, with the
    /// race, a round trip wide between hosts, made certain. Writes down the body of each POST
    /// it answered and counts the requests it lost (a connection closed with bytes unread).
    async fn closes_when_idle(
        idle: Duration,
    ) -> (SocketAddr, Journal, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::AsyncBufReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let journal = Journal::default();
        let lost = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (written, counted) = (journal.clone(), lost.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (journal, lost) = (written.clone(), counted.clone());
                tokio::spawn(async move {
                    let mut wire = tokio::io::BufReader::new(stream);
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if wire.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line.trim_end().is_empty() {
                            break;
                        }
                        head.push_str(&line.to_ascii_lowercase());
                    }
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    let mut body = vec![0; length];
                    wire.read_exact(&mut body).await.unwrap();
                    let body = String::from_utf8(body).unwrap();
                    if head.starts_with("post ") {
                        journal.lock().unwrap().push(body.clone());
                    }
                    let text = format!("lazy got {body}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    wire.get_mut().write_all(answer.as_bytes()).await.unwrap();
                    tokio::time::sleep(idle).await;
                    let mut probe = [0u8; 1];
                    let unread = !wire.buffer().is_empty()
                        || matches!(wire.get_ref().try_read(&mut probe), Ok(n) if n > 0);
                    if unread {
                        lost.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        (addr, journal, lost)
    }

    #[tokio::test]
    async fn a_request_reset_on_a_fresh_connection_goes_to_another_instance_and_a_sent_post_never_twice()
     {
        use std::sync::atomic::Ordering::SeqCst;
        let (good, journal) = journaled("shop-1").await;
        let (reset, resets) = resetting(Duration::ZERO).await;
        let shop = routes_to(&[("reset-1", reset), ("shop-1", good)]);
        let front = front_for(&[("shop", &shop)]);
        // A new client connection per request: each connects anew, round-robin, so every other
        // request tries the resetting instance first.
        for _ in 0..20 {
            let mut wire = open(&front).await;
            let reply = ask(&mut wire, "shop.example", "/who").await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert!(reply.text().starts_with("shop-1 "), "{}", reply.text());
        }
        assert!(
            resets.load(SeqCst) >= 5,
            "reset {} times",
            resets.load(SeqCst)
        );
        // A POST written before the reset came may have reached an instance that took it: a
        // 502 naming the instance, never a second try. One given back unsent goes again.
        let mut answered = Vec::new();
        for i in 0..20 {
            let mut wire = open(&front).await;
            let instance = format!("reset-1 at {reset}");
            post_answered(
                &mut wire,
                &format!("order-{i}"),
                "shop-1",
                &instance,
                &mut answered,
            )
            .await;
        }
        assert!(!answered.is_empty());
        assert_eq!(*journal.lock().unwrap(), answered, "each POST taken once");
    }

    #[tokio::test]
    async fn a_request_no_try_could_get_answered_is_a_502_naming_the_instance_and_one_event() {
        use std::sync::atomic::Ordering::SeqCst;
        // Reset once the request was written: tried again as long as it may.
        let (reset, resets) = resetting(Duration::from_millis(20)).await;
        let shop = routes_to(&[("reset-1", reset)]);
        let front = front_for(&[("shop", &shop)]);
        let mut wire = open(&front).await;
        let reply = ask(&mut wire, "shop.example", "/who").await;
        assert_eq!(reply.status, 502, "{}", reply.text());
        let named = format!("instance reset-1 at {reset} of service shop failed the request: ");
        assert!(reply.text().starts_with(&named), "{}", reply.text());
        // The only instance, tried once and then again RETRIES times.
        assert_eq!(resets.load(SeqCst), 1 + RETRIES);
        // The client's connection goes on; 502s of one instance make one event at a time.
        assert_eq!(ask(&mut wire, "shop.example", "/who").await.status, 502);
        let events = front.take_failures();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            events[0].starts_with("service shop: 2 requests answered 502: ")
                && events[0].contains(&format!("instance reset-1 at {reset} failed them")),
            "{events:?}"
        );
        assert_eq!(ask(&mut wire, "shop.example", "/who").await.status, 502);
        assert!(front.take_failures().is_empty(), "reported again at once");
    }

    #[test]
    fn the_502s_of_an_instance_are_reported_at_once_then_at_most_every_ten_seconds() {
        let log = GatewayLog::default();
        let failure = |instance: &str| GatewayFailure {
            service: "shop".into(),
            instance: instance.into(),
            reason: "connection reset".into(),
        };
        let start = Instant::now();
        log.record(&failure("a at 127.0.0.1:1"), 502, 4);
        let first = log.take(start);
        assert_eq!(
            first,
            [
                "service shop: a request answered 502: instance a at 127.0.0.1:1 failed them \
              (connection reset; the last after 4 tries)"
            ]
        );
        log.record(&failure("a at 127.0.0.1:1"), 502, 1);
        log.record(&failure("a at 127.0.0.1:1"), 503, 2);
        log.record(&failure("b at 127.0.0.1:2"), 502, 1);
        let soon = log.take(start + Duration::from_secs(1));
        assert_eq!(soon.len(), 1, "only b is due: {soon:?}");
        assert!(soon[0].contains("instance b at"), "{soon:?}");
        let later = log.take(start + GATEWAY_REPORT_EVERY);
        assert_eq!(later.len(), 1, "{later:?}");
        assert!(
            later[0].contains("2 requests answered 503: instance a at")
                && later[0].ends_with("the last after 2 tries)"),
            "{later:?}"
        );
        // Quiet since: forgotten, so the map holds only instances that fail.
        assert!(log.take(start + GATEWAY_REPORT_EVERY * 3).is_empty());
        assert!(locked(&log.by_instance).is_empty());
    }

    #[tokio::test]
    async fn a_request_sent_as_the_instance_closes_its_kept_connection_goes_again_unless_a_post_was_sent()
     {
        use std::sync::atomic::Ordering::SeqCst;
        let idle = Duration::from_millis(150);
        let (lazy, journal, lost) = closes_when_idle(idle).await;
        let shop = routes_to(&[("lazy-1", lazy)]);
        let front = front_for(&[("shop", &shop)]);
        let mut wire = open(&front).await;
        // Pauses around the instance's idle timeout: after one shorter than it, the request
        // goes on the kept connection that the instance then closes without reading it.
        for i in 0..24u64 {
            let reply = ask(&mut wire, "shop.example", "/who").await;
            assert_eq!(
                (reply.status, reply.text().as_str()),
                (200, "lazy got "),
                "request {i}"
            );
            tokio::time::sleep(Duration::from_millis(i * 37 % 300)).await;
        }
        let lost_gets = lost.load(SeqCst);
        assert!(
            lost_gets >= 5,
            "only {lost_gets} requests met a closing connection"
        );
        // A POST sent into a closing connection is lost there and answered 502, never sent
        // again; the next one goes on a new connection.
        let mut answered = Vec::new();
        for i in 0..10 {
            let instance = format!("lazy-1 at {lazy}");
            post_answered(
                &mut wire,
                &format!("order-{i}"),
                "lazy",
                &instance,
                &mut answered,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            lost.load(SeqCst) > lost_gets,
            "no POST met a closing connection"
        );
        assert!(answered.len() >= 4, "{answered:?}");
        assert_eq!(*journal.lock().unwrap(), answered, "each POST taken once");
    }

    #[tokio::test]
    async fn a_post_after_a_pause_takes_a_new_connection_not_one_the_instance_may_be_closing() {
        use std::sync::atomic::Ordering::SeqCst;
        // An instance whose idle timeout is longer than the pause.
        let idle = UNSAFE_REUSE_IDLE + Duration::from_millis(600);
        let (lazy, journal, lost) = closes_when_idle(idle).await;
        let shop = routes_to(&[("lazy-1", lazy)]);
        let front = front_for(&[("shop", &shop)]);
        let mut wire = open(&front).await;
        assert_eq!(ask(&mut wire, "shop.example", "/who").await.status, 200);
        tokio::time::sleep(UNSAFE_REUSE_IDLE + Duration::from_millis(100)).await;
        let reply = post(&mut wire, "shop.example", "order-1").await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "lazy got order-1")
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(lost.load(SeqCst), 0, "the POST went on the kept connection");
        assert_eq!(*journal.lock().unwrap(), ["order-1"]);
    }

    #[tokio::test]
    async fn chunked_and_sized_bodies_pass_intact_and_head_1xx_and_close_keep_their_framing() {
        let shop = routes_to(&[("shop-1", instance("shop-1").await)]);
        let front = front_for(&[("shop", &shop)]);
        let mut wire = open(&front).await;
        // A chunked request of uneven chunks, 300 KB in all: echoed back chunked, intact.
        let chunks: Vec<Vec<u8>> = (0..40u32)
            .map(|i| {
                (0..(i * 397 % 15_000 + 1))
                    .map(|j| (i * 7 + j) as u8)
                    .collect()
            })
            .collect();
        let sent: Vec<u8> = chunks.concat();
        let mut request =
            b"POST /echo HTTP/1.1\r\nHost: shop.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        for chunk in &chunks {
            request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            request.extend_from_slice(chunk);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        wire.get_mut().write_all(&request).await.unwrap();
        let reply = read_reply(&mut wire, false).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
        assert!(
            reply.body == sent,
            "{} bytes back of {}",
            reply.body.len(),
            sent.len()
        );
        // A sized request with `Expect: 100-continue`: the body is sent after the 100.
        let body = b"twelve bytes";
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: shop.example\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        );
        wire.get_mut().write_all(head.as_bytes()).await.unwrap();
        let interim = read_reply(&mut wire, false).await;
        assert_eq!(interim.status, 100);
        wire.get_mut().write_all(body).await.unwrap();
        let reply = read_reply(&mut wire, false).await;
        assert_eq!((reply.status, reply.body.as_slice()), (200, &body[..]));
        assert_eq!(reply.header("content-length"), Some("12"));
        // HEAD: the length of the body it would have, and no body.
        let who = ask(&mut wire, "shop.example", "/who").await;
        let head = "HEAD /who HTTP/1.1\r\nHost: shop.example\r\n\r\n";
        wire.get_mut().write_all(head.as_bytes()).await.unwrap();
        let reply = read_reply(&mut wire, true).await;
        assert_eq!(reply.status, 200);
        let length = who.body.len().to_string();
        assert_eq!(reply.header("content-length"), Some(length.as_str()));
        // The connection is still in step: the next answer is the next request's.
        assert_eq!(ask(&mut wire, "shop.example", "/who").await.body, who.body);
        // `Connection: close` is honoured: answered, then closed.
        let last = "GET /who HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n";
        wire.get_mut().write_all(last.as_bytes()).await.unwrap();
        let reply = read_reply(&mut wire, false).await;
        assert_eq!(reply.body, who.body);
        assert_eq!(reply.header("connection"), Some("close"));
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), wire.read_to_end(&mut rest));
        assert_eq!(closed.await.unwrap().unwrap(), 0);

        // Both Content-Length and chunked (a request-smuggling attempt): the chunks count, the
        // length goes, and the connection is closed after the answer (RFC 9112 section 6.1).
        let mut wire = open(&front).await;
        let both = "POST /echo HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 5\r\n\
                    Transfer-Encoding: chunked\r\n\r\nc\r\nhello, world\r\n0\r\n\r\n";
        wire.get_mut().write_all(both.as_bytes()).await.unwrap();
        let reply = read_reply(&mut wire, false).await;
        assert_eq!((reply.status, reply.text().as_str()), (200, "hello, world"));
        assert_eq!(reply.header("connection"), Some("close"));
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), wire.read_to_end(&mut rest));
        assert_eq!(
            closed.await.unwrap().unwrap(),
            0,
            "{}",
            String::from_utf8_lossy(&rest)
        );
    }

    #[tokio::test]
    async fn an_upgraded_connection_is_relayed_and_counted_on_its_instance_until_it_ends() {
        let shop = routes_to(&[("shop-1", instance("shop-1").await)]);
        let front = front_for(&[("shop", &shop)]);
        let mut wire = open(&front).await;
        let upgrade = "GET /socket HTTP/1.1\r\nHost: shop.example\r\nConnection: Upgrade\r\n\
                       Upgrade: echo\r\n\r\n";
        wire.get_mut().write_all(upgrade.as_bytes()).await.unwrap();
        let reply = read_reply(&mut wire, false).await;
        assert_eq!(reply.status, 101);
        assert_eq!(reply.header("upgrade"), Some("echo"));
        for message in ["ping", "GET / HTTP/1.1\r\nHost: blog.example\r\n\r\n"] {
            wire.get_mut().write_all(message.as_bytes()).await.unwrap();
            let mut back = vec![0; message.len()];
            wire.read_exact(&mut back).await.unwrap();
            assert_eq!(back, message.as_bytes());
        }
        // Pinned to its instance: a drain waits for it while it is open.
        set_routes(&shop, &[]);
        assert_eq!(shop.active_connections("shop-1"), 1);
        drop(wire);
        assert!(shop.drain("shop-1", Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_and_not_before() {
        let shop = routes_to(&[("shop-1", instance("shop-1").await)]);
        let front = front_for(&[("shop", &shop)]);
        let mut wire = open(&front).await;
        assert_eq!(ask(&mut wire, "shop.example", "/who").await.status, 200);
        let idle = std::time::Instant::now();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(IDLE_TIMEOUT * 3, wire.read_to_end(&mut rest));
        assert_eq!(closed.await.unwrap().unwrap(), 0, "closed without a word");
        let waited = idle.elapsed();
        assert!(
            waited >= IDLE_TIMEOUT - Duration::from_millis(100),
            "closed after {waited:?} idle"
        );
    }

    #[tokio::test]
    async fn a_head_sent_a_byte_at_a_time_is_routed_and_garbage_is_refused_at_once() {
        let shop = routes_to(&[("shop-1", instance("shop-1").await)]);
        let front = front_for(&[("shop", &shop)]);
        let mut wire = open(&front).await;
        let head = "GET /who HTTP/1.1\r\nUser-Agent: slow\r\nHost: shop.example\r\n\r\n";
        for byte in head.as_bytes() {
            wire.get_mut().write_all(&[*byte]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let reply = read_reply(&mut wire, false).await;
        assert!(reply.text().starts_with("shop-1 "), "{}", reply.text());
        // Bare LF line ends are a head too.
        wire.get_mut()
            .write_all(b"GET /who HTTP/1.1\nHost: shop.example\n\n")
            .await
            .unwrap();
        assert_eq!(read_reply(&mut wire, false).await.status, 200);
        // No empty line ever comes, but the first bytes are no HTTP: refused without waiting.
        let mut wire = open(&front).await;
        wire.get_mut()
            .write_all(b"\x16\x03\x01\x02\x00")
            .await
            .unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(5), read_reply(&mut wire, false));
        assert_eq!(refused.await.unwrap().status, 400);
        // A head past the limit: 431.
        let mut wire = open(&front).await;
        let big = format!(
            "GET / HTTP/1.1\r\nHost: shop.example\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        wire.get_mut().write_all(big.as_bytes()).await.unwrap();
        assert_eq!(read_reply(&mut wire, false).await.status, 431);
    }

    /// A self-signed P-256 certificate for `host` in `dir`, as NAME.pem and NAME.key.
    fn make_cert(dir: &Path, name: &str, host: &str) -> TlsPaths {
        let paths = TlsPaths {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        let out = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", &format!("/CN={host}"), "-keyout"])
            .arg(&paths.key)
            .arg("-out")
            .arg(&paths.cert)
            .output()
            .expect("openssl (installed by scripts/setup)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        paths
    }

    #[test]
    fn a_replaced_certificate_is_served_and_a_broken_one_keeps_the_last_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let paths = make_cert(dir.path(), "shop", "shop.example");
        let failures = Failures::default();
        let certs = CertFiles::load("shop", &paths, failures.clone()).unwrap();
        let first = certs.current();
        // What the front's loader thread does every second.
        let look = || certs.refresh();

        std::fs::write(&paths.cert, "garbage\n").unwrap();
        look();
        assert!(
            Arc::ptr_eq(&certs.current(), &first),
            "the last good one is served"
        );
        look();
        assert!(Arc::ptr_eq(&certs.current(), &first));
        let reported = std::mem::take(&mut *failures.lock().unwrap());
        assert_eq!(
            reported.len(),
            1,
            "once per state of the files: {reported:?}"
        );
        assert!(
            reported[0].contains("service shop")
                && reported[0].contains(&paths.cert.display().to_string()),
            "{reported:?}"
        );

        make_cert(dir.path(), "shop", "shop.example");
        look();
        let renewed = certs.current();
        assert!(!Arc::ptr_eq(&renewed, &first), "the renewed pair is served");
        assert_eq!(
            renewed.cert[0].as_ref(),
            std::fs::read(&paths.cert)
                .map(|pem| {
                    CertificateDer::from_pem_slice(&pem)
                        .unwrap()
                        .as_ref()
                        .to_vec()
                })
                .unwrap()
        );
        assert!(failures.lock().unwrap().is_empty());
    }

    #[test]
    fn a_bad_certificate_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("shop.pem");
        let key = dir.path().join("shop.key");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        std::fs::write(&key, "not a key\n").unwrap();
        let paths = TlsPaths {
            cert: cert.clone(),
            key,
        };
        let err = load_certified_key(&paths).unwrap_err().to_string();
        assert!(err.contains(&cert.display().to_string()), "{err}");
        let missing = TlsPaths {
            cert: dir.path().join("absent.pem"),
            key: dir.path().join("absent.key"),
        };
        let err = load_certified_key(&missing).unwrap_err().to_string();
        assert!(err.contains("absent.pem"), "{err}");
    }
}

//! Host-routed endpoints: several services on one address, each connection sent to the
//! service that the `Host` header of its first HTTP/1.1 request names, optionally behind TLS
//! terminated here with certificates from files (chosen by SNI).
//!
//! One [`Front`] serves one address for every service that declares `hosts` on it. It runs on
//! the proxy's threads ([`crate::proxy::spawn_with`]: one per core, `SO_REUSEPORT`) and sends a
//! connection only to a routed instance of the chosen service, counted in that service's
//! [`Routes`] exactly as the plain proxy counts, so health gating and drains are the same.
//!
//! A connection is routed once, by its first request, and stays with that instance (keep-alive
//! requests that follow, whatever their `Host`, go to it too), as a TCP proxy would; what gets
//! re-routed is the next connection. That keeps the relay a byte pipe after the first request
//! head (the plain path keeps `splice`), and a keep-alive client of a retired instance drains
//! like any open connection. HTTP/2 is not spoken: TLS selects no ALPN protocol, so clients fall back to HTTP/1.1.
//!
//! The kernel path (balancer, nftables DNAT) cannot read a `Host` header or terminate TLS, so a
//! host-routed endpoint is never given to it: local and remote clients alike go through here.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;

use crate::error::DeployError;
use crate::proxy::{self, Routes};
use crate::spec::ServiceSpec;

/// A request head larger than this is refused (431), as nginx's default buffers would.
const MAX_HEAD: usize = 16 * 1024;
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
        let named = hello
            .server_name()
            .and_then(|name| find(&services, &name.to_ascii_lowercase()))
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
    tls: bool,
    failures: Failures,
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
        proxy::spawn_with(listeners, shutdown, move |listener, shutdown| {
            let table = shared.clone();
            let acceptor = acceptor.clone();
            let admission = admission.clone();
            proxy::accept_loop(listener, shutdown, move |client| {
                handle(client, table.clone(), acceptor.clone(), admission.clone())
            })
        })
        .map_err(listen_error)?;
        Ok(Front {
            table,
            tls,
            failures,
            accepting,
        })
    }

    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Certificate files that failed to reload since the last call, one message each.
    pub fn take_failures(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .failures
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
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

/// The first request head, read to find the service, and that service's routes.
struct Routed {
    head: Vec<u8>,
    routes: Routes,
}

/// Why a request is answered here instead of by an instance.
enum Refusal {
    BadRequest(&'static str),
    TooLarge,
    UnknownHost(String),
    NoInstance(String),
    /// The TLS server name (SNI) picked another service's certificate than the `Host` names.
    Misdirected(String),
}

impl Refusal {
    fn response(&self) -> Vec<u8> {
        let (status, body) = match self {
            Refusal::BadRequest(why) => ("400 Bad Request", format!("{why}\n")),
            Refusal::TooLarge => (
                "431 Request Header Fields Too Large",
                "request head too large\n".to_owned(),
            ),
            Refusal::UnknownHost(host) => {
                ("404 Not Found", format!("no service for host {host:?}\n"))
            }
            Refusal::NoInstance(service) => (
                "503 Service Unavailable",
                format!("service {service} has no ready instance\n"),
            ),
            Refusal::Misdirected(host) => (
                "421 Misdirected Request",
                format!("host {host:?} is not served on this TLS connection\n"),
            ),
        };
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// The host of a `Host` header value: lowercase, without port or trailing dot.
fn host_name(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let host = if text.starts_with('[') {
        text.split_inclusive(']').next().unwrap_or(text)
    } else {
        match text.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => text,
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

/// Reads the first request head from `client` and finds its service. On TLS, `sni` is the
/// server name the client asked for: a `Host` of another service than that name's (whose
/// certificate the client was given) is refused with 421, as RFC 9110 section 15.5.20 has it,
/// instead of served under a certificate that does not name it.
async fn read_routed<S: AsyncRead + Unpin>(
    client: &mut S,
    table: &FrontTable,
    sni: Option<&str>,
) -> Result<Routed, Option<Refusal>> {
    let services = table.snapshot();
    if let Some(only) = catch_all(&services) {
        return Ok(Routed {
            head: Vec::new(),
            routes: only.routes.clone(),
        });
    }
    let mut head = Vec::with_capacity(2048);
    // How much of `head` was searched for the empty line that ends a head: a head is parsed
    // only once one may have arrived (and after the first read, so that a client that speaks
    // no HTTP is refused at once), so a head sent a byte at a time costs one look at each byte
    // instead of one parse of the whole head per read.
    let mut searched: usize = 0;
    let host = loop {
        // A client that closes before a whole head is owed no answer.
        if client.read_buf(&mut head).await.map_err(|_| None)? == 0 {
            return Err(None);
        }
        let first = searched == 0;
        let ended = ends_a_head(&head[searched.saturating_sub(2)..]);
        searched = head.len();
        if !first && !ended {
            if head.len() >= MAX_HEAD {
                return Err(Some(Refusal::TooLarge));
            }
            continue;
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let mut hosts = request
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("host"));
                let host = hosts.next();
                // Two Host headers: which one a backend believes is anyone's guess
                // (RFC 9112 section 3.2: answer 400).
                if hosts.next().is_some() {
                    return Err(Some(Refusal::BadRequest("more than one Host header")));
                }
                break host
                    .and_then(|h| host_name(h.value))
                    .ok_or(Some(Refusal::BadRequest("no Host header")))?;
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                return Err(Some(Refusal::TooLarge));
            }
            Err(_) => return Err(Some(Refusal::BadRequest("not an HTTP/1 request"))),
        }
    };
    let Some((name, service)) = find(&services, &host) else {
        return Err(Some(Refusal::UnknownHost(host)));
    };
    let sni_service = sni.and_then(|sni| find(&services, &sni.to_ascii_lowercase()));
    if sni_service.is_some_and(|(sni_name, _)| sni_name != name) {
        return Err(Some(Refusal::Misdirected(host)));
    }
    Ok(Routed {
        head,
        routes: service.routes.clone(),
    })
}

/// Whether `bytes` hold an empty line (`\n\n` or `\n\r\n`), which ends a request head.
fn ends_a_head(bytes: &[u8]) -> bool {
    bytes.windows(2).enumerate().any(|(i, w)| {
        w[0] == b'\n' && (w[1] == b'\n' || (w[1] == b'\r' && bytes.get(i + 2) == Some(&b'\n')))
    })
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

async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S, refusal: Option<Refusal>) {
    if let Some(refusal) = refusal {
        let _ = client.write_all(&refusal.response()).await;
        let _ = client.shutdown().await;
        // Closing a socket with unread input sends a reset, which may reach the client before
        // the answer and destroy it (a 431 for a head too large always leaves input unread):
        // read what the client still sends, for a moment and within a bound, as a lingering
        // close in HTTP servers does.
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
}

/// Serves one connection of a front: TLS handshake and first request head (counted as waiting
/// in `admission`, within [`HEAD_TIMEOUT`], closed at once when evicted), then the relay to
/// an instance of the service it names.
async fn handle(
    client: TcpStream,
    table: Arc<FrontTable>,
    acceptor: Option<TlsAcceptor>,
    admission: Arc<Admission>,
) {
    let _ = client.set_nodelay(true);
    let Ok(peer) = client.peer_addr() else {
        return;
    };
    let waiting = admission.admit(peer.ip());
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    match acceptor {
        None => {
            let mut client = client;
            let routed = tokio::select! {
                () = waiting.evicted() => return,
                routed = tokio::time::timeout_at(deadline, first_head(&mut client, &table, None)) => routed,
            };
            let Ok(Some(routed)) = routed else {
                return;
            };
            drop(waiting);
            let Some((upstream, _count)) = proxy::connect_routed(&routed.routes).await else {
                let service = service_of(&table, &routed.routes);
                return refuse(&mut client, Some(Refusal::NoInstance(service))).await;
            };
            if proxy::write_all(&upstream, &routed.head).await.is_ok() {
                let _ = proxy::relay(&client, &upstream).await;
            }
        }
        Some(acceptor) => {
            let routed = tokio::select! {
                () = waiting.evicted() => return,
                routed = tokio::time::timeout_at(deadline, async {
                    let mut client = acceptor.accept(client).await.ok()?;
                    let sni = client.get_ref().1.server_name().map(str::to_owned);
                    let routed = first_head(&mut client, &table, sni.as_deref()).await?;
                    Some((client, routed))
                }) => routed,
            };
            let Ok(Some((mut client, routed))) = routed else {
                return;
            };
            drop(waiting);
            let Some((mut upstream, _count)) = proxy::connect_routed(&routed.routes).await else {
                let service = service_of(&table, &routed.routes);
                return refuse(&mut client, Some(Refusal::NoInstance(service))).await;
            };
            if upstream.write_all(&routed.head).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
        }
    }
}

/// [`read_routed`], with a refused request answered here: the route, or None once answered.
async fn first_head<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    table: &FrontTable,
    sni: Option<&str>,
) -> Option<Routed> {
    match read_routed(client, table, sni).await {
        Ok(routed) => Some(routed),
        Err(refusal) => {
            refuse(client, refusal).await;
            None
        }
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

    #[tokio::test]
    async fn a_second_host_header_or_a_host_of_another_certificate_is_refused() {
        let service = |hosts: &[&str]| FrontService {
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            routes: Routes::default(),
            certs: None,
        };
        let table = FrontTable::default();
        table.update(|services| {
            services.insert("shop".to_owned(), service(&["shop.example"]));
            services.insert("blog".to_owned(), service(&["blog.example"]));
        });
        let routed = |head: &'static str, sni: Option<&'static str>| {
            let table = &table;
            async move {
                let (mut client, mut server) = tokio::io::duplex(4096);
                client.write_all(head.as_bytes()).await.unwrap();
                read_routed(&mut server, table, sni)
                    .await
                    .map(|r| r.head.len())
                    .map_err(|refusal| refusal.map(|r| String::from_utf8(r.response()).unwrap()))
            }
        };
        let one = "GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n";
        assert_eq!(routed(one, None).await, Ok(one.len()));
        assert_eq!(routed(one, Some("shop.example")).await, Ok(one.len()));
        assert_eq!(routed(one, Some("SHOP.example")).await, Ok(one.len()));
        // An SNI no service has: the client got the default certificate; the Host decides.
        assert_eq!(routed(one, Some("other.example")).await, Ok(one.len()));
        let misdirected = routed(one, Some("blog.example"))
            .await
            .unwrap_err()
            .unwrap();
        assert!(misdirected.starts_with("HTTP/1.1 421 "), "{misdirected}");
        let two = "GET / HTTP/1.1\r\nHost: shop.example\r\nhost: blog.example\r\n\r\n";
        let refused = routed(two, None).await.unwrap_err().unwrap();
        assert!(
            refused.starts_with("HTTP/1.1 400 ") && refused.contains("more than one Host"),
            "{refused}"
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

    #[tokio::test]
    async fn a_head_sent_a_byte_at_a_time_is_routed_and_garbage_is_refused_at_once() {
        let table = FrontTable::default();
        table.update(|services| {
            services.insert(
                "shop".to_owned(),
                FrontService {
                    hosts: vec!["shop.example".to_owned()],
                    routes: Routes::default(),
                    certs: None,
                },
            );
        });
        let head = "GET / HTTP/1.1\r\nUser-Agent: slow\r\nHost: shop.example\r\n\r\n";
        let (mut client, mut server) = tokio::io::duplex(64);
        let sending = tokio::spawn(async move {
            for byte in head.as_bytes() {
                client.write_all(&[*byte]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let routed = read_routed(&mut server, &table, None).await;
        assert_eq!(routed.map(|r| r.head).ok(), Some(head.as_bytes().to_vec()));
        drop(sending.await.unwrap());
        // Bare LF line ends are a head too (httparse takes them).
        let (mut client, mut server) = tokio::io::duplex(4096);
        client
            .write_all(b"GET / HTTP/1.1\nHost: shop.example\n\n")
            .await
            .unwrap();
        assert!(read_routed(&mut server, &table, None).await.is_ok());
        // No empty line ever comes, but the first bytes are no HTTP: refused without waiting.
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(b"\x16\x03\x01\x02\x00").await.unwrap();
        let refused = tokio::time::timeout(
            Duration::from_secs(5),
            read_routed(&mut server, &table, None),
        )
        .await
        .unwrap();
        assert!(matches!(
            refused.map(|r| r.head),
            Err(Some(Refusal::BadRequest(_)))
        ));
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

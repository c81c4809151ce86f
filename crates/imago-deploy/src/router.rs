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

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::error::DeployError;
use crate::proxy::{self, Routes};
use crate::spec::ServiceSpec;

/// A request head larger than this is refused (431), as nginx's default buffers would.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take for the TLS handshake and its first request head: a client that
/// opens connections and sends nothing must not hold them forever.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are looked at (their inode, size and modification time) for
/// a replacement, at most: once per second, on a handshake.
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
    checked: Instant,
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
                checked: Instant::now(),
            }),
            failures,
        })
    }

    fn lock(&self) -> MutexGuard<'_, CertState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The certificate to serve: the files' content once they changed and load. A pair that
    /// does not load (a new chain next to the old key while both are being replaced, a broken
    /// file) leaves the last good one served and is tried again a second later; its error is
    /// reported once for each state of the files.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.lock();
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let stamps = [stamp(&self.paths.cert), stamp(&self.paths.key)];
            if stamps != state.stamps {
                match load_certified_key(&self.paths) {
                    Ok(key) => {
                        state.key = key;
                        state.stamps = stamps;
                        state.failed = None;
                    }
                    Err(e) if state.failed != Some(stamps) => {
                        state.failed = Some(stamps);
                        self.failures
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .push(format!(
                                "service {}: {e}; the last certificate that loaded is still served",
                                self.service
                            ));
                    }
                    Err(_) => {}
                }
            }
        }
        state.key.clone()
    }
}

/// One service on a front.
#[derive(Debug, Clone)]
struct FrontService {
    hosts: Vec<String>,
    routes: Routes,
    certs: Option<Arc<CertFiles>>,
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
    /// Listens on `addr` (see [`proxy::bind`] for `check_free`), with TLS or without.
    pub fn start(addr: SocketAddr, tls: bool, check_free: bool) -> io::Result<Front> {
        let listeners = proxy::bind(addr, proxy::default_threads(), check_free)?;
        let table = Arc::new(FrontTable::default());
        let acceptor = if tls {
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
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
        let shared = table.clone();
        proxy::spawn_with(listeners, shutdown, move |listener, shutdown| {
            let table = shared.clone();
            let acceptor = acceptor.clone();
            proxy::accept_loop(listener, shutdown, move |client| {
                handle(client, table.clone(), acceptor.clone())
            })
        })?;
        Ok(Front {
            table,
            tls,
            failures: Failures::default(),
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
        let certs = match &routing.tls {
            Some(paths) => Some(Arc::new(CertFiles::load(
                service,
                paths,
                self.failures.clone(),
            )?)),
            None => None,
        };
        let entry = FrontService {
            hosts: routing.hosts.clone(),
            routes: routes.clone(),
            certs,
        };
        self.table.update(|services| {
            services.insert(service.to_owned(), entry);
        });
        Ok(())
    }

    /// Stops routing `service` here; true if no service is left.
    pub fn remove(&self, service: &str) -> bool {
        self.table.update(|services| {
            services.remove(service);
        });
        self.table.snapshot().is_empty()
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
    let host = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            // A client that closes before a whole head is owed no answer.
            if client.read_buf(&mut head).await.map_err(|_| None)? == 0 {
                return Err(None);
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
                    return host
                        .and_then(|h| host_name(h.value))
                        .ok_or(Some(Refusal::BadRequest("no Host header")));
                }
                Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
                    return Err(Some(Refusal::TooLarge));
                }
                Err(_) => return Err(Some(Refusal::BadRequest("not an HTTP/1 request"))),
            }
        }
    })
    .await
    .map_err(|_| None)??;
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

async fn handle(client: TcpStream, table: Arc<FrontTable>, acceptor: Option<TlsAcceptor>) {
    let _ = client.set_nodelay(true);
    match acceptor {
        None => {
            let mut client = client;
            let routed = match read_routed(&mut client, &table, None).await {
                Ok(routed) => routed,
                Err(refusal) => return refuse(&mut client, refusal).await,
            };
            let Some((upstream, _count)) = proxy::connect_routed(&routed.routes).await else {
                let service = service_of(&table, &routed.routes);
                return refuse(&mut client, Some(Refusal::NoInstance(service))).await;
            };
            if proxy::write_all(&upstream, &routed.head).await.is_ok() {
                let _ = proxy::relay(&client, &upstream).await;
            }
        }
        Some(acceptor) => {
            let Ok(Ok(mut client)) =
                tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(client)).await
            else {
                return;
            };
            let sni = client.get_ref().1.server_name().map(str::to_owned);
            let routed = match read_routed(&mut client, &table, sni.as_deref()).await {
                Ok(routed) => routed,
                Err(refusal) => return refuse(&mut client, refusal).await,
            };
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
        let wait = || std::thread::sleep(RELOAD_CHECK + Duration::from_millis(50));

        std::fs::write(&paths.cert, "garbage\n").unwrap();
        wait();
        assert!(
            Arc::ptr_eq(&certs.current(), &first),
            "the last good one is served"
        );
        wait();
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
        wait();
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

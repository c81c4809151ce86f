//! The data plane: what serves a service's endpoint. It must outlive the control plane, so that a
//! controller that crashes or is being replaced refuses no connection.
//!
//! A data plane owns, per service, the endpoint's listening sockets and proxy threads
//! ([`crate::proxy`]) with their per-instance connection counts, and the kernel's connect-time
//! balancer ([`ConnectBalancer`]), whose BPF links live exactly as long as the process holding
//! them. [`LocalPlane`] is that, inside the calling process (the controller's unit tests use it).
//! `imago serve` runs it in a process of its own instead, `imago __dataplane` ([`run`]): the
//! controller spawns it on first use, and talks to it over a unix socket in the deploy directory
//! ([`RemotePlane`]: routes in, connection counts out). A controller killed with `kill -9` or
//! stopped for an upgrade leaves the data plane serving the last routes it was given; the next
//! controller connects to the same process (one balancer stays attached, counts are not lost,
//! so drains stay correct) and only then changes anything.
//!
//! The data plane process ends by itself once no controller is connected and it has no endpoint
//! left (a destroyed service's endpoint is closed by the controller or by `imago destroy`), and
//! once the connections of closed endpoints have ended: nothing of it then remains, no process,
//! no listener, no BPF program (nothing is pinned).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use imago_runtime::balancer::{BalancerError, ConnectBalancer};
use imago_runtime::forward::{Forward, ForwardError, Forwarder};
use serde::{Deserialize, Serialize};

use crate::daemon::{DeployHome, try_lock};
use crate::error::DeployError;
use crate::proxy::Routes;
use crate::router::{Admission, Front, HeadLimits, Routing};

/// How long a data plane nobody connected to waits for its first controller before it ends.
const FIRST_CONTROLLER_WAIT: Duration = Duration::from_secs(10);
/// How long a request to the data plane process may take before the controller gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the controller asks of the data plane. Every call is idempotent, so a client that lost
/// its data plane can replay what it asked for to a new one.
pub trait DataPlane: Send {
    /// Serves `service` on `addrs` from now on, routed as `routing` says (by host name, through
    /// TLS, or plain); earlier addresses of the service stop accepting (their open connections
    /// are relayed to their end), and its routes and counts carry over.
    fn listen(
        &mut self,
        service: &str,
        addrs: &[SocketAddr],
        routing: &Routing,
    ) -> Result<Listening, DeployError>;
    /// Stops accepting connections for `service`; open ones are relayed to their end and keep
    /// counting for [`DataPlane::connections`].
    fn close(&mut self, service: &str) -> Result<(), DeployError>;
    /// Sends new connections to `service` to `targets` (instance id, address) only.
    fn route(&mut self, service: &str, targets: &[(String, SocketAddr)])
    -> Result<(), DeployError>;
    /// Open proxied connections of `service` to each of `ids`.
    fn connections(&mut self, service: &str, ids: &[String]) -> Result<Vec<usize>, DeployError>;
    /// Forgets the kernel's peer-address rewrite of every backend not in `keep`.
    fn keep_peers(&mut self, keep: &BTreeSet<SocketAddrV4>) -> Result<(), DeployError>;
    /// Whether the kernel balances connections of this host's clients.
    fn kernel_balancing(&self) -> bool;
    /// Why kernel balancing was turned off, and which certificate files of host-routed
    /// endpoints failed to reload, since the last call (one message per failure).
    fn take_kernel_failures(&mut self) -> Vec<String>;
    /// The endpoints the data plane already served when this controller connected to it.
    fn adopted(&self) -> Vec<EndpointStatus>;
}

/// The answer to [`DataPlane::listen`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listening {
    /// The endpoint already listened on that address (a restarted controller adopts it).
    pub adopted: bool,
    /// The address this host's clients use that the kernel balances, if it does.
    pub balanced: Option<SocketAddrV4>,
    /// The kernel forwards remote clients of the endpoint's public addresses to its instances
    /// (nftables DNAT) once it has routes.
    #[serde(default)]
    pub forwarding: bool,
}

/// One endpoint of a data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub service: String,
    /// Empty once closed: it only finishes its open connections.
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    pub routed: Vec<(String, SocketAddr)>,
    pub open_connections: usize,
}

/// What a data plane serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaneStatus {
    pub pid: u32,
    pub kernel_balancing: bool,
    /// The nftables table forwarding remote clients, if the kernel does.
    #[serde(default)]
    pub kernel_forwarding: Option<String>,
    pub endpoints: Vec<EndpointStatus>,
}

/// The address clients on this host use for an endpoint on `addr`, if the kernel can balance it:
/// the bind address, or loopback for the wildcard.
pub fn balanced_address(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, a.port()))
        }
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

/// Ends an endpoint's proxy threads' accepting when dropped.
struct Accepting(tokio::sync::watch::Sender<bool>);

impl Drop for Accepting {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

struct PlaneEndpoint {
    addrs: Vec<SocketAddr>,
    /// Not plain: the endpoint is served by the [`Front`]s of its addresses, never by the
    /// kernel path (which cannot read a host name).
    routing: Routing,
    routes: Routes,
    targets: Vec<(String, SocketAddr)>,
    _accepting: Option<Accepting>,
}

/// The data plane inside this process: endpoint proxies and, optionally, the kernel balancer.
/// Dropped, it stops accepting and detaches the balancer.
#[derive(Default)]
pub struct LocalPlane {
    endpoints: BTreeMap<String, PlaneEndpoint>,
    /// The host-routed addresses, each shared by the services that declare hosts on it.
    fronts: BTreeMap<SocketAddr, Front>,
    /// The connections of every front still waiting for their first request head.
    admission: Arc<Admission>,
    balancer: Option<ConnectBalancer>,
    /// The nftables table remote clients are forwarded by, when kernel balancing is wanted.
    forward_table: Option<String>,
    forwarder: Option<Forwarder>,
    failures: Vec<String>,
}

/// The nftables table of the data plane of `home`: one per home, so that two homes on one host
/// (tests, users) never write each other's rules.
pub fn forward_table(home: &DeployHome) -> String {
    let root = std::fs::canonicalize(&home.root).unwrap_or_else(|_| home.root.clone());
    let digest = imago_oci::Digest::of(root.as_os_str().as_encoded_bytes());
    format!("imago_{}", &digest.hex()[..12])
}

impl LocalPlane {
    pub fn new(balancer: Option<ConnectBalancer>) -> LocalPlane {
        LocalPlane {
            balancer,
            ..LocalPlane::default()
        }
    }

    /// Caps connections waiting for their first request head at fronts started from now on
    /// (the default: [`HeadLimits::for_open_files`] when the plane was made).
    pub fn with_head_limits(mut self, limits: HeadLimits) -> LocalPlane {
        self.admission = Arc::new(Admission::new(limits));
        self
    }

    /// Forwards remote clients in the kernel, with the rules in nftables table `table`,
    /// whenever kernel balancing is wanted ([`LocalPlane::want_kernel_balancing`]).
    pub fn with_forwarding(mut self, table: String) -> LocalPlane {
        self.forward_table = Some(table);
        self
    }

    /// Forgets closed endpoints whose last connection has ended.
    fn collect(&mut self) {
        self.endpoints
            .retain(|_, e| !e.addrs.is_empty() || e.routes.open_connections() > 0);
    }

    /// No endpoint listens and no connection is open.
    pub fn idle(&mut self) -> bool {
        self.collect();
        self.endpoints.is_empty()
    }

    pub fn status(&self) -> PlaneStatus {
        PlaneStatus {
            pid: std::process::id(),
            kernel_balancing: self.balancer.is_some(),
            kernel_forwarding: self.forwarder.as_ref().map(|f| f.table().to_owned()),
            endpoints: self
                .endpoints
                .iter()
                .map(|(service, e)| EndpointStatus {
                    service: service.clone(),
                    addrs: e.addrs.clone(),
                    routed: e.targets.clone(),
                    open_connections: e.routes.open_connections(),
                })
                .collect(),
        }
    }

    /// Turns kernel balancing (and forwarding, see [`LocalPlane::with_forwarding`]) on or off
    /// as a (new) controller wants it; a failure to attach is returned as a warning, and the
    /// proxies take every connection the kernel does not.
    pub fn want_kernel_balancing(&mut self, want: bool) -> Option<String> {
        if !want {
            // Detaching returns every connection to the listening proxies; dropping the
            // forwarder removes its rules.
            self.balancer = None;
            self.forwarder = None;
            return None;
        }
        let mut warnings = Vec::new();
        if self.balancer.is_none() {
            match ConnectBalancer::attach() {
                Ok(balancer) => {
                    self.balancer = Some(balancer);
                    for service in self.endpoint_names() {
                        if let Some((addrs, targets)) = self
                            .endpoints
                            .get(&service)
                            .map(|e| (e.addrs.clone(), e.targets.clone()))
                        {
                            for addr in addrs {
                                self.balance(&service, addr, &targets);
                            }
                        }
                    }
                }
                Err(e) => warnings.push(format!(
                    "kernel balancing unavailable ({e}): every connection to a service endpoint goes through its proxy"
                )),
            }
        }
        if self.forwarder.is_none()
            && let Some(table) = self.forward_table.clone()
        {
            // A data plane killed before this one may have left rules in the table: written
            // whole again, they are this plane's.
            match Forwarder::new(&table).and_then(|f| f.rewrite().map(|()| f)) {
                Ok(forwarder) => {
                    self.forwarder = Some(forwarder);
                    for service in self.endpoint_names() {
                        self.forward(&service);
                    }
                }
                Err(e) => warnings.push(format!(
                    "kernel forwarding unavailable ({e}): remote clients of a service endpoint go through its proxy"
                )),
            }
        }
        (!warnings.is_empty()).then(|| warnings.join("; "))
    }

    fn endpoint_names(&self) -> Vec<String> {
        self.endpoints.keys().cloned().collect()
    }

    /// Points the kernel's forwarding of `service`'s public addresses at its routed targets.
    fn forward(&mut self, service: &str) {
        let Some(forwarder) = &self.forwarder else {
            return;
        };
        // A host-routed endpoint gets no rule (an empty one removes the service's rules).
        let (listen, backends) = self
            .endpoints
            .get(service)
            .filter(|e| e.routing.is_plain())
            .map(|e| (v4_only(&e.addrs), v4_only(e.targets.iter().map(|(_, a)| a))))
            .unwrap_or_default();
        // A target the kernel cannot reach (IPv6) must not lose its share: leave all to the proxy.
        let targets = self.endpoints.get(service).map_or(0, |e| e.targets.len());
        let backends = if backends.len() == targets {
            backends
        } else {
            Vec::new()
        };
        if let Err(e) = forwarder.set(service, Forward { listen, backends }) {
            self.forwarding_failed(service, &e);
        }
    }

    /// A failed write of the rules turns forwarding off (dropping the forwarder deletes its
    /// table, so no stale rule keeps sending clients to a retired instance).
    fn forwarding_failed(&mut self, service: &str, e: &ForwardError) {
        self.forwarder = None;
        self.failures.push(format!(
            "service {service}: kernel forwarding turned off after an error ({e}): remote clients now go through the endpoint proxies"
        ));
    }

    fn forwarding(&self, addrs: &[SocketAddr]) -> bool {
        self.forwarder.is_some() && v4_only(addrs).iter().any(|a| !a.ip().is_loopback())
    }

    fn balanced(&self, addrs: &[SocketAddr]) -> Option<SocketAddrV4> {
        self.balancer
            .as_ref()
            .and(addrs.iter().find_map(|a| balanced_address(*a)))
    }

    fn routed_by_host(&self, service: &str) -> bool {
        self.endpoints
            .get(service)
            .is_some_and(|e| !e.routing.is_plain())
    }

    /// Points the kernel's balancing of the endpoint on `addr` at `targets` (never for a
    /// host-routed endpoint: its clients must reach the router).
    fn balance(&mut self, service: &str, addr: SocketAddr, targets: &[(String, SocketAddr)]) {
        if self.routed_by_host(service) {
            return;
        }
        let (Some(balancer), Some(address)) = (&self.balancer, balanced_address(addr)) else {
            return;
        };
        let backends: Vec<SocketAddrV4> = targets
            .iter()
            .filter_map(|(_, a)| match a {
                SocketAddr::V4(a) => Some(*a),
                SocketAddr::V6(_) => None,
            })
            .collect();
        // A target the kernel cannot reach (IPv6) must not lose its share: leave it to the proxy.
        let backends = if backends.len() == targets.len() {
            backends
        } else {
            Vec::new()
        };
        if let Err(e) = balancer.set(address, &backends) {
            self.kernel_failed(Some(service), &e);
        }
    }

    fn unbalance(&mut self, service: &str, addr: SocketAddr) {
        if self.routed_by_host(service) {
            return;
        }
        let (Some(balancer), Some(address)) = (&self.balancer, balanced_address(addr)) else {
            return;
        };
        if let Err(e) = balancer.remove(address) {
            self.kernel_failed(Some(service), &e);
        }
    }

    /// A kernel error turns kernel balancing off for good (every connection then goes through
    /// the proxy, which is always right), rather than leave a stale backend list in the kernel.
    fn kernel_failed(&mut self, service: Option<&str>, e: &BalancerError) {
        self.balancer = None;
        let service = service
            .map(|s| format!("service {s}: "))
            .unwrap_or_default();
        self.failures.push(format!(
            "{service}kernel balancing turned off after an error ({e}): every connection now goes through the endpoint proxies"
        ));
    }
}

impl LocalPlane {
    /// Whether the front on `addr` serves `service` alone (or nothing): then the service may
    /// take its port over.
    fn front_only_of(&self, addr: &SocketAddr, service: &str) -> bool {
        self.fronts
            .get(addr)
            .is_some_and(|f| f.claimed(service, &[]).is_none())
    }

    /// Takes `service` off every front whose address is not in `keep`; a front left without
    /// services stops accepting.
    fn leave_fronts(&mut self, service: &str, keep: &[SocketAddr]) {
        self.fronts
            .retain(|addr, front| keep.contains(addr) || !front.leave(service));
    }

    /// [`DataPlane::listen`] for an endpoint routed by host name and/or TLS: one [`Front`] per
    /// address, shared with the other services that route by host on it.
    fn listen_routed(
        &mut self,
        service: &str,
        addrs: &[SocketAddr],
        routing: &Routing,
    ) -> Result<Listening, DeployError> {
        let bad = |reason: String| DeployError::InvalidService {
            service: service.to_owned(),
            field: "hosts".into(),
            reason,
        };
        let tls = routing.tls.is_some();
        for addr in addrs {
            let Some(front) = self.fronts.get(addr) else {
                continue;
            };
            if let Some((other, what)) = front.claimed(service, &routing.hosts) {
                return Err(bad(format!(
                    "{what} on {addr} is served by service {other} already"
                )));
            }
            if front.tls() != tls && !self.front_only_of(addr, service) {
                return Err(bad(format!(
                    "{addr} is shared with services that {} TLS",
                    if front.tls() {
                        "terminate"
                    } else {
                        "do not terminate"
                    }
                )));
            }
        }
        // A bad certificate fails before anything changes.
        if let Some(paths) = &routing.tls {
            crate::router::load_certified_key(paths)?;
        }
        let routes = self
            .endpoints
            .get(service)
            .map(|e| e.routes.clone())
            .unwrap_or_default();
        let mut started = Vec::new();
        for addr in addrs {
            if self.fronts.get(addr).is_some_and(|f| f.tls() == tls) {
                continue;
            }
            // The port may be held by this service's own earlier endpoint or front: the new
            // listeners bind beside it (SO_REUSEPORT), and the old ones stop accepting below.
            let mine = self.front_only_of(addr, service)
                || self
                    .endpoints
                    .get(service)
                    .is_some_and(|e| e.addrs.iter().any(|a| a.port() == addr.port()));
            let first = (service, routing, &routes);
            started.push((
                *addr,
                Front::start(*addr, tls, !mine, self.admission.clone(), first)?,
            ));
        }
        for addr in addrs {
            if let Some(front) = self.fronts.get(addr).filter(|f| f.tls() == tls) {
                front.set(service, routing, &routes)?;
            }
        }
        self.fronts.extend(started);
        self.leave_fronts(service, addrs);
        // Still recorded as it was: a plain endpoint's kernel balancing is undone.
        let old_addrs = self
            .endpoints
            .get(service)
            .map(|e| e.addrs.clone())
            .unwrap_or_default();
        for addr in old_addrs {
            self.unbalance(service, addr);
        }
        let old = self.endpoints.remove(service);
        let targets = old.map(|e| e.targets).unwrap_or_default();
        self.endpoints.insert(
            service.to_owned(),
            PlaneEndpoint {
                addrs: addrs.to_vec(),
                routing: routing.clone(),
                routes,
                targets,
                _accepting: None,
            },
        );
        self.forward(service);
        Ok(Listening::default())
    }
}

impl DataPlane for LocalPlane {
    fn listen(
        &mut self,
        service: &str,
        addrs: &[SocketAddr],
        routing: &Routing,
    ) -> Result<Listening, DeployError> {
        self.collect();
        if self
            .endpoints
            .get(service)
            .is_some_and(|e| e.addrs == addrs && e.routing == *routing)
        {
            return Ok(Listening {
                adopted: true,
                balanced: self.balanced(addrs).filter(|_| routing.is_plain()),
                forwarding: routing.is_plain() && self.forwarding(addrs),
            });
        }
        if !routing.is_plain() {
            return self.listen_routed(service, addrs, routing);
        }
        let mut listeners = Vec::new();
        for addr in addrs {
            let bad = |what: &str, e: std::io::Error| DeployError::InvalidService {
                service: service.to_owned(),
                field: "port".into(),
                reason: format!("{what} {addr}: {e}"),
            };
            // The port may be held by this service's own earlier endpoint (`port = 80` that
            // became `bind = "0.0.0.0:80"`, a list that changed): SO_REUSEPORT lets the new
            // listeners bind beside it, and the old ones stop accepting below.
            let mine = self.front_only_of(addr, service)
                || self
                    .endpoints
                    .get(service)
                    .is_some_and(|e| e.addrs.iter().any(|a| a.port() == addr.port()));
            listeners.extend(
                crate::proxy::bind(*addr, crate::proxy::default_threads(), !mine)
                    .map_err(|e| bad("cannot listen on", e))?,
            );
        }
        // A new address keeps the service's routes: connections still open on the old one (its
        // threads relay them to their end) keep counting for drains.
        let routes = self
            .endpoints
            .get(service)
            .map(|e| e.routes.clone())
            .unwrap_or_default();
        let (accepting, rx) = tokio::sync::watch::channel(false);
        crate::proxy::spawn(listeners, routes.clone(), rx).map_err(|e| {
            DeployError::InvalidService {
                service: service.to_owned(),
                field: "port".into(),
                reason: format!("cannot start the endpoint: {e}"),
            }
        })?;
        self.leave_fronts(service, &[]);
        let old_addrs = self
            .endpoints
            .get(service)
            .map(|e| e.addrs.clone())
            .unwrap_or_default();
        for old_addr in old_addrs {
            self.unbalance(service, old_addr);
        }
        let old = self.endpoints.remove(service);
        let targets = old.map(|e| e.targets).unwrap_or_default();
        self.endpoints.insert(
            service.to_owned(),
            PlaneEndpoint {
                routing: Routing::default(),
                addrs: addrs.to_vec(),
                routes,
                targets: targets.clone(),
                _accepting: Some(Accepting(accepting)),
            },
        );
        if !targets.is_empty() {
            for addr in addrs {
                self.balance(service, *addr, &targets);
            }
        }
        self.forward(service);
        Ok(Listening {
            adopted: false,
            balanced: self.balanced(addrs),
            forwarding: self.forwarding(addrs),
        })
    }

    fn close(&mut self, service: &str) -> Result<(), DeployError> {
        self.leave_fronts(service, &[]);
        let addrs = self
            .endpoints
            .get_mut(service)
            .map(|e| {
                e._accepting = None;
                std::mem::take(&mut e.addrs)
            })
            .unwrap_or_default();
        for addr in addrs {
            self.unbalance(service, addr);
        }
        self.forward(service);
        self.collect();
        Ok(())
    }

    fn route(
        &mut self,
        service: &str,
        targets: &[(String, SocketAddr)],
    ) -> Result<(), DeployError> {
        let Some(endpoint) = self.endpoints.get_mut(service) else {
            return Ok(());
        };
        endpoint.routes.set(targets);
        endpoint.targets = targets.to_vec();
        for addr in endpoint.addrs.clone() {
            self.balance(service, addr, targets);
        }
        self.forward(service);
        Ok(())
    }

    fn connections(&mut self, service: &str, ids: &[String]) -> Result<Vec<usize>, DeployError> {
        let routes = self.endpoints.get(service).map(|e| &e.routes);
        Ok(ids
            .iter()
            .map(|id| routes.map_or(0, |r| r.active_connections(id)))
            .collect())
    }

    fn keep_peers(&mut self, keep: &BTreeSet<SocketAddrV4>) -> Result<(), DeployError> {
        if let Some(Err(e)) = self.balancer.as_ref().map(|b| b.keep_peers(keep)) {
            self.kernel_failed(None, &e);
        }
        Ok(())
    }

    fn kernel_balancing(&self) -> bool {
        self.balancer.is_some()
    }

    fn take_kernel_failures(&mut self) -> Vec<String> {
        let mut failures = std::mem::take(&mut self.failures);
        for front in self.fronts.values() {
            failures.extend(front.take_failures());
        }
        failures
    }

    fn adopted(&self) -> Vec<EndpointStatus> {
        Vec::new()
    }
}

fn v4_only<'a>(addrs: impl IntoIterator<Item = &'a SocketAddr>) -> Vec<SocketAddrV4> {
    addrs
        .into_iter()
        .filter_map(|a| match a {
            SocketAddr::V4(a) => Some(*a),
            SocketAddr::V6(_) => None,
        })
        .collect()
}

// ---- the data plane process and its protocol ------------------------------------------------

/// One request, one line of JSON on the unix socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Hello {
        kernel_balancing: bool,
    },
    Listen {
        service: String,
        addr: SocketAddr,
        /// The endpoint's other addresses (`bind` lists).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        also: Vec<SocketAddr>,
        /// Host names and TLS, if the endpoint routes by them.
        #[serde(default, skip_serializing_if = "Routing::is_plain")]
        routing: Routing,
    },
    Close {
        service: String,
    },
    Route {
        service: String,
        targets: Vec<(String, SocketAddr)>,
    },
    Connections {
        service: String,
        ids: Vec<String>,
    },
    KeepPeers {
        keep: Vec<SocketAddrV4>,
    },
    Status,
}

/// The answer to a request, one line of JSON.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Reply {
    error: Option<String>,
    warning: Option<String>,
    kernel_balancing: bool,
    kernel_failures: Vec<String>,
    listening: Option<Listening>,
    counts: Vec<usize>,
    status: Option<PlaneStatus>,
}

struct Server {
    plane: LocalPlane,
    /// Connected controllers (connections that said hello); `imago destroy` and status
    /// queries do not count.
    controllers: usize,
    had_controller: bool,
    closing: bool,
}

fn lock_server(server: &Mutex<Server>) -> MutexGuard<'_, Server> {
    // A panic in one request leaves a plane that still serves: keep going.
    server
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn handle(plane: &mut LocalPlane, request: Request) -> Reply {
    let mut reply = Reply::default();
    let result = match request {
        Request::Hello { kernel_balancing } => {
            reply.warning = plane.want_kernel_balancing(kernel_balancing);
            reply.status = Some(plane.status());
            Ok(())
        }
        Request::Listen {
            service,
            addr,
            also,
            routing,
        } => {
            let addrs: Vec<SocketAddr> = std::iter::once(addr).chain(also).collect();
            plane
                .listen(&service, &addrs, &routing)
                .map(|l| reply.listening = Some(l))
        }
        Request::Close { service } => plane.close(&service),
        Request::Route { service, targets } => plane.route(&service, &targets),
        Request::Connections { service, ids } => {
            plane.connections(&service, &ids).map(|c| reply.counts = c)
        }
        Request::KeepPeers { keep } => plane.keep_peers(&keep.into_iter().collect()),
        Request::Status => {
            reply.status = Some(plane.status());
            Ok(())
        }
    };
    reply.error = result.err().map(|e| e.to_string());
    reply.kernel_balancing = plane.kernel_balancing();
    reply.kernel_failures = plane.take_kernel_failures();
    reply
}

fn serve_client(server: Arc<Mutex<Server>>, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut controller = false;
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let mut state = lock_server(&server);
                // Accepted just before the plane began to end: answering would let the plane
                // of a process about to exit bind ports (replayed `Listen`s) that the next
                // plane needs. Hanging up makes the client start that next plane.
                if state.closing {
                    break;
                }
                if matches!(request, Request::Hello { .. }) && !controller {
                    controller = true;
                    state.controllers += 1;
                    state.had_controller = true;
                }
                handle(&mut state.plane, request)
            }
            Err(e) => Reply {
                error: Some(format!("bad request: {e}")),
                ..Reply::default()
            },
        };
        let Ok(mut text) = serde_json::to_vec(&reply) else {
            break;
        };
        text.push(b'\n');
        if writer.write_all(&text).is_err() {
            break;
        }
    }
    if controller {
        lock_server(&server).controllers -= 1;
    }
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DeployError {
    let path = path.to_owned();
    move |source| DeployError::Io { what, path, source }
}

/// Every client connection takes two descriptors here (its own and its instance's), for every
/// service of the home: the soft limit a shell or systemd hands down (1024) would let one
/// client with a few hundred idle connections make every endpoint fail its accepts. The soft
/// limit goes up to the hard one, as nginx's `worker_rlimit_nofile` or HAProxy do by themselves.
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // No hard limit ("unlimited") is not a value the kernel takes for open files: keep as is.
    if let Some(hard) = limit.maximum
        && limit.current.is_some_and(|soft| soft < hard)
    {
        let raised = rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        // At worst the process keeps the limit it had.
        let _ = setrlimit(Resource::Nofile, raised);
    }
}

/// The data plane process (`imago __dataplane`) of `home`: serves its socket until no
/// controller is connected and nothing is left to serve. Returns at once if another data plane
/// of this home runs (after waiting a moment for one that is ending).
pub fn run(home: &DeployHome) -> Result<(), DeployError> {
    raise_open_files_limit();
    std::fs::create_dir_all(&home.dir).map_err(io_error("cannot create", &home.dir))?;
    let lock_path = home.dataplane_lock_path();
    let deadline = Instant::now() + Duration::from_secs(5);
    let _lock = loop {
        if let Some(lock) = try_lock(&lock_path)? {
            break lock;
        }
        if Instant::now() >= deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let socket = home.dataplane_socket();
    // A socket file left by a data plane that was killed: nobody serves it (the lock says so).
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(io_error("cannot listen on", &socket))?;
    let server = Arc::new(Mutex::new(Server {
        plane: LocalPlane::new(None).with_forwarding(forward_table(home)),
        controllers: 0,
        had_controller: false,
        closing: false,
    }));
    let accepting = server.clone();
    std::thread::Builder::new()
        .name("imago-dataplane-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if lock_server(&accepting).closing {
                    // The plane is ending: the client sees end of file and starts a new one.
                    continue;
                }
                let server = accepting.clone();
                let _ = std::thread::Builder::new()
                    .name("imago-dataplane-client".into())
                    .spawn(move || serve_client(server, stream));
            }
        })
        .map_err(io_error("cannot start a thread for", &socket))?;
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let mut state = lock_server(&server);
        let waited = state.had_controller || started.elapsed() >= FIRST_CONTROLLER_WAIT;
        if waited && state.controllers == 0 && state.plane.idle() {
            state.closing = true;
            let _ = std::fs::remove_file(&socket);
            // Detaches the balancer and removes the forwarding rules before the lock is
            // released: a new data plane attaches and writes its own.
            state.plane = LocalPlane::new(None);
            return Ok(());
        }
    }
}

/// How to start the data plane process when none runs.
#[derive(Debug, Clone)]
pub struct PlaneCommand {
    /// The imago executable (`imago --home HOME __dataplane`).
    pub exe: PathBuf,
    pub home: DeployHome,
}

impl PlaneCommand {
    /// Starts a data plane; the flag it returns is set once that process has ended.
    fn spawn(&self) -> Result<Arc<std::sync::atomic::AtomicBool>, DeployError> {
        let log_path = self.home.dataplane_log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_error("cannot open", &log_path))?;
        let log_err = log
            .try_clone()
            .map_err(io_error("cannot open", &log_path))?;
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("--home")
            .arg(&self.home.root)
            .arg("__dataplane")
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // Its own process group: a signal to the controller's group does not reach it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .map_err(io_error("cannot start the data plane", &self.exe))?;
        // Reaped whenever it ends, for as long as this process lives.
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ended_flag = ended.clone();
        let _ = std::thread::Builder::new()
            .name("imago-dataplane-reaper".into())
            .spawn(move || {
                let _ = child.wait();
                ended_flag.store(true, std::sync::atomic::Ordering::SeqCst);
            });
        Ok(ended)
    }
}

struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    fn open(socket: &Path) -> std::io::Result<Connection> {
        let writer = UnixStream::connect(socket)?;
        writer.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        writer.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        Ok(Connection {
            reader: BufReader::new(writer.try_clone()?),
            writer,
        })
    }

    fn call(&mut self, request: &Request) -> std::io::Result<Reply> {
        let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&answer).map_err(std::io::Error::other)
    }
}

/// The controller's side of a data plane process: starts one if none runs, and if its data plane
/// goes away, starts a new one and gives it again everything it had asked for.
pub struct RemotePlane {
    command: PlaneCommand,
    connection: Option<Connection>,
    want_kernel_balancing: bool,
    kernel_balancing: bool,
    failures: Vec<String>,
    /// What this controller asked for, to replay to a new data plane.
    listening: BTreeMap<String, (Vec<SocketAddr>, Routing)>,
    routes: BTreeMap<String, Vec<(String, SocketAddr)>>,
    adopted: PlaneStatus,
    warning: Option<String>,
}

impl RemotePlane {
    /// Connects to the data plane of `command.home`, starting it if none runs, and asks it for
    /// kernel balancing or not.
    pub fn connect(
        command: PlaneCommand,
        want_kernel_balancing: bool,
    ) -> Result<RemotePlane, DeployError> {
        let mut plane = RemotePlane {
            command,
            connection: None,
            want_kernel_balancing,
            kernel_balancing: false,
            failures: Vec::new(),
            listening: BTreeMap::new(),
            routes: BTreeMap::new(),
            adopted: PlaneStatus::default(),
            warning: None,
        };
        plane.reconnect()?;
        Ok(plane)
    }

    /// Why kernel balancing could not be turned on, if it could not.
    pub fn warning(&self) -> Option<&str> {
        self.warning.as_deref()
    }

    /// The data plane's state when this controller connected.
    pub fn adopted_status(&self) -> &PlaneStatus {
        &self.adopted
    }

    fn socket(&self) -> PathBuf {
        self.command.home.dataplane_socket()
    }

    fn error(&self, message: String) -> DeployError {
        DeployError::DataPlane {
            socket: self.socket(),
            message,
        }
    }

    /// Opens a connection, starting the data plane if none answers, until `deadline`.
    fn open_or_start(&self, deadline: Instant) -> Result<Connection, DeployError> {
        let socket = self.socket();
        if let Ok(c) = Connection::open(&socket) {
            return Ok(c);
        }
        let mut started = self.command.spawn()?;
        loop {
            match Connection::open(&socket) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => {
                    return Err(self.error(format!(
                        "the data plane did not start ({e}); see {}",
                        self.command.home.dataplane_log_path().display()
                    )));
                }
                // The one started gave up waiting for the lock of a plane that took long to
                // end (it returns after 5 s): start another while time is left.
                Err(_) => {
                    if started.load(std::sync::atomic::Ordering::SeqCst) {
                        started = self.command.spawn()?;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Opens a connection, starting the data plane if none answers, then says hello and
    /// replays what this controller asked for. A data plane that was ending as this controller
    /// connected (its last controller had just gone and it served nothing) hangs up without an
    /// answer: that is no failure, a new one is started (a controller restarted right after a
    /// kill met this under load and ended its set-up on "connection reset").
    fn reconnect(&mut self) -> Result<(), DeployError> {
        self.connection = None;
        let hello = Request::Hello {
            kernel_balancing: self.want_kernel_balancing,
        };
        let deadline = Instant::now() + PLANE_START_TIMEOUT;
        let (mut connection, reply) = loop {
            let mut connection = self.open_or_start(deadline)?;
            match connection.call(&hello) {
                Ok(reply) => break (connection, reply),
                Err(e) if hung_up(&e) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(self.error(format!("no answer: {e}"))),
            }
        };
        self.warning = reply.warning;
        self.kernel_balancing = reply.kernel_balancing;
        if let Some(status) = reply.status {
            self.adopted = status;
        }
        let mut replay: Vec<Request> = Vec::new();
        for (service, (addrs, routing)) in &self.listening {
            if let Some(request) = listen_request(service, addrs, routing) {
                replay.push(request);
            }
        }
        for (service, targets) in &self.routes {
            replay.push(Request::Route {
                service: service.clone(),
                targets: targets.clone(),
            });
        }
        for request in replay {
            let reply = connection
                .call(&request)
                .map_err(|e| self.error(format!("no answer: {e}")))?;
            self.kernel_balancing = reply.kernel_balancing;
            self.failures.extend(reply.kernel_failures);
        }
        self.connection = Some(connection);
        Ok(())
    }

    fn call(&mut self, request: Request) -> Result<Reply, DeployError> {
        let first = match self.connection.as_mut() {
            Some(c) => c.call(&request).ok(),
            None => None,
        };
        let reply = match first {
            Some(reply) => reply,
            None => {
                // The data plane ended or hung up: start (or find) one, replay, ask again.
                self.reconnect()?;
                let answer = self.connection.as_mut().map(|c| c.call(&request));
                match answer {
                    Some(Ok(reply)) => reply,
                    Some(Err(e)) => {
                        self.connection = None;
                        return Err(self.error(format!("no answer: {e}")));
                    }
                    None => return Err(self.error("not connected".into())),
                }
            }
        };
        self.kernel_balancing = reply.kernel_balancing;
        self.failures.extend(reply.kernel_failures.iter().cloned());
        match &reply.error {
            Some(message) => Err(DeployError::DataPlane {
                socket: self.socket(),
                message: message.clone(),
            }),
            None => Ok(reply),
        }
    }
}

/// How long a controller waits for a data plane to start and answer its hello.
const PLANE_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `e` says that the data plane closed the connection (it was ending), rather than
/// that it is stuck (a timeout) or answered nonsense.
fn hung_up(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
    )
}

fn listen_request(service: &str, addrs: &[SocketAddr], routing: &Routing) -> Option<Request> {
    let (first, also) = addrs.split_first()?;
    Some(Request::Listen {
        service: service.to_owned(),
        addr: *first,
        also: also.to_vec(),
        routing: routing.clone(),
    })
}

impl DataPlane for RemotePlane {
    fn listen(
        &mut self,
        service: &str,
        addrs: &[SocketAddr],
        routing: &Routing,
    ) -> Result<Listening, DeployError> {
        let Some(request) = listen_request(service, addrs, routing) else {
            self.close(service)?;
            return Ok(Listening::default());
        };
        let reply = self.call(request)?;
        self.listening
            .insert(service.to_owned(), (addrs.to_vec(), routing.clone()));
        Ok(reply.listening.unwrap_or_default())
    }

    fn close(&mut self, service: &str) -> Result<(), DeployError> {
        self.listening.remove(service);
        self.routes.remove(service);
        self.call(Request::Close {
            service: service.to_owned(),
        })
        .map(|_| ())
    }

    fn route(
        &mut self,
        service: &str,
        targets: &[(String, SocketAddr)],
    ) -> Result<(), DeployError> {
        if self.routes.get(service).map(Vec::as_slice) == Some(targets) {
            return Ok(());
        }
        self.call(Request::Route {
            service: service.to_owned(),
            targets: targets.to_vec(),
        })?;
        self.routes.insert(service.to_owned(), targets.to_vec());
        Ok(())
    }

    fn connections(&mut self, service: &str, ids: &[String]) -> Result<Vec<usize>, DeployError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let reply = self.call(Request::Connections {
            service: service.to_owned(),
            ids: ids.to_vec(),
        })?;
        if reply.counts.len() != ids.len() {
            return Err(self.error(format!(
                "asked for {} connection counts, got {}",
                ids.len(),
                reply.counts.len()
            )));
        }
        Ok(reply.counts)
    }

    /// Called once a pass, so it is also what notices a data plane that died (and starts a new
    /// one) when nothing else changes.
    fn keep_peers(&mut self, keep: &BTreeSet<SocketAddrV4>) -> Result<(), DeployError> {
        self.call(Request::KeepPeers {
            keep: keep.iter().copied().collect(),
        })
        .map(|_| ())
    }

    fn kernel_balancing(&self) -> bool {
        self.kernel_balancing
    }

    fn take_kernel_failures(&mut self) -> Vec<String> {
        std::mem::take(&mut self.failures)
    }

    fn adopted(&self) -> Vec<EndpointStatus> {
        self.adopted.endpoints.clone()
    }
}

/// Asks the data plane of `home`, if one runs, what it serves.
pub fn status(home: &DeployHome) -> Result<Option<PlaneStatus>, DeployError> {
    ask_running(home, &Request::Status).map(|r| r.and_then(|r| r.status))
}

/// Closes `service`'s endpoint in the data plane of `home`, if one runs (`imago destroy` without
/// a controller: the data plane ends once nothing is left to serve).
pub fn close_endpoint(home: &DeployHome, service: &str) -> Result<(), DeployError> {
    let answered = ask_running(
        home,
        &Request::Close {
            service: service.to_owned(),
        },
    )?;
    if answered.is_none() {
        // No data plane: nothing serves this home's endpoints, so rules a killed one left
        // behind would only send remote clients to instances being destroyed.
        let _ = imago_runtime::forward::delete_table(&forward_table(home));
    }
    Ok(())
}

fn ask_running(home: &DeployHome, request: &Request) -> Result<Option<Reply>, DeployError> {
    let socket = home.dataplane_socket();
    let Ok(mut connection) = Connection::open(&socket) else {
        return Ok(None);
    };
    let reply = match connection.call(request) {
        Ok(reply) => reply,
        // It was ending as we connected: it serves nothing any more.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => {
            return Err(DeployError::DataPlane {
                socket,
                message: format!("no answer: {e}"),
            });
        }
    };
    match reply.error {
        Some(message) => Err(DeployError::DataPlane { socket, message }),
        None => Ok(Some(reply)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::controller::{Controller, LABEL_SERVICE};
    use crate::spec::ServiceSpec;
    use crate::state::StateDb;
    use imago_oci::Digest;
    use imago_runtime::{Engine, FakeProvider, Provider, Status};
    use std::io::{Read, Write};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A host-network "instance" that keeps every connection open until the client closes it.
    pub(crate) fn holding_backend() -> u16 {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = backend.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in backend.incoming() {
                let Ok(mut stream) = stream else { break };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while stream.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
                });
            }
        });
        port
    }

    fn converge(controller: &mut Controller) {
        for _ in 0..200 {
            let passes = controller.pass().unwrap();
            if passes.iter().all(|p| p.complete) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("did not converge");
    }

    fn running(fake: &FakeProvider) -> Vec<String> {
        fake.list()
            .unwrap()
            .into_iter()
            .filter(|i| i.status == Status::Running && i.labels.contains_key(LABEL_SERVICE))
            .map(|i| i.id)
            .collect()
    }

    /// A connection to `addr` that stays open (the backend only reads).
    fn open_connection(addr: SocketAddr) -> std::net::TcpStream {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"hello").unwrap();
        s
    }

    fn settles(mut check: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn an_endpoint_listens_on_every_address_of_its_bind_list_ipv4_and_ipv6_alike() {
        let mut plane = LocalPlane::new(None);
        let backend = SocketAddr::from(([127, 0, 0, 1], holding_backend()));
        let port = free_port();
        let v4 = SocketAddr::from(([0, 0, 0, 0], port));
        let v6: SocketAddr = format!("[::]:{port}").parse().unwrap();
        // `[::]` serves IPv6 only, so both can be bound on one port.
        plane.listen("web", &[v4, v6], &Routing::default()).unwrap();
        plane.route("web", &[("a".into(), backend)]).unwrap();
        let ids = ["a".to_owned()];
        let local4 = open_connection(SocketAddr::from(([127, 0, 0, 1], port)));
        let local6 = open_connection(format!("[::1]:{port}").parse().unwrap());
        assert!(settles(
            || plane.connections("web", &ids).unwrap() == vec![2]
        ));
        assert!(
            plane
                .listen("web", &[v4, v6], &Routing::default())
                .unwrap()
                .adopted
        );
        // A list that drops an address: that one stops accepting, the other keeps serving.
        plane.listen("web", &[v4], &Routing::default()).unwrap();
        assert!(settles(|| std::net::TcpStream::connect(
            format!("[::1]:{port}").parse::<SocketAddr>().unwrap()
        )
        .is_err()));
        drop(open_connection(SocketAddr::from(([127, 0, 0, 1], port))));
        drop((local4, local6));
        plane.close("web").unwrap();
        assert!(settles(|| plane.idle()));
    }

    /// Sends a request head for `host` and returns what came back before the server closed
    /// or 300 ms passed.
    fn ask_host(addr: SocketAddr, host: &str) -> (std::net::TcpStream, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        (s, String::from_utf8_lossy(&answer).into_owned())
    }

    #[test]
    fn host_routed_services_share_an_address_gate_on_routes_and_drain_like_the_proxy() {
        // Kernel balancing on: a host-routed endpoint must still never be given to it.
        let mut plane = LocalPlane::new(None);
        assert_eq!(plane.want_kernel_balancing(true), None);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let routing = |host: &str| Routing {
            hosts: vec![host.to_owned()],
            tls: None,
        };
        let shop = plane
            .listen("shop", &[addr], &routing("shop.example"))
            .unwrap();
        assert_eq!(shop.balanced, None);
        plane
            .listen("blog", &[addr], &routing("blog.example"))
            .unwrap();
        // The same host on the same address is refused, naming the service that has it.
        let err = plane
            .listen("copy", &[addr], &routing("shop.example"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shop.example") && err.contains("shop"),
            "{err}"
        );

        // No routed instance yet: the request is answered 503, and nothing is counted.
        let (_, answer) = ask_host(addr, "shop.example");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains("service shop has no ready instance"),
            "{answer}"
        );

        let backend = SocketAddr::from(([127, 0, 0, 1], holding_backend()));
        plane.route("shop", &[("s1".into(), backend)]).unwrap();
        let ids = ["s1".to_owned()];
        let (held, _) = ask_host(addr, "shop.example");
        assert!(settles(
            || plane.connections("shop", &ids).unwrap() == vec![1]
        ));
        assert_eq!(plane.connections("blog", &ids).unwrap(), vec![0]);
        // Retired: new requests get no instance, the open connection keeps its count.
        plane.route("shop", &[]).unwrap();
        let (_, answer) = ask_host(addr, "shop.example");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert_eq!(plane.connections("shop", &ids).unwrap(), vec![1]);
        drop(held);
        assert!(settles(
            || plane.connections("shop", &ids).unwrap() == vec![0]
        ));

        let (_, answer) = ask_host(addr, "nobody.example");
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        // The address serves until its last service leaves.
        plane.close("shop").unwrap();
        let (_, answer) = ask_host(addr, "shop.example");
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        plane.close("blog").unwrap();
        assert!(settles(|| std::net::TcpStream::connect(addr).is_err()));
        assert!(settles(|| plane.idle()));
    }

    #[test]
    fn a_request_without_host_or_with_an_oversized_head_is_answered_by_the_router() {
        let mut plane = LocalPlane::new(None);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let routing = Routing {
            hosts: vec!["shop.example".into()],
            tls: None,
        };
        plane.listen("shop", &[addr], &routing).unwrap();
        let backend = SocketAddr::from(([127, 0, 0, 1], holding_backend()));
        plane.route("shop", &[("s1".into(), backend)]).unwrap();
        let answer = |request: &[u8]| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(request).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer);
            String::from_utf8_lossy(&answer).into_owned()
        };
        // hyper answers an HTTP/1.0 client in HTTP/1.0.
        let no_host = answer(b"GET / HTTP/1.0\r\n\r\n");
        assert!(
            no_host.starts_with("HTTP/1.0 400") && no_host.ends_with("no Host header\n"),
            "{no_host}"
        );
        let huge = format!(
            "GET / HTTP/1.1\r\nHost: shop.example\r\nX-Big: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        let too_large = answer(huge.as_bytes());
        assert!(too_large.starts_with("HTTP/1.1 431"), "{too_large}");
        let not_http = answer(b"\x16\x03\x01 this is not a request\r\n\r\n");
        assert!(not_http.starts_with("HTTP/1.1 400"), "{not_http}");
        // A client still sending when it is refused (a large head, then a body) gets the
        // answer, not a reset that destroys it.
        for round in 0..5 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut writer = s.try_clone().unwrap();
            let head = huge.clone();
            let sending = std::thread::spawn(move || {
                let _ = writer.write_all(head.as_bytes());
                for _ in 0..25 {
                    if writer.write_all(&[b'b'; 4096]).is_err() {
                        break;
                    }
                }
            });
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer);
            let _ = sending.join();
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with("HTTP/1.1 431"),
                "round {round}: {answer:?}"
            );
        }
        assert_eq!(
            plane.connections("shop", &["s1".to_owned()]).unwrap(),
            vec![0]
        );
    }

    /// A host-network "instance" that answers every request with 200 and closes.
    fn http_backend() -> SocketAddr {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = backend.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in backend.incoming() {
                let Ok(mut stream) = stream else { break };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                    );
                });
            }
        });
        addr
    }

    /// A connection to `addr` from the loopback address `from` (any of 127/8 is this host's).
    fn connect_from(from: std::net::Ipv4Addr, addr: SocketAddr) -> std::net::TcpStream {
        use rustix::net::{AddressFamily, SocketFlags, SocketType};
        let socket = rustix::net::socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::net::bind(&socket, &SocketAddr::from((from, 0))).unwrap();
        rustix::net::connect(&socket, &addr).unwrap();
        std::net::TcpStream::from(socket)
    }

    /// The status line of the answer to a request for `host` from `from`, within 5 s.
    fn status_from(from: std::net::Ipv4Addr, addr: SocketAddr, host: &str) -> String {
        let mut s = connect_from(from, addr);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer).into_owned();
        answer.lines().next().unwrap_or_default().to_owned()
    }

    /// How many of `connections` the server has not closed.
    fn still_open(connections: &[std::net::TcpStream]) -> usize {
        connections
            .iter()
            .filter(|s| {
                s.set_nonblocking(true).unwrap();
                let mut buf = [0u8; 64];
                matches!((&**s).read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count()
    }

    #[test]
    fn idle_connections_of_one_source_or_of_many_keep_no_other_client_from_being_served() {
        let mut plane = LocalPlane::new(None).with_head_limits(HeadLimits {
            per_source: 8,
            total: 32,
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let routing = Routing {
            hosts: vec!["shop.example".into()],
            tls: None,
        };
        plane.listen("shop", &[addr], &routing).unwrap();
        plane
            .route("shop", &[("s1".into(), http_backend())])
            .unwrap();
        let source = |last: u8| std::net::Ipv4Addr::new(127, 0, 0, last);

        // One source opens 100 connections and sends nothing: 8 of them stay open. (Until the
        // plane has taken all 100 from its queue more may be open; from then on exactly 8, for
        // the 10 s of HEAD_TIMEOUT. A deadline for the plane at any load, not a latency bound.)
        let idle: Vec<_> = (0..100).map(|_| connect_from(source(1), addr)).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut open = still_open(&idle);
        while open != 8 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            open = still_open(&idle);
        }
        assert_eq!(open, 8, "of one source's 100 idle connections");
        assert_eq!(
            status_from(source(2), addr, "shop.example"),
            "HTTP/1.1 200 OK"
        );
        // Its own next request is served too, in place of its oldest idle connection.
        assert_eq!(
            status_from(source(1), addr, "shop.example"),
            "HTTP/1.1 200 OK"
        );

        // 20 sources, 8 idle connections each: past the total, the longest-waiting go.
        let many: Vec<_> = (10..30)
            .flat_map(|last| (0..8).map(move |_| connect_from(source(last), addr)))
            .collect();
        // The plane takes them from its listening sockets (one per proxy thread, SO_REUSEPORT)
        // at its own pace, not in the order they came: until it has taken them all, one taken
        // late would count as newer than the client's below and could take its place. Then the
        // 32 newest of them wait, and source 1's, longer waiting, are gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut open = (still_open(&idle), still_open(&many));
        while open != (0, 32) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            open = (still_open(&idle), still_open(&many));
        }
        assert_eq!(open, (0, 32), "(of source 1's, of the 20 sources')");
        assert_eq!(
            status_from(source(3), addr, "shop.example"),
            "HTTP/1.1 200 OK"
        );
        drop((idle, many));
        plane.close("shop").unwrap();
        assert!(settles(|| plane.idle()));
    }

    #[test]
    fn a_plain_endpoint_that_turns_host_routed_on_its_port_answers_no_request_with_404() {
        let mut plane = LocalPlane::new(None);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let routed = Routing {
            hosts: vec!["shop.example".into()],
            tls: None,
        };
        plane.listen("shop", &[addr], &Routing::default()).unwrap();
        plane
            .route("shop", &[("s1".into(), http_backend())])
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Answers so far, per client: the flips go on until each client has had more than 20
        // (however slow the machine), and for 40 rounds at least.
        let counts: Vec<_> = (0..2)
            .map(|_| Arc::new(std::sync::atomic::AtomicUsize::new(0)))
            .collect();
        let clients: Vec<_> = counts
            .iter()
            .map(|count| {
                let stop = stop.clone();
                let count = count.clone();
                std::thread::spawn(move || {
                    let (mut answered, mut wrong) = (0, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
                            continue;
                        };
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        // Read to its end: the host router keeps a connection open unless
                        // asked to close it.
                        let request =
                            b"GET / HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n";
                        if s.write_all(request).is_err() {
                            continue;
                        }
                        let mut answer = Vec::new();
                        let _ = s.read_to_end(&mut answer);
                        // A reset (a listener closed with connections in its queue) is not
                        // what this test is about: only answers are judged.
                        if answer.is_empty() {
                            continue;
                        }
                        answered += 1;
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if !answer.starts_with(b"HTTP/1.1 200 ") {
                            wrong.push(String::from_utf8_lossy(&answer).into_owned());
                        }
                    }
                    (answered, wrong)
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        for round in 0.. {
            let answered = || {
                counts
                    .iter()
                    .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
                    .min()
                    .unwrap_or(0)
            };
            if round >= 40 && answered() > 20 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{round} rounds of flips, {} answers",
                answered()
            );
            plane.listen("shop", &[addr], &routed).unwrap();
            std::thread::sleep(Duration::from_millis(10));
            plane.listen("shop", &[addr], &Routing::default()).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for client in clients {
            let (answered, wrong) = client.join().unwrap();
            assert!(answered > 20, "only {answered} answers");
            assert!(
                wrong.is_empty(),
                "{} of {answered} answers were not 200: {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(3)]
            );
        }
        plane.close("shop").unwrap();
    }

    #[test]
    fn the_data_plane_takes_as_many_open_files_as_the_hard_limit_allows() {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let before = getrlimit(Resource::Nofile);
        let hard = before.maximum.expect("a finite hard limit of open files");
        assert!(hard > 1024, "hard limit {hard}: nothing to raise to");
        let low = rustix::process::Rlimit {
            current: Some(1024),
            maximum: Some(hard),
        };
        setrlimit(Resource::Nofile, low).unwrap();
        raise_open_files_limit();
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
    }

    /// A TCP backend that greets every connection with one line and closes it: not HTTP.
    fn greeting_backend() -> SocketAddr {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = backend.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in backend.incoming() {
                let Ok(mut stream) = stream else { break };
                let _ = stream.write_all(b"pong from the backend\n");
            }
        });
        addr
    }

    /// A self-signed certificate for `db.example` and its key, in `dir`.
    fn self_signed_db_certificate(
        dir: &std::path::Path,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let (cert, key) = (dir.join("c.pem"), dir.join("c.key"));
        let made = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=db.example", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl (installed by scripts/setup)");
        assert!(made.status.success());
        (cert, key)
    }

    #[test]
    fn tls_without_hosts_fronts_any_tcp_protocol_for_one_service() {
        let backend_addr = greeting_backend();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed_db_certificate(dir.path());
        let mut plane = LocalPlane::new(None);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let routing = Routing {
            hosts: Vec::new(),
            tls: Some(crate::router::TlsPaths {
                cert: cert.clone(),
                key,
            }),
        };
        plane.listen("db", &[addr], &routing).unwrap();
        plane.route("db", &[("d1".into(), backend_addr)]).unwrap();
        // No other service may join an address that one service takes whole.
        let other = Routing {
            hosts: vec!["x.example".into()],
            tls: routing.tls.clone(),
        };
        assert!(plane.listen("other", &[addr], &other).is_err());
        // Without ALPN, and with a client that offers only a protocol that is not HTTP (as
        // PostgreSQL's direct TLS or gRPC's `h2` do): both are served.
        for alpn in [None, Some("postgresql")] {
            let mut client = std::process::Command::new("openssl");
            client
                .args(["s_client", "-quiet", "-verify_return_error", "-CAfile"])
                .arg(&cert)
                .args(["-servername", "db.example", "-connect", &addr.to_string()]);
            if let Some(alpn) = alpn {
                client.args(["-alpn", alpn]);
            }
            let out = client.stdin(std::process::Stdio::null()).output().unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(
                said.contains("pong from the backend"),
                "ALPN {alpn:?}: {said} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        plane.close("db").unwrap();
        assert!(settles(|| plane.idle()));
    }

    #[test]
    fn a_certificate_file_that_blocks_its_reader_stalls_no_handshake() {
        let backend_addr = greeting_backend();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed_db_certificate(dir.path());
        let ca = dir.path().join("ca.pem");
        std::fs::copy(&cert, &ca).unwrap();
        let mut plane = LocalPlane::new(None);
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let routing = Routing {
            hosts: Vec::new(),
            tls: Some(crate::router::TlsPaths {
                cert: cert.clone(),
                key,
            }),
        };
        plane.listen("db", &[addr], &routing).unwrap();
        plane.route("db", &[("d1".into(), backend_addr)]).unwrap();
        let served = || {
            let out = std::process::Command::new("timeout")
                .args([
                    "10",
                    "openssl",
                    "s_client",
                    "-quiet",
                    "-verify_return_error",
                ])
                .arg("-CAfile")
                .arg(&ca)
                .args(["-servername", "db.example", "-connect", &addr.to_string()])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("pong from the backend")
        };
        assert!(served());
        // The certificate becomes a FIFO that nobody writes: opening it to read blocks.
        std::fs::remove_file(&cert).unwrap();
        let fifo = std::process::Command::new("mkfifo")
            .arg(&cert)
            .status()
            .unwrap();
        assert!(fifo.success());
        std::thread::sleep(Duration::from_millis(2500));
        // Both proxy threads (the kernel spreads connections over them) still shake hands,
        // with the last certificate that loaded.
        for round in 0..6 {
            assert!(served(), "handshake {round} stalled or failed");
        }
        // A writer that closes at once ends the blocked read: no certificate in it, reported.
        let release = cert.clone();
        std::thread::spawn(move || drop(std::fs::OpenOptions::new().write(true).open(release)));
        assert!(settles(|| plane
            .take_kernel_failures()
            .iter()
            .any(|f| f.contains("service db") && f.contains("c.pem"))));
        assert!(served());
        plane.close("db").unwrap();
    }

    #[test]
    fn kernel_balancing_follows_what_the_connected_controller_wants() {
        let mut plane = LocalPlane::new(None);
        assert_eq!(plane.want_kernel_balancing(true), None);
        assert!(plane.kernel_balancing());
        let backend = SocketAddr::from(([127, 0, 0, 1], holding_backend()));
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let listening = plane.listen("web", &[addr], &Routing::default()).unwrap();
        assert_eq!(listening.balanced, balanced_address(addr));
        assert!(!listening.adopted);
        plane.route("web", &[("a".into(), backend)]).unwrap();
        assert!(
            plane
                .listen("web", &[addr], &Routing::default())
                .unwrap()
                .adopted
        );
        let ids = ["a".to_owned()];

        // Balanced by the kernel: past the proxy, which counts nothing.
        let direct = open_connection(addr);
        assert_eq!(direct.peer_addr().unwrap(), addr);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(plane.connections("web", &ids).unwrap(), vec![0]);

        // A controller that wants none: detached, the proxy takes every new connection.
        assert_eq!(plane.want_kernel_balancing(false), None);
        assert!(!plane.kernel_balancing());
        let proxied = open_connection(addr);
        assert!(settles(
            || plane.connections("web", &ids).unwrap() == vec![1]
        ));

        // And on again: balanced with the routes the plane has.
        assert_eq!(plane.want_kernel_balancing(true), None);
        let again = open_connection(addr);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(plane.connections("web", &ids).unwrap(), vec![1]);

        // Closed: refused, and idle once the proxied connection ends.
        plane.close("web").unwrap();
        assert!(settles(|| std::net::TcpStream::connect(addr).is_err()));
        assert!(!plane.idle(), "a proxied connection is still open");
        drop((direct, proxied, again));
        assert!(settles(|| plane.idle()));
    }

    /// A controller that connects to a data plane as it ends (its last controller had just
    /// gone and it served nothing: it hangs up without answering) starts the next data plane
    /// and connects to it, rather than fail its set-up.
    #[test]
    fn a_controller_that_meets_an_ending_data_plane_connects_to_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let home = DeployHome::new(dir.path());
        std::fs::create_dir_all(&home.dir).unwrap();
        // The ending data plane: takes one connection, then goes with its socket, unanswered.
        let ending = UnixListener::bind(home.dataplane_socket()).unwrap();
        let server_home = home.clone();
        let planes = std::thread::spawn(move || {
            let (stream, _) = ending.accept().unwrap();
            std::fs::remove_file(server_home.dataplane_socket()).unwrap();
            drop((stream, ending));
            // The next one, on this thread (the command below starts a program that does
            // nothing): it serves until its controller is gone.
            run(&server_home).unwrap();
        });
        let command = PlaneCommand {
            exe: PathBuf::from("/bin/true"),
            home: home.clone(),
        };
        let mut plane = RemotePlane::connect(command, false).unwrap();
        plane.keep_peers(&BTreeSet::new()).unwrap();
        assert!(status(&home).unwrap().is_some(), "the next data plane runs");
        drop(plane);
        planes.join().unwrap();
    }

    /// A data plane started while the last one still held its lock gives up after waiting
    /// 5 s and ends: the controller starts another rather than wait out its deadline for a
    /// plane that will never come (it started one, once).
    #[test]
    fn a_started_data_plane_that_gave_up_is_started_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let home = DeployHome::new(dir.path().join("home"));
        std::fs::create_dir_all(&home.dir).unwrap();
        // The "data plane" program records that it was started and ends at once, as one that
        // gave up does.
        let spawns = dir.path().join("spawns");
        let exe = dir.path().join("plane");
        std::fs::write(
            &exe,
            format!("#!/bin/sh\necho started >> {}\n", spawns.display()),
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The real data plane comes up only once a second start was asked for.
        let server_home = home.clone();
        let watched = spawns.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(9);
            while Instant::now() < deadline {
                let started = std::fs::read_to_string(&watched).unwrap_or_default();
                if started.lines().count() >= 2 {
                    run(&server_home).unwrap();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let command = PlaneCommand {
            exe,
            home: home.clone(),
        };
        let plane = RemotePlane::connect(command, false);
        let started = std::fs::read_to_string(&spawns).unwrap_or_default();
        assert!(
            plane.is_ok(),
            "{:?} after {} start(s)",
            plane.err(),
            started.lines().count()
        );
        assert!(started.lines().count() >= 2, "{started}");
    }

    #[test]
    fn connections_through_the_data_plane_hold_a_drain_across_a_controller_restart() {
        let dir = tempfile::tempdir().unwrap();
        let home = DeployHome::new(dir.path());
        // The data plane process's loop, on a thread of this test.
        let server_home = home.clone();
        std::thread::spawn(move || run(&server_home).unwrap());
        let socket = home.dataplane_socket();
        for _ in 0..500 {
            if UnixStream::connect(&socket).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let command = PlaneCommand {
            // Never started: the data plane above answers.
            exe: PathBuf::from("/nonexistent/imago"),
            home: home.clone(),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let fake = Arc::new(FakeProvider::new());
        let controller = || {
            Controller::new(
                StateDb::open(&home.db_path()).unwrap(),
                fake.clone(),
                runtime.handle().clone(),
                Engine::Embedded,
            )
            .with_data_plane(Box::new(
                RemotePlane::connect(command.clone(), false).unwrap(),
            ))
        };
        let backend_port = holding_backend();
        let port = free_port();
        let service = |version: &str| -> ServiceSpec {
            serde_json::from_value(serde_json::json!({"image": "web", "replicas": 1,
                "network": "host", "port": port, "target_port": backend_port,
                "env": {"V": version}, "stop_grace_period": "0s", "rollout": {"drain": "30s"}}))
            .unwrap()
        };
        let release = |version: &str| {
            StateDb::open(&home.db_path())
                .unwrap()
                .record_release(
                    "web",
                    &service(version),
                    &Digest::of(b"v1"),
                    "apply",
                    None,
                    "t",
                )
                .unwrap();
        };
        let mut first = controller();
        release("1");
        converge(&mut first);
        let old = running(&fake)[0].clone();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        client.write_all(b"hello").unwrap();
        for _ in 0..200 {
            if first.proxied_connections("web", &old) == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(first.proxied_connections("web", &old), 1);

        // The controller goes away; a new one, with no memory of it, retires the old instance.
        drop(first);
        let mut second = controller();
        assert_eq!(
            second.proxied_connections("web", &old),
            1,
            "the count survived"
        );
        release("2");
        for _ in 0..30 {
            second.pass().unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            running(&fake).contains(&old),
            "the old instance was stopped while a connection to it was open"
        );
        drop(client);
        converge(&mut second);
        assert!(!running(&fake).contains(&old));
        // The data plane serves the new instance on the same port.
        let status = status(&home).unwrap().unwrap();
        assert_eq!(status.endpoints.len(), 1, "{status:?}");
        assert_eq!(status.endpoints[0].routed.len(), 1);
        assert_ne!(status.endpoints[0].routed[0].0, old);
    }
}

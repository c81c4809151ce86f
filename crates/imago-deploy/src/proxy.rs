//! The service endpoint: a small TCP proxy that forwards each new connection to one of the
//! instances the controller marked ready, and that counts open connections per instance so that a
//! retired instance is stopped only once it is drained.
//!
//! Clients never see which instance serves them, and never see an instance being replaced: a
//! connection is only ever sent to a routed backend, and if that backend refuses, the next one is
//! tried before the client notices anything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long one connect attempt to a backend may take before the next backend is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Backend {
    addr: SocketAddr,
    active: Arc<AtomicUsize>,
    routed: bool,
}

#[derive(Debug, Default)]
struct Table {
    backends: BTreeMap<String, Backend>,
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

    /// The routed backends in round-robin order, starting with the next one in turn.
    fn candidates(&self) -> Vec<(String, SocketAddr, Arc<AtomicUsize>)> {
        let mut table = self.lock();
        let routed: Vec<_> = table
            .backends
            .iter()
            .filter(|(_, b)| b.routed)
            .map(|(id, b)| (id.clone(), b.addr, b.active.clone()))
            .collect();
        if routed.is_empty() {
            return routed;
        }
        let start = table.next % routed.len();
        table.next = table.next.wrapping_add(1);
        routed[start..]
            .iter()
            .chain(routed[..start].iter())
            .cloned()
            .collect()
    }
}

/// Accepts connections on `listener` until `shutdown` turns true, forwarding each to a routed
/// backend. A connection that no backend accepts is closed at once.
pub async fn serve(listener: TcpListener, routes: Routes, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
                continue;
            }
        };
        let Ok((client, _)) = accepted else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            forward(client, routes).await;
        });
    }
}

async fn forward(mut client: TcpStream, routes: Routes) {
    for (_, addr, active) in routes.candidates() {
        // Count the connection before connecting, so a drain never misses one in flight.
        active.fetch_add(1, Ordering::SeqCst);
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
        match connected {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                active.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            _ => {
                active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
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

    async fn endpoint(routes: Routes) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve(listener, routes, rx));
        (addr, tx)
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
    async fn no_backend_closes_the_connection() {
        let routes = Routes::default();
        let (ep, _stop) = endpoint(routes).await;
        let mut s = TcpStream::connect(ep).await.unwrap();
        let mut out = Vec::new();
        let n = s.read_to_end(&mut out).await.unwrap_or(0);
        assert_eq!(n, 0);
    }
}

//! Health probes from the host to an instance: an HTTP GET or a TCP connect, with a timeout.
//! (Command probes run inside the instance and need the runtime; the controller runs those.)

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    Healthy,
    /// Why not, in words that go into `imago status` ("GET / returned 500", "connection refused").
    Unhealthy(String),
}

/// GETs `path` from `addr` and expects `status`.
pub async fn http(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> ProbeResult {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: imago-health\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send to {addr}: {e}"))?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        // The status line is all that matters; read until its end.
        while !head.contains(&b'\n') && head.len() < 4096 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("read from {addr}: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or("").trim().to_owned();
        let code = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok());
        match code {
            Some(code) if code == status => Ok(()),
            Some(code) => Err(format!(
                "GET {path} on {addr} returned {code}, expected {status}"
            )),
            None => Err(format!(
                "GET {path} on {addr} got no HTTP status line (got {line:?})"
            )),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => ProbeResult::Healthy,
        Ok(Err(reason)) => ProbeResult::Unhealthy(reason),
        Err(_) => {
            ProbeResult::Unhealthy(format!("GET {path} on {addr} timed out after {timeout:?}"))
        }
    }
}

/// Connects to `addr`.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> ProbeResult {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => ProbeResult::Healthy,
        Ok(Err(e)) => ProbeResult::Unhealthy(format!("connect to {addr}: {e}")),
        Err(_) => ProbeResult::Unhealthy(format!("connect to {addr} timed out after {timeout:?}")),
    }
}

/// Consecutive probe results turned into a verdict, as Docker and Kubernetes do: healthy after
/// `healthy_threshold` successes in a row, unhealthy after `unhealthy_threshold` failures in a
/// row; failures during the start period do not count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthTracker {
    pub successes: u32,
    pub failures: u32,
    pub healthy: bool,
    pub unhealthy: bool,
    pub last_failure: Option<String>,
}

impl HealthTracker {
    pub fn record(
        &mut self,
        result: ProbeResult,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
        in_start_period: bool,
    ) {
        match result {
            ProbeResult::Healthy => {
                self.successes += 1;
                self.failures = 0;
                if self.successes >= healthy_threshold {
                    self.healthy = true;
                    self.unhealthy = false;
                }
            }
            ProbeResult::Unhealthy(reason) => {
                self.last_failure = Some(reason);
                self.successes = 0;
                if in_start_period && !self.healthy {
                    return;
                }
                self.failures += 1;
                if self.failures >= unhealthy_threshold {
                    self.unhealthy = true;
                    self.healthy = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn http_server(response: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_probe_checks_the_status() {
        let ok = http_server("HTTP/1.0 200 OK\r\n\r\nfine").await;
        assert_eq!(
            http(ok, "/", 200, Duration::from_secs(1)).await,
            ProbeResult::Healthy
        );
        let broken = http_server("HTTP/1.0 500 Internal Server Error\r\n\r\n").await;
        match http(broken, "/up", 200, Duration::from_secs(1)).await {
            ProbeResult::Unhealthy(reason) => assert!(
                reason.contains("returned 500") && reason.contains("/up"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn tcp_probe_reports_refused_ports() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        match tcp(closed, Duration::from_secs(1)).await {
            ProbeResult::Unhealthy(reason) => {
                assert!(reason.contains(&closed.to_string()), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let open = http_server("").await;
        assert_eq!(
            tcp(open, Duration::from_secs(1)).await,
            ProbeResult::Healthy
        );
    }

    #[test]
    fn thresholds_and_start_period() {
        let mut t = HealthTracker::default();
        t.record(ProbeResult::Unhealthy("x".into()), 2, 2, true);
        t.record(ProbeResult::Unhealthy("x".into()), 2, 2, true);
        assert!(!t.unhealthy, "failures in the start period do not count");
        t.record(ProbeResult::Healthy, 2, 2, false);
        assert!(!t.healthy, "needs two successes");
        t.record(ProbeResult::Healthy, 2, 2, false);
        assert!(t.healthy);
        t.record(ProbeResult::Unhealthy("503".into()), 2, 2, false);
        assert!(t.healthy && !t.unhealthy, "one failure is not enough");
        t.record(ProbeResult::Unhealthy("503".into()), 2, 2, false);
        assert!(t.unhealthy && !t.healthy);
        assert_eq!(t.last_failure.as_deref(), Some("503"));
    }
}

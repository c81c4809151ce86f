//! Health probes from the host to an instance: an HTTP GET or a TCP connect, with a timeout.
//! (Command probes run inside the instance and need the runtime; the controller runs those.)

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    Healthy,
    /// Why not, in words that go into `imago status` ("GET / returned 500", "connection refused").
    Unhealthy(String),
    /// The probe cannot say: its own timer fired [`STARVED_LATENESS`] or more after the
    /// deadline, so the controller itself was starved of CPU and did not look at the answer in
    /// time. Counts neither way; the caller asks again (see `controller::probes`).
    Inconclusive(String),
}

/// A probe whose timeout fires this much after its deadline was starved, not answered late.
/// Far above the timer's own granularity (1 ms) and a busy runtime's usual lag.
pub const STARVED_LATENESS: Duration = Duration::from_millis(250);

/// How one step of a probe ended against its deadline.
enum Waited<T> {
    Done(T),
    /// The deadline passed, and the probe's timer fired on time: the instance did not answer.
    TimedOut,
    /// The timer fired this late: the controller was not running when the deadline passed.
    Starved(Duration),
}

async fn until<T>(deadline: Instant, step: impl Future<Output = T>) -> Waited<T> {
    match tokio::time::timeout_at(deadline, step).await {
        Ok(value) => Waited::Done(value),
        Err(_) => {
            let late = Instant::now().saturating_duration_since(deadline);
            if late >= STARVED_LATENESS {
                Waited::Starved(late)
            } else {
                Waited::TimedOut
            }
        }
    }
}

fn starved(what: String, late: Duration) -> ProbeResult {
    ProbeResult::Inconclusive(format!(
        "{what}: the controller's timer fired {late:?} late (it was starved of CPU), so this check counts neither way"
    ))
}

/// GETs `path` from `addr` and expects `status`. The connect gets `timeout`, and the answer
/// gets `timeout` from when the request was actually sent: a controller that was slow to send
/// it (starved between the connect and the write) does not shorten the instance's time.
pub async fn http(addr: SocketAddr, path: &str, status: u16, timeout: Duration) -> ProbeResult {
    let get = || format!("GET {path} on {addr}");
    let mut stream = match until(Instant::now() + timeout, TcpStream::connect(addr)).await {
        Waited::Done(Ok(stream)) => stream,
        Waited::Done(Err(e)) => return ProbeResult::Unhealthy(format!("connect to {addr}: {e}")),
        Waited::TimedOut => {
            return ProbeResult::Unhealthy(format!("{} timed out after {timeout:?}", get()));
        }
        Waited::Starved(late) => return starved(get(), late),
    };
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: imago-health\r\nConnection: close\r\n\r\n"
    );
    // A fresh socket's send buffer takes the few bytes at once.
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return ProbeResult::Unhealthy(format!("send to {addr}: {e}"));
    }
    let sent = Instant::now();
    let answer = async {
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
        Ok::<_, String>(head)
    };
    let head = match until(sent + timeout, answer).await {
        Waited::Done(Ok(head)) => head,
        Waited::Done(Err(reason)) => return ProbeResult::Unhealthy(reason),
        Waited::TimedOut => {
            return ProbeResult::Unhealthy(format!("{} timed out after {timeout:?}", get()));
        }
        Waited::Starved(late) => return starved(get(), late),
    };
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("").trim().to_owned();
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(code) if code == status => ProbeResult::Healthy,
        Some(code) => ProbeResult::Unhealthy(format!(
            "GET {path} on {addr} returned {code}, expected {status}"
        )),
        None => ProbeResult::Unhealthy(format!(
            "GET {path} on {addr} got no HTTP status line (got {line:?})"
        )),
    }
}

/// Connects to `addr`.
pub async fn tcp(addr: SocketAddr, timeout: Duration) -> ProbeResult {
    match until(Instant::now() + timeout, TcpStream::connect(addr)).await {
        Waited::Done(Ok(_)) => ProbeResult::Healthy,
        Waited::Done(Err(e)) => ProbeResult::Unhealthy(format!("connect to {addr}: {e}")),
        Waited::TimedOut => {
            ProbeResult::Unhealthy(format!("connect to {addr} timed out after {timeout:?}"))
        }
        Waited::Starved(late) => starved(format!("connect to {addr}"), late),
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
            // The controller could not tell: nothing changes (the prober asks again).
            ProbeResult::Inconclusive(_) => {}
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

    /// A server on its own thread (never starved with the probe's runtime): answers `response`
    /// to every request, or, with `None`, accepts connections and never answers.
    fn thread_server(response: Option<&'static str>) -> SocketAddr {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for mut s in listener.incoming().flatten() {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                match response {
                    Some(r) => {
                        let _ = s.write_all(r.as_bytes());
                    }
                    None => held.push(s),
                }
            }
        });
        addr
    }

    fn one_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The controller's only thread is blocked (starved) right after the probe connected, for
    /// longer than the timeout: the instance still gets its whole timeout from when the request
    /// is actually sent, and answers in time. (Timed from the connect, this was a failure.)
    #[test]
    fn a_controller_starved_before_sending_does_not_fail_an_answering_instance() {
        let ok = thread_server(Some("HTTP/1.0 200 OK\r\n\r\nfine"));
        one_thread().block_on(async {
            let probe = tokio::spawn(http(ok, "/", 200, Duration::from_millis(300)));
            // The probe's first poll: its connect is sent.
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(700));
            assert_eq!(probe.await.unwrap(), ProbeResult::Healthy);
        });
    }

    /// A starved controller whose timer fires long after the deadline cannot tell whether the
    /// instance answered in time: inconclusive, never healthy. Not starved, the same silent
    /// instance fails on time.
    #[test]
    fn a_late_timer_is_inconclusive_and_a_silent_instance_fails_on_time() {
        let silent = thread_server(None);
        one_thread().block_on(async {
            let timeout = Duration::from_millis(100);
            let probe = tokio::spawn(http(silent, "/", 200, timeout));
            // Connected and sent: the probe now waits for the answer.
            tokio::time::sleep(Duration::from_millis(30)).await;
            std::thread::sleep(Duration::from_millis(600));
            match probe.await.unwrap() {
                ProbeResult::Inconclusive(reason) => {
                    assert!(reason.contains("late"), "{reason}")
                }
                other => panic!("a starved check must be inconclusive, got {other:?}"),
            }
            let started = std::time::Instant::now();
            match http(silent, "/", 200, timeout).await {
                ProbeResult::Unhealthy(reason) => {
                    assert!(reason.contains("timed out after 100ms"), "{reason}")
                }
                other => panic!("a silent instance must fail, got {other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(2));
        });
    }

    #[test]
    fn an_inconclusive_check_changes_no_verdict() {
        let mut t = HealthTracker::default();
        t.record(ProbeResult::Inconclusive("late".into()), 1, 1, false);
        assert!(
            !t.healthy && !t.unhealthy,
            "never healthy without an answer"
        );
        t.record(ProbeResult::Unhealthy("refused".into()), 1, 2, false);
        t.record(ProbeResult::Inconclusive("late".into()), 1, 2, false);
        t.record(ProbeResult::Unhealthy("refused".into()), 1, 2, false);
        assert!(
            t.unhealthy,
            "failures on both sides of an inconclusive check are in a row"
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

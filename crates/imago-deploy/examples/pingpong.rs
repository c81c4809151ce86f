//! A load client for long connections: each of CONNECTIONS threads sends a message, waits for
//! the same number of bytes back (an echo backend), and repeats on its one connection. Reports
//! round trips per second over all connections, from the moment all are connected, latency
//! percentiles and the slowest connect, so the endpoint proxy's cost per message can be compared
//! with direct connections.
//!
//!   cargo run --release -p imago-deploy --example pingpong -- ADDR [SECONDS] [BYTES] [CONNECTIONS]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .expect("usage: pingpong ADDR [SECONDS] [BYTES] [CONNECTIONS]");
    let seconds: f64 = args.next().map_or(3.0, |s| s.parse().expect("seconds"));
    let bytes: usize = args.next().map_or(64, |s| s.parse().expect("bytes"));
    let connections: usize = args.next().map_or(1, |s| s.parse().expect("connections"));
    // The clock starts once every connection is established: a connect whose SYN the backend's
    // listen queue dropped waits out the 1 s SYN retransmit timer, and counted in the run that
    // one wait decided a 16-connection result more than the path under test did (BENCHMARKS.md,
    // issue 15). How long the slowest connect took is reported on its own.
    let connected = Arc::new(Barrier::new(connections + 1));
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let addr = addr.clone();
            let connected = Arc::clone(&connected);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut stream = TcpStream::connect(&addr).expect("connect");
                let connect = t0.elapsed();
                stream.set_nodelay(true).expect("nodelay");
                connected.wait();
                let end = Instant::now() + Duration::from_secs_f64(seconds);
                let message = vec![b'x'; bytes];
                let mut answer = vec![0u8; bytes];
                let mut latencies = Vec::new();
                while Instant::now() < end {
                    let t0 = Instant::now();
                    stream.write_all(&message).expect("send");
                    stream.read_exact(&mut answer).expect("receive");
                    latencies.push(t0.elapsed());
                }
                (connect, latencies)
            })
        })
        .collect();
    connected.wait();
    let started = Instant::now();
    let mut slowest_connect = Duration::ZERO;
    let mut latencies: Vec<Duration> = Vec::new();
    for thread in threads {
        let (connect, mut measured) = thread.join().expect("client thread");
        slowest_connect = slowest_connect.max(connect);
        latencies.append(&mut measured);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() - 1) * p / 100].as_secs_f64() * 1e6;
    println!(
        "{:.0} round trips/s, p50 {:.0} us, p99 {:.0} us, slowest connect {:.1} ms",
        latencies.len() as f64 / elapsed,
        pct(50),
        pct(99),
        slowest_connect.as_secs_f64() * 1e3
    );
}

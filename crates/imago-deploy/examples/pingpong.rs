//! A load client for long connections: each of CONNECTIONS threads sends a message, waits for
//! the same number of bytes back (an echo backend), and repeats on its one connection. Reports
//! round trips per second over all connections and latency percentiles, so the endpoint
//! proxy's cost per message can be compared with direct connections.
//!
//!   cargo run --release -p imago-deploy --example pingpong -- ADDR [SECONDS] [BYTES] [CONNECTIONS]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .expect("usage: pingpong ADDR [SECONDS] [BYTES] [CONNECTIONS]");
    let seconds: f64 = args.next().map_or(3.0, |s| s.parse().expect("seconds"));
    let bytes: usize = args.next().map_or(64, |s| s.parse().expect("bytes"));
    let connections: usize = args.next().map_or(1, |s| s.parse().expect("connections"));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(&addr).expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let message = vec![b'x'; bytes];
                let mut answer = vec![0u8; bytes];
                let mut latencies = Vec::new();
                while Instant::now() < end {
                    let t0 = Instant::now();
                    stream.write_all(&message).expect("send");
                    stream.read_exact(&mut answer).expect("receive");
                    latencies.push(t0.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() - 1) * p / 100].as_secs_f64() * 1e6;
    println!(
        "{:.0} round trips/s, p50 {:.0} us, p99 {:.0} us",
        latencies.len() as f64 / elapsed,
        pct(50),
        pct(99)
    );
}

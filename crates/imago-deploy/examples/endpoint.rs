//! A service endpoint on its own, for measuring the proxy against direct connections without a
//! controller: forwards LISTEN to the BACKEND addresses (round-robin) on THREADS proxy threads
//! (default: one per core, as the controller runs it) until killed.
//!
//!   cargo run --release -p imago-deploy --example endpoint -- LISTEN BACKEND[,BACKEND...] [THREADS]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use imago_deploy::proxy::{self, Routes};

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: endpoint LISTEN BACKEND[,BACKEND...] [THREADS]";
    let listen: SocketAddr = args.next().expect(usage).parse().expect("LISTEN");
    let backends: Vec<(String, SocketAddr)> = args
        .next()
        .expect(usage)
        .split(',')
        .enumerate()
        .map(|(i, b)| (format!("b{i}"), b.parse().expect("BACKEND")))
        .collect();
    let threads = args
        .next()
        .map_or_else(proxy::default_threads, |t| t.parse().expect("THREADS"));
    let routes = Routes::default();
    routes.set(&backends);
    let (_shutdown, rx) = tokio::sync::watch::channel(false);
    let listeners = proxy::bind(listen, threads, true).expect("bind");
    for thread in proxy::spawn(listeners, routes, rx).expect("spawn") {
        thread.join().expect("proxy thread");
    }
}

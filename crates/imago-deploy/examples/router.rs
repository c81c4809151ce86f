//! A host-routed endpoint on its own, for measuring host routing and TLS termination against
//! the plain proxy and HAProxy without a controller: the data plane's own code (a `Front` in a
//! `LocalPlane`), routing HOST on LISTEN to the BACKEND addresses (round-robin), with TLS when
//! CERT and KEY are given, until killed.
//!
//!   cargo run -p imago-deploy --example router -- LISTEN BACKEND[,BACKEND...] HOST [CERT KEY]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;

use imago_deploy::dataplane::{DataPlane, LocalPlane};
use imago_deploy::router::{Routing, TlsPaths};

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: router LISTEN BACKEND[,BACKEND...] HOST [CERT KEY]";
    let listen: SocketAddr = args.next().expect(usage).parse().expect("LISTEN");
    let backends: Vec<(String, SocketAddr)> = args
        .next()
        .expect(usage)
        .split(',')
        .enumerate()
        .map(|(i, b)| (format!("b{i}"), b.parse().expect("BACKEND")))
        .collect();
    let host = args.next().expect(usage);
    let tls = args.next().map(|cert| TlsPaths {
        cert: PathBuf::from(cert),
        key: PathBuf::from(args.next().expect(usage)),
    });
    let mut plane = LocalPlane::new(None);
    let routing = Routing {
        hosts: vec![host],
        tls,
    };
    plane.listen("bench", &[listen], &routing).expect("listen");
    plane.route("bench", &backends).expect("route");
    loop {
        std::thread::park();
    }
}

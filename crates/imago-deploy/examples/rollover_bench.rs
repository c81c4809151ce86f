//! Times a rollover of many instances under the controller's own loop (a pass, then
//! `wait_for_next_pass` with the daemon's 250 ms interval), with the in-memory fake provider
//! made as slow as a loaded host: its listing costs `LIST_US` microseconds an instance and
//! each launch `LAUNCH_MS` milliseconds (8 at a time). Run once per pass gap factor, each on a
//! fresh controller and database, so the pacing can be compared in one run.
//!
//!     cargo run -p imago-deploy --example rollover_bench -- [N] [LIST_US] [LAUNCH_MS] [FACTORS]
//!
//! Defaults: 1000 instances, 200 us, 0 ms, factors `2,0`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use imago_deploy::controller::Controller;
use imago_deploy::spec::ServiceSpec;
use imago_deploy::state::StateDb;
use imago_oci::Digest;
use imago_runtime::{Engine, FakeProvider, Instance, InstanceSpec, Provider, RuntimeError};

/// The fake provider, slowed.
struct Slowed {
    fake: FakeProvider,
    per_listed: Duration,
    per_launch: Duration,
}

impl Provider for Slowed {
    fn launch(&self, spec: &InstanceSpec) -> Result<Instance, RuntimeError> {
        std::thread::sleep(self.per_launch);
        self.fake.launch(spec)
    }
    fn stop(&self, id: &str, grace: Duration) -> Result<Instance, RuntimeError> {
        self.fake.stop(id, grace)
    }
    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.fake.remove(id)
    }
    fn list(&self) -> Result<Vec<Instance>, RuntimeError> {
        let listed = self.fake.list()?;
        std::thread::sleep(self.per_listed * listed.len() as u32);
        Ok(listed)
    }
    fn inspect(&self, id: &str) -> Result<Instance, RuntimeError> {
        self.fake.inspect(id)
    }
    fn logs(&self, id: &str) -> Result<Vec<u8>, RuntimeError> {
        self.fake.logs(id)
    }
}

/// Passes until "web" completes: the time, the passes and the time in them.
fn until_complete(controller: &mut Controller) -> (Duration, usize, Duration) {
    let started = Instant::now();
    let (mut passes, mut in_passes) = (0, Duration::ZERO);
    loop {
        let pass_started = Instant::now();
        let pass = controller.pass().unwrap().remove(0);
        in_passes += pass_started.elapsed();
        passes += 1;
        assert!(pass.failed.is_none(), "{pass:?}");
        if pass.complete {
            return (started.elapsed(), passes, in_passes);
        }
        controller.wait_for_next_pass(Duration::from_millis(250));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| args.get(i).map_or(default, |a| a.parse().unwrap());
    let n = arg(0, 1000);
    let per_listed = Duration::from_micros(arg(1, 200));
    let per_launch = Duration::from_millis(arg(2, 0));
    let factors: Vec<u32> = args
        .get(3)
        .map_or("2,0", String::as_str)
        .split(',')
        .map(|f| f.parse().unwrap())
        .collect();
    // What the tcp checks of the fake instances (host network) connect to.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || listener.incoming().for_each(drop));
    let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
        "image": "web", "replicas": n, "network": "host",
        "health": {"type": "tcp", "port": port, "interval": "1s"},
        "rollout": {"max_surge": "25%", "max_unavailable": 0, "drain": "0s"},
    }))
    .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!(
        "| pass gap factor | instances | listing per instance | launch | rollover | passes | in passes |"
    );
    println!("|---|---|---|---|---|---|---|");
    for factor in factors {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        // What `imago apply` writes in, the controller reads.
        let mut apply = StateDb::open(&path).unwrap();
        let db = StateDb::open(&path).unwrap();
        let provider = Arc::new(Slowed {
            fake: FakeProvider::new(),
            per_listed,
            per_launch,
        });
        let mut controller =
            Controller::new(db, provider, runtime.handle().clone(), Engine::Embedded)
                .with_pass_gap_factor(factor);
        for image in [&b"v1"[..], b"v2"] {
            apply
                .record_release("web", &spec, &Digest::of(image), "bench", None, "bench")
                .unwrap();
            let (took, passes, in_passes) = until_complete(&mut controller);
            if image == b"v2" {
                println!(
                    "| {factor} | {n} | {per_listed:?} | {per_launch:?} | {:.2} s | {passes} | {:.2} s |",
                    took.as_secs_f64(),
                    in_passes.as_secs_f64()
                );
            }
        }
    }
}

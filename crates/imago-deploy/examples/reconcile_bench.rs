//! Times one reconcile pass of the controller over 10,000 instances held by the in-memory fake
//! provider (half of them on the old release, so the pass has real work to decide).
//!
//!     cargo run --release -p imago-deploy --example reconcile_bench
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use imago_deploy::controller::{Controller, instance_spec};
use imago_deploy::rollout::{ObservedInstance, Phase, RolloutInput, next_step};
use imago_deploy::spec::{Limits, ServiceSpec, Strategy};
use imago_deploy::state::StateDb;
use imago_oci::Digest;
use imago_runtime::{Engine, FakeProvider, Provider};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    const N: u32 = 10_000;
    // The pure decision alone.
    let world: Vec<ObservedInstance> = (0..N)
        .map(|i| ObservedInstance {
            id: format!("i{i:05}"),
            revision: if i % 2 == 0 {
                "old".into()
            } else {
                "new".into()
            },
            phase: Phase::Ready { since_ms: 0 },
            draining: false,
            drifted: false,
        })
        .collect();
    let limits = Limits {
        replicas: N,
        max_surge: N / 4,
        max_unavailable: 0,
    };
    let planner: Vec<Duration> = (0..31)
        .map(|_| {
            let t = Instant::now();
            let step = next_step(RolloutInput {
                limits,
                strategy: Strategy::Rolling,
                min_ready: Duration::ZERO,
                now_ms: 1,
                target: "new",
                instances: &world,
            });
            assert_eq!(step.counts.updated, N / 2);
            t.elapsed()
        })
        .collect();

    // A whole controller pass: list from the provider, observe, decide, record.
    let dir = tempfile::tempdir().unwrap();
    let mut db = StateDb::open(&dir.path().join("state.db")).unwrap();
    let spec: ServiceSpec =
        serde_json::from_value(serde_json::json!({"image": "web", "replicas": N})).unwrap();
    let fake = Arc::new(FakeProvider::new());
    let (old, _) = db
        .record_release("web", &spec, &Digest::of(b"v1"), "bench", None, "bench")
        .unwrap();
    let old_spec = instance_spec(&old, Engine::Embedded).unwrap();
    for _ in 0..N {
        fake.launch(&old_spec).unwrap();
    }
    db.record_outcome(
        "web",
        1,
        imago_deploy::state::ReleaseOutcome::Complete,
        "",
        "bench",
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut controller =
        Controller::new(db, fake.clone(), runtime.handle().clone(), Engine::Embedded);
    let passes: Vec<Duration> = (0..31)
        .map(|_| {
            let t = Instant::now();
            let pass = controller.pass().unwrap();
            assert_eq!(pass[0].counts.updated, N);
            t.elapsed()
        })
        .collect();
    println!("| what | instances | median of 31 |");
    println!("|---|---|---|");
    println!(
        "| rollout decision (`next_step`) | {N} | {:.2} ms |",
        median(planner).as_secs_f64() * 1e3
    );
    println!(
        "| full controller pass, fake provider (list + observe + decide + record) | {N} | {:.2} ms |",
        median(passes).as_secs_f64() * 1e3
    );
}

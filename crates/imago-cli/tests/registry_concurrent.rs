//! Parallel pushes of one image to one real registry (Debian's docker-registry on 127.0.0.1),
//! as CI jobs building the same commit do: every push succeeds and the image pulls and verifies.
//!
//! docker-registry's filesystem driver rewrites a repository's blob link file in place
//! (truncate, then write) each time an upload of that blob is committed, so a manifest PUT that
//! checks its blobs while another push commits one of them can read an empty link and answer
//! 400 `DIGEST_INVALID` + `MANIFEST_BLOB_UNKNOWN` for a blob that is there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Barrier};

use common::Imago;
use common::registry::{self, Fault, Proxy, Registry, RegistryOpts};

const PUSHERS: usize = 8;
const ROUNDS: usize = 20;

#[test]
fn eight_parallel_pushes_of_the_same_image_all_succeed_and_the_image_verifies() {
    let reg = Registry::start(RegistryOpts::plain());
    let source = Imago::new();
    // Several small layers: their uploads finish, and their links are rewritten, close together.
    let sizes = [
        40_000, 60_000, 20_000, 80_000, 10_000, 50_000, 30_000, 70_000,
    ];
    let digest = registry::random_image(&source, "ci/app:1", &sizes, 11);
    // One home per CI job, each a copy of the built one.
    let homes: Vec<Imago> = (0..PUSHERS)
        .map(|_| {
            let home = Imago::new();
            registry::tool(
                "cp",
                &[
                    "-a",
                    source.home.to_str().unwrap(),
                    home.home.to_str().unwrap(),
                ],
            );
            home
        })
        .collect();

    // Every round pushes to a new repository, so the blobs are uploaded and committed by all
    // the pushers at the same moment.
    for round in 0..ROUNDS {
        let target = format!("{}/ci/app{round}:1", reg.host());
        let barrier = Arc::new(Barrier::new(PUSHERS));
        let outputs: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = homes
                .iter()
                .map(|home| {
                    let barrier = barrier.clone();
                    let target = target.clone();
                    let mut cmd = registry::cmd(home);
                    cmd.args(["--json", "push", "ci/app:1", &target]);
                    scope.spawn(move || {
                        barrier.wait();
                        cmd.output().unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, out) in outputs.iter().enumerate() {
            assert!(
                out.status.success(),
                "round {round}: push {i} of {PUSHERS} to {target} failed\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["digest"], digest.as_str(), "{report}");
        }
        assert_eq!(reg.manifest_digest(&format!("ci/app{round}"), "1"), digest);

        // The image as a host pulls it: every blob there and hashing to its digest.
        let puller = Imago::new();
        let pulled = registry::run_json(&puller, &["pull", &target]);
        assert_eq!(pulled["digest"], digest.as_str(), "{pulled}");
        registry::assert_store_valid(&puller);
    }
    // What the registry saw (for whoever reads a run's output): the empty links it read.
    let log = std::fs::read_to_string(reg.log()).unwrap_or_default();
    eprintln!(
        "registry log: {} lines with 'invalid checksum digest format'",
        log.matches("invalid checksum digest format").count()
    );
}

/// The retry is bounded and asks for the blobs again: a manifest refused twice for a blob goes
/// the third time, after every blob was HEADed each time; one refused every time fails after
/// `retries` more PUTs, naming the reference, the manifest digest and the registry's reason.
#[test]
fn a_manifest_refused_for_a_blob_is_retried_after_the_blobs_are_checked_and_then_given_up() {
    let reg = Registry::start(RegistryOpts::plain());
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "ci/app:1", &[30_000, 20_000], 5);
    let layer = registry::manifest_blobs(&registry::store_blob(&imago, &digest))[1]
        .0
        .clone();
    let refusal = format!(
        r#"{{"errors":[{{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content"}},{{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry","detail":"{layer}"}}]}}"#
    );
    let refuse = || {
        Fault::serve(
            "PUT",
            "/manifests/",
            400,
            &[("Content-Type", "application/json")],
            refusal.clone().into_bytes(),
        )
    };
    let proxy = Proxy::start(&reg.host(), vec![refuse().times(2)]);
    let blobs = 3; // two layers and the config

    let target = format!("{}/ci/app:1", proxy.host());
    let pushed = registry::run_json(&imago, &["push", "ci/app:1", &target]);
    assert_eq!(pushed["digest"], digest.as_str(), "{pushed}");
    assert_eq!(pushed["blobs_uploaded"], blobs, "{pushed}");
    assert_eq!(reg.manifest_digest("ci/app", "1"), digest);
    assert_eq!(
        requests(&proxy, "PUT", "/manifests/"),
        3,
        "{}",
        proxy.summary()
    );
    assert_eq!(
        requests(&proxy, "HEAD", "/blobs/sha256:"),
        3 * blobs,
        "{}",
        proxy.summary()
    );

    proxy.set_faults(vec![refuse().always()]);
    proxy.clear();
    let target = format!("{}/ci/other:1", proxy.host());
    let err = registry::run(&imago, &["push", "ci/app:1", &target]).fails();
    for needle in [
        target.as_str(),
        digest.as_str(),
        "MANIFEST_BLOB_UNKNOWN",
        layer.as_str(),
    ] {
        assert!(err.contains(needle), "{needle} not in: {err}");
    }
    assert_eq!(
        requests(&proxy, "PUT", "/manifests/"),
        6,
        "the default 5 retries, then the error\n{}",
        proxy.summary()
    );
}

/// A refusal naming only a digest the manifest does not refer to cannot be a blob link being
/// rewritten under the check: the push fails at the first PUT, naming the registry's reason,
/// instead of after every retry and its backoff.
#[test]
fn a_manifest_refused_for_a_digest_it_does_not_name_fails_at_once() {
    let reg = Registry::start(RegistryOpts::plain());
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "ci/app:1", &[30_000, 20_000], 7);
    let stranger = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let refusal = format!(
        r#"{{"errors":[{{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry","detail":"{stranger}"}}]}}"#
    );
    let proxy = Proxy::start(
        &reg.host(),
        vec![
            Fault::serve(
                "PUT",
                "/manifests/",
                400,
                &[("Content-Type", "application/json")],
                refusal.into_bytes(),
            )
            .always(),
        ],
    );
    let target = format!("{}/ci/app:1", proxy.host());
    let started = std::time::Instant::now();
    let err = registry::run(&imago, &["push", "ci/app:1", &target]).fails();
    for needle in [
        target.as_str(),
        digest.as_str(),
        "MANIFEST_BLOB_UNKNOWN",
        &stranger,
    ] {
        assert!(err.contains(needle), "{needle} not in: {err}");
    }
    assert_eq!(
        requests(&proxy, "PUT", "/manifests/"),
        1,
        "no retry\n{}",
        proxy.summary()
    );
    eprintln!("refused push failed in {:?}", started.elapsed());
}

/// How many `method` requests for a path containing `path` went through the proxy.
fn requests(proxy: &Proxy, method: &str, path: &str) -> usize {
    proxy
        .records()
        .iter()
        .filter(|r| r.method == method && r.path.contains(path))
        .count()
}

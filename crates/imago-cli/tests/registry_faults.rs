//! Registry faults: the registry SIGKILLed mid-push and restarted, a proxy answering 500/429 and
//! cutting connections mid-blob, retry budgets that run out, a blob whose bytes do not match its
//! digest, a manifest over 4 MiB and one with absurd sizes. After each: nothing half-written in
//! the store and a valid image in the registry, or a clear error naming what failed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Imago;
use common::registry::{self, Fault, MB, Proxy, Registry, RegistryOpts};
use imago_oci::Digest;

/// Bytes of upload data the registry holds in unfinished uploads of `repo`.
fn upload_bytes(reg: &Registry, repo: &str) -> u64 {
    let prefix = format!("docker/registry/v2/repositories/{repo}/_uploads/");
    reg.storage_files()
        .iter()
        .filter(|(p, _)| p.to_string_lossy().starts_with(&prefix) && p.ends_with("data"))
        .map(|(_, size)| size)
        .sum()
}

#[test]
fn a_registry_killed_mid_push_of_100_mb_and_restarted_takes_the_next_push() {
    let mut reg = Registry::start(RegistryOpts::plain());
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "big:1", &[20 * MB; 5], 61);
    let target = format!("{}/big:1", reg.host());

    let mut push = registry::cmd(&imago)
        .env("IMAGO_REGISTRY_RETRIES", "1")
        .args(["push", "big:1", &target])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if upload_bytes(&reg, "big") > 5 * MB {
            break;
        }
        if let Ok(Some(status)) = push.try_wait() {
            panic!("the push ended ({status}) before 5 MB reached the registry: nothing to kill");
        }
        assert!(Instant::now() < deadline, "no upload reached the registry");
        std::thread::sleep(Duration::from_millis(2));
    }
    reg.kill();
    let out = push.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a push to a killed registry succeeded: {err}"
    );
    assert!(
        err.contains(&reg.host()),
        "the error does not name the registry: {err}"
    );
    assert!(out.status.code().is_some(), "imago died of a signal: {err}");

    reg.restart();
    let pushed = registry::run_json(&imago, &["push", "big:1", &target]);
    assert_eq!(pushed["digest"], digest.as_str());
    // Valid for the other tools and for an empty home.
    assert_eq!(Digest::of(&reg.skopeo_raw("big:1")).to_string(), digest);
    let copy = imago.dir.path().join("skopeo-copy");
    reg.skopeo_copy(
        &format!("docker://{target}"),
        &format!("oci:{}:big", copy.display()),
    );
    let host = Imago::new();
    let pulled = registry::run_json(&host, &["pull", &target]);
    assert_eq!(pulled["digest"], digest.as_str());
    registry::assert_store_valid(&host);
    registry::assert_store_valid(&imago);
    assert!(registry::store_temp_files(&imago).is_empty());
}

/// The largest request body of any one blob upload request in a clean push of an image like
/// the test's (same layer sizes, other bytes): where a cut is sure to land inside a request.
fn largest_upload_request(reg: &Registry, sizes: &[u64]) -> u64 {
    let probe = Imago::new();
    registry::random_image(&probe, "probe:1", sizes, 999);
    let proxy = Proxy::start(&reg.host(), vec![]);
    registry::run(
        &probe,
        &["push", "probe:1", &format!("{}/probe:1", proxy.host())],
    )
    .ok();
    proxy
        .records()
        .iter()
        .filter(|r| r.path.contains("/blobs/uploads/"))
        .map(|r| r.up)
        .max()
        .unwrap()
}

#[test]
fn pushes_and_pulls_retry_500_and_429_and_survive_cut_connections() {
    let reg = Registry::start(RegistryOpts::plain());
    let sizes = [4 * MB, 100_000];
    let chunk = largest_upload_request(&reg, &sizes);
    assert!(chunk > 100_000, "no upload request carried a blob body");
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "flaky:1", &sizes, 71);
    let cut_at = chunk * 3 / 4;
    let proxy = Proxy::start(
        &reg.host(),
        vec![
            Fault::status("HEAD", "/blobs/sha256:", 500),
            Fault::status("POST", "/blobs/uploads/", 503),
            Fault::cut("PATCH", "/blobs/uploads/", cut_at),
            Fault::cut("PUT", "/blobs/uploads/", cut_at),
            Fault::too_many("PUT", "/manifests/", 1),
        ],
    );
    let target = format!("{}/team/flaky:1", proxy.host());
    let run = registry::cmd(&imago)
        .env("IMAGO_REGISTRY_RETRIES", "4")
        .args(["--json", "push", "flaky:1", &target])
        .output()
        .unwrap();
    let run = common::Run { output: run }.ok();
    assert_eq!(run.json()["digest"], digest.as_str());
    let summary = proxy.summary();
    let faulted = proxy.records().iter().filter(|r| r.fault.is_some()).count();
    assert!(faulted >= 4, "the faults did not all fire:\n{summary}");
    assert!(summary.contains("Cut"), "no upload was cut:\n{summary}");
    // The registry holds the image, every blob intact.
    let manifest = reg.manifest("team/flaky", "1");
    assert_eq!(Digest::of(&manifest).to_string(), digest);
    for (blob, size) in registry::manifest_blobs(&manifest) {
        let bytes = reg.blob("team/flaky", &blob);
        assert_eq!(bytes.len() as u64, size);
        assert_eq!(Digest::of(&bytes).to_string(), blob);
    }

    // Pull through the same kind of faults; the cut download resumes where it broke (Range),
    // so the big blob crosses the wire about once, not once plus the cut part.
    let big = registry::manifest_blobs(&manifest)
        .into_iter()
        .find(|(_, size)| *size > MB)
        .unwrap();
    let cut_down = big.1 * 3 / 4;
    proxy.set_faults(vec![
        Fault::status("GET", "/manifests/", 500),
        Fault::too_many("GET", "/blobs/sha256:", 1),
        Fault::cut("GET", &format!("/blobs/{}", big.0), cut_down),
    ]);
    proxy.clear();
    let host = Imago::new();
    let run = registry::cmd(&host)
        .env("IMAGO_REGISTRY_RETRIES", "4")
        .args(["--json", "pull", &target])
        .output()
        .unwrap();
    let run = common::Run { output: run }.ok();
    assert_eq!(run.json()["digest"], digest.as_str());
    registry::assert_store_valid(&host);
    assert!(registry::store_temp_files(&host).is_empty());
    let summary = proxy.summary();
    assert!(
        summary.contains("Cut"),
        "the download was not cut:\n{summary}"
    );
    let big_down: u64 = proxy
        .records()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(&big.0))
        .map(|r| r.down)
        .sum();
    assert!(
        big_down < big.1 + cut_down / 2,
        "the cut download of {} started over: {big_down} bytes for a {} byte blob\n{summary}",
        big.0,
        big.1
    );
}

#[test]
fn after_the_retry_budget_a_clear_error_names_registry_repository_digest_and_status() {
    let reg = Registry::start(RegistryOpts::plain());
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "web:1", &[300_000], 81);
    registry::run(
        &imago,
        &["push", "web:1", &format!("{}/team/web:1", reg.host())],
    )
    .ok();
    let manifest = reg.manifest("team/web", "1");
    let layer = registry::manifest_blobs(&manifest)[1].0.clone();

    // Pull: the layer always answers 503.
    let proxy = Proxy::start(
        &reg.host(),
        vec![Fault::status("GET", &format!("/blobs/{layer}"), 503).always()],
    );
    let host = Imago::new();
    let started = Instant::now();
    let out = registry::cmd(&host)
        .env("IMAGO_REGISTRY_RETRIES", "2")
        .args(["pull", &format!("{}/team/web:1", proxy.host())])
        .output()
        .unwrap();
    let err = common::Run { output: out }.fails();
    assert!(started.elapsed() < Duration::from_secs(30));
    for part in [proxy.host().as_str(), "team/web", layer.as_str(), "503"] {
        assert!(err.contains(part), "the error does not name {part}: {err}");
    }
    let attempts = proxy
        .records()
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(&layer))
        .count();
    assert_eq!(
        attempts,
        3,
        "IMAGO_REGISTRY_RETRIES=2: one try and two retries\n{}",
        proxy.summary()
    );
    assert!(!registry::store_blobs(&host).contains(&layer));
    assert!(registry::store_temp_files(&host).is_empty());
    let names = registry::store_names(&host);
    assert!(names.is_empty(), "a failed pull named an image: {names:?}");

    // Push: the manifest PUT always answers 500.
    proxy.set_faults(vec![Fault::status("PUT", "/manifests/", 500).always()]);
    let out = registry::cmd(&imago)
        .env("IMAGO_REGISTRY_RETRIES", "2")
        .args(["push", "web:1", &format!("{}/team/other:1", proxy.host())])
        .output()
        .unwrap();
    let err = common::Run { output: out }.fails();
    for part in [proxy.host().as_str(), "team/other", digest.as_str(), "500"] {
        assert!(err.contains(part), "the error does not name {part}: {err}");
    }
}

#[test]
fn a_blob_whose_bytes_do_not_match_its_digest_is_refused_and_nothing_is_stored() {
    let reg = Registry::start(RegistryOpts::plain());
    let imago = Imago::new();
    registry::random_image(&imago, "web:1", &[500_000], 91);
    registry::run(&imago, &["push", "web:1", &format!("{}/web:1", reg.host())]).ok();
    let layer = registry::manifest_blobs(&reg.manifest("web", "1"))[1]
        .0
        .clone();
    let proxy = Proxy::start(
        &reg.host(),
        vec![Fault::corrupt("GET", &format!("/blobs/{layer}")).always()],
    );
    let host = Imago::new();
    let out = registry::cmd(&host)
        .env("IMAGO_REGISTRY_RETRIES", "1")
        .args(["pull", &format!("{}/web:1", proxy.host())])
        .output()
        .unwrap();
    let err = common::Run { output: out }.fails();
    assert!(
        err.contains(&layer),
        "the error does not name {layer}: {err}"
    );
    assert!(
        proxy.summary().contains("Corrupt"),
        "the corrupt blob was never served:\n{}",
        proxy.summary()
    );
    assert!(
        !registry::store_blobs(&host).contains(&layer),
        "the bad blob was stored"
    );
    assert!(
        registry::store_temp_files(&host).is_empty(),
        "temp files left"
    );
    assert!(registry::store_names(&host).is_empty());
    if host.home.join("store").exists() {
        registry::assert_store_valid(&host);
    }
}

/// Runs `imago ARGS` under `/usr/bin/time -f %M`: (run, peak RSS in KiB).
fn run_measured(imago: &Imago, args: &[&str]) -> (common::Run, u64) {
    registry::require_tool("time");
    let rss_file = imago.dir.path().join("rss");
    let cmd = registry::cmd(imago);
    let program = cmd.get_program().to_owned();
    let inner_args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut timed = std::process::Command::new("/usr/bin/time");
    timed
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(program)
        .args(inner_args)
        .args(args)
        .current_dir(imago.dir.path());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    let output = timed.env("IMAGO_REGISTRY_RETRIES", "1").output().unwrap();
    let text = std::fs::read_to_string(&rss_file).unwrap();
    let rss = text
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no RSS in {text:?}"));
    (common::Run { output }, rss)
}

/// A peak RSS a pull may reach without having held a refused body or allocation (KiB).
const SMALL_RSS_KIB: u64 = 60 * 1024;

#[test]
fn an_oversized_manifest_and_absurd_sizes_are_refused_without_allocating_them() {
    let reg = Registry::start(RegistryOpts::plain());
    let manifest_type = "application/vnd.oci.image.manifest.v1+json";
    let random_digest = |seed| Digest::of(&registry::random_bytes(64, seed)).to_string();

    // A 64 MiB manifest (valid JSON): refused at 4 MiB, never read whole.
    let mut big = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{manifest_type}\",\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"{}\",\"size\":2}},\"layers\":[],\"annotations\":{{\"pad\":\"",
        random_digest(1)
    )
    .into_bytes();
    big.resize(64 << 20, b'a');
    big.extend_from_slice(b"\"}}");
    let big_digest = Digest::of(&big).to_string();
    let big_len = big.len() as u64;

    // Absurd sizes: a 1 TiB config, an 4 EiB layer.
    let absurd = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": random_digest(2), "size": 1u64 << 40},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": random_digest(3), "size": 1u64 << 62}],
    }))
    .unwrap();
    let absurd_digest = Digest::of(&absurd).to_string();

    let proxy = Proxy::start(
        &reg.host(),
        vec![
            Fault::serve(
                "",
                "/v2/big/manifests/",
                200,
                &[
                    ("Content-Type", manifest_type),
                    ("Docker-Content-Digest", &big_digest),
                ],
                big,
            )
            .always(),
            Fault::serve(
                "",
                "/v2/absurd/manifests/",
                200,
                &[
                    ("Content-Type", manifest_type),
                    ("Docker-Content-Digest", &absurd_digest),
                ],
                absurd,
            )
            .always(),
        ],
    );

    for (repo, digest) in [("big", &big_digest), ("absurd", &absurd_digest)] {
        for reference in [format!("{repo}:1"), format!("{repo}@{digest}")] {
            let imago = Imago::new();
            let started = Instant::now();
            let (run, rss) =
                run_measured(&imago, &["pull", &format!("{}/{reference}", proxy.host())]);
            let code = run.output.status.code();
            let err = run.fails();
            assert!(
                code.is_some(),
                "imago died of a signal pulling {reference}: {err}"
            );
            // A hang guard only (reading 1 TiB or 4 EiB never ends): a loaded host takes
            // 30 s and more for a refusal that takes a second on a quiet one. That the body
            // was not read whole is checked below, by what the proxy could send.
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "refusing {reference} took {:?}",
                started.elapsed()
            );
            assert!(
                rss < SMALL_RSS_KIB,
                "pulling {reference} peaked at {rss} KiB: the refused data was allocated\n{err}"
            );
            let lower = err.to_lowercase();
            let reason = if repo == "big" {
                lower.contains("manifest")
                    && ["4 mib", "too large", "size", "limit"]
                        .iter()
                        .any(|w| lower.contains(w))
            } else {
                lower.contains("size")
            };
            assert!(
                reason,
                "pulling {reference}: the error does not say why: {err}"
            );
            // The proxy records a canned answer once it has written it: into a connection
            // that imago closed after the headers, that ends a moment after imago exits.
            let fetched = || {
                proxy.records().iter().any(|r| {
                    r.method == "GET" && r.path.starts_with(&format!("/v2/{repo}/manifests/"))
                })
            };
            registry::wait_for(
                &format!("the manifest request of {reference} ({err})"),
                Duration::from_secs(60),
                fetched,
            );
            // Never read whole: the proxy's write of the 64 MiB body failed once imago closed
            // the connection (socket buffers hold a few MiB), whatever the time it took.
            let sent: Vec<u64> = proxy
                .records()
                .iter()
                .filter(|r| r.method == "GET" && r.path.starts_with("/v2/big/manifests/"))
                .map(|r| r.down)
                .collect();
            assert!(
                sent.iter().all(|&down| down < big_len),
                "the {big_len}-byte manifest was read whole: {sent:?}"
            );
            assert!(
                registry::store_names(&imago).is_empty(),
                "{reference} was named"
            );
            assert!(
                !registry::store_blobs(&imago).contains(digest),
                "{reference}'s manifest was stored"
            );
        }
    }
}

/// A push hashes each blob while it goes out (it is not read twice): a store blob whose bytes
/// changed on disk is refused naming the digest, before its last byte reaches the registry, so
/// the registry ends with no such blob and no manifest; one failed request, no retries.
#[test]
fn a_corrupt_store_blob_is_refused_while_it_uploads_and_the_registry_gets_nothing() {
    let reg = Registry::start(RegistryOpts::plain());
    let proxy = Proxy::start(&reg.host(), vec![]);
    let imago = Imago::new();
    // One small blob (one request) and one over the 64 MiB chunk size (PATCH, then PUT).
    let digest = registry::random_image(&imago, "bad:1", &[300_000, 70 * MB], 91);
    let manifest = registry::store_blob(&imago, &digest);
    let blobs = registry::manifest_blobs(&manifest);
    for (layer, _) in &blobs[1..] {
        let path = imago
            .home
            .join("store/blobs/sha256")
            .join(layer.trim_start_matches("sha256:"));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let target = format!("{}/team/bad:1", proxy.host());
    let err = registry::run(&imago, &["push", "bad:1", &target]).fails();
    assert!(err.contains("corrupt"), "{err}");
    assert!(
        blobs[1..]
            .iter()
            .any(|(layer, _)| err.contains(layer.as_str())),
        "the error does not name the corrupt blob: {err}"
    );
    for (layer, _) in &blobs[1..] {
        let (status, _) = reg.get(&format!("/v2/team/bad/blobs/{layer}"));
        assert_eq!(status, 404, "the registry holds the corrupt blob {layer}");
    }
    let (status, _) = reg.get("/v2/team/bad/manifests/1");
    assert_eq!(status, 404, "a manifest was pushed");
    let puts = proxy
        .records()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/blobs/uploads/"))
        .count();
    assert!(
        puts <= 2,
        "a corrupt blob was retried:\n{}",
        proxy.summary()
    );
}

//! The registry harness itself, checked with skopeo alone (no imago registry code): the
//! registry starts plain and behind htpasswd + TLS, survives a restart, and the proxy records
//! and injects faults. A broken harness fails here, not as a confusing imago failure elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Imago;
use common::registry::{self, Fault, Proxy, Registry, RegistryOpts, TokenAuth};

#[test]
fn plain_registry_proxy_records_and_faults_with_skopeo() {
    let imago = Imago::new();
    let digest = registry::random_image(&imago, "rand:1", &[300_000, 200_000], 1);
    let layout = imago.dir.path().join("layout");
    registry::export_oci_layout(&imago, "rand:1", &layout);

    let mut reg = Registry::start(RegistryOpts::plain());
    let proxy = Proxy::start(&reg.host(), vec![]);
    // skopeo through the proxy: the registry's Location headers must point back at the proxy.
    common::registry::tool(
        "skopeo",
        &[
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &format!("oci:{}:rand:1", layout.display()),
            &format!("docker://{}/rand:1", proxy.host()),
        ],
    );
    assert_eq!(reg.manifest_digest("rand", "1"), digest);
    let uploaded = proxy.blob_bytes_uploaded();
    assert!(uploaded >= 500_000, "{}", proxy.summary());

    // Faults: the first blob GET gets a 500, the next one is corrupted. A fault counts only
    // the requests that reach it: the first GET, answered by the 500, is not the corrupt
    // fault's first.
    proxy.set_faults(vec![
        Fault::status("GET", "/blobs/sha256:", 500),
        Fault::corrupt("GET", "/blobs/sha256:"),
    ]);
    proxy.clear();
    let (status, _) = curl(&format!("http://{}/v2/rand/manifests/1", proxy.host()));
    assert_eq!(status, 200);
    let manifest: serde_json::Value = serde_json::from_slice(&reg.manifest("rand", "1")).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let url = format!("http://{}/v2/rand/blobs/{layer}", proxy.host());
    assert_eq!(curl(&url).0, 500);
    let (status, body) = curl(&url);
    assert_eq!(status, 200);
    assert_ne!(imago_oci::Digest::of(&body).to_string(), layer);
    let (status, body) = curl(&url);
    assert_eq!(status, 200);
    assert_eq!(imago_oci::Digest::of(&body).to_string(), layer);
    proxy.set_faults(vec![Fault::cut("GET", "/blobs/sha256:", 1000)]);
    let (_, body) = curl(&url);
    assert_eq!(body.len(), 1000, "{}", proxy.summary());

    // An upload cut after 100,000 bytes of its body (skopeo sends PATCH bodies chunked).
    registry::random_image(&imago, "rand:2", &[400_000], 3);
    let layout2 = imago.dir.path().join("layout2");
    registry::export_oci_layout(&imago, "rand:2", &layout2);
    proxy.set_faults(vec![
        Fault::cut("PATCH", "/blobs/uploads/", 100_000).always(),
    ]);
    proxy.clear();
    let _ = std::process::Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:rand:2", layout2.display()))
        .arg(format!("docker://{}/rand:2", proxy.host()))
        .output()
        .unwrap();
    let cut: Vec<_> = proxy
        .records()
        .into_iter()
        .filter(|r| r.fault.is_some())
        .collect();
    assert!(!cut.is_empty(), "{}", proxy.summary());
    assert!(cut.iter().all(|r| r.up == 100_000), "{}", proxy.summary());

    // Restart keeps the storage.
    reg.restart();
    assert_eq!(reg.manifest_digest("rand", "1"), digest);
}

#[test]
fn secure_registry_takes_skopeo_with_ca_and_password_only() {
    let imago = Imago::new();
    registry::random_image(&imago, "rand:1", &[1000], 2);
    let layout = imago.dir.path().join("layout");
    registry::export_oci_layout(&imago, "rand:1", &layout);
    let reg = Registry::start(RegistryOpts::secure("tester", "s3cret-pw"));
    reg.skopeo_copy(
        &format!("oci:{}:rand:1", layout.display()),
        &format!("docker://{}/rand:1", reg.host()),
    );
    assert_eq!(reg.get("/v2/").0, 200);
    let anonymous = curl_ca(&reg, &format!("{}/v2/", reg.url()));
    assert_eq!(anonymous, 401);
}

fn curl(url: &str) -> (u16, Vec<u8>) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", url])
        .args(["-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
        .output()
        .unwrap();
    let mut body = out.stdout;
    let pos = body.iter().rposition(|&b| b == b'\n').unwrap();
    let status = String::from_utf8_lossy(&body[pos + 1..]).parse().unwrap();
    body.truncate(pos);
    (status, body)
}

fn curl_ca(reg: &Registry, url: &str) -> u16 {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(reg.ca_cert())
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap()
}

#[test]
fn the_proxy_plays_a_token_server_that_skopeo_accepts() {
    let imago = Imago::new();
    registry::random_image(&imago, "rand:1", &[1000], 4);
    let layout = imago.dir.path().join("layout");
    registry::export_oci_layout(&imago, "rand:1", &layout);
    let reg = Registry::start(RegistryOpts::plain());
    let src = format!("oci:{}:rand:1", layout.display());
    let skopeo = |host: &str, creds: Option<&str>| {
        let mut cmd = std::process::Command::new("skopeo");
        cmd.args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]);
        if let Some(c) = creds {
            cmd.arg(format!("--dest-creds={c}"));
        }
        cmd.arg(&src).arg(format!("docker://{host}/tok/rand:1"));
        cmd.output().unwrap()
    };

    let anonymous = Proxy::with_token_auth(&reg.host(), TokenAuth { credentials: None });
    let out = skopeo(&anonymous.host(), None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        anonymous.summary().contains("GET /token"),
        "{}",
        anonymous.summary()
    );

    let locked = Proxy::with_token_auth(
        &reg.host(),
        TokenAuth {
            credentials: Some(("u".into(), "p".into())),
        },
    );
    assert!(!skopeo(&locked.host(), Some("u:wrong")).status.success());
    let out = skopeo(&locked.host(), Some("u:p"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! Resuming a blob upload inside its session, after the connection broke mid-chunk.
//!
//! Debian's docker-registry 2.8 cannot be used for this: it drops an upload session whose PATCH
//! broke mid-body (ARCHITECTURE.md, imago-registry), so against it a broken blob starts again in
//! a new session (tested in imago-cli's registry_faults.rs). Registries that keep the bytes
//! they received (the distribution spec's "resumable" uploads) are scripted here: a small
//! HTTP/1.1 server on 127.0.0.1 that implements the upload endpoints, keeps what it read of a
//! PATCH that it then cuts, and reports it through the session's `Range`. The promise checked:
//! the push completes, the registry ends with the exact blob, and no byte of it went over the
//! wire twice. A second registry loses the session instead: the push starts the blob again and
//! still completes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imago_oci::Digest;
use imago_registry::{NoProgress, RegistryRef, Settings, SharedProgress, push};
use imago_store::Store;

const CHUNK: u64 = 1 << 20;

#[derive(Default)]
struct Registry {
    sessions: HashMap<u64, Vec<u8>>,
    next_session: u64,
    blobs: HashMap<String, Vec<u8>>,
    manifests: HashMap<String, Vec<u8>>,
    /// Body bytes received by PATCH and PUT of upload sessions, all sessions together.
    upload_bytes: u64,
    /// Cut the PATCH that starts at this offset after reading half of its body (once).
    cut_patch_at: Option<u64>,
    cuts: u32,
    /// What a status request of the cut session gets: its `Range` (kept) or 404 (lost).
    keep_cut_session: bool,
    status_requests: u32,
    sessions_started: u32,
}

struct Request {
    method: String,
    path: String,
    query: String,
    headers: HashMap<String, String>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    // A TLS ClientHello (the client tries https first): not ours to answer.
    let first = reader.fill_buf().ok()?;
    if first.is_empty() || first[0] == 0x16 {
        return None;
    }
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target, String::new()),
    };
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    Some(Request {
        method,
        path,
        query,
        headers,
    })
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    let _ = stream.write_all(out.as_bytes());
    let _ = stream.write_all(body);
}

fn read_body(reader: &mut BufReader<TcpStream>, len: usize) -> Option<Vec<u8>> {
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    Some(body)
}

fn session_id(path: &str) -> Option<u64> {
    path.rsplit('/').next()?.parse().ok()
}

fn range(len: usize) -> String {
    format!("0-{}", len.saturating_sub(1))
}

/// Serves one connection until the client closes it or the script cuts it.
fn serve(stream: TcpStream, registry: Arc<Mutex<Registry>>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader) {
        let length: usize = request
            .headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let path = request.path.as_str();
        let mut reg = registry.lock().unwrap();
        match (request.method.as_str(), path) {
            ("GET", "/v2/") => respond(
                &mut writer,
                "200 OK",
                &[("Docker-Distribution-API-Version", "registry/2.0".into())],
                b"{}",
            ),
            ("HEAD", p) if p.contains("/manifests/") => {
                respond(&mut writer, "404 Not Found", &[], b"")
            }
            ("HEAD", p) if p.contains("/blobs/") => {
                let digest = p.rsplit('/').next().unwrap_or("");
                match reg.blobs.get(digest) {
                    // HEAD: the length header tells the size, no body follows.
                    Some(blob) => {
                        let _ = write!(
                            writer,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                            blob.len()
                        );
                    }
                    None => respond(&mut writer, "404 Not Found", &[], b""),
                }
            }
            ("POST", p) if p.ends_with("/blobs/uploads/") => {
                let id = reg.next_session;
                reg.next_session += 1;
                reg.sessions_started += 1;
                reg.sessions.insert(id, Vec::new());
                let location = format!("{p}{id}");
                respond(
                    &mut writer,
                    "202 Accepted",
                    &[("Location", location), ("Range", "0-0".into())],
                    b"",
                );
            }
            ("GET", p) if p.contains("/blobs/uploads/") => {
                reg.status_requests += 1;
                let id = session_id(p).unwrap_or(u64::MAX);
                match reg.sessions.get(&id) {
                    Some(held) => {
                        let held = range(held.len());
                        respond(
                            &mut writer,
                            "204 No Content",
                            &[("Location", p.to_owned()), ("Range", held)],
                            b"",
                        )
                    }
                    None => respond(&mut writer, "404 Not Found", &[], b"BLOB_UPLOAD_UNKNOWN"),
                }
            }
            ("PATCH", p) if p.contains("/blobs/uploads/") => {
                let id = session_id(p).unwrap_or(u64::MAX);
                let Some(held) = reg.sessions.get(&id).map(Vec::len) else {
                    respond(&mut writer, "404 Not Found", &[], b"BLOB_UPLOAD_UNKNOWN");
                    continue;
                };
                let start: Option<usize> = request
                    .headers
                    .get("content-range")
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.trim().parse().ok());
                if start != Some(held) {
                    respond(&mut writer, "416 Range Not Satisfiable", &[], b"");
                    continue;
                }
                if reg.cut_patch_at == Some(held as u64) {
                    // Read half of the body, keep it, and break the connection.
                    reg.cut_patch_at = None;
                    reg.cuts += 1;
                    let part = read_body(&mut reader, length / 2).unwrap_or_default();
                    reg.upload_bytes += part.len() as u64;
                    if reg.keep_cut_session {
                        reg.sessions.entry(id).or_default().extend_from_slice(&part);
                    } else {
                        reg.sessions.remove(&id);
                    }
                    let _ = writer.shutdown(Shutdown::Both);
                    return;
                }
                drop(reg);
                let Some(body) = read_body(&mut reader, length) else {
                    return;
                };
                let mut reg = registry.lock().unwrap();
                reg.upload_bytes += body.len() as u64;
                let session = reg.sessions.entry(id).or_default();
                session.extend_from_slice(&body);
                let held = range(session.len());
                respond(
                    &mut writer,
                    "202 Accepted",
                    &[("Location", p.to_owned()), ("Range", held)],
                    b"",
                );
            }
            ("PUT", p) if p.contains("/blobs/uploads/") => {
                let id = session_id(p).unwrap_or(u64::MAX);
                drop(reg);
                let Some(body) = read_body(&mut reader, length) else {
                    return;
                };
                let mut reg = registry.lock().unwrap();
                reg.upload_bytes += body.len() as u64;
                let digest = request
                    .query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("digest="))
                    .unwrap_or("")
                    .replace("%3A", ":");
                let Some(mut content) = reg.sessions.remove(&id) else {
                    respond(&mut writer, "404 Not Found", &[], b"BLOB_UPLOAD_UNKNOWN");
                    continue;
                };
                content.extend_from_slice(&body);
                if Digest::of(&content).to_string() != digest {
                    respond(&mut writer, "400 Bad Request", &[], b"DIGEST_INVALID");
                    continue;
                }
                reg.blobs.insert(digest.clone(), content);
                respond(
                    &mut writer,
                    "201 Created",
                    &[("Docker-Content-Digest", digest)],
                    b"",
                );
            }
            ("PUT", p) if p.contains("/manifests/") => {
                drop(reg);
                let Some(body) = read_body(&mut reader, length) else {
                    return;
                };
                let digest = Digest::of(&body).to_string();
                let mut reg = registry.lock().unwrap();
                reg.manifests.insert(p.to_owned(), body);
                respond(
                    &mut writer,
                    "201 Created",
                    &[("Docker-Content-Digest", digest)],
                    b"",
                );
            }
            _ => respond(&mut writer, "404 Not Found", &[], b""),
        }
    }
}

fn start_registry(registry: Arc<Mutex<Registry>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let registry = registry.clone();
            std::thread::spawn(move || serve(stream, registry));
        }
    });
    port
}

/// Deterministic bytes that do not compress: a xorshift stream.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A one-layer image whose layer spans several chunks and ends mid-chunk.
fn stored_image(store: &Store) -> (Digest, Vec<u8>) {
    let layer = noise(3 * CHUNK as usize + 12_345, 0x9e37_79b9_7f4a_7c15);
    let layer_digest = store.put_blob(&layer).unwrap();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]},
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = store.put_blob(&config_bytes).unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(),
            "size": config_bytes.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest.to_string(),
            "size": layer.len(),
        }],
    });
    let manifest_digest = store
        .put_blob(&serde_json::to_vec(&manifest).unwrap())
        .unwrap();
    (manifest_digest, layer)
}

fn push_through(keep_cut_session: bool) -> (Registry, Vec<u8>, Vec<u8>) {
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(&home.path().join("store")).unwrap();
    let (root, layer) = stored_image(&store);
    let registry = Arc::new(Mutex::new(Registry {
        // The second chunk is cut half-way.
        cut_patch_at: Some(CHUNK),
        keep_cut_session,
        ..Registry::default()
    }));
    let port = start_registry(registry.clone());
    let mut settings = Settings::load(home.path(), false).unwrap();
    settings.chunk_size = CHUNK;
    settings.retries = 3;
    settings.backoff = Duration::from_millis(10);
    settings.parallel = 1;
    let dest: RegistryRef = format!("127.0.0.1:{port}/team/resume:1").parse().unwrap();
    let progress: SharedProgress = Arc::new(NoProgress);
    let report = push(&store, &settings, &root, &dest, &progress, None).unwrap();
    assert_eq!(report.digest, root);
    let manifest = store.read_blob(&root, None).unwrap();
    let reg = std::mem::take(&mut *registry.lock().unwrap());
    (reg, layer, manifest)
}

#[test]
fn a_chunk_cut_mid_body_resumes_from_the_bytes_the_registry_kept() {
    let (reg, layer, manifest) = push_through(true);
    assert_eq!(reg.cuts, 1, "the script cut one PATCH");
    let digest = Digest::of(&layer).to_string();
    let stored = reg
        .blobs
        .get(&digest)
        .expect("the layer reached the registry");
    assert!(
        stored == &layer,
        "the registry holds exactly the layer's bytes"
    );
    assert_eq!(
        reg.manifests.get("/v2/team/resume/manifests/1"),
        Some(&manifest),
        "the stored manifest bytes went out unchanged"
    );
    // One session for the layer, one for the config; the status request found the kept bytes.
    assert_eq!(reg.sessions_started, 2);
    assert!(reg.status_requests >= 1);
    // Not a byte of the layer twice: everything after the cut went on from the kept offset.
    let config_len = reg
        .blobs
        .iter()
        .filter(|(d, _)| **d != digest)
        .map(|(_, b)| b.len() as u64)
        .sum::<u64>();
    assert_eq!(reg.upload_bytes, layer.len() as u64 + config_len);
}

#[test]
fn a_session_the_registry_lost_starts_the_blob_again_and_completes() {
    let (reg, layer, _) = push_through(false);
    assert_eq!(reg.cuts, 1);
    let digest = Digest::of(&layer).to_string();
    assert!(reg.blobs.get(&digest) == Some(&layer));
    // The lost session's chunk and a half went again, in a third session.
    assert_eq!(reg.sessions_started, 3);
    let config_len = reg
        .blobs
        .iter()
        .filter(|(d, _)| **d != digest)
        .map(|(_, b)| b.len() as u64)
        .sum::<u64>();
    assert_eq!(
        reg.upload_bytes,
        layer.len() as u64 + config_len + CHUNK + CHUNK / 2
    );
}

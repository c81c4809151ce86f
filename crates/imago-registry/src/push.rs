//! Pushing an image from the store: blobs the registry lacks (HEAD first; cross-repository
//! mount when the store knows another repository of the registry has one), in parallel, large
//! ones in chunks that resume from the session's `Range`; then the stored manifest bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use imago_oci::{Digest, Reference};
use imago_store::{Store, StoreError};
use reqwest::StatusCode;
use reqwest::blocking::Body;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName};
use sha2::{Digest as _, Sha256};

use crate::client::{Client, Target, pull_scope, push_scope};
use crate::error::{RegistryError, Result};
use crate::manifest::{self, Parsed};
use crate::reference::{RegistryRef, names_registry};
use crate::settings::Settings;
use crate::{SharedProgress, run_parallel};

/// Blobs up to this size go in one request; larger ones in chunks of this size (the default of
/// [`crate::Settings::chunk_size`]).
pub const CHUNK_SIZE: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub struct PushReport {
    /// `HOST/REPO:TAG` (or `HOST/REPO@sha256:...`) pushed.
    pub reference: String,
    pub digest: Digest,
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Blobs the registry had already, or got by mounting from another repository.
    pub blobs_skipped: u64,
    pub blobs_mounted: u64,
}

impl PushReport {
    /// The report of a push of `digest` before anything was asked or sent.
    fn nothing_yet(digest: &Digest) -> PushReport {
        PushReport {
            reference: String::new(),
            digest: digest.clone(),
            blobs_uploaded: 0,
            bytes_uploaded: 0,
            blobs_skipped: 0,
            blobs_mounted: 0,
        }
    }
}

enum Outcome {
    Present,
    Mounted,
    Uploaded(u64),
}

const CONTENT_RANGE: HeaderName = HeaderName::from_static("content-range");
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// Pushes the stored manifest or index `root` to `dest` and names it `dest` in the store too.
/// `only_platform` pushes, for an index, the image of that one platform (`os/arch[/variant]`)
/// under `dest` instead of the index.
pub fn push(
    store: &Store,
    settings: &Settings,
    root: &Digest,
    dest: &RegistryRef,
    progress: &SharedProgress,
    only_platform: Option<&str>,
) -> Result<PushReport> {
    let repository = dest.repository.as_str();
    let shown = dest.to_string();
    let bytes = store.read_blob(root, None)?;
    let parsed = manifest::parse(&shown, &bytes, None)?;
    if let (Parsed::Index { manifests, .. }, Some(platform)) = (&parsed, only_platform) {
        // One platform's image instead of the index: its own manifest, under the tag.
        let chosen = manifest::select_platform(manifests, platform).ok_or_else(|| {
            RegistryError::NoPlatform {
                reference: format!("{shown} (index {root})"),
                platform: platform.to_owned(),
            }
        })?;
        let child =
            chosen
                .digest
                .parse::<Digest>()
                .map_err(|_| RegistryError::InvalidManifest {
                    reference: shown.clone(),
                    reason: format!("unsupported digest {:?}", chosen.digest),
                })?;
        let mut dest = dest.clone();
        // Pinned to the index's digest, the destination is now pinned to the image's.
        dest.digest = dest.tag.is_none().then(|| child.clone());
        return push(store, settings, &child, &dest, progress, None);
    }
    let reference = match (dest.digest.as_ref(), dest.tag_or_default()) {
        (_, Some(tag)) => tag.to_owned(),
        (Some(d), None) => d.to_string(),
        (None, None) => "latest".to_owned(),
    };
    if let Some(d) = &dest.digest
        && d != root
    {
        return Err(RegistryError::DigestMismatch {
            registry: dest.registry.clone(),
            repository: repository.to_owned(),
            what: "manifest",
            expected: d.clone(),
            actual: root.clone(),
        });
    }
    let client = Client::connect(settings, &dest.registry)?;
    let mut report = PushReport::nothing_yet(root);
    // A no-op push is one request: when the reference names this very manifest already, the
    // registry holds all it refers to (it accepts a manifest only with its blobs and, for an
    // index, its manifests), so nothing else is asked.
    if remote_digest(&client, repository, &reference)?.as_ref() == Some(root) {
        report.blobs_skipped = stored_blob_count(store, &shown, &parsed)?;
    } else {
        upload_until_accepted(
            &client,
            store,
            dest,
            root,
            (&bytes, &parsed),
            &reference,
            progress,
            &mut report,
        )?;
    }
    report.reference = match dest.tag_or_default() {
        Some(tag) => {
            let named = Reference::named(&dest.name(), tag).map_err(StoreError::from)?;
            let name = named.ref_name();
            let named_already = store
                .names()?
                .iter()
                .any(|e| e.digest == *root && e.name == name);
            if !named_already {
                store.tag(&named, root)?;
            }
            format!("{}:{tag}", dest.name())
        }
        None => format!("{}@{root}", dest.name()),
    };
    Ok(report)
}

/// [`upload`], again (a bounded number of times, with backoff) while the registry refuses a
/// manifest for a blob or manifest it says it lacks or cannot read (400 `MANIFEST_BLOB_UNKNOWN`
/// or `DIGEST_INVALID`): docker-registry's filesystem storage rewrites a repository's link to a
/// blob in place (truncated, then written) each time an upload of that blob is committed, so
/// while another client pushes the same blob a manifest check can read an empty link. Each
/// attempt asks for every blob again (HEAD) and uploads what is missing, so a blob that really
/// is gone goes again. A blob a later attempt uploads counts as uploaded (twice if it went
/// twice), no longer as skipped; `bytes_uploaded` is every byte sent. A refusal that names
/// only digests the manifest does not refer to cannot be that race (the manifest itself is
/// wrong, e.g. pushed by a digest its bytes do not have): it fails at once, not after every
/// retry's backoff (about 6 s at the defaults).
#[allow(clippy::too_many_arguments)]
fn upload_until_accepted(
    client: &Client,
    store: &Store,
    dest: &RegistryRef,
    root: &Digest,
    manifest: (&[u8], &Parsed),
    reference: &str,
    progress: &SharedProgress,
    report: &mut PushReport,
) -> Result<()> {
    let mut failures = 0u32;
    loop {
        let mut attempt = PushReport::nothing_yet(root);
        let result = upload(
            client,
            store,
            dest,
            root,
            manifest,
            reference,
            progress,
            &mut attempt,
        );
        report.blobs_uploaded += attempt.blobs_uploaded;
        report.bytes_uploaded += attempt.bytes_uploaded;
        report.blobs_mounted += attempt.blobs_mounted;
        if failures == 0 {
            report.blobs_skipped = attempt.blobs_skipped;
        } else {
            report.blobs_skipped = report.blobs_skipped.saturating_sub(attempt.blobs_uploaded);
        }
        match result {
            Err(e)
                if failures < client.settings.retries
                    && refused_for_a_blob(&e)
                    && !refused_for_another(&e, manifest.1) =>
            {
                tracing::debug!(%dest, error = %e, "manifest refused for a blob; checking the blobs again");
                std::thread::sleep(client.settings.backoff_for(failures));
                failures += 1;
            }
            other => return other,
        }
    }
}

/// A manifest PUT the registry refused because it found a blob or manifest it refers to
/// missing or unreadable.
fn refused_for_a_blob(error: &RegistryError) -> bool {
    matches!(
        error,
        RegistryError::Http { status: 400, what, detail, .. }
            if what.starts_with("manifest ")
                && (detail.contains("MANIFEST_BLOB_UNKNOWN") || detail.contains("DIGEST_INVALID"))
    )
}

/// The refusal names digests, none of which the manifest refers to (its blobs, or an index's
/// manifests): no link of this push's blobs was being rewritten.
fn refused_for_another(error: &RegistryError, parsed: &Parsed) -> bool {
    let RegistryError::Http { detail, .. } = error else {
        return false;
    };
    let named = digests_in(detail);
    let refers: Vec<String> = match parsed {
        Parsed::Image { .. } => parsed.blobs().iter().map(|(d, _)| d.to_string()).collect(),
        Parsed::Index { manifests, .. } => manifests.iter().map(|m| m.digest.clone()).collect(),
    };
    !named.is_empty() && named.iter().all(|d| !refers.contains(d))
}

/// The `sha256:` digests (64 lowercase hex digits) a registry's error text names.
fn digests_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("sha256:") {
        let hex: String = rest[at + 7..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            .collect();
        if hex.len() == 64 {
            found.push(format!("sha256:{hex}"));
        }
        rest = &rest[at + 7..];
    }
    found
}

/// Everything the registry lacks of the image or index `root`, then its manifest bytes.
#[allow(clippy::too_many_arguments)]
fn upload(
    client: &Client,
    store: &Store,
    dest: &RegistryRef,
    root: &Digest,
    (bytes, parsed): (&[u8], &Parsed),
    reference: &str,
    progress: &SharedProgress,
    report: &mut PushReport,
) -> Result<()> {
    let repository = dest.repository.as_str();
    let shown = dest.to_string();
    let mounts = mount_sources(store, &dest.registry, repository);
    if let Parsed::Index { manifests, .. } = parsed {
        for child in manifests {
            let Ok(digest) = child.digest.parse::<Digest>() else {
                continue;
            };
            if let Some(child_parsed) = complete_image(store, &shown, &digest, child.size)? {
                push_blobs(
                    client,
                    store,
                    repository,
                    &child_parsed,
                    &mounts,
                    progress,
                    report,
                )?;
                let child_bytes = store.read_blob(&digest, Some(child.size))?;
                put_manifest(
                    client,
                    repository,
                    &digest.to_string(),
                    &child_bytes,
                    child_parsed.media_type(),
                    &digest,
                )?;
                continue;
            }
            // A platform whose image the store lacks: the registry may hold it already, or
            // another repository of it that the store knows the index from, to be copied by
            // mounting. Else the index cannot go as it is.
            if remote_digest(client, repository, &digest.to_string())?.is_some() {
                continue;
            }
            if let Some(from) = index_source(store, &dest.registry, repository, root) {
                copy_remote_image(client, &from, repository, &digest, report)?;
                continue;
            }
            return Err(RegistryError::PlatformMissing {
                reference: shown,
                index: root.clone(),
                platform: child.platform.as_ref().map_or_else(
                    || "an entry without platform".to_owned(),
                    ToString::to_string,
                ),
                digest,
            });
        }
    } else {
        push_blobs(client, store, repository, parsed, &mounts, progress, report)?;
    }
    put_manifest(
        client,
        repository,
        reference,
        bytes,
        parsed.media_type(),
        root,
    )
}

/// The digest `reference` (a tag or digest) names in `repository`, if anything.
fn remote_digest(client: &Client, repository: &str, reference: &str) -> Result<Option<Digest>> {
    let target = Target {
        repository,
        what: format!("manifest {reference}"),
        scopes: vec![push_scope(repository)],
    };
    let url = client.url(&format!("v2/{repository}/manifests/{reference}"))?;
    let response = client.send(&target, &|http| {
        Ok(http
            .head(url.clone())
            .header(reqwest::header::ACCEPT, manifest::ACCEPT))
    })?;
    match response.status() {
        s if s.is_success() => Ok(response
            .headers()
            .get(DOCKER_CONTENT_DIGEST)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())),
        StatusCode::NOT_FOUND => Ok(None),
        _ => Err(client.http_error(&target, response)),
    }
}

/// How many blobs of the image or index the store holds: what a no-op push left where it was.
fn stored_blob_count(store: &Store, shown: &str, parsed: &Parsed) -> Result<u64> {
    let Parsed::Index { manifests, .. } = parsed else {
        return Ok(parsed.blobs().len() as u64);
    };
    let mut count = 0;
    for child in manifests {
        if let Ok(digest) = child.digest.parse::<Digest>()
            && let Some(image) = complete_image(store, shown, &digest, child.size)?
        {
            count += image.blobs().len() as u64;
        }
    }
    Ok(count)
}

fn push_blobs(
    client: &Client,
    store: &Store,
    repository: &str,
    image: &Parsed,
    mounts: &HashMap<Digest, String>,
    progress: &SharedProgress,
    report: &mut PushReport,
) -> Result<()> {
    let outcomes = run_parallel(client.settings.parallel, image.blobs(), &|(
        digest,
        size,
    )| {
        push_blob(
            client,
            store,
            repository,
            &digest,
            size,
            mounts.get(&digest),
            progress,
        )
    })?;
    for outcome in outcomes {
        match outcome {
            Outcome::Present => report.blobs_skipped += 1,
            Outcome::Mounted => {
                report.blobs_skipped += 1;
                report.blobs_mounted += 1;
            }
            Outcome::Uploaded(n) => {
                report.blobs_uploaded += 1;
                report.bytes_uploaded += n;
            }
        }
    }
    Ok(())
}

fn put_manifest(
    client: &Client,
    repository: &str,
    reference: &str,
    bytes: &[u8],
    media_type: &str,
    digest: &Digest,
) -> Result<()> {
    let target = Target {
        repository,
        what: if reference == digest.to_string() {
            format!("manifest {digest}")
        } else {
            format!("manifest {reference} ({digest})")
        },
        scopes: vec![push_scope(repository)],
    };
    let url = client.url(&format!("v2/{repository}/manifests/{reference}"))?;
    let response = client.send(&target, &|http| {
        Ok(http
            .put(url.clone())
            .header(CONTENT_TYPE, media_type)
            .body(bytes.to_vec()))
    })?;
    if response.status() != StatusCode::CREATED && !response.status().is_success() {
        return Err(client.http_error(&target, response));
    }
    if let Some(returned) = response
        .headers()
        .get(DOCKER_CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<Digest>().ok())
        && returned != *digest
    {
        return Err(RegistryError::DigestMismatch {
            registry: client.registry.clone(),
            repository: repository.to_owned(),
            what: "pushed manifest",
            expected: digest.clone(),
            actual: returned,
        });
    }
    Ok(())
}

/// The image manifest `digest` when the store holds it and every blob it names.
fn complete_image(
    store: &Store,
    shown: &str,
    digest: &Digest,
    size: u64,
) -> Result<Option<Parsed>> {
    if !store.has_blob(digest) {
        return Ok(None);
    }
    let parsed = manifest::parse(shown, &store.read_blob(digest, Some(size))?, None)?;
    let whole = matches!(parsed, Parsed::Image { .. })
        && parsed.blobs().iter().all(|(d, _)| store.has_blob(d));
    Ok(whole.then_some(parsed))
}

/// Another repository of `registry` that the store names the index `root` from.
fn index_source(store: &Store, registry: &str, repository: &str, root: &Digest) -> Option<String> {
    let prefix = format!("{registry}/");
    store
        .names()
        .ok()?
        .into_iter()
        .filter(|e| e.digest == *root)
        .filter_map(|e| e.name)
        .filter(|n| n.starts_with(&prefix))
        .filter_map(|n| n.parse::<RegistryRef>().ok())
        .map(|r| r.repository)
        .find(|r| r != repository)
}

/// Copies the manifest `digest` the store lacks from repository `from` to `repository` of the
/// same registry: its blobs by mount, its bytes as the registry serves them (digest-checked).
fn copy_remote_image(
    client: &Client,
    from: &str,
    repository: &str,
    digest: &Digest,
    report: &mut PushReport,
) -> Result<()> {
    let fetched = crate::pull::fetch_manifest(client, from, &digest.to_string())?;
    let shown = format!("{}/{from}@{digest}", client.registry);
    let parsed = manifest::parse(&shown, &fetched.bytes, fetched.content_type.as_deref())?;
    let from_owned = from.to_owned();
    for (blob, _) in parsed.blobs() {
        let target = blob_target(repository, &blob, Some(&from_owned));
        let blob_url = client.url(&format!("v2/{repository}/blobs/{blob}"))?;
        let head = client.send(&target, &|http| Ok(http.head(blob_url.clone())))?;
        if head.status().is_success() {
            report.blobs_skipped += 1;
            continue;
        }
        match start_session(client, &target, repository, &blob, Some(&from_owned))? {
            Session::Mounted => {
                report.blobs_skipped += 1;
                report.blobs_mounted += 1;
            }
            Session::Open(_) => {
                return Err(RegistryError::Http {
                    registry: client.registry.clone(),
                    repository: repository.to_owned(),
                    what: format!("mount of blob {blob} from {from}"),
                    status: 202,
                    detail: ": the registry did not mount it".into(),
                });
            }
        }
    }
    put_manifest(
        client,
        repository,
        &digest.to_string(),
        &fetched.bytes,
        parsed.media_type(),
        digest,
    )
}

/// Which other repository of `registry` the store knows to hold each blob: the images the
/// store names `registry/OTHER:TAG` were pulled from or pushed there.
fn mount_sources(store: &Store, registry: &str, repository: &str) -> HashMap<Digest, String> {
    let mut out = HashMap::new();
    let Ok(names) = store.names() else {
        return out;
    };
    let prefix = format!("{registry}/");
    for entry in names {
        let Some(name) = entry.name.as_deref().filter(|n| n.starts_with(&prefix)) else {
            continue;
        };
        if !names_registry(name) {
            continue;
        }
        let Ok(r) = name.parse::<RegistryRef>() else {
            continue;
        };
        if r.repository == repository {
            continue;
        }
        let Ok(image) = store.load_image(&entry.digest) else {
            continue;
        };
        let Ok(layers) = image.layers() else {
            continue;
        };
        for layer in layers {
            out.entry(layer.digest)
                .or_insert_with(|| r.repository.clone());
        }
        out.entry(image.config_digest)
            .or_insert_with(|| r.repository.clone());
    }
    out
}

fn blob_target<'a>(repository: &'a str, digest: &Digest, from: Option<&String>) -> Target<'a> {
    let mut scopes = vec![push_scope(repository)];
    if let Some(from) = from {
        scopes.push(pull_scope(from));
    }
    Target {
        repository,
        what: format!("blob {digest}"),
        scopes,
    }
}

fn push_blob(
    client: &Client,
    store: &Store,
    repository: &str,
    digest: &Digest,
    size: u64,
    mount_from: Option<&String>,
    progress: &SharedProgress,
) -> Result<Outcome> {
    let target = blob_target(repository, digest, mount_from);
    let blob_url = client.url(&format!("v2/{repository}/blobs/{digest}"))?;
    let head = client.send(&target, &|http| Ok(http.head(blob_url.clone())))?;
    if head.status().is_success() {
        return Ok(Outcome::Present);
    }
    if head.status() != StatusCode::NOT_FOUND {
        return Err(client.http_error(&target, head));
    }
    let path = store.blob_path(digest);
    check_size(&path, digest, size)?;
    if size == 0 && *digest != Digest::of(b"") {
        // No byte goes out to be hashed on the way.
        return Err(StoreError::CorruptBlob {
            digest: digest.clone(),
            path,
            actual: Digest::of(b""),
        }
        .into());
    }
    // The blob is hashed while it goes out, not read twice: the upload session is the scratch
    // space, and the piece that would complete it fails before its last byte if the content
    // does not hash to `digest`, so nothing is committed under a wrong digest.
    let hash = OutgoingHash::shared(digest);
    let mut location = match start_session(client, &target, repository, digest, mount_from)? {
        Session::Mounted => return Ok(Outcome::Mounted),
        Session::Open(url) => url,
    };
    progress.start(digest, size);
    let mut offset = 0u64;
    let mut failures = 0u32;
    let mut sent = 0u64;
    loop {
        let chunk = client.settings.chunk_size.max(1);
        let last = size - offset <= chunk;
        let len = if last { size - offset } else { chunk };
        // The last piece goes with the closing PUT; earlier ones as PATCH chunks.
        let result = if last {
            let mut url = location.clone();
            url.query_pairs_mut()
                .append_pair("digest", &digest.to_string());
            client.send_once(&target, &|http| {
                Ok(http
                    .put(url.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, len)
                    .body(body_at(&path, offset, len, size, &hash, progress)?))
            })
        } else {
            client.send_once(&target, &|http| {
                Ok(http
                    .patch(location.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_RANGE, format!("{offset}-{}", offset + len - 1))
                    .header(CONTENT_LENGTH, len)
                    .body(body_at(&path, offset, len, size, &hash, progress)?))
            })
        };
        let failure = match result {
            Ok(r) if last && r.status() == StatusCode::CREATED => {
                sent += len;
                progress.finish(digest);
                return Ok(Outcome::Uploaded(sent));
            }
            Ok(r) if !last && r.status() == StatusCode::ACCEPTED => {
                location = client.location(&r)?;
                sent += len;
                offset += len;
                continue;
            }
            Ok(r)
                if r.status().is_server_error()
                    || r.status() == StatusCode::TOO_MANY_REQUESTS
                    || r.status() == StatusCode::RANGE_NOT_SATISFIABLE
                    || r.status() == StatusCode::NOT_FOUND =>
            {
                client.http_error(&target, r)
            }
            Ok(r) => return Err(client.http_error(&target, r)),
            Err(e @ RegistryError::Connection { .. }) => {
                if let Some(actual) = hash.mismatch() {
                    return Err(StoreError::CorruptBlob {
                        digest: digest.clone(),
                        path,
                        actual,
                    }
                    .into());
                }
                e
            }
            Err(e) => return Err(e),
        };
        if failures >= client.settings.retries {
            return Err(failure);
        }
        std::thread::sleep(client.settings.backoff_for(failures));
        failures += 1;
        tracing::debug!(%digest, offset, "upload broken; resuming");
        // Where the session stands now; a session the registry lost starts anew.
        let (new_location, at) = match session_offset(client, &target, &location)? {
            Some(found) => found,
            None => match start_session(client, &target, repository, digest, None)? {
                Session::Mounted => return Ok(Outcome::Mounted),
                Session::Open(url) => (url, 0),
            },
        };
        offset = at.min(size);
        hash.rewind(&path, offset)?;
        progress.set(digest, offset);
        location = new_location;
    }
}

enum Session {
    Mounted,
    Open(reqwest::Url),
}

fn start_session(
    client: &Client,
    target: &Target<'_>,
    repository: &str,
    digest: &Digest,
    mount_from: Option<&String>,
) -> Result<Session> {
    let mut url = client.url(&format!("v2/{repository}/blobs/uploads/"))?;
    if let Some(from) = mount_from {
        url.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", from);
    }
    let response = client.send(target, &|http| {
        Ok(http.post(url.clone()).header(CONTENT_LENGTH, 0))
    })?;
    match response.status() {
        StatusCode::CREATED if mount_from.is_some() => Ok(Session::Mounted),
        StatusCode::ACCEPTED => Ok(Session::Open(client.location(&response)?)),
        _ => Err(client.http_error(target, response)),
    }
}

/// The session's location and how many bytes it holds, or `None` if the registry lost it.
fn session_offset(
    client: &Client,
    target: &Target<'_>,
    location: &reqwest::Url,
) -> Result<Option<(reqwest::Url, u64)>> {
    let response = client.send(target, &|http| Ok(http.get(location.clone())))?;
    if response.status() != StatusCode::NO_CONTENT {
        return Ok(None);
    }
    let end = response
        .headers()
        .get(reqwest::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_range_end);
    let location = client
        .location(&response)
        .unwrap_or_else(|_| location.clone());
    // "0-0" is what an empty session reports: resume from 0 (a 1-byte session then answers
    // 416, and the retry starts a new one).
    Ok(Some((
        location,
        end.filter(|&e| e > 0).map_or(0, |e| e + 1),
    )))
}

/// The last byte of a `Range: 0-N` (or `bytes=0-N`) header.
pub(crate) fn parse_range_end(value: &str) -> Option<u64> {
    let value = value.trim().trim_start_matches("bytes=");
    let (start, end) = value.split_once('-')?;
    if start.trim() != "0" {
        return None;
    }
    end.trim().parse().ok()
}

/// Fails early, with the store's error, when the blob file is not as long as its descriptor.
fn check_size(path: &std::path::Path, digest: &Digest, size: u64) -> Result<()> {
    let actual = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::MissingBlob {
                digest: digest.clone(),
                path: path.to_owned(),
            }
            .into());
        }
        Err(source) => {
            return Err(RegistryError::Io {
                action: "stat",
                path: path.to_owned(),
                source,
            });
        }
    };
    if actual != size {
        return Err(StoreError::SizeMismatch {
            digest: digest.clone(),
            path: path.to_owned(),
            expected: size,
            actual,
        }
        .into());
    }
    Ok(())
}

/// The hash of a blob's bytes as far as they have gone out in order, shared by the bodies of
/// the requests of one upload.
struct OutgoingHash {
    digest: Digest,
    hasher: Sha256,
    /// Bytes hashed: the blob's first `at` bytes.
    at: u64,
    /// What the whole blob hashed to, when that was not `digest`.
    mismatch: Option<Digest>,
}

type SharedHash = Arc<Mutex<OutgoingHash>>;

impl OutgoingHash {
    fn shared(digest: &Digest) -> SharedHash {
        Arc::new(Mutex::new(OutgoingHash {
            digest: digest.clone(),
            hasher: Sha256::new(),
            at: 0,
            mismatch: None,
        }))
    }
}

trait HashState {
    fn lock_hash(&self) -> std::sync::MutexGuard<'_, OutgoingHash>;
    fn mismatch(&self) -> Option<Digest> {
        self.lock_hash().mismatch.clone()
    }
    /// Makes the hash cover exactly the blob's first `offset` bytes, where an upload resumes:
    /// bytes of a broken request past what the registry kept were hashed but will go again.
    fn rewind(&self, path: &std::path::Path, offset: u64) -> Result<()> {
        let mut state = self.lock_hash();
        if state.at == offset {
            return Ok(());
        }
        let io = |action, source| RegistryError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(|e| io("open", e))?;
        let mut hasher = Sha256::new();
        let copied = std::io::copy(&mut file.take(offset), &mut HashSink(&mut hasher))
            .map_err(|e| io("read", e))?;
        state.hasher = hasher;
        state.at = copied;
        Ok(())
    }
}

impl HashState for SharedHash {
    fn lock_hash(&self) -> std::sync::MutexGuard<'_, OutgoingHash> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct HashSink<'a>(&'a mut Sha256);

impl std::io::Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One request body: a range of the blob file, hashed on the way out and reported to the
/// progress bars.
struct UploadReader {
    inner: std::io::Take<File>,
    digest: Digest,
    position: u64,
    size: u64,
    hash: SharedHash,
    progress: SharedProgress,
}

impl Read for UploadReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            let mut state = self.hash.lock_hash();
            if state.at == self.position {
                state.hasher.update(&buf[..n]);
                state.at += n as u64;
                // The blob's last bytes are held back until the whole blob hashed right.
                if state.at == self.size {
                    let actual = Digest::from_hasher(state.hasher.clone());
                    if actual != state.digest {
                        state.mismatch = Some(actual.clone());
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("blob {} hashes to {actual}: not uploaded", state.digest),
                        ));
                    }
                }
            }
        }
        self.position += n as u64;
        self.progress.set(&self.digest, self.position);
        Ok(n)
    }
}

/// `len` bytes of the blob file at `path` from `offset`, streamed (never read into memory).
fn body_at(
    path: &std::path::Path,
    offset: u64,
    len: u64,
    size: u64,
    hash: &SharedHash,
    progress: &SharedProgress,
) -> Result<Body> {
    let io = |action, source| RegistryError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(|e| io("open", e))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| io("seek", e))?;
    let reader = UploadReader {
        inner: file.take(len),
        digest: hash.lock_hash().digest.clone(),
        position: offset,
        size,
        hash: hash.clone(),
        progress: progress.clone(),
    };
    Ok(Body::sized(reader, len))
}

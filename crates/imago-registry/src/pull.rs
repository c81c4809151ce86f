//! Pulling an image into the store: manifest (and index) by tag or digest, verified, then the
//! blobs the store lacks, in parallel, each verified while it streams into a store temp file.

use std::io::{Read, Write};

use imago_oci::{Digest, Reference};
use imago_store::{Store, StoreError};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE, RANGE};

use crate::client::{Client, Target, describe, pull_scope};
use crate::error::{RegistryError, Result};
use crate::manifest::{self, MAX_MANIFEST_SIZE, Parsed};
use crate::reference::RegistryRef;
use crate::settings::Settings;
use crate::{Progress, run_parallel};

#[derive(Debug, Clone)]
pub struct PullReport {
    /// The full reference the image is named by in the store.
    pub reference: String,
    /// The digest of what the reference names: an index when the registry has one.
    pub digest: Digest,
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
}

pub(crate) struct Fetched {
    pub(crate) bytes: Vec<u8>,
    pub(crate) content_type: Option<String>,
    pub(crate) digest: Digest,
}

pub(crate) fn fetch_manifest(
    client: &Client,
    repository: &str,
    reference: &str,
) -> Result<Fetched> {
    let target = Target {
        repository,
        what: format!("manifest {reference}"),
        scopes: vec![pull_scope(repository)],
    };
    let url = client.url(&format!("v2/{repository}/manifests/{reference}"))?;
    let response = client.send(&target, &|http| {
        Ok(http.get(url.clone()).header(ACCEPT, manifest::ACCEPT))
    })?;
    if response.status() != StatusCode::OK {
        return Err(client.http_error(&target, response));
    }
    let too_large = |size: u64| RegistryError::TooLarge {
        registry: client.registry.clone(),
        repository: repository.to_owned(),
        what: format!("manifest {reference}"),
        size,
        limit: MAX_MANIFEST_SIZE,
    };
    if let Some(len) = response.content_length()
        && len > MAX_MANIFEST_SIZE
    {
        return Err(too_large(len));
    }
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut bytes = Vec::new();
    response
        .take(MAX_MANIFEST_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| RegistryError::Connection {
            registry: client.registry.clone(),
            repository: repository.to_owned(),
            what: target.what.clone(),
            message: e.to_string(),
        })?;
    if bytes.len() as u64 > MAX_MANIFEST_SIZE {
        return Err(too_large(bytes.len() as u64));
    }
    let digest = Digest::of(&bytes);
    if let Ok(expected) = reference.parse::<Digest>()
        && expected != digest
    {
        return Err(RegistryError::DigestMismatch {
            registry: client.registry.clone(),
            repository: repository.to_owned(),
            what: "manifest",
            expected,
            actual: digest,
        });
    }
    Ok(Fetched {
        bytes,
        content_type,
        digest,
    })
}

/// The digest `r` names in its registry now (a tag resolved; a digest checked to exist).
pub fn resolve_remote(settings: &Settings, r: &RegistryRef) -> Result<Digest> {
    let client = Client::connect(settings, &r.registry)?;
    Ok(fetch_manifest(&client, &r.repository, &r.manifest_reference())?.digest)
}

/// Pulls `r` into `store` and names it there by its full reference (`HOST/REPO:TAG`, or
/// `HOST/REPO@sha256:...` when pulled by digest).
pub fn pull(
    store: &Store,
    settings: &Settings,
    r: &RegistryRef,
    progress: &dyn Progress,
) -> Result<PullReport> {
    let client = Client::connect(settings, &r.registry)?;
    let repository = r.repository.as_str();
    let shown = r.to_string();
    // Holds gc off until the image is named: its blobs are reachable from nothing before.
    let _guard = store.write_guard()?;
    let root = fetch_manifest(&client, repository, &r.manifest_reference())?;
    let parsed = manifest::parse(&shown, &root.bytes, root.content_type.as_deref())?;
    let mut documents = vec![(root.digest.clone(), root.bytes)];
    let images = match parsed {
        Parsed::Image { .. } => vec![parsed],
        Parsed::Index { manifests, .. } => {
            let chosen =
                manifest::select_platform(&manifests, &settings.platform).ok_or_else(|| {
                    RegistryError::NoPlatform {
                        reference: shown.clone(),
                        platform: settings.platform.clone(),
                    }
                })?;
            // Every platform's manifest is kept (they are small), so that a push of the index
            // gives the registry the same index digest; blobs come for the chosen platform,
            // or for all with `--all-platforms`.
            let mut images = Vec::new();
            for entry in &manifests {
                let child = fetch_manifest(&client, repository, &entry.digest)?;
                let parsed = manifest::parse(&shown, &child.bytes, child.content_type.as_deref())?;
                if !matches!(parsed, Parsed::Image { .. }) {
                    return Err(RegistryError::InvalidManifest {
                        reference: shown,
                        reason: format!("index entry {} is itself an index", entry.digest),
                    });
                }
                if settings.all_platforms || entry.digest == chosen.digest {
                    images.push(parsed);
                }
                // Children before the index, so the index never names a manifest not yet
                // stored.
                documents.insert(0, (child.digest, child.bytes));
            }
            images
        }
    };
    let mut missing: Vec<(Digest, u64)> = images
        .iter()
        .flat_map(Parsed::blobs)
        .filter(|(d, _)| !store.has_blob(d))
        .collect();
    // Platforms share blobs (an empty layer, a common base): each is fetched once.
    let mut seen = std::collections::HashSet::new();
    missing.retain(|(d, _)| seen.insert(d.clone()));
    let fetched = run_parallel(settings.parallel, missing, &|(digest, size)| {
        download_blob(&client, store, repository, &digest, size, progress)
    })?;
    for (digest, bytes) in &documents {
        let stored = store.put_blob(bytes)?;
        if stored != *digest {
            return Err(StoreError::UnexpectedDigest {
                expected: digest.clone(),
                actual: stored,
            }
            .into());
        }
    }
    let name = match r.tag.as_deref() {
        Some(tag) => {
            let named = Reference::named(&r.name(), tag).map_err(StoreError::from)?;
            store.tag(&named, &root.digest)?;
            format!("{}:{tag}", r.name())
        }
        None if r.digest.is_some() => {
            store.name_pinned(&r.name(), &root.digest)?;
            format!("{}@{}", r.name(), root.digest)
        }
        None => {
            let named = Reference::named(&r.name(), "latest").map_err(StoreError::from)?;
            store.tag(&named, &root.digest)?;
            format!("{}:latest", r.name())
        }
    };
    Ok(PullReport {
        reference: name,
        digest: root.digest,
        blobs_fetched: fetched.len() as u64,
        bytes_fetched: fetched.iter().sum(),
    })
}

/// Downloads one blob into the store, resuming with `Range` after a broken connection.
/// Returns the bytes received.
fn download_blob(
    client: &Client,
    store: &Store,
    repository: &str,
    digest: &Digest,
    size: u64,
    progress: &dyn Progress,
) -> Result<u64> {
    let target = Target {
        repository,
        what: format!("blob {digest}"),
        scopes: vec![pull_scope(repository)],
    };
    let url = client.url(&format!("v2/{repository}/blobs/{digest}"))?;
    let mut writer = store.blob_writer()?;
    let mut received = 0u64;
    let mut broken = 0u32;
    progress.start(digest, size);
    loop {
        let offset = writer.written();
        let response = client.send(&target, &|http| {
            let mut request = http.get(url.clone());
            if offset > 0 {
                request = request.header(RANGE, format!("bytes={offset}-"));
            }
            Ok(request)
        })?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {}
            StatusCode::OK => {
                if offset > 0 {
                    // The registry ignored the range: start over.
                    progress.set(digest, 0);
                    writer = store.blob_writer()?;
                }
            }
            _ => return Err(client.http_error(&target, response)),
        }
        match copy_capped(response, &mut writer, size, digest, progress) {
            Ok(n) => {
                received += n;
                break;
            }
            Err(CopyError::TooLong) => {
                return Err(RegistryError::SizeMismatch {
                    registry: client.registry.clone(),
                    repository: repository.to_owned(),
                    digest: digest.clone(),
                    expected: size,
                    actual: writer.written(),
                });
            }
            Err(CopyError::Store(e)) => {
                return Err(RegistryError::Io {
                    action: "write blob",
                    path: store.root().join(digest.layout_path()),
                    source: e,
                });
            }
            Err(CopyError::Read(e, n)) => {
                received += n;
                if broken >= client.settings.retries {
                    return Err(RegistryError::Connection {
                        registry: client.registry.clone(),
                        repository: repository.to_owned(),
                        what: target.what.clone(),
                        message: format!("connection broken after {} bytes: {e}", writer.written()),
                    });
                }
                tracing::debug!(%digest, written = writer.written(), "download broken; resuming");
                std::thread::sleep(client.settings.backoff_for(broken));
                broken += 1;
            }
        }
    }
    if writer.written() != size {
        return Err(RegistryError::SizeMismatch {
            registry: client.registry.clone(),
            repository: repository.to_owned(),
            digest: digest.clone(),
            expected: size,
            actual: writer.written(),
        });
    }
    match writer.commit_expecting(digest) {
        Ok(_) => {}
        Err(StoreError::UnexpectedDigest { expected, actual }) => {
            return Err(RegistryError::DigestMismatch {
                registry: client.registry.clone(),
                repository: repository.to_owned(),
                what: "blob",
                expected,
                actual,
            });
        }
        Err(e) => return Err(e.into()),
    }
    progress.finish(digest);
    Ok(received)
}

enum CopyError {
    TooLong,
    Read(std::io::Error, u64),
    Store(std::io::Error),
}

/// Copies `from` into `to` until EOF, refusing more than `limit` bytes in total.
fn copy_capped(
    mut from: reqwest::blocking::Response,
    to: &mut imago_store::BlobWriter,
    limit: u64,
    digest: &Digest,
    progress: &dyn Progress,
) -> std::result::Result<u64, CopyError> {
    let mut buffer = vec![0u8; 256 << 10];
    let mut copied = 0u64;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let e = match e.get_ref().and_then(|s| s.downcast_ref::<reqwest::Error>()) {
                    Some(re) => std::io::Error::other(describe(re)),
                    None => e,
                };
                return Err(CopyError::Read(e, copied));
            }
        };
        if to.written() + n as u64 > limit {
            return Err(CopyError::TooLong);
        }
        to.write_all(&buffer[..n]).map_err(CopyError::Store)?;
        copied += n as u64;
        progress.set(digest, to.written());
    }
}

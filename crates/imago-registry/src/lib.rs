//! The registry client: OCI distribution API pulls into and pushes out of the imago store,
//! without changing a byte (manifests are stored and pushed as they are; blobs are verified
//! while they stream into the store).
//!
//! Built on reqwest's blocking client (rustls, ring provider): the store is synchronous, and
//! parallel blob transfers are a handful of threads.

mod auth;
mod client;
mod error;
mod manifest;
mod pull;
mod push;
mod reference;
mod settings;

pub use auth::{Challenge, CredentialSources, Credentials, parse_challenge, store_credentials};
pub use client::Client;
pub use error::{RegistryError, Result};
pub use manifest::{MAX_BLOB_SIZE, MAX_MANIFEST_SIZE};
pub use pull::{PullReport, pull, resolve_remote};
pub use push::{CHUNK_SIZE, PushReport, push};
pub use reference::{RegistryRef, names_registry};
pub use settings::{Settings, is_loopback};

use imago_oci::Digest;

/// Progress of blob transfers; called from several threads at once.
pub trait Progress: Send + Sync {
    fn start(&self, _digest: &Digest, _size: u64) {}
    /// Bytes of the blob transferred so far (it goes back when a transfer resumes earlier).
    fn set(&self, _digest: &Digest, _position: u64) {}
    fn finish(&self, _digest: &Digest) {}
}

/// Progress shared with the readers that stream request bodies.
pub type SharedProgress = std::sync::Arc<dyn Progress>;

/// Progress that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// Runs `jobs` on up to `parallel` threads; the first error wins, later jobs are not started.
pub(crate) fn run_parallel<T: Send, R: Send>(
    parallel: usize,
    jobs: Vec<T>,
    work: &(dyn Fn(T) -> Result<R> + Sync),
) -> Result<Vec<R>> {
    use std::sync::Mutex;
    let queue = Mutex::new(jobs.into_iter());
    let results = Mutex::new(Vec::new());
    let failed: Mutex<Option<RegistryError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..parallel.max(1) {
            scope.spawn(|| {
                loop {
                    if failed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .is_some()
                    {
                        return;
                    }
                    let job = queue
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .next();
                    let Some(job) = job else {
                        return;
                    };
                    match work(job) {
                        Ok(r) => results
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(r),
                        Err(e) => {
                            failed
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner))
}

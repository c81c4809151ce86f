//! `<home>/build-work`: the unpacked chains `run` steps start from, the steps' own directories,
//! and their collection by `imago gc` without hurting a build that uses them.
//!
//! - `chains/<hex>`: the root a list of layers makes (`hex` is the SHA-256 of their diff_ids,
//!   [`chain_key`]), unpacked once and never written after its rename into place. A build holds
//!   a shared `flock` on `chains/<hex>.lock` from before it looks for the chain until its step's
//!   changes are written ([`ChainLease`]); gc removes a chain only while it holds that lock
//!   exclusively, and never waits for it: a chain in use is kept and counted. The lock file's
//!   mtime is the chain's last use (a build touches it), which `--keep-chains N` orders by.
//! - `chains/.unpack-<hex>-*`: a chain being unpacked (same lock), or left by a killed build.
//! - `steps/s*`: a running step's directory (overlay upper, bundles), with an exclusive `flock`
//!   on its `lock` file for as long as the build has it; `steps/*.removing`: a finished step's
//!   directory that a detached `rm -rf` is removing. gc removes both kinds once nobody holds them.
//!
//! Lock files are removed by gc while it holds them; a build that opened a lock file just
//! before that and then got the lock checks that the path still names the file it locked, and
//! starts over if not.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use imago_oci::Digest;
use imago_store::Store;
use rustix::fs::FlockOperation;
use serde::Serialize;
use sha2::Digest as _;

use crate::BuildError;

/// The name of the chain that `diff_ids` (bottom layer first) make.
pub fn chain_key(diff_ids: &[&Digest]) -> Digest {
    let mut h = imago_oci::Sha256::new();
    for d in diff_ids {
        h.update(d.to_string().as_bytes());
        h.update(b"\n");
    }
    Digest::from_hasher(h)
}

/// A build's claim on one chain: while it lives, gc leaves the chain alone.
#[derive(Debug)]
pub struct ChainLease {
    _lock: File,
}

/// Takes the shared lock of chain `key` under `chains` (created when missing) and marks the
/// chain as used now. Waits only while a gc is removing that very chain.
pub fn lease_chain(chains: &Path, key: &Digest) -> Result<ChainLease, BuildError> {
    fs::create_dir_all(chains).map_err(|e| io_error(chains, e))?;
    let path = chains.join(format!("{}.lock", key.hex()));
    loop {
        let file = open_lock(&path)?;
        rustix::fs::flock(&file, FlockOperation::LockShared)
            .map_err(|e| io_error(&path, e.into()))?;
        if same_file(&file, &path) {
            // The last use, for `gc --keep-chains`.
            let _ = file.set_modified(SystemTime::now());
            return Ok(ChainLease { _lock: file });
        }
    }
}

/// Held by a build for as long as a step's directory is its own.
#[derive(Debug)]
pub struct StepLock {
    _lock: File,
}

/// Locks the new step directory `dir` (gc removes a step directory nobody holds).
pub fn lock_step_dir(dir: &Path) -> Result<StepLock, BuildError> {
    let path = dir.join("lock");
    let file = File::create(&path).map_err(|e| io_error(&path, e))?;
    rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive)
        .map_err(|e| io_error(&path, e.into()))?;
    Ok(StepLock { _lock: file })
}

/// Opens (or makes) the lock file `path`; its content is never used.
fn open_lock(path: &Path) -> Result<File, BuildError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| io_error(path, e))
}

/// Whether `path` still names the open file `file`.
fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// What [`collect`] did (or would do, with `dry_run`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkGcReport {
    /// Chains removed: no stored image's layers make them (or beyond `keep_chains`).
    pub chains_removed: usize,
    pub chains_kept: usize,
    /// Chains that should go but a running build holds: kept.
    pub chains_in_use: usize,
    /// Leftover step directories and interrupted unpacks removed.
    pub stale_dirs_removed: usize,
    /// Build cache records that name a blob or image the store no longer has (filled in by
    /// [`collect_cache`]).
    pub cache_records_removed: usize,
    pub bytes_freed: u64,
}

/// Removes from `work` (`<home>/build-work`) every chain that no image in `roots` reaches (a
/// chain is reached when its layers are the first layers of the image, any number of them),
/// and of the rest all but the `keep_chains` most recently used; and the step directories and
/// unpacks that no build holds. Never waits for a build, never removes what one holds.
pub fn collect(
    store: &Store,
    work: &Path,
    roots: &[Digest],
    keep_chains: Option<usize>,
    dry_run: bool,
) -> Result<WorkGcReport, BuildError> {
    let mut reachable = BTreeSet::new();
    for root in roots {
        let image = store.load_image(root)?;
        let diff_ids: Vec<Digest> = image
            .layers()?
            .into_iter()
            .map(|l| l.diff_id.unwrap_or(l.digest))
            .collect();
        let refs: Vec<&Digest> = diff_ids.iter().collect();
        for n in 0..=refs.len() {
            reachable.insert(chain_key(&refs[..n]).hex().to_owned());
        }
    }
    let mut report = WorkGcReport::default();
    let chains = work.join("chains");
    // Reached chains, newest use first, for keep_chains.
    let mut kept: Vec<(SystemTime, String)> = Vec::new();
    let mut doomed: Vec<String> = Vec::new();
    for name in list(&chains)? {
        if name.starts_with('.') || name.ends_with(".lock") {
            continue;
        }
        if reachable.contains(&name) {
            let used = fs::metadata(chains.join(format!("{name}.lock")))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            kept.push((used, name));
        } else {
            doomed.push(name);
        }
    }
    kept.sort_by(|a, b| b.cmp(a));
    if let Some(n) = keep_chains
        && kept.len() > n
    {
        doomed.extend(kept.split_off(n).into_iter().map(|(_, name)| name));
    }
    report.chains_kept = kept.len();
    for name in doomed {
        match with_chain_lock(&chains, &name, || {
            remove_tree(&chains.join(&name), dry_run, &mut report.bytes_freed)
        })? {
            Some(()) => report.chains_removed += 1,
            None => {
                report.chains_in_use += 1;
                report.chains_kept += 1;
            }
        }
    }
    // Unpacks of killed builds: `.unpack-<hex>-XXXX`, free when the chain's lock is.
    for name in list(&chains)? {
        let Some(key) = name
            .strip_prefix(".unpack-")
            .and_then(|rest| rest.split_once('-'))
            .map(|(hex, _)| hex.to_owned())
        else {
            continue;
        };
        let removed = with_chain_lock(&chains, &key, || {
            remove_tree(&chains.join(&name), dry_run, &mut report.bytes_freed)
        })?;
        report.stale_dirs_removed += usize::from(removed.is_some());
    }
    let steps = work.join("steps");
    for name in list(&steps)? {
        let dir = steps.join(&name);
        if !name.ends_with(".removing") {
            let lock = dir.join("lock");
            let held = match File::open(&lock) {
                Ok(f) => rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive).is_err(),
                // A directory whose lock is not there yet is being made right now.
                Err(_) => true,
            };
            if held {
                continue;
            }
        }
        remove_tree(&dir, dry_run, &mut report.bytes_freed)?;
        report.stale_dirs_removed += 1;
    }
    Ok(report)
}

/// Runs `remove` while holding chain `key`'s lock exclusively, then removes the lock file;
/// `None` when a build holds the lock.
fn with_chain_lock(
    chains: &Path,
    key: &str,
    remove: impl FnOnce() -> Result<(), BuildError>,
) -> Result<Option<()>, BuildError> {
    let path = chains.join(format!("{key}.lock"));
    let file = open_lock(&path)?;
    if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_err()
        || !same_file(&file, &path)
    {
        return Ok(None);
    }
    remove()?;
    // Still locked: a build waiting on this file finds it unlinked and takes a new one.
    if !chains.join(key).exists() {
        let _ = fs::remove_file(&path);
    }
    Ok(Some(()))
}

/// Removes the layer and archive records of the build cache (`<home>/build-cache`) whose blob
/// (or manifest) the store no longer has; returns how many. Such a record could only ever
/// miss (the build checks the blob), so removing it changes no build.
pub fn collect_cache(store: &Store, cache_dir: &Path, dry_run: bool) -> Result<usize, BuildError> {
    #[derive(serde::Deserialize)]
    struct Layer {
        blob_digest: Digest,
    }
    #[derive(serde::Deserialize)]
    struct Archive {
        digest: Digest,
    }
    fn layer_blob(bytes: &[u8]) -> Option<Digest> {
        serde_json::from_slice::<Layer>(bytes)
            .ok()
            .map(|l| l.blob_digest)
    }
    fn archive_manifest(bytes: &[u8]) -> Option<Digest> {
        serde_json::from_slice::<Archive>(bytes)
            .ok()
            .map(|a| a.digest)
    }
    /// A record's file, and where it says its blob is.
    type RecordDigest = fn(&[u8]) -> Option<Digest>;
    let kinds: [(&str, RecordDigest); 2] = [("layers", layer_blob), ("archives", archive_manifest)];
    let mut removed = 0;
    for (sub, named) in kinds {
        let dir = cache_dir.join(sub);
        for name in list(&dir)? {
            if !name.ends_with(".json") {
                continue;
            }
            let path = dir.join(&name);
            let Ok(bytes) = fs::read(&path) else {
                continue;
            };
            // A record the cache cannot read is a miss anyway.
            let live = named(&bytes).is_some_and(|d| store.has_blob(&d));
            if !live {
                if !dry_run {
                    fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
                }
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// The names in `dir` (none when it does not exist).
fn list(dir: &Path) -> Result<Vec<String>, BuildError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Removes the tree `path` (adding its file sizes to `freed`); a path that vanishes meanwhile
/// (a detached `rm -rf` of a finished step is at it too) is fine.
fn remove_tree(path: &Path, dry_run: bool, freed: &mut u64) -> Result<(), BuildError> {
    *freed += tree_size(path);
    if dry_run {
        return Ok(());
    }
    for _ in 0..3 {
        match fs::remove_dir_all(path) {
            Ok(()) => return Ok(()),
            Err(_) if !path.exists() => return Ok(()),
            Err(_) => {}
        }
    }
    fs::remove_dir_all(path).map_err(|e| io_error(path, e))
}

fn tree_size(path: &Path) -> u64 {
    let Ok(md) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !md.is_dir() {
        return md.len();
    }
    let children = fs::read_dir(path).into_iter().flatten().flatten();
    md.len() + children.map(|c| tree_size(&c.path())).sum::<u64>()
}

fn io_error(path: &Path, source: io::Error) -> BuildError {
    BuildError::Io {
        path: PathBuf::from(path),
        source,
    }
}

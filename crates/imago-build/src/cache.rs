//! The build cache under `<home>/build-cache/`: input fingerprints and built layers.
//!
//! - `files.json`: absolute source path -> stat fingerprint and content sha256. A fingerprint is
//!   trusted only if the file's last change (mtime and ctime) is at least [`RACY_WINDOW_NS`]
//!   older than the moment it was recorded; otherwise a later change could land within the same
//!   timestamp tick and keep the stamp, so the content is hashed again ("verified by content when
//!   in doubt", the racy-git rule).
//! - `layers/<key>.json`: layer key (a digest of every entry's path, type, mode, owner and
//!   content digest, the compression and the mtime) -> the blob it produced. A layer whose
//!   files all had trusted fingerprints when it was built is also recorded under a second key
//!   made with those fingerprints instead of content digests: a no-op rebuild finds it from
//!   the walk's stats alone, without loading `files.json` (about 3 MB for 10,000 files).
//!
//! - `archives/<key>.json`: a base archive's canonical path and stat fingerprint -> the
//!   manifest digest its import gave, trusted under the same racy rule as files: a no-op
//!   rebuild on an archive base neither reads nor hashes the archive again.
//!
//! A damaged or missing cache is an empty cache: it can only make a build slower, never
//! different. Concurrent builds may overwrite each other's records; each record is written
//! whole (temp file + rename), so the worst case is a miss.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use imago_oci::Digest;
use serde::{Deserialize, Serialize};

use crate::plan::Stamp;

/// Two seconds: far more than any file system's timestamp granularity.
pub const RACY_WINDOW_NS: i128 = 2_000_000_000;

const FILES: &str = "files.json";
const FORMAT: u32 = 2;

/// A file's content hash for the cache: BLAKE3, which hashes several times faster than SHA-256
/// here; the content is already hashed with SHA-256 inside the diff_id, and a third SHA-256 pass
/// would cost a third of a cold zstd build. It never appears in an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentHash(pub String);

impl ContentHash {
    pub fn from_hasher(hasher: &blake3::Hasher) -> ContentHash {
        ContentHash(hasher.finalize().to_hex().to_string())
    }

    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(blake3::hash(bytes).to_hex().to_string())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileRecord {
    stamp: Stamp,
    recorded_ns: i128,
    digest: ContentHash,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FilesDoc {
    format: u32,
    files: HashMap<PathBuf, FileRecord>,
}

impl FilesDoc {
    fn empty() -> FilesDoc {
        FilesDoc {
            format: FORMAT,
            files: HashMap::new(),
        }
    }
}

/// What a built layer produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub diff_id: Digest,
    pub blob_digest: Digest,
    pub blob_size: u64,
    pub media_type: String,
}

/// Result of looking up a file's content digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileLookup {
    /// The fingerprint matches and is old enough to trust.
    Hit(ContentHash),
    /// The cache knows this path, but the fingerprint changed or is too recent: hash the file.
    Stale,
    /// Never seen.
    Unknown,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ArchiveRecord {
    path: PathBuf,
    stamp: Stamp,
    recorded_ns: i128,
    digest: Digest,
}

#[derive(Debug)]
pub struct Cache {
    dir: Option<PathBuf>,
    /// Loaded on first use: a rebuild that finds its layers by fingerprint never needs it.
    files: Option<FilesDoc>,
    dirty: bool,
    /// When the cache was opened, before the build context was walked.
    opened_ns: i128,
}

impl Cache {
    /// A cache that remembers nothing (`--no-cache`, `--check`).
    pub fn disabled() -> Cache {
        Cache {
            dir: None,
            files: Some(FilesDoc::empty()),
            dirty: false,
            opened_ns: now_ns(),
        }
    }

    pub fn open(dir: &Path) -> Cache {
        Cache {
            dir: Some(dir.to_owned()),
            files: None,
            dirty: false,
            opened_ns: now_ns(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    /// Whether a fingerprint taken after the cache was opened can stand for the file's content:
    /// the file's last change is older than the racy window, so any later change would move
    /// its ctime.
    pub fn trusted(&self, stamp: &Stamp) -> bool {
        !racy(stamp, self.opened_ns)
    }

    fn files(&mut self) -> &mut FilesDoc {
        let dir = self.dir.clone();
        self.files.get_or_insert_with(|| {
            dir.and_then(|d| fs::read(d.join(FILES)).ok())
                .and_then(|bytes| serde_json::from_slice::<FilesDoc>(&bytes).ok())
                .filter(|doc| doc.format == FORMAT)
                .unwrap_or_else(FilesDoc::empty)
        })
    }

    pub fn file(&mut self, path: &Path, stamp: &Stamp) -> FileLookup {
        match self.files().files.get(path) {
            None => FileLookup::Unknown,
            Some(r) if r.stamp == *stamp && !racy(stamp, r.recorded_ns) => {
                FileLookup::Hit(r.digest.clone())
            }
            Some(_) => FileLookup::Stale,
        }
    }

    pub fn record_file(&mut self, path: &Path, stamp: Stamp, digest: ContentHash) {
        if self.dir.is_none() {
            return;
        }
        let recorded_ns = now_ns();
        let record = FileRecord {
            stamp,
            recorded_ns,
            digest,
        };
        self.files().files.insert(path.to_owned(), record);
        self.dirty = true;
    }

    pub fn layer(&self, key: &Digest) -> Option<LayerRecord> {
        let dir = self.dir.as_ref()?;
        let bytes = fs::read(dir.join("layers").join(format!("{}.json", key.hex()))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Best effort: a cache that cannot be written is a cache that misses.
    pub fn record_layer(&self, key: &Digest, record: &LayerRecord) {
        let Some(dir) = &self.dir else { return };
        let layers = dir.join("layers");
        if let Ok(bytes) = serde_json::to_vec(record) {
            let _ = write_atomic(&layers, &format!("{}.json", key.hex()), &bytes);
        }
    }

    /// The manifest digest that the archive at `path` (canonical) gave when its fingerprint
    /// was `stamp`, if that fingerprint is old enough to trust.
    pub fn archive(&self, path: &Path, stamp: &Stamp) -> Option<Digest> {
        let dir = self.dir.as_ref()?;
        let bytes = fs::read(dir.join("archives").join(archive_file(path))).ok()?;
        let record: ArchiveRecord = serde_json::from_slice(&bytes).ok()?;
        (record.path == path && record.stamp == *stamp && !racy(stamp, record.recorded_ns))
            .then_some(record.digest)
    }

    /// Remembers what the archive at `path` (canonical) gave. `stamp` must have been taken
    /// before the archive was read, so that a change during the read shows as a new stamp. The
    /// record is dated when the cache was opened, before the stamp: never later than the read,
    /// as the racy rule needs.
    pub fn record_archive(&self, path: &Path, stamp: Stamp, digest: &Digest) {
        let Some(dir) = &self.dir else { return };
        let record = ArchiveRecord {
            path: path.to_owned(),
            stamp,
            recorded_ns: self.opened_ns,
            digest: digest.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec(&record) {
            let _ = write_atomic(&dir.join("archives"), &archive_file(path), &bytes);
        }
    }

    /// Writes `files.json` if anything changed. Best effort, like every cache write.
    pub fn save(&mut self) {
        let Some(dir) = &self.dir else { return };
        if !self.dirty {
            return;
        }
        // Dirty means loaded: only record_file makes it dirty.
        if let Some(files) = &self.files
            && let Ok(bytes) = serde_json::to_vec(files)
        {
            let _ = write_atomic(dir, FILES, &bytes);
        }
        self.dirty = false;
    }
}

/// One record per archive path; the path is hashed to make a file name of it.
fn archive_file(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    format!(
        "{}.json",
        blake3::hash(path.as_os_str().as_bytes()).to_hex()
    )
}

fn racy(stamp: &Stamp, recorded_ns: i128) -> bool {
    stamp.mtime_ns.max(stamp.ctime_ns) + RACY_WINDOW_NS > recorded_ns
}

/// The clock is read only here, to judge whether a fingerprint can be trusted; it never reaches
/// an image.
fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    drop(file);
    fs::rename(&tmp, dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(mtime_ns: i128) -> Stamp {
        Stamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns,
            ctime_ns: mtime_ns,
            mode: 0o100644,
        }
    }

    #[test]
    fn recent_fingerprints_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = Cache::open(dir.path());
        let p = Path::new("/x");
        let d = ContentHash::of(b"x");
        cache.record_file(p, stamp(now_ns()), d.clone());
        assert_eq!(cache.file(p, &stamp(now_ns())), FileLookup::Stale);
        let old = stamp(1_000_000_000);
        cache.record_file(p, old, d.clone());
        assert_eq!(cache.file(p, &old), FileLookup::Hit(d.clone()));
        let mut changed = old;
        changed.ctime_ns += 1;
        assert_eq!(cache.file(p, &changed), FileLookup::Stale);
        assert_eq!(cache.file(Path::new("/y"), &old), FileLookup::Unknown);
        cache.save();
        let mut reopened = Cache::open(dir.path());
        assert_eq!(reopened.file(p, &old), FileLookup::Hit(d));
    }

    #[test]
    fn damaged_cache_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILES), b"{not json").unwrap();
        let mut cache = Cache::open(dir.path());
        assert_eq!(cache.file(Path::new("/x"), &stamp(0)), FileLookup::Unknown);
        assert!(cache.layer(&Digest::of(b"k")).is_none());
    }
}

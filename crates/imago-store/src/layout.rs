//! Opening and creating the layout, paths, locks and atomic file replacement.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use imago_oci::Digest;
use rustix::fs::FlockOperation;

use crate::error::{IoContext, Result, StoreError};

pub(crate) const OCI_LAYOUT_FILE: &str = "oci-layout";
pub(crate) const INDEX_FILE: &str = "index.json";
const OCI_LAYOUT_CONTENT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
const EMPTY_INDEX: &[u8] =
    br#"{"manifests":[],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2}"#;

/// An open image store rooted at an OCI image layout directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Held by writers (imports, builds) while they have blobs that no name reaches yet: gc waits for
/// every guard to be dropped before it looks for unreachable blobs.
#[derive(Debug)]
pub struct WriteGuard {
    _lock: File,
}

impl Store {
    /// Opens the layout at `root`, creating an empty one if the directory is missing or empty.
    pub fn open(root: &Path) -> Result<Store> {
        let store = Store {
            root: root.to_path_buf(),
        };
        fs::create_dir_all(store.blobs_dir()).ctx("create", store.blobs_dir())?;
        fs::create_dir_all(store.tmp_dir()).ctx("create", store.tmp_dir())?;
        let layout_file = root.join(OCI_LAYOUT_FILE);
        if !layout_file.exists() {
            store.write_atomic(&layout_file, OCI_LAYOUT_CONTENT)?;
        }
        let index = root.join(INDEX_FILE);
        if !index.exists() {
            let _lock = store.lock_index()?;
            if !index.exists() {
                store.write_atomic(&index, EMPTY_INDEX)?;
            }
        }
        let content = fs::read(&layout_file).ctx("read", &layout_file)?;
        let version: serde_json::Value =
            serde_json::from_slice(&content).map_err(|e| StoreError::InvalidLayout {
                path: layout_file.clone(),
                reason: format!("oci-layout is not json: {e}"),
            })?;
        if version.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            return Err(StoreError::InvalidLayout {
                path: layout_file,
                reason: "imageLayoutVersion is not 1.0.0".into(),
            });
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join(".imago").join("tmp")
    }

    pub(crate) fn index_path(&self) -> PathBuf {
        self.root.join(INDEX_FILE)
    }

    /// Where the blob with `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    fn lock(&self, name: &str, op: FlockOperation) -> Result<File> {
        let path = self.root.join(".imago").join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx("open lock", &path)?;
        rustix::fs::flock(&file, op)
            .map_err(io_err)
            .ctx("lock", &path)?;
        Ok(file)
    }

    /// Exclusive lock for read-modify-write of `index.json`.
    pub(crate) fn lock_index(&self) -> Result<File> {
        self.lock("index.lock", FlockOperation::LockExclusive)
    }

    /// Shared gc lock: hold it while writing blobs that are not yet reachable from a name.
    pub fn write_guard(&self) -> Result<WriteGuard> {
        Ok(WriteGuard {
            _lock: self.lock("gc.lock", FlockOperation::LockShared)?,
        })
    }

    pub(crate) fn gc_lock(&self) -> Result<File> {
        self.lock("gc.lock", FlockOperation::LockExclusive)
    }

    /// Replaces `path` with `content` atomically: temp file in the same directory, fsync,
    /// rename, fsync of the directory. Readers see the old or the new file, never a mix.
    pub(crate) fn write_atomic(&self, path: &Path, content: &[u8]) -> Result<()> {
        let mut tmp = tempfile_in(&self.tmp_dir())?;
        tmp.1.write_all(content).ctx("write", &tmp.0)?;
        tmp.1.sync_all().ctx("fsync", &tmp.0)?;
        fs::rename(&tmp.0, path).ctx("rename into place", path)?;
        sync_parent(path)
    }
}

/// Creates a uniquely named file in `dir` (removed by the caller on failure).
pub(crate) fn tempfile_in(dir: &Path) -> Result<(PathBuf, File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("tmp-{pid}-{n}"));
        match OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).ctx("create temporary file", path),
        }
    }
}

pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .ctx("fsync directory", parent)?;
    }
    Ok(())
}

pub(crate) fn io_err(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

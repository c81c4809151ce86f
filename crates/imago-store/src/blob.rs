//! Writing blobs atomically and reading them back verified.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

use imago_oci::{Digest, HashingWriter, Sha256, to_canonical_json};
use serde::Serialize;
use sha2::Digest as _;

use crate::error::{IoContext, Result, StoreError};
use crate::layout::{Store, WriteGuard, sync_parent, tempfile_in};

const IO_BUFFER: usize = 1 << 20;
/// Every this many bytes a blob writer asks the kernel to start writing the data out, so that
/// the disk works while the rest is still being hashed instead of all at the final fsync.
const WRITEBACK_CHUNK: u64 = 32 << 20;

/// Streams a new blob into a temporary file while hashing it. Nothing is visible in the store
/// until [`BlobWriter::commit`]; dropping the writer without committing removes the temp file.
pub struct BlobWriter {
    store: Store,
    // Keeps gc away while the blob is being written.
    _guard: WriteGuard,
    tmp_path: PathBuf,
    // Boxed: the hasher and buffer state is large, and callers keep writers in enums.
    inner: Option<Box<HashingWriter<BufWriter<File>>>>,
    /// Bytes before this offset have been handed to writeback.
    writeback_from: u64,
}

impl BlobWriter {
    /// Flushes, fsyncs and renames the blob into place under its digest.
    pub fn commit(self) -> Result<(Digest, u64)> {
        self.commit_inner(None)
    }

    /// Like [`BlobWriter::commit`], but refuses (and discards the data) unless the content hashes
    /// to `expected`.
    pub fn commit_expecting(self, expected: &Digest) -> Result<(Digest, u64)> {
        self.commit_inner(Some(expected))
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.count())
    }

    fn commit_inner(mut self, expected: Option<&Digest>) -> Result<(Digest, u64)> {
        let result = self.try_commit(expected);
        if result.is_err() {
            // `inner` is gone, so Drop no longer removes the temp file: a refused or failed
            // commit must not leave it behind.
            let _ = fs::remove_file(&self.tmp_path);
        }
        result
    }

    fn try_commit(&mut self, expected: Option<&Digest>) -> Result<(Digest, u64)> {
        let Some(writer) = self.inner.take() else {
            return Err(StoreError::Io {
                action: "commit",
                path: self.tmp_path.clone(),
                source: io::Error::other("blob writer already finished"),
            });
        };
        let (digest, size, buffered) = (*writer).finish();
        let file = buffered
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx("write", &self.tmp_path)?;
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(StoreError::UnexpectedDigest {
                expected: expected.clone(),
                actual: digest,
            });
        }
        file.sync_all().ctx("fsync", &self.tmp_path)?;
        drop(file);
        let target = self.store.blob_path(&digest);
        // Renaming over an existing blob is harmless (same content) and heals a corrupt copy.
        fs::rename(&self.tmp_path, &target).ctx("rename into place", &target)?;
        sync_parent(&target)?;
        Ok((digest, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(w) = &mut self.inner else {
            return Err(io::Error::other("blob writer already finished"));
        };
        let n = w.write(buf)?;
        let written = w.count();
        if written - self.writeback_from >= WRITEBACK_CHUNK {
            w.get_mut().flush()?;
            // POSIX_FADV_DONTNEED starts asynchronous writeback of the range (and lets its
            // pages go once written: nothing re-reads a blob right after writing it). Only a
            // hint: the commit's fsync is what makes the data durable.
            let _ = rustix::fs::fadvise(
                w.get_ref().get_ref(),
                self.writeback_from,
                std::num::NonZeroU64::new(written - self.writeback_from),
                rustix::fs::Advice::DontNeed,
            );
            self.writeback_from = written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

/// Reads a blob while hashing it. At end of stream it checks the size and digest and returns an
/// `InvalidData` error naming the blob if either is wrong, so a consumer that reads to EOF can
/// never finish successfully on corrupt content. It also fails as soon as more bytes than the
/// expected size arrive.
pub struct VerifiedReader {
    digest: Digest,
    path: PathBuf,
    expected_size: Option<u64>,
    file: BufReader<File>,
    hasher: Sha256,
    count: u64,
    verified: bool,
}

impl VerifiedReader {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn size_mismatch(&self) -> StoreError {
        StoreError::SizeMismatch {
            digest: self.digest.clone(),
            path: self.path.clone(),
            expected: self.expected_size.unwrap_or_default(),
            actual: self.count,
        }
    }

    /// Reads the rest of the blob and verifies it; returns the blob's size.
    pub fn finish(mut self) -> Result<u64> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| unwrap_store_error(e, &self.path))?;
        Ok(self.count)
    }
}

impl Read for VerifiedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        if self
            .expected_size
            .is_some_and(|expected| self.count > expected)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                self.size_mismatch(),
            ));
        }
        if n == 0 && !buf.is_empty() && !self.verified {
            if self
                .expected_size
                .is_some_and(|expected| self.count != expected)
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    self.size_mismatch(),
                ));
            }
            let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
            if actual != self.digest {
                let err = StoreError::CorruptBlob {
                    digest: self.digest.clone(),
                    path: self.path.clone(),
                    actual,
                };
                return Err(io::Error::new(io::ErrorKind::InvalidData, err));
            }
            self.verified = true;
        }
        Ok(n)
    }
}

/// Turns an io::Error that carries a StoreError (from a VerifiedReader) back into it.
pub(crate) fn unwrap_store_error(e: io::Error, path: &std::path::Path) -> StoreError {
    if e.get_ref().is_some_and(|inner| inner.is::<StoreError>()) {
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<StoreError>()) {
            Some(Ok(store_error)) => return *store_error,
            Some(Err(other)) => {
                let source = io::Error::new(kind, other);
                return StoreError::Io {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                };
            }
            None => {}
        }
        let source = io::Error::from(kind);
        return StoreError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        };
    }
    StoreError::Io {
        action: "read",
        path: path.to_path_buf(),
        source: e,
    }
}

impl Store {
    /// Starts writing a new blob.
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        let (tmp_path, file) = tempfile_in(&self.tmp_dir())?;
        let guard = self.write_guard()?;
        Ok(BlobWriter {
            store: self.clone(),
            _guard: guard,
            tmp_path,
            inner: Some(Box::new(HashingWriter::new(BufWriter::with_capacity(
                IO_BUFFER, file,
            )))),
            writeback_from: 0,
        })
    }

    /// Stores `bytes` as a blob (a no-op if it is already present) and returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        if self.verify_blob(&digest, Some(bytes.len() as u64)).is_ok() {
            return Ok(digest);
        }
        let mut writer = self.blob_writer()?;
        writer.write_all(bytes).ctx("write", &writer.tmp_path)?;
        writer.commit_expecting(&digest)?;
        Ok(digest)
    }

    /// Stores `value` as canonical JSON; returns the digest, size and the exact bytes.
    pub fn put_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<(Digest, u64, Vec<u8>)> {
        let bytes = to_canonical_json(value)?;
        let digest = self.put_blob(&bytes)?;
        Ok((digest, bytes.len() as u64, bytes))
    }

    /// Opens a blob for a verified streaming read. `expected_size` comes from the descriptor
    /// that led here, when there is one.
    pub fn open_blob(&self, digest: &Digest, expected_size: Option<u64>) -> Result<VerifiedReader> {
        let path = self.blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob {
                    digest: digest.clone(),
                    path,
                });
            }
            Err(e) => return Err(e).ctx("open", path),
        };
        if let Some(expected) = expected_size {
            let actual = file.metadata().ctx("stat", &path)?.len();
            if actual != expected {
                return Err(StoreError::SizeMismatch {
                    digest: digest.clone(),
                    path,
                    expected,
                    actual,
                });
            }
        }
        Ok(VerifiedReader {
            digest: digest.clone(),
            path,
            expected_size,
            file: BufReader::with_capacity(IO_BUFFER, file),
            hasher: Sha256::default(),
            count: 0,
            verified: false,
        })
    }

    /// Reads a whole blob into memory, verified. For JSON documents, not layers.
    pub fn read_blob(&self, digest: &Digest, expected_size: Option<u64>) -> Result<Vec<u8>> {
        let mut reader = self.open_blob(digest, expected_size)?;
        let mut out = Vec::with_capacity(expected_size.unwrap_or(4096).min(1 << 24) as usize);
        let path = reader.path.clone();
        reader
            .read_to_end(&mut out)
            .map_err(|e| unwrap_store_error(e, &path))?;
        Ok(out)
    }

    /// Re-hashes one blob; returns its size.
    pub fn verify_blob(&self, digest: &Digest, expected_size: Option<u64>) -> Result<u64> {
        self.open_blob(digest, expected_size)?.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        (dir, store)
    }

    #[test]
    fn put_then_read_round_trips() {
        let (_d, s) = store();
        let digest = s.put_blob(b"hello").unwrap();
        assert_eq!(digest, Digest::of(b"hello"));
        assert_eq!(s.read_blob(&digest, Some(5)).unwrap(), b"hello");
        assert!(
            fs::read_dir(s.tmp_dir()).unwrap().next().is_none(),
            "temp file left behind"
        );
    }

    #[test]
    fn flipped_bit_is_reported_by_digest_and_path() {
        let (_d, s) = store();
        let digest = s.put_blob(b"hello world").unwrap();
        let path = s.blob_path(&digest);
        let mut bytes = fs::read(&path).unwrap();
        bytes[3] ^= 0x01;
        fs::write(&path, bytes).unwrap();
        let err = s.read_blob(&digest, Some(11)).unwrap_err();
        assert!(matches!(err, StoreError::CorruptBlob { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&digest.to_string()) && msg.contains(&path.display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn truncated_blob_is_a_size_mismatch_even_without_expected_size_when_hash_differs() {
        let (_d, s) = store();
        let digest = s.put_blob(b"hello world").unwrap();
        fs::write(s.blob_path(&digest), b"hello").unwrap();
        assert!(matches!(
            s.read_blob(&digest, Some(11)),
            Err(StoreError::SizeMismatch { .. })
        ));
        assert!(matches!(
            s.read_blob(&digest, None),
            Err(StoreError::CorruptBlob { .. })
        ));
    }

    #[test]
    fn missing_blob_is_named() {
        let (_d, s) = store();
        let digest = Digest::of(b"absent");
        let err = s.read_blob(&digest, None).unwrap_err();
        assert!(matches!(err, StoreError::MissingBlob { .. }));
        assert!(err.to_string().contains(&digest.to_string()));
    }

    #[test]
    fn uncommitted_writer_leaves_nothing() {
        let (_d, s) = store();
        let mut w = s.blob_writer().unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        assert!(fs::read_dir(s.tmp_dir()).unwrap().next().is_none());
        assert!(fs::read_dir(s.blobs_dir()).unwrap().next().is_none());
    }

    #[test]
    fn commit_expecting_refuses_other_content() {
        let (_d, s) = store();
        let mut w = s.blob_writer().unwrap();
        w.write_all(b"actual").unwrap();
        let err = w.commit_expecting(&Digest::of(b"expected")).unwrap_err();
        assert!(matches!(err, StoreError::UnexpectedDigest { .. }));
        assert!(!s.has_blob(&Digest::of(b"actual")));
        // Regression: the refused temp file used to stay in .imago/tmp until gc.
        assert!(fs::read_dir(s.tmp_dir()).unwrap().next().is_none());
    }
}

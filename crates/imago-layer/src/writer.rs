//! The reproducible layer writer.
//!
//! A layer's identity is the digest of its uncompressed tar (the diff_id) and the digest of the
//! compressed blob. Both must depend only on what the caller says each entry is, never on the
//! host: so every header is built here, explicitly, in one pinned format (GNU, with GNU long-name
//! records, which the `tar` crate writes with fixed fields), with one fixed mtime, the caller's
//! uid/gid and mode, empty user and group names, and no atime, ctime, device numbers or xattrs.
//! Entries must arrive sorted byte-wise by their tar name (directories end in `/`), which puts
//! parents before children; the writer checks that instead of sorting, so it never has to hold
//! the whole tree in memory.
//!
//! One pass, four threads joined by bounded channels of large chunks (see [`pipeline`]):
//! the caller frames the tar and reads file content straight into a chunk; a second thread
//! hashes the tar (the diff_id); a third compresses it (zstd adds its own workers); a fourth
//! hands the compressed bytes to the sink. The blob digest is the sink's business: a store's
//! blob writer hashes what it is given anyway. Wrap the sink in an `imago_oci::HashingWriter`
//! when nothing else hashes it.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use imago_oci::Digest;

use crate::compression::Compression;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(
        "layer entry {path:?} is out of order: entries must be sorted byte-wise and unique, and it follows {previous:?}"
    )]
    OutOfOrder { path: String, previous: String },
    #[error("invalid layer entry path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error(
        "{path}: expected {expected} bytes but the source ended after {found} (did it change while the layer was written?)"
    )]
    ShortRead {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error("writing layer entry {path:?}: {source}")]
    Entry { path: String, source: io::Error },
    #[error("finishing layer: {0}")]
    Finish(io::Error),
    #[error("starting compressor: {0}")]
    Compressor(io::Error),
}

/// Ownership and permission bits of one entry, exactly as they go into the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (0o7777 at most; the file type comes from
    /// the entry kind).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

/// What the writer produced (the blob's digest and size come from the sink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDigests {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub tar_size: u64,
}

/// Streams a reproducible layer into `W`.
pub struct LayerWriter<W: Write + Send + 'static> {
    // Declared before `stages`, so that on an early drop the stream is closed before the stages
    // are joined.
    tar: tar::Builder<pipeline::ChunkWriter>,
    stages: pipeline::Stages<W>,
    mtime: u64,
    previous: Option<Vec<u8>>,
}

impl<W: Write + Send + 'static> LayerWriter<W> {
    /// `mtime` is the one timestamp every entry gets (SOURCE_DATE_EPOCH or 0, whole seconds).
    pub fn new(sink: W, compression: Compression, mtime: u64) -> Result<Self, WriterError> {
        let (input, stages) =
            pipeline::start(sink, compression).map_err(WriterError::Compressor)?;
        let mut tar = tar::Builder::new(input);
        // Only matters for append_path*, which this writer never calls; set anyway so that no
        // future edit can pick up host metadata by accident.
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(LayerWriter {
            tar,
            stages,
            mtime,
            previous: None,
        })
    }

    /// Uncompressed tar bytes written so far (for progress reporting).
    pub fn tar_bytes(&self) -> u64 {
        self.tar.get_ref().count()
    }

    /// Adds a directory. `path` is relative to the image root, without a leading `/`; a trailing
    /// `/` is added if missing.
    pub fn add_dir(&mut self, path: &[u8], meta: Meta) -> Result<(), WriterError> {
        let name = self.check_order(path, true)?;
        let mut header = self.header(tar::EntryType::Directory, meta, 0);
        let result = self
            .tar
            .append_data(&mut header, as_path(&name), io::empty());
        result.map_err(|source| self.entry_error(&name, source))
    }

    /// Adds a regular file of exactly `size` bytes read from `content`. A source that ends early
    /// is an error: the header already announced `size`.
    pub fn add_file<R: Read>(
        &mut self,
        path: &[u8],
        meta: Meta,
        size: u64,
        content: R,
    ) -> Result<(), WriterError> {
        self.add_file_inspecting(path, meta, size, content, |_| {})
    }

    /// Like [`LayerWriter::add_file`], and shows every piece of the content to `inspect` as it
    /// goes into the layer, so that a caller can hash it without reading the file twice.
    pub fn add_file_inspecting<R: Read>(
        &mut self,
        path: &[u8],
        meta: Meta,
        size: u64,
        mut content: R,
        mut inspect: impl FnMut(&[u8]),
    ) -> Result<(), WriterError> {
        let name = self.check_order(path, false)?;
        let mut header = self.header(tar::EntryType::Regular, meta, size);
        // The header (and any long-name record) through the tar crate, with no data: its
        // `append` pads only what it copied. The content is then read straight into the
        // pipeline's chunks, without an intermediate buffer, and padded here.
        let written = self
            .tar
            .append_data(&mut header, as_path(&name), io::empty())
            .and_then(|()| {
                self.tar
                    .get_mut()
                    .fill_from(&mut content, size, &mut inspect)
            });
        let found = written.map_err(|source| self.entry_error(&name, source))?;
        if found < size {
            return Err(WriterError::ShortRead {
                path: lossy(&name),
                expected: size,
                found,
            });
        }
        let padding = (BLOCK - size % BLOCK) % BLOCK;
        let result = self
            .tar
            .get_mut()
            .write_all(&[0; BLOCK as usize][..padding as usize]);
        result.map_err(|source| self.entry_error(&name, source))
    }

    /// Adds a symbolic link (mode 0777, as every Linux symlink has).
    pub fn add_symlink(
        &mut self,
        path: &[u8],
        target: &[u8],
        uid: u64,
        gid: u64,
    ) -> Result<(), WriterError> {
        let name = self.check_order(path, false)?;
        let meta = Meta {
            mode: 0o777,
            uid,
            gid,
        };
        let mut header = self.header(tar::EntryType::Symlink, meta, 0);
        let result = self
            .tar
            .append_link(&mut header, as_path(&name), as_path(target));
        result.map_err(|source| self.entry_error(&name, source))
    }

    /// Adds a hard link to a regular file already written in this layer (by its path in the
    /// layer, without a leading `/`).
    pub fn add_hardlink(
        &mut self,
        path: &[u8],
        target: &[u8],
        meta: Meta,
    ) -> Result<(), WriterError> {
        let name = self.check_order(path, false)?;
        let mut header = self.header(tar::EntryType::Link, meta, 0);
        let result = self
            .tar
            .append_link(&mut header, as_path(&name), as_path(target));
        result.map_err(|source| self.entry_error(&name, source))
    }

    /// Writes the end-of-archive blocks, flushes the compressor and returns the digests and the
    /// sink.
    pub fn finish(self) -> Result<(LayerDigests, W), WriterError> {
        let LayerWriter {
            tar, mut stages, ..
        } = self;
        let closed = tar.into_inner().and_then(pipeline::ChunkWriter::finish);
        let joined = stages.join();
        // A stage's own error explains a failure to hand it the stream's end.
        let (hasher, tar_size, sink) = match (closed, joined) {
            (_, Err(e)) | (Err(e), Ok(_)) => return Err(WriterError::Finish(e)),
            (Ok(()), Ok(done)) => done,
        };
        let diff_id = Digest::from_hasher(hasher);
        Ok((LayerDigests { diff_id, tar_size }, sink))
    }

    fn header(&self, kind: tar::EntryType, meta: Meta, size: u64) -> tar::Header {
        // new_gnu zeroes every field: uname, gname, atime, ctime and device numbers stay empty.
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(meta.mode & 0o7777);
        header.set_uid(meta.uid);
        header.set_gid(meta.gid);
        header.set_mtime(self.mtime);
        header.set_size(size);
        header
    }

    /// The error for a failed write: if a stage stopped, its own error says why.
    fn entry_error(&mut self, name: &[u8], source: io::Error) -> WriterError {
        let source = if pipeline::is_stopped(&source) {
            self.stages.failure().unwrap_or(source)
        } else {
            source
        };
        WriterError::Entry {
            path: lossy(name),
            source,
        }
    }

    /// Validates `path`, normalises the directory slash and enforces strictly increasing order.
    fn check_order(&mut self, path: &[u8], dir: bool) -> Result<Vec<u8>, WriterError> {
        let invalid = |reason| WriterError::InvalidPath {
            path: lossy(path),
            reason,
        };
        let trimmed = path.strip_suffix(b"/").unwrap_or(path);
        if trimmed.is_empty() {
            return Err(invalid("empty path (the root directory is implied)"));
        }
        if trimmed.starts_with(b"/") {
            return Err(invalid("paths in a layer are relative to the image root"));
        }
        if trimmed.contains(&0) {
            return Err(invalid("contains a NUL byte"));
        }
        if trimmed
            .split(|b| *b == b'/')
            .any(|c| c.is_empty() || c == b"." || c == b"..")
        {
            return Err(invalid("empty, `.` or `..` component"));
        }
        let mut name = trimmed.to_vec();
        if dir {
            name.push(b'/');
        }
        if let Some(previous) = &self.previous
            && name.as_slice() <= previous.as_slice()
        {
            return Err(WriterError::OutOfOrder {
                path: lossy(&name),
                previous: lossy(previous),
            });
        }
        self.previous = Some(name.clone());
        Ok(name)
    }
}

const BLOCK: u64 = 512;

/// The order the writer requires: byte-wise on the tar name, where directories end in `/`.
pub fn entry_sort_key(path: &[u8], dir: bool) -> Vec<u8> {
    let mut key = path.strip_suffix(b"/").unwrap_or(path).to_vec();
    if dir {
        key.push(b'/');
    }
    key
}

fn as_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub mod pipeline {
    //! The stages of a layer, each on its own thread, joined by bounded channels of CHUNK-sized
    //! buffers:
    //!
    //! ```text
    //! caller: tar framing, file reads --> diff_id SHA-256 --> compressor --> sink
    //! ```
    //!
    //! On 2 cores, zstd's workers, the two SHA-256 passes (tar and blob), the content hashing of
    //! the caller and the file reads add up to more than one core of work besides compression;
    //! run one after the other on a single feeding thread, they leave zstd's workers waiting.
    //! Each stage keeps its own state (the hashers, the compressor) and sees the bytes in the
    //! same order as a single-threaded writer would, so the output is the same bytes; only the
    //! wall time changes. Buffers go back to their producer once used, so a layer of any size
    //! needs the same few megabytes.

    use std::io::{self, Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
    use std::thread::JoinHandle;

    use sha2::Digest as _;

    use crate::compression::{Compression, Compressor};

    /// Large enough that each hand-over between threads is cheap next to the work on it, and
    /// that a compressor job (2 MiB for zstd level 1) fills from two chunks.
    pub const CHUNK: usize = 1 << 20;
    /// Chunks queued between two stages. Memory is bounded by about 3 * (DEPTH + 2) chunks,
    /// whatever the layer size.
    const DEPTH: usize = 4;

    /// Why a stage stopped without an error of its own: the stage next to it failed or the
    /// writer was dropped.
    #[derive(Debug)]
    struct Stopped;

    impl std::fmt::Display for Stopped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("layer pipeline stopped")
        }
    }

    impl std::error::Error for Stopped {}

    fn stopped() -> io::Error {
        io::Error::other(Stopped)
    }

    pub(crate) fn is_stopped(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<Stopped>())
    }

    /// Fills CHUNK-sized buffers and hands each to the next stage when full.
    pub struct ChunkWriter {
        /// Always CHUNK bytes long (zeroed once when allocated); `pos` is how much is filled.
        buf: Vec<u8>,
        pos: usize,
        count: u64,
        tx: Option<SyncSender<Vec<u8>>>,
        /// Buffers the last stage that used them gave back.
        recycled: Receiver<Vec<u8>>,
        cancel: Arc<AtomicBool>,
    }

    impl ChunkWriter {
        fn new(
            tx: SyncSender<Vec<u8>>,
            recycled: Receiver<Vec<u8>>,
            cancel: Arc<AtomicBool>,
        ) -> ChunkWriter {
            ChunkWriter {
                buf: vec![0; CHUNK],
                pos: 0,
                count: 0,
                tx: Some(tx),
                recycled,
                cancel,
            }
        }

        /// Bytes written so far.
        pub fn count(&self) -> u64 {
            self.count
        }

        /// Reads up to `size` bytes of `source` straight into the chunks, showing each piece to
        /// `inspect`. Returns how many bytes there were: fewer than `size` if the source ended.
        pub fn fill_from(
            &mut self,
            source: &mut dyn Read,
            size: u64,
            inspect: &mut dyn FnMut(&[u8]),
        ) -> io::Result<u64> {
            let mut done = 0u64;
            while done < size {
                let want = (CHUNK - self.pos).min(usize::try_from(size - done).unwrap_or(CHUNK));
                let space = &mut self.buf[self.pos..self.pos + want];
                let n = match source.read(space) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                inspect(&space[..n]);
                self.pos += n;
                self.count += n as u64;
                done += n as u64;
                if self.pos == CHUNK {
                    self.send()?;
                }
            }
            Ok(done)
        }

        fn send(&mut self) -> io::Result<()> {
            if self.pos == 0 {
                return Ok(());
            }
            let mut next = self.recycled.try_recv().unwrap_or_else(|_| vec![0; CHUNK]);
            // A recycled buffer may come back shorter (the last chunk of a stream is cut to
            // its length); the zeroes only cover that cut-off tail.
            next.resize(CHUNK, 0);
            let mut full = std::mem::replace(&mut self.buf, next);
            full.truncate(self.pos);
            self.pos = 0;
            match &self.tx {
                Some(tx) => tx.send(full).map_err(|_| stopped()),
                None => Err(stopped()),
            }
        }

        /// Hands on the last, partial chunk and closes the stream.
        pub fn finish(mut self) -> io::Result<()> {
            let sent = self.send();
            self.tx = None;
            sent
        }
    }

    impl Drop for ChunkWriter {
        fn drop(&mut self) {
            // Closed without finish(): the stream is incomplete, so nothing downstream may
            // finish it as if it were whole. Set before the channel closes.
            if self.tx.is_some() {
                self.cancel.store(true, Ordering::SeqCst);
            }
        }
    }

    impl Write for ChunkWriter {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let n = (CHUNK - self.pos).min(data.len());
            self.buf[self.pos..self.pos + n].copy_from_slice(&data[..n]);
            self.pos += n;
            self.count += n as u64;
            if self.pos == CHUNK {
                self.send()?;
            }
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            // Flushing a compressor would force a block boundary and change the bytes; the
            // stream is complete only after finish() anyway.
            Ok(())
        }
    }

    type Join<T> = Option<JoinHandle<io::Result<T>>>;

    /// The threads behind a [`ChunkWriter`]: diff_id hashing, compression, the sink.
    pub struct Stages<W: Write + Send + 'static> {
        hash: Join<(imago_oci::Sha256, u64)>,
        compress: Join<()>,
        sink: Join<W>,
        cancel: Arc<AtomicBool>,
    }

    /// Starts the stages; the returned writer is their input.
    pub fn start<W: Write + Send + 'static>(
        sink: W,
        compression: Compression,
    ) -> io::Result<(ChunkWriter, Stages<W>)> {
        let cancel = Arc::new(AtomicBool::new(false));
        // Every buffer in flight fits in the way back, so none is ever dropped there.
        let (tar_tx, tar_rx) = sync_channel::<Vec<u8>>(DEPTH);
        let (hashed_tx, hashed_rx) = sync_channel::<Vec<u8>>(DEPTH);
        let (tar_back_tx, tar_back_rx) = sync_channel::<Vec<u8>>(2 * DEPTH + 4);
        let (out_tx, out_rx) = sync_channel::<Vec<u8>>(DEPTH);
        let (out_back_tx, out_back_rx) = sync_channel::<Vec<u8>>(DEPTH + 4);
        let input = ChunkWriter::new(tar_tx, tar_back_rx, cancel.clone());
        let output = ChunkWriter::new(out_tx, out_back_rx, cancel.clone());
        // Made here, so that a compressor that cannot start fails before any thread does.
        let mut compressor = Compressor::new(compression, output)?;

        let mut stages = Stages {
            hash: None,
            compress: None,
            sink: None,
            cancel: cancel.clone(),
        };
        let stop = cancel.clone();
        stages.sink = Some(spawn("imago-layer-sink", move || {
            let mut sink = sink;
            for chunk in out_rx {
                sink.write_all(&chunk)?;
                let _ = out_back_tx.try_send(chunk);
            }
            if stop.load(Ordering::SeqCst) {
                return Err(stopped());
            }
            sink.flush()?;
            Ok(sink)
        })?);
        let stop = cancel.clone();
        stages.compress = Some(spawn("imago-layer-zip", move || {
            for chunk in hashed_rx {
                compressor.write_all(&chunk)?;
                let _ = tar_back_tx.try_send(chunk);
            }
            if stop.load(Ordering::SeqCst) {
                return Err(stopped());
            }
            compressor.finish()?.finish()
        })?);
        stages.hash = Some(spawn("imago-layer-hash", move || {
            let mut hasher = imago_oci::Sha256::new();
            let mut size = 0u64;
            for chunk in tar_rx {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                hashed_tx.send(chunk).map_err(|_| stopped())?;
            }
            Ok((hasher, size))
        })?);
        Ok((input, stages))
    }

    fn spawn<T: Send + 'static>(
        name: &str,
        work: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<JoinHandle<io::Result<T>>> {
        std::thread::Builder::new().name(name.into()).spawn(work)
    }

    fn join<T>(handle: &mut Join<T>) -> io::Result<T> {
        match handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| io::Error::other("layer writer thread panicked"))?,
            None => Err(stopped()),
        }
    }

    impl<W: Write + Send + 'static> Stages<W> {
        /// Waits for every stage (their input must be closed) and returns the tar's hasher, its
        /// size and the sink. The error reported is the one furthest down the chain: a failing
        /// sink makes every stage before it stop.
        pub fn join(&mut self) -> io::Result<(imago_oci::Sha256, u64, W)> {
            let hash = join(&mut self.hash);
            let compress = join(&mut self.compress);
            let sink = join(&mut self.sink);
            match (hash, compress, sink) {
                (Ok((hasher, size)), Ok(()), Ok(sink)) => Ok((hasher, size, sink)),
                (h, c, s) => Err([s.err(), c.err(), h.err()]
                    .into_iter()
                    .flatten()
                    .find(|e| !is_stopped(e))
                    .unwrap_or_else(stopped)),
            }
        }

        /// After the input found the stages gone: joins them and returns the error that
        /// stopped them.
        pub(crate) fn failure(&mut self) -> Option<io::Error> {
            self.cancel.store(true, Ordering::SeqCst);
            self.join().err()
        }
    }

    impl<W: Write + Send + 'static> Drop for Stages<W> {
        fn drop(&mut self) {
            if self.hash.is_none() && self.compress.is_none() && self.sink.is_none() {
                return;
            }
            // Dropped unfinished (the input, dropped just before, has set `cancel` and closed
            // the stream): wait, so that the sink is dropped (a blob writer removes its temp
            // file) before the writer's owner goes on.
            self.cancel.store(true, Ordering::SeqCst);
            let _ = self.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
        }
    }

    fn sample(compression: Compression, mtime: u64) -> (LayerDigests, Vec<u8>) {
        let mut w = LayerWriter::new(Vec::new(), compression, mtime).unwrap();
        w.add_dir(b"etc", meta(0o755)).unwrap();
        w.add_file(b"etc/hostname", meta(0o644), 6, &b"imago\n"[..])
            .unwrap();
        let long = format!("usr/{}", "x".repeat(150));
        w.add_dir(b"usr/", meta(0o755)).unwrap();
        w.add_symlink(long.as_bytes(), "y".repeat(120).as_bytes(), 1, 2)
            .unwrap();
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        w.add_file(b"usr/z", meta(0o4755), big.len() as u64, &big[..])
            .unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn headers_are_explicit_and_deterministic() {
        let (digests, bytes) = sample(Compression::None, 1_700_000_000);
        assert_eq!(digests.diff_id, Digest::of(&bytes));
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            assert_eq!(h.mtime().unwrap(), 1_700_000_000);
            assert_eq!(h.username_bytes(), Some(&b""[..]));
            assert_eq!(h.groupname_bytes(), Some(&b""[..]));
            let gnu = h.as_gnu().unwrap();
            assert_eq!(gnu.atime, [0; 12]);
            assert_eq!(gnu.ctime, [0; 12]);
            seen.push((
                String::from_utf8(entry.path_bytes().to_vec()).unwrap(),
                h.mode().unwrap(),
                h.uid().unwrap(),
            ));
        }
        let long = format!("usr/{}", "x".repeat(150));
        assert_eq!(
            seen,
            vec![
                ("etc/".to_string(), 0o755, 0),
                ("etc/hostname".to_string(), 0o644, 0),
                ("usr/".to_string(), 0o755, 0),
                (long, 0o777, 1),
                ("usr/z".to_string(), 0o4755, 0),
            ]
        );
    }

    #[test]
    fn same_entries_give_same_digests_for_every_compression() {
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let (a, abytes) = sample(c, 0);
            let (b, bbytes) = sample(c, 0);
            assert_eq!(a, b);
            assert_eq!(abytes, bbytes);
            let mut tar = Vec::new();
            crate::compression::decompress(c, &abytes[..])
                .unwrap()
                .read_to_end(&mut tar)
                .unwrap();
            assert_eq!(Digest::of(&tar), a.diff_id);
        }
        // the mtime is part of the identity
        assert_ne!(
            sample(Compression::None, 0).0,
            sample(Compression::None, 1).0
        );
    }

    /// Golden digests of the sample layer: a change in header layout or in a compressor fails here.
    #[test]
    fn sample_layer_digests_are_pinned() {
        let (none, _) = sample(Compression::None, 0);
        let (_, gz) = sample(Compression::Gzip, 0);
        // The threaded gzip path gives exactly the bytes of the plain compressor.
        let (_, tar) = sample(Compression::None, 0);
        let mut plain = crate::compression::Compressor::new(Compression::Gzip, Vec::new()).unwrap();
        plain.write_all(&tar).unwrap();
        assert_eq!(plain.finish().unwrap(), gz);
        assert_eq!(none.diff_id.to_string(), GOLDEN_TAR);
        assert_eq!(Digest::of(&gz).to_string(), GOLDEN_GZIP);
    }

    const GOLDEN_TAR: &str =
        "sha256:75167ef03c03b60632afaefb0fc9807fd38e63f6232cacc2dc72b7d8dcae44a9";
    const GOLDEN_GZIP: &str =
        "sha256:eae781cc0c6e90c81452a61a6d85a8403236beed0aee3af03a8186d89d63a3b4";

    /// A layer of several zstd jobs (about 7 MB of tar) and many small files: pins the bytes of
    /// the threaded pipeline for both compressors, so a change in how the stream is cut, hashed or
    /// handed between threads cannot change a digest unnoticed.
    fn large_sample(compression: Compression) -> (LayerDigests, Vec<u8>) {
        let mut w = LayerWriter::new(Vec::new(), compression, 1_700_000_000).unwrap();
        w.add_dir(b"data", meta(0o755)).unwrap();
        for i in 0..300u32 {
            let content: Vec<u8> = (0..(i * 37 % 5000))
                .map(|j| (j * i % 13) as u8 + b'a')
                .collect();
            let name = format!("data/f{i:04}");
            w.add_file(
                name.as_bytes(),
                meta(0o644),
                content.len() as u64,
                &content[..],
            )
            .unwrap();
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let big: Vec<u8> = (0..6_500_000u32)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if i % 3 == 0 {
                    (state % 251) as u8
                } else {
                    (i / 1000 % 256) as u8
                }
            })
            .collect();
        w.add_file(b"data/zz-big", meta(0o600), big.len() as u64, &big[..])
            .unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn large_layer_digests_are_pinned() {
        let (tar_digests, tar) = large_sample(Compression::None);
        assert_eq!(tar_digests.diff_id, Digest::of(&tar));
        for (c, golden) in [
            (Compression::Gzip, GOLDEN_LARGE_GZIP),
            (Compression::Zstd, GOLDEN_LARGE_ZSTD),
        ] {
            let (digests, blob) = large_sample(c);
            assert_eq!(digests, tar_digests, "{c:?}");
            let mut plain = crate::compression::Compressor::new(c, Vec::new()).unwrap();
            plain.write_all(&tar).unwrap();
            assert_eq!(plain.finish().unwrap(), blob, "{c:?}");
            assert_eq!(Digest::of(&blob).to_string(), golden, "{c:?}");
        }
        assert_eq!(tar_digests.diff_id.to_string(), GOLDEN_LARGE_TAR);
    }

    const GOLDEN_LARGE_TAR: &str =
        "sha256:c13dfcce0ce86e07cb775d156fc8bbff021ae59c01f9af8c165cdc0aecfd5015";
    const GOLDEN_LARGE_GZIP: &str =
        "sha256:085dda7af38efe7a819493b4649b0d2a1072d41fbbc757ea171aed2ab8557284";
    const GOLDEN_LARGE_ZSTD: &str =
        "sha256:0786809bdef1b14f0f139ec15d3257647c7f0850ab05757afcf092bd4567831d";

    /// The compressed bytes depend only on the data, never on how it was cut into writes.
    #[test]
    fn compressed_bytes_do_not_depend_on_write_sizes() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        for c in [Compression::Gzip, Compression::Zstd] {
            let mut one = crate::compression::Compressor::new(c, Vec::new()).unwrap();
            one.write_all(&data).unwrap();
            let one = one.finish().unwrap();
            // Through the pipeline's chunking (1 MiB pieces from writes of 511 bytes).
            let mut input = pipeline::start(Vec::new(), c).unwrap();
            for chunk in data.chunks(511) {
                input.0.write_all(chunk).unwrap();
            }
            input.0.finish().unwrap();
            let (_, _, many) = input.1.join().unwrap();
            let mut small = crate::compression::Compressor::new(c, Vec::new()).unwrap();
            for chunk in data.chunks(4093) {
                small.write_all(chunk).unwrap();
            }
            let small = small.finish().unwrap();
            assert_eq!(Digest::of(&one), Digest::of(&many), "{c:?}");
            assert_eq!(Digest::of(&one), Digest::of(&small), "{c:?}");
        }
    }

    #[test]
    fn rejects_unsorted_duplicate_and_escaping_paths() {
        let mut w = LayerWriter::new(Vec::new(), Compression::None, 0).unwrap();
        w.add_dir(b"b", meta(0o755)).unwrap();
        assert!(matches!(
            w.add_dir(b"a", meta(0o755)),
            Err(WriterError::OutOfOrder { .. })
        ));
        assert!(matches!(
            w.add_dir(b"b", meta(0o755)),
            Err(WriterError::OutOfOrder { .. })
        ));
        for bad in [&b"/abs"[..], b"c/../d", b"", b"c//d", b"./c"] {
            assert!(matches!(
                w.add_dir(bad, meta(0o755)),
                Err(WriterError::InvalidPath { .. })
            ));
        }
    }

    #[test]
    fn short_source_is_an_error() {
        let mut w = LayerWriter::new(Vec::new(), Compression::Gzip, 0).unwrap();
        let err = w.add_file(b"f", meta(0o644), 10, &b"abc"[..]).unwrap_err();
        assert!(
            matches!(err, WriterError::ShortRead { found: 3, .. }),
            "{err}"
        );
    }

    /// A sink that fails: the error reaches the caller, and nothing is left running.
    #[test]
    fn a_failing_sink_is_reported() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let big = vec![7u8; 3 * pipeline::CHUNK];
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut w = LayerWriter::new(Full, c, 0).unwrap();
            let mut failed = None;
            for i in 0..64 {
                let name = format!("f{i:03}");
                if let Err(e) = w.add_file(name.as_bytes(), meta(0o644), big.len() as u64, &big[..])
                {
                    failed = Some(e);
                    break;
                }
            }
            let err = match failed {
                Some(e) => e,
                None => w.finish().err().unwrap(),
            };
            assert!(err.to_string().contains("disk full"), "{c:?}: {err}");
        }
    }

    /// Dropping an unfinished writer stops its threads without finishing the sink's stream.
    #[test]
    fn an_unfinished_writer_does_not_finish_its_sink() {
        struct Sink(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
        }
        let flushed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut w = LayerWriter::new(Sink(flushed.clone()), Compression::Zstd, 0).unwrap();
        w.add_file(b"f", meta(0o644), 5, &b"hello"[..]).unwrap();
        drop(w);
        assert!(!flushed.load(std::sync::atomic::Ordering::SeqCst));
        let w = LayerWriter::new(Sink(flushed.clone()), Compression::Zstd, 0).unwrap();
        w.finish().unwrap();
        assert!(flushed.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn sort_key_puts_parents_before_children() {
        let mut keys = [
            entry_sort_key(b"a/b", false),
            entry_sort_key(b"a.txt", false),
            entry_sort_key(b"a", true),
            entry_sort_key(b"a-b", false),
        ];
        keys.sort();
        let pos = |k: &[u8]| keys.iter().position(|x| x == k).unwrap();
        assert!(pos(b"a/") < pos(b"a/b"));
    }
}

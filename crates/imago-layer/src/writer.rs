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
//! One pass: tar bytes -> diff_id hasher -> compressor -> sink. Compression (and, for zstd, the
//! diff_id hash) runs on a worker thread (see [`pipe`]) so that reading files and framing the tar
//! overlap with it. The blob digest is the sink's business: a store's blob writer hashes what it
//! is given anyway, and hashing the same bytes twice costs about 5% of a zstd build. Wrap the sink
//! in an `imago_oci::HashingWriter` when nothing else hashes it.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use imago_oci::Digest;

use crate::compression::{Compression, Compressor};

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

/// tar -> (worker thread:) diff_id hasher -> compressor -> sink.
type Inner<W> = DiffHash<pipe::Pipe<DiffHash<Compressor<W>>>>;

/// Hashes the tar (the diff_id) on whichever side of the thread boundary has room: exactly one
/// of the two `DiffHash` layers in a chain hashes, the other passes bytes through.
struct DiffHash<W> {
    inner: W,
    hasher: Option<imago_oci::Sha256>,
    count: u64,
}

impl<W> DiffHash<W> {
    fn new(inner: W, hashing: bool) -> Self {
        use sha2::Digest as _;
        DiffHash {
            inner,
            hasher: hashing.then(imago_oci::Sha256::new),
            count: 0,
        }
    }
}

impl<W: Write> Write for DiffHash<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams a reproducible layer into `W`.
pub struct LayerWriter<W: Write + Send + 'static> {
    tar: tar::Builder<Inner<W>>,
    mtime: u64,
    previous: Option<Vec<u8>>,
}

impl<W: Write + Send + 'static> LayerWriter<W> {
    /// `mtime` is the one timestamp every entry gets (SOURCE_DATE_EPOCH or 0, whole seconds).
    pub fn new(sink: W, compression: Compression, mtime: u64) -> Result<Self, WriterError> {
        let compressor = Compressor::new(compression, sink).map_err(WriterError::Compressor)?;
        // Hashing the tar and compressing it run on a second thread, so that they overlap with
        // reading files and framing the tar here. Without compression there is too little work
        // to share.
        let threaded = compression != Compression::None;
        // gzip is one deflate stream on the worker thread, the slowest stage: hash the tar here.
        // zstd compresses on its own workers, which leaves the feeding thread the room.
        let hash_in_worker = compression == Compression::Zstd;
        let worker_side = DiffHash::new(compressor, hash_in_worker);
        let pipe = pipe::Pipe::new(worker_side, threaded).map_err(WriterError::Compressor)?;
        let mut tar = tar::Builder::new(DiffHash::new(pipe, !hash_in_worker));
        // Only matters for append_path*, which this writer never calls; set anyway so that no
        // future edit can pick up host metadata by accident.
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(LayerWriter {
            tar,
            mtime,
            previous: None,
        })
    }

    /// Uncompressed tar bytes written so far (for progress reporting).
    pub fn tar_bytes(&self) -> u64 {
        self.tar.get_ref().count
    }

    /// Adds a directory. `path` is relative to the image root, without a leading `/`; a trailing
    /// `/` is added if missing.
    pub fn add_dir(&mut self, path: &[u8], meta: Meta) -> Result<(), WriterError> {
        let name = self.check_order(path, true)?;
        let mut header = self.header(tar::EntryType::Directory, meta, 0);
        self.tar
            .append_data(&mut header, as_path(&name), io::empty())
            .map_err(|source| entry_error(&name, source))
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
        let name = self.check_order(path, false)?;
        let mut header = self.header(tar::EntryType::Regular, meta, size);
        let mut reader = ExactReader {
            inner: content.take(size),
            count: 0,
            expected: size,
            short: false,
        };
        let result = self
            .tar
            .append_data(&mut header, as_path(&name), &mut reader);
        if reader.short {
            return Err(WriterError::ShortRead {
                path: lossy(&name),
                expected: size,
                found: reader.count,
            });
        }
        result.map_err(|source| entry_error(&name, source))
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
        self.tar
            .append_link(&mut header, as_path(&name), as_path(target))
            .map_err(|source| entry_error(&name, source))
    }

    /// Adds a hard link to an entry already written (by its path in the layer).
    pub fn add_hardlink(
        &mut self,
        path: &[u8],
        target: &[u8],
        meta: Meta,
    ) -> Result<(), WriterError> {
        let name = self.check_order(path, false)?;
        let mut header = self.header(tar::EntryType::Link, meta, 0);
        self.tar
            .append_link(&mut header, as_path(&name), as_path(target))
            .map_err(|source| entry_error(&name, source))
    }

    /// Writes the end-of-archive blocks, flushes the compressor and returns the digests and the
    /// sink.
    pub fn finish(self) -> Result<(LayerDigests, W), WriterError> {
        let outer = self.tar.into_inner().map_err(WriterError::Finish)?;
        let tar_size = outer.count;
        let inner = outer.inner.finish().map_err(WriterError::Finish)?;
        let hasher = outer
            .hasher
            .or(inner.hasher)
            .ok_or_else(|| WriterError::Finish(io::Error::other("no tar hasher")))?;
        let diff_id = Digest::from_hasher(hasher);
        let sink = inner.inner.finish().map_err(WriterError::Finish)?;
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

fn entry_error(name: &[u8], source: io::Error) -> WriterError {
    WriterError::Entry {
        path: lossy(name),
        source,
    }
}

/// Fails instead of returning a short stream: the header already announced `expected` bytes, and
/// a tar whose data is shorter than its header is corrupt.
struct ExactReader<R> {
    inner: io::Take<R>,
    count: u64,
    expected: u64,
    short: bool,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if n == 0 && !buf.is_empty() && self.count < self.expected {
            self.short = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file is shorter than its size",
            ));
        }
        Ok(n)
    }
}

pub mod pipe {
    //! Runs the tail of a writer chain on its own thread. The bytes and their order are exactly
    //! those of the inline path, so the output is identical; only the wall time changes.

    use std::io::{self, Write};
    use std::sync::mpsc::{SyncSender, sync_channel};
    use std::thread::JoinHandle;

    const CHUNK: usize = 256 * 1024;
    /// Chunks in flight: bounds memory to about CHUNK * (DEPTH + 2) whatever the layer size.
    const DEPTH: usize = 8;

    /// A writer that is either `T` itself or `T` running on a worker thread fed in CHUNK-sized
    /// pieces through a bounded channel.
    pub enum Pipe<T: Write + Send + 'static> {
        Inline(T, u64),
        Threaded(Threaded<T>),
    }

    pub struct Threaded<T: Write + Send + 'static> {
        buf: Vec<u8>,
        count: u64,
        tx: Option<SyncSender<Vec<u8>>>,
        worker: Option<JoinHandle<io::Result<T>>>,
    }

    impl<T: Write + Send + 'static> Pipe<T> {
        pub fn new(inner: T, threaded: bool) -> io::Result<Self> {
            if !threaded {
                return Ok(Pipe::Inline(inner, 0));
            }
            let (tx, rx) = sync_channel::<Vec<u8>>(DEPTH);
            let mut inner = inner;
            let worker = std::thread::Builder::new()
                .name("imago-layer".into())
                .spawn(move || {
                    for chunk in rx {
                        inner.write_all(&chunk)?;
                    }
                    Ok(inner)
                })?;
            Ok(Pipe::Threaded(Threaded {
                buf: Vec::with_capacity(CHUNK),
                count: 0,
                tx: Some(tx),
                worker: Some(worker),
            }))
        }

        /// Bytes written so far.
        pub fn count(&self) -> u64 {
            match self {
                Pipe::Inline(_, n) => *n,
                Pipe::Threaded(t) => t.count,
            }
        }

        /// Hands everything to `T` and returns it (not flushed or finished: that is the
        /// caller's, who knows what `T` is).
        pub fn finish(self) -> io::Result<T> {
            match self {
                Pipe::Inline(inner, _) => Ok(inner),
                Pipe::Threaded(mut t) => {
                    t.send_buf()?;
                    t.join()
                }
            }
        }
    }

    impl<T: Write + Send + 'static> Threaded<T> {
        fn send_buf(&mut self) -> io::Result<()> {
            if self.buf.is_empty() {
                return Ok(());
            }
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            let sent = match &self.tx {
                Some(tx) => tx.send(chunk).is_ok(),
                None => false,
            };
            if sent {
                Ok(())
            } else {
                // The worker stopped early: its own error is the one worth reporting.
                Err(self
                    .join()
                    .err()
                    .unwrap_or_else(|| io::Error::other("layer writer thread stopped")))
            }
        }

        fn join(&mut self) -> io::Result<T> {
            self.tx = None;
            match self.worker.take() {
                Some(worker) => worker
                    .join()
                    .map_err(|_| io::Error::other("layer writer thread panicked"))?,
                None => Err(io::Error::other("layer writer thread already finished")),
            }
        }
    }

    impl<T: Write + Send + 'static> Write for Pipe<T> {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            match self {
                Pipe::Inline(inner, count) => {
                    let n = inner.write(data)?;
                    *count += n as u64;
                    Ok(n)
                }
                Pipe::Threaded(t) => {
                    let room = CHUNK - t.buf.len();
                    let n = room.min(data.len());
                    t.buf.extend_from_slice(&data[..n]);
                    t.count += n as u64;
                    if t.buf.len() == CHUNK {
                        t.send_buf()?;
                    }
                    Ok(n)
                }
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            // Flushing a compressor would force a block boundary and change the bytes; the
            // stream is complete only after finish() anyway.
            Ok(())
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
            let threaded = crate::compression::Compressor::new(c, Vec::new()).unwrap();
            let mut many = pipe::Pipe::new(threaded, true).unwrap();
            for chunk in data.chunks(511) {
                many.write_all(chunk).unwrap();
            }
            let many = many.finish().unwrap().finish().unwrap();
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

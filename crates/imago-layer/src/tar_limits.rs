//! A bound on the tar records that the `tar` crate reads whole into memory.
//!
//! Before it yields an entry, the `tar` crate reads the GNU long-name (`L`) and long-link (`K`)
//! records and the PAX extended header (`x`) that describe it into a `Vec`, as large as their
//! headers say, whatever that is. A layer of a few megabytes of compressed zeros can so claim a
//! long name of many gigabytes and make the reader allocate all of it. [`ExtensionLimit`] sits
//! between the decompressed stream and `tar::Archive`, follows the archive's framing exactly as
//! the `tar` crate does (PAX `size` overrides, GNU sparse extension blocks, the end at the first
//! zero block) and fails the read that brings the header of such a record when it is larger
//! than [`MAX_EXTENSION_SIZE`], before any of its data is read. Go's `archive/tar`, which Docker,
//! containerd and the registries use, has the same bound, so an archive they read passes.

use std::io::{self, Read};

/// The largest GNU long-name/long-link record or PAX extended header accepted (Go's
/// `archive/tar` `maxSpecialFileSize`).
pub const MAX_EXTENSION_SIZE: u64 = 1 << 20;

const BLOCK: usize = 512;
/// Byte offset of a GNU sparse extension block's `isextended` flag.
const SPARSE_EXT_FLAG: usize = 504;

/// A reader that passes a tar stream through unchanged and fails when it carries an extension
/// record larger than [`MAX_EXTENSION_SIZE`]. The error (`InvalidData`) names the record's kind,
/// its size and its position in the stream.
pub struct ExtensionLimit<R> {
    inner: R,
    /// Bytes read so far: the position of the next byte in the tar stream.
    offset: u64,
    header: [u8; BLOCK],
    filled: usize,
    /// Entry data (with padding) still to pass before the next header.
    data_left: u64,
    /// The data of a PAX extended header being passed, kept to find its `size` record.
    pax: Option<(Vec<u8>, u64)>,
    /// `size` from the last PAX header, for the next entry that is not an extension record.
    pending_size: Option<u64>,
    /// GNU sparse extension blocks follow; then `sparse_data` bytes of data.
    sparse_ext: bool,
    sparse_data: u64,
    /// Past the end-of-archive marker (or a header `tar` refuses): nothing more to frame.
    done: bool,
}

impl<R: Read> ExtensionLimit<R> {
    pub fn new(inner: R) -> ExtensionLimit<R> {
        ExtensionLimit {
            inner,
            offset: 0,
            header: [0; BLOCK],
            filled: 0,
            data_left: 0,
            pax: None,
            pending_size: None,
            sparse_ext: false,
            sparse_data: 0,
            done: false,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Follows the framing over `bytes`, which start at `self.offset`.
    fn scan(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() && !self.done {
            if self.data_left > 0 {
                let take = usize::try_from(self.data_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                if let Some((data, want)) = &mut self.pax {
                    let keep = usize::try_from(*want).unwrap_or(usize::MAX).min(take);
                    data.extend_from_slice(&bytes[..keep]);
                    *want -= keep as u64;
                }
                self.data_left -= take as u64;
                self.offset += take as u64;
                bytes = &bytes[take..];
                if self.data_left == 0
                    && let Some((data, _)) = self.pax.take()
                {
                    self.pending_size = pax_size(&data);
                }
                continue;
            }
            let take = (BLOCK - self.filled).min(bytes.len());
            self.header[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            self.offset += take as u64;
            bytes = &bytes[take..];
            if self.filled == BLOCK {
                self.filled = 0;
                self.block()?;
            }
        }
        Ok(())
    }

    /// A whole block where a header (or a sparse extension block) is expected.
    fn block(&mut self) -> io::Result<()> {
        if self.sparse_ext {
            // Another block follows only for a flag of exactly 1, as the `tar` crate reads it
            // (`GnuExtSparseHeader::is_extended`): any other value ends the blocks there.
            self.sparse_ext = self.header[SPARSE_EXT_FLAG] == 1;
            if !self.sparse_ext {
                self.data_left = self.sparse_data;
            }
            return Ok(());
        }
        // The `tar` crate stops at the first zero block; what follows is read only to be hashed.
        if self.header.iter().all(|&b| b == 0) {
            self.done = true;
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(&self.header);
        let kind = header.entry_type();
        let Ok(header_size) = header.entry_size() else {
            // The `tar` crate fails on this header too.
            self.done = true;
            return Ok(());
        };
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        let extension = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        // Records the `tar` crate reads into memory itself; anything else it yields as an entry,
        // which ends what a PAX header described.
        let buffered = recognized
            && (kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions());
        let size = match self.pending_size {
            Some(size) if !extension => size,
            _ => header_size,
        };
        if !buffered {
            self.pending_size = None;
        }
        if buffered && size > MAX_EXTENSION_SIZE {
            let what = if kind.is_pax_local_extensions() {
                "PAX extended header"
            } else if kind.is_gnu_longname() {
                "GNU long name record"
            } else {
                "GNU long link record"
            };
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{what} at byte {} is {size} bytes, more than the {MAX_EXTENSION_SIZE} allowed",
                    self.offset - BLOCK as u64
                ),
            ));
        }
        if buffered && kind.is_pax_local_extensions() {
            self.pax = Some((Vec::with_capacity(size as usize), size));
        }
        let Some(padded) = size
            .checked_add(BLOCK as u64 - 1)
            .map(|s| s & !(BLOCK as u64 - 1))
        else {
            self.done = true;
            return Ok(());
        };
        let sparse_extended =
            kind.is_gnu_sparse() && header.as_gnu().is_some_and(|g| g.is_extended());
        if sparse_extended {
            self.sparse_ext = true;
            self.sparse_data = padded;
        } else {
            self.data_left = padded;
            if padded == 0
                && let Some((data, _)) = self.pax.take()
            {
                self.pending_size = pax_size(&data);
            }
        }
        Ok(())
    }
}

/// The first `size` record of a PAX header, read as the `tar` crate reads it.
fn pax_size(data: &[u8]) -> Option<u64> {
    for extension in tar::PaxExtensions::new(data) {
        let extension = extension.ok()?;
        if extension.key() != Ok("size") {
            continue;
        }
        return extension.value().ok()?.parse().ok();
    }
    None
}

impl<R: Read> Read for ExtensionLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, size: u64, name: &str) -> [u8; BLOCK] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_path(name).ok();
        h.set_mode(0o644);
        h.set_cksum();
        let mut out = [0; BLOCK];
        out.copy_from_slice(h.as_bytes());
        out
    }

    fn read_all(bytes: &[u8], chunk: usize) -> io::Result<u64> {
        let mut limit = ExtensionLimit::new(bytes);
        let mut buf = vec![0; chunk];
        let mut total = 0;
        loop {
            let n = limit.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    }

    #[test]
    fn large_files_pass_and_large_long_names_fail_at_any_read_size() {
        let mut ok = Vec::new();
        ok.extend_from_slice(&header(tar::EntryType::Regular, 3 << 20, "big"));
        ok.resize(ok.len() + (3 << 20), 0x4c);
        // A header-looking block inside the data is data.
        ok[BLOCK..2 * BLOCK].copy_from_slice(&header(tar::EntryType::GNULongName, 1 << 40, "x"));
        ok.extend_from_slice(&header(tar::EntryType::GNULongName, 5000, "././@LongLink"));
        ok.resize(ok.len() + 5120, b'a');
        ok.extend_from_slice(&header(tar::EntryType::Regular, 0, "aaaa"));
        ok.resize(ok.len() + 2 * BLOCK, 0);
        // Garbage after the end marker is not framed.
        ok.extend_from_slice(&header(tar::EntryType::GNULongName, 1 << 40, "y"));

        // A PAX `size` frames the next entry: the header's own size (0) is not the data's.
        let mut pax = header(tar::EntryType::XHeader, 13, "PaxHeaders/f").to_vec();
        pax.extend_from_slice(b"13 size=1024\n");
        pax.resize(2 * BLOCK, 0);
        pax.extend_from_slice(&header(tar::EntryType::Regular, 0, "f"));
        pax.extend_from_slice(&header(tar::EntryType::GNULongName, 1 << 40, "data"));
        pax.extend_from_slice(&[0; BLOCK]);
        let mut pax_then_bomb = pax.clone();
        pax.resize(pax.len() + 2 * BLOCK, 0);
        pax_then_bomb.extend_from_slice(&header(tar::EntryType::XHeader, 1 << 30, "P"));
        pax_then_bomb.resize(pax_then_bomb.len() + 8 * BLOCK, b'7');

        let mut bad = header(tar::EntryType::GNULongName, MAX_EXTENSION_SIZE + 1, "L").to_vec();
        bad.resize(bad.len() + 4 * BLOCK, 0x61);
        for chunk in [1, 7, 512, 513, 1 << 20] {
            assert_eq!(read_all(&ok, chunk).ok(), Some(ok.len() as u64), "{chunk}");
            let err = read_all(&bad, chunk).expect_err("too large");
            assert!(
                err.to_string().contains("GNU long name record at byte 0"),
                "{err}"
            );
            assert_eq!(
                read_all(&pax, chunk).ok(),
                Some(pax.len() as u64),
                "{chunk}"
            );
            let err = read_all(&pax_then_bomb, chunk).expect_err("too large");
            assert!(
                err.to_string().contains("PAX extended header at byte 2560"),
                "{err}"
            );
        }
    }

    /// A GNU sparse entry whose extension block's flag is 2: the `tar` crate reads no further
    /// extension block (its flag test is `== 1`), so the next header comes after one block of
    /// data; a limiter that took any non-zero flag for "extended" took that data block for an
    /// extension block and the bomb header for data, and let the bomb through.
    #[test]
    fn a_sparse_extension_flag_other_than_one_ends_the_extension_blocks_as_tar_reads_it() {
        let mut sparse = tar::Header::new_gnu();
        sparse.set_entry_type(tar::EntryType::GNUSparse);
        sparse.set_size(BLOCK as u64);
        sparse.set_path("holes").ok();
        sparse.set_mode(0o644);
        if let Some(gnu) = sparse.as_gnu_mut() {
            gnu.isextended[0] = 1;
        }
        sparse.set_cksum();
        assert!(sparse.as_gnu().is_some_and(|g| g.is_extended()));
        let mut archive = sparse.as_bytes().to_vec();
        let mut extension = [0u8; BLOCK];
        extension[SPARSE_EXT_FLAG] = 2;
        archive.extend_from_slice(&extension);
        // The entry's one block of data (zeros: read as an extension block, its flag is 0).
        archive.extend_from_slice(&[0; BLOCK]);
        archive.extend_from_slice(&header(tar::EntryType::GNULongName, 1 << 40, "bomb"));
        archive.resize(archive.len() + 4 * BLOCK, b'x');
        for chunk in [1, 512, 4096] {
            let err = read_all(&archive, chunk).expect_err("the bomb after a sparse entry");
            assert!(
                err.to_string()
                    .contains(&format!("GNU long name record at byte {}", 3 * BLOCK)),
                "{err}"
            );
        }
    }

    fn pad(out: &mut Vec<u8>) {
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }

    /// Archives with GNU long names, PAX `size` records that override a header size of 0 and
    /// files of every size class pass unchanged at any read size; a bomb header put at any
    /// entry boundary of them is caught there.
    #[test]
    fn generated_archives_pass_and_a_bomb_at_any_boundary_is_caught() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        for round in 0..40 {
            let mut tar = Vec::new();
            let mut boundaries = vec![0usize];
            for _ in 0..1 + next(8) {
                let size = [0u64, 1, 511, 512, 513, 70_000][next(6) as usize];
                if next(2) == 0 {
                    let name = "n".repeat(100 + next(300) as usize);
                    tar.extend_from_slice(&header(
                        tar::EntryType::GNULongName,
                        name.len() as u64 + 1,
                        "././@LongLink",
                    ));
                    tar.extend_from_slice(name.as_bytes());
                    tar.push(0);
                    pad(&mut tar);
                }
                let mut header_size = size;
                if next(2) == 0 {
                    let body = format!(" size={size}\n");
                    let mut len = body.len() + 1;
                    while len.to_string().len() + body.len() != len {
                        len += 1;
                    }
                    let record = format!("{len}{body}");
                    tar.extend_from_slice(&header(
                        tar::EntryType::XHeader,
                        record.len() as u64,
                        "pax",
                    ));
                    tar.extend_from_slice(record.as_bytes());
                    pad(&mut tar);
                    header_size = 0;
                }
                tar.extend_from_slice(&header(tar::EntryType::Regular, header_size, "f"));
                // Data that looks like a bomb's header where a misframed reader would look.
                let mut data = vec![0x4c; size as usize];
                if size >= 1024 {
                    data[512..1024].copy_from_slice(&header(tar::EntryType::XHeader, 1 << 40, "d"));
                }
                tar.extend_from_slice(&data);
                pad(&mut tar);
                boundaries.push(tar.len());
            }
            let mut whole = tar.clone();
            whole.resize(whole.len() + 2 * BLOCK, 0);
            for chunk in [1, 100, 512, 4096, 65_536] {
                assert_eq!(
                    read_all(&whole, chunk).ok(),
                    Some(whole.len() as u64),
                    "round {round} chunk {chunk}"
                );
            }
            let at = boundaries[next(boundaries.len() as u64) as usize];
            let mut bombed = tar[..at].to_vec();
            bombed.extend_from_slice(&header(tar::EntryType::GNULongName, 1 << 33, "L"));
            bombed.resize(bombed.len() + 4 * BLOCK, 0);
            let err = read_all(&bombed, 1 + next(9000) as usize).expect_err("bomb");
            assert!(
                err.to_string().contains(&format!("at byte {at} ")),
                "round {round}: {err}"
            );
        }
    }
}

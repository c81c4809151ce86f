//! The compressors imago uses for layer blobs, pinned so that the same tar always gives the same
//! compressed bytes (see ../shared/design/reproducibility.md): gzip through flate2's pure-Rust
//! miniz_oxide backend, zstd through the bundled libzstd in multithreaded mode.

use std::io::{self, BufRead, BufReader, Read, Write};

use imago_oci::media;

/// gzip level used for layers: 1 is the fast setting that `gzip -1` users expect.
pub const GZIP_LEVEL: u32 = 1;
/// zstd level used for layers.
pub const ZSTD_LEVEL: i32 = 1;
/// zstd worker threads. Multithreaded mode gives the same bytes for any worker count >= 1, while
/// single-threaded mode (0) differs, so this must never be 0.
pub const ZSTD_WORKERS: u32 = 2;

/// Names and versions of the pinned compressors, recorded in image annotations.
pub const GZIP_IMPLEMENTATION: &str = "flate2-1.1.11+miniz_oxide";
pub const ZSTD_IMPLEMENTATION: &str = "zstd-0.14.4";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The OCI layer media type for a tar compressed this way.
    pub fn layer_media_type(self) -> &'static str {
        match self {
            Compression::None => media::OCI_LAYER_TAR,
            Compression::Gzip => media::OCI_LAYER_GZIP,
            Compression::Zstd => media::OCI_LAYER_ZSTD,
        }
    }

    /// The compression a layer media type declares, if it is a layer type imago understands.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        media::layer_compression(media_type).map(|c| match c {
            media::LayerCompression::None => Compression::None,
            media::LayerCompression::Gzip => Compression::Gzip,
            media::LayerCompression::Zstd => Compression::Zstd,
        })
    }

    /// Recognises a stream by its first bytes (gzip and zstd magic numbers); anything else is
    /// taken as an uncompressed tar.
    pub fn sniff(prefix: &[u8]) -> Compression {
        if prefix.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// Pinned compressor name and version, for the image annotation.
    pub fn implementation(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => GZIP_IMPLEMENTATION,
            Compression::Zstd => ZSTD_IMPLEMENTATION,
        }
    }
}

/// Wraps `inner` in the decompressor for `compression`.
pub fn decompress<'a, R: Read + 'a>(
    compression: Compression,
    inner: R,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(inner),
        // MultiGzDecoder: some tools write layers as several concatenated gzip members.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 20,
            inner,
        ))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(inner)?),
    })
}

/// Peeks at the first bytes of `inner` and wraps it in the matching decompressor.
pub fn decompress_sniffed<'a, R: Read + 'a>(
    inner: R,
) -> io::Result<(Compression, Box<dyn Read + 'a>)> {
    let mut buffered = BufReader::with_capacity(1 << 20, inner);
    let compression = Compression::sniff(buffered.fill_buf()?);
    Ok((compression, decompress(compression, buffered)?))
}

/// A compressing writer; `finish` must be called to write the trailer and get `inner` back.
pub enum Compressor<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Compressor<W> {
    pub fn new(compression: Compression, inner: W) -> io::Result<Compressor<W>> {
        Ok(match compression {
            Compression::None => Compressor::None(inner),
            // GzBuilder writes mtime 0, no file name and a fixed OS byte: the header never varies.
            Compression::Gzip => Compressor::Gzip(
                flate2::GzBuilder::new().write(inner, flate2::Compression::new(GZIP_LEVEL)),
            ),
            Compression::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(inner, ZSTD_LEVEL)?;
                encoder.multithread(ZSTD_WORKERS)?;
                encoder.include_checksum(true)?;
                Compressor::Zstd(encoder)
            }
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressor::None(w) => Ok(w),
            Compressor::Gzip(e) => e.finish(),
            Compressor::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::None(w) => w.write(buf),
            Compressor::Gzip(e) => e.write(buf),
            Compressor::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::None(w) => w.flush(),
            Compressor::Gzip(e) => e.flush(),
            Compressor::Zstd(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imago_oci::Digest;

    fn round_trip(c: Compression, data: &[u8]) -> Vec<u8> {
        let mut w = Compressor::new(c, Vec::new()).unwrap();
        w.write_all(data).unwrap();
        let compressed = w.finish().unwrap();
        assert_eq!(
            Compression::sniff(&compressed),
            if data.is_empty() && c == Compression::None {
                Compression::None
            } else {
                c
            }
        );
        let mut out = Vec::new();
        {
            let (sniffed, mut r) = decompress_sniffed(&compressed[..]).unwrap();
            assert_eq!(sniffed, c);
            r.read_to_end(&mut out).unwrap();
        }
        assert_eq!(out, data);
        compressed
    }

    #[test]
    fn every_compression_round_trips() {
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            round_trip(c, &data);
        }
    }

    /// Golden digests: if a dependency update changes compressed bytes, this fails instead of
    /// every image digest silently changing.
    #[test]
    fn compressed_bytes_are_pinned() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 97).to_le_bytes())
            .collect();
        let gz = round_trip(Compression::Gzip, &data);
        let zst = round_trip(Compression::Zstd, &data);
        assert_eq!(Digest::of(&gz).to_string(), GOLDEN_GZIP);
        assert_eq!(Digest::of(&zst).to_string(), GOLDEN_ZSTD);
    }

    const GOLDEN_GZIP: &str =
        "sha256:968fbff6bd55a90e48d991c98b51cadcf91adca6beebe27f14997d77adab2559";
    const GOLDEN_ZSTD: &str =
        "sha256:cebd0596b3d93243a46bae12ae69e12c7d0dab86b5c17f45c3ebdd33810b09e0";
}

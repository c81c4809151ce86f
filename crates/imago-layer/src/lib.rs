//! Layer tar streams: the pinned compressors, the reproducible layer writer and the safe
//! unpacker that applies layers (with OCI whiteouts) to a directory.
//!
//! Invariants: the writer never reads the clock, the host's user database or the umask; the
//! unpacker never creates, changes or removes anything outside the directory it was given.
#![forbid(unsafe_code)]

pub mod compression;
pub mod tar_limits;
pub mod unpack;
pub mod writer;

pub use compression::Compression;

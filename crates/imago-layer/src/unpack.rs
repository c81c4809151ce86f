//! Applying layer tar streams to a directory.
//!
//! Placeholder with the final API; the real unpacker lands from the `layer-unpack` branch.

use std::io::Read;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct UnpackOptions {
    pub preserve_ownership: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            preserve_ownership: rustix::process::geteuid().is_root(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ApplyStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("applying layers into {0} is not available in this build")]
    Unavailable(String),
}

pub fn apply_layer(
    _tar: impl Read,
    root: &Path,
    _opts: &UnpackOptions,
) -> Result<ApplyStats, UnpackError> {
    Err(UnpackError::Unavailable(root.display().to_string()))
}

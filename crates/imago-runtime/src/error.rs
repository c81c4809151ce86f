use std::path::PathBuf;

use imago_oci::Digest;

/// Everything that can go wrong while launching, supervising or removing an instance.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    CanonicalJson(#[from] imago_oci::CanonicalJsonError),
    #[error("image {digest} not found: {reason}")]
    ImageNotFound { digest: Digest, reason: String },
    #[error("image {digest}: {reason}")]
    InvalidImage { digest: Digest, reason: String },
    #[error("layer {layer} of image {image}: {reason}")]
    CorruptLayer {
        image: Digest,
        layer: Digest,
        reason: String,
    },
    /// A seccomp profile file that cannot be used.
    #[error("seccomp profile {path}: {reason}")]
    SeccompProfile { path: PathBuf, reason: String },
    /// A precompiled seccomp filter (or its rules in a bundle) that cannot be used.
    #[error("seccomp filter {path}: {reason}")]
    SeccompFilter { path: PathBuf, reason: String },
    #[error("invalid instance spec: {0}")]
    InvalidSpec(String),
    /// A named volume that cannot be used or removed as asked.
    #[error("{0}")]
    Volume(String),
    #[error("no such instance {0}")]
    NoSuchInstance(String),
    #[error("instance {id} is {status}: {reason}")]
    WrongState {
        id: String,
        status: String,
        reason: &'static str,
    },
    #[error("network setup for instance {id}: {reason}")]
    Network { id: String, reason: String },
    #[error("no free instance address left in {0}")]
    AddressesExhausted(String),
    #[error("instance {id} failed to start: {reason}")]
    StartFailed { id: String, reason: String },
    #[error("instance {id}: supervisor: {reason}")]
    Supervisor { id: String, reason: String },
    #[error("container {id}: {reason}")]
    Engine { id: String, reason: String },
    #[error("instance {id} did not stop within {secs} s")]
    StopTimeout { id: String, secs: u64 },
    /// The init binary an instance with `init` runs as PID 1 is not usable on this host.
    #[error(
        "the instance init {path}: {reason} (install Debian's tini package, point IMAGO_INIT at a static init, or turn init off)"
    )]
    InitMissing { path: PathBuf, reason: String },
}

impl RuntimeError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> RuntimeError {
        let path = path.into();
        move |source| RuntimeError::Io {
            action,
            path,
            source,
        }
    }
}

impl From<imago_spec::VolumeError> for RuntimeError {
    fn from(error: imago_spec::VolumeError) -> Self {
        RuntimeError::InvalidSpec(error.0)
    }
}

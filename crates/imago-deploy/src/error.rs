use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("service {service}: {field} {reason}")]
    InvalidService {
        service: String,
        field: String,
        reason: String,
    },
    /// A TLS certificate or key file that cannot be used.
    #[error("tls file {}: {reason}", path.display())]
    Tls {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A definition file's services, as read and checked by imago-spec.
    #[error(transparent)]
    Spec(#[from] imago_spec::SpecError),
    /// `user` says what expects the port: "the health check probes", "instances are expected on".
    #[error("service {service}: {user} port {port}, but image {image} listens on {exposed}")]
    PortNotExposed {
        service: String,
        user: &'static str,
        port: u16,
        image: String,
        /// The TCP ports the image declares, comma-separated.
        exposed: String,
    },
    /// Another process listens where the service's endpoint must: a fault of the host, not of
    /// the definition. `holder` is "pid 123 (nc)" when /proc shows who, else "another process".
    #[error("service {service}: port {addr} is already in use by {holder}")]
    PortInUse {
        service: String,
        addr: std::net::SocketAddr,
        holder: String,
    },
    #[error(transparent)]
    Store(#[from] imago_store::StoreError),
    #[error("state database {path}: {source}")]
    Database {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "state database {path} was written by a newer imago (schema {found}, this build knows {known})"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("service {0} has no release")]
    NoRelease(String),
    #[error("no deployed service {0}")]
    NoService(String),
    #[error(
        "service {service} runs on the {engine} target {target}: its rollouts cannot be paused \
         (the Docker API lets no client pause a service update; the engine would roll on while \
         imago showed it paused); nothing was recorded"
    )]
    PauseUnsupported {
        service: String,
        engine: String,
        target: String,
    },
    #[error("service {service} has no release {number}")]
    UnknownRelease { service: String, number: u64 },
    #[error("service {0} has no earlier completed release to roll back to")]
    NothingToRollBackTo(String),
    /// A rollback's target pins an image that gc has since removed.
    #[error(
        "service {service}: release {number} pins image {digest}, which is no longer in the store"
    )]
    ImageGone {
        service: String,
        number: u64,
        digest: imago_oci::Digest,
    },
    #[error("runtime: {0}")]
    Runtime(String),
    #[error(transparent)]
    Engine(#[from] imago_spec::cluster::EngineError),
    #[error("service {service}: target {target} (engine {engine}) has no engine in this build")]
    NoEngine {
        service: String,
        target: String,
        engine: &'static str,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a controller already runs for {}", home.display())]
    ControllerRunning { home: PathBuf },
    #[error("the controller did not start: {reason}; see {}", log.display())]
    ControllerDidNotStart { log: PathBuf, reason: String },
    #[error("controller {pid} did not stop within 10 s")]
    ControllerDidNotStop { pid: u32 },
    #[error("data plane {}: {message}", socket.display())]
    DataPlane { socket: PathBuf, message: String },
}

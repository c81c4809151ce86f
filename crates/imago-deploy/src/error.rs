use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("service {service}: {field} {reason}")]
    InvalidService {
        service: String,
        field: String,
        reason: String,
    },
    #[error("services {first} and {second} both publish port {port}")]
    PortConflict {
        port: u16,
        first: String,
        second: String,
    },
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
    #[error("service {service} has no release {number}")]
    UnknownRelease { service: String, number: u64 },
    #[error("runtime: {0}")]
    Runtime(String),
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
}

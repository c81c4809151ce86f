use std::path::PathBuf;

/// What is wrong with a definition file's services. Every error names the file and where in
/// it, or the service and its field.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
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
    #[error("services {first} and {second} cannot share {address}: {reason}")]
    SharedAddress {
        address: String,
        first: String,
        second: String,
        reason: String,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    ServiceTable {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("service {service}: {key} cannot be honoured by engine {engine}: {reason}")]
    UnsupportedOnEngine {
        service: String,
        key: String,
        engine: &'static str,
        reason: String,
    },
    #[error("{}:{line}:{column}: target {name}: {reason}", path.display())]
    InvalidTarget {
        path: PathBuf,
        line: usize,
        column: usize,
        name: String,
        reason: String,
    },
    #[error("{}:{line}:{column}: no target {name}; the file defines: {defined}", path.display())]
    UnknownTarget {
        path: PathBuf,
        line: usize,
        column: usize,
        name: String,
        /// The targets the file defines, comma-separated (or "none").
        defined: String,
    },
    #[error("{} defines no service ([service.NAME] tables)", path.display())]
    NoServices { path: PathBuf },
    #[error("{} has no service {service}; it defines: {defined}", path.display())]
    UnknownService {
        path: PathBuf,
        service: String,
        /// The services the file defines, comma-separated.
        defined: String,
    },
}

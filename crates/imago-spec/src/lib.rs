//! The `[service.NAME]` tables of `imago.toml`: what a service is, as the user wrote it, read
//! with the file's line and column in every error, and checked as far as that can be done
//! without the store or the runtime. The deployment layer (imago-deploy) turns a checked spec
//! into the runtime's instance spec; this crate knows nothing of the runtime, so that the
//! parser can be fuzzed (fuzz/fuzz_targets/service_file.rs) without linking a container engine.
#![forbid(unsafe_code)]

pub mod cluster;
mod error;
mod parse;
mod service;
pub mod step;
mod target;
mod volume;

pub use error::SpecError;
pub use parse::{line_column, parse_services, parse_services_for};
pub use service::*;
pub use target::{
    DEFAULT_DOCKER_ENDPOINT, EngineKind, ResolvedTarget, TargetRef, TargetSpec, target_json_schema,
};
pub use volume::{VolumeError, VolumeMount, VolumeSource, validate_volume_name};

//! Deployments: services pinned to releases (image digest + full configuration), health-gated
//! rollouts, rollback and drift. The decisions are pure functions of recorded desired state and
//! observed instances; the state lives in SQLite.
#![forbid(unsafe_code)]

pub mod actions;
pub mod api;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod drift;
pub mod error;
pub mod health;
pub mod lock_holder;
pub mod metrics;
pub mod plan;
pub mod proxy;
pub mod rollout;
pub mod roots;
pub mod router;
pub mod services;
pub mod spec;
pub mod state;
pub mod status;

pub use error::DeployError;
/// The cluster engine seam (imago-spec's), for the binary that links the engines.
pub use imago_spec::cluster;

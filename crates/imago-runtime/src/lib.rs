//! Local infrastructure: launches isolated container instances from an image digest.
//!
//! Code map: [`spec`] (what an instance runs and its hash), [`provider`] (the engine-neutral
//! trait and an in-memory fake), [`rootfs`] (the unpack-once rootfs cache), [`bundle`] (the OCI
//! runtime config), [`seccomp`] (the syscall filter), [`seccomp_cache`] (the filter compiled once and loaded as BPF by the embedded engine), [`network`] (namespaces, veth pairs, address leases), [`supervisor`] (the
//! per-instance process that owns a container), [`local`] (the provider built from all of it),
//! [`state`] (atomic per-instance records), [`volumes`] (named, host and anonymous volumes), [`store_source`] (images from the imago store).
//!
//! This crate prints nothing; it returns data and errors.
#![deny(unsafe_code)]

pub mod balancer;
pub mod bundle;
pub mod error;
pub mod forward;
pub mod local;
pub mod network;
pub mod provider;
pub mod rootfs;
pub mod rootfs_check;
pub mod sandbox;
pub mod seccomp;
pub mod seccomp_cache;
pub mod spec;
pub mod state;
pub mod store_source;
pub mod supervisor;
pub mod volumes;

pub use error::RuntimeError;
pub use local::{Layout, LocalProvider, SupervisorCommand, Swept};
pub use provider::{FakeProvider, Provider};
pub use rootfs::{ImageInfo, ImageSource, RootfsCache};
pub use seccomp::Seccomp;
pub use spec::{
    Engine, InstanceSpec, NetworkMode, Resources, VolumeMount, VolumeSource, parse_cpus,
    parse_memory,
};
pub use state::{Instance, Status};
pub use store_source::StoreImageSource;
pub use volumes::{MountedVolume, NamedVolume, VolumeKind};

//! The Kubernetes engine: where a target says `engine = "kubernetes"`, a release of a service
//! (its spec, release number, configuration hash and image pinned by digest) becomes a
//! Deployment and a Service ([`render`]), printed byte-stable for GitOps ([`render_yaml`]),
//! applied with server-side apply under the field manager `imago`, and followed through the
//! Deployment's status to imago's outcomes ([`KubeEngine`]). [`KubeCluster`] is the same
//! engine behind imago-spec's `ClusterEngine` trait, which imago-deploy's controller drives. A failed rollout is undone by
//! applying the last complete release's kept objects again; drift is the live objects compared
//! with the rendered ones on the fields imago renders.
//!
//! imago never becomes a cluster: the scheduler, the ReplicaSets and the pods are the engine's.
//! What is imago's stays imago's: immutable releases, the decision that a rollout failed, and
//! the rollback of image and configuration together.
//!
//! This crate prints nothing: progress goes to the caller's callback.
#![forbid(unsafe_code)]

mod cluster;
mod drift;
mod engine;
mod error;
mod quantity;
mod render;
mod rollout;
mod yaml;

pub use cluster::{Applied, FIELD_MANAGER, KubeEngine, KubeTarget, LiveRelease};
pub use drift::{Drift, compare, network_defaults};
pub use engine::{DEFAULT_NAMESPACE, KubeCluster, render_service};
pub use error::KubeError;
pub use render::{
    ANNOTATION_CONFIG_HASH, LABEL_CONFIG, LABEL_MANAGED_BY, LABEL_NAME, LABEL_RELEASE,
    LABEL_REVISION, MANAGED_BY, PinnedImage, ReleaseInput, RenderedRelease, STOP_MARGIN_SECONDS,
    render, selector_labels, selector_text,
};
pub use rollout::{PROGRESS_DEADLINE_EXCEEDED, RolloutState, RolloutStatus, judge};
pub use yaml::render_yaml;

/// The API types, at the one Kubernetes version imago is built against.
pub use k8s_openapi;

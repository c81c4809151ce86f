use std::path::PathBuf;

/// Everything that can go wrong between a service spec and a cluster. Errors name the service,
/// the `imago.toml` key, the kubeconfig file or the object (`Deployment shop/web`).
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// A service key whose meaning Kubernetes cannot give: refused at plan time, never dropped.
    #[error("service {service}: {key} cannot be honoured by kubernetes: {reason}")]
    Unsupported {
        service: String,
        key: String,
        reason: String,
    },
    /// A value that is not valid for any engine (the spec's own `validate` normally catches it).
    #[error("service {service}: {key} {reason}")]
    InvalidValue {
        service: String,
        key: String,
        reason: String,
    },
    #[error("reading kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "loading the kubernetes client configuration{}: {source}",
        context_text(context)
    )]
    ClientConfig {
        context: Option<String>,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A request to the API server failed; `action` is what imago was doing.
    #[error("kubernetes {action} {object}: {source}")]
    Api {
        action: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },
    /// An object of the release's name exists and carries no imago labels: imago never takes
    /// over what it did not create.
    #[error("{object} exists and was not created by imago")]
    NotOurs { object: String },
    /// The server's watch stream reported an error imago cannot recover from.
    #[error("watching {object}: the server answered {code} {reason}: {message}")]
    WatchStatus {
        object: String,
        code: u16,
        reason: String,
        message: String,
    },
    /// A volume claim the pods mount is missing: the rollout would wait on it until its
    /// deadline, so apply refuses first.
    #[error(
        "service {service}: volume {claim} needs the PersistentVolumeClaim {namespace}/{claim}, which does not exist (create it; imago does not size storage)"
    )]
    MissingVolumeClaim {
        service: String,
        namespace: String,
        claim: String,
    },
    #[error("rendered objects of service {service}: {source}")]
    Encode {
        service: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("rendered objects of service {service} as yaml: {reason}")]
    Yaml { service: String, reason: String },
}

fn context_text(context: &Option<String>) -> String {
    context
        .as_deref()
        .map(|c| format!(" (context {c})"))
        .unwrap_or_default()
}

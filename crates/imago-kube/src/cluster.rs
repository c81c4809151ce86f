//! The API server side: server-side apply under the field manager `imago`, the rollout watch,
//! rollback by re-applying a kept release, drift and delete.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::Serialize;
use tokio::time::Instant;

use crate::KubeError;
use crate::drift::{Drift, compare, network_defaults};
use crate::render::{
    LABEL_MANAGED_BY, LABEL_NAME, LABEL_RELEASE, MANAGED_BY, RenderedRelease, selector_text,
};
use crate::rollout::{RolloutState, RolloutStatus, judge};

/// The field manager of every apply: what `kubectl` shows as owning imago's fields.
pub const FIELD_MANAGER: &str = "imago";

/// Where a target's objects go: `[target.NAME]` with `engine = "kubernetes"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeTarget {
    /// The kubeconfig file; `None` reads `$KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context; `None` is its current context.
    pub context: Option<String>,
    pub namespace: String,
}

/// What one apply left on the server: the generation whose rollout to watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub service: String,
    pub namespace: String,
    pub release: u64,
    pub generation: i64,
}

/// A service's Deployment as the server has it, for a controller that restarts mid-rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveRelease {
    pub release: u64,
    pub generation: i64,
    pub status: RolloutStatus,
}

/// A connection to one cluster, in one namespace.
#[derive(Clone)]
pub struct KubeEngine {
    client: Client,
    namespace: String,
}

impl std::fmt::Debug for KubeEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeEngine")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// Consecutive failed watch requests after which the API server counts as unreachable.
const WATCH_ATTEMPTS: u32 = 5;

/// The pause before the next watch after `failures` failed ones in a row: 100 ms, doubling.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(50 << failures.min(5))
}

impl KubeEngine {
    /// Reads the kubeconfig (its context's cluster, user and TLS settings) and makes a client.
    /// No request is sent yet.
    pub async fn connect(target: &KubeTarget) -> Result<KubeEngine, KubeError> {
        let options = KubeConfigOptions {
            context: target.context.clone(),
            ..KubeConfigOptions::default()
        };
        let client_config = |source: kube::config::KubeconfigError| KubeError::ClientConfig {
            context: target.context.clone(),
            source: Box::new(source),
        };
        let config = match &target.kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
                Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(client_config)?
            }
            None => Config::from_kubeconfig(&options)
                .await
                .map_err(client_config)?,
        };
        let client = Client::try_from(config).map_err(|source| KubeError::ClientConfig {
            context: target.context.clone(),
            source: Box::new(source),
        })?;
        Ok(KubeEngine {
            client,
            namespace: target.namespace.clone(),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn object(&self, kind: &str, name: &str) -> String {
        format!("{kind} {}/{name}", self.namespace)
    }

    fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Applies a release's objects (server-side apply, field manager `imago`, forced: imago's
    /// fields are imago's). The Service goes first, so that the first ready pod is reachable;
    /// a Service of an earlier release that this one no longer has is deleted.
    pub async fn apply(&self, rendered: &RenderedRelease) -> Result<Applied, KubeError> {
        let name = rendered.service.as_str();
        let namespace = rendered.namespace.as_str();
        let object = |kind: &str| format!("{kind} {namespace}/{name}");
        let services: Api<Service> = self.api(namespace);
        let deployments: Api<Deployment> = self.api(namespace);
        // Forced apply would take over any field of an object of the same name: refuse one
        // that imago did not create.
        for (live, kind) in [
            (
                get(&services, name, &object("Service"))
                    .await?
                    .map(|s| is_managed(&s)),
                "Service",
            ),
            (
                get(&deployments, name, &object("Deployment"))
                    .await?
                    .map(|d| is_managed(&d)),
                "Deployment",
            ),
        ] {
            if live == Some(false) {
                return Err(KubeError::NotOurs {
                    object: object(kind),
                });
            }
        }
        let claims: Api<PersistentVolumeClaim> = self.api(namespace);
        for claim in &rendered.volume_claims {
            let claim_object = format!("PersistentVolumeClaim {namespace}/{claim}");
            if get(&claims, claim, &claim_object).await?.is_none() {
                return Err(KubeError::MissingVolumeClaim {
                    service: name.to_owned(),
                    namespace: namespace.to_owned(),
                    claim: claim.clone(),
                });
            }
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match &rendered.endpoint {
            Some(endpoint) => {
                services
                    .patch(name, &params, &Patch::Apply(endpoint))
                    .await
                    .map_err(|source| KubeError::Api {
                        action: "apply",
                        object: object("Service"),
                        source,
                    })?;
            }
            None => {
                delete_if_managed(&services, name, &object("Service")).await?;
            }
        }
        let applied = deployments
            .patch(name, &params, &Patch::Apply(&rendered.deployment))
            .await
            .map_err(|source| KubeError::Api {
                action: "apply",
                object: object("Deployment"),
                source,
            })?;
        Ok(Applied {
            service: name.to_owned(),
            namespace: namespace.to_owned(),
            release: rendered.release,
            generation: applied.metadata.generation.unwrap_or(0),
        })
    }

    /// Rolls back to a release that completed before: its kept objects are applied again as
    /// they were, so the Deployment's pods go back to that image and configuration together
    /// (not `kubectl rollout undo`, which knows nothing of imago's releases).
    pub async fn rollback(&self, last_complete: &RenderedRelease) -> Result<Applied, KubeError> {
        self.apply(last_complete).await
    }

    /// The service's Deployment as it is now, judged as the rollout of the release it carries;
    /// `None` when there is no Deployment.
    pub async fn live_release(&self, service: &str) -> Result<Option<LiveRelease>, KubeError> {
        let Some(live) = self.deployment(service).await? else {
            return Ok(None);
        };
        let release = live
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.as_ref())
            .and_then(|l| l.get(LABEL_RELEASE))
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0);
        let generation = live.metadata.generation.unwrap_or(0);
        Ok(Some(LiveRelease {
            release,
            generation,
            status: judge(&live, release, generation),
        }))
    }

    /// Follows the Deployment until its rollout of `applied` completes or fails, or `limit`
    /// passes (then the last status, still in progress, is returned: imago's own deadline).
    /// A watch the server ends or drops is resumed from the last resourceVersion seen; a
    /// version the server no longer has (410 Gone) is replaced by a fresh GET.
    /// `on_change` sees every status that differs from the one before.
    pub async fn watch_rollout(
        &self,
        applied: &Applied,
        limit: Duration,
        on_change: &mut (dyn FnMut(&RolloutStatus) + Send),
    ) -> Result<RolloutStatus, KubeError> {
        let deadline = Instant::now() + limit;
        let name = applied.service.as_str();
        let object = format!("Deployment {}/{name}", applied.namespace);
        let deployments: Api<Deployment> = self.api(&applied.namespace);
        let fetch = || get(&deployments, name, &object);
        let deleted = |last: Option<&RolloutStatus>| RolloutStatus {
            state: RolloutState::Failed {
                reason: "Deleted".into(),
                message: format!("{object} was deleted during the rollout"),
            },
            ..last.cloned().unwrap_or(RolloutStatus {
                release: applied.release,
                generation: applied.generation,
                observed_generation: 0,
                replicas: 0,
                updated: 0,
                ready: 0,
                available: 0,
                state: RolloutState::Complete,
            })
        };
        let mut last: Option<RolloutStatus> = None;
        let mut observe = |deployment: &Deployment, last: &mut Option<RolloutStatus>| {
            let status = judge(deployment, applied.release, applied.generation);
            if last.as_ref() != Some(&status) {
                on_change(&status);
                *last = Some(status.clone());
            }
            status
        };
        // A failed watch request or a broken stream: counted, and after a pause that doubles
        // while it keeps failing before any event arrives, the watch is resumed.
        let retry = |failures: &mut u32, source: kube::Error| {
            *failures += 1;
            if *failures >= WATCH_ATTEMPTS {
                return Err(KubeError::Api {
                    action: "watch",
                    object: object.clone(),
                    source,
                });
            }
            Ok(backoff(*failures))
        };
        let mut version = String::new();
        let mut failures = 0u32;
        let selector = format!("metadata.name={name}");
        // A fresh GET first, and again whenever the server no longer has the version the
        // watch would resume from (410 Gone): the rollout is judged from now on.
        let mut relist = true;
        loop {
            if relist {
                relist = false;
                let Some(current) = fetch().await? else {
                    return Ok(deleted(last.as_ref()));
                };
                version = current
                    .metadata
                    .resource_version
                    .clone()
                    .unwrap_or_default();
                let status = observe(&current, &mut last);
                if status.state.is_finished() {
                    return Ok(status);
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(last.clone().unwrap_or_else(|| deleted(None)));
            }
            // The server closes a watch after timeoutSeconds; imago asks for no more than it
            // will wait, and resumes if the server closes it sooner.
            let params = WatchParams::default()
                .fields(&selector)
                .timeout(u32::try_from(remaining.as_secs().clamp(1, 290)).unwrap_or(290));
            let stream =
                match tokio::time::timeout(remaining, deployments.watch(&params, &version)).await {
                    Err(_) => continue,
                    Ok(Ok(stream)) => stream,
                    Ok(Err(kube::Error::Api(status))) if status.code == 410 => {
                        relist = true;
                        continue;
                    }
                    Ok(Err(source)) => {
                        tokio::time::sleep(retry(&mut failures, source)?).await;
                        continue;
                    }
                };
            futures::pin_mut!(stream);
            loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let event = match tokio::time::timeout(remaining, stream.next()).await {
                    Err(_) => break,
                    // The server ended the watch (its timeout, a restart): resume from
                    // `version`.
                    Ok(None) => break,
                    Ok(Some(Err(source))) => {
                        tokio::time::sleep(retry(&mut failures, source)?).await;
                        break;
                    }
                    Ok(Some(Ok(event))) => event,
                };
                failures = 0;
                match event {
                    WatchEvent::Added(deployment) | WatchEvent::Modified(deployment) => {
                        if let Some(v) = &deployment.metadata.resource_version {
                            version.clone_from(v);
                        }
                        let status = observe(&deployment, &mut last);
                        if status.state.is_finished() {
                            return Ok(status);
                        }
                    }
                    WatchEvent::Deleted(_) => return Ok(deleted(last.as_ref())),
                    WatchEvent::Bookmark(bookmark) => {
                        version = bookmark.metadata.resource_version;
                    }
                    WatchEvent::Error(status) if status.code == 410 => {
                        relist = true;
                        break;
                    }
                    WatchEvent::Error(status) => {
                        return Err(KubeError::WatchStatus {
                            object: object.clone(),
                            code: status.code,
                            reason: status.reason,
                            message: status.message,
                        });
                    }
                }
            }
        }
    }

    /// The service's Deployment, as the server has it.
    pub async fn deployment(&self, service: &str) -> Result<Option<Deployment>, KubeError> {
        let deployments: Api<Deployment> = self.api(&self.namespace);
        get(&deployments, service, &self.object("Deployment", service)).await
    }

    /// The pods of the service's ReplicaSets (old and new ones): those its selector matches.
    pub async fn pods(&self, service: &str) -> Result<Vec<Pod>, KubeError> {
        let pods: Api<Pod> = self.api(&self.namespace);
        let params = ListParams::default().labels(&selector_text(service));
        let list = pods.list(&params).await.map_err(|source| KubeError::Api {
            action: "list",
            object: format!("pods {}/{}", self.namespace, selector_text(service)),
            source,
        })?;
        Ok(list.items)
    }

    /// The live objects compared with the release's on every field imago renders; empty when
    /// nothing drifted.
    pub async fn drift(&self, rendered: &RenderedRelease) -> Result<Vec<Drift>, KubeError> {
        let name = rendered.service.as_str();
        let namespace = rendered.namespace.as_str();
        let mut found = Vec::new();
        let deployments: Api<Deployment> = self.api(namespace);
        let object = format!("Deployment {namespace}/{name}");
        let live = get(&deployments, name, &object).await?;
        compare_object(
            rendered,
            &object,
            &rendered.deployment,
            live.as_ref(),
            &mut found,
        )?;
        let services: Api<Service> = self.api(namespace);
        let object = format!("Service {namespace}/{name}");
        let live = get(&services, name, &object).await?;
        match &rendered.endpoint {
            Some(endpoint) => {
                compare_object(rendered, &object, endpoint, live.as_ref(), &mut found)?;
            }
            None if live.as_ref().is_some_and(is_managed) => {
                found.push(Drift::Unexpected { object });
            }
            None => {}
        }
        Ok(found)
    }

    /// Deletes the service's Deployment (its pods follow) and Service; returns the objects
    /// that existed. Objects of the same name that imago does not manage are left alone.
    pub async fn delete(&self, service: &str) -> Result<Vec<String>, KubeError> {
        let mut deleted = Vec::new();
        let deployments: Api<Deployment> = self.api(&self.namespace);
        let object = self.object("Deployment", service);
        if delete_if_managed(&deployments, service, &object).await? {
            deleted.push(object);
        }
        let services: Api<Service> = self.api(&self.namespace);
        let object = self.object("Service", service);
        if delete_if_managed(&services, service, &object).await? {
            deleted.push(object);
        }
        Ok(deleted)
    }
}

/// The object `name`, or `None` when the server has none; `object` names it in errors.
async fn get<K>(api: &Api<K>, name: &str, object: &str) -> Result<Option<K>, KubeError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.map_err(|source| KubeError::Api {
        action: "get",
        object: object.to_owned(),
        source,
    })
}

/// Whether `object` carries imago's labels for its own name.
pub(crate) fn is_managed<K: kube::Resource>(object: &K) -> bool {
    let labels = object.meta().labels.as_ref();
    labels
        .and_then(|l| l.get(LABEL_MANAGED_BY))
        .map(String::as_str)
        == Some(MANAGED_BY)
        && labels
            .and_then(|l| l.get(LABEL_NAME))
            .zip(object.meta().name.as_ref())
            .is_some_and(|(a, b)| a == b)
}

async fn delete_if_managed<K>(api: &Api<K>, name: &str, object: &str) -> Result<bool, KubeError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let live = get(api, name, object).await?;
    if !live.as_ref().is_some_and(is_managed) {
        return Ok(false);
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        // Gone between the GET and the DELETE: deleted all the same.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(true),
        Err(source) => Err(KubeError::Api {
            action: "delete",
            object: object.to_owned(),
            source,
        }),
    }
}

fn compare_object<T: Serialize>(
    rendered: &RenderedRelease,
    object: &str,
    expected: &T,
    live: Option<&T>,
    found: &mut Vec<Drift>,
) -> Result<(), KubeError> {
    let encode = |value: &T| {
        serde_json::to_value(value).map_err(|source| KubeError::Encode {
            service: rendered.service.clone(),
            source,
        })
    };
    match live {
        None => found.push(Drift::Missing {
            object: object.to_owned(),
        }),
        Some(live) => {
            let (expected, live) = (encode(expected)?, encode(live)?);
            found.extend(compare(object, &expected, &live));
            found.extend(network_defaults(object, &expected, &live));
        }
    }
    Ok(())
}

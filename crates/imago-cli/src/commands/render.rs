//! `imago render --target NAME`: the objects a cluster target would be given for every service
//! on it, printed for review or a GitOps repository. Kubernetes targets print YAML (one
//! document per object, keys sorted); swarm targets print the service specs as JSON, keys
//! sorted. The same file and images give the same bytes.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use imago_deploy::cluster::ClusterService;
use imago_deploy::daemon::DeployHome;
use imago_deploy::spec::{ResolvedTarget, ServiceSpec};
use imago_deploy::state::{StateDb, fingerprint};
use imago_oci::Digest;
use serde::Serialize;

use super::deploy::{
    Fetch, FileArgs, ImageSource, build_options, check_engines, load_services, release_spec,
    resolve_image,
};
use crate::Context;
use crate::reporter::Render;

#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The `[target.NAME]` whose services to render
    #[arg(long, value_name = "NAME")]
    pub target: String,
    /// The definition file
    #[arg(short = 'f', long = "file", default_value = "imago.toml")]
    pub file: PathBuf,
    /// Pin a service to this image instead of resolving it from the store or its registry:
    /// `SERVICE=REPOSITORY@sha256:HEX` (used as written) or `SERVICE=sha256:HEX` (in the
    /// target's registry)
    #[arg(long = "image", value_name = "SERVICE=IMAGE")]
    pub images: Vec<String>,
}

/// One service's objects.
#[derive(Serialize)]
struct Rendered {
    service: String,
    release: u64,
    image: String,
    /// Kubernetes: the Deployment and Service; swarm: the service spec.
    objects: Vec<serde_json::Value>,
    #[serde(skip)]
    text: String,
}

#[derive(Serialize)]
struct RenderResult {
    target: String,
    engine: &'static str,
    services: Vec<Rendered>,
}

impl Render for RenderResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for service in &self.services {
            out.write_all(service.text.as_bytes())?;
        }
        Ok(())
    }
}

/// `--image SERVICE=...` as (service, repository if given, digest).
fn parse_override(text: &str) -> Result<(String, Option<String>, Digest)> {
    let (service, image) = text
        .split_once('=')
        .ok_or_else(|| anyhow!("--image {text:?}: expected SERVICE=REPOSITORY@sha256:HEX"))?;
    let (repository, digest) = match image.rsplit_once('@') {
        Some((repository, digest)) => (Some(repository.to_owned()), digest),
        None => (None, image),
    };
    let digest = digest
        .parse()
        .with_context(|| format!("--image {text:?}: {digest:?} is not a sha256 digest"))?;
    Ok((service.to_owned(), repository, digest))
}

pub fn render(ctx: &Context, args: RenderArgs) -> Result<()> {
    let services = load_services(&FileArgs {
        file: args.file.clone(),
        services: Vec::new(),
        target: None,
    })?;
    let on_target: Vec<(&String, &ServiceSpec, &ResolvedTarget)> = services
        .specs
        .iter()
        .filter_map(|(name, spec)| {
            let target = spec.cluster_target()?;
            (target.name == args.target).then_some((name, spec, target))
        })
        .collect();
    let Some((_, _, target)) = on_target.first() else {
        bail!(
            "no service of {} runs on a cluster target named {:?} (render is for kubernetes and swarm targets)",
            args.file.display(),
            args.target
        );
    };
    let engine = target.spec.engine;
    let mut overrides = std::collections::BTreeMap::new();
    for text in &args.images {
        let (service, repository, digest) = parse_override(text)?;
        if !on_target.iter().any(|(name, _, _)| **name == service) {
            bail!(
                "--image {text:?}: no service {service} on target {}",
                args.target
            );
        }
        overrides.insert(service, (repository, digest));
    }
    check_engines(
        &on_target
            .iter()
            .map(|(name, spec, _)| ((*name).clone(), (*spec).clone()))
            .collect(),
    )?;
    let store = ctx.store()?;
    let db = DeployHome::new(ctx).open_db()?;
    let mut rendered = Vec::new();
    for (name, spec, target) in on_target {
        let (repository, digest) = match overrides.remove(name.as_str()) {
            Some(pinned) => pinned,
            None => (None, image_digest(ctx, &services, &store, name, spec)?),
        };
        let recorded = db
            .history(name)?
            .into_iter()
            .rev()
            .find(|r| r.image_digest == digest);
        let pinned = release_spec(&store, name, spec, Some(&digest), recorded.as_ref(), true)?;
        let (config_hash, revision) = fingerprint(&pinned, &digest)?;
        let image = match repository {
            Some(repository) => format!("{repository}@{digest}"),
            None => format!(
                "{}/{}@{digest}",
                target.spec.registry.as_deref().unwrap_or_default(),
                pinned.cluster_repository(name)
            ),
        };
        let desired = ClusterService {
            service: name.clone(),
            release: release_number(&db, name, &revision)?,
            revision,
            config_hash: config_hash.to_string(),
            image,
            spec: pinned,
            paused: false,
        };
        rendered.push(render_service(&desired, target)?);
    }
    ctx.reporter.emit(&RenderResult {
        target: args.target,
        engine: engine.as_str(),
        services: rendered,
    })
}

/// The digest apply would pin, found as plan finds it: the store, the registry's manifest, or
/// a check build of an image of the file (which must have been built before).
fn image_digest(
    ctx: &Context,
    services: &super::deploy::Services,
    store: &imago_store::Store,
    name: &str,
    spec: &ServiceSpec,
) -> Result<Digest> {
    match resolve_image(ctx, services, store, name, spec, Fetch::ManifestOnly)? {
        ImageSource::Stored(digest) => Ok(digest),
        ImageSource::Built(image) => super::build::build_one(
            ctx,
            store,
            &services.file,
            &image,
            &build_options(ctx, true),
        )
        .map(|built| built.digest)
        .with_context(|| {
            format!(
                "service {name}: the digest of image {image} is not known: build it first (`imago build {image}`) or pass --image {name}=REPOSITORY@sha256:HEX"
            )
        }),
    }
}

/// The release number the objects carry: the recorded release of this revision if there is
/// one (what apply applied), else the number the next apply would record.
fn release_number(db: &StateDb, service: &str, revision: &str) -> Result<u64> {
    if let Some(release) = db.release_with_revision(service, revision)? {
        return Ok(release.number);
    }
    Ok(db
        .history(service)?
        .iter()
        .map(|r| r.number)
        .max()
        .unwrap_or(0)
        + 1)
}

// Without an engine linked every target is refused, and the rest is unreachable.
#[cfg_attr(
    not(any(feature = "swarm", feature = "kubernetes")),
    allow(unreachable_code, unused_variables)
)]
fn render_service(desired: &ClusterService, target: &ResolvedTarget) -> Result<Rendered> {
    let (objects, text) = match target.spec.engine {
        #[cfg(feature = "kubernetes")]
        imago_deploy::spec::EngineKind::Kubernetes => {
            let namespace = super::deploy::kube_target(target).namespace;
            let objects = imago_kube::render_service(desired, &namespace)?;
            let text = imago_kube::render_yaml(&objects)?;
            let mut values = vec![serde_json::to_value(&objects.deployment)?];
            if let Some(endpoint) = &objects.endpoint {
                values.push(serde_json::to_value(endpoint)?);
            }
            (values, text)
        }
        #[cfg(feature = "swarm")]
        imago_deploy::spec::EngineKind::Swarm => {
            let spec = sorted(serde_json::to_value(imago_swarm::render(desired)?)?);
            let text = serde_json::to_string_pretty(&spec)? + "\n";
            (vec![spec], text)
        }
        other => bail!(
            "target {}: render is for kubernetes and swarm targets, and this imago has no {other} engine",
            target.name
        ),
    };
    Ok(Rendered {
        service: desired.service.clone(),
        release: desired.release,
        image: desired.image.clone(),
        objects,
        text,
    })
}

/// `value` with every object's keys in byte order, whatever order the map type keeps (a
/// swarm spec holds its labels in hash maps).
#[cfg(feature = "swarm")]
fn sorted(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<(String, serde_json::Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(key, value)| (key, sorted(value)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sorted).collect())
        }
        scalar => scalar,
    }
}

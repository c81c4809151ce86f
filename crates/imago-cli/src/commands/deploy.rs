//! Deployments: plan, apply, status, history, rollback, destroy, events, drift, and the
//! controller (`serve`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use imago_build::{BuildOptions, DefinitionFile};
use imago_deploy::cluster::ClusterService;
use imago_deploy::controller::{LABEL_SERVICE, stop_grace};
use imago_deploy::daemon::{self, DeployHome, Note, ServeOptions, controller_running};
use imago_deploy::drift::{self, DriftCheck, Finding};
use imago_deploy::plan::{ServicePlan, cluster_plan, plan_service, proposed_cluster_service};
use imago_deploy::roots::{DEFAULT_HISTORY_LIMIT, ReleaseRoots};
use imago_deploy::services::{check_ports, exposed_ports, parse_services_for, tcp_ports};
use imago_deploy::spec::{ResolvedTarget, ServiceSpec, validate_all};
use imago_deploy::state::{Event, Release, ReleaseOutcome, StateDb};
use imago_deploy::status::StatusDocument;
use imago_oci::{Digest, Reference};
use imago_runtime::{Instance, LocalProvider, Provider, StoreImageSource, SupervisorCommand};
use imago_store::Store;
use serde::Serialize;

use crate::Context;
use crate::reporter::Render;

/// The gc roots deployments add: the images of retained releases.
pub fn release_roots(ctx: &Context) -> ReleaseRoots {
    ReleaseRoots {
        path: DeployHome::new(ctx).db_path(),
        keep: DEFAULT_HISTORY_LIMIT,
    }
}

pub fn local_provider(ctx: &Context, store: Store) -> Result<LocalProvider> {
    Ok(crate::commands::instances::with_init_from_env(
        LocalProvider::new(
            &ctx.home.root,
            Box::new(StoreImageSource::new(store)),
            SupervisorCommand::current_exe()?,
        ),
    ))
}

#[derive(Debug, Clone, Args)]
pub struct FileArgs {
    /// The definition file
    #[arg(short = 'f', long = "file", default_value = "imago.toml")]
    pub file: PathBuf,
    /// Only these services (default: every service of the file)
    pub services: Vec<String>,
    /// Run the services on this `[target.NAME]` instead of the one each names
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
}

pub(super) struct Services {
    pub(super) file: DefinitionFile,
    pub(super) specs: BTreeMap<String, ServiceSpec>,
    /// Registry references pulled by this command: a tag is resolved once per run.
    pulled: std::cell::RefCell<BTreeMap<String, Digest>>,
}

pub(super) fn load_services(args: &FileArgs) -> Result<Services> {
    let file = DefinitionFile::load(&args.file)?;
    let specs = parse_services_for(
        &file.path,
        &file.text,
        &args.services,
        args.target.as_deref(),
    )?;
    Ok(Services {
        file,
        specs,
        pulled: Default::default(),
    })
}

/// How a service's image resolves.
pub(super) enum ImageSource {
    /// An image of the definition file; built (or checked) first.
    Built(String),
    /// A store reference.
    Stored(Digest),
}

/// Whether resolving a registry image may fetch its blobs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Fetch {
    /// `plan`: a tag becomes a digest by reading the manifest alone; no blob is fetched.
    ManifestOnly,
    /// `apply`: the image is pulled, its instances are launched from it.
    Pull,
}

pub(super) fn resolve_image(
    ctx: &Context,
    services: &Services,
    store: &Store,
    name: &str,
    spec: &ServiceSpec,
    fetch: Fetch,
) -> Result<ImageSource> {
    if services.file.definition.image.contains_key(&spec.image) {
        return Ok(ImageSource::Built(spec.image.clone()));
    }
    if imago_registry::names_registry(&spec.image) {
        // A registry reference: its tag resolves to a digest now (pulled, so that the ports
        // can be checked and instances launched); the release records the digest, never the tag.
        if let Some(d) = services.pulled.borrow().get(&spec.image) {
            return Ok(ImageSource::Stored(d.clone()));
        }
        let reference: imago_registry::RegistryRef = spec
            .image
            .parse()
            .with_context(|| format!("service {name}: image {:?}", spec.image))?;
        let settings = super::registry::settings(ctx, false)?;
        let digest = match fetch {
            Fetch::ManifestOnly => imago_registry::resolve_remote(&settings, &reference)
                .with_context(|| format!("service {name}: resolve {reference}"))?,
            Fetch::Pull => {
                super::registry::pull_reference(ctx, &settings, &reference)
                    .with_context(|| format!("service {name}"))?
                    .digest
            }
        };
        ctx.reporter
            .status(format!("service {name}: {} is {digest}", spec.image));
        services
            .pulled
            .borrow_mut()
            .insert(spec.image.clone(), digest.clone());
        return Ok(ImageSource::Stored(digest));
    }
    let reference: Reference = spec.image.parse().with_context(|| {
        format!(
            "service {name}: image {:?} is neither an image of {} nor a valid reference",
            spec.image,
            services.file.path.display()
        )
    })?;
    let digest = store.resolve_digest(&reference).with_context(|| {
        format!(
            "service {name}: image {:?} is neither an image of {} nor in the store",
            spec.image,
            services.file.path.display()
        )
    })?;
    Ok(ImageSource::Stored(digest))
}

/// The spec a release records: a registry image is pinned to `HOST/REPO@DIGEST`, so that the
/// release names the digest apply resolved and never a tag that can move.
pub(super) fn pinned_spec(spec: &ServiceSpec, digest: Option<&Digest>) -> ServiceSpec {
    let mut spec = spec.clone();
    if let Some(digest) = digest
        && imago_registry::names_registry(&spec.image)
        && let Ok(r) = spec.image.parse::<imago_registry::RegistryRef>()
    {
        spec.image = format!("{}@{digest}", r.name());
    }
    spec
}

/// `spec` pinned to `digest` as a release records it: [`pinned_spec`], and on a kubernetes
/// target the paths the image declares as volumes (`image_volumes`, an emptyDir each), read
/// from the stored image. They are recorded in the release rather than read again when it is
/// rendered, so that a rollback to a release whose image gc has since removed, a restarted
/// controller and `imago render` give the same objects. `recorded`, a release that already
/// pins `digest`, answers when the image is not stored (plan and render do not pull); without
/// either, apply (`required`) and render fail naming the digest, and plan leaves them out.
pub(super) fn release_spec(
    store: &Store,
    name: &str,
    spec: &ServiceSpec,
    digest: Option<&Digest>,
    recorded: Option<&Release>,
    required: bool,
) -> Result<ServiceSpec> {
    let mut pinned = pinned_spec(spec, digest);
    let Some(digest) = digest else {
        return Ok(pinned);
    };
    if pinned.engine() != imago_deploy::spec::EngineKind::Kubernetes {
        return Ok(pinned);
    }
    if store.has_blob(digest) {
        let image = store.load_image(digest).with_context(|| {
            format!("service {name}: reading the configuration of image {digest}")
        })?;
        pinned.image_volumes = imago_runtime::volumes::declared_volumes(&image.config);
    } else if let Some(release) = recorded.filter(|r| &r.image_digest == digest) {
        pinned.image_volumes = release.spec.image_volumes.clone();
    } else if required {
        bail!(
            "service {name}: image {digest} is not in the store, so the paths it declares as volumes (an emptyDir each on kubernetes) are not known: pull it first (`imago pull`)"
        );
    }
    Ok(pinned)
}

/// The ports an image of the definition file will expose, before it is built.
fn exposed_ports_defined(services: &Services, image: &str) -> Vec<u16> {
    services
        .file
        .definition
        .image
        .get(image)
        .map_or_else(Vec::new, |def| {
            tcp_ports(def.config.ports.iter().map(|p| p.get_ref().as_str()))
        })
}

pub(super) fn build_options(ctx: &Context, check: bool) -> BuildOptions {
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    BuildOptions {
        source_date_epoch: epoch,
        cache_dir: Some(ctx.home.root.join("build-cache")),
        check,
        sandbox: crate::commands::build::sandbox_options(ctx, imago_runtime::Engine::Embedded).ok(),
        args: Default::default(),
        no_cache_layers: Vec::new(),
    }
}

#[derive(Serialize)]
struct PlanResult(Vec<ServicePlan>);

impl Render for PlanResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for p in &self.0 {
            write!(out, "service {}: {}", p.service, p.action)?;
            match (&p.digest, p.image_rebuild) {
                (_, true) => writeln!(out, " (image will be rebuilt)")?,
                (Some(d), false) => writeln!(out, " ({})", d.short())?,
                _ => writeln!(out)?,
            }
            if let Some(c) = &p.cluster {
                let from = c
                    .live_release
                    .map(|r| format!(" (live: release {r})"))
                    .unwrap_or_default();
                writeln!(
                    out,
                    "  {} service {} on target {}: {}{from}",
                    c.engine, p.service, c.target, c.action
                )?;
                for field in &c.fields {
                    writeln!(out, "    {field}")?;
                }
            }
            if let Some(plan) = &p.rollout {
                writeln!(
                    out,
                    "  replaces {} instances with {} in {} waves; at least {} available, at most {} running; about {}",
                    p.instances_replaced,
                    p.replicas,
                    plan.waves.len(),
                    plan.min_available,
                    plan.max_total,
                    humantime::format_duration(Duration::from_millis(
                        plan.expected.as_millis() as u64
                    ))
                )?;
                for (i, w) in plan.waves.iter().enumerate() {
                    writeln!(
                        out,
                        "  wave {}: launch {}, retire {}, >= {} available",
                        i + 1,
                        w.launch,
                        w.retire,
                        w.min_available
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// A service `plan` asks its cluster engine about: its index among the plans, the release apply
/// would make, and whether that release's digest is known (not when the image is rebuilt first).
type AskedOfEngine = (usize, (ClusterService, bool));

/// Validates the services and works out, for each, what apply would do.
fn make_plan(
    ctx: &Context,
    services: &Services,
    store: &Store,
    db: &StateDb,
) -> Result<Vec<ServicePlan>> {
    let all_limits = validate_all(&services.specs)?;
    check_engines(&services.specs)?;
    let running = current_instances(ctx, store)?;
    let ours = daemon::own_pids(&DeployHome::new(ctx));
    let mut plans = Vec::new();
    let mut on_clusters: BTreeMap<String, (ResolvedTarget, Vec<AskedOfEngine>)> = BTreeMap::new();
    let mut checked: BTreeMap<String, Option<Digest>> = BTreeMap::new();
    for (name, spec) in &services.specs {
        let digest = match resolve_image(ctx, services, store, name, spec, Fetch::ManifestOnly)? {
            ImageSource::Stored(d) => Some(d),
            // A base that is still to be pulled: the image's digest is not known before apply.
            ImageSource::Built(image)
                if super::build::base_to_pull(store, &services.file, &image).is_some() =>
            {
                None
            }
            // Services that share an image: it is checked once.
            ImageSource::Built(image) if checked.contains_key(&image) => checked[&image].clone(),
            // A check build, with the same progress display as `imago build --check`.
            ImageSource::Built(image) => match super::build::build_one(
                ctx,
                store,
                &services.file,
                &image,
                &build_options(ctx, true),
            ) {
                Ok(built) => {
                    checked.insert(image, Some(built.digest.clone()));
                    Some(built.digest)
                }
                Err(e)
                    if matches!(
                        e.downcast_ref::<imago_build::BuildError>(),
                        Some(imago_build::BuildError::CheckMismatch { .. })
                            | Some(imago_build::BuildError::Store(_))
                    ) =>
                {
                    // The image must be rebuilt: the digest it will get is not known yet.
                    checked.insert(image, None);
                    None
                }
                Err(e) => return Err(e),
            },
        };
        imago_deploy::services::check_endpoint_of(name, spec, &ours)?;
        match &digest {
            // A registry image plan did not pull: its ports are checked at apply.
            Some(d) if !store.has_blob(d) => {}
            Some(d) => check_ports(name, spec, d.short(), &exposed_ports(store, d)?)?,
            None => check_ports(
                name,
                spec,
                &spec.image,
                &exposed_ports_defined(services, &spec.image),
            )?,
        }
        let current = db.desired(name)?;
        let spec = &release_spec(store, name, spec, digest.as_ref(), current.as_ref(), false)?;
        let mut plan = plan_service(
            name,
            spec,
            all_limits[name],
            current.as_ref(),
            digest.clone(),
            &running,
        )?;
        if let Some(target) = spec.cluster_target() {
            // The engine rolls out on its own: the live service says what changes.
            plan.rollout = None;
            plan.instances_replaced = 0;
            // Without a digest (the image is rebuilt first) only the live labels count.
            let proposed = match &digest {
                Some(d) => (
                    proposed_cluster_service(name, spec, d, current.as_ref(), target)?,
                    true,
                ),
                None => (
                    ClusterService {
                        service: name.clone(),
                        release: 0,
                        revision: String::new(),
                        config_hash: String::new(),
                        image: String::new(),
                        spec: spec.clone(),
                        paused: false,
                    },
                    false,
                ),
            };
            on_clusters
                .entry(engine_key(target))
                .or_insert_with(|| (target.clone(), Vec::new()))
                .1
                .push((plans.len(), proposed));
        }
        plans.push(plan);
    }
    // One comparison per cluster target, however many services it runs: a listing, not an
    // inspect per service.
    if !on_clusters.is_empty() {
        let factory =
            cluster_engines().ok_or_else(|| anyhow!("this imago has no cluster engine"))?;
        let mut engines = drift::ClusterEngines::new(&factory);
        for (target, services_on) in on_clusters.into_values() {
            let asked: Vec<ClusterService> = services_on.iter().map(|(_, p)| p.0.clone()).collect();
            let live = engines.engine(&target)?.compare(&asked)?;
            for ((index, proposed), live) in services_on.iter().zip(live) {
                plans[*index].cluster = Some(cluster_plan(
                    &target,
                    proposed.1.then_some(proposed.0.revision.as_str()),
                    live.as_ref(),
                ));
            }
        }
    }
    Ok(plans)
}

fn current_instances(ctx: &Context, store: &Store) -> Result<Vec<Instance>> {
    Ok(local_provider(ctx, store.clone())?.list()?)
}

pub fn plan(ctx: &Context, args: FileArgs) -> Result<()> {
    let services = load_services(&args)?;
    let store = ctx.store()?;
    let db = DeployHome::new(ctx).open_db()?;
    ctx.reporter
        .emit(&PlanResult(make_plan(ctx, &services, &store, &db)?))
}

/// `POST /v1/plan` of the controller's API: `imago plan --json` of a definition file's text,
/// planned in the controller process by the same code as the command.
fn api_planner(ctx: &Context) -> imago_deploy::api::Planner {
    let home = ctx.home.clone();
    Arc::new(move |input: imago_deploy::api::PlanInput| {
        // Check builds report to the controller's log, never to the API client.
        let ctx = Context {
            home: home.clone(),
            reporter: crate::reporter::Reporter::new(false, true),
        };
        plan_text(&ctx, input).map_err(|e| format!("{e:#}"))
    })
}

fn plan_text(ctx: &Context, input: imago_deploy::api::PlanInput) -> Result<serde_json::Value> {
    let dir = match input.dir {
        Some(dir) => dir,
        None => {
            // No context: relative paths resolve in an empty directory of the home.
            let empty = ctx.home.root.join("deploy/plan-context");
            std::fs::create_dir_all(&empty)
                .with_context(|| format!("cannot create {}", empty.display()))?;
            empty
        }
    };
    let file = DefinitionFile::parse(&dir.join("imago.toml"), input.text)?;
    let specs = parse_services_for(&file.path, &file.text, &[], None)?;
    let services = Services {
        file,
        specs,
        pulled: Default::default(),
    };
    let store = ctx.store()?;
    let db = DeployHome::new(ctx).open_db()?;
    let plans = PlanResult(make_plan(ctx, &services, &store, &db)?);
    Ok(serde_json::to_value(&plans)?)
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// Record the releases and return without waiting for the rollouts
    #[arg(long)]
    pub no_wait: bool,
    /// Give up waiting after this long (the rollout itself goes on)
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Serialize)]
struct ServiceResult {
    service: String,
    release: u64,
    digest: Digest,
    changed: bool,
    /// "complete", "failed", "rolled back", "pending".
    outcome: String,
    detail: String,
    rolled_back_to: Option<u64>,
}

#[derive(Serialize)]
struct ApplyResult(Vec<ServiceResult>);

impl Render for ApplyResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for r in &self.0 {
            match r.outcome.as_str() {
                "complete" if !r.changed => writeln!(
                    out,
                    "service {}: unchanged (release {})",
                    r.service, r.release
                )?,
                "complete" => writeln!(
                    out,
                    "service {}: deployment complete (release {}, {})",
                    r.service,
                    r.release,
                    r.digest.short()
                )?,
                "rolled back" => writeln!(
                    out,
                    "service {}: release {} failed and was rolled back to release {}: {}",
                    r.service,
                    r.release,
                    r.rolled_back_to.unwrap_or_default(),
                    r.detail
                )?,
                other => writeln!(
                    out,
                    "service {}: release {} {other}: {}",
                    r.service, r.release, r.detail
                )?,
            }
        }
        Ok(())
    }
}

pub fn apply(ctx: &Context, args: ApplyArgs) -> Result<()> {
    let services = load_services(&args.file)?;
    let store = ctx.store()?;
    let home = DeployHome::new(ctx);
    let mut db = home.open_db()?;
    // Validate, build and check every service before recording any release: a bad service
    // must not leave the others half-applied.
    validate_all(&services.specs)?;
    check_engines(&services.specs)?;
    let ours = daemon::own_pids(&home);
    for (name, spec) in &services.specs {
        imago_deploy::services::check_endpoint_of(name, spec, &ours)?;
    }
    let mut pinned = Vec::new();
    for (name, spec) in &services.specs {
        let digest = match resolve_image(ctx, &services, &store, name, spec, Fetch::Pull)? {
            ImageSource::Stored(d) => d,
            ImageSource::Built(image) => {
                super::build::pull_base(
                    ctx,
                    &store,
                    &services.file,
                    &image,
                    super::build::PullPolicy::Missing,
                    &mut Default::default(),
                )?;
                let built = super::build::build_one(
                    ctx,
                    &store,
                    &services.file,
                    &image,
                    &build_options(ctx, false),
                )?;
                ctx.reporter
                    .status(format!("built {image}:latest {}", built.digest.short()));
                built.digest
            }
        };
        check_ports(name, spec, digest.short(), &exposed_ports(&store, &digest)?)?;
        let current = db.desired(name)?;
        let spec = release_spec(&store, name, spec, Some(&digest), current.as_ref(), true)?;
        pinned.push((name, spec, digest));
    }
    // A cluster's nodes pull the release's image by digest from its target's registry: it is
    // there before the release is recorded.
    for (name, spec, digest) in &pinned {
        push_for_target(ctx, name, spec, digest)?;
    }
    let since = db.last_event_seq()?;
    let mut recorded = Vec::new();
    for (name, spec, digest) in pinned {
        let (release, new) = db.record_release(name, &spec, &digest, "apply", None, &actor())?;
        if new {
            ctx.reporter.status(format!(
                "service {name}: release {} pins {}",
                release.number,
                digest.short()
            ));
        }
        recorded.push((release, new));
    }
    ensure_controller(ctx, &home, &[])?;
    if args.no_wait {
        let results = recorded.iter().map(|(r, new)| pending(r, *new)).collect();
        return ctx.reporter.emit(&ApplyResult(results));
    }
    let results = wait_for(ctx, &home, recorded, since, args.timeout)?;
    let failed = results.iter().filter(|r| r.outcome != "complete").count();
    ctx.reporter.emit(&ApplyResult(results))?;
    if failed > 0 {
        bail!("{failed} service(s) did not deploy");
    }
    Ok(())
}

/// Every service's keys must be ones its engine can honour: an error names the key and engine.
pub(super) fn check_engines(specs: &BTreeMap<String, ServiceSpec>) -> Result<()> {
    use imago_deploy::spec::EngineKind;
    for (name, spec) in specs {
        spec.check_engine(name)?;
        let Some(target) = spec.cluster_target() else {
            continue;
        };
        let linked = match target.spec.engine {
            EngineKind::Swarm => cfg!(feature = "swarm"),
            EngineKind::Kubernetes => cfg!(feature = "kubernetes"),
            EngineKind::Local => true,
        };
        if !linked {
            bail!(
                "service {name}: target {} needs the {} engine, which this imago was built without",
                target.name,
                target.spec.engine
            );
        }
        #[cfg(feature = "kubernetes")]
        if target.spec.engine == EngineKind::Kubernetes {
            check_kubernetes(name, spec, target)?;
        }
    }
    Ok(())
}

/// The keys Kubernetes cannot honour, found by rendering the service (no cluster needed) with
/// a stand-in digest: the same refusals apply would meet, before anything is built or pushed.
#[cfg(feature = "kubernetes")]
fn check_kubernetes(
    name: &str,
    spec: &ServiceSpec,
    target: &imago_deploy::spec::ResolvedTarget,
) -> Result<()> {
    let stand_in = Digest::of(name.as_bytes());
    let desired = imago_deploy::cluster::ClusterService {
        service: name.to_owned(),
        release: 1,
        revision: stand_in.hex()[..16].to_owned(),
        config_hash: stand_in.to_string(),
        image: format!(
            "{}/{}@{stand_in}",
            target.spec.registry.as_deref().unwrap_or_default(),
            spec.cluster_repository(name)
        ),
        spec: spec.clone(),
        paused: false,
    };
    imago_kube::render_service(&desired, &kube_target(target).namespace)?;
    Ok(())
}

/// Where a kubernetes target's objects go: `endpoint = "KUBECONFIG#CONTEXT"` and `namespace`.
#[cfg(feature = "kubernetes")]
pub(super) fn kube_target(target: &imago_deploy::spec::ResolvedTarget) -> imago_kube::KubeTarget {
    imago_kube::KubeTarget::from_endpoint(
        target.spec.endpoint.as_deref(),
        target.spec.namespace.as_deref(),
    )
}

/// Pushes the image of a service on a cluster target to the target's registry, by digest.
fn push_for_target(ctx: &Context, name: &str, spec: &ServiceSpec, digest: &Digest) -> Result<()> {
    let Some(target) = spec.cluster_target() else {
        return Ok(());
    };
    let destination = format!(
        "{}/{}@{digest}",
        target.spec.registry.as_deref().unwrap_or_default(),
        spec.cluster_repository(name)
    );
    let settings = super::registry::settings(ctx, false)?;
    let pushed = super::registry::push_image(
        ctx,
        &settings,
        &digest.to_string(),
        Some(&destination),
        None,
    )
    .with_context(|| format!("service {name}: target {}", target.name))?;
    if pushed.blobs_uploaded > 0 {
        ctx.reporter.status(format!(
            "service {name}: pushed {} for target {} ({} blobs uploaded)",
            pushed.reference, target.name, pushed.blobs_uploaded
        ));
    }
    Ok(())
}

/// One engine per engine kind and endpoint.
fn engine_key(target: &ResolvedTarget) -> String {
    format!(
        "{}:{}",
        target.spec.engine,
        target.spec.endpoint.as_deref().unwrap_or_default()
    )
}

/// The cluster engines this build links, for the controller.
pub fn cluster_engines() -> Option<imago_deploy::controller::EngineFactory> {
    #[cfg(any(feature = "swarm", feature = "kubernetes"))]
    {
        use imago_deploy::cluster::{ClusterEngine, EngineError};
        use imago_deploy::spec::EngineKind;
        Some(std::sync::Arc::new(|target| match target.spec.engine {
            #[cfg(feature = "swarm")]
            EngineKind::Swarm => Ok(Box::new(imago_swarm::SwarmEngine::connect_with(
                target.docker_endpoint(),
                docker_tls(target.docker_endpoint()).as_ref(),
            )?) as Box<dyn ClusterEngine>),
            #[cfg(feature = "kubernetes")]
            EngineKind::Kubernetes => Ok(Box::new(imago_kube::KubeCluster::connect(&kube_target(
                target,
            ))?) as Box<dyn ClusterEngine>),
            #[allow(unreachable_patterns)]
            other => Err(EngineError::Api {
                engine: other.as_str(),
                endpoint: target.spec.endpoint.clone().unwrap_or_default(),
                message: "this imago has no engine for it".into(),
            }),
        }))
    }
    #[cfg(not(any(feature = "swarm", feature = "kubernetes")))]
    {
        None
    }
}

/// TLS for a `tcp://` Docker endpoint, as the docker CLI decides it: on when `DOCKER_TLS_VERIFY`
/// is set (non-empty), with the client certificate in `DOCKER_CERT_PATH` (default `~/.docker`).
#[cfg(feature = "swarm")]
fn docker_tls(endpoint: &str) -> Option<imago_swarm::DockerTls> {
    if !endpoint.starts_with("tcp://") {
        return None;
    }
    std::env::var_os("DOCKER_TLS_VERIFY").filter(|v| !v.is_empty())?;
    let cert_dir = match std::env::var_os("DOCKER_CERT_PATH").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".docker"),
    };
    Some(imago_swarm::DockerTls { cert_dir })
}

fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user} (imago cli)")
}

/// Follows the rollouts of `releases` until each completes or fails (following an automatic
/// rollback to its end), printing events as they happen.
/// Events after `since` (taken before the releases were recorded) are shown.
fn wait_for(
    ctx: &Context,
    home: &DeployHome,
    releases: Vec<(Release, bool)>,
    mut since: u64,
    timeout: Duration,
) -> Result<Vec<ServiceResult>> {
    let db = home.open_db()?;
    let started = Instant::now();
    let mut results: BTreeMap<String, ServiceResult> = BTreeMap::new();
    let spinner = ctx.reporter.spinner("waiting for rollouts");
    loop {
        for event in db.events(None, since)? {
            since = event.seq;
            spinner.suspend(|| print_event(ctx, &event));
        }
        for (release, new) in &releases {
            if results.contains_key(&release.service) {
                continue;
            }
            if let Some(result) = settled(&db, release, *new)? {
                results.insert(release.service.clone(), result);
            }
        }
        if results.len() == releases.len() {
            break;
        }
        if started.elapsed() > timeout {
            spinner.finish_and_clear();
            bail!(
                "rollouts still running after {}; follow them with `imago status`",
                humantime::format_duration(timeout)
            );
        }
        if !controller_running(home)? {
            spinner.finish_and_clear();
            bail!("the controller stopped; see {}", home.log_path().display());
        }
        // Two small SQLite reads a round: a short wait costs nothing and ends the command
        // (a rollback, say) within 25 ms of its rollout rather than 100.
        std::thread::sleep(Duration::from_millis(25));
    }
    spinner.finish_and_clear();
    Ok(results.into_values().collect())
}

/// The result of `release` once its rollout (and any automatic rollback after it) is over.
fn settled(db: &StateDb, release: &Release, new: bool) -> Result<Option<ServiceResult>> {
    Ok(db
        .settled(&release.service, release.number)?
        .map(|settled| ServiceResult {
            service: release.service.clone(),
            release: release.number,
            digest: release.image_digest.clone(),
            changed: new,
            outcome: settled.outcome.to_string(),
            detail: settled.detail,
            rolled_back_to: settled.rolled_back_to,
        }))
}

fn print_event(ctx: &Context, event: &Event) {
    let service = event
        .service
        .as_deref()
        .map(|s| format!("{s}: "))
        .unwrap_or_default();
    ctx.reporter.status(format!("  {service}{}", event.message));
}

// ---- the controller process -------------------------------------------------------------------

/// Starts `imago serve` in the background, with `serve_args`, unless a controller already runs
/// for this home.
fn ensure_controller(ctx: &Context, home: &DeployHome, serve_args: &[String]) -> Result<()> {
    let exe = std::env::current_exe().context("cannot locate the imago executable")?;
    if let Some(pid) = daemon::ensure_controller(home, &exe, serve_args)? {
        ctx.reporter.status(format!(
            "started the controller (pid {pid}); log: {}",
            home.log_path().display()
        ));
    } else {
        // A controller that was running: it acts on what was just recorded at once.
        daemon::nudge_controller(home);
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Stay in the foreground (for process supervisors); otherwise start in the background
    #[arg(long)]
    pub foreground: bool,
    /// Address of the HTTP API (port 0: any free port, written to deploy/controller.json)
    #[arg(long, env = "IMAGO_API", default_value = "127.0.0.1:7878")]
    pub api: std::net::SocketAddr,
    /// Time between reconcile passes
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Container engine for new instances
    #[arg(long, default_value = "embedded", value_parser = ["embedded", "runc"])]
    pub runtime: String,
    /// Stop the running controller (instances and service endpoints keep serving; a new
    /// controller adopts them)
    #[arg(long, conflicts_with = "foreground")]
    pub stop: bool,
    /// Send every connection to a service endpoint through the endpoint proxy. By default,
    /// clients on this host that connect to an endpoint are sent straight to a ready instance by
    /// an eBPF program at connect time (no proxy hop); the proxy takes what the kernel does not
    /// balance.
    #[arg(long)]
    pub no_kernel_balancing: bool,
    /// Serve the HTTP API and console read-only: actions (rollback) answer 403
    #[arg(long)]
    pub read_only: bool,
}

/// What `imago serve` and `imago serve --stop` did.
#[derive(Serialize)]
struct ServeResult {
    /// "started", "already running", "stopped" or "not running".
    controller: &'static str,
    pid: Option<u32>,
    log: PathBuf,
}

impl Render for ServeResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        match (self.controller, self.pid) {
            ("started", Some(pid)) => writeln!(
                out,
                "controller started (pid {pid}); log: {}",
                self.log.display()
            ),
            ("stopped", Some(pid)) => writeln!(out, "controller {pid} stopped"),
            (what, _) => writeln!(out, "controller {what}"),
        }
    }
}

pub fn serve(ctx: &Context, args: ServeArgs) -> Result<()> {
    let home = DeployHome::new(ctx);
    if args.stop {
        let pid = daemon::stop_controller(&home)?;
        return ctx.reporter.emit(&ServeResult {
            controller: if pid.is_some() {
                "stopped"
            } else {
                "not running"
            },
            pid,
            log: home.log_path(),
        });
    }
    if !args.foreground {
        // The background controller gets the settings given here, not the defaults.
        let mut serve_args = vec![
            "--api".to_owned(),
            args.api.to_string(),
            "--interval".to_owned(),
            humantime::format_duration(args.interval).to_string(),
            "--runtime".to_owned(),
            args.runtime.clone(),
        ];
        if args.no_kernel_balancing {
            serve_args.push("--no-kernel-balancing".to_owned());
        }
        if args.read_only {
            serve_args.push("--read-only".to_owned());
        }
        let exe = std::env::current_exe().context("cannot locate the imago executable")?;
        let pid = daemon::ensure_controller(&home, &exe, &serve_args)?;
        if pid.is_none() {
            ctx.reporter
                .warn("a controller already runs for this home: its settings stay as they are");
        }
        return ctx.reporter.emit(&ServeResult {
            controller: if pid.is_some() {
                "started"
            } else {
                "already running"
            },
            pid: pid.or_else(|| daemon::read_info(&home).ok().map(|i| i.pid)),
            log: home.log_path(),
        });
    }
    let lock = daemon::lock_controller(&home)?;
    let store = ctx.store()?;
    let local = local_provider(ctx, store.clone())?;
    let rootfs = local.rootfs_cache();
    let options = ServeOptions {
        api: args.api,
        interval: args.interval,
        engine: args.runtime.parse()?,
        kernel_balancing: !args.no_kernel_balancing,
        exe: std::env::current_exe().context("cannot locate the imago executable")?,
        read_only: args.read_only,
        store: Some(store),
        planner: Some(api_planner(ctx)),
    };
    let never = daemon::run_controller(
        &home,
        lock,
        Arc::new(local),
        rootfs,
        options,
        cluster_engines(),
        &mut |note| match note {
            Note::NoApi { addr, error } => ctx.reporter.warn(format!(
                "api: cannot listen on {addr}: {error}; serving without the HTTP API"
            )),
            Note::Warning(warning) => ctx.reporter.warn(warning),
            Note::Running {
                pid,
                api,
                dataplane,
            } => ctx.reporter.status(format!(
                "controller running (pid {pid}, api {api}, data plane pid {dataplane})"
            )),
            Note::Pass(p) => {
                for id in &p.launched {
                    ctx.reporter.status(format!("{}: launched {id}", p.service));
                }
                for id in &p.stopped {
                    ctx.reporter.status(format!("{}: stopped {id}", p.service));
                }
                if let Some(f) = &p.failed {
                    ctx.reporter
                        .status(format!("{}: rollout failed: {f}", p.service));
                }
            }
            Note::PassFailed(e) => ctx.reporter.warn(format!("reconcile pass failed: {e}")),
        },
    );
    match never {
        Ok(never) => match never {},
        Err(e) => {
            // A controller never ends on its own but for this: say so where users look
            // (`imago events`, the console, the command that started it), not only in the
            // controller's log.
            daemon::record_exit(&home, &e);
            Err(e.into())
        }
    }
}

/// The data plane process (`imago __dataplane`, started by the controller).
pub fn dataplane(ctx: &Context) -> Result<()> {
    Ok(imago_deploy::dataplane::run(&DeployHome::new(ctx))?)
}

// ---- status, history, rollback, destroy, events -----------------------------------------------

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub service: Option<String>,
}

/// `imago status`'s result: the document the API serves at `/v1/status`.
struct StatusResult(StatusDocument);

impl Serialize for StatusResult {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl Render for StatusResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if !self.0.controller_running {
            writeln!(
                out,
                "warning: no controller is running (`imago serve` starts one)"
            )?;
        }
        for st in &self.0.services {
            match &st.desired {
                Some(r) => {
                    let outcome = st
                        .outcome
                        .as_ref()
                        .map_or("rolling out".to_string(), |o| o.outcome.to_string());
                    writeln!(
                        out,
                        "service {}: release {} ({}) {outcome}",
                        st.name,
                        r.number,
                        r.image_digest.short()
                    )?;
                    if let Some(o) = st
                        .outcome
                        .as_ref()
                        .filter(|o| o.outcome != ReleaseOutcome::Complete)
                    {
                        writeln!(out, "  why: {}", o.detail)?;
                    }
                    if r.rollback_of.is_some() {
                        writeln!(out, "  {}", r.reason)?;
                    }
                    if let Some(f) = st.last_failure.as_ref().filter(|f| f.number != r.number) {
                        writeln!(out, "  last failure: release {}: {}", f.number, f.detail)?;
                    }
                }
                None => writeln!(out, "service {}: destroyed", st.name)?,
            }
            if let Some(fault) = &st.fault {
                writeln!(out, "  fault: {}", fault.reason)?;
            }
            if let Some(paused) = &st.paused {
                writeln!(
                    out,
                    "  paused by {}: nothing is launched or retired until `imago resume {}`",
                    paused.actor, st.name
                )?;
            }
            for i in &st.instances {
                writeln!(
                    out,
                    "  {} {:<8} {}",
                    i.id,
                    i.status,
                    i.address.as_deref().unwrap_or("-")
                )?;
            }
            // Tasks the engine keeps for history (shut down, not wanted) are in the JSON only.
            for t in st
                .tasks
                .iter()
                .filter(|t| t.desired_running || t.phase != "done")
            {
                writeln!(
                    out,
                    "  task {} {:<8} {:<21} release {} {}{}",
                    t.id,
                    t.phase,
                    t.address.as_deref().or(t.node.as_deref()).unwrap_or("-"),
                    t.release.map_or("?".to_owned(), |r| r.to_string()),
                    t.image_digest.as_deref().unwrap_or("-"),
                    t.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                )?;
            }
        }
        Ok(())
    }
}

pub fn status(ctx: &Context, args: StatusArgs) -> Result<()> {
    let home = DeployHome::new(ctx);
    let db = home.open_db()?;
    let store = ctx.store()?;
    let instances = current_instances(ctx, &store)?;
    let mut document = imago_deploy::status::status_document(
        &db,
        args.service.as_deref(),
        &instances,
        controller_running(&home)?,
    )?;
    if let Some(factory) = cluster_engines() {
        imago_deploy::status::add_cluster_tasks(
            &db,
            &mut document.services,
            &mut drift::ClusterEngines::new(&factory),
        )?;
    }
    ctx.reporter.emit(&StatusResult(document))
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    pub service: String,
}

#[derive(Serialize)]
struct HistoryRow {
    #[serde(flatten)]
    release: Release,
    outcome: Option<ReleaseOutcome>,
}

#[derive(Serialize)]
struct HistoryResult(Vec<HistoryRow>);

impl Render for HistoryResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:<8} {:<14} {:<12} REASON",
            "RELEASE", "IMAGE", "OUTCOME"
        )?;
        for r in &self.0 {
            writeln!(
                out,
                "{:<8} {:<14} {:<12} {}",
                r.release.number,
                r.release.image_digest.short(),
                r.outcome.map_or("-", ReleaseOutcome::as_str),
                r.release.reason
            )?;
        }
        Ok(())
    }
}

pub fn history(ctx: &Context, args: HistoryArgs) -> Result<()> {
    let db = DeployHome::new(ctx).open_db()?;
    let releases = db.history(&args.service)?;
    if releases.is_empty() {
        bail!("service {} has no release", args.service);
    }
    let mut rows = Vec::new();
    for release in releases {
        let outcome = db
            .outcome_of(&args.service, release.number)?
            .map(|o| o.outcome);
        rows.push(HistoryRow { release, outcome });
    }
    ctx.reporter.emit(&HistoryResult(rows))
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    pub service: String,
    /// The release to restore (default: the last completed release before the current one)
    #[arg(long)]
    pub to: Option<u64>,
    #[arg(long)]
    pub no_wait: bool,
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub fn rollback(ctx: &Context, args: RollbackArgs) -> Result<()> {
    let home = DeployHome::new(ctx);
    let mut db = home.open_db()?;
    let store = ctx.store()?;
    let since = db.last_event_seq()?;
    // The same code path as the API's rollback action.
    let (release, restored) =
        imago_deploy::actions::rollback(&mut db, &store, &args.service, args.to, &actor())?;
    ctx.reporter.status(format!(
        "service {}: release {} restores release {restored} (image and configuration)",
        args.service, release.number
    ));
    follow_release(
        ctx,
        &home,
        release,
        since,
        args.no_wait,
        args.timeout,
        "rollback",
    )
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    pub service: String,
    #[arg(long)]
    pub no_wait: bool,
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `imago restart`: new instances of the desired release's image and configuration, rolled
/// out like an update.
pub fn restart(ctx: &Context, args: RestartArgs) -> Result<()> {
    let home = DeployHome::new(ctx);
    let mut db = home.open_db()?;
    let since = db.last_event_seq()?;
    // The same code path as the API's restart action.
    let release = imago_deploy::actions::restart(&mut db, &args.service, &actor())?;
    ctx.reporter.status(format!(
        "service {}: release {} restarts every instance (restart {} of the same image and configuration)",
        args.service, release.number, release.restart
    ));
    follow_release(
        ctx,
        &home,
        release,
        since,
        args.no_wait,
        args.timeout,
        "restart",
    )
}

/// After `rollback` or `restart` recorded `release`: makes sure a controller runs, then either
/// reports the release as pending (`--no-wait`) or waits for its outcome and fails unless it
/// completed.
fn follow_release(
    ctx: &Context,
    home: &DeployHome,
    release: Release,
    since: u64,
    no_wait: bool,
    timeout: Duration,
    what: &str,
) -> Result<()> {
    ensure_controller(ctx, home, &[])?;
    if no_wait {
        return ctx
            .reporter
            .emit(&ApplyResult(vec![pending(&release, true)]));
    }
    let service = release.service.clone();
    let results = wait_for(ctx, home, vec![(release, true)], since, timeout)?;
    let failed = results.iter().any(|r| r.outcome != "complete");
    ctx.reporter.emit(&ApplyResult(results))?;
    if failed {
        bail!("{what} of {service} did not complete");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct PauseArgs {
    pub service: String,
}

/// What `imago pause` and `imago resume` did.
#[derive(Serialize)]
struct PauseResult {
    service: String,
    paused: bool,
    /// False when the service already was as asked.
    changed: bool,
}

impl Render for PauseResult {
    fn human(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let what = if self.paused { "paused" } else { "resumed" };
        if self.changed {
            writeln!(out, "service {}: rollouts {what}", self.service)
        } else {
            writeln!(
                out,
                "service {}: rollouts were {what} already",
                self.service
            )
        }
    }
}

/// `imago pause` (`pause`) and `imago resume`: a paused service's rollouts launch and retire
/// nothing until it is resumed, through controller restarts.
pub fn set_paused(ctx: &Context, args: PauseArgs, pause: bool) -> Result<()> {
    let home = DeployHome::new(ctx);
    let db = home.open_db()?;
    // The same code path as the API's pause and resume actions.
    let changed = imago_deploy::actions::set_paused(&db, &args.service, pause, &actor())?;
    daemon::nudge_controller(&home);
    ctx.reporter.emit(&PauseResult {
        service: args.service,
        paused: pause,
        changed,
    })
}

/// The result of a release handed to the controller without waiting for its rollout.
fn pending(release: &Release, changed: bool) -> ServiceResult {
    ServiceResult {
        service: release.service.clone(),
        release: release.number,
        digest: release.image_digest.clone(),
        changed,
        outcome: "pending".into(),
        detail: String::new(),
        rolled_back_to: None,
    }
}

#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// The services to destroy (their release history is kept)
    #[arg(required = true, num_args = 1..)]
    pub services: Vec<String>,
}

#[derive(Serialize)]
struct Destroyed {
    service: String,
    stopped: usize,
}

#[derive(Serialize)]
#[serde(transparent)]
struct DestroyResult(Vec<Destroyed>);

impl Render for DestroyResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for d in &self.0 {
            writeln!(
                out,
                "service {} destroyed ({} instances stopped)",
                d.service, d.stopped
            )?;
        }
        Ok(())
    }
}

/// Destroys every service named, each on its own: one that cannot be destroyed (unknown, or an
/// instance that will not go) is reported and does not stop the others.
pub fn destroy(ctx: &Context, args: DestroyArgs) -> Result<()> {
    let home = DeployHome::new(ctx);
    let mut db = home.open_db()?;
    let store = ctx.store()?;
    let provider = local_provider(ctx, store)?;
    let mut destroyed = Vec::new();
    let mut failures = Vec::new();
    for service in &args.services {
        match destroy_one(ctx, &home, &mut db, &provider, service) {
            Ok(stopped) => destroyed.push(Destroyed {
                service: service.clone(),
                stopped,
            }),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    // Once per command, not per instance: also what killed launches and cleanups left behind.
    provider.sweep_abandoned();
    if !failures.is_empty() {
        // What was destroyed is still said, on stderr, since the error is the result.
        for d in &destroyed {
            ctx.reporter.status(format!(
                "service {} destroyed ({} instances stopped)",
                d.service, d.stopped
            ));
        }
        bail!("{}", failures.join("\n"));
    }
    ctx.reporter.emit(&DestroyResult(destroyed))
}

/// Records `service` destroyed and stops and removes its instances; returns how many.
fn destroy_one(
    ctx: &Context,
    home: &DeployHome,
    db: &mut StateDb,
    provider: &LocalProvider,
    service: &str,
) -> Result<usize> {
    match db.destroy(service, &actor()) {
        Ok(()) => {}
        // Destroyed before: run the cleanup again (an earlier destroy may have been interrupted).
        Err(imago_deploy::DeployError::NoRelease(_))
            if db.all_services()?.iter().any(|(s, _)| s == service) => {}
        Err(e) => return Err(e.into()),
    }
    // A running controller acts on it at once, as on an apply or a pause: it stops launching
    // the service and drops what it keeps for it (a cluster service's task watch and its ssh
    // tunnel), instead of at its next pass, up to its interval later.
    daemon::nudge_controller(home);
    // Without a controller, the data plane still serves the endpoint: close it (the data plane
    // ends once it serves nothing).
    imago_deploy::dataplane::close_endpoint(home, service)?;
    // A service on a cluster target: its engine removes the service and its tasks.
    if let Some(target) = db
        .history(service)?
        .pop()
        .and_then(|r| r.spec.cluster_target().cloned())
    {
        let factory = cluster_engines().ok_or_else(|| {
            anyhow!(
                "service {service}: this imago has no engine for target {}",
                target.name
            )
        })?;
        let removed = factory(&target)?.destroy(service)?;
        ctx.reporter.status(format!(
            "service {service}: {} service {}",
            target.spec.engine,
            if removed { "removed" } else { "already gone" }
        ));
    }
    // The controller stops them too; doing it here makes destroy work without one. Both may
    // act on the same instance at once, so an instance that is already gone counts as done, and
    // one failure does not leave the others running. A launch of the service under way (the
    // controller's, begun before it saw the service destroyed) is waited for and its instance
    // removed too: it would be left after this command otherwise.
    let mut stopped = 0;
    let mut failures = Vec::new();
    let mut done = std::collections::BTreeSet::new();
    let deadline = Instant::now() + DESTROY_LAUNCH_WAIT;
    loop {
        let ours = |labels: &BTreeMap<String, String>| {
            labels.get(LABEL_SERVICE).map(String::as_str) == Some(service)
        };
        // The launches under way first, then the instances: a launch whose marker this
        // listing missed as it went had recorded its instance before (see
        // `LocalProvider::make_instance_dir`), so the list below shows it.
        let under_way = provider.launches_under_way();
        let mut launching = 0;
        for instance in provider.list()? {
            if !ours(&instance.labels) || done.contains(&instance.id) {
                continue;
            }
            // Its launcher is still at work; it is running or failed in a moment.
            if instance.status == imago_runtime::Status::Created && Instant::now() < deadline {
                launching += 1;
                continue;
            }
            let grace = stop_grace(db, service, &instance)?;
            ctx.reporter.status(format!("stopping {}", instance.id));
            match stop_and_remove(provider, &instance.id, grace) {
                Ok(()) => stopped += 1,
                Err(e) => failures.push(format!("{}: {e}", instance.id)),
            }
            done.insert(instance.id);
        }
        // Without a spec yet, it may be ours.
        launching += under_way
            .iter()
            .filter(|(id, _)| !done.contains(id))
            .filter(|(_, spec)| spec.as_ref().is_none_or(|s| ours(&s.labels)))
            .count();
        if launching == 0 {
            break;
        }
        if Instant::now() >= deadline {
            failures.push(format!(
                "{launching} launches of it still under way after {} s",
                DESTROY_LAUNCH_WAIT.as_secs()
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !failures.is_empty() {
        bail!(
            "service {service} destroyed, but some instances could not be removed: {}",
            failures.join("; ")
        );
    }
    Ok(stopped)
}

/// How long `destroy` waits for the launches of the service under way to end, so that it
/// removes their instances too: a launch may unpack an image first.
const DESTROY_LAUNCH_WAIT: Duration = Duration::from_secs(120);

fn stop_and_remove(
    provider: &LocalProvider,
    id: &str,
    grace: Duration,
) -> Result<(), imago_runtime::RuntimeError> {
    use imago_runtime::RuntimeError::{NoSuchInstance, WrongState};
    for _ in 0..3 {
        match provider.stop(id, grace) {
            Ok(_) | Err(NoSuchInstance(_)) => {}
            Err(e) => return Err(e),
        }
        match provider.remove(id) {
            Ok(()) | Err(NoSuchInstance(_)) => return Ok(()),
            // Started or restarted by a racing launcher: stop it again.
            Err(WrongState { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    provider.remove(id)
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    pub service: Option<String>,
    /// Only events after this sequence number
    #[arg(long, default_value_t = 0)]
    pub since: u64,
}

#[derive(Serialize)]
struct EventList(Vec<Event>);

impl Render for EventList {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for e in &self.0 {
            let service = e.service.as_deref().unwrap_or("-");
            writeln!(
                out,
                "{:>6} {} {:<10} {:<14} {}",
                e.seq, e.at_ms, service, e.kind, e.message
            )?;
        }
        Ok(())
    }
}

pub fn events(ctx: &Context, args: EventsArgs) -> Result<()> {
    let db = DeployHome::new(ctx).open_db()?;
    ctx.reporter
        .emit(&EventList(db.events(args.service.as_deref(), args.since)?))
}

// ---- drift -------------------------------------------------------------------------------------

#[derive(Debug, Args)]
pub struct DriftArgs {
    /// Also hash every file of every instance's root filesystem against its image
    #[arg(long)]
    pub deep: bool,
}

#[derive(Serialize)]
struct DriftReport(Vec<Finding>);

impl Render for DriftReport {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.0.is_empty() {
            return writeln!(out, "no drift: every instance runs what its release says");
        }
        for f in &self.0 {
            writeln!(
                out,
                "{} ({}): {}: {}",
                f.instance,
                f.service.as_deref().unwrap_or("no service"),
                f.kind,
                f.detail
            )?;
        }
        Ok(())
    }
}

pub fn drift(ctx: &Context, args: DriftArgs) -> Result<()> {
    let home = DeployHome::new(ctx);
    let db = home.open_db()?;
    let store = ctx.store()?;
    let provider = local_provider(ctx, store)?;
    let cache = provider.rootfs_cache();
    let DriftCheck {
        findings,
        set_aside,
    } = drift::check(&db, &provider.list()?, &cache, args.deep, &actor())?;
    let mut findings = findings;
    if let Some(engines) = cluster_engines() {
        findings.extend(drift::check_cluster(&db, &engines)?);
    }
    for message in set_aside {
        ctx.reporter.status(message);
    }
    let drifted = !findings.is_empty();
    ctx.reporter.emit(&DriftReport(findings))?;
    if drifted {
        bail!("drift found");
    }
    Ok(())
}

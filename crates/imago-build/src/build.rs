//! Building one image: layers (from the cache or written now), then config and manifest.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use imago_layer::Compression;
use imago_layer::writer::{LayerDigests, LayerWriter};
use imago_oci::{Digest, Reference, media, to_canonical_json};
use imago_store::{BlobWriter, Store};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::Digest as _;

use crate::BuildError;
use crate::cache::{Cache, ContentHash, FileLookup, LayerRecord};
use crate::definition::StepNetwork;
use crate::definition::{CompressionName, DefinitionFile, ImageDef};
use crate::plan::{Context, EntryKind, LayerPlan, plan_layer};
use crate::step::{DiffKind, PlannedMount, StepPlan};
use imago_spec::step::{Engine, STANDARD_MOUNT_POINTS, SandboxMount, SandboxSpec, StepExit};

/// Manifest annotation naming the compressor that produced the new layers.
pub const ANNOTATION_COMPRESSOR: &str = "dev.imago.build.compressor";
pub const ANNOTATION_BASE_DIGEST: &str = "org.opencontainers.image.base.digest";
pub const ANNOTATION_BASE_NAME: &str = "org.opencontainers.image.base.name";

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The one time that enters the image: every mtime and `created` (SOURCE_DATE_EPOCH, or 0).
    pub source_date_epoch: u64,
    /// `<home>/build-cache`, or `None` to build without the cache.
    pub cache_dir: Option<PathBuf>,
    /// Rebuild and compare with the stored `NAME:latest` instead of storing anything.
    pub check: bool,
    /// Where and how `run` steps run; a definition with a `run` layer needs it.
    pub sandbox: Option<SandboxOptions>,
    /// `--arg KEY=VALUE`: values for the images' `[image.NAME.args]`.
    pub args: std::collections::BTreeMap<String, String>,
    /// `--no-cache-filter LAYER`: `run` steps (by layer name) that run again even if cached.
    pub no_cache_layers: Vec<String>,
}

/// Runs one `run` step in a sandbox. The builder plans the step and turns what it changed into a
/// layer; running it is the container runtime's job, which the CLI hands in (imago-runtime's
/// sandbox helper), so that this crate does not link a container engine.
pub trait StepRunner: Send + Sync + std::fmt::Debug {
    /// Runs `spec`; every line of output (stdout and stderr interleaved) goes to `output` as it
    /// comes. An `Err` means the step could not be run at all, not that it failed.
    fn run(
        &self,
        spec: &SandboxSpec,
        output: &mut dyn FnMut(&[u8]),
    ) -> Result<StepExit, Box<dyn std::error::Error + Send + Sync>>;
}

/// How `run` steps are run.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub runner: std::sync::Arc<dyn StepRunner>,
    pub engine: Engine,
    /// `<home>/build-work`: unpacked roots, the steps' directories and their logs.
    pub work_dir: PathBuf,
    /// `<home>/build-cache/mounts`: the cache mounts' directories, kept between builds.
    pub cache_mounts: PathBuf,
    /// Run steps on a full copy of their root instead of an overlay (the fallback for when
    /// overlayfs cannot be used; `IMAGO_SANDBOX_COPY=1` for imago build).
    pub copy_root: bool,
}

/// Progress, for the caller's reporter.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    LayerStarted {
        image: &'a str,
        index: usize,
        count: usize,
        name: Option<&'a str>,
        files: usize,
        bytes: u64,
    },
    /// Uncompressed content bytes written so far in the current layer.
    LayerProgress {
        bytes: u64,
    },
    LayerFinished {
        cached: bool,
    },
    /// A line of a `run` step's output (with its newline, if it had one).
    StepOutput {
        image: &'a str,
        layer: &'a str,
        line: &'a [u8],
    },
    /// A step ran and its layer was written: where the time went. `sandbox` is the helper's
    /// whole life (overlay, containers created, the commands, containers deleted), `diff` the
    /// comparison of its changes with its root, `layer` the tar, compression, hashing and the
    /// blob's commit (those run at the same time, in the layer writer's threads).
    StepCaptured {
        image: &'a str,
        layer: &'a str,
        sandbox: std::time::Duration,
        diff: std::time::Duration,
        write: std::time::Duration,
        entries: usize,
        bytes: u64,
    },
    /// Something of a step's result left out of its layer (fifos, sockets).
    StepWarning {
        image: &'a str,
        layer: &'a str,
        message: &'a str,
    },
    /// `--check` reran a `run` step: whether its layer is the stored one, and if not the
    /// first paths that differ (with what differs). A step with `network = "host"` is not
    /// hermetic: its result may depend on the world.
    StepChecked {
        image: &'a str,
        layer: &'a str,
        identical: bool,
        hermetic: bool,
        differences: &'a [String],
    },
    /// The base archive is about to be read and hashed (the build cache did not know it, or
    /// `--check`): worth a status line, as a large archive takes a while.
    BaseArchive {
        image: &'a str,
        path: &'a Path,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct BuiltLayer {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: String,
    /// Taken from the base image.
    pub from_base: bool,
    /// Reused from the build cache without writing anything.
    pub cached: bool,
}

impl BuiltLayer {
    /// A layer this build made (or found in its cache).
    fn new(record: LayerRecord, cached: bool) -> BuiltLayer {
        BuiltLayer {
            digest: record.blob_digest,
            diff_id: record.diff_id,
            size: record.blob_size,
            media_type: record.media_type,
            from_base: false,
            cached,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BuiltImage {
    pub name: String,
    pub digest: Digest,
    pub manifest_size: u64,
    pub config_digest: Digest,
    pub layers: Vec<BuiltLayer>,
    pub base: Option<String>,
    /// Total of manifest, config and layer sizes.
    pub size: u64,
    #[serde(skip)]
    pub manifest: Vec<u8>,
    #[serde(skip)]
    pub config: Vec<u8>,
}

/// Where new blobs go: the store, or nowhere (`--check` only needs the digests).
enum Sink {
    Store(BlobWriter),
    Discard(imago_oci::HashingWriter<io::Sink>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Store(w) => w.write(buf),
            Sink::Discard(h) => h.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Store(w) => w.flush(),
            Sink::Discard(_) => Ok(()),
        }
    }
}

struct Base {
    name: String,
    digest: Digest,
    layers: Vec<Value>,
    layer_info: Vec<BuiltLayer>,
    config: Value,
}

pub fn build_image(
    store: &Store,
    file: &DefinitionFile,
    name: &str,
    options: &BuildOptions,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<BuiltImage, BuildError> {
    let Some(image) = file.definition.image.get(name) else {
        return Err(BuildError::UnknownImage {
            name: name.to_owned(),
            file: file.path.clone(),
            defined: file.definition.image.keys().cloned().collect(),
        });
    };
    // The name becomes NAME:latest: refuse a name that cannot be one before doing any work.
    let reference = Reference::named(name, imago_oci::reference::DEFAULT_TAG)?;
    // Holds gc off from the first blob written until the image is tagged.
    let _guard = store.write_guard()?;
    let mut cache = match (&options.cache_dir, options.check) {
        (Some(dir), false) => Cache::open(dir),
        _ => Cache::disabled(),
    };
    let compression = match image.compression {
        Some(CompressionName::Zstd) => Compression::Zstd,
        _ => Compression::Gzip,
    };
    let context_dir = match &image.context {
        Some(c) => file.dir().join(c.get_ref()),
        None => file.dir().to_owned(),
    };
    let context = Context::open(&context_dir).map_err(|e| match e {
        BuildError::Io { source, .. } => match &image.context {
            Some(c) => file.error(
                c.span(),
                format!(
                    "build context {} cannot be opened: {source}",
                    context_dir.display()
                ),
                "context is relative to the directory of imago.toml",
            ),
            None => BuildError::Io {
                path: context_dir.clone(),
                source,
            },
        },
        other => other,
    })?;
    // Plan every layer and check the config first, so that a definition error anywhere fails
    // before any work.
    let plans = image
        .layers
        .iter()
        .map(|l| plan_layer(file, &context, l))
        .collect::<Result<Vec<_>, _>>()?;
    let steps = image
        .layers
        .iter()
        .map(|l| crate::step::plan_step(file, &context, l))
        .collect::<Result<Vec<_>, _>>()?;
    // Layers that a later step runs on must be in the store to be unpacked, also for --check.
    let last_step = steps.iter().rposition(Option::is_some);
    let base = load_base(store, file, name, image, &cache, options.check, progress)?;
    let created = rfc3339(options.source_date_epoch);
    config_json(file, image, base.as_ref(), &plans, &[], &created)?;

    let mut layers: Vec<BuiltLayer> = base
        .as_ref()
        .map(|b| b.layer_info.clone())
        .unwrap_or_default();
    let count = plans.len();
    let mut step_differences: std::collections::BTreeMap<usize, Vec<String>> = Default::default();
    for (index, plan) in plans.iter().enumerate() {
        progress(Event::LayerStarted {
            image: name,
            index,
            count,
            name: plan.name.as_deref(),
            files: plan.file_count(),
            bytes: plan.file_bytes(),
        });
        let label = plan.name.clone().unwrap_or_else(|| (index + 1).to_string());
        if let Some(step) = &steps[index] {
            let layer_index = layers.len();
            let mut step = step.clone();
            for (k, default) in &image.args {
                let value = options.args.get(k).unwrap_or(default);
                step.args.insert(k.clone(), value.clone());
            }
            let (record, cached) = build_step_layer(
                store,
                &mut cache,
                &step,
                &layers,
                base.as_ref().map(|b| &b.config),
                compression,
                options,
                (name, &label),
                progress,
            )?;
            if options.check {
                let differences = check_step(store, name, layer_index, &record)?;
                if !differences.is_empty() {
                    step_differences.insert(layer_index, differences.clone());
                }
                progress(Event::StepChecked {
                    image: name,
                    layer: &label,
                    identical: differences.is_empty(),
                    hermetic: step.network == StepNetwork::None,
                    differences: &differences,
                });
            }
            progress(Event::LayerFinished { cached });
            layers.push(BuiltLayer::new(record, cached));
            continue;
        }
        let keep = last_step.is_some_and(|last| index < last);
        let (record, cached) = build_layer(
            store,
            &mut cache,
            plan,
            compression,
            options,
            keep,
            progress,
        )
        .map_err(|e| match e {
            LayerFailure::Writer(source) => BuildError::Layer {
                image: name.to_owned(),
                layer: label,
                source,
            },
            LayerFailure::Other(e) => e,
        })?;
        progress(Event::LayerFinished { cached });
        layers.push(BuiltLayer::new(record, cached));
    }
    cache.save();

    let config = config_json(file, image, base.as_ref(), &plans, &layers, &created)?;
    let config_bytes = to_canonical_json(&config)?;
    let config_digest = Digest::of(&config_bytes);

    let mut annotations = Map::new();
    for (k, v) in &image.annotations {
        annotations.insert(k.clone(), Value::String(v.clone()));
    }
    annotations.insert(imago_oci::ANNOTATION_CREATED.into(), Value::String(created));
    if !plans.is_empty() {
        annotations.insert(
            ANNOTATION_COMPRESSOR.into(),
            Value::String(compression.implementation().into()),
        );
    }
    if let Some(b) = &base {
        annotations.insert(
            ANNOTATION_BASE_DIGEST.into(),
            Value::String(b.digest.to_string()),
        );
        annotations.insert(ANNOTATION_BASE_NAME.into(), Value::String(b.name.clone()));
    }
    let mut manifest_layers: Vec<Value> =
        base.as_ref().map(|b| b.layers.clone()).unwrap_or_default();
    for layer in layers.iter().filter(|l| !l.from_base) {
        manifest_layers.push(json!({
            "mediaType": layer.media_type,
            "digest": layer.digest.to_string(),
            "size": layer.size,
        }));
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {
            "mediaType": media::OCI_CONFIG,
            "digest": config_digest.to_string(),
            "size": config_bytes.len(),
        },
        "layers": manifest_layers,
        "annotations": annotations,
    });
    let manifest_bytes = to_canonical_json(&manifest)?;
    let digest = Digest::of(&manifest_bytes);

    let built = BuiltImage {
        name: name.to_owned(),
        digest,
        manifest_size: manifest_bytes.len() as u64,
        config_digest,
        size: manifest_bytes.len() as u64
            + config_bytes.len() as u64
            + layers.iter().map(|l| l.size).sum::<u64>(),
        layers,
        base: base.map(|b| format!("{}@{}", b.name, b.digest)),
        manifest: manifest_bytes,
        config: config_bytes,
    };
    if options.check {
        compare_with_stored(store, &built, &step_differences)?;
    } else {
        store.put_blob(&built.config)?;
        store.put_blob(&built.manifest)?;
        // A no-op rebuild leaves index.json alone: rewriting it costs two fsyncs.
        if store.resolve_digest(&reference).ok().as_ref() != Some(&built.digest) {
            store.tag(&reference, &built.digest)?;
        }
    }
    Ok(built)
}

/// Runs a `run` step (or finds its layer in the cache) and writes the difference it made.
#[allow(clippy::too_many_arguments)]
fn build_step_layer(
    store: &Store,
    cache: &mut Cache,
    step: &StepPlan,
    parents: &[BuiltLayer],
    base_config: Option<&Value>,
    compression: Compression,
    options: &BuildOptions,
    (image, layer): (&str, &str),
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<(LayerRecord, bool), BuildError> {
    let step_error = |message: String| BuildError::Step {
        image: image.to_owned(),
        layer: layer.to_owned(),
        message,
    };
    let Some(sandbox) = &options.sandbox else {
        return Err(step_error(
            "a run step needs a sandbox, and none was given to the builder".into(),
        ));
    };
    let image_config = base_config.and_then(|c| c.get("config"));
    let image_env = strings(image_config.and_then(|c| c.get("Env")));
    let env = step.environment(&image_env, options.source_date_epoch);
    let cwd = step
        .workdir
        .clone()
        .or_else(|| {
            image_config
                .and_then(|c| c.get("WorkingDir"))
                .and_then(Value::as_str)
                .filter(|w| w.starts_with('/'))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "/".to_owned());
    let parent_ids: Vec<Digest> = parents.iter().map(|l| l.diff_id.clone()).collect();
    let key = step.key(
        &parent_ids,
        &env,
        &cwd,
        compression.implementation(),
        options.source_date_epoch,
    )?;
    let forced = options.no_cache_layers.iter().any(|l| l == layer);
    if !forced
        && let Some(record) = cache.layer(&key)
        && store.has_blob(&record.blob_digest)
    {
        return Ok((record, true));
    }

    let mut skipped = Vec::new();
    let (chain, _lease) = ensure_chain(store, &sandbox.work_dir, parents, &mut skipped)?;
    for (digest, paths) in &skipped {
        let shown: Vec<String> = paths.iter().take(5).map(|p| format!("/{p}")).collect();
        let more = paths.len().saturating_sub(shown.len());
        let message = format!(
            "layer {digest} has {} device files, left out of the step's root (the sandbox has its own /dev): {}{}",
            paths.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
        progress(Event::StepWarning {
            image,
            layer,
            message: &message,
        });
    }
    let steps_dir = sandbox.work_dir.join("steps");
    fs::create_dir_all(&steps_dir).map_err(|e| io_error(&steps_dir, e))?;
    let step_dir = StepDir(
        tempfile::Builder::new()
            .prefix("s")
            .tempdir_in(&steps_dir)
            .map_err(|e| io_error(&steps_dir, e))?
            .keep(),
    );
    let _step_lock = crate::work::lock_step_dir(step_dir.path())?;
    let id = step_dir
        .path()
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "x")
        })
        .unwrap_or_default();
    let mut mounts = Vec::new();
    for m in &step.mounts {
        mounts.push(match m {
            PlannedMount::Bind { source, dest, .. } => SandboxMount::Bind {
                source: source.clone(),
                dest: dest.clone(),
                read_only: true,
            },
            PlannedMount::Cache { id, dest } => {
                let dir = sandbox.cache_mounts.join(id);
                fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
                SandboxMount::Bind {
                    source: dir,
                    dest: dest.clone(),
                    read_only: false,
                }
            }
            PlannedMount::Tmpfs { dest } => SandboxMount::Tmpfs { dest: dest.clone() },
        });
    }
    // A step on the host's network resolves names as the host does (as `docker build` does);
    // the file is a mount, so it never enters the layer.
    let resolv = Path::new("/etc/resolv.conf");
    let host_dns = step.network == StepNetwork::Host
        && resolv.is_file()
        && !step.mounts.iter().any(|m| m.dest() == "/etc/resolv.conf");
    if host_dns {
        mounts.push(SandboxMount::Bind {
            source: resolv.to_owned(),
            dest: "/etc/resolv.conf".to_owned(),
            read_only: true,
        });
    }
    let spec = SandboxSpec {
        id: format!("imago-build-{id}"),
        lower: chain.clone(),
        dir: step_dir.path().to_owned(),
        commands: step.commands.clone(),
        env,
        cwd,
        uid: step.uid,
        gid: step.gid,
        host_network: step.network == StepNetwork::Host,
        mounts,
        memory_bytes: step.memory_bytes,
        pids: step.pids,
        timeout_ms: step.timeout.as_millis() as u64,
        engine: sandbox.engine,
        copy_root: sandbox.copy_root,
    };
    // The whole output is kept next to the steps; the error quotes its end.
    let logs = sandbox.work_dir.join("logs");
    fs::create_dir_all(&logs).map_err(|e| io_error(&logs, e))?;
    let log_path = logs.join(format!("{image}.{}.log", layer.replace('/', "_")));
    let mut log = File::create(&log_path).map_err(|e| io_error(&log_path, e))?;
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let started = Instant::now();
    let exit = sandbox
        .runner
        .run(&spec, &mut |line| {
            let _ = log.write_all(line);
            if tail.len() == STEP_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(String::from_utf8_lossy(line).trim_end().to_owned());
            progress(Event::StepOutput { image, layer, line });
        })
        .map_err(|e| step_error(e.to_string()))?;
    if exit.code != 0 || exit.timed_out {
        return Err(BuildError::StepFailed {
            image: image.to_owned(),
            layer: layer.to_owned(),
            code: exit.code,
            timed_out: exit.timed_out,
            last_lines: tail.into(),
        });
    }
    let mut mount_points: Vec<Vec<u8>> = STANDARD_MOUNT_POINTS
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    for m in &spec.mounts {
        mount_points.push(m.dest().trim_start_matches('/').as_bytes().to_vec());
    }
    let ran = Instant::now();
    let mut warnings = Vec::new();
    let entries = crate::step::diff(
        (image, layer),
        &chain,
        &spec.changes(&exit),
        exit.copied,
        &mount_points,
        &mut |w| warnings.push(w),
    )?;
    for message in &warnings {
        progress(Event::StepWarning {
            image,
            layer,
            message,
        });
    }
    let diffed = Instant::now();
    let layer_error = |source| BuildError::Layer {
        image: image.to_owned(),
        layer: layer.to_owned(),
        source,
    };
    let mtime = options.source_date_epoch;
    let mut writer =
        LayerWriter::new(store.blob_writer()?, compression, mtime).map_err(layer_error)?;
    for entry in &entries {
        let path = entry.path.as_slice();
        match &entry.kind {
            DiffKind::Dir => writer.add_dir(path, entry.meta),
            DiffKind::Symlink(target) => {
                writer.add_symlink(path, target, entry.meta.uid, entry.meta.gid)
            }
            DiffKind::Hardlink(target) => writer.add_hardlink(path, target, entry.meta),
            DiffKind::Whiteout => writer.add_file(path, entry.meta, 0, io::empty()),
            DiffKind::File { source, size } => {
                let f = File::open(source).map_err(|e| io_error(source, e))?;
                writer.add_file(path, entry.meta, *size, f)
            }
        }
        .map_err(layer_error)?;
    }
    let (LayerDigests { diff_id, tar_size }, sink) = writer.finish().map_err(layer_error)?;
    let (blob_digest, blob_size) = sink.commit()?;
    progress(Event::StepCaptured {
        image,
        layer,
        sandbox: ran - started,
        diff: diffed - ran,
        write: diffed.elapsed(),
        entries: entries.len(),
        bytes: tar_size,
    });
    let record = LayerRecord {
        diff_id,
        blob_digest,
        blob_size,
        media_type: compression.layer_media_type().to_owned(),
    };
    if !options.check {
        cache.record_layer(&key, &record);
    }
    Ok((record, false))
}

/// A step's directory (its overlay upper directory holds everything the step wrote), removed
/// when the step is done, failed or not. Removing a large tree costs seconds of disk time here
/// (10,000 files of 500 MB: 10 s on this machine's disk), so the directory is renamed out of
/// the way at once and removed by a detached `rm -rf`, whose exit a thread collects.
struct StepDir(PathBuf);

impl StepDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StepDir {
    fn drop(&mut self) {
        let trash = self.0.with_extension("removing");
        if fs::rename(&self.0, &trash).is_err() {
            let _ = fs::remove_dir_all(&self.0);
            return;
        }
        let spawned = std::process::Command::new("rm")
            .arg("-rf")
            .arg("--")
            .arg(&trash)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match spawned {
            Ok(mut child) => {
                std::thread::spawn(move || child.wait());
            }
            Err(_) => {
                let _ = fs::remove_dir_all(&trash);
            }
        }
    }
}

/// Lines of a failed step's output quoted in its error.
const STEP_TAIL_LINES: usize = 20;

/// The root that `parents` make, unpacked once under `<work>/chains/<sha256 of their
/// diff_ids>` (into a scratch directory, renamed into place when complete) and never written
/// afterwards: steps see it through an overlay.
///
/// Device nodes of the layers are left out (rootless buildah does the same): the step gets its
/// own `/dev` from the runtime, and a node in the chain would be a real device on the host's
/// file system. Each layer that had some is added to `skipped` with their paths, for a warning;
/// only when this call unpacks the chain.
fn ensure_chain(
    store: &Store,
    work: &Path,
    parents: &[BuiltLayer],
    skipped: &mut Vec<(Digest, Vec<String>)>,
) -> Result<(PathBuf, crate::work::ChainLease), BuildError> {
    let diff_ids: Vec<&Digest> = parents.iter().map(|p| &p.diff_id).collect();
    let key = crate::work::chain_key(&diff_ids);
    let chains = work.join("chains");
    // Before looking: from here until the lease is dropped, gc leaves the chain alone.
    let lease = crate::work::lease_chain(&chains, &key)?;
    let dir = chains.join(key.hex());
    if dir.is_dir() {
        return Ok((dir, lease));
    }
    let scratch = tempfile::Builder::new()
        .prefix(&format!(".unpack-{}-", key.hex()))
        .tempdir_in(&chains)
        .map_err(|e| io_error(&chains, e))?;
    let options = imago_layer::unpack::UnpackOptions {
        skip_devices: true,
        ..imago_layer::unpack::UnpackOptions::default()
    };
    for layer in parents {
        let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
            BuildError::Internal(format!(
                "layer {} has media type {}, which cannot be unpacked",
                layer.digest, layer.media_type
            ))
        })?;
        let mut blob = store.open_blob(&layer.digest, Some(layer.size))?;
        let path = store.blob_path(&layer.digest);
        let stream = imago_layer::compression::decompress(compression, &mut blob)
            .map_err(|e| io_error(&path, e))?;
        // The chain is named by the diff_ids the image claims and shared by every build whose
        // parents claim the same: content that is not what its diff_id says must never be kept
        // there, or a base that lies would hand its files to the steps of an honest one.
        let mut hashed = imago_oci::HashingReader::new(stream);
        let stats = imago_layer::unpack::apply_layer(&mut hashed, scratch.path(), &options)
            .map_err(|e| BuildError::Internal(format!("unpacking layer {}: {e}", layer.digest)))?;
        io::copy(&mut hashed, &mut io::sink()).map_err(|e| io_error(&path, e))?;
        let (actual, _, _) = hashed.finish();
        // The decompressor may stop at the end of its stream: read (and verify) the rest.
        blob.finish()?;
        if actual != layer.diff_id {
            return Err(imago_store::StoreError::DiffIdMismatch {
                digest: layer.digest.clone(),
                expected: layer.diff_id.clone(),
                actual,
            }
            .into());
        }
        if !stats.skipped_devices.is_empty() {
            skipped.push((layer.digest.clone(), stats.skipped_devices));
        }
    }
    let scratch = scratch.keep();
    if let Err(e) = fs::rename(&scratch, &dir) {
        let _ = fs::remove_dir_all(&scratch);
        // Another build made it meanwhile.
        if !dir.is_dir() {
            return Err(io_error(&dir, e));
        }
    }
    Ok((dir, lease))
}

enum LayerFailure {
    Writer(imago_layer::writer::WriterError),
    Other(BuildError),
}

impl From<BuildError> for LayerFailure {
    fn from(e: BuildError) -> Self {
        LayerFailure::Other(e)
    }
}

impl From<imago_store::StoreError> for LayerFailure {
    fn from(e: imago_store::StoreError) -> Self {
        LayerFailure::Other(e.into())
    }
}

/// The images to build for `requested` (all images when empty), each after the images of this
/// file that it is built `from`, so that `imago build` of a child also builds its base first.
pub fn build_order(file: &DefinitionFile, requested: &[String]) -> Result<Vec<String>, BuildError> {
    let images = &file.definition.image;
    let roots: Vec<String> = if requested.is_empty() {
        images.keys().cloned().collect()
    } else {
        requested.to_vec()
    };
    let mut order: Vec<String> = Vec::new();
    let mut visiting: Vec<String> = Vec::new();
    for name in &roots {
        visit(file, name, &mut order, &mut visiting)?;
    }
    return Ok(order);

    fn visit(
        file: &DefinitionFile,
        name: &str,
        order: &mut Vec<String>,
        visiting: &mut Vec<String>,
    ) -> Result<(), BuildError> {
        if order.iter().any(|n| n == name) {
            return Ok(());
        }
        let Some(image) = file.definition.image.get(name) else {
            return Err(BuildError::UnknownImage {
                name: name.to_owned(),
                file: file.path.clone(),
                defined: file.definition.image.keys().cloned().collect(),
            });
        };
        if visiting.iter().any(|n| n == name) {
            let span = image.from.as_ref().map_or(0..0, |f| f.span());
            return Err(file.error(
                span,
                format!(
                    "image {name} is built from itself through: {}",
                    visiting.join(" -> ")
                ),
                "break the cycle of `from` references",
            ));
        }
        if let Some(from) = &image.from
            && let Some(base) = local_base(file, from.get_ref())
        {
            visiting.push(name.to_owned());
            visit(file, &base, order, visiting)?;
            visiting.pop();
        }
        order.push(name.to_owned());
        Ok(())
    }
}

/// The image of this file that `from` names, if any: `NAME` or `NAME:latest`.
fn local_base(file: &DefinitionFile, from: &str) -> Option<String> {
    let name = from.strip_suffix(":latest").unwrap_or(from);
    file.definition
        .image
        .contains_key(name)
        .then(|| name.to_owned())
}

/// Reuses a stored layer when every input is known, else writes it.
fn build_layer(
    store: &Store,
    cache: &mut Cache,
    plan: &LayerPlan,
    compression: Compression,
    options: &BuildOptions,
    keep_blob: bool,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<(LayerRecord, bool), LayerFailure> {
    let entries = plan.sorted();
    let mtime = options.source_date_epoch;
    // With every file's fingerprint trusted, the fingerprints stand for the content: a layer
    // built from them before is found without hashing or loading any per-file record.
    let stamp_key = (cache.enabled()
        && entries.iter().all(|(_, e)| match &e.kind {
            EntryKind::File { stamp, .. } => cache.trusted(stamp),
            _ => true,
        }))
    .then(|| layer_key(&entries, FileIds::Stamps, compression, mtime));
    if let Some(key) = &stamp_key
        && let Some(record) = cache.layer(key)
        && store.has_blob(&record.blob_digest)
    {
        return Ok((record, true));
    }
    if cache.enabled() {
        // Content digests from fingerprints; stale ones are re-hashed (cheap next to compressing).
        // If some file was never seen the layer is new: build it straight away and read each
        // file once.
        let mut digests = Vec::with_capacity(entries.len());
        let mut unknown = false;
        for (_, entry) in &entries {
            if let EntryKind::File { source, stamp } = &entry.kind {
                match cache.file(source, stamp) {
                    FileLookup::Hit(d) => digests.push(Some(d)),
                    FileLookup::Stale => {
                        let d = hash_file(source)?;
                        cache.record_file(source, *stamp, d.clone());
                        digests.push(Some(d));
                    }
                    FileLookup::Unknown => {
                        unknown = true;
                        break;
                    }
                }
            } else {
                digests.push(None);
            }
        }
        if !unknown {
            let key = layer_key(&entries, FileIds::Content(&digests), compression, mtime);
            if let Some(record) = cache.layer(&key)
                && store.has_blob(&record.blob_digest)
            {
                if let Some(stamp_key) = &stamp_key {
                    cache.record_layer(stamp_key, &record);
                }
                return Ok((record, true));
            }
        }
    }

    let sink = if options.check && !keep_blob {
        Sink::Discard(imago_oci::HashingWriter::new(io::sink()))
    } else {
        Sink::Store(store.blob_writer()?)
    };
    let mut writer = LayerWriter::new(sink, compression, mtime).map_err(LayerFailure::Writer)?;
    let mut digests = Vec::with_capacity(entries.len());
    // Whether every file still had its planned fingerprint after it was read.
    let mut unchanged = true;
    let mut done: u64 = 0;
    for (key, entry) in &entries {
        let path = key.strip_suffix(b"/").unwrap_or(key);
        let written = match &entry.kind {
            EntryKind::Dir => writer.add_dir(path, entry.meta),
            EntryKind::Symlink(target) => {
                writer.add_symlink(path, target, entry.meta.uid, entry.meta.gid)
            }
            EntryKind::Hardlink { target } => writer.add_hardlink(path, target, entry.meta),
            EntryKind::Inline(content) => {
                done += content.len() as u64;
                writer.add_file(path, entry.meta, content.len() as u64, &content[..])
            }
            EntryKind::File { source, stamp } => {
                let mut f = File::open(source).map_err(|e| io_error(source, e))?;
                // One read per file: the writer reads it straight into its stream and shows
                // each piece to the content hasher on the way.
                let mut hasher = blake3::Hasher::new();
                writer
                    .add_file_inspecting(path, entry.meta, stamp.size, &mut f, |piece| {
                        hasher.update(piece);
                    })
                    .map_err(LayerFailure::Writer)?;
                let d = ContentHash::from_hasher(&hasher);
                // Record the fingerprint only if what was read is the planned file, unchanged:
                // the open file's stat after the read (no path lookup) must still be the
                // walk's. A file renamed over the path later has another inode, so its
                // fingerprint can never match this record.
                if let Ok(after) = f.metadata()
                    && crate::plan::Stamp::of(&after) == *stamp
                {
                    cache.record_file(source, *stamp, d.clone());
                } else {
                    unchanged = false;
                }
                digests.push(Some(d));
                done += stamp.size;
                progress(Event::LayerProgress { bytes: done });
                continue;
            }
        };
        written.map_err(LayerFailure::Writer)?;
        digests.push(None);
    }
    let (LayerDigests { diff_id, .. }, sink) = writer.finish().map_err(LayerFailure::Writer)?;
    // The store hashes the blob as it is written; --check hashes it on the way to nowhere.
    let (blob_digest, blob_size) = match sink {
        Sink::Store(w) => w.commit()?,
        Sink::Discard(h) => {
            let (digest, size, _) = h.finish();
            (digest, size)
        }
    };
    let record = LayerRecord {
        diff_id,
        blob_digest,
        blob_size,
        media_type: compression.layer_media_type().to_owned(),
    };
    if !options.check {
        let key = layer_key(&entries, FileIds::Content(&digests), compression, mtime);
        cache.record_layer(&key, &record);
        if let Some(stamp_key) = &stamp_key
            && unchanged
        {
            cache.record_layer(stamp_key, &record);
        }
    }
    Ok((record, false))
}

/// What stands for each file's content in a layer key.
enum FileIds<'a> {
    /// Content digests, one per entry (`None` for entries that are not context files).
    Content(&'a [Option<ContentHash>]),
    /// The fingerprints taken by the walk; only meaningful when every one is trusted.
    Stamps,
}

/// Everything that determines a layer's bytes, hashed. Files enter by content digest or, in
/// the second kind of key, by trusted fingerprint (with their source path).
fn layer_key(
    entries: &[(Vec<u8>, &crate::plan::Entry)],
    files: FileIds<'_>,
    compression: Compression,
    mtime: u64,
) -> Digest {
    let mut h = imago_oci::Sha256::new();
    h.update(match files {
        FileIds::Content(_) => &b"imago-layer-key-v1\0"[..],
        FileIds::Stamps => &b"imago-layer-stamp-key-v1\0"[..],
    });
    h.update(compression.implementation().as_bytes());
    h.update(b"\0");
    h.update(mtime.to_le_bytes());
    for (i, (path, entry)) in entries.iter().enumerate() {
        h.update(path);
        h.update(b"\0");
        h.update(entry.meta.mode.to_le_bytes());
        h.update(entry.meta.uid.to_le_bytes());
        h.update(entry.meta.gid.to_le_bytes());
        match &entry.kind {
            EntryKind::Dir => h.update(b"d"),
            EntryKind::Symlink(t) => {
                h.update(b"l");
                h.update((t.len() as u64).to_le_bytes());
                h.update(t);
            }
            EntryKind::Hardlink { target } => {
                h.update(b"h");
                h.update((target.len() as u64).to_le_bytes());
                h.update(target);
            }
            EntryKind::Inline(c) => {
                h.update(b"f");
                h.update(ContentHash::of(c).0.as_bytes());
            }
            EntryKind::File { source, stamp } => {
                h.update(b"f");
                h.update(stamp.size.to_le_bytes());
                match files {
                    FileIds::Content(digests) => {
                        if let Some(Some(d)) = digests.get(i) {
                            h.update(d.0.as_bytes());
                        }
                    }
                    FileIds::Stamps => {
                        let source = source.as_os_str().as_encoded_bytes();
                        h.update((source.len() as u64).to_le_bytes());
                        h.update(source);
                        for n in [stamp.dev, stamp.ino, u64::from(stamp.mode)] {
                            h.update(n.to_le_bytes());
                        }
                        h.update(stamp.mtime_ns.to_le_bytes());
                        h.update(stamp.ctime_ns.to_le_bytes());
                    }
                }
            }
        }
    }
    Digest::from_hasher(h)
}

fn hash_file(path: &Path) -> Result<ContentHash, BuildError> {
    let f = File::open(path).map_err(|e| io_error(path, e))?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(f).map_err(|e| io_error(path, e))?;
    Ok(ContentHash::from_hasher(&hasher))
}

fn io_error(path: &Path, source: io::Error) -> BuildError {
    BuildError::Io {
        path: path.to_owned(),
        source,
    }
}

fn load_base(
    store: &Store,
    file: &DefinitionFile,
    name: &str,
    image: &ImageDef,
    cache: &Cache,
    check: bool,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<Option<Base>, BuildError> {
    let Some(from) = &image.from else {
        return Ok(None);
    };
    let text = from.get_ref().trim();
    if text == "scratch" {
        return Ok(None);
    }
    let (resolved, config_bytes) = if let Some((_, archive)) =
        crate::import::parse_archive_base(text)
    {
        let archive_path = file.dir().join(&archive);
        if !archive_path.is_file() {
            return Err(file.error(
                from.span(),
                format!("base archive {} does not exist", archive_path.display()),
                "archive paths are relative to the directory of imago.toml",
            ));
        }
        let mut reading = || {
            progress(Event::BaseArchive {
                image: name,
                path: &archive_path,
            })
        };
        let base = crate::import::archive_base(store, cache, &archive_path, check, &mut reading)?;
        (base.image, base.config)
    } else {
        let reference: Reference = text.parse().map_err(|e| {
            file.error(
                from.span(),
                format!("invalid base image reference: {e}"),
                "use scratch, NAME[:TAG], NAME@sha256:... or oci-archive:PATH",
            )
        })?;
        let not_found = |e| match e {
            imago_store::StoreError::NotFound(_) => file.error(
                from.span(),
                format!("base image {text} is not in the store"),
                "build or import it first (`imago images` lists the store)",
            ),
            other => other.into(),
        };
        let found = store.resolve_digest(&reference).map_err(not_found)?;
        store.load_image_with_config(&found).map_err(not_found)?
    };
    let config: Value = serde_json::from_slice(&config_bytes).map_err(|e| {
        BuildError::Internal(format!("base config {}: {e}", resolved.config_digest))
    })?;
    let infos = resolved.layers()?;
    let layers = resolved
        .manifest
        .layers()
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BuildError::Internal(format!("base manifest {}: {e}", resolved.digest)))?;
    let layer_info = infos
        .into_iter()
        .map(|l| BuiltLayer {
            diff_id: l.diff_id.unwrap_or_else(|| l.digest.clone()),
            digest: l.digest,
            size: l.size,
            media_type: l.media_type,
            from_base: true,
            cached: true,
        })
        .collect();
    Ok(Some(Base {
        name: text.to_owned(),
        digest: resolved.digest,
        layers,
        layer_info,
        config,
    }))
}

fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ("linux", arch)
}

fn config_json(
    file: &DefinitionFile,
    image: &ImageDef,
    base: Option<&Base>,
    plans: &[LayerPlan],
    layers: &[BuiltLayer],
    created: &str,
) -> Result<Value, BuildError> {
    let mut doc = match base {
        Some(b) => b.config.clone(),
        None => {
            let (os, arch) = host_platform();
            json!({"architecture": arch, "os": os, "config": {}})
        }
    };
    let Some(root) = doc.as_object_mut() else {
        return Err(BuildError::Internal(
            "base config is not a json object".into(),
        ));
    };
    if let Some(p) = &image.platform {
        let parts: Vec<&str> = p.get_ref().split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => {
                root.insert("os".into(), json!(os));
                root.insert("architecture".into(), json!(arch));
                match parts.get(2) {
                    Some(v) => root.insert("variant".into(), json!(v)),
                    None => root.remove("variant"),
                };
            }
            _ => {
                return Err(file.error(
                    p.span(),
                    format!("invalid platform {:?}", p.get_ref()),
                    "write it as os/arch or os/arch/variant, e.g. \"linux/amd64\"",
                ));
            }
        }
    }
    root.insert("created".into(), json!(created));
    // Builders' metadata that would leak the host is never copied from a base.
    for key in [
        "container",
        "container_config",
        "docker_version",
        "hostname",
    ] {
        root.remove(key);
    }

    let c = &image.config;
    let config = root.entry("config").or_insert_with(|| json!({}));
    if !config.is_object() {
        *config = json!({});
    }
    if let Some(cfg) = config.as_object_mut() {
        if let Some(e) = &c.entrypoint {
            cfg.insert("Entrypoint".into(), json!(e));
            // As in a Dockerfile: a new entrypoint drops the base's arguments.
            if c.cmd.is_none() {
                cfg.remove("Cmd");
            }
        }
        if let Some(cmd) = &c.cmd {
            cfg.insert("Cmd".into(), json!(cmd));
        }
        if !c.env.is_empty() {
            let mut env = strings(cfg.get("Env"));
            for (k, v) in &c.env {
                let entry = format!("{k}={v}");
                match env
                    .iter_mut()
                    .find(|e| e.split_once('=').map(|(ek, _)| ek) == Some(k))
                {
                    Some(existing) => *existing = entry,
                    None => env.push(entry),
                }
            }
            cfg.insert("Env".into(), json!(env));
        }
        if let Some(w) = &c.workdir {
            if !w.get_ref().starts_with('/') {
                return Err(file.error(
                    w.span(),
                    format!("workdir {} must be absolute", w.get_ref()),
                    "start it with `/`",
                ));
            }
            cfg.insert("WorkingDir".into(), json!(w.get_ref()));
        }
        if let Some(u) = &c.user {
            cfg.insert("User".into(), json!(u));
        }
        if !c.ports.is_empty() {
            let ports = cfg.entry("ExposedPorts").or_insert_with(|| json!({}));
            for p in &c.ports {
                let key = parse_port(file, p)?;
                if let Some(map) = ports.as_object_mut() {
                    map.insert(key, json!({}));
                }
            }
        }
        if !c.labels.is_empty() {
            let labels = cfg.entry("Labels").or_insert_with(|| json!({}));
            for (k, v) in &c.labels {
                if let Some(map) = labels.as_object_mut() {
                    map.insert(k.clone(), json!(v));
                }
            }
        }
        if let Some(s) = &c.stop_signal {
            cfg.insert("StopSignal".into(), json!(s));
        }
        if !c.volumes.is_empty() {
            let vols = cfg.entry("Volumes").or_insert_with(|| json!({}));
            for v in &c.volumes {
                if !v.get_ref().starts_with('/') {
                    return Err(file.error(
                        v.span(),
                        format!("volume {} must be an absolute path", v.get_ref()),
                        "start it with `/`",
                    ));
                }
                if let Some(map) = vols.as_object_mut() {
                    map.insert(v.get_ref().clone(), json!({}));
                }
            }
        }
    }

    let mut diff_ids: Vec<Value> = Vec::new();
    for l in layers {
        diff_ids.push(json!(l.diff_id.to_string()));
    }
    root.insert(
        "rootfs".into(),
        json!({"type": "layers", "diff_ids": diff_ids}),
    );
    let mut history: Vec<Value> = root
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, plan) in plans.iter().enumerate() {
        let label = match &plan.name {
            Some(n) => format!("imago build: layer {} ({n})", i + 1),
            None => format!("imago build: layer {}", i + 1),
        };
        history.push(json!({"created": created, "created_by": label}));
    }
    root.insert("history".into(), json!(history));
    Ok(doc)
}

/// The strings of a JSON array (such as a config's `Env`); nothing for anything else.
fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn parse_port(
    file: &DefinitionFile,
    port: &serde_spanned::Spanned<String>,
) -> Result<String, BuildError> {
    let text = port.get_ref();
    let (number, proto) = text.split_once('/').unwrap_or((text, "tcp"));
    let ok = number.parse::<u16>().is_ok_and(|n| n > 0) && matches!(proto, "tcp" | "udp" | "sctp");
    if ok {
        Ok(format!("{number}/{proto}"))
    } else {
        Err(file.error(
            port.span(),
            format!("invalid port {text:?}"),
            "write ports as \"8080\", \"8080/tcp\" or \"53/udp\"",
        ))
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time, without reading the clock or the time zone.
pub fn rfc3339(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// How many differing paths a check names per step.
const CHECK_PATHS: usize = 5;

/// `--check` of one `run` step: the paths where its rebuilt layer differs from the layer at
/// the same place in the stored `NAME:latest` (empty when identical or when nothing is stored).
fn check_step(
    store: &Store,
    image: &str,
    index: usize,
    rebuilt: &LayerRecord,
) -> Result<Vec<String>, BuildError> {
    let reference = Reference::named(image, imago_oci::reference::DEFAULT_TAG)?;
    let Ok(stored) = store.resolve(&reference) else {
        return Ok(Vec::new());
    };
    let layers = stored.layers()?;
    let Some(old) = layers.get(index) else {
        return Ok(vec!["the stored image has no layer here".to_owned()]);
    };
    if old.diff_id.as_ref() == Some(&rebuilt.diff_id) || old.digest == rebuilt.blob_digest {
        return Ok(Vec::new());
    }
    let before = layer_summary(store, &old.digest, old.size, &old.media_type)?;
    let after = layer_summary(
        store,
        &rebuilt.blob_digest,
        rebuilt.blob_size,
        &rebuilt.media_type,
    )?;
    let mut out = Vec::new();
    let paths: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for path in paths {
        let what = match (before.get(path), after.get(path)) {
            (Some(_), None) => "only in the stored layer".to_owned(),
            (None, Some(_)) => "only in the rebuild".to_owned(),
            (Some(a), Some(b)) if a != b => {
                let mut parts = Vec::new();
                if a.kind != b.kind {
                    parts.push(format!("type {} -> {}", a.kind, b.kind));
                }
                if a.mode != b.mode {
                    parts.push(format!("mode {:o} -> {:o}", a.mode, b.mode));
                }
                if a.owner != b.owner {
                    parts.push(format!("owner {} -> {}", a.owner, b.owner));
                }
                if a.size != b.size {
                    parts.push(format!("size {} -> {}", a.size, b.size));
                }
                if a.content != b.content {
                    parts.push("content".to_owned());
                }
                parts.join(", ")
            }
            _ => continue,
        };
        out.push(format!("/{path}: {what}"));
        if out.len() == CHECK_PATHS {
            break;
        }
    }
    if out.is_empty() {
        out.push("same entries, different tar bytes".to_owned());
    }
    Ok(out)
}

#[derive(Debug, PartialEq, Eq)]
struct EntrySummary {
    kind: String,
    mode: u32,
    owner: String,
    size: u64,
    /// BLAKE3 of the content, or the link target.
    content: String,
}

/// Every entry of a stored layer blob, by path.
fn layer_summary(
    store: &Store,
    digest: &Digest,
    size: u64,
    media_type: &str,
) -> Result<std::collections::BTreeMap<String, EntrySummary>, BuildError> {
    let path = store.blob_path(digest);
    let compression = Compression::from_media_type(media_type).ok_or_else(|| {
        BuildError::Internal(format!("layer {digest} has media type {media_type}"))
    })?;
    let mut blob = store.open_blob(digest, Some(size))?;
    let stream = imago_layer::compression::decompress(compression, &mut blob)
        .map_err(|e| io_error(&path, e))?;
    let mut archive = tar::Archive::new(imago_layer::tar_limits::ExtensionLimit::new(stream));
    let mut out = std::collections::BTreeMap::new();
    for entry in archive.entries().map_err(|e| io_error(&path, e))? {
        let mut entry = entry.map_err(|e| io_error(&path, e))?;
        let header = entry.header().clone();
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let link = entry
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned());
        let mut hasher = blake3::Hasher::new();
        io::copy(&mut entry, &mut hasher).map_err(|e| io_error(&path, e))?;
        let content = link.unwrap_or_else(|| hasher.finalize().to_hex().to_string());
        out.insert(
            name.trim_end_matches('/').to_owned(),
            EntrySummary {
                kind: format!("{:?}", header.entry_type()),
                mode: header.mode().unwrap_or(0),
                owner: format!(
                    "{}:{}",
                    header.uid().unwrap_or(0),
                    header.gid().unwrap_or(0)
                ),
                size: header.size().unwrap_or(0),
                content,
            },
        );
    }
    Ok(out)
}

/// `--check`: the rebuilt image must equal the stored `NAME:latest`, part by part.
fn compare_with_stored(
    store: &Store,
    built: &BuiltImage,
    step_differences: &std::collections::BTreeMap<usize, Vec<String>>,
) -> Result<(), BuildError> {
    let reference = Reference::named(&built.name, imago_oci::reference::DEFAULT_TAG)?;
    let stored = store.resolve(&reference)?;
    if stored.digest == built.digest {
        return Ok(());
    }
    let mut differences = Vec::new();
    let stored_layers = stored.layers()?;
    if stored_layers.len() != built.layers.len() {
        differences.push(format!(
            "the stored image has {} layers, the rebuild {}",
            stored_layers.len(),
            built.layers.len()
        ));
    }
    for (i, (s, b)) in stored_layers.iter().zip(&built.layers).enumerate() {
        if s.digest != b.digest {
            let tar = if s.diff_id.as_ref() == Some(&b.diff_id) {
                "same tar, different compression"
            } else {
                "different content"
            };
            let paths = step_differences
                .get(&i)
                .map(|d| format!(" (run step; {})", d.join(", ")))
                .unwrap_or_default();
            differences.push(format!(
                "layer {} differs ({tar}): stored {}, rebuilt {}{paths}",
                i + 1,
                s.digest,
                b.digest
            ));
        }
    }
    if stored.config_digest != built.config_digest {
        differences.push(format!(
            "config differs: stored {}, rebuilt {}",
            stored.config_digest, built.config_digest
        ));
    }
    if differences.is_empty() {
        differences.push(format!(
            "manifest differs (annotations or media types): stored {}, rebuilt {}",
            stored.digest, built.digest
        ));
    }
    Err(BuildError::CheckMismatch {
        image: built.name.clone(),
        differences,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}

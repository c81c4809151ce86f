//! Commands on instances: run, ps, stop, rm, logs, inspect-instance, and the hidden supervisor.
//!
//! There is deliberately no `exec`: instances are replaced, never repaired by hand.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use imago_oci::Digest;
use imago_oci::spec::Descriptor;
use imago_runtime::{
    ImageInfo, ImageSource, Instance, InstanceSpec, LocalProvider, Provider, RuntimeError, Status,
    StoreImageSource, SupervisorCommand, parse_cpus, parse_memory,
};
use serde::Serialize;

use crate::Context;
use crate::commands::images::parse_reference;
use crate::reporter::Render;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The image: name[:tag], name@sha256:..., sha256:..., or a unique digest prefix
    pub image: String,
    /// A name for the instance (shown by ps; not unique)
    #[arg(long)]
    pub name: Option<String>,
    /// Set an environment variable (repeatable)
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Attach a label (repeatable)
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Memory limit, e.g. 64M or 1G
    #[arg(long)]
    pub memory: Option<String>,
    /// CPU limit in CPUs, e.g. 0.5
    #[arg(long)]
    pub cpus: Option<String>,
    /// Maximum number of processes
    #[arg(long)]
    pub pids: Option<u64>,
    /// private (own network namespace and address) or host
    #[arg(long, default_value = "private")]
    pub network: String,
    /// embedded (libcontainer, linked in) or runc
    #[arg(long, default_value = "embedded")]
    pub runtime: String,
    /// Mount a volume: NAME:/path (a named volume), /host/path:/path; add :ro for read-only
    /// (repeatable). Paths the image declares as volumes get an anonymous volume otherwise.
    #[arg(long = "volume", short = 'v', value_name = "SOURCE:TARGET[:ro]")]
    pub volumes: Vec<String>,
    /// Syscall filter: default (Docker's default profile: no namespaces, mounts, keyrings or
    /// ptrace), unconfined (none), or the path of a profile file (OCI linux.seccomp JSON)
    #[arg(
        long,
        default_value = "default",
        value_name = "default|unconfined|FILE"
    )]
    pub seccomp: String,
    /// Run a tiny init (the host's static tini) as PID 1 that passes signals on to the program
    /// and reaps zombies, like `docker run --init` (IMAGO_INIT=PATH: another static init)
    #[arg(long)]
    pub init: bool,
    /// Replace the image's entrypoint
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Arguments replacing the image's cmd
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Also show instances that exited or failed
    #[arg(long, short)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Instance ids (or unique prefixes or names)
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Seconds to wait after SIGTERM before SIGKILL
    #[arg(long, short, default_value_t = 10)]
    pub time: u64,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Stop running instances first
    #[arg(long, short)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub id: String,
    /// Keep printing new output until the instance ends
    #[arg(long, short)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct InspectInstanceArgs {
    pub id: String,
}

#[derive(Debug, Args)]
pub struct SuperviseArgs {
    pub home: PathBuf,
    pub id: String,
}

/// Images are only needed to launch; other commands must work even without a store.
pub(crate) struct NoImages;

impl ImageSource for NoImages {
    fn image(&self, digest: &Digest) -> Result<ImageInfo, RuntimeError> {
        Err(RuntimeError::ImageNotFound {
            digest: digest.clone(),
            reason: "no image store opened".into(),
        })
    }
    fn open_layer(
        &self,
        image: &Digest,
        _layer: &Descriptor,
    ) -> Result<Box<dyn Read + '_>, RuntimeError> {
        Err(RuntimeError::ImageNotFound {
            digest: image.clone(),
            reason: "no image store opened".into(),
        })
    }
}

pub(crate) fn provider(ctx: &Context, images: Box<dyn ImageSource>) -> Result<LocalProvider> {
    Ok(with_init_from_env(LocalProvider::new(
        &ctx.home.root,
        images,
        SupervisorCommand::current_exe()?,
    )))
}

/// `IMAGO_INIT`, when set, names the static init that instances asking for one run as PID 1
/// (instead of Debian's `/usr/bin/tini-static`).
pub(crate) fn with_init_from_env(provider: LocalProvider) -> LocalProvider {
    match std::env::var_os("IMAGO_INIT").filter(|v| !v.is_empty()) {
        Some(path) => provider.with_init(path),
        None => provider,
    }
}

/// Finds an instance by id, unique id prefix, or unique name.
fn find(provider: &LocalProvider, key: &str) -> Result<Instance> {
    find_in(&provider.list()?, key)
}

/// [`find`] in a list already read (commands that take several keys list once).
fn find_in(all: &[Instance], key: &str) -> Result<Instance> {
    if let Some(i) = all.iter().find(|i| i.id == key) {
        return Ok(i.clone());
    }
    let matches: Vec<&Instance> = all
        .iter()
        .filter(|i| i.id.starts_with(key) || i.name.as_deref() == Some(key))
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("no such instance {key}"),
        many => bail!(
            "{key} is ambiguous; it matches: {}",
            many.iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn key_value(text: &str, what: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => bail!("invalid {what} {text:?}: expected KEY=VALUE"),
    }
}

#[derive(Serialize)]
struct Launched(Instance);

impl Render for Launched {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{}", self.0.id)
    }
}

/// Starts the cgroup lock warm-up of `imago run` (see [`run`]) at the very top of `main`, before
/// the command line is parsed, when the subcommand is `run` (`is_run`, read from `args` by
/// `main`, which parses the same `args`). IMAGO_NO_CGROUP_WARMUP=1 turns it off, to measure
/// what it gains.
pub fn early_cgroup_warmup(
    is_run: bool,
    args: &[std::ffi::OsString],
) -> Option<imago_runtime::supervisor::CgroupLockWarmup> {
    let runc = args.iter().any(|a| a == "--runtime=runc")
        || args
            .windows(2)
            .any(|w| w[0] == "--runtime" && w[1] == "runc");
    (is_run
        && std::env::var_os("IMAGO_NO_CGROUP_WARMUP").is_none()
        && imago_runtime::supervisor::launch_takes_the_cgroup_lock(runc))
    .then(imago_runtime::supervisor::warm_cgroup_lock)
}

/// `imago run`. `warmup` was started first thing, while the process was single-threaded: on
/// an untuned host every cgroup.procs write of the engine would otherwise wait an RCU grace
/// period, which the warm-up's own writes keep from starting (see `warm_cgroup_lock`).
pub fn run(
    ctx: &Context,
    args: RunArgs,
    warmup: Option<imago_runtime::supervisor::CgroupLockWarmup>,
) -> Result<()> {
    let launched = launch(ctx, args);
    // Stopped only now: the program has exec'd, so the engine made its last cgroup.procs write.
    drop(warmup);
    launched
}

fn launch(ctx: &Context, args: RunArgs) -> Result<()> {
    let mut spec_resources = imago_runtime::Resources::default();
    if let Some(m) = &args.memory {
        spec_resources.memory_bytes = Some(parse_memory(m)?);
    }
    if let Some(c) = &args.cpus {
        spec_resources.cpu_millis = Some(parse_cpus(c)?);
    }
    spec_resources.pids = args.pids;
    let network = args.network.parse()?;
    let engine = args.runtime.parse()?;
    let store = ctx.store()?;
    let reference = parse_reference(&args.image)?;
    let digest = store.resolve_digest(&reference)?;
    let mut spec = InstanceSpec::new(digest);
    spec.name = args.name;
    spec.resources = spec_resources;
    spec.network = network;
    spec.engine = engine;
    spec.entrypoint = args.entrypoint.map(|e| vec![e]);
    spec.init = args.init;
    if !args.args.is_empty() {
        spec.args = Some(args.args);
    }
    for e in &args.env {
        let (k, v) = key_value(e, "environment variable")?;
        spec.env.insert(k, v);
    }
    for l in &args.labels {
        let (k, v) = key_value(l, "label")?;
        spec.labels.insert(k, v);
    }
    for v in &args.volumes {
        spec.volumes.push(v.parse()?);
    }
    spec.seccomp = imago_runtime::Seccomp::from_setting(&args.seccomp, Path::new(""))?;
    let provider = provider(ctx, Box::new(StoreImageSource::new(store)))?;
    let instance = provider.launch(&spec)?;
    ctx.reporter.status(format!(
        "started {} from {}{}",
        instance.id,
        instance.image.short(),
        instance
            .address
            .map(|a| format!(" at {a}"))
            .unwrap_or_default()
    ));
    ctx.reporter.emit(&Launched(instance))
}

#[derive(Serialize)]
#[serde(transparent)]
struct InstanceList(Vec<Instance>);

impl Render for InstanceList {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:<12} {:<16} {:<14} {:<10} {:<8} {:<15} PORTS",
            "ID", "NAME", "IMAGE", "STATUS", "ENGINE", "ADDRESS"
        )?;
        for i in &self.0 {
            let status = i.status_text();
            let address = match (i.address, i.network) {
                (Some(a), _) => a.to_string(),
                (None, imago_runtime::NetworkMode::Host) => "host".to_owned(),
                (None, _) => "-".to_owned(),
            };
            writeln!(
                out,
                "{:<12} {:<16} {:<14} {:<10} {:<8} {:<15} {}",
                i.id,
                i.name.as_deref().unwrap_or("-"),
                i.image.short(),
                status,
                i.engine.to_string(),
                address,
                if i.ports.is_empty() {
                    "-".to_owned()
                } else {
                    i.ports.join(",")
                },
            )?;
        }
        Ok(())
    }
}

pub fn ps(ctx: &Context, args: PsArgs) -> Result<()> {
    let provider = provider(ctx, Box::new(NoImages))?;
    let mut list = provider.list()?;
    if !args.all {
        list.retain(|i| matches!(i.status, Status::Running | Status::Created | Status::Lost));
    }
    ctx.reporter.emit(&InstanceList(list))
}

pub fn stop(ctx: &Context, args: StopArgs) -> Result<()> {
    let provider = provider(ctx, Box::new(NoImages))?;
    let all = provider.list()?;
    let mut stopped = Vec::new();
    for key in &args.ids {
        let id = find_in(&all, key)?.id;
        let instance = provider.stop(&id, Duration::from_secs(args.time))?;
        ctx.reporter.status(format!("stopped {id}"));
        stopped.push(instance);
    }
    ctx.reporter.emit(&InstanceList(stopped))
}

/// What `rm` and `volume rm` removed: ids or names, one per line.
#[derive(Serialize)]
pub(crate) struct Removed {
    pub(crate) removed: Vec<String>,
}

impl Render for Removed {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for id in &self.removed {
            writeln!(out, "{id}")?;
        }
        Ok(())
    }
}

pub fn rm(ctx: &Context, args: RmArgs) -> Result<()> {
    let provider = provider(ctx, Box::new(NoImages))?;
    let all = provider.list()?;
    let mut removed = Vec::new();
    for key in &args.ids {
        let instance = find_in(&all, key)?;
        if args.force && instance.status == Status::Running {
            provider.stop(&instance.id, Duration::from_secs(10))?;
        }
        provider.remove(&instance.id)?;
        removed.push(instance.id);
    }
    // Once per command, not per instance: also what killed launches and cleanups left behind.
    provider.sweep_abandoned();
    ctx.reporter.emit(&Removed { removed })
}

#[derive(Serialize)]
struct Logs {
    id: String,
    output: String,
}

impl Render for Logs {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        out.write_all(self.output.as_bytes())
    }
}

pub fn logs(ctx: &Context, args: LogsArgs) -> Result<()> {
    let provider = provider(ctx, Box::new(NoImages))?;
    let id = find(&provider, &args.id)?.id;
    if !args.follow {
        let bytes = provider.logs(&id)?;
        return ctx.reporter.emit(&Logs {
            id,
            output: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    // Following streams output as it arrives, which a one-shot Render cannot express: raw
    // bytes, or under --json one `{"id", "output"}` document per line (JSON Lines).
    let stdout = std::io::stdout();
    let mut out = FollowSink::new(stdout.lock(), ctx.reporter.json().then(|| id.clone()));
    let paths = provider.log_paths(&id)?;
    let (current_path, rotated) = paths.split_last().context("no log file")?;
    // The current file is opened first and then only ever read through this handle: what was
    // written after a read is found by the next read, whatever the file's size was in between
    // (a size taken after the first read lost what came between the two).
    let mut current = open_log(current_path)?;
    for path in rotated {
        match std::fs::read(path) {
            Ok(bytes) => out.write(&bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let running = matches!(
            provider.inspect(&id)?.status,
            Status::Running | Status::Created
        );
        let mut read_any = false;
        if let Some(file) = current.as_mut() {
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                read_any = true;
                out.write(&buf[..n])?;
            }
        }
        out.flush()?;
        // Rotation renames the file this handle reads (its rest was just read) and starts a
        // new one at the path.
        if !same_file(current.as_ref(), current_path) {
            current = open_log(current_path)?;
            continue;
        }
        if !read_any {
            if !running {
                return out.finish();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Where `logs -f` writes: the bytes as they are, or (with an instance id) JSON Lines. A JSON
/// line never splits a UTF-8 character: an incomplete one at the end of a read waits for the
/// next read.
struct FollowSink<W: Write> {
    out: W,
    json_id: Option<String>,
    pending: Vec<u8>,
}

impl<W: Write> FollowSink<W> {
    fn new(out: W, json_id: Option<String>) -> Self {
        FollowSink {
            out,
            json_id,
            pending: Vec::new(),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(id) = &self.json_id else {
            self.out.write_all(bytes)?;
            return Ok(());
        };
        self.pending.extend_from_slice(bytes);
        let complete = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An error with no length is an incomplete character at the end: keep it.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        if complete == 0 {
            return Ok(());
        }
        let rest = self.pending.split_off(complete);
        let output = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        serde_json::to_writer(
            &mut self.out,
            &Logs {
                id: id.clone(),
                output,
            },
        )?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.out.flush()?)
    }

    /// Writes what is still held back (an instance that ended mid-character) and flushes.
    fn finish(mut self) -> Result<()> {
        if let Some(id) = self.json_id.take()
            && !self.pending.is_empty()
        {
            let output = String::from_utf8_lossy(&self.pending).into_owned();
            serde_json::to_writer(&mut self.out, &Logs { id, output })?;
            self.out.write_all(b"\n")?;
        }
        self.flush()
    }
}

/// The log file at `path`, `None` if it does not exist (yet).
fn open_log(path: &Path) -> Result<Option<std::fs::File>> {
    match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot open {}", path.display())),
    }
}

/// Whether `file` is the file now at `path` (both absent counts as the same).
fn same_file(file: Option<&std::fs::File>, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let at_path = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let open = file
        .and_then(|f| f.metadata().ok())
        .map(|m| (m.dev(), m.ino()));
    at_path == open
}

#[derive(Serialize)]
#[serde(transparent)]
struct Inspected(Instance);

impl Render for Inspected {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(&self.0).map_err(std::io::Error::other)?;
        writeln!(out, "{text}")
    }
}

pub fn inspect_instance(ctx: &Context, args: InspectInstanceArgs) -> Result<()> {
    let provider = provider(ctx, Box::new(NoImages))?;
    let instance = find(&provider, &args.id)?;
    ctx.reporter.emit(&Inspected(instance))
}

/// The hidden `__supervise HOME ID`: becomes the instance's supervisor and never returns.
pub fn supervise(args: SuperviseArgs) -> ! {
    let code = imago_runtime::supervisor::supervise(
        &args.home,
        &args.id,
        &mut std::io::stdin(),
        &mut std::io::stdout(),
    );
    std::process::exit(code)
}

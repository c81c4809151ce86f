//! `imago build` (images from imago.toml into the store) and `imago schema`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use imago_build::archive::{ArchiveFormat, write_archive};
use imago_build::{BuildOptions, BuiltImage, DefinitionFile, Event};
use imago_oci::Reference;
use serde::Serialize;

use crate::Context;
use crate::reporter::{Render, human_size};

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Images to build, by their name in imago.toml [default: all]
    pub names: Vec<String>,
    /// The definition file
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        default_value = "imago.toml"
    )]
    pub file: PathBuf,
    /// Also tag the result: a tag (`v1` gives NAME:v1) or, for one image, a full `name:tag`
    #[arg(short = 't', long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Rebuild and compare with the stored NAME:latest; store nothing; fail on a difference
    #[arg(long)]
    pub check: bool,
    /// Do not use or update the build cache
    #[arg(long)]
    pub no_cache: bool,
    /// Also write the image to a file: oci-archive:FILE or docker-archive:FILE (one image)
    #[arg(long, value_name = "FORMAT:FILE")]
    pub output: Option<String>,
    /// The time written into the image (every mtime and `created`), in Unix seconds
    #[arg(
        long,
        env = "SOURCE_DATE_EPOCH",
        value_name = "SECONDS",
        default_value_t = 0
    )]
    pub source_date_epoch: u64,
    /// When to pull a `from` base that names a registry: missing (not in the store), always
    /// (resolve its tag again), never
    #[arg(long, value_enum, default_value = "missing")]
    pub pull: PullPolicy,
    /// Also push each built image to this registry repository (HOST[:PORT]/REPO[:TAG])
    #[arg(long, value_name = "REPO")]
    pub push: Vec<String>,
    /// The engine of `run` steps: embedded (libcontainer, linked in) or runc
    #[arg(long, default_value = "embedded")]
    pub runtime: String,
    /// A build argument for `run` steps (declared in [image.NAME.args]); repeatable
    #[arg(long = "arg", value_name = "KEY=VALUE")]
    pub args: Vec<String>,
    /// Run the `run` step of this layer (by name) again even if it is cached; repeatable
    #[arg(long = "no-cache-filter", value_name = "LAYER")]
    pub no_cache_filter: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    Missing,
    Always,
    Never,
}

#[derive(Debug, Args)]
pub struct SandboxArgs {
    pub dir: PathBuf,
}

/// The hidden `__sandbox DIR`: runs one build step (a fresh, single-threaded process, as
/// libcontainer needs) and never returns.
pub fn sandbox(args: SandboxArgs) -> ! {
    std::process::exit(imago_runtime::sandbox::sandbox_main(&args.dir))
}

/// `run` steps in imago-runtime's sandbox: a helper process (this executable's `__sandbox`)
/// per step.
#[derive(Debug)]
struct RuntimeSteps {
    helper: imago_runtime::SupervisorCommand,
}

impl imago_build::build::StepRunner for RuntimeSteps {
    fn run(
        &self,
        spec: &imago_runtime::sandbox::SandboxSpec,
        output: &mut dyn FnMut(&[u8]),
    ) -> std::result::Result<
        imago_runtime::sandbox::StepExit,
        Box<dyn std::error::Error + Send + Sync>,
    > {
        Ok(imago_runtime::sandbox::run_sandbox(
            &self.helper,
            spec,
            output,
        )?)
    }
}

/// Where `run` steps run: helpers are this executable's `__sandbox`, state under the home.
pub(crate) fn sandbox_options(
    ctx: &Context,
    engine: imago_runtime::Engine,
) -> Result<imago_build::build::SandboxOptions> {
    let mut helper = imago_runtime::SupervisorCommand::current_exe()?;
    helper.args = vec!["__sandbox".into()];
    helper.fork_when_single_threaded = false;
    // Absolute: the paths go into overlay options and runtime bundles read by other processes.
    let home = std::path::absolute(&ctx.home.root)
        .with_context(|| format!("cannot resolve {}", ctx.home.root.display()))?;
    Ok(imago_build::build::SandboxOptions {
        runner: std::sync::Arc::new(RuntimeSteps { helper }),
        engine,
        work_dir: home.join("build-work"),
        cache_mounts: home.join("build-cache").join("mounts"),
        copy_root: std::env::var_os("IMAGO_SANDBOX_COPY").is_some_and(|v| v == "1"),
    })
}

#[derive(Serialize)]
struct BuiltEntry {
    #[serde(flatten)]
    image: BuiltImage,
    tags: Vec<String>,
    checked: bool,
}

#[derive(Serialize)]
struct BuildResult {
    images: Vec<BuiltEntry>,
}

impl Render for BuildResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for entry in &self.images {
            writeln!(out, "{}", entry.image.digest)?;
        }
        Ok(())
    }
}

pub fn build(ctx: &Context, args: BuildArgs) -> Result<()> {
    let file = DefinitionFile::load(&args.file)?;
    // Bases defined in the same file are built first.
    let names = imago_build::build_order(&file, &args.names)?;
    if names.is_empty() {
        bail!(
            "{} defines no image ([image.NAME] tables)",
            args.file.display()
        );
    }
    let output = args.output.as_deref().map(parse_output).transpose()?;
    if output.is_some() && names.len() != 1 {
        bail!("--output writes one image; name the image to build");
    }
    let store = ctx.store()?;
    let options = BuildOptions {
        source_date_epoch: args.source_date_epoch,
        cache_dir: (!args.no_cache).then(|| ctx.home.root.join("build-cache")),
        check: args.check,
        sandbox: Some(sandbox_options(ctx, args.runtime.parse()?)?),
        args: build_args(&file, &names, &args.args)?,
        no_cache_layers: args.no_cache_filter.clone(),
    };
    // Every --tag is checked before anything is built.
    let extra_tags = names
        .iter()
        .map(|name| {
            args.tags
                .iter()
                .map(|tag| extra_tag(name, tag, names.len()))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let mut results = Vec::new();
    let mut pulled = std::collections::BTreeSet::new();
    for (name, extra) in names.iter().zip(&extra_tags) {
        pull_base(ctx, &store, &file, name, args.pull, &mut pulled)?;
        let built = build_one(ctx, &store, &file, name, &options)?;
        let mut tags = vec![format!("{name}:latest")];
        if !args.check {
            for reference in extra {
                store.tag(reference, &built.digest)?;
                tags.push(reference.to_string());
            }
        }
        if let Some((format, path)) = &output {
            write_archive(&store, &built, &format!("{name}:latest"), *format, path)?;
            ctx.reporter.status(format!("wrote {}", path.display()));
        }
        let cached = built
            .layers
            .iter()
            .filter(|l| l.cached && !l.from_base)
            .count();
        let new = built.layers.iter().filter(|l| !l.from_base).count();
        ctx.reporter.status(format!(
            "{} {name}:latest {} ({} layers, {} cached, {})",
            if args.check { "checked" } else { "built" },
            built.digest.short(),
            new,
            cached,
            human_size(built.size)
        ));
        if !args.check {
            let targets = file
                .definition
                .image
                .get(name.as_str())
                .map(|def| def.push.clone())
                .unwrap_or_default();
            for target in targets.iter().chain(&args.push) {
                let settings = super::registry::settings(ctx, false)?;
                let pushed = super::registry::push_image(
                    ctx,
                    &settings,
                    &format!("{name}:latest"),
                    Some(target),
                    None,
                )?;
                ctx.reporter
                    .status(format!("pushed {}@{}", pushed.repository, pushed.digest));
            }
        }
        results.push(BuiltEntry {
            image: built,
            tags,
            checked: args.check,
        });
    }
    ctx.reporter.emit(&BuildResult { images: results })
}

/// The registry base of image `name` that the store lacks, as written in `from`.
pub(crate) fn base_to_pull(
    store: &imago_store::Store,
    file: &DefinitionFile,
    name: &str,
) -> Option<String> {
    let from = registry_base(store, file, name)?;
    (!base_in_store(store, &from)).then_some(from)
}

/// `from` of image `name` when it names a registry image: a name with a registry host, or,
/// as docker reads names, one without (`debian:12` is `docker.io/library/debian:12`) unless
/// it names an image of the file or one of the store by that very name.
fn registry_base(store: &imago_store::Store, file: &DefinitionFile, name: &str) -> Option<String> {
    let from = file
        .definition
        .image
        .get(name)
        .and_then(|def| def.from.as_ref())
        .map(|f| f.get_ref().trim().to_owned())?;
    if from == "scratch" || from.contains("-archive:") {
        return None;
    }
    if imago_registry::names_registry(&from) {
        return Some(from);
    }
    let reference = from.parse::<Reference>().ok()?;
    let Reference::Name {
        name: base_name, ..
    } = &reference
    else {
        return None;
    };
    let local = file.definition.image.contains_key(base_name)
        || reference.ref_name().is_some_and(|written| {
            store
                .names()
                .is_ok_and(|names| names.iter().any(|e| e.name.as_deref() == Some(&written)))
        });
    (!local).then_some(from)
}

fn base_in_store(store: &imago_store::Store, from: &str) -> bool {
    from.parse::<Reference>()
        .ok()
        .is_some_and(|r| store.resolve_digest(&r).is_ok())
}

/// Pulls the registry base of image `name`, if it has one, as `policy` says; a reference is
/// pulled at most once per command (`done`).
pub(crate) fn pull_base(
    ctx: &Context,
    store: &imago_store::Store,
    file: &DefinitionFile,
    name: &str,
    policy: PullPolicy,
    done: &mut std::collections::BTreeSet<String>,
) -> Result<()> {
    let Some(from) = registry_base(store, file, name) else {
        return Ok(());
    };
    if policy == PullPolicy::Never
        || done.contains(&from)
        || (policy == PullPolicy::Missing && base_in_store(store, &from))
    {
        return Ok(());
    }
    let reference: imago_registry::RegistryRef = from
        .parse()
        .with_context(|| format!("image {name}: from = {from:?}"))?;
    let settings = super::registry::settings(ctx, false)?;
    let pulled = super::registry::pull_reference(ctx, &settings, &reference)
        .with_context(|| format!("image {name}: base"))?;
    ctx.reporter
        .status(format!("{name}: base {from} is {}", pulled.digest));
    done.insert(from);
    Ok(())
}

pub(crate) fn build_one(
    ctx: &Context,
    store: &imago_store::Store,
    file: &DefinitionFile,
    name: &str,
    options: &BuildOptions,
) -> Result<BuiltImage> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut progress = |event: Event<'_>| match event {
        Event::LayerStarted {
            image,
            index,
            count,
            bytes,
            ..
        } => {
            bar = Some(
                ctx.reporter
                    .bytes_bar(bytes, format!("{image} layer {}/{count}", index + 1)),
            );
        }
        Event::LayerProgress { bytes } => {
            if let Some(b) = &bar {
                b.set_position(bytes);
            }
        }
        Event::LayerFinished { .. } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
        }
        Event::StepOutput { image, layer, line } => {
            let text = String::from_utf8_lossy(line);
            let line = format!("{image}/{layer} | {}", text.trim_end_matches('\n'));
            match &bar {
                Some(b) => b.suspend(|| ctx.reporter.status(&line)),
                None => ctx.reporter.status(&line),
            }
        }
        Event::StepCaptured {
            image,
            layer,
            sandbox,
            diff,
            write,
            entries,
            bytes,
        } => ctx.reporter.status(format!(
            "{image}/{layer}: step {} ms, diff {} ms, layer {} ms ({entries} entries, {})",
            sandbox.as_millis(),
            diff.as_millis(),
            write.as_millis(),
            human_size(bytes)
        )),
        Event::StepWarning {
            image,
            layer,
            message,
        } => ctx.reporter.warn(format!("{image}/{layer}: {message}")),
        Event::StepChecked {
            image,
            layer,
            identical,
            hermetic,
            differences,
        } => {
            let hermetic = if hermetic {
                ""
            } else {
                " (not hermetic: network = \"host\")"
            };
            if identical {
                ctx.reporter
                    .status(format!("{image}/{layer}: run step reproduced{hermetic}"));
            } else {
                ctx.reporter.warn(format!(
                    "{image}/{layer}: run step not reproducible{hermetic}: {}",
                    differences.join("; ")
                ));
            }
        }
        Event::BaseArchive { image, path } => {
            ctx.reporter
                .status(format!("{image}: reading base archive {}", path.display()));
        }
    };
    Ok(imago_build::build_image(
        store,
        file,
        name,
        options,
        &mut progress,
    )?)
}

/// `--arg KEY=VALUE` values, each declared by some image being built.
fn build_args(
    file: &DefinitionFile,
    names: &[String],
    given: &[String],
) -> Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for text in given {
        let Some((key, value)) = text.split_once('=') else {
            bail!("invalid --arg {text:?}: write KEY=VALUE");
        };
        let declared = names.iter().any(|n| {
            file.definition
                .image
                .get(n)
                .is_some_and(|i| i.args.contains_key(key))
        });
        if !declared {
            bail!(
                "--arg {key} is not declared in the [image.NAME.args] of any image being built ({})",
                names.join(", ")
            );
        }
        out.insert(key.to_owned(), value.to_owned());
    }
    Ok(out)
}

/// `--output` names an archive as `from` does: the builder's parser reads both.
fn parse_output(text: &str) -> Result<(ArchiveFormat, PathBuf)> {
    match imago_build::import::parse_archive_base(text) {
        Some((format, path)) if !path.as_os_str().is_empty() => Ok((format, path)),
        _ => bail!("invalid --output {text:?}: use oci-archive:FILE or docker-archive:FILE"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_takes_the_archive_forms_of_from() {
        assert_eq!(
            parse_output("oci-archive:a.tar").unwrap(),
            (ArchiveFormat::Oci, PathBuf::from("a.tar"))
        );
        assert_eq!(
            parse_output("docker-archive:/x/b.tar").unwrap(),
            (ArchiveFormat::Docker, PathBuf::from("/x/b.tar"))
        );
        for bad in ["oci-archive:", "tar:a.tar", "a.tar"] {
            let err = parse_output(bad).unwrap_err().to_string();
            assert!(err.contains("invalid --output"), "{bad}: {err}");
        }
    }
}

fn extra_tag(name: &str, tag: &str, images: usize) -> Result<Reference> {
    if tag.contains(':') || tag.contains('/') {
        if images != 1 {
            bail!("--tag {tag} names one image, but {images} are being built");
        }
        return tag.parse().with_context(|| format!("invalid --tag {tag}"));
    }
    Reference::named(name, tag).with_context(|| format!("invalid --tag {tag}"))
}

#[derive(Debug, Args)]
pub struct SchemaArgs {}

#[derive(Serialize)]
struct Schema(serde_json::Value);

impl Render for Schema {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, &self.0)?;
        writeln!(out)
    }
}

/// Prints the JSON Schema of imago.toml (JSON whether or not --json is given).
pub fn schema(ctx: &Context, _args: SchemaArgs) -> Result<()> {
    ctx.reporter
        .emit(&Schema(imago_build::json_schema_with_services_and_targets(
            imago_deploy::spec::service_json_schema(),
            imago_deploy::spec::target_json_schema(),
        )))
}

//! Commands on the image store: images, inspect, tag, rmi, gc, verify, unpack.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use imago_oci::{Digest, Reference};
use imago_store::{GcReport, ImageSummary, LayerInfo, VerifyReport};
use serde::Serialize;

use crate::Context;
use crate::reporter::{Render, human_size};

pub fn parse_reference(text: &str) -> Result<Reference> {
    Ok(text.parse::<Reference>()?)
}

#[derive(Debug, Args)]
pub struct ImagesArgs {}

#[derive(Serialize)]
struct ImageList(Vec<ImageSummary>);

impl Render for ImageList {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:<40} {:<14} {:>10}  CREATED",
            "NAME", "DIGEST", "SIZE"
        )?;
        for image in &self.0 {
            writeln!(
                out,
                "{:<40} {:<14} {:>10}  {}",
                image
                    .name
                    .as_deref()
                    .map_or("<none>", imago_oci::docker_short_name),
                image.digest.short(),
                human_size(image.size),
                image.created.as_deref().unwrap_or("-"),
            )?;
        }
        Ok(())
    }
}

pub fn images(ctx: &Context, _args: ImagesArgs) -> Result<()> {
    let store = ctx.store()?;
    ctx.reporter.emit(&ImageList(store.images()?))
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// name[:tag], name@sha256:..., sha256:..., or a unique digest prefix
    pub reference: String,
}

#[derive(Serialize)]
struct Inspection {
    digest: Digest,
    names: Vec<String>,
    size: u64,
    config_digest: Digest,
    layers: Vec<LayerInfo>,
    manifest: serde_json::Value,
    config: serde_json::Value,
}

impl Render for Inspection {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "Digest:  {}", self.digest)?;
        writeln!(
            out,
            "Names:   {}",
            if self.names.is_empty() {
                "<none>".into()
            } else {
                self.names.join(", ")
            }
        )?;
        writeln!(
            out,
            "Size:    {} ({} bytes)",
            human_size(self.size),
            self.size
        )?;
        writeln!(out, "Config:  {}", self.config_digest)?;
        let cfg = self.config.get("config");
        for key in [
            "Entrypoint",
            "Cmd",
            "Env",
            "WorkingDir",
            "User",
            "ExposedPorts",
            "Labels",
        ] {
            if let Some(value) = cfg.and_then(|c| c.get(key)) {
                writeln!(out, "  {key}: {value}")?;
            }
        }
        if let Some(created) = self.config.get("created").and_then(|c| c.as_str()) {
            writeln!(out, "Created: {created}")?;
        }
        writeln!(out, "Layers:")?;
        for (i, layer) in self.layers.iter().enumerate() {
            writeln!(
                out,
                "  {i}: {} {:>10}  {}",
                layer.digest,
                human_size(layer.size),
                layer.media_type
            )?;
            if let Some(diff_id) = &layer.diff_id {
                writeln!(out, "     diff_id {diff_id}")?;
            }
        }
        Ok(())
    }
}

pub fn inspect(ctx: &Context, args: InspectArgs) -> Result<()> {
    let store = ctx.store()?;
    let image = store.resolve(&parse_reference(&args.reference)?)?;
    let names = store
        .names()?
        .into_iter()
        .filter(|e| e.digest == image.digest)
        .filter_map(|e| e.name)
        .collect();
    let manifest = serde_json::from_slice(&store.read_blob(&image.digest, None)?)?;
    let config = serde_json::from_slice(&store.read_blob(&image.config_digest, None)?)?;
    let inspection = Inspection {
        digest: image.digest.clone(),
        names,
        size: image.total_size()?,
        config_digest: image.config_digest.clone(),
        layers: image.layers()?,
        manifest,
        config,
    };
    ctx.reporter.emit(&inspection)
}

#[derive(Debug, Args)]
pub struct TagArgs {
    /// The image to name
    pub source: String,
    /// The new name, NAME[:TAG]
    pub target: String,
}

#[derive(Serialize)]
struct Tagged {
    name: String,
    digest: Digest,
}

impl Render for Tagged {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{} -> {}", self.name, self.digest)
    }
}

pub fn tag(ctx: &Context, args: TagArgs) -> Result<()> {
    let store = ctx.store()?;
    let digest = store.resolve_digest(&parse_reference(&args.source)?)?;
    let target = parse_reference(&args.target)?;
    store.tag(&target, &digest)?;
    let name = target.ref_name().unwrap_or_default();
    ctx.reporter.emit(&Tagged { name, digest })
}

#[derive(Debug, Args)]
pub struct RmiArgs {
    /// Names to remove, NAME[:TAG]
    #[arg(required = true)]
    pub references: Vec<String>,
}

#[derive(Serialize)]
struct Removed(Vec<Tagged>);

impl Render for Removed {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for r in &self.0 {
            writeln!(out, "Untagged: {} ({})", r.name, r.digest)?;
        }
        Ok(())
    }
}

pub fn rmi(ctx: &Context, args: RmiArgs) -> Result<()> {
    let store = ctx.store()?;
    let mut removed = Vec::new();
    for text in &args.references {
        let reference = parse_reference(text)?;
        let name = reference
            .ref_name()
            .with_context(|| format!("rmi removes names; {text:?} is a digest (blobs go at gc)"))?;
        let digest = store.untag(&reference)?;
        removed.push(Tagged { name, digest });
    }
    ctx.reporter.emit(&Removed(removed))
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Report what would be deleted without deleting it
    #[arg(long)]
    pub dry_run: bool,
    /// Of the unpacked roots that `run` steps start from (build-work/chains), keep only the N
    /// most recently used ones that stored images still reach [default: all that they reach]
    #[arg(long, value_name = "N")]
    pub keep_chains: Option<usize>,
}

#[derive(Serialize)]
struct GcResult {
    #[serde(flatten)]
    store: GcReport,
    build: imago_build::work::WorkGcReport,
}

impl Render for GcResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let r = &self.store;
        let verb = if r.dry_run { "would delete" } else { "deleted" };
        for (digest, size) in &r.removed {
            writeln!(out, "{verb} {digest} ({})", human_size(*size))?;
        }
        writeln!(
            out,
            "{verb} {} blobs, {} freed; {} blobs kept; {} stale temporary files",
            r.removed.len(),
            human_size(r.freed_bytes),
            r.kept,
            r.stale_temp_files
        )?;
        let b = &self.build;
        writeln!(
            out,
            "{verb} {} unpacked step roots and {} leftover step directories, {} freed; {} roots kept ({} in use by a running build); {} stale build cache records",
            b.chains_removed,
            b.stale_dirs_removed,
            human_size(b.bytes_freed),
            b.chains_kept,
            b.chains_in_use,
            b.cache_records_removed
        )
    }
}

pub fn gc(ctx: &Context, args: GcArgs) -> Result<()> {
    let store = ctx.store()?;
    let releases = super::deploy::release_roots(ctx);
    // Build work first: it never waits for a running build (what one holds is kept), while the
    // store's gc waits for every writer to finish.
    let mut roots: Vec<imago_oci::Digest> = store.names()?.into_iter().map(|n| n.digest).collect();
    roots.extend(imago_store::GcRoots::roots(&releases).map_err(|e| {
        anyhow::anyhow!(
            "cannot read roots of {}: {e}",
            releases_description(&releases)
        )
    })?);
    let work = ctx.home.root.join("build-work");
    let cache = ctx.home.root.join("build-cache");
    let mut build =
        imago_build::work::collect(&store, &work, &roots, args.keep_chains, args.dry_run)?;
    let report = store.gc(&[&releases], args.dry_run)?;
    // Records of blobs this gc just deleted.
    build.cache_records_removed += imago_build::work::collect_cache(&store, &cache, args.dry_run)?;
    ctx.reporter.emit(&GcResult {
        store: report,
        build,
    })
}

fn releases_description(releases: &dyn imago_store::GcRoots) -> String {
    releases.describe()
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only the blobs of this image (default: every blob in the store)
    pub reference: Option<String>,
}

#[derive(Serialize)]
struct VerifyResult(VerifyReport);

impl Render for VerifyResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let r = &self.0;
        for p in &r.problems {
            write!(out, "{}: {} ({})", p.digest, p.problem, p.path.display())?;
            match &p.referrer {
                Some(by) => writeln!(out, ", referred to as {by}")?,
                None => writeln!(out)?,
            }
        }
        writeln!(
            out,
            "checked {} blobs ({}): {}",
            r.blobs_checked,
            human_size(r.bytes_checked),
            if r.is_ok() {
                "all intact".to_string()
            } else {
                format!("{} problems", r.problems.len())
            }
        )
    }
}

pub fn verify(ctx: &Context, args: VerifyArgs) -> Result<()> {
    let store = ctx.store()?;
    let roots = match &args.reference {
        Some(text) => Some(vec![store.resolve_digest(&parse_reference(text)?)?]),
        None => None,
    };
    let report = store.verify(roots.as_deref())?;
    ctx.reporter.emit(&VerifyResult(report.clone()))?;
    if !report.is_ok() {
        bail!("{} corrupt or missing blobs", report.problems.len());
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct UnpackArgs {
    pub reference: String,
    /// Target directory (created if missing; must be empty)
    pub dir: PathBuf,
}

#[derive(Serialize)]
struct Unpacked {
    digest: Digest,
    dir: PathBuf,
    #[serde(flatten)]
    report: imago_store::UnpackReport,
}

impl Render for Unpacked {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "unpacked {} into {}: {} layers, {} entries, {}",
            self.digest,
            self.dir.display(),
            self.report.layers,
            self.report.entries,
            human_size(self.report.bytes)
        )
    }
}

pub fn unpack(ctx: &Context, args: UnpackArgs) -> Result<()> {
    let store = ctx.store()?;
    let image = store.resolve(&parse_reference(&args.reference)?)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    if std::fs::read_dir(&args.dir)?.next().is_some() {
        bail!(
            "{} is not empty; unpack needs an empty directory",
            args.dir.display()
        );
    }
    let report = store.unpack(&image, &args.dir, true)?;
    ctx.reporter.emit(&Unpacked {
        digest: image.digest,
        dir: args.dir,
        report,
    })
}

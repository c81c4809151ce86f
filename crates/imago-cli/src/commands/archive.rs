//! `imago import` and `imago export`: image archives in and out of the store.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use imago_oci::Reference;
use imago_store::{ExportFormat, ExportReport, ImportOptions, ImportReport};
use serde::Serialize;

use crate::Context;
use crate::commands::images::parse_reference;
use crate::reporter::{Render, human_size};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// An OCI archive or docker archive (uncompressed, gzip or zstd)
    pub file: PathBuf,
    /// Name the image NAME[:TAG] instead of the names recorded in the archive
    #[arg(long, value_name = "NAME[:TAG]")]
    pub name: Option<String>,
}

#[derive(Serialize)]
struct Imported(ImportReport);

impl Render for Imported {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let r = &self.0;
        for image in &r.images {
            if image.names.is_empty() {
                writeln!(out, "imported {} (no name)", image.digest)?;
            }
            for name in &image.names {
                writeln!(out, "imported {name} {}", image.digest)?;
            }
        }
        writeln!(
            out,
            "{} blobs written, {} already present, {} read",
            r.blobs_written,
            r.blobs_present,
            human_size(r.archive_bytes)
        )
    }
}

pub fn import(ctx: &Context, args: ImportArgs) -> Result<()> {
    let store = ctx.store()?;
    let name = match &args.name {
        Some(text) => Some(name_reference(text)?),
        None => None,
    };
    let total = std::fs::metadata(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?
        .len();
    let bar = ctx.reporter.bytes_bar(total, "importing");
    let progress = |n: u64| bar.set_position(n);
    let options = ImportOptions {
        name,
        progress: Some(&progress),
        unnamed: false,
    };
    let result = store.import_archive(&args.file, &options);
    bar.finish_and_clear();
    let report = result?;
    ctx.reporter.emit(&Imported(report))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// OCI image layout in a tar (skopeo's oci-archive)
    Oci,
    /// docker save format (docker load)
    Docker,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The image: name[:tag], name@sha256:..., sha256:..., or a unique digest prefix
    pub reference: String,
    /// The archive to write
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value = "oci")]
    pub format: FormatArg,
}

#[derive(Serialize)]
struct Exported(ExportReport);

impl Render for Exported {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let r = &self.0;
        writeln!(
            out,
            "exported {} to {} ({}, {} blobs, {})",
            r.digest,
            r.path.display(),
            match r.format {
                ExportFormat::Oci => "oci archive",
                ExportFormat::Docker => "docker archive",
            },
            r.blobs,
            human_size(r.bytes)
        )
    }
}

pub fn export(ctx: &Context, args: ExportArgs) -> Result<()> {
    let store = ctx.store()?;
    let reference = parse_reference(&args.reference)?;
    let image = store.resolve(&reference)?;
    // The archive names the image as the user referred to it, or by a name the store has for it.
    let name = match reference.ref_name() {
        Some(_)
            if matches!(reference, Reference::Name { digest: None, .. })
                && reference.digest_prefix().is_none() =>
        {
            Some(reference)
        }
        _ => store
            .names()?
            .into_iter()
            .find(|e| e.digest == image.digest)
            .and_then(|e| e.name)
            .and_then(|n| n.parse().ok()),
    };
    let format = match args.format {
        FormatArg::Oci => ExportFormat::Oci,
        FormatArg::Docker => ExportFormat::Docker,
    };
    let spinner = ctx
        .reporter
        .spinner(format!("exporting {}", image.digest.short()));
    let result = store.export(&image, name.as_ref(), format, &args.output);
    spinner.finish_and_clear();
    ctx.reporter.emit(&Exported(result?))
}

fn name_reference(text: &str) -> Result<Reference> {
    let reference = parse_reference(text)?;
    if !matches!(reference, Reference::Name { digest: None, .. }) {
        bail!("invalid name {text:?}: expected NAME[:TAG]");
    }
    Ok(reference)
}

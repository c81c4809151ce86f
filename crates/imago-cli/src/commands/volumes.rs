//! `imago volume ls|rm`: named volumes, the data that outlives instances.

use std::io::Write;

use anyhow::{Result, bail};
use clap::Subcommand;
use imago_runtime::{Layout, Provider, VolumeKind};
use serde::Serialize;

use crate::Context;
use crate::commands::instances::{NoImages, Removed, provider};
use crate::reporter::Render;

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// List named volumes and the instances that mount them
    Ls,
    /// Remove named volumes that no instance mounts (their data is deleted)
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Serialize)]
struct VolumeInfo {
    name: String,
    path: String,
    /// Instances (running or not, until removed) that mount it.
    instances: Vec<String>,
}

#[derive(Serialize)]
#[serde(transparent)]
struct VolumeList(Vec<VolumeInfo>);

impl Render for VolumeList {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{:<24} INSTANCES", "NAME")?;
        for v in &self.0 {
            let users = if v.instances.is_empty() {
                "-".to_owned()
            } else {
                v.instances.join(",")
            };
            writeln!(out, "{:<24} {users}", v.name)?;
        }
        Ok(())
    }
}

pub fn volume(ctx: &Context, cmd: VolumeCommand) -> Result<()> {
    let provider = provider(ctx, Box::new(NoImages))?;
    let dir = Layout::new(&ctx.home.root).volumes();
    let instances = provider.list()?;
    let users = |name: &str| -> Vec<String> {
        instances
            .iter()
            .filter(|i| {
                i.volumes
                    .iter()
                    .any(|v| v.kind == VolumeKind::Named && v.name.as_deref() == Some(name))
            })
            .map(|i| i.id.clone())
            .collect()
    };
    match cmd {
        VolumeCommand::Ls => {
            let mut list = Vec::new();
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    // Half-created volumes are temporary directories starting with a dot.
                    if name.starts_with('.') || !entry.path().is_dir() {
                        continue;
                    }
                    list.push(VolumeInfo {
                        instances: users(&name),
                        path: entry.path().display().to_string(),
                        name,
                    });
                }
            }
            list.sort_by(|a, b| a.name.cmp(&b.name));
            ctx.reporter.emit(&VolumeList(list))
        }
        VolumeCommand::Rm { names } => {
            let mut removed = Vec::new();
            for name in names {
                imago_runtime::spec::validate_volume_name(&name)?;
                let path = dir.join(&name);
                if !path.is_dir() {
                    bail!("no such volume {name}");
                }
                let using = users(&name);
                if !using.is_empty() {
                    bail!(
                        "volume {name} is mounted by instance(s) {}; remove them first",
                        using.join(", ")
                    );
                }
                // Renamed away first, so the name is gone at once even if the removal is cut
                // short; leftovers start with a dot and are never listed.
                let doomed = dir.join(format!(".rm-{name}-{}", std::process::id()));
                std::fs::rename(&path, &doomed)
                    .map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", path.display()))?;
                std::fs::remove_dir_all(&doomed)
                    .map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", doomed.display()))?;
                ctx.reporter.status(format!("removed volume {name}"));
                removed.push(name);
            }
            ctx.reporter.emit(&Removed { removed })
        }
    }
}

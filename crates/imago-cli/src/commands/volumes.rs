//! `imago volume ls|rm`: named volumes, the data that outlives instances.

use std::io::Write;

use anyhow::Result;
use clap::Subcommand;
use imago_runtime::{NamedVolume, Provider, volumes};
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
#[serde(transparent)]
struct VolumeList(Vec<NamedVolume>);

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
    let dir = provider.layout().volumes();
    let instances = provider.list()?;
    match cmd {
        VolumeCommand::Ls => ctx
            .reporter
            .emit(&VolumeList(volumes::list_named(&dir, &instances)?)),
        VolumeCommand::Rm { names } => {
            let mut removed = Vec::new();
            for name in names {
                volumes::remove_named(&dir, &name, &instances)?;
                ctx.reporter.status(format!("removed volume {name}"));
                removed.push(name);
            }
            ctx.reporter.emit(&Removed { removed })
        }
    }
}

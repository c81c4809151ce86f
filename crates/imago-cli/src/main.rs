//! `imago`: define it in a file, build it reproducibly, store it by digest, launch new instances
//! from that digest, replace the old ones.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

mod commands;
mod home;
mod reporter;

use home::Home;
use reporter::Reporter;

#[derive(Debug, Parser)]
#[command(
    name = "imago",
    version,
    about = "Immutable infrastructure: build, store, launch, replace"
)]
struct Cli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    command: Command,
}

/// The options every subcommand takes.
#[derive(Debug, clap::Args)]
struct Globals {
    /// Where imago keeps its store and state [default: $XDG_DATA_HOME/imago or ~/.local/share/imago]
    #[arg(long, global = true, env = "IMAGO_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    /// Print results as JSON on stdout
    #[arg(long, global = true)]
    json: bool,
    /// Print no status lines on stderr
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build images from imago.toml into the store and print their digests
    Build(commands::build::BuildArgs),
    /// Print the JSON Schema of imago.toml
    Schema(commands::build::SchemaArgs),
    /// Show what apply would do: new releases, waves, capacity during the rollout
    Plan(commands::deploy::FileArgs),
    /// Build changed images, record releases and roll them out
    Apply(commands::deploy::ApplyArgs),
    /// Print the objects a cluster target's services become (Kubernetes YAML, swarm JSON)
    Render(commands::render::RenderArgs),
    /// Show services, their releases, rollouts and instances
    Status(commands::deploy::StatusArgs),
    /// List a service's releases
    History(commands::deploy::HistoryArgs),
    /// Restore an earlier release (image and configuration together) as a new release
    Rollback(commands::deploy::RollbackArgs),
    /// Replace every instance of a service with new ones of the same release, rolled like an update
    Restart(commands::deploy::RestartArgs),
    /// Pause a service's rollouts: nothing is launched or retired until it is resumed
    Pause(commands::deploy::PauseArgs),
    /// Resume a paused service's rollouts
    Resume(commands::deploy::PauseArgs),
    /// Stop every instance of a service and forget it (its history stays)
    Destroy(commands::deploy::DestroyArgs),
    /// Show the event log
    Events(commands::deploy::EventsArgs),
    /// Report instances that differ from their release: dead, wrong spec, modified, unknown
    Drift(commands::deploy::DriftArgs),
    /// Run the controller: reconcile loop, service endpoints and HTTP API
    Serve(commands::deploy::ServeArgs),
    /// List the images in the store
    Images(commands::images::ImagesArgs),
    /// Show an image's manifest, config and layers
    Inspect(commands::images::InspectArgs),
    /// Give an image another name
    Tag(commands::images::TagArgs),
    /// Remove image names (blobs are deleted by gc)
    Rmi(commands::images::RmiArgs),
    /// Delete blobs that nothing refers to
    Gc(commands::images::GcArgs),
    /// Re-hash blobs and report every corrupt or missing one
    Verify(commands::images::VerifyArgs),
    /// Apply an image's layers into a directory
    Unpack(commands::images::UnpackArgs),
    /// Pull an image from a registry into the store and print its digest
    Pull(commands::registry::PullArgs),
    /// Push an image of the store to a registry
    Push(commands::registry::PushArgs),
    /// Check and store credentials for a registry ($IMAGO_HOME/auth.json)
    Login(commands::registry::LoginArgs),
    /// Remove the stored credentials for a registry
    Logout(commands::registry::LogoutArgs),
    /// Import the images of an OCI or docker archive
    Import(commands::archive::ImportArgs),
    /// Write an image to an OCI or docker archive
    Export(commands::archive::ExportArgs),
    /// Launch a new instance of an image (detached) and print its id
    Run(Box<commands::instances::RunArgs>),
    /// List instances
    Ps(commands::instances::PsArgs),
    /// Stop instances (SIGTERM, then SIGKILL after a grace period)
    Stop(commands::instances::StopArgs),
    /// Remove stopped instances and everything they used
    Rm(commands::instances::RmArgs),
    /// Print an instance's output
    Logs(commands::instances::LogsArgs),
    /// Show everything recorded about an instance
    InspectInstance(commands::instances::InspectInstanceArgs),
    /// List or remove named volumes
    #[command(subcommand)]
    Volume(commands::volumes::VolumeCommand),
    /// The per-instance supervisor (started by `run`)
    #[command(name = "__supervise", hide = true)]
    Supervise(commands::instances::SuperviseArgs),
    /// Runs one `run` step of a build in its sandbox (started by `build`)
    #[command(name = "__sandbox", hide = true)]
    Sandbox(commands::build::SandboxArgs),
    /// The data plane of the service endpoints (started by the controller)
    #[command(name = "__dataplane", hide = true)]
    Dataplane,
}

/// `imago run` alone: the same global options and the same `run` arguments as [`Cli`], with
/// none of the other subcommands. Parsing [`Cli`] builds clap's whole command tree (about 40
/// subcommands and their arguments) before it looks at argv, on the launch's critical path;
/// this builds one. See [`parse`].
#[derive(Debug, Parser)]
#[command(name = "imago")]
struct RunOnly {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    command: RunOnlyCommand,
}

#[derive(Debug, Subcommand)]
enum RunOnlyCommand {
    Run(Box<commands::instances::RunArgs>),
}

/// The command line. When the subcommand is `run` (after global options only), it is parsed
/// by [`RunOnly`]; anything that does not parse there (help, a version request, an error) is
/// parsed again by [`Cli`], so help and error messages are the full tree's, word for word.
fn parse(args: Vec<std::ffi::OsString>, is_run: bool) -> Cli {
    if is_run && let Ok(only) = RunOnly::try_parse_from(&args) {
        let RunOnlyCommand::Run(run) = only.command;
        return Cli {
            globals: only.globals,
            command: Command::Run(run),
        };
    }
    Cli::parse_from(args)
}

/// Whether the first argument that is not a global option is `run`.
fn subcommand_is_run(args: &[std::ffi::OsString]) -> bool {
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        match arg.to_str() {
            Some("--json" | "--quiet" | "-q") => {}
            Some("--home") => {
                rest.next();
            }
            Some(a) if a.starts_with("--home=") => {}
            Some("run") => return true,
            _ => return false,
        }
    }
    false
}

/// What every command gets: where the data lives and where output goes.
pub struct Context {
    pub home: Home,
    pub reporter: Reporter,
}

/// The imago home, which is what `imago_deploy::daemon::DeployHome::new` is given.
impl AsRef<std::path::Path> for Context {
    fn as_ref(&self) -> &std::path::Path {
        &self.home.root
    }
}

impl Context {
    pub fn store(&self) -> Result<imago_store::Store> {
        let dir = self.home.store_dir();
        imago_store::Store::open(&dir)
            .with_context(|| format!("cannot open the image store at {}", dir.display()))
    }
}

fn run(
    cli: Cli,
    reporter: Reporter,
    mut warmup: Option<imago_runtime::supervisor::CgroupLockWarmup>,
) -> Result<()> {
    if !matches!(cli.command, Command::Run(_)) {
        // Stopped and reaped at once: only `run` has a use for it.
        warmup = None;
    }
    let ctx = Context {
        home: Home::locate(cli.globals.home)?,
        reporter,
    };
    match cli.command {
        Command::Build(args) => commands::build::build(&ctx, args),
        Command::Schema(args) => commands::build::schema(&ctx, args),
        Command::Plan(args) => commands::deploy::plan(&ctx, args),
        Command::Apply(args) => commands::deploy::apply(&ctx, args),
        Command::Render(args) => commands::render::render(&ctx, args),
        Command::Status(args) => commands::deploy::status(&ctx, args),
        Command::History(args) => commands::deploy::history(&ctx, args),
        Command::Rollback(args) => commands::deploy::rollback(&ctx, args),
        Command::Restart(args) => commands::deploy::restart(&ctx, args),
        Command::Pause(args) => commands::deploy::set_paused(&ctx, args, true),
        Command::Resume(args) => commands::deploy::set_paused(&ctx, args, false),
        Command::Destroy(args) => commands::deploy::destroy(&ctx, args),
        Command::Events(args) => commands::deploy::events(&ctx, args),
        Command::Drift(args) => commands::deploy::drift(&ctx, args),
        Command::Serve(args) => commands::deploy::serve(&ctx, args),
        Command::Images(args) => commands::images::images(&ctx, args),
        Command::Inspect(args) => commands::images::inspect(&ctx, args),
        Command::Tag(args) => commands::images::tag(&ctx, args),
        Command::Rmi(args) => commands::images::rmi(&ctx, args),
        Command::Gc(args) => commands::images::gc(&ctx, args),
        Command::Verify(args) => commands::images::verify(&ctx, args),
        Command::Unpack(args) => commands::images::unpack(&ctx, args),
        Command::Pull(args) => commands::registry::pull(&ctx, args),
        Command::Push(args) => commands::registry::push(&ctx, args),
        Command::Login(args) => commands::registry::login(&ctx, args),
        Command::Logout(args) => commands::registry::logout(&ctx, args),
        Command::Import(args) => commands::archive::import(&ctx, args),
        Command::Export(args) => commands::archive::export(&ctx, args),
        Command::Run(args) => commands::instances::run(&ctx, *args, warmup),
        Command::Ps(args) => commands::instances::ps(&ctx, args),
        Command::Volume(cmd) => commands::volumes::volume(&ctx, cmd),
        Command::Stop(args) => commands::instances::stop(&ctx, args),
        Command::Rm(args) => commands::instances::rm(&ctx, args),
        Command::Logs(args) => commands::instances::logs(&ctx, args),
        Command::InspectInstance(args) => commands::instances::inspect_instance(&ctx, args),
        Command::Supervise(args) => commands::instances::supervise(args),
        Command::Sandbox(args) => commands::build::sandbox(args),
        Command::Dataplane => commands::deploy::dataplane(&ctx),
    }
}

fn main() -> ExitCode {
    // Before the command line is parsed: the cgroup lock warm-up of `imago run` gains with
    // every millisecond it starts earlier (see `commands::instances::run`), and clap's first
    // parse of this large command tree, with the page faults it takes in a fresh process, is
    // about a millisecond. Any other command stops it right after parsing.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let is_run = subcommand_is_run(&args);
    let warmup = commands::instances::early_cgroup_warmup(is_run, &args);
    let cli = parse(args, is_run);
    let reporter = Reporter::new(cli.globals.json, cli.globals.quiet);
    match run(cli, reporter.clone(), warmup) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            reporter.error(&error);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
        args.iter().map(Into::into).collect()
    }

    /// The `run` fast path reads what the full tree reads: every global option in every place
    /// and every `run` argument (the fields are compared through their Debug form).
    #[test]
    fn run_parses_the_same_with_the_fast_path_as_with_the_whole_tree() {
        for line in [
            &["imago", "run", "img"][..],
            &[
                "imago",
                "--home",
                "/h",
                "run",
                "-q",
                "--network",
                "host",
                "img",
                "--",
                "/bin/sh",
                "-c",
                "x",
            ],
            &[
                "imago",
                "-q",
                "--json",
                "--home=/h",
                "run",
                "--name",
                "n",
                "--memory",
                "16M",
                "--cpus",
                "0.5",
                "--pids",
                "9",
                "-e",
                "A=B",
                "--label",
                "k=v",
                "-v",
                "data:/d",
                "--seccomp",
                "unconfined",
                "--runtime",
                "runc",
                "--entrypoint",
                "/e",
                "--init",
                "img",
                "--",
                "a",
                "b",
            ],
            &["imago", "run", "--home", "/h", "--json", "img"],
        ] {
            let args = os(line);
            assert!(subcommand_is_run(&args), "{line:?}");
            let only = RunOnly::try_parse_from(&args).unwrap();
            let full = Cli::try_parse_from(&args).unwrap();
            let Command::Run(full_run) = &full.command else {
                panic!("{line:?} is not run");
            };
            let RunOnlyCommand::Run(only_run) = &only.command;
            assert_eq!(format!("{only_run:?}"), format!("{full_run:?}"), "{line:?}");
            assert_eq!(
                format!("{:?}", only.globals),
                format!("{:?}", full.globals),
                "{line:?}"
            );
        }
        for line in [
            &["imago", "ps"][..],
            &["imago", "--home", "run", "ps"],
            &["imago", "logs", "run"],
            &["imago"],
        ] {
            assert!(!subcommand_is_run(&os(line)), "{line:?}");
        }
    }

    /// What the fast path does not take falls back to the whole tree: help, errors.
    #[test]
    fn run_help_and_errors_are_left_to_the_whole_tree() {
        for line in [
            &["imago", "run", "--help"][..],
            &["imago", "run"],
            &["imago", "run", "--bogus", "img"],
        ] {
            assert!(RunOnly::try_parse_from(os(line)).is_err(), "{line:?}");
            assert!(Cli::try_parse_from(os(line)).is_err(), "{line:?}");
        }
    }
}

//! Registries: pull, push, login, logout.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Read as _, Write};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use imago_oci::{Digest, Reference};
use imago_registry::{
    Client, Credentials, Progress, RegistryRef, Settings, SharedProgress, names_registry,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::Context;
use crate::reporter::Render;

pub fn settings(ctx: &Context, insecure: bool) -> Result<Settings> {
    Ok(Settings::load(&ctx.home.root, insecure)?)
}

/// One bar per blob and a total, on stderr through the reporter's draw target.
pub struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    blobs: Mutex<HashMap<Digest, (ProgressBar, u64)>>,
}

impl Bars {
    pub fn new(ctx: &Context, what: &str) -> Arc<Bars> {
        let multi = ctx.reporter.multi();
        let total = multi.add(ProgressBar::new(0));
        total.set_style(style());
        total.set_message(what.to_owned());
        Arc::new(Bars {
            multi,
            total,
            blobs: Mutex::new(HashMap::new()),
        })
    }

    pub fn done(&self) {
        let blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        for (bar, _) in blobs.values() {
            bar.finish_and_clear();
        }
        self.total.finish_and_clear();
        let _ = self.multi.clear();
    }
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template("{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Progress for Bars {
    fn start(&self, digest: &Digest, size: u64) {
        let bar = self
            .multi
            .insert_before(&self.total, ProgressBar::new(size));
        bar.set_style(style());
        bar.set_message(digest.short().to_owned());
        self.total.inc_length(size);
        let mut blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        blobs.insert(digest.clone(), (bar, 0));
    }

    fn set(&self, digest: &Digest, position: u64) {
        let mut blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((bar, at)) = blobs.get_mut(digest) {
            bar.set_position(position);
            *at = position;
        }
        self.total
            .set_position(blobs.values().map(|(_, at)| *at).sum());
    }

    fn finish(&self, digest: &Digest) {
        let blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((bar, _)) = blobs.get(digest) {
            bar.finish();
        }
    }
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// HOST[:PORT]/REPO[:TAG] or HOST[:PORT]/REPO@sha256:... (`debian` means docker.io/library/debian)
    pub reference: String,
    /// The platform taken from an index (os/arch[/variant])
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Pull the images of every platform of an index (as `skopeo copy --all`), so that the
    /// index can be pushed again whole
    #[arg(long)]
    pub all_platforms: bool,
    /// Allow plain HTTP and unverified TLS for this registry
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Serialize)]
pub struct PullResult {
    pub reference: String,
    pub digest: Digest,
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
}

impl Render for PullResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{}", self.digest)
    }
}

/// Pulls `reference` into the store, with progress bars; shared by `pull`, `build` and `apply`.
pub fn pull_reference(
    ctx: &Context,
    settings: &Settings,
    reference: &RegistryRef,
) -> Result<PullResult> {
    let store = ctx.store()?;
    let bars = Bars::new(ctx, &reference.short());
    let result = imago_registry::pull(&store, settings, reference, bars.as_ref());
    bars.done();
    let report = result.with_context(|| format!("pull {reference}"))?;
    Ok(PullResult {
        reference: report.reference,
        digest: report.digest,
        blobs_fetched: report.blobs_fetched,
        bytes_fetched: report.bytes_fetched,
    })
}

pub fn pull(ctx: &Context, args: PullArgs) -> Result<()> {
    let reference: RegistryRef = args.reference.parse()?;
    let mut settings = settings(ctx, args.insecure)?;
    settings.platform = args.platform;
    settings.all_platforms = args.all_platforms;
    let result = pull_reference(ctx, &settings, &reference)?;
    ctx.reporter.status(format!(
        "pulled {} {}",
        result.reference,
        result.digest.short()
    ));
    ctx.reporter.emit(&result)
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The image in the store: NAME[:TAG], or a registry reference already in the store
    pub source: String,
    /// HOST[:PORT]/REPO[:TAG] (default: SOURCE, when it is a registry reference)
    pub destination: Option<String>,
    /// For an index: push only this platform's image (os/arch[/variant]), not the index
    #[arg(long)]
    pub platform: Option<String>,
    /// Allow plain HTTP and unverified TLS for this registry
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Serialize)]
pub struct PushResult {
    pub reference: String,
    pub digest: Digest,
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub blobs_skipped: u64,
    #[serde(skip)]
    pub repository: String,
}

impl Render for PushResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{}@{}", self.repository, self.digest)
    }
}

/// The store reference of `source`, and the tag it carries (for a destination without one).
fn source_reference(source: &str) -> Result<(Reference, Option<String>)> {
    if names_registry(source) {
        let r: RegistryRef = source.parse()?;
        let text = match &r.digest {
            Some(d) => format!("{}@{d}", r.name()),
            None => r.to_string(),
        };
        return Ok((text.parse()?, r.tag.clone()));
    }
    let reference: Reference = source.parse()?;
    let tag = match &reference {
        Reference::Name {
            tag: Some(t),
            digest: None,
            ..
        } => Some(t.clone()),
        _ => None,
    };
    Ok((reference, tag))
}

/// Pushes the stored image `source` to `destination` (a registry reference; without a tag it
/// takes the source's tag, else `latest`).
pub fn push_image(
    ctx: &Context,
    settings: &Settings,
    source: &str,
    destination: Option<&str>,
    only_platform: Option<&str>,
) -> Result<PushResult> {
    let (reference, source_tag) = source_reference(source)?;
    let store = ctx.store()?;
    let digest = store
        .resolve_digest(&reference)
        .with_context(|| format!("push {source}"))?;
    let mut dest: RegistryRef = match destination {
        Some(d) => d.parse()?,
        None if names_registry(source) => source.parse()?,
        None => bail!(
            "push {source}: name a destination HOST[:PORT]/REPO[:TAG] (the source is no registry reference)"
        ),
    };
    if dest.tag.is_none() && dest.digest.is_none() {
        dest.tag = Some(source_tag.unwrap_or_else(|| "latest".to_owned()));
    }
    if destination.is_none() {
        // Pushing a pinned reference back pushes the image under its digest.
        dest.tag = dest.tag.filter(|_| dest.digest.is_none());
    }
    let bars = Bars::new(ctx, &dest.short());
    let shared: SharedProgress = bars.clone();
    let result = imago_registry::push(&store, settings, &digest, &dest, &shared, only_platform);
    bars.done();
    let report = result.with_context(|| format!("push {source} to {dest}"))?;
    Ok(PushResult {
        reference: report.reference,
        digest: report.digest,
        blobs_uploaded: report.blobs_uploaded,
        bytes_uploaded: report.bytes_uploaded,
        blobs_skipped: report.blobs_skipped,
        repository: dest.name(),
    })
}

pub fn push(ctx: &Context, args: PushArgs) -> Result<()> {
    let settings = settings(ctx, args.insecure)?;
    let result = push_image(
        ctx,
        &settings,
        &args.source,
        args.destination.as_deref(),
        args.platform.as_deref(),
    )?;
    ctx.reporter.status(format!(
        "pushed {} ({} blobs uploaded, {} already there)",
        result.reference, result.blobs_uploaded, result.blobs_skipped
    ));
    ctx.reporter.emit(&result)
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// HOST[:PORT]
    pub registry: String,
    #[arg(short = 'u', long = "username")]
    pub username: Option<String>,
    /// The password (visible to other users in the process list: prefer --password-stdin)
    #[arg(short = 'p', long = "password", conflicts_with = "password_stdin")]
    pub password: Option<String>,
    /// Read the password from standard input
    #[arg(long)]
    pub password_stdin: bool,
    /// Allow plain HTTP and unverified TLS for this registry
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Serialize)]
struct LoginResult {
    registry: String,
    username: String,
    file: String,
}

impl Render for LoginResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "login succeeded: {}", self.registry)
    }
}

fn registry_host(text: &str) -> Result<String> {
    let host = text
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        bail!("invalid registry {text:?}: expected HOST[:PORT]");
    }
    Ok(host.to_owned())
}

/// Where `login` takes the password from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PasswordSource {
    Argument,
    Stdin,
    /// Asked on the terminal, without echo.
    Prompt,
    /// Neither given nor askable: standard input is no terminal (a script would hang or read
    /// its own input as the password).
    Refused,
}

fn password_source(argument: bool, stdin_flag: bool, stdin_is_terminal: bool) -> PasswordSource {
    match (argument, stdin_flag, stdin_is_terminal) {
        (true, _, _) => PasswordSource::Argument,
        (false, true, _) => PasswordSource::Stdin,
        (false, false, true) => PasswordSource::Prompt,
        (false, false, false) => PasswordSource::Refused,
    }
}

/// Keeps the terminal's echo off while it lives. rpassword turns echo off only after it has
/// printed the prompt, so a password typed ahead of the prompt would be shown; this turns it off
/// first and puts the terminal back as it was, whatever happens in between.
struct EchoOff {
    tty: std::fs::File,
    saved: rustix::termios::Termios,
}

impl EchoOff {
    fn new() -> std::io::Result<Self> {
        use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")?;
        let saved = tcgetattr(&tty)?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        tcsetattr(&tty, OptionalActions::Now, &quiet)?;
        Ok(Self { tty, saved })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // Nothing to report to: the process is about to use or leave the terminal either way.
        let _ = rustix::termios::tcsetattr(
            &self.tty,
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

pub fn login(ctx: &Context, args: LoginArgs) -> Result<()> {
    let registry = registry_host(&args.registry)?;
    let Some(username) = args.username else {
        bail!("login to {registry}: give a user name with -u");
    };
    let source = password_source(
        args.password.is_some(),
        args.password_stdin,
        std::io::stdin().is_terminal(),
    );
    let password = match (source, args.password) {
        (PasswordSource::Argument, Some(p)) => p,
        (PasswordSource::Stdin, _) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("read the password from standard input")?;
            text.trim_end_matches(['\n', '\r']).to_owned()
        }
        (PasswordSource::Prompt, _) => {
            let context = || format!("login to {registry}: read the password from the terminal");
            let _echo_off = EchoOff::new().with_context(context)?;
            rpassword::prompt_password(format!("Password for {username}@{registry}: "))
                .with_context(context)?
        }
        (PasswordSource::Argument | PasswordSource::Refused, _) => bail!(
            "login to {registry}: no terminal to ask for the password on: give it with --password-stdin (or -p)"
        ),
    };
    let credentials = Credentials {
        username: username.clone(),
        password,
    };
    let settings = settings(ctx, args.insecure)?;
    let client = Client::connect_with(&settings, &registry, Some(credentials.clone()))?;
    client.check_login()?;
    let file = ctx.home.root.join("auth.json");
    imago_registry::store_credentials(&file, &registry, Some(&credentials))?;
    ctx.reporter.emit(&LoginResult {
        registry,
        username,
        file: file.display().to_string(),
    })
}

#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// HOST[:PORT]
    pub registry: String,
}

#[derive(Serialize)]
struct LogoutResult {
    registry: String,
    removed: bool,
}

impl Render for LogoutResult {
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.removed {
            writeln!(out, "removed the credentials for {}", self.registry)
        } else {
            writeln!(out, "no credentials stored for {}", self.registry)
        }
    }
}

pub fn logout(ctx: &Context, args: LogoutArgs) -> Result<()> {
    let registry = registry_host(&args.registry)?;
    let file = ctx.home.root.join("auth.json");
    let removed = if file.exists() {
        imago_registry::store_credentials(&file, &registry, None)?
    } else {
        false
    };
    ctx.reporter.emit(&LogoutResult { registry, removed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_prompts_only_on_a_terminal() {
        assert_eq!(
            password_source(true, false, false),
            PasswordSource::Argument
        );
        assert_eq!(password_source(false, true, true), PasswordSource::Stdin);
        assert_eq!(password_source(false, false, true), PasswordSource::Prompt);
        assert_eq!(
            password_source(false, false, false),
            PasswordSource::Refused
        );
    }
}

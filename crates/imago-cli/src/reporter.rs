//! All user-facing output goes through the [`Reporter`]: status lines and progress bars on
//! stderr; results on stdout, as human text or, with `--json`, as one JSON document.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// A command result that can be shown to people and to programs.
pub trait Render: Serialize {
    /// The human form, written to stdout.
    fn human(&self, out: &mut dyn Write) -> std::io::Result<()>;
}

#[derive(Debug, Clone)]
pub struct Reporter {
    json: bool,
    quiet: bool,
    progress: bool,
    // Set once a result went to stdout, so that --json output stays one document.
    emitted: Arc<AtomicBool>,
}

impl Reporter {
    pub fn new(json: bool, quiet: bool) -> Reporter {
        let progress = !json && !quiet && std::io::stderr().is_terminal();
        Reporter {
            json,
            quiet,
            progress,
            emitted: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// A status line on stderr ("imported web:latest").
    pub fn status(&self, message: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", message.as_ref());
        }
    }

    /// A warning on stderr, shown even with --quiet.
    pub fn warn(&self, message: impl AsRef<str>) {
        eprintln!("warning: {}", message.as_ref());
    }

    /// Writes the command's result to stdout.
    pub fn emit<T: Render>(&self, result: &T) -> anyhow::Result<()> {
        // Buffered: stdout is line-buffered, and a listing of 1,000 images would otherwise be
        // 1,000 write calls.
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        if self.json {
            serde_json::to_writer_pretty(&mut out, result)?;
            writeln!(out)?;
        } else {
            result.human(&mut out)?;
        }
        out.flush()?;
        self.emitted.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Reports a failure: the error chain on stderr, and with --json an error document on stdout
    /// unless the command already printed its result there.
    pub fn error(&self, error: &anyhow::Error) {
        let message = error_chain(error);
        eprintln!("error: {message}");
        if self.json && !self.emitted.load(Ordering::Relaxed) {
            let doc = serde_json::json!({ "error": message });
            println!("{doc}");
        }
    }

    /// A byte-count progress bar on stderr; hidden when stderr is not a terminal or with --json.
    pub fn bytes_bar(&self, total: u64, message: impl Into<String>) -> ProgressBar {
        let bar = if self.progress {
            ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(message.into());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    /// A set of bars drawn together on stderr (hidden like [`Reporter::bytes_bar`]).
    pub fn multi(&self) -> indicatif::MultiProgress {
        if self.progress {
            indicatif::MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
        } else {
            indicatif::MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        }
    }

    /// A spinner with a message, for steps without a known size.
    pub fn spinner(&self, message: impl Into<String>) -> ProgressBar {
        let bar = if self.progress {
            ProgressBar::new_spinner()
        } else {
            ProgressBar::hidden()
        };
        bar.set_message(message.into());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }
}

/// The error and its causes joined with ": ", leaving out a cause whose text an outer message
/// already includes (library errors often embed their source in their own message).
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// Formats a byte count the way `docker images` does (1000-based, one decimal).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_drops_repeated_causes() {
        let inner = std::io::Error::other("disk on fire");
        let outer = anyhow::Error::new(inner).context("write blob: disk on fire");
        assert_eq!(
            error_chain(&outer.context("import web")),
            "import web: write blob: disk on fire"
        );
    }

    #[test]
    fn sizes_read_like_docker() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_500), "1.5kB");
        assert_eq!(human_size(104_857_600), "104.9MB");
    }
}

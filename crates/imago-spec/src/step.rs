//! A `run` step as the builder hands it to a sandbox, and how it ended: plain data shared by
//! imago-build (which plans steps and turns their result into a layer) and imago-runtime (whose
//! helper runs them). It lives here so that the builder does not link the container engine: the
//! definition parser is fuzzed (fuzz/fuzz_targets/imago_toml.rs), and the engine is what made
//! that build slow. The CLI joins the two through imago-build's `StepRunner`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The container engine of an instance or a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// youki's libcontainer, linked into imago.
    #[default]
    Embedded,
    /// The external `runc` binary.
    Runc,
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Engine::Embedded => "embedded",
            Engine::Runc => "runc",
        })
    }
}

/// A runtime name that is neither `embedded` nor `runc`.
#[derive(Debug, thiserror::Error)]
#[error("unknown runtime {0:?} (expected embedded or runc)")]
pub struct UnknownEngine(pub String);

impl FromStr for Engine {
    type Err = UnknownEngine;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embedded" => Ok(Engine::Embedded),
            "runc" => Ok(Engine::Runc),
            other => Err(UnknownEngine(other.to_owned())),
        }
    }
}

/// Mount points the runtime itself puts in every sandbox; created in the root when missing.
pub const STANDARD_MOUNT_POINTS: &[&str] = &["proc", "dev", "sys"];

/// One mount of a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SandboxMount {
    Bind {
        source: PathBuf,
        dest: String,
        read_only: bool,
    },
    Tmpfs {
        dest: String,
    },
}

impl SandboxMount {
    pub fn dest(&self) -> &str {
        match self {
            SandboxMount::Bind { dest, .. } | SandboxMount::Tmpfs { dest } => dest,
        }
    }
}

/// Everything the sandbox needs to run one step (the runtime's helper reads it from
/// `DIR/sandbox.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Unique on this host while the step runs: names the containers and their cgroups.
    pub id: String,
    /// The root as the earlier layers left it; never written.
    pub lower: PathBuf,
    /// The step's own directory: `upper/` (what the step changed), `work/`, `merged/`, the
    /// bundle and the result.
    pub dir: PathBuf,
    pub commands: Vec<Vec<String>>,
    /// `KEY=VALUE`, complete (PATH included).
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub host_network: bool,
    pub mounts: Vec<SandboxMount>,
    pub memory_bytes: u64,
    pub pids: u64,
    pub timeout_ms: u64,
    pub engine: Engine,
    /// Give the step a full copy of `lower` instead of an overlay (also done when the overlay
    /// cannot be mounted, e.g. on a file system overlayfs does not take as upper directory).
    #[serde(default)]
    pub copy_root: bool,
}

impl SandboxSpec {
    /// Where the step's changes are, once it ran: an overlayfs upper directory (whiteouts are
    /// character devices 0/0, replaced directories carry `trusted.overlay.opaque`).
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }

    /// Where the step's result is: the upper directory, or with `exit.copied` the whole copied
    /// root (to be compared in full with `lower`).
    pub fn changes(&self, exit: &StepExit) -> PathBuf {
        if exit.copied {
            self.dir.join("merged")
        } else {
            self.upper()
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepExit {
    /// The exit code of the command that ended the step (128 + signal for a signal).
    pub code: i32,
    /// Which command (0-based) ended the step.
    pub command: usize,
    /// The step was killed at its timeout.
    pub timed_out: bool,
    /// The step ran on a copy of the root (`DIR/merged` is the whole tree afterwards), not on
    /// an overlay (`DIR/upper` holds what it changed).
    #[serde(default)]
    pub copied: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_parse_and_print_their_names() {
        for engine in [Engine::Embedded, Engine::Runc] {
            assert_eq!(engine.to_string().parse::<Engine>().unwrap(), engine);
        }
        let err = "crun".parse::<Engine>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown runtime \"crun\" (expected embedded or runc)"
        );
    }
}

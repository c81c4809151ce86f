//! Where imago keeps its data: `--home`, else `IMAGO_HOME`, else `$XDG_DATA_HOME/imago`, else
//! `~/.local/share/imago`.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// The home directory and the places inside it that each layer owns.
#[derive(Debug, Clone)]
pub struct Home {
    pub root: PathBuf,
}

impl Home {
    pub fn locate(flag: Option<PathBuf>) -> Result<Home> {
        // clap already folds IMAGO_HOME into `flag` (env = "IMAGO_HOME").
        if let Some(root) = flag.filter(|p| !p.as_os_str().is_empty()) {
            return Ok(Home { root });
        }
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Ok(Home {
                root: PathBuf::from(xdg).join("imago"),
            });
        }
        match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => Ok(Home {
                root: PathBuf::from(home).join(".local/share/imago"),
            }),
            None => bail!("cannot locate the imago home: pass --home DIR or set IMAGO_HOME"),
        }
    }

    /// The OCI image layout.
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }
}

//! Where imago keeps its data: `--home`, else `IMAGO_HOME`, else `$XDG_DATA_HOME/imago`, else
//! `~/.local/share/imago`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// The home directory and the places inside it that each layer owns.
#[derive(Debug, Clone)]
pub struct Home {
    pub root: PathBuf,
}

impl Home {
    /// The home, made absolute once here: every path derived from it (a runc bundle's rootfs,
    /// a supervisor's arguments, the controller's, which runs in another directory) must not
    /// depend on the directory imago was started in.
    pub fn locate(flag: Option<PathBuf>) -> Result<Home> {
        let root = Home::root(flag)?;
        let root = std::path::absolute(&root)
            .with_context(|| format!("cannot make the imago home {} absolute", root.display()))?;
        Ok(Home { root })
    }

    fn root(flag: Option<PathBuf>) -> Result<PathBuf> {
        // clap already folds IMAGO_HOME into `flag` (env = "IMAGO_HOME").
        if let Some(root) = flag.filter(|p| !p.as_os_str().is_empty()) {
            return Ok(root);
        }
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(xdg).join("imago"));
        }
        match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => Ok(PathBuf::from(home).join(".local/share/imago")),
            None => bail!("cannot locate the imago home: pass --home DIR or set IMAGO_HOME"),
        }
    }

    /// The OCI image layout.
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }
}

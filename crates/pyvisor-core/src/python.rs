//! Finding the Python interpreter: an explicit path, a venv, `PYVISOR_PYTHON`, or `python3`.
//!
//! Owns interpreter resolution only; checking what the interpreter can import is the CLI's
//! `doctor`.

use std::path::{Path, PathBuf};

use crate::error::StartError;

/// Which Python runs the workers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Interpreter {
    /// `PYVISOR_PYTHON` if set, else `python3` on `PATH`.
    #[default]
    Default,
    /// This executable (a bare name is looked up on `PATH`).
    Path(PathBuf),
    /// `DIR/bin/python` of a virtual environment.
    Venv(PathBuf),
}

impl Interpreter {
    /// The interpreter named by `explicit`, else `PYVISOR_PYTHON`, else `python3`: the rule
    /// every pyvisor command follows.
    pub fn from_option(explicit: Option<PathBuf>) -> Self {
        match explicit {
            Some(p) => Interpreter::Path(p),
            None => Interpreter::Default,
        }
    }

    /// The configured interpreter path, before lookup.
    pub fn configured(&self) -> PathBuf {
        match self {
            Interpreter::Default => std::env::var_os("PYVISOR_PYTHON")
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from("python3"), PathBuf::from),
            Interpreter::Path(p) => p.clone(),
            Interpreter::Venv(d) => d.join("bin").join("python"),
        }
    }

    /// The executable to run, checked to exist.
    ///
    /// ```
    /// use pyvisor_core::Interpreter;
    /// let missing = Interpreter::Path("/nonexistent/python".into());
    /// assert!(missing.resolve().is_err());
    /// ```
    pub fn resolve(&self) -> Result<PathBuf, StartError> {
        let configured = self.configured();
        find_executable(&configured).ok_or(StartError::InterpreterNotFound { path: configured })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Look a program up like a shell does: a path with a slash as is, a bare name on `PATH`.
pub fn find_executable(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 || name.is_absolute() {
        return is_executable(name).then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

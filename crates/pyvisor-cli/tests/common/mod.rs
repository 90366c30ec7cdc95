//! What every test of the `pyvisor` binary needs: the workspace root, the interpreter with
//! `pyvisor_worker`, and the binary under test.
#![allow(dead_code)] // each test binary uses its own subset

pub mod manager;
#[path = "../../../../tests/common/proc_scan.rs"]
pub mod proc_scan;
pub mod run;

#[allow(unused_imports)] // each test binary uses its own subset
pub use proc_scan::{alive, processes_of_run};

use std::path::PathBuf;
use std::process::Command;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `PYVISOR_PYTHON` (a relative path is relative to the workspace root: cargo runs tests
/// elsewhere), else the workspace's `.venv`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PYVISOR_PYTHON").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.components().count() > 1 && p.is_relative() { root().join(p) } else { p };
    }
    let venv = root().join(".venv/bin/python");
    assert!(venv.exists(), "no Python with pyvisor_worker: run `make test`, or set PYVISOR_PYTHON");
    venv
}

/// The binary under test: cargo's, unless `PYVISOR_TEST_BIN` names another build of it (e.g. a
/// copy taken where several checkouts share one target directory and overwrite its binary).
pub fn pyvisor() -> Command {
    let bin = std::env::var_os("PYVISOR_TEST_BIN").filter(|b| !b.is_empty()).unwrap_or_else(|| env!("CARGO_BIN_EXE_pyvisor").into());
    let mut c = Command::new(bin);
    c.env("PYVISOR_PYTHON", python()).env("PYVISOR_LOG", "warn");
    c
}


//! What every test of the `pyvisor` binary needs: the workspace root, the interpreter with
//! `pyvisor_worker`, and the binary under test.
#![allow(dead_code)] // each test binary uses its own subset

pub mod manager;
pub mod run;

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

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()))
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Live processes whose environment carries `PYVISOR_RUN_ID=run_id`.
pub fn processes_of_run(run_id: &str) -> Vec<u32> {
    let needle = format!("PYVISOR_RUN_ID={run_id}");
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
                .unwrap_or(false)
        })
        .filter(|pid| alive(*pid))
        .collect()
}

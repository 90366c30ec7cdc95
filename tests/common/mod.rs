//! Helpers shared by the integration tests: the interpreter, worker scripts, process checks.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use pyvisor::{DeathCertificate, PoolEvent, PoolSpec, RecycleReason};

#[allow(unused_imports)] // each test binary uses its own subset
pub use proc_scan::{alive, processes_of_run};

/// The interpreter with the adapter installed: `PYVISOR_PYTHON`, else the repo's `.venv`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PYVISOR_PYTHON").filter(|p| !p.is_empty()) {
        // A relative path is relative to the workspace root (cargo runs tests elsewhere).
        let p = PathBuf::from(p);
        return if p.components().count() > 1 && p.is_relative() { PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p) } else { p };
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(venv.exists(), "no Python with pyvisor_worker: run `make test` (it creates .venv), or set PYVISOR_PYTHON");
    venv
}

/// Path of a worker script in tests/workers.
pub fn worker(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/workers").join(name)
}

/// A spec for a test worker script with the test interpreter.
pub fn spec(script: &str) -> PoolSpec {
    PoolSpec::script(worker(script)).python(python()).name(script.trim_end_matches(".py"))
}

/// Poll `cond` until it holds or `limit` passes (a guard against hangs, not a timing claim).
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}


/// Send a signal to a pid.
pub fn signal(pid: u32, sig: i32) {
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Logs to stderr when `PYVISOR_LOG` is set (for debugging a test).
pub fn logs() {
    if std::env::var_os("PYVISOR_LOG").is_some() {
        std::mem::forget(pyvisor::telemetry::init());
    }
}

/// Events of a pool, collected for assertions.
#[derive(Clone, Default)]
pub struct Events(pub Arc<Mutex<Vec<PoolEvent>>>);
impl Events {
    pub fn spec(&self, spec: pyvisor::PoolSpec) -> pyvisor::PoolSpec {
        let me = self.clone();
        spec.on_event(move |e| me.0.lock().unwrap().push(e.clone()))
    }
    pub fn deaths(&self) -> Vec<Arc<DeathCertificate>> {
        self.0.lock().unwrap().iter().filter_map(|e| match e { PoolEvent::WorkerDied { certificate } => Some(certificate.clone()), _ => None }).collect()
    }
    pub fn pids(&self) -> Vec<u32> {
        self.0.lock().unwrap().iter().filter_map(|e| match e { PoolEvent::WorkerSpawned { pid, .. } => Some(*pid), _ => None }).collect()
    }
    pub fn recycled(&self) -> bool {
        self.0.lock().unwrap().iter().any(|e| matches!(e, PoolEvent::Recycled { .. }))
    }
    pub fn recycles(&self) -> Vec<RecycleReason> {
        self.0.lock().unwrap().iter().filter_map(|e| match e { PoolEvent::Recycled { reason, .. } => Some(reason.clone()), _ => None }).collect()
    }
}

pub mod otel;
pub mod proc_scan;
pub mod procs;
pub mod side_effects;

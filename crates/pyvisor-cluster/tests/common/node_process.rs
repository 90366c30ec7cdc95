//! Nodes as separate OS processes for the multi-node tests: [`NodeProcess`] starts a
//! `pyvisor-cluster-node` serving tests/workers/cluster.py with real Python workers ([`python`])
//! and stops it; [`scratch`] makes a test's cookie file and side-effect log, [`self_signed`] a
//! certificate.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// The interpreter with the adapter installed: `PYVISOR_PYTHON`, else the repo's `.venv`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PYVISOR_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(venv.exists(), "no Python with pyvisor_worker: run `make test` (it creates .venv), or set PYVISOR_PYTHON");
    venv
}

/// The test's scratch directory, cookie file and side-effect log.
pub fn scratch(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("pyvisor-cluster-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cookie = dir.join("cookie");
    std::fs::write(&cookie, "s3cret\n").expect("cookie");
    let side_log = dir.join("side.log");
    std::fs::write(&side_log, "").expect("log");
    (dir, cookie, side_log)
}

/// A self-signed certificate for `localhost` (its own CA), written as `NAME.pem` and
/// `NAME.key` in `dir`.
pub fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    let (pem, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&pem, cert.pem()).expect("write the certificate");
    std::fs::write(&key, signing_key.serialize_pem()).expect("write the key");
    (pem, key)
}

/// More for a node process than [`NodeProcess::start`] gives it.
#[derive(Debug, Default, Clone)]
pub struct Extra {
    /// Environment variables of the node process (its workers inherit them, under what
    /// `--env` and pyvisor's telemetry set).
    pub env: Vec<(String, String)>,
    /// Arguments after the usual ones.
    pub args: Vec<String>,
}

pub struct NodeProcess {
    child: Child,
    /// Reaped already: its pid may be someone else's now, never signal it.
    reaped: bool,
}

impl NodeProcess {
    /// Start node `name` serving pool `pool`, joined to `join`; returns once it says `ready`.
    pub fn start(name: &str, pool: &str, listen: SocketAddr, cookie: &Path, join: &[SocketAddr], side_log: &Path) -> Self {
        Self::start_with(name, pool, listen, cookie, join, side_log, Extra::default())
    }

    /// [`NodeProcess::start`] with environment variables and arguments of `extra`.
    pub fn start_with(name: &str, pool: &str, listen: SocketAddr, cookie: &Path, join: &[SocketAddr], side_log: &Path, extra: Extra) -> Self {
        let mut node = Self::spawn_with(name, pool, listen, cookie, join, side_log, extra);
        let stdout = node.child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("a line");
        assert!(line.starts_with("ready "), "node {name} said {line:?}");
        node
    }

    /// Start the node process as [`NodeProcess::start_with`] does, without waiting for it to
    /// be ready.
    pub fn spawn_with(name: &str, pool: &str, listen: SocketAddr, cookie: &Path, join: &[SocketAddr], side_log: &Path, extra: Extra) -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/workers/cluster.py");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pyvisor-cluster-node"));
        cmd.args(["--name", name, "--listen", &listen.to_string()])
            .arg("--cookie-file")
            .arg(cookie)
            .arg("--pool")
            .arg(format!("{pool}={}", script.display()))
            .args(["--workers", "2"])
            .arg("--python")
            .arg(python())
            .arg("--env")
            .arg(format!("SIDE_LOG={}", side_log.display()))
            // Warnings and errors only on the test's output (`extra.env` may say otherwise).
            .env("PYVISOR_LOG", "warn")
            .stdout(Stdio::piped());
        for j in join {
            cmd.args(["--join", &j.to_string()]);
        }
        cmd.args(&extra.args).envs(extra.env);
        let child = cmd.spawn().expect("node process starts");
        NodeProcess { child, reaped: false }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// Stop the node as an operator would (SIGTERM: it stops its pools and flushes its
    /// telemetry) and wait for it to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        assert!(!self.reaped);
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("the node process exits");
        self.reaped = true;
        status
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: i32) {
        assert!(!self.reaped);
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // SIGTERM (after SIGCONT, for a node a test stopped): the node stops its pools (their
        // workers exit on socket EOF anyway).
        // SAFETY: signalling our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGCONT);
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

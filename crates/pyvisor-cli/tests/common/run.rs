//! A `pyvisor run` under test: its output collected, signals, and `pyvisor status --json`
//! polled until the tree is ready.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::pyvisor;

/// A `pyvisor run` whose output is collected (it prints a table every second: the pipes must
/// be drained).
pub struct Run {
    pub child: Child,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Run {
    pub fn start(cmd: &mut Command) -> Run {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("pyvisor run starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for pipe in [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>] {
            let output = Arc::clone(&output);
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line);
                }
            }));
        }
        Run { child, output, readers }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: a plain kill(2) of our own child, which has not been waited for.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the exit; a guard, not a budget.
    pub fn wait(&mut self, guard: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // Its last words: the pipes close at its exit (a guard, should a process it
                // started still hold them).
                while !self.readers.iter().all(|r| r.is_finished()) && start.elapsed() < guard {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return s;
            }
            if start.elapsed() > guard {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("`pyvisor run` still running after {guard:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn status(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = pyvisor();
    c.arg("status").args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("pyvisor status runs")
}

/// Polls `pyvisor status ARGS --json` until the tree is ready and every worker is (a guard,
/// not a budget); returns the reply.
pub fn wait_ready(run: &mut Run, args: &[&str], env: &[(&str, &Path)]) -> serde_json::Value {
    let start = Instant::now();
    let mut last: String;
    loop {
        if let Some(s) = run.child.try_wait().unwrap() {
            panic!("`pyvisor run` exited ({s}):\n{}", run.output());
        }
        let mut a = args.to_vec();
        a.push("--json");
        let out = status(&a, env);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints one JSON object");
            let workers = all_workers(&v);
            if v["ready"] == true && !workers.is_empty() && workers.iter().all(|(_, w)| w["state"] == "ready") {
                return v;
            }
            last = v.to_string();
        } else {
            last = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        assert!(start.elapsed() < Duration::from_secs(120), "not ready in 120 s; last status: {last}\nrun:\n{}", run.output());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// (pool path, worker) for every worker in the JSON tree.
pub fn all_workers(v: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    fn walk(nodes: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
        for n in nodes.as_array().into_iter().flatten() {
            if let Some(ws) = n["pool"]["workers"].as_array() {
                out.extend(ws.iter().map(|w| (n["path"].as_str().unwrap().to_string(), w.clone())));
            }
            walk(&n["children"], out);
        }
    }
    let mut out = Vec::new();
    walk(&v["children"], &mut out);
    out
}

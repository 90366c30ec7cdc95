//! `pyvisor status` from another process against a real `pyvisor run` with real Python
//! workers: the table and the JSON name every pool with its workers' pids (checked against
//! /proc), the socket is owner-only, a second run on the same path is refused, and SIGTERM
//! leaves neither the socket file nor a process behind.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use common::{alive, processes_of_run, pyvisor, root};

/// A fresh directory for one test.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pyvisor-status-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `pyvisor run` whose output is collected (it prints a table every second: the pipes must
/// be drained).
struct Run {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Run {
    fn start(cmd: &mut Command) -> Run {
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

    fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    fn signal(&self, sig: i32) {
        // SAFETY: a plain kill(2) of our own child, which has not been waited for.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the exit; a guard, not a budget.
    fn wait(&mut self, guard: Duration) -> std::process::ExitStatus {
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

fn status(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = pyvisor();
    c.arg("status").args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("pyvisor status runs")
}

/// Polls `pyvisor status ARGS --json` until the tree is ready and every worker is (a guard,
/// not a budget); returns the reply.
fn wait_ready(run: &mut Run, args: &[&str], env: &[(&str, &Path)]) -> serde_json::Value {
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
fn all_workers(v: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
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

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn write_tree(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("tree.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn basic() -> String {
    root().join("tests/workers/basic.py").to_string_lossy().into_owned()
}

#[test]
fn status_prints_every_pool_with_its_workers_pids_and_the_socket_goes_with_the_run() {
    let dir = scratch("main");
    let tree = write_tree(
        &dir,
        &format!(
            r#"
[supervisor]
name = "svc"
strategy = "one_for_one"

[[supervisor.children]]
pool = "front"
script = "{basic}"
workers = 2

[[supervisor.children]]
supervisor = "inner"
strategy = "one_for_one"

  [[supervisor.children.children]]
  pool = "back"
  script = "{basic}"
  workers = 1
"#,
            basic = basic()
        ),
    );
    // pyvisor creates the directory of the socket.
    let sock = dir.join("ctl/c.sock");
    let sock_arg = sock.to_str().unwrap();
    let mut run = Run::start(pyvisor().arg("run").arg(&tree).args(["--control", sock_arg]));
    let v = wait_ready(&mut run, &["--control", sock_arg], &[]);

    // What the run says about itself.
    assert_eq!(v["version"], 1);
    assert_eq!(v["name"], "svc");
    assert_eq!(v["phase"], "running");
    assert_eq!(v["pid"], run.child.id());
    let run_id = v["run_id"].as_str().expect("run_id").to_string();
    assert!(run_id.starts_with(&format!("{}-", run.child.id())), "{run_id}");
    let workers = all_workers(&v);
    let by_path = |p: &str| workers.iter().filter(|(path, _)| path == p).map(|(_, w)| w["pid"].as_u64().unwrap() as u32).collect::<Vec<_>>();
    assert_eq!(by_path("front").len(), 2, "{v}");
    assert_eq!(by_path("inner/back").len(), 1, "{v}");
    let inner = v["children"].as_array().unwrap().iter().find(|n| n["path"] == "inner").expect("the nested supervisor");
    assert_eq!(inner["kind"], "supervisor");
    assert_eq!(inner["state"], "running");

    // The same pids as /proc: the children of `pyvisor run` that carry its run id.
    let reported: BTreeSet<u32> = workers.iter().map(|(_, w)| w["pid"].as_u64().unwrap() as u32).collect();
    let in_proc: BTreeSet<u32> = processes_of_run(&run_id).into_iter().filter(|&p| ppid(p) == Some(run.child.id())).collect();
    assert_eq!(reported, in_proc, "status vs /proc");

    // The table, from another process.
    let out = status(&["--control", sock_arg], &[]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{table}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("tree `svc`") && table.contains("running, ready"), "{table}");
    let header = table.lines().find(|l| l.starts_with("PATH")).unwrap_or_else(|| panic!("no header: {table}"));
    for col in ["KIND", "WORKER", "PID", "STATE", "SERVED", "RESTARTS"] {
        assert!(header.contains(col), "{header}");
    }
    for (path, pids) in [("front", by_path("front")), ("inner/back", by_path("inner/back"))] {
        for pid in pids {
            let row = table
                .lines()
                .find(|l| l.split_whitespace().nth(3) == Some(pid.to_string().as_str()))
                .unwrap_or_else(|| panic!("no row for pid {pid}:\n{table}"));
            let cols: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(&cols[..2], [path, "pool"], "{row}");
            assert_eq!(cols[4], "ready", "{row}");
        }
    }
    assert!(table.lines().any(|l| l.split_whitespace().take(2).eq(["inner", "supervisor"])), "{table}");

    // Owner-only: the socket 0600, the directory pyvisor made 0700.
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(&dir.join("ctl")), 0o700);

    // A second run on the same path is refused before it starts anything, and the first
    // goes on serving.
    let mut second = Run::start(pyvisor().arg("run").arg(&tree).args(["--control", sock_arg]));
    let refused = second.wait(Duration::from_secs(60));
    let said = second.output();
    assert_eq!(refused.code(), Some(2), "{said}");
    assert!(said.contains(&format!("another `pyvisor run` already serves status at {}", sock.display())) && said.contains("--control PATH"), "{said}");
    assert!(!said.contains("Ctrl-C stops it"), "the second run started its tree: {said}");
    let again = status(&["--control", sock_arg, "--json"], &[]);
    assert!(again.status.success(), "the first run stopped answering: {}", String::from_utf8_lossy(&again.stderr));
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["pid"], run.child.id());
    let still: BTreeSet<u32> = all_workers(&again).iter().map(|(_, w)| w["pid"].as_u64().unwrap() as u32).collect();
    assert_eq!(still, reported);

    // SIGTERM: the normal shutdown path removes the socket; no process is left.
    run.signal(libc::SIGTERM);
    let stopped = run.wait(Duration::from_secs(60));
    assert!(stopped.success(), "{}", run.output());
    assert!(!sock.exists() && std::fs::symlink_metadata(&sock).is_err(), "the socket file outlived the run");
    for pid in &reported {
        assert!(!alive(*pid), "worker {pid} outlived the run");
    }
    assert_eq!(processes_of_run(&run_id), Vec::<u32>::new(), "processes of the run are left");

    // No server there now: a clear message, non-zero.
    let out = status(&["--control", sock_arg], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no `pyvisor run` serves status at {} (no such socket)", sock.display())), "{err}");
    assert!(out.stdout.is_empty());
    // A socket file nobody listens on (a SIGKILLed run's): said so.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let out = status(&["--control", sock_arg], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the socket file is left from a run that was killed"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_finds_a_run_at_the_default_path() {
    let dir = scratch("default");
    let xdg = dir.join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
    let tree = write_tree(
        &dir,
        &format!("[supervisor]\nname = \"solo\"\nstrategy = \"one_for_one\"\n\n[[supervisor.children]]\npool = \"only\"\nscript = \"{}\"\nworkers = 1\n", basic()),
    );
    let env: [(&str, &Path); 1] = [("XDG_RUNTIME_DIR", &xdg)];
    let mut run = Run::start(pyvisor().arg("run").arg(&tree).env("XDG_RUNTIME_DIR", &xdg));
    // No name, no path: the only run in $XDG_RUNTIME_DIR/pyvisor.
    let v = wait_ready(&mut run, &[], &env);
    let sock = xdg.join("pyvisor/solo.sock");
    assert!(std::fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(&xdg.join("pyvisor")), 0o700);
    let pid = all_workers(&v)[0].1["pid"].as_u64().unwrap();
    // By name, as a table.
    let out = status(&["solo"], &env);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.lines().any(|l| l.starts_with("only ") && l.split_whitespace().nth(3) == Some(pid.to_string().as_str())), "{table}");
    assert!(table.contains(&sock.display().to_string()), "{table}");
    // A name nobody runs under: a clear message.
    let out = status(&["other"], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("other.sock (no such socket)"));

    run.signal(libc::SIGINT);
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.output());
    assert!(std::fs::symlink_metadata(&sock).is_err(), "the socket file outlived the run");
    assert!(!alive(pid as u32));
    let out = status(&[], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no `pyvisor run` has a control socket in"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

//! `pyvisor run` under systemd's notify protocol: the test plays the service manager (a Unix
//! datagram socket it owns, named by `NOTIFY_SOCKET`) and runs the real binary on a tree of
//! real Python workers.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use common::manager::Manager;
use common::{alive, processes_of_run, python};

/// A worker whose import takes `SLOW_START` seconds and then leaves `imported-PID` (its run id
/// and whether it saw systemd's variables) in `NOTIFY_TEST_DIR`. Once the file `fail` appears
/// there, running workers exit with status 3 and new ones raise at import: the pool fails.
const WORKER: &str = r#"
import json, os, threading, time
from pyvisor_worker import expose, run_worker

DIR = os.environ["NOTIFY_TEST_DIR"]
FAIL = os.path.join(DIR, "fail")
if os.path.exists(FAIL):
    raise RuntimeError("the test made this pool fail")
time.sleep(float(os.environ.get("SLOW_START", "0")))
info = {
    "pid": os.getpid(),
    "run_id": os.environ.get("PYVISOR_RUN_ID"),
    "systemd_vars": [v for v in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID") if v in os.environ],
}
tmp = os.path.join(DIR, ".imported-%d" % os.getpid())
with open(tmp, "w") as f:
    json.dump(info, f)
os.rename(tmp, os.path.join(DIR, "imported-%d" % os.getpid()))

def exit_when_told():
    while not os.path.exists(FAIL):
        time.sleep(0.05)
    os._exit(3)

threading.Thread(target=exit_when_told, daemon=True).start()

@expose(idempotent=True)
def echo(x):
    return x

if __name__ == "__main__":
    run_worker()
"#;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pyvisor-notify-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("worker.py"), WORKER).unwrap();
    dir
}

/// The workers that finished importing so far: (pid, run id, systemd variables they saw).
fn imported(dir: &Path) -> Vec<(u32, String, Vec<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if !e.file_name().to_string_lossy().starts_with("imported-") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        let vars = v["systemd_vars"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
        out.push((v["pid"].as_u64().unwrap() as u32, v["run_id"].as_str().unwrap_or_default().to_string(), vars));
    }
    out
}

fn pyvisor_run(tree: &Path, dir: &Path, socket: &str, watchdog_usec: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pyvisor"))
        .env("PYVISOR_PYTHON", python())
        .env("PYVISOR_LOG", "warn")
        .env("NOTIFY_TEST_DIR", dir)
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", watchdog_usec.to_string())
        // Its own control socket: runs of tests in parallel must not meet at the default path.
        .args(["run", &tree.to_string_lossy(), "--control", &dir.join("control.sock").to_string_lossy()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pyvisor run starts")
}

/// Wait for the exit (a guard: a run that does not stop fails the test instead of hanging).
fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`pyvisor run` did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

#[test]
fn ready_once_every_pool_is_ready_pings_while_alive_and_stops_cleanly_on_sigterm() {
    let dir = scratch("ready");
    let tree = dir.join("tree.toml");
    // One fast pool at the root, and a nested supervisor whose pool takes 1.5 s to import.
    std::fs::write(
        &tree,
        r#"
[supervisor]
strategy = "one_for_one"

[[supervisor.children]]
pool = "fast"
script = "worker.py"
workers = 1

[[supervisor.children]]
supervisor = "nested"
strategy = "one_for_one"

  [[supervisor.children.children]]
  pool = "slow"
  script = "worker.py"
  workers = 2
  env = { SLOW_START = "1.5" }
  shutdown_timeout_secs = 10
"#,
    )
    .unwrap();
    let socket = dir.join("notify.sock");
    let mut manager = Manager::listen(UnixDatagram::bind(&socket).unwrap());
    let mut child = pyvisor_run(&tree, &dir, &socket.to_string_lossy(), 1_000_000);

    let ready = manager.wait_for("READY=1", Duration::from_secs(60), |l| l == "READY=1");
    // When READY=1 arrived, every worker of every pool had finished its module-level code.
    let workers = imported(&dir);
    assert_eq!(workers.len(), 3, "READY=1 before every worker had imported: {workers:?}; lines {:?}", manager.lines);
    assert!(manager.lines[..ready].contains(&"STATUS=starting the tree".to_string()), "{:?}", manager.lines);
    assert_eq!(manager.count_from(0, "WATCHDOG=1") - manager.count_from(ready, "WATCHDOG=1"), 0, "pings before READY=1");
    manager.wait_for("the readiness STATUS", Duration::from_secs(5), |l| l == "STATUS=ready: 2/2 pools, 3/3 workers ready");
    let run_id = workers[0].1.clone();
    assert!(!run_id.is_empty());
    for (pid, run, vars) in &workers {
        assert_eq!(run, &run_id, "worker {pid}");
        assert!(vars.is_empty(), "worker {pid} inherited {vars:?}");
    }

    // WATCHDOG_USEC = 1 s: pings every half second while the tree is alive. Three more after
    // READY=1 (the guard is generous: a loaded machine may miss some walks' deadlines).
    let after_ready = manager.lines.len();
    let waiting = Instant::now();
    manager.wait_count("3 pings after READY=1", after_ready, "WATCHDOG=1", 3, Duration::from_secs(20));
    eprintln!("3 pings in {:?} with WATCHDOG_USEC=1s", waiting.elapsed());

    sigterm(&child);
    let stopping = manager.wait_for("STOPPING=1", Duration::from_secs(30), |l| l == "STOPPING=1");
    manager.wait_for("EXTEND_TIMEOUT_USEC", Duration::from_secs(30), |l| l.starts_with("EXTEND_TIMEOUT_USEC="));
    let status = wait_exit(&mut child, Duration::from_secs(60));
    manager.drain();
    assert_eq!(status.code(), Some(0), "{status}");
    assert_eq!(manager.count_from(stopping, "WATCHDOG=1"), 0, "pings after STOPPING=1: {:?}", &manager.lines[stopping..]);
    eprintln!("what the service manager heard: {:?}", manager.lines);
    let left = processes_of_run(&run_id);
    assert!(left.is_empty(), "processes of the run left behind: {left:?}");
    for (pid, ..) in &workers {
        assert!(!alive(*pid), "worker {pid} outlived `pyvisor run`");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pings_stop_once_the_tree_has_failed_and_the_run_exits_non_zero() {
    let dir = scratch("fails");
    let tree = dir.join("tree.toml");
    // No restart allowed at the root: the pool's failure fails the tree.
    std::fs::write(
        &tree,
        r#"
[supervisor]
strategy = "one_for_one"
max_restarts = 0
period_secs = 60

[[supervisor.children]]
pool = "doomed"
script = "worker.py"
workers = 2
"#,
    )
    .unwrap();
    // An abstract socket this time (`@name`).
    let name = format!("pyvisor-notify-test-{}", std::process::id());
    let addr = {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
    };
    let mut manager = Manager::listen(UnixDatagram::bind_addr(&addr).unwrap());
    let mut child = pyvisor_run(&tree, &dir, &format!("@{name}"), 600_000);

    let ready = manager.wait_for("READY=1", Duration::from_secs(60), |l| l == "READY=1");
    manager.wait_for("a ping", Duration::from_secs(10), |l| l == "WATCHDOG=1");
    let run_id = imported(&dir).first().map(|w| w.1.clone()).expect("a worker imported");

    // Running workers exit, their replacements raise at import: start failures fail the pool,
    // and the pool's failure fails the root.
    std::fs::write(dir.join("fail"), b"").unwrap();
    let failed = manager.wait_for("the failure STATUS", Duration::from_secs(60), |l| l.starts_with("STATUS=the tree failed"));
    let status = wait_exit(&mut child, Duration::from_secs(60));
    manager.drain();
    assert!(!status.success() && status.code().is_some(), "a failed tree exits non-zero: {status}");
    assert!(manager.count_from(ready, "WATCHDOG=1") >= 1);
    assert_eq!(
        manager.count_from(failed, "WATCHDOG=1"),
        0,
        "pings after the tree failed: {:?}",
        &manager.lines[failed..]
    );
    eprintln!("what the service manager heard: {:?}", manager.lines);
    let left = processes_of_run(&run_id);
    assert!(left.is_empty(), "processes of the run left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

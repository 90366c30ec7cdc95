//! `pyvisor node` (feature `cluster`) as a real process with real Python workers, node A in this
//! test process: A's calls run on the tree's served pool; after the pool's workers are killed
//! from outside and the tree's supervisor starts a new pool, calls through the same served name
//! reach it; SIGTERM stops the node in order; a restarted `pyvisor node` rejoins A through
//! `--join`; `--serve` serves only the pools named, and an unknown name is an error before
//! anything starts; a reload (SIGHUP) serves the pools it adds and stops serving those it
//! removes.
#![cfg(feature = "cluster")]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pyvisor;
use common::run::{status, Run};
use pyvisor_cluster::{Node, NodeConfig, RemoteCallError, RemotePool};
use pyvisor_core::CallOptions;

/// Guards (not timing claims).
const GUARD: Duration = Duration::from_secs(120);

/// One test at a time: ractor's process groups are global to this process.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The workers: their node and pid; while the file `FAIL_FLAG` exists a worker exits as it
/// starts (so its pool fails, and the tree's supervisor starts a new one).
const WORKER: &str = r#"
import os
import sys

from pyvisor_worker import expose

if os.path.exists(os.environ["FAIL_FLAG"]):
    sys.exit(3)


@expose(idempotent=True)
def where_pid(x):
    return [os.environ.get("PYVISOR_NODE", "?"), os.getpid(), x]
"#;

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

/// The test's directory: cookie, worker script, tree file (pools `work` and `extra`), and the
/// flag that makes workers fail.
struct Scratch {
    dir: PathBuf,
    cookie: PathBuf,
    tree: PathBuf,
    flag: PathBuf,
}

fn scratch(tag: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("pyvisor-node-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let cookie = dir.join("cookie");
    std::fs::write(&cookie, "s3cret\n").expect("cookie");
    std::fs::write(dir.join("worker.py"), WORKER).expect("worker");
    let flag = dir.join("fail");
    let s = Scratch { tree: dir.join("tree.toml"), dir, cookie, flag };
    write_tree(&s, &["work", "extra"]);
    s
}

/// Write the tree file with `pools` (2 workers each, running the test's worker).
fn write_tree(s: &Scratch, pools: &[&str]) {
    let mut tree = "[supervisor]\nname = \"nodetree\"\nstrategy = \"one_for_one\"\nmax_restarts = 20\nperiod_secs = 60\n".to_string();
    for pool in pools {
        tree += &format!(
            "\n[[supervisor.children]]\npool = \"{pool}\"\nscript = \"worker.py\"\nworkers = 2\nenv = {{ PYVISOR_NODE = \"b\", FAIL_FLAG = \"{}\" }}\n",
            s.flag.display()
        );
    }
    std::fs::write(&s.tree, tree).expect("tree");
}

/// `pyvisor node` named `b` on `listen`, joined to `join`, with `extra` arguments.
fn start_node(s: &Scratch, listen: SocketAddr, join: SocketAddr, extra: &[&str]) -> Run {
    let mut cmd = pyvisor();
    cmd.args(["node", "--name", "b", "--listen", &listen.to_string(), "--join", &join.to_string()])
        .arg("--cookie-file")
        .arg(&s.cookie)
        .arg("--control")
        .arg(s.dir.join("b.sock"))
        .args(extra)
        .arg(&s.tree);
    Run::start(&mut cmd)
}

async fn wait_output(run: &mut Run, needle: &str) {
    let start = Instant::now();
    while !run.output().contains(needle) {
        if let Ok(Some(status)) = run.child.try_wait() {
            panic!("`pyvisor node` exited ({status}) before `{needle}`:\n{}", run.output());
        }
        assert!(start.elapsed() < GUARD, "no `{needle}` within {GUARD:?}:\n{}", run.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_exit(run: &mut Run) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = run.child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(start.elapsed() < GUARD, "`pyvisor node` still running after {GUARD:?}:\n{}", run.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < GUARD {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

async fn call(pool: &RemotePool, x: u64) -> Result<(String, u32, u64), RemoteCallError> {
    pool.call_with("where_pid", &x, CallOptions::new().timeout(Duration::from_secs(20))).await
}

/// `pyvisor status --json` of the node's tree.
async fn status_json(s: &Scratch) -> serde_json::Value {
    let ctl = s.dir.join("b.sock");
    let out = tokio::task::spawn_blocking(move || status(&["--control", &ctl.to_string_lossy(), "--json"], &[])).await.expect("status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn child<'v>(v: &'v serde_json::Value, path: &str) -> &'v serde_json::Value {
    v["children"].as_array().into_iter().flatten().find(|c| c["path"] == path).unwrap_or_else(|| panic!("no child {path}: {v}"))
}

fn sigkill(pid: u32) {
    // SAFETY: a plain kill(2) of a worker process of the node under test.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_tree_takes_calls_and_its_restarted_pool_is_still_served() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let s = scratch("calls");
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config")).await.expect("node a");
    let mut b = start_node(&s, free_addr(), a.listen_addr(), &[]);
    wait_output(&mut b, "ready b@127.0.0.1").await;

    // Every pool of the tree is served, under its id; A's calls run on B's workers.
    let (work, extra) = (RemotePool::new(&a, "work"), RemotePool::new(&a, "extra"));
    let b_only = vec!["b@127.0.0.1".to_string()];
    assert!(eventually(|| work.members() == b_only && extra.members() == b_only).await, "{:?} {:?}", work.members(), extra.members());
    let (node, _, x) = call(&work, 1).await.expect("a call on work");
    assert_eq!((node.as_str(), x), ("b", 1));
    assert_eq!(call(&extra, 2).await.expect("a call on extra").0, "b");

    // The pool's workers killed from outside while new ones cannot start: the pool fails and
    // the tree's supervisor starts a new one (a new handle) once they can again.
    let before = status_json(&s).await;
    let old: Vec<u32> =
        child(&before, "work")["pool"]["workers"].as_array().into_iter().flatten().filter_map(|w| w["pid"].as_u64()).map(|p| p as u32).collect();
    assert_eq!(old.len(), 2, "{before}");
    std::fs::write(&s.flag, "").expect("flag");
    for pid in &old {
        sigkill(*pid);
    }
    wait_output(&mut b, "work: pool failed").await;
    std::fs::remove_file(&s.flag).expect("flag");

    // Calls through the same served name reach the new pool.
    let start = Instant::now();
    let (node, pid) = loop {
        match call(&work, 3).await {
            Ok((node, pid, _)) => break (node, pid),
            Err(e) => assert!(start.elapsed() < GUARD, "no call succeeded after the restart: {e}\n{}", b.output()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(node, "b");
    assert!(!old.contains(&pid), "{pid} is one of the killed workers {old:?}");
    let after = status_json(&s).await;
    assert!(child(&after, "work")["restarts"].as_u64() >= Some(1), "the supervisor did not restart the pool: {after}");
    assert_eq!(work.members(), b_only);

    // SIGTERM: serving stops, the tree shuts down, then the node.
    b.signal(libc::SIGTERM);
    let status = wait_exit(&mut b).await;
    assert!(status.success(), "{status}:\n{}", b.output());
    assert!(b.output().contains("stopped"), "{}", b.output());
    assert!(eventually(|| work.members().is_empty() && a.peers().is_empty()).await, "{:?} {:?}", work.members(), a.peers());
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_through_join_and_serves_only_the_pools_named() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let s = scratch("rejoin");
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config")).await.expect("node a");
    let b_addr = free_addr();
    let b_only = vec!["b@127.0.0.1".to_string()];
    let (work, extra) = (RemotePool::new(&a, "work"), RemotePool::new(&a, "extra"));
    for round in 0..2 {
        let mut b = start_node(&s, b_addr, a.listen_addr(), &["--serve", "work"]);
        wait_output(&mut b, "ready b@127.0.0.1").await;
        assert!(eventually(|| work.members() == b_only).await, "round {round}: {:?}", work.members());
        let (node, _, x) = call(&work, round).await.expect("a call");
        assert_eq!((node.as_str(), x), ("b", round));
        // `extra` runs in B's tree but is not served.
        assert!(extra.members().is_empty(), "round {round}: {:?}", extra.members());
        b.signal(libc::SIGTERM);
        let status = wait_exit(&mut b).await;
        assert!(status.success(), "{status}:\n{}", b.output());
        assert!(eventually(|| work.members().is_empty()).await, "round {round}: {:?}", work.members());
    }
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_the_pools_it_adds_and_stops_serving_those_it_removes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let s = scratch("reload");
    write_tree(&s, &["work"]);
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config")).await.expect("node a");
    let mut b = start_node(&s, free_addr(), a.listen_addr(), &[]);
    wait_output(&mut b, "ready b@127.0.0.1").await;
    let b_only = vec!["b@127.0.0.1".to_string()];
    let (work, extra) = (RemotePool::new(&a, "work"), RemotePool::new(&a, "extra"));
    assert!(eventually(|| work.members() == b_only).await, "{:?}", work.members());
    assert!(extra.members().is_empty(), "{:?}", extra.members());

    // The file now has `extra` instead of `work`: after SIGHUP, `extra` is served and `work`
    // is not any more.
    write_tree(&s, &["extra"]);
    b.signal(libc::SIGHUP);
    wait_output(&mut b, "reloaded:").await;
    assert!(eventually(|| extra.members() == b_only && work.members().is_empty()).await, "{:?} {:?}\n{}", extra.members(), work.members(), b.output());
    let (node, _, x) = call(&extra, 5).await.expect("a call on the added pool");
    assert_eq!((node.as_str(), x), ("b", 5));
    assert!(matches!(call(&work, 6).await, Err(RemoteCallError::NoMembers { .. })));

    b.signal(libc::SIGTERM);
    let status = wait_exit(&mut b).await;
    assert!(status.success(), "{status}:\n{}", b.output());
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
fn an_unknown_serve_name_is_an_error_before_anything_starts() {
    let s = scratch("unknown");
    let nobody = free_addr();
    let mut b = start_node(&s, free_addr(), nobody, &["--serve", "work", "--serve", "nope"]);
    let status = b.wait(GUARD);
    let out = b.output();
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains("--serve nope") && out.contains("no pool `nope`") && out.contains("work, extra"), "{out}");
    // Neither the node nor a worker started.
    assert!(!out.contains("listening") && !out.contains("spawned"), "{out}");
    assert!(!Path::new(&s.dir.join("b.sock")).exists());
    let _ = std::fs::remove_dir_all(&s.dir);
}

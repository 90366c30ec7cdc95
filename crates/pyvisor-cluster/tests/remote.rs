//! Pools across nodes, with separate OS processes over real TCP on 127.0.0.1: node A (this
//! test) calls pool `work` served by nodes B and C (`pyvisor-cluster-node` processes, real
//! Python workers: tests/workers/cluster.py). Calls reach both; SIGKILL of B's process under
//! load (16 callers) loses no idempotent result and runs no non-idempotent call twice (the
//! side-effect log), the load goes on on C; B restarted joins A again and is used again.
//! SIGSTOP of B is noticed by A's node heartbeat and handled like a loss (not left to the
//! calls' deadlines).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, free_addr};
use pyvisor_cluster::{HeartbeatPolicy, Node, NodeConfig, NodeEvent, RemoteCallError, RemoteCallOptions, RemotePool};

/// The interpreter with the adapter installed: `PYVISOR_PYTHON`, else the repo's `.venv`.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("PYVISOR_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(venv.exists(), "no Python with pyvisor_worker: run `make test` (it creates .venv), or set PYVISOR_PYTHON");
    venv
}

struct NodeProcess {
    child: Child,
    /// Reaped already: its pid may be someone else's now, never signal it.
    reaped: bool,
}

impl NodeProcess {
    /// Start node `name` serving pool `pool`, joined to `join`; returns once it says `ready`.
    fn start(name: &str, pool: &str, listen: SocketAddr, cookie: &std::path::Path, join: &[SocketAddr], side_log: &std::path::Path) -> Self {
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
            .stdout(Stdio::piped());
        for j in join {
            cmd.args(["--join", &j.to_string()]);
        }
        let mut child = cmd.spawn().expect("node process starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("a line");
        assert!(line.starts_with("ready "), "node {name} said {line:?}");
        NodeProcess { child, reaped: false }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: i32) {
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

/// One test at a time: ractor's process groups are global to this process, so two tests' nodes
/// would see each other's pools (one node per process is the rule outside tests).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the load of [`start_load`] saw: each idempotent call's node and when it answered, each
/// non-idempotent call's token, outcome and duration.
#[derive(Default)]
struct Seen {
    idempotent: Vec<(std::time::Instant, String)>,
    once: Vec<(String, Result<String, RemoteCallError>, Duration)>,
}

/// 16 callers on `work`, each alternating an idempotent `slow_where` (which must always
/// succeed, whatever happens to a node: a failure panics the caller) and a non-idempotent
/// `record` (token `t<caller>-<n>`), every call with `timeout`, until `stop`.
fn start_load(work: &Arc<RemotePool>, timeout: Duration, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Seen>> {
    (0..16u64)
        .map(|caller| {
            let (work, stop) = (Arc::clone(work), Arc::clone(stop));
            tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let x = caller * 1_000_000 + n;
                    let opts = RemoteCallOptions::default().idempotent(true).timeout(timeout);
                    let got: Result<(String, u64), _> = work.call_with("slow_where", &(x, 0.002), opts).await;
                    let (node, back) = got.unwrap_or_else(|e| panic!("idempotent call {x} lost: {e}"));
                    assert_eq!(back, x);
                    seen.idempotent.push((std::time::Instant::now(), node));
                    let token = format!("t{caller}-{n}");
                    let started = std::time::Instant::now();
                    let r = work.call_with::<_, String>("record", &token, RemoteCallOptions::default().timeout(timeout)).await;
                    seen.once.push((token, r, started.elapsed()));
                }
                seen
            })
        })
        .collect()
}

/// Stop the load and gather what its callers saw.
async fn finish_load(callers: Vec<tokio::task::JoinHandle<Seen>>, stop: &AtomicBool) -> Seen {
    stop.store(true, Ordering::Relaxed);
    let mut all = Seen::default();
    for c in callers {
        let seen = c.await.expect("caller");
        all.idempotent.extend(seen.idempotent);
        all.once.extend(seen.once);
    }
    all
}

/// Every non-idempotent call ran at most once (the side-effect log); one that answered ran
/// exactly once; one that failed did so as lost with `node`. The lost ones, with how long they
/// took.
fn check_at_most_once(side_log: &std::path::Path, seen: &Seen, node: &str) -> Vec<Duration> {
    let log = std::fs::read_to_string(side_log).expect("log");
    let mut runs: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for line in log.lines() {
        if let Some((_, token)) = line.split_once(' ') {
            *runs.entry(token).or_default() += 1;
        }
    }
    let mut lost = Vec::new();
    for (token, r, took) in &seen.once {
        let n = runs.get(token.as_str()).copied().unwrap_or(0);
        assert!(n <= 1, "{token} ran {n} times");
        match r {
            Ok(_) => assert_eq!(n, 1, "{token} answered but did not run"),
            Err(RemoteCallError::NodeLost { node: lost_on, .. }) => {
                assert_eq!(lost_on, node, "{token}");
                lost.push(*took);
            }
            Err(e) => panic!("{token}: {e}"),
        }
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_a_run_on_b_and_c_and_survive_the_loss_of_b() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (dir, cookie, side_log) = scratch("sigkill");
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config")).await.expect("node a");
    let (b_addr, c_addr) = (free_addr(), free_addr());
    let mut b = NodeProcess::start("b", "work", b_addr, &cookie, &[a.listen_addr()], &side_log);
    let c = NodeProcess::start("c", "work", c_addr, &cookie, &[a.listen_addr()], &side_log);
    let work = Arc::new(RemotePool::new(&a, "work"));
    assert!(
        eventually(Duration::from_secs(20), || work.members() == vec!["b@127.0.0.1".to_string(), "c@127.0.0.1".to_string()]).await,
        "members: {:?}",
        work.members()
    );

    // Calls from A run on B and C.
    let idem = || RemoteCallOptions::default().idempotent(true).timeout(Duration::from_secs(20));
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..20u64 {
        let (node, x): (String, u64) = work.call_with("where", &i, idem()).await.expect("a call");
        assert_eq!(x, i);
        seen.insert(node);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec!["b".to_string(), "c".to_string()]);

    // 16 callers; B is killed (SIGKILL) while they run.
    let stop = Arc::new(AtomicBool::new(false));
    let callers = start_load(&work, Duration::from_secs(20), &stop);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b_pid = b.pid();
    b.kill();
    let killed_at = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = finish_load(callers, &stop).await;
    assert!(seen.idempotent.iter().any(|(at, node)| *at > killed_at && node == "c"), "the load went on on C");
    let lost = check_at_most_once(&side_log, &seen, "b@127.0.0.1");
    eprintln!("{} non-idempotent calls, {} lost with node b (pid {b_pid})", seen.once.len(), lost.len());
    // 16 callers spend most of their time in `record`: some were running on B when it died.
    assert!(!lost.is_empty(), "no non-idempotent call was in flight on B when it was killed");
    assert!(eventually(Duration::from_secs(10), || work.members() == vec!["c@127.0.0.1".to_string()]).await, "{:?}", work.members());

    // B restarted joins A again and is used again.
    let _b = NodeProcess::start("b", "work", b_addr, &cookie, &[a.listen_addr()], &side_log);
    assert!(eventually(Duration::from_secs(20), || work.members().len() == 2).await, "{:?}", work.members());
    let mut again = std::collections::BTreeSet::new();
    for i in 0..20u64 {
        let (node, _): (String, u64) = work.call_with("where", &i, idem()).await.expect("a call");
        again.insert(node);
    }
    assert!(again.contains("b"), "B is used again: {again:?}");
    drop(c);
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The test's scratch directory, cookie file and side-effect log.
fn scratch(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("pyvisor-cluster-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cookie = dir.join("cookie");
    std::fs::write(&cookie, "s3cret\n").expect("cookie");
    let side_log = dir.join("side.log");
    std::fs::write(&side_log, "").expect("log");
    (dir, cookie, side_log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_is_noticed_by_the_heartbeat_and_handled_like_a_loss() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (dir, cookie, side_log) = scratch("sigstop");
    let config = NodeConfig::new("a", free_addr(), "s3cret").expect("config").heartbeat(HeartbeatPolicy::new(Duration::from_millis(200), 3));
    let a = Node::start(config).await.expect("node a");
    let mut events = a.events();
    let b = NodeProcess::start("b", "work2", free_addr(), &cookie, &[a.listen_addr()], &side_log);
    let _c = NodeProcess::start("c", "work2", free_addr(), &cookie, &[a.listen_addr()], &side_log);
    let work = Arc::new(RemotePool::new(&a, "work2"));
    assert!(eventually(Duration::from_secs(20), || work.members().len() == 2).await, "members: {:?}", work.members());

    // Calls have 60 s: a call held by the stopped node would take that long; the heartbeat
    // ends it within about a second.
    let stop = Arc::new(AtomicBool::new(false));
    let callers = start_load(&work, Duration::from_secs(60), &stop);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    b.signal(libc::SIGSTOP);
    let stopped_at = std::time::Instant::now();
    // A notices: a `Silent` event for b, then b leaves the pool's members.
    let silent = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(NodeEvent::Silent { peer, .. }) = events.recv().await {
                return peer;
            }
        }
    })
    .await
    .expect("the heartbeat notices the stopped node");
    assert_eq!(silent, "b@127.0.0.1");
    assert!(eventually(Duration::from_secs(10), || work.members() == vec!["c@127.0.0.1".to_string()]).await, "{:?}", work.members());
    eprintln!("b stopped; noticed after {:?}", stopped_at.elapsed());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let seen = finish_load(callers, &stop).await;
    let lost = check_at_most_once(&side_log, &seen, "b@127.0.0.1");
    // Ended by the heartbeat, not by the calls' 60 s.
    assert!(lost.iter().all(|took| *took < Duration::from_secs(30)), "{lost:?}");
    assert!(!lost.is_empty(), "no non-idempotent call was in flight on B when it stopped");
    eprintln!("{} non-idempotent calls, {} ended as lost with the stopped node", seen.once.len(), lost.len());
    b.signal(libc::SIGCONT);
    drop(b);
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

//! Pools across nodes, with separate OS processes over real TCP on 127.0.0.1: node A (this
//! test, serving the pool itself too) and nodes B and C (`pyvisor-cluster-node` processes, real
//! Python workers: tests/workers/cluster.py). Calls reach all three; SIGKILL of B's process
//! under load (16 callers) loses no idempotent result and runs no non-idempotent call twice
//! (the side-effect log), the load goes on on A and C; B restarted joins A again, takes no call
//! in its taint window and is used after it — in the clear and over mutual TLS. SIGSTOP of B is
//! noticed by A's node heartbeat and handled like a loss (not left to the calls' deadlines).
//! Cancellation crosses; affinity and idempotency keys hold; another cookie is refused; a node
//! process killed while it starts leaves no worker behind and is forgotten; the Python workers
//! of a serving node SIGKILLed mid-call are a crash on that node (its barrier retries the
//! idempotent call, the other fails as `worker_crashed`), never a node loss.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::node_process::{python, scratch, self_signed, Extra, NodeProcess};
use common::{eventually, free_addr};
use pyvisor_cluster::{HeartbeatPolicy, LossCause, Node, NodeConfig, NodeEvent, NodeTls, RemoteCallError, RemotePool};
use pyvisor_core::{CallOptions, Pool, PoolSpec};

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
                    let opts = CallOptions::new().idempotent(true).timeout(timeout);
                    let got: Result<(String, u64), _> = work.call_with("slow_where", &(x, 0.002), opts).await;
                    let (node, back) = got.unwrap_or_else(|e| panic!("idempotent call {x} lost: {e}"));
                    assert_eq!(back, x);
                    seen.idempotent.push((std::time::Instant::now(), node));
                    let token = format!("t{caller}-{n}");
                    let started = std::time::Instant::now();
                    let r = work.call_with::<_, String>("record", &token, CallOptions::new().timeout(timeout)).await;
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
fn check_at_most_once(side_log: &std::path::Path, seen: &Seen, node: &str, cause: LossCause) -> Vec<Duration> {
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
            Err(RemoteCallError::NodeLost { certificate, .. }) => {
                assert_eq!((certificate.node.as_str(), certificate.cause, certificate.attempt), (node, cause, 1), "{token}");
                lost.push(*took);
            }
            Err(e) => panic!("{token}: {e}"),
        }
    }
    lost
}

/// `n` calls of `where` at once: the nodes they ran on.
async fn spread(work: &Arc<RemotePool>, n: u64) -> std::collections::BTreeSet<String> {
    let calls = (0..n).map(|i| {
        let work = Arc::clone(work);
        async move {
            let (node, x): (String, u64) = work.call_with("where", &i, CallOptions::new().timeout(Duration::from_secs(20))).await.expect("a call");
            assert_eq!(x, i);
            node
        }
    });
    futures::future::join_all(calls).await.into_iter().collect()
}

/// Node A's own member of pool `name` (this test process, `PYVISOR_NODE=a`).
async fn local_pool(name: &str, side_log: &std::path::Path) -> Pool {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/workers/cluster.py");
    let spec = PoolSpec::script(script).name(name).python(python()).workers(2).env("PYVISOR_NODE", "a").env("SIDE_LOG", side_log.to_string_lossy());
    Pool::start(spec).await.expect("A's pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_a_run_on_b_and_c_and_survive_the_loss_of_b() {
    let _turn = ONE_AT_A_TIME.lock().await;
    survive_the_loss_of_b("sigkill", "work", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mutual_tls_too() {
    let _turn = ONE_AT_A_TIME.lock().await;
    survive_the_loss_of_b("sigkill-tls", "work6", true).await;
}

/// A self-signed certificate for `localhost` in `dir` (its own CA): the node flags for it and
/// A's settings.
fn tls_for(dir: &std::path::Path) -> (Vec<String>, NodeTls) {
    let (pem, key) = self_signed(dir, "node");
    let tls = NodeTls::from_pem_files(&pem, &key, &pem, "localhost").expect("TLS settings");
    let (pem, key) = (pem.to_string_lossy().into_owned(), key.to_string_lossy().into_owned());
    (vec!["--tls-cert".into(), pem.clone(), "--tls-key".into(), key, "--tls-ca".into(), pem], tls)
}

/// A (this test, serving `pool` itself too) with B and C (processes) under 16 callers; B is
/// killed, restarted, tainted, used again. With `tls`, every session is mutual TLS.
async fn survive_the_loss_of_b(tag: &str, pool: &str, tls: bool) {
    let (dir, cookie, side_log) = scratch(tag);
    // A taint window long enough to see B back and still tainted.
    let window = Duration::from_secs(10);
    let mut config = NodeConfig::new("a", free_addr(), "s3cret").expect("config").taint_window(window);
    let mut extra = Extra::default();
    if tls {
        let (args, settings) = tls_for(&dir);
        config = config.tls(settings);
        extra.args = args;
    }
    let a = Node::start(config).await.expect("node a");
    let mine = local_pool(pool, &side_log).await;
    let _served = a.serve(mine.clone()).await.expect("A serves its pool");
    let (b_addr, c_addr) = (free_addr(), free_addr());
    let start = |name: &str, addr| NodeProcess::start_with(name, pool, addr, &cookie, &[a.listen_addr()], &side_log, extra.clone());
    let mut b = start("b", b_addr);
    let c = start("c", c_addr);
    let work = Arc::new(RemotePool::new(&a, pool));
    let all = ["a@127.0.0.1", "b@127.0.0.1", "c@127.0.0.1"].map(String::from).to_vec();
    assert!(eventually(Duration::from_secs(20), || work.members() == all).await, "members: {:?}", work.members());

    // One call at a time stays on A (its own member, nothing in flight anywhere); calls at once
    // spread to B and C (fewest in flight first).
    for i in 0..5u64 {
        let (node, _): (String, u64) = work.call_with("where", &i, CallOptions::new().timeout(Duration::from_secs(20))).await.expect("a call");
        assert_eq!(node, "a");
    }
    let nodes = spread(&work, 24).await;
    assert_eq!(nodes.into_iter().collect::<Vec<_>>(), vec!["a", "b", "c"]);

    // 16 callers; B is killed (SIGKILL) while they run.
    let stop = Arc::new(AtomicBool::new(false));
    let callers = start_load(&work, Duration::from_secs(20), &stop);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b_pid = b.pid();
    b.kill();
    let killed_at = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = finish_load(callers, &stop).await;
    for node in ["a", "c"] {
        assert!(seen.idempotent.iter().any(|(at, n)| *at > killed_at && n == node), "the load went on on {node}");
    }
    let lost = check_at_most_once(&side_log, &seen, "b@127.0.0.1", LossCause::Closed);
    eprintln!("{} non-idempotent calls, {} lost with node b (pid {b_pid})", seen.once.len(), lost.len());
    // 16 callers spend most of their time in `record`: some were running on B when it died.
    assert!(!lost.is_empty(), "no non-idempotent call was in flight on B when it was killed");
    let a_and_c = ["a@127.0.0.1", "c@127.0.0.1"].map(String::from).to_vec();
    assert!(eventually(Duration::from_secs(10), || work.members() == a_and_c).await, "{:?}", work.members());

    // B restarted joins A again; within its taint window it takes no call while A and C can;
    // after it, it is used again.
    let _b = start("b", b_addr);
    assert!(eventually(Duration::from_secs(20), || work.members() == all).await, "{:?}", work.members());
    let mut while_tainted = 0;
    while a.is_tainted("b@127.0.0.1") {
        let nodes = spread(&work, 24).await;
        if a.is_tainted("b@127.0.0.1") {
            assert!(!nodes.contains("b"), "B took a call in its taint window: {nodes:?}");
            while_tainted += 1;
        }
    }
    assert!(while_tainted > 0, "B came back after its taint window: nothing was checked (raise the window)");
    let mut again = std::collections::BTreeSet::new();
    for _ in 0..5 {
        again.extend(spread(&work, 24).await);
    }
    assert!(again.contains("b"), "B is used again after its taint window: {again:?}");
    drop(c);
    drop(_served);
    mine.shutdown().await;
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
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
    let lost = check_at_most_once(&side_log, &seen, "b@127.0.0.1", LossCause::Silent { missed: 3 });
    // Ended by the heartbeat, not by the calls' 60 s.
    assert!(lost.iter().all(|took| *took < Duration::from_secs(30)), "{lost:?}");
    assert!(!lost.is_empty(), "no non-idempotent call was in flight on B when it stopped");
    eprintln!("{} non-idempotent calls, {} ended as lost with the stopped node", seen.once.len(), lost.len());
    b.signal(libc::SIGCONT);
    drop(b);
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_given_up_by_its_caller_is_cancelled_on_the_node_running_it() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (dir, cookie, side_log) = scratch("cancel");
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config")).await.expect("node a");
    let _b = NodeProcess::start("b", "work3", free_addr(), &cookie, &[a.listen_addr()], &side_log);
    let work = RemotePool::new(&a, "work3");
    assert!(eventually(Duration::from_secs(20), || work.members() == vec!["b@127.0.0.1".to_string()]).await, "{:?}", work.members());
    let long = || CallOptions::new().timeout(Duration::from_secs(20));

    // `patient_record` writes its token after 1.5 s unless cancelled first. Dropped by its
    // caller after 300 ms (its own timeout is 20 s):
    let dropped = tokio::time::timeout(Duration::from_millis(300), work.call_with::<_, String>("patient_record", &("dropped", 1.5), long())).await;
    assert!(dropped.is_err(), "{dropped:?}");
    // Out of time after 300 ms:
    let timed_out = work.call_with::<_, String>("patient_record", &("timed-out", 1.5), CallOptions::new().timeout(Duration::from_millis(300))).await;
    assert!(matches!(timed_out, Err(RemoteCallError::Timeout { .. })), "{timed_out:?}");
    // Left to finish, one writes its token:
    let node: String = work.call_with("patient_record", &("finished", 0.2), long()).await.expect("a call");
    assert_eq!(node, "b");
    // Past the time the given-up calls would have taken.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log = std::fs::read_to_string(&side_log).expect("log");
    assert!(log.contains("b finished"), "{log:?}");
    assert!(!log.contains("dropped"), "the dropped call ran to its end on B: {log:?}");
    assert!(!log.contains("timed-out"), "the timed-out call ran to its end on B: {log:?}");
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cookie_is_refused_both_ways() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (dir, _cookie, side_log) = scratch("cookie");
    let wrong = dir.join("wrong-cookie");
    std::fs::write(&wrong, "not-the-cookie\n").expect("cookie");
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config")).await.expect("node a");

    // A node process with another cookie cannot join A: it says so and exits.
    let joining = tokio::process::Command::new(env!("CARGO_BIN_EXE_pyvisor-cluster-node"))
        .args(["--name", "x", "--listen", &free_addr().to_string(), "--join", &a.listen_addr().to_string()])
        .arg("--cookie-file")
        .arg(&wrong)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), joining).await.expect("the node gives up").expect("the node runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("refused the session"), "{stderr}");
    assert!(a.peers().is_empty(), "{:?}", a.peers());

    // A cannot join a node process with another cookie, and sees none of its pools.
    let x_addr = free_addr();
    let _x = NodeProcess::start("x", "work4", x_addr, &wrong, &[], &side_log);
    let refused = a.connect(x_addr, Duration::from_secs(20)).await;
    assert!(matches!(refused, Err(pyvisor_cluster::ClusterError::Refused { .. })), "{refused:?}");
    assert!(a.peers().is_empty(), "{:?}", a.peers());
    let work = RemotePool::new(&a, "work4");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(work.members().is_empty(), "{:?}", work.members());
    let call = work.call::<_, (String, u64)>("where", &1u64).await;
    assert!(matches!(call, Err(RemoteCallError::NoMembers { .. })), "{call:?}");
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_and_idempotency_keys_hold_across_nodes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (dir, cookie, side_log) = scratch("keys");
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config")).await.expect("node a");
    let _b = NodeProcess::start("b", "work5", free_addr(), &cookie, &[a.listen_addr()], &side_log);
    let _c = NodeProcess::start("c", "work5", free_addr(), &cookie, &[a.listen_addr()], &side_log);
    let work = Arc::new(RemotePool::new(&a, "work5"));
    assert!(eventually(Duration::from_secs(20), || work.members().len() == 2).await, "{:?}", work.members());
    let opts = || CallOptions::new().timeout(Duration::from_secs(20));

    // Each affinity key's calls, made at once with other keys', run on one node and one worker.
    let calls = (0..12u64).flat_map(|key| (0..4u64).map(move |n| (key, n))).map(|(key, n)| {
        let work = Arc::clone(&work);
        async move {
            let (node, pid, _): (String, u32, u64) = work.call_with("where_pid", &n, opts().affinity(format!("session-{key}"))).await.expect("a call");
            (key, (node, pid))
        }
    });
    let mut placed: std::collections::BTreeMap<u64, std::collections::BTreeSet<(String, u32)>> = Default::default();
    for (key, at) in futures::future::join_all(calls).await {
        placed.entry(key).or_default().insert(at);
    }
    assert!(placed.values().all(|at| at.len() == 1), "a key ran on more than one worker: {placed:?}");
    let nodes: std::collections::BTreeSet<&str> = placed.values().flatten().map(|(n, _)| n.as_str()).collect();
    assert_eq!(nodes.into_iter().collect::<Vec<_>>(), vec!["b", "c"], "12 keys spread over both nodes");

    // Calls with one idempotency key, made one after another, run once: the others get the
    // kept result.
    let mut answers = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let node: String = work.call_with("record", &"charge-1", opts().idempotency_key("order-1/charge")).await.expect("a call");
        answers.insert(node);
    }
    assert_eq!(answers.len(), 1, "{answers:?}");
    let log = std::fs::read_to_string(&side_log).expect("log");
    assert_eq!(log.lines().filter(|l| l.ends_with(" charge-1")).count(), 1, "{log}");
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pids of processes whose environment has `PYVISOR_NODE=name`: a node's Python workers
/// and the processes they start.
fn workers_of(name: &str) -> Vec<u32> {
    let wanted = format!("PYVISOR_NODE={name}");
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == wanted.as_bytes())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_it_starts_leaves_nothing_behind() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (dir, cookie, side_log) = scratch("early-kill");
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config")).await.expect("node a");
    // Names of this run only: the scan for workers looks at the whole machine.
    let c = format!("c{}", std::process::id());
    let only_c = vec![format!("{c}@127.0.0.1")];
    let _c = NodeProcess::start(&c, "work7", free_addr(), &cookie, &[a.listen_addr()], &side_log);
    let work = RemotePool::new(&a, "work7");
    assert!(eventually(Duration::from_secs(20), || work.members() == only_c).await, "{:?}", work.members());
    assert!(!workers_of(&c).is_empty(), "the scan finds a node's workers");
    // Node processes killed (SIGKILL, from outside) at different moments of their start:
    // before Python runs, while the workers start, around the time they join A.
    for (i, after) in [10u64, 150, 400, 800].into_iter().enumerate() {
        let name = format!("early{i}-{}", std::process::id());
        let mut b = NodeProcess::spawn_with(&name, "work7", free_addr(), &cookie, &[a.listen_addr()], &side_log, Extra::default());
        tokio::time::sleep(Duration::from_millis(after)).await;
        b.kill();
        // Its workers go (they exit when their parent's socket closes), A forgets it, and A's
        // calls go on on C.
        assert!(eventually(Duration::from_secs(20), || workers_of(&name).is_empty()).await, "{name}'s workers outlived it: {:?}", workers_of(&name));
        assert!(eventually(Duration::from_secs(20), || work.members() == only_c).await, "{:?}", work.members());
        for x in 0..5u64 {
            let (node, back): (String, u64) = work.call_with("where", &x, CallOptions::new().timeout(Duration::from_secs(20))).await.expect("a call");
            assert_eq!((node.as_str(), back), (c.as_str(), x));
        }
    }
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_on_the_serving_node_mid_call_are_a_crash_there_not_a_node_loss() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (dir, cookie, side_log) = scratch("worker-kill");
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config")).await.expect("node a");
    // A name of this run only: the scan for workers looks at the whole machine.
    let b = format!("b{}", std::process::id());
    let only_b = vec![format!("{b}@127.0.0.1")];
    let _b = NodeProcess::start(&b, "work8", free_addr(), &cookie, &[a.listen_addr()], &side_log);
    let work = Arc::new(RemotePool::new(&a, "work8"));
    assert!(eventually(Duration::from_secs(20), || work.members() == only_b).await, "{:?}", work.members());
    let mut events = a.events();
    let long = || CallOptions::new().timeout(Duration::from_secs(30));
    let (w1, w2) = (Arc::clone(&work), Arc::clone(&work));
    // Both of B's workers busy for 3 s: one with an idempotent call, one with a
    // non-idempotent one that writes its token at the end; each marks its start in the log.
    let retried = tokio::spawn(async move { w1.call_with::<_, (String, u64)>("marked_where", &(7u64, 3.0), long()).await });
    let once = tokio::spawn(async move { w2.call_with::<_, String>("marked_record", &("killed", 3.0), long()).await });
    let log = || std::fs::read_to_string(&side_log).unwrap_or_default();
    let started = |line: String| log().lines().filter(|l| *l == line).count();
    assert!(eventually(Duration::from_secs(20), || started(format!("{b} start 7")) == 1 && started(format!("{b} start killed")) == 1).await, "{}", log());
    // Every process of B's pool (workers and their watchdogs) SIGKILLed from outside; B itself
    // lives on.
    let victims = workers_of(&b);
    assert!(victims.len() >= 2, "B's workers: {victims:?}");
    for pid in &victims {
        // SAFETY: kill(2) with a pid read from /proc just now; no memory is touched.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
    }
    // The idempotent call is retried by B's crash barrier on a replacement worker; the other
    // fails with B's crash certificate as `worker_crashed`, not as a lost node.
    let (node, x) = retried.await.expect("task").expect("the idempotent call is retried on B");
    assert_eq!((node.as_str(), x), (b.as_str(), 7));
    match once.await.expect("task") {
        Err(RemoteCallError::Remote { kind, node, .. }) => {
            assert_eq!(kind, "worker_crashed");
            assert_eq!(node, only_b[0]);
        }
        other => panic!("the non-idempotent call: {other:?}"),
    }
    // B stays a member, A saw no loss of it, and its new workers take calls.
    assert_eq!(work.members(), only_b);
    let (node, x): (String, u64) = work.call_with("where", &8u64, long()).await.expect("a call after the crash");
    assert_eq!((node.as_str(), x), (b.as_str(), 8));
    while let Ok(event) = events.try_recv() {
        assert!(!matches!(event, NodeEvent::Disconnected { .. } | NodeEvent::Silent { .. }), "{event:?}");
    }
    // The idempotent call started again on a new worker; the other never did, and past the
    // time it would have taken it never wrote its token.
    assert_eq!(started(format!("{b} start 7")), 2, "{}", log());
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!((started(format!("{b} start killed")), started(format!("{b} killed"))), (1, 0), "{}", log());
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

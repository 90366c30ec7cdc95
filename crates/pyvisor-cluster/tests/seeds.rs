//! Seeds kept connected, over real TCP on 127.0.0.1: a node process B (`pyvisor-cluster-node
//! --join A`) dials node A again by itself after A stops and a new node starts on A's address,
//! and serves its pool to it; a node process whose seed is down at start waits for it and says
//! `ready` once it is reached; a seed with another cookie is reported as refused and dialed
//! again until a node with the right cookie answers there; a seed given by host name is
//! reached, one whose name does not resolve is reported so and tried again.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::node_process::{scratch, NodeProcess};
use common::{eventually, free_addr};
use pyvisor_cluster::{ClusterError, Node, NodeConfig, RemotePool, SeedAddr, SeedPolicy};
use pyvisor_core::CallOptions;

/// One test at a time: ractor's process groups are global to this process, so two tests' nodes
/// would see each other's pools and heartbeats.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Guards (not timing claims): how long a node may take to be seen, or a call to answer.
const GUARD: Duration = Duration::from_secs(60);

/// Start node `name` on `addr` with `cookie`, retrying while the address is still held by a
/// node that just stopped there (a guard).
async fn start_on(name: &str, addr: SocketAddr, cookie: &str) -> Node {
    let until = tokio::time::Instant::now() + GUARD;
    loop {
        match Node::start(NodeConfig::new(name, addr, cookie).expect("config")).await {
            Ok(node) => return node,
            Err(ClusterError::Bind { .. }) if tokio::time::Instant::now() < until => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("node {name} on {addr}: {e}"),
        }
    }
}

/// The node `pool`'s calls run on, through `node`, once it has a member (a guard).
async fn call_where(node: &Node, pool: &str) -> String {
    let remote = RemotePool::new(node, pool);
    assert!(eventually(GUARD, || !remote.members().is_empty()).await, "no member of {pool} on {}", node.name());
    let (on, x): (String, u64) = remote.call_with("where", &7u64, CallOptions::new().timeout(Duration::from_secs(20))).await.expect("a call");
    assert_eq!(x, 7);
    on
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_process_dials_its_seed_again_when_a_new_node_starts_on_its_address() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (dir, cookie, side_log) = scratch("seeds-redial");
    let a_addr = free_addr();
    let a = start_on("a", a_addr, "s3cret").await;
    let b = NodeProcess::start("b", "seeds1", free_addr(), &cookie, &[a_addr], &side_log);
    assert_eq!(call_where(&a, "seeds1").await, "b");

    // A goes; a new node starts on its address. Nobody dials B: B dials it.
    a.shutdown().await;
    drop(a);
    let a2 = start_on("a", a_addr, "s3cret").await;
    assert!(
        eventually(GUARD, || a2.peers().iter().any(|p| p.name == "b@127.0.0.1" && p.inbound)).await,
        "B did not dial A's address again: {:?}",
        a2.peers()
    );
    assert_eq!(call_where(&a2, "seeds1").await, "b");

    // And again, after a longer absence (B backs off meanwhile, and keeps dialing).
    a2.shutdown().await;
    drop(a2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a3 = start_on("a", a_addr, "s3cret").await;
    assert!(
        eventually(GUARD, || a3.peers().iter().any(|p| p.name == "b@127.0.0.1" && p.inbound)).await,
        "B did not dial A's address again: {:?}",
        a3.peers()
    );
    assert_eq!(call_where(&a3, "seeds1").await, "b");
    drop(b);
    a3.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_process_whose_seed_is_down_at_start_waits_for_it() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (dir, cookie, side_log) = scratch("seeds-late");
    let a_addr = free_addr();
    let b_addr = free_addr();
    // B starts first; its seed is not there yet. `start` returns once B says `ready`.
    let starting = {
        let (cookie, side_log) = (cookie.clone(), side_log.clone());
        tokio::task::spawn_blocking(move || NodeProcess::start("b", "seeds2", b_addr, &cookie, &[a_addr], &side_log))
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!starting.is_finished(), "B said ready before its seed was reached");
    let a = start_on("a", a_addr, "s3cret").await;
    let b = tokio::time::timeout(GUARD, starting).await.expect("B says ready once A is up").expect("B starts");
    // B's side of the session is ready when B says so; A's may follow a moment later.
    assert!(eventually(GUARD, || a.peers().iter().any(|p| p.name == "b@127.0.0.1")).await, "{:?}", a.peers());
    assert_eq!(call_where(&a, "seeds2").await, "b");
    drop(b);
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_with_another_cookie_is_refused_and_dialed_again_until_fixed() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let seed = free_addr();
    let wrong = start_on("w", seed, "not-the-cookie").await;
    let b = start_on("b", free_addr(), "s3cret").await;
    let seeds = b.join(vec![seed, seed, b.listen_addr()], SeedPolicy::default());
    assert_eq!(seeds.status().iter().map(|s| s.addr.clone()).collect::<Vec<_>>(), vec![SeedAddr::Ip(seed)], "one seed: no duplicate, not itself");

    // Reported as a refusal (a configuration error), not waited for in silence ...
    let refused = tokio::time::timeout(GUARD, seeds.reached_or_refused()).await.expect("an outcome");
    assert!(matches!(refused, Err(ClusterError::Refused { addr }) if addr == seed), "{refused:?}");
    // ... and dialed again.
    assert!(eventually(GUARD, || seeds.status()[0].failures >= 2).await, "{:?}", seeds.status());
    assert!(b.peers().is_empty() && wrong.peers().is_empty());

    // The operator fixes the seed: a node with the right cookie there.
    wrong.shutdown().await;
    drop(wrong);
    let a = start_on("a", seed, "s3cret").await;
    tokio::time::timeout(GUARD, seeds.reached()).await.expect("B reaches the fixed seed").expect("reached");
    let status = seeds.status();
    assert_eq!((status[0].peer.as_deref(), status[0].reached, &status[0].last_error), (Some("a@127.0.0.1"), true, &None), "{status:?}");
    assert!(eventually(GUARD, || a.peers().iter().any(|p| p.name == "b@127.0.0.1")).await, "{:?}", a.peers());

    // Dropping the handle stops the dialing; the session stays.
    drop(seeds);
    assert!(b.peers().iter().any(|p| p.name == "a@127.0.0.1"), "{:?}", b.peers());
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_given_by_host_name_is_reached_and_a_name_that_does_not_resolve_is_reported() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let a = start_on("a", free_addr(), "s3cret").await;
    let b = start_on("b", free_addr(), "s3cret").await;
    let by_name: SeedAddr = format!("localhost:{}", a.listen_addr().port()).parse().expect("a seed");
    let nowhere: SeedAddr = "no-such-node.invalid:7400".parse().expect("a seed");
    let seeds = b.join(vec![by_name.clone(), nowhere.clone()], SeedPolicy::default());
    assert_eq!(seeds.status().iter().map(|s| s.addr.clone()).collect::<Vec<_>>(), vec![by_name, nowhere]);
    // `localhost` resolves to A's address (after ::1, on machines that list it first).
    assert!(eventually(GUARD, || seeds.status()[0].reached).await, "{:?}", seeds.status());
    assert_eq!(seeds.status()[0].peer.as_deref(), Some("a@127.0.0.1"));
    assert!(eventually(GUARD, || a.peers().iter().any(|p| p.name == "b@127.0.0.1")).await, "{:?}", a.peers());
    // The other is reported as a name that does not resolve, and looked up again.
    assert!(eventually(GUARD, || seeds.status()[1].failures >= 2).await, "{:?}", seeds.status());
    let status = seeds.status();
    assert!(matches!(&status[1].last_error, Some(ClusterError::Resolve { seed, .. }) if seed == "no-such-node.invalid:7400"), "{status:?}");
    assert!(!status[1].reached);
    drop(seeds);
    b.shutdown().await;
    a.shutdown().await;
}

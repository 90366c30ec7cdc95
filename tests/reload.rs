//! `Tree::reload` with real Python pools: only what changed changes, a replaced pool keeps
//! serving until its successor is ready (make-before-break), and what cannot change is reported
//! while the running child is kept.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyvisor::supervisor::{ChildSpec, Strategy, SupervisorError, SupervisorSpec, Tree};

const GUARD: Duration = Duration::from_secs(60);

fn pool(id: &str, script: &str, workers: usize) -> ChildSpec {
    ChildSpec::pool(id, common::spec(script).workers(workers))
}

fn root(children: Vec<ChildSpec>) -> SupervisorSpec {
    children.into_iter().fold(SupervisorSpec::new("root", Strategy::OneForOne), SupervisorSpec::child)
}

async fn pids(tree: &Tree, path: &str) -> Vec<u32> {
    let pool = tree.pool(path).unwrap_or_else(|| panic!("{path} is not running"));
    pool.status().await.workers.iter().filter_map(|w| w.pid).collect()
}

async fn ids(tree: &Tree) -> Vec<String> {
    tree.children().await.unwrap().into_iter().map(|c| c.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_replaces_and_removes_and_keeps_the_rest_running() {
    common::logs();
    let tree = Tree::start(root(vec![pool("a", "basic.py", 1), pool("b", "basic.py", 1), pool("c", "basic.py", 1)])).await.unwrap();
    let (a, b, c) = (pids(&tree, "a").await, pids(&tree, "b").await, pids(&tree, "c").await);
    let (by_path_b, by_path_c) = (tree.pool("b").unwrap(), tree.pool("c").unwrap());

    let report = tokio::time::timeout(
        GUARD,
        tree.reload(root(vec![pool("a", "basic.py", 1), pool("b", "basic.py", 2), pool("d", "basic.py", 1)])),
    )
    .await
    .expect("the reload hung")
    .unwrap();
    assert_eq!(report.added, ["d"]);
    assert_eq!(report.replaced, ["b"]);
    assert_eq!(report.removed, ["c"]);
    assert_eq!(report.kept, ["a"]);
    assert!(report.is_complete(), "{report}");

    assert_eq!(ids(&tree).await, ["a", "b", "d"], "children in the declared order");
    assert_eq!(pids(&tree, "a").await, a, "an untouched pool keeps its processes");
    let new_b = pids(&tree, "b").await;
    assert_eq!(new_b.len(), 2);
    assert!(new_b.iter().all(|p| !b.contains(p)));
    assert!(common::eventually(GUARD, || b.iter().chain(&c).all(|p| !common::alive(*p))).await, "the replaced and removed pools' processes are gone");
    let x: String = by_path_b.call("echo", &"through the old handle").await.unwrap();
    assert_eq!(x, "through the old handle", "a handle by path follows the replacement");
    assert!(by_path_c.call::<_, String>("echo", &"x").await.is_err(), "a removed pool's handles end");
    let y: String = tree.pool("d").unwrap().call("echo", &"new").await.unwrap();
    assert_eq!(y, "new");

    // Nothing changed: nothing restarts.
    let again = tree.reload(root(vec![pool("a", "basic.py", 1), pool("b", "basic.py", 2), pool("d", "basic.py", 1)])).await.unwrap();
    assert_eq!((again.kept.len(), again.to_string()), (3, "3 kept".to_string()));
    assert_eq!(pids(&tree, "b").await, new_b);
    tree.shutdown().await;
}

/// Calls through a handle by path never fail while their pool is replaced, and are served by
/// the old pool until the new one is ready (its workers held in module-level code meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_pool_serves_until_its_successor_is_ready() {
    common::logs();
    let hold = std::env::temp_dir().join(format!("pyvisor-reload-hold-{}", std::process::id()));
    let _ = std::fs::remove_file(&hold);
    let hold_var = hold.to_str().unwrap().to_string();
    let slow = move |workers: usize| ChildSpec::pool("p", common::spec("slow_start.py").workers(workers).env("PYVISOR_TEST_HOLD", &hold_var));
    let tree = Tree::start(root(vec![slow(1)])).await.unwrap();
    let old = pids(&tree, "p").await;
    let handle = tree.pool("p").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let served: Arc<Mutex<Vec<u32>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let calls = Arc::new(AtomicU64::new(0));
    let caller = {
        let (stop, served, failures, calls, handle) = (stop.clone(), served.clone(), failures.clone(), calls.clone(), handle.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match handle.call::<_, u32>("pid", &()).await {
                    Ok(pid) => served.lock().unwrap().push(pid),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    std::fs::write(&hold, b"").unwrap();
    let reload = {
        let tree = tree.clone();
        tokio::spawn(async move { tree.reload(root(vec![slow(2)])).await })
    };
    // The new pool's workers are held: the reload waits, the old pool serves, and the
    // supervisor keeps answering.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!reload.is_finished(), "the switch waited for the new pool to be ready");
    let during: HashSet<u32> = served.lock().unwrap().iter().copied().collect();
    assert_eq!(during, old.iter().copied().collect(), "only the old pool served meanwhile");
    assert!(tokio::time::timeout(Duration::from_secs(5), tree.children()).await.is_ok(), "the supervisor answers during a reload");

    std::fs::remove_file(&hold).unwrap();
    let report = tokio::time::timeout(GUARD, reload).await.expect("the reload hung").unwrap().unwrap();
    assert_eq!(report.replaced, ["p"]);
    let new = pids(&tree, "p").await;
    let before = calls.load(Ordering::SeqCst);
    assert!(common::eventually(GUARD, || calls.load(Ordering::SeqCst) > before + 20).await);
    stop.store(true, Ordering::SeqCst);
    caller.await.unwrap();

    assert_eq!(failures.lock().unwrap().as_slice(), &[] as &[String], "no call failed across the switch");
    let after: Vec<u32> = served.lock().unwrap().iter().rev().take(10).copied().collect();
    assert!(after.iter().all(|p| new.contains(p)), "the new pool serves after the switch: {after:?} vs {new:?}");
    assert!(common::eventually(GUARD, || old.iter().all(|p| !common::alive(*p))).await, "the old pool stopped after the switch");
    tree.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_change_is_reported_and_the_running_tree_is_kept() {
    common::logs();
    let nested = |workers: usize| ChildSpec::supervisor("etl", root(vec![pool("loader", "basic.py", workers)]));
    let tree = Tree::start(root(vec![pool("a", "basic.py", 1), nested(1)])).await.unwrap();
    let a = pids(&tree, "a").await;
    let loader = pids(&tree, "etl/loader").await;

    // Refused before anything changes.
    let twice = root(vec![pool("a", "basic.py", 2), pool("a", "basic.py", 1)]);
    assert!(matches!(tree.reload(twice).await, Err(SupervisorError::InvalidSpec(e)) if e.contains("`a`")));
    let deep = root(vec![pool("a", "basic.py", 2), ChildSpec::supervisor("etl", root(vec![pool("x", "basic.py", 1), pool("x", "basic.py", 1)]))]);
    assert!(matches!(tree.reload(deep).await, Err(SupervisorError::InvalidSpec(_))));
    assert_eq!(pids(&tree, "a").await, a);

    // A pool whose new declaration cannot start: reported, the old one keeps serving; the
    // nested supervisor's pool is replaced.
    let report = tree.reload(root(vec![pool("a", "import_error.py", 1), nested(2)])).await.unwrap();
    assert_eq!(report.failed.len(), 1, "{report}");
    assert_eq!(report.failed[0].0, "a");
    assert_eq!(report.replaced, ["etl/loader"]);
    assert_eq!(pids(&tree, "a").await, a, "the old pool is kept");
    let x: String = tree.pool("a").unwrap().call("echo", &"still here").await.unwrap();
    assert_eq!(x, "still here");
    let new_loader = pids(&tree, "etl/loader").await;
    assert_eq!(new_loader.len(), 2);
    assert!(new_loader.iter().all(|p| !loader.contains(p)));
    tree.shutdown().await;
    assert!(common::eventually(GUARD, || a.iter().chain(&new_loader).all(|p| !common::alive(*p))).await);
}

//! Supervision trees with real actors (and real Python pools where it matters).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyvisor::supervisor::{ChildSpec, ChildState, Restart, Shutdown, Strategy, SupervisorSpec, Tree};
use pyvisor::{Backoff, Jitter};
use pyvisor::ractor::{self, Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::mpsc;

type Log = Arc<Mutex<Vec<String>>>;
type Refs = Arc<Mutex<HashMap<String, ActorRef<ProbeMsg>>>>;

/// A user actor that logs its starts and stops and fails, exits or blocks on request. It puts
/// itself in the test's table of refs *before* it logs its start, so a test that saw the start
/// in the log sends to this actor, never to the one before it. (A `Fail` sent to the previous
/// probe in that window is the likely cause of a CI run where the escalation never came; it did
/// not reproduce in isolated loaded runs.)
struct Probe;
enum ProbeMsg {
    Fail,
    Exit,
    Block,
}

pyvisor::local_message!(ProbeMsg);

impl Actor for Probe {
    type Msg = ProbeMsg;
    type State = (String, Log);
    type Arguments = (String, Log, Refs);
    async fn pre_start(&self, myself: ActorRef<ProbeMsg>, (name, log, refs): (String, Log, Refs)) -> Result<Self::State, ActorProcessingErr> {
        refs.lock().unwrap().insert(name.clone(), myself);
        log.lock().unwrap().push(format!("start {name}"));
        Ok((name, log))
    }
    async fn handle(&self, myself: ActorRef<ProbeMsg>, msg: ProbeMsg, _: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            ProbeMsg::Fail => Err("probe failed on request".into()),
            ProbeMsg::Exit => {
                myself.stop(None);
                Ok(())
            }
            ProbeMsg::Block => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        }
    }
    async fn post_stop(&self, _: ActorRef<ProbeMsg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        st.1.lock().unwrap().push(format!("stop {}", st.0));
        Ok(())
    }
}

fn probe(name: &str, log: &Log, refs: &Refs) -> ChildSpec {
    let (name, log, refs) = (name.to_string(), log.clone(), refs.clone());
    ChildSpec::actor(name.clone(), move |sup| {
        let (name, log, refs) = (name.clone(), log.clone(), refs.clone());
        Box::pin(async move {
            let (a, _) = Actor::spawn_linked(None, Probe, (name, log, refs), sup).await.map_err(|e| e.to_string())?;
            Ok(a.get_cell())
        })
    })
}

fn send(refs: &Refs, name: &str, msg: ProbeMsg) {
    refs.lock().unwrap()[name].cast(msg).unwrap();
}

fn fast() -> Backoff {
    Backoff::default().base(Duration::from_millis(10)).jitter(Jitter::None)
}

async fn wait_log(log: &Log, len: usize) -> Vec<String> {
    assert!(common::eventually(Duration::from_secs(10), || log.lock().unwrap().len() >= len).await, "log: {:?}", log.lock().unwrap());
    // Let anything extra arrive, so the exact comparison below can fail.
    tokio::time::sleep(Duration::from_millis(150)).await;
    log.lock().unwrap().clone()
}

async fn tree_of(strategy: Strategy, log: &Log, refs: &Refs) -> Tree {
    Tree::start(
        SupervisorSpec::new("t", strategy)
            .backoff(fast())
            .intensity(10, Duration::from_secs(10))
            .child(probe("a", log, refs))
            .child(probe("b", log, refs))
            .child(probe("c", log, refs)),
    )
    .await
    .expect("tree starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_strategy_restarts_exactly_its_children_in_order() {
    let cases = [
        (Strategy::OneForOne, vec!["start b"]),
        (Strategy::OneForAll, vec!["stop c", "stop a", "start a", "start b", "start c"]),
        (Strategy::RestForOne, vec!["stop c", "start b", "start c"]),
    ];
    for (strategy, expected) in cases {
        let (log, refs) = (Log::default(), Refs::default());
        let tree = tree_of(strategy, &log, &refs).await;
        assert_eq!(*log.lock().unwrap(), ["start a", "start b", "start c"], "start in declaration order");
        log.lock().unwrap().clear();
        send(&refs, "b", ProbeMsg::Fail);
        assert_eq!(wait_log(&log, expected.len()).await, expected, "{strategy:?}");
        let children = tree.children().await.unwrap();
        assert!(children.iter().all(|c| c.state == ChildState::Running));
        let restarts: Vec<u32> = children.iter().map(|c| c.restarts).collect();
        let want = match strategy {
            Strategy::OneForOne => vec![0, 1, 0],
            Strategy::OneForAll => vec![1, 1, 1],
            Strategy::RestForOne => vec![0, 1, 1],
        };
        assert_eq!(restarts, want, "{strategy:?}");
        log.lock().unwrap().clear();
        tree.shutdown().await;
        assert_eq!(*log.lock().unwrap(), ["stop c", "stop b", "stop a"], "stop in reverse order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_types_follow_otp() {
    let (log, refs) = (Log::default(), Refs::default());
    let tree = Tree::start(
        SupervisorSpec::new("types", Strategy::OneForOne)
            .backoff(fast())
            .intensity(10, Duration::from_secs(10))
            .child(probe("perm", &log, &refs).restart(Restart::Permanent))
            .child(probe("trans_ok", &log, &refs).restart(Restart::Transient))
            .child(probe("trans_fail", &log, &refs).restart(Restart::Transient))
            .child(probe("temp", &log, &refs).restart(Restart::Temporary)),
    )
    .await
    .unwrap();
    send(&refs, "perm", ProbeMsg::Exit); // normal exit: permanent restarts anyway
    send(&refs, "trans_ok", ProbeMsg::Exit); // normal exit: transient stays down
    send(&refs, "trans_fail", ProbeMsg::Fail); // abnormal: transient restarts
    send(&refs, "temp", ProbeMsg::Fail); // temporary never restarts
    let mut states = HashMap::new();
    let settled = common::eventually(Duration::from_secs(10), || {
        let c = futures::executor::block_on(tree.children()).unwrap();
        states = c.iter().map(|c| (c.id.clone(), (c.state.clone(), c.restarts))).collect();
        states["perm"] == (ChildState::Running, 1)
            && states["trans_fail"] == (ChildState::Running, 1)
            && states["trans_ok"].0 == ChildState::Stopped
            && matches!(states["temp"].0, ChildState::Failed { .. })
    })
    .await;
    assert!(settled, "{states:?}");
    assert_eq!(states["trans_ok"].1, 0);
    assert_eq!(states["temp"].1, 0);
    tree.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_delays_grow_and_reset_after_the_healthy_period() {
    let (log, refs) = (Log::default(), Refs::default());
    let tree = Tree::start(
        SupervisorSpec::new("backoff", Strategy::OneForOne)
            .backoff(Backoff::default().base(Duration::from_millis(100)).jitter(Jitter::None))
            .healthy_period(Duration::from_millis(800))
            .intensity(20, Duration::from_secs(60))
            .child(probe("x", &log, &refs)),
    )
    .await
    .unwrap();
    // The delay the supervisor announces right after a failure.
    async fn fail_and_read_delay(tree: &Tree, refs: &Refs, log: &Log, starts: usize) -> Duration {
        send(refs, "x", ProbeMsg::Fail);
        let mut delay = None;
        for _ in 0..1000 {
            if let ChildState::Restarting { next_in } = &tree.children().await.unwrap()[0].state {
                delay = Some(*next_in);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(common::eventually(Duration::from_secs(10), || log.lock().unwrap().len() >= starts).await);
        delay.expect("a restart was scheduled")
    }
    let d1 = fail_and_read_delay(&tree, &refs, &log, 2).await;
    let d2 = fail_and_read_delay(&tree, &refs, &log, 3).await;
    let d3 = fail_and_read_delay(&tree, &refs, &log, 4).await;
    assert!(d1 <= Duration::from_millis(100) && d2 > Duration::from_millis(100) && d2 <= Duration::from_millis(200), "{d1:?} {d2:?}");
    assert!(d3 > Duration::from_millis(200) && d3 <= Duration::from_millis(400), "{d3:?}");
    // Healthy for longer than the healthy period: the next delay is the base again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let d4 = fail_and_read_delay(&tree, &refs, &log, 5).await;
    assert!(d4 <= Duration::from_millis(100), "after a healthy period: {d4:?}");
    tree.shutdown().await;
}

/// A plain user actor that hosts a tree and reports the supervision events it receives.
struct Watcher;
impl Actor for Watcher {
    type Msg = ();
    type State = mpsc::UnboundedSender<String>;
    type Arguments = mpsc::UnboundedSender<String>;
    async fn pre_start(&self, _: ActorRef<()>, tx: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }
    async fn handle_supervisor_evt(&self, _: ActorRef<()>, evt: SupervisionEvent, tx: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let line = match evt {
            SupervisionEvent::ActorFailed(_, err) => format!("failed: {err}"),
            SupervisionEvent::ActorTerminated(_, _, reason) => format!("terminated: {reason:?}"),
            _ => return Ok(()),
        };
        let _ = tx.send(line);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_intensity_stops_the_supervisor_and_its_parent_sees_it() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (watcher, _) = Actor::spawn(None, Watcher, tx).await.unwrap();
    let (log, refs) = (Log::default(), Refs::default());
    let tree = Tree::start_linked(
        SupervisorSpec::new("fragile", Strategy::OneForOne)
            .backoff(fast())
            .intensity(2, Duration::from_secs(30))
            .child(probe("steady", &log, &refs))
            .child(probe("flaky", &log, &refs)),
        watcher.get_cell(),
    )
    .await
    .unwrap();
    for n in 0..3 {
        assert!(common::eventually(Duration::from_secs(10), || log.lock().unwrap().iter().filter(|l| *l == "start flaky").count() > n).await);
        send(&refs, "flaky", ProbeMsg::Fail);
    }
    let event = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("the parent hears of it").unwrap();
    assert!(event.starts_with("failed:") && event.contains("restart intensity exceeded") && event.contains("flaky"), "{event}");
    // The supervisor stopped its other child on the way out.
    assert!(log.lock().unwrap().contains(&"stop steady".to_string()));
    assert!(tree.children().await.is_err(), "the supervisor is gone");
    watcher.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_reverse_order_and_a_child_that_ignores_stop_is_killed() {
    let (log, refs) = (Log::default(), Refs::default());
    let tree = Tree::start(
        SupervisorSpec::new("order", Strategy::OneForOne)
            .child(probe("first", &log, &refs))
            .child(probe("second", &log, &refs))
            .child(probe("stuck", &log, &refs).shutdown(Shutdown::Timeout(Duration::from_millis(300)))),
    )
    .await
    .unwrap();
    let stuck = refs.lock().unwrap()["stuck"].clone();
    stuck.cast(ProbeMsg::Block).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(Duration::from_secs(20), tree.shutdown()).await.expect("shutdown honours the timeout");
    let log = log.lock().unwrap().clone();
    // `stuck` never ran post_stop: it was killed after its timeout; the others stopped in reverse order.
    assert_eq!(log[3..], ["stop second", "stop first"]);
    assert_eq!(stuck.get_status(), ractor::ActorStatus::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_a_broken_script_escalates_with_its_stderr_tail() {
    let dir = std::env::temp_dir().join(format!("pyvisor-escalate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("broken");
    let _ = std::fs::remove_file(&marker);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (watcher, _) = Actor::spawn(None, Watcher, tx).await.unwrap();
    let pool = common::spec("breaks_later.py")
        .workers(1)
        .env("BREAK_MARKER", marker.to_str().unwrap())
        .start_backoff(fast())
        .max_start_failures(1, Duration::from_secs(60));
    let tree = Tree::start_linked(
        SupervisorSpec::new("root", Strategy::OneForOne)
            .backoff(fast())
            .intensity(1, Duration::from_secs(60))
            .child(ChildSpec::supervisor(
                "etl",
                SupervisorSpec::new("etl", Strategy::RestForOne).backoff(fast()).intensity(1, Duration::from_secs(60)).child(ChildSpec::pool("loader", pool)),
            )),
        watcher.get_cell(),
    )
    .await
    .expect("the tree starts while the script is healthy");
    let loader = tree.pool("etl/loader").expect("pool by path");
    let v: i32 = loader.call("echo", &3).await.unwrap();
    assert_eq!(v, 3);
    // Break the script and kill the worker: its replacements fail at import.
    std::fs::write(&marker, b"").unwrap();
    let pid = loader.status().await.workers[0].pid.unwrap();
    common::signal(pid, libc::SIGKILL);
    let event = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await.expect("escalates to the user's actor").unwrap();
    assert!(event.starts_with("failed:"), "{event}");
    assert!(event.contains("restart intensity exceeded"), "{event}");
    assert!(event.contains("RuntimeError: the model store is unreachable"), "the reason names the cause: {event}");
    watcher.stop(None);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_can_be_added_and_removed_while_calls_flow() {
    let tree = Tree::start(
        SupervisorSpec::new("dyn", Strategy::OneForOne)
            .child(ChildSpec::pool("steady", common::spec("basic.py").workers(1).max_in_flight(4))),
    )
    .await
    .unwrap();
    let steady = tree.pool("steady").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|i| {
            let (p, stop) = (steady.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let v: (i32, u64) = p.call("echo", &(i, n)).await.expect("calls on the steady pool never fail");
                    assert_eq!(v, (i, n));
                    n += 1;
                }
                n
            })
        })
        .collect();
    tree.add_child(ChildSpec::pool("extra", common::spec("basic.py").workers(1))).await.expect("added");
    assert!(matches!(
        tree.add_child(ChildSpec::pool("extra", common::spec("basic.py").workers(1))).await,
        Err(pyvisor::supervisor::SupervisorError::DuplicateChild(_))
    ));
    let extra = tree.pool("extra").expect("the new pool is reachable by path");
    let v: i32 = extra.call("add", &(1, 2)).await.unwrap();
    assert_eq!(v, 3);
    tree.remove_child("extra").await.expect("removed");
    assert!(tree.pool("extra").is_none());
    assert!(matches!(extra.call::<_, i32>("add", &(1, 2)).await, Err(pyvisor::CallError::ShutDown { .. })));
    assert_eq!(tree.children().await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in callers {
        assert!(c.await.unwrap() > 0);
    }
    tree.shutdown().await;
}

/// A pool handle got by path follows the pool's restarts (as a registered name does in OTP):
/// calls made while the supervisor restarts the pool wait, then go to the new pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_by_path_follows_restarts_of_its_pool() {
    let tree = Tree::start(
        SupervisorSpec::new("follow", Strategy::OneForOne)
            .child(ChildSpec::pool("p", common::spec("basic.py").workers(1))),
    )
    .await
    .unwrap();
    let handle = tree.pool("p").unwrap();
    let first: u32 = handle.call("pid", &()).await.unwrap();
    for round in 0..2 {
        // The pool dies (its router is killed): the supervisor restarts it.
        let old = handle.actor();
        old.kill();
        assert!(common::eventually(Duration::from_secs(10), || old.get_status() == ractor::ActorStatus::Stopped).await);
        let pid: u32 = tokio::time::timeout(Duration::from_secs(30), handle.call("pid", &()))
            .await
            .expect("a call on a restarting pool waits only up to its queue timeout")
            .unwrap_or_else(|e| panic!("round {round}: the handle did not follow the restart: {e}"));
        assert_ne!(pid, first, "served by the new pool's worker");
        let v: (u32, String) = handle.call("echo", &(round, "again")).await.unwrap();
        assert_eq!(v, (round, "again".to_string()));
    }
    tree.shutdown().await;
    let after = handle.call::<_, u32>("pid", &()).await;
    assert!(after.is_err(), "a stopped tree's pool takes no calls");
}

/// The handle also follows when the pool's own supervisor is restarted by its parent (a group
/// restart stops and restarts the nested supervisor with its pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_by_path_follows_a_restart_of_its_supervisor() {
    let log = Log::default();
    let refs = Refs::default();
    let tree = Tree::start(
        SupervisorSpec::new("root", Strategy::OneForAll)
            .child(ChildSpec::supervisor(
                "s",
                SupervisorSpec::new("s", Strategy::OneForOne).child(ChildSpec::pool("p", common::spec("basic.py").workers(1))),
            ))
            .child(probe("probe", &log, &refs)),
    )
    .await
    .unwrap();
    let handle = tree.pool("s/p").expect("pool by path");
    let first: u32 = handle.call("pid", &()).await.unwrap();
    // The probe fails: one_for_all stops the nested supervisor (and its pool) and restarts all.
    send(&refs, "probe", ProbeMsg::Fail);
    let mut moved = false;
    for _ in 0..200 {
        if let Ok(pid) = handle.call::<_, u32>("pid", &()).await {
            if pid != first {
                moved = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(moved, "the handle kept pointing at the stopped pool");
    tree.shutdown().await;
}

/// A child's restart runs beside the supervisor's loop: while the new child is starting (here
/// held by the test; in life a pool loading its models), the supervisor answers (`children`,
/// status, readiness, the systemd watchdog's walks) and reports the child as starting; then it
/// runs as usual. Other children can still fail and be restarted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_answers_while_a_child_restarts_slowly() {
    let log = Log::default();
    let refs = Refs::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let starts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let slow = {
        let (log, refs, gate, starts) = (log.clone(), refs.clone(), gate.clone(), starts.clone());
        ChildSpec::actor("slow", move |sup| {
            let (log, refs, gate, starts) = (log.clone(), refs.clone(), gate.clone(), starts.clone());
            Box::pin(async move {
                // Every start after the first waits for the test.
                if starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                    gate.acquire().await.map_err(|e| e.to_string())?.forget();
                }
                let (a, _) = Actor::spawn_linked(None, Probe, ("slow".to_string(), log, refs), sup).await.map_err(|e| e.to_string())?;
                Ok(a.get_cell())
            })
        })
    };
    let tree = Tree::start(
        SupervisorSpec::new("t", Strategy::OneForOne)
            .backoff(fast())
            .intensity(10, Duration::from_secs(10))
            .child(slow)
            .child(probe("quick", &log, &refs)),
    )
    .await
    .unwrap();
    send(&refs, "slow", ProbeMsg::Fail);
    assert!(common::eventually(Duration::from_secs(10), || starts.load(std::sync::atomic::Ordering::SeqCst) == 2).await, "no restart began");

    let children = tokio::time::timeout(Duration::from_secs(10), tree.children())
        .await
        .expect("the supervisor did not answer while a child was starting")
        .unwrap();
    assert_eq!(children[0].state, ChildState::Starting, "{children:?}");
    assert_eq!(children[1].state, ChildState::Running);
    // Another child fails meanwhile: it is restarted at once, not after the slow one.
    send(&refs, "quick", ProbeMsg::Fail);
    let quick_restarted = common::eventually(Duration::from_secs(10), || log.lock().unwrap().iter().filter(|l| *l == "start quick").count() == 2).await;
    assert!(quick_restarted, "log: {:?}", log.lock().unwrap());

    gate.add_permits(1);
    assert!(common::eventually(Duration::from_secs(10), || log.lock().unwrap().iter().filter(|l| *l == "start slow").count() == 2).await);
    let children = tree.children().await.unwrap();
    assert!(children.iter().all(|c| c.state == ChildState::Running), "{children:?}");
    assert_eq!(children[0].restarts, 1);
    tree.shutdown().await;
}

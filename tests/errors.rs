//! Every error kind, each carrying what the user needs to act.

mod common;

use std::sync::Arc;
use std::time::Duration;

use pyvisor::{Backoff, CallError, CallOptions, DeathCause, Jitter, Pool, PoolSpec, StartError};
use serde::ser::{Error as _, Serialize, Serializer};

struct Unserializable;
impl Serialize for Unserializable {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(S::Error::custom("this value refuses to serialize"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_errors_are_typed_and_informative() {
    let pool = Pool::start(common::spec("basic.py").workers(1)).await.expect("pool starts");

    match pool.call::<_, ()>("nope", &()).await {
        Err(CallError::UnknownFunction { function, available }) => {
            assert_eq!(function, "nope");
            for f in ["echo", "add", "fail", "health"] {
                assert!(available.iter().any(|a| a == f), "{f} missing from {available:?}");
            }
        }
        other => panic!("expected UnknownFunction, got {other:?}"),
    }

    match pool.call::<_, ()>("fail", &"bad input").await {
        Err(CallError::Python { function, error }) => {
            assert_eq!(function, "fail");
            assert_eq!(error.type_name, "ValueError");
            assert_eq!(error.message, "bad input");
            let tb = error.traceback.expect("traceback");
            assert!(tb.contains("Traceback") && tb.contains("raise ValueError(message)"), "{tb}");
        }
        other => panic!("expected Python, got {other:?}"),
    }
    match pool.call::<_, ()>("fail_custom", &"x").await {
        Err(CallError::Python { error, .. }) => assert!(error.type_name.ends_with("CustomError"), "{}", error.type_name),
        other => panic!("expected Python, got {other:?}"),
    }

    match pool.call::<_, ()>("echo", &Unserializable).await {
        Err(CallError::Serialize { detail, .. }) => assert!(detail.contains("refuses")),
        other => panic!("expected Serialize, got {other:?}"),
    }

    match pool.call::<_, Vec<String>>("echo", &42).await {
        Err(e @ CallError::Deserialize { .. }) => assert_eq!(e.kind(), "deserialize"),
        other => panic!("expected Deserialize, got {other:?}"),
    }

    match pool.call::<_, ()>("unserializable", &()).await {
        Err(CallError::BadResult { message, .. }) => assert!(!message.is_empty()),
        other => panic!("expected BadResult, got {other:?}"),
    }

    let opts = CallOptions::new().timeout(Duration::from_millis(200));
    match pool.call_with::<_, f64>("sleep", &2.0, opts).await {
        Err(CallError::Timeout { sent, after, .. }) => {
            assert!(sent);
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    // The worker is still usable afterwards.
    let v: i32 = pool.call("echo", &7).await.expect("echo after timeout");
    assert_eq!(v, 7);

    pool.shutdown().await;
    match pool.call::<_, i32>("echo", &1).await {
        Err(CallError::ShutDown { pool }) => assert_eq!(pool, "basic"),
        other => panic!("expected ShutDown, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_are_refused_both_ways() {
    // In band: `max_frame` bounds everything (out of band it bounds frames without their
    // buffers: see tests/out_of_band.rs and the end of this test).
    let in_band = pyvisor::BufferPolicy::in_band();
    let pool = Pool::start(common::spec("basic.py").workers(1).max_frame(64 * 1024).buffers(in_band)).await.expect("pool starts");
    let big = vec![7u8; 100 * 1024];
    match pool.call::<_, ()>("echo", &serde_bytes_like(&big)).await {
        Err(CallError::PayloadTooLarge { size, max, .. }) => assert!(size > max && max == 64 * 1024),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    match pool.call::<_, ()>("big", &(200 * 1024)).await {
        Err(CallError::BadResult { message, .. }) => assert!(!message.is_empty()),
        other => panic!("expected BadResult for a too-large reply, got {other:?}"),
    }
    let ok: rmpv::Value = pool.call("big", &1000).await.expect("a reply under the limit");
    assert_eq!(ok.as_slice().map(<[u8]>::len), Some(1000));
    pool.shutdown().await;
    // Out of band (here from 64 KiB), the same result leaves the worker in a sealed memfd,
    // whatever `max_frame`.
    let oob = pyvisor::BufferPolicy::default().threshold(64 * 1024);
    let pool = Pool::start(common::spec("basic.py").workers(1).max_frame(64 * 1024).buffers(oob)).await.expect("pool starts");
    let big: rmpv::Value = pool.call("big", &(200 * 1024)).await.expect("out of band");
    assert_eq!(big.as_slice().map(<[u8]>::len), Some(200 * 1024));
    pool.shutdown().await;
}

fn serde_bytes_like(b: &[u8]) -> rmpv::Value {
    rmpv::Value::Binary(b.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_and_queue_timeout() {
    let pool = Pool::start(
        common::spec("basic.py").workers(1).max_in_flight(1).max_queue(1).queue_timeout(Duration::from_millis(300)),
    )
    .await
    .expect("pool starts");
    // Occupy the only slot.
    let busy = {
        let p = pool.clone();
        tokio::spawn(async move { p.call::<_, f64>("sleep", &1.5).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // One call may wait; it times out in the queue.
    let queued = {
        let p = pool.clone();
        tokio::spawn(async move { p.call::<_, i32>("echo", &1).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The queue is full now.
    match pool.call::<_, i32>("echo", &2).await {
        Err(CallError::Overloaded { max_queue, .. }) => assert_eq!(max_queue, 1),
        other => panic!("expected Overloaded, got {other:?}"),
    }
    match queued.await.unwrap() {
        Err(CallError::QueueTimeout { waited, .. }) => assert!(waited >= Duration::from_millis(250)),
        other => panic!("expected QueueTimeout, got {other:?}"),
    }
    assert_eq!(busy.await.unwrap().expect("the busy call completes"), 1.5);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_kill_the_worker_not_the_process() {
    let pool = Pool::start(common::spec("basic.py").workers(1).call_timeout(None)).await.expect("pool starts");
    for function in ["corrupt", "oversized_prefix"] {
        let old_pid: u32 = pool.call("pid", &()).await.unwrap();
        match pool.call::<_, ()>(function, &()).await {
            Err(CallError::WorkerCrashed { certificate, .. }) => {
                assert!(matches!(certificate.cause, DeathCause::ProtocolError(_)), "{function}: {:?}", certificate.cause);
                assert!(certificate.killed_by_pyvisor);
                assert_eq!(certificate.pid, Some(old_pid));
                assert_eq!(certificate.calls_in_flight.len(), 1);
                assert_eq!(certificate.calls_in_flight[0].function, function);
            }
            other => panic!("{function}: expected WorkerCrashed, got {other:?}"),
        }
        assert!(common::eventually(Duration::from_secs(10), || !common::alive(old_pid)).await);
        // The replacement serves calls.
        let new_pid: u32 = pool.call("pid", &()).await.expect("replacement serves");
        assert_ne!(new_pid, old_pid);
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_script_path_and_missing_interpreter_fail_clearly() {
    match Pool::start(PoolSpec::script("/nonexistent/worker.py").python(common::python())).await {
        Err(e @ StartError::ScriptNotFound { .. }) => assert!(e.to_string().contains("/nonexistent/worker.py")),
        other => panic!("expected ScriptNotFound, got {other:?}"),
    }
    match Pool::start(common::spec("basic.py").python("/nonexistent/python3")).await {
        Err(e @ StartError::InterpreterNotFound { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("/nonexistent/python3") && msg.contains("PYVISOR_PYTHON"), "{msg}");
        }
        other => panic!("expected InterpreterNotFound, got {other:?}"),
    }
    match Pool::start(common::spec("basic.py").workers(0)).await {
        Err(StartError::InvalidSpec(m)) => assert!(m.contains("workers")),
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_failure_retries_with_growing_delays_then_fails_with_stderr_tail() {
    let dir = std::env::temp_dir().join(format!("pyvisor-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("starts.log");
    let _ = std::fs::remove_file(&log);
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ev = Arc::clone(&events);
    let spec = common::spec("import_error.py")
        .workers(1)
        .env("START_LOG", log.to_str().unwrap())
        .start_backoff(Backoff::default().base(Duration::from_millis(100)).jitter(Jitter::None))
        .max_start_failures(4, Duration::from_secs(60))
        .on_event(move |e| {
            if let pyvisor::PoolEvent::RestartScheduled { delay, .. } = e {
                ev.lock().unwrap().push(*delay);
            }
        });
    let err = Pool::start(spec).await.expect_err("the pool must fail");
    match &err {
        StartError::TooManyStartFailures { failures, certificate, .. } => {
            assert_eq!(*failures, 5);
            assert!(!certificate.became_ready);
            assert_eq!(certificate.exit_code, Some(1));
            let tail = certificate.stderr_tail.join("\n");
            assert!(tail.contains("RuntimeError: model file is missing"), "stderr tail: {tail}");
        }
        other => panic!("expected TooManyStartFailures, got {other:?}"),
    }
    assert!(err.to_string().contains("model file is missing"));
    // Delays grew: 100, 200, 400, 800 ms — announced, and seen by the script's start times.
    let delays = events.lock().unwrap().clone();
    assert_eq!(delays, [100, 200, 400, 800].map(Duration::from_millis).to_vec());
    let starts: Vec<f64> = std::fs::read_to_string(&log).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(starts.len(), 5);
    let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, delay) in gaps.iter().zip(&delays) {
        assert!(*gap >= delay.as_secs_f64(), "gap {gap} shorter than its backoff {delay:?}");
    }
    assert!(gaps[3] > gaps[0], "gaps did not grow: {gaps:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Durations too long for the clock's arithmetic are typed configuration errors naming the
/// field, never a panic later in a worker or a call; a per-call timeout that long means no
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_too_long_for_the_clock_are_errors_not_panics() {
    use pyvisor::RecyclePolicy;
    let cases: Vec<(&str, pyvisor::PoolSpec)> = vec![
        ("ttl", common::spec("basic.py").recycle(RecyclePolicy::default().ttl(Duration::MAX))),
        ("call_timeout", common::spec("basic.py").call_timeout(Some(Duration::MAX))),
        ("queue_timeout", common::spec("basic.py").queue_timeout(Duration::MAX)),
        ("heartbeat_interval", common::spec("basic.py").heartbeat_interval(Duration::from_secs(u64::MAX / 2))),
        ("taint_window", common::spec("basic.py").taint_window(Duration::MAX)),
        ("drain_timeout", common::spec("basic.py").recycle(RecyclePolicy::default().drain_timeout(Duration::MAX))),
    ];
    for (field, spec) in cases {
        match Pool::start(spec).await {
            Err(StartError::InvalidSpec(msg)) => assert!(msg.contains(field), "{field}: {msg}"),
            Err(e) => panic!("{field}: expected InvalidSpec, got {e}"),
            Ok(p) => {
                p.shutdown().await;
                panic!("{field}: a duration of centuries was accepted");
            }
        }
    }
    let pool = Pool::start(common::spec("basic.py").workers(1)).await.unwrap();
    let v: i32 = pool.call_with("echo", &7, CallOptions::new().timeout(Duration::MAX)).await.unwrap();
    assert_eq!(v, 7);
    pool.shutdown().await;
}

/// The same for supervisors: a duration too long for the clock is a typed error naming the
/// supervisor and the field, at start or when a child is added — never a panic in a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_durations_too_long_are_errors_not_panics() {
    use pyvisor::supervisor::{ChildSpec, Shutdown, Strategy, SupervisorError, SupervisorSpec, Tree};
    use pyvisor::Backoff;
    let pool = || ChildSpec::pool("p", common::spec("basic.py").workers(1));
    let root = || SupervisorSpec::new("root", Strategy::OneForOne);
    let cases: Vec<(&str, SupervisorSpec)> = vec![
        ("intensity period", root().intensity(3, Duration::MAX).child(pool())),
        ("healthy_period", root().healthy_period(Duration::MAX).child(pool())),
        ("backoff cap", root().backoff(Backoff::default().cap(Duration::MAX)).child(pool())),
        ("shutdown timeout of child `p`", root().child(pool().shutdown(Shutdown::Timeout(Duration::MAX)))),
        ("supervisor `inner`: healthy_period", root().child(ChildSpec::supervisor("inner", SupervisorSpec::new("inner", Strategy::OneForOne).healthy_period(Duration::MAX)))),
    ];
    for (field, spec) in cases {
        match Tree::start(spec).await {
            Err(e) => assert!(e.to_string().contains(field), "{field}: {e}"),
            Ok(t) => {
                t.shutdown().await;
                panic!("{field}: a duration of centuries was accepted");
            }
        }
    }
    let tree = Tree::start(root()).await.expect("an empty tree starts");
    match tree.add_child(pool().shutdown(Shutdown::Timeout(Duration::MAX))).await {
        Err(SupervisorError::InvalidSpec(msg)) => assert!(msg.contains("shutdown timeout"), "{msg}"),
        other => panic!("expected InvalidSpec, got {other:?}"),
    }
    tree.shutdown().await;
}

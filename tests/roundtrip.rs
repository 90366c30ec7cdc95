//! Values round-trip through a real Python worker unchanged.

mod common;

use pyvisor::Pool;
use rmpv::Value;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Record {
    name: String,
    tags: Vec<String>,
    score: Option<f64>,
    nested: std::collections::BTreeMap<String, Vec<i64>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_values_round_trip_unchanged() {
    let pool = Pool::start(common::spec("basic.py").workers(1)).await.expect("pool starts");
    let values = vec![
        Value::Nil,
        Value::Boolean(true),
        Value::from(u64::MAX),
        Value::from(i64::MIN),
        Value::from(0.1f64),
        Value::from(-1.5e300f64),
        Value::from("unicode: ünïcødé ✓ 漢字 🐍"),
        Value::Binary(vec![0, 1, 2, 254, 255]),
        Value::Array(vec![Value::Nil, Value::from(1), Value::Array(vec![Value::from("deep")])]),
        Value::Map(vec![
            (Value::from("k"), Value::Map(vec![(Value::from("inner"), Value::Binary(b"bytes".to_vec()))])),
            (Value::from("list"), Value::Array(vec![Value::from(1.25), Value::Nil, Value::from(false)])),
            (Value::from(""), Value::from("")),
        ]),
    ];
    for v in values {
        let back: Value = pool.call("echo", &v).await.expect("echo");
        assert_eq!(back, v);
    }
    let rec = Record {
        name: "ä".into(),
        tags: vec!["a".into(), "b".into()],
        score: None,
        nested: [("x".to_string(), vec![1, -2, i64::MAX])].into_iter().collect(),
    };
    let back: Record = pool.call("echo", &rec).await.expect("struct echo");
    assert_eq!(back, rec);
    let sum: i64 = pool.call("add", &(40, 2)).await.expect("add");
    assert_eq!(sum, 42);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_in_user_code_does_not_corrupt_the_protocol() {
    let pool = Pool::start(common::spec("basic.py").workers(1)).await.expect("pool starts");
    for i in 0..20 {
        let v: i32 = pool.call("noisy", &i).await.expect("noisy");
        assert_eq!(v, i);
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_travels_to_python() {
    let pool = Pool::start(common::spec("basic.py").workers(1)).await.expect("pool starts");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let opts = pyvisor::CallOptions::new().timeout(std::time::Duration::from_secs(30));
    let d: Option<f64> = pool.call_with("deadline", &(), opts).await.expect("deadline");
    let d = d.expect("a deadline reaches ctx");
    assert!(d > before + 25.0 && d < before + 35.0, "deadline {d} vs now {before}");
    let none: Option<f64> = pool.call_with("deadline", &(), pyvisor::CallOptions::new().no_timeout()).await.unwrap();
    assert_eq!(none, None);
    pool.shutdown().await;
}

/// Without export (no endpoint here; the only way in a build without the `otlp` feature) calls
/// make no spans, and a caller's own W3C trace context reaches the worker unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_context_reaches_the_worker_without_export() {
    assert!(!pyvisor::telemetry::exporting());
    let pool = Pool::start(common::spec("basic.py").workers(1)).await.expect("pool starts");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let opts = pyvisor::CallOptions::new().trace_context(tp, Some("vendor=v1".into()));
    let got: (Option<String>, Option<String>) = pool.call_with("trace_context", &(), opts).await.unwrap();
    assert_eq!(got, (Some(tp.to_string()), Some("vendor=v1".to_string())));
    let got: (Option<String>, Option<String>) = pool.call("trace_context", &()).await.unwrap();
    assert_eq!(got, (None, None), "no trace context of pyvisor's own without export");
    pool.shutdown().await;
}

/// A worker reuses the memory of large payloads instead of faulting it in again on every call
/// (pyvisor sets glibc's `MALLOC_TOP_PAD_` and `MALLOC_MMAP_THRESHOLD_` for workers, see
/// `WORKER_MALLOC_TOP_PAD`); a value the user sets wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_reuse_the_workers_memory() {
    let allocator_set_by_parent = ["MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"].iter().any(|k| std::env::var_os(k).is_some());
    let pool = Pool::start(common::spec("basic.py").workers(1)).await.expect("pool starts");
    // Page faults per echo call of `size` bytes, after a warm-up.
    let faults_per_call = |size: usize, calls: u64| {
        let pool = &pool;
        async move {
            let payload = Value::Binary(vec![7u8; size]);
            for _ in 0..3 {
                let _: Value = pool.call("echo", &payload).await.expect("echo");
            }
            let before: u64 = pool.call("minor_faults", &()).await.expect("minor_faults");
            for _ in 0..calls {
                let back: Value = pool.call("echo", &payload).await.expect("echo");
                assert_eq!(back, payload);
            }
            let after: u64 = pool.call("minor_faults", &()).await.expect("minor_faults");
            (after - before) / calls
        }
    };
    if !allocator_set_by_parent {
        // Without the padding each 1 MiB call faults in its payloads again: ~1,150 faults
        // (measured). With it, 0 on a quiet machine, up to 70 seen under load (reads arrive in
        // smaller pieces): fewer than one payload's pages (256) tells the two apart.
        let small = faults_per_call(1 << 20, 20).await;
        assert!(small < (1 << 20) / 4096, "{small} page faults per 1 MiB call: freed memory is not being reused");
        // With the pad alone (glibc's adaptive mmap threshold then off) a 24 MiB call faulted
        // ~24,600 pages, with no setting ~12,300 (two payloads' worth), with both ~8,200.
        let big = faults_per_call(24 << 20, 4).await;
        assert!(big < 2 * (24 << 20) / 4096, "{big} page faults per 24 MiB call: large payloads are mapped afresh");
        let pad: Option<String> = pool.call("getenv", &"MALLOC_TOP_PAD_").await.expect("getenv");
        assert_eq!(pad.as_deref(), Some("16777216"));
    }
    pool.shutdown().await;

    let pool = Pool::start(common::spec("basic.py").workers(1).env("MALLOC_TOP_PAD_", "0")).await.expect("pool starts");
    let pad: Option<String> = pool.call("getenv", &"MALLOC_TOP_PAD_").await.expect("getenv");
    assert_eq!(pad.as_deref(), Some("0"), "the user's value wins");
    pool.shutdown().await;
}

//! A remote call's trace crosses nodes: node A (this test, exporting over OTLP/gRPC to a
//! receiver in this process) calls pool `traced` on node B (a `pyvisor-cluster-node` process
//! with real Python workers, exporting to the same receiver). A's `pyvisor.remote_call` span
//! has B's `pyvisor.call` beneath it, in the same trace, with B's attempt, the Python function's
//! span and a span the function made itself beneath that; a failure on B is the remote call's
//! error; the remote call's parent is A's current `tracing` span, or the context its caller
//! gave. (One test in this binary: the tracing subscriber is global.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::node_process::{scratch, Extra, NodeProcess};
use common::{eventually, free_addr};
use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};
use pyvisor_cluster::{Node, NodeConfig, RemoteCallError, RemotePool};
use pyvisor_core::telemetry::{self, Protocol, TelemetryConfig};
use tracing::Instrument;

/// The collector renders values as `Some(AnyValue { value: Some(StringValue("x")) })`: `x`.
fn clean(v: &str) -> String {
    let Some(start) = v.find("Value(").map(|i| i + "Value(".len()) else { return v.to_string() };
    let rest = &v[start..];
    let end = rest.rfind(")) })").unwrap_or(rest.len());
    rest[..end].trim_matches('"').to_string()
}

fn attr(s: &ExportedSpan, k: &str) -> Option<String> {
    s.attributes.get(k).map(|v| clean(v))
}

fn status(s: &ExportedSpan) -> Option<&str> {
    s.status.as_ref().map(|s| s.code.as_str())
}

/// Every span, one line each (for failure messages).
fn dump(spans: &[ExportedSpan]) -> String {
    let mut lines: Vec<String> =
        spans.iter().map(|s| format!("{} trace {} span {} <- {} {:?}", s.name, s.trace_id, s.span_id, s.parent_span_id, s.attributes)).collect();
    lines.sort();
    lines.join("\n")
}

/// The one span named `name` whose parent is `parent` (in `parent`'s trace).
fn child<'a>(spans: &'a [ExportedSpan], parent: &ExportedSpan, name: &str) -> &'a ExportedSpan {
    let found: Vec<&ExportedSpan> = spans.iter().filter(|s| s.parent_span_id == parent.span_id && s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} under {} {}:\n{}", parent.name, parent.span_id, dump(spans));
    assert_eq!(found[0].trace_id, parent.trace_id, "{name} is in {}'s trace", parent.name);
    found[0]
}

/// A remote call's span (A), B's spans beneath it — call, attempt, the Python function's span
/// and the span the function made — and the remote call's outcome; its B call span.
fn check_remote_call<'a>(spans: &'a [ExportedSpan], remote: &'a ExportedSpan, input: &str) -> &'a ExportedSpan {
    assert_eq!(remote.kind, "SPAN_KIND_CLIENT");
    assert_eq!(attr(remote, "rpc.system").as_deref(), Some("pyvisor"));
    assert_eq!(attr(remote, "rpc.method").as_deref(), Some("traced_where"));
    assert_eq!(attr(remote, "pyvisor.pool").as_deref(), Some("traced"));
    // B's call span: its parent is A's remote call span (the context crossed the wire).
    let call = child(spans, remote, "pyvisor.call");
    assert_eq!(attr(call, "rpc.method").as_deref(), Some("traced_where"));
    assert_eq!(attr(call, "pyvisor.pool").as_deref(), Some("traced"));
    let attempt = child(spans, call, "pyvisor.attempt");
    // The Python function's span (recorded by B from its worker's timing) under the attempt, and
    // the span the function made (exported by the worker) under that.
    let function = child(spans, attempt, "pyvisor.worker traced_where");
    assert_eq!(function.kind, "SPAN_KIND_SERVER");
    assert_eq!(attr(function, "process.pid"), attr(attempt, "process.pid"), "timed by the worker that ran it");
    let user = child(spans, function, "user.step");
    assert_eq!(attr(user, "step.input").as_deref(), Some(input));
    if input == "fail" {
        assert_eq!(attr(remote, "pyvisor.outcome").as_deref(), Some("remote"));
        assert_eq!(attr(remote, "error.type").as_deref(), Some("remote"));
        assert_eq!(attr(remote, "pyvisor.remote.error.type").as_deref(), Some("python"));
        assert_eq!(attr(remote, "pyvisor.node").as_deref(), Some("b@127.0.0.1"));
        assert_eq!(status(remote), Some("STATUS_CODE_ERROR"));
        assert_eq!(attr(call, "pyvisor.outcome").as_deref(), Some("python"));
        assert_eq!(attr(function, "error.type").as_deref(), Some("ValueError"));
    } else {
        assert_eq!(attr(remote, "pyvisor.outcome").as_deref(), Some("ok"));
        assert_ne!(status(remote), Some("STATUS_CODE_ERROR"));
        assert_eq!(attr(call, "pyvisor.outcome").as_deref(), Some("ok"));
        assert_ne!(status(function), Some("STATUS_CODE_ERROR"));
    }
    call
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_calls_trace_holds_the_serving_nodes_call_attempt_and_function_spans() {
    let mut collector = FakeCollectorServer::start().await.expect("collector starts");
    let endpoint = collector.endpoint();
    let guard = telemetry::init_with(&TelemetryConfig::default().endpoint(&endpoint).protocol(Protocol::Grpc).service_name("node-a"));
    assert!(telemetry::exporting(), "A exports");
    // The receiver holds few spans: drain it all along.
    let received: Arc<Mutex<Vec<ExportedSpan>>> = Arc::default();
    let drain = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                let got = collector.exported_spans(1, Duration::from_millis(100)).await;
                received.lock().expect("spans").extend(got);
            }
        })
    };

    let (dir, cookie, side_log) = scratch("trace");
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config")).await.expect("node a");
    let otel = Extra {
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "grpc".into()),
            ("OTEL_SERVICE_NAME".into(), "node-b".into()),
            ("PYVISOR_LOG".into(), "warn".into()),
        ],
        args: Vec::new(),
    };
    let mut b = NodeProcess::start_with("b", "traced", free_addr(), &cookie, &[a.listen_addr()], &side_log, otel);
    let pool = RemotePool::new(&a, "traced");
    assert!(eventually(Duration::from_secs(20), || pool.members() == vec!["b@127.0.0.1".to_string()]).await, "members: {:?}", pool.members());
    let opts = || pyvisor_core::CallOptions::new().timeout(Duration::from_secs(20));

    // 1. Under a `tracing` span of A's: the remote call span is its child.
    let request = tracing::info_span!("test.request");
    let (node, x): (String, String) = pool.call_with("traced_where", "first", opts()).instrument(request).await.expect("the call runs on B");
    assert_eq!((node.as_str(), x.as_str()), ("b", "first"));
    // 2. A failure on B.
    let e = pool.call_with::<_, (String, String)>("traced_where", "fail", opts()).await.expect_err("the call fails on B");
    assert!(matches!(&e, RemoteCallError::Remote { kind, .. } if kind == "python"), "{e}");
    // 3. Under a context the caller gives.
    let given_trace = "0af7651916cd43dd8448eb211c80319c";
    let given_span = "b7ad6b7169203331";
    let given = opts().trace_context(format!("00-{given_trace}-{given_span}-01"), None);
    let (_, x): (String, String) = pool.call_with("traced_where", "given", given).await.expect("the call runs on B");
    assert_eq!(x, "given");

    // B stops (SIGTERM): it flushes its spans, and its workers theirs, before it exits.
    let exit = tokio::task::spawn_blocking(move || b.terminate()).await.expect("terminate");
    assert!(exit.success(), "node b exited with {exit}");
    // A flushes its spans (on a thread of its own: the exporters' flush blocks).
    guard.shutdown().await;
    // Guard against a hang: every span of the three calls arrived (their parents are checked below).
    let count = |name: &str| received.lock().expect("spans").iter().filter(|s| s.name == name).count();
    let arrived = eventually(Duration::from_secs(30), || {
        count("pyvisor.remote_call") == 3
            && count("pyvisor.call") == 3
            && count("pyvisor.attempt") == 3
            && count("pyvisor.worker traced_where") == 3
            && count("user.step") == 3
            && count("test.request") == 1
    })
    .await;
    drain.abort();
    let spans = received.lock().expect("spans").clone();
    assert!(arrived, "not every span arrived:\n{}", dump(&spans));

    let remote = |input: &str| {
        // The remote call whose B call's function made a span with this input.
        spans
            .iter()
            .filter(|s| s.name == "pyvisor.remote_call")
            .find(|r| spans.iter().any(|u| u.name == "user.step" && u.trace_id == r.trace_id && attr(u, "step.input").as_deref() == Some(input)))
            .unwrap_or_else(|| panic!("no remote call in the trace of the {input:?} call:\n{}", dump(&spans)))
    };
    // 1. Parent: A's current `tracing` span.
    let first = remote("first");
    let request = spans.iter().find(|s| s.name == "test.request").expect("the request span");
    assert_eq!(first.parent_span_id, request.span_id, "the remote call is a child of the current span");
    assert_eq!(first.trace_id, request.trace_id);
    check_remote_call(&spans, first, "first");
    // 2. The failure.
    let failed = remote("fail");
    check_remote_call(&spans, failed, "fail");
    // 3. Parent: the given context.
    let third = remote("given");
    assert_eq!((third.trace_id.as_str(), third.parent_span_id.as_str()), (given_trace, given_span));
    check_remote_call(&spans, third, "given");
    // Three traces, none shared.
    assert!(first.trace_id != failed.trace_id && failed.trace_id != third.trace_id && first.trace_id != third.trace_id);
    // ractor's per-actor spans stay out, on both nodes.
    assert!(!spans.iter().any(|s| s.name == "Actor"), "{}", dump(&spans));

    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

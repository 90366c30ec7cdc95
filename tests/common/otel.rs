//! Shared checks for the telemetry tests: one workload, and the span tree it must produce.
//! Also a minimal OTLP/HTTP (protobuf) receiver, since the fake collector speaks only gRPC.

use std::collections::BTreeMap;
use std::time::Duration;

use fake_opentelemetry_collector::ExportedSpan;
use prost::Message;
use pyvisor::{CallOptions, ChaosAction, Pool};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// A call whose first attempt is killed and retried, then an echo call, a call whose function
/// makes a span of its own, one that raises, two at once on the one worker (one waits in
/// the queue), and a call with an idempotency key made twice (it runs, then it is a hit). (A killed worker loses the spans its batch exporter had not sent yet, so the
/// spans made in Python come from the survivor, which exits gracefully and flushes.)
pub async fn workload() {
    let pool = Pool::start(super::spec("faults.py").workers(1).heartbeat_interval(Duration::from_millis(100)))
        .await
        .expect("pool starts");
    pool.chaos().arm("before_side_effect", ChaosAction::Kill).await.unwrap();
    let v: u64 = pool.call_with("record_points", &9u64, CallOptions::new().idempotent(true)).await.unwrap();
    assert_eq!(v, 9);
    // One worker: its replacement serves although tainted.
    let v: u64 = pool.call("echo", &7u64).await.unwrap();
    assert_eq!(v, 7);
    let v: String = pool.call("traced", "ok").await.unwrap();
    assert_eq!(v, "ok");
    let e = pool.call::<_, String>("traced", "fail").await.unwrap_err();
    assert_eq!(e.kind(), "python", "{e}");
    let (a, b) = tokio::join!(pool.call::<_, f64>("nap", &0.2), pool.call::<_, f64>("nap", &0.2));
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    for _ in 0..2 {
        let v: String = pool.call_with("mark", "keyed", CallOptions::new().idempotency_key("k-mark")).await.unwrap();
        assert_eq!(v, "keyed");
    }
    pool.shutdown().await; // workers flush their spans on a graceful exit
}

/// The collector renders values as `Some(AnyValue { value: Some(StringValue("x")) })`.
pub fn clean(v: &str) -> String {
    let Some(start) = v.find("Value(").map(|i| i + "Value(".len()) else { return v.to_string() };
    let rest = &v[start..];
    let end = rest.rfind(")) })").unwrap_or(rest.len());
    rest[..end].trim_matches('"').replace("\\\"", "\"")
}

fn attr(s: &ExportedSpan, k: &str) -> Option<String> {
    s.attributes.get(k).map(|v| clean(v))
}

fn event_attr(attributes: &BTreeMap<String, String>, k: &str) -> Option<String> {
    attributes.get(k).map(|v| clean(v))
}

/// The call spans, each with its attempts and the Python function's span under each attempt
/// that ran; spans made in Python under that; the queue wait of a call that waited. With
/// `resources` (the HTTP receiver records them), the services the spans came from.
pub fn check_traces(spans: &[ExportedSpan], resources: bool) {
    let calls: Vec<&ExportedSpan> = spans.iter().filter(|s| s.name == "pyvisor.call").collect();
    let call = |method: &str| {
        *calls.iter().find(|s| attr(s, "rpc.method").as_deref() == Some(method)).unwrap_or_else(|| panic!("no pyvisor.call for {method}: {:#?}", names(spans)))
    };
    let children = |parent: &ExportedSpan, name: &str| -> Vec<&ExportedSpan> {
        let mut v: Vec<&ExportedSpan> = spans.iter().filter(|s| s.parent_span_id == parent.span_id && s.name == name).collect();
        v.sort_by_key(|s| s.start_time_unix_nano);
        v
    };
    let function_span = |attempt: &ExportedSpan, function: &str| -> ExportedSpan {
        let py = spans
            .iter()
            .find(|s| s.parent_span_id == attempt.span_id && s.name == format!("pyvisor.worker {function}"))
            .unwrap_or_else(|| panic!("no Python span under the {function} attempt: {:#?}", names(spans)));
        assert_eq!(py.trace_id, attempt.trace_id, "the Python span is in the call's trace");
        assert_eq!(py.kind, "SPAN_KIND_SERVER");
        assert_eq!(attr(py, "rpc.method").as_deref(), Some(function));
        assert_eq!(attr(py, "pyvisor.call.attempt"), attr(attempt, "pyvisor.attempt"));
        assert_eq!(attr(py, "process.pid"), attr(attempt, "process.pid"), "timed by the worker that ran it");
        assert_eq!(attr(py, "pyvisor.worker.id"), attr(attempt, "pyvisor.worker.id"));
        // The worker's timing of the function lies within the attempt (one clock, one machine).
        assert!(py.start_time_unix_nano >= attempt.start_time_unix_nano, "{py:#?} {attempt:#?}");
        assert!(py.end_time_unix_nano <= attempt.end_time_unix_nano && py.start_time_unix_nano <= py.end_time_unix_nano);
        if resources {
            assert_eq!(attr(py, "resource:service.name").as_deref(), Some("pyvisor-test-worker"));
            assert_eq!(attr(attempt, "resource:service.name").as_deref(), Some("pyvisor-test"));
        }
        py.clone()
    };
    // echo: call → one attempt → the Python function's span, one trace.
    let echo = call("echo");
    assert_eq!(attr(echo, "pyvisor.pool").as_deref(), Some("faults"));
    assert_eq!(attr(echo, "pyvisor.outcome").as_deref(), Some("ok"));
    assert_eq!(attr(echo, "pyvisor.attempts").as_deref(), Some("1"));
    assert_eq!(attr(echo, "rpc.system").as_deref(), Some("pyvisor"));
    let attempts = children(echo, "pyvisor.attempt");
    assert_eq!(attempts.len(), 1, "{:#?}", names(spans));
    let a = attempts[0];
    assert_eq!(a.trace_id, echo.trace_id);
    assert_eq!(attr(a, "pyvisor.attempt").as_deref(), Some("1"));
    assert!(attr(a, "process.pid").is_some_and(|p| p != "0"));
    function_span(a, "echo");
    // traced: a span made in Python is a child of the function's span (exported by the worker).
    let traced: Vec<&&ExportedSpan> = calls.iter().filter(|s| attr(s, "rpc.method").as_deref() == Some("traced")).collect();
    assert_eq!(traced.len(), 2, "{:#?}", names(spans));
    for t in traced {
        let attempt = children(t, "pyvisor.attempt")[0];
        let py = function_span(attempt, "traced");
        let user = spans
            .iter()
            .find(|s| s.parent_span_id == py.span_id && s.name == "user.step")
            .unwrap_or_else(|| panic!("no user span under {py:#?}: {:#?}", names(spans)));
        assert_eq!(user.trace_id, py.trace_id);
        if resources {
            assert_eq!(attr(user, "resource:service.name").as_deref(), Some("pyvisor-test-worker"));
        }
        if attr(t, "pyvisor.outcome").as_deref() == Some("ok") {
            assert!(!matches!(py.status.as_ref(), Some(s) if s.code == "STATUS_CODE_ERROR"), "{py:#?}");
            continue;
        }
        // The Python exception, recorded on the function's span.
        assert_eq!(attr(t, "pyvisor.outcome").as_deref(), Some("python"));
        assert_eq!(attr(&py, "error.type").as_deref(), Some("ValueError"));
        assert_eq!(py.status.as_ref().map(|s| s.code.as_str()), Some("STATUS_CODE_ERROR"));
        let ev = py.events.iter().find(|e| e.name == "exception").unwrap_or_else(|| panic!("{py:#?}"));
        assert_eq!(event_attr(&ev.attributes, "exception.type").as_deref(), Some("ValueError"));
        assert_eq!(event_attr(&ev.attributes, "exception.message").as_deref(), Some("asked to fail"));
        assert!(event_attr(&ev.attributes, "exception.stacktrace").is_some_and(|t| t.contains("Traceback")));
    }
    // Two naps at once on one worker: one of them waited in the queue (and only a call that
    // waited has a queue-wait span).
    let naps: Vec<&&ExportedSpan> = calls.iter().filter(|s| attr(s, "rpc.method").as_deref() == Some("nap")).collect();
    assert_eq!(naps.len(), 2);
    let waits: usize = naps.iter().map(|n| children(n, "pyvisor.queue_wait").len()).sum();
    assert_eq!(waits, 1, "{:#?}", names(spans));
    assert!(children(echo, "pyvisor.queue_wait").is_empty());
    // record_points: two attempts, the first crashed (recorded), the retry linked to it.
    let rec = call("record_points");
    assert_eq!(attr(rec, "pyvisor.attempts").as_deref(), Some("2"));
    assert_eq!(attr(rec, "pyvisor.idempotent").as_deref(), Some("true"));
    let attempts = children(rec, "pyvisor.attempt");
    assert_eq!(attempts.len(), 2, "{:#?}", names(spans));
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(attr(first, "error.type").as_deref(), Some("worker_crashed"));
    assert_eq!(first.status.as_ref().map(|s| s.code.as_str()), Some("STATUS_CODE_ERROR"));
    let crash = first.events.iter().find(|e| event_attr(&e.attributes, "exception.type").as_deref() == Some("WorkerCrashed"));
    let crash = crash.unwrap_or_else(|| panic!("no crash event: {:#?}", first.events));
    assert!(event_attr(&crash.attributes, "exception.message").is_some_and(|m| m.contains("SIGKILL")));
    assert_eq!(attr(second, "pyvisor.attempt").as_deref(), Some("2"));
    assert!(second.links.iter().any(|l| l.span_id == first.span_id), "the retry links to the attempt it replaces");
    function_span(second, "record_points");
    // The killed attempt never replied: no function span under it.
    assert!(!spans.iter().any(|s| s.parent_span_id == first.span_id && s.name.starts_with("pyvisor.worker")));
    // Lifecycle: the crash has a span of its own with the certificate's fields.
    let died = spans.iter().find(|s| s.name == "pyvisor.worker.crash").expect("a crash span");
    assert_eq!(attr(died, "pyvisor.death.cause").as_deref(), Some("exited"));
    assert_eq!(attr(died, "pyvisor.exit.signal").as_deref(), Some("9"));
    assert!(spans.iter().any(|s| s.name == "pyvisor.worker.ready"));
    // A keyed call: the one that ran (`miss`, with its attempt) and the hit (no attempt).
    let marks: Vec<&&ExportedSpan> = calls.iter().filter(|s| attr(s, "rpc.method").as_deref() == Some("mark")).collect();
    assert_eq!(marks.len(), 2, "{:#?}", names(spans));
    for m in &marks {
        assert_eq!(attr(m, "pyvisor.idempotency_key").as_deref(), Some("k-mark"));
    }
    let how = |m: &ExportedSpan| attr(m, "pyvisor.idempotency");
    let miss = marks.iter().find(|m| how(m).as_deref() == Some("miss")).unwrap_or_else(|| panic!("no miss: {marks:#?}"));
    let hit = marks.iter().find(|m| how(m).as_deref() == Some("hit")).unwrap_or_else(|| panic!("no hit: {marks:#?}"));
    assert_eq!(children(miss, "pyvisor.attempt").len(), 1);
    assert!(children(hit, "pyvisor.attempt").is_empty());
    assert_eq!(attr(hit, "pyvisor.outcome").as_deref(), Some("ok"));
    // ractor's own actor spans stay out.
    assert!(!spans.iter().any(|s| s.name == "Actor"));
}

fn names(spans: &[ExportedSpan]) -> Vec<String> {
    spans.iter().map(|s| format!("{} {} <- {} {:?}", s.name, s.span_id, s.parent_span_id, s.attributes)).collect()
}

/// A minimal OTLP/HTTP receiver: `POST /v1/traces` and `/v1/metrics` with protobuf bodies.
pub struct HttpReceiver {
    pub endpoint: String,
    spans: mpsc::UnboundedReceiver<ExportedSpan>,
    metrics: mpsc::UnboundedReceiver<String>,
}

impl HttpReceiver {
    pub async fn start() -> HttpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stx, spans) = mpsc::unbounded_channel();
        let (mtx, metrics) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (stx, mtx) = (stx.clone(), mtx.clone());
                tokio::spawn(async move {
                    let mut conn = BufReader::new(conn);
                    loop {
                        let mut request_line = String::new();
                        if conn.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            if conn.read_line(&mut h).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    len = v.trim().parse().unwrap_or(0);
                                }
                            }
                        }
                        let mut body = vec![0u8; len];
                        if conn.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        if path.ends_with("/v1/traces") {
                            use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
                            if let Ok(req) = ExportTraceServiceRequest::decode(body.as_slice()) {
                                for rs in req.resource_spans {
                                    // Kept with each span as `resource:service.name`.
                                    let service = rs.resource.as_ref().and_then(|r| {
                                        r.attributes.iter().find(|kv| kv.key == "service.name").map(|kv| format!("{:?}", kv.value))
                                    });
                                    for ss in rs.scope_spans {
                                        for s in ss.spans {
                                            let mut span = ExportedSpan::from(s);
                                            if let Some(service) = &service {
                                                span.attributes.insert("resource:service.name".into(), service.clone());
                                            }
                                            let _ = stx.send(span);
                                        }
                                    }
                                }
                            }
                        } else if path.ends_with("/v1/metrics") {
                            use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
                            if let Ok(req) = ExportMetricsServiceRequest::decode(body.as_slice()) {
                                for rm in req.resource_metrics {
                                    for sm in rm.scope_metrics {
                                        for m in sm.metrics {
                                            let _ = mtx.send(m.name);
                                        }
                                    }
                                }
                            }
                        }
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if conn.get_mut().write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        HttpReceiver { endpoint, spans, metrics }
    }

    /// Spans received, waiting up to `limit` for at least `at_least`.
    pub async fn spans(&mut self, at_least: usize, limit: Duration) -> Vec<ExportedSpan> {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(limit, async {
            while out.len() < at_least {
                match self.spans.recv().await {
                    Some(s) => out.push(s),
                    None => break,
                }
            }
        })
        .await;
        while let Ok(s) = self.spans.try_recv() {
            out.push(s);
        }
        out
    }

    /// Metric names received, waiting up to `limit` for `name`.
    pub async fn metric_names(&mut self, name: &str, limit: Duration) -> Vec<String> {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(limit, async {
            while !out.iter().any(|n: &String| n == name) {
                match self.metrics.recv().await {
                    Some(n) => out.push(n),
                    None => break,
                }
            }
        })
        .await;
        out
    }
}

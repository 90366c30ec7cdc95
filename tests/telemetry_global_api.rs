//! Spans made in a worker through OpenTelemetry's global API — what instrumented libraries
//! (`opentelemetry-instrumentation-*`) use — reach the collector as children of the Python
//! function's span, in the call's trace (issue 14, item 5). Needs the adapter's `otel` extra in
//! the test interpreter. (One test per binary: the tracing subscriber is global.)

mod common;

use std::time::Duration;

use pyvisor::telemetry::{Protocol, TelemetryConfig};
use pyvisor::Pool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_the_global_opentelemetry_api_nest_under_the_function_span() {
    let mut receiver = common::otel::HttpReceiver::start().await;
    let guard = pyvisor::telemetry::init_with(
        &TelemetryConfig::default().endpoint(receiver.endpoint.clone()).protocol(Protocol::HttpProtobuf).service_name("pyvisor-test"),
    );
    assert!(pyvisor::telemetry::exporting());
    let pool = Pool::start(common::spec("instrumented.py").workers(1)).await.expect("pool starts (the test interpreter needs the otel extra)");
    let v: String = pool.call("lookup", "abc").await.unwrap();
    assert_eq!(v, "ABC");
    pool.shutdown().await; // the worker flushes its spans on a graceful exit
    guard.flush();
    let spans = receiver.spans(5, Duration::from_secs(10)).await;
    let named = |name: &str| {
        let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span expected: {:#?}", spans.iter().map(|s| (&s.name, &s.span_id, &s.parent_span_id)).collect::<Vec<_>>());
        found[0]
    };
    let service = |s: &fake_opentelemetry_collector::ExportedSpan| s.attributes.get("resource:service.name").map(|v| common::otel::clean(v));
    let attempt = named("pyvisor.attempt");
    let function = named("pyvisor.worker lookup");
    assert_eq!(function.parent_span_id, attempt.span_id);
    // The library's span: exported by the worker, a child of the function's span.
    let lookup = named("client.lookup");
    assert_eq!(lookup.parent_span_id, function.span_id, "the library span's parent is the function span");
    assert_eq!(lookup.trace_id, attempt.trace_id, "one trace from Rust into the library");
    assert_eq!(common::otel::clean(&lookup.attributes["client.key"]), "abc");
    assert_eq!(service(lookup).as_deref(), Some("pyvisor-test-worker"), "exported by the worker");
    assert!(function.start_time_unix_nano <= lookup.start_time_unix_nano && lookup.end_time_unix_nano <= function.end_time_unix_nano);
    // Nested global-API spans keep nesting.
    let query = named("db.query");
    assert_eq!(query.parent_span_id, lookup.span_id);
    assert_eq!(query.trace_id, attempt.trace_id);
    drop(guard);
}

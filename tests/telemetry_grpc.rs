//! OTLP over gRPC to a real receiver in this process: one trace per call from Rust into Python.
//! (One test per binary: the tracing subscriber is global.)

mod common;

use std::time::Duration;

use fake_opentelemetry_collector::FakeCollectorServer;
use pyvisor::telemetry::{Protocol, TelemetryConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_delivers_the_span_tree_and_metrics() {
    let mut collector = FakeCollectorServer::start().await.expect("collector starts");
    let guard = pyvisor::telemetry::init_with(
        &TelemetryConfig::default()
            .endpoint(collector.endpoint())
            .protocol(Protocol::Grpc)
            .service_name("pyvisor-test")
            .metric_interval(Duration::from_millis(200)),
    );
    assert!(pyvisor::telemetry::exporting());
    common::otel::workload().await;
    guard.flush();
    let spans = collector.exported_spans(10_000, Duration::from_secs(4)).await;
    common::otel::check_traces(&spans, false);
    let metrics = collector.exported_metrics(1, Duration::from_secs(10)).await;
    let names: Vec<String> = metrics.iter().flat_map(|m| m.metrics.iter().map(|m| m.name.clone())).collect();
    for name in ["pyvisor.calls", "pyvisor.call.duration", "pyvisor.call.retries", "pyvisor.worker.crashes", "pyvisor.workers"] {
        assert!(names.iter().any(|n| n == name), "metric {name} missing from {names:?}");
    }
    // The attributes the docs list.
    let calls = metrics.iter().flat_map(|m| m.metrics.iter()).find(|m| m.name == "pyvisor.calls").expect("pyvisor.calls");
    let text = serde_json::to_value(calls).unwrap().to_string();
    for attr in ["pyvisor.pool", "rpc.method", "pyvisor.outcome", "record_points", "echo"] {
        assert!(text.contains(attr), "{attr} missing from {text}");
    }
    let crashes = metrics.iter().flat_map(|m| m.metrics.iter()).find(|m| m.name == "pyvisor.worker.crashes").expect("crashes");
    assert!(serde_json::to_value(crashes).unwrap().to_string().contains("pyvisor.death.cause"));
    drop(guard);
}

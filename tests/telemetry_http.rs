//! OTLP over HTTP/protobuf to a minimal receiver in this process. (One test per binary: the
//! tracing subscriber is global.)

mod common;

use std::time::Duration;

use pyvisor::telemetry::{Protocol, TelemetryConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_delivers_the_span_tree_and_metrics() {
    let mut receiver = common::otel::HttpReceiver::start().await;
    let guard = pyvisor::telemetry::init_with(
        &TelemetryConfig::default()
            .endpoint(receiver.endpoint.clone())
            .protocol(Protocol::HttpProtobuf)
            .service_name("pyvisor-test")
            .metric_interval(Duration::from_millis(200)),
    );
    common::otel::workload().await;
    guard.flush();
    let spans = receiver.spans(10_000, Duration::from_secs(4)).await;
    common::otel::check_traces(&spans, true);
    let names = receiver.metric_names("pyvisor.calls", Duration::from_secs(10)).await;
    assert!(names.iter().any(|n| n == "pyvisor.calls"), "{names:?}");
    drop(guard);
}

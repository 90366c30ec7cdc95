//! OTLP over gRPC does not depend on the caller's runtime: `init_with` works outside any
//! runtime, and a flush from inside a current-thread runtime (which it blocks) still delivers —
//! the exporters' connections run on a thread of pyvisor's own. (One test per binary: the
//! tracing subscriber is global.)

mod common;

use std::time::Duration;

use fake_opentelemetry_collector::FakeCollectorServer;
use pyvisor::telemetry::{Protocol, TelemetryConfig};
use pyvisor::Pool;

#[test]
fn grpc_export_runs_on_its_own_thread() {
    // The receiver lives on a runtime of its own, like a collector in another process.
    let collector_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut collector = collector_rt.block_on(FakeCollectorServer::start()).expect("collector starts");
    // Outside any runtime.
    assert!(tokio::runtime::Handle::try_current().is_err());
    let guard = pyvisor::telemetry::init_with(&TelemetryConfig::default().endpoint(collector.endpoint()).protocol(Protocol::Grpc).service_name("pyvisor-rt-test"));
    assert!(pyvisor::telemetry::exporting(), "gRPC export starts outside a runtime");

    let calls = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    calls.block_on(async {
        let pool = Pool::start(common::spec("basic.py").workers(1)).await.expect("pool starts");
        for i in 0..5u64 {
            let v: u64 = pool.call("echo", &i).await.expect("echo");
            assert_eq!(v, i);
        }
        pool.shutdown().await;
        // Blocks this runtime's only thread: the export must not need it.
        guard.flush();
    });

    // The flush delivered them: the batch exporter's own schedule (5 s) has not come yet.
    let spans = collector_rt.block_on(collector.exported_spans(15, Duration::from_secs(2)));
    let calls_exported = spans.iter().filter(|s| s.name == "pyvisor.call").count();
    assert_eq!(calls_exported, 5, "one pyvisor.call span per call: {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    assert_eq!(spans.iter().filter(|s| s.name == "pyvisor.worker echo").count(), 5);
    drop(guard);
}

//! One trace per call, from Rust into Python, with a crash and a retry — for Jaeger.
//!
//! ```sh
//! docker compose -f examples/jaeger/docker-compose.yml up -d
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 OTEL_EXPORTER_OTLP_PROTOCOL=grpc \
//!   PYVISOR_PYTHON=.venv/bin/python cargo run --example jaeger_trace
//! ```
//!
//! The worker continues the trace when the adapter's `otel` extra is installed
//! (`make demo` installs it). Without an endpoint, it runs and prints, exporting nothing.

use std::time::Duration;

use pyvisor::{CallOptions, ChaosAction, Pool, PoolSpec};
use tracing::Instrument;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let telemetry = pyvisor::telemetry::init();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workers/traced.py");
    let pool = Pool::start(PoolSpec::script(script).name("scorer").workers(1).heartbeat_interval(Duration::from_millis(200))).await?;

    // The worker kills itself at the chaos point; the idempotent call is retried on its
    // replacement: two attempt spans, the first with the crash recorded, the second linked.
    // (This comes first: a killed worker loses the spans its exporter had not sent yet.)
    pool.chaos().arm("before_scoring", ChaosAction::Kill).await?;
    let root = tracing::info_span!("jaeger example: a crash and a retry");
    async {
        if let Some(id) = pyvisor::telemetry::current_trace_id() {
            println!("trace 1 (crash and retry): http://localhost:16686/trace/{id}");
        }
        let s: serde_json::Value = pool.call_with("score", &serde_json::json!({"values": [4]}), CallOptions::new()).await?;
        println!("score after a crash and a retry -> {s}");
        Ok::<_, pyvisor::CallError>(())
    }
    .instrument(root)
    .await?;

    let root = tracing::info_span!("jaeger example: a call");
    async {
        if let Some(id) = pyvisor::telemetry::current_trace_id() {
            println!("trace 2 (a call into Python and a nested user span): http://localhost:16686/trace/{id}");
        }
        let s: serde_json::Value = pool.call("score", &serde_json::json!({"values": [1, 2, 3]})).await?;
        println!("score -> {s}");
        Ok::<_, pyvisor::CallError>(())
    }
    .instrument(root)
    .await?;

    pool.shutdown().await;
    telemetry.flush();
    println!("done; {}", if pyvisor::telemetry::exporting() { "traces exported" } else { "set OTEL_EXPORTER_OTLP_ENDPOINT to export traces" });
    Ok(())
}

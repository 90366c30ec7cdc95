//! The Jaeger example and `pyvisor bench`, run as programs with `OTEL_EXPORTER_OTLP_ENDPOINT`
//! set, deliver traces in which the Python function's span is a child of the Rust attempt span.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};

fn target_dir() -> PathBuf {
    // target/debug/deps/telemetry_processes-HASH -> target/debug
    std::env::current_exe().unwrap().parent().and_then(|d| d.parent()).unwrap().to_path_buf()
}

/// Where spans go: the gRPC fake collector, or the HTTP/protobuf receiver of `common::otel`.
enum Receiver {
    Grpc(FakeCollectorServer),
    Http(common::otel::HttpReceiver),
}

impl Receiver {
    fn endpoint(&self) -> String {
        match self {
            Receiver::Grpc(c) => c.endpoint(),
            Receiver::Http(h) => h.endpoint.clone(),
        }
    }
    fn protocol(&self) -> &'static str {
        match self {
            Receiver::Grpc(_) => "grpc",
            Receiver::Http(_) => "http/protobuf",
        }
    }
    async fn spans(&mut self, wait: Duration) -> Vec<ExportedSpan> {
        match self {
            Receiver::Grpc(c) => c.exported_spans(100_000, wait).await,
            Receiver::Http(h) => h.spans(100_000, wait).await,
        }
    }
}

/// Run `program` exporting to `receiver`, and return every span it exported. The receivers
/// buffer little, so they are drained while the program runs.
async fn run(program: PathBuf, args: &[&str], receiver: &mut Receiver) -> Vec<ExportedSpan> {
    assert!(program.exists(), "{} is not built (run `cargo test --workspace`)", program.display());
    let child = tokio::process::Command::new(&program)
        .args(args)
        .env("PYVISOR_PYTHON", common::python())
        .env("PYVISOR_LOG", "warn")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", receiver.protocol())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut done = tokio::spawn(child.wait_with_output());
    let mut spans = Vec::new();
    let out = loop {
        spans.extend(receiver.spans(Duration::from_millis(100)).await);
        if done.is_finished() {
            break (&mut done).await.unwrap().unwrap();
        }
    };
    spans.extend(receiver.spans(Duration::from_secs(2)).await);
    assert!(out.status.success(), "{}: {}", program.display(), String::from_utf8_lossy(&out.stderr));
    spans
}

/// Attempt spans that have a Python child span for `function`.
fn python_under_attempts<'a>(spans: &'a [ExportedSpan], function: &str) -> Vec<(&'a ExportedSpan, &'a ExportedSpan)> {
    spans
        .iter()
        .filter(|s| s.name == "pyvisor.attempt")
        .filter_map(|a| {
            let py = spans.iter().find(|s| s.parent_span_id == a.span_id && s.name == format!("pyvisor.worker {function}"))?;
            Some((a, py))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_the_jaeger_example_and_pyvisor_bench_export_rust_and_python_spans() {
    check(Receiver::Grpc(FakeCollectorServer::start().await.unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_protobuf_the_jaeger_example_and_pyvisor_bench_export_rust_and_python_spans() {
    check(Receiver::Http(common::otel::HttpReceiver::start().await)).await;
}

async fn check(mut collector: Receiver) {

    let spans = run(target_dir().join("examples/jaeger_trace"), &[], &mut collector).await;
    let pairs = python_under_attempts(&spans, "score");
    assert!(!pairs.is_empty(), "no Python span under an attempt");
    for (a, py) in &pairs {
        assert_eq!(a.trace_id, py.trace_id);
    }
    // The crash-and-retry trace: a call with two attempts, the first marked as crashed.
    let retried = spans.iter().filter(|s| s.name == "pyvisor.call").find(|c| {
        spans.iter().filter(|s| s.parent_span_id == c.span_id && s.name == "pyvisor.attempt").count() == 2
    });
    assert!(retried.is_some(), "no call with two attempts");
    // The user's nested span in Python is under the Python call span.
    assert!(spans.iter().any(|s| s.name == "feature engineering" && pairs.iter().any(|(_, py)| py.span_id == s.parent_span_id)));

    let script = common::worker("basic.py");
    let spans = run(
        target_dir().join("pyvisor"),
        &["bench", "--script", script.to_str().unwrap(), "--function", "echo", "--payload", "[1, 2]", "--calls", "20", "--json"],
        &mut collector,
    )
    .await;
    let pairs = python_under_attempts(&spans, "echo");
    let count = |name: &str| spans.iter().filter(|s| s.name == name).count();
    assert_eq!(
        pairs.len(),
        20,
        "every bench call traced into Python: {} calls, {} attempts, {} Python spans",
        count("pyvisor.call"),
        count("pyvisor.attempt"),
        count("pyvisor.worker echo")
    );
}

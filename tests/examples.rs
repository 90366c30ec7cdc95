//! The examples run to completion and leave no Python process behind.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    // target/debug/deps/examples-HASH -> target/debug/examples/NAME (cargo test builds them).
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|deps| deps.parent()).unwrap().join("examples").join(name)
}

/// Live processes started by the run of `pid` (run ids start with the parent's pid).
fn leftovers(pid: u32) -> Vec<u32> {
    let needle = format!("PYVISOR_RUN_ID={pid}-");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv.starts_with(needle.as_bytes())))
                .unwrap_or(false)
        })
        .filter(|p| common::alive(*p))
        .collect()
}

/// The built example `name` with the test interpreter, quiet logs, no OTLP export, and its
/// output piped.
fn example_command(name: &str) -> Command {
    let path = example(name);
    assert!(path.exists(), "{} not built", path.display());
    let mut c = Command::new(&path);
    c.env("PYVISOR_PYTHON", common::python())
        .env("PYVISOR_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

fn run_example(name: &str, expect: &str) {
    let child = example_command(name).spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{name} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(expect), "{name} output:\n{stdout}");
    let left: Vec<String> = leftovers(pid)
        .into_iter()
        .map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            format!("{p}: {} | {}", stat.trim(), String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect();
    assert!(left.is_empty(), "{name} left Python processes: {left:#?}");
}

#[test]
fn affinity_runs_and_exits_cleanly() {
    run_example("affinity", "affinity example done");
}

#[test]
fn streaming_runs_and_exits_cleanly() {
    run_example("streaming", "streaming example done");
}

/// 100 MiB of float64 summed in Python over the parent's pages: the example asserts the sum,
/// `np.shares_memory` and that the worker's `RssAnon` grew by less than 10 MiB.
#[test]
fn numpy_buffers_runs_and_exits_cleanly() {
    run_example("numpy_buffers", "numpy example done");
}

#[test]
fn quickstart_runs_and_exits_cleanly() {
    run_example("quickstart", "divide(1, 0) raised ZeroDivisionError");
}

#[test]
fn idempotency_runs_and_exits_cleanly() {
    run_example("idempotency", "idempotency example done");
}

#[test]
fn supervision_tree_runs_and_exits_cleanly() {
    run_example("supervision_tree", "tree shut down");
}

#[test]
fn embed_in_ractor_runs_and_exits_cleanly() {
    run_example("embed_in_ractor", "app stopped");
}

#[test]
fn jaeger_trace_runs_without_an_endpoint_and_exports_nothing() {
    run_example("jaeger_trace", "set OTEL_EXPORTER_OTLP_ENDPOINT to export traces");
}

/// The axum example serves a Python function over HTTP: real requests from a real client get
/// the worker's answers (one at a time and many at once), a malformed body is refused before
/// any call, and SIGTERM stops the server and the pool without leaving a Python process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_service_answers_real_http_requests() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

    let guard = std::time::Duration::from_secs(60);
    let mut command = example_command("axum_service");
    command.arg("127.0.0.1:0");
    let mut child = tokio::process::Command::from(command).kill_on_drop(true).spawn().unwrap();
    let pid = child.id().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let base = tokio::time::timeout(guard, async {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(stdout.read_line(&mut line).await.unwrap() > 0, "axum_service exited before listening");
            if let Some(url) = line.trim().strip_prefix("listening on ") {
                return url.to_string();
            }
        }
    })
    .await
    .expect("axum_service did not start listening");

    let client = reqwest::Client::new();
    let url = format!("{base}/predict");
    let response = client.post(&url).json(&serde_json::json!({"id": 7, "values": [1.0, 2.0]})).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    // quickstart.py's predict: sum(values) * 2.0 + 0.5.
    assert_eq!(body, serde_json::json!({"id": 7, "score": 6.5}));

    let many = (0..16u32).map(|id| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client.post(&url).json(&serde_json::json!({"id": id, "values": [f64::from(id)]})).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    });
    for (id, body) in futures::future::join_all(many).await.into_iter().enumerate() {
        assert_eq!(body, serde_json::json!({"id": id, "score": id as f64 * 2.0 + 0.5}));
    }

    let bad = client.post(&url).json(&serde_json::json!({"id": "seven"})).send().await.unwrap();
    assert!(bad.status().is_client_error(), "{}", bad.status());

    // SAFETY: a plain kill(2) of the child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(guard, child.wait()).await.expect("axum_service did not stop on SIGTERM").unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr).await;
    }
    assert!(status.success(), "axum_service: {status}\n{rest}\n{stderr}");
    assert!(rest.contains("pool shut down"), "axum_service output after SIGTERM:\n{rest}\n{stderr}");
    assert!(leftovers(pid).is_empty(), "axum_service left Python processes: {:?}", leftovers(pid));
}

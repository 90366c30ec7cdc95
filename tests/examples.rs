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

fn run_example(name: &str, expect: &str) {
    let path = example(name);
    assert!(path.exists(), "{} not built", path.display());
    let child = Command::new(&path)
        .env("PYVISOR_PYTHON", common::python())
        .env("PYVISOR_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
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

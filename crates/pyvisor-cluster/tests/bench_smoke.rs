//! CI smoke of the multi-node benchmark (src/bin/pyvisor-cluster-bench.rs): with `--quick` it
//! starts its echo server, a local pool and two node processes, runs, prints the ratio line and
//! writes its figures. Never a timing assertion (those belong to `make bench-cluster` and
//! docs/benchmarks.md).

use std::path::PathBuf;
use std::process::Command;

/// The interpreter with the adapter installed: `PYVISOR_PYTHON`, else the repo's `.venv`.
fn python() -> PathBuf {
    match std::env::var_os("PYVISOR_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
    }
}

#[test]
fn the_cluster_bench_runs_and_prints_the_ratio() {
    let dir = std::env::temp_dir().join(format!("pyvisor-cluster-bench-smoke-{}", std::process::id()));
    let json = dir.join("cluster.json");
    let out = Command::new(env!("CARGO_BIN_EXE_pyvisor-cluster-bench"))
        .arg("--quick")
        .arg("--python")
        .arg(python())
        .arg("--json")
        .arg(&json)
        .output()
        .expect("the bench starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let ratio = stdout.lines().find(|l| l.starts_with("remote / (local + raw TCP) p50:")).unwrap_or_else(|| panic!("no ratio line in\n{stdout}"));
    assert!(ratio.contains('×') && ratio.contains("target ≤ 1.5×"), "{ratio}");
    for row in [
        "local pyvisor",
        "raw TCP request/reply",
        "remote: node A → node B",
        "ractor_cluster RPC alone",
        "RemotePool → A's own member",
        "1 node (B",
        "2 nodes (B and C",
    ] {
        assert!(stdout.contains(row), "no `{row}` in\n{stdout}");
    }
    let figures: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("figures written")).expect("JSON");
    for key in ["local", "raw_tcp", "remote", "ractor_echo", "own_member"] {
        assert!(figures[key]["p50_us"].as_f64().is_some_and(|v| v > 0.0), "{key}: {figures}");
    }
    assert!(figures["throughput"]["two_nodes"]["calls_per_s"].as_f64().is_some_and(|v| v > 0.0), "{figures}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_python_is_a_clean_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_pyvisor-cluster-bench"))
        .args(["--quick", "--python", "/nonexistent/python"])
        .output()
        .expect("the bench starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no Python interpreter at /nonexistent/python") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_missing_node_binary_is_a_clean_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_pyvisor-cluster-bench"))
        .args(["--quick", "--node-binary", "/nonexistent/pyvisor-cluster-node"])
        .arg("--python")
        .arg(python())
        .output()
        .expect("the bench starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no node binary at /nonexistent/pyvisor-cluster-node") && !stderr.contains("panicked"), "{stderr}");
}

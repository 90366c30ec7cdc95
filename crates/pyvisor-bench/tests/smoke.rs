//! CI smoke of the benchmark suite: it runs and prints every figure with its ratio. Never a
//! timing assertion (those belong to `make bench` and docs/benchmarks.md).

use std::path::PathBuf;
use std::process::Command;

fn python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    match std::env::var_os("PYVISOR_PYTHON").filter(|p| !p.is_empty()).map(PathBuf::from) {
        Some(p) if p.components().count() > 1 && p.is_relative() => root.join(p),
        Some(p) => p,
        None => root.join(".venv/bin/python"),
    }
}

#[test]
fn the_suite_runs_and_prints_ratios() {
    let dir = std::env::temp_dir().join(format!("pyvisor-bench-smoke-{}", std::process::id()));
    let json = dir.join("results.json");
    let plot = dir.join("latency.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_pyvisor-bench"))
        .arg("--quick")
        .arg("--python")
        .arg(python())
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .env("PYVISOR_LOG", "warn")
        .output()
        .expect("the suite starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("raw floor, absolute:") && stdout.contains("anchor ≈ 60 µs"), "{stdout}");
    for scenario in [
        "sequential p50 (1 worker, 1 caller, 100 B)",
        "pipelined throughput",
        "streamed items",
        "throughput, 2 workers",
        "throughput, 4 workers",
        "payload 10 KiB",
        "payload 1 MiB",
        "floor with the workers' allocator settings",
        "payload 1 MiB, floor as it is",
        "caller blocking the main thread",
        "tracing on vs off",
        "cold start",
        "recovery",
        "memory per idle worker",
        "buffer 64 KiB: SharedBytes in",
        "buffer 64 KiB: default pool",
        "buffer 16 MiB: Vec<u8> in",
        "buffer 256 MiB: effective rate",
    ] {
        let line = stdout.lines().find(|l| l.contains(scenario)).unwrap_or_else(|| panic!("no `{scenario}` in\n{stdout}"));
        assert!(line.contains('×') || scenario.contains("memory"), "no ratio on `{line}`");
    }
    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("results written")).expect("JSON");
    assert_eq!(results["rows"].as_array().map(Vec::len), Some(29));
    assert!(std::fs::read_to_string(&plot).expect("plot written").contains("<svg"));
    let _ = std::fs::remove_dir_all(&dir);
}

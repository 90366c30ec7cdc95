//! The `pyvisor` command against real Python workers.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use common::{alive, pyvisor, root};

fn worker(name: &str) -> String {
    root().join("tests/workers").join(name).to_string_lossy().into_owned()
}

fn run(c: &mut Command) -> Output {
    c.output().expect("pyvisor runs")
}

fn worker_pids(stderr: &str) -> Vec<u32> {
    stderr
        .lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            match (p.next(), p.next(), p.next(), p.next()) {
                (Some("worker"), Some(_), Some("pid"), Some(pid)) => pid.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

fn check_contract(v: &serde_json::Value) {
    for key in ["calls", "ok", "errors", "p50_us", "p99_us", "throughput", "workers", "concurrency"] {
        assert!(v.get(key).is_some(), "missing key {key} in {v}");
    }
    let errors: u64 = v["errors"].as_object().expect("errors is an object").values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(v["calls"].as_u64().unwrap(), v["ok"].as_u64().unwrap() + errors, "calls != ok + errors in {v}");
}

#[test]
fn bench_json_reports_a_clean_echo_run() {
    let out = run(pyvisor().args(["bench", "--script", &worker("basic.py"), "--function", "echo"]).args([
        "--payload",
        r#"{"a": [1, 2.5, "x", null], "b": true}"#,
        "--workers",
        "2",
        "--concurrency",
        "4",
        "--max-in-flight",
        "2",
        "--calls",
        "300",
        "--json",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    // Exactly one JSON object on stdout.
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("stdout is one JSON object");
    assert_eq!(stdout.trim().lines().count(), 1);
    check_contract(&v);
    assert_eq!(v["calls"], 300);
    assert_eq!(v["ok"], 300);
    assert_eq!(v["workers"], 2);
    assert_eq!(v["concurrency"], 4);
    assert!(v["p50_us"].as_u64().unwrap() > 0 && v["p99_us"].as_u64() >= v["p50_us"].as_u64());
    assert!(v["throughput"].as_f64().unwrap() > 0.0);
    let pids = worker_pids(&stderr);
    assert_eq!(pids.len(), 2, "stderr: {stderr}");
    for pid in pids {
        assert!(!alive(pid), "worker {pid} outlived the bench");
    }
}

#[test]
fn bench_counts_a_wrong_echo_as_mismatch() {
    let out = run(pyvisor().args(["bench", "--script", &worker("wrong_echo.py"), "--function", "echo"]).args([
        "--payload", "[1, 2]", "--workers", "1", "--concurrency", "2", "--calls", "50", "--json",
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    check_contract(&v);
    assert_eq!(v["ok"], 0);
    assert_eq!(v["errors"]["mismatch"], 50);
    assert!(!out.status.success());
}

#[test]
fn bench_prints_live_worker_pids_including_replacements() {
    let mut child = pyvisor()
        .args(["bench", "--script", &worker("basic.py"), "--function", "echo", "--payload", "1"])
        .args(["--workers", "2", "--concurrency", "2", "--duration", "4", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bench starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut pids = Vec::new();
    let start = Instant::now();
    while pids.len() < 2 && start.elapsed() < Duration::from_secs(30) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            pids.extend(worker_pids(&line));
        }
    }
    assert_eq!(pids.len(), 2);
    for pid in &pids {
        assert!(alive(*pid));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(String::from_utf8_lossy(&cmdline).contains("basic.py"), "{pid} is not a worker");
    }
    // Kill one: its replacement's pid is printed too.
    unsafe {
        libc::kill(pids[0] as i32, libc::SIGKILL);
    }
    let mut replacement = None;
    while replacement.is_none() && start.elapsed() < Duration::from_secs(30) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            replacement = worker_pids(&line).first().copied();
        }
    }
    let replacement = replacement.expect("the replacement's pid is printed");
    assert!(!pids.contains(&replacement));
    assert!(alive(replacement));
    let out = child.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    check_contract(&v);
    assert!(v["ok"].as_u64().unwrap() > 0);
    for pid in pids.iter().chain([&replacement]) {
        assert!(!alive(*pid));
    }
}

#[test]
fn call_prints_the_result_and_fails_clearly() {
    let out = run(pyvisor().args(["call", &worker("basic.py"), "add", "[40, 2]"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let out = run(pyvisor().args(["call", &worker("basic.py"), "fail", r#""boom""#]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ValueError: boom") && err.contains("Traceback"), "{err}");

    let out = run(pyvisor().args(["call", "/nonexistent/worker.py", "add", "[1, 2]"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("worker script not found: /nonexistent/worker.py"));

    let out = run(pyvisor().args(["--python", "/nonexistent/python3", "call", &worker("basic.py"), "add", "[1, 2]"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Python interpreter not found: /nonexistent/python3"), "{err}");

    let out = run(pyvisor().args(["call", &worker("basic.py"), "add", "not json"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));

    let out = run(pyvisor().args(["call", &worker("basic.py"), "nope", "1"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the workers expose"));
}

#[test]
fn doctor_checks_the_installation_and_says_what_to_fix() {
    let out = run(pyvisor().args(["doctor", "--script", &worker("basic.py")]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ok   pyvisor_worker") && text.contains("exposes:") && text.contains("echo"), "{text}");
    assert!(text.contains("ok   buffers: out of band"), "this machine has memfds: {text}");

    let out = run(pyvisor().args(["--python", "/nonexistent/python3", "doctor"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Python interpreter not found"));

    // An interpreter without the adapter: a bare venv.
    let dir = std::env::temp_dir().join(format!("pyvisor-bare-venv-{}", std::process::id()));
    let made = Command::new("python3").args(["-m", "venv", "--without-pip"]).arg(&dir).status().expect("python3 runs");
    assert!(made.success());
    let bare = dir.join("bin/python");
    let out = run(pyvisor().env("PYVISOR_PYTHON", &bare).arg("doctor"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL pyvisor_worker cannot be imported") && text.contains("pip install"), "{text}");
    // And a call through it says the same in its error.
    let out = run(pyvisor().env("PYVISOR_PYTHON", &bare).args(["call", &worker("basic.py"), "echo", "1"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("pyvisor_worker") && err.contains("pip install"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_shows_the_tree_and_stops_it_in_order_on_ctrl_c() {
    // Its own control socket: not the default path a real run of this tree may hold.
    let control = std::env::temp_dir().join(format!("pyvisor-cli-run-{}/c.sock", std::process::id()));
    let mut child = pyvisor()
        .args(["run", &root().join("examples/tree.toml").to_string_lossy()])
        .arg("--control")
        .arg(&control)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let start = Instant::now();
    // Wait for a table row showing the nested pool's worker ready.
    while !lines.iter().any(|l: &String| l.starts_with("etl/loader") && l.contains("ready")) {
        assert!(start.elapsed() < Duration::from_secs(60), "no table: {lines:?}");
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    assert!(lines.iter().any(|l| l.starts_with("PATH") && l.contains("RESTARTS")));
    let pids: Vec<u32> = lines
        .iter()
        .filter(|l| l.starts_with("ml ") || l.starts_with("etl/loader"))
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect();
    assert!(pids.len() >= 3, "{lines:?}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    // A guard, not a budget: a run that ignores Ctrl-C fails here instead of hanging CI.
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if stopping.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("`pyvisor run` did not stop on SIGINT: {lines:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    lines.extend(rx.try_iter());
    assert!(status.success(), "{lines:?}");
    let pos = |needle: &str| lines.iter().position(|l| l.ends_with(needle)).unwrap_or_else(|| panic!("no `{needle}` in {lines:?}"));
    assert!(pos("etl/loader: pool stopped") < pos("ml: pool stopped"), "reverse start order");
    assert_eq!(lines.last().map(String::as_str), Some("stopped"));
    for pid in pids {
        assert!(!alive(pid));
    }
    assert!(!control.exists(), "the control socket outlived the run");
    let _ = std::fs::remove_dir_all(control.parent().unwrap());
}

#[test]
fn run_reports_bad_toml_with_line_and_field() {
    let dir = std::env::temp_dir().join(format!("pyvisor-badtoml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tree.toml");
    std::fs::write(&file, "[supervisor]\nstrategy = \"one_for_one\"\n\n[[supervisor.children]]\npool = \"ml\"\nscript = \"w.py\"\nwrokers = 2\n").unwrap();
    let out = run(pyvisor().args(["run", &file.to_string_lossy()]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 7") && err.contains("wrokers"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chaos_json_reports_kills_retries_and_recovery() {
    let out = run(pyvisor().args(["chaos", "--script", &worker("faults.py"), "--function", "echo", "--payload", r#"{"k": [1, "x"]}"#]).args([
        "--workers", "3", "--concurrency", "8", "--duration", "3", "--kill-every", "150", "--json",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    for key in ["calls", "ok", "retried", "errors", "kills", "restarts", "time_to_full_strength_ms"] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    check_contract(&v);
    assert!(v["kills"].as_u64().unwrap() >= 10, "{v}");
    // echo is idempotent: the crash barrier saves every call.
    assert_eq!(v["ok"], v["calls"], "{v}");
    assert_eq!(v["poisoned"], 0);
    assert!(v["restarts"].as_u64().unwrap() >= v["kills"].as_u64().unwrap() / 2, "{v}");
    assert!(v["time_to_full_strength_ms"].as_f64().is_some(), "{v}");
}

/// Runs `pyvisor` (bench or chaos, `--duration 60`) on `starts_once.py` with one worker: the
/// worker starts once, and every replacement fails at import, so the pool fails a few seconds
/// after the first worker dies. With `kill_first`, the test kills that worker itself. Returns
/// the exit status, stdout, stderr and the run's wall time; a run still going after 30 s is
/// killed and fails the test (it kept calling a failed pool).
fn run_until_the_pool_fails(subcommand: &str, extra: &[&str], kill_first: bool) -> (std::process::ExitStatus, String, String, Duration) {
    let dir = std::env::temp_dir().join(format!("pyvisor-pool-fails-{subcommand}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let started = Instant::now();
    let mut child = pyvisor()
        .env("STARTS_ONCE_MARKER", dir.join("started"))
        .args([subcommand, "--script", &worker("starts_once.py"), "--function", "echo", "--payload", "1"])
        .args(["--workers", "1", "--concurrency", "4", "--duration", "60", "--json"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pyvisor starts");
    let mut stdout = child.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let mut killed = !kill_first;
    // A guard, not a budget: the pool fails within seconds; a run that keeps going is the bug.
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            if !killed {
                if let Some(pid) = worker_pids(&line).first() {
                    unsafe {
                        libc::kill(*pid as i32, libc::SIGKILL);
                    }
                    killed = true;
                }
            }
            lines.push(line);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`pyvisor {subcommand}` still running 30 s into its 60 s --duration after its pool failed:\n{}", lines.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        lines.push(line);
    }
    let stdout = out_reader.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (status, stdout, lines.join("\n"), elapsed)
}

/// The failed pool's reason, as the command printed it.
fn assert_reports_the_pool_failure(subcommand: &str, status: std::process::ExitStatus, stdout: &str, stderr: &str) {
    assert_eq!(status.code(), Some(1), "exit status {status}; stderr:\n{stderr}");
    let reason = stderr
        .lines()
        .find(|l| l.starts_with(&format!("error: pool `{subcommand}` has failed:")))
        .unwrap_or_else(|| panic!("no `error: pool `{subcommand}` has failed:` line in stderr:\n{stderr}"));
    assert!(reason.contains("worker start failures") && reason.contains("never became ready"), "{reason}");
    assert!(stderr.contains("started once already: every restart fails at import"), "the worker's own error is shown:\n{stderr}");
    // --json still prints exactly one JSON object, which names the failure.
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    check_contract(&v);
    assert!(v["pool_failed"].as_str().is_some_and(|r| r.contains("worker start failures")), "{v}");
    for pid in worker_pids(stderr) {
        assert!(!alive(pid), "worker {pid} outlived the command");
    }
}

#[test]
fn bench_stops_at_once_when_its_pool_fails() {
    let (status, stdout, stderr, elapsed) = run_until_the_pool_fails("bench", &[], true);
    assert_reports_the_pool_failure("bench", status, &stdout, &stderr);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    // Calls that fail at once on a failed pool are not made by the million.
    assert!(v["errors"]["pool_failed"].as_u64().unwrap_or(0) <= 4, "{v}");
    eprintln!("bench ended {elapsed:.1?} after it started: {v}");
}

#[test]
fn chaos_stops_at_once_when_its_pool_fails() {
    let (status, stdout, stderr, elapsed) = run_until_the_pool_fails("chaos", &["--kill-every", "300"], false);
    assert_reports_the_pool_failure("chaos", status, &stdout, &stderr);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(v["errors"]["pool_failed"].as_u64().unwrap_or(0) <= 4, "{v}");
    assert!(v["kills"].as_u64().unwrap() >= 1, "{v}");
    eprintln!("chaos ended {elapsed:.1?} after it started: {v}");
}

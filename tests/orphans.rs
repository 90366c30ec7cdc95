//! No Python process outlives the Rust process, even when the Rust process is SIGKILLed while
//! its workers are stuck in C code holding the GIL, ignore SIGTERM, and have subprocesses.
//!
//! The test re-runs this test binary as a helper process (the ignored test below), which
//! starts a pool and reports its processes; the test then SIGKILLs the helper.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use pyvisor::{CallOptions, Pool};

const HELPER_ENV: &str = "PYVISOR_ORPHAN_HELPER";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_rust_process_leaves_no_python_process() {
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_process_for_the_sigkill_test", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("helper starts");
    let stdout = helper.stdout.take().unwrap();
    // Whatever happens below, the helper (and so its workers) must not outlive this test.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut helper = KillOnDrop(helper);
    let (mut run_id, mut workers, mut children) = (String::new(), Vec::new(), Vec::new());
    let lines = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest may print its own text before ours on the same line.
            let Some((_, ours)) = line.split_once("ORPHAN ") else { continue };
            let done = ours == "ready";
            out.push(ours.to_string());
            if done {
                break;
            }
        }
        out
    });
    let lines = tokio::time::timeout(Duration::from_secs(60), lines).await.expect("helper reports").unwrap();
    for line in &lines {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some("run"), Some(id)) => run_id = id.to_string(),
            (Some("worker"), Some(pid)) => workers.push(pid.parse::<u32>().unwrap()),
            (Some("child"), Some(pid)) => children.push(pid.parse::<u32>().unwrap()),
            _ => {}
        }
    }
    assert_eq!(lines.last().map(String::as_str), Some("ready"), "helper output: {lines:?}");
    assert_eq!((workers.len(), children.len()), (2, 2), "helper output: {lines:?}");
    let before = common::processes_of_run(&run_id);
    for pid in workers.iter().chain(&children) {
        assert!(before.contains(pid), "{pid} is not among the run's processes {before:?}");
    }
    // Workers + their watchdogs + the subprocesses.
    assert!(before.len() >= 6, "{before:?}");

    helper.0.kill().expect("SIGKILL the helper");
    let _ = helper.0.wait();

    let gone = common::eventually(Duration::from_secs(15), || common::processes_of_run(&run_id).is_empty()).await;
    assert!(gone, "left behind: {:?}", common::processes_of_run(&run_id));
    for pid in workers.iter().chain(&children) {
        assert!(!common::alive(*pid));
    }
}

struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start this binary as the helper in `mode`; return it and its `ORPHAN` lines up to `ready`.
fn helper(mode: &str, program: &str) -> (KillOnDrop, Vec<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_process_for_the_sigkill_test", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, mode)
        .env("PYVISOR_PROGRAM_ID", program)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("helper starts");
    let stdout = child.stdout.take().unwrap();
    let guard = KillOnDrop(child);
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let Some((_, ours)) = line.split_once("ORPHAN ") else { continue };
        lines.push(ours.to_string());
        if ours == "ready" {
            break;
        }
    }
    (guard, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_that_escaped_an_earlier_run_are_stopped_by_the_next_run() {
    let program = format!("orphan-test-{}", std::process::id());
    let (mut first, lines) = tokio::task::spawn_blocking({
        let program = program.clone();
        move || helper("detach", &program)
    })
    .await
    .unwrap();
    let escaped: u32 = lines
        .iter()
        .find_map(|l| l.strip_prefix("child ").and_then(|p| p.parse().ok()))
        .unwrap_or_else(|| panic!("helper output: {lines:?}"));
    let sleeper = KillOnDrop2(escaped);
    first.0.kill().unwrap();
    let _ = first.0.wait();
    // It left the worker's session and group: neither the parent-death signal nor the
    // watchdog reaches it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(common::alive(escaped), "the detached subprocess should have escaped");
    // The next run of the same program finds it by its run-id marker and stops it.
    let (_second, lines) = tokio::task::spawn_blocking(move || helper("restart", &program)).await.unwrap();
    assert_eq!(lines.last().map(String::as_str), Some("ready"), "{lines:?}");
    assert!(common::eventually(Duration::from_secs(10), || !common::alive(escaped)).await, "the escaped process survived the next run");
    drop(sleeper);
}

struct KillOnDrop2(u32);
impl Drop for KillOnDrop2 {
    fn drop(&mut self) {
        if common::alive(self.0) {
            common::signal(self.0, libc::SIGKILL);
        }
    }
}

#[test]
#[ignore = "helper process for the orphan tests"]
fn helper_process_for_the_sigkill_test() {
    let Some(mode) = std::env::var_os(HELPER_ENV) else { return };
    if mode == "detach" || mode == "restart" {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let pool = Pool::start(common::spec("stubborn.py").workers(1)).await.expect("pool starts");
            if mode == "detach" {
                println!("ORPHAN child {}", pool.call::<_, u32>("detach", &()).await.expect("detach"));
            }
            println!("ORPHAN ready");
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let pool = Pool::start(common::spec("stubborn.py").workers(2).max_in_flight(1)).await.expect("pool starts");
        println!("ORPHAN run {}", pyvisor::run_id());
        for w in pool.status().await.workers {
            println!("ORPHAN worker {}", w.pid.unwrap());
        }
        let spawns: Vec<_> = (0..2)
            .map(|_| {
                let p = pool.clone();
                tokio::spawn(async move { p.call::<_, u32>("spawn_child", &()).await })
            })
            .collect();
        for s in spawns {
            println!("ORPHAN child {}", s.await.unwrap().expect("spawn_child"));
        }
        for _ in 0..2 {
            let p = pool.clone();
            tokio::spawn(async move { p.call_with::<_, u64>("hold_gil", &(), CallOptions::new().no_timeout()).await });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("ORPHAN ready");
        // Bounded: even if the test never kills us, we are gone in a minute.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

//! Processes that leave their worker's process group (`setsid`, ignoring SIGTERM) do not
//! outlive the pool nor the program: not after `pool.shutdown()`, not after a crash of their
//! worker, not when `main` returns or calls `std::process::exit` with the pool still running.
//!
//! The program-exit cases re-run this test binary as a helper (the ignored test below) and
//! watch its escapee from outside.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use pyvisor::Pool;

const HELPER_ENV: &str = "PYVISOR_ESCAPEE_HELPER";

/// Kills a pid on drop if the test left it alive (so a failing test leaves nothing behind).
struct Reaper(Vec<u32>);
impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            if common::alive(*pid) {
                common::signal(*pid, libc::SIGKILL);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_grandchild_ends_with_pool_shutdown() {
    let pool = Pool::start(common::spec("stubborn.py").workers(1)).await.expect("pool starts");
    let escaped: u32 = pool.call("detach_stubborn", &()).await.expect("detach");
    let _guard = Reaper(vec![escaped]);
    assert!(common::alive(escaped));
    pool.shutdown().await;
    assert!(!common::alive(escaped), "the setsid grandchild outlived pool.shutdown()");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_grandchild_ends_with_its_crashed_worker() {
    let pool = Pool::start(common::spec("stubborn.py").workers(1)).await.expect("pool starts");
    let escaped: u32 = pool.call("detach_stubborn", &()).await.expect("detach");
    let _guard = Reaper(vec![escaped]);
    let worker = pool.status().await.workers[0].pid.expect("worker pid");
    common::signal(worker, libc::SIGKILL);
    let gone = common::eventually(Duration::from_secs(20), || !common::alive(escaped)).await;
    assert!(gone, "the setsid grandchild outlived its worker");
    pool.shutdown().await;
}

/// Run this binary as the helper in `mode` (with extra environment), wait for it to exit by
/// itself, and return its `ESCAPEE key value` lines.
fn run_helper_with(mode: &str, env: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "helper_program_with_an_escapee", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, mode)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("helper starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut out = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let Some((_, ours)) = line.split_once("ESCAPEE ") else { continue };
        if let Some((k, v)) = ours.split_once(' ') {
            out.push((k.to_string(), v.to_string()));
        }
    }
    let status = child.wait().expect("helper exits");
    assert!(status.success(), "helper {mode}: {status}");
    out
}

fn value<'a>(lines: &'a [(String, String)], key: &str) -> &'a str {
    lines.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no `{key}` in {lines:?}"))
}

/// Run the helper in `mode`; its escapee's pid and its run id.
fn run_helper(mode: &str) -> (u32, String) {
    let lines = run_helper_with(mode, &[]);
    (value(&lines, "pid").parse().expect("a pid"), value(&lines, "run").to_string())
}

async fn program_exit_leaves_nothing(mode: &'static str) {
    let (escaped, run) = tokio::task::spawn_blocking(move || run_helper(mode)).await.expect("helper ran");
    let _guard = Reaper(vec![escaped]);
    // The program has exited; its exit hook ran before it did.
    let gone = common::eventually(Duration::from_secs(10), || common::processes_of_run(&run).is_empty()).await;
    assert!(gone, "{mode}: left behind {:?}", common::processes_of_run(&run));
    // A process being killed loses its environment (the marker) a moment before its state
    // turns zombie: wait for that too.
    let dead = common::eventually(Duration::from_secs(10), || !common::alive(escaped)).await;
    assert!(dead, "{mode}: the setsid grandchild outlived the program");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_grandchild_ends_when_main_returns() {
    program_exit_leaves_nothing("return").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_grandchild_ends_at_process_exit() {
    program_exit_leaves_nothing("exit").await;
}

/// pyvisor makes the program a child subreaper unless the embedder opts out, by the
/// environment or by `set_child_subreaper(false)` before the first pool starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedders_can_opt_out_of_the_subreaper() {
    let probe = |mode: &'static str, env: &'static [(&'static str, &'static str)]| {
        tokio::task::spawn_blocking(move || value(&run_helper_with(mode, env), "subreaper").to_string())
    };
    assert_eq!(probe("probe", &[]).await.expect("helper"), "1", "on by default");
    assert_eq!(probe("probe", &[("PYVISOR_SUBREAPER", "0")]).await.expect("helper"), "0", "off by the environment");
    assert_eq!(probe("probe-api", &[]).await.expect("helper"), "0", "off by set_child_subreaper(false)");
}

fn subreaper_flag() -> i32 {
    let mut flag: libc::c_int = -1;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes one int.
    unsafe {
        libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut flag as *mut libc::c_int, 0, 0, 0);
    }
    flag
}

#[test]
#[ignore = "helper process for the program-exit tests"]
fn helper_program_with_an_escapee() {
    let Some(mode) = std::env::var(HELPER_ENV).ok() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    if mode.starts_with("probe") {
        if mode == "probe-api" {
            pyvisor::set_child_subreaper(false);
        }
        rt.block_on(async {
            let pool = Pool::start(common::spec("stubborn.py").workers(1)).await.expect("pool starts");
            println!("ESCAPEE subreaper {}", subreaper_flag());
            pool.shutdown().await;
        });
        return;
    }
    rt.block_on(async {
        let pool = Pool::start(common::spec("stubborn.py").workers(1)).await.expect("pool starts");
        let escaped: u32 = pool.call("detach_stubborn", &()).await.expect("detach");
        println!("ESCAPEE run {}", pyvisor::run_id());
        println!("ESCAPEE pid {escaped}");
        if mode == "exit" {
            std::process::exit(0);
        }
        // "return": the pool is still running when the program ends.
        std::mem::forget(pool);
    });
}

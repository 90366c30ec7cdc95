//! SIGHUP reloads the tree file of a real `pyvisor run` with real Python workers: a pool added,
//! another's worker count changed, a third removed; untouched pools keep their processes; a
//! file that does not parse is rejected with the reason and the running tree is kept; systemd
//! hears `RELOADING=1` then `READY=1`. Also: signals while the tree is still starting.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::manager::Manager;
use common::run::{all_workers, status, wait_ready, Run};
use common::{alive, processes_of_run, pyvisor, root};

const GUARD: Duration = Duration::from_secs(120);

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pyvisor-reload-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn worker(name: &str) -> String {
    root().join("tests/workers").join(name).to_string_lossy().into_owned()
}

/// A tree file of pools `(id, workers)`, each running basic.py.
fn tree_of(pools: &[(&str, usize)]) -> String {
    let mut s = "[supervisor]\nname = \"svc\"\nstrategy = \"one_for_one\"\n".to_string();
    for (id, n) in pools {
        s += &format!("\n[[supervisor.children]]\npool = \"{id}\"\nscript = \"{}\"\nworkers = {n}\n", worker("basic.py"));
    }
    s
}

/// Pool path → its workers' pids, from `pyvisor status --json`.
fn pools(v: &serde_json::Value) -> BTreeMap<String, Vec<u32>> {
    let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for node in v["children"].as_array().into_iter().flatten() {
        out.entry(node["path"].as_str().unwrap().to_string()).or_default();
    }
    for (path, w) in all_workers(v) {
        out.entry(path).or_default().extend(w["pid"].as_u64().map(|p| p as u32));
    }
    out
}

/// Polls status until `pred` holds of the pools (a guard, not a budget).
fn wait_pools(run: &mut Run, ctl: &str, what: &str, pred: impl Fn(&BTreeMap<String, Vec<u32>>) -> bool) -> BTreeMap<String, Vec<u32>> {
    let start = Instant::now();
    loop {
        let v = wait_ready(run, &["--control", ctl], &[]);
        let p = pools(&v);
        if pred(&p) {
            return p;
        }
        assert!(start.elapsed() < GUARD, "{what}: not within {GUARD:?}; last {p:?}\nrun:\n{}", run.output());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_output(run: &Run, what: &str, needle: &str) {
    let start = Instant::now();
    while !run.output().contains(needle) {
        assert!(start.elapsed() < GUARD, "{what}: no `{needle}` in the output:\n{}", run.output());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn notify_socket(dir: &Path) -> (Manager, PathBuf) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    (Manager::listen(sock), path)
}

#[test]
fn sighup_applies_the_edited_file_and_keeps_untouched_pools_and_rejects_a_broken_one() {
    let dir = scratch("main");
    let file = dir.join("tree.toml");
    std::fs::write(&file, tree_of(&[("a", 1), ("b", 1), ("c", 1)])).unwrap();
    let ctl = dir.join("ctl.sock");
    let ctl = ctl.to_str().unwrap();
    let (mut systemd, notify) = notify_socket(&dir);
    let mut run = Run::start(pyvisor().arg("run").arg(&file).args(["--control", ctl]).env("NOTIFY_SOCKET", &notify));
    let v = wait_ready(&mut run, &["--control", ctl], &[]);
    let run_id = v["run_id"].as_str().unwrap().to_string();
    let before = pools(&v);
    assert_eq!(before.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    systemd.wait_for("READY=1", GUARD, |l| l == "READY=1");

    // Add d, grow b, remove c.
    std::fs::write(&file, tree_of(&[("a", 1), ("b", 2), ("d", 1)])).unwrap();
    let ready_before = systemd.count_from(0, "READY=1");
    run.signal(libc::SIGHUP);
    let after = wait_pools(&mut run, ctl, "the edited tree", |p| {
        p.keys().map(String::as_str).eq(["a", "b", "d"]) && p["b"].len() == 2 && p["d"].len() == 1
    });
    assert_eq!(after["a"], before["a"], "the untouched pool kept its processes");
    assert!(after["b"].iter().all(|p| !before["b"].contains(p)), "b was replaced");
    for pid in before["b"].iter().chain(&before["c"]) {
        let start = Instant::now();
        while alive(*pid) {
            assert!(start.elapsed() < GUARD, "worker {pid} of a replaced or removed pool is still alive");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    wait_output(&run, "the reload's report", "reloaded: added d; replaced b; removed c; 1 kept");
    let reloading = systemd.wait_for("RELOADING=1", GUARD, |l| l == "RELOADING=1");
    let stamp = systemd.wait_for("MONOTONIC_USEC=", GUARD, |l| l.starts_with("MONOTONIC_USEC="));
    assert_eq!(stamp, reloading + 1, "RELOADING=1 comes with its time stamp: {:?}", systemd.lines);
    systemd.wait_count("READY=1 after the reload", reloading, "READY=1", 1, GUARD);
    assert_eq!(systemd.count_from(0, "READY=1"), ready_before + 1);

    // A file that does not parse: rejected, with the reason; nothing changes.
    std::fs::write(&file, "[supervisor\nstrategy = ").unwrap();
    run.signal(libc::SIGHUP);
    let rejected = "reload rejected, the running tree is kept:";
    wait_output(&run, "the rejection", rejected);
    let out = run.output();
    let line = out.lines().find(|l| l.contains(rejected)).unwrap();
    assert!(line.contains("tree.toml") && line.contains("line 1"), "{line}");
    // Also a file that parses but declares nonsense (a pool with two scripts).
    std::fs::write(&file, tree_of(&[("a", 1), ("b", 2), ("d", 1)]) + "module = \"x\"\n").unwrap();
    run.signal(libc::SIGHUP);
    let start = Instant::now();
    while run.output().matches(rejected).count() < 2 {
        assert!(start.elapsed() < GUARD, "the second rejection:\n{}", run.output());
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = wait_ready(&mut run, &["--control", ctl], &[]);
    assert_eq!(pools(&v), after, "a rejected file leaves the tree as it was");
    let out = status(&["--control", ctl, "--json"], &[]);
    assert!(out.status.success());

    run.signal(libc::SIGTERM);
    assert!(run.wait(GUARD).success(), "{}", run.output());
    assert_eq!(processes_of_run(&run_id), Vec::<u32>::new(), "processes of the run are left");
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGHUP while workers load is kept for later; SIGTERM then stops what started: `STOPPING=1`,
/// a clean exit, no process and no control socket left.
#[test]
fn signals_while_the_tree_is_starting_do_not_kill_the_run() {
    let dir = scratch("starting");
    let hold = dir.join("hold");
    std::fs::write(&hold, b"").unwrap();
    let file = dir.join("tree.toml");
    std::fs::write(
        &file,
        format!(
            "[supervisor]\nstrategy = \"one_for_one\"\n\n[[supervisor.children]]\npool = \"slow\"\nscript = \"{}\"\nworkers = 2\nenv = {{ PYVISOR_TEST_HOLD = \"{}\" }}\n",
            worker("slow_start.py"),
            hold.display()
        ),
    )
    .unwrap();
    let ctl = dir.join("ctl.sock");
    let (mut systemd, notify) = notify_socket(&dir);
    let mut run = Run::start(pyvisor().arg("run").arg(&file).args(["--control", ctl.to_str().unwrap()]).env("NOTIFY_SOCKET", &notify));

    // Starting: its workers exist and are held in their imports.
    let start = Instant::now();
    let run_id = loop {
        let out = status(&["--control", ctl.to_str().unwrap(), "--json"], &[]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let id = v["run_id"].as_str().unwrap().to_string();
            if v["phase"] == "starting" && processes_of_run(&id).len() >= 2 {
                break id;
            }
        }
        assert!(start.elapsed() < GUARD, "no held workers:\n{}", run.output());
        std::thread::sleep(Duration::from_millis(100));
    };
    run.signal(libc::SIGHUP);
    wait_output(&run, "SIGHUP while starting", "the tree is still starting");
    assert!(run.child.try_wait().unwrap().is_none(), "SIGHUP killed the run:\n{}", run.output());

    run.signal(libc::SIGTERM);
    let exit = run.wait(GUARD);
    assert!(exit.success(), "{exit}\n{}", run.output());
    assert!(run.output().contains("SIGTERM while the tree was starting"), "{}", run.output());
    systemd.wait_for("STOPPING=1", GUARD, |l| l == "STOPPING=1");
    let start = Instant::now();
    while !processes_of_run(&run_id).is_empty() {
        assert!(start.elapsed() < GUARD, "processes of the run are left: {:?}", processes_of_run(&run_id));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(std::fs::symlink_metadata(&ctl).is_err(), "the control socket outlived the run");
    let _ = std::fs::remove_dir_all(&dir);
}

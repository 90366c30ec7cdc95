//! `pyvisor status` from another process against a real `pyvisor run` with real Python
//! workers: the table and the JSON name every pool with its workers' pids (checked against
//! /proc), the socket is owner-only, a second run on the same path is refused, and SIGTERM
//! leaves neither the socket file nor a process behind.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::run::{all_workers, status, wait_ready, Run};
use common::{alive, processes_of_run, pyvisor, root};

/// A fresh directory for one test.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pyvisor-status-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn write_tree(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("tree.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn basic() -> String {
    root().join("tests/workers/basic.py").to_string_lossy().into_owned()
}

#[test]
fn status_prints_every_pool_with_its_workers_pids_and_the_socket_goes_with_the_run() {
    let dir = scratch("main");
    let tree = write_tree(
        &dir,
        &format!(
            r#"
[supervisor]
name = "svc"
strategy = "one_for_one"

[[supervisor.children]]
pool = "front"
script = "{basic}"
workers = 2

[[supervisor.children]]
supervisor = "inner"
strategy = "one_for_one"

  [[supervisor.children.children]]
  pool = "back"
  script = "{basic}"
  workers = 1
"#,
            basic = basic()
        ),
    );
    // pyvisor creates the directory of the socket.
    let sock = dir.join("ctl/c.sock");
    let sock_arg = sock.to_str().unwrap();
    let mut run = Run::start(pyvisor().arg("run").arg(&tree).args(["--control", sock_arg]));
    let v = wait_ready(&mut run, &["--control", sock_arg], &[]);

    // What the run says about itself.
    assert_eq!(v["version"], 1);
    assert_eq!(v["name"], "svc");
    assert_eq!(v["phase"], "running");
    assert_eq!(v["pid"], run.child.id());
    let run_id = v["run_id"].as_str().expect("run_id").to_string();
    assert!(run_id.starts_with(&format!("{}-", run.child.id())), "{run_id}");
    let workers = all_workers(&v);
    let by_path = |p: &str| workers.iter().filter(|(path, _)| path == p).map(|(_, w)| w["pid"].as_u64().unwrap() as u32).collect::<Vec<_>>();
    assert_eq!(by_path("front").len(), 2, "{v}");
    assert_eq!(by_path("inner/back").len(), 1, "{v}");
    let inner = v["children"].as_array().unwrap().iter().find(|n| n["path"] == "inner").expect("the nested supervisor");
    assert_eq!(inner["kind"], "supervisor");
    assert_eq!(inner["state"], "running");

    // The same pids as /proc: the children of `pyvisor run` that carry its run id.
    let reported: BTreeSet<u32> = workers.iter().map(|(_, w)| w["pid"].as_u64().unwrap() as u32).collect();
    let in_proc: BTreeSet<u32> = processes_of_run(&run_id).into_iter().filter(|&p| ppid(p) == Some(run.child.id())).collect();
    assert_eq!(reported, in_proc, "status vs /proc");

    // The table, from another process.
    let out = status(&["--control", sock_arg], &[]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{table}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("tree `svc`") && table.contains("running, ready"), "{table}");
    let header = table.lines().find(|l| l.starts_with("PATH")).unwrap_or_else(|| panic!("no header: {table}"));
    for col in ["KIND", "WORKER", "PID", "STATE", "SERVED", "RESTARTS"] {
        assert!(header.contains(col), "{header}");
    }
    for (path, pids) in [("front", by_path("front")), ("inner/back", by_path("inner/back"))] {
        for pid in pids {
            let row = table
                .lines()
                .find(|l| l.split_whitespace().nth(3) == Some(pid.to_string().as_str()))
                .unwrap_or_else(|| panic!("no row for pid {pid}:\n{table}"));
            let cols: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(&cols[..2], [path, "pool"], "{row}");
            assert_eq!(cols[4], "ready", "{row}");
        }
    }
    assert!(table.lines().any(|l| l.split_whitespace().take(2).eq(["inner", "supervisor"])), "{table}");

    // Owner-only: the socket 0600, the directory pyvisor made 0700.
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(&dir.join("ctl")), 0o700);

    // A second run on the same path is refused before it starts anything, and the first
    // goes on serving.
    let mut second = Run::start(pyvisor().arg("run").arg(&tree).args(["--control", sock_arg]));
    let refused = second.wait(Duration::from_secs(60));
    let said = second.output();
    assert_eq!(refused.code(), Some(2), "{said}");
    assert!(said.contains(&format!("another `pyvisor run` already serves status at {}", sock.display())) && said.contains("--control PATH"), "{said}");
    assert!(!said.contains("Ctrl-C stops it"), "the second run started its tree: {said}");
    let again = status(&["--control", sock_arg, "--json"], &[]);
    assert!(again.status.success(), "the first run stopped answering: {}", String::from_utf8_lossy(&again.stderr));
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["pid"], run.child.id());
    let still: BTreeSet<u32> = all_workers(&again).iter().map(|(_, w)| w["pid"].as_u64().unwrap() as u32).collect();
    assert_eq!(still, reported);

    // SIGTERM: the normal shutdown path removes the socket; no process is left.
    run.signal(libc::SIGTERM);
    let stopped = run.wait(Duration::from_secs(60));
    assert!(stopped.success(), "{}", run.output());
    assert!(!sock.exists() && std::fs::symlink_metadata(&sock).is_err(), "the socket file outlived the run");
    for pid in &reported {
        assert!(!alive(*pid), "worker {pid} outlived the run");
    }
    assert_eq!(processes_of_run(&run_id), Vec::<u32>::new(), "processes of the run are left");

    // No server there now: a clear message, non-zero.
    let out = status(&["--control", sock_arg], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no `pyvisor run` serves status at {} (no such socket)", sock.display())), "{err}");
    assert!(out.stdout.is_empty());
    // A socket file nobody listens on (a SIGKILLed run's): said so.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let out = status(&["--control", sock_arg], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the socket file is left from a run that was killed"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn status_finds_a_run_at_the_default_path() {
    let dir = scratch("default");
    let xdg = dir.join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
    let tree = write_tree(
        &dir,
        &format!("[supervisor]\nname = \"solo\"\nstrategy = \"one_for_one\"\n\n[[supervisor.children]]\npool = \"only\"\nscript = \"{}\"\nworkers = 1\n", basic()),
    );
    let env: [(&str, &Path); 1] = [("XDG_RUNTIME_DIR", &xdg)];
    let mut run = Run::start(pyvisor().arg("run").arg(&tree).env("XDG_RUNTIME_DIR", &xdg));
    // No name, no path: the only run in $XDG_RUNTIME_DIR/pyvisor.
    let v = wait_ready(&mut run, &[], &env);
    let sock = xdg.join("pyvisor/solo.sock");
    assert!(std::fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(&xdg.join("pyvisor")), 0o700);
    let pid = all_workers(&v)[0].1["pid"].as_u64().unwrap();
    // By name, as a table.
    let out = status(&["solo"], &env);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.lines().any(|l| l.starts_with("only ") && l.split_whitespace().nth(3) == Some(pid.to_string().as_str())), "{table}");
    assert!(table.contains(&sock.display().to_string()), "{table}");
    // A name nobody runs under: a clear message.
    let out = status(&["other"], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("other.sock (no such socket)"));

    run.signal(libc::SIGINT);
    assert!(run.wait(Duration::from_secs(60)).success(), "{}", run.output());
    assert!(std::fs::symlink_metadata(&sock).is_err(), "the socket file outlived the run");
    assert!(!alive(pid as u32));
    let out = status(&[], &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no `pyvisor run` has a control socket in"), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

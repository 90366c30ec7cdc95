//! Confinement: each option is in force inside a real worker, limit deaths are the worker's
//! own doing, and bad confinements are typed errors before any spawn.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pyvisor::{Backoff, CallError, ConfineError, Confinement, Jitter, Pool, PoolSpec, StartError};

type Limits = BTreeMap<String, [Option<u64>; 2]>;

fn spec() -> PoolSpec {
    common::spec("confined.py").workers(1)
}

async fn start(spec: PoolSpec) -> Pool {
    common::logs();
    Pool::start(spec).await.expect("the confined pool starts")
}

async fn limits(pool: &Pool) -> Limits {
    pool.call("limits", &()).await.expect("limits")
}

/// This process's own NoNewPrivs (a parent with it set passes it on to every child).
fn parent_no_new_privs() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("NoNewPrivs:") && l.trim_end().ends_with('1')))
        .unwrap_or(false)
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A fresh directory under the temp dir with `mode`.
fn temp_dir(name: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("pyvisor-confine-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the temp dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod the temp dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_confined_by_default() {
    let pool = start(spec()).await;
    let got = limits(&pool).await;
    for (name, r) in [("open_files", libc::RLIMIT_NOFILE), ("cpu_time", libc::RLIMIT_CPU), ("address_space", libc::RLIMIT_AS)] {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(unsafe { libc::getrlimit(r, &mut l) }, 0);
        let mine = [l.rlim_cur, l.rlim_max].map(|v| (v != libc::RLIM_INFINITY).then_some(v));
        assert_eq!(got[name], mine, "{name}: the worker has the parent's limits");
    }
    let nnp: u32 = pool.call("no_new_privs", &()).await.expect("no_new_privs");
    assert_eq!(nnp == 1, parent_no_new_privs());
    let ids: BTreeMap<String, serde_json::Value> = pool.call("ids", &()).await.expect("ids");
    assert_eq!(ids["uid"], serde_json::json!(unsafe { libc::getuid() }));
    let sig: i32 = pool.call("parent_death_signal", &()).await.expect("parent_death_signal");
    assert_eq!(sig, libc::SIGKILL);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_space_limit_is_in_force_and_an_allocation_past_it_is_a_memory_error() {
    const GIB: u64 = 1 << 30;
    let pool = start(spec().confine(Confinement::default().address_space(GIB))).await;
    assert_eq!(limits(&pool).await["address_space"], [Some(GIB), Some(GIB)]);
    // Past the limit malloc fails: Python raises MemoryError in the call, the worker lives.
    let pid_before: Vec<u32> = pool.status().await.workers.iter().filter_map(|w| w.pid).collect();
    match pool.call::<_, u64>("allocate", &2048).await {
        Err(CallError::Python { error, .. }) => assert_eq!(error.type_name, "MemoryError", "{error}"),
        other => panic!("expected a MemoryError, got {other:?}"),
    }
    let n: u64 = pool.call("allocate", &64).await.expect("64 MiB fits");
    assert_eq!(n, 64 << 20);
    let pid_after: Vec<u32> = pool.status().await.workers.iter().filter_map(|w| w.pid).collect();
    assert_eq!(pid_before, pid_after, "the worker survived the MemoryError");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_files_limit_is_in_force() {
    let pool = start(spec().confine(Confinement::default().open_files(64))).await;
    assert_eq!(limits(&pool).await["open_files"], [Some(64), Some(64)]);
    #[derive(serde::Deserialize, Debug)]
    struct Opened {
        opened: usize,
        error: Option<String>,
    }
    let r: Opened = pool.call("open_many", &200).await.expect("open_many");
    assert!(r.opened > 0 && r.opened < 64, "{r:?}");
    assert!(r.error.as_deref().is_some_and(|e| e.contains("Errno 24")), "{r:?}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_time_limit_is_in_force_with_the_hard_limit_one_second_above() {
    let pool = start(spec().confine(Confinement::default().cpu_time(600))).await;
    assert_eq!(limits(&pool).await["cpu_time"], [Some(600), Some(601)]);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_size_limit_is_in_force() {
    let pool = start(spec().confine(Confinement::default().core_size(1 << 20))).await;
    assert_eq!(limits(&pool).await["core_size"], [Some(1 << 20), Some(1 << 20)]);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_new_privs_is_set_in_the_worker() {
    let pool = start(spec().confine(Confinement::default().no_new_privs(true))).await;
    let nnp: u32 = pool.call("no_new_privs", &()).await.expect("no_new_privs");
    assert_eq!(nnp, 1);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_allow_list_passes_only_allowed_variables_and_pyvisors_own() {
    let parent: BTreeMap<String, String> = std::env::vars().collect();
    let pool = start(spec().env("SPEC_VAR", "from the spec").confine(Confinement::default().allow_env(["PATH"]))).await;
    let env: BTreeMap<String, String> = pool.call("environ", &()).await.expect("environ");
    assert_eq!(env.get("PATH"), parent.get("PATH"), "allowed");
    assert_eq!(env.get("SPEC_VAR").map(String::as_str), Some("from the spec"), "the spec's env always passes");
    assert_eq!(env.get("PYTHONUNBUFFERED").map(String::as_str), Some("1"));
    assert!(env.contains_key("PYVISOR_WORKER_ID") && env.contains_key("PYVISOR_RUN_ID"), "{env:?}");
    for k in env.keys() {
        let pyvisors = k.starts_with("PYVISOR_") || k.starts_with("OTEL_") || k.starts_with("MALLOC_");
        assert!(pyvisors || ["PATH", "SPEC_VAR", "PYTHONUNBUFFERED"].contains(&k.as_str()) || !parent.contains_key(k), "{k} leaked");
    }
    assert!(parent.keys().any(|k| k.starts_with("CARGO_")), "cargo sets CARGO_* for tests: the check above filtered something");
    assert!(!env.keys().any(|k| k.starts_with("CARGO_")), "{env:?}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_deny_list_removes_inherited_variables_but_never_pyvisors_own() {
    let parent: BTreeMap<String, String> = std::env::vars().collect();
    let denied = Confinement::default().deny_env(["CARGO_*", "PYVISOR_*", "SPEC_VAR"]);
    let pool = start(spec().env("SPEC_VAR", "kept").confine(denied)).await;
    let env: BTreeMap<String, String> = pool.call("environ", &()).await.expect("environ");
    assert!(parent.keys().any(|k| k.starts_with("CARGO_")));
    assert!(!env.keys().any(|k| k.starts_with("CARGO_")), "{env:?}");
    assert_eq!(env.get("PATH"), parent.get("PATH"), "not denied: inherited");
    assert_eq!(env.get("SPEC_VAR").map(String::as_str), Some("kept"));
    assert!(env.contains_key("PYVISOR_WORKER_ID"));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_working_directory_is_in_force_and_an_unusable_one_is_a_typed_error() {
    let dir = temp_dir("cwd", 0o755);
    let pool = start(spec().cwd(&dir)).await;
    let got: String = pool.call("cwd", &()).await.expect("cwd");
    assert_eq!(Path::new(&got).canonicalize().ok(), dir.canonicalize().ok());
    pool.shutdown().await;

    let missing = dir.join("missing");
    match Pool::start(spec().cwd(&missing)).await {
        Err(e @ StartError::WorkingDirectory { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("missing") && msg.contains("does not exist") && msg.contains("PoolSpec::cwd"), "{msg}");
        }
        other => panic!("expected WorkingDirectory, got {:?}", other.map(|_| ())),
    }
    let file = dir.join("a-file");
    std::fs::write(&file, "").expect("write");
    match Pool::start(spec().cwd(&file)).await {
        Err(e @ StartError::WorkingDirectory { .. }) => assert!(e.to_string().contains("is not a directory"), "{e}"),
        other => panic!("expected WorkingDirectory, got {:?}", other.map(|_| ())),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGXCPU mid-call is the worker's own doing: the call fails as a crash that implicates it
/// (an idempotent call is retried alone and becomes a poison request; an external kill would
/// have been retried as an innocent), and the certificate names the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_limit_kill_mid_call_implicates_the_call() {
    let pool = start(
        spec()
            .confine(Confinement::default().cpu_time(1))
            .call_timeout(Some(Duration::from_secs(120)))
            .heartbeat_max_missed(100)
            .max_retries(2)
            .poison_threshold(2),
    )
    .await;
    match pool.call::<_, ()>("burn", &()).await {
        Err(e @ CallError::WorkerCrashed { .. }) => {
            let CallError::WorkerCrashed { certificate, attempts, .. } = &e else { unreachable!() };
            assert_eq!(certificate.signal, Some(libc::SIGXCPU), "{certificate}");
            assert_eq!(*attempts, 1, "not idempotent: no retry");
            assert!(certificate.implicates_calls() && !certificate.is_external_kill());
            assert!(e.to_string().contains("CPU time limit (RLIMIT_CPU)"), "{e}");
        }
        other => panic!("expected WorkerCrashed, got {other:?}"),
    }
    match pool.call::<_, ()>("burn_idempotent", &()).await {
        Err(CallError::PoisonRequest { certificates, refused, .. }) => {
            assert!(!refused);
            assert_eq!(certificates.len(), 2, "two implicating crashes alone: poison");
            assert!(certificates.iter().all(|c| c.signal == Some(libc::SIGXCPU)), "{certificates:?}");
        }
        other => panic!("expected PoisonRequest, got {other:?}"),
    }
    // The pool still serves calls (each replacement has a fresh CPU budget).
    let v: u32 = pool.call("echo", &5).await.expect("echo after the crashes");
    assert_eq!(v, 5);
    pool.shutdown().await;
}

/// SIGXCPU before `hello` is a start failure: a worker burning CPU at import fails the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_limit_kill_before_hello_is_a_start_failure() {
    let spec = spec()
        .env("CONFINED_BURN_AT_IMPORT", "1")
        .confine(Confinement::default().cpu_time(1))
        .start_backoff(Backoff::default().base(Duration::from_millis(10)).jitter(Jitter::None))
        .max_start_failures(1, Duration::from_secs(120));
    match Pool::start(spec).await {
        Err(e @ StartError::TooManyStartFailures { .. }) => {
            let StartError::TooManyStartFailures { failures, certificate, .. } = &e else { unreachable!() };
            assert_eq!(*failures, 2);
            assert_eq!(certificate.signal, Some(libc::SIGXCPU), "{certificate}");
            assert!(!certificate.became_ready);
            let msg = e.to_string();
            assert!(msg.contains("start failures") && msg.contains("RLIMIT_CPU"), "{msg}");
        }
        other => panic!("expected TooManyStartFailures, got {:?}", other.map(|_| ())),
    }
}

/// The interpreter to run as another user: `PYVISOR_PYTHON_OTHER_USER` if set, else the test
/// interpreter — if `uid` can run it and import the adapter (a venv under a 0700 home cannot).
fn interpreter_usable_by(uid: u32, gid: u32) -> Result<PathBuf, String> {
    use std::os::unix::process::CommandExt;
    let mut candidates: Vec<PathBuf> = std::env::var_os("PYVISOR_PYTHON_OTHER_USER").map(PathBuf::from).into_iter().collect();
    candidates.push(common::python());
    let mut reasons = Vec::new();
    for python in candidates {
        let out = std::process::Command::new(&python)
            .args(["-c", "import pyvisor_worker"])
            .uid(uid)
            .gid(gid)
            .current_dir("/")
            .output();
        match out {
            Ok(o) if o.status.success() => return Ok(python),
            Ok(o) => reasons.push(format!("{}: {}", python.display(), String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => reasons.push(format!("{}: {e}", python.display())),
        }
    }
    Err(reasons.join("; "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_parent_runs_workers_as_another_user_and_group() {
    if !is_root() {
        // A non-root parent gets a typed error before any spawn.
        match Pool::start(spec().confine(Confinement::default().user("nobody"))).await {
            Err(StartError::Confinement(ConfineError::NeedsRoot { field: "user", .. })) => {}
            other => panic!("expected NeedsRoot, got {:?}", other.map(|_| ())),
        }
        println!("skipped running as nobody: this test process is not root");
        return;
    }
    const NOBODY: u32 = 65534;
    // The script and the working directory must be reachable by nobody: a 0755 temp dir.
    let dir = temp_dir("user", 0o755);
    let script = dir.join("confined.py");
    std::fs::copy(common::worker("confined.py"), &script).expect("copy the script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let python = match interpreter_usable_by(NOBODY, NOBODY) {
        Ok(p) => p,
        Err(why) => {
            // pyvisor must refuse it too, before or at the spawn (here: the mode-bit check
            // names the directory nobody cannot enter), never start a pool that cannot work.
            let spec = PoolSpec::script(&script).python(common::python()).workers(1).cwd(&dir).max_start_failures(0, Duration::from_secs(60));
            let refused = Pool::start(spec.confine(Confinement::default().user(NOBODY))).await;
            assert!(refused.is_err(), "a worker nobody cannot run was started");
            if let Err(e) = refused {
                println!("pyvisor refused the interpreter as expected: {e}");
            }
            println!("skipped running as nobody: no interpreter it can use ({why}); set PYVISOR_PYTHON_OTHER_USER");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    };
    let confine = Confinement::default().user("nobody").group(NOBODY).no_new_privs(true);
    let spec = PoolSpec::script(&script).python(&python).name("nobody").workers(1).cwd(&dir).confine(confine);
    let pool = start(spec).await;
    let ids: BTreeMap<String, serde_json::Value> = pool.call("ids", &()).await.expect("ids");
    for k in ["uid", "euid", "gid", "egid"] {
        assert_eq!(ids[k], serde_json::json!(NOBODY), "{k}: {ids:?}");
    }
    assert_eq!(ids["groups"], serde_json::json!([NOBODY]), "supplementary groups dropped");
    // The parent-death signal survives the change of user (the kernel clears it when
    // credentials change, so it must be set after the switch).
    let sig: i32 = pool.call("parent_death_signal", &()).await.expect("parent_death_signal");
    assert_eq!(sig, libc::SIGKILL);
    let nnp: u32 = pool.call("no_new_privs", &()).await.expect("no_new_privs");
    assert_eq!(nnp, 1);
    pool.shutdown().await;

    // A script the user cannot read is refused before any spawn, naming the blocker.
    let closed = temp_dir("user-closed", 0o700);
    let hidden = closed.join("confined.py");
    std::fs::copy(common::worker("confined.py"), &hidden).expect("copy");
    let spec = PoolSpec::script(&hidden).python(&python).workers(1).cwd(&dir).confine(Confinement::default().user(NOBODY));
    match Pool::start(spec).await {
        Err(e @ StartError::Confinement(ConfineError::NotAccessible { .. })) => {
            let msg = e.to_string();
            assert!(msg.contains("read the script") && msg.contains(closed.to_str().unwrap_or("?")), "{msg}");
        }
        other => panic!("expected NotAccessible, got {:?}", other.map(|_| ())),
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_confinements_are_typed_errors_naming_the_field() {
    let cases: Vec<(&str, Confinement)> = vec![
        ("confine.user", Confinement::default().user("no-such-user-pyvisor-test")),
        ("confine.cpu_time", Confinement::default().cpu_time(0)),
        ("allow_env and deny_env", Confinement::default().allow_env(["A"]).deny_env(["B"])),
    ];
    for (field, c) in cases {
        match Pool::start(spec().confine(c)).await {
            Err(e @ StartError::Confinement(_)) => assert!(e.to_string().contains(field), "{field}: {e}"),
            other => panic!("{field}: expected a confinement error, got {:?}", other.map(|_| ())),
        }
    }
}

/// An address space too small for the interpreter's own start (16 MiB: "Fatal Python error:
/// _PyRuntimeState_Init: memory allocation failed"): the worker exits 1 before `hello`, a start
/// failure whose certificate carries the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_space_too_small_to_start_is_a_start_failure_with_the_error() {
    let spec = spec().confine(Confinement::default().address_space(16 << 20)).max_start_failures(0, Duration::from_secs(60));
    match Pool::start(spec).await {
        Err(StartError::TooManyStartFailures { certificate, .. }) => {
            let tail = certificate.stderr_tail.join("\n");
            assert_eq!(certificate.exit_code, Some(1), "{certificate}");
            let seen = ["MemoryError", "memory allocation failed", "can't start new thread"];
            assert!(seen.iter().any(|s| tail.contains(s)), "{tail}");
        }
        other => panic!("expected TooManyStartFailures, got {:?}", other.map(|_| ())),
    }
}

//! The markers a run leaves in its processes' environments, and what they are used for.
//!
//! Every worker gets `PYVISOR_PROGRAM` (this program), `PYVISOR_RUN_ID` (this run) and
//! `PYVISOR_FAMILY` (this one worker), and passes them on to whatever it starts — also to
//! processes that leave its process group with `setsid()`. Owns:
//! - [`run_id`], [`program_id`] and the family tokens;
//! - [`reap_orphans`]: the start-up sweep of processes left by earlier, dead runs;
//! - the exit hook: when the program exits (`main` returns, `std::process::exit`), every
//!   process still carrying this run's marker is killed;
//! - the child-subreaper setting ([`set_child_subreaper`]): orphans of the workers' processes
//!   are re-parented to this program instead of to init, so they stay in its process tree.
//!
//! Every kill here goes through a pidfd opened *before* the marker is checked (again), so a
//! process that exited and whose number was reused is never hit. What a marker cannot catch: a
//! process that deliberately exec's with a cleaned environment after leaving its worker's
//! process group (docs/security.md).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Once, OnceLock};

use super::pidfd::Pidfd;
use super::procfs;

/// The environment variable that names the run.
pub(crate) const RUN_VAR: &str = "PYVISOR_RUN_ID";
/// The environment variable that names the program.
pub(crate) const PROGRAM_VAR: &str = "PYVISOR_PROGRAM";
/// The environment variable that names one worker's family (the worker and all it starts).
pub(crate) const FAMILY_VAR: &str = "PYVISOR_FAMILY";

/// The identity of this run, passed to every worker (`PYVISOR_RUN_ID`) as an orphan marker:
/// `PID-STARTTIME-NONCE`, where STARTTIME is the parent's start time in clock ticks after
/// boot (so a recycled pid is not mistaken for the same run).
///
/// ```
/// let id = pyvisor_core::run_id();
/// assert!(id.starts_with(&format!("{}-", std::process::id())));
/// assert_eq!(id, pyvisor_core::run_id(), "one id per run");
/// ```
pub fn run_id() -> &'static str {
    static RUN_ID: OnceLock<String> = OnceLock::new();
    RUN_ID.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let pid = std::process::id();
        format!("{pid}-{}-{:x}", procfs::stat(pid).map_or(0, |s| s.start_time), now)
    })
}

/// The identity of this program for orphan clean-up (`PYVISOR_PROGRAM`): `PYVISOR_PROGRAM_ID`
/// if set (to tell apart deployments of one binary), else the executable's path.
///
/// ```
/// assert!(!pyvisor_core::program_id().is_empty());
/// ```
pub fn program_id() -> &'static str {
    static PROGRAM: OnceLock<String> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        std::env::var("PYVISOR_PROGRAM_ID").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
            std::env::current_exe()
                .and_then(|p| p.canonicalize())
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown".into())
        })
    })
}

/// A new family token: this run's id and a sequence number.
pub(crate) fn new_family() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{}/{}", run_id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Whether the run `run_id` (`PID-STARTTIME-NONCE`) is still alive.
fn run_alive(run_id: &str) -> bool {
    let mut parts = run_id.split('-');
    let (Some(pid), Some(start)) = (parts.next().and_then(|p| p.parse::<u32>().ok()), parts.next().and_then(|s| s.parse::<u64>().ok()))
    else {
        return false;
    };
    procfs::stat(pid).map(|s| s.start_time) == Some(start)
}

/// Kill every process (not this one) whose environment satisfies `wanted`, through a pidfd
/// opened before the environment is read again. Returns the pidfds of the processes killed
/// (the caller may wait for and reap them). Blocking: reads `/proc`.
pub(crate) fn kill_marked(wanted: impl Fn(&[u8]) -> bool) -> Vec<Pidfd> {
    kill_marked_among(procfs::pids(), wanted)
}

/// [`kill_marked`] among `candidates` only.
pub(crate) fn kill_marked_among(candidates: impl IntoIterator<Item = u32>, wanted: impl Fn(&[u8]) -> bool) -> Vec<Pidfd> {
    let me = std::process::id();
    let mut killed = Vec::new();
    for pid in candidates {
        if pid == me {
            continue;
        }
        // A cheap first look, then pin the process and look again: the number may have been
        // reused between the two reads, never after the pidfd is open.
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if !wanted(&env) {
            continue;
        }
        let Ok(fd) = Pidfd::open(pid) else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if !wanted(&env) {
            continue;
        }
        if matches!(fd.signal(libc::SIGKILL), Ok(true)) {
            killed.push(fd);
        }
    }
    killed
}

/// Find processes left by earlier, dead runs of this program (their environment carries our
/// `PYVISOR_PROGRAM` and a `PYVISOR_RUN_ID` whose parent is gone) and SIGKILL them. Matches the
/// markers only, never names. Returns the pids killed. Blocking: reads every process's
/// environment; [`crate::Pool::start`] runs it once per program, off the async threads.
pub fn reap_orphans() -> Vec<u32> {
    let program = program_id();
    let ours = run_id();
    let killed = kill_marked(|env| {
        procfs::env_value(env, PROGRAM_VAR).as_deref() == Some(program.as_bytes())
            && procfs::env_value(env, RUN_VAR).is_some_and(|run| {
                let run = String::from_utf8_lossy(&run);
                run != ours && !run_alive(&run)
            })
    });
    for fd in &killed {
        tracing::warn!(pid = fd.pid(), "killed a process left by an earlier run of this program");
    }
    killed.iter().map(Pidfd::pid).collect()
}

/// Kill every process carrying this run's marker. Returns how many were killed.
pub(crate) fn kill_run() -> usize {
    let ours = run_id();
    kill_marked(|env| procfs::env_value(env, RUN_VAR).as_deref() == Some(ours.as_bytes())).len()
}

static SUBREAPER: AtomicBool = AtomicBool::new(true);
/// This program did become a child subreaper.
static SUBREAPER_ON: AtomicBool = AtomicBool::new(false);

/// Whether this program is a child subreaper (set by pyvisor): every process a worker leaves
/// behind is then in this program's process tree.
pub(crate) fn subreaper_on() -> bool {
    SUBREAPER_ON.load(Ordering::SeqCst)
}

/// Whether pyvisor makes this program a child subreaper (`PR_SET_CHILD_SUBREAPER`) when its
/// first worker starts. On by default (unless the environment says `PYVISOR_SUBREAPER=0`):
/// processes that a worker's processes leave behind are then re-parented to this program, and
/// pyvisor reaps the ones it identified — by pid, never with `waitpid(-1)`, so the exit status
/// of the program's own children is never taken. The setting is process-wide: an embedding
/// program that reaps its orphans itself, or runs another subreaper scheme, turns it off here,
/// before its first pool starts. Either way, a worker's escapees are killed when the worker
/// ends, and at program exit.
///
/// ```
/// pyvisor_core::set_child_subreaper(false); // before the first Pool::start
/// ```
pub fn set_child_subreaper(enabled: bool) {
    SUBREAPER.store(enabled, Ordering::SeqCst);
}

/// Once per program, before the first worker is spawned: the exit hook, and the subreaper
/// unless it was turned off.
pub(crate) fn prepare_program() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a plain `extern "C"` function.
        if unsafe { libc::atexit(at_exit) } != 0 {
            tracing::warn!("cannot register pyvisor's exit hook: escaped processes may outlive the program");
        }
        let off = std::env::var("PYVISOR_SUBREAPER").is_ok_and(|v| v == "0");
        if SUBREAPER.load(Ordering::SeqCst) && !off {
            // SAFETY: plain prctl.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == 0 {
                SUBREAPER_ON.store(true, Ordering::SeqCst);
            } else {
                tracing::warn!("cannot become a child subreaper: {}", std::io::Error::last_os_error());
            }
        }
    });
}

/// The exit hook: whatever still carries this run's marker goes. Never unwinds into C.
extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(kill_run);
}

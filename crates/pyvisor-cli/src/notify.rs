//! systemd's service notification protocol (`sd_notify`) for `pyvisor run`.
//!
//! This module owns the protocol and its timing: reading `NOTIFY_SOCKET`, `WATCHDOG_USEC` and
//! `WATCHDOG_PID` once at start-up (and taking them out of the environment, so that workers do
//! not inherit them), sending datagrams to the socket (a path, or an abstract name `@...`), and
//! deciding what to send when:
//!
//! - `STATUS=` lines: `starting`, then the tree's readiness (`TreeStatus::summary`)
//!   whenever it changes, `the tree failed: ...`, `stopping ...`;
//! - `READY=1` once, the first time a walk of the started tree finds it ready (every supervisor
//!   running, every pool at `min_ready` ready workers; the tree's start already waited for every
//!   worker's `hello`);
//! - `WATCHDOG=1` after every walk the root supervisor answered, at least every half of
//!   `WATCHDOG_USEC` (when `WATCHDOG_PID` is unset or ours): a supervisor that is wedged, busy
//!   longer than that, stopped or failed answers no walk, and the pings stop; once the tree has
//!   failed, none is sent again;
//! - `RELOADING=1` with `MONOTONIC_USEC=` when a reload (SIGHUP) begins, then `READY=1` and the
//!   outcome as `STATUS=` when it has been applied or rejected (what `Type=notify-reload` waits
//!   for; harmless under `Type=notify`); no `READY=1` before the tree was first ready;
//! - `STOPPING=1` when `run` starts to stop the tree, then `EXTEND_TIMEOUT_USEC=` every second
//!   while it drains, for at most the tree's shutdown budget (the sum of its shutdown timeouts)
//!   plus a margin: a shutdown that overruns its own timeouts is left to `TimeoutStopSec`.
//!
//! When the tree starts, fails and stops is `run`'s business: it calls the hooks here. Without
//! `NOTIFY_SOCKET` every hook does nothing. A send that fails is logged once and not retried.

use std::ffi::OsString;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use pyvisor_core::supervisor::Tree;
use tokio::task::JoinHandle;


/// How often the tree is walked when no watchdog asks for more.
const WALK_EVERY: Duration = Duration::from_secs(1);
/// While draining: how often `EXTEND_TIMEOUT_USEC` is sent, and the window each one asks for.
const EXTEND_EVERY: Duration = Duration::from_secs(1);
const EXTEND_WINDOW: Duration = Duration::from_secs(3);
/// Added to the shutdown budget for the kills after the timeouts and the exit itself.
const STOP_MARGIN: Duration = Duration::from_secs(5);
/// A send blocks at most this long (a receiver that does not read).
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A notification set-up that cannot be used.
#[derive(Debug)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is neither an absolute path nor `@` and an abstract name.
    Socket(String),
    /// `WATCHDOG_USEC` or `WATCHDOG_PID` is not a positive integer.
    Watchdog(String),
    /// The socket could not be created or addressed.
    Io(std::io::Error),
}

impl std::fmt::Display for NotifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotifyError::Socket(v) => write!(f, "NOTIFY_SOCKET={v:?} is neither an absolute path nor @name"),
            NotifyError::Watchdog(why) => f.write_str(why),
            NotifyError::Io(e) => write!(f, "cannot use NOTIFY_SOCKET: {e}"),
        }
    }
}

impl std::error::Error for NotifyError {}

/// The variables systemd sets, as found at start-up.
#[derive(Debug, Default)]
struct Env {
    socket: Option<OsString>,
    watchdog_usec: Option<OsString>,
    watchdog_pid: Option<OsString>,
}

static CAPTURED: OnceLock<Mutex<Option<Env>>> = OnceLock::new();

/// Read systemd's variables and remove them from the environment, as `sd_notify(1, ...)` does,
/// so that the workers (which inherit it) do not see them. Call it while the program has one
/// thread (before the runtime starts): changing the environment races with threads reading it.
pub fn capture_env() {
    let env = Env {
        socket: std::env::var_os("NOTIFY_SOCKET"),
        watchdog_usec: std::env::var_os("WATCHDOG_USEC"),
        watchdog_pid: std::env::var_os("WATCHDOG_PID"),
    };
    for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        std::env::remove_var(var);
    }
    let _ = CAPTURED.set(Mutex::new(Some(env)));
}

/// The socket address `NOTIFY_SOCKET` names.
fn address(value: &OsString) -> Result<SocketAddr, NotifyError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'@') if bytes.len() > 1 => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..]).map_err(NotifyError::Io)
        }
        Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(value)).map_err(NotifyError::Io),
        _ => Err(NotifyError::Socket(value.to_string_lossy().into_owned())),
    }
}

/// The watchdog interval systemd expects from process `me`: `WATCHDOG_USEC`, unless
/// `WATCHDOG_PID` names another process (then the watchdog is not ours: `None`).
fn watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec else { return Ok(None) };
    let usec: u64 = usec
        .trim()
        .parse()
        .ok()
        .filter(|u| *u > 0)
        .ok_or_else(|| NotifyError::Watchdog(format!("WATCHDOG_USEC={usec:?} is not a positive number of microseconds")))?;
    if let Some(pid) = pid {
        let pid: u32 =
            pid.trim().parse().map_err(|_| NotifyError::Watchdog(format!("WATCHDOG_PID={pid:?} is not a process id")))?;
        if pid != me {
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(usec)))
}

/// What was sent so far; sends happen under its lock, so that a flag set before a message
/// holds for every message after it.
#[derive(Debug, Default)]
struct State {
    ready_sent: bool,
    /// The tree failed: no `WATCHDOG=1`, no readiness `STATUS=` any more.
    failed: bool,
    stopping: bool,
    last_status: String,
    send_failed: bool,
}

struct Inner {
    socket: UnixDatagram,
    address: SocketAddr,
    watchdog: Option<Duration>,
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Send one datagram (lines joined by `\n`); called with the state locked.
    fn send(&self, st: &mut State, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        let msg = lines.join("\n");
        if let Err(e) = self.socket.send_to_addr(msg.as_bytes(), &self.address) {
            if !std::mem::replace(&mut st.send_failed, true) {
                tracing::warn!(error = %e, "cannot send to NOTIFY_SOCKET (further failures are not logged)");
            }
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds (what `MONOTONIC_USEC=` carries).
fn monotonic_usec() -> u128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32).as_micros()
}

/// Longest `STATUS=` value sent, in characters: `systemctl status` shows one line.
const STATUS_MAX: usize = 200;

/// `STATUS=` with the first line of `s` (the protocol's lines end at `\n`; a failure's reason
/// continues with the stderr tail, which the journal has), cut to [`STATUS_MAX`] characters.
fn status_line(s: &str) -> String {
    let first = s.lines().next().unwrap_or("");
    let first = first.split(" --- ").next().unwrap_or(first).trim_end();
    match first.char_indices().nth(STATUS_MAX) {
        Some((cut, _)) => format!("STATUS={}...", &first[..cut]),
        None => format!("STATUS={first}"),
    }
}

/// The service manager's end of `pyvisor run`. Cheap to clone; does nothing without
/// `NOTIFY_SOCKET`.
#[derive(Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

impl Notifier {
    /// From the variables [`capture_env`] took (or, if it was not called, the environment as
    /// it is). A variable that cannot be used is reported on stderr and notification is off.
    pub fn from_captured_env() -> Notifier {
        let env = match CAPTURED.get() {
            Some(m) => m.lock().ok().and_then(|mut e| e.take()).unwrap_or_default(),
            None => Env {
                socket: std::env::var_os("NOTIFY_SOCKET"),
                watchdog_usec: std::env::var_os("WATCHDOG_USEC"),
                watchdog_pid: std::env::var_os("WATCHDOG_PID"),
            },
        };
        match Self::from_env(env) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("warning: systemd notification is off: {e}");
                Notifier::default()
            }
        }
    }

    fn from_env(env: Env) -> Result<Notifier, NotifyError> {
        let Some(socket) = env.socket.filter(|s| !s.is_empty()) else { return Ok(Notifier::default()) };
        let address = address(&socket)?;
        let text = |v: Option<OsString>| v.map(|v| v.to_string_lossy().into_owned());
        let (usec, pid) = (text(env.watchdog_usec), text(env.watchdog_pid));
        let watchdog = watchdog(usec.as_deref(), pid.as_deref(), std::process::id())?;
        let sock = UnixDatagram::unbound().map_err(NotifyError::Io)?;
        sock.set_write_timeout(Some(SEND_TIMEOUT)).map_err(NotifyError::Io)?;
        Ok(Notifier { inner: Some(Arc::new(Inner { socket: sock, address, watchdog, state: Mutex::default() })) })
    }

    /// Send `STATUS=` (e.g. `starting`, or why the tree did not start).
    pub fn status(&self, s: &str) {
        if let Some(i) = &self.inner {
            let mut st = i.lock();
            st.last_status = s.to_string();
            i.send(&mut st, &[status_line(s)]);
        }
    }

    /// Watch the started tree: `READY=1` once it is ready, `STATUS=` when its readiness
    /// changes, `WATCHDOG=1` while its root supervisor answers. Stops when the handle drops.
    pub fn watch(&self, tree: Tree) -> Watch {
        let Some(inner) = self.inner.clone() else { return Watch(None) };
        let every = inner.watchdog.map_or(WALK_EVERY, |w| (w / 2).min(WALK_EVERY));
        let task = tokio::spawn(monitor(inner, every, move || {
            let tree = tree.clone();
            async move { tree.status().await.ok().map(|s| Judged { ready: s.readiness().is_ok(), summary: s.summary() }) }
        }));
        Watch(Some(task))
    }

    /// A reload begins: `RELOADING=1`, stamped with the monotonic clock as systemd asks.
    pub fn reloading(&self) {
        if let Some(i) = &self.inner {
            let mut st = i.lock();
            let lines = ["RELOADING=1".to_string(), format!("MONOTONIC_USEC={}", monotonic_usec()), status_line("reloading the tree file")];
            i.send(&mut st, &lines);
        }
    }

    /// A reload ended (`outcome`: what changed, or why the file was rejected): `READY=1` again
    /// (if the tree was ready before) and the outcome as `STATUS=` until readiness changes.
    pub fn reloaded(&self, outcome: &str) {
        if let Some(i) = &self.inner {
            let mut st = i.lock();
            let mut lines = Vec::new();
            if st.ready_sent {
                lines.push("READY=1".to_string());
            }
            lines.push(status_line(outcome));
            st.last_status = outcome.to_string();
            i.send(&mut st, &lines);
        }
    }

    /// The tree failed (`reason`): no more pings, and the reason as `STATUS=`.
    pub fn tree_failed(&self, reason: &str) {
        if let Some(i) = &self.inner {
            let mut st = i.lock();
            st.failed = true;
            i.send(&mut st, &[status_line(reason)]);
        }
    }

    /// `run` is stopping the tree: `STOPPING=1`, then `EXTEND_TIMEOUT_USEC=` while the
    /// returned guard lives, for at most `budget` (the tree's shutdown timeouts) plus a margin.
    pub fn stopping(&self, budget: Duration) -> Watch {
        let Some(inner) = self.inner.clone() else { return Watch(None) };
        {
            let mut st = inner.lock();
            st.stopping = true;
            let secs = (budget + STOP_MARGIN).as_secs();
            inner.send(&mut st, &["STOPPING=1".into(), status_line(&format!("stopping: draining the tree (at most {secs} s)"))]);
        }
        let until = tokio::time::Instant::now() + budget + STOP_MARGIN;
        Watch(Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(EXTEND_EVERY);
            loop {
                tick.tick().await;
                if tokio::time::Instant::now() >= until {
                    break;
                }
                let mut st = inner.lock();
                inner.send(&mut st, &[format!("EXTEND_TIMEOUT_USEC={}", EXTEND_WINDOW.as_micros())]);
            }
        })))
    }
}

/// One walk of the tree, judged by the core (`TreeStatus::readiness` and `summary`).
#[derive(Debug, Clone, Default)]
struct Judged {
    ready: bool,
    summary: String,
}

/// A task of the notifier's; aborted when dropped.
pub struct Watch(Option<JoinHandle<()>>);

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

/// Every `every`: walk the tree (`probe`, `None` when the root did not answer), at most
/// `every` long; report readiness and ping the watchdog after every answered walk.
async fn monitor<F, Fut>(inner: Arc<Inner>, every: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Judged>>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let walk = tokio::time::timeout(every, probe()).await.ok().flatten();
        let mut st = inner.lock();
        if st.failed || st.stopping {
            return;
        }
        let Some(r) = walk else { continue };
        let mut lines = Vec::new();
        if r.ready && !st.ready_sent {
            st.ready_sent = true;
            lines.push("READY=1".to_string());
        }
        if r.summary != st.last_status {
            lines.push(status_line(&r.summary));
            st.last_status = r.summary;
        }
        if inner.watchdog.is_some() {
            lines.push("WATCHDOG=1".into());
        }
        inner.send(&mut st, &lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_one_short_line() {
        assert_eq!(status_line("ready: 1/1 pools"), "STATUS=ready: 1/1 pools");
        assert_eq!(status_line("the tree failed: x\nTraceback ..."), "STATUS=the tree failed: x");
        assert_eq!(status_line("failed: worker died --- last stderr lines --- boom"), "STATUS=failed: worker died");
        let long = "é".repeat(300);
        assert_eq!(status_line(&long), format!("STATUS={}...", "é".repeat(STATUS_MAX)));
    }

    #[test]
    fn the_watchdog_is_ours_unless_another_pid_is_named() {
        assert_eq!(watchdog(None, None, 7).unwrap(), None);
        assert_eq!(watchdog(Some("2000000"), None, 7).unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(watchdog(Some("2000000"), Some("7"), 7).unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(watchdog(Some("2000000"), Some("8"), 7).unwrap(), None);
        assert!(watchdog(Some("0"), None, 7).is_err());
        assert!(watchdog(Some("soon"), None, 7).is_err());
        assert!(watchdog(Some("1000"), Some("me"), 7).is_err());
    }

    #[test]
    fn socket_addresses_are_paths_or_abstract_names() {
        assert_eq!(address(&"/run/systemd/notify".into()).unwrap().as_pathname(), Some(std::path::Path::new("/run/systemd/notify")));
        use std::os::linux::net::SocketAddrExt;
        assert_eq!(address(&"@pyvisor/notify".into()).unwrap().as_abstract_name(), Some(&b"pyvisor/notify"[..]));
        for bad in ["relative/path", "@", ""] {
            assert!(matches!(address(&bad.into()), Err(NotifyError::Socket(_))), "{bad}");
        }
    }

    /// A notifier sending to a socket of the test's, with an abstract name.
    fn pair(watchdog: Option<Duration>) -> (Arc<Inner>, UnixDatagram) {
        let name = format!("@pyvisor-notify-unit-{}-{:?}", std::process::id(), std::thread::current().id());
        let addr = address(&name.clone().into()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let n = Notifier::from_env(Env { socket: Some(name.into()), watchdog_usec: watchdog.map(|w| w.as_micros().to_string().into()), watchdog_pid: None })
            .unwrap();
        (n.inner.unwrap(), rx)
    }

    fn drain(rx: &UnixDatagram) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let mut out = Vec::new();
        while let Ok(n) = rx.recv(&mut buf) {
            out.extend(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string));
        }
        out
    }

    /// Pings follow the answers: none while the probe hangs (a wedged root), none after
    /// `tree_failed` even though the probe answers again.
    #[tokio::test(start_paused = true)]
    async fn pings_stop_while_the_root_does_not_answer_and_after_a_failure() {
        let (inner, rx) = pair(Some(Duration::from_millis(200)));
        let answering = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let a = Arc::clone(&answering);
        let task = tokio::spawn(monitor(Arc::clone(&inner), Duration::from_millis(100), move || {
            let a = Arc::clone(&a);
            async move {
                if a.load(std::sync::atomic::Ordering::SeqCst) {
                    Some(Judged { ready: true, summary: "ready".into() })
                } else {
                    std::future::pending().await
                }
            }
        }));
        tokio::time::sleep(Duration::from_millis(350)).await;
        let first = drain(&rx);
        assert_eq!(first.iter().filter(|l| *l == "READY=1").count(), 1, "{first:?}");
        assert!(first.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3, "{first:?}");

        answering.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        drain(&rx); // a walk may have answered just before
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(drain(&rx), Vec::<String>::new(), "no ping while the root does not answer");

        answering.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = drain(&rx);
        assert!(again.contains(&"WATCHDOG=1".to_string()), "{again:?}");
        assert!(!again.contains(&"READY=1".to_string()), "READY=1 is sent once: {again:?}");

        Notifier { inner: Some(Arc::clone(&inner)) }.tree_failed("the tree failed: boom");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(drain(&rx), vec!["STATUS=the tree failed: boom".to_string()]);
        assert!(task.is_finished());
    }
}

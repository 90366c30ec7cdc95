//! Spawning one Python worker process and watching its stdio.
//!
//! Owns: the socketpair, the `Command` (own process group, parent-death signal, the inherited
//! fd, the markers), the dedicated spawner thread, stdout/stderr forwarding into `tracing`, and
//! the stderr tail. It does not signal or reap (see [`crate::os`]), interpret the protocol
//! (see [`crate::io`]) or decide on restarts (see [`crate::router`]). No shell is involved:
//! the interpreter is exec'd directly with its arguments.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so every worker is
//! forked from one thread that lives as long as the program: `pyvisor-spawner`. The child is a
//! `std::process::Child`, which neither kills nor reaps on drop: its leader is reaped only by
//! [`crate::os::family`], after the last signal to its process group.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ChildStderr, ChildStdout, Command};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;

use crate::death::WorkerId;
use crate::os::markers::{self, FAMILY_VAR, PROGRAM_VAR, RUN_VAR};
use crate::os::pidfd::Pidfd;
use crate::spec::{PoolSpec, Target, WORKER_MALLOC_MMAP_THRESHOLD, WORKER_MALLOC_TOP_PAD};

/// Lines of stderr kept for death certificates.
pub(crate) const STDERR_TAIL_LINES: usize = 40;
/// Longest line kept (longer lines are cut).
const MAX_LINE: usize = 16 * 1024;
/// Bytes of a stack capture (the lines a hung worker dumps) kept at most.
pub(crate) const MAX_CAPTURE: usize = 256 * 1024;
/// Bytes read from a worker's stdout or stderr at a time.
const READ_CHUNK: usize = 8 * 1024;

/// A spawned worker process: its pidfd, the parent's socket end, its stdio and its family
/// token.
pub(crate) struct Spawned {
    pub leader: Arc<Pidfd>,
    pub pid: u32,
    pub socket: StdUnixStream,
    /// The fd channel for out-of-band buffers (`None`: the pool sends everything in band).
    pub fd_channel: Option<std::os::unix::net::UnixDatagram>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
    pub family: String,
}

/// What the spawner thread hands back: the child's pidfd (opened before anyone could reap
/// it) and its stdio.
type SpawnReply = std::io::Result<(Pidfd, Option<ChildStdout>, Option<ChildStderr>)>;

/// Everything the spawner needs, built on the caller's side.
struct SpawnRequest {
    command: Command,
    reply: oneshot::Sender<SpawnReply>,
}

fn spawn_and_pin(command: &mut Command) -> SpawnReply {
    let mut child = command.spawn()?;
    // Unreaped, so its number is still this child's: the pidfd is race-free.
    match Pidfd::open(child.id()) {
        Ok(fd) => Ok((fd, child.stdout.take(), child.stderr.take())),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(std::io::Error::other(format!("pidfd_open failed ({e}): pyvisor needs Linux 5.4 or later")))
        }
    }
}

fn spawner() -> &'static Mutex<std_mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<std_mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<SpawnRequest>();
        // This thread never exits while the program runs: children it forks get their
        // parent-death signal only when the whole process dies.
        let spawned = std::thread::Builder::new().name("pyvisor-spawner".into()).spawn(move || {
            for mut req in rx {
                let _ = req.reply.send(spawn_and_pin(&mut req.command));
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the pyvisor-spawner thread: {e}");
        }
        Mutex::new(tx)
    })
}

/// Spawn one worker for `spec` with the resolved interpreter `python`.
pub(crate) async fn spawn_worker(
    spec: &PoolSpec,
    python: &PathBuf,
    worker: WorkerId,
) -> std::io::Result<Spawned> {
    let (parent_end, child_end) = StdUnixStream::pair()?;
    let child_fd: OwnedFd = child_end.into();
    let raw_child_fd = child_fd.as_raw_fd();
    // Out-of-band buffers' fds go to the worker on a datagram socketpair of their own, so that
    // it reads its stream with a plain `recv` (docs/protocol.md, "Out-of-band buffers").
    let oob = spec.buffers.out_of_band && crate::buffers::memfd_available();
    let (fd_channel, child_channel) = match oob {
        true => {
            let (ours, theirs) = std::os::unix::net::UnixDatagram::pair()?;
            (Some(ours), Some(OwnedFd::from(theirs)))
        }
        false => (None, None),
    };
    let raw_child_channel = child_channel.as_ref().map(|c| c.as_raw_fd());

    markers::prepare_program();
    let family = markers::new_family();
    let mut cmd = Command::new(python);
    cmd.arg("-m").arg("pyvisor_worker");
    match &spec.target {
        Target::Script(p) => {
            cmd.arg(p);
        }
        Target::Module(m) => {
            cmd.arg("--module").arg(m);
        }
    }
    cmd.args(&spec.args);
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    cmd.env("PYVISOR_FD", raw_child_fd.to_string())
        .env("PYVISOR_WORKER_ID", worker.to_string())
        .env("PYVISOR_PROTOCOL", pyvisor_protocol::PROTOCOL_VERSION.to_string())
        .env("PYVISOR_MAX_FRAME", spec.max_frame.to_string())
        .env("PYVISOR_BEAT_INTERVAL_MS", spec.heartbeat_interval.as_millis().to_string())
        .env("PYVISOR_OOB", if oob { "1" } else { "0" })
        .env("PYVISOR_OOB_THRESHOLD", spec.buffers.threshold.to_string())
        .env("PYVISOR_MAX_BUFFER", spec.buffers.max_buffer.to_string())
        .env("PYTHONUNBUFFERED", "1");
    // Workers export their spans where we export ours (the user's env wins).
    for (k, v) in crate::telemetry::worker_env() {
        cmd.env(k, v);
    }
    // Large payloads reuse freed memory instead of faulting it in again (WORKER_MALLOC_TOP_PAD);
    // a parent that sets the allocator itself keeps its own settings.
    if ["MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"].iter().all(|k| std::env::var_os(k).is_none()) {
        cmd.env("MALLOC_TOP_PAD_", WORKER_MALLOC_TOP_PAD.to_string());
        cmd.env("MALLOC_MMAP_THRESHOLD_", WORKER_MALLOC_MMAP_THRESHOLD.to_string());
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    // The markers come last: the spec's `env` cannot remove a worker from its family (and the
    // confinement's environment lists never drop `PYVISOR_*`).
    if let Some(fd) = raw_child_channel {
        cmd.env("PYVISOR_FDS_FD", fd.to_string());
    }
    cmd.env(RUN_VAR, markers::run_id()).env(PROGRAM_VAR, markers::program_id()).env(FAMILY_VAR, &family);
    crate::confine::filter_env(&spec.confine, &mut cmd);
    let confine = spec.confine.prepare().map_err(std::io::Error::other)?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    let parent_pid = std::process::id() as libc::pid_t;
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid, fcntl,
    // _exit; setrlimit, setgroups, setgid, setuid in `confine.apply`) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // First: a change of user clears the parent-death signal set below.
            confine.apply()?;
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent_pid {
                libc::_exit(1);
            }
            // Let the worker's end of the socketpair survive exec.
            if libc::fcntl(raw_child_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = raw_child_channel {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }

    let (tx, rx) = oneshot::channel();
    let req = SpawnRequest { command: cmd, reply: tx };
    {
        let sender = spawner().lock().map_err(|_| std::io::Error::other("spawner lock poisoned"))?;
        sender
            .send(req)
            .map_err(|_| std::io::Error::other("the pyvisor-spawner thread is gone"))?;
    }
    let (leader, stdout, stderr) = rx.await.map_err(|_| std::io::Error::other("the spawner dropped the request"))??;
    // The child has its copy now; close ours so EOF means the worker is gone.
    drop(child_fd);
    let pid = leader.pid();
    drop(child_channel);
    Ok(Spawned { leader: Arc::new(leader), pid, socket: parent_end, fd_channel, stdout, stderr, family })
}

/// The last lines a worker wrote to stderr, and — while a hang is being diagnosed — the lines
/// of its stack dump. Both bounded: [`STDERR_TAIL_LINES`] lines of at most `MAX_LINE` bytes,
/// and [`MAX_CAPTURE`] bytes of capture (the rest is dropped and the capture says so).
#[derive(Debug, Default)]
pub(crate) struct StderrTail {
    lines: Mutex<VecDeque<String>>,
    capture: Mutex<Option<Capture>>,
}

#[derive(Debug, Default)]
struct Capture {
    lines: Vec<String>,
    bytes: usize,
    dropped: usize,
}

impl StderrTail {
    fn push(&self, line: String) {
        if let Ok(mut c) = self.capture.lock() {
            if let Some(c) = c.as_mut() {
                if c.bytes + line.len() <= MAX_CAPTURE {
                    c.bytes += line.len();
                    c.lines.push(line.clone());
                } else {
                    c.dropped += 1;
                }
            }
        }
        if let Ok(mut l) = self.lines.lock() {
            if l.len() == STDERR_TAIL_LINES {
                l.pop_front();
            }
            l.push_back(line);
        }
    }
    /// Start keeping every line (e.g. a stack dump longer than the tail), up to `MAX_CAPTURE`.
    pub(crate) fn start_capture(&self) {
        if let Ok(mut c) = self.capture.lock() {
            *c = Some(Capture::default());
        }
    }
    /// How many lines were seen since `start_capture` (kept or dropped).
    pub(crate) fn captured_lines(&self) -> usize {
        self.capture.lock().ok().and_then(|c| c.as_ref().map(|c| c.lines.len() + c.dropped)).unwrap_or(0)
    }
    /// Stop capturing and return what was captured.
    pub(crate) fn take_capture(&self) -> Vec<String> {
        let Some(c) = self.capture.lock().ok().and_then(|mut c| c.take()) else { return Vec::new() };
        let mut lines = c.lines;
        if c.dropped > 0 {
            lines.push(format!("[pyvisor: {} more line(s) dropped: the capture keeps {MAX_CAPTURE} bytes]", c.dropped));
        }
        lines
    }
    pub(crate) fn snapshot(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.iter().cloned().collect()).unwrap_or_default()
    }
}

/// Which stream a forwarded line came from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// Splits a byte stream into lines, keeping at most `max` bytes of each: the cap holds while
/// the bytes arrive (an over-long line costs `max` bytes, not its length), and a cut line says
/// how much was cut.
#[derive(Debug)]
pub(crate) struct LineCutter {
    max: usize,
    line: Vec<u8>,
    cut: usize,
}

impl LineCutter {
    pub(crate) fn new(max: usize) -> Self {
        LineCutter { max, line: Vec::new(), cut: 0 }
    }

    /// Feed bytes; `emit` gets every completed line (without its line ending).
    pub(crate) fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(String)) {
        while !bytes.is_empty() {
            let (part, done) = match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => (&bytes[..i], Some(i + 1)),
                None => (bytes, None),
            };
            let room = self.max.saturating_sub(self.line.len());
            let keep = part.len().min(room);
            self.line.extend_from_slice(&part[..keep]);
            self.cut += part.len() - keep;
            match done {
                Some(n) => {
                    emit(self.take());
                    bytes = &bytes[n..];
                }
                None => break,
            }
        }
    }

    /// The stream ended: the last line, if it had no line ending.
    pub(crate) fn finish(&mut self, emit: &mut impl FnMut(String)) {
        if !self.line.is_empty() || self.cut > 0 {
            emit(self.take());
        }
    }

    fn take(&mut self) -> String {
        while self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        let mut text = String::from_utf8_lossy(&self.line).into_owned();
        if self.cut > 0 {
            text.push_str(&format!(" [pyvisor: line cut, {} more bytes]", self.cut));
        }
        self.line.clear();
        if self.line.capacity() > self.max.min(4096) {
            self.line.shrink_to(256);
        }
        self.cut = 0;
        text
    }
}

/// Forward a worker's stdout or stderr into `tracing`, line by line, tagged with the worker;
/// lines longer than `MAX_LINE` bytes are cut as they arrive. Returns when the pipe closes.
pub(crate) async fn forward_lines<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: Stream,
    pool: Arc<str>,
    worker: WorkerId,
    tail: Option<Arc<StderrTail>>,
) {
    let mut cutter = LineCutter::new(MAX_LINE);
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut emit = |line: String| {
        match stream {
            Stream::Stdout => {
                tracing::info!(target: "pyvisor::worker::stdout", pool = %pool, worker = %worker, "{line}")
            }
            Stream::Stderr => {
                tracing::warn!(target: "pyvisor::worker::stderr", pool = %pool, worker = %worker, "{line}")
            }
        }
        if let Some(t) = &tail {
            t.push(line);
        }
    };
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => cutter.push(&chunk[..n], &mut emit),
        }
    }
    cutter.finish(&mut emit);
}

/// The cgroup's OOM-kill counter, if readable (`/sys/fs/cgroup/memory.events`).
pub(crate) fn oom_kill_count() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/fs/cgroup/memory.events").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// A worker's own memory in bytes: PSS from `/proc/PID/smaps_rollup` where readable (shared
/// pages divided among their users), else RSS from `/proc/PID/statm`.
pub(crate) fn measure_memory(pid: u32) -> Option<u64> {
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        let pss = text.lines().find_map(|l| l.strip_prefix("Pss:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
        if let Some(kb) = pss {
            return Some(kb * 1024);
        }
    }
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).unwrap_or(4096))
}

#[cfg(test)]
mod line_tests {
    use super::*;

    fn lines(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut c = LineCutter::new(max);
        let mut out = Vec::new();
        let mut emit = |l: String| out.push(l);
        for ch in chunks {
            c.push(ch, &mut emit);
        }
        c.finish(&mut emit);
        out
    }

    #[test]
    fn lines_split_across_chunks_and_endings() {
        assert_eq!(lines(100, &[b"ab", b"c\nde\r\n", b"f"]), vec!["abc", "de", "f"]);
        assert_eq!(lines(100, &[b"\n\n"]), vec!["", ""]);
        assert!(lines(100, &[]).is_empty());
    }

    #[test]
    fn an_over_long_line_is_cut_while_it_arrives_and_says_so() {
        let mut c = LineCutter::new(8);
        let mut out = Vec::new();
        let mut emit = |l: String| out.push(l);
        for _ in 0..1000 {
            c.push(&[b'x'; 1000], &mut emit);
            assert!(c.line.len() <= 8 && c.line.capacity() <= 1024, "the cap holds while the bytes arrive");
        }
        c.push(b"\nafter\n", &mut emit);
        assert_eq!(out, vec![format!("xxxxxxxx [pyvisor: line cut, {} more bytes]", 1_000_000 - 8), "after".to_string()]);
    }

    #[test]
    fn a_stack_capture_is_bounded() {
        let t = StderrTail::default();
        t.start_capture();
        for _ in 0..1000 {
            t.push("y".repeat(1024));
        }
        assert_eq!(t.captured_lines(), 1000);
        let got = t.take_capture();
        assert!(got.iter().map(String::len).sum::<usize>() <= MAX_CAPTURE + 200);
        assert!(got.last().unwrap().contains("dropped"));
        assert_eq!(t.snapshot().len(), STDERR_TAIL_LINES);
    }
}

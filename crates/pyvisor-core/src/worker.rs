//! The worker actor: one Python process, from spawn to death certificate.
//!
//! Owns the child process (through its waiter task and a group-kill guard), the socket halves
//! (reader task, writer), stdout/stderr forwarding, the start timeout, the `hello` check, and
//! the worker's end: a crash finalizes a [`DeathCertificate`], fails the calls in flight with
//! it and fails the actor with [`WorkerDied`] so the router hears of it as a supervision event;
//! a requested shutdown drains, then `shutdown` → SIGTERM → SIGKILL. It does not decide about
//! replacement (see [`crate::router`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pyvisor_protocol::{encode_shutdown, Hello, PROTOCOL_VERSION};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::connection::{read_loop, ReadEnd};
use crate::death::{DeathCause, DeathCertificate};
use crate::pool::PoolShared;
use crate::process::{
    forward_lines, kill_group, measure_memory, oom_kill_count, spawn_worker, wait_group_gone, GroupGuard, StderrTail, Stream,
};
use crate::router::RouterMsg;
use crate::slot::{Failure, WorkerSlot, WorkerState};
use crate::writer::FrameWriter;

/// The error a worker actor fails with when its process dies: carries the certificate to the
/// router through ractor's `SupervisionEvent::ActorFailed`.
#[derive(Debug)]
pub(crate) struct WorkerDied(pub Arc<DeathCertificate>);

impl std::fmt::Display for WorkerDied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for WorkerDied {}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

pub(crate) enum WorkerMsg {
    Hello(Hello),
    ConnectionLost(ReadEnd),
    Exited(ExitInfo),
    StartTimeout,
    ExitWaitOver,
    /// Periodic health check: heartbeat, harakiri, memory, recycling thresholds.
    Tick,
    Shutdown(RpcReplyPort<()>),
    /// Recycled: drain (up to the drain timeout), then stop like a shutdown.
    Drain,
}

pub(crate) struct WorkerActor;

pub(crate) struct WorkerArgs {
    pub slot: Arc<WorkerSlot>,
    pub shared: Arc<PoolShared>,
    pub router: ActorRef<RouterMsg>,
}

pub(crate) struct WorkerActorState {
    slot: Arc<WorkerSlot>,
    shared: Arc<PoolShared>,
    router: ActorRef<RouterMsg>,
    pid: Option<u32>,
    guard: Option<GroupGuard>,
    armed: Arc<AtomicBool>,
    exit_rx: Option<watch::Receiver<Option<ExitInfo>>>,
    stderr: Arc<StderrTail>,
    stderr_task: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    ready: bool,
    cause: Option<DeathCause>,
    killed_by_us: bool,
    stopping: bool,
    oom_before: Option<u64>,
    started: Instant,
    ready_at: Option<Instant>,
    python_stack: Option<String>,
    ticker: Option<JoinHandle<()>>,
    ttl: Option<Duration>,
    max_requests: Option<u64>,
}

fn jittered(v: f64, jitter: f64) -> f64 {
    if jitter <= 0.0 {
        v
    } else {
        v * (1.0 + rand::random_range(-jitter..=jitter))
    }
}

impl WorkerActorState {
    fn kill(&mut self, cause: DeathCause) {
        if self.cause.is_none() {
            self.cause = Some(cause);
        }
        self.killed_by_us = true;
        if let Some(pid) = self.pid {
            kill_group(pid, libc::SIGKILL);
        }
    }

    /// Build the certificate, fail the calls in flight with it, and return the actor error.
    async fn finalize(&mut self, exit: Option<ExitInfo>) -> ActorProcessingErr {
        self.slot.set_state(WorkerState::Dead);
        if let Some(pid) = self.pid {
            // Take whatever the worker left in its group (user subprocesses).
            kill_group(pid, libc::SIGKILL);
        }
        self.armed.store(false, Ordering::SeqCst);
        // Let stderr drain so the tail holds the last words (e.g. an import traceback).
        if let Some(t) = self.stderr_task.as_mut() {
            let _ = tokio::time::timeout(Duration::from_millis(500), t).await;
        }
        let last_beat = self.slot.last_beat();
        let signal = exit.and_then(|e| e.signal);
        let oom_suspected = signal == Some(libc::SIGKILL)
            && !self.killed_by_us
            && matches!((self.oom_before, oom_kill_count()), (Some(a), Some(b)) if b > a);
        let cert = Arc::new(DeathCertificate {
            pool: self.shared.name.to_string(),
            worker: self.slot.id,
            index: self.slot.index,
            pid: self.pid,
            cause: self.cause.clone().unwrap_or(DeathCause::Exited),
            exit_code: exit.and_then(|e| e.code),
            signal,
            killed_by_pyvisor: self.killed_by_us,
            oom_suspected,
            uptime: self.started.elapsed(),
            became_ready: self.ready,
            died_at: SystemTime::now(),
            last_rss: last_beat.as_ref().map(|b| b.beat.rss),
            last_beat_age: last_beat.as_ref().map(|b| b.at.elapsed()),
            calls_in_flight: self.slot.calls_in_flight(),
            stderr_tail: self.stderr.snapshot(),
            python_stack: self.python_stack.clone(),
        });
        let failed = self.slot.close_and_fail(Failure::Crashed(Arc::clone(&cert)));
        if let Some(w) = self.slot.writer() {
            w.close();
        }
        tracing::warn!(
            pool = %cert.pool, worker = %cert.worker, pid = ?cert.pid, cause = %cert.cause,
            ending = %cert.ending(), ready = cert.became_ready, calls_failed = failed,
            "worker died"
        );
        Box::new(WorkerDied(cert))
    }

    fn abort_tasks(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }

    /// No beats: capture the Python stack (faulthandler on SIGUSR1), then kill.
    async fn declare_hung(&mut self, silent_for: Duration) {
        let Some(pid) = self.pid else { return };
        tracing::warn!(pool = %self.shared.name, worker = %self.slot.id, pid, silent_ms = silent_for.as_millis() as u64, "worker hung; capturing its stack");
        self.stderr.start_capture();
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGUSR1);
        }
        // A stopped process cannot answer; a live one dumps within milliseconds.
        let start = Instant::now();
        let mut last_len = 0;
        let mut quiet_since = Instant::now();
        while start.elapsed() < Duration::from_millis(800) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let n = self.stderr.captured().len();
            if n != last_len {
                last_len = n;
                quiet_since = Instant::now();
            } else if n > 0 && quiet_since.elapsed() > Duration::from_millis(100) {
                break;
            }
        }
        let lines = self.stderr.take_capture();
        if !lines.is_empty() {
            self.python_stack = Some(lines.join("\n"));
        }
        self.kill(DeathCause::Hung { silent_for });
    }

    async fn tick(&mut self) {
        if !self.ready || self.stopping || self.cause.is_some() {
            return;
        }
        let spec = &self.shared.spec;
        let Some(pid) = self.pid else { return };
        // Heartbeat.
        let last = self.slot.last_beat();
        let silent = match (&last, self.ready_at) {
            (Some(b), _) => b.at.elapsed(),
            (None, Some(r)) => r.elapsed(),
            (None, None) => Duration::ZERO,
        };
        if silent > spec.heartbeat_interval * spec.heartbeat_max_missed {
            self.declare_hung(silent).await;
            return;
        }
        // Harakiri: a call its caller gave up on, still running past deadline + grace.
        if let (Some(grace), Some(b)) = (spec.harakiri_grace, &last) {
            let running: std::collections::HashSet<u64> = b
                .beat
                .in_progress
                .iter()
                .filter(|c| c.phase == pyvisor_protocol::Phase::Running)
                .map(|c| c.id)
                .collect();
            let now = Instant::now();
            let overrun = self
                .slot
                .abandoned_running(|id| running.contains(&id))
                .into_iter()
                .find(|(_, c)| c.deadline.is_some_and(|d| b.at > d + grace && now > d + grace));
            if let Some((call_id, call)) = overrun {
                let over = call.deadline.map_or(Duration::ZERO, |d| now.saturating_duration_since(d));
                tracing::warn!(pool = %self.shared.name, worker = %self.slot.id, call_id, function = %call.function, "harakiri: killing the worker");
                self.kill(DeathCause::Harakiri { call_id, function: call.function, overrun: over });
                return;
            }
        }
        // Memory.
        let r = &spec.recycle;
        if r.memory_soft_limit.is_some() || r.memory_hard_limit.is_some() {
            if let Some(bytes) = measure_memory(pid) {
                if let Some(limit) = r.memory_hard_limit.filter(|l| bytes > *l) {
                    tracing::warn!(pool = %self.shared.name, worker = %self.slot.id, bytes, limit, "memory hard limit: killing the worker");
                    self.kill(DeathCause::MemoryLimit { bytes, limit });
                    return;
                }
                if r.memory_soft_limit.is_some_and(|l| bytes > l) {
                    self.request_recycle(crate::events::RecycleReason::MemorySoftLimit { bytes });
                    return;
                }
            }
        }
        if self.ttl.zip(self.ready_at).is_some_and(|(ttl, at)| at.elapsed() >= ttl) {
            self.request_recycle(crate::events::RecycleReason::Ttl);
        } else if self.max_requests.is_some_and(|m| self.slot.served() >= m) {
            self.request_recycle(crate::events::RecycleReason::MaxRequests);
        }
    }

    fn request_recycle(&self, reason: crate::events::RecycleReason) {
        let _ = self.router.cast(RouterMsg::RecycleRequest { id: self.slot.id, reason });
    }
}

impl Actor for WorkerActor {
    type Msg = WorkerMsg;
    type State = WorkerActorState;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: WorkerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(WorkerActorState {
            slot: args.slot,
            shared: args.shared,
            router: args.router,
            pid: None,
            guard: None,
            armed: Arc::new(AtomicBool::new(false)),
            exit_rx: None,
            stderr: Arc::new(StderrTail::default()),
            stderr_task: None,
            tasks: Vec::new(),
            ready: false,
            cause: None,
            killed_by_us: false,
            stopping: false,
            oom_before: oom_kill_count(),
            started: Instant::now(),
            ready_at: None,
            python_stack: None,
            ticker: None,
            ttl: None,
            max_requests: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let spec = &st.shared.spec;
        st.started = Instant::now();
        let spawned = match spawn_worker(spec, &st.shared.python, st.slot.id).await {
            Ok(s) => s,
            Err(e) => {
                st.cause = Some(DeathCause::SpawnFailed(e.to_string()));
                return Err(st.finalize(None).await);
            }
        };
        let mut child = spawned.child;
        let pid = spawned.pid;
        st.pid = Some(pid);
        st.slot.set_pid(pid);
        st.armed.store(true, Ordering::SeqCst);
        st.guard = Some(GroupGuard { pgid: pid, armed: Arc::clone(&st.armed) });

        let name: Arc<str> = Arc::clone(&st.shared.name);
        if let Some(out) = child.stdout.take() {
            st.tasks.push(tokio::spawn(forward_lines(out, Stream::Stdout, Arc::clone(&name), st.slot.id, None)));
        }
        if let Some(err) = child.stderr.take() {
            st.stderr_task = Some(tokio::spawn(forward_lines(
                err,
                Stream::Stderr,
                Arc::clone(&name),
                st.slot.id,
                Some(Arc::clone(&st.stderr)),
            )));
        }
        let (exit_tx, exit_rx) = watch::channel(None);
        st.exit_rx = Some(exit_rx);
        let me = myself.clone();
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let info = match child.wait().await {
                Ok(s) => ExitInfo { code: s.code(), signal: s.signal() },
                Err(_) => ExitInfo { code: None, signal: None },
            };
            let _ = exit_tx.send(Some(info));
            let _ = me.cast(WorkerMsg::Exited(info));
        });

        let socket = spawned.socket;
        let stream = socket
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(socket));
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                st.kill(DeathCause::SpawnFailed(format!("cannot use the worker socket: {e}")));
                return Ok(());
            }
        };
        let (read, write) = stream.into_split();
        st.slot.set_writer(FrameWriter::start(write));
        st.tasks.push(tokio::spawn(read_loop(
            read,
            spec.max_frame,
            Arc::clone(&st.slot),
            Arc::clone(&st.shared),
            myself.clone(),
        )));
        myself.send_after(spec.start_timeout, || WorkerMsg::StartTimeout);
        st.shared.emit(crate::PoolEvent::WorkerSpawned { worker: st.slot.id, index: st.slot.index, pid });
        tracing::debug!(pool = %st.shared.name, worker = %st.slot.id, pid, "worker spawned");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Hello(h) => {
                if st.ready || st.stopping || st.cause.is_some() {
                    return Ok(());
                }
                if h.protocol != PROTOCOL_VERSION {
                    st.kill(DeathCause::VersionMismatch { worker: h.protocol, parent: PROTOCOL_VERSION });
                    return Ok(());
                }
                st.ready = true;
                st.ready_at = Some(Instant::now());
                let spec = &st.shared.spec;
                let r = &spec.recycle;
                st.ttl = r.ttl.map(|t| Duration::from_secs_f64(jittered(t.as_secs_f64(), r.jitter).max(0.0)));
                st.max_requests = r.max_requests.map(|m| jittered(m as f64, r.jitter).round().max(1.0) as u64);
                let period = (spec.heartbeat_interval / 2).clamp(Duration::from_millis(10), Duration::from_millis(500));
                st.ticker = Some(myself.send_interval(period, || WorkerMsg::Tick));
                st.slot.set_state(WorkerState::Ready);
                let _ = st.router.cast(RouterMsg::WorkerReady {
                    id: st.slot.id,
                    hello: Box::new(h),
                    startup: st.started.elapsed(),
                });
            }
            WorkerMsg::StartTimeout => {
                if !st.ready && !st.stopping {
                    st.kill(DeathCause::StartTimeout(st.shared.spec.start_timeout));
                }
            }
            WorkerMsg::ConnectionLost(end) => {
                if st.stopping {
                    return Ok(());
                }
                // No new calls from now on.
                st.slot.set_state(WorkerState::Dead);
                match end {
                    ReadEnd::Protocol(e) => st.kill(DeathCause::ProtocolError(e)),
                    ReadEnd::Eof => {
                        myself.send_after(Duration::from_secs(1), || WorkerMsg::ExitWaitOver);
                    }
                }
            }
            WorkerMsg::ExitWaitOver => {
                let exited = st.exit_rx.as_ref().is_some_and(|rx| rx.borrow().is_some());
                if !exited && !st.stopping {
                    st.kill(DeathCause::ProtocolError("the worker closed its socket but kept running".into()));
                }
            }
            WorkerMsg::Exited(info) => {
                if st.stopping {
                    return Ok(());
                }
                let err = st.finalize(Some(info)).await;
                st.abort_tasks();
                return Err(err);
            }
            WorkerMsg::Tick => st.tick().await,
            WorkerMsg::Shutdown(reply) => {
                st.stopping = true;
                let grace = st.shared.spec.shutdown_grace;
                shutdown_process(st, grace).await;
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
            WorkerMsg::Drain => {
                st.stopping = true;
                let grace = st.shared.spec.recycle.drain_timeout;
                shutdown_process(st, grace).await;
                myself.stop(Some("recycled".into()));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if st.armed.load(Ordering::SeqCst) {
            if let Some(pid) = st.pid {
                kill_group(pid, libc::SIGKILL);
            }
            st.armed.store(false, Ordering::SeqCst);
        }
        st.slot.set_state(WorkerState::Dead);
        st.slot.close_and_fail(Failure::ShutDown);
        if let Some(w) = st.slot.writer() {
            w.close();
        }
        st.abort_tasks();
        Ok(())
    }
}

/// Drain, then `shutdown` → SIGTERM → SIGKILL, within the spec's timeouts.
async fn shutdown_process(st: &mut WorkerActorState, grace: Duration) {
    if let Some(t) = st.ticker.take() {
        t.abort();
    }
    let spec = &st.shared.spec;
    let deadline = tokio::time::Instant::now() + grace;
    if st.slot.state() == WorkerState::Ready {
        st.slot.set_state(WorkerState::Draining);
    }
    while st.slot.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let Some(pid) = st.pid else { return };
    let Some(mut exit_rx) = st.exit_rx.clone() else { return };
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    if let Some(w) = st.slot.writer() {
        let _ = w.send(&encode_shutdown(remaining.as_millis() as u64));
    }
    let mut exited = wait_exit(&mut exit_rx, remaining.max(Duration::from_millis(200))).await;
    if !exited {
        kill_group(pid, libc::SIGTERM);
        exited = wait_exit(&mut exit_rx, spec.sigterm_wait).await;
    }
    if !exited {
        kill_group(pid, libc::SIGKILL);
        exited = wait_exit(&mut exit_rx, Duration::from_secs(2)).await;
    }
    if !exited {
        tracing::error!(pool = %st.shared.name, worker = %st.slot.id, pid, "worker did not exit after SIGKILL");
    }
    // Whatever remains in the group (the watchdog, user subprocesses) goes too, and shutdown
    // returns only once it is gone.
    kill_group(pid, libc::SIGKILL);
    if !wait_group_gone(pid, Duration::from_secs(2)).await {
        tracing::error!(pool = %st.shared.name, worker = %st.slot.id, pid, "processes of the worker's group survived SIGKILL");
    }
    st.armed.store(false, Ordering::SeqCst);
    st.slot.set_state(WorkerState::Dead);
    st.slot.close_and_fail(Failure::ShutDown);
    if let Some(w) = st.slot.writer() {
        w.close();
    }
    if let Some(t) = st.stderr_task.as_mut() {
        let _ = tokio::time::timeout(Duration::from_millis(200), t).await;
    }
}

async fn wait_exit(rx: &mut watch::Receiver<Option<ExitInfo>>, d: Duration) -> bool {
    tokio::time::timeout(d, rx.wait_for(|e| e.is_some())).await.is_ok_and(|r| r.is_ok())
}

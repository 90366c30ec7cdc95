//! The worker actor: one Python process, from spawn to death certificate.
//!
//! Owns the child process (through its waiter task and a group-kill guard), the socket halves
//! (reader task, writer), stdout/stderr forwarding, the start timeout, the `hello` check, the
//! periodic health check, the recycling drain, and the worker's end:
//! - a crash (any exit pyvisor did not ask for, also while draining) finalizes a
//!   [`DeathCertificate`] once the reader has delivered every reply the worker wrote, fails
//!   the calls still in flight with it, and fails the actor with [`WorkerDied`] so the router
//!   hears of it as a supervision event;
//! - a requested stop drains, then `shutdown` → SIGTERM → SIGKILL;
//! - any other end (killed, panicked) is caught by `Drop` of the state, which fails every call
//!   still pending and kills the process group.
//!
//! It does not decide about replacement (the router does).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pyvisor_protocol::{encode_ping, encode_shutdown, Hello, RemoteErrorKind, WorkerMessage, PROTOCOL_VERSION};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::health::{judge, Limits, Observed, Overrun, Verdict};
use crate::death::{DeathCause, DeathCertificate, WorkerId};
use crate::dispatch::{Failure, Outcome, WorkerSlot};
use crate::events::RecycleReason;
use crate::io::reader::{fd_violation, read_frames, ReadEnd, ReceivedFds};
use crate::buffers::Reply;
use crate::os::memfd::SharedBytes;
use crate::io::writer::FrameWriter;
use crate::os::family::{Family, BURIAL_LIMIT};
pub(crate) use crate::os::pidfd::ExitInfo;
use crate::process::{forward_lines, measure_memory, oom_kill_count, spawn_worker, StderrTail, Stream};
use crate::shared::PoolShared;
use crate::status::WorkerState;

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

/// What a worker tells its pool router.
pub(crate) enum WorkerReport {
    /// It sent a valid `hello` and takes calls.
    Ready { id: WorkerId, hello: Box<Hello>, startup: Duration },
    /// It passed a recycling threshold (sent again on every check while it holds).
    Recycle { id: WorkerId, reason: RecycleReason },
}

/// How a worker reaches its router (a cast, in practice).
pub(crate) type Reporter = Arc<dyn Fn(WorkerReport) + Send + Sync>;

pub(crate) enum WorkerMsg {
    Hello(Hello),
    ConnectionLost(ReadEnd),
    Exited(ExitInfo),
    StartTimeout,
    ExitWaitOver,
    /// Periodic health check: heartbeat, reading side, harakiri, memory, recycling, drain.
    Tick,
    Shutdown(RpcReplyPort<()>),
    /// Recycled: take no new calls, finish the ones in flight (up to the drain timeout), then
    /// stop like a shutdown. A crash meanwhile is a crash.
    Drain,
}

// Local only: never sent to another node.
crate::local_message!(WorkerMsg);

pub(crate) struct WorkerActor;

pub(crate) struct WorkerArgs {
    pub slot: Arc<WorkerSlot>,
    pub shared: Arc<PoolShared>,
    pub report: Reporter,
}

pub(crate) struct WorkerActorState {
    slot: Arc<WorkerSlot>,
    shared: Arc<PoolShared>,
    report: Reporter,
    pid: Option<u32>,
    /// The process, its group and its escapees; buried when the worker ends (or on drop).
    family: Option<Family>,
    exit_rx: Option<watch::Receiver<Option<ExitInfo>>>,
    stderr: Arc<StderrTail>,
    stderr_task: Option<JoinHandle<()>>,
    /// The reader task; it returns whether it read the socket to EOF.
    reader: Option<JoinHandle<bool>>,
    tasks: Vec<JoinHandle<()>>,
    ready: bool,
    cause: Option<DeathCause>,
    killed_by_us: bool,
    /// A requested stop (shutdown or the end of a drain) is under way.
    stopping: bool,
    /// Recycled: draining until this instant.
    draining_until: Option<Instant>,
    /// The certificate is written: nothing is pending any more.
    finalized: bool,
    oom_before: Option<u64>,
    started: Instant,
    ready_at: Option<Instant>,
    python_stack: Option<String>,
    ticker: Option<JoinHandle<()>>,
    limits: Option<Limits>,
    /// The ping in flight: its nonce and when it was sent.
    ping: Option<(u64, Instant)>,
    next_ping: u64,
    last_ping_at: Option<Instant>,
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
        if let Some(f) = &self.family {
            f.signal_group(libc::SIGKILL);
        }
    }

    fn certificate(&self, exit: Option<ExitInfo>, cause: DeathCause) -> DeathCertificate {
        let last_beat = self.slot.last_beat();
        let signal = exit.and_then(|e| e.signal);
        let oom_suspected = signal == Some(libc::SIGKILL)
            && !self.killed_by_us
            && matches!((self.oom_before, oom_kill_count()), (Some(a), Some(b)) if b > a);
        DeathCertificate {
            pool: self.shared.name.to_string(),
            worker: self.slot.id,
            index: self.slot.index,
            pid: self.pid,
            cause,
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
        }
    }

    /// Build the certificate, fail the calls in flight with it, and return the actor error.
    async fn finalize(&mut self, exit: Option<ExitInfo>) -> ActorProcessingErr {
        self.slot.set_state(WorkerState::Dead);
        self.shared.dispatch.remove(self.slot.id);
        // Take whatever the worker left in its group (user subprocesses) and whatever left
        // the group (escapees), and reap the worker, the last signal to its group sent.
        if let Some(f) = self.family.take() {
            f.bury(BURIAL_LIMIT).await;
        }
        // Replies (and start acknowledgements) the worker wrote before it died are still in the
        // socket: let the reader deliver them (it ends at EOF once every holder of the socket
        // is gone) before the calls left are failed. Only a socket read to its end says that a
        // call without an acknowledgement did not start.
        let read_to_end = drain_reader(&mut self.reader).await;
        // Let stderr drain so the tail holds the last words (e.g. an import traceback).
        if let Some(t) = self.stderr_task.as_mut() {
            let _ = tokio::time::timeout(Duration::from_millis(500), t).await;
        }
        let cause = self.cause.clone().unwrap_or(DeathCause::Exited);
        let cert = Arc::new(self.certificate(exit, cause));
        let failed = self.slot.close_and_fail_read(Failure::Crashed(Arc::clone(&cert)), read_to_end);
        self.finalized = true;
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
        if let Some(t) = self.reader.take() {
            t.abort();
        }
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }

    /// No beats: capture the Python stack (faulthandler on SIGUSR1), then kill.
    async fn declare_hung(&mut self, silent_for: Duration) {
        let (Some(pid), Some(family)) = (self.pid, self.family.as_ref()) else { return };
        tracing::warn!(pool = %self.shared.name, worker = %self.slot.id, pid, silent_ms = silent_for.as_millis() as u64, "worker hung; capturing its stack");
        self.stderr.start_capture();
        family.signal_leader(libc::SIGUSR1);
        // A stopped process cannot answer; a live one dumps within milliseconds.
        let start = Instant::now();
        let mut last_len = 0;
        let mut quiet_since = Instant::now();
        while start.elapsed() < Duration::from_millis(800) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let n = self.stderr.captured_lines();
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

    /// Ping the worker's reading side while calls are in flight (one ping at a time, at most
    /// one per heartbeat interval); note the answer.
    fn ping(&mut self, now: Instant) {
        if let Some((nonce, _)) = self.ping {
            if self.slot.last_pong() == nonce {
                self.ping = None;
            }
        }
        if self.ping.is_some() || self.slot.in_flight() == 0 {
            return;
        }
        let interval = self.shared.spec.heartbeat_interval;
        if self.last_ping_at.is_some_and(|t| now.duration_since(t) < interval) {
            return;
        }
        self.last_ping_at = Some(now);
        self.next_ping += 1;
        let nonce = self.next_ping;
        if let Some(w) = self.slot.writer() {
            if w.send(&encode_ping(nonce)).is_ok() {
                self.ping = Some((nonce, now));
            }
        }
    }

    fn observe(&mut self, now: Instant) -> Option<Observed> {
        let pid = self.pid?;
        let limits = self.limits.as_ref()?;
        let last = self.slot.last_beat();
        let silent_for = match (&last, self.ready_at) {
            (Some(b), _) => b.at.elapsed(),
            (None, Some(r)) => r.elapsed(),
            (None, None) => Duration::ZERO,
        };
        let abandoned_running = match (&last, limits.harakiri_grace) {
            (Some(b), Some(_)) => {
                let running: std::collections::HashSet<u64> = b
                    .beat
                    .in_progress
                    .iter()
                    .filter(|c| c.phase == pyvisor_protocol::Phase::Running)
                    .map(|c| c.id)
                    .collect();
                self.slot
                    .abandoned_running(|id| running.contains(&id))
                    .into_iter()
                    .filter_map(|(call_id, c)| {
                        Some(Overrun { call_id, function: c.function.to_string(), deadline: c.deadline? })
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let memory = if limits.memory_soft.is_some() || limits.memory_hard.is_some() { measure_memory(pid) } else { None };
        Some(Observed {
            silent_for,
            last_beat_at: last.as_ref().map(|b| b.at),
            abandoned_running,
            ping_unanswered_for: self.ping.map(|(_, at)| now.duration_since(at)),
            memory,
            ready_for: self.ready_at.map_or(Duration::ZERO, |r| now.duration_since(r)),
            served: self.slot.served(),
            draining: self.draining_until.is_some(),
            watchdog_lost: last.as_ref().is_some_and(|b| b.beat.watchdog == Some(false)),
        })
    }

    /// The periodic check. Returns true when a drain is over and the worker should stop.
    async fn tick(&mut self) -> bool {
        if !self.ready || self.stopping || self.cause.is_some() {
            return false;
        }
        let now = Instant::now();
        self.ping(now);
        let Some(observed) = self.observe(now) else { return false };
        let Some(limits) = self.limits.clone() else { return false };
        match judge(&limits, &observed, now) {
            Verdict::Healthy => {}
            Verdict::Hung { silent_for } => {
                self.declare_hung(silent_for).await;
                return false;
            }
            Verdict::Unresponsive { silent_for } => {
                tracing::warn!(pool = %self.shared.name, worker = %self.slot.id, silent_ms = silent_for.as_millis() as u64, "worker stopped reading its socket: killing it");
                self.kill(DeathCause::Unresponsive { silent_for });
                return false;
            }
            Verdict::Harakiri { call_id, function, overrun } => {
                tracing::warn!(pool = %self.shared.name, worker = %self.slot.id, call_id, function = %function, "harakiri: killing the worker");
                self.kill(DeathCause::Harakiri { call_id, function, overrun });
                return false;
            }
            Verdict::MemoryHard { bytes, limit } => {
                tracing::warn!(pool = %self.shared.name, worker = %self.slot.id, bytes, limit, "memory hard limit: killing the worker");
                self.kill(DeathCause::MemoryLimit { bytes, limit });
                return false;
            }
            Verdict::Recycle(reason) => (self.report)(WorkerReport::Recycle { id: self.slot.id, reason }),
        }
        // A drain ends when its calls are done or its time is up — unless the connection was
        // lost meanwhile: that is a crash, which the exit will report.
        self.slot.state() != WorkerState::Dead
            && self.draining_until.is_some_and(|until| self.slot.in_flight() == 0 || now >= until)
    }

    /// What is left of the drain, but at least the shutdown grace: the worker's own exit
    /// (interpreter teardown, flushing spans) gets as long as a shutdown gives it.
    fn exit_grace(&self) -> Duration {
        let left = self.draining_until.map_or(Duration::ZERO, |u| u.saturating_duration_since(Instant::now()));
        left.max(self.shared.spec.shutdown_grace)
    }
}

impl Drop for WorkerActorState {
    /// Whatever way the actor ended (stopped, killed, panicked), nothing stays pending on this
    /// worker and nothing of its process group stays alive (the guard kills the group).
    fn drop(&mut self) {
        self.slot.set_state(WorkerState::Dead);
        self.shared.dispatch.remove(self.slot.id);
        if !self.finalized && self.slot.is_open() {
            let failure = if self.stopping || self.shared.is_closed() {
                Failure::ShutDown
            } else {
                let cause = DeathCause::ActorFailed("the worker actor ended without a death certificate".into());
                Failure::Crashed(Arc::new(self.certificate(None, cause)))
            };
            self.slot.close_and_fail(failure);
        }
        if let Some(w) = self.slot.writer() {
            w.close();
        }
        self.abort_tasks();
        if let Some(t) = self.stderr_task.take() {
            t.abort();
        }
    }
}

/// Where a worker's messages go: replies and stream items straight to their callers (an item
/// or a stream's end that breaks its stream's rules is a protocol violation), beats and pongs to the
/// slot, the first `hello` to the actor (another one is a protocol error: the function table
/// is fixed by the first). A `refused` reply (the worker is going away and did not run the
/// call) also stops routing to the worker. `Some`: stop reading.
fn deliver(
    slot: &WorkerSlot,
    shared: &PoolShared,
    actor: &ActorRef<WorkerMsg>,
    incoming: &mut Incoming,
    m: WorkerMessage,
    fds: &ReceivedFds,
) -> Option<ReadEnd> {
    // Buffers an `fds` message claimed belong to the message right after it.
    let mut buffers = incoming.buffers.take();
    if buffers.is_some() && !matches!(m, WorkerMessage::Reply(_) | WorkerMessage::Item { .. }) {
        return Some(ReadEnd::Protocol("an fds message followed by a message that takes no buffers".into()));
    }
    match m {
        WorkerMessage::Fds(lens) => {
            if !slot.capabilities().oob() {
                return Some(ReadEnd::Protocol("an fds message from a worker that did not announce `oob`".into()));
            }
            let Some(claimed) = fds.take(lens.len()) else {
                return Some(ReadEnd::Protocol(format!("an fds message for {} buffers that did not come with them", lens.len())));
            };
            // Each buffer at most `max_buffer` (and each is referenced exactly once, so this
            // bounds what inlining them copies).
            let limit = shared.spec.buffers.max_buffer;
            let mut mapped = Vec::with_capacity(lens.len());
            for (index, (fd, len)) in claimed.into_iter().zip(lens).enumerate() {
                let len = match usize::try_from(len) {
                    Ok(l) if l <= limit => l,
                    _ => return Some(ReadEnd::Protocol(format!("buffer {index}: {len} bytes, over the pool's {limit}-byte max_buffer"))),
                };
                match SharedBytes::from_fd(fd, len, index) {
                    Ok(b) => mapped.push(b),
                    Err(v) => return Some(fd_violation(&v)),
                }
            }
            incoming.buffers = Some(mapped);
        }
        WorkerMessage::Reply(r) => {
            // The reply's buffers go to the caller as they are (mapped, not copied), once the
            // value is known to reference each exactly once.
            let mut attached = None;
            if let (Some(buffers), Ok(value)) = (buffers.take(), &r.outcome) {
                if let Err(e) = pyvisor_protocol::check_buffer_refs(value, buffers.len()) {
                    return Some(ReadEnd::Protocol(format!("reply {}: {e}", r.id)));
                }
                attached = Some(Arc::from(buffers));
            }
            if matches!(&r.outcome, Err(e) if e.kind == RemoteErrorKind::Refused) && slot.stop_routing() {
                shared.dispatch.remove(slot.id);
            }
            let result = r.outcome.map(|value| Reply { value, buffers: attached }).map_err(Failure::Remote);
            let outcome = Outcome { result, span: r.span, started: None };
            if let Err(violation) = slot.complete_reply(r.id, r.attempt, outcome) {
                return Some(ReadEnd::Protocol(violation));
            }
        }
        WorkerMessage::Item { id, attempt, seq, mut value } => {
            if let Some(buffers) = buffers.take() {
                // Items do not carry mapped buffers to the caller yet: copied in here, once
                // (docs/buffers.md, "Not yet").
                match crate::buffers::inline_bytes(&value, &buffers) {
                    Ok(v) => value = v,
                    Err(e) => return Some(ReadEnd::Protocol(format!("stream {id}, item {seq}: {e}"))),
                }
                drop(buffers);
            }
            if let Err(violation) = slot.stream_item(id, attempt, seq, value) {
                return Some(ReadEnd::Protocol(violation));
            }
        }
        WorkerMessage::Started { id, attempt } => slot.mark_started(id, attempt),
        WorkerMessage::Beat(b) => slot.record_beat(b),
        WorkerMessage::Pong { nonce, beat } => {
            slot.record_beat(beat);
            slot.record_pong(nonce);
        }
        WorkerMessage::Hello(h) => {
            incoming.hellos += 1;
            if incoming.hellos > 1 {
                return Some(ReadEnd::Protocol("a second hello (only the first one counts)".into()));
            }
            if actor.cast(WorkerMsg::Hello(h)).is_err() {
                return Some(ReadEnd::Eof);
            }
        }
        _ => {}
    }
    None
}

/// What the reader carries from one message to the next.
#[derive(Default)]
struct Incoming {
    /// `hello`s seen (only the first counts).
    hellos: u32,
    /// Buffers claimed by an `fds` message, for the message after it.
    buffers: Option<Vec<SharedBytes>>,
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
            report: args.report,
            pid: None,
            family: None,
            exit_rx: None,
            stderr: Arc::new(StderrTail::default()),
            stderr_task: None,
            reader: None,
            tasks: Vec::new(),
            ready: false,
            cause: None,
            killed_by_us: false,
            stopping: false,
            draining_until: None,
            finalized: false,
            oom_before: oom_kill_count(),
            started: Instant::now(),
            ready_at: None,
            python_stack: None,
            ticker: None,
            limits: None,
            ping: None,
            next_ping: 0,
            last_ping_at: None,
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
        let pid = spawned.pid;
        st.pid = Some(pid);
        st.slot.set_process(Arc::clone(&spawned.leader));
        st.family = Some(Family::new(Arc::clone(&spawned.leader), spawned.family));

        let name: Arc<str> = Arc::clone(&st.shared.name);
        let pipe = |p: Option<std::os::fd::OwnedFd>| p.and_then(|p| tokio::net::unix::pipe::Receiver::from_owned_fd(p).ok());
        if let Some(out) = pipe(spawned.stdout.map(Into::into)) {
            st.tasks.push(tokio::spawn(forward_lines(out, Stream::Stdout, Arc::clone(&name), st.slot.id, None)));
        }
        if let Some(err) = pipe(spawned.stderr.map(Into::into)) {
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
        let leader = Arc::clone(&spawned.leader);
        st.tasks.push(tokio::spawn(async move {
            // Observed, not reaped: the family reaps the leader after its last group signal.
            let info = leader.exited().await.unwrap_or(ExitInfo { code: None, signal: None });
            let _ = exit_tx.send(Some(info));
            let _ = me.cast(WorkerMsg::Exited(info));
        }));

        let socket = spawned.socket;
        let fd_channel = spawned.fd_channel;
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
        st.slot.set_writer(FrameWriter::start(write, fd_channel));
        let (slot, shared, actor) = (Arc::clone(&st.slot), Arc::clone(&st.shared), myself.clone());
        let max_frame = spec.max_frame;
        st.reader = Some(tokio::spawn(async move {
            let mut incoming = Incoming::default();
            let end = read_frames(read, max_frame, |m, fds| deliver(&slot, &shared, &actor, &mut incoming, m, fds)).await;
            let eof = matches!(end, ReadEnd::Eof);
            let _ = actor.cast(WorkerMsg::ConnectionLost(end));
            eof
        }));
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
                st.limits = Some(Limits {
                    hung_after: spec.heartbeat_interval * spec.heartbeat_max_missed,
                    deaf_after: spec.heartbeat_interval * spec.heartbeat_max_missed,
                    harakiri_grace: spec.harakiri_grace,
                    memory_soft: r.memory_soft_limit,
                    memory_hard: r.memory_hard_limit,
                    ttl: r.ttl.map(|t| Duration::from_secs_f64(jittered(t.as_secs_f64(), r.jitter).max(0.0))),
                    max_requests: r.max_requests.map(|m| jittered(m as f64, r.jitter).round().max(1.0) as u64),
                });
                let period = (spec.heartbeat_interval / 2).clamp(Duration::from_millis(10), Duration::from_millis(500));
                st.ticker = Some(myself.send_interval(period, || WorkerMsg::Tick));
                st.slot.set_capabilities(h.capability_set());
                st.slot.set_state(WorkerState::Ready);
                (st.report)(WorkerReport::Ready { id: st.slot.id, hello: Box::new(h), startup: st.started.elapsed() });
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
                st.shared.dispatch.remove(st.slot.id);
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
                // Also while draining: a crash during a recycle is a crash.
                let err = st.finalize(Some(info)).await;
                st.abort_tasks();
                return Err(err);
            }
            WorkerMsg::Tick => {
                if st.tick().await {
                    st.stopping = true;
                    let grace = st.exit_grace();
                    shutdown_process(st, grace).await;
                    myself.stop(Some("recycled".into()));
                }
            }
            WorkerMsg::Shutdown(reply) => {
                st.stopping = true;
                let grace = st.shared.spec.shutdown_grace;
                shutdown_process(st, grace).await;
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
            WorkerMsg::Drain => {
                if st.stopping || st.draining_until.is_some() {
                    return Ok(());
                }
                st.slot.stop_routing();
                st.shared.dispatch.remove(st.slot.id);
                st.draining_until = Some(Instant::now() + st.shared.spec.recycle.drain_timeout);
                if !st.ready {
                    st.stopping = true;
                    shutdown_process(st, Duration::ZERO).await;
                    myself.stop(Some("recycled".into()));
                }
            }
        }
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
    st.slot.stop_routing();
    st.shared.dispatch.remove(st.slot.id);
    while st.slot.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let (Some(pid), Some(mut exit_rx), Some(family)) = (st.pid, st.exit_rx.clone(), st.family.take()) {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Some(w) = st.slot.writer() {
            let _ = w.send(&encode_shutdown(remaining.as_millis() as u64));
        }
        let mut exited = wait_exit(&mut exit_rx, remaining.max(Duration::from_millis(200))).await;
        if !exited {
            family.signal_group(libc::SIGTERM);
            exited = wait_exit(&mut exit_rx, spec.sigterm_wait).await;
        }
        if !exited {
            family.signal_group(libc::SIGKILL);
            exited = wait_exit(&mut exit_rx, Duration::from_secs(2)).await;
        }
        if !exited {
            tracing::error!(pool = %st.shared.name, worker = %st.slot.id, pid, "worker did not exit after SIGKILL");
        }
        // Whatever remains in the group (the watchdog, user subprocesses) and whatever left it
        // (escapees) goes too, and shutdown returns only once it is gone.
        family.bury(BURIAL_LIMIT).await;
    }
    st.slot.set_state(WorkerState::Dead);
    // Replies written before the exit are still in the socket: deliver them first.
    drain_reader(&mut st.reader).await;
    st.slot.close_and_fail(Failure::ShutDown);
    st.finalized = true;
    if let Some(w) = st.slot.writer() {
        w.close();
    }
    if let Some(t) = st.stderr_task.as_mut() {
        let _ = tokio::time::timeout(Duration::from_millis(200), t).await;
    }
}

/// Let the reader deliver what the worker wrote before it exited: it ends at EOF, once every
/// holder of the socket is gone. Bounded (an escaped process could hold the socket open).
/// Returns whether the socket was read to its end (EOF, not a protocol error or the bound).
async fn drain_reader(reader: &mut Option<JoinHandle<bool>>) -> bool {
    let Some(mut r) = reader.take() else { return false };
    match tokio::time::timeout(Duration::from_secs(1), &mut r).await {
        Ok(Ok(eof)) => eof,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::debug!("the worker's reader did not reach EOF within 1 s");
            r.abort();
            false
        }
    }
}

async fn wait_exit(rx: &mut watch::Receiver<Option<ExitInfo>>, d: Duration) -> bool {
    tokio::time::timeout(d, rx.wait_for(|e| e.is_some())).await.is_ok_and(|r| r.is_ok())
}

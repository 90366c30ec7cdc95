//! Worker slots: the shared state of one worker that callers, its reader task, its actor and
//! the router all touch — state, capacity, the call table, the writer, taint and hold.
//!
//! Owns the in-flight table and its invariants:
//! - a call is either registered in an open table (and gets exactly one outcome: a reply, a
//!   crash, or shutdown) or refused at once, so no call waits on a worker that already died;
//! - capacity in use (`in_flight`) is reservations not yet registered, plus calls registered,
//!   plus calls abandoned by their callers that the worker has not answered;
//! - a worker *held* for a call (a suspect retried alone) takes no other call until that call
//!   is answered or given back; every path that ends the call clears the hold.
//!
//! - a call that asked its worker to acknowledge its start (a keyed call on a worker that
//!   announced `started`) records the acknowledgement; when the worker dies, the call's crash
//!   says it started only if the acknowledgement was read, and that it did not start only if
//!   the dead worker's socket was read to its end without one (else: unknown).
//!
//! - a stream's entry hands each item to its caller as it arrives, checked against the stream's
//!   credit and sequence ([`super::stream`]), and its end (reply, crash, shutdown) after them.
//!
//! It does not choose slots ([`super::pick`]) nor make callers wait ([`super::queue`]); it
//! rings the [`CapacityBell`] when capacity frees so that waiters are served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::os::pidfd::Pidfd;
use pyvisor_protocol::{encode_cancel, Beat, Capabilities};
use tokio::sync::oneshot;

pub(crate) use super::outcome::{Failure, Outcome};
use super::stream::{StreamEvent, StreamFlow, StreamSink};
use crate::death::{CallInFlight, DeathCertificate, WorkerId};
use crate::io::writer::FrameWriter;
use crate::status::WorkerState;

/// The instant taint deadlines are measured from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Rung whenever a slot frees capacity or becomes usable, so that the queue can hand the
/// capacity to the first waiter that can use it. Costs one atomic load when nobody waits.
#[derive(Default)]
pub(crate) struct CapacityBell {
    /// Calls waiting in the queue (kept by the queue, under its lock).
    pub(crate) waiting: AtomicUsize,
    ring: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl CapacityBell {
    /// Install what a ring does (once, by the queue).
    pub(crate) fn on_ring(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.ring.set(f);
    }
    /// Wake the queue if anybody waits.
    pub(crate) fn ring(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            if let Some(f) = self.ring.get() {
                f();
            }
        }
    }
}

/// Whether a call's start was acknowledged by its worker (`started`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartAck {
    /// The call did not ask for one (plain `call`): whether it started is never known.
    NotAsked,
    /// Asked for, not (yet) seen.
    Awaiting,
    /// The worker said the function is about to run.
    Started,
}

struct Pending {
    attempt: u32,
    function: Arc<str>,
    sent_at: Instant,
    deadline: Option<Instant>,
    trace_id: Option<String>,
    alone: bool,
    start: StartAck,
    /// `None` once the caller gave up (abandoned): kept until the worker answers, because it
    /// still holds capacity and may still be running (harakiri, certificates).
    tx: Option<Answer>,
}

/// Where a call's answer goes.
enum Answer {
    /// A call: its one outcome.
    Call(oneshot::Sender<Outcome>),
    /// A stream: its items as they arrive, then its end.
    Stream(StreamSink),
}

impl Answer {
    fn send(self, outcome: Outcome) {
        match self {
            Answer::Call(tx) => {
                let _ = tx.send(outcome);
            }
            Answer::Stream(sink) => sink.end(outcome),
        }
    }
}

/// A call its caller gave up on that the worker may still be running (harakiri check).
#[derive(Debug, Clone)]
pub(crate) struct Abandoned {
    pub function: Arc<str>,
    pub deadline: Option<Instant>,
}

struct Table {
    open: bool,
    calls: HashMap<u64, Pending>,
}

/// The call was refused because the worker is no longer taking calls.
#[derive(Debug)]
pub(crate) struct SlotClosed;

/// The last beat seen from a worker.
#[derive(Debug, Clone)]
pub(crate) struct BeatRecord {
    pub at: Instant,
    pub beat: Beat,
}

/// One worker's shared state.
pub(crate) struct WorkerSlot {
    pub id: WorkerId,
    pub index: usize,
    pub spawned_at: Instant,
    max_in_flight: usize,
    state: AtomicU8,
    pid: AtomicU32,
    /// The process itself (a pidfd): what signals from outside the actor go through.
    process: OnceLock<Arc<Pidfd>>,
    in_flight: AtomicUsize,
    served: AtomicU64,
    table: Mutex<Table>,
    writer: OnceLock<Arc<FrameWriter>>,
    last_beat: Mutex<Option<BeatRecord>>,
    /// End of the taint window in ns after [`epoch`], 0 when never tainted: an atomic, since
    /// routing reads it for every slot on every call.
    tainted_until: AtomicU64,
    /// Id of the call this worker is held for (a suspect retried alone), or 0.
    held_by: AtomicU64,
    /// Nonce of the last `pong` (the worker's reading side is alive).
    last_pong: AtomicU64,
    /// It has been ready (sent `hello`) at some point.
    became_ready: AtomicBool,
    /// What the worker's `hello` announced ([`Capabilities::bits`]).
    capabilities: AtomicU8,
    bell: Arc<CapacityBell>,
    /// How the table closed, once it has (for session affinity: why a key's worker is gone).
    ended: tokio::sync::watch::Sender<Option<SlotEnd>>,
}

/// How a worker's table closed for good.
#[derive(Debug, Clone)]
pub(crate) enum SlotEnd {
    /// The worker died; its certificate.
    Crashed(Arc<DeathCertificate>),
    /// It stopped (drained for a recycle, or with its pool).
    Stopped,
}

impl WorkerSlot {
    pub(crate) fn new(id: WorkerId, index: usize, max_in_flight: usize, bell: Arc<CapacityBell>) -> Self {
        WorkerSlot {
            id,
            index,
            spawned_at: Instant::now(),
            max_in_flight,
            state: AtomicU8::new(WorkerState::Starting.as_u8()),
            pid: AtomicU32::new(0),
            process: OnceLock::new(),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            table: Mutex::new(Table { open: true, calls: HashMap::new() }),
            writer: OnceLock::new(),
            last_beat: Mutex::new(None),
            tainted_until: AtomicU64::new(0),
            held_by: AtomicU64::new(0),
            last_pong: AtomicU64::new(0),
            became_ready: AtomicBool::new(false),
            capabilities: AtomicU8::new(0),
            bell,
            ended: tokio::sync::watch::channel(None).0,
        }
    }

    /// Avoid this worker for `window` (it replaces a crashed one).
    pub(crate) fn taint(&self, window: Duration) {
        let until = epoch().elapsed().saturating_add(window).as_nanos().min(u128::from(u64::MAX)) as u64;
        self.tainted_until.store(until.max(1), Ordering::Release);
    }

    /// Whether the taint window is still open.
    pub(crate) fn is_tainted(&self) -> bool {
        match self.tainted_until.load(Ordering::Acquire) {
            0 => false,
            until => (epoch().elapsed().as_nanos() as u64) < until,
        }
    }

    pub(crate) fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Acquire))
    }
    pub(crate) fn is_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == WorkerState::Ready.as_u8()
    }
    /// Set the state. (Becoming ready rings nothing: a worker is routable only once the router
    /// inserts it into the dispatcher, which serves waiters then.)
    pub(crate) fn set_state(&self, s: WorkerState) {
        self.state.store(s.as_u8(), Ordering::Release);
        if s == WorkerState::Ready {
            self.became_ready.store(true, Ordering::Release);
        }
    }
    /// Record the capabilities the worker's `hello` announced (before it becomes ready).
    pub(crate) fn set_capabilities(&self, c: Capabilities) {
        self.capabilities.store(c.bits(), Ordering::Release);
    }
    /// The capabilities the worker's `hello` announced (none before `hello`).
    pub(crate) fn capabilities(&self) -> Capabilities {
        Capabilities::from_bits(self.capabilities.load(Ordering::Acquire))
    }
    /// Whether the worker has been ready (sent `hello`) at some point.
    pub(crate) fn became_ready(&self) -> bool {
        self.became_ready.load(Ordering::Acquire)
    }
    /// Ready → Draining (a worker that said it is going away); false if it was not ready.
    pub(crate) fn stop_routing(&self) -> bool {
        self.state
            .compare_exchange(
                WorkerState::Ready.as_u8(),
                WorkerState::Draining.as_u8(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
    pub(crate) fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::Acquire) {
            0 => None,
            p => Some(p),
        }
    }
    /// The worker's process, once spawned.
    pub(crate) fn process(&self) -> Option<&Arc<Pidfd>> {
        self.process.get()
    }
    pub(crate) fn set_process(&self, process: Arc<Pidfd>) {
        self.pid.store(process.pid(), Ordering::Release);
        let _ = self.process.set(process);
    }
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::Acquire)
    }
    pub(crate) fn set_writer(&self, w: Arc<FrameWriter>) {
        let _ = self.writer.set(w);
    }
    pub(crate) fn writer(&self) -> Option<&Arc<FrameWriter>> {
        self.writer.get()
    }
    /// The call this worker is held for, or 0.
    pub(crate) fn held_by(&self) -> u64 {
        self.held_by.load(Ordering::Acquire)
    }

    /// Take one unit of capacity if the worker is ready, not held, and has room. `ring`: ring
    /// the bell when backing off (false only under the queue's lock, which serves waiters
    /// itself).
    pub(crate) fn try_reserve(&self, ring: bool) -> bool {
        if !self.is_ready() || self.held_by() != 0 {
            return false;
        }
        let mut cur = self.in_flight.load(Ordering::Acquire);
        loop {
            if cur >= self.max_in_flight {
                return false;
            }
            match self.in_flight.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        // A suspect may have been given the worker meanwhile: back off, and let the queue look
        // again (our transient unit may have kept the suspect from taking it).
        if self.held_by() != 0 {
            self.release_units(1, ring);
            return false;
        }
        true
    }

    /// Take the worker for call `id` alone: only if it is ready, held by nobody else (or by
    /// `id`) and has nothing in flight. On success the worker is held for `id`. Called only
    /// under the queue's lock.
    pub(crate) fn try_reserve_alone(&self, id: u64) -> bool {
        if !self.is_ready() {
            return false;
        }
        let was = self.held_by();
        if was != id && (was != 0 || self.held_by.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire).is_err()) {
            return false;
        }
        if self.in_flight.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return true;
        }
        if was != id {
            // Not idle: give the hold back (the queue may hold it on purpose instead).
            self.unhold_quiet(id);
        }
        false
    }

    /// Hold the worker for call `id` so that it drains: no new call joins it. False if it is
    /// not ready or held already.
    pub(crate) fn hold(&self, id: u64) -> bool {
        self.is_ready() && self.held_by.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Clear a hold for `id` without ringing (under the queue's lock).
    pub(crate) fn unhold_quiet(&self, id: u64) -> bool {
        self.held_by.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Give back `n` units of capacity (saturating), ringing the bell if `ring`.
    fn release_units(&self, n: usize, ring: bool) {
        if n == 0 {
            return;
        }
        let _ = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(n)));
        if ring {
            self.bell.ring();
        }
    }

    /// Give back a reservation that was never registered (and its hold, for `alone_id`).
    pub(crate) fn unreserve(&self, alone_id: u64, ring: bool) {
        if alone_id != 0 {
            self.unhold_quiet(alone_id);
        }
        self.release_units(1, ring);
    }

    /// Register a call on a reservation; fails if the worker stopped taking calls (the
    /// reservation is then still the caller's to give back).
    pub(crate) fn register(
        &self,
        id: u64,
        attempt: u32,
        function: &Arc<str>,
        deadline: Option<Instant>,
        trace_id: Option<String>,
        alone: bool,
    ) -> Result<oneshot::Receiver<Outcome>, SlotClosed> {
        let (tx, rx) = oneshot::channel();
        self.register_answer(id, attempt, function, deadline, trace_id, alone, Answer::Call(tx))?;
        Ok(rx)
    }

    /// Register a stream on a reservation, under `flow`'s credit: its items and then its end
    /// arrive on the receiver. Fails as [`Self::register`] does.
    pub(crate) fn register_stream(
        &self,
        id: u64,
        attempt: u32,
        function: &Arc<str>,
        deadline: Option<Instant>,
        alone: bool,
        flow: Arc<StreamFlow>,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<StreamEvent>, SlotClosed> {
        let (sink, rx) = StreamSink::new(flow);
        self.register_answer(id, attempt, function, deadline, None, alone, Answer::Stream(sink))?;
        Ok(rx)
    }

    #[allow(clippy::too_many_arguments)]
    fn register_answer(
        &self,
        id: u64,
        attempt: u32,
        function: &Arc<str>,
        deadline: Option<Instant>,
        trace_id: Option<String>,
        alone: bool,
        tx: Answer,
    ) -> Result<(), SlotClosed> {
        let mut t = self.table.lock().map_err(|_| SlotClosed)?;
        if !t.open {
            return Err(SlotClosed);
        }
        t.calls.insert(
            id,
            Pending {
                attempt,
                function: Arc::clone(function),
                sent_at: Instant::now(),
                deadline,
                trace_id,
                alone,
                start: StartAck::NotAsked,
                tx: Some(tx),
            },
        );
        Ok(())
    }

    /// Attempt `attempt` of call `id` (registered, not yet written) asks its worker for a
    /// `started` acknowledgement.
    pub(crate) fn expect_start(&self, id: u64, attempt: u32) {
        if let Ok(mut t) = self.table.lock() {
            if let Some(p) = t.calls.get_mut(&id).filter(|p| p.attempt == attempt) {
                p.start = StartAck::Awaiting;
            }
        }
    }

    /// The worker acknowledged the start of attempt `attempt` of call `id` (an unknown or
    /// older one is ignored, like a late reply).
    pub(crate) fn mark_started(&self, id: u64, attempt: u32) {
        if let Ok(mut t) = self.table.lock() {
            if let Some(p) = t.calls.get_mut(&id).filter(|p| p.attempt == attempt && p.start == StartAck::Awaiting) {
                p.start = StartAck::Started;
            }
        }
    }

    /// Complete a call with a worker's reply. Returns false for a reply nobody held a place for
    /// (an older attempt, or an unknown id), which is dropped.
    #[cfg(test)]
    pub(crate) fn complete(&self, id: u64, attempt: u32, outcome: Outcome) -> bool {
        self.complete_reply(id, attempt, outcome).unwrap_or(false)
    }

    /// An item of stream `id`, attempt `attempt`, arrived: handed to its caller if it waits
    /// (an item for an abandoned stream or an older attempt is dropped). An error names a
    /// protocol violation: an item past the credit or out of sequence, or for a call that is
    /// not a stream.
    pub(crate) fn stream_item(&self, id: u64, attempt: u32, seq: u64, value: Bytes) -> Result<(), String> {
        let Ok(mut t) = self.table.lock() else { return Ok(()) };
        match t.calls.get_mut(&id) {
            Some(p) if p.attempt == attempt => match &mut p.tx {
                Some(Answer::Stream(sink)) => sink.item(seq, value),
                Some(Answer::Call(_)) => Err(format!("a stream item for call {id}, which is not a stream")),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// [`Self::complete`], checking a stream's end: the count its reply gives must be the
    /// items received (an error names the violation; the caller is told of nothing then, the
    /// worker's death ends the stream).
    pub(crate) fn complete_reply(&self, id: u64, attempt: u32, outcome: Outcome) -> Result<bool, String> {
        let pending = {
            let Ok(mut t) = self.table.lock() else { return Ok(false) };
            match t.calls.get(&id) {
                Some(p) if p.attempt == attempt => {
                    if let (Some(Answer::Stream(sink)), Ok(count)) = (&p.tx, &outcome.result) {
                        let said = rmp_serde::from_slice::<u64>(&count.value).ok();
                        if said != Some(sink.received()) {
                            let said = said.map_or_else(|| "a value that is not a count".to_string(), |n| n.to_string());
                            return Err(format!("stream {id} ended saying it sent {said} items; {} arrived", sink.received()));
                        }
                    }
                    t.calls.remove(&id)
                }
                _ => None,
            }
        };
        let Some(p) = pending else { return Ok(false) };
        if p.alone {
            self.unhold_quiet(id);
        }
        self.served.fetch_add(1, Ordering::AcqRel);
        // Capacity first, then the caller: a caller that calls again at once finds room.
        self.release_units(1, true);
        if let Some(tx) = p.tx {
            tx.send(outcome);
        }
        Ok(true)
    }

    /// The caller gave up on a call (timeout, dropped future). It stays in the table, holding
    /// its capacity, until the worker answers it (a cancelled call answers at once; an inline
    /// call that ignores `cancel` keeps its worker busy, and routing must know) or dies.
    /// Returns true if it was still pending (send `cancel` then).
    pub(crate) fn abandon(&self, id: u64) -> bool {
        let Ok(mut t) = self.table.lock() else { return false };
        if !t.open {
            return false;
        }
        match t.calls.get_mut(&id) {
            Some(p) if p.tx.is_some() => {
                p.tx = None;
                true
            }
            _ => false,
        }
    }

    /// Abandoned calls the worker still holds for which `running` holds (harakiri check).
    pub(crate) fn abandoned_running(&self, running: impl Fn(u64) -> bool) -> Vec<(u64, Abandoned)> {
        let Ok(t) = self.table.lock() else { return Vec::new() };
        t.calls
            .iter()
            .filter(|(id, p)| p.tx.is_none() && running(**id))
            .map(|(id, p)| (*id, Abandoned { function: Arc::clone(&p.function), deadline: p.deadline }))
            .collect()
    }

    /// Describe every call the worker holds (for a death certificate), abandoned ones included,
    /// without removing them.
    pub(crate) fn calls_in_flight(&self) -> Vec<CallInFlight> {
        let Ok(t) = self.table.lock() else { return Vec::new() };
        let mut v: Vec<CallInFlight> = t
            .calls
            .iter()
            .map(|(id, p)| CallInFlight {
                id: *id,
                function: p.function.to_string(),
                attempt: p.attempt,
                running_for: p.sent_at.elapsed(),
                trace_id: p.trace_id.clone(),
                abandoned: p.tx.is_none(),
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Calls in the table (registered, abandoned ones included).
    #[cfg(test)]
    pub(crate) fn table_len(&self) -> usize {
        self.table.lock().map_or(0, |t| t.calls.len())
    }

    /// Whether the table still takes calls.
    pub(crate) fn is_open(&self) -> bool {
        self.table.lock().is_ok_and(|t| t.open)
    }

    /// Stop taking calls and end every pending call with `failure`, giving back their capacity
    /// and any hold. Returns how many callers were told. Whether an unacknowledged call
    /// started is unknown (see [`Self::close_and_fail_read`]).
    pub(crate) fn close_and_fail(&self, failure: Failure) -> usize {
        self.close_and_fail_read(failure, false)
    }

    /// [`Self::close_and_fail`] for a dead worker; `read_to_end`: its socket was read to EOF,
    /// so a call that asked for a start acknowledgement and got none did not start.
    pub(crate) fn close_and_fail_read(&self, failure: Failure, read_to_end: bool) -> usize {
        let drained: Vec<Pending> = match self.table.lock() {
            Ok(mut t) => {
                t.open = false;
                t.calls.drain().map(|(_, p)| p).collect()
            }
            Err(_) => Vec::new(),
        };
        // The first closing says how it ended.
        let end = match &failure {
            Failure::Crashed(c) => SlotEnd::Crashed(Arc::clone(c)),
            _ => SlotEnd::Stopped,
        };
        self.ended.send_if_modified(|e| e.is_none() && e.replace(end).is_none());
        self.held_by.store(0, Ordering::Release);
        self.release_units(drained.len(), true);
        let mut told = 0;
        for p in drained {
            if let Some(tx) = p.tx {
                told += 1;
                let started = match p.start {
                    StartAck::NotAsked => None,
                    StartAck::Started => Some(true),
                    StartAck::Awaiting => read_to_end.then_some(false),
                };
                tx.send(Outcome { result: Err(failure.clone()), span: None, started });
            }
        }
        told
    }

    /// How the table closed: at once if it has, else once it does (a worker whose death was
    /// seen has its certificate a moment later, after its process is buried).
    pub(crate) async fn ended(&self) -> SlotEnd {
        let mut rx = self.ended.subscribe();
        let end = match rx.wait_for(Option::is_some).await {
            Ok(e) => e.clone(),
            Err(_) => None,
        };
        end.unwrap_or(SlotEnd::Stopped)
    }

    /// A `pong` arrived.
    pub(crate) fn record_pong(&self, nonce: u64) {
        self.last_pong.store(nonce, Ordering::Release);
    }
    /// Nonce of the last `pong` seen.
    pub(crate) fn last_pong(&self) -> u64 {
        self.last_pong.load(Ordering::Acquire)
    }

    pub(crate) fn record_beat(&self, beat: Beat) {
        if let Ok(mut b) = self.last_beat.lock() {
            *b = Some(BeatRecord { at: Instant::now(), beat });
        }
    }
    pub(crate) fn last_beat(&self) -> Option<BeatRecord> {
        self.last_beat.lock().ok().and_then(|b| b.clone())
    }
    pub(crate) fn last_beat_age(&self) -> Option<Duration> {
        self.last_beat().map(|b| b.at.elapsed())
    }
}

/// A call registered on a worker, from the caller's side. Dropping it before the outcome
/// arrived (timeout, dropped future) abandons the call and sends `cancel`.
pub(crate) struct InFlight {
    pub(crate) slot: Arc<WorkerSlot>,
    pub(crate) id: u64,
    armed: bool,
}

impl InFlight {
    pub(crate) fn new(slot: Arc<WorkerSlot>, id: u64) -> Self {
        InFlight { slot, id, armed: true }
    }
    /// The outcome arrived: nothing to abandon.
    pub(crate) fn done(&mut self) {
        self.armed = false;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.armed && self.slot.abandon(self.id) {
            if let Some(w) = self.slot.writer() {
                let _ = w.send(&encode_cancel(self.id));
            }
        }
    }
}

//! Worker slots: the shared state of one worker that callers, its reader task, its actor and
//! the router all touch — state, in-flight count, the call table, the writer.
//!
//! Owns the in-flight table and its invariant: a call is either registered in an open table
//! (and will get exactly one outcome: a reply, a crash, or shutdown) or refused at once — so no
//! call can wait on a worker that already died. It does not choose slots (see
//! [`crate::routing`]) nor talk to processes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pyvisor_protocol::{Beat, RemoteError, SpanTiming};
use tokio::sync::oneshot;

use crate::death::{CallInFlight, DeathCertificate, WorkerId};
use crate::writer::FrameWriter;

/// What a worker is doing, as the pool sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, waiting for `hello`.
    Starting,
    /// Taking calls.
    Ready,
    /// Finishing its calls, taking no new ones.
    Draining,
    /// Gone.
    Dead,
}

impl WorkerState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => WorkerState::Starting,
            1 => WorkerState::Ready,
            2 => WorkerState::Draining,
            _ => WorkerState::Dead,
        }
    }
    fn as_u8(self) -> u8 {
        match self {
            WorkerState::Starting => 0,
            WorkerState::Ready => 1,
            WorkerState::Draining => 2,
            WorkerState::Dead => 3,
        }
    }
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Dead => "dead",
        })
    }
}

/// The instant taint deadlines are measured from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Why a call ended without a reply value.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    Remote(RemoteError),
    Crashed(Arc<DeathCertificate>),
    ShutDown,
}

/// What a waiting caller gets: the result, and the function's span timing when the worker
/// reported one (a traced call that ran).
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) result: Result<Bytes, Failure>,
    pub(crate) span: Option<SpanTiming>,
}

struct Pending {
    attempt: u32,
    function: String,
    sent_at: Instant,
    deadline: Option<Instant>,
    trace_id: Option<String>,
    tx: oneshot::Sender<Outcome>,
}

/// A call its caller gave up on (timeout, dropped future) that the worker may still be running:
/// kept so that harakiri can find calls that overrun their deadline.
#[derive(Debug, Clone)]
pub(crate) struct Abandoned {
    pub function: String,
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
    in_flight: AtomicUsize,
    served: AtomicU64,
    table: Mutex<Table>,
    writer: OnceLock<Arc<FrameWriter>>,
    last_beat: Mutex<Option<BeatRecord>>,
    /// End of the taint window in ns after [`epoch`], 0 when never tainted: an atomic, since
    /// routing reads it for every slot on every call.
    tainted_until: AtomicU64,
    /// Id of the call that has this worker to itself (a suspect retried alone), or 0.
    exclusive: AtomicU64,
    abandoned: Mutex<HashMap<u64, Abandoned>>,
}

impl WorkerSlot {
    pub(crate) fn new(id: WorkerId, index: usize, max_in_flight: usize) -> Self {
        WorkerSlot {
            id,
            index,
            spawned_at: Instant::now(),
            max_in_flight,
            state: AtomicU8::new(WorkerState::Starting.as_u8()),
            pid: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            table: Mutex::new(Table { open: true, calls: HashMap::new() }),
            writer: OnceLock::new(),
            last_beat: Mutex::new(None),
            tainted_until: AtomicU64::new(0),
            exclusive: AtomicU64::new(0),
            abandoned: Mutex::new(HashMap::new()),
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

    /// Take the worker for one call alone: only if it is ready and has nothing in flight.
    pub(crate) fn try_reserve_exclusive(&self, call_id: u64) -> bool {
        if self.state() != WorkerState::Ready {
            return false;
        }
        if self.exclusive.compare_exchange(0, call_id, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        if self.in_flight.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
            self.exclusive.store(0, Ordering::Release);
            return false;
        }
        true
    }

    fn clear_exclusive(&self, id: u64) {
        let _ = self.exclusive.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    pub(crate) fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Acquire))
    }
    pub(crate) fn set_state(&self, s: WorkerState) {
        self.state.store(s.as_u8(), Ordering::Release);
    }
    pub(crate) fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::Acquire) {
            0 => None,
            p => Some(p),
        }
    }
    pub(crate) fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Release);
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

    /// Take one unit of capacity if the worker is ready and has room.
    pub(crate) fn try_reserve(&self) -> bool {
        if self.state() != WorkerState::Ready || self.exclusive.load(Ordering::Acquire) != 0 {
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
        // A suspect may have taken the worker to itself meanwhile: back off.
        if self.exclusive.load(Ordering::Acquire) != 0 {
            self.release();
            return false;
        }
        true
    }

    /// Give back one unit of capacity.
    pub(crate) fn release(&self) {
        let _ = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
    }

    /// Register a call; fails if the worker stopped taking calls (the caller picks again).
    pub(crate) fn register(
        &self,
        id: u64,
        attempt: u32,
        function: &str,
        deadline: Option<Instant>,
        trace_id: Option<String>,
    ) -> Result<oneshot::Receiver<Outcome>, SlotClosed> {
        let (tx, rx) = oneshot::channel();
        let mut t = self.table.lock().map_err(|_| SlotClosed)?;
        if !t.open {
            return Err(SlotClosed);
        }
        t.calls.insert(
            id,
            Pending { attempt, function: function.to_string(), sent_at: Instant::now(), deadline, trace_id, tx },
        );
        Ok(rx)
    }

    /// Complete a call with a worker's reply. Returns false for a reply nobody waits for
    /// (cancelled, timed out, or an older attempt), which is dropped.
    pub(crate) fn complete(&self, id: u64, attempt: u32, outcome: Outcome) -> bool {
        let pending = {
            let Ok(mut t) = self.table.lock() else { return false };
            match t.calls.get(&id) {
                Some(p) if p.attempt == attempt => t.calls.remove(&id),
                _ => None,
            }
        };
        match pending {
            Some(p) => {
                self.clear_exclusive(id);
                self.release();
                self.served.fetch_add(1, Ordering::AcqRel);
                let _ = p.tx.send(outcome);
                true
            }
            None => {
                // The answer to a call its caller gave up on: the worker is free of it now.
                let was_abandoned = self.abandoned.lock().is_ok_and(|mut a| a.remove(&id).is_some());
                if was_abandoned {
                    self.clear_exclusive(id);
                    self.release();
                }
                was_abandoned
            }
        }
    }

    /// Forget a call the caller gave up on. Its capacity stays taken until the worker answers
    /// it (a cancelled call answers at once; an inline call that ignores `cancel` keeps its
    /// worker busy, and routing must know). Returns true if it was still pending.
    pub(crate) fn abandon(&self, id: u64) -> bool {
        let removed = self.table.lock().ok().and_then(|mut t| if t.open { t.calls.remove(&id) } else { None });
        match removed {
            Some(p) => {
                if let Ok(mut a) = self.abandoned.lock() {
                    a.insert(id, Abandoned { function: p.function, deadline: p.deadline });
                }
                true
            }
            None => false,
        }
    }

    /// Abandoned calls the worker still holds for which `running` holds (harakiri check).
    pub(crate) fn abandoned_running(&self, running: impl Fn(u64) -> bool) -> Vec<(u64, Abandoned)> {
        let Ok(a) = self.abandoned.lock() else { return Vec::new() };
        a.iter().filter(|(id, _)| running(**id)).map(|(id, c)| (*id, c.clone())).collect()
    }

    /// Describe the calls in flight (for a death certificate) without removing them.
    pub(crate) fn calls_in_flight(&self) -> Vec<CallInFlight> {
        let Ok(t) = self.table.lock() else { return Vec::new() };
        let mut v: Vec<CallInFlight> = t
            .calls
            .iter()
            .map(|(id, p)| CallInFlight {
                id: *id,
                function: p.function.clone(),
                attempt: p.attempt,
                running_for: p.sent_at.elapsed(),
                trace_id: p.trace_id.clone(),
                abandoned: false,
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Stop taking calls and end every pending call with `failure`. Returns how many ended.
    pub(crate) fn close_and_fail(&self, failure: Failure) -> usize {
        let drained: Vec<Pending> = match self.table.lock() {
            Ok(mut t) => {
                t.open = false;
                t.calls.drain().map(|(_, p)| p).collect()
            }
            Err(_) => Vec::new(),
        };
        if let Ok(mut a) = self.abandoned.lock() {
            a.clear();
        }
        let n = drained.len();
        for p in drained {
            self.release();
            let _ = p.tx.send(Outcome { result: Err(failure.clone()), span: None });
        }
        n
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

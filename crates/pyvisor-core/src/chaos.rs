//! Chaos: fault injection for tests — kill or stop a worker, or arm a chaos point so the next
//! call passing `pyvisor_worker.chaos.point(NAME)` in Python kills, stops or bloats its worker
//! exactly there (e.g. before or after the function's side effect).
//!
//! Owns only the injection; what follows (crash barrier, hang detection, recycling) is the
//! ordinary machinery, which is the point.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use pyvisor_protocol::{encode_call, CallHeader};
use tokio::time::Instant;

use crate::death::WorkerId;
use crate::dispatch::{Failure, WorkerSlot};
use crate::error::CallError;
use crate::shared::PoolShared;
use crate::status::WorkerState;

/// What an armed chaos point does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChaosAction {
    /// The worker SIGKILLs itself.
    Kill,
    /// The worker SIGSTOPs itself (a hang: the heartbeat monitor must notice).
    Stop,
    /// The worker allocates and touches this many MiB (to pass a memory limit).
    Alloc {
        /// Mebibytes.
        mib: u64,
    },
}

impl ChaosAction {
    fn wire(self) -> String {
        match self {
            ChaosAction::Kill => "kill".into(),
            ChaosAction::Stop => "stop".into(),
            ChaosAction::Alloc { mib } => format!("alloc:{mib}"),
        }
    }
}

/// Fault injection into one pool; from [`crate::Pool::chaos`].
///
/// ```no_run
/// # async fn demo(pool: pyvisor_core::Pool) -> Result<(), pyvisor_core::CallError> {
/// use pyvisor_core::ChaosAction;
/// pool.chaos().arm("after_side_effect", ChaosAction::Kill).await?;
/// let killed = pool.chaos().kill(None); // SIGKILL a random ready worker
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Chaos {
    pub(crate) shared: Arc<PoolShared>,
}

impl Chaos {
    fn ready(&self) -> Vec<Arc<WorkerSlot>> {
        self.shared.dispatch.table.routable().into_iter().filter(|s| s.state() == WorkerState::Ready).collect()
    }

    /// Ready workers and their pids.
    pub fn ready_workers(&self) -> Vec<(WorkerId, u32)> {
        self.ready().iter().filter_map(|s| Some((s.id, s.pid()?))).collect()
    }

    fn signal(&self, worker: Option<WorkerId>, sig: i32) -> Option<u32> {
        let ready: Vec<_> = self.ready().into_iter().filter(|s| s.process().is_some()).collect();
        let slot = match worker {
            Some(w) => ready.iter().find(|s| s.id == w)?,
            None if ready.is_empty() => return None,
            None => &ready[rand::random_range(0..ready.len())],
        };
        // Through the pidfd: a worker that died meanwhile is not replaced by whoever got its pid.
        let process = slot.process()?;
        process.signal(sig).ok().filter(|sent| *sent).map(|_| process.pid())
    }

    /// SIGKILL a ready worker (`None`: a random one). Returns its pid.
    pub fn kill(&self, worker: Option<WorkerId>) -> Option<u32> {
        self.signal(worker, libc::SIGKILL)
    }

    /// SIGSTOP a ready worker (`None`: a random one). Returns its pid.
    pub fn stop(&self, worker: Option<WorkerId>) -> Option<u32> {
        self.signal(worker, libc::SIGSTOP)
    }

    /// Arm chaos point `point` with `action` on every ready worker; each fires once. Returns
    /// how many workers were armed.
    pub async fn arm(&self, point: &str, action: ChaosAction) -> Result<usize, CallError> {
        let payload = rmp_serde::to_vec(&(point, action.wire())).map_err(|e| CallError::Serialize {
            function: "__pyvisor_chaos_arm".into(),
            detail: e.to_string(),
        })?;
        let mut armed = 0;
        for slot in self.ready() {
            call_on_slot(&self.shared, &slot, "__pyvisor_chaos_arm", &payload, Duration::from_secs(10)).await?;
            armed += 1;
        }
        Ok(armed)
    }
}

/// Call `function` on this particular worker (chaos arming), waiting up to `timeout` for room
/// on it. Bypasses the queue and the crash barrier on purpose.
async fn call_on_slot(
    shared: &PoolShared,
    slot: &Arc<WorkerSlot>,
    function: &str,
    payload: &[u8],
    timeout: Duration,
) -> Result<bytes::Bytes, CallError> {
    let until = Instant::now() + timeout;
    let gone = || CallError::Worker { function: function.to_string(), message: format!("worker {} is gone", slot.id) };
    while !slot.try_reserve(true) {
        if slot.state() == WorkerState::Dead {
            return Err(gone());
        }
        if Instant::now() >= until {
            return Err(CallError::Timeout { function: function.to_string(), after: timeout, sent: false });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let header = CallHeader {
        id: shared.next_call_id.fetch_add(1, Ordering::Relaxed),
        attempt: 1,
        function,
        deadline_ms: Some(crate::clock::unix_ms(until)),
        traceparent: None,
        tracestate: None,
    };
    let name: Arc<str> = Arc::from(function);
    let Ok(rx) = slot.register(header.id, 1, &name, Some(until.into_std()), None, false) else {
        slot.unreserve(0, true);
        return Err(gone());
    };
    let mut in_flight = crate::dispatch::slot::InFlight::new(Arc::clone(slot), header.id);
    if let Some(w) = slot.writer() {
        let _ = w.send(&encode_call(&header, payload));
    }
    let outcome = tokio::time::timeout_at(until, rx).await;
    if outcome.is_ok() {
        // Answered: nothing to abandon (a timed-out call is abandoned and cancelled on drop).
        in_flight.done();
    }
    match outcome.map(|o| o.map(|o| o.result)) {
        Ok(Ok(Ok(reply))) => reply.into_inlined().map_err(|e| CallError::Deserialize { function: function.to_string(), detail: e.to_string() }),
        Ok(Ok(Err(Failure::Remote(e)))) => Err(CallError::from_remote(function, e, shared.functions().as_deref())),
        Ok(Ok(Err(Failure::Crashed(certificate)))) => {
            Err(CallError::WorkerCrashed { function: function.to_string(), attempts: 1, certificate, started: true, delivered: None })
        }
        Ok(Ok(Err(Failure::ShutDown))) | Ok(Err(_)) => Err(shared.closed_error()),
        Err(_) => Err(CallError::Timeout { function: function.to_string(), after: timeout, sent: true }),
    }
}

//! Chaos: fault injection for tests — kill or stop a worker, or arm a chaos point so the next
//! call passing `pyvisor_worker.chaos.point(NAME)` in Python kills, stops or bloats its worker
//! exactly there (e.g. before or after the function's side effect).
//!
//! Owns only the injection; what follows (crash barrier, hang detection, recycling) is the
//! ordinary machinery, which is the point.

use std::sync::Arc;
use std::time::Duration;

use crate::death::WorkerId;
use crate::error::CallError;
use crate::pool::{call_on_slot, PoolShared};
use crate::slot::{WorkerSlot, WorkerState};

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
        self.shared.table.routable().into_iter().filter(|s| s.state() == WorkerState::Ready).collect()
    }

    /// Ready workers and their pids.
    pub fn ready_workers(&self) -> Vec<(WorkerId, u32)> {
        self.ready().iter().filter_map(|s| Some((s.id, s.pid()?))).collect()
    }

    fn signal(&self, worker: Option<WorkerId>, sig: i32) -> Option<u32> {
        let ready = self.ready_workers();
        let pid = match worker {
            Some(w) => ready.iter().find(|(id, _)| *id == w)?.1,
            None if ready.is_empty() => return None,
            None => ready[rand::random_range(0..ready.len())].1,
        };
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
        Some(pid)
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

//! The pool's bounded queue: where a call waits when every ready worker is at `max_in_flight`.
//!
//! Owns the bound (`max_queue`, full → `Overloaded` at once), the wait (woken when capacity
//! frees or membership changes) and the wait's limits. It holds no calls itself: a waiting
//! caller holds its own call and retries the pick when woken.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::routing::{PickMode, SlotTable};
use crate::slot::WorkerSlot;

/// Why a queued call gave up.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum QueueExit {
    /// `max_queue` calls are already waiting.
    Full,
    /// The limit passed (queue timeout or the call's deadline, whichever is first).
    TimedOut,
    /// The pool closed.
    Closed,
}

/// Waiting room for capacity.
#[derive(Default)]
pub(crate) struct CapacityQueue {
    notify: Notify,
    waiting: AtomicUsize,
    closed: AtomicBool,
}

struct Waiting<'a>(&'a AtomicUsize);
impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl CapacityQueue {
    /// Calls waiting now.
    pub(crate) fn len(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Capacity was released: wake one waiter, if any.
    pub(crate) fn on_release(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_one();
        }
    }

    /// Membership changed (a worker became ready): let every waiter look again.
    pub(crate) fn on_membership_change(&self) {
        self.notify.notify_waiters();
    }

    /// Refuse new waits and wake everyone.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Reserve capacity on some ready worker without waiting: `None` when the call would have
    /// to wait ([`CapacityQueue::acquire`] then).
    pub(crate) fn try_acquire(&self, table: &SlotTable, mode: PickMode) -> Option<Result<Arc<WorkerSlot>, QueueExit>> {
        if self.is_closed() {
            return Some(Err(QueueExit::Closed));
        }
        table.pick(mode).map(Ok)
    }

    /// Reserve capacity on some ready worker, waiting in the queue until `until`.
    pub(crate) async fn acquire(
        &self,
        table: &SlotTable,
        mode: PickMode,
        max_queue: usize,
        until: Instant,
    ) -> Result<Arc<WorkerSlot>, QueueExit> {
        if let Some(now) = self.try_acquire(table, mode) {
            return now;
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(QueueExit::Full);
        }
        let _w = Waiting(&self.waiting);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_closed() {
                return Err(QueueExit::Closed);
            }
            if let Some(s) = table.pick(mode) {
                return Ok(s);
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return Err(QueueExit::TimedOut);
            }
        }
    }
}

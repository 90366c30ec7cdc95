//! A tower service's readiness: [`Readiness`], the wait for room in its pool's queue.
//!
//! Owns one service clone's pending wait (a [`RoomWait`] on the pool's dispatcher) and the
//! check-then-wait order that loses no wake-up. The services themselves ([`super::function`],
//! [`super::service`]) only hold one.

use std::task::{Context, Poll};

use super::handle::Pool;
use crate::dispatch::RoomWait;

/// A service's wait for room in its pool's queue (one per service clone: a [`super::Function`] or a
/// [`super::PoolService`]).
#[derive(Default)]
pub(crate) struct Readiness {
    wait: Option<RoomWait>,
}

impl Readiness {
    /// Ready when `pool`'s queue has room for another call (or the pool is closed: the call
    /// then fails at once with `ShutDown`/`PoolFailed`); otherwise registers `cx` to be woken
    /// when a queued call leaves the line.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>, pool: &Pool) -> Poll<()> {
        let (dispatch, max_queue) = pool.queue();
        loop {
            if dispatch.has_room(max_queue) {
                self.wait = None;
                return Poll::Ready(());
            }
            match &mut self.wait {
                // Made before the next check, so that room made in between is not missed.
                None => self.wait = Some(dispatch.wait_for_room()),
                Some(wait) => match wait.poll(cx) {
                    Poll::Ready(()) => self.wait = None,
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }
}

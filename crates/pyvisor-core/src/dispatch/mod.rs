//! Dispatch: how a call gets a worker, without any actor on its path.
//!
//! - [`outcome`]: what a call's waiter is told in the end (shared by `slot` and `stream`);
//! - [`slot`]: one worker's shared state — readiness, capacity, the call table (every
//!   registered call gets exactly one outcome), taint, and the hold a suspect puts on it;
//! - [`pick`]: the routing table and the choice of worker (taint rule, power of two choices,
//!   alone for suspects);
//! - [`queue`]: the fair first-in-first-out line where calls wait for capacity, served by
//!   hand-off whenever capacity frees, a worker becomes ready or a taint window ends;
//! - [`affinity`]: which worker an affinity key's calls go to (bindings, placement, bounds);
//! - [`stream`]: a stream's flow control — the credit granted its worker, the items buffered
//!   for its caller, the checks on every item.
//!
//! The crash barrier (`crate::barrier`) decides *what* a call wants (any worker, or one
//! alone); dispatch only provides it. Workers' processes and actors are elsewhere.

pub(crate) mod affinity;
pub(crate) mod outcome;
pub(crate) mod pick;
pub(crate) mod queue;
pub(crate) mod slot;
pub(crate) mod stream;

pub(crate) use queue::{Dispatcher, QueueExit, Reservation, RoomWait, Want};
pub(crate) use slot::{Failure, Outcome, SlotEnd, WorkerSlot};
#[cfg(test)]
mod model_tests;

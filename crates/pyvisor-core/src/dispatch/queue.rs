//! The pool's fair queue: where a call waits when no worker it may use has room.
//!
//! Owns the waiting line (first in, first out), its bound (`max_queue` first attempts; full →
//! `Overloaded` at once), and hand-off: whoever frees capacity or makes a worker usable rings
//! the [`CapacityBell`], and the queue, under its lock, walks the line in arrival order and
//! hands each waiter that can be served a reservation made for it. A woken waiter therefore
//! never races new calls for the capacity (new calls queue behind it while anybody waits), no
//! wake-up is lost, and a waiter that wants one kind of worker (a suspect that must run alone)
//! never blocks the waiters behind it that can run elsewhere. A suspect that finds no idle
//! worker has one *held* for it, which then drains.
//!
//! It also tells whoever would rather wait than be refused (a tower service's `poll_ready`)
//! when the line has room again: a [`RoomWait`] completes when a first attempt leaves the line
//! (or the pool closes). That costs each change of the line, under its lock, an atomic swap and
//! load (and a notify only while somebody waits); a call that does not queue pays nothing.
//!
//! It does not decide what a call wants (the crash barrier does) nor what a worker is.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::pick::{hold_for, pick_alone, pick_normal, preferred, SlotTable};
use super::slot::{CapacityBell, InFlight, Outcome, SlotClosed, WorkerSlot};
use super::stream::{StreamEvent, StreamFlow};
use crate::death::WorkerId;

/// What kind of worker a call wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// Any usable worker with room.
    Any,
    /// An idle worker, to itself (a suspect's retry), for call `call_id`.
    Alone {
        /// The call.
        call_id: u64,
    },
    /// This worker (an affinity key's): waits for room on it; leaves with
    /// [`QueueExit::Gone`] when it stops taking calls.
    On(WorkerId),
}

/// Why a call left the queue without a worker.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum QueueExit {
    /// `max_queue` first attempts are already waiting.
    Full,
    /// The limit passed (queue timeout or the call's deadline, whichever is first).
    TimedOut,
    /// The pool closed.
    Closed,
    /// The worker a [`Want::On`] call waited for stopped taking calls.
    Gone,
}

/// One unit of capacity on one worker, taken for one call. Dropped unused, it is given back
/// (with its hold, for a call that wanted to be alone).
pub(crate) struct Reservation {
    pub(crate) slot: Arc<WorkerSlot>,
    alone_id: u64,
    armed: bool,
}

impl Reservation {
    fn new(slot: Arc<WorkerSlot>, alone_id: u64) -> Self {
        Reservation { slot, alone_id, armed: true }
    }

    /// Register call `id` on the reserved worker: its capacity now belongs to the call table.
    /// Fails when the worker stopped taking calls meanwhile; the reservation is given back.
    pub(crate) fn register(
        mut self,
        id: u64,
        attempt: u32,
        function: &Arc<str>,
        deadline: Option<std::time::Instant>,
        trace_id: Option<String>,
    ) -> Result<(InFlight, oneshot::Receiver<Outcome>), SlotClosed> {
        let rx = self.slot.register(id, attempt, function, deadline, trace_id, self.alone_id != 0)?;
        self.armed = false;
        Ok((InFlight::new(Arc::clone(&self.slot), id), rx))
    }

    /// Register stream `id` on the reserved worker, under `flow`'s credit: its items and its
    /// end arrive on the receiver. Fails as [`Self::register`] does.
    pub(crate) fn register_stream(
        mut self,
        id: u64,
        attempt: u32,
        function: &Arc<str>,
        deadline: Option<std::time::Instant>,
        flow: Arc<StreamFlow>,
    ) -> Result<(InFlight, tokio::sync::mpsc::UnboundedReceiver<StreamEvent>), SlotClosed> {
        let rx = self.slot.register_stream(id, attempt, function, deadline, self.alone_id != 0, flow)?;
        self.armed = false;
        Ok((InFlight::new(Arc::clone(&self.slot), id), rx))
    }

    /// Give the unit back without ringing (under the queue's lock).
    fn give_back_quiet(mut self) {
        self.armed = false;
        self.slot.unreserve(self.alone_id, false);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            self.slot.unreserve(self.alone_id, true);
        }
    }
}

struct Waiter {
    ticket: u64,
    want: Want,
    first: bool,
    tx: oneshot::Sender<Result<Reservation, QueueExit>>,
    /// The worker held for this waiter (`Want::Alone`) while it drains.
    held: Option<Arc<WorkerSlot>>,
}

impl Waiter {
    fn release_hold(&mut self) -> bool {
        match (self.held.take(), self.want) {
            (Some(s), Want::Alone { call_id }) => s.unhold_quiet(call_id),
            _ => false,
        }
    }
}

#[derive(Default)]
struct Line {
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
    first_attempts: usize,
    alone: usize,
    /// Waiters that want one worker ([`Want::On`]).
    pinned: usize,
    closed: bool,
}

impl Line {
    fn remove(&mut self, i: usize) -> Option<Waiter> {
        let w = self.waiters.remove(i)?;
        if w.first {
            self.first_attempts -= 1;
        }
        match w.want {
            Want::Alone { .. } => self.alone -= 1,
            Want::On(_) => self.pinned -= 1,
            Want::Any => {}
        }
        Some(w)
    }
}

/// Routing table plus waiting line: where a call gets its worker.
pub(crate) struct Dispatcher {
    pub(crate) table: SlotTable,
    bell: Arc<CapacityBell>,
    line: Mutex<Line>,
    closed: AtomicBool,
    /// First attempts waiting now (the line's `first_attempts`, kept under its lock).
    first_waiting: AtomicUsize,
    /// [`RoomWait`]s alive: only then does a first attempt leaving the line notify `room`.
    room_wanted: AtomicUsize,
    room: Arc<Notify>,
}

impl Dispatcher {
    pub(crate) fn new() -> Arc<Self> {
        let d = Arc::new(Dispatcher {
            table: SlotTable::default(),
            bell: Arc::new(CapacityBell::default()),
            line: Mutex::new(Line::default()),
            closed: AtomicBool::new(false),
            first_waiting: AtomicUsize::new(0),
            room_wanted: AtomicUsize::new(0),
            room: Arc::new(Notify::new()),
        });
        let weak: Weak<Dispatcher> = Arc::downgrade(&d);
        d.bell.on_ring(Box::new(move || {
            if let Some(d) = weak.upgrade() {
                d.serve();
            }
        }));
        d
    }

    /// The bell every slot of this pool rings.
    pub(crate) fn bell(&self) -> Arc<CapacityBell> {
        Arc::clone(&self.bell)
    }

    /// Calls waiting now.
    pub(crate) fn len(&self) -> usize {
        self.bell.waiting.load(Ordering::SeqCst)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// A worker became ready: route to it, and serve waiters.
    pub(crate) fn insert(&self, slot: Arc<WorkerSlot>) {
        self.table.insert(slot);
        self.serve();
    }

    /// A worker stopped taking calls: stop routing to it (a hold on it moves elsewhere).
    pub(crate) fn remove(&self, id: WorkerId) {
        self.table.remove(id);
        self.serve();
    }

    /// Serve waiters again at `at` (e.g. when a taint window ends).
    pub(crate) fn serve_at(self: &Arc<Self>, at: Instant) {
        let weak = Arc::downgrade(self);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep_until(at).await;
                if let Some(d) = weak.upgrade() {
                    d.serve();
                }
            });
        }
    }

    /// Refuse new calls and tell every waiter.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let gone: Vec<Waiter> = match self.line.lock() {
            Ok(mut line) => {
                line.closed = true;
                line.first_attempts = 0;
                line.alone = 0;
                line.pinned = 0;
                let mut v: Vec<Waiter> = line.waiters.drain(..).collect();
                for w in &mut v {
                    w.release_hold();
                }
                self.bell.waiting.store(0, Ordering::SeqCst);
                self.first_waiting.store(0, Ordering::SeqCst);
                v
            }
            Err(_) => Vec::new(),
        };
        drop(gone); // dropping the senders tells the waiters
        // Whoever waits for room learns it (the call it then makes is refused as closed).
        self.room.notify_waiters();
    }

    /// Whether a first attempt would join the line now rather than be refused as full: the line
    /// holds fewer than `max_queue` first attempts, or there is no line to fill (`max_queue`
    /// 0), or the pool is closed (a call then fails at once, as closed). A hint: other callers
    /// may fill the line before the caller's call arrives.
    pub(crate) fn has_room(&self, max_queue: usize) -> bool {
        max_queue == 0 || self.is_closed() || self.first_waiting.load(Ordering::SeqCst) < max_queue
    }

    /// A wait for the next first attempt to leave the line (or for the pool to close). Check
    /// [`Dispatcher::has_room`] after making it: a change between the two is not lost.
    pub(crate) fn wait_for_room(self: &Arc<Self>) -> RoomWait {
        self.room_wanted.fetch_add(1, Ordering::SeqCst);
        let mut notified = Box::pin(Arc::clone(&self.room).notified_owned());
        notified.as_mut().enable();
        RoomWait { notified, dispatcher: Arc::clone(self) }
    }

    /// Publish the line's sizes (under its lock); wake room waiters when a first attempt left.
    fn publish(&self, line: &Line) {
        self.bell.waiting.store(line.waiters.len(), Ordering::SeqCst);
        let before = self.first_waiting.swap(line.first_attempts, Ordering::SeqCst);
        if line.first_attempts < before && self.room_wanted.load(Ordering::SeqCst) > 0 {
            self.room.notify_waiters();
        }
    }

    /// A reservation without waiting, when nobody waits (first in, first out: a new call
    /// queues behind waiters). `None`: wait with [`Dispatcher::acquire`].
    pub(crate) fn try_now(&self, want: Want) -> Option<Result<Reservation, QueueExit>> {
        if self.is_closed() {
            return Some(Err(QueueExit::Closed));
        }
        if self.bell.waiting.load(Ordering::SeqCst) > 0 {
            return None;
        }
        match want {
            Want::Any => {
                let slots = self.table.snapshot();
                pick_normal(&preferred(&slots), true).map(|s| Ok(Reservation::new(s, 0)))
            }
            Want::On(id) => {
                let slots = self.table.snapshot();
                match slots.iter().find(|s| s.id == id) {
                    Some(s) => s.try_reserve(true).then(|| Ok(Reservation::new(Arc::clone(s), 0))),
                    None => Some(Err(QueueExit::Gone)),
                }
            }
            Want::Alone { .. } => None,
        }
    }

    /// Reserve a worker as `want` says, waiting in line until `until` (for a call that
    /// [`Dispatcher::try_now`] could not serve at once; joining the line serves it at once if
    /// it can be). First attempts count toward `max_queue`; retries (admitted already) do not.
    pub(crate) async fn acquire(
        &self,
        want: Want,
        first: bool,
        max_queue: usize,
        until: Instant,
    ) -> Result<Reservation, QueueExit> {
        let mut ticket = self.enqueue(want, first, max_queue)?;
        match tokio::time::timeout_at(until, &mut ticket.rx).await {
            Ok(Ok(r)) => {
                ticket.left = true;
                r
            }
            Ok(Err(_)) => {
                ticket.left = true;
                Err(QueueExit::Closed)
            }
            Err(_) => match ticket.leave() {
                Some(r) => Ok(r),
                None => Err(QueueExit::TimedOut),
            },
        }
    }

    /// Join the line (and be served at once if possible).
    pub(crate) fn enqueue(&self, want: Want, first: bool, max_queue: usize) -> Result<Ticket<'_>, QueueExit> {
        let (tx, rx) = oneshot::channel();
        let ticket = {
            let Ok(mut line) = self.line.lock() else { return Err(QueueExit::Closed) };
            if line.closed {
                return Err(QueueExit::Closed);
            }
            if first && line.first_attempts >= max_queue {
                return Err(QueueExit::Full);
            }
            line.next_ticket += 1;
            let ticket = line.next_ticket;
            line.waiters.push_back(Waiter { ticket, want, first, tx, held: None });
            if first {
                line.first_attempts += 1;
            }
            match want {
                Want::Alone { .. } => line.alone += 1,
                Want::On(_) => line.pinned += 1,
                Want::Any => {}
            }
            self.publish(&line);
            self.serve_locked(&mut line);
            ticket
        };
        Ok(Ticket { dispatcher: self, ticket, rx, left: false })
    }

    /// Hand capacity to waiters, in arrival order.
    pub(crate) fn serve(&self) {
        if self.bell.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Ok(mut line) = self.line.lock() {
            self.serve_locked(&mut line);
        }
    }

    fn serve_locked(&self, line: &mut Line) {
        if line.closed || self.is_closed() {
            return;
        }
        let all = self.table.snapshot();
        let pref = preferred(&all);
        loop {
            let mut given_back = false;
            let mut any_blocked = false;
            let mut i = 0;
            while i < line.waiters.len() {
                if line.waiters[i].tx.is_closed() {
                    if let Some(mut w) = line.remove(i) {
                        given_back |= w.release_hold();
                    }
                    continue;
                }
                let want = line.waiters[i].want;
                if let Want::On(id) = want {
                    if !all.iter().any(|s| s.id == id) {
                        // Its worker stopped taking calls: it leaves the line, told why.
                        if let Some(w) = line.remove(i) {
                            let _ = w.tx.send(Err(QueueExit::Gone));
                        }
                        continue;
                    }
                }
                let got = match want {
                    Want::Any if any_blocked => None,
                    Want::Any => {
                        let s = pick_normal(&pref, false);
                        any_blocked = s.is_none();
                        s.map(|s| Reservation::new(s, 0))
                    }
                    Want::Alone { call_id } => {
                        let w = &mut line.waiters[i];
                        // A hold released here frees a worker that a waiter looked at earlier in
                        // this pass may want (one pinned to it): the pass is made again.
                        if w.held.as_ref().is_some_and(|h| !h.is_ready() || h.held_by() != call_id) {
                            given_back |= w.release_hold();
                        }
                        // Any idle worker will do, the held one first.
                        let mut s = w.held.as_ref().and_then(|h| h.try_reserve_alone(call_id).then(|| Arc::clone(h)));
                        if s.is_none() {
                            s = pick_alone(&pref, call_id);
                            if let (Some(got), Some(h)) = (&s, &w.held) {
                                if got.id != h.id {
                                    given_back |= w.release_hold();
                                }
                            }
                        }
                        if s.is_none() && w.held.is_none() {
                            w.held = hold_for(&pref, &all, call_id);
                        }
                        s.map(|s| Reservation::new(s, call_id))
                    }
                    Want::On(id) => all.iter().find(|s| s.id == id && s.try_reserve(false)).map(|s| Reservation::new(Arc::clone(s), 0)),
                };
                match got {
                    Some(r) => match line.remove(i) {
                        Some(w) => {
                            if let Err(Ok(r)) = w.tx.send(Ok(r)) {
                                // The waiter left just now: the unit goes to the next one.
                                r.give_back_quiet();
                                given_back = true;
                            }
                        }
                        None => {
                            r.give_back_quiet();
                            break;
                        }
                    },
                    None => {
                        if any_blocked && line.alone == 0 && line.pinned == 0 {
                            break;
                        }
                        i += 1;
                    }
                }
            }
            if !given_back {
                break;
            }
        }
        self.publish(line);
    }

    /// Leave the line (the waiter gave up). Returns a reservation that reached it meanwhile.
    fn leave(&self, ticket: u64, rx: &mut oneshot::Receiver<Result<Reservation, QueueExit>>) -> Option<Reservation> {
        if let Ok(mut line) = self.line.lock() {
            if let Some(i) = line.waiters.iter().position(|w| w.ticket == ticket) {
                if let Some(mut w) = line.remove(i) {
                    if w.release_hold() {
                        self.serve_locked(&mut line);
                    }
                }
                self.publish(&line);
            }
        }
        rx.close();
        rx.try_recv().ok().and_then(Result::ok)
    }
}

/// A wait for room in the line ([`Dispatcher::wait_for_room`]); completes when a first attempt
/// leaves the line or the pool closes.
pub(crate) struct RoomWait {
    notified: Pin<Box<OwnedNotified>>,
    dispatcher: Arc<Dispatcher>,
}

impl RoomWait {
    /// Ready once notified; registers `cx`'s waker otherwise.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.notified.as_mut().poll(cx)
    }
}

impl Drop for RoomWait {
    fn drop(&mut self) {
        self.dispatcher.room_wanted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A place in line. Dropping it leaves the line; a reservation that reached it meanwhile is
/// given back.
pub(crate) struct Ticket<'a> {
    dispatcher: &'a Dispatcher,
    ticket: u64,
    rx: oneshot::Receiver<Result<Reservation, QueueExit>>,
    left: bool,
}

impl Ticket<'_> {
    /// The reservation, if one was handed over; `Some(Err(Closed))` if the pool closed.
    #[cfg(test)]
    pub(crate) fn try_take(&mut self) -> Option<Result<Reservation, QueueExit>> {
        match self.rx.try_recv() {
            Ok(r) => {
                self.left = true;
                Some(r)
            }
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                self.left = true;
                Some(Err(QueueExit::Closed))
            }
        }
    }

    /// Leave the line now; a reservation handed over meanwhile is returned.
    pub(crate) fn leave(&mut self) -> Option<Reservation> {
        if self.left {
            return None;
        }
        self.left = true;
        self.dispatcher.leave(self.ticket, &mut self.rx)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // A reservation that reached us unused is dropped here, which gives it back.
        drop(self.leave());
    }
}

//! Model-based test of dispatch and the crash barrier together, without processes.
//!
//! Random interleavings of arrive, reply, crash (self-caused and external), cancel, deadline
//! expiry, taint-window end, drain and answers to abandoned calls drive the real dispatcher,
//! slots and call barriers, while a simple reference model (each call's state, its sends, the
//! order calls joined the line) checks after every step:
//! - every call gets exactly one outcome, and at the end every call has one;
//! - a non-idempotent call is sent at most once;
//! - capacity in use on each worker equals calls registered plus abandoned-unanswered;
//! - no waiter sleeps while a worker that could take it is idle (quiescence);
//! - among calls that could use the same free worker, earlier arrivals go first, and a call
//!   waiting for an idle worker never blocks calls that could run elsewhere;
//! - a call pinned to one worker (an affinity key's) runs there or nowhere: it is never sent to
//!   another worker, and it leaves the line (`Gone`) as soon as its worker stops taking calls.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use tokio::sync::oneshot;

use super::pick::preferred;
use super::queue::{Dispatcher, QueueExit, Ticket, Want};
use super::slot::{Failure, InFlight, Outcome, WorkerSlot};
use crate::barrier::retry::{CallBarrier, CrashVerdict, RetryPolicy};
use crate::death::{DeathCause, DeathCertificate, WorkerId};
use crate::status::WorkerState;

#[derive(Debug, Clone)]
enum Op {
    Arrive { idempotent: bool },
    ArrivePinned { worker: usize },
    Reply { pick: usize },
    AnswerAbandoned { pick: usize },
    Crash { worker: usize, fault: bool },
    Cancel { pick: usize },
    Expire { pick: usize },
    TaintEnd { worker: usize },
    Drain { worker: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<bool>().prop_map(|idempotent| Op::Arrive { idempotent }),
        2 => any::<usize>().prop_map(|worker| Op::ArrivePinned { worker }),
        4 => any::<usize>().prop_map(|pick| Op::Reply { pick }),
        1 => any::<usize>().prop_map(|pick| Op::AnswerAbandoned { pick }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(worker, fault)| Op::Crash { worker, fault }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Expire { pick }),
        1 => any::<usize>().prop_map(|worker| Op::TaintEnd { worker }),
        1 => any::<usize>().prop_map(|worker| Op::Drain { worker }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Ok,
    Crashed,
    Poison,
    Cancelled,
    /// A pinned call whose worker went (affinity lost).
    Lost,
}

enum State<'d> {
    Waiting { ticket: Ticket<'d>, want: Want, seq: u64 },
    Running { slot: Arc<WorkerSlot>, in_flight: InFlight, rx: oneshot::Receiver<Outcome> },
    Done(End),
}

struct Call<'d> {
    id: u64,
    idempotent: bool,
    /// The one worker this call may run on.
    pinned: Option<WorkerId>,
    barrier: CallBarrier,
    sends: u32,
    outcomes: u32,
    state: State<'d>,
}

struct World<'d> {
    d: &'d Dispatcher,
    max_in_flight: usize,
    workers: Vec<Arc<WorkerSlot>>,
    next_worker: u64,
    calls: Vec<Call<'d>>,
    abandoned: Vec<(Arc<WorkerSlot>, u64, u32)>,
    seq: u64,
    policy: RetryPolicy,
}

impl<'d> World<'d> {
    fn spawn(&mut self, tainted: bool) {
        self.next_worker += 1;
        let s = Arc::new(WorkerSlot::new(WorkerId(self.next_worker), 0, self.max_in_flight, self.d.bell()));
        if tainted {
            s.taint(Duration::from_secs(3600));
        }
        s.set_state(WorkerState::Ready);
        self.d.insert(Arc::clone(&s));
        self.workers.push(s);
    }

    fn finish(call: &mut Call<'d>, end: End) {
        call.outcomes += 1;
        call.state = State::Done(end);
    }

    /// Join the line for the call's next attempt (or be served at once).
    fn enqueue(&mut self, i: usize, first: bool) {
        let want = match self.calls[i].pinned {
            Some(w) => Want::On(w),
            None if self.calls[i].barrier.is_suspect() => Want::Alone { call_id: self.calls[i].id },
            None => Want::Any,
        };
        self.seq += 1;
        let seq = self.seq;
        match self.d.enqueue(want, first, usize::MAX) {
            Ok(ticket) => self.calls[i].state = State::Waiting { ticket, want, seq },
            Err(e) => panic!("enqueue refused: {e:?}"),
        }
    }

    /// Turn handed-over reservations into registered calls; check FIFO on the way.
    fn poll(&mut self) {
        loop {
            let mut progressed = false;
            let mut served_any: Vec<u64> = Vec::new();
            for i in 0..self.calls.len() {
                let taken = match &mut self.calls[i].state {
                    State::Waiting { ticket, want, seq } => ticket.try_take().map(|r| (r, *want, *seq)),
                    _ => None,
                };
                let Some((r, want, seq)) = taken else { continue };
                progressed = true;
                let r = match r {
                    Ok(r) => r,
                    Err(QueueExit::Gone) => {
                        let w = self.calls[i].pinned.expect("only pinned calls are told Gone");
                        assert!(!self.d.table.snapshot().iter().any(|s| s.id == w), "told Gone while worker {w} takes calls");
                        Self::finish(&mut self.calls[i], End::Lost);
                        continue;
                    }
                    Err(QueueExit::Closed) => panic!("the pool never closes in this model"),
                    Err(e) => panic!("unexpected {e:?}"),
                };
                if let Some(w) = self.calls[i].pinned {
                    assert_eq!(r.slot.id, w, "call {} pinned to {w} was given another worker", self.calls[i].id);
                }
                if want == Want::Any {
                    served_any.push(seq);
                }
                let c = &mut self.calls[i];
                let slot = Arc::clone(&r.slot);
                let name: Arc<str> = Arc::from("f");
                match r.register(c.id, c.barrier.attempt(), &name, None, None) {
                    Ok((in_flight, rx)) => {
                        c.sends += 1;
                        c.state = State::Running { slot, in_flight, rx };
                    }
                    Err(_) => self.enqueue(i, false),
                }
            }
            // First in, first out: nobody who joined earlier and wants any worker still waits
            // while a later one wanting any worker was served.
            if let Some(latest) = served_any.iter().max() {
                for c in &self.calls {
                    if let State::Waiting { want: Want::Any, seq, .. } = &c.state {
                        assert!(seq > latest, "call {} (joined at {seq}) was overtaken by one that joined at {latest}", c.id);
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }

    /// A call pinned to the `worker`-th worker (an affinity key's), wherever it stands.
    fn arrive_pinned(&mut self, worker: usize) {
        let target = self.workers[worker % self.workers.len()].id;
        let id = self.calls.len() as u64 + 1;
        let barrier = CallBarrier::new(self.policy, true);
        self.calls.push(Call { id, idempotent: true, pinned: Some(target), barrier, sends: 0, outcomes: 0, state: State::Done(End::Ok) });
        let i = self.calls.len() - 1;
        match self.d.try_now(Want::On(target)) {
            Some(Ok(r)) => {
                let waiting = self.calls.iter().any(|c| matches!(c.state, State::Waiting { .. }));
                assert!(!waiting, "a new call overtook waiters");
                assert_eq!(r.slot.id, target);
                let slot = Arc::clone(&r.slot);
                let name: Arc<str> = Arc::from("f");
                let (in_flight, rx) = r.register(id, 1, &name, None, None).expect("a reserved worker is open");
                self.calls[i].sends = 1;
                self.calls[i].state = State::Running { slot, in_flight, rx };
            }
            Some(Err(QueueExit::Gone)) => {
                assert!(!self.d.table.snapshot().iter().any(|s| s.id == target));
                Self::finish(&mut self.calls[i], End::Lost);
            }
            Some(Err(e)) => panic!("unexpected {e:?}"),
            None => self.enqueue(i, true),
        }
    }

    fn arrive(&mut self, idempotent: bool) {
        let id = self.calls.len() as u64 + 1;
        let barrier = CallBarrier::new(self.policy, idempotent);
        self.calls.push(Call { id, idempotent, pinned: None, barrier, sends: 0, outcomes: 0, state: State::Done(End::Ok) });
        let i = self.calls.len() - 1;
        // The fast path is allowed only when nobody waits.
        match self.d.try_now(Want::Any) {
            Some(Ok(r)) => {
                let waiting = self.calls.iter().any(|c| matches!(c.state, State::Waiting { .. }));
                assert!(!waiting, "a new call overtook waiters");
                let slot = Arc::clone(&r.slot);
                let name: Arc<str> = Arc::from("f");
                let (in_flight, rx) = r.register(id, 1, &name, None, None).expect("a reserved worker is open");
                self.calls[i].sends = 1;
                self.calls[i].state = State::Running { slot, in_flight, rx };
            }
            Some(Err(e)) => panic!("unexpected {e:?}"),
            None => self.enqueue(i, true),
        }
    }

    fn running(&self) -> Vec<usize> {
        (0..self.calls.len()).filter(|i| matches!(self.calls[*i].state, State::Running { .. })).collect()
    }
    fn waiting(&self) -> Vec<usize> {
        (0..self.calls.len()).filter(|i| matches!(self.calls[*i].state, State::Waiting { .. })).collect()
    }

    fn reply(&mut self, i: usize) {
        let (id, attempt) = (self.calls[i].id, self.calls[i].barrier.attempt());
        let State::Running { slot, rx, .. } = &mut self.calls[i].state else { return };
        assert!(slot.complete(id, attempt, Outcome { result: Ok(crate::buffers::Reply::in_band(bytes::Bytes::new())), span: None, started: None }));
        let got = rx.try_recv().expect("the reply reaches its caller");
        assert!(got.result.is_ok());
        if let State::Running { in_flight, .. } = &mut self.calls[i].state {
            in_flight.done();
        }
        Self::finish(&mut self.calls[i], End::Ok);
    }

    fn cancel(&mut self, i: usize) {
        let state = std::mem::replace(&mut self.calls[i].state, State::Done(End::Cancelled));
        match state {
            State::Waiting { ticket, .. } => drop(ticket),
            State::Running { slot, in_flight, .. } => {
                let attempt = self.calls[i].barrier.attempt();
                let open = slot.is_open();
                drop(in_flight); // abandons the call: its capacity stays taken until answered
                if open {
                    self.abandoned.push((slot, self.calls[i].id, attempt));
                }
            }
            State::Done(e) => {
                self.calls[i].state = State::Done(e);
                return;
            }
        }
        self.calls[i].outcomes += 1;
    }

    fn crash(&mut self, w: usize, fault: bool) {
        let slot = Arc::clone(&self.workers[w]);
        let cert = Arc::new(DeathCertificate {
            pool: "model".into(),
            worker: slot.id,
            index: 0,
            pid: Some(1),
            cause: DeathCause::Exited,
            exit_code: None,
            signal: Some(if fault { libc::SIGSEGV } else { libc::SIGKILL }),
            killed_by_pyvisor: false,
            oom_suspected: false,
            uptime: Duration::from_secs(1),
            became_ready: true,
            died_at: SystemTime::now(),
            last_rss: None,
            last_beat_age: None,
            calls_in_flight: slot.calls_in_flight(),
            stderr_tail: Vec::new(),
            python_stack: None,
        });
        slot.set_state(WorkerState::Dead);
        self.d.remove(slot.id);
        slot.close_and_fail(Failure::Crashed(Arc::clone(&cert)));
        self.abandoned.retain(|(s, _, _)| s.id != slot.id);
        self.workers.remove(w);
        // Capacity first: the replacement is tainted.
        self.spawn(true);
        for i in self.running() {
            let State::Running { slot: s, rx, in_flight } = &mut self.calls[i].state else { continue };
            if s.id != slot.id {
                continue;
            }
            in_flight.done();
            let got = rx.try_recv().expect("a crash reaches every caller on the worker");
            let Err(Failure::Crashed(c)) = got.result else { panic!("expected a crash") };
            if self.calls[i].pinned.is_some() {
                // Never retried elsewhere: its key's state died with the worker.
                Self::finish(&mut self.calls[i], End::Lost);
                continue;
            }
            let id = self.calls[i].id;
            match self.calls[i].barrier.on_crash(id, c) {
                CrashVerdict::Retry { .. } => self.enqueue(i, false),
                CrashVerdict::Fail | CrashVerdict::Exhausted => Self::finish(&mut self.calls[i], End::Crashed),
                CrashVerdict::Poison => Self::finish(&mut self.calls[i], End::Poison),
            }
        }
    }

    fn check(&self) {
        for c in &self.calls {
            assert!(c.outcomes <= 1, "call {} got {} outcomes", c.id, c.outcomes);
            if !c.idempotent {
                assert!(c.sends <= 1, "non-idempotent call {} sent {} times", c.id, c.sends);
            }
        }
        for s in &self.workers {
            assert_eq!(s.in_flight(), s.table_len(), "worker {}: capacity in use is not calls held", s.id);
        }
        // Quiescence: nobody waits next to a worker that could take it.
        let routable = self.d.table.snapshot();
        let pref = preferred(&routable);
        for c in &self.calls {
            let State::Waiting { want, .. } = &c.state else { continue };
            for s in pref.iter().filter(|s| s.is_ready()) {
                match want {
                    Want::Any => assert!(
                        s.held_by() != 0 || s.in_flight() >= self.max_in_flight,
                        "call {} waits while worker {} has room",
                        c.id,
                        s.id
                    ),
                    Want::Alone { call_id } => assert!(
                        s.in_flight() > 0 || (s.held_by() != 0 && s.held_by() != *call_id),
                        "suspect {} waits while worker {} is idle",
                        c.id,
                        s.id
                    ),
                    Want::On(w) if *w == s.id => assert!(
                        s.held_by() != 0 || s.in_flight() >= self.max_in_flight,
                        "call {} pinned to worker {} waits while it has room",
                        c.id,
                        s.id
                    ),
                    Want::On(_) => {}
                }
            }
            // A pinned call does not wait for a worker that takes no calls.
            if let Want::On(w) = want {
                assert!(routable.iter().any(|s| s.id == *w), "call {} waits for worker {w}, which is gone", c.id);
            }
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Arrive { idempotent } => self.arrive(idempotent),
            Op::ArrivePinned { worker } => self.arrive_pinned(worker),
            Op::Reply { pick } => {
                let r = self.running();
                if !r.is_empty() {
                    self.reply(r[pick % r.len()]);
                }
            }
            Op::AnswerAbandoned { pick } => {
                if !self.abandoned.is_empty() {
                    let (slot, id, attempt) = self.abandoned.remove(pick % self.abandoned.len());
                    assert!(slot.complete(id, attempt, Outcome { result: Ok(crate::buffers::Reply::in_band(bytes::Bytes::new())), span: None, started: None }));
                }
            }
            Op::Crash { worker, fault } => {
                let n = self.workers.len();
                self.crash(worker % n, fault);
            }
            Op::Cancel { pick } => {
                let live: Vec<usize> = self.waiting().into_iter().chain(self.running()).collect();
                if !live.is_empty() {
                    self.cancel(live[pick % live.len()]);
                }
            }
            Op::Expire { pick } => {
                let w = self.waiting();
                if !w.is_empty() {
                    self.cancel(w[pick % w.len()]);
                }
            }
            Op::TaintEnd { worker } => {
                let s = Arc::clone(&self.workers[worker % self.workers.len()]);
                s.taint(Duration::ZERO);
                self.d.serve();
            }
            Op::Drain { worker } => {
                let ready: Vec<usize> = (0..self.workers.len()).filter(|i| self.workers[*i].is_ready()).collect();
                if ready.len() >= 2 {
                    let s = Arc::clone(&self.workers[ready[worker % ready.len()]]);
                    s.stop_routing();
                    self.d.remove(s.id);
                    // Make before break: its replacement is untainted.
                    self.spawn(false);
                }
            }
        }
        self.poll();
        self.check();
    }

    /// Answer everything until no call is left without an outcome.
    fn quiesce(&mut self) {
        for _ in 0..10_000 {
            let r = self.running();
            let abandoned = !self.abandoned.is_empty();
            if r.is_empty() && !abandoned && self.waiting().is_empty() {
                break;
            }
            if let Some(&i) = r.first() {
                self.reply(i);
            }
            if abandoned {
                let (slot, id, attempt) = self.abandoned.remove(0);
                assert!(slot.complete(id, attempt, Outcome { result: Ok(crate::buffers::Reply::in_band(bytes::Bytes::new())), span: None, started: None }));
            }
            self.poll();
            self.check();
        }
        for c in &self.calls {
            assert_eq!(c.outcomes, 1, "call {} ended with {} outcomes", c.id, c.outcomes);
        }
    }
}

fn run(workers: usize, max_in_flight: usize, max_retries: u32, ops: &[Op]) {
    let d = Dispatcher::new();
    let mut world = World {
        d: &d,
        max_in_flight,
        workers: Vec::new(),
        next_worker: 0,
        calls: Vec::new(),
        abandoned: Vec::new(),
        seq: 0,
        policy: RetryPolicy { max_retries, poison_threshold: 2 },
    };
    for _ in 0..workers {
        world.spawn(false);
    }
    for op in ops {
        world.step(op);
    }
    world.quiesce();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn dispatch_and_barrier_match_the_model(
        workers in 1usize..4,
        max_in_flight in 1usize..4,
        max_retries in prop_oneof![Just(0u32), Just(2u32), Just(100u32)],
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        run(workers, max_in_flight, max_retries, &ops);
    }
}

#[test]
fn a_suspect_gets_a_worker_held_until_it_drains() {
    let d = Dispatcher::new();
    let bell = d.bell();
    let s = Arc::new(WorkerSlot::new(WorkerId(1), 0, 4, bell));
    s.set_state(WorkerState::Ready);
    d.insert(Arc::clone(&s));
    let busy = d.try_now(Want::Any).unwrap().unwrap();
    let mut suspect = d.enqueue(Want::Alone { call_id: 9 }, false, 10).unwrap();
    assert!(suspect.try_take().is_none());
    assert_eq!(s.held_by(), 9, "the worker is held so that it drains");
    let mut other = d.enqueue(Want::Any, true, 10).unwrap();
    assert!(other.try_take().is_none(), "nobody joins a held worker");
    drop(busy);
    let got = suspect.try_take().unwrap().unwrap();
    assert_eq!(got.slot.id, WorkerId(1));
    drop(got); // given back unused: the hold goes too, and the next waiter is served
    assert_eq!(s.held_by(), 0);
    assert!(other.try_take().unwrap().is_ok());
}

#[test]
fn a_suspect_that_gives_up_releases_its_hold() {
    let d = Dispatcher::new();
    let s = Arc::new(WorkerSlot::new(WorkerId(1), 0, 2, d.bell()));
    s.set_state(WorkerState::Ready);
    d.insert(Arc::clone(&s));
    let busy = d.try_now(Want::Any).unwrap().unwrap();
    let suspect = d.enqueue(Want::Alone { call_id: 9 }, false, 10).unwrap();
    assert_eq!(s.held_by(), 9);
    drop(suspect);
    assert_eq!(s.held_by(), 0, "a wedged worker is impossible: the hold left with the suspect");
    assert!(d.try_now(Want::Any).unwrap().is_ok());
    drop(busy);
}

#[test]
fn a_reservation_on_a_closed_worker_is_given_back_with_its_hold() {
    let d = Dispatcher::new();
    let s = Arc::new(WorkerSlot::new(WorkerId(1), 0, 2, d.bell()));
    s.set_state(WorkerState::Ready);
    d.insert(Arc::clone(&s));
    let mut t = d.enqueue(Want::Alone { call_id: 5 }, false, 10).unwrap();
    let r = t.try_take().unwrap().unwrap();
    s.close_and_fail(Failure::ShutDown);
    let name: Arc<str> = Arc::from("f");
    assert!(r.register(5, 2, &name, None, None).is_err());
    assert_eq!(s.held_by(), 0);
    assert_eq!(s.in_flight(), 0);
}

#[test]
fn the_line_is_first_in_first_out_and_full_is_immediate() {
    let d = Dispatcher::new();
    let s = Arc::new(WorkerSlot::new(WorkerId(1), 0, 1, d.bell()));
    s.set_state(WorkerState::Ready);
    d.insert(Arc::clone(&s));
    let busy = d.try_now(Want::Any).unwrap().unwrap();
    let mut a = d.enqueue(Want::Any, true, 2).unwrap();
    let mut b = d.enqueue(Want::Any, true, 2).unwrap();
    assert!(matches!(d.enqueue(Want::Any, true, 2), Err(QueueExit::Full)));
    assert!(d.try_now(Want::Any).is_none(), "no overtaking while others wait");
    drop(busy);
    assert!(b.try_take().is_none());
    let ra = a.try_take().unwrap().unwrap();
    drop(ra);
    assert!(b.try_take().unwrap().is_ok());
}

#[test]
fn a_taint_window_ending_serves_waiters() {
    let d = Dispatcher::new();
    let clean = Arc::new(WorkerSlot::new(WorkerId(1), 0, 1, d.bell()));
    let tainted = Arc::new(WorkerSlot::new(WorkerId(2), 1, 1, d.bell()));
    tainted.taint(Duration::from_secs(60));
    for s in [&clean, &tainted] {
        s.set_state(WorkerState::Ready);
        d.insert(Arc::clone(s));
    }
    let busy = d.try_now(Want::Any).unwrap().unwrap();
    assert_eq!(busy.slot.id, WorkerId(1));
    let mut w = d.enqueue(Want::Any, true, 10).unwrap();
    assert!(w.try_take().is_none(), "the tainted worker waits out its window");
    tainted.taint(Duration::ZERO);
    d.serve();
    assert_eq!(w.try_take().unwrap().unwrap().slot.id, WorkerId(2));
}

#[test]
fn a_freed_unit_reaches_the_waiter_that_can_use_it_not_a_suspect_first_in_line() {
    let d = Dispatcher::new();
    let s = Arc::new(WorkerSlot::new(WorkerId(1), 0, 2, d.bell()));
    s.set_state(WorkerState::Ready);
    d.insert(Arc::clone(&s));
    let a = d.try_now(Want::Any).unwrap().unwrap();
    let b = d.try_now(Want::Any).unwrap().unwrap();
    let mut suspect = d.enqueue(Want::Alone { call_id: 7 }, false, 10).unwrap();
    let mut ordinary = d.enqueue(Want::Any, true, 10).unwrap();
    // The only worker is held for the suspect (it must drain): the ordinary call waits…
    drop(a);
    assert!(suspect.try_take().is_none() && ordinary.try_take().is_none());
    // …and once the suspect has run, the unit it frees reaches the ordinary call.
    drop(b);
    let alone = suspect.try_take().unwrap().unwrap();
    drop(alone);
    assert!(ordinary.try_take().unwrap().is_ok());

    // With two workers, the suspect's hold never keeps the ordinary call from the other one.
    let d = Dispatcher::new();
    let (w, mut busy) = two_busy_workers(&d);
    let mut suspect = d.enqueue(Want::Alone { call_id: 7 }, false, 10).unwrap();
    let mut ordinary = d.enqueue(Want::Any, true, 10).unwrap();
    let held = w.iter().find(|s| s.held_by() == 7).expect("one worker held").id;
    let i = busy.iter().position(|r| r.slot.id != held).unwrap();
    drop(busy.remove(i));
    assert!(suspect.try_take().is_none());
    assert!(ordinary.try_take().unwrap().is_ok(), "the ordinary call takes the unit the suspect cannot use");
    drop(busy);
}

/// Two ready workers of two units each, every unit taken (the reservations returned).
fn two_busy_workers(d: &Dispatcher) -> (Vec<Arc<WorkerSlot>>, Vec<super::queue::Reservation>) {
    let w: Vec<_> = (1..=2)
        .map(|i| {
            let s = Arc::new(WorkerSlot::new(WorkerId(i), 0, 2, d.bell()));
            s.set_state(WorkerState::Ready);
            d.insert(Arc::clone(&s));
            s
        })
        .collect();
    let busy = (0..4).map(|_| d.try_now(Want::Any).unwrap().unwrap()).collect();
    (w, busy)
}

/// Found by the model test: a suspect that lets go of the worker held for it (it found another
/// idle one) frees that worker for a call pinned to it earlier in line, in the same pass.
#[test]
fn a_hold_let_go_of_reaches_a_call_pinned_to_that_worker() {
    let d = Dispatcher::new();
    let (w, mut busy) = two_busy_workers(&d);
    let mut pinned = d.enqueue(Want::On(WorkerId(1)), true, 10).unwrap();
    let mut suspect = d.enqueue(Want::Alone { call_id: 7 }, false, 10).unwrap();
    assert_eq!(w[0].held_by(), 7, "worker 1 is held for the suspect");
    // One unit frees on worker 1 (held: the pinned call may not join), then worker 2 empties:
    // the suspect takes it and lets go of worker 1, which the pinned call must get now.
    let i = busy.iter().position(|r| r.slot.id == WorkerId(1)).unwrap();
    drop(busy.remove(i));
    busy.retain(|r| r.slot.id != WorkerId(2));
    let alone = suspect.try_take().unwrap().unwrap();
    assert_eq!(alone.slot.id, WorkerId(2));
    assert_eq!(w[0].held_by(), 0);
    // Nothing else rings meanwhile: the pass that let go of the hold must have served it.
    let got = pinned.try_take().expect("the pinned call waits while its worker has room").unwrap();
    assert_eq!(got.slot.id, WorkerId(1));
    drop((alone, got, busy));
}

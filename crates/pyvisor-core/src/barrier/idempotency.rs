//! Idempotency keys: one execution per key, and its outcome kept for a while.
//!
//! Owns a pool's two maps of keyed calls: the executions *in flight* (key → what the callers
//! coalesced into it wait on) and the *kept outcomes* (key → the outcome, until its time to
//! live ends or the count or byte bound evicts it, oldest first); the rule of which outcomes
//! are kept ([`keep`]); and what a key is bound to (its function and a fingerprint of its
//! payload: another use of the key is a conflict). Every time is passed in (an injected
//! clock), so the bounds are tested without processes.
//!
//! It does not run calls or wait for them (`pool::keyed` does), and does not decide whether a
//! crashed call had started (the worker's start acknowledgement, read by `dispatch::slot`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::buffers::Reply;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::watch;

use crate::error::CallError;
use crate::spec::IdempotencyPolicy;

/// The outcome of one keyed execution, as every caller of the key gets it.
pub(crate) type Shared = Result<Reply, CallError>;

/// What an execution in flight ends with: its outcome and the attempts it made.
pub(crate) type Ended = (Shared, u32);

/// Whether an outcome is kept for later calls with its key: every outcome of an execution
/// whose function ran or may have run — a result, a Python exception, a bad result, a crash
/// after the start (or when the start is unknown), a poison request that crashed workers, a
/// timeout after the call was sent, a worker failure. Not kept: whatever says the function
/// never ran (refused at admission, overloaded, queue timeout, timeout before sending, a crash
/// before the start, shut down, pool failed, a key conflict).
pub(crate) fn keep(outcome: &Shared) -> bool {
    match outcome {
        Ok(_) => true,
        Err(e) => match e {
            CallError::Python { .. } | CallError::BadResult { .. } | CallError::Worker { .. } => true,
            CallError::WorkerCrashed { started, .. } => *started,
            CallError::PoisonRequest { refused, .. } => !*refused,
            CallError::Timeout { sent, .. } => *sent,
            _ => false,
        },
    }
}

/// Bytes an outcome is charged in the byte bound: the value, or the error's texts, plus a
/// fixed overhead per entry.
fn outcome_size(outcome: &Shared) -> usize {
    const OVERHEAD: usize = 128;
    OVERHEAD
        + match outcome {
            Ok(r) => r.value.len() + r.buffers.as_deref().map_or(0, |b| b.iter().map(crate::os::memfd::SharedBytes::len).sum()),
            Err(CallError::Python { error, .. }) => {
                error.type_name.len() + error.message.len() + error.traceback.as_ref().map_or(0, String::len)
            }
            Err(CallError::WorkerCrashed { certificate, .. }) => certificate_size(certificate),
            Err(CallError::PoisonRequest { certificates, .. }) => certificates.iter().map(|c| certificate_size(c)).sum(),
            Err(e) => e.to_string().len(),
        }
}

fn certificate_size(c: &crate::death::DeathCertificate) -> usize {
    512 + c.stderr_tail.iter().map(String::len).sum::<usize>()
        + c.python_stack.as_ref().map_or(0, String::len)
        + c.calls_in_flight.len() * 96
}

/// What a key is bound to: one function, one payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Binding {
    pub function: Arc<str>,
    pub fingerprint: u64,
}

impl Binding {
    /// The error for a call to `function` with fingerprint `fingerprint` using a key bound to
    /// this, if it is another use.
    pub(crate) fn conflict(&self, key: &str, function: &str, fingerprint: u64) -> Option<CallError> {
        (*self.function != *function || self.fingerprint != fingerprint).then(|| CallError::IdempotencyKeyConflict {
            key: key.to_string(),
            function: function.to_string(),
            held_by: self.function.to_string(),
        })
    }
}

/// An execution in flight: callers with its key wait on `outcome` (set once, when it ends).
#[derive(Debug, Clone)]
pub(crate) struct Flight {
    pub binding: Binding,
    pub outcome: watch::Receiver<Option<Ended>>,
}

/// How a keyed call found its key.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// A kept outcome: returned without running anything.
    Hit(Shared),
    /// An execution in flight: wait for its outcome.
    Coalesced(watch::Receiver<Option<Ended>>),
    /// Nothing: this caller starts the execution and sends its outcome through the sender
    /// (and must call [`Idempotency::finish`], also if it fails).
    Miss(watch::Sender<Option<Ended>>),
}

struct Kept {
    binding: Binding,
    outcome: Shared,
    expires: Instant,
    size: usize,
    seq: u64,
}

#[derive(Default)]
struct Order {
    /// Kept entries oldest first: (seq, key, expiry). An item whose seq is not the entry's any
    /// more (replaced after it expired) is skipped.
    queue: VecDeque<(u64, Arc<str>, Instant)>,
    next_seq: u64,
    count: usize,
    bytes: usize,
}

/// A pool's keyed calls: executions in flight and kept outcomes.
pub(crate) struct Idempotency {
    policy: IdempotencyPolicy,
    in_flight: DashMap<Arc<str>, Flight>,
    kept: DashMap<Arc<str>, Kept>,
    /// Eviction order and the totals of the bounds (taken only when an outcome is kept).
    order: Mutex<Order>,
}

impl Idempotency {
    pub(crate) fn new(policy: IdempotencyPolicy) -> Self {
        Idempotency { policy, in_flight: DashMap::new(), kept: DashMap::new(), order: Mutex::new(Order::default()) }
    }

    /// The kept outcome for `key` at `now` (an expired one is gone), or a conflict.
    fn kept(&self, key: &str, function: &str, fingerprint: u64, now: Instant) -> Option<Shared> {
        let k = self.kept.get(key)?;
        if now >= k.expires {
            return None;
        }
        Some(match k.binding.conflict(key, function, fingerprint) {
            Some(e) => Err(e),
            None => k.outcome.clone(),
        })
    }

    /// Look `key` up for a call to `function` whose payload has `fingerprint`: a kept outcome
    /// (or a conflict, as an `Err` hit that is not counted as one), an execution to join, or
    /// nothing (the caller runs it).
    pub(crate) fn lookup(&self, key: &Arc<str>, function: &str, fingerprint: u64, now: Instant) -> Result<Lookup, CallError> {
        let hit = |o: Shared| match o {
            Err(e @ CallError::IdempotencyKeyConflict { .. }) => Err(e),
            o => Ok(Lookup::Hit(o)),
        };
        if let Some(o) = self.kept(key, function, fingerprint, now) {
            return hit(o);
        }
        match self.in_flight.entry(Arc::clone(key)) {
            Entry::Occupied(e) => {
                let f = e.get();
                match f.binding.conflict(key, function, fingerprint) {
                    Some(err) => Err(err),
                    None => Ok(Lookup::Coalesced(f.outcome.clone())),
                }
            }
            Entry::Vacant(e) => {
                // An execution that ended between the look above and this one kept its outcome
                // before it left the in-flight map: look again, under the entry.
                if let Some(o) = self.kept(key, function, fingerprint, now) {
                    return hit(o);
                }
                let (tx, rx) = watch::channel(None);
                e.insert(Flight { binding: Binding { function: Arc::from(function), fingerprint }, outcome: rx });
                Ok(Lookup::Miss(tx))
            }
        }
    }

    /// The execution of `key` ended with `outcome` (`None`: it ended without one, e.g. its task
    /// panicked): keep the outcome if [`keep`] says so, then let the key go from the in-flight
    /// map. Callers waiting get it through the sender.
    pub(crate) fn finish(&self, key: &Arc<str>, outcome: Option<&Shared>, now: Instant) {
        if let Some(o) = outcome.filter(|o| keep(o)) {
            // The binding is copied out first: no lock of the in-flight map is held while the
            // outcome is kept.
            let binding = self.in_flight.get(key).map(|f| f.binding.clone());
            if let Some(binding) = binding {
                self.insert(Arc::clone(key), binding, o.clone(), now);
            }
        }
        self.in_flight.remove(key);
    }

    /// Keep `outcome` for `key` until `now + ttl`, evicting expired entries and then the
    /// oldest ones until the bounds hold. False if it is not kept (larger than `max_bytes`
    /// alone, or the bounds are 0).
    pub(crate) fn insert(&self, key: Arc<str>, binding: Binding, outcome: Shared, now: Instant) -> bool {
        let size = outcome_size(&outcome) + key.len() + binding.function.len();
        let p = self.policy;
        let Ok(mut order) = self.order.lock() else { return false };
        self.evict(&mut order, now, 0, 0);
        if size > p.max_bytes || p.max_entries == 0 || p.ttl.is_zero() {
            return false;
        }
        let Some(expires) = now.checked_add(p.ttl) else { return false };
        let seq = order.next_seq;
        order.next_seq += 1;
        if let Some(old) = self.kept.insert(Arc::clone(&key), Kept { binding, outcome, expires, size, seq }) {
            order.count -= 1;
            order.bytes -= old.size;
        }
        order.count += 1;
        order.bytes += size;
        order.queue.push_back((seq, key, expires));
        self.evict(&mut order, now, p.max_entries, p.max_bytes);
        true
    }

    /// Drop expired entries, then the oldest until at most `max_entries` and `max_bytes`
    /// remain (0 and 0: expired ones only).
    fn evict(&self, order: &mut Order, now: Instant, max_entries: usize, max_bytes: usize) {
        let bounded = max_entries > 0 || max_bytes > 0;
        while let Some((seq, key, expires)) = order.queue.front().cloned() {
            let over = bounded && (order.count > max_entries || order.bytes > max_bytes);
            if !over && expires > now {
                break;
            }
            order.queue.pop_front();
            if let Some((_, old)) = self.kept.remove_if(&key, |_, k| k.seq == seq) {
                order.count -= 1;
                order.bytes -= old.size;
            }
        }
    }

    /// Kept outcomes and their bytes.
    #[cfg(test)]
    pub(crate) fn kept_totals(&self) -> (usize, usize) {
        self.order.lock().map_or((0, 0), |o| (o.count, o.bytes))
    }

    /// Executions in flight.
    #[cfg(test)]
    pub(crate) fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::PythonError;

    fn policy(ttl_s: u64, max_entries: usize, max_bytes: usize) -> IdempotencyPolicy {
        IdempotencyPolicy { ttl: Duration::from_secs(ttl_s), max_entries, max_bytes }
    }

    fn key(k: &str) -> Arc<str> {
        Arc::from(k)
    }

    /// Run an execution of `k` to `outcome` at `now`.
    fn run(i: &Idempotency, k: &str, fp: u64, outcome: Shared, now: Instant) {
        match i.lookup(&key(k), "f", fp, now).unwrap() {
            Lookup::Miss(tx) => {
                let _ = tx.send_replace(Some((outcome.clone(), 1)));
                i.finish(&key(k), Some(&outcome), now);
            }
            other => panic!("{k}: expected a miss, got {other:?}"),
        }
    }

    fn value(n: usize) -> Shared {
        Ok(Reply::in_band(bytes::Bytes::from(vec![7u8; n])))
    }

    /// Whether `k` has a kept outcome at `now` (looked at without starting anything: a
    /// lookup that misses registers an execution).
    fn is_hit(i: &Idempotency, k: &str, now: Instant) -> bool {
        matches!(i.kept(k, "f", 1, now), Some(Ok(_)))
    }

    #[test]
    fn one_execution_in_flight_per_key_then_a_hit() {
        let i = Idempotency::new(IdempotencyPolicy::default());
        let t0 = Instant::now();
        let Ok(Lookup::Miss(tx)) = i.lookup(&key("k"), "f", 1, t0) else { panic!("first is a miss") };
        let mut waiters: Vec<_> = (0..5)
            .map(|_| match i.lookup(&key("k"), "f", 1, t0) {
                Ok(Lookup::Coalesced(rx)) => rx,
                other => panic!("{other:?}"),
            })
            .collect();
        // Another payload or function with the key: a conflict, in flight and once kept.
        assert!(matches!(i.lookup(&key("k"), "f", 2, t0), Err(CallError::IdempotencyKeyConflict { .. })));
        assert!(matches!(i.lookup(&key("k"), "g", 1, t0), Err(CallError::IdempotencyKeyConflict { .. })));
        let _ = tx.send_replace(Some((value(3), 1)));
        i.finish(&key("k"), Some(&value(3)), t0);
        for rx in &mut waiters {
            assert_eq!(rx.borrow().as_ref().unwrap().0.as_ref().unwrap().value.len(), 3);
        }
        assert_eq!(i.in_flight_len(), 0);
        assert!(is_hit(&i, "k", t0));
        match i.lookup(&key("k"), "f", 2, t0) {
            Err(CallError::IdempotencyKeyConflict { key, function, held_by }) => {
                assert_eq!((key.as_str(), function.as_str(), held_by.as_str()), ("k", "f", "f"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kept_outcomes_expire_after_the_ttl() {
        let i = Idempotency::new(policy(10, 100, 1 << 20));
        let t0 = Instant::now();
        run(&i, "a", 1, value(1), t0);
        assert!(is_hit(&i, "a", t0 + Duration::from_secs(9)));
        assert!(!is_hit(&i, "a", t0 + Duration::from_secs(10)));
        // Expired: the key runs again, and its new outcome replaces the old one.
        run(&i, "a", 1, value(2), t0 + Duration::from_secs(10));
        assert_eq!(i.kept_totals().0, 1);
        assert!(is_hit(&i, "a", t0 + Duration::from_secs(19)));
        // The stale order entry of the first outcome does not evict the second.
        run(&i, "b", 1, value(1), t0 + Duration::from_secs(15));
        assert!(is_hit(&i, "a", t0 + Duration::from_secs(19)));
    }

    #[test]
    fn the_count_bound_evicts_the_oldest() {
        let i = Idempotency::new(policy(60, 3, 1 << 20));
        let t0 = Instant::now();
        for (n, k) in ["a", "b", "c", "d"].iter().enumerate() {
            run(&i, k, 1, value(1), t0 + Duration::from_millis(n as u64));
        }
        let now = t0 + Duration::from_secs(1);
        assert!(!is_hit(&i, "a", now));
        assert!(is_hit(&i, "b", now) && is_hit(&i, "c", now) && is_hit(&i, "d", now));
        assert_eq!(i.kept_totals().0, 3);
    }

    #[test]
    fn the_byte_bound_evicts_the_oldest_and_refuses_what_cannot_fit() {
        let i = Idempotency::new(policy(60, 100, 3000));
        let t0 = Instant::now();
        run(&i, "a", 1, value(1000), t0);
        run(&i, "b", 1, value(1000), t0);
        assert!(is_hit(&i, "a", t0) && is_hit(&i, "b", t0));
        run(&i, "c", 1, value(1000), t0);
        assert!(!is_hit(&i, "a", t0) && is_hit(&i, "b", t0) && is_hit(&i, "c", t0));
        assert!(i.kept_totals().1 <= 3000);
        // Larger than the bound alone: not kept (and nothing evicted for it).
        run(&i, "huge", 1, value(5000), t0);
        assert!(!is_hit(&i, "huge", t0));
        assert!(is_hit(&i, "b", t0) && is_hit(&i, "c", t0));
    }

    #[test]
    fn what_is_kept_is_what_ran_or_may_have_run() {
        let cert = Arc::new(crate::barrier::testing::death(None, Some(libc::SIGKILL), &[(1, false)]));
        let crash = |started| CallError::WorkerCrashed { function: "f".into(), attempts: 1, certificate: Arc::clone(&cert), started, delivered: None };
        let python = CallError::Python {
            function: "f".into(),
            error: Box::new(PythonError { type_name: "ValueError".into(), message: "m".into(), traceback: None }),
        };
        let timeout = |sent| CallError::Timeout { function: "f".into(), after: Duration::ZERO, sent };
        for (e, kept) in [
            (python, true),
            (crash(true), true),
            (crash(false), false),
            (timeout(true), true),
            (timeout(false), false),
            (CallError::Overloaded { pool: "p".into(), max_queue: 1 }, false),
            (CallError::QueueTimeout { function: "f".into(), waited: Duration::ZERO }, false),
            (CallError::ShutDown { pool: "p".into() }, false),
        ] {
            assert_eq!(keep(&Err(e.clone())), kept, "{e}");
        }
        assert!(keep(&value(0)));
        // A kept exception comes back as it was.
        let i = Idempotency::new(IdempotencyPolicy::default());
        let t0 = Instant::now();
        run(&i, "k", 1, Err(crash(true)), t0);
        match i.lookup(&key("k"), "f", 1, t0) {
            Ok(Lookup::Hit(Err(CallError::WorkerCrashed { started: true, .. }))) => {}
            other => panic!("{other:?}"),
        }
        // Not kept: the key is free again.
        run(&i, "q", 1, Err(CallError::ShutDown { pool: "p".into() }), t0);
        assert!(matches!(i.lookup(&key("q"), "f", 1, t0), Ok(Lookup::Miss(_))));
    }

    #[test]
    fn an_execution_that_ended_without_an_outcome_frees_its_key() {
        let i = Idempotency::new(IdempotencyPolicy::default());
        let t0 = Instant::now();
        let Ok(Lookup::Miss(tx)) = i.lookup(&key("k"), "f", 1, t0) else { panic!() };
        drop(tx);
        i.finish(&key("k"), None, t0);
        assert!(matches!(i.lookup(&key("k"), "f", 1, t0), Ok(Lookup::Miss(_))));
    }
}

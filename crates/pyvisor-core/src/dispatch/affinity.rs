//! Session affinity: which worker an affinity key's calls go to.
//!
//! Owns the bindings (key → the worker's slot, with when the key was last used), their bounds
//! (idle keys expire; past `max_keys` the least recently used binding goes), and placement of an
//! unbound key: rendezvous hashing over the ready workers, untainted ones first, so keys spread
//! evenly, the same set of workers always places a key the same way, and a worker that joins
//! takes no key that is bound. A binding is never moved while its worker takes calls; one whose
//! worker stopped taking calls is the caller's to report ([`Route::Lost`]) and is then dropped,
//! so the loss is reported once.
//!
//! A plain value with the time passed in, unit-tested without processes; the pool keeps it behind
//! a lock, taken only by keyed calls. It does not wait for the worker (the queue's
//! `Want::On`) nor decide what a crash means for a call (`crate::pool::call`).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::slot::WorkerSlot;

/// Where a keyed call goes.
pub(crate) enum Route {
    /// To this worker (bound before, or placed now).
    On(Arc<WorkerSlot>),
    /// No worker is ready to place it on: take any worker, then [`AffinityTable::bind`] it.
    Unplaced,
    /// The key's worker stopped taking calls: report the loss (the binding is gone now).
    Lost(Arc<WorkerSlot>),
}

struct Binding {
    slot: Arc<WorkerSlot>,
    used: Instant,
}

/// Bindings of affinity keys to workers.
pub(crate) struct AffinityTable {
    bound: HashMap<Arc<str>, Binding>,
    max_keys: usize,
    idle: Duration,
}

impl AffinityTable {
    /// At most `max_keys` bindings (at least 1); a binding unused for `idle` expires.
    pub(crate) fn new(max_keys: usize, idle: Duration) -> Self {
        AffinityTable { bound: HashMap::new(), max_keys: max_keys.max(1), idle }
    }

    /// Bindings now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.bound.len()
    }

    /// Where the next call with `key` goes, among the routable `slots`.
    pub(crate) fn route(&mut self, key: &Arc<str>, slots: &[Arc<WorkerSlot>], now: Instant) -> Route {
        if let Some(b) = self.bound.get_mut(key) {
            if now.saturating_duration_since(b.used) < self.idle {
                if !b.slot.is_ready() || !slots.iter().any(|s| Arc::ptr_eq(s, &b.slot)) {
                    let gone = Arc::clone(&b.slot);
                    self.bound.remove(key);
                    return Route::Lost(gone);
                }
                b.used = now;
                return Route::On(Arc::clone(&b.slot));
            }
            // Idle too long: forgotten, placed afresh like a new key.
            self.bound.remove(key);
        }
        match place(key, slots) {
            Some(slot) => {
                self.bind(key, &slot, now);
                Route::On(slot)
            }
            None => Route::Unplaced,
        }
    }

    /// Bind `key` to `slot` (a call placed without a ready worker took this one).
    pub(crate) fn bind(&mut self, key: &Arc<str>, slot: &Arc<WorkerSlot>, now: Instant) {
        if !self.bound.contains_key(key) && self.bound.len() >= self.max_keys {
            self.make_room(now);
        }
        self.bound.insert(Arc::clone(key), Binding { slot: Arc::clone(slot), used: now });
    }

    /// Drop `key`'s binding if it is to `slot` (a call on it saw the worker go).
    pub(crate) fn unbind(&mut self, key: &str, slot: &Arc<WorkerSlot>) {
        if self.bound.get(key).is_some_and(|b| Arc::ptr_eq(&b.slot, slot)) {
            self.bound.remove(key);
        }
    }

    /// The worker `key` is bound to.
    #[cfg(test)]
    pub(crate) fn bound_to(&self, key: &str) -> Option<crate::death::WorkerId> {
        self.bound.get(key).map(|b| b.slot.id)
    }

    /// Expire idle bindings; if none is idle, drop the least recently used one.
    fn make_room(&mut self, now: Instant) {
        let idle = self.idle;
        self.bound.retain(|_, b| now.saturating_duration_since(b.used) < idle);
        if self.bound.len() >= self.max_keys {
            if let Some(oldest) = self.bound.iter().min_by_key(|(_, b)| b.used).map(|(k, _)| Arc::clone(k)) {
                self.bound.remove(&oldest);
            }
        }
    }
}

/// Rendezvous hashing: among the ready workers (untainted ones if any is ready), the one with
/// the highest hash of (key, worker id).
fn place(key: &str, slots: &[Arc<WorkerSlot>]) -> Option<Arc<WorkerSlot>> {
    let ready = || slots.iter().filter(|s| s.is_ready());
    let clean = ready().any(|s| !s.is_tainted());
    ready().filter(|s| !clean || !s.is_tainted()).max_by_key(|s| score(key, s.id.0)).cloned()
}

fn score(key: &str, worker: u64) -> u64 {
    // SipHash with fixed keys: the same in every process and run.
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    worker.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::death::WorkerId;
    use crate::dispatch::slot::CapacityBell;
    use crate::status::WorkerState;

    fn slot(id: u64) -> Arc<WorkerSlot> {
        let s = Arc::new(WorkerSlot::new(WorkerId(id), id as usize, 4, Arc::new(CapacityBell::default())));
        s.set_state(WorkerState::Ready);
        s
    }

    fn key(k: &str) -> Arc<str> {
        Arc::from(k)
    }

    fn on(r: Route) -> u64 {
        match r {
            Route::On(s) => s.id.0,
            Route::Unplaced => panic!("unplaced"),
            Route::Lost(s) => panic!("lost {}", s.id.0),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn keys_spread_evenly_and_stay_where_they_are() {
        let slots: Vec<_> = (1..=4).map(slot).collect();
        let mut t = AffinityTable::new(10_000, HOUR);
        let now = Instant::now();
        let mut per = HashMap::new();
        for i in 0..1000 {
            *per.entry(on(t.route(&key(&format!("k{i}")), &slots, now))).or_insert(0) += 1;
        }
        assert_eq!(per.len(), 4);
        assert!(per.values().all(|n| (180..=320).contains(n)), "{per:?}");
        for i in 0..1000 {
            let k = key(&format!("k{i}"));
            let first = t.bound_to(&k).unwrap().0;
            assert_eq!(on(t.route(&k, &slots, now)), first);
        }
    }

    #[test]
    fn a_new_worker_takes_no_bound_key_and_a_lost_key_is_reported_once() {
        let mut slots: Vec<_> = (1..=3).map(slot).collect();
        let mut t = AffinityTable::new(100, HOUR);
        let now = Instant::now();
        let before: Vec<u64> = (0..50).map(|i| on(t.route(&key(&format!("k{i}")), &slots, now))).collect();
        slots.push(slot(9));
        let after: Vec<u64> = (0..50).map(|i| on(t.route(&key(&format!("k{i}")), &slots, now))).collect();
        assert_eq!(before, after, "bindings do not move to a new worker");

        // Worker 1 dies: each of its keys is lost once, then placed elsewhere; others stay.
        slots[0].set_state(WorkerState::Dead);
        let alive: Vec<_> = slots[1..].to_vec();
        for (i, was) in before.iter().enumerate() {
            let k = key(&format!("k{i}"));
            match t.route(&k, &alive, now) {
                Route::Lost(s) => {
                    assert_eq!((s.id.0, *was), (1, 1));
                    assert_ne!(on(t.route(&k, &alive, now)), 1, "then bound elsewhere");
                }
                Route::On(s) => assert_eq!(s.id.0, *was),
                Route::Unplaced => panic!("unplaced"),
            }
        }
    }

    #[test]
    fn placement_prefers_untainted_workers() {
        let slots: Vec<_> = (1..=3).map(slot).collect();
        slots[0].taint(HOUR);
        slots[1].taint(HOUR);
        let mut t = AffinityTable::new(100, HOUR);
        for i in 0..20 {
            assert_eq!(on(t.route(&key(&format!("k{i}")), &slots, Instant::now())), 3);
        }
        // With only tainted workers ready, they are used.
        slots[2].set_state(WorkerState::Dead);
        assert!(matches!(t.route(&key("new"), &slots[..2], Instant::now()), Route::On(_)));
        assert!(matches!(t.route(&key("none"), &[], Instant::now()), Route::Unplaced));
    }

    #[test]
    fn idle_keys_expire_and_the_table_is_bounded() {
        let slots: Vec<_> = (1..=2).map(slot).collect();
        let mut t = AffinityTable::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..3 {
            t.route(&key(&format!("k{i}")), &slots, t0 + Duration::from_secs(i));
        }
        assert_eq!(t.len(), 3);
        // Full: the least recently used goes.
        t.route(&key("k3"), &slots, t0 + Duration::from_secs(5));
        assert_eq!(t.len(), 3);
        assert!(t.bound_to("k0").is_none());
        // Idle ones go first.
        t.route(&key("k4"), &slots, t0 + Duration::from_secs(13));
        assert!(t.bound_to("k1").is_none() && t.bound_to("k2").is_none());
        assert!(t.bound_to("k3").is_some() && t.bound_to("k4").is_some());
        // An expired binding is placed afresh, not reported lost.
        slots[0].set_state(WorkerState::Dead);
        let late = t0 + Duration::from_secs(60);
        assert!(matches!(t.route(&key("k3"), &slots[1..], late), Route::On(_)));
    }

    #[test]
    fn unbind_drops_only_a_binding_to_that_worker() {
        let slots: Vec<_> = (1..=2).map(slot).collect();
        let mut t = AffinityTable::new(10, HOUR);
        let k = key("k");
        t.bind(&k, &slots[0], Instant::now());
        t.unbind("k", &slots[1]);
        assert_eq!(t.bound_to("k"), Some(WorkerId(1)));
        t.unbind("k", &slots[0]);
        assert_eq!(t.bound_to("k"), None);
    }
}

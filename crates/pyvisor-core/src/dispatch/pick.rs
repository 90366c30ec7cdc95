//! Picking: which worker takes the next call.
//!
//! Owns the table of routable slots (copy-on-write, replaced by the router on membership
//! change, read by callers without the router) and the choice:
//! - the taint rule: a tainted worker (the replacement of a crashed one) is used only when no
//!   untainted worker is ready;
//! - an ordinary call takes the less loaded of two random candidates with room (power of two
//!   choices), falling back to a scan from a random offset;
//! - a suspect takes an idle worker to itself (`alone`), or has one held for it to drain.
//!
//! It does not wait ([`super::queue`]) and does not change membership.

use std::sync::{Arc, RwLock};

use super::slot::WorkerSlot;
use crate::death::WorkerId;

/// The slots that may take calls.
#[derive(Default)]
pub(crate) struct SlotTable {
    routable: RwLock<Arc<Vec<Arc<WorkerSlot>>>>,
}

impl SlotTable {
    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<WorkerSlot>>> {
        self.routable.read().map(|g| Arc::clone(&g)).unwrap_or_default()
    }

    /// Every routable slot now.
    pub(crate) fn routable(&self) -> Vec<Arc<WorkerSlot>> {
        self.snapshot().iter().cloned().collect()
    }

    /// Add a slot that just became ready.
    pub(crate) fn insert(&self, slot: Arc<WorkerSlot>) {
        if let Ok(mut g) = self.routable.write() {
            let mut v: Vec<Arc<WorkerSlot>> = g.iter().filter(|s| s.id != slot.id).cloned().collect();
            v.push(slot);
            *g = Arc::new(v);
        }
    }

    /// Remove a slot (dead, draining or stopped).
    pub(crate) fn remove(&self, id: WorkerId) {
        if let Ok(mut g) = self.routable.write() {
            if g.iter().any(|s| s.id == id) {
                let v: Vec<Arc<WorkerSlot>> = g.iter().filter(|s| s.id != id).cloned().collect();
                *g = Arc::new(v);
            }
        }
    }

    /// Remove every slot (the pool closed).
    pub(crate) fn clear(&self) {
        if let Ok(mut g) = self.routable.write() {
            *g = Arc::new(Vec::new());
        }
    }
}

/// The taint rule: the untainted slots if any of them is ready, else the tainted ones.
pub(crate) fn preferred(slots: &[Arc<WorkerSlot>]) -> std::borrow::Cow<'_, [Arc<WorkerSlot>]> {
    use std::borrow::Cow;
    if !slots.iter().any(|s| s.is_tainted()) {
        return Cow::Borrowed(slots);
    }
    let clean_ready = slots.iter().any(|s| !s.is_tainted() && s.is_ready());
    Cow::Owned(slots.iter().filter(|s| s.is_tainted() != clean_ready).cloned().collect())
}

/// Reserve one unit on an ordinary worker: power of two random choices among `slots`, then a
/// scan from a random offset. `ring`: see [`WorkerSlot::try_reserve`].
pub(crate) fn pick_normal(slots: &[Arc<WorkerSlot>], ring: bool) -> Option<Arc<WorkerSlot>> {
    let n = slots.len();
    match n {
        0 => return None,
        1 => return slots[0].try_reserve(ring).then(|| Arc::clone(&slots[0])),
        _ => {}
    }
    let a = rand::random_range(0..n);
    let mut b = rand::random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    let (first, second) = if slots[a].in_flight() <= slots[b].in_flight() { (a, b) } else { (b, a) };
    for i in [first, second] {
        if slots[i].try_reserve(ring) {
            return Some(Arc::clone(&slots[i]));
        }
    }
    let start = rand::random_range(0..n);
    (0..n).map(|k| &slots[(start + k) % n]).find(|s| s.try_reserve(ring)).cloned()
}

/// Take an idle worker (not held for another call) to call `id` alone.
pub(crate) fn pick_alone(slots: &[Arc<WorkerSlot>], id: u64) -> Option<Arc<WorkerSlot>> {
    let n = slots.len();
    if n == 0 {
        return None;
    }
    let start = rand::random_range(0..n);
    (0..n).map(|k| &slots[(start + k) % n]).find(|s| s.try_reserve_alone(id)).cloned()
}

/// Hold a worker for call `id` so that it drains (the least loaded ready one that nobody
/// holds), unless that would leave no worker for ordinary calls: at most `ready - 1` holds
/// when more than one worker is ready.
pub(crate) fn hold_for(slots: &[Arc<WorkerSlot>], all: &[Arc<WorkerSlot>], id: u64) -> Option<Arc<WorkerSlot>> {
    if all.iter().any(|s| s.held_by() == id) {
        return None;
    }
    let ready = all.iter().filter(|s| s.is_ready()).count();
    let held = all.iter().filter(|s| s.is_ready() && s.held_by() != 0).count();
    if ready > 1 && held + 1 >= ready {
        return None;
    }
    let mut free: Vec<&Arc<WorkerSlot>> = slots.iter().filter(|s| s.is_ready() && s.held_by() == 0).collect();
    free.sort_by_key(|s| s.in_flight());
    free.into_iter().find(|s| s.hold(id)).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::slot::CapacityBell;
    use crate::status::WorkerState;
    use std::time::Duration;

    fn slot(id: u64, max: usize) -> Arc<WorkerSlot> {
        let s = Arc::new(WorkerSlot::new(WorkerId(id), id as usize, max, Arc::new(CapacityBell::default())));
        s.set_state(WorkerState::Ready);
        s
    }

    #[test]
    fn fills_every_slot_to_its_limit_and_skips_not_ready() {
        let slots = vec![slot(0, 2), slot(1, 2), slot(2, 2)];
        let starting = Arc::new(WorkerSlot::new(WorkerId(9), 9, 2, Arc::new(CapacityBell::default())));
        let mut all = slots.clone();
        all.push(starting.clone());
        let mut got = 0;
        while pick_normal(&all, true).is_some() {
            got += 1;
        }
        assert_eq!(got, 6);
        assert_eq!(starting.in_flight(), 0);
        slots[1].unreserve(0, true);
        assert_eq!(pick_normal(&all, true).unwrap().id, WorkerId(1));
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let slots = vec![slot(0, 100), slot(1, 100)];
        for _ in 0..50 {
            assert!(slots[0].try_reserve(true));
        }
        for _ in 0..20 {
            assert_eq!(pick_normal(&slots, true).unwrap().id, WorkerId(1));
        }
    }

    #[test]
    fn tainted_slots_take_calls_only_when_no_untainted_one_is_ready() {
        let clean = slot(1, 1);
        let tainted = slot(2, 1);
        tainted.taint(Duration::from_secs(60));
        let all = vec![Arc::clone(&clean), Arc::clone(&tainted)];
        assert_eq!(pick_normal(&preferred(&all), true).unwrap().id, WorkerId(1));
        // The clean one is full: the call waits rather than use the tainted one.
        assert!(pick_normal(&preferred(&all), true).is_none());
        clean.set_state(WorkerState::Dead);
        assert_eq!(pick_normal(&preferred(&all), true).unwrap().id, WorkerId(2));
    }

    #[test]
    fn alone_takes_an_idle_worker_to_itself_and_nobody_joins_it() {
        let s = slot(1, 8);
        let all = vec![Arc::clone(&s)];
        assert!(pick_normal(&all, true).is_some());
        assert!(pick_alone(&all, 7).is_none(), "busy: not alone");
        assert_eq!(s.held_by(), 0, "a failed alone pick leaves no hold");
        s.unreserve(0, true);
        assert!(pick_alone(&all, 7).is_some());
        assert!(pick_normal(&all, true).is_none(), "nobody joins a suspect");
        assert!(pick_alone(&all, 8).is_none());
        s.unreserve(7, true);
        assert_eq!(s.held_by(), 0);
        assert!(pick_normal(&all, true).is_some());
    }

    #[test]
    fn a_hold_drains_a_worker_and_keeps_one_for_ordinary_calls() {
        let a = slot(1, 4);
        let b = slot(2, 4);
        let all = vec![Arc::clone(&a), Arc::clone(&b)];
        assert!(a.try_reserve(true));
        assert!(b.try_reserve(true));
        assert!(b.try_reserve(true));
        let held = hold_for(&all, &all, 7).unwrap();
        assert_eq!(held.id, WorkerId(1), "the least loaded is held");
        assert!(hold_for(&all, &all, 8).is_none(), "the last worker stays for ordinary calls");
        assert!(!a.try_reserve(true), "a held worker takes no ordinary call");
        assert!(pick_alone(&all, 7).is_none(), "still busy");
        a.unreserve(0, true);
        assert_eq!(pick_alone(&all, 7).unwrap().id, WorkerId(1));
    }
}

//! Routing: which ready worker takes the next call.
//!
//! Owns the table of routable slots (copy-on-write, replaced by the router on membership
//! change, read by callers without the router) and the choice: least in flight of two random
//! ready slots (power of two choices), falling back to a scan. It does not queue (see
//! [`crate::queue`]) and does not change membership itself.

use std::sync::{Arc, RwLock};

use crate::slot::WorkerSlot;

/// The slots that may take calls.
#[derive(Default)]
pub(crate) struct SlotTable {
    routable: RwLock<Arc<Vec<Arc<WorkerSlot>>>>,
}

impl SlotTable {
    fn snapshot(&self) -> Arc<Vec<Arc<WorkerSlot>>> {
        self.routable.read().map(|g| Arc::clone(&g)).unwrap_or_default()
    }

    /// Add a slot that just became ready.
    pub(crate) fn insert(&self, slot: Arc<WorkerSlot>) {
        if let Ok(mut g) = self.routable.write() {
            let mut v: Vec<Arc<WorkerSlot>> = g.iter().cloned().collect();
            v.retain(|s| s.id != slot.id);
            v.push(slot);
            *g = Arc::new(v);
        }
    }

    /// Remove a slot (dead, draining or stopped).
    pub(crate) fn remove(&self, id: crate::WorkerId) {
        if let Ok(mut g) = self.routable.write() {
            let v: Vec<Arc<WorkerSlot>> = g.iter().filter(|s| s.id != id).cloned().collect();
            *g = Arc::new(v);
        }
    }

    /// Reserve capacity on a ready slot, or `None` if all are full.
    pub(crate) fn pick(&self) -> Option<Arc<WorkerSlot>> {
        let slots = self.snapshot();
        pick_from(&slots)
    }
}

/// Power of two random choices among `slots`, then a scan from a random offset.
pub(crate) fn pick_from(slots: &[Arc<WorkerSlot>]) -> Option<Arc<WorkerSlot>> {
    let n = slots.len();
    match n {
        0 => return None,
        1 => return slots[0].try_reserve().then(|| Arc::clone(&slots[0])),
        _ => {}
    }
    let a = rand::random_range(0..n);
    let mut b = rand::random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    let (first, second) =
        if slots[a].in_flight() <= slots[b].in_flight() { (a, b) } else { (b, a) };
    for i in [first, second] {
        if slots[i].try_reserve() {
            return Some(Arc::clone(&slots[i]));
        }
    }
    let start = rand::random_range(0..n);
    (0..n).map(|k| &slots[(start + k) % n]).find(|s| s.try_reserve()).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::WorkerState;
    use crate::WorkerId;

    fn ready(id: u64, max: usize) -> Arc<WorkerSlot> {
        let s = Arc::new(WorkerSlot::new(WorkerId(id), id as usize, max));
        s.set_state(WorkerState::Ready);
        s
    }

    #[test]
    fn fills_every_slot_to_its_limit_and_skips_not_ready() {
        let slots = vec![ready(0, 2), ready(1, 2), ready(2, 2)];
        let starting = Arc::new(WorkerSlot::new(WorkerId(9), 9, 2));
        let mut all = slots.clone();
        all.push(starting.clone());
        let mut got = 0;
        while pick_from(&all).is_some() {
            got += 1;
        }
        assert_eq!(got, 6);
        assert_eq!(starting.in_flight(), 0);
        slots[1].release();
        let s = pick_from(&all).unwrap();
        assert_eq!(s.id, WorkerId(1));
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let slots = vec![ready(0, 100), ready(1, 100)];
        for _ in 0..50 {
            assert!(slots[0].try_reserve());
        }
        for _ in 0..20 {
            assert_eq!(pick_from(&slots).unwrap().id, WorkerId(1));
        }
    }
}

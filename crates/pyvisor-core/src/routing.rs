//! Routing: which ready worker takes the next call.
//!
//! Owns the table of routable slots (copy-on-write, replaced by the router on membership
//! change, read by callers without the router) and the choice: least in flight of two random
//! ready slots (power of two choices), falling back to a scan. It does not queue (see
//! [`crate::queue`]) and does not change membership itself.

use std::sync::{Arc, RwLock};

use crate::slot::{WorkerSlot, WorkerState};

/// The slots that may take calls.
#[derive(Default)]
pub(crate) struct SlotTable {
    routable: RwLock<Arc<Vec<Arc<WorkerSlot>>>>,
}

impl SlotTable {
    fn snapshot(&self) -> Arc<Vec<Arc<WorkerSlot>>> {
        self.routable.read().map(|g| Arc::clone(&g)).unwrap_or_default()
    }

    /// Every routable slot now.
    pub(crate) fn routable(&self) -> Vec<Arc<WorkerSlot>> {
        self.snapshot().iter().cloned().collect()
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

    /// Reserve capacity on a ready slot, or `None` if all are full. Tainted slots are used only
    /// when no untainted slot is ready; `Alone` takes a worker with nothing in flight to itself.
    pub(crate) fn pick(&self, mode: PickMode) -> Option<Arc<WorkerSlot>> {
        let slots = self.snapshot();
        let ready = |s: &&Arc<WorkerSlot>| s.state() == WorkerState::Ready;
        let any_tainted = slots.iter().any(|s| s.is_tainted());
        let candidates: Vec<Arc<WorkerSlot>>;
        let pool: &[Arc<WorkerSlot>] = if any_tainted {
            let clean: Vec<Arc<WorkerSlot>> = slots.iter().filter(|s| !s.is_tainted()).cloned().collect();
            candidates = if clean.iter().any(|s| ready(&s)) {
                clean
            } else {
                slots.iter().filter(|s| s.is_tainted()).cloned().collect()
            };
            &candidates
        } else {
            &slots
        };
        match mode {
            PickMode::Normal => pick_from(pool),
            PickMode::Alone { call_id } => {
                let n = pool.len();
                if n == 0 {
                    return None;
                }
                let start = rand::random_range(0..n);
                (0..n).map(|k| &pool[(start + k) % n]).find(|s| s.try_reserve_exclusive(call_id)).cloned()
            }
        }
    }

}

/// How a call wants its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PickMode {
    /// Any ready worker with room.
    Normal,
    /// A ready worker with nothing else in flight, to itself (a suspect's retry).
    Alone {
        /// The call taking it.
        call_id: u64,
    },
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

#[cfg(test)]
mod taint_tests {
    use super::*;
    use crate::WorkerId;
    use std::time::Duration;

    #[test]
    fn tainted_slots_take_calls_only_when_nothing_else_is_ready() {
        let table = SlotTable::default();
        let clean = Arc::new(WorkerSlot::new(WorkerId(1), 0, 1));
        let tainted = Arc::new(WorkerSlot::new(WorkerId(2), 1, 1));
        for s in [&clean, &tainted] {
            s.set_state(WorkerState::Ready);
            table.insert(Arc::clone(s));
        }
        tainted.taint(Duration::from_secs(60));
        assert_eq!(table.pick(PickMode::Normal).unwrap().id, WorkerId(1));
        // The clean one is full: the call waits rather than use the tainted one.
        assert!(table.pick(PickMode::Normal).is_none());
        clean.set_state(WorkerState::Dead);
        assert_eq!(table.pick(PickMode::Normal).unwrap().id, WorkerId(2));
    }

    #[test]
    fn alone_takes_an_idle_worker_to_itself() {
        let table = SlotTable::default();
        let s = Arc::new(WorkerSlot::new(WorkerId(1), 0, 8));
        s.set_state(WorkerState::Ready);
        table.insert(Arc::clone(&s));
        assert!(table.pick(PickMode::Normal).is_some());
        assert!(table.pick(PickMode::Alone { call_id: 7 }).is_none(), "busy: not alone");
        s.release();
        assert!(table.pick(PickMode::Alone { call_id: 7 }).is_some());
        assert!(table.pick(PickMode::Normal).is_none(), "nobody joins a suspect");
        assert!(table.pick(PickMode::Alone { call_id: 8 }).is_none());
    }
}

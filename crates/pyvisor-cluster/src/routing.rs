//! Which member of a pool a remote call goes to, as a plain function of what the caller knows
//! ([`choose`]): untainted nodes before tainted ones; a call with an affinity key to the same
//! node while that node serves the pool (rendezvous hashing: the key's node changes only when
//! that node goes); any other call to the member with the fewest of this node's calls in flight,
//! this node's own member on a tie, else in turn.
//!
//! Owns that rule. Not the members themselves (process groups, in `remote`), not counting the
//! calls in flight.

use std::hash::{Hash, Hasher};

/// What the caller knows of one member when it picks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate<'a> {
    /// The member's node name.
    pub node: &'a str,
    /// On this node.
    pub local: bool,
    /// Its node is in a taint window.
    pub tainted: bool,
    /// This node's calls in flight there.
    pub in_flight: usize,
}

/// The index of the member to call, or `None` if there is none; `turn` breaks ties in turn
/// (the caller passes a counter it increments per call).
pub(crate) fn choose(candidates: &[Candidate<'_>], affinity: Option<&str>, turn: usize) -> Option<usize> {
    let untainted = candidates.iter().any(|c| !c.tainted);
    let eligible: Vec<usize> = (0..candidates.len()).filter(|&i| !untainted || !candidates[i].tainted).collect();
    if eligible.is_empty() {
        return None;
    }
    if let Some(key) = affinity {
        return eligible.iter().copied().max_by_key(|&i| (weight(key, candidates[i].node), candidates[i].node));
    }
    let least = eligible.iter().map(|&i| candidates[i].in_flight).min()?;
    let fewest: Vec<usize> = eligible.into_iter().filter(|&i| candidates[i].in_flight == least).collect();
    if let Some(&local) = fewest.iter().find(|&&i| candidates[i].local) {
        return Some(local);
    }
    fewest.get(turn % fewest.len()).copied()
}

/// The rendezvous weight of `node` for `key` (the same in every run of the same build).
fn weight(key: &str, node: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    node.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(node: &str, local: bool, tainted: bool, in_flight: usize) -> Candidate<'_> {
        Candidate { node, local, tainted, in_flight }
    }

    #[test]
    fn least_in_flight_first_then_local_then_in_turn() {
        let m = [c("b", false, false, 3), c("c", false, false, 1), c("d", false, false, 1)];
        let picks: Vec<Option<usize>> = (0..4).map(|t| choose(&m, None, t)).collect();
        assert_eq!(picks, vec![Some(1), Some(2), Some(1), Some(2)]);
        let m = [c("b", false, false, 0), c("a", true, false, 0)];
        assert_eq!(choose(&m, None, 0), Some(1));
        assert_eq!(choose(&m, None, 1), Some(1));
        // A busier local member loses to an idle remote one.
        let m = [c("b", false, false, 0), c("a", true, false, 2)];
        assert_eq!(choose(&m, None, 0), Some(0));
        assert_eq!(choose(&[], None, 0), None);
    }

    #[test]
    fn tainted_nodes_only_when_nothing_else_is_left() {
        let m = [c("b", false, true, 0), c("c", false, false, 9)];
        assert_eq!(choose(&m, None, 0), Some(1));
        assert_eq!(choose(&m, Some("any key"), 0), Some(1));
        let m = [c("b", false, true, 4), c("c", false, true, 2)];
        assert_eq!(choose(&m, None, 0), Some(1));
    }

    #[test]
    fn an_affinity_key_keeps_its_node_while_that_node_serves() {
        let m = [c("b", false, false, 0), c("c", false, false, 0), c("d", false, false, 0)];
        let keys: Vec<String> = (0..200).map(|i| format!("session-{i}")).collect();
        let first: Vec<usize> = keys.iter().map(|k| choose(&m, Some(k), 0).expect("a member")).collect();
        // Load and turn do not move a key.
        let busy = [c("b", false, false, 7), c("c", false, false, 0), c("d", false, false, 3)];
        for (k, &at) in keys.iter().zip(&first) {
            assert_eq!(choose(&busy, Some(k), 5), Some(at));
        }
        // Keys spread over the nodes.
        for node in 0..3 {
            assert!(first.iter().filter(|&&i| i == node).count() > 30, "{first:?}");
        }
        // Without d, only d's keys move.
        let without_d = [c("b", false, false, 0), c("c", false, false, 0)];
        for (k, &at) in keys.iter().zip(&first) {
            let now = choose(&without_d, Some(k), 0).expect("a member");
            if at != 2 {
                assert_eq!(now, at, "{k} moved");
            }
        }
    }
}

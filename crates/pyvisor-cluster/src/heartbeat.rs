//! The node heartbeat: ractor_cluster's own pings only measure latency (no timeout), so a node
//! that stops answering — SIGSTOPped, its machine frozen, its network cut without a reset — would
//! keep its session, and every call sent there would wait for its deadline. Each node runs a
//! beat actor (process group `pyvisor.node`) that answers pings, and a monitor that pings every
//! peer's beat actor each interval; a peer that misses `misses` pings in a row has its session
//! stopped, which ends the calls in flight there exactly as a closed connection does (their
//! node is lost: `RemoteCallError::NodeLost`, idempotent ones retried elsewhere).
//!
//! Owns the beat actor, the monitor task and the miss count ([`Misses`], a plain value). Not
//! the sessions themselves (`node`), not what a lost node means for calls (`remote`).

use std::collections::HashMap;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorClusterMessage;

/// The process group of every node's beat actor.
pub(crate) const GROUP: &str = "pyvisor.node";

/// What a beat actor answers (the variant name is ractor_cluster's wire tag: never rename).
#[derive(RactorClusterMessage)]
pub enum NodeBeatMsg {
    /// A ping: the number comes back.
    #[rpc]
    Ping(u64, RpcReplyPort<u64>),
}

/// How often peers are pinged and how many pings in a row a peer may miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatPolicy {
    pub(crate) interval: Duration,
    pub(crate) misses: u32,
}

impl Default for HeartbeatPolicy {
    /// Every 500 ms, 4 misses: a silent node is given up after about 2 s.
    fn default() -> Self {
        HeartbeatPolicy { interval: Duration::from_millis(500), misses: 4 }
    }
}

impl HeartbeatPolicy {
    /// Ping every `interval` (each ping waits at most that long); give a peer up after
    /// `misses` misses in a row (at least 1).
    pub fn new(interval: Duration, misses: u32) -> Self {
        HeartbeatPolicy { interval: interval.max(Duration::from_millis(10)), misses: misses.max(1) }
    }
}

/// Misses in a row per peer session (ractor_cluster's node id).
#[derive(Debug, Default)]
pub(crate) struct Misses {
    count: HashMap<u64, u32>,
}

impl Misses {
    /// Record one ping's outcome for `node`; `true` when the peer has now missed `limit` in a
    /// row (it is then forgotten: a new session starts from zero).
    pub(crate) fn record(&mut self, node: u64, answered: bool, limit: u32) -> bool {
        if answered {
            self.count.remove(&node);
            return false;
        }
        let n = self.count.entry(node).or_default();
        *n += 1;
        if *n >= limit {
            self.count.remove(&node);
            return true;
        }
        false
    }

    /// Drop peers that are no longer there.
    pub(crate) fn retain(&mut self, live: &[u64]) {
        self.count.retain(|n, _| live.contains(n));
    }
}

/// The actor every peer's monitor pings.
pub(crate) struct Beat;

impl Actor for Beat {
    type Msg = NodeBeatMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<NodeBeatMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(&self, _: ActorRef<NodeBeatMsg>, msg: NodeBeatMsg, _: &mut ()) -> Result<(), ActorProcessingErr> {
        match msg {
            NodeBeatMsg::Ping(n, reply) => {
                let _ = reply.send(n);
            }
        }
        Ok(())
    }
}

/// Ping every remote beat actor once (in parallel, each waiting at most `interval`); the node
/// ids of the peers that answered and of those that did not.
pub(crate) async fn ping_round(seq: u64, interval: Duration) -> Vec<(u64, bool)> {
    let members: Vec<_> = ractor::pg::get_members(&GROUP.to_string()).into_iter().filter(|c| !c.get_id().is_local()).collect();
    let pings = members.into_iter().map(|cell| async move {
        let node = cell.get_id().node();
        let beat: ActorRef<NodeBeatMsg> = cell.into();
        let answered = matches!(beat.call(|tx| NodeBeatMsg::Ping(seq, tx), Some(interval)).await, Ok(CallResult::Success(n)) if n == seq);
        (node, answered)
    });
    futures::future::join_all(pings).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_given_up_after_the_misses_in_a_row_and_an_answer_resets_the_count() {
        let mut m = Misses::default();
        assert!(!m.record(7, false, 3));
        assert!(!m.record(7, false, 3));
        assert!(!m.record(7, true, 3), "an answer resets");
        assert!(!m.record(7, false, 3));
        assert!(!m.record(7, false, 3));
        assert!(m.record(7, false, 3), "third miss in a row");
        // Forgotten once given up: a new session starts from zero.
        assert!(!m.record(7, false, 3));
        // Peers are counted apart; gone peers are dropped.
        assert!(!m.record(8, false, 2));
        m.retain(&[7]);
        assert!(!m.record(8, false, 2), "8 was dropped: its count restarted");
        assert!(m.record(1, false, 1));
    }

    #[test]
    fn the_policy_has_floors() {
        let p = HeartbeatPolicy::new(Duration::ZERO, 0);
        assert_eq!((p.interval, p.misses), (Duration::from_millis(10), 1));
        assert_eq!(HeartbeatPolicy::default().misses, 4);
    }
}

//! Calling a pool served anywhere in the cluster: [`RemotePool`] finds the pool's members in
//! its process group, prefers this node's own, sends the call as already-encoded bytes with
//! the time left, and — when the member's node is lost mid-call — retries an idempotent call
//! on another member and fails any other call with [`RemoteCallError::NodeLost`] (never
//! repeating it).
//!
//! Owns member choice and the retry rule across nodes. Not the wire format (`wire`), not
//! serving (`serve`), not noticing a silent node (a node heartbeat is not built yet: a stopped
//! node's calls end at their deadline).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ractor::rpc::CallResult;
use ractor::{ActorCell, ActorRef};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::node::Node;
use crate::serve::group;
use crate::wire::{self, PoolMemberMsg, WireCall, WireReply, WIRE_VERSION};

/// Why a call on a [`RemotePool`] failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteCallError {
    /// No node (this one included) serves the pool now: serve it somewhere, or wait for the
    /// nodes that do to connect.
    #[error("no node serves pool `{pool}`")]
    NoMembers { pool: String },
    /// The node running the call was lost before it answered, and the call is not idempotent:
    /// it may have run there, so it was not sent again.
    #[error("node {node} was lost during the call to `{function}` (not idempotent: not retried)")]
    NodeLost { function: String, node: String },
    /// The call failed on the node that ran it (`kind` is that node's `CallError::kind`).
    #[error("`{function}` failed on node {node}: {message}")]
    Remote { function: String, node: String, kind: String, message: String },
    /// No answer within the call's time.
    #[error("`{function}` got no answer within {after:?}")]
    Timeout { function: String, after: Duration },
    /// The input could not be encoded, or the result decoded as the type asked for.
    #[error("`{function}`: {detail}")]
    Codec { function: String, detail: String },
}

/// How one remote call goes: its time, and whether it may run twice.
#[derive(Debug, Clone)]
pub struct RemoteCallOptions {
    timeout: Duration,
    idempotent: bool,
    trace: Option<(String, Option<String>)>,
}

impl Default for RemoteCallOptions {
    fn default() -> Self {
        RemoteCallOptions { timeout: Duration::from_secs(30), idempotent: false, trace: None }
    }
}

impl RemoteCallOptions {
    /// The whole call's time, across nodes and retries (default 30 s); the serving node gets
    /// what is left of it.
    #[must_use]
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
    /// Whether the function may run more than once: only then is a call whose node was lost
    /// sent to another node (default `false`).
    #[must_use]
    pub fn idempotent(mut self, yes: bool) -> Self {
        self.idempotent = yes;
        self
    }
    /// The caller's W3C trace context, passed to the serving node.
    #[must_use]
    pub fn trace_context(mut self, traceparent: impl Into<String>, tracestate: Option<String>) -> Self {
        self.trace = Some((traceparent.into(), tracestate));
        self
    }
}

/// A pool by name, wherever in the cluster it is served.
///
/// ```no_run
/// # async fn demo(node: pyvisor_cluster::Node) -> Result<(), Box<dyn std::error::Error>> {
/// use pyvisor_cluster::{RemoteCallOptions, RemotePool};
/// let models = RemotePool::new(&node, "models");
/// let score: f64 = models.call_with("predict", &vec![0.5, 1.5], RemoteCallOptions::default().idempotent(true)).await?;
/// # let _ = score; Ok(()) }
/// ```
pub struct RemotePool {
    node: Node,
    pool: String,
    next: AtomicUsize,
}

impl RemotePool {
    /// The pool named `pool` as seen from `node`.
    pub fn new(node: &Node, pool: &str) -> Self {
        RemotePool { node: node.clone(), pool: pool.to_string(), next: AtomicUsize::new(0) }
    }

    /// The nodes serving the pool now (this node's name for a local member).
    pub fn members(&self) -> Vec<String> {
        let mut v: Vec<String> = ractor::pg::get_members(&group(&self.pool)).iter().map(|c| self.node_of(c)).collect();
        v.sort();
        v
    }

    /// Call `function` with `input`, decoding the result as `O`, with default options.
    pub async fn call<I: Serialize + ?Sized, O: DeserializeOwned>(&self, function: &str, input: &I) -> Result<O, RemoteCallError> {
        self.call_with(function, input, RemoteCallOptions::default()).await
    }

    /// [`RemotePool::call`] with options.
    pub async fn call_with<I: Serialize + ?Sized, O: DeserializeOwned>(
        &self,
        function: &str,
        input: &I,
        opts: RemoteCallOptions,
    ) -> Result<O, RemoteCallError> {
        let codec = |detail: String| RemoteCallError::Codec { function: function.to_string(), detail };
        let payload = rmp_serde::to_vec_named(input).map_err(|e| codec(e.to_string()))?;
        let reply = self.call_raw(function, &payload, opts).await?;
        rmp_serde::from_slice(&reply).map_err(|e| codec(e.to_string()))
    }

    /// Call with an already-encoded MessagePack payload; the encoded result.
    pub async fn call_raw(&self, function: &str, payload: &[u8], opts: RemoteCallOptions) -> Result<Bytes, RemoteCallError> {
        let started = Instant::now();
        let deadline = started + opts.timeout;
        let timeout = || RemoteCallError::Timeout { function: function.to_string(), after: opts.timeout };
        // Nodes this call was lost on: not tried again.
        let mut lost: Vec<u64> = Vec::new();
        loop {
            let Some(member) = self.pick(&lost) else {
                return Err(RemoteCallError::NoMembers { pool: self.pool.clone() });
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout());
            }
            let body = wire::encode(&WireCall {
                v: WIRE_VERSION,
                function: function.to_string(),
                payload: payload.to_vec(),
                budget_ms: Some(left.as_millis().try_into().unwrap_or(u64::MAX)),
                traceparent: opts.trace.as_ref().map(|t| t.0.clone()),
                tracestate: opts.trace.as_ref().and_then(|t| t.1.clone()),
                idempotent: Some(opts.idempotent),
            });
            let node = self.node_of(&member);
            let actor: ActorRef<PoolMemberMsg> = member.clone().into();
            let answer = actor.call(|tx| PoolMemberMsg::Call(body, tx), Some(left)).await;
            match answer {
                Ok(CallResult::Success(bytes)) => {
                    let reply: WireReply = wire::decode(&bytes)
                        .map_err(|detail| RemoteCallError::Codec { function: function.to_string(), detail: format!("from node {node}: {detail}") })?;
                    return match reply.result {
                        Ok(value) => Ok(Bytes::from(value.into_vec())),
                        Err(e) => Err(RemoteCallError::Remote { function: function.to_string(), node, kind: e.kind, message: e.message }),
                    };
                }
                Ok(CallResult::Timeout) => return Err(timeout()),
                // The member was gone before the call left (its proxy stopped): nothing ran,
                // any call may go to another member.
                Err(_) => {
                    lost.push(member.get_id().node());
                }
                // The member's node went away (its session closed): the call may have run there.
                Ok(CallResult::SenderError) => {
                    if !opts.idempotent {
                        return Err(RemoteCallError::NodeLost { function: function.to_string(), node });
                    }
                    tracing::debug!(pool = %self.pool, function, %node, "node lost during a call; retrying on another member");
                    lost.push(member.get_id().node());
                    // The proxies of a lost node leave the group a moment after its session
                    // ends; until then they are skipped by `lost`.
                }
            }
        }
    }

    /// This node's own member if it has one, else the next remote member in turn, skipping
    /// nodes in `lost`.
    fn pick(&self, lost: &[u64]) -> Option<ActorCell> {
        let members = ractor::pg::get_members(&group(&self.pool));
        if let Some(local) = members.iter().find(|c| c.get_id().is_local()) {
            return Some(local.clone());
        }
        let remote: Vec<&ActorCell> = members.iter().filter(|c| !lost.contains(&c.get_id().node())).collect();
        if remote.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % remote.len();
        Some(remote[i].clone())
    }

    /// The name of the node a member runs on.
    fn node_of(&self, member: &ActorCell) -> String {
        let id = member.get_id();
        if id.is_local() {
            return self.node.name().to_string();
        }
        self.node.peer_by_node_id(id.node()).unwrap_or_else(|| format!("node#{}", id.node()))
    }
}

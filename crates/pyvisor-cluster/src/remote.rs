//! Calling a pool served anywhere in the cluster: [`RemotePool`] finds the pool's members in
//! its process group, picks one (`routing`: untainted nodes first, an affinity key's node, else
//! the fewest calls in flight, this node's own on a tie), sends the call as already-encoded
//! bytes with the time left, cancels it there when the caller drops it or runs out of time,
//! and — when the member's node is lost mid-call (its session closed or given up by the
//! heartbeat, or the call channel to it broke after the call was written) — retries an
//! idempotent call on another member and fails any other call with
//! [`RemoteCallError::NodeLost`] and the loss's certificate (never repeating it). A call that
//! surely did not run there — its node's pool not running, its frame never written whole, no
//! channel to be had — goes to another node, idempotent or not.
//!
//! Owns the attempts of a remote call and the retry rule across nodes. Not the rule for
//! choosing (`routing`), not the wire format (`wire`), not serving (`serve`), not noticing a
//! lost node (`node`, `heartbeat`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pyvisor_core::CallOptions;
use ractor::ActorCell;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;

use crate::channel::{Channel, ChannelError, Outcome, SendError};
use crate::node::Node;
use crate::node_loss::NodeLoss;
use crate::routing::{choose, Candidate};
use crate::serve::{group, NOT_RUNNING};
use crate::trace::RemoteSpan;
use crate::wire::{self, Frame, WireCall, WireReply, WIRE_VERSION};

/// Why a call on a [`RemotePool`] failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteCallError {
    /// No node (this one included) serves the pool now: serve it somewhere, or wait for the
    /// nodes that do to connect.
    #[error("no node serves pool `{pool}`")]
    NoMembers { pool: String },
    /// The node running the call was lost before it answered, and the call is not idempotent
    /// (it may have run there, so it was not sent again) — or it is, and no other node was
    /// left to send it to. The certificate names the node and why it counts as lost.
    #[error("`{function}` was not retried: {certificate}")]
    NodeLost { function: String, certificate: NodeLoss },
    /// The pool's members left are on nodes this node could not open a call channel to (their
    /// call port unreachable from here, or the channel refused): nothing was sent. Check that
    /// each node's call port (`NodeConfig::call_port`, `--call-port`) is reachable.
    #[error("pool `{pool}`: no call channel to node {node}: {detail}")]
    Unreachable { pool: String, node: String, detail: String },
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

impl RemoteCallError {
    /// A short name of the variant (`no_members`, `node_lost`, `unreachable`, `remote`,
    /// `timeout`, `codec`),
    /// for metrics and span attributes.
    pub fn kind(&self) -> &'static str {
        match self {
            RemoteCallError::NoMembers { .. } => "no_members",
            RemoteCallError::NodeLost { .. } => "node_lost",
            RemoteCallError::Unreachable { .. } => "unreachable",
            RemoteCallError::Remote { .. } => "remote",
            RemoteCallError::Timeout { .. } => "timeout",
            RemoteCallError::Codec { .. } => "codec",
        }
    }
}

/// The timeout of a remote call made without one (as a pool's default call timeout).
pub const DEFAULT_REMOTE_TIMEOUT: Duration = Duration::from_secs(30);

/// A pool by name, wherever in the cluster it is served.
///
/// ```no_run
/// # async fn demo(node: pyvisor_cluster::Node) -> Result<(), Box<dyn std::error::Error>> {
/// use pyvisor_cluster::RemotePool;
/// use pyvisor_core::CallOptions;
/// let models = RemotePool::new(&node, "models");
/// let score: f64 = models.call_with("predict", &vec![0.5, 1.5], CallOptions::new().idempotent(true)).await?;
/// # let _ = score; Ok(()) }
/// ```
pub struct RemotePool {
    node: Node,
    pool: String,
    timeout: Duration,
    turn: AtomicUsize,
    state: Mutex<Known>,
}

/// What this pool handle has learnt: its calls in flight per member node, and which functions
/// are idempotent (from the serving nodes' replies).
#[derive(Default)]
struct Known {
    in_flight: HashMap<String, usize>,
    idempotent: HashMap<String, bool>,
}

impl RemotePool {
    /// The pool named `pool` as seen from `node`.
    pub fn new(node: &Node, pool: &str) -> Self {
        RemotePool { node: node.clone(), pool: pool.to_string(), timeout: DEFAULT_REMOTE_TIMEOUT, turn: AtomicUsize::new(0), state: Mutex::new(Known::default()) }
    }

    /// The timeout of calls made without one (default 30 s).
    #[must_use]
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.pool
    }

    /// The nodes serving the pool now (this node's name for a local member).
    pub fn members(&self) -> Vec<String> {
        let mut v: Vec<String> = ractor::pg::get_members(&group(&self.pool)).iter().map(|c| self.node_of(c)).collect();
        v.sort();
        v
    }

    /// Call `function` with `input`, decoding the result as `O`, with default options.
    pub async fn call<I: Serialize + ?Sized, O: DeserializeOwned>(&self, function: &str, input: &I) -> Result<O, RemoteCallError> {
        self.call_with(function, input, CallOptions::default()).await
    }

    /// [`RemotePool::call`] with options: the timeout or deadline (the whole call's, across
    /// nodes and retries; the serving node gets what is left), idempotency override, affinity
    /// and idempotency keys, trace context. A call with an affinity key (else an idempotency
    /// key) goes to the node that key maps to while that node serves the pool, and the key is
    /// kept there (its worker, its stored result); when that node is lost, the key moves.
    pub async fn call_with<I: Serialize + ?Sized, O: DeserializeOwned>(
        &self,
        function: &str,
        input: &I,
        opts: CallOptions,
    ) -> Result<O, RemoteCallError> {
        let codec = |detail: String| RemoteCallError::Codec { function: function.to_string(), detail };
        let payload = rmp_serde::to_vec_named(input).map_err(|e| codec(e.to_string()))?;
        let reply = self.call_raw(function, &payload, opts).await?;
        rmp_serde::from_slice(&reply).map_err(|e| codec(e.to_string()))
    }

    /// Call with an already-encoded MessagePack payload; the encoded result. Dropping the
    /// future cancels the call on the node running it.
    pub async fn call_raw(&self, function: &str, payload: &[u8], opts: CallOptions) -> Result<Bytes, RemoteCallError> {
        let given = opts.get_trace_context().map(|(tp, ts)| (tp.to_string(), ts.map(str::to_string)));
        let span = RemoteSpan::start(&self.pool, function, given.as_ref());
        let result = self.attempts(function, payload, &opts, &span).await;
        span.finish(result.as_ref().map(|_| ()));
        result
    }

    /// The call's attempts, on one member after another while their nodes are lost.
    async fn attempts(&self, function: &str, payload: &[u8], opts: &CallOptions, span: &RemoteSpan) -> Result<Bytes, RemoteCallError> {
        let trace = span.traceparent();
        let called = Instant::now();
        let deadline = opts.deadline_at(called, Some(self.timeout));
        let timeout = || RemoteCallError::Timeout { function: function.to_string(), after: deadline.map_or(Duration::MAX, |d| d - called) };
        // Without an override, what the serving nodes said of the function (unknown: not).
        let idempotent = opts.idempotent_override().or_else(|| self.known_idempotent(function)).unwrap_or(false);
        // Nodes this call was lost on, or that could not take it: not tried again.
        let mut skip: Vec<String> = Vec::new();
        let mut last_loss: Option<NodeLoss> = None;
        // A node no call channel could be opened to, and why.
        let mut unreachable: Option<(String, String)> = None;
        let mut attempt = 0u32;
        loop {
            // A keyed call goes to its key's node, where the key is kept.
            let Some((member, node)) = self.pick(&skip, opts.affinity_key().or(opts.get_idempotency_key())) else {
                return Err(match (last_loss, unreachable) {
                    (Some(certificate), _) => RemoteCallError::NodeLost { function: function.to_string(), certificate },
                    (None, Some((node, detail))) => RemoteCallError::Unreachable { pool: self.pool.clone(), node, detail },
                    (None, None) => RemoteCallError::NoMembers { pool: self.pool.clone() },
                });
            };
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()).filter(|l| !l.is_zero()) {
                    Some(l) => Some(l),
                    None => return Err(timeout()),
                },
                None => None,
            };
            attempt += 1;
            // This process's own member: its pool is called directly, without the wire.
            if let Some(source) = crate::serve::local(member.get_id()) {
                let Some(pool) = source.pool() else {
                    skip.push(node);
                    continue;
                };
                let mut local = opts.clone();
                if let Some(d) = deadline {
                    local = local.deadline(d);
                }
                if let Some((tp, ts)) = &trace {
                    local = local.trace_context(tp.clone(), ts.clone());
                }
                let outcome = {
                    let _counted = InFlight::new(&self.state, &node);
                    pool.call_raw(function, payload, local).await
                };
                return outcome.map_err(|e| failed(function, node, e.kind().to_string(), e.to_string(), timeout));
            }
            // Another node's member: the call goes on this node's call channel to it, counted
            // in flight from now (while its channel opens too: other calls see the load).
            let counted = InFlight::new(&self.state, &node);
            let channel = match self.node.channel(&member, left.unwrap_or(DEFAULT_REMOTE_TIMEOUT)).await {
                Ok(c) => c,
                // Nothing was sent: the call may go elsewhere.
                Err(e) => {
                    drop(counted);
                    if let ChannelError::Failed(detail) = e {
                        tracing::debug!(pool = %self.pool, %node, "no call channel: {detail}");
                        unreachable = Some((node.clone(), detail));
                    }
                    skip.push(node);
                    continue;
                }
            };
            let call_id = next_call_id();
            let body = wire::encode(&WireCall {
                v: WIRE_VERSION,
                function: function.to_string(),
                payload: payload.to_vec(),
                budget_ms: left.map(|l| l.as_millis().try_into().unwrap_or(u64::MAX)),
                traceparent: trace.as_ref().map(|t| t.0.clone()),
                tracestate: trace.as_ref().and_then(|t| t.1.clone()),
                idempotent: opts.idempotent_override(),
                call_id: Some(call_id),
                affinity: opts.affinity_key().map(str::to_string),
                idempotency_key: opts.get_idempotency_key().map(str::to_string),
            });
            let frame = Frame::Call { id: call_id, member: member.get_id().pid(), body: body.into() }.encode();
            let sent = Instant::now();
            let answer = {
                let _counted = counted;
                // Armed from before the send: a caller dropped while its frame waits for room
                // is forgotten, and the serving node told (a cancel for a call it never got is
                // ignored there).
                let mut cancel = CancelOnDrop { channel: Some(Arc::clone(&channel)), call_id };
                let exchange = async {
                    let outcome = channel.send(call_id, frame).await?;
                    Ok::<_, SendError>(outcome.await)
                };
                // Waiting for room to send counts against the call's time too.
                let answer = match left {
                    Some(left) => tokio::time::timeout(left, exchange).await.ok(),
                    None => Some(exchange.await),
                };
                if answer.is_some() {
                    cancel.channel = None;
                }
                answer
            };
            let answer = match answer {
                // Out of time (the serving node was told to abandon it).
                None => return Err(timeout()),
                // The channel had closed: nothing was sent, the call may go elsewhere.
                Some(Err(SendError::Closed)) | Some(Ok(Ok(Outcome::NotSent))) => {
                    skip.push(node);
                    continue;
                }
                Some(Err(SendError::TooLarge { len, max })) => {
                    let detail = format!("the call ({len} bytes) is larger than node {node} takes ({max} bytes, its `max_frame`)");
                    return Err(RemoteCallError::Codec { function: function.to_string(), detail });
                }
                Some(Ok(Ok(Outcome::Reply(bytes)))) => Ok(bytes),
                Some(Ok(Err(lost))) => Err(lost),
            };
            match answer {
                Ok(bytes) => {
                    let reply: WireReply = wire::decode(&bytes)
                        .map_err(|detail| RemoteCallError::Codec { function: function.to_string(), detail: format!("from node {node}: {detail}") })?;
                    if let Some(i) = reply.idempotent {
                        self.learn_idempotent(function, i);
                    }
                    return match reply.result {
                        Ok(value) => Ok(Bytes::from(value.into_vec())),
                        // Nothing ran there: any call may go elsewhere.
                        Err(e) if e.kind == NOT_RUNNING => {
                            skip.push(node);
                            continue;
                        }
                        Err(e) => Err(failed(function, node, e.kind, e.message, timeout)),
                    };
                }
                // The channel broke or the node's session ended after the call frame was
                // written: the call may have run there.
                Err(_) => {
                    let certificate = NodeLoss { cause: self.node.loss_cause(&node), node: node.clone(), after: sent.elapsed(), attempt };
                    span.node_lost(&certificate.node, idempotent);
                    if !idempotent {
                        return Err(RemoteCallError::NodeLost { function: function.to_string(), certificate });
                    }
                    tracing::debug!(pool = %self.pool, function, %certificate, "node lost during a call; retrying on another member");
                    // The proxies of a lost node leave the group a moment after its session
                    // ends; until then `skip` keeps them out.
                    skip.push(node);
                    last_loss = Some(certificate);
                }
            }
        }
    }

    /// The member to call (see `routing`) and its node's name, among those not on a node in
    /// `skip`; `key` is the call's routing key.
    fn pick(&self, skip: &[String], key: Option<&str>) -> Option<(ActorCell, String)> {
        let (members, names): (Vec<ActorCell>, Vec<String>) = ractor::pg::get_members(&group(&self.pool))
            .into_iter()
            .map(|c| {
                let name = self.node_of(&c);
                (c, name)
            })
            .filter(|(_, name)| !skip.contains(name))
            .unzip();
        let known = self.state.lock().ok()?;
        let candidates: Vec<Candidate<'_>> = members
            .iter()
            .zip(&names)
            .map(|(c, name)| {
                let id = c.get_id();
                Candidate {
                    node: name,
                    local: id.is_local(),
                    tainted: !id.is_local() && self.node.is_tainted(name),
                    in_flight: known.in_flight.get(name).copied().unwrap_or(0),
                }
            })
            .collect();
        let i = choose(&candidates, key, self.turn.fetch_add(1, Ordering::Relaxed))?;
        Some((members[i].clone(), names[i].clone()))
    }

    fn known_idempotent(&self, function: &str) -> Option<bool> {
        self.state.lock().ok()?.idempotent.get(function).copied()
    }

    fn learn_idempotent(&self, function: &str, idempotent: bool) {
        if let Ok(mut known) = self.state.lock() {
            if known.idempotent.get(function) != Some(&idempotent) {
                known.idempotent.insert(function.to_string(), idempotent);
            }
        }
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

/// A call that failed on `node` with `kind` (a `CallError::kind`): a timeout there is the
/// call's own (the node was given the time left), anything else is that node's failure.
fn failed(function: &str, node: String, kind: String, message: String, timeout: impl Fn() -> RemoteCallError) -> RemoteCallError {
    if kind == "timeout" {
        return timeout();
    }
    RemoteCallError::Remote { function: function.to_string(), node, kind, message }
}

/// A call id no other call of this process has (random start: ids of calls from different
/// nodes to one member do not meet in practice).
fn next_call_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    });
    start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One call in flight on a member node, counted while it lives.
struct InFlight<'a> {
    state: &'a Mutex<Known>,
    node: &'a str,
}

impl<'a> InFlight<'a> {
    fn new(state: &'a Mutex<Known>, node: &'a str) -> Self {
        if let Ok(mut k) = state.lock() {
            match k.in_flight.get_mut(node) {
                Some(n) => *n += 1,
                None => {
                    k.in_flight.insert(node.to_string(), 1);
                }
            }
        }
        InFlight { state, node }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut k) = self.state.lock() {
            if let Some(n) = k.in_flight.get_mut(self.node) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    k.in_flight.remove(self.node);
                }
            }
        }
    }
}

/// Tells the serving node to abandon the call unless disarmed (`channel` taken): the caller
/// dropped the call or ran out of time.
struct CancelOnDrop {
    channel: Option<Arc<Channel>>,
    call_id: u64,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            channel.cancel(self.call_id);
        }
    }
}

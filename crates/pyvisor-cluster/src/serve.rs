//! Serving a local pool to the cluster: a member actor per served pool, joined to the process
//! group `pyvisor.pool.<name>` (ractor_cluster makes it visible on every connected node), that
//! tells a caller where to open a call channel to this node (`call_port` takes it), and running
//! each call that arrives on a channel for that member on the pool, with the caller's time
//! left, trace context, idempotency, affinity and idempotency keys. A caller in this process
//! finds the pool behind its own node's member in a table of this process's served pools
//! (`local`) and calls it directly.
//!
//! Owns the member actor, [`Served`] (the handle that keeps it), that table, and running one
//! call from the wire. Not the wire format (`wire`), not the connections (`call_port`), not
//! choosing a member (`remote`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyvisor_core::{CallOptions, Pool};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef};

use crate::error::ClusterError;
use crate::wire::{self, ChannelOffer, PoolMemberMsg, WireCall, WireError, WireReply, WIRE_VERSION};

/// The process group of the members serving pools named `pool`.
pub(crate) fn group(pool: &str) -> String {
    format!("pyvisor.pool.{pool}")
}

/// A pool served to the cluster; it stops being served (and leaves the group) when this
/// drops or [`Served::stop`] is called. The pool itself is not stopped.
pub struct Served {
    member: ActorRef<PoolMemberMsg>,
    pool: String,
}

impl Served {
    /// The served pool's name (the name callers on other nodes use).
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Stop serving the pool.
    pub fn stop(self) {
        // Drop does it.
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(mut local) = LOCAL.lock() {
            local.remove(&self.member.get_id());
        }
        self.member.stop(None);
    }
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served").field("pool", &self.pool).finish_non_exhaustive()
    }
}

/// Where a member finds the pool it serves: one handle, or a lookup made for each call (a
/// pool in a supervision tree is a new handle after each restart).
#[derive(Clone)]
pub(crate) enum Source {
    Fixed(Pool),
    Lookup(Arc<dyn Fn() -> Option<Pool> + Send + Sync>),
}

impl Source {
    pub(crate) fn pool(&self) -> Option<Pool> {
        match self {
            Source::Fixed(p) => Some(p.clone()),
            Source::Lookup(f) => f(),
        }
    }
}

/// The error kind of a call that reached a node whose pool is not running (restarting, or
/// stopped): nothing ran, so the caller may send any call elsewhere.
pub(crate) const NOT_RUNNING: &str = "not_running";

/// A pool this process serves: its name, where to find it, and what its workers said of
/// each function's idempotency.
pub(crate) struct ServedPool {
    name: String,
    source: Source,
    idempotent: Mutex<HashMap<String, bool>>,
}

impl ServedPool {
    /// The pool, when it is running.
    pub(crate) fn pool(&self) -> Option<Pool> {
        self.source.pool()
    }

    /// Whether `function` is idempotent, remembered after the first look at the pool's
    /// functions.
    fn function_idempotent(&self, pool: &Pool, function: &str) -> Option<bool> {
        let mut known = self.idempotent.lock().ok()?;
        if let Some(i) = known.get(function) {
            return Some(*i);
        }
        let i = pool.functions().into_iter().find(|f| f.name == function)?.idempotent;
        known.insert(function.to_string(), i);
        Some(i)
    }
}

/// The pools this process serves, by their member's id: a call channel finds the pool a call
/// names here, and a caller in this process finds its own node's member and calls the pool
/// directly.
static LOCAL: Mutex<BTreeMap<ActorId, Arc<ServedPool>>> = Mutex::new(BTreeMap::new());

/// The pool behind this process's member `member`, if it is one.
pub(crate) fn local(member: ActorId) -> Option<Arc<ServedPool>> {
    LOCAL.lock().ok()?.get(&member).cloned()
}

/// Where callers open a call channel to this node, with a fresh token.
pub(crate) type Offers = Arc<dyn Fn() -> ChannelOffer + Send + Sync>;

/// Serve the pool `name` found through `source` to the cluster; its member hands out
/// `offers`.
pub(crate) async fn serve(name: &str, source: Source, offers: Offers) -> Result<Served, ClusterError> {
    let (member, _) =
        Actor::spawn(None, Member, offers).await.map_err(|e| ClusterError::Serve { pool: name.to_string(), detail: e.to_string() })?;
    let served = Arc::new(ServedPool { name: name.to_string(), source, idempotent: Mutex::new(HashMap::new()) });
    if let Ok(mut local) = LOCAL.lock() {
        local.insert(member.get_id(), served);
    }
    ractor::pg::join(group(name), vec![member.get_cell()]);
    Ok(Served { member, pool: name.to_string() })
}

struct Member;

impl Actor for Member {
    type Msg = PoolMemberMsg;
    type State = Offers;
    type Arguments = Offers;

    async fn pre_start(&self, _: ActorRef<PoolMemberMsg>, offers: Offers) -> Result<Offers, ActorProcessingErr> {
        Ok(offers)
    }

    async fn handle(&self, _: ActorRef<PoolMemberMsg>, msg: PoolMemberMsg, offers: &mut Offers) -> Result<(), ActorProcessingErr> {
        match msg {
            PoolMemberMsg::Offer(reply) => {
                let _ = reply.send(wire::encode(&offers()));
            }
        }
        Ok(())
    }
}

/// Run one call that arrived on a call channel for this process's member `member` (its actor
/// pid): the encoded reply, with what went wrong when it could not run.
pub(crate) async fn call(member: u64, body: &[u8]) -> Vec<u8> {
    let Some(served) = local(ActorId::Local(member)) else {
        let message = "no pool is served by that member on this node (it stopped serving)".to_string();
        return answer(Err(WireError { kind: NOT_RUNNING.into(), message }), None);
    };
    let call: WireCall = match wire::decode(body) {
        Ok(c) => c,
        Err(message) => return answer(Err(WireError { kind: "protocol".into(), message }), None),
    };
    let Some(pool) = served.pool() else {
        let message = format!("pool `{}` is not running on this node", served.name);
        return answer(Err(WireError { kind: NOT_RUNNING.into(), message }), None);
    };
    let function = call.function.clone();
    let outcome = run(&pool, call).await;
    answer(outcome, served.function_idempotent(&pool, &function))
}

/// A reply body for a call that was not run, or whose result could not be sent: `kind` and
/// `message` as a `CallError` would say them.
pub(crate) fn refusal(kind: &str, message: String) -> Vec<u8> {
    answer(Err(WireError { kind: kind.into(), message }), None)
}

/// A call's outcome as the encoded reply body.
fn answer(result: Result<serde_bytes::ByteBuf, WireError>, idempotent: Option<bool>) -> Vec<u8> {
    wire::encode(&WireReply { v: WIRE_VERSION, result, idempotent })
}

/// Run one call from the wire on `pool`.
async fn run(pool: &Pool, call: WireCall) -> Result<serde_bytes::ByteBuf, WireError> {
    let opts = options(&call);
    match pool.call_raw(&call.function, &call.payload, opts).await {
        Ok(bytes) => Ok(serde_bytes::ByteBuf::from(bytes.to_vec())),
        Err(e) => Err(WireError { kind: e.kind().to_string(), message: e.to_string() }),
    }
}

/// The options a call from the wire runs with.
fn options(call: &WireCall) -> CallOptions {
    let mut opts = CallOptions::default();
    if let Some(ms) = call.budget_ms {
        opts = opts.timeout(Duration::from_millis(ms));
    }
    if let Some(i) = call.idempotent {
        opts = opts.idempotent(i);
    }
    if let Some(tp) = &call.traceparent {
        opts = opts.trace_context(tp.clone(), call.tracestate.clone());
    }
    if let Some(key) = &call.affinity {
        opts = opts.affinity(key.as_str());
    }
    if let Some(key) = &call.idempotency_key {
        opts = opts.idempotency_key(key.clone());
    }
    opts
}

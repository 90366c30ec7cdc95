//! Serving a local pool to the cluster: a member actor per served pool, joined to the process
//! group `pyvisor.pool.<name>` (ractor_cluster makes it visible on every connected node), that
//! runs each call it receives on the pool (with the caller's time left, trace context,
//! idempotency, affinity and idempotency keys) as a task of its own, abandons it when the
//! caller cancels, and answers with the outcome. A caller in this process finds the pool behind
//! its own node's member in a table of this process's served pools (`local`) and calls it
//! directly.
//!
//! Owns the member actor, [`Served`] (the handle that keeps it) and that table. Not the wire format
//! (`wire`), not choosing a member (`remote`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyvisor_core::{CallOptions, Pool};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;

use crate::error::ClusterError;
use crate::wire::{self, PoolMemberMsg, WireCall, WireError, WireReply, WIRE_VERSION};

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

/// The pools this process serves, by their member's id: a caller in this process finds its own
/// node's member here and calls the pool directly, without the member's two hops.
static LOCAL: Mutex<BTreeMap<ActorId, Source>> = Mutex::new(BTreeMap::new());

/// The pool behind this process's member `member`, if it is one.
pub(crate) fn local(member: ActorId) -> Option<Source> {
    LOCAL.lock().ok()?.get(&member).cloned()
}

/// Serve the pool `name` found through `source` to the cluster.
pub(crate) async fn serve(name: &str, source: Source) -> Result<Served, ClusterError> {
    let running = Arc::new(Mutex::new(HashMap::new()));
    let state = MemberState { pool: name.to_string(), source: source.clone(), running, idempotent: Arc::new(Mutex::new(HashMap::new())) };
    let (member, _) =
        Actor::spawn(None, Member, state).await.map_err(|e| ClusterError::Serve { pool: name.to_string(), detail: e.to_string() })?;
    if let Ok(mut local) = LOCAL.lock() {
        local.insert(member.get_id(), source);
    }
    ractor::pg::join(group(name), vec![member.get_cell()]);
    Ok(Served { member, pool: name.to_string() })
}

struct Member;

struct MemberState {
    pool: String,
    source: Source,
    /// Calls running, by the caller's call id: what a `Cancel` stops (each call's task takes
    /// its own entry out when it ends).
    running: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>,
    /// Whether each function is idempotent, as the pool's workers said.
    idempotent: Arc<Mutex<HashMap<String, bool>>>,
}

impl Actor for Member {
    type Msg = PoolMemberMsg;
    type State = MemberState;
    type Arguments = MemberState;

    async fn pre_start(&self, _: ActorRef<PoolMemberMsg>, state: MemberState) -> Result<MemberState, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle(&self, _: ActorRef<PoolMemberMsg>, msg: PoolMemberMsg, state: &mut MemberState) -> Result<(), ActorProcessingErr> {
        match msg {
            PoolMemberMsg::Call(body, reply) => {
                let call: WireCall = match wire::decode(&body) {
                    Ok(c) => c,
                    Err(message) => {
                        let _ = reply.send(answer(Err(WireError { kind: "protocol".into(), message }), None));
                        return Ok(());
                    }
                };
                let Some(pool) = state.source.pool() else {
                    let message = format!("pool `{}` is not running on this node", state.pool);
                    let _ = reply.send(answer(Err(WireError { kind: NOT_RUNNING.into(), message }), None));
                    return Ok(());
                };
                // Each call runs as its own task: the member never waits for one.
                let (cancel_tx, cancel_rx) = oneshot::channel();
                let id = call.call_id;
                if let (Some(id), Ok(mut running)) = (id, state.running.lock()) {
                    running.insert(id, cancel_tx);
                }
                let idempotent = Arc::clone(&state.idempotent);
                let running = Arc::clone(&state.running);
                tokio::spawn(async move {
                    let function = call.function.clone();
                    tokio::select! {
                        answer = run(&pool, call) => {
                            let idempotent = function_idempotent(&pool, &function, &idempotent);
                            let _ = reply.send(self::answer(answer, idempotent));
                        }
                        // Dropping the call abandons it (its worker is sent `cancel`).
                        Ok(()) = cancel_rx => {}
                    }
                    // Ended either way: its id is forgotten.
                    if let (Some(id), Ok(mut running)) = (id, running.lock()) {
                        running.remove(&id);
                    }
                });
            }
            PoolMemberMsg::Cancel(id) => {
                if let Some(cancel) = state.running.lock().ok().and_then(|mut r| r.remove(&id)) {
                    let _ = cancel.send(());
                }
            }
        }
        Ok(())
    }
}

/// A call's outcome as the encoded reply body.
fn answer(result: Result<serde_bytes::ByteBuf, WireError>, idempotent: Option<bool>) -> Vec<u8> {
    wire::encode(&WireReply { v: WIRE_VERSION, result, idempotent })
}

/// Whether `function` is idempotent, remembered after the first look at the pool's functions.
fn function_idempotent(pool: &Pool, function: &str, known: &Mutex<HashMap<String, bool>>) -> Option<bool> {
    let mut known = known.lock().ok()?;
    if let Some(i) = known.get(function) {
        return Some(*i);
    }
    let i = pool.functions().into_iter().find(|f| f.name == function)?.idempotent;
    known.insert(function.to_string(), i);
    Some(i)
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

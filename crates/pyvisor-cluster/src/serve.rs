//! Serving a local pool to the cluster: a member actor per served pool, joined to the process
//! group `pyvisor.pool.<name>` (ractor_cluster makes it visible on every connected node), that
//! runs each call it receives on the pool and answers with the outcome.
//!
//! Owns the member actor and [`Served`], the handle that keeps it. Not the wire format
//! (`wire`), not choosing a member (`remote`).

use std::time::Duration;

use pyvisor_core::{CallOptions, Pool};
use ractor::{Actor, ActorProcessingErr, ActorRef};

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
        self.member.stop(None);
    }
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served").field("pool", &self.pool).finish_non_exhaustive()
    }
}

/// Serve `pool` to the cluster under its name.
pub(crate) async fn serve(pool: Pool) -> Result<Served, ClusterError> {
    let name = pool.name().to_string();
    let (member, _) = Actor::spawn(None, Member, pool)
        .await
        .map_err(|e| ClusterError::Serve { pool: name.clone(), detail: e.to_string() })?;
    ractor::pg::join(group(&name), vec![member.get_cell()]);
    Ok(Served { member, pool: name })
}

struct Member;

impl Actor for Member {
    type Msg = PoolMemberMsg;
    type State = Pool;
    type Arguments = Pool;

    async fn pre_start(&self, _: ActorRef<PoolMemberMsg>, pool: Pool) -> Result<Pool, ActorProcessingErr> {
        Ok(pool)
    }

    async fn handle(&self, _: ActorRef<PoolMemberMsg>, msg: PoolMemberMsg, pool: &mut Pool) -> Result<(), ActorProcessingErr> {
        match msg {
            PoolMemberMsg::Call(body, reply) => {
                // Each call runs as its own task: the member never waits for one.
                let pool = pool.clone();
                tokio::spawn(async move {
                    let answer = run(&pool, &body).await;
                    let _ = reply.send(wire::encode(&WireReply { v: WIRE_VERSION, result: answer }));
                });
            }
        }
        Ok(())
    }
}

/// Run one call from the wire on `pool`.
async fn run(pool: &Pool, body: &[u8]) -> Result<serde_bytes::ByteBuf, WireError> {
    let call: WireCall = wire::decode(body).map_err(|message| WireError { kind: "protocol".into(), message })?;
    let mut opts = CallOptions::default();
    if let Some(ms) = call.budget_ms {
        opts = opts.timeout(Duration::from_millis(ms));
    }
    if let Some(i) = call.idempotent {
        opts = opts.idempotent(i);
    }
    if let Some(tp) = call.traceparent {
        opts = opts.trace_context(tp, call.tracestate);
    }
    match pool.call_raw(&call.function, &call.payload, opts).await {
        Ok(bytes) => Ok(serde_bytes::ByteBuf::from(bytes.to_vec())),
        Err(e) => Err(WireError { kind: e.kind().to_string(), message: e.to_string() }),
    }
}

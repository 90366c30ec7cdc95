//! The pool router actor: the pool's control plane.
//!
//! Owns membership (which worker actor holds which position), readiness (a worker becomes
//! routable on `hello`), replacement (a ready worker that dies is replaced at once; a start
//! failure is retried after a backoff), the pool's start-failure intensity (too many fail the
//! pool with the last death certificate and escalate to the router's supervisor), status, and
//! shutdown, and the routing table that the data path reads (a worker enters it on `hello` and
//! leaves it when it drains or dies). Calls do not pass through its mailbox: callers pick
//! workers from the dispatcher directly. Start failures are counted by the crash barrier's
//! rule (an external kill before `hello` is retried but never counted).

use std::collections::{HashMap, VecDeque};

use crate::barrier::start_failures::{StartFailures, StartVerdict};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::oneshot;

use crate::death::{DeathCause, DeathCertificate, WorkerId};
use crate::error::StartError;
use crate::events::{PoolEvent, RecycleReason};
use crate::dispatch::{Failure, WorkerSlot};
use crate::shared::PoolShared;
use crate::status::{PoolStatus, WorkerState, WorkerStatus};
use crate::worker::{Reporter, WorkerActor, WorkerArgs, WorkerDied, WorkerMsg, WorkerReport};

pub(crate) enum RouterMsg {
    /// What a worker reports: ready, or past a recycling threshold.
    Worker(WorkerReport),
    StartWorker { index: usize },
    Status(RpcReplyPort<PoolStatus>),
    Shutdown(RpcReplyPort<()>),
}

// Local only: never sent to another node.
crate::local_message!(RouterMsg);

/// The error a router fails with when its pool fails: escalates to its supervisor.
#[derive(Debug)]
pub struct PoolFailure(pub Arc<StartError>);

impl std::fmt::Display for PoolFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for PoolFailure {}

pub(crate) struct PoolRouter;

pub(crate) struct RouterArgs {
    pub shared: Arc<PoolShared>,
    pub startup: Option<oneshot::Sender<Result<(), StartError>>>,
}

#[derive(Default)]
struct Position {
    restarts: u32,
    consecutive_failures: u32,
    current: Option<WorkerId>,
    next_start: Option<Instant>,
}

struct Member {
    slot: Arc<WorkerSlot>,
    actor: ActorRef<WorkerMsg>,
}

pub(crate) struct RouterState {
    shared: Arc<PoolShared>,
    positions: Vec<Position>,
    members: HashMap<WorkerId, Member>,
    by_actor: HashMap<ActorId, WorkerId>,
    start_failures: StartFailures,
    startup: Option<oneshot::Sender<Result<(), StartError>>>,
    shutting_down: bool,
    /// Old worker → (its replacement, why), from the replacement's spawn until the old one ends.
    recycling: HashMap<WorkerId, (WorkerId, RecycleReason)>,
    /// Replacement → old worker, until the replacement is ready.
    replacement_of: HashMap<WorkerId, WorkerId>,
    pending_recycles: VecDeque<(WorkerId, RecycleReason)>,
}

impl RouterState {
    async fn spawn_worker(&mut self, myself: &ActorRef<RouterMsg>, index: usize, tainted: bool) {
        self.spawn_inner(myself, index, tainted, true).await;
    }

    /// Spawn a worker for `index`; `current`: it takes the position now (else it is a recycling
    /// replacement that takes it when ready).
    async fn spawn_inner(&mut self, myself: &ActorRef<RouterMsg>, index: usize, tainted: bool, current: bool) -> Option<WorkerId> {
        let id = self.shared.next_worker_id();
        let slot = Arc::new(WorkerSlot::new(id, index, self.shared.spec.max_in_flight, self.shared.dispatch.bell()));
        let window = self.shared.spec.taint_window;
        if tainted && !window.is_zero() {
            slot.taint(window);
            // Waiters that could not use it may use it when the window ends.
            self.shared.dispatch.serve_at(tokio::time::Instant::now() + window + Duration::from_millis(1));
        }
        let router = myself.clone();
        let report: Reporter = Arc::new(move |r| {
            let _ = router.cast(RouterMsg::Worker(r));
        });
        let args = WorkerArgs { slot: Arc::clone(&slot), shared: Arc::clone(&self.shared), report };
        if current {
            self.positions[index].current = Some(id);
            self.positions[index].next_start = None;
        }
        match Actor::spawn_linked(None, WorkerActor, args, myself.get_cell()).await {
            Ok((actor, _join)) => {
                self.by_actor.insert(actor.get_id(), id);
                self.members.insert(id, Member { slot, actor });
                Some(id)
            }
            Err(e) => {
                // Only possible while the router itself is stopping.
                tracing::error!(pool = %self.shared.name, "cannot spawn a worker actor: {e}");
                if current {
                    self.positions[index].current = None;
                }
                None
            }
        }
    }

    fn sync_members(&self) {
        self.shared.set_members(self.members.values().map(|m| Arc::clone(&m.slot)).collect());
    }

    fn ready_count(&self) -> usize {
        self.members.values().filter(|m| m.slot.state() == WorkerState::Ready).count()
    }

    /// Start queued recycles, at most `max_concurrent` at once, never below `min_ready`.
    async fn start_recycles(&mut self, myself: &ActorRef<RouterMsg>) {
        let spec = &self.shared.spec;
        let max = spec.recycle.max_concurrent;
        let min_ready = spec.min_ready_count();
        while !self.shutting_down && self.recycling.len() < max {
            let Some((old, reason)) = self.pending_recycles.pop_front() else { break };
            let Some(m) = self.members.get(&old) else { continue };
            if m.slot.state() != WorkerState::Ready {
                continue;
            }
            // A replacement for this position failed to start: wait out its backoff (the old
            // worker asks again on its next check).
            if self.positions.get(m.slot.index).and_then(|p| p.next_start).is_some_and(|t| t > Instant::now()) {
                continue;
            }
            if self.ready_count() < min_ready {
                self.pending_recycles.push_front((old, reason));
                break;
            }
            let index = m.slot.index;
            tracing::info!(pool = %self.shared.name, worker = %old, reason = %reason, "recycling: starting a replacement");
            if let Some(new) = self.spawn_inner(myself, index, false, false).await {
                self.recycling.insert(old, (new, reason));
                self.replacement_of.insert(new, old);
            }
        }
    }

    fn all_ready(&self) -> bool {
        self.positions.iter().all(|p| {
            p.current
                .and_then(|id| self.members.get(&id))
                .is_some_and(|m| m.slot.state() == WorkerState::Ready)
        })
    }

    fn status(&self) -> PoolStatus {
        let workers = self
            .positions
            .iter()
            .enumerate()
            .map(|(index, p)| {
                let m = p.current.and_then(|id| self.members.get(&id));
                let beat = m.and_then(|m| m.slot.last_beat()).map(|b| b.beat);
                WorkerStatus {
                    index,
                    worker: m.map(|m| m.slot.id),
                    pid: m.and_then(|m| m.slot.pid()),
                    state: m.map_or(WorkerState::Dead, |m| m.slot.state()),
                    in_flight: m.map_or(0, |m| m.slot.in_flight()),
                    served: m.map_or(0, |m| m.slot.served()),
                    restarts: p.restarts,
                    rss: beat.as_ref().map(|b| b.rss),
                    in_progress: beat.map(|b| b.in_progress).unwrap_or_default(),
                    tainted: m.is_some_and(|m| m.slot.is_tainted()),
                    last_beat_age: m.and_then(|m| m.slot.last_beat_age()),
                    restart_in: p.next_start.map(|t| t.saturating_duration_since(Instant::now())),
                }
            })
            .collect();
        PoolStatus {
            name: self.shared.name.to_string(),
            workers,
            queued: self.shared.dispatch.len(),
            closed: self.shared.is_closed(),
            retried: self.shared.stats.retried.load(std::sync::atomic::Ordering::Relaxed),
            poisoned: self.shared.stats.poisoned.load(std::sync::atomic::Ordering::Relaxed),
            crashes: self.shared.stats.crashes.load(std::sync::atomic::Ordering::Relaxed),
            recycles: self.shared.stats.recycles.load(std::sync::atomic::Ordering::Relaxed),
            min_ready: self.shared.spec.min_ready_count(),
            last_deaths: self.shared.last_deaths(),
        }
    }

    /// A worker died. Returns an error when the pool must fail.
    async fn on_death(
        &mut self,
        myself: &ActorRef<RouterMsg>,
        id: WorkerId,
        cert: Arc<DeathCertificate>,
    ) -> Result<(), ActorProcessingErr> {
        self.shared.dispatch.remove(id);
        self.members.remove(&id);
        self.shared.stats.crashes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.record_death(Arc::clone(&cert));
        crate::observe::metrics::crash(&self.shared.name, cert.cause.kind());
        let index = cert.index;
        self.shared.emit(PoolEvent::WorkerDied { certificate: Arc::clone(&cert) });
        if self.shutting_down || index >= self.positions.len() {
            return Ok(());
        }
        let was_current = self.positions[index].current == Some(id);
        if was_current {
            self.positions[index].current = None;
        }
        // A worker being recycled died: its replacement is already on the way.
        if let Some((new, _)) = self.recycling.remove(&id) {
            if self.replacement_of.remove(&new).is_some() && was_current {
                self.positions[index].current = Some(new);
            }
            self.start_recycles(myself).await;
            return Ok(());
        }
        // A recycling replacement that failed to start: the old worker keeps the position.
        let failed_replacement = self.replacement_of.remove(&id).inspect(|old| {
            self.recycling.remove(old);
        });
        self.positions[index].restarts += 1;
        if cert.became_ready {
            if was_current {
                // Capacity first: a ready worker is replaced at once; the replacement is tainted.
                crate::observe::metrics::restart(&self.shared.name, "replacement");
                let span = tracing::debug_span!("pyvisor.worker.replace", pyvisor.pool = %self.shared.name, pyvisor.worker.index = index, pyvisor.taint_window_ms = self.shared.spec.taint_window.as_millis() as u64);
                tracing::Instrument::instrument(self.spawn_worker(myself, index, true), span).await;
            }
            return Ok(());
        }
        // Died before hello: a start failure if the worker caused it (counted; past the
        // intensity the pool fails), else an external kill (retried, never counted). Both back
        // off.
        let spec = &self.shared.spec;
        let now = Instant::now();
        let verdict = self.start_failures.record(&cert, now);
        if let StartVerdict::Exceeded { failures } = verdict {
            let err = StartError::TooManyStartFailures {
                failures,
                period: spec.start_failure_period,
                max: spec.max_start_failures,
                certificate: Box::new((*cert).clone()),
            };
            return self.fail(myself, err).await;
        }
        let pos = &mut self.positions[index];
        // The backoff grows with the worker's own failures only: an external kill says nothing
        // about whether the worker can start, so it is retried after the first step.
        let step = if verdict == StartVerdict::NotCounted {
            1
        } else {
            pos.consecutive_failures += 1;
            pos.consecutive_failures
        };
        let delay = spec.start_backoff.delay(step);
        pos.next_start = Some(now + delay);
        let failures = pos.consecutive_failures;
        if failed_replacement.is_some() && pos.current.is_some() {
            // The old worker keeps the position and asks again on its next check; the next
            // replacement waits out the backoff (see `start_recycles`).
            return Ok(());
        }
        crate::observe::metrics::restart(&self.shared.name, "start_retry");
        self.shared.emit(PoolEvent::RestartScheduled { index, failures, delay });
        myself.send_after(delay, move || RouterMsg::StartWorker { index });
        Ok(())
    }

    async fn fail(&mut self, myself: &ActorRef<RouterMsg>, err: StartError) -> Result<(), ActorProcessingErr> {
        self.shutting_down = true;
        let err = Arc::new(err);
        self.shared.fail(Arc::clone(&err));
        self.shared.emit(PoolEvent::PoolFailed { reason: err.to_string() });
        self.stop_workers(myself).await;
        match self.startup.take() {
            Some(tx) => {
                // Pool::start is waiting: hand it the error and stop quietly.
                let _ = tx.send(Err((*err).clone()));
                myself.stop(Some("start failed".into()));
                Ok(())
            }
            None => Err(Box::new(PoolFailure(err))),
        }
    }

    async fn stop_workers(&mut self, myself: &ActorRef<RouterMsg>) {
        for m in self.members.values() {
            self.shared.dispatch.remove(m.slot.id);
        }
        myself.stop_children_and_wait(None, Some(Duration::from_secs(10))).await;
        self.members.clear();
        self.by_actor.clear();
    }

    async fn shutdown(&mut self, myself: &ActorRef<RouterMsg>) {
        self.shutting_down = true;
        self.shared.close();
        for m in self.members.values() {
            self.shared.dispatch.remove(m.slot.id);
        }
        let spec = &self.shared.spec;
        let budget = spec.shutdown_grace + spec.sigterm_wait + Duration::from_secs(5);
        let calls = self.members.values().map(|m| {
            let actor = m.actor.clone();
            async move {
                let _ = actor.call(WorkerMsg::Shutdown, Some(budget)).await;
            }
        });
        futures::future::join_all(calls).await;
        // Anything that did not answer (or is starting) is stopped now.
        myself.stop_children_and_wait(None, Some(Duration::from_secs(5))).await;
        self.members.clear();
        self.by_actor.clear();
        self.shared.emit(PoolEvent::PoolStopped);
    }
}

impl Actor for PoolRouter {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: RouterArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let n = args.shared.spec.workers;
        Ok(RouterState {
            start_failures: StartFailures::from_spec(&args.shared.spec).starting(),
            shared: args.shared,
            positions: (0..n).map(|_| Position::default()).collect(),
            members: HashMap::new(),
            by_actor: HashMap::new(),
            startup: args.startup,
            shutting_down: false,
            recycling: HashMap::new(),
            replacement_of: HashMap::new(),
            pending_recycles: VecDeque::new(),
        })
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        for index in 0..st.positions.len() {
            st.spawn_worker(&myself, index, false).await;
        }
        st.sync_members();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Worker(WorkerReport::Ready { id, hello, startup }) => {
                let Some(m) = st.members.get(&id) else { return Ok(()) };
                if st.shutting_down || m.slot.state() != WorkerState::Ready {
                    return Ok(());
                }
                let slot = Arc::clone(&m.slot);
                st.shared.set_functions(&hello.functions);
                st.shared.dispatch.insert(Arc::clone(&slot));
                // Make before break: a recycling replacement is ready; the old worker drains.
                if let Some(old) = st.replacement_of.remove(&id) {
                    st.positions[slot.index].current = Some(id);
                    if let Some(om) = st.members.get(&old) {
                        om.slot.stop_routing();
                        st.shared.dispatch.remove(old);
                        let _ = om.actor.cast(WorkerMsg::Drain);
                    }
                    let reason = st.recycling.get(&old).map(|(_, r)| r.clone()).unwrap_or(RecycleReason::Ttl);
                    st.shared.stats.recycles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    crate::observe::metrics::recycle(&st.shared.name, &reason.to_string());
                    st.shared.emit(PoolEvent::Recycled { worker: old, reason });
                }
                st.positions[slot.index].consecutive_failures = 0;
                st.positions[slot.index].next_start = None;
                let pid = slot.pid().unwrap_or(hello.pid);
                st.shared.emit(PoolEvent::WorkerReady { worker: id, index: slot.index, pid, startup });
                if st.startup.is_some() && st.all_ready() {
                    if let Some(tx) = st.startup.take() {
                        let _ = tx.send(Ok(()));
                    }
                    // From now on start failures are counted in a sliding window.
                    st.start_failures.started();

                }
            }
            RouterMsg::StartWorker { index } => {
                if !st.shutting_down && index < st.positions.len() && st.positions[index].current.is_none() {
                    st.spawn_worker(&myself, index, false).await;
                }
            }
            RouterMsg::Status(reply) => {
                let _ = reply.send(st.status());
            }
            RouterMsg::Worker(WorkerReport::Recycle { id, reason }) => {
                let known = st.recycling.contains_key(&id) || st.pending_recycles.iter().any(|(o, _)| *o == id);
                if !known && !st.shutting_down && st.members.contains_key(&id) {
                    st.pending_recycles.push_back((id, reason));
                    st.start_recycles(&myself).await;
                }
            }
            RouterMsg::Shutdown(reply) => {
                if !st.shutting_down {
                    st.shutdown(&myself).await;
                }
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(id) = st.by_actor.remove(&cell.get_id()) else { return Ok(()) };
                let cert = match err.downcast_ref::<WorkerDied>() {
                    Some(d) => Arc::clone(&d.0),
                    None => {
                        // The actor failed without finalizing (a panic): its guard killed the
                        // process; fail its calls here so none waits forever.
                        let slot = st.members.get(&id).map(|m| Arc::clone(&m.slot));
                        let cert = Arc::new(actor_failure_certificate(&st.shared.name, id, slot.as_deref(), err.to_string()));
                        if let Some(s) = &slot {
                            s.set_state(WorkerState::Dead);
                            s.close_and_fail(Failure::Crashed(Arc::clone(&cert)));
                        }
                        cert
                    }
                };
                st.on_death(&myself, id, cert).await?;
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(id) = st.by_actor.remove(&cell.get_id()) {
                    st.members.remove(&id);
                    st.shared.dispatch.remove(id);
                    if st.recycling.remove(&id).is_some() {
                        st.start_recycles(&myself).await;
                    }
                }
            }
            _ => {}
        }
        st.sync_members();
        Ok(())
    }

    async fn post_stop(&self, myself: ActorRef<Self::Msg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        st.shared.close();
        if !st.members.is_empty() {
            st.stop_workers(&myself).await;
        }
        if let Some(tx) = st.startup.take() {
            let _ = tx.send(Err(StartError::Actor("the pool was stopped while starting".into())));
        }
        Ok(())
    }
}

fn actor_failure_certificate(pool: &str, id: WorkerId, slot: Option<&WorkerSlot>, err: String) -> DeathCertificate {
    DeathCertificate {
        pool: pool.to_string(),
        worker: id,
        index: slot.map_or(0, |s| s.index),
        pid: slot.and_then(|s| s.pid()),
        cause: DeathCause::ActorFailed(err),
        exit_code: None,
        signal: None,
        killed_by_pyvisor: true,
        oom_suspected: false,
        uptime: slot.map_or(Duration::ZERO, |s| s.spawned_at.elapsed()),
        became_ready: slot.is_some_and(|s| s.became_ready()),
        died_at: std::time::SystemTime::now(),
        last_rss: None,
        last_beat_age: None,
        calls_in_flight: slot.map(|s| s.calls_in_flight()).unwrap_or_default(),
        stderr_tail: Vec::new(),
        python_stack: None,
    }
}

impl Drop for RouterState {
    /// Whatever way the router ended (stopped, killed, failed), the pool takes no more calls
    /// and every waiter is told; the workers' own `Drop` fails the calls they held.
    fn drop(&mut self) {
        self.shared.close();
        self.shared.dispatch.table.clear();
    }
}

//! The supervisor actor: starts children in order, decides restarts, stops in reverse order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::oneshot;

use tokio::task::JoinHandle;

use super::intensity::IntensityTracker;
use super::registry::{join_path, Registered, Registry};
use super::spec::{ChildKind, ChildSpec, Restart, Shutdown, Strategy, SupervisorSpec};
use super::status::{ChildState, ChildStatus};
use super::{SupervisorError, SupervisorFailure};
use crate::pool::Pool;

pub(crate) enum SupervisorMsg {
    /// Start these children (in this order) if their pending restart is still `generation`.
    Restart { children: Vec<(String, u64)> },
    /// A restart begun by `Restart` ended (on a task of its own, so that the supervisor keeps
    /// answering while a pool loads): install it if the child still waits for this
    /// `generation`, then go on with the `rest` of its group, in order.
    Started { id: String, generation: u64, result: Result<StartedChild, String>, rest: VecDeque<(String, u64)> },
    Children(RpcReplyPort<Vec<ChildStatus>>),
    AddChild(Box<ChildSpec>, RpcReplyPort<Result<(), SupervisorError>>),
    RemoveChild(String, RpcReplyPort<Result<(), SupervisorError>>),
    Shutdown(RpcReplyPort<()>),
    /// The declaration in effect: the supervisor's policy and its children's specs, in order.
    Spec(RpcReplyPort<SupervisorSpec>),
    /// Make-before-break: this pool, started (and ready) outside the actor, takes the place of
    /// the child with the spec's id (added when there is none); the old one is stopped after.
    Install(Box<ChildSpec>, Pool, RpcReplyPort<Result<(), SupervisorError>>),
    /// Keep the running child with this id, under this spec from now on (its next restart
    /// uses it; restart type and shutdown apply at once).
    SetSpec(Box<ChildSpec>, RpcReplyPort<Result<(), SupervisorError>>),
    /// Take this spec's policy (strategy, intensity, backoff, healthy period) and its order of
    /// children; the children themselves are not touched.
    Reconfigure(Box<SupervisorSpec>, RpcReplyPort<()>),
}

// Local only: never sent to another node.
crate::local_message!(SupervisorMsg);

pub(crate) struct SupervisorActor;

pub(crate) struct SupArgs {
    pub spec: SupervisorSpec,
    pub path: String,
    pub registry: Registry,
    pub startup: Option<oneshot::Sender<Result<(), SupervisorError>>>,
}

enum Handle {
    Pool(Pool),
    Supervisor(ActorRef<SupervisorMsg>, Option<JoinHandle<()>>),
    Actor,
}

/// A child that has just started, not yet installed.
pub(crate) enum StartedChild {
    Pool(Pool),
    Supervisor(ActorRef<SupervisorMsg>, JoinHandle<()>),
    Actor(ActorCell),
}

impl StartedChild {
    /// As a running child (for `stop_running`).
    fn into_running(self) -> Running {
        let (cell, handle) = match self {
            StartedChild::Pool(p) => (p.actor(), Handle::Pool(p)),
            StartedChild::Supervisor(a, j) => (a.get_cell(), Handle::Supervisor(a, Some(j))),
            StartedChild::Actor(c) => (c, Handle::Actor),
        };
        Running { cell, handle, since: Instant::now() }
    }
}

/// Spawn a supervisor (linked under `parent` if given) and wait until its children started.
pub(crate) async fn spawn_supervisor(
    spec: SupervisorSpec,
    parent: Option<ActorCell>,
    path: String,
    registry: Registry,
) -> Result<(ActorRef<SupervisorMsg>, JoinHandle<()>), SupervisorError> {
    spec.check().map_err(SupervisorError::InvalidSpec)?;
    let (tx, rx) = oneshot::channel();
    let args = SupArgs { spec, path, registry, startup: Some(tx) };
    let spawned = match parent {
        Some(p) => Actor::spawn_linked(None, SupervisorActor, args, p).await,
        None => Actor::spawn(None, SupervisorActor, args).await,
    };
    let (actor, join) = spawned.map_err(|e| SupervisorError::NotRunning(e.to_string()))?;
    match rx.await {
        Ok(Ok(())) => Ok((actor, join)),
        Ok(Err(e)) => {
            let _ = join.await;
            Err(e)
        }
        Err(_) => {
            let _ = join.await;
            Err(SupervisorError::NotRunning("the supervisor stopped while starting".into()))
        }
    }
}

/// Stop a nested supervisor like `Tree::shutdown`: its children in reverse order, then it.
async fn shutdown_supervisor(actor: ActorRef<SupervisorMsg>, join: Option<JoinHandle<()>>) {
    let _ = actor.call(SupervisorMsg::Shutdown, Some(Duration::from_secs(3600))).await;
    if let Some(j) = join {
        let _ = j.await;
    }
}

struct Running {
    cell: ActorCell,
    handle: Handle,
    since: Instant,
}

enum Life {
    Running(Running),
    Restarting { at: Instant, generation: u64 },
    /// Its restart is under way on a task of its own.
    Starting { generation: u64 },
    Stopped,
    Failed(String),
}

struct Child {
    spec: ChildSpec,
    path: String,
    life: Life,
    restarts: u32,
    consecutive: u32,
}

pub(crate) struct SupState {
    spec: SupervisorSpec,
    path: String,
    registry: Registry,
    children: Vec<Child>,
    intensity: IntensityTracker,
    generation: u64,
    stopping: bool,
    startup: Option<oneshot::Sender<Result<(), SupervisorError>>>,
}

impl SupState {
    fn position(&self, id: &str) -> Option<usize> {
        self.children.iter().position(|c| c.spec.id == id)
    }

    /// Start child `i` as declared and install it (the supervisor waits: its first start, and
    /// children added by `add_child`).
    async fn start_child(&mut self, myself: &ActorRef<SupervisorMsg>, i: usize) -> Result<(), String> {
        let started = self.start_future(myself, i).await?;
        self.install_started(i, started);
        Ok(())
    }

    /// What starts child `i`, linked under this supervisor; owns everything it needs, so that
    /// it may run on a task of its own.
    fn start_future(&self, myself: &ActorRef<SupervisorMsg>, i: usize) -> BoxFuture<'static, Result<StartedChild, String>> {
        let sup = myself.get_cell();
        let path = self.children[i].path.clone();
        match &self.children[i].spec.kind {
            ChildKind::Pool(spec) => {
                let spec = (**spec).clone();
                Box::pin(async move { Pool::start_linked(spec, sup).await.map(StartedChild::Pool).map_err(|e| e.to_string()) })
            }
            ChildKind::Supervisor(spec) => {
                let (spec, registry) = ((**spec).clone(), Arc::clone(&self.registry));
                Box::pin(async move {
                    spawn_supervisor(spec, Some(sup), path, registry).await.map(|(a, j)| StartedChild::Supervisor(a, j)).map_err(|e| e.to_string())
                })
            }
            ChildKind::Actor(start) => {
                let start = Arc::clone(start);
                Box::pin(async move { start(sup).await.map(StartedChild::Actor) })
            }
        }
    }

    /// Child `i` runs `started` from now on: registered by path, its exits watched.
    fn install_started(&mut self, i: usize, started: StartedChild) {
        let path = self.children[i].path.clone();
        let (cell, handle, registered) = match started {
            StartedChild::Pool(pool) => {
                let by_path = self.following_handle(&path, &pool);
                (pool.actor(), Handle::Pool(pool), Some(Registered::Pool(by_path)))
            }
            StartedChild::Supervisor(actor, join) => {
                (actor.get_cell(), Handle::Supervisor(actor.clone(), Some(join)), Some(Registered::Supervisor(actor.get_cell())))
            }
            StartedChild::Actor(cell) => (cell, Handle::Actor, None),
        };
        if let (Some(r), Ok(mut reg)) = (registered, self.registry.write()) {
            reg.insert(path.clone(), r);
        }
        let c = &mut self.children[i];
        c.life = Life::Running(Running { cell, handle, since: Instant::now() });
        tracing::info!(supervisor = %self.spec.name, child = %path, kind = c.spec.kind.name(), "child started");
    }

    /// Begin the next restart of a group (`chain`, in order) whose generation still holds, on a
    /// task of its own; its `Started` message goes on with the rest. The supervisor keeps
    /// answering meanwhile (status, readiness, other children's exits and restarts).
    fn start_next(&mut self, myself: &ActorRef<SupervisorMsg>, mut chain: VecDeque<(String, u64)>) {
        while let Some((id, generation)) = chain.pop_front() {
            let Some(i) = self.position(&id) else { continue };
            if !matches!(self.children[i].life, Life::Restarting { generation: g, .. } if g == generation) {
                continue;
            }
            self.children[i].restarts += 1;
            self.children[i].life = Life::Starting { generation };
            let start = self.start_future(myself, i);
            let me = myself.clone();
            tokio::spawn(async move {
                let result = start.await;
                if let Err(ractor::MessagingErr::SendErr(SupervisorMsg::Started { result: Ok(orphan), .. })) =
                    me.cast(SupervisorMsg::Started { id, generation, result, rest: chain })
                {
                    // The supervisor is gone: what started for it goes too.
                    stop_running(orphan.into_running(), Shutdown::Brutal, "").await;
                }
            });
            return;
        }
    }

    /// The handle registered at `path`, pointed at `pool`. A handle got by path follows
    /// restarts and replacements: the path keeps one following handle, pointed at each new pool.
    fn following_handle(&self, path: &str, pool: &Pool) -> Pool {
        let existing = self.registry.read().ok().and_then(|r| match r.get(path) {
            Some(Registered::Pool(p)) => Some(p.clone()),
            _ => None,
        });
        match existing {
            Some(p) => {
                p.replace_with(pool);
                p
            }
            None => pool.following(),
        }
    }

    /// Put `pool` (started and ready) at child `i`'s place, or as a new last child when `i` is
    /// `None`: handles by path switch to it now; the child it replaces, if running, is stopped
    /// after, per its own shutdown spec, and its exit is not a crash (it is no longer `Running`).
    async fn install(&mut self, i: Option<usize>, spec: ChildSpec, pool: Pool) {
        let i = match i {
            Some(i) => i,
            None => {
                let path = join_path(&self.path, &spec.id);
                self.children.push(Child { path, spec: spec.clone(), life: Life::Stopped, restarts: 0, consecutive: 0 });
                self.children.len() - 1
            }
        };
        let path = self.children[i].path.clone();
        let by_path = self.following_handle(&path, &pool);
        if let Ok(mut reg) = self.registry.write() {
            reg.insert(path.clone(), Registered::Pool(by_path));
        }
        let running = Running { cell: pool.actor(), handle: Handle::Pool(pool), since: Instant::now() };
        let c = &mut self.children[i];
        let old_life = std::mem::replace(&mut c.life, Life::Running(running));
        let old_spec = std::mem::replace(&mut c.spec, spec);
        c.consecutive = 0;
        tracing::info!(supervisor = %self.spec.name, child = %path, "child replaced (make-before-break)");
        if let Life::Running(old) = old_life {
            stop_running(old, old_spec.shutdown, &path).await;
        }
    }

    /// Forget what is registered at `path` and below it, for good: handles that follow a pool
    /// there stop waiting for a replacement. Only for children that will not come back (removed,
    /// not restarted, or the whole tree stopped); a child stopped to be restarted keeps its entry,
    /// so its handles follow the restart — also when a parent restarts this supervisor.
    fn unregister(&self, path: &str) {
        let below = format!("{path}/");
        let gone: Vec<Registered> = match self.registry.write() {
            Ok(mut reg) => {
                let keys: Vec<String> =
                    reg.keys().filter(|k| path.is_empty() || *k == path || k.starts_with(&below)).cloned().collect();
                keys.iter().filter_map(|k| reg.remove(k)).collect()
            }
            Err(_) => Vec::new(),
        };
        for r in gone {
            if let Registered::Pool(p) = r {
                p.end();
            }
        }
    }

    /// The whole tree stops (this is its root): every handle by path stops waiting.
    fn end_tree(&self) {
        if self.path.is_empty() {
            self.unregister("");
        }
    }

    /// Stop one child per its shutdown spec. Its exit event is then ignored (it is no longer
    /// `Running`).
    async fn stop_child(&mut self, i: usize, for_good: bool) {
        let path = self.children[i].path.clone();
        if for_good {
            self.unregister(&path);
        }
        let Life::Running(run) = std::mem::replace(&mut self.children[i].life, Life::Stopped) else { return };
        stop_running(run, self.children[i].spec.shutdown, &path).await;
        tracing::info!(supervisor = %self.spec.name, child = %path, "child stopped");
    }

    /// Stop every running child in reverse start order.
    async fn stop_all(&mut self) {
        for i in (0..self.children.len()).rev() {
            self.stop_child(i, false).await;
        }
    }

    /// A child exited (not at our request). Decide per restart type, intensity and strategy.
    async fn on_exit(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        i: usize,
        abnormal: bool,
        reason: String,
        uptime: Duration,
    ) -> Result<(), ActorProcessingErr> {
        let path = self.children[i].path.clone();
        let c = &mut self.children[i];
        tracing::warn!(supervisor = %self.spec.name, child = %path, abnormal, reason = %reason, "child exited");
        let restart = match c.spec.restart {
            Restart::Permanent => true,
            Restart::Transient => abnormal,
            Restart::Temporary => false,
        };
        if !restart {
            c.life = if abnormal { Life::Failed(reason) } else { Life::Stopped };
            self.unregister(&path);
            return Ok(());
        }
        c.life = Life::Stopped;
        if !self.intensity.record(Instant::now()) {
            let why = format!(
                "supervisor `{}`: restart intensity exceeded ({} restarts within {:?}); last: child `{path}` exited: {reason}",
                self.spec.name, self.spec.intensity.max_restarts, self.spec.intensity.period
            );
            {
                let _s = tracing::debug_span!("pyvisor.supervisor.intensity_exceeded", otel.status_code = "ERROR", pyvisor.supervisor = %self.spec.name, pyvisor.child = %path).entered();
                tracing::error!("{why}");
            }
            self.stopping = true;
            self.stop_all().await;
            return Err(Box::new(SupervisorFailure(why)));
        }
        let n = self.children.len();
        let group: Vec<usize> = match self.spec.strategy {
            Strategy::OneForOne => vec![i],
            Strategy::OneForAll => (0..n).collect(),
            Strategy::RestForOne => (i..n).collect(),
        };
        // The others in the group stop first, in reverse order.
        for &j in group.iter().rev() {
            if j != i {
                // Restarted with the group: handles by path wait for the new one.
                self.stop_child(j, false).await;
            }
        }
        let c = &mut self.children[i];
        if uptime >= self.spec.healthy_period {
            c.consecutive = 0;
        }
        c.consecutive += 1;
        let delay = self.spec.backoff.delay(c.consecutive);
        self.generation += 1;
        let at = Instant::now() + delay;
        let mut restart_list = Vec::new();
        for &j in &group {
            let c = &mut self.children[j];
            // Temporary siblings are not brought back by a group restart.
            if j != i && c.spec.restart == Restart::Temporary {
                let p = c.path.clone();
                self.unregister(&p);
                continue;
            }
            c.life = Life::Restarting { at, generation: self.generation };
            restart_list.push((c.spec.id.clone(), self.generation));
        }
        {
            let _s = tracing::debug_span!("pyvisor.supervisor.restart", pyvisor.supervisor = %self.spec.name, pyvisor.child = %path, pyvisor.strategy = ?self.spec.strategy, pyvisor.backoff_ms = delay.as_millis() as u64, pyvisor.restarted = restart_list.len()).entered();
            tracing::info!(supervisor = %self.spec.name, child = %path, delay_ms = delay.as_millis() as u64, strategy = ?self.spec.strategy, "restart scheduled");
        }
        myself.send_after(delay, move || SupervisorMsg::Restart { children: restart_list });
        Ok(())
    }

    fn status(&self) -> Vec<ChildStatus> {
        self.children
            .iter()
            .map(|c| ChildStatus {
                id: c.spec.id.clone(),
                path: c.path.clone(),
                kind: c.spec.kind.name(),
                state: match &c.life {
                    Life::Running(_) => ChildState::Running,
                    Life::Restarting { at, .. } => {
                        ChildState::Restarting { next_in: at.saturating_duration_since(Instant::now()) }
                    }
                    Life::Starting { .. } => ChildState::Starting,
                    Life::Stopped => ChildState::Stopped,
                    Life::Failed(r) => ChildState::Failed { reason: r.clone() },
                },
                restarts: c.restarts,
                restart: c.spec.restart,
            })
            .collect()
    }
}

/// Stop what runs for a child per `shutdown`: ask, wait, then kill; or kill at once.
async fn stop_running(run: Running, shutdown: Shutdown, path: &str) {
    let kill = |cell: ActorCell| async move {
        let _ = cell.kill_and_wait(Some(Duration::from_secs(10))).await;
    };
    match (shutdown, run.handle) {
        (Shutdown::Brutal, _) => kill(run.cell).await,
        (Shutdown::Timeout(d), Handle::Pool(pool)) => {
            if tokio::time::timeout(d, pool.shutdown()).await.is_err() {
                kill(run.cell).await;
            }
        }
        (Shutdown::Timeout(d), Handle::Supervisor(actor, join)) => {
            if tokio::time::timeout(d, shutdown_supervisor(actor, join)).await.is_err() {
                kill(run.cell).await;
            }
        }
        (Shutdown::Timeout(d), Handle::Actor) => {
            if run.cell.stop_and_wait(Some("shutdown".into()), Some(d)).await.is_err() {
                tracing::warn!(child = %path, timeout = ?d, "child did not stop in time; killing it");
                kill(run.cell).await;
            }
        }
    }
}

fn is_normal(reason: &Option<String>) -> bool {
    matches!(reason.as_deref(), None | Some("normal") | Some("shutdown"))
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMsg;
    type State = SupState;
    type Arguments = SupArgs;

    async fn pre_start(&self, _myself: ActorRef<Self::Msg>, args: SupArgs) -> Result<Self::State, ActorProcessingErr> {
        let children = args
            .spec
            .children
            .iter()
            .map(|c| Child {
                path: join_path(&args.path, &c.id),
                spec: c.clone(),
                life: Life::Stopped,
                restarts: 0,
                consecutive: 0,
            })
            .collect();
        let st = SupState {
            intensity: args.spec.intensity.tracker(),
            spec: args.spec,
            path: args.path,
            registry: args.registry,
            children,
            generation: 0,
            stopping: false,
            startup: args.startup,
        };
        Ok(st)
    }

    async fn post_start(&self, myself: ActorRef<Self::Msg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let startup = st.startup.take();
        let mut ids = std::collections::HashSet::new();
        for c in &st.children {
            if !ids.insert(c.spec.id.clone()) {
                let err = SupervisorError::DuplicateChild(c.spec.id.clone());
                if let Some(tx) = startup {
                    let _ = tx.send(Err(err.clone()));
                }
                myself.stop(Some(err.to_string()));
                return Ok(());
            }
        }
        for i in 0..st.children.len() {
            if let Err(reason) = st.start_child(&myself, i).await {
                let err = SupervisorError::ChildStartFailed { path: st.children[i].path.clone(), reason };
                tracing::error!(supervisor = %st.spec.name, "{err}");
                st.stopping = true;
                st.stop_all().await;
                if let Some(tx) = startup {
                    let _ = tx.send(Err(err.clone()));
                }
                myself.stop(Some(err.to_string()));
                return Ok(());
            }
        }
        if let Some(tx) = startup {
            let _ = tx.send(Ok(()));
        }
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart { children } => {
                if !st.stopping {
                    st.start_next(&myself, children.into());
                }
            }
            SupervisorMsg::Started { id, generation, result, rest } => {
                let waiting = st
                    .position(&id)
                    .filter(|&i| !st.stopping && matches!(st.children[i].life, Life::Starting { generation: g } if g == generation));
                match (waiting, result) {
                    (Some(i), Ok(started)) => st.install_started(i, started),
                    // A failed restart is another abnormal exit of that child.
                    (Some(i), Err(reason)) => st.on_exit(&myself, i, true, format!("restart failed: {reason}"), Duration::ZERO).await?,
                    // Removed, replaced or restarted again meanwhile, or the supervisor is
                    // stopping: not wanted any more.
                    (None, Ok(started)) => {
                        let path = join_path(&st.path, &id);
                        tokio::spawn(async move { stop_running(started.into_running(), Shutdown::Timeout(Duration::from_secs(5)), &path).await });
                    }
                    (None, Err(_)) => {}
                }
                if !st.stopping {
                    st.start_next(&myself, rest);
                }
            }
            SupervisorMsg::Children(reply) => {
                let _ = reply.send(st.status());
            }
            SupervisorMsg::AddChild(spec, reply) => {
                let result = if st.stopping {
                    Err(SupervisorError::NotRunning("stopping".into()))
                } else if let Some(i) = st.position(&spec.id) {
                    if matches!(st.children[i].life, Life::Stopped | Life::Failed(_)) {
                        st.children.remove(i);
                        add_child(&myself, st, *spec).await
                    } else {
                        Err(SupervisorError::DuplicateChild(spec.id.clone()))
                    }
                } else {
                    add_child(&myself, st, *spec).await
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::RemoveChild(id, reply) => {
                let result = match st.position(&id) {
                    Some(i) => {
                        st.stop_child(i, true).await;
                        st.children.remove(i);
                        Ok(())
                    }
                    None => Err(SupervisorError::NoSuchChild(id)),
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::Spec(reply) => {
                let mut spec = st.spec.clone();
                spec.children = st.children.iter().map(|c| c.spec.clone()).collect();
                let _ = reply.send(spec);
            }
            SupervisorMsg::Install(spec, pool, reply) => {
                let result = if st.stopping {
                    Err(SupervisorError::NotRunning("stopping".into()))
                } else if !matches!(pool.actor().get_status(), ractor::ActorStatus::Running) {
                    // It stopped after its start and before this message: its exit event came
                    // first and was not ours to handle. Installing it would leave a dead child
                    // counted as running.
                    Err(SupervisorError::ChildStartFailed {
                        path: join_path(&st.path, &spec.id),
                        reason: "the new pool stopped before it could take over".into(),
                    })
                } else {
                    let i = st.position(&spec.id);
                    match i.map(|i| &st.children[i].spec.kind) {
                        Some(ChildKind::Pool(_)) | None => {
                            st.install(i, *spec, pool).await;
                            Ok(())
                        }
                        Some(other) => Err(SupervisorError::InvalidSpec(format!(
                            "child `{}` is a {}, not a pool: it cannot be replaced by one",
                            spec.id,
                            other.name()
                        ))),
                    }
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::SetSpec(spec, reply) => {
                let result = match st.position(&spec.id) {
                    Some(i) if st.children[i].spec.kind.name() == spec.kind.name() => {
                        st.children[i].spec = *spec;
                        Ok(())
                    }
                    Some(i) => Err(SupervisorError::InvalidSpec(format!(
                        "child `{}` is a {}, not a {}",
                        spec.id,
                        st.children[i].spec.kind.name(),
                        spec.kind.name()
                    ))),
                    None => Err(SupervisorError::NoSuchChild(spec.id.clone())),
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::Reconfigure(spec, reply) => {
                if st.spec.intensity != spec.intensity {
                    // A new limit starts a new window: restarts counted under the old one
                    // are forgotten.
                    st.intensity = spec.intensity.tracker();
                }
                let order: Vec<&str> = spec.children.iter().map(|c| c.id.as_str()).collect();
                // Stable: children the new order does not name keep theirs, after the others.
                st.children.sort_by_key(|c| order.iter().position(|id| *id == c.spec.id).unwrap_or(usize::MAX));
                let SupervisorSpec { name, strategy, intensity, backoff, healthy_period, children: _ } = *spec;
                st.spec.name = name;
                st.spec.strategy = strategy;
                st.spec.intensity = intensity;
                st.spec.backoff = backoff;
                st.spec.healthy_period = healthy_period;
                let _ = reply.send(());
            }
            SupervisorMsg::Shutdown(reply) => {
                st.stopping = true;
                st.stop_all().await;
                st.end_tree();
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
        let (cell, abnormal, reason) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, true, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let normal = is_normal(&reason);
                (cell, !normal, reason.unwrap_or_else(|| "normal".into()))
            }
            _ => return Ok(()),
        };
        if st.stopping {
            return Ok(());
        }
        let id = cell.get_id();
        let found = st.children.iter().enumerate().find_map(|(i, c)| match &c.life {
            Life::Running(r) if r.cell.get_id() == id => Some((i, r.since.elapsed())),
            _ => None,
        });
        let Some((i, uptime)) = found else {
            // Not a running child: one we stopped ourselves, or a pool that failed to start.
            return Ok(());
        };
        st.on_exit(&myself, i, abnormal, reason, uptime).await
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        st.stopping = true;
        st.stop_all().await;
        st.end_tree();
        Ok(())
    }
}

async fn add_child(myself: &ActorRef<SupervisorMsg>, st: &mut SupState, spec: ChildSpec) -> Result<(), SupervisorError> {
    let path = join_path(&st.path, &spec.id);
    st.children.push(Child { path: path.clone(), spec, life: Life::Stopped, restarts: 0, consecutive: 0 });
    let i = st.children.len() - 1;
    match st.start_child(myself, i).await {
        Ok(()) => Ok(()),
        Err(reason) => {
            st.children.remove(i);
            Err(SupervisorError::ChildStartFailed { path, reason })
        }
    }
}

//! The handle of a running supervisor: lookup by path, status, dynamic children, shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{ActorCell, ActorRef};
use tokio::task::JoinHandle;

use super::actor::{spawn_supervisor, SupervisorMsg};
use super::registry::{join_path, Registered, Registry};
use super::spec::{ChildSpec, SupervisorSpec};
use super::readiness::{NotReady, Unready};
use super::reload::{self, ReloadReport, Step};
use super::spec::ChildKind;
use super::status::{ChildReport, ChildState, ChildStatus, TreeStatus};
use super::SupervisorError;
use crate::pool::Pool;

/// A running supervisor (a whole tree when it is the root). Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use pyvisor_core::supervisor::{ChildSpec, Strategy, SupervisorSpec, Tree};
/// use pyvisor_core::PoolSpec;
/// let tree = Tree::start(
///     SupervisorSpec::new("root", Strategy::OneForOne)
///         .child(ChildSpec::pool("ml", PoolSpec::script("ml.py").workers(2))),
/// )
/// .await?;
/// let ml = tree.pool("ml").expect("running");
/// let y: f64 = ml.call("predict", &[1.0, 2.0]).await?;
/// tree.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Tree {
    actor: ActorRef<SupervisorMsg>,
    registry: Registry,
    path: String,
    join: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// One reload at a time per handle (and its clones).
    reloading: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree").field("path", &self.path).finish_non_exhaustive()
    }
}


impl Tree {
    /// Start a tree: every child in declaration order. If one cannot start, the ones already
    /// started are stopped in reverse order and the error names the child.
    pub async fn start(spec: SupervisorSpec) -> Result<Tree, SupervisorError> {
        Self::start_inner(spec, None, String::new(), Registry::default()).await
    }

    /// Start a tree linked under any ractor actor of the user's: that actor receives ordinary
    /// `SupervisionEvent`s for it (`ActorFailed` with a [`super::SupervisorFailure`] when its
    /// restart intensity is exceeded) and may restart it itself.
    pub async fn start_linked(spec: SupervisorSpec, parent: ActorCell) -> Result<Tree, SupervisorError> {
        Self::start_inner(spec, Some(parent), String::new(), Registry::default()).await
    }

    async fn start_inner(
        spec: SupervisorSpec,
        parent: Option<ActorCell>,
        path: String,
        registry: Registry,
    ) -> Result<Tree, SupervisorError> {
        let (actor, join) = spawn_supervisor(spec, parent, path.clone(), Arc::clone(&registry)).await?;
        Ok(Tree { actor, registry, path, join: Arc::new(Mutex::new(Some(join))), reloading: Arc::default() })
    }

    /// The supervisor's actor (to link, monitor, or compare with supervision events).
    pub fn actor(&self) -> ActorCell {
        self.actor.get_cell()
    }

    /// This supervisor's path (`""` for the root).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The pool running at `path` (relative to this supervisor), e.g. `"etl/loader"`.
    pub fn pool(&self, path: &str) -> Option<Pool> {
        let full = join_path(&self.path, path);
        match self.registry.read().ok()?.get(&full)? {
            Registered::Pool(p) => Some(p.clone()),
            Registered::Supervisor(_) => None,
        }
    }

    /// The nested supervisor at `path` (relative to this one).
    pub fn subtree(&self, path: &str) -> Option<Tree> {
        let full = join_path(&self.path, path);
        match self.registry.read().ok()?.get(&full)? {
            Registered::Supervisor(a) => Some(Tree {
                actor: ActorRef::from(a.clone()),
                registry: Arc::clone(&self.registry),
                path: full,
                join: Arc::new(Mutex::new(None)),
                reloading: Arc::default(),
            }),
            Registered::Pool(_) => None,
        }
    }

    /// This supervisor's children, in start order, with their state.
    pub async fn children(&self) -> Result<Vec<ChildStatus>, SupervisorError> {
        self.ask(SupervisorMsg::Children).await
    }

    /// A snapshot of the whole (sub)tree: every child, each running pool's status (workers,
    /// pids, states, served, restarts, last death certificates) and each running nested
    /// supervisor's children. Fails only when this supervisor does not answer; a nested one
    /// that does not is reported in its [`ChildReport::unavailable`].
    pub async fn status(&self) -> Result<TreeStatus, SupervisorError> {
        let children = self.children().await?;
        let mut reports = Vec::with_capacity(children.len());
        for child in children {
            let mut report = ChildReport { child, pool: None, children: None, unavailable: None };
            if report.child.state == ChildState::Running {
                match report.child.kind {
                    "pool" => match self.pool(&report.child.id) {
                        Some(pool) => report.pool = Some(pool.status().await),
                        None => report.unavailable = Some("not registered (being replaced)".into()),
                    },
                    "supervisor" => match self.subtree(&report.child.id) {
                        Some(sub) => match sub.status_boxed().await {
                            Ok(s) => report.children = Some(s.children),
                            Err(e) => report.unavailable = Some(e.to_string()),
                        },
                        None => report.unavailable = Some("not registered (being replaced)".into()),
                    },
                    _ => {}
                }
            }
            reports.push(report);
        }
        Ok(TreeStatus { path: self.path.clone(), children: reports })
    }

    /// [`Tree::status`] behind a pointer with its type erased: the recursion, and `Send`
    /// provable without a cycle.
    fn status_boxed(&self) -> Pin<Box<dyn Future<Output = Result<TreeStatus, SupervisorError>> + Send + '_>> {
        Box::pin(self.status())
    }

    /// Whether the tree is ready: every supervisor running, every pool with at least its
    /// `min_ready` ready workers (see [`TreeStatus::readiness`]); otherwise every reason.
    pub async fn readiness(&self) -> Result<(), NotReady> {
        match self.status().await {
            Ok(s) => s.readiness(),
            Err(e) => Err(NotReady { reasons: vec![Unready::NoAnswer { kind: "supervisor", path: self.path.clone(), reason: e.to_string() }] }),
        }
    }

    /// Add and start a child (a `DynamicSupervisor`'s `start_child`).
    pub async fn add_child(&self, child: ChildSpec) -> Result<(), SupervisorError> {
        child.check().map_err(SupervisorError::InvalidSpec)?;
        self.ask(|port| SupervisorMsg::AddChild(Box::new(child), port)).await?
    }

    /// Stop a child (per its shutdown spec) and forget it.
    pub async fn remove_child(&self, id: &str) -> Result<(), SupervisorError> {
        let id = id.to_string();
        self.ask(|port| SupervisorMsg::RemoveChild(id, port)).await?
    }

    /// Reload this supervisor from a new declaration of itself, changing only what changed:
    /// added children start, removed ones stop, a pool whose settings changed is replaced
    /// make-before-break (handles got by path switch to the new pool once it is ready, then the
    /// old one drains), nested supervisors are reloaded the same way, and everything else keeps
    /// running untouched (see the rules in `supervisor::reload`'s module doc). Changes are made
    /// one child at a time, in the new declaration's order.
    ///
    /// A declaration that is not usable (a duration too long, two children with one id, at any
    /// depth) is refused before anything changes. A child whose change fails is named in
    /// [`ReloadReport::failed`] and the others still change; `Err` means this supervisor stopped
    /// answering.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use pyvisor_core::supervisor::{ChildSpec, Strategy, SupervisorSpec, Tree};
    /// use pyvisor_core::PoolSpec;
    /// let v1 = SupervisorSpec::new("root", Strategy::OneForOne)
    ///     .child(ChildSpec::pool("ml", PoolSpec::script("ml.py").workers(2)));
    /// let tree = Tree::start(v1).await?;
    /// let ml = tree.pool("ml").expect("running"); // follows the replacement below
    /// let v2 = SupervisorSpec::new("root", Strategy::OneForOne)
    ///     .child(ChildSpec::pool("ml", PoolSpec::script("ml.py").workers(4)))
    ///     .child(ChildSpec::pool("etl", PoolSpec::script("etl.py")));
    /// let report = tree.reload(v2).await?;
    /// assert_eq!(report.replaced, ["ml"]);
    /// assert_eq!(report.added, ["etl"]);
    /// let y: f64 = ml.call("predict", &[1.0]).await?; // served by the new pool
    /// # Ok(()) }
    /// ```
    pub async fn reload(&self, spec: SupervisorSpec) -> Result<ReloadReport, SupervisorError> {
        validate(&spec).map_err(SupervisorError::InvalidSpec)?;
        let _one_at_a_time = self.reloading.lock().await;
        self.reload_level(spec).await
    }

    /// [`Tree::reload`] of this level, without the checks and the lock (taken once, at the top).
    fn reload_level(&self, spec: SupervisorSpec) -> Pin<Box<dyn Future<Output = Result<ReloadReport, SupervisorError>> + Send + '_>> {
        Box::pin(async move {
            let current = self.ask(SupervisorMsg::Spec).await?;
            let plan = reload::plan(&current, &spec);
            let mut report = ReloadReport::default();
            let path_of = |id: &str| join_path(&self.path, id);
            for id in plan.remove {
                match self.remove_child(&id).await {
                    Ok(()) | Err(SupervisorError::NoSuchChild(_)) => report.removed.push(path_of(&id)),
                    Err(e) => return Err(e),
                }
            }
            for step in plan.steps {
                match step {
                    Step::Add(child) => {
                        let path = path_of(&child.id);
                        match self.start_new(child).await {
                            Ok(()) => report.added.push(path),
                            Err(e) => report.failed.push(failure(path, e)?),
                        }
                    }
                    Step::Replace(child) => {
                        let path = path_of(&child.id);
                        match self.start_new(child).await {
                            Ok(()) => report.replaced.push(path),
                            Err(e) => report.failed.push(failure(path, e)?),
                        }
                    }
                    Step::Restart(child) => {
                        let path = path_of(&child.id);
                        match self.remove_child(&child.id).await {
                            Ok(()) | Err(SupervisorError::NoSuchChild(_)) => {}
                            Err(e) => return Err(e),
                        }
                        match self.start_new(child).await {
                            Ok(()) => report.replaced.push(path),
                            Err(e) => report.failed.push(failure(path, e)?),
                        }
                    }
                    Step::Keep { spec, changed } => {
                        let path = path_of(&spec.id);
                        self.ask(|port| SupervisorMsg::SetSpec(Box::new(spec), port)).await??;
                        if changed {
                            report.updated.push(path);
                        } else {
                            report.kept.push(path);
                        }
                    }
                    Step::Recurse(child) => {
                        let id = child.id.clone();
                        let ChildKind::Supervisor(sub_spec) = &child.kind else { continue };
                        let sub_spec = (**sub_spec).clone();
                        // Stored first: if it restarts from now on, it starts as declared.
                        self.ask(|port| SupervisorMsg::SetSpec(Box::new(child), port)).await??;
                        match self.subtree(&id) {
                            Some(sub) => match sub.reload_level(sub_spec).await {
                                Ok(r) => report.merge(r),
                                Err(e) => report.failed.push((path_of(&id), e.to_string())),
                            },
                            // Not running now (restarting): its restart uses the new declaration.
                            None => report.updated.push(path_of(&id)),
                        }
                    }
                }
            }
            self.ask(|port| SupervisorMsg::Reconfigure(Box::new(spec), port)).await?;
            Ok(report)
        })
    }

    /// Start `child` as declared, in its place or as a new child. A pool
    /// is started here, outside the supervisor (which keeps answering meanwhile), and installed
    /// once every worker is ready; anything else is added by the supervisor.
    async fn start_new(&self, child: ChildSpec) -> Result<(), SupervisorError> {
        match &child.kind {
            ChildKind::Pool(pool_spec) => {
                child.check().map_err(SupervisorError::InvalidSpec)?;
                let pool = Pool::start_linked((**pool_spec).clone(), self.actor())
                    .await
                    .map_err(|e| SupervisorError::ChildStartFailed { path: join_path(&self.path, &child.id), reason: e.to_string() })?;
                let installed = self.ask(|port| SupervisorMsg::Install(Box::new(child), pool.clone(), port)).await;
                match installed {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) | Err(e) => {
                        pool.shutdown().await;
                        Err(e)
                    }
                }
            }
            _ => self.add_child(child).await,
        }
    }

    /// Stop every child in reverse start order (each per its shutdown spec), then the
    /// supervisor. Idempotent.
    pub async fn shutdown(&self) {
        let _ = self.actor.call(SupervisorMsg::Shutdown, Some(Duration::from_secs(3600))).await;
        let join = self.join.lock().ok().and_then(|mut j| j.take());
        if let Some(j) = join {
            let _ = j.await;
        }
    }

    async fn ask<T: Send + 'static>(
        &self,
        msg: impl FnOnce(ractor::RpcReplyPort<T>) -> SupervisorMsg,
    ) -> Result<T, SupervisorError> {
        match self.actor.call(msg, Some(Duration::from_secs(3600))).await {
            Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
            Ok(_) => Err(SupervisorError::NotRunning("no answer".into())),
            Err(e) => Err(SupervisorError::NotRunning(e.to_string())),
        }
    }
}

/// A failed change of one child, for [`ReloadReport::failed`]; a supervisor that stopped
/// answering ends the reload instead.
fn failure(path: String, e: SupervisorError) -> Result<(String, String), SupervisorError> {
    match e {
        SupervisorError::ChildStartFailed { reason, .. } => Ok((path, reason)),
        SupervisorError::NotRunning(_) => Err(e),
        other => Ok((path, other.to_string())),
    }
}

/// Whether a declaration can be reloaded: durations, child shutdowns and unique ids, at every
/// depth (pools' own settings are checked when they start).
fn validate(spec: &SupervisorSpec) -> Result<(), String> {
    spec.check()?;
    let mut ids = std::collections::HashSet::new();
    for c in &spec.children {
        if !ids.insert(c.id.as_str()) {
            return Err(format!("supervisor `{}`: two children are named `{}`", spec.name, c.id));
        }
        c.check()?;
        if let ChildKind::Supervisor(sub) = &c.kind {
            validate(sub)?;
        }
    }
    Ok(())
}

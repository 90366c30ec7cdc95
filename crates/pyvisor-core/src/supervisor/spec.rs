//! Supervisor and child specs: strategies, restart types, shutdown, as builder values.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::ActorCell;

use super::intensity::Intensity;
use crate::backoff::Backoff;
use crate::spec::{PoolSpec, MAX_DURATION};

/// Which children restart when one exits (OTP's strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the child that exited.
    OneForOne,
    /// Every child: the others are stopped (in reverse order) and all restart in order.
    OneForAll,
    /// The child that exited and every child declared after it.
    RestForOne,
}

/// When a child is restarted (OTP's restart types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Restart {
    /// Always.
    Permanent,
    /// Only after an abnormal exit (a failure, or a stop with a reason other than normal).
    Transient,
    /// Never; the child is forgotten when it exits.
    Temporary,
}

/// How a child is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Ask it to stop, wait this long, then kill it.
    Timeout(Duration),
    /// Kill it at once.
    Brutal,
}

/// A start function for a user's actor: spawn it linked under the given supervisor cell.
pub type StartFn = Arc<dyn Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, String>> + Send + Sync>;

/// What a child is.
#[derive(Clone)]
pub enum ChildKind {
    /// A pool of Python workers.
    Pool(Box<PoolSpec>),
    /// A nested supervisor.
    Supervisor(Box<SupervisorSpec>),
    /// Any ractor actor of the user's, started by a function.
    Actor(StartFn),
}

impl ChildKind {
    /// `pool`, `supervisor` or `actor`.
    pub fn name(&self) -> &'static str {
        match self {
            ChildKind::Pool(_) => "pool",
            ChildKind::Supervisor(_) => "supervisor",
            ChildKind::Actor(_) => "actor",
        }
    }
}

/// One child of a supervisor.
#[derive(Clone)]
pub struct ChildSpec {
    pub(crate) id: String,
    pub(crate) kind: ChildKind,
    pub(crate) restart: Restart,
    pub(crate) shutdown: Shutdown,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("id", &self.id)
            .field("kind", &self.kind.name())
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .finish()
    }
}

impl ChildSpec {
    fn new(id: impl Into<String>, kind: ChildKind) -> Self {
        ChildSpec { id: id.into(), kind, restart: Restart::Permanent, shutdown: Shutdown::Timeout(Duration::from_secs(15)) }
    }
    /// A pool child. Its id is its name in paths (`"etl/loader"`); the pool is named after it.
    #[must_use]
    pub fn pool(id: impl Into<String>, spec: PoolSpec) -> Self {
        let id = id.into();
        let spec = spec.name(id.clone());
        Self::new(id, ChildKind::Pool(Box::new(spec)))
    }
    /// A nested supervisor.
    #[must_use]
    pub fn supervisor(id: impl Into<String>, spec: SupervisorSpec) -> Self {
        Self::new(id, ChildKind::Supervisor(Box::new(spec)))
    }
    /// A user actor, started by `start` linked under the supervisor's cell, e.g.
    /// `|sup| Box::pin(async move { Actor::spawn_linked(None, MyActor, (), sup).await.map(|(a, _)| a.get_cell()).map_err(|e| e.to_string()) })`.
    #[must_use]
    pub fn actor<F>(id: impl Into<String>, start: F) -> Self
    where
        F: Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, String>> + Send + Sync + 'static,
    {
        Self::new(id, ChildKind::Actor(Arc::new(start)))
    }
    /// Restart type. Default permanent.
    #[must_use]
    pub fn restart(mut self, r: Restart) -> Self {
        self.restart = r;
        self
    }
    /// Shutdown. Default a 15 s timeout, then kill.
    #[must_use]
    pub fn shutdown(mut self, s: Shutdown) -> Self {
        self.shutdown = s;
        self
    }
    /// The child's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// What the child is: a pool (with its spec), a nested supervisor (with its spec) or an
    /// actor of the user's.
    ///
    /// ```
    /// use pyvisor_core::supervisor::{ChildKind, ChildSpec};
    /// use pyvisor_core::PoolSpec;
    /// let child = ChildSpec::pool("ml", PoolSpec::script("ml.py"));
    /// assert!(matches!(child.kind(), ChildKind::Pool(_)));
    /// ```
    pub fn kind(&self) -> &ChildKind {
        &self.kind
    }
}

/// A supervisor: strategy, intensity, restart backoff, and children in start order.
///
/// ```
/// use pyvisor_core::supervisor::{ChildSpec, Strategy, SupervisorSpec};
/// use pyvisor_core::PoolSpec;
/// let tree = SupervisorSpec::new("root", Strategy::OneForOne)
///     .child(ChildSpec::pool("ml", PoolSpec::script("ml.py").workers(2)))
///     .child(ChildSpec::supervisor(
///         "etl",
///         SupervisorSpec::new("etl", Strategy::RestForOne)
///             .child(ChildSpec::pool("loader", PoolSpec::script("etl.py"))),
///     ));
/// assert_eq!(tree.children().len(), 2);
/// ```
#[derive(Clone, Debug)]
pub struct SupervisorSpec {
    pub(crate) name: String,
    pub(crate) strategy: Strategy,
    pub(crate) intensity: Intensity,
    pub(crate) backoff: Backoff,
    pub(crate) healthy_period: Duration,
    pub(crate) children: Vec<ChildSpec>,
}

impl SupervisorSpec {
    /// A supervisor with OTP's intensity (3 in 5 s), restart backoff 100 ms × 2 capped at
    /// 10 s with full jitter, reset after a child stays up 30 s.
    #[must_use]
    pub fn new(name: impl Into<String>, strategy: Strategy) -> Self {
        SupervisorSpec {
            name: name.into(),
            strategy,
            intensity: Intensity::default(),
            backoff: Backoff::default(),
            healthy_period: Duration::from_secs(30),
            children: Vec::new(),
        }
    }
    /// Restart intensity.
    #[must_use]
    pub fn intensity(mut self, max_restarts: u32, period: Duration) -> Self {
        self.intensity = Intensity::new(max_restarts, period);
        self
    }
    /// Restart delay policy.
    #[must_use]
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }
    /// A child that stays up this long has its backoff reset.
    #[must_use]
    pub fn healthy_period(mut self, d: Duration) -> Self {
        self.healthy_period = d;
        self
    }
    /// Add a child (children start in the order added, stop in reverse).
    #[must_use]
    pub fn child(mut self, c: ChildSpec) -> Self {
        self.children.push(c);
        self
    }
    /// The children.
    pub fn children(&self) -> &[ChildSpec] {
        &self.children
    }
    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The sum of the children's shutdown timeouts (a brutal kill counts as none): how long an
    /// orderly [`super::Tree::shutdown`] of this supervisor may wait for its children, one after
    /// the other, before it kills the last one. A nested supervisor's own timeout bounds its
    /// whole subtree, so only this supervisor's children count.
    ///
    /// ```
    /// use std::time::Duration;
    /// use pyvisor_core::supervisor::{ChildSpec, Shutdown, Strategy, SupervisorSpec};
    /// use pyvisor_core::PoolSpec;
    /// let tree = SupervisorSpec::new("root", Strategy::OneForOne)
    ///     .child(ChildSpec::pool("a", PoolSpec::script("a.py")))
    ///     .child(ChildSpec::pool("b", PoolSpec::script("b.py")).shutdown(Shutdown::Timeout(Duration::from_secs(4))))
    ///     .child(ChildSpec::pool("c", PoolSpec::script("c.py")).shutdown(Shutdown::Brutal));
    /// assert_eq!(tree.shutdown_budget(), Duration::from_secs(15 + 4));
    /// ```
    pub fn shutdown_budget(&self) -> Duration {
        self.children
            .iter()
            .map(|c| match c.shutdown {
                Shutdown::Timeout(d) => d,
                Shutdown::Brutal => Duration::ZERO,
            })
            .fold(Duration::ZERO, Duration::saturating_add)
    }

    /// Every duration of this supervisor and of its children's shutdowns must fit the clock's
    /// arithmetic (at most [`crate::MAX_DURATION`]); nested supervisors are checked when they
    /// start, pools by [`crate::Pool::start`].
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut fields = vec![
            ("intensity period".to_string(), self.intensity.period),
            ("healthy_period".to_string(), self.healthy_period),
            ("backoff base".to_string(), self.backoff.base),
            ("backoff cap".to_string(), self.backoff.cap),
        ];
        for c in &self.children {
            if let Shutdown::Timeout(d) = c.shutdown {
                fields.push((format!("shutdown timeout of child `{}`", c.id), d));
            }
        }
        match fields.into_iter().find(|(_, d)| *d > MAX_DURATION) {
            Some((field, d)) => Err(format!(
                "supervisor `{}`: {field} is too long: {d:?} (at most {} days)",
                self.name,
                MAX_DURATION.as_secs() / 86_400
            )),
            None => Ok(()),
        }
    }
}

impl ChildSpec {
    pub(crate) fn check(&self) -> Result<(), String> {
        match self.shutdown {
            Shutdown::Timeout(d) if d > MAX_DURATION => Err(format!(
                "shutdown timeout of child `{}` is too long: {d:?} (at most {} days)",
                self.id,
                MAX_DURATION.as_secs() / 86_400
            )),
            _ => Ok(()),
        }
    }
}

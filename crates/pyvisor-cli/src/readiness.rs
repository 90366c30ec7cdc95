//! Whether a running tree is *ready*: every supervisor of the tree is running (and answers),
//! and every pool has at least its `min_ready` ready workers (`PoolStatus::is_ready`; a pool's
//! `min_ready` is the one set, else `workers − 1`, at least 1).
//!
//! The one definition `pyvisor run` reports (systemd's `READY=1` and `STATUS=`, see
//! `notify`), for the endpoints and `pyvisor status` to share. It only reads: one walk asks
//! each supervisor for its children and each running pool for its status.

use std::future::Future;
use std::pin::Pin;

use pyvisor_core::supervisor::{ChildState, SupervisorError, Tree};

/// One pool as the walk found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolReadiness {
    /// Its path (`etl/loader`).
    pub path: String,
    /// Ready workers (0 when the pool is not running).
    pub ready: usize,
    /// Positions (0 when the pool is not running).
    pub workers: usize,
    /// Ready workers it needs.
    pub min_ready: usize,
    /// Why it is not running (`restarting`, `failed: ...`), if it is not.
    pub down: Option<String>,
}

impl PoolReadiness {
    /// Running, open, and at least `min_ready` workers ready.
    pub fn is_ready(&self) -> bool {
        self.down.is_none() && self.ready >= self.min_ready
    }
}

/// A walk of the whole tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Every pool, in start order (depth first).
    pub pools: Vec<PoolReadiness>,
    /// Nested supervisors that are not running, with their state.
    pub supervisors_down: Vec<(String, String)>,
}

fn describe(state: &ChildState) -> String {
    match state {
        ChildState::Running => "running".into(),
        ChildState::Restarting { next_in } => format!("restarting in {} ms", next_in.as_millis()),
        ChildState::Stopped => "stopped".into(),
        ChildState::Failed { reason } => format!("failed: {}", reason.lines().next().unwrap_or("")),
        other => format!("{other:?}"),
    }
}

impl Readiness {
    /// Walk the tree. An error means the supervisor asked first (the root) did not answer: it
    /// has stopped or failed. A nested supervisor that does not answer counts as not running.
    pub async fn of(tree: &Tree) -> Result<Readiness, SupervisorError> {
        let mut r = Readiness::default();
        r.walk(tree).await?;
        Ok(r)
    }

    /// Boxed by hand: it recurses, and the notifier runs it on a spawned (`Send`) task.
    fn walk<'a>(&'a mut self, tree: &'a Tree) -> Pin<Box<dyn Future<Output = Result<(), SupervisorError>> + Send + 'a>> {
        Box::pin(async move {
            for c in tree.children().await? {
                match (c.kind, &c.state) {
                    ("pool", ChildState::Running) => match tree.pool(&c.id) {
                        Some(pool) => {
                            let s = pool.status().await;
                            self.pools.push(PoolReadiness {
                                path: c.path,
                                ready: s.ready(),
                                workers: s.workers.len(),
                                min_ready: s.min_ready,
                                down: s.closed.then(|| "closed".to_string()),
                            });
                        }
                        None => self.pools.push(PoolReadiness { path: c.path, ready: 0, workers: 0, min_ready: 1, down: Some("not registered".into()) }),
                    },
                    ("pool", state) => {
                        self.pools.push(PoolReadiness { path: c.path, ready: 0, workers: 0, min_ready: 1, down: Some(describe(state)) })
                    }
                    ("supervisor", ChildState::Running) => match tree.subtree(&c.id) {
                        Some(sub) => {
                            if let Err(e) = self.walk(&sub).await {
                                self.supervisors_down.push((c.path, e.to_string()));
                            }
                        }
                        None => self.supervisors_down.push((c.path, "not registered".into())),
                    },
                    ("supervisor", state) => self.supervisors_down.push((c.path, describe(state))),
                    _ => {} // user actors: neither a supervisor nor a pool
                }
            }
            Ok(())
        })
    }

    /// Every supervisor runs and every pool is ready.
    pub fn is_ready(&self) -> bool {
        self.supervisors_down.is_empty() && self.pools.iter().all(PoolReadiness::is_ready)
    }

    /// One short line: `ready: 2/2 pools, 3/3 workers ready` or what is missing first.
    pub fn summary(&self) -> String {
        let pools_ready = self.pools.iter().filter(|p| p.is_ready()).count();
        let ready: usize = self.pools.iter().map(|p| p.ready).sum();
        let workers: usize = self.pools.iter().map(|p| p.workers).sum();
        let counts = format!("{pools_ready}/{} pools, {ready}/{workers} workers ready", self.pools.len());
        if self.is_ready() {
            return format!("ready: {counts}");
        }
        let why = match (self.supervisors_down.first(), self.pools.iter().find(|p| !p.is_ready())) {
            (Some((path, state)), _) => format!("supervisor {path} {state}"),
            (None, Some(p)) => match &p.down {
                Some(state) => format!("pool {} {state}", p.path),
                None => format!("pool {} has {}/{} ready, needs {}", p.path, p.ready, p.workers, p.min_ready),
            },
            (None, None) => String::new(),
        };
        format!("not ready: {counts}; {why}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(path: &str, ready: usize, workers: usize, min_ready: usize) -> PoolReadiness {
        PoolReadiness { path: path.into(), ready, workers, min_ready, down: None }
    }

    #[test]
    fn ready_needs_every_pool_at_min_ready_and_every_supervisor_running() {
        let mut r = Readiness { pools: vec![pool("ml", 2, 3, 2), pool("etl/loader", 1, 1, 1)], supervisors_down: vec![] };
        assert!(r.is_ready());
        assert_eq!(r.summary(), "ready: 2/2 pools, 3/4 workers ready");

        r.pools[0].ready = 1;
        assert!(!r.is_ready());
        assert_eq!(r.summary(), "not ready: 1/2 pools, 2/4 workers ready; pool ml has 1/3 ready, needs 2");

        r.pools[0].ready = 2;
        r.pools[1].down = Some("restarting in 200 ms".into());
        assert!(!r.is_ready());
        assert!(r.summary().ends_with("pool etl/loader restarting in 200 ms"), "{}", r.summary());

        r.pools[1].down = None;
        r.supervisors_down.push(("etl".into(), "failed: too many restarts".into()));
        assert!(!r.is_ready());
        assert!(r.summary().ends_with("supervisor etl failed: too many restarts"), "{}", r.summary());
    }

    #[test]
    fn a_tree_without_pools_is_ready() {
        assert!(Readiness::default().is_ready());
    }
}

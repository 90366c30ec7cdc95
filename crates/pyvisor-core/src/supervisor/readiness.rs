//! Whether a tree is *ready*: the one meaning that `pyvisor run`'s `/readyz`, its systemd
//! `READY=1` and `pyvisor status` share.
//!
//! A tree is ready when every supervisor in it is running (and answers) and every pool in it is
//! running with at least its `min_ready` ready workers ([`crate::PoolSpec::min_ready_count`]:
//! `RecyclePolicy::min_ready`, or workers − 1 and at least 1 when unset; a value above the
//! worker count counts as the worker count). A pool that is restarting, stopped, failed or
//! closed is not ready, whatever its restart type. User actors are not judged: pyvisor does not
//! know what ready means for them.
//!
//! The judgement is a pure function of a [`TreeStatus`] snapshot ([`TreeStatus::readiness`]),
//! so it is tested without processes; [`super::Tree::readiness`] takes the snapshot first.

use super::status::{ChildReport, ChildState, TreeStatus};

/// Why a tree is not ready: every reason found, in tree order. Displays as one reason per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
#[non_exhaustive]
pub struct NotReady {
    /// At least one reason.
    pub reasons: Vec<Unready>,
}

/// One reason a tree is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unready {
    /// A supervisor or pool that should answer did not (the root: path `""`).
    NoAnswer {
        /// `"supervisor"` or `"pool"`.
        kind: &'static str,
        /// Its path.
        path: String,
        /// What happened instead.
        reason: String,
    },
    /// A supervisor or pool child is not running (restarting, stopped, failed).
    NotRunning {
        /// `"supervisor"` or `"pool"`.
        kind: &'static str,
        /// Its path.
        path: String,
        /// Its state.
        state: ChildState,
    },
    /// A running pool has stopped taking calls (it is shutting down or has failed).
    PoolClosed {
        /// Its path.
        path: String,
    },
    /// A running pool has fewer ready workers than it needs.
    BelowMinReady {
        /// Its path.
        path: String,
        /// Workers ready now.
        ready: usize,
        /// Worker positions in the pool.
        workers: usize,
        /// The ready workers it needs.
        min_ready: usize,
    },
}

impl std::fmt::Display for Unready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |path: &str| if path.is_empty() { "(root)".to_string() } else { path.to_string() };
        match self {
            Unready::NoAnswer { kind, path, reason } => write!(f, "{kind} {}: not answering: {reason}", name(path)),
            Unready::NotRunning { kind, path, state } => write!(f, "{kind} {}: {state}", name(path)),
            Unready::PoolClosed { path } => write!(f, "pool {}: closed", name(path)),
            Unready::BelowMinReady { path, ready, workers, min_ready } => {
                write!(f, "pool {}: {ready} of {workers} workers ready (min_ready {min_ready})", name(path))
            }
        }
    }
}

impl TreeStatus {
    /// `Ok` when the tree is ready (see the module doc), else every reason it is not.
    pub fn readiness(&self) -> Result<(), NotReady> {
        let mut reasons = Vec::new();
        judge(&self.children, &mut reasons);
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(NotReady { reasons })
        }
    }

    /// One short line for a status display (systemd's `STATUS=`): `ready: 2/2 pools, 3/4
    /// workers ready`, or `not ready: ...` and the first reason.
    ///
    /// ```no_run
    /// # async fn demo(tree: pyvisor_core::supervisor::Tree) -> Result<(), Box<dyn std::error::Error>> {
    /// println!("{}", tree.status().await?.summary()); // e.g. "ready: 2/2 pools, 3/4 workers ready"
    /// # Ok(()) }
    /// ```
    pub fn summary(&self) -> String {
        let mut count = Counts::default();
        count.walk(&self.children);
        let counts = format!("{}/{} pools, {}/{} workers ready", count.pools_ready, count.pools, count.ready, count.workers);
        match self.readiness() {
            Ok(()) => format!("ready: {counts}"),
            Err(e) => match e.reasons.first() {
                Some(first) => format!("not ready: {counts}; {first}"),
                None => format!("not ready: {counts}"),
            },
        }
    }
}

/// Pools and workers of a snapshot, for [`TreeStatus::summary`].
#[derive(Default)]
struct Counts {
    pools: usize,
    pools_ready: usize,
    ready: usize,
    workers: usize,
}

impl Counts {
    fn walk(&mut self, children: &[ChildReport]) {
        for c in children {
            match c.child.kind {
                "pool" => {
                    self.pools += 1;
                    if let Some(p) = &c.pool {
                        self.ready += p.ready();
                        self.workers += p.workers.len();
                    }
                    let mut reasons = Vec::new();
                    judge(std::slice::from_ref(c), &mut reasons);
                    self.pools_ready += usize::from(reasons.is_empty());
                }
                _ => self.walk(c.children.as_deref().unwrap_or_default()),
            }
        }
    }
}


fn judge(children: &[ChildReport], out: &mut Vec<Unready>) {
    for c in children {
        let path = &c.child.path;
        let kind = match c.child.kind {
            k @ ("pool" | "supervisor") => k,
            _ => continue,
        };
        if c.child.state != ChildState::Running {
            out.push(Unready::NotRunning { kind, path: path.clone(), state: c.child.state.clone() });
            continue;
        }
        if let Some(reason) = &c.unavailable {
            out.push(Unready::NoAnswer { kind, path: path.clone(), reason: reason.clone() });
            continue;
        }
        match (kind, &c.pool, &c.children) {
            ("pool", Some(p), _) if p.closed => out.push(Unready::PoolClosed { path: path.clone() }),
            ("pool", Some(p), _) => {
                let needed = p.min_ready.min(p.workers.len());
                let ready = p.ready();
                if ready < needed {
                    out.push(Unready::BelowMinReady { path: path.clone(), ready, workers: p.workers.len(), min_ready: p.min_ready });
                }
            }
            ("supervisor", _, Some(sub)) => judge(sub, out),
            _ => out.push(Unready::NoAnswer { kind, path: path.clone(), reason: "no status".into() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::status::{PoolStatus, WorkerState, WorkerStatus};
    use crate::supervisor::status::ChildStatus;
    use crate::supervisor::Restart;

    fn worker(index: usize, state: WorkerState) -> WorkerStatus {
        WorkerStatus {
            index,
            worker: None,
            pid: None,
            state,
            in_flight: 0,
            served: 0,
            restarts: 0,
            rss: None,
            last_beat_age: None,
            restart_in: None,
            in_progress: Vec::new(),
            tainted: false,
        }
    }

    fn pool(path: &str, states: &[WorkerState], min_ready: usize) -> ChildReport {
        ChildReport {
            child: child(path, "pool", ChildState::Running),
            pool: Some(PoolStatus {
                name: path.rsplit('/').next().unwrap_or(path).to_string(),
                workers: states.iter().enumerate().map(|(i, s)| worker(i, *s)).collect(),
                queued: 0,
                closed: false,
                retried: 0,
                poisoned: 0,
                crashes: 0,
                recycles: 0,
                min_ready,
                last_deaths: Vec::new(),
            }),
            children: None,
            unavailable: None,
        }
    }

    fn child(path: &str, kind: &'static str, state: ChildState) -> ChildStatus {
        ChildStatus {
            id: path.rsplit('/').next().unwrap_or(path).to_string(),
            path: path.to_string(),
            kind,
            state,
            restarts: 0,
            restart: Restart::Permanent,
        }
    }

    fn sup(path: &str, children: Vec<ChildReport>) -> ChildReport {
        ChildReport { child: child(path, "supervisor", ChildState::Running), pool: None, children: Some(children), unavailable: None }
    }

    fn tree(children: Vec<ChildReport>) -> TreeStatus {
        TreeStatus { path: String::new(), children }
    }

    use WorkerState::{Dead, Draining, Ready, Starting};

    #[test]
    fn a_tree_whose_pools_have_min_ready_ready_workers_is_ready() {
        let t = tree(vec![pool("ml", &[Ready, Starting], 1), sup("etl", vec![pool("etl/loader", &[Ready, Ready], 2)])]);
        assert_eq!(t.readiness(), Ok(()));
    }

    #[test]
    fn a_pool_below_min_ready_is_named_with_its_counts() {
        let t = tree(vec![pool("ml", &[Ready], 1), sup("etl", vec![pool("etl/loader", &[Ready, Starting], 2)])]);
        let e = t.readiness().unwrap_err();
        assert_eq!(e.reasons, vec![Unready::BelowMinReady { path: "etl/loader".into(), ready: 1, workers: 2, min_ready: 2 }]);
        assert_eq!(e.to_string(), "pool etl/loader: 1 of 2 workers ready (min_ready 2)");
    }

    #[test]
    fn draining_and_dead_workers_do_not_count_as_ready() {
        let t = tree(vec![pool("p", &[Draining, Dead, Ready], 2)]);
        assert_eq!(t.readiness().unwrap_err().to_string(), "pool p: 1 of 3 workers ready (min_ready 2)");
    }

    #[test]
    fn min_ready_above_the_worker_count_counts_as_the_worker_count() {
        assert_eq!(tree(vec![pool("p", &[Ready, Ready], 5)]).readiness(), Ok(()));
        assert!(tree(vec![pool("p", &[Ready, Starting], 5)]).readiness().is_err());
    }

    #[test]
    fn every_reason_is_reported_in_tree_order() {
        let mut closed = pool("c", &[Ready], 1);
        if let Some(p) = closed.pool.as_mut() {
            p.closed = true;
        }
        let restarting = ChildReport {
            child: child("etl", "supervisor", ChildState::Restarting { next_in: Duration::from_millis(250) }),
            pool: None,
            children: None,
            unavailable: None,
        };
        let failed = ChildReport {
            child: child("q", "pool", ChildState::Failed { reason: "too many start failures\nmore".into() }),
            pool: None,
            children: None,
            unavailable: None,
        };
        let silent = ChildReport {
            child: child("s", "supervisor", ChildState::Running),
            pool: None,
            children: None,
            unavailable: Some("timed out".into()),
        };
        let user_actor = ChildReport { child: child("a", "actor", ChildState::Stopped), pool: None, children: None, unavailable: None };
        let e = tree(vec![pool("p", &[Starting], 1), closed, restarting, failed, silent, user_actor]).readiness().unwrap_err();
        assert_eq!(
            e.to_string(),
            "pool p: 0 of 1 workers ready (min_ready 1)\npool c: closed\nsupervisor etl: restarting in 250 ms\n\
             pool q: failed: too many start failures\nsupervisor s: not answering: timed out"
        );
    }

    #[test]
    fn the_summary_counts_pools_and_workers_and_names_the_first_reason() {
        let mut t = tree(vec![pool("ml", &[Ready, Starting, Ready], 2), sup("etl", vec![pool("etl/loader", &[Ready], 1)])]);
        assert_eq!(t.summary(), "ready: 2/2 pools, 3/4 workers ready");
        t.children[0] = pool("ml", &[Ready, Starting, Dead], 2);
        assert_eq!(t.summary(), "not ready: 1/2 pools, 2/4 workers ready; pool ml: 1 of 3 workers ready (min_ready 2)");
        let down = ChildReport {
            child: child("etl", "supervisor", ChildState::Restarting { next_in: Duration::from_millis(200) }),
            pool: None,
            children: None,
            unavailable: None,
        };
        t.children = vec![pool("ml", &[Ready], 1), down];
        assert_eq!(t.summary(), "not ready: 1/1 pools, 1/1 workers ready; supervisor etl: restarting in 200 ms");
        assert_eq!(tree(vec![]).summary(), "ready: 0/0 pools, 0/0 workers ready");
    }

    #[test]
    fn user_actors_are_not_judged() {
        let a = ChildReport { child: child("a", "actor", ChildState::Failed { reason: "x".into() }), pool: None, children: None, unavailable: None };
        assert_eq!(tree(vec![a]).readiness(), Ok(()));
    }
}

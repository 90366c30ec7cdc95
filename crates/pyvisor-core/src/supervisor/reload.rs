//! Reloading a running supervisor from a new declaration of itself (`pyvisor run`'s SIGHUP).
//!
//! Owns the plan — which children are added, removed, replaced, updated in place or kept — as
//! a pure function of the spec in effect and the new one ([`plan`], unit-tested without
//! processes), and what a reload reports ([`ReloadReport`]). Carrying the plan out is
//! [`super::Tree::reload`]'s, and every change of a child is the supervisor actor's (messages
//! `Install`, `SetSpec`, `Reconfigure`, `AddChild`, `RemoveChild`): this module starts and stops
//! nothing itself.
//!
//! The rules, per child id:
//!
//! - only in the new spec: **added** (started in its declared place);
//! - only in the running one: **removed** (stopped per its shutdown spec; handles by path end);
//! - a pool in both whose settings differ ([`crate::PoolSpec::same_settings`]): **replaced**
//!   make-before-break — the new pool starts next to the old one, handles by path switch to it
//!   once every worker is ready, then the old one drains and stops. If the new one cannot start,
//!   the old one keeps running and the reload reports the failure;
//! - a nested supervisor in both: its own policy is taken and its children are reloaded the same
//!   way (it is not restarted);
//! - a child whose kind changed (pool, supervisor, actor): stopped, then the new one started
//!   (**replaced**, break-before-make: one path cannot hold both);
//! - otherwise **kept** (its process ids too); a changed restart type or shutdown takes effect at
//!   once (**updated**). A user actor is always kept: its start function cannot be compared.
//!
//! The supervisor's own strategy, intensity, backoff and healthy period are taken as declared
//! (a changed intensity starts a new window), and children are ordered as declared.

use super::spec::{ChildKind, ChildSpec, SupervisorSpec};

/// What to do with one child.
#[derive(Debug)]
pub(crate) enum Step {
    /// Start it (it is new).
    Add(ChildSpec),
    /// A pool whose settings changed: start the new one, then switch and stop the old one.
    Replace(ChildSpec),
    /// Its kind changed: stop the old child, then start this one.
    Restart(ChildSpec),
    /// Keep it under this spec; `changed` when its restart type or shutdown differ.
    Keep { spec: ChildSpec, changed: bool },
    /// A nested supervisor: reload it with this spec.
    Recurse(ChildSpec),
}

/// A reload of one supervisor: ids to remove (in reverse start order), then a step per child
/// of the new spec, in its order.
#[derive(Debug)]
pub(crate) struct Plan {
    pub remove: Vec<String>,
    pub steps: Vec<Step>,
}

/// The plan that turns the children of `old` into those of `new`.
pub(crate) fn plan(old: &SupervisorSpec, new: &SupervisorSpec) -> Plan {
    let remove = old
        .children
        .iter()
        .rev()
        .filter(|o| !new.children.iter().any(|n| n.id == o.id))
        .map(|o| o.id.clone())
        .collect();
    let steps = new
        .children
        .iter()
        .map(|n| {
            let Some(o) = old.children.iter().find(|o| o.id == n.id) else { return Step::Add(n.clone()) };
            let same_terms = o.restart == n.restart && o.shutdown == n.shutdown;
            match (&o.kind, &n.kind) {
                (ChildKind::Pool(a), ChildKind::Pool(b)) if a.same_settings(b) => Step::Keep { spec: n.clone(), changed: !same_terms },
                (ChildKind::Pool(_), ChildKind::Pool(_)) => Step::Replace(n.clone()),
                (ChildKind::Supervisor(_), ChildKind::Supervisor(_)) => Step::Recurse(n.clone()),
                (ChildKind::Actor(_), ChildKind::Actor(_)) => Step::Keep { spec: n.clone(), changed: !same_terms },
                _ => Step::Restart(n.clone()),
            }
        })
        .collect();
    Plan { remove, steps }
}

/// What a reload did, by path. Complete when [`ReloadReport::failed`] is empty.
///
/// ```no_run
/// # async fn demo(tree: pyvisor_core::supervisor::Tree, new: pyvisor_core::supervisor::SupervisorSpec) -> Result<(), Box<dyn std::error::Error>> {
/// let report = tree.reload(new).await?;
/// println!("{report}"); // "added etl/cleaner; replaced ml; removed old; 2 kept"
/// for (path, why) in &report.failed {
///     eprintln!("{path}: {why} (the running child, if any, was kept)");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadReport {
    /// Children started.
    pub added: Vec<String>,
    /// Children stopped and forgotten.
    pub removed: Vec<String>,
    /// Children replaced by a new declaration (pools make-before-break).
    pub replaced: Vec<String>,
    /// Children kept running, with a new restart type or shutdown.
    pub updated: Vec<String>,
    /// Children kept as they were.
    pub kept: Vec<String>,
    /// Children whose change could not be made, and why. A pool that could not be replaced
    /// keeps running as it was; one that could not be added is not there.
    pub failed: Vec<(String, String)>,
}

impl ReloadReport {
    /// Every change was made.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }

    pub(crate) fn merge(&mut self, other: ReloadReport) {
        self.added.extend(other.added);
        self.removed.extend(other.removed);
        self.replaced.extend(other.replaced);
        self.updated.extend(other.updated);
        self.kept.extend(other.kept);
        self.failed.extend(other.failed);
    }
}

impl std::fmt::Display for ReloadReport {
    /// One line: `added a, b; replaced c; removed d; updated e; 3 kept; failed f: why`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (what, paths) in [("added", &self.added), ("replaced", &self.replaced), ("removed", &self.removed), ("updated", &self.updated)] {
            if !paths.is_empty() {
                parts.push(format!("{what} {}", paths.join(", ")));
            }
        }
        parts.push(format!("{} kept", self.kept.len()));
        for (path, why) in &self.failed {
            parts.push(format!("failed {path}: {}", why.lines().next().unwrap_or("")));
        }
        f.write_str(&parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::supervisor::{Restart, Shutdown, Strategy};
    use crate::PoolSpec;

    fn pool(id: &str, workers: usize) -> ChildSpec {
        ChildSpec::pool(id, PoolSpec::script("w.py").workers(workers))
    }

    fn names(p: &Plan) -> Vec<String> {
        p.steps
            .iter()
            .map(|s| match s {
                Step::Add(c) => format!("add {}", c.id),
                Step::Replace(c) => format!("replace {}", c.id),
                Step::Restart(c) => format!("restart {}", c.id),
                Step::Keep { spec, changed } => format!("keep {}{}", spec.id, if *changed { " (changed)" } else { "" }),
                Step::Recurse(c) => format!("reload {}", c.id),
            })
            .collect()
    }

    fn sup(children: Vec<ChildSpec>) -> SupervisorSpec {
        children.into_iter().fold(SupervisorSpec::new("root", Strategy::OneForOne), SupervisorSpec::child)
    }

    #[test]
    fn added_removed_replaced_and_kept_children_are_told_apart() {
        let old = sup(vec![pool("a", 1), pool("b", 1), pool("c", 1)]);
        let new = sup(vec![pool("a", 1), pool("b", 2), pool("d", 1)]);
        let p = plan(&old, &new);
        assert_eq!(p.remove, vec!["c"]);
        assert_eq!(names(&p), vec!["keep a", "replace b", "add d"]);
    }

    #[test]
    fn removals_go_in_reverse_start_order() {
        let old = sup(vec![pool("a", 1), pool("b", 1), pool("c", 1)]);
        assert_eq!(plan(&old, &sup(vec![pool("b", 1)])).remove, vec!["c", "a"]);
    }

    #[test]
    fn a_new_restart_type_or_shutdown_updates_in_place() {
        let old = sup(vec![pool("a", 1), pool("b", 1)]);
        let new = sup(vec![
            pool("a", 1).restart(Restart::Transient),
            pool("b", 1).shutdown(Shutdown::Timeout(Duration::from_secs(3))),
        ]);
        assert_eq!(names(&plan(&old, &new)), vec!["keep a (changed)", "keep b (changed)"]);
    }

    #[test]
    fn nested_supervisors_are_reloaded_and_a_changed_kind_restarts() {
        let old = sup(vec![ChildSpec::supervisor("etl", sup(vec![pool("x", 1)])), pool("p", 1)]);
        let new = sup(vec![ChildSpec::supervisor("etl", sup(vec![pool("x", 2)])), ChildSpec::supervisor("p", sup(vec![]))]);
        assert_eq!(names(&plan(&old, &new)), vec!["reload etl", "restart p"]);
    }

    #[test]
    fn the_event_handler_does_not_count_as_a_change() {
        let old = sup(vec![ChildSpec::pool("a", PoolSpec::script("w.py").on_event(|_| {}))]);
        let new = sup(vec![ChildSpec::pool("a", PoolSpec::script("w.py").on_event(|_| {}))]);
        assert_eq!(names(&plan(&old, &new)), vec!["keep a"]);
    }

    #[test]
    fn the_report_is_one_line() {
        let r = ReloadReport {
            added: vec!["d".into()],
            removed: vec!["c".into()],
            replaced: vec!["b".into()],
            kept: vec!["a".into(), "e".into()],
            failed: vec![("f".into(), "no such script\nmore".into())],
            ..ReloadReport::default()
        };
        assert_eq!(r.to_string(), "added d; replaced b; removed c; 2 kept; failed f: no such script");
        assert!(!r.is_complete());
    }
}

//! `pyvisor node [NODE FLAGS] [--serve POOL]... TREE.toml` (feature `cluster`): runs the tree
//! exactly as `pyvisor run` does, as a node of a cluster that serves the tree's pools to the
//! other nodes (docs/cluster.md, "Running nodes").
//!
//! Before anything starts: the pools to serve are checked against the tree file (an unknown
//! `--serve` is an error) and the node starts listening and dialing its seeds. Once the tree has
//! started: each pool is served under its id, looked up in the tree by path at each call (so
//! calls follow it when its supervisor restarts it), and `ready NAME` is printed once every seed
//! has been reached (a seed that refuses the session before that stops the run). After a
//! reload (SIGHUP) the served set follows the file: pools it adds are served, pools it removes
//! stop being served (with `--serve`, the names must still be in the file, else the served set
//! is kept and the reason printed). On SIGTERM or Ctrl-C: serving stops, the tree shuts down,
//! then the node.
//!
//! Owns the command's arguments and that [`Extension`] of the run. Not the run itself (`run`),
//! not the node's flags or its seeds (`pyvisor_cluster::NodeArgs`, `Seeds`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use pyvisor_cluster::{Node, NodeArgs, Seeds, Served};
use pyvisor_core::supervisor::{ChildKind, SupervisorSpec, Tree};
use pyvisor_core::Interpreter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::run::{self, Extension};

/// `pyvisor node`'s arguments.
#[derive(clap::Args)]
pub struct NodeCmd {
    #[command(flatten)]
    node: NodeArgs,
    /// Serve only this pool of the tree (repeatable): its id, or its path for a pool of a nested
    /// supervisor (`etl/loader`). Default: every pool of the tree. A pool is served under its id.
    #[arg(long, value_name = "POOL")]
    serve: Vec<String>,
    /// Serve /healthz, /readyz, /status and /metrics on PORT (127.0.0.1) or IP:PORT, as
    /// `pyvisor run --http` does.
    #[arg(long, value_name = "[IP:]PORT", value_parser = pyvisor_cli::http::parse_addr)]
    http: Option<SocketAddr>,
    /// Serve `pyvisor status` on this Unix socket instead of the default path.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The tree file (see docs/supervision.md and examples/tree.toml).
    tree: PathBuf,
}

/// Run `pyvisor node`.
pub async fn run(interpreter: Interpreter, cmd: NodeCmd) -> ExitCode {
    let ext = Cluster { file: cmd.tree.clone(), args: cmd.node, serve: cmd.serve, running: None };
    run::run_with(interpreter, cmd.tree, cmd.http, cmd.control, ext).await
}

/// The node beside the tree.
struct Cluster {
    file: PathBuf,
    args: NodeArgs,
    serve: Vec<String>,
    running: Option<Running>,
}

/// What runs once the node has started.
struct Running {
    node: Node,
    seeds: Option<Seeds>,
    /// The pools to serve: served name → path in the tree.
    pools: BTreeMap<String, String>,
    served: Vec<Served>,
    /// Says `ready` once the seeds are reached, or reports a seed's refusal on `failed`.
    ready: Option<JoinHandle<()>>,
    failed: mpsc::UnboundedReceiver<String>,
    failed_tx: mpsc::UnboundedSender<String>,
}

impl Extension for Cluster {
    async fn before_start(&mut self, spec: &SupervisorSpec) -> Result<(), String> {
        let pools = pools_to_serve(spec, &self.file, &self.serve)?;
        let (node, seeds) = self.args.start().await.map_err(|e| e.to_string())?;
        println!("node {} listening on {}", node.name(), node.listen_addr());
        let (failed_tx, failed) = mpsc::unbounded_channel();
        self.running = Some(Running { node, seeds: Some(seeds), pools, served: Vec::new(), ready: None, failed, failed_tx });
        Ok(())
    }

    async fn started(&mut self, tree: &Tree) -> Result<(), String> {
        let Some(r) = &mut self.running else { return Ok(()) };
        for (name, path) in &r.pools {
            let (tree, path) = (tree.clone(), path.clone());
            let served = r.node.serve_with(name, move || tree.pool(&path)).await.map_err(|e| e.to_string())?;
            r.served.push(served);
        }
        println!("node {} serves {}", r.node.name(), served_list(&r.pools));
        if let Some(seeds) = &r.seeds {
            let reached = seeds.reached_or_refused();
            let (name, failed) = (r.node.name().to_string(), r.failed_tx.clone());
            r.ready = Some(tokio::spawn(async move {
                match reached.await {
                    Ok(()) => println!("ready {name}"),
                    Err(e) => {
                        let _ = failed.send(format!("cannot join the cluster: {e}"));
                    }
                }
            }));
        }
        Ok(())
    }

    async fn reloaded(&mut self, spec: &SupervisorSpec, tree: &Tree) {
        let Some(r) = &mut self.running else { return };
        let wanted = match pools_to_serve(spec, &self.file, &self.serve) {
            Ok(pools) => pools,
            Err(e) => {
                eprintln!("reload: the pools served to the cluster are kept as they were: {e}");
                return;
            }
        };
        if wanted == r.pools {
            return;
        }
        // Those no longer wanted (or now at another path) stop being served: callers elsewhere
        // see the member leave and route to other nodes.
        let before = std::mem::take(&mut r.pools);
        r.served.retain(|s| wanted.get(s.pool()) == before.get(s.pool()));
        for (name, path) in &wanted {
            if before.get(name) == Some(path) {
                r.pools.insert(name.clone(), path.clone());
                continue;
            }
            let (t, p) = (tree.clone(), path.clone());
            match r.node.serve_with(name, move || t.pool(&p)).await {
                Ok(served) => {
                    r.served.push(served);
                    r.pools.insert(name.clone(), path.clone());
                }
                Err(e) => eprintln!("reload: pool `{name}` is not served to the cluster: {e}"),
            }
        }
        println!("node {} serves {}", r.node.name(), served_list(&r.pools));
    }

    async fn failed(&mut self) -> String {
        match &mut self.running {
            // The sender is kept in `Running`: `recv` never ends with `None` while it runs.
            Some(r) => match r.failed.recv().await {
                Some(why) => why,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    async fn stopping(&mut self) {
        if let Some(r) = &mut self.running {
            if let Some(ready) = r.ready.take() {
                ready.abort();
            }
            // No call reaches the tree from the cluster any more; no seed is dialed again.
            r.served.clear();
            r.seeds = None;
        }
    }

    async fn stopped(&mut self) {
        if let Some(r) = self.running.take() {
            r.node.shutdown().await;
        }
    }
}

/// The served pools' names, for a line of output.
fn served_list(pools: &BTreeMap<String, String>) -> String {
    if pools.is_empty() {
        "no pool".to_string()
    } else {
        pools.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
    }
}

/// The pools to serve, by served name (the pool's id) → path in the tree: those named with
/// `--serve`, else every pool of the tree file.
fn pools_to_serve(spec: &SupervisorSpec, file: &Path, wanted: &[String]) -> Result<BTreeMap<String, String>, String> {
    let all = pool_paths(spec);
    let chosen: Vec<String> = if wanted.is_empty() {
        all.clone()
    } else {
        let mut chosen = Vec::new();
        for w in wanted {
            // A path, or the id of exactly one pool.
            let by_id: Vec<&String> = all.iter().filter(|p| id_of(p) == w).collect();
            let path = if all.contains(w) {
                w.clone()
            } else if let [one] = by_id.as_slice() {
                (*one).clone()
            } else if by_id.is_empty() {
                return Err(format!("--serve {w}: the tree {} has no pool `{w}` (its pools: {})", file.display(), list(&all)));
            } else {
                return Err(format!(
                    "--serve {w}: several pools of the tree have that id ({}): give the path",
                    list(&by_id.into_iter().cloned().collect::<Vec<_>>())
                ));
            };
            if !chosen.contains(&path) {
                chosen.push(path);
            }
        }
        chosen
    };
    let mut pools: BTreeMap<String, String> = BTreeMap::new();
    for path in chosen {
        let name = id_of(&path).to_string();
        if let Some(other) = pools.get(&name) {
            return Err(format!("pools `{other}` and `{path}` would both be served as `{name}`: choose one with --serve"));
        }
        pools.insert(name, path);
    }
    Ok(pools)
}

fn list(paths: &[String]) -> String {
    if paths.is_empty() {
        "none".to_string()
    } else {
        paths.join(", ")
    }
}

/// A pool's id: the last part of its path.
fn id_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The paths of every pool of a tree file (`id`, `sup/id` for a nested one), in file order.
/// Only the `pool`, `supervisor` and `children` keys are read here; the tree's own parse
/// (`tree_file`, before this) checks everything else.
/// The paths of the tree's pools (`etl/loader` for a pool of a nested supervisor), in order.
fn pool_paths(spec: &SupervisorSpec) -> Vec<String> {
    fn walk(spec: &SupervisorSpec, prefix: &str, out: &mut Vec<String>) {
        for child in spec.children() {
            match child.kind() {
                ChildKind::Pool(_) => out.push(format!("{prefix}{}", child.id())),
                ChildKind::Supervisor(nested) => walk(nested, &format!("{prefix}{}/", child.id()), out),
                ChildKind::Actor(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(spec, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use pyvisor_core::supervisor::{ChildSpec, Strategy};
    use pyvisor_core::PoolSpec;

    use super::*;

    /// `ml`, and `etl` with `loader` and another `ml`.
    fn tree() -> SupervisorSpec {
        let etl = SupervisorSpec::new("etl", Strategy::OneForOne)
            .child(ChildSpec::pool("loader", PoolSpec::script("etl.py")))
            .child(ChildSpec::pool("ml", PoolSpec::script("ml2.py")));
        SupervisorSpec::new("root", Strategy::OneForOne).child(ChildSpec::pool("ml", PoolSpec::script("ml.py"))).child(ChildSpec::supervisor("etl", etl))
    }

    #[test]
    fn every_pool_of_the_tree_by_path() {
        assert_eq!(pool_paths(&tree()), vec!["ml", "etl/loader", "etl/ml"]);
    }

    #[test]
    fn serve_names_are_ids_or_paths_and_unknown_or_clashing_ones_are_errors() {
        let (spec, f) = (tree(), Path::new("tree.toml"));
        let served = |w: &[&str]| pools_to_serve(&spec, f, &w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(served(&["loader"]).expect("by id"), BTreeMap::from([("loader".to_string(), "etl/loader".to_string())]));
        assert_eq!(served(&["etl/ml", "loader"]).expect("by path").get("ml").map(String::as_str), Some("etl/ml"));
        let unknown = served(&["nope"]).expect_err("unknown");
        assert!(unknown.contains("no pool `nope`") && unknown.contains("ml, etl/loader, etl/ml"), "{unknown}");
        // `ml` is both `ml` (a path) and the id of `etl/ml`: the path wins.
        assert_eq!(served(&["ml"]).expect("a path").get("ml").map(String::as_str), Some("ml"));
        // Every pool: two would be served under one name.
        let clash = served(&[]).expect_err("two pools named ml");
        assert!(clash.contains("`ml` and `etl/ml`"), "{clash}");
    }
}

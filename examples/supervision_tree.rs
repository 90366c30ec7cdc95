//! A supervision tree declared in code:
//!
//! ```text
//! root (one_for_one)
//! ├── ml        pool, 2 workers   (workers/quickstart.py)
//! └── etl       supervisor (rest_for_one)
//!     ├── loader    pool, 1 worker (workers/etl.py)
//!     └── reporter  a user actor that depends on the loader
//! ```
//!
//! Run: `PYVISOR_PYTHON=.venv/bin/python cargo run --example supervision_tree` (after `make demo`).

use std::time::Duration;

use pyvisor::ractor::{Actor, ActorProcessingErr, ActorRef};
use pyvisor::supervisor::{ChildSpec, ChildState, Strategy, SupervisorSpec, Tree};
use pyvisor::PoolSpec;

/// A user actor living in the tree next to the pool it depends on.
struct Reporter;

impl Actor for Reporter {
    type Msg = ();
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        println!("reporter started");
        Ok(())
    }
    async fn post_stop(&self, _: ActorRef<()>, _: &mut ()) -> Result<(), ActorProcessingErr> {
        println!("reporter stopped");
        Ok(())
    }
}

fn script(name: &str) -> String {
    format!("{}/examples/workers/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = pyvisor::telemetry::init();
    let spec = SupervisorSpec::new("root", Strategy::OneForOne)
        .intensity(3, Duration::from_secs(5))
        .child(ChildSpec::pool("ml", PoolSpec::script(script("quickstart.py")).workers(2)))
        .child(ChildSpec::supervisor(
            "etl",
            SupervisorSpec::new("etl", Strategy::RestForOne)
                .child(ChildSpec::pool("loader", PoolSpec::script(script("etl.py")).workers(1)))
                .child(ChildSpec::actor("reporter", |sup| {
                    Box::pin(async move {
                        let (a, _) = Actor::spawn_linked(None, Reporter, (), sup).await.map_err(|e| e.to_string())?;
                        Ok(a.get_cell())
                    })
                })),
        ));
    let tree = Tree::start(spec).await?;

    let ml = tree.pool("ml").ok_or("no ml pool")?;
    let loader = tree.pool("etl/loader").ok_or("no etl/loader pool")?;
    let score: serde_json::Value = ml.call("predict", &serde_json::json!({"id": 1, "values": [1, 2, 3]})).await?;
    println!("ml/predict -> {score}");
    let loaded: serde_json::Value = loader.call("load", &vec!["  Alpha", "", "BETA "]).await?;
    println!("etl/loader/load -> {loaded}");

    // Kill the loader's worker: the pool replaces it at once (a crash, not a supervisor restart).
    let pid = loader.status().await.workers[0].pid.ok_or("no pid")?;
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let w = &loader.status().await.workers[0];
    println!("loader worker {pid} killed; replaced by pid {:?} ({}, restarts {})", w.pid, w.state, w.restarts);

    for (path, tree) in [("root", tree.clone()), ("etl", tree.subtree("etl").ok_or("no etl")?)] {
        for c in tree.children().await? {
            let state = match c.state {
                ChildState::Running => "running".to_string(),
                other => format!("{other:?}"),
            };
            println!("{path}: {} ({}) {state}, restarts {}", c.path, c.kind, c.restarts);
        }
    }
    tree.shutdown().await; // reverse order: etl (reporter, loader), then ml
    println!("tree shut down");
    Ok(())
}

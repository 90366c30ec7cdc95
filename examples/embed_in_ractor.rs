//! Embedding: a pyvisor tree spawned linked under the user's own ractor actor, which receives
//! ordinary `SupervisionEvent`s for it and restarts it itself.
//!
//! Run: `PYVISOR_PYTHON=.venv/bin/python cargo run --example embed_in_ractor` (after `make demo`).

use std::time::Duration;

use pyvisor::ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use pyvisor::supervisor::{ChildSpec, Strategy, SupervisorSpec, Tree};
use pyvisor::PoolSpec;

/// The user's application actor. It owns a pyvisor tree as a linked child.
struct App;

struct AppState {
    tree: Tree,
    restarts: u32,
}

enum AppMsg {
    Predict(f64, RpcReplyPort<Result<f64, String>>),
}

// With pyvisor's `cluster` feature ractor has no blanket `Message` impl: this gives one then
// (and nothing otherwise; docs/cluster.md).
pyvisor::local_message!(AppMsg);

fn tree_spec() -> SupervisorSpec {
    let script = format!("{}/examples/workers/quickstart.py", env!("CARGO_MANIFEST_DIR"));
    SupervisorSpec::new("models", Strategy::OneForOne)
        .child(ChildSpec::pool("scorer", PoolSpec::script(script).workers(2)))
}

impl Actor for App {
    type Msg = AppMsg;
    type State = AppState;
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<AppMsg>, _: ()) -> Result<AppState, ActorProcessingErr> {
        let tree = Tree::start_linked(tree_spec(), myself.get_cell()).await?;
        Ok(AppState { tree, restarts: 0 })
    }

    async fn handle(&self, _: ActorRef<AppMsg>, msg: AppMsg, st: &mut AppState) -> Result<(), ActorProcessingErr> {
        match msg {
            AppMsg::Predict(x, reply) => {
                let pool = st.tree.pool("scorer").ok_or("scorer is restarting")?;
                let r: Result<serde_json::Value, _> = pool.call("predict", &serde_json::json!({"values": [x]})).await;
                let _ = reply.send(r.map(|v| v["score"].as_f64().unwrap_or(f64::NAN)).map_err(|e| e.to_string()));
            }
        }
        Ok(())
    }

    // Ordinary supervision events: this actor decides what a failed tree means for it.
    async fn handle_supervisor_evt(&self, myself: ActorRef<AppMsg>, evt: SupervisionEvent, st: &mut AppState) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, reason) = evt {
            if cell.get_id() == st.tree.actor().get_id() {
                println!("app: the model tree failed ({reason}); restarting it");
                st.restarts += 1;
                st.tree = Tree::start_linked(tree_spec(), myself.get_cell()).await?;
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _: ActorRef<AppMsg>, st: &mut AppState) -> Result<(), ActorProcessingErr> {
        st.tree.shutdown().await;
        println!("app: tree shut down (restarted it {} times)", st.restarts);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = pyvisor::telemetry::init();
    let (app, handle) = Actor::spawn(None, App, ()).await?;
    for x in [1.0, 2.5, 4.0] {
        let score = pyvisor::ractor::call_t!(app, AppMsg::Predict, 10_000, x)?;
        println!("app: predict({x}) = {score:?}");
    }
    app.stop(None);
    tokio::time::timeout(Duration::from_secs(30), handle).await??;
    println!("app stopped; no Python process is left");
    Ok(())
}

//! A pyvisor node as a process, with pools given on the command line (`pyvisor node` runs a
//! tree file instead; both take the same node flags, `NodeArgs`): listens, keeps its seeds
//! connected (`--join`, dialed again whenever a session ends), starts pools and serves them to
//! the cluster, and runs until SIGTERM or Ctrl-C. Prints `ready NAME` on stdout once its pools
//! are served and every seed has been reached once (what tests and scripts wait for); a seed
//! down at start is waited for, but one that refuses the session (another cookie) or fails the
//! TLS handshake before that is an error: the node says so on stderr and exits with 1.
//!
//! ```text
//! pyvisor-cluster-node --name b --listen 127.0.0.1:7401 --cookie-file cookie \
//!     --join 127.0.0.1:7400 --pool work=worker.py --workers 2
//! ```

use std::path::PathBuf;

use clap::Parser;
use pyvisor_cluster::NodeArgs;
use pyvisor_core::{Pool, PoolSpec};

#[derive(Parser)]
#[command(about = "Run a pyvisor node: serve pools to the cluster")]
struct Args {
    #[command(flatten)]
    node: NodeArgs,
    /// A pool to start and serve: NAME=SCRIPT (repeatable).
    #[arg(long)]
    pool: Vec<String>,
    /// An environment variable for the pools' workers: KEY=VALUE (repeatable).
    #[arg(long)]
    env: Vec<String>,
    /// Workers per pool.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// The Python interpreter (with pyvisor_worker installed).
    #[arg(long, env = "PYVISOR_PYTHON", default_value = "python3")]
    python: PathBuf,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // Logs on stderr (`PYVISOR_LOG`, else `RUST_LOG`, else info; ractor's per-actor spans held
    // back) and, with `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans and metrics over OTLP: the calls
    // this node serves, under the callers' remote call spans (the trace context crosses).
    let telemetry = pyvisor_core::telemetry::init();
    let outcome = run(args).await;
    // Flush and stop the exporters on a thread of their own (the HTTP exporter's flush blocks)
    // before the runtime ends: the spans of the last calls are exported, not lost.
    telemetry.shutdown().await;
    if let Err(e) = outcome {
        eprintln!("pyvisor-cluster-node: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Listened to from the start: a SIGTERM while pools start or seeds are awaited stops the
    // node in order.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let (node, seeds) = args.node.start().await?;
    let mut pools = Vec::new();
    let outcome = serve(&args, &node, &mut pools, &mut term, seeds).await;
    for pool in pools {
        pool.shutdown().await;
    }
    node.shutdown().await;
    outcome
}

/// Start and serve the pools, say `ready` once every seed has been reached, then wait for a
/// stop signal. The pools started are left in `pools` (stopped by the caller, also on error).
async fn serve(
    args: &Args,
    node: &pyvisor_cluster::Node,
    pools: &mut Vec<Pool>,
    term: &mut Option<tokio::signal::unix::Signal>,
    seeds: pyvisor_cluster::Seeds,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut served = Vec::new();
    for p in &args.pool {
        let (name, script) = p.split_once('=').ok_or_else(|| format!("--pool wants NAME=SCRIPT, got {p:?}"))?;
        let mut spec = PoolSpec::script(script).name(name).python(&args.python).workers(args.workers).env("PYVISOR_NODE", &args.node.name);
        for kv in &args.env {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("--env wants KEY=VALUE, got {kv:?}"))?;
            spec = spec.env(k, v);
        }
        let pool = Pool::start(spec).await?;
        pools.push(pool.clone());
        served.push(node.serve(pool).await?);
    }
    tokio::select! {
        reached = seeds.reached_or_refused() => {
            reached?;
            println!("ready {}", node.name());
        }
        () = stop_signal(term) => return Ok(()),
    }
    stop_signal(term).await;
    // Stop serving before the pools stop; the seeds stop being dialed.
    drop(served);
    drop(seeds);
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn stop_signal(term: &mut Option<tokio::signal::unix::Signal>) {
    match term {
        Some(term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

//! A pyvisor node as a process: listens, connects to seed nodes, starts pools and serves them
//! to the cluster, and runs until SIGTERM or Ctrl-C. Prints `ready NAME` on stdout once its
//! pools are served and its seeds connected (what tests and scripts wait for).
//!
//! Interim: `pyvisor node` in the CLI (with a tree file) is not built yet (docs/cluster.md).
//!
//! ```text
//! pyvisor-cluster-node --name b --listen 127.0.0.1:7401 --cookie-file cookie \
//!     --join 127.0.0.1:7400 --pool work=worker.py --workers 2
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use pyvisor_cluster::{HeartbeatPolicy, Node, NodeConfig};
use pyvisor_core::{Pool, PoolSpec};

#[derive(Parser)]
#[command(about = "Run a pyvisor node: serve pools to the cluster")]
struct Args {
    /// The node's name (unique in the cluster).
    #[arg(long)]
    name: String,
    /// Where to listen (ip:port).
    #[arg(long)]
    listen: SocketAddr,
    /// A file whose first line is the cluster's cookie.
    #[arg(long)]
    cookie_file: PathBuf,
    /// A node to connect to (repeatable).
    #[arg(long)]
    join: Vec<SocketAddr>,
    /// A pool to start and serve: NAME=SCRIPT (repeatable).
    #[arg(long)]
    pool: Vec<String>,
    /// An environment variable for the pools' workers: KEY=VALUE (repeatable).
    #[arg(long)]
    env: Vec<String>,
    /// Ping every peer this often (milliseconds) ...
    #[arg(long, default_value_t = 500)]
    heartbeat_ms: u64,
    /// ... and give up a peer after this many misses in a row.
    #[arg(long, default_value_t = 4)]
    heartbeat_misses: u32,
    /// Workers per pool.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// The Python interpreter (with pyvisor_worker installed).
    #[arg(long, env = "PYVISOR_PYTHON", default_value = "python3")]
    python: PathBuf,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("pyvisor-cluster-node: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let cookie = NodeConfig::cookie_from_file(&args.cookie_file)?;
    let heartbeat = HeartbeatPolicy::new(Duration::from_millis(args.heartbeat_ms), args.heartbeat_misses);
    let node = Node::start(NodeConfig::new(&args.name, args.listen, &cookie)?.heartbeat(heartbeat)).await?;
    let mut served = Vec::new();
    let mut pools = Vec::new();
    for p in &args.pool {
        let (name, script) = p.split_once('=').ok_or_else(|| format!("--pool wants NAME=SCRIPT, got {p:?}"))?;
        let mut spec = PoolSpec::script(script).name(name).python(&args.python).workers(args.workers).env("PYVISOR_NODE", &args.name);
        for kv in &args.env {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("--env wants KEY=VALUE, got {kv:?}"))?;
            spec = spec.env(k, v);
        }
        let pool = Pool::start(spec).await?;
        served.push(node.serve(pool.clone()).await?);
        pools.push(pool);
    }
    for seed in &args.join {
        node.connect(*seed, Duration::from_secs(30)).await?;
    }
    println!("ready {}", node.name());
    wait_for_stop().await;
    drop(served);
    for pool in pools {
        pool.shutdown().await;
    }
    node.shutdown().await;
    Ok(())
}

async fn wait_for_stop() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

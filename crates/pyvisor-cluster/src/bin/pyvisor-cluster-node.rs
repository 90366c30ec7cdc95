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
use pyvisor_cluster::{HeartbeatPolicy, Node, NodeConfig, NodeTls};
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
    /// TLS between nodes (mutual): this node's certificate chain (PEM). With --tls-key and
    /// --tls-ca; every node of the cluster then needs TLS.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s) that signed every node's certificate (PEM; for a self-signed
    /// certificate, the certificate itself).
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// The name every node's certificate is valid for.
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
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
    let cookie = NodeConfig::cookie_from_file(&args.cookie_file)?;
    let heartbeat = HeartbeatPolicy::new(Duration::from_millis(args.heartbeat_ms), args.heartbeat_misses);
    let mut config = NodeConfig::new(&args.name, args.listen, &cookie)?.heartbeat(heartbeat);
    if let (Some(cert), Some(key), Some(ca)) = (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        config = config.tls(NodeTls::from_pem_files(cert, key, ca, &args.tls_server_name)?);
    }
    let node = Node::start(config).await?;
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

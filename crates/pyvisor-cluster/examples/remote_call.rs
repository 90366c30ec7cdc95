//! A node that only calls: joins the cluster and calls `FUNCTION` of pool `POOL` with a JSON
//! input every `--every-ms`, printing each outcome (and the pool's members when they change) —
//! the caller of the three-node walkthrough in docs/cluster.md.
//!
//! ```text
//! cargo run -p pyvisor-cluster --example remote_call -- --name d --listen 127.0.0.1:7403 \
//!     --cookie-file cookie --join 127.0.0.1:7400 ml predict '{"id": 1, "values": [1, 2]}'
//! ```

use std::time::Duration;

use clap::Parser;
use pyvisor_cluster::{NodeArgs, RemotePool};
use pyvisor_core::CallOptions;

#[derive(Parser)]
#[command(about = "Join a pyvisor cluster and call a pool served there")]
struct Args {
    #[command(flatten)]
    node: NodeArgs,
    /// The pool's name (its id in the serving nodes' tree files).
    pool: String,
    /// The function to call.
    function: String,
    /// Its input, as JSON.
    input: String,
    /// How many calls (0: until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Time between calls (milliseconds).
    #[arg(long, default_value_t = 500)]
    every_ms: u64,
    /// Treat the calls as idempotent (retried on another node when theirs is lost).
    #[arg(long)]
    idempotent: bool,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("remote_call: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let input: serde_json::Value = serde_json::from_str(&args.input).map_err(|e| format!("the input is not JSON: {e}"))?;
    let (node, seeds) = args.node.start().await?;
    seeds.reached().await?;
    let pool = RemotePool::new(&node, &args.pool);
    let mut members = Vec::new();
    let mut n = 0u64;
    loop {
        n += 1;
        if pool.members() != members {
            members = pool.members();
            println!("members of {}: {members:?} (tainted: {:?})", args.pool, node.tainted());
        }
        let opts = CallOptions::new().timeout(Duration::from_secs(10)).idempotent(args.idempotent);
        match pool.call_with::<_, serde_json::Value>(&args.function, &input, opts).await {
            Ok(v) => println!("#{n} ok: {v}"),
            Err(e) => println!("#{n} failed: {e}"),
        }
        if args.count != 0 && n >= args.count {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(args.every_ms)) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(seeds);
    node.shutdown().await;
    Ok(())
}

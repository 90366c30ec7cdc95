//! Quickstart: start a pool, make typed calls, get a Python exception back as a typed error,
//! shut down cleanly.
//!
//! Run with `make demo` (sets up `.venv` with the adapter), or
//! `PYVISOR_PYTHON=.venv/bin/python cargo run --example quickstart`.

use std::time::Duration;

use pyvisor::{CallError, Pool, PoolSpec};
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct Features {
    id: u32,
    values: Vec<f64>,
}

#[derive(Deserialize, Debug)]
struct Prediction {
    id: u32,
    score: f64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = pyvisor::telemetry::init();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workers/quickstart.py");
    let pool = Pool::start(
        PoolSpec::script(script)
            .name("quickstart")
            .workers(2)
            .max_in_flight(4)
            .call_timeout(Some(Duration::from_secs(10))),
    )
    .await?;
    let names: Vec<String> = pool.functions().into_iter().map(|f| f.name).collect();
    println!("pool `{}` is ready; the workers expose: {}", pool.name(), names.join(", "));

    // Typed calls, many at once: serde in, serde out.
    let calls = (0..8).map(|id| {
        let pool = pool.clone();
        async move { pool.call::<_, Prediction>("predict", &Features { id, values: vec![1.0, 2.0, f64::from(id)] }).await }
    });
    for p in futures::future::try_join_all(calls).await? {
        println!("prediction {:>2}: score {:.1}", p.id, p.score);
    }

    // A Python exception comes back as a typed error, traceback included.
    match pool.call::<_, f64>("divide", &(1, 0)).await {
        Err(CallError::Python { error, .. }) => {
            println!("divide(1, 0) raised {}: {}", error.type_name, error.message);
            if let Some(tb) = &error.traceback {
                println!("Python traceback (last line): {}", tb.trim_end().lines().last().unwrap_or(""));
            }
        }
        other => return Err(format!("expected a Python exception, got {other:?}").into()),
    }

    // Asking for a function that does not exist names the ones that do.
    if let Err(e) = pool.call::<_, ()>("predcit", &()).await {
        println!("{e}");
    }

    let status = pool.status().await;
    for w in &status.workers {
        println!("worker {} pid {} {} served {}", w.worker.map(|w| w.to_string()).unwrap_or_default(), w.pid.unwrap_or(0), w.state, w.served);
    }
    pool.shutdown().await;
    println!("pool shut down; every worker process has exited");
    Ok(())
}

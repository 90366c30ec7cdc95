//! Large payloads without copying: Rust fills a 100 MiB float64 array, Python sums it with
//! numpy over the very same pages (a sealed memfd passed out of band; docs/buffers.md).
//!
//! Run with `make demo`'s `.venv` (numpy is in the adapter's `test` extra):
//! `PYVISOR_PYTHON=.venv/bin/python cargo run --example numpy_buffers`.

use std::collections::BTreeMap;

use pyvisor::{Pool, PoolSpec, SharedBytes};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = pyvisor::telemetry::init();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workers/numpy_worker.py");
    let pool = Pool::start(PoolSpec::script(script).name("numpy").workers(1)).await?;

    // 100 MiB of float64: 0.0, 1.0, 2.0, ... copied once into a sealed memfd.
    let count = 100 * 1024 * 1024 / 8;
    let bytes: Vec<u8> = (0..count).flat_map(|i| (i as f64).to_ne_bytes()).collect();
    let array = SharedBytes::from_slice(&bytes)?;
    drop(bytes);

    let got: BTreeMap<String, rmpv::Value> = pool.call("total", &array).await?;
    let expected = (count as f64 - 1.0) * count as f64 / 2.0;
    println!("sum computed in Python: {} (expected {expected})", got["sum"]);
    println!("values: {}, read-only: {}, shares memory with the mapping: {}", got["count"], got["readonly"], got["shares_memory"]);
    println!("worker's RssAnon grew by {} KiB while summing 100 MiB", got["rss_anon_growth_kib"]);
    assert_eq!(got["sum"].as_f64(), Some(expected));
    assert_eq!(got["shares_memory"].as_bool(), Some(true), "no copy in the worker");
    let growth = got["rss_anon_growth_kib"].as_i64().unwrap_or(i64::MAX);
    assert!(growth < 10 * 1024, "RssAnon grew by {growth} KiB");

    pool.shutdown().await;
    println!("numpy example done");
    Ok(())
}

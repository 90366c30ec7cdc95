//! Streaming: a Python generator's items arrive as a `futures::Stream`, each as soon as it is
//! made, with backpressure (the worker runs ahead by at most the credit window) and
//! cancellation on drop (the generator's `finally` runs). See docs/streaming.md.
//!
//! Run with `make demo`'s `.venv`:
//! `PYVISOR_PYTHON=.venv/bin/python cargo run --example streaming`.

use futures::{StreamExt, TryStreamExt};
use pyvisor::{Pool, PoolSpec, StreamOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = pyvisor::telemetry::init();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workers/tokens.py");
    let pool = Pool::start(PoolSpec::script(script).name("tokens").workers(1)).await?;

    // Tokens one by one, as they are generated.
    let mut tokens = pool.stream::<_, String>("generate", "Once upon a time");
    let mut text = Vec::new();
    while let Some(token) = tokens.next().await {
        let token = token?;
        println!("token: {token}");
        text.push(token);
    }
    println!("generated: {}", text.join(" "));

    // A small credit window: the worker never runs more than 4 items ahead of this reader.
    // Taking 3 and dropping the stream cancels the generator (its `finally` runs in Python).
    let first: Vec<u32> = pool
        .stream_with::<_, u32>("countdown", &100, StreamOptions::new().credit(4))
        .take(3)
        .try_collect()
        .await?;
    println!("countdown, first three: {first:?}");

    pool.shutdown().await;
    println!("streaming example done");
    Ok(())
}

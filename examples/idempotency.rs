//! Idempotency keys: a non-idempotent function (a payment) called by many at once, and again
//! later, with one key — it runs once; everybody gets its result (docs/idempotency.md).
//!
//! Run with `make demo`'s `.venv`:
//! `PYVISOR_PYTHON=.venv/bin/python cargo run --example idempotency`.

use std::time::Duration;

use pyvisor::{CallError, CallOptions, IdempotencyPolicy, Pool, PoolSpec};
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct Order {
    id: u32,
    amount: u64,
}

#[derive(Deserialize, Debug, PartialEq)]
struct Receipt {
    order: u32,
    amount: u64,
    charged_by: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _telemetry = pyvisor::telemetry::init();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/workers/payments.py");
    let pool = Pool::start(
        PoolSpec::script(script)
            .name("payments")
            .workers(2)
            .max_in_flight(4)
            // Outcomes of keyed calls are kept 15 minutes (at most 100 000, 256 MiB).
            .idempotency(IdempotencyPolicy { ttl: Duration::from_secs(900), max_entries: 100_000, max_bytes: 256 << 20 }),
    )
    .await?;

    // Ten concurrent requests for the same order (a client retrying, a double click): one key.
    let order = Order { id: 42, amount: 1999 };
    let key = || CallOptions::new().idempotency_key("charge/order-42");
    let calls = (0..10).map(|_| pool.call_with::<_, Receipt>("charge", &order, key()));
    let receipts = futures::future::try_join_all(calls).await?;
    assert!(receipts.windows(2).all(|w| w[0] == w[1]), "one execution, one receipt");
    println!("10 concurrent calls, 1 charge: {:?}", receipts[0]);

    // Later, the same key: the kept receipt, without charging again.
    let again: Receipt = pool.call_with("charge", &order, key()).await?;
    assert_eq!(again, receipts[0]);
    println!("called again with the key: the same receipt, nothing ran");

    // The key with another payload is refused: one key names one execution.
    match pool.call_with::<_, Receipt>("charge", &Order { id: 42, amount: 1 }, key()).await {
        Err(e @ CallError::IdempotencyKeyConflict { .. }) => println!("another payload with the key: {e}"),
        other => return Err(format!("expected a conflict, got {other:?}").into()),
    }

    // A Python exception is an outcome too (the function ran): kept and returned again.
    for _ in 0..2 {
        match pool.call_with::<_, Receipt>("refund", &order, CallOptions::new().idempotency_key("refund/order-42")).await {
            Err(CallError::Python { error, .. }) => println!("refund raised {}: {}", error.type_name, error.message),
            other => return Err(format!("expected a Python exception, got {other:?}").into()),
        }
    }

    pool.shutdown().await;
    println!("idempotency example done");
    Ok(())
}

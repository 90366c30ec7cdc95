//! `pyvisor chaos`: load through a pool while killing random workers; reports what the crash
//! barrier saved and how fast the pool recovered. A pool that fails ends the run at once, with
//! a non-zero exit and the pool's reason (see [`Halt`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use pyvisor_core::{Interpreter, Pool, PoolEvent};

use crate::bench::{run_load, Halt};
use crate::value;

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Worker script.
    #[arg(long)]
    script: PathBuf,
    /// Function to call (should echo its argument; expose it idempotent to see retries).
    #[arg(long)]
    function: String,
    /// Argument as JSON.
    #[arg(long, default_value = "null")]
    payload: String,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Calls outstanding per worker.
    #[arg(long, default_value_t = 1)]
    max_in_flight: usize,
    /// Seconds of load.
    #[arg(long)]
    duration: f64,
    /// SIGKILL a random ready worker every this many milliseconds.
    #[arg(long)]
    kill_every: u64,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

use crate::value::usage_error as fail;

pub async fn run(interpreter: Interpreter, a: ChaosArgs) -> ExitCode {
    let payload = match value::payload_arg(&a.payload) {
        Ok(p) => Arc::new(p),
        Err(e) => return fail(e),
    };
    if a.workers == 0 || a.concurrency == 0 || a.max_in_flight == 0 || a.kill_every == 0 {
        return fail("--workers, --concurrency, --max-in-flight and --kill-every must be at least 1");
    }
    let duration = match Duration::try_from_secs_f64(a.duration) {
        Ok(d) if !d.is_zero() => d,
        _ => return fail("--duration must be a positive number of seconds"),
    };
    const POOL: &str = "chaos";
    let halt = Halt::default();
    let on_failure = halt.clone();
    let spec = crate::spec_for(&interpreter, a.script.clone())
        .name(POOL)
        .workers(a.workers)
        .max_in_flight(a.max_in_flight)
        .max_queue(a.concurrency.max(1024))
        .on_event(move |e| {
            if let PoolEvent::WorkerReady { worker, pid, .. } = e {
                eprintln!("worker {worker} pid {pid}");
            }
            on_failure.on_event(POOL, e);
        });
    let pool = match Pool::start(spec).await {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let started = Instant::now();
    let stop_at = started + duration;
    let load = {
        let (pool, payload, function, halt) = (pool.clone(), Arc::clone(&payload), a.function.clone(), halt.clone());
        let concurrency = a.concurrency;
        tokio::spawn(async move {
            let (issued, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            run_load(&pool, &function, &payload, concurrency, None, Some(stop_at), &issued, &done, &halt).await
        })
    };
    let chaos = pool.chaos();
    let mut kills = 0u64;
    let mut last_kill = None;
    let mut tick = tokio::time::interval(Duration::from_millis(a.kill_every));
    tick.tick().await;
    // Until the duration ends, or the load does (the pool failed).
    while Instant::now() < stop_at && !load.is_finished() {
        tick.tick().await;
        if Instant::now() >= stop_at || halt.reason().is_some() {
            break;
        }
        if chaos.kill(None).is_some() {
            kills += 1;
            last_kill = Some(Instant::now());
        }
    }
    let tally = match load.await {
        Ok(t) => t,
        Err(e) => return fail(format!("the load failed: {e}")),
    };
    // Time from the last kill until every position has a ready worker again (never, once the
    // pool has failed).
    let mut full_strength_ms = None;
    let recover_deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < recover_deadline && halt.reason().is_none() {
        if pool.status().await.ready() >= a.workers {
            full_strength_ms = Some(last_kill.map_or(0.0, |k| k.elapsed().as_secs_f64() * 1000.0));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = pool.status().await;
    let restarts: u64 = status.workers.iter().map(|w| u64::from(w.restarts)).sum();
    let elapsed = started.elapsed();
    pool.shutdown().await;
    let errors: BTreeMap<String, u64> = tally.errors.clone();
    let calls = tally.calls();
    if a.json {
        let obj = serde_json::json!({
            "calls": calls,
            "ok": tally.ok,
            "retried": status.retried,
            "errors": errors,
            "kills": kills,
            "restarts": restarts,
            "crashes": status.crashes,
            "poisoned": status.poisoned,
            "time_to_full_strength_ms": full_strength_ms,
            "p50_us": if calls == 0 { 0 } else { tally.hist.value_at_quantile(0.5) },
            "p99_us": if calls == 0 { 0 } else { tally.hist.value_at_quantile(0.99) },
            "throughput": calls as f64 / elapsed.as_secs_f64().max(1e-9),
            "workers": a.workers,
            "concurrency": a.concurrency,
            "elapsed_s": elapsed.as_secs_f64(),
            "pool_failed": halt.reason(),
        });
        println!("{obj}");
    } else {
        println!("calls       {calls}");
        println!("ok          {}", tally.ok);
        println!("retried     {}", status.retried);
        for (k, v) in &errors {
            println!("failed      {k}: {v}");
        }
        println!("kills       {kills}");
        println!("restarts    {restarts}");
        match full_strength_ms {
            Some(ms) => println!("full strength {ms:.0} ms after the last kill"),
            None if halt.reason().is_some() => println!("full strength NOT reached: the pool failed"),
            None => println!("full strength NOT reached within 60 s of the last kill"),
        }
    }
    if halt.report() {
        ExitCode::from(1)
    } else if full_strength_ms.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

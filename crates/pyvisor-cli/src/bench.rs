//! `pyvisor bench`: load through a pool, with latency percentiles, throughput and errors by kind.
//!
//! Results are checked against the payload (an echo is expected): a different value counts as
//! an error of kind `mismatch`. Invariant of the report: `calls == ok + sum(errors)`.
//!
//! A pool that fails mid-run (too many start failures) ends the run at once: every later call
//! would fail instantly. The command then exits non-zero with the pool's reason ([`Halt`]).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use pyvisor_core::{CallError, CallOptions, Interpreter, Pool, PoolEvent};

use crate::value;

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("amount").required(true).args(["calls", "duration"])))]
pub struct BenchArgs {
    /// Worker script.
    #[arg(long)]
    script: PathBuf,
    /// Function to call (should echo its argument).
    #[arg(long)]
    function: String,
    /// Argument as JSON.
    #[arg(long, default_value = "null")]
    payload: String,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Calls outstanding per worker (pipelining depth).
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Total calls to make.
    #[arg(long)]
    calls: Option<u64>,
    /// Run for this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Per-call timeout in seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Results of a load run.
pub struct Tally {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid"),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }
    /// Calls made: ok plus every error.
    pub fn calls(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }
}

/// Whether the pool failed during a run, and why: set by the first caller that gets
/// `PoolFailed` or by the pool's `PoolFailed` event, whichever comes first. Once it is set, the
/// callers stop and the command exits non-zero with the reason.
#[derive(Clone, Default)]
pub struct Halt(Arc<OnceLock<String>>);

impl Halt {
    /// Record why the pool failed (the first reason stays).
    pub fn set(&self, reason: impl Into<String>) {
        let _ = self.0.set(reason.into());
    }

    /// The reason, once the pool has failed.
    pub fn reason(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    /// For the pool's event hook: records a `PoolFailed` event of pool `pool`, worded as the
    /// calls' `PoolFailed` error is.
    pub fn on_event(&self, pool: &str, event: &PoolEvent) {
        if let PoolEvent::PoolFailed { reason } = event {
            self.set(format!("pool `{pool}` has failed: {reason}"));
        }
    }

    /// Print the reason (if the pool failed) as the command's error; returns whether it did.
    pub fn report(&self) -> bool {
        match self.reason() {
            Some(reason) => {
                eprintln!("error: {reason}");
                true
            }
            None => false,
        }
    }
}

/// `concurrency` callers call `function` with `payload` until `calls` are issued, `stop_at`, or
/// the pool fails (`halt`); a result different from the payload counts as `mismatch`.
#[allow(clippy::too_many_arguments)]
pub async fn run_load(
    pool: &Pool,
    function: &str,
    payload: &Arc<Vec<u8>>,
    concurrency: usize,
    calls: Option<u64>,
    stop_at: Option<Instant>,
    issued: &Arc<AtomicU64>,
    done: &Arc<AtomicU64>,
    halt: &Halt,
) -> Tally {
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let pool = pool.clone();
        let payload = Arc::clone(payload);
        let function = function.to_string();
        let issued = Arc::clone(issued);
        let done = Arc::clone(done);
        let halt = halt.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = Tally::new();
            loop {
                if halt.reason().is_some() {
                    break;
                }
                if let Some(limit) = calls {
                    if issued.fetch_add(1, Ordering::Relaxed) >= limit {
                        break;
                    }
                }
                if stop_at.is_some_and(|s| Instant::now() >= s) {
                    break;
                }
                let t0 = Instant::now();
                let r = pool.call_raw(&function, &payload, CallOptions::new()).await;
                let us = t0.elapsed().as_micros() as u64;
                let _ = t.hist.record(us.max(1));
                match r {
                    Ok(bytes) if value::same_value(&bytes, &payload) => t.ok += 1,
                    Ok(_) => *t.errors.entry("mismatch".into()).or_default() += 1,
                    Err(e) => {
                        *t.errors.entry(e.kind().into()).or_default() += 1;
                        if matches!(e, CallError::PoolFailed { .. }) {
                            // Every later call would fail at once: the run is over.
                            halt.set(e.to_string());
                            done.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            t
        }));
    }
    let mut total = Tally::new();
    for t in tasks {
        if let Ok(t) = t.await {
            let _ = total.hist.add(&t.hist);
            total.ok += t.ok;
            for (k, v) in t.errors {
                *total.errors.entry(k).or_default() += v;
            }
        }
    }
    total
}

use crate::value::usage_error as fail;

pub async fn run(interpreter: Interpreter, a: BenchArgs) -> ExitCode {
    let payload = match value::payload_arg(&a.payload) {
        Ok(p) => Arc::new(p),
        Err(e) => return fail(e),
    };
    if a.workers == 0 || a.concurrency == 0 || a.max_in_flight == Some(0) {
        return fail("--workers, --concurrency and --max-in-flight must be at least 1");
    }
    let duration = match a.duration {
        Some(s) => match Duration::try_from_secs_f64(s) {
            Ok(d) if !d.is_zero() => Some(d),
            _ => return fail("--duration must be a positive number of seconds"),
        },
        None => None,
    };
    let Ok(timeout) = Duration::try_from_secs_f64(a.timeout) else {
        return fail("--timeout must be a positive number of seconds");
    };
    let max_in_flight = a.max_in_flight.unwrap_or(1);
    const POOL: &str = "bench";
    let halt = Halt::default();
    let on_failure = halt.clone();
    let spec = crate::spec_for(&interpreter, a.script.clone())
        .name(POOL)
        .workers(a.workers)
        .max_in_flight(max_in_flight)
        .max_queue(a.concurrency.max(1024))
        .queue_timeout(timeout)
        .call_timeout(Some(timeout))
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

    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop_at = duration.map(|d| started + d);
    let progress = progress_bar(a.calls, duration);
    let ticker = {
        let pb = progress.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                match &pb {
                    Some(pb) if duration.is_some() => pb.set_position(started.elapsed().as_millis() as u64),
                    Some(pb) => pb.set_position(done.load(Ordering::Relaxed)),
                    None => {}
                }
            }
        })
    };

    let total = run_load(&pool, &a.function, &payload, a.concurrency, a.calls, stop_at, &issued, &done, &halt).await;
    let elapsed = started.elapsed();
    ticker.abort();
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }
    pool.shutdown().await;

    let calls = total.calls();
    let throughput = calls as f64 / elapsed.as_secs_f64().max(1e-9);
    let p = |q: f64| if calls == 0 { 0 } else { total.hist.value_at_quantile(q) };
    if a.json {
        let obj = serde_json::json!({
            "calls": calls,
            "ok": total.ok,
            "errors": total.errors,
            "p50_us": p(0.50),
            "p99_us": p(0.99),
            "max_us": if calls == 0 { 0 } else { total.hist.max() },
            "mean_us": if calls == 0 { 0.0 } else { total.hist.mean() },
            "throughput": throughput,
            "workers": a.workers,
            "concurrency": a.concurrency,
            "max_in_flight": max_in_flight,
            "elapsed_s": elapsed.as_secs_f64(),
            "pool_failed": halt.reason(),
        });
        println!("{obj}");
    } else {
        println!("calls       {calls}");
        println!("ok          {}", total.ok);
        for (k, v) in &total.errors {
            println!("error       {k}: {v}");
        }
        println!("p50         {} µs", p(0.50));
        println!("p99         {} µs", p(0.99));
        println!("throughput  {throughput:.0} calls/s");
        println!("workers {}  concurrency {}  max_in_flight {}  elapsed {:.2} s", a.workers, a.concurrency, max_in_flight, elapsed.as_secs_f64());
    }
    if halt.report() {
        ExitCode::from(1)
    } else if total.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn progress_bar(calls: Option<u64>, duration: Option<Duration>) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let (len, template) = match (calls, duration) {
        (_, Some(d)) => (d.as_millis() as u64, "{spinner} {elapsed_precise} [{bar:40}] {percent}% of the duration"),
        (Some(n), None) => (n, "{spinner} {elapsed_precise} [{bar:40}] {pos}/{len} calls ({per_sec})"),
        (None, None) => return None,
    };
    let pb = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    Some(pb)
}

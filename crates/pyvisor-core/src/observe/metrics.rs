//! Metrics through OpenTelemetry: calls by outcome, call latency, retries, queue depth, calls in
//! flight, workers by state, restarts, recycles and crashes by cause, worker memory.
//!
//! Instruments are created once, when telemetry starts exporting; until then every recording
//! is one relaxed atomic load (nothing is built). Gauges are observed from the live pools.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::KeyValue;

use crate::shared::PoolShared;
use crate::status::WorkerState;

static ENABLED: AtomicBool = AtomicBool::new(false);
static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
static POOLS: Mutex<Vec<Weak<PoolShared>>> = Mutex::new(Vec::new());
/// Observable instruments report only while their handles live.
static GAUGES: OnceLock<Vec<opentelemetry::metrics::ObservableGauge<u64>>> = OnceLock::new();

struct Instruments {
    calls: Counter<u64>,
    duration: Histogram<f64>,
    retries: Counter<u64>,
    restarts: Counter<u64>,
    recycles: Counter<u64>,
    crashes: Counter<u64>,
}

fn pools() -> Vec<Arc<PoolShared>> {
    let Ok(mut p) = POOLS.lock() else { return Vec::new() };
    p.retain(|w| w.strong_count() > 0);
    p.iter().filter_map(Weak::upgrade).collect()
}

/// Make a pool's gauges observable.
pub(crate) fn register_pool(shared: &Arc<PoolShared>) {
    if let Ok(mut p) = POOLS.lock() {
        p.retain(|w| w.strong_count() > 0);
        p.push(Arc::downgrade(shared));
    }
}

/// Start recording (called once the meter provider is installed: by the OTLP set-up, which
/// only the `otlp` feature compiles in).
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
pub(crate) fn enable() {
    let meter = opentelemetry::global::meter("pyvisor");
    let _ = INSTRUMENTS.set(Instruments {
        calls: meter.u64_counter("pyvisor.calls").with_description("Calls completed, by outcome").with_unit("{call}").build(),
        duration: meter
            .f64_histogram("pyvisor.call.duration")
            .with_description("Call latency from the caller's side, queue wait and retries included")
            .with_unit("s")
            .build(),
        retries: meter.u64_counter("pyvisor.call.retries").with_description("Attempts retried after a crash").with_unit("{attempt}").build(),
        restarts: meter.u64_counter("pyvisor.worker.restarts").with_description("Worker replacements and start retries").with_unit("{restart}").build(),
        recycles: meter.u64_counter("pyvisor.worker.recycles").with_description("Workers recycled, by reason").with_unit("{recycle}").build(),
        crashes: meter.u64_counter("pyvisor.worker.crashes").with_description("Worker deaths, by cause").with_unit("{crash}").build(),
    });
    let queue = meter
        .u64_observable_gauge("pyvisor.queue.depth")
        .with_description("Calls waiting for a free worker")
        .with_unit("{call}")
        .with_callback(|o| {
            for p in pools() {
                o.observe(p.dispatch.len() as u64, &[KeyValue::new("pyvisor.pool", p.name.to_string())]);
            }
        })
        .build();
    let in_flight = meter
        .u64_observable_gauge("pyvisor.calls.in_flight")
        .with_description("Calls outstanding on workers")
        .with_unit("{call}")
        .with_callback(|o| {
            for p in pools() {
                let n: usize = p.members().iter().map(|s| s.in_flight()).sum();
                o.observe(n as u64, &[KeyValue::new("pyvisor.pool", p.name.to_string())]);
            }
        })
        .build();
    let workers = meter
        .u64_observable_gauge("pyvisor.workers")
        .with_description("Workers by state")
        .with_unit("{worker}")
        .with_callback(|o| {
            for p in pools() {
                let members = p.members();
                for state in [WorkerState::Starting, WorkerState::Ready, WorkerState::Draining] {
                    let n = members.iter().filter(|s| s.state() == state).count();
                    o.observe(
                        n as u64,
                        &[KeyValue::new("pyvisor.pool", p.name.to_string()), KeyValue::new("pyvisor.worker.state", state.to_string())],
                    );
                }
            }
        })
        .build();
    let memory = meter
        .u64_observable_gauge("pyvisor.worker.memory")
        .with_description("Worker resident memory from its last beat")
        .with_unit("By")
        .with_callback(|o| {
            for p in pools() {
                for s in p.members() {
                    if let Some(b) = s.last_beat() {
                        o.observe(
                            b.beat.rss,
                            &[KeyValue::new("pyvisor.pool", p.name.to_string()), KeyValue::new("pyvisor.worker.id", s.id.to_string())],
                        );
                    }
                }
            }
        })
        .build();
    let _ = GAUGES.set(vec![queue, in_flight, workers, memory]);
    ENABLED.store(true, Ordering::Release);
}

fn instruments() -> Option<&'static Instruments> {
    if ENABLED.load(Ordering::Relaxed) {
        INSTRUMENTS.get()
    } else {
        None
    }
}

/// A call ended (every call: the pool name is shared, the outcome static, so the only
/// allocation is the function name's).
pub(crate) fn call_done(pool: &Arc<str>, function: &str, outcome: &'static str, seconds: f64) {
    if let Some(i) = instruments() {
        let attrs = [
            KeyValue::new("pyvisor.pool", Arc::clone(pool)),
            KeyValue::new("rpc.method", function.to_string()),
            KeyValue::new("pyvisor.outcome", outcome),
        ];
        i.calls.add(1, &attrs);
        i.duration.record(seconds, &attrs);
    }
}

pub(crate) fn retry(pool: &str, function: &str) {
    if let Some(i) = instruments() {
        i.retries.add(1, &[KeyValue::new("pyvisor.pool", pool.to_string()), KeyValue::new("rpc.method", function.to_string())]);
    }
}

pub(crate) fn restart(pool: &str, kind: &'static str) {
    if let Some(i) = instruments() {
        i.restarts.add(1, &[KeyValue::new("pyvisor.pool", pool.to_string()), KeyValue::new("pyvisor.restart.kind", kind)]);
    }
}

pub(crate) fn recycle(pool: &str, reason: &str) {
    if let Some(i) = instruments() {
        i.recycles.add(1, &[KeyValue::new("pyvisor.pool", pool.to_string()), KeyValue::new("pyvisor.recycle.reason", reason.to_string())]);
    }
}

pub(crate) fn crash(pool: &str, cause: &'static str) {
    if let Some(i) = instruments() {
        i.crashes.add(1, &[KeyValue::new("pyvisor.pool", pool.to_string()), KeyValue::new("pyvisor.death.cause", cause)]);
    }
}

//! Metrics through OpenTelemetry: calls by outcome, call latency, retries, queue depth, calls in
//! flight, workers by state, restarts, recycles and crashes by cause, worker memory, keyed calls
//! by hit, miss or coalesced.
//!
//! Instruments are created once, when telemetry starts exporting; until then every recording
//! is one relaxed atomic load (nothing is built). Gauges are observed from the live pools.
//! Every recording also goes to the plain-value totals of [`super::prometheus`] (when those are
//! enabled), which define the metrics' names, units, descriptions and attributes for both.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::KeyValue;

use super::prometheus::{
    self as plain, gauge, MetricDef, CALLS, CALL_DURATION_BUCKETS, CRASHES, DURATION, IDEMPOTENCY, IN_FLIGHT, MEMORY, QUEUE, RECYCLES,
    RESTARTS, RETRIES, WORKERS,
};

static ENABLED: AtomicBool = AtomicBool::new(false);
static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
/// Observable instruments report only while their handles live.
static GAUGES: OnceLock<Vec<opentelemetry::metrics::ObservableGauge<u64>>> = OnceLock::new();

struct Instruments {
    calls: Counter<u64>,
    duration: Histogram<f64>,
    retries: Counter<u64>,
    restarts: Counter<u64>,
    recycles: Counter<u64>,
    crashes: Counter<u64>,
    idempotency: Counter<u64>,
}

fn observable(meter: &opentelemetry::metrics::Meter, def: MetricDef) -> opentelemetry::metrics::ObservableGauge<u64> {
    meter
        .u64_observable_gauge(def.name)
        .with_description(def.description)
        .with_unit(def.unit)
        .with_callback(move |o| {
            for (labels, v) in gauge(&def) {
                let attrs: Vec<KeyValue> = def.attributes.iter().zip(labels).map(|(k, v)| KeyValue::new(*k, v)).collect();
                o.observe(v, &attrs);
            }
        })
        .build()
}

fn counter(meter: &opentelemetry::metrics::Meter, def: MetricDef) -> Counter<u64> {
    meter.u64_counter(def.name).with_description(def.description).with_unit(def.unit).build()
}

/// Start recording (called once the meter provider is installed: by the OTLP set-up, which
/// only the `otlp` feature compiles in).
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
pub(crate) fn enable() {
    let meter = opentelemetry::global::meter("pyvisor");
    let _ = INSTRUMENTS.set(Instruments {
        calls: counter(&meter, CALLS),
        duration: meter
            .f64_histogram(DURATION.name)
            .with_description(DURATION.description)
            .with_unit(DURATION.unit)
            .with_boundaries(CALL_DURATION_BUCKETS.to_vec())
            .build(),
        retries: counter(&meter, RETRIES),
        restarts: counter(&meter, RESTARTS),
        recycles: counter(&meter, RECYCLES),
        crashes: counter(&meter, CRASHES),
        idempotency: counter(&meter, IDEMPOTENCY),
    });
    let gauges = [QUEUE, IN_FLIGHT, WORKERS, MEMORY].into_iter().map(|d| observable(&meter, d)).collect();
    let _ = GAUGES.set(gauges);
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
    plain::call_done(pool, function, outcome, seconds);
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
    plain::count(&RETRIES, &[pool, function]);
    if let Some(i) = instruments() {
        i.retries.add(1, &[KeyValue::new("pyvisor.pool", pool.to_string()), KeyValue::new("rpc.method", function.to_string())]);
    }
}

pub(crate) fn restart(pool: &str, kind: &'static str) {
    plain::count(&RESTARTS, &[pool, kind]);
    if let Some(i) = instruments() {
        i.restarts.add(1, &[KeyValue::new("pyvisor.pool", pool.to_string()), KeyValue::new("pyvisor.restart.kind", kind)]);
    }
}

pub(crate) fn recycle(pool: &str, reason: &str) {
    plain::count(&RECYCLES, &[pool, reason]);
    if let Some(i) = instruments() {
        i.recycles.add(1, &[KeyValue::new("pyvisor.pool", pool.to_string()), KeyValue::new("pyvisor.recycle.reason", reason.to_string())]);
    }
}

/// A call with an idempotency key found its key: `hit`, `miss` or `coalesced`.
pub(crate) fn idempotency(pool: &str, function: &str, lookup: &'static str) {
    plain::count(&IDEMPOTENCY, &[pool, function, lookup]);
    if let Some(i) = instruments() {
        i.idempotency.add(
            1,
            &[
                KeyValue::new("pyvisor.pool", pool.to_string()),
                KeyValue::new("rpc.method", function.to_string()),
                KeyValue::new("pyvisor.idempotency", lookup),
            ],
        );
    }
}

pub(crate) fn crash(pool: &str, cause: &'static str) {
    plain::count(&CRASHES, &[pool, cause]);
    if let Some(i) = instruments() {
        i.crashes.add(1, &[KeyValue::new("pyvisor.pool", pool.to_string()), KeyValue::new("pyvisor.death.cause", cause)]);
    }
}

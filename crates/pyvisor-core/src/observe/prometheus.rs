//! Metrics as plain values, and their Prometheus text exposition.
//!
//! The same metrics as the OpenTelemetry instruments of `observe::metrics` (names, kinds,
//! units, descriptions and attributes are defined once, here: [`FAMILIES`]), kept as plain
//! totals so that a scrape works whether or not OTLP export is set up — `pyvisor run --http`
//! serves [`MetricsSnapshot::to_prometheus`] at `/metrics`, and an embedder can serve it
//! from its own endpoint.
//!
//! Counters and the latency histogram are recorded only after [`enable`] (before that, a
//! recording costs one relaxed atomic load, as with OpenTelemetry off); they count from that
//! moment. Gauges are read from the live pools when the snapshot is taken.
//!
//! Names follow OpenTelemetry's Prometheus compatibility rules: dots become underscores, the
//! unit `s` adds `_seconds` and `By` adds `_bytes` (annotation units such as `{call}` add
//! nothing), counters end in `_total`; attribute keys become labels the same way
//! (`pyvisor.pool` → `pyvisor_pool`).
//!
//! ```
//! use pyvisor_core::metrics;
//! metrics::enable();
//! let text = metrics::snapshot().to_prometheus();
//! assert!(text.contains("# TYPE pyvisor_calls_total counter"));
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use crate::shared::PoolShared;
use crate::status::WorkerState;

/// The `Content-Type` of [`MetricsSnapshot::to_prometheus`] (text exposition format 0.0.4).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the `pyvisor.call.duration` histogram's buckets, here and in the
/// OpenTelemetry export; a last bucket (`+Inf`) takes the rest.
pub const CALL_DURATION_BUCKETS: [f64; 18] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Distinct (function, outcome) series kept per pool for `pyvisor.calls` and
/// `pyvisor.call.duration`; calls beyond it are counted under the function name
/// [`OTHER_FUNCTION`] (function names come from callers, so they are bounded here).
pub const MAX_CALL_SERIES: usize = 1000;

/// The function label of calls past [`MAX_CALL_SERIES`].
pub const OTHER_FUNCTION: &str = "_other";

/// What kind of metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// A value now.
    Gauge,
    /// Observations in buckets, with their sum and count.
    Histogram,
}

/// The definition of one metric: its OpenTelemetry name, description, unit, kind and attribute
/// keys (in label order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricDef {
    /// OpenTelemetry name, e.g. `pyvisor.calls`.
    pub name: &'static str,
    /// Description (Prometheus `# HELP`).
    pub description: &'static str,
    /// UCUM unit, e.g. `s`, `By`, `{call}`.
    pub unit: &'static str,
    /// Its kind.
    pub kind: MetricKind,
    /// Its attribute keys, in order.
    pub attributes: &'static [&'static str],
}

impl MetricDef {
    /// The Prometheus name (see the module doc), e.g. `pyvisor_calls_total`.
    pub fn prometheus_name(&self) -> String {
        let mut n = sanitize(self.name, true);
        match self.unit {
            "s" => n.push_str("_seconds"),
            "By" => n.push_str("_bytes"),
            _ => {}
        }
        if self.kind == MetricKind::Counter {
            n.push_str("_total");
        }
        n
    }
}

const POOL: &str = "pyvisor.pool";

pub(crate) const CALLS: MetricDef = MetricDef {
    name: "pyvisor.calls",
    description: "Calls completed, by outcome",
    unit: "{call}",
    kind: MetricKind::Counter,
    attributes: &[POOL, "rpc.method", "pyvisor.outcome"],
};
pub(crate) const DURATION: MetricDef = MetricDef {
    name: "pyvisor.call.duration",
    description: "Call latency from the caller's side, queue wait and retries included",
    unit: "s",
    kind: MetricKind::Histogram,
    attributes: &[POOL, "rpc.method", "pyvisor.outcome"],
};
pub(crate) const RETRIES: MetricDef = MetricDef {
    name: "pyvisor.call.retries",
    description: "Attempts retried after a crash",
    unit: "{attempt}",
    kind: MetricKind::Counter,
    attributes: &[POOL, "rpc.method"],
};
pub(crate) const QUEUE: MetricDef = MetricDef {
    name: "pyvisor.queue.depth",
    description: "Calls waiting for a free worker",
    unit: "{call}",
    kind: MetricKind::Gauge,
    attributes: &[POOL],
};
pub(crate) const IN_FLIGHT: MetricDef = MetricDef {
    name: "pyvisor.calls.in_flight",
    description: "Calls outstanding on workers",
    unit: "{call}",
    kind: MetricKind::Gauge,
    attributes: &[POOL],
};
pub(crate) const WORKERS: MetricDef = MetricDef {
    name: "pyvisor.workers",
    description: "Workers by state",
    unit: "{worker}",
    kind: MetricKind::Gauge,
    attributes: &[POOL, "pyvisor.worker.state"],
};
pub(crate) const RESTARTS: MetricDef = MetricDef {
    name: "pyvisor.worker.restarts",
    description: "Worker replacements and start retries",
    unit: "{restart}",
    kind: MetricKind::Counter,
    attributes: &[POOL, "pyvisor.restart.kind"],
};
pub(crate) const RECYCLES: MetricDef = MetricDef {
    name: "pyvisor.worker.recycles",
    description: "Workers recycled, by reason",
    unit: "{recycle}",
    kind: MetricKind::Counter,
    attributes: &[POOL, "pyvisor.recycle.reason"],
};
pub(crate) const CRASHES: MetricDef = MetricDef {
    name: "pyvisor.worker.crashes",
    description: "Worker deaths, by cause",
    unit: "{crash}",
    kind: MetricKind::Counter,
    attributes: &[POOL, "pyvisor.death.cause"],
};
pub(crate) const MEMORY: MetricDef = MetricDef {
    name: "pyvisor.worker.memory",
    description: "Worker resident memory from its last beat",
    unit: "By",
    kind: MetricKind::Gauge,
    attributes: &[POOL, "pyvisor.worker.id"],
};

pub(crate) const IDEMPOTENCY: MetricDef = MetricDef {
    name: "pyvisor.call.idempotency",
    description: "Calls with an idempotency key, by how they found the key: hit (a kept outcome), miss (ran the function), coalesced (joined the execution in flight)",
    unit: "{call}",
    kind: MetricKind::Counter,
    attributes: &[POOL, "rpc.method", "pyvisor.idempotency"],
};

/// Every metric pyvisor records, in the order a snapshot lists them.
pub const FAMILIES: [MetricDef; 11] = [CALLS, DURATION, RETRIES, QUEUE, IN_FLIGHT, WORKERS, RESTARTS, RECYCLES, CRASHES, MEMORY, IDEMPOTENCY];

/// One labelled value of a family.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Sample {
    /// Label values, one per [`MetricDef::attributes`] key, in that order.
    pub labels: Vec<String>,
    /// The value.
    pub value: SampleValue,
}

/// A sample's value.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SampleValue {
    /// A counter's total or a gauge's value.
    Int(u64),
    /// A histogram.
    Histogram {
        /// Upper bounds of the buckets (the `+Inf` bucket is implied).
        bounds: &'static [f64],
        /// Observations per bucket, not cumulative: `bounds.len() + 1` entries, the last one
        /// above every bound.
        counts: Vec<u64>,
        /// Sum of the observations.
        sum: f64,
        /// Number of observations.
        count: u64,
    },
}

/// One metric and its samples.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MetricFamily {
    /// What it is.
    pub def: MetricDef,
    /// Its samples, sorted by label values.
    pub samples: Vec<Sample>,
}

/// Every metric at one moment ([`snapshot`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// One family per entry of [`FAMILIES`], in that order (families without samples included).
    pub families: Vec<MetricFamily>,
}

impl MetricsSnapshot {
    /// The family with this OpenTelemetry name.
    pub fn family(&self, name: &str) -> Option<&MetricFamily> {
        self.families.iter().find(|f| f.def.name == name)
    }

    /// The value of a counter or gauge sample with these label values.
    pub fn value(&self, name: &str, labels: &[&str]) -> Option<u64> {
        self.family(name)?.samples.iter().find(|s| s.labels.iter().map(String::as_str).eq(labels.iter().copied())).and_then(|s| match s.value {
            SampleValue::Int(v) => Some(v),
            SampleValue::Histogram { .. } => None,
        })
    }

    /// The Prometheus text exposition format (version 0.0.4): for every family a `# HELP` and a
    /// `# TYPE` line, then one line per sample (`_bucket`, `_sum` and `_count` lines for a
    /// histogram). Serve it with [`PROMETHEUS_CONTENT_TYPE`].
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let name = f.def.prometheus_name();
            let keys: Vec<String> = f.def.attributes.iter().map(|k| sanitize(k, false)).collect();
            let kind = match f.def.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {}", escape_help(f.def.description));
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for s in &f.samples {
                let pairs: Vec<(&str, String)> = keys.iter().map(String::as_str).zip(s.labels.iter().cloned()).collect();
                match &s.value {
                    SampleValue::Int(v) => {
                        let _ = writeln!(out, "{name}{} {v}", label_set(&pairs, None));
                    }
                    SampleValue::Histogram { bounds, counts, sum, count } => {
                        let mut cumulative = 0u64;
                        for (i, n) in counts.iter().enumerate() {
                            cumulative += n;
                            let le = bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| format_float(*b));
                            let _ = writeln!(out, "{name}_bucket{} {cumulative}", label_set(&pairs, Some(&le)));
                        }
                        let _ = writeln!(out, "{name}_sum{} {}", label_set(&pairs, None), format_float(*sum));
                        let _ = writeln!(out, "{name}_count{} {count}", label_set(&pairs, None));
                    }
                }
            }
        }
        out
    }
}

/// `{k="v",...}` (with `le` last for a bucket), or nothing when there are no labels.
fn label_set(pairs: &[(&str, String)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape_label(v))).collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// A float as Prometheus reads it (`+Inf`, `-Inf`, `NaN` spelled out).
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// A metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or label name (`[a-zA-Z_][a-zA-Z0-9_]*`) made
/// from an OpenTelemetry one: every other character becomes `_`, a leading digit gets a `_`.
fn sanitize(name: &str, metric: bool) -> String {
    let mut s: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || (metric && c == ':') { c } else { '_' }).collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) || s.is_empty() {
        s.insert(0, '_');
    }
    s
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

// ---- recording ----

static POOLS: Mutex<Vec<Weak<PoolShared>>> = Mutex::new(Vec::new());

fn pools() -> Vec<Arc<PoolShared>> {
    let Ok(mut p) = POOLS.lock() else { return Vec::new() };
    p.retain(|w| w.strong_count() > 0);
    p.iter().filter_map(Weak::upgrade).collect()
}

/// Make a pool's gauges observable (every pool, from its start).
pub(crate) fn register_pool(shared: &Arc<PoolShared>) {
    if let Ok(mut p) = POOLS.lock() {
        p.retain(|w| w.strong_count() > 0);
        p.push(Arc::downgrade(shared));
    }
}

/// The current values of a gauge, read from the live pools, as (label values in the def's
/// attribute order, value): what the OpenTelemetry callbacks observe and what a snapshot lists.
pub(crate) fn gauge(def: &MetricDef) -> Vec<(Vec<String>, u64)> {
    let mut out = Vec::new();
    for p in pools() {
        let pool = p.name.to_string();
        match def.name {
            n if n == QUEUE.name => out.push((vec![pool], p.dispatch.len() as u64)),
            n if n == IN_FLIGHT.name => {
                let n: usize = p.members().iter().map(|s| s.in_flight()).sum();
                out.push((vec![pool], n as u64));
            }
            n if n == WORKERS.name => {
                let members = p.members();
                for state in [WorkerState::Starting, WorkerState::Ready, WorkerState::Draining] {
                    let n = members.iter().filter(|s| s.state() == state).count();
                    out.push((vec![pool.clone(), state.to_string()], n as u64));
                }
            }
            n if n == MEMORY.name => {
                for s in p.members() {
                    if let Some(b) = s.last_beat() {
                        out.push((vec![pool.clone(), s.id.to_string()], b.beat.rss));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

static ENABLED: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct CallStats {
    /// Per bucket of [`CALL_DURATION_BUCKETS`], plus `+Inf`.
    buckets: [u64; CALL_DURATION_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

/// pool → function → (outcome, stats); looked up by `&str` without allocating.
type CallTable = HashMap<Arc<str>, PoolCalls>;

#[derive(Default)]
struct PoolCalls {
    functions: HashMap<Box<str>, Vec<(&'static str, CallStats)>>,
    series: usize,
}

static CALL_TABLE: LazyLock<Mutex<CallTable>> = LazyLock::new(Default::default);
/// Label values → total, per counter other than `pyvisor.calls` (rare events: they allocate).
static COUNTERS: Mutex<BTreeMap<&'static str, BTreeMap<Vec<String>, u64>>> = Mutex::new(BTreeMap::new());

/// Start recording counters and the call-latency histogram for [`snapshot`] (idempotent).
/// They count from this moment.
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// Whether [`enable`] was called.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub(crate) fn call_done(pool: &Arc<str>, function: &str, outcome: &'static str, seconds: f64) {
    if !is_enabled() {
        return;
    }
    let Ok(mut t) = CALL_TABLE.lock() else { return };
    if !t.contains_key(&**pool) {
        t.insert(Arc::clone(pool), PoolCalls::default());
    }
    let Some(calls) = t.get_mut(&**pool) else { return };
    let known = calls.functions.get(function).is_some_and(|o| o.iter().any(|(k, _)| *k == outcome));
    let function = if known || calls.series < MAX_CALL_SERIES { function } else { OTHER_FUNCTION };
    if !calls.functions.contains_key(function) {
        calls.functions.insert(Box::from(function), Vec::new());
    }
    let Some(outcomes) = calls.functions.get_mut(function) else { return };
    let i = match outcomes.iter().position(|(k, _)| *k == outcome) {
        Some(i) => i,
        None => {
            calls.series += 1;
            outcomes.push((outcome, CallStats::default()));
            outcomes.len() - 1
        }
    };
    let stats = &mut outcomes[i].1;
    let bucket = CALL_DURATION_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(CALL_DURATION_BUCKETS.len());
    stats.buckets[bucket] += 1;
    stats.sum += seconds;
    stats.count += 1;
}

/// Add one to a counter other than `pyvisor.calls` (label values in the def's attribute order).
pub(crate) fn count(def: &MetricDef, labels: &[&str]) {
    if !is_enabled() {
        return;
    }
    if let Ok(mut c) = COUNTERS.lock() {
        *c.entry(def.name).or_default().entry(labels.iter().map(|s| s.to_string()).collect()).or_default() += 1;
    }
}

/// Every metric now: the counters and histogram recorded since [`enable`] (none before), and
/// the gauges of the pools alive now.
pub fn snapshot() -> MetricsSnapshot {
    let mut calls = Vec::new();
    let mut durations = Vec::new();
    if let Ok(t) = CALL_TABLE.lock() {
        for (pool, per_pool) in t.iter() {
            for (function, outcomes) in &per_pool.functions {
                for (outcome, s) in outcomes {
                    let labels = vec![pool.to_string(), function.to_string(), outcome.to_string()];
                    calls.push(Sample { labels: labels.clone(), value: SampleValue::Int(s.count) });
                    durations.push(Sample {
                        labels,
                        value: SampleValue::Histogram { bounds: &CALL_DURATION_BUCKETS, counts: s.buckets.to_vec(), sum: s.sum, count: s.count },
                    });
                }
            }
        }
    }
    let counters = COUNTERS.lock().map(|c| c.clone()).unwrap_or_default();
    let families = FAMILIES
        .iter()
        .map(|def| {
            let mut samples = match def.name {
                n if n == CALLS.name => std::mem::take(&mut calls),
                n if n == DURATION.name => std::mem::take(&mut durations),
                _ if def.kind == MetricKind::Gauge => gauge(def)
                    .into_iter()
                    .map(|(labels, v)| Sample { labels, value: SampleValue::Int(v) })
                    .collect(),
                _ => counters
                    .get(def.name)
                    .map(|m| m.iter().map(|(labels, v)| Sample { labels: labels.clone(), value: SampleValue::Int(*v) }).collect())
                    .unwrap_or_default(),
            };
            samples.sort_by(|a, b| a.labels.cmp(&b.labels));
            MetricFamily { def: *def, samples }
        })
        .collect();
    MetricsSnapshot { families }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(labels: &[&str], v: u64) -> Sample {
        Sample { labels: labels.iter().map(|s| s.to_string()).collect(), value: SampleValue::Int(v) }
    }

    #[test]
    fn names_follow_the_opentelemetry_prometheus_rules() {
        let names: Vec<String> = FAMILIES.iter().map(MetricDef::prometheus_name).collect();
        assert_eq!(
            names,
            [
                "pyvisor_calls_total",
                "pyvisor_call_duration_seconds",
                "pyvisor_call_retries_total",
                "pyvisor_queue_depth",
                "pyvisor_calls_in_flight",
                "pyvisor_workers",
                "pyvisor_worker_restarts_total",
                "pyvisor_worker_recycles_total",
                "pyvisor_worker_crashes_total",
                "pyvisor_worker_memory_bytes",
                "pyvisor_call_idempotency_total",
            ]
        );
        assert_eq!(sanitize("pyvisor.worker.state", false), "pyvisor_worker_state");
        assert_eq!(sanitize("9lives:x", false), "_9lives_x");
        assert_eq!(sanitize("a:b", true), "a:b");
    }

    #[test]
    fn counters_and_gauges_are_help_type_and_one_line_per_sample() {
        let snap = MetricsSnapshot {
            families: vec![
                MetricFamily { def: CALLS, samples: vec![int(&["p", "echo", "ok"], 3), int(&["p", "echo", "timeout"], 1)] },
                MetricFamily { def: QUEUE, samples: vec![int(&["p"], 0)] },
                MetricFamily { def: CRASHES, samples: vec![] },
            ],
        };
        assert_eq!(
            snap.to_prometheus(),
            "# HELP pyvisor_calls_total Calls completed, by outcome\n\
             # TYPE pyvisor_calls_total counter\n\
             pyvisor_calls_total{pyvisor_pool=\"p\",rpc_method=\"echo\",pyvisor_outcome=\"ok\"} 3\n\
             pyvisor_calls_total{pyvisor_pool=\"p\",rpc_method=\"echo\",pyvisor_outcome=\"timeout\"} 1\n\
             # HELP pyvisor_queue_depth Calls waiting for a free worker\n\
             # TYPE pyvisor_queue_depth gauge\n\
             pyvisor_queue_depth{pyvisor_pool=\"p\"} 0\n\
             # HELP pyvisor_worker_crashes_total Worker deaths, by cause\n\
             # TYPE pyvisor_worker_crashes_total counter\n"
        );
        assert_eq!(snap.value("pyvisor.calls", &["p", "echo", "ok"]), Some(3));
        assert_eq!(snap.value("pyvisor.calls", &["p", "echo"]), None);
    }

    #[test]
    fn a_histogram_has_cumulative_buckets_ending_in_inf_then_sum_and_count() {
        const B: [f64; 2] = [0.5, 1.0];
        let snap = MetricsSnapshot {
            families: vec![MetricFamily {
                def: DURATION,
                samples: vec![Sample {
                    labels: vec!["p".into(), "f".into(), "ok".into()],
                    value: SampleValue::Histogram { bounds: &B, counts: vec![2, 0, 1], sum: 3.25, count: 3 },
                }],
            }],
        };
        let l = "pyvisor_pool=\"p\",rpc_method=\"f\",pyvisor_outcome=\"ok\"";
        assert_eq!(
            snap.to_prometheus(),
            format!(
                "# HELP pyvisor_call_duration_seconds Call latency from the caller's side, queue wait and retries included\n\
                 # TYPE pyvisor_call_duration_seconds histogram\n\
                 pyvisor_call_duration_seconds_bucket{{{l},le=\"0.5\"}} 2\n\
                 pyvisor_call_duration_seconds_bucket{{{l},le=\"1\"}} 2\n\
                 pyvisor_call_duration_seconds_bucket{{{l},le=\"+Inf\"}} 3\n\
                 pyvisor_call_duration_seconds_sum{{{l}}} 3.25\n\
                 pyvisor_call_duration_seconds_count{{{l}}} 3\n"
            )
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let def = MetricDef { name: "x.y", description: "a \\ b\nc", unit: "{x}", kind: MetricKind::Gauge, attributes: &["k.k"] };
        let snap = MetricsSnapshot { families: vec![MetricFamily { def, samples: vec![int(&["q\"uote\\back\nline"], 7)] }] };
        assert_eq!(snap.to_prometheus(), "# HELP x_y a \\\\ b\\nc\n# TYPE x_y gauge\nx_y{k_k=\"q\\\"uote\\\\back\\nline\"} 7\n");
    }

    #[test]
    fn floats_are_spelled_as_prometheus_reads_them() {
        assert_eq!(format_float(0.0001), "0.0001");
        assert_eq!(format_float(60.0), "60");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_float(f64::NAN), "NaN");
    }

    #[test]
    fn recorded_calls_land_in_their_buckets_and_counters_by_labels() {
        enable();
        let pool: Arc<str> = Arc::from("prometheus-unit-test");
        call_done(&pool, "f", "ok", 0.0002);
        call_done(&pool, "f", "ok", 0.003);
        call_done(&pool, "f", "ok", 120.0);
        call_done(&pool, "f", "timeout", 1.0);
        count(&RESTARTS, &["prometheus-unit-test", "replacement"]);
        count(&RESTARTS, &["prometheus-unit-test", "replacement"]);
        let snap = snapshot();
        assert_eq!(snap.value("pyvisor.calls", &["prometheus-unit-test", "f", "ok"]), Some(3));
        assert_eq!(snap.value("pyvisor.calls", &["prometheus-unit-test", "f", "timeout"]), Some(1));
        assert_eq!(snap.value("pyvisor.worker.restarts", &["prometheus-unit-test", "replacement"]), Some(2));
        let h = snap
            .family("pyvisor.call.duration")
            .and_then(|f| f.samples.iter().find(|s| s.labels == ["prometheus-unit-test", "f", "ok"]))
            .map(|s| s.value.clone());
        let Some(SampleValue::Histogram { counts, sum, count, .. }) = h else { panic!("no histogram sample: {h:?}") };
        assert_eq!(count, 3);
        assert!((sum - 120.0032).abs() < 1e-9, "{sum}");
        assert_eq!(counts[1], 1, "0.2 ms is in the 0.25 ms bucket: {counts:?}");
        assert_eq!(counts[5], 1, "3 ms is in the 5 ms bucket: {counts:?}");
        assert_eq!(counts[CALL_DURATION_BUCKETS.len()], 1, "120 s is in +Inf: {counts:?}");
        assert_eq!(counts.iter().sum::<u64>(), 3);
    }

    #[test]
    fn function_names_past_the_series_cap_are_counted_as_other() {
        enable();
        let pool: Arc<str> = Arc::from("prometheus-cap-test");
        for i in 0..MAX_CALL_SERIES + 5 {
            call_done(&pool, &format!("f{i}"), "unknown_function", 0.001);
        }
        let snap = snapshot();
        let series = snap.family("pyvisor.calls").map_or(0, |f| f.samples.iter().filter(|s| s.labels[0] == "prometheus-cap-test").count());
        assert_eq!(series, MAX_CALL_SERIES + 1, "the cap, then one series for the rest");
        let other = snap.value("pyvisor.calls", &["prometheus-cap-test", OTHER_FUNCTION, "unknown_function"]).unwrap_or(0);
        assert!(other >= 5, "calls past the cap are counted as {OTHER_FUNCTION}: {other}");
    }
}

//! One telemetry set-up for the CLI, the examples and users: a `tracing` subscriber that logs
//! to stderr (filtered by `PYVISOR_LOG`, else `RUST_LOG`, else `info`) and, when an OTLP
//! endpoint is configured, exports spans and metrics over OTLP (gRPC or HTTP/protobuf, batch
//! export) with the standard `OTEL_*` variables:
//!
//! | variable | meaning |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | collector base address, e.g. `http://localhost:4317`; unset: no export |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` or `http/protobuf` (default `http/protobuf`, the spec's) |
//! | `OTEL_SERVICE_NAME` | service name (default `pyvisor`) |
//! | `OTEL_SDK_DISABLED` | `true`: no export |
//! | `OTEL_METRIC_EXPORT_INTERVAL` | metric export interval in ms (default 60000) |
//!
//! Workers get the resolved endpoint, protocol and service name in their environment, so the
//! adapter (with the `otel` extra) exports the spans user code makes to the same place, as
//! children of ours. The Python function's own span is recorded here, in the parent, from the
//! timing the worker reports (`function_span.rs`), under the workers' service name
//! (`SERVICE-worker`): a second tracer provider, whose span ids the worker chooses.
//! Owns the set-up and the shutdown flush; spans are made where the work happens. For spans of
//! calls that leave the process (multi-node mode's remote call span), it lends pyvisor's
//! tracer and the W3C context in and out: [`tracer`], [`parent_context`], [`traceparent`].
//!
//! # The `otlp` feature
//!
//! The OTLP exporters (`opentelemetry-otlp` and its transports: tonic for gRPC, reqwest and
//! hyper for HTTP) are compiled in only with the `otlp` feature, on by default (`pyvisor`'s
//! feature of the same name turns it on here). Without it: [`init`] and [`init_with`] still
//! install the console log subscriber; a configuration with an endpoint exports nothing and
//! says so once on stderr (a build without export is not an error of the configuration: the
//! same program and environment run with either build); [`exporting`] stays `false`, so calls
//! make no spans, and a `traceparent` given in [`CallOptions`](crate::CallOptions) still
//! reaches the workers unchanged. [`OTLP_COMPILED`] says which build this is.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use opentelemetry::trace::SpanId;
#[cfg(feature = "otlp")]
use opentelemetry::trace::{TraceId, TracerProvider as _};
#[cfg(feature = "otlp")]
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::SdkMeterProvider;
#[cfg(feature = "otlp")]
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
#[cfg(feature = "otlp")]
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Whether this build can export over OTLP: pyvisor's `otlp` feature (on by default). Without
/// it a configured endpoint exports nothing (see the module documentation).
pub const OTLP_COMPILED: bool = cfg!(feature = "otlp");

static EXPORTING: AtomicBool = AtomicBool::new(false);
static EXPORT_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
/// The tracer of the calls' spans (`call_trace.rs`), while exporting.
static CALL_TRACER: RwLock<Option<SdkTracer>> = RwLock::new(None);
/// The tracer of the workers' spans (their service name), while exporting.
static WORKER_TRACER: RwLock<Option<SdkTracer>> = RwLock::new(None);

/// The tracer for the calls' spans, when spans are exported.
pub(crate) fn call_tracer() -> Option<SdkTracer> {
    if !exporting() {
        return None; // one atomic load when nothing is exported
    }
    CALL_TRACER.read().ok()?.clone()
}

thread_local! {
    /// The span id the next span of the workers' provider takes on this thread (the one the
    /// worker chose and its own spans already name as their parent).
    static CHOSEN_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
}

/// Random ids, except a span id chosen with [`with_worker_tracer`].
#[cfg(feature = "otlp")]
#[derive(Debug, Default)]
struct WorkerIds(RandomIdGenerator);

#[cfg(feature = "otlp")]
impl IdGenerator for WorkerIds {
    fn new_trace_id(&self) -> TraceId {
        self.0.new_trace_id()
    }
    fn new_span_id(&self) -> SpanId {
        CHOSEN_SPAN_ID.with(Cell::take).unwrap_or_else(|| self.0.new_span_id())
    }
}

/// Run `f` with the workers' tracer (`None` when not exporting); the span it starts on this
/// thread gets the id `span_id`.
pub(crate) fn with_worker_tracer<R>(span_id: SpanId, f: impl FnOnce(&SdkTracer) -> R) -> Option<R> {
    let guard = WORKER_TRACER.read().ok()?;
    let tracer = guard.as_ref()?;
    CHOSEN_SPAN_ID.with(|c| c.set(Some(span_id)));
    let r = f(tracer);
    CHOSEN_SPAN_ID.with(|c| c.set(None));
    Some(r)
}

/// Whether spans and metrics are being exported (calls then carry a `traceparent`).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Environment for workers so they export where we do (empty when we do not export).
pub(crate) fn worker_env() -> &'static [(String, String)] {
    EXPORT_ENV.get().map_or(&[], Vec::as_slice)
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Protocol {
    /// OTLP over gRPC (port 4317 by convention).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318 by convention).
    HttpProtobuf,
}

#[cfg(feature = "otlp")]
impl Protocol {
    fn env_value(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// What to export where. [`TelemetryConfig::from_env`] reads the standard variables.
///
/// ```
/// use pyvisor_core::telemetry::{Protocol, TelemetryConfig};
/// let c = TelemetryConfig::default().endpoint("http://127.0.0.1:4317").protocol(Protocol::Grpc);
/// assert!(c.exports());
/// ```
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// Collector base address; `None`: no export (console logs only).
    pub endpoint: Option<String>,
    /// Transport.
    pub protocol: Protocol,
    /// `service.name`.
    pub service_name: String,
    /// Metric export interval.
    pub metric_interval: Duration,
    /// Log filter for the console (`PYVISOR_LOG`/`RUST_LOG` syntax).
    pub log_filter: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            endpoint: None,
            protocol: Protocol::HttpProtobuf,
            service_name: "pyvisor".into(),
            metric_interval: Duration::from_secs(60),
            log_filter: "info".into(),
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

impl TelemetryConfig {
    /// From `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_SERVICE_NAME`, `OTEL_SDK_DISABLED`,
    /// `OTEL_METRIC_EXPORT_INTERVAL`, and `PYVISOR_LOG`/`RUST_LOG`.
    #[must_use]
    pub fn from_env() -> Self {
        let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let endpoint = if disabled {
            None
        } else {
            env("OTEL_EXPORTER_OTLP_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        };
        let protocol = match env("OTEL_EXPORTER_OTLP_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")).as_deref() {
            Some("grpc") => Protocol::Grpc,
            _ => Protocol::HttpProtobuf,
        };
        let mut c = TelemetryConfig { endpoint, protocol, ..Default::default() };
        if let Some(name) = env("OTEL_SERVICE_NAME") {
            c.service_name = name;
        }
        if let Some(ms) = env("OTEL_METRIC_EXPORT_INTERVAL").and_then(|v| v.parse::<u64>().ok()) {
            c.metric_interval = Duration::from_millis(ms.max(1));
        }
        if let Some(f) = env("PYVISOR_LOG").or_else(|| env("RUST_LOG")) {
            c.log_filter = f;
        }
        c
    }
    /// Export to this collector base address.
    #[must_use]
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }
    /// Use this transport.
    #[must_use]
    pub fn protocol(mut self, p: Protocol) -> Self {
        self.protocol = p;
        self
    }
    /// Set `service.name`.
    #[must_use]
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = name.into();
        self
    }
    /// Set the metric export interval.
    #[must_use]
    pub fn metric_interval(mut self, d: Duration) -> Self {
        self.metric_interval = d;
        self
    }
    /// Whether this configuration exports anything.
    pub fn exports(&self) -> bool {
        self.endpoint.is_some()
    }
}

/// Keeps telemetry running; flushes and shuts the exporters down when dropped (on a thread of
/// its own: the HTTP exporter's flush blocks, and must never run on an async worker thread).
#[derive(Debug)]
#[must_use = "telemetry stops when the guard is dropped"]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    /// The workers' spans (service `SERVICE-worker`).
    workers: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
    /// gRPC only: the runtime the exporters' connections run on (see [`export_runtime`]).
    /// Declared last: dropped after `drop` has shut the exporters down.
    #[cfg(feature = "otlp")]
    _runtime: Option<ExportRuntime>,
}

/// The exporters' runtime; shut down without blocking when dropped (that may happen in async
/// code, where dropping a `Runtime` panics).
#[cfg(feature = "otlp")]
#[derive(Debug)]
struct ExportRuntime(Option<tokio::runtime::Runtime>);

#[cfg(feature = "otlp")]
impl Drop for ExportRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl TelemetryGuard {
    fn none() -> Self {
        TelemetryGuard {
            tracer: None,
            workers: None,
            meter: None,
            #[cfg(feature = "otlp")]
            _runtime: None,
        }
    }
}

/// The runtime of the gRPC exporters: one thread of pyvisor's own. tonic runs each connection
/// as a task on the runtime it was made in; made in the caller's runtime, every export batch
/// (HTTP/2 framing and the protobuf encoding of up to thousands of spans) ran on a thread that
/// also serves calls. On a runtime of its own it never delays a call, exporting does not depend
/// on the caller's runtime making progress (a flush from a current-thread runtime used to wait
/// out the exporter's timeout), and `init` works outside any runtime.
#[cfg(feature = "otlp")]
fn export_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("pyvisor-otlp").enable_all().build()
}

impl TelemetryGuard {
    /// Flush everything exported so far (blocking; from a thread of its own).
    pub fn flush(&self) {
        let (t, w, m) = (self.tracer.clone(), self.workers.clone(), self.meter.clone());
        if t.is_none() && m.is_none() {
            return;
        }
        let _ = std::thread::spawn(move || {
            for t in [t, w].into_iter().flatten() {
                let _ = t.force_flush();
            }
            if let Some(m) = m {
                let _ = m.force_flush();
            }
        })
        .join();
    }
}

impl TelemetryGuard {
    /// The flush and shutdown of everything this guard keeps running, as one blocking job
    /// (`None` if it keeps nothing). The export runtime goes with the job: it must outlive it.
    fn take_shutdown(&mut self) -> Option<impl FnOnce() + Send + 'static> {
        let (t, w, m) = (self.tracer.take(), self.workers.take(), self.meter.take());
        #[cfg(feature = "otlp")]
        let runtime = self._runtime.take();
        if t.is_none() && m.is_none() {
            return None;
        }
        EXPORTING.store(false, Ordering::Relaxed);
        for tracer in [&CALL_TRACER, &WORKER_TRACER] {
            if let Ok(mut t) = tracer.write() {
                *t = None;
            }
        }
        Some(move || {
            for t in [t, w].into_iter().flatten() {
                let _ = t.force_flush();
                let _ = t.shutdown_with_timeout(Duration::from_secs(5));
            }
            if let Some(m) = m {
                let _ = m.force_flush();
                let _ = m.shutdown();
            }
            #[cfg(feature = "otlp")]
            drop(runtime);
        })
    }

    /// Flush and shut the exporters down without blocking the caller's runtime: the work runs
    /// on a thread of its own and this future waits for it. Prefer it to dropping the guard in
    /// async code.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let guard = pyvisor_core::telemetry::init_with(&Default::default());
    /// guard.shutdown().await; // exports nothing here: returns at once
    /// # }
    /// ```
    pub async fn shutdown(mut self) {
        let Some(job) = self.take_shutdown() else { return };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("pyvisor-otel-shutdown".into()).spawn(move || {
            job();
            let _ = tx.send(());
        });
        if spawned.is_ok() {
            let _ = rx.await;
        }
    }
}

impl Drop for TelemetryGuard {
    /// Flushes and shuts the exporters down on a thread of its own (the HTTP exporter blocks,
    /// up to its timeout when the collector does not answer). Outside a runtime, the drop waits
    /// for it — what the end of `main` needs. Inside a multi-thread runtime it waits in
    /// `block_in_place`, so the runtime's other tasks move on. Inside a current-thread runtime
    /// it does not wait (that would stop the runtime's only thread): call
    /// [`TelemetryGuard::shutdown`] there to be sure the last spans leave.
    fn drop(&mut self) {
        let Some(job) = self.take_shutdown() else { return };
        let Ok(worker) = std::thread::Builder::new().name("pyvisor-otel-shutdown".into()).spawn(job) else { return };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Err(_) => {
                let _ = worker.join();
            }
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => {
                tracing::debug!("TelemetryGuard dropped on a current-thread runtime: the final flush runs without waiting");
            }
            Ok(_) => tokio::task::block_in_place(|| {
                let _ = worker.join();
            }),
        }
    }
}

#[cfg(feature = "otlp")]
fn endpoint_for(base: &str, protocol: Protocol, signal: &str) -> String {
    match protocol {
        Protocol::Grpc => base.to_string(),
        Protocol::HttpProtobuf => format!("{}/v1/{signal}", base.trim_end_matches('/')),
    }
}

/// The OpenTelemetry layer and its guard, for programs that build their own subscriber:
/// `registry().with(my_layers).with(layer)`. `None` when `config` exports nothing, or when this
/// build has no OTLP export ([`OTLP_COMPILED`]; a configured endpoint is then reported on
/// stderr). Works inside or outside a tokio runtime (gRPC exporters run on a thread of
/// pyvisor's own).
pub fn otel_layer<S>(config: &TelemetryConfig) -> (Option<impl Layer<S>>, TelemetryGuard)
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let Some(base) = config.endpoint.as_deref() else { return (None, TelemetryGuard::none()) };
    start_export::<S>(config, base)
}

/// Without the `otlp` feature: say that nothing is exported, once per set-up. (`S` unused: the
/// same signature as the exporting variant.)
#[cfg(not(feature = "otlp"))]
#[allow(clippy::extra_unused_type_parameters)]
fn start_export<S>(_config: &TelemetryConfig, base: &str) -> (Option<tracing_subscriber::layer::Identity>, TelemetryGuard)
where
    S: tracing::Subscriber,
{
    eprintln!(
        "pyvisor: an OTLP endpoint is configured ({base}) but this build has no OTLP export \
         (pyvisor's `otlp` feature is off): nothing is exported"
    );
    (None, TelemetryGuard::none())
}

/// The exporters, providers and layer for `base` (the `otlp` feature).
#[cfg(feature = "otlp")]
fn start_export<S>(config: &TelemetryConfig, base: &str) -> (Option<impl Layer<S>>, TelemetryGuard)
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let none = TelemetryGuard::none();
    let runtime = match config.protocol {
        Protocol::HttpProtobuf => None,
        Protocol::Grpc => match export_runtime() {
            Ok(rt) => Some(ExportRuntime(Some(rt))),
            Err(e) => {
                eprintln!("pyvisor: cannot start the OTLP/gRPC exporters' thread ({e}); not exporting");
                return (None, none);
            }
        },
    };
    // tonic spawns each connection's task on the runtime current while the exporter is built.
    let _entered = runtime.as_ref().and_then(|rt| rt.0.as_ref()).map(|rt| rt.enter());
    let resource = Resource::builder().with_service_name(config.service_name.clone()).build();
    let worker_service = format!("{}-worker", config.service_name);
    let span_exporter = || match config.protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint_for(base, config.protocol, "traces"))
            .build(),
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint_for(base, config.protocol, "traces"))
            .build(),
    };
    let (span_exporter, worker_exporter) = match (span_exporter(), span_exporter()) {
        (Ok(e), Ok(w)) => (e, w),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("pyvisor: OpenTelemetry span exporter not started: {e}");
            return (None, none);
        }
    };
    let tracer_provider = SdkTracerProvider::builder()
        .with_batch_exporter(span_exporter)
        .with_resource(resource.clone())
        .build();
    let worker_provider = SdkTracerProvider::builder()
        .with_batch_exporter(worker_exporter)
        .with_id_generator(WorkerIds::default())
        .with_resource(Resource::builder().with_service_name(worker_service.clone()).build())
        .build();
    let metric_exporter = match config.protocol {
        Protocol::Grpc => opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint_for(base, config.protocol, "metrics"))
            .build(),
        Protocol::HttpProtobuf => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(endpoint_for(base, config.protocol, "metrics"))
            .build(),
    };
    let meter_provider = match metric_exporter {
        Ok(e) => {
            let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(e).with_interval(config.metric_interval).build();
            let p = SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build();
            opentelemetry::global::set_meter_provider(p.clone());
            Some(p)
        }
        Err(e) => {
            eprintln!("pyvisor: OpenTelemetry metric exporter not started: {e}");
            None
        }
    };
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let tracer: SdkTracer = tracer_provider.tracer("pyvisor");
    // ractor makes an INFO span per actor: keep those out of traces.
    let filter = EnvFilter::new("ractor=warn,pyvisor_core=debug,pyvisor=debug,pyvisor_cli=debug,info");
    // Code location, thread and busy/idle attributes cost per span and say nothing about a call.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer.clone())
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(filter);
    let _ = EXPORT_ENV.set(vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), base.to_string()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), config.protocol.env_value().into()),
        ("OTEL_SERVICE_NAME".into(), worker_service),
        ("PYVISOR_PARENT_SERVICE_NAME".into(), config.service_name.clone()),
    ]);
    if let Ok(mut t) = CALL_TRACER.write() {
        *t = Some(tracer.clone());
    }
    if let Ok(mut t) = WORKER_TRACER.write() {
        *t = Some(worker_provider.tracer("pyvisor_worker"));
    }
    EXPORTING.store(true, Ordering::Relaxed);
    crate::observe::metrics::enable();
    drop(_entered);
    (
        Some(layer),
        TelemetryGuard { tracer: Some(tracer_provider), workers: Some(worker_provider), meter: meter_provider, _runtime: runtime },
    )
}

/// Install the global subscriber from the environment ([`TelemetryConfig::from_env`]). Safe to
/// call more than once (later calls only return a guard that does nothing).
///
/// ```
/// let _guard = pyvisor_core::telemetry::init();
/// tracing::info!("visible with PYVISOR_LOG=info");
/// ```
pub fn init() -> TelemetryGuard {
    init_with(&TelemetryConfig::from_env())
}

/// Install the global subscriber with this configuration. With gRPC export, call it inside a
/// tokio runtime.
pub fn init_with(config: &TelemetryConfig) -> TelemetryGuard {
    use std::io::IsTerminal;
    if tracing::dispatcher::has_been_set() {
        // A subscriber is installed already (ours or the program's): ours would never see a
        // span, and a second set of exporters must not replace the first one's state.
        return TelemetryGuard::none();
    }
    // ractor logs every actor at INFO; keep it quiet unless asked for.
    let filter = EnvFilter::try_new(format!("ractor=warn,{}", config.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info,ractor=warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let (otel, guard) = otel_layer(config);
    if tracing_subscriber::registry().with(fmt).with(otel).try_init().is_err() {
        // A subscriber was already installed: ours would never see a span.
        drop(guard);
        return TelemetryGuard::none();
    }
    guard
}

/// The trace id of the current `tracing` span, when spans are exported (to find a trace in
/// Jaeger: `http://localhost:16686/trace/ID`).
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !exporting() {
        return None;
    }
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The tracer of pyvisor's own call spans, while spans are exported; `None` otherwise (one
/// atomic load). For spans of work that leaves this process — a call to another node, a
/// request to another service — made with the OpenTelemetry API directly, as pyvisor's call
/// spans are (cheaper than `tracing` spans), and exported with them. Pair it with
/// [`parent_context`] (the span's parent) and [`traceparent`] (the header to send on):
///
/// ```
/// use opentelemetry::trace::{Span, SpanKind, TraceContextExt, Tracer};
/// use opentelemetry::Context;
/// use pyvisor_core::telemetry;
///
/// /// The span of a request sent elsewhere, under `received` (the caller's `traceparent`) or
/// /// else the current `tracing` span; and the `traceparent` to send with the request.
/// fn outgoing(received: Option<&str>) -> Option<(Context, String)> {
///     let tracer = telemetry::tracer()?; // nothing exported: no span, nothing to send
///     let parent = telemetry::parent_context(received, None);
///     let span = tracer.span_builder("my.request").with_kind(SpanKind::Client).start_with_context(&tracer, &parent);
///     let (header, _tracestate) = telemetry::traceparent(span.span_context());
///     Some((Context::new().with_span(span), header)) // the span ends when the context drops
/// }
///
/// assert!(outgoing(None).is_none(), "telemetry::init was not called: nothing is exported");
/// ```
pub fn tracer() -> Option<SdkTracer> {
    call_tracer()
}

/// The parent for a span: the W3C context `traceparent`/`tracestate` when given (an empty
/// context if it is malformed), else the current `tracing` span's (through the OpenTelemetry
/// layer [`init`] installs), else an empty context (a new trace). What pyvisor's call spans
/// take as their parent.
///
/// ```
/// use opentelemetry::trace::TraceContextExt;
/// let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// let cx = pyvisor_core::telemetry::parent_context(Some(tp), None);
/// assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(!pyvisor_core::telemetry::parent_context(Some("garbage"), None).has_active_span());
/// ```
pub fn parent_context(traceparent: Option<&str>, tracestate: Option<&str>) -> opentelemetry::Context {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    match traceparent {
        Some(tp) => crate::observe::tracing_ctx::remote_context(tp, tracestate),
        None => {
            let current = tracing::Span::current();
            if current.is_none() {
                opentelemetry::Context::new()
            } else {
                current.context()
            }
        }
    }
}

/// A span's W3C `traceparent` header and its `tracestate` (`None` when empty): what to send
/// with a call so that the other side's spans become its children.
///
/// ```
/// use opentelemetry::trace::TraceContextExt;
/// use pyvisor_core::telemetry::{parent_context, traceparent};
/// let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// let cx = parent_context(Some(tp), Some("k=v"));
/// assert_eq!(traceparent(cx.span().span_context()), (tp.to_string(), Some("k=v".to_string())));
/// ```
pub fn traceparent(span: &opentelemetry::trace::SpanContext) -> (String, Option<String>) {
    crate::observe::tracing_ctx::traceparent(span)
}

/// Run by `cargo test -p pyvisor-core --no-default-features` (the workspace's tests build
/// with the feature on).
#[cfg(all(test, not(feature = "otlp")))]
mod without_otlp {
    use super::*;

    #[test]
    fn an_endpoint_exports_nothing_and_the_console_logs_are_still_set_up() {
        assert!(!OTLP_COMPILED);
        let guard = init_with(&TelemetryConfig::default().endpoint("http://127.0.0.1:4317").protocol(Protocol::Grpc));
        assert!(tracing::dispatcher::has_been_set(), "the console subscriber is installed");
        assert!(!exporting(), "nothing is exported");
        assert!(call_tracer().is_none(), "calls make no spans");
        assert!(worker_env().is_empty(), "workers are not told to export");
        drop(guard);
    }
}

//! `pyvisor-bench`: the benchmark suite. In one run, interleaved round by round, it measures
//! the raw floor (a minimal Rust client and a minimal Python MessagePack echo loop over one Unix
//! socket, `floor.rs` and `python/floor.py`) and pyvisor on the same payloads, and prints every
//! figure with its ratio to the floor. Timing claims live here, never in tests; CI only runs
//! `--quick` to see that it runs and prints ratios.
//!
//! Run: `make bench` (release build); see docs/benchmarks.md.

mod floor;
mod otlp_sink;
mod plot;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use pyvisor_core::{CallOptions, Interpreter, Pool, PoolEvent, PoolSpec};

use floor::{histogram, Floor};

#[derive(Parser, Debug)]
#[command(name = "pyvisor-bench", about = "pyvisor against the raw floor, interleaved, with ratios")]
struct Args {
    /// Small counts: checks that the suite runs (CI), figures are not meaningful.
    #[arg(long)]
    quick: bool,
    /// Rounds per scenario (floor and pyvisor alternate within each).
    #[arg(long)]
    rounds: Option<usize>,
    /// Python interpreter with pyvisor_worker and msgpack (default: $PYVISOR_PYTHON, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Where to write the results as JSON [default: target/bench/results.json, or
    /// target/bench/results-SCENARIO-….json with --only, so a partial run never overwrites a
    /// full one].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where to write the latency-vs-concurrency plot (SVG).
    #[arg(long, default_value = "target/bench/latency.svg")]
    plot: PathBuf,
    /// Run only these scenarios (repeatable; default: all): sequential, streaming, scaling,
    /// payloads, buffers, curve, tracing, start, recovery, memory.
    #[arg(long, value_parser = SCENARIOS)]
    only: Vec<String>,
    /// (internal) run one side of the tracing scenario in this process: `off`, `on` (workers
    /// without OpenTelemetry) or `on-sdk` (workers with the adapter's `otel` extra active).
    #[arg(long, hide = true)]
    child_tracing: Option<String>,
    /// (internal) the OTLP endpoint the tracing child exports to.
    #[arg(long, hide = true)]
    endpoint: Option<String>,
    /// Where the tracing scenario's children run: `split` (their call path on one CPU,
    /// OpenTelemetry's exporter threads on any) or `shared` (everything on one CPU).
    #[arg(long, default_value = "split", value_parser = ["split", "shared"])]
    tracing_layout: String,
    /// (internal) calls for the tracing child.
    #[arg(long, hide = true, default_value_t = 1000)]
    calls: usize,
}

/// Calls a tracing child makes before it measures.
const TRACING_WARMUP: usize = 200;

const SCENARIOS: [&str; 10] = ["sequential", "streaming", "scaling", "payloads", "buffers", "curve", "tracing", "start", "recovery", "memory"];

fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// A MessagePack string payload of about `n` bytes.
fn payload(n: usize) -> Vec<u8> {
    if n >= 64 * 1024 {
        // Large: bytes, which pass through as MessagePack bin.
        let mut v = Vec::with_capacity(n + 5);
        let _ = rmp::encode::write_bin_len(&mut v, (n - 5) as u32);
        v.resize(n, b'x');
        v
    } else {
        rmp_serde::to_vec(&"x".repeat(n.saturating_sub(3))).expect("encoding a string cannot fail")
    }
}

fn echo_spec(python: &Path, workers: usize, max_in_flight: usize) -> PoolSpec {
    PoolSpec::script(python_dir().join("echo.py")).python(python).name("bench").workers(workers).max_in_flight(max_in_flight)
}

/// How latencies are recorded: microseconds (every scenario), or nanoseconds where a
/// difference of one microsecond matters (the tracing children's ~15 µs calls).
#[derive(Clone, Copy)]
enum Unit {
    Micros,
    Nanos,
}

/// One caller, one call at a time. The caller is a task on the runtime, as a request handler in
/// a tokio service is: the reply's reader task wakes it on the same worker thread. (A caller
/// that blocks the program's main thread in `block_on` is woken from another thread, one more
/// thread switch per call; [`pyvisor_sequential_blocking`] measures that case.)
async fn pyvisor_sequential(pool: &Pool, payload: &[u8], n: usize, unit: Unit) -> Histogram<u64> {
    let (pool, payload) = (pool.clone(), payload.to_vec());
    tokio::spawn(async move { pyvisor_sequential_blocking(&pool, &payload, n, unit).await }).await.expect("the caller task panicked")
}

/// One stream of `n` copies of `item` (a task on the runtime, as a service's handler is), read
/// to its end; the time it took.
async fn pyvisor_stream(pool: &Pool, item: &str, n: usize) -> Duration {
    let (pool, item) = (pool.clone(), item.to_string());
    tokio::spawn(async move {
        use futures::StreamExt;
        let t = Instant::now();
        let mut stream = pool.stream::<_, serde::de::IgnoredAny>("repeat", &(item, n));
        let mut got = 0;
        while let Some(r) = stream.next().await {
            r.expect("streamed item");
            got += 1;
        }
        assert_eq!(got, n, "every item arrived");
        t.elapsed()
    })
    .await
    .expect("the reader task panicked")
}

/// One caller, one call at a time, on whatever thread polls this future.
async fn pyvisor_sequential_blocking(pool: &Pool, payload: &[u8], n: usize, unit: Unit) -> Histogram<u64> {
    let mut h = match unit {
        Unit::Micros => histogram(),
        Unit::Nanos => Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds"),
    };
    for _ in 0..n {
        let t = Instant::now();
        pool.call_raw("echo", payload, CallOptions::new()).await.expect("echo");
        let e = t.elapsed();
        let v = match unit {
            Unit::Micros => e.as_micros(),
            Unit::Nanos => e.as_nanos(),
        };
        let _ = h.record((v as u64).max(1));
    }
    h
}

/// Sequential p50 of the floor and of pyvisor, `rounds` rounds of `n` calls each, interleaved.
async fn sequential_p50s(floor: &mut Floor, pool: &Pool, payload: &[u8], n: usize, rounds: usize, what: &str) -> (f64, f64) {
    let (mut fh, mut ph) = (histogram(), histogram());
    for r in 0..rounds {
        eprintln!("round {}/{rounds}: {what}", r + 1);
        let _ = fh.add(floor.sequential(payload, n));
        let _ = ph.add(&pyvisor_sequential(pool, payload, n, Unit::Micros).await);
    }
    (fh.value_at_quantile(0.5) as f64, ph.value_at_quantile(0.5) as f64)
}

async fn pyvisor_concurrent(pool: &Pool, payload: &[u8], n: usize, callers: usize) -> (Duration, Histogram<u64>) {
    let left = Arc::new(AtomicUsize::new(n));
    let payload = Arc::new(payload.to_vec());
    let start = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (pool, left, payload) = (pool.clone(), left.clone(), payload.clone());
            tokio::spawn(async move {
                let mut h = histogram();
                while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1)).is_ok() {
                    let t = Instant::now();
                    pool.call_raw("echo", &payload, CallOptions::new()).await.expect("echo");
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                }
                h
            })
        })
        .collect();
    let mut h = histogram();
    for t in tasks {
        if let Ok(th) = t.await {
            let _ = h.add(&th);
        }
    }
    (start.elapsed(), h)
}

/// A reply's `bin`, seen without copying it: its length and first byte.
struct Seen(usize, u8);

impl<'de> serde::Deserialize<'de> for Seen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Seen;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Seen, E> {
                Ok(Seen(v.len(), v.first().copied().unwrap_or(0)))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Seen, E> {
                Ok(Seen(v.len(), v.first().copied().unwrap_or(0)))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Large buffers: the function reads every byte and returns a new buffer of the same size.
/// The raw socket floor (`python/floor_buffers.py`, no MessagePack) against pyvisor with a
/// prebuilt `SharedBytes` input, with a `Vec<u8>` copied into a `SharedBytes` per call, and
/// (64 KiB) with the pool in band; at 256 MiB also against a single-threaded `memcpy` of the
/// same size. Medians of per-call times.
async fn buffers_scenario(python: &Path, quick: bool, rounds: usize, rows: &mut Vec<Row>) {
    let mut floor = match Floor::start(python, &python_dir().join("floor_buffers.py"), &[]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("warning: buffers scenario skipped: cannot start its floor: {e}");
            return;
        }
    };
    // Everything from 64 KiB out of band: the measurement the default threshold comes from.
    let spec = echo_spec(python, 1, 4).name("bench-buffers").buffers(pyvisor_core::BufferPolicy::default().threshold(64 << 10));
    let oob = Pool::start(spec.clone()).await.expect("pool starts");
    let default = Pool::start(echo_spec(python, 1, 4).name("bench-default")).await.expect("pool starts");
    let in_band = Pool::start(spec.name("bench-in-band").max_frame(64 << 20).buffers(pyvisor_core::BufferPolicy::in_band())).await.expect("pool starts");
    let sizes: &[(&str, usize, usize)] = if quick {
        &[("64 KiB", 64 << 10, 50), ("1 MiB", 1 << 20, 10), ("16 MiB", 16 << 20, 2), ("256 MiB", 256 << 20, 1)]
    } else {
        &[("64 KiB", 64 << 10, 1000), ("1 MiB", 1 << 20, 200), ("4 MiB", 4 << 20, 50), ("16 MiB", 16 << 20, 20), ("256 MiB", 256 << 20, 3)]
    };
    let mut back = Vec::new();
    for &(label, size, n) in sizes {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let shared = pyvisor_core::SharedBytes::from_slice(&data).expect("a memfd");
        // The answer taken as the worker sent it: out of band, the worker's memfd as a
        // `SharedBytes` (no copy); in band, the reply's `bin` looked at where it lies.
        let call = |pool: &Pool, input: pyvisor_core::SharedBytes| {
            let pool = pool.clone();
            // Only `oob` (threshold 64 KiB) sends every size here out of band.
            let out_of_band = pool.name() == "bench-buffers";
            async move {
                let t = Instant::now();
                let seen = if out_of_band {
                    let back: pyvisor_core::SharedBytes = pool.call("mirror", &input).await.expect("mirror");
                    Seen(back.len(), back.first().copied().unwrap_or(0))
                } else {
                    pool.call("mirror", &input).await.expect("mirror")
                };
                assert_eq!((seen.0, seen.1), (size, 1), "the new buffer");
                t.elapsed().as_secs_f64()
            }
        };
        // Warm both sides up (page faults of first use, numpy's import).
        floor.raw_roundtrip(&data, &mut back).expect("floor");
        let _ = call(&oob, shared.clone()).await;
        let (mut f, mut p, mut v, mut b, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            eprintln!("round {}/{rounds}: buffers {label}", r + 1);
            for _ in 0..n {
                let t = Instant::now();
                floor.raw_roundtrip(&data, &mut back).expect("floor");
                f.push(t.elapsed().as_secs_f64());
                assert_eq!(back.len(), size);
                p.push(call(&oob, shared.clone()).await);
                // A Vec<u8> input: one copy into a fresh SharedBytes, counted in the call.
                let t = Instant::now();
                let copied = pyvisor_core::SharedBytes::from_slice(&data).expect("a memfd");
                v.push(t.elapsed().as_secs_f64() + call(&oob, copied).await);
                if size <= 64 << 10 {
                    d.push(call(&default, shared.clone()).await);
                }
                if size <= 16 << 20 {
                    b.push(call(&in_band, shared.clone()).await);
                }
            }
        }
        let us = 1e6;
        let (f, p, v) = (median(&mut f) * us, median(&mut p) * us, median(&mut v) * us);
        let target = if size >= 16 << 20 { Some(("≤ 0.25×", p <= 0.25 * f)) } else { None };
        rows.push(row(&format!("buffer {label}: SharedBytes in, new buffer out, per call"), "µs", f, p, target));
        rows.push(row(&format!("buffer {label}: Vec<u8> in (one copy), new buffer out, per call"), "µs", f, v, None));
        if !b.is_empty() {
            let b = median(&mut b) * us;
            rows.push(row(&format!("buffer {label}: out of band (pyvisor) vs in band (floor column)"), "µs", b, p, None));
            if !d.is_empty() {
                let d = median(&mut d) * us;
                let name = format!("buffer {label}: default pool (threshold {} KiB) vs in band (floor column)", pyvisor_core::DEFAULT_BUFFER_THRESHOLD >> 10);
                rows.push(row(&name, "µs", b, d, Some(("≤ 1.05×", d <= 1.05 * b))));
            }
        }
        if size == 256 << 20 {
            // A single-threaded memcpy of the same size, into memory already faulted in.
            let mut dst = vec![1u8; size];
            let mut m = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                dst.copy_from_slice(&data);
                m.push(t.elapsed().as_secs_f64());
                std::hint::black_box(&dst);
            }
            let mb = |secs: f64| size as f64 / secs / 1e6;
            let (memcpy, eff) = (mb(median(&mut m)), mb(p / us));
            rows.push(row("buffer 256 MiB: effective rate vs single-threaded memcpy (floor column)", "MB/s", memcpy, eff, Some(("≥ 0.25×", eff >= 0.25 * memcpy))));
        }
    }
    oob.shutdown().await;
    default.shutdown().await;
    in_band.shutdown().await;
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// One compared figure.
struct Row {
    name: String,
    unit: &'static str,
    floor: f64,
    pyvisor: f64,
    /// pyvisor / floor.
    ratio: f64,
    target: String,
    met: Option<bool>,
}

fn row(name: &str, unit: &'static str, floor: f64, pyvisor: f64, target: Option<(&str, bool)>) -> Row {
    let ratio = if floor > 0.0 { pyvisor / floor } else { f64::NAN };
    Row {
        name: name.into(),
        unit,
        floor,
        pyvisor,
        ratio,
        target: target.map_or_else(String::new, |(t, _)| t.to_string()),
        met: target.map(|(_, m)| m),
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// CPU time this process has used (all threads, user and system).
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time of every thread of process `pid` so far (the scheduler's nanosecond counters).
fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    let ns: u64 = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()))
        .map_or(0, |kb| kb >> 20);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} GiB, Linux {}", kernel.trim())
}

async fn bare_interpreters(python: &Path, n: usize) -> Duration {
    let t = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| tokio::process::Command::new(python).args(["-c", "import pyvisor_worker"]).spawn().expect("python starts"))
        .collect();
    for mut c in children {
        let _ = c.wait().await;
    }
    t.elapsed()
}

/// One side of the tracing scenario, in a process of its own (the subscriber is global), so
/// that off and on run in processes of the same shape.
async fn child_tracing(python: &Path, mode: &str, endpoint: Option<&str>, n: usize) -> ExitCode {
    let mut config = pyvisor_core::telemetry::TelemetryConfig::default()
        .protocol(pyvisor_core::telemetry::Protocol::Grpc)
        .service_name("pyvisor-bench");
    config.log_filter = "warn".into();
    if mode != "off" {
        let Some(endpoint) = endpoint else {
            eprintln!("error: --child-tracing {mode} needs --endpoint");
            return ExitCode::from(2);
        };
        config = config.endpoint(endpoint);
    }
    let guard = pyvisor_core::telemetry::init_with(&config);
    let mut spec = echo_spec(python, 1, 1);
    if mode == "on" {
        // The worker's OpenTelemetry stays off (as without the adapter's otel extra); its
        // function spans are still recorded, by this process.
        spec = spec.env("OTEL_SDK_DISABLED", "true");
    }
    let pool = Pool::start(spec).await.expect("pool starts");
    let p = payload(100);
    let _ = pyvisor_sequential(&pool, &p, TRACING_WARMUP, Unit::Nanos).await;
    let worker = pool.status().await.workers.first().and_then(|w| w.pid);
    let (cpu, worker_cpu) = (cpu_time(), worker.map(process_cpu));
    let h = pyvisor_sequential(&pool, &p, n, Unit::Nanos).await;
    let cpu_us = (cpu_time() - cpu).as_secs_f64() * 1e6 / n as f64;
    let worker_cpu_us = match (worker, worker_cpu) {
        (Some(pid), Some(before)) => (process_cpu(pid).saturating_sub(before)).as_secs_f64() * 1e6 / n as f64,
        _ => f64::NAN,
    };
    println!("{}", serde_json::json!({"p50": h.value_at_quantile(0.5) as f64 / 1000.0, "p99": h.value_at_quantile(0.99) as f64 / 1000.0, "cpu_us": cpu_us, "worker_cpu_us": worker_cpu_us}));
    pool.shutdown().await;
    drop(guard);
    ExitCode::SUCCESS
}

/// The last CPU this process may run on.
fn last_cpu() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity only writes the set given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        (0..libc::CPU_SETSIZE as usize).rev().find(|&c| libc::CPU_ISSET(c, &set))
    }
}

/// Pin the calling thread, and so the threads and processes it starts from now on, to `cpu`.
fn pin_thread(cpu: usize) {
    // SAFETY: as above; sched_setaffinity(0, ..) only reads the set given, for this thread.
    unsafe {
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &one) != 0 {
            eprintln!("warning: cannot pin a thread to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
}

/// The tracing children's runtime. On this VM a sequential call's latency depends on whether
/// the caller and its worker share a CPU (~15 µs) or not (~30 µs), which the scheduler decides
/// anew for every process, so off and on would be measured in different layouts. Here the call
/// path has one fixed layout: the runtime's one worker thread (caller and reader tasks), and
/// the Python worker, on the last CPU (the worker inherits the pin: pyvisor forks workers from
/// its spawner thread, which is started from the runtime's thread). With `--tracing-layout split` (the default),
/// threads started outside the runtime — OpenTelemetry's batch exporters — may run on any CPU,
/// as on any multi-core machine; with `shared`, they are pinned there too, so every cycle
/// tracing costs competes with the calls.
fn tracing_child_runtime(layout: &str) -> std::io::Result<tokio::runtime::Runtime> {
    let cpu = last_cpu();
    if layout == "shared" {
        if let Some(cpu) = cpu {
            pin_thread(cpu);
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(move || {
            if let Some(cpu) = cpu {
                pin_thread(cpu);
            }
        })
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = if args.child_tracing.is_some() {
        tracing_child_runtime(&args.tracing_layout)
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    };
    rt.expect("tokio runtime").block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let python = match Interpreter::from_option(args.python.clone()).resolve() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(mode) = &args.child_tracing {
        return child_tracing(&python, mode, args.endpoint.as_deref(), args.calls).await;
    }
    let quick = args.quick;
    let rounds = args.rounds.unwrap_or(if quick { 2 } else { 5 });
    let (seq_n, pipe_n) = if quick { (200, 2_000) } else { (3_000, 60_000) };
    eprintln!("pyvisor-bench: {} rounds, {seq_n} sequential and {pipe_n} pipelined calls per round{}", rounds, if quick { " (quick)" } else { "" });

    let want = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    // Rust-side memory per idle worker: the parent's RSS rise from 0 to 64 idle workers.
    let idle = if quick { 8 } else { 64 };
    let memory_row = if want("memory") {
        // First, before anything else has allocated and freed: a 1-worker pool loads the code and
        // warms the runtime, then the rise from 0 to `idle` workers is measured.
        let warm = Pool::start(echo_spec(&python, 1, 1)).await.expect("pool starts");
        warm.shutdown().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss_bytes();
        let big = Pool::start(echo_spec(&python, idle, 1).start_timeout(Duration::from_secs(120))).await.expect("pool starts");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let per = (rss_bytes().saturating_sub(before)) as f64 / idle as f64 / 1024.0;
        big.shutdown().await;
        Some(Row {
            name: format!("Rust-side memory per idle worker (RSS rise 0 → {idle} workers)"),
            unit: "KiB",
            floor: f64::NAN,
            pyvisor: per,
            ratio: f64::NAN,
            target: "≤ 256 KiB".into(),
            met: Some(per <= 256.0),
        })
    } else {
        None
    };

    let mut floor = match Floor::start(&python, &python_dir().join("floor.py"), &[]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot start the floor: {e}");
            return ExitCode::from(2);
        }
    };
    let seq_pool = Pool::start(echo_spec(&python, 1, 1)).await.expect("pool starts");
    let pipe_pool = Pool::start(echo_spec(&python, 1, 64)).await.expect("pool starts");
    let small = payload(100);
    // Warm up both sides.
    let _ = floor.sequential(&small, 500);
    let _ = pyvisor_sequential(&seq_pool, &small, 500, Unit::Micros).await;

    let mut rows = Vec::new();
    let mut json = serde_json::Map::new();

    // Sequential and pipelined, interleaved.
    let mut floor_abs = None;
    if want("sequential") {
        let (mut fs, mut ps, mut pb) = (histogram(), histogram(), histogram());
        let (mut fthr, mut pthr) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            eprintln!("round {}/{rounds}: sequential and pipelined", r + 1);
            let _ = fs.add(floor.sequential(&small, seq_n));
            let _ = ps.add(&pyvisor_sequential(&seq_pool, &small, seq_n, Unit::Micros).await);
            let _ = pb.add(&pyvisor_sequential_blocking(&seq_pool, &small, seq_n, Unit::Micros).await);
            let (e, _) = floor.pipelined(&small, pipe_n, 64);
            fthr.push(pipe_n as f64 / e.as_secs_f64());
            let (e, _) = pyvisor_concurrent(&pipe_pool, &small, pipe_n, 64).await;
            pthr.push(pipe_n as f64 / e.as_secs_f64());
        }
        let (f50, p50) = (fs.value_at_quantile(0.5) as f64, ps.value_at_quantile(0.5) as f64);
        let (f99, p99) = (fs.value_at_quantile(0.99) as f64, ps.value_at_quantile(0.99) as f64);
        let (ft, pt) = (median(&mut fthr), median(&mut pthr));
        rows.push(row("sequential p50 (1 worker, 1 caller, 100 B)", "µs", f50, p50, Some(("≤ 1.2×", p50 <= 1.2 * f50))));
        rows.push(row("sequential p99", "µs", f99, p99, None));
        rows.push(row("sequential p50, caller blocking the main thread (block_on)", "µs", f50, pb.value_at_quantile(0.5) as f64, None));
        rows.push(row("pipelined throughput (1 worker, 64 callers, max_in_flight 64)", "calls/s", ft, pt, Some(("≥ 0.6×", pt >= 0.6 * ft))));
        floor_abs = Some((f50, f99, ft));
    }

    // Streaming: one generator's items against the floor's pipelined calls, same 100 B values.
    if want("streaming") {
        let item: String = rmp_serde::from_slice(&small).expect("the payload is a string");
        let (mut fl, mut st) = (Vec::new(), Vec::new());
        let _ = pyvisor_stream(&seq_pool, &item, pipe_n / 10).await;
        for r in 0..rounds {
            eprintln!("round {}/{rounds}: streaming", r + 1);
            let (e, _) = floor.pipelined(&small, pipe_n, 64);
            fl.push(pipe_n as f64 / e.as_secs_f64());
            let e = pyvisor_stream(&seq_pool, &item, pipe_n).await;
            st.push(pipe_n as f64 / e.as_secs_f64());
        }
        let (f, s) = (median(&mut fl), median(&mut st));
        let name = format!("streamed items (1 generator, 100 B, credit {}) vs floor pipelined", pyvisor_core::DEFAULT_STREAM_CREDIT);
        rows.push(row(&name, "items/s", f, s, Some(("≥ 0.8×", s >= 0.8 * f))));
    }

    // Scaling: 2 and 4 workers, 64 callers, against the one-process floor.
    for workers in [2usize, 4].into_iter().filter(|_| want("scaling")) {
        let pool = Pool::start(echo_spec(&python, workers, 64)).await.expect("pool starts");
        let _ = pyvisor_concurrent(&pool, &small, pipe_n / 10, 64).await;
        let mut thr = Vec::new();
        let mut fl = Vec::new();
        for r in 0..rounds {
            eprintln!("round {}/{rounds}: scaling, {workers} workers", r + 1);
            let (e, _) = floor.pipelined(&small, pipe_n, 64);
            fl.push(pipe_n as f64 / e.as_secs_f64());
            let (e, _) = pyvisor_concurrent(&pool, &small, pipe_n, 64).await;
            thr.push(pipe_n as f64 / e.as_secs_f64());
        }
        rows.push(row(&format!("throughput, {workers} workers, 64 callers (vs 1-process floor)"), "calls/s", median(&mut fl), median(&mut thr), None));
        pool.shutdown().await;
    }

    // Payload sizes, sequential.
    for (label, size) in [("100 B", 100usize), ("10 KiB", 10 * 1024), ("1 MiB", 1 << 20)].into_iter().filter(|_| want("payloads")) {
        let p = payload(size);
        let n = if size >= 1 << 20 { seq_n / 20 } else { seq_n / 2 }.max(10);
        let (a, b) = sequential_p50s(&mut floor, &seq_pool, &p, n, rounds, &format!("payload {label}")).await;
        if size < 1 << 20 {
            rows.push(row(&format!("sequential p50, payload {label}"), "µs", a, b, None));
            continue;
        }
        // The target is judged like for like: against the floor's interpreter started with the
        // allocator settings pyvisor gives its workers (without them the floor's own loop faults
        // its 1 MiB pages in again on every call), so the ratio is the data path's alone.
        let allocator = [
            ("MALLOC_TOP_PAD_", pyvisor_core::WORKER_MALLOC_TOP_PAD.to_string()),
            ("MALLOC_MMAP_THRESHOLD_", pyvisor_core::WORKER_MALLOC_MMAP_THRESHOLD.to_string()),
        ];
        match Floor::start(&python, &python_dir().join("floor.py"), &allocator) {
            Ok(mut padded) => {
                rows.push(row(&format!("sequential p50, payload {label}, floor as it is"), "µs", a, b, None));
                let _ = padded.sequential(&p, 5);
                let what = format!("payload {label}, floor with the workers' allocator settings");
                let (a, b) = sequential_p50s(&mut padded, &seq_pool, &p, n, rounds, &what).await;
                let name = format!("sequential p50, payload {label} (floor with the workers' allocator settings)");
                rows.push(row(&name, "µs", a, b, Some(("≤ 1.3×", b <= 1.3 * a))));
            }
            Err(e) => {
                eprintln!("warning: cannot start the floor with the workers' allocator settings: {e}");
                rows.push(row(&format!("sequential p50, payload {label}"), "µs", a, b, Some(("≤ 1.3×", b <= 1.3 * a))));
            }
        }
    }

    if want("buffers") {
        buffers_scenario(&python, quick, rounds, &mut rows).await;
    }

    // Latency vs concurrency (the plot).
    let mut curve = Vec::new();
    for c in [1usize, 4, 16, 64].into_iter().filter(|_| want("curve")) {
        let pool = Pool::start(echo_spec(&python, 1, c)).await.expect("pool starts");
        let n = if quick { 1_000 } else { 20_000 };
        let _ = pyvisor_concurrent(&pool, &small, n / 10, c).await;
        let (_, fh) = floor.pipelined(&small, n, c);
        let (_, ph) = pyvisor_concurrent(&pool, &small, n, c).await;
        curve.push((c, fh.value_at_quantile(0.5), ph.value_at_quantile(0.5)));
        pool.shutdown().await;
    }
    if !curve.is_empty() {
        if let Some(dir) = args.plot.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = plot::latency_vs_concurrency(&args.plot, &curve) {
            eprintln!("warning: plot not written: {e}");
        }
    }
    json.insert("latency_vs_concurrency".into(), serde_json::json!(curve.iter().map(|(c, f, p)| serde_json::json!({"concurrency": c, "floor_p50_us": f, "pyvisor_p50_us": p})).collect::<Vec<_>>()));
    drop(floor);

    // Tracing off vs on, each side in a child process of the same shape; on = every span
    // exported over OTLP/gRPC to a receiver in this process.
    if want("tracing") {
        let sink = match otlp_sink::OtlpSink::start().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: cannot start the OTLP receiver: {e}");
                return ExitCode::from(2);
            }
        };
        let mut exported = Vec::new();
        let exe = std::env::current_exe().expect("own path");
        let (mut off, mut on, mut on_sdk) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            eprintln!("round {}/{rounds}: tracing off / on / on with the workers' OpenTelemetry SDK", r + 1);
            for (mode, p50s) in [("off", &mut off), ("on", &mut on), ("on-sdk", &mut on_sdk)] {
                let mut cmd = tokio::process::Command::new(&exe);
                cmd.args(["--child-tracing", mode, "--tracing-layout", &args.tracing_layout, "--endpoint", &sink.endpoint(), "--calls", &seq_n.to_string(), "--python"])
                    .arg(&python)
                    .env("PYVISOR_LOG", "warn")
                    // Every span exported, none dropped: queues large enough for a whole run
                    // (the standard variables; both the Rust and the Python SDK read them).
                    .env("OTEL_BSP_MAX_QUEUE_SIZE", "65536")
                    .env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2048")
                    .env("OTEL_BSP_SCHEDULE_DELAY", "200");
                let before = sink.spans();
                let text = match cmd.stderr(std::process::Stdio::inherit()).output().await {
                    Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
                    Err(e) => {
                        eprintln!("error: the tracing child did not run: {e}");
                        return ExitCode::from(2);
                    }
                };
                if mode != "off" {
                    exported.push((sink.spans() - before) as f64 / (seq_n + TRACING_WARMUP) as f64);
                }
                let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
                p50s.push(v["p50"].as_f64().unwrap_or(f64::NAN));
                eprintln!(
                    "  {mode}: p50 {:.1} µs, CPU per call: parent {:.1} µs, worker {:.1} µs",
                    v["p50"].as_f64().unwrap_or(f64::NAN),
                    v["cpu_us"].as_f64().unwrap_or(f64::NAN),
                    v["worker_cpu_us"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
        let (a, b, c) = (median(&mut off), median(&mut on), median(&mut on_sdk));
        let per_call = median(&mut exported);
        eprintln!("tracing: the receiver got {per_call:.2} spans per call (median over the traced runs)");
        json.insert("tracing_spans_per_call".into(), per_call.into());
        rows.push(row("tracing on vs off (every call sampled and exported; workers without OpenTelemetry)", "µs", a, b, Some(("≤ 1.15×", b <= 1.15 * a))));
        rows.push(row("tracing on vs off (every call sampled and exported; workers' OpenTelemetry SDK active)", "µs", a, c, Some(("≤ 1.15×", c <= 1.15 * a))));
    }

    // Cold start: a pool of 4 vs 4 bare interpreters importing the adapter.
    if want("start") {
        let (mut bare, mut pool_start) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            bare.push(bare_interpreters(&python, 4).await.as_secs_f64() * 1e3);
            let t = Instant::now();
            let p = Pool::start(echo_spec(&python, 4, 1)).await.expect("pool starts");
            pool_start.push(t.elapsed().as_secs_f64() * 1e3);
            p.shutdown().await;
        }
        rows.push(row("cold start, 4 workers (floor: 4 bare interpreters importing the adapter)", "ms", median(&mut bare), median(&mut pool_start), None));
    }

    // Recovery: SIGKILL to a ready replacement, vs one bare interpreter start.
    if want("recovery") {
        let ready_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let r2 = ready_at.clone();
        let spec = echo_spec(&python, 1, 1).heartbeat_interval(Duration::from_secs(3600)).on_event(move |e| {
            if let PoolEvent::WorkerReady { .. } = e {
                if let Ok(mut g) = r2.lock() {
                    *g = Some(Instant::now());
                }
            }
        });
        let rec_pool = Pool::start(spec).await.expect("pool starts");
        let (mut bare1, mut recover) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            bare1.push(bare_interpreters(&python, 1).await.as_secs_f64() * 1e3);
            *ready_at.lock().expect("lock") = None;
            let t = Instant::now();
            rec_pool.chaos().kill(None);
            loop {
                if let Some(at) = *ready_at.lock().expect("lock") {
                    recover.push(at.duration_since(t).as_secs_f64() * 1e3);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rows.push(row("recovery: SIGKILL to ready replacement (floor: 1 bare interpreter start)", "ms", median(&mut bare1), median(&mut recover), None));
        rec_pool.shutdown().await;
    }
    seq_pool.shutdown().await;
    pipe_pool.shutdown().await;

    rows.extend(memory_row);

    // Report.
    println!("\npyvisor-bench{} — {}", if quick { " (quick: figures not meaningful)" } else { "" }, machine());
    println!("python: {}", python.display());
    if let Some((f50, f99, ft)) = floor_abs {
        println!(
            "raw floor, absolute: sequential p50 {f50:.0} µs (anchor ≈ 60 µs), p99 {f99:.0} µs; pipelined ×64 {ft:.0} calls/s (anchor ≈ 170k calls/s)\n"
        );
    }
    println!("{:<80} {:>12} {:>12} {:>8}  {:<10} met", "scenario", "floor", "pyvisor", "ratio", "target");
    for r in &rows {
        println!(
            "{:<80} {:>12} {:>12} {:>8}  {:<10} {}",
            format!("{} [{}]", r.name, r.unit),
            if r.floor.is_nan() { "-".into() } else { format!("{:.1}", r.floor) },
            format!("{:.1}", r.pyvisor),
            if r.ratio.is_nan() { "-".into() } else { format!("{:.2}×", r.ratio) },
            r.target,
            r.met.map_or("", |m| if m { "yes" } else { "NO" })
        );
    }
    json.insert("machine".into(), machine().into());
    json.insert("quick".into(), quick.into());
    json.insert(
        "rows".into(),
        serde_json::json!(rows
            .iter()
            .map(|r| serde_json::json!({"scenario": r.name, "unit": r.unit, "floor": r.floor, "pyvisor": r.pyvisor, "ratio": r.ratio, "target": r.target, "met": r.met}))
            .collect::<Vec<_>>()),
    );
    let json_path = args.json.clone().unwrap_or_else(|| {
        let name = if args.only.is_empty() { "results".to_string() } else { format!("results-{}", args.only.join("-")) };
        PathBuf::from("target/bench").join(format!("{name}.json"))
    });
    if let Some(dir) = json_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(&json_path, serde_json::to_string_pretty(&serde_json::Value::Object(json)).unwrap_or_default()) {
        eprintln!("warning: {} not written: {e}", json_path.display());
    }
    println!("\nresults: {}  plot: {}", json_path.display(), args.plot.display());
    ExitCode::SUCCESS
}

//! `pyvisor-cluster-bench`: what a call across nodes costs (issue 17), as a ratio against
//! baselines measured in the same run, round by round, on the same 100 B MessagePack payload:
//!
//! - **local**: sequential calls of `echo` on a `pyvisor_core::Pool` of 1 worker in this
//!   process (`bench/echo.py`);
//! - **raw TCP**: sequential request/reply of the same bytes over 127.0.0.1 (length-prefixed
//!   frames, `TCP_NODELAY` on both ends) to a minimal echo server in a process of its own (this
//!   binary re-executed with a hidden flag: the remote path crosses from one process to another,
//!   so its baseline does too, and the server's thread never competes with this process's
//!   runtime for its scheduling);
//! - **remote**: sequential `RemotePool::call_raw` from node A (this process) to pool `bench`
//!   on node B, a `pyvisor-cluster-node` process serving it with 1 worker (over A's call
//!   channel to B).
//!
//! The target: remote p50 ≤ 1.5 × (local p50 + raw TCP p50). Two more paths, not judged, are
//! references: **ractor_cluster alone**, an `EchoMsg::Call` RPC from A to an actor on node R
//! (this binary re-executed as a node) that answers with the bytes it got — what the same round
//! trip costs on ractor_cluster's own messaging, which calls travelled on before the call
//! channels; and **A's own member**, a `RemotePool` call on A whose member is A's own (the local
//! pool, served on A as well: called directly, without the wire, so this row is the cost of
//! routing, the span and the counting around a local call). The sequential paths take turns in
//! slices of 50 calls, so what the machine does meanwhile falls on all of them alike.
//!
//! `--pin-cpu N` runs every process of the benchmark (this one, the nodes, their Python
//! workers, the echo server) on one CPU. On a small VM a wake-up of an idle virtual CPU costs
//! tens of µs and lands on whichever path happened to cross CPUs; on one CPU a hand-off between
//! processes is a context switch, and the figures repeat from run to run. `make bench-cluster`
//! pins to the last CPU; docs/benchmarks.md gives both.
//!
//! Then throughput: 16 callers on A against one hosting node (B's `bench`, 1 worker) and against
//! two (pool `pair`, 1 worker on B and 1 on C), reported, not judged (every node shares the
//! machine's cores). Hosting nodes are separate processes: ractor's process groups are global to
//! a process, so a pool served in this one would be local to A.
//!
//! Owns the benchmark: the echo server, the ractor echo node, the node processes it starts (and
//! stops; without OpenTelemetry export, logs at `warn`), the report (progress on stderr, the
//! table on stdout, `--json`). Timing claims live here, never in tests: CI runs `--quick`
//! (tests/bench_smoke.rs) to see that it runs and prints the ratio.
//!
//! Run: `make bench-cluster` (release build; docs/benchmarks.md, "Across nodes").

use std::collections::hash_map::RandomState;
use std::error::Error;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use pyvisor_cluster::{Node, NodeConfig, RemotePool};
use pyvisor_core::{CallOptions, Interpreter, Pool, PoolSpec};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};

#[derive(Parser, Debug)]
#[command(name = "pyvisor-cluster-bench", about = "A remote call against a local call plus a raw TCP round trip, in one run")]
struct Args {
    /// Rounds (local, raw TCP and remote alternate within each) [default: 5; 2 with --quick].
    #[arg(long)]
    rounds: Option<usize>,
    /// Sequential calls per path per round [default: 3000; 100 with --quick].
    #[arg(long)]
    calls: Option<usize>,
    /// Calls per throughput measurement (16 callers share them) [default: 20000; 400 with --quick].
    #[arg(long)]
    throughput_calls: Option<usize>,
    /// Python interpreter with pyvisor_worker [default: $PYVISOR_PYTHON, else the repo's .venv/bin/python].
    #[arg(long)]
    python: Option<PathBuf>,
    /// The node binary [default: pyvisor-cluster-node next to this executable].
    #[arg(long)]
    node_binary: Option<PathBuf>,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run every process of the benchmark on this CPU (they inherit it): stable figures on a
    /// small VM, where waking an idle virtual CPU costs more than the paths measured.
    #[arg(long)]
    pin_cpu: Option<usize>,
    /// Small counts: checks that the benchmark runs (CI), figures are not meaningful.
    #[arg(long)]
    quick: bool,
    /// (internal) be the raw TCP echo server: print `listening PORT`, echo one connection.
    #[arg(long, hide = true)]
    tcp_echo_server: bool,
    /// (internal) be the ractor echo node: a node on `--listen` whose actor echoes the bytes
    /// of every `EchoMsg::Call`, connected to `--join`; runs until stdin ends.
    #[arg(long, hide = true)]
    ractor_echo_node: bool,
    /// (internal) the ractor echo node's address.
    #[arg(long, hide = true)]
    listen: Option<SocketAddr>,
    /// (internal) the node the ractor echo node connects to.
    #[arg(long, hide = true)]
    join: Option<SocketAddr>,
    /// (internal) the ractor echo node's cookie file.
    #[arg(long, hide = true)]
    cookie_file: Option<PathBuf>,
}

/// Concurrent callers on node A in the throughput measurements.
const CALLERS: usize = 16;
/// Payload size: a MessagePack string of exactly this many bytes.
const PAYLOAD_BYTES: usize = 100;
/// Sequential calls per path in one slice of a round (the paths take turns slice by slice).
const SLICE: usize = 50;
/// The remote-over-baseline target (remote p50 ≤ this × (local p50 + raw TCP p50)).
const TARGET: f64 = 1.5;
/// The largest frame the echo server accepts (a guard against a garbled length).
const MAX_ECHO_FRAME: usize = 16 << 20;
/// How long a node process may take to say `ready`, and members to appear on A (guards).
const START_GUARD: Duration = Duration::from_secs(60);

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

fn main() -> ExitCode {
    let args = Args::parse();
    if args.tcp_echo_server {
        return match tcp_echo_server() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pyvisor-cluster-bench (echo server): {e}");
                ExitCode::from(1)
            }
        };
    }
    // Before the runtime and any process start: they all inherit it.
    if let Some(cpu) = args.pin_cpu {
        if let Err(e) = pin_to(cpu) {
            eprintln!("pyvisor-cluster-bench: error: cannot pin to CPU {cpu}: {e}");
            return ExitCode::from(2);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pyvisor-cluster-bench: error: no tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = if args.ractor_echo_node { rt.block_on(ractor_echo_node(&args)) } else { rt.block_on(run(args)) };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pyvisor-cluster-bench: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Run this process (and what it starts from now on) on CPU `cpu` only.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no such CPU"));
    }
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it (cpu < CPU_SETSIZE),
    // and sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Per-call latencies in nanoseconds (printed in µs with one decimal).
fn histogram() -> Histogram<u64> {
    // Static bounds (1 ns to 60 s, 3 significant digits): cannot fail.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap_or_else(|_| unreachable!("static histogram bounds"))
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
}

fn micros(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

async fn run(args: Args) -> BenchResult<()> {
    let quick = args.quick;
    let rounds = args.rounds.unwrap_or(if quick { 2 } else { 5 }).max(1);
    let calls = args.calls.unwrap_or(if quick { 100 } else { 3_000 }).max(1);
    let tput_calls = args.throughput_calls.unwrap_or(if quick { 400 } else { 20_000 }).max(CALLERS);
    let warmup = if quick { 20 } else { 300 };

    let python = python(args.python.clone())?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/echo.py");
    if !script.is_file() {
        return Err(format!("the benchmark's worker {} is missing", script.display()).into());
    }
    let node_bin = node_binary(args.node_binary.clone())?;
    let payload: Arc<Vec<u8>> = Arc::new(rmp_serde::to_vec(&"x".repeat(PAYLOAD_BYTES - 2))?);
    let load_before = loadavg();
    eprintln!(
        "pyvisor-cluster-bench: {rounds} rounds, {calls} sequential calls per path and {tput_calls} throughput calls ({CALLERS} callers) per round{}",
        if quick { " (quick)" } else { "" }
    );

    let scratch = Scratch::new()?;
    let cookie = format!("{:016x}{:016x}", RandomState::new().build_hasher().finish(), RandomState::new().build_hasher().finish());
    let cookie_file = scratch.write_secret("cookie", &cookie)?;

    // Every path, started before anything is measured.
    eprintln!("starting: raw TCP echo server, local pool, node A, nodes B and C, ractor echo node R");
    let tcp = Arc::new(Mutex::new(TcpEcho::start()?));
    let local = Pool::start(PoolSpec::script(&script).python(&python).name("bench-local").workers(1))
        .await
        .map_err(|e| format!("the local pool did not start (is pyvisor_worker installed in {}?): {e}", python.display()))?;
    let a = Node::start(NodeConfig::new("a", free_addr()?, &cookie)?).await?;
    let (b_addr, c_addr) = (free_addr()?, free_addr()?);
    let bench_pool = format!("bench={}", script.display());
    let pair_pool = format!("pair={}", script.display());
    let b = NodeProcess::pyvisor_node(&node_bin, "b", b_addr, &cookie_file, a.listen_addr(), &[&bench_pool, &pair_pool], &python)?;
    let c = NodeProcess::pyvisor_node(&node_bin, "c", c_addr, &cookie_file, a.listen_addr(), &[&pair_pool], &python)?;
    let echo_node = NodeProcess::ractor_echo_node(free_addr()?, &cookie_file, a.listen_addr())?;
    let (b_ready, c_ready, r_ready) = tokio::join!(b.ready(), c.ready(), echo_node.ready());
    b_ready?;
    c_ready?;
    r_ready?;
    // The local pool served on A too: a RemotePool of its name takes A's own member (the remote
    // layer without the network).
    let served = a.serve(local.clone()).await?;
    let own = Arc::new(RemotePool::new(&a, "bench-local"));
    let bench = Arc::new(RemotePool::new(&a, "bench"));
    let pair = Arc::new(RemotePool::new(&a, "pair"));
    let want_bench = vec!["b@127.0.0.1".to_string()];
    let want_pair = vec!["b@127.0.0.1".to_string(), "c@127.0.0.1".to_string()];
    let raw_echo = || ractor::pg::get_members(&RAW_ECHO_GROUP.to_string()).into_iter().find(|m| !m.get_id().is_local());
    let until = Instant::now() + START_GUARD;
    while bench.members() != want_bench || pair.members() != want_pair || raw_echo().is_none() {
        if Instant::now() > until {
            let echo = if raw_echo().is_some() { "present" } else { "absent" };
            return Err(format!(
                "the hosting nodes' pools did not appear on A: bench {:?}, pair {:?}, ractor echo {echo}",
                bench.members(),
                pair.members()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Warm-up, and proof that every path echoes the payload unchanged.
    eprintln!("warm-up: {warmup} calls per path");
    check_echo("local", &local.call_raw("echo", &payload, local_opts()).await?, &payload)?;
    check_echo("raw TCP", &tcp_sequential(&tcp, &payload, 1).await?.1, &payload)?;
    check_echo("remote", &bench.call_raw("echo", &payload, remote_opts()).await?, &payload)?;
    check_echo("remote pair", &pair.call_raw("echo", &payload, remote_opts()).await?, &payload)?;
    check_echo("ractor echo", &ractor_sequential(&payload, 1).await?.1, &payload)?;
    check_echo("own member", &own.call_raw("echo", &payload, remote_opts()).await?, &payload)?;
    local_sequential(&local, &payload, warmup).await?;
    tcp_sequential(&tcp, &payload, warmup).await?;
    remote_sequential(&bench, &payload, warmup).await?;
    ractor_sequential(&payload, warmup).await?;
    remote_sequential(&own, &payload, warmup).await?;
    throughput(&bench, &payload, warmup.max(CALLERS)).await?;
    throughput(&pair, &payload, warmup.max(CALLERS)).await?;

    let (mut lh, mut th, mut rh, mut xh, mut oh) = (histogram(), histogram(), histogram(), histogram(), histogram());
    let (mut one_h, mut two_h) = (histogram(), histogram());
    let mut per_round = Vec::new();
    let (mut one_rates, mut two_rates) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        // The sequential paths interleaved in slices of `SLICE` calls, the first one rotating
        // from slice to slice: what the machine does meanwhile (its cores' idle states, other
        // processes) falls on every path alike, not on whichever ran while it lasted.
        let (mut l, mut t, mut m, mut x, mut o) = (histogram(), histogram(), histogram(), histogram(), histogram());
        let mut done = 0;
        let mut slice_no = r;
        while done < calls {
            let n = SLICE.min(calls - done);
            for k in 0..5 {
                match (slice_no + k) % 5 {
                    0 => l.add(&local_sequential(&local, &payload, n).await?)?,
                    1 => t.add(&tcp_sequential(&tcp, &payload, n).await?.0)?,
                    2 => m.add(&remote_sequential(&bench, &payload, n).await?)?,
                    3 => x.add(&ractor_sequential(&payload, n).await?.0)?,
                    _ => o.add(&remote_sequential(&own, &payload, n).await?)?,
                }
            }
            done += n;
            slice_no += 1;
        }
        // Then throughput, one node and two alternating which goes first.
        let (one, two) = if r % 2 == 0 {
            let one = throughput(&bench, &payload, tput_calls).await?;
            (one, throughput(&pair, &payload, tput_calls).await?)
        } else {
            let two = throughput(&pair, &payload, tput_calls).await?;
            (throughput(&bench, &payload, tput_calls).await?, two)
        };
        let (lp, tp, mp, xp, op) = (micros(&l, 0.5), micros(&t, 0.5), micros(&m, 0.5), micros(&x, 0.5), micros(&o, 0.5));
        eprintln!(
            "round {}/{rounds}: p50 local {lp:.1} µs, raw TCP {tp:.1} µs, remote {mp:.1} µs ({:.2}× of the sum), ractor echo {xp:.1} µs, own member {op:.1} µs; throughput 1 node {:.0}/s, 2 nodes {:.0}/s",
            r + 1,
            mp / (lp + tp),
            one.0,
            two.0
        );
        per_round.push(serde_json::json!({
            "local_p50_us": lp, "tcp_p50_us": tp, "remote_p50_us": mp, "ratio": mp / (lp + tp), "ractor_echo_p50_us": xp, "own_member_p50_us": op,
            "throughput_one_node": one.0, "throughput_two_nodes": two.0,
        }));
        lh.add(&l)?;
        th.add(&t)?;
        rh.add(&m)?;
        xh.add(&x)?;
        oh.add(&o)?;
        one_h.add(&one.1)?;
        two_h.add(&two.1)?;
        one_rates.push(one.0);
        two_rates.push(two.0);
    }
    let load_after = loadavg();

    // Stop everything before reporting: the node processes first (SIGTERM; a member A stops
    // serving while they are connected makes ractor_cluster warn on their side), then A's
    // member, the pool, node A, the echo server.
    drop(b);
    drop(c);
    drop(echo_node);
    drop(served);
    local.shutdown().await;
    a.shutdown().await;
    drop(tcp);

    let (l50, t50, r50, x50, o50) = (micros(&lh, 0.5), micros(&th, 0.5), micros(&rh, 0.5), micros(&xh, 0.5), micros(&oh, 0.5));
    let ratio = r50 / (l50 + t50);
    let met = ratio <= TARGET;
    let (one, two) = (median(&one_rates), median(&two_rates));
    let range = |v: &[f64]| format!("{:.0}–{:.0}", v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max));

    println!("\npyvisor-cluster-bench{} — {}", if quick { " (quick: figures not meaningful)" } else { "" }, machine());
    println!("python: {}", python.display());
    println!("payload: {PAYLOAD_BYTES} B MessagePack string; {rounds} rounds × {calls} sequential calls per path; p50/p99 over all rounds");
    println!("load average (1, 5, 15 min): before {load_before}, after {load_after}");
    match args.pin_cpu {
        Some(cpu) => println!("CPUs: every process of the benchmark pinned to CPU {cpu}\n"),
        None => println!("CPUs: not pinned (figures vary with where each process wakes)\n"),
    }
    println!("{:<66} {:>10} {:>10}", "sequential path", "p50 µs", "p99 µs");
    let line = |name: &str, h: &Histogram<u64>| println!("{name:<66} {:>10.1} {:>10.1}", micros(h, 0.5), micros(h, 0.99));
    line("local pyvisor (Pool, 1 worker, in this process)", &lh);
    line("raw TCP request/reply (127.0.0.1, echo server in another process)", &th);
    println!("{:<66} {:>10.1}", "local + raw TCP", l50 + t50);
    line("remote: node A → node B (pool `bench`, 1 worker)", &rh);
    println!("\nremote / (local + raw TCP) p50: {ratio:.2}× (target ≤ {TARGET}×: {})", if met { "met" } else { "missed" });
    println!("\nreferences (p50s do not add up exactly: indicative)");
    line("ractor_cluster RPC alone: node A → node R, an actor echoes the bytes", &xh);
    line("RemotePool → A's own member (its pool called directly)", &oh);
    println!("{:<66} {:>10.1}", "remote − local pyvisor − raw TCP", r50 - l50 - t50);
    println!(
        "\nthroughput, {CALLERS} callers on A, {tput_calls} calls per round, median of rounds (not judged: every node shares this machine's cores)"
    );
    println!("{:<66} {:>10} {:>15} {:>10}", "hosting", "calls/s", "rounds", "p50 µs");
    println!("{:<66} {:>10.0} {:>15} {:>10.1}", "1 node (B, pool `bench`, 1 worker)", one, range(&one_rates), micros(&one_h, 0.5));
    println!("{:<66} {:>10.0} {:>15} {:>10.1}", "2 nodes (B and C, pool `pair`, 1 worker each)", two, range(&two_rates), micros(&two_h, 0.5));
    println!("2 nodes / 1 node: {:.2}×", two / one);

    if let Some(path) = &args.json {
        let figures = serde_json::json!({
            "machine": machine(),
            "python": python.display().to_string(),
            "quick": quick,
            "rounds": rounds,
            "calls_per_round": calls,
            "payload_bytes": PAYLOAD_BYTES,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "pinned_cpu": args.pin_cpu,
            "local": {"p50_us": l50, "p99_us": micros(&lh, 0.99)},
            "raw_tcp": {"p50_us": t50, "p99_us": micros(&th, 0.99)},
            "remote": {"p50_us": r50, "p99_us": micros(&rh, 0.99)},
            "ractor_echo": {"p50_us": x50, "p99_us": micros(&xh, 0.99)},
            "own_member": {"p50_us": o50, "p99_us": micros(&oh, 0.99)},
            "ratio_remote_over_local_plus_tcp": ratio,
            "target": TARGET,
            "met": met,
            "throughput": {
                "callers": CALLERS,
                "calls_per_round": tput_calls,
                "one_node": {"hosts": "b", "workers_per_node": 1, "calls_per_s": one, "rounds": one_rates, "p50_us": micros(&one_h, 0.5), "p99_us": micros(&one_h, 0.99)},
                "two_nodes": {"hosts": "b, c", "workers_per_node": 1, "calls_per_s": two, "rounds": two_rates, "p50_us": micros(&two_h, 0.5), "p99_us": micros(&two_h, 0.99)},
            },
            "per_round": per_round,
        });
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&figures)?).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("\nfigures: {}", path.display());
    }
    Ok(())
}

/// The interpreter: `--python`, else `PYVISOR_PYTHON`, else the repo's `.venv`; checked to exist.
fn python(explicit: Option<PathBuf>) -> BenchResult<PathBuf> {
    let configured = explicit
        .or_else(|| std::env::var_os("PYVISOR_PYTHON").filter(|p| !p.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"));
    Interpreter::from_option(Some(configured.clone())).resolve().map_err(|_| {
        format!("no Python interpreter at {}: run `make setup` (it creates .venv), or pass --python / set PYVISOR_PYTHON", configured.display())
            .into()
    })
}

/// `pyvisor-cluster-node`: `--node-binary`, else next to this executable (cargo builds both
/// into the same directory).
fn node_binary(explicit: Option<PathBuf>) -> BenchResult<PathBuf> {
    let bin = match explicit {
        Some(p) => p,
        None => {
            let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
            exe.parent().map(|d| d.join("pyvisor-cluster-node")).ok_or("this executable has no directory")?
        }
    };
    if !bin.is_file() {
        return Err(format!(
            "no node binary at {}: build it with `cargo build --release -p pyvisor-cluster --bins` (the profile of this bench), or pass --node-binary",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

fn local_opts() -> CallOptions {
    CallOptions::new().timeout(Duration::from_secs(30)).idempotent(true)
}

fn remote_opts() -> CallOptions {
    CallOptions::new().timeout(Duration::from_secs(30)).idempotent(true)
}

/// The echo gave back exactly what was sent.
fn check_echo(path: &str, back: &[u8], sent: &[u8]) -> BenchResult<()> {
    if back != sent {
        let (b, s): (Result<String, _>, Result<String, _>) = (rmp_serde::from_slice(back), rmp_serde::from_slice(sent));
        if b.is_err() || b.ok() != s.ok() {
            return Err(format!("{path}: the echo answered {} bytes that are not the {} sent", back.len(), sent.len()).into());
        }
    }
    Ok(())
}

fn short_reply(path: &str, got: usize) -> Box<dyn Error + Send + Sync> {
    format!("{path}: a reply of {got} bytes instead of {PAYLOAD_BYTES}").into()
}

/// `n` sequential calls on the local pool.
async fn local_sequential(pool: &Pool, payload: &Arc<Vec<u8>>, n: usize) -> BenchResult<Histogram<u64>> {
    let pool = pool.clone();
    sequential("local", payload, n, move |p| {
        let pool = pool.clone();
        async move { pool.call_raw("echo", &p, local_opts()).await }
    })
    .await
}

/// `n` sequential calls from node A to `remote`.
async fn remote_sequential(remote: &Arc<RemotePool>, payload: &Arc<Vec<u8>>, n: usize) -> BenchResult<Histogram<u64>> {
    let remote = Arc::clone(remote);
    sequential("remote", payload, n, move |p| {
        let remote = Arc::clone(&remote);
        async move { remote.call_raw("echo", &p, remote_opts()).await }
    })
    .await
}

/// `n` sequential echoes of `payload` on one path (`call` makes one), from a task on the
/// runtime (as a service's request handler calls: the reply's reader task wakes it).
async fn sequential<C, F, E>(path: &'static str, payload: &Arc<Vec<u8>>, n: usize, call: C) -> BenchResult<Histogram<u64>>
where
    C: Fn(Arc<Vec<u8>>) -> F + Send + 'static,
    F: std::future::Future<Output = Result<bytes::Bytes, E>> + Send,
    E: std::fmt::Display,
{
    let payload = Arc::clone(payload);
    tokio::spawn(async move {
        let mut h = histogram();
        for _ in 0..n {
            let p = Arc::clone(&payload);
            let t = Instant::now();
            let back = call(p).await.map_err(|e| format!("{path} echo: {e}"))?;
            record(&mut h, t.elapsed());
            if back.len() != payload.len() {
                return Err(short_reply(path, back.len()));
            }
        }
        Ok(h)
    })
    .await?
}

/// `n` calls shared by [`CALLERS`] concurrent callers on A: calls/s and per-call latencies.
async fn throughput(remote: &Arc<RemotePool>, payload: &Arc<Vec<u8>>, n: usize) -> BenchResult<(f64, Histogram<u64>)> {
    let left = Arc::new(AtomicUsize::new(n));
    let started = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (remote, payload, left) = (Arc::clone(remote), Arc::clone(payload), Arc::clone(&left));
            tokio::spawn(async move {
                let mut h = histogram();
                while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1)).is_ok() {
                    let t = Instant::now();
                    let back = remote.call_raw("echo", &payload, remote_opts()).await.map_err(|e| format!("remote echo under load: {e}"))?;
                    record(&mut h, t.elapsed());
                    if back.len() != payload.len() {
                        return Err(short_reply("remote under load", back.len()));
                    }
                }
                Ok::<_, Box<dyn Error + Send + Sync>>(h)
            })
        })
        .collect();
    let mut h = histogram();
    for caller in callers {
        h.add(&caller.await??)?;
    }
    Ok((n as f64 / started.elapsed().as_secs_f64(), h))
}

/// `n` sequential raw request/reply round trips (on a blocking thread: a plain client that
/// sleeps in `read`, no runtime); the latencies and the last reply.
async fn tcp_sequential(tcp: &Arc<Mutex<TcpEcho>>, payload: &Arc<Vec<u8>>, n: usize) -> BenchResult<(Histogram<u64>, Vec<u8>)> {
    let (tcp, payload) = (Arc::clone(tcp), Arc::clone(payload));
    tokio::task::spawn_blocking(move || {
        let mut tcp = tcp.lock().map_err(|_| "the raw TCP client's lock is poisoned")?;
        let mut frame = u32::try_from(payload.len())?.to_be_bytes().to_vec();
        frame.extend_from_slice(&payload);
        let mut back = Vec::new();
        let mut h = histogram();
        for _ in 0..n {
            let t = Instant::now();
            tcp.round_trip(&frame, &mut back).map_err(|e| format!("raw TCP round trip: {e}"))?;
            record(&mut h, t.elapsed());
            if back.len() != payload.len() {
                return Err(short_reply("raw TCP", back.len()));
            }
        }
        Ok((h, back))
    })
    .await?
}

/// The process group of the ractor echo node's actor (ours, not a pool's).
const RAW_ECHO_GROUP: &str = "pyvisor-bench.ractor-echo";

/// `n` sequential `EchoMsg::Call`s from node A to the ractor echo node's actor, whose
/// reply is the body itself: ractor_cluster's RPC round trip without pyvisor's remote layer
/// and without a pool (from a task on the runtime, as the remote calls are); the latencies and
/// the last reply.
async fn ractor_sequential(payload: &Arc<Vec<u8>>, n: usize) -> BenchResult<(Histogram<u64>, Vec<u8>)> {
    let payload = Arc::clone(payload);
    tokio::spawn(async move {
        let member = ractor::pg::get_members(&RAW_ECHO_GROUP.to_string()).into_iter().find(|m| !m.get_id().is_local());
        let echo: ActorRef<EchoMsg> = member.ok_or("the ractor echo node is gone")?.into();
        let mut h = histogram();
        let mut back = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            // Timed here, as `RemotePool` times its calls (no ractor timeout: the far node then
            // awaits the reply without a timer, as it does for pyvisor's calls).
            let call = echo.call(|tx| EchoMsg::Call(payload.to_vec(), tx), None);
            back = match tokio::time::timeout(Duration::from_secs(30), call).await {
                Ok(Ok(CallResult::Success(bytes))) => bytes,
                Ok(Ok(CallResult::Timeout)) | Err(_) => return Err("ractor echo: no answer within 30 s".into()),
                Ok(Ok(CallResult::SenderError)) => return Err("ractor echo: its node was lost".into()),
                Ok(Err(e)) => return Err(format!("ractor echo: {e}").into()),
            };
            record(&mut h, t.elapsed());
            if back.len() != payload.len() {
                return Err(short_reply("ractor echo", back.len()));
            }
        }
        Ok((h, back))
    })
    .await?
}

/// The ractor echo node (this binary with `--ractor-echo-node`): a pyvisor [`Node`] whose one
/// actor, in [`RAW_ECHO_GROUP`], answers every `EchoMsg::Call` with its body, connected
/// to `--join`. Prints `ready r` once connected; runs until its stdin ends (the bench stops it
/// with SIGTERM, or its death closes the pipe).
async fn ractor_echo_node(args: &Args) -> BenchResult<()> {
    let (Some(listen), Some(join), Some(cookie_file)) = (args.listen, args.join, args.cookie_file.as_deref()) else {
        return Err("--ractor-echo-node needs --listen, --join and --cookie-file".into());
    };
    let cookie = NodeConfig::cookie_from_file(cookie_file)?;
    let node = Node::start(NodeConfig::new("r", listen, &cookie)?).await?;
    let (echo, _) = Actor::spawn(None, RawEcho, ()).await.map_err(|e| format!("the echo actor did not start: {e}"))?;
    ractor::pg::join(RAW_ECHO_GROUP.to_string(), vec![echo.get_cell()]);
    node.connect(join, START_GUARD).await?;
    let mut out = std::io::stdout();
    writeln!(out, "ready r")?;
    out.flush()?;
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await??;
    echo.stop(None);
    node.shutdown().await;
    Ok(())
}

/// The ractor echo node's message: a body in, the same body back (what a pool call through
/// ractor_cluster's RPC would carry).
#[derive(ractor_cluster::RactorClusterMessage)]
enum EchoMsg {
    #[rpc]
    Call(Vec<u8>, ractor::RpcReplyPort<Vec<u8>>),
}

/// The ractor echo node's actor: a `EchoMsg::Call`'s body back as its reply.
struct RawEcho;

impl Actor for RawEcho {
    type Msg = EchoMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<EchoMsg>, (): ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(&self, _: ActorRef<EchoMsg>, msg: EchoMsg, (): &mut ()) -> Result<(), ActorProcessingErr> {
        let EchoMsg::Call(body, reply) = msg;
        let _ = reply.send(body);
        Ok(())
    }
}

/// The raw TCP baseline: the echo server process and one connection to it.
struct TcpEcho {
    child: Child,
    stream: TcpStream,
}

impl TcpEcho {
    /// Start this binary as the echo server, read its port, connect with `TCP_NODELAY`.
    fn start() -> BenchResult<TcpEcho> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let mut child = Command::new(exe)
            .arg("--tcp-echo-server")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the raw TCP echo server: {e}"))?;
        let port = child.stdout.take().and_then(|out| {
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line).ok()?;
            line.trim().strip_prefix("listening ")?.parse::<u16>().ok()
        });
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the raw TCP echo server did not say where it listens".into());
        };
        let stream = match TcpStream::connect(("127.0.0.1", port)).and_then(|s| s.set_nodelay(true).map(|()| s)) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("cannot connect to the raw TCP echo server: {e}").into());
            }
        };
        Ok(TcpEcho { child, stream })
    }

    /// One frame out (already length-prefixed, one write), one back into `back`.
    fn round_trip(&mut self, frame: &[u8], back: &mut Vec<u8>) -> std::io::Result<()> {
        self.stream.write_all(frame)?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        back.resize(u32::from_be_bytes(len) as usize, 0);
        self.stream.read_exact(back)
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        // The server exits at the connection's end; kill is for one that is stuck.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        reap_within(&mut self.child, Duration::from_secs(2));
    }
}

/// The echo server (this binary with `--tcp-echo-server`): one connection, length-prefixed
/// frames echoed whole in one write each, until the connection ends.
fn tcp_echo_server() -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut out = std::io::stdout();
    writeln!(out, "listening {}", listener.local_addr()?.port())?;
    out.flush()?;
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    let mut frame = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match s.read_exact(&mut len) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_ECHO_FRAME {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {n} bytes")));
        }
        frame.clear();
        frame.extend_from_slice(&len);
        frame.resize(4 + n, 0);
        s.read_exact(&mut frame[4..])?;
        s.write_all(&frame)?;
    }
}

/// A `pyvisor-cluster-node` process this benchmark started; SIGTERM and reaped on drop.
struct NodeProcess {
    name: String,
    child: Child,
    ready: Mutex<Option<tokio::sync::oneshot::Receiver<std::io::Result<String>>>>,
}

impl NodeProcess {
    /// A `pyvisor-cluster-node` named `name` on `listen`, joined to `join`, serving `pools`
    /// (NAME=SCRIPT) with 1 worker each.
    fn pyvisor_node(bin: &Path, name: &str, listen: SocketAddr, cookie: &Path, join: SocketAddr, pools: &[&str], python: &Path) -> BenchResult<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["--name", name, "--listen", &listen.to_string(), "--join", &join.to_string(), "--workers", "1"])
            .arg("--cookie-file")
            .arg(cookie)
            .arg("--python")
            .arg(python);
        for p in pools {
            cmd.args(["--pool", p]);
        }
        // Calls are measured, not tracing: no export from the nodes (the local pool in this
        // process has none either), and their logs quiet unless asked for.
        cmd.env("OTEL_SDK_DISABLED", "true");
        if std::env::var_os("PYVISOR_LOG").is_none() {
            cmd.env("PYVISOR_LOG", "warn");
        }
        Self::spawn(name, cmd)
    }

    /// This binary as the ractor echo node (`--ractor-echo-node`) on `listen`, joined to `join`.
    fn ractor_echo_node(listen: SocketAddr, cookie: &Path, join: SocketAddr) -> BenchResult<Self> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args(["--ractor-echo-node", "--listen", &listen.to_string(), "--join", &join.to_string()]).arg("--cookie-file").arg(cookie);
        Self::spawn("r", cmd)
    }

    /// Start `cmd` (node `name`). Returns at once; [`NodeProcess::ready`] waits for its
    /// `ready` line.
    fn spawn(name: &str, mut cmd: Command) -> BenchResult<Self> {
        // Stdin stays open: the ractor echo node runs until it ends.
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        // A node outlives nothing of ours: SIGTERM if this process dies without stopping it.
        // (The signal follows the spawning thread, this process's main thread here.)
        // SAFETY: only prctl, async-signal-safe, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot start node {name} ({}): {e}", cmd.get_program().to_string_lossy()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Some(out) = child.stdout.take() {
            // Its first line, then whatever else it writes (kept open: never a broken pipe).
            std::thread::spawn(move || {
                let mut out = BufReader::new(out);
                let mut line = String::new();
                let first = out.read_line(&mut line).map(|_| line);
                let _ = tx.send(first);
                let _ = std::io::copy(&mut out, &mut std::io::sink());
            });
        }
        Ok(NodeProcess { name: name.to_string(), child, ready: Mutex::new(Some(rx)) })
    }

    /// Wait for the node's `ready` line.
    async fn ready(&self) -> BenchResult<()> {
        let name = &self.name;
        let rx = self.ready.lock().ok().and_then(|mut r| r.take()).ok_or_else(|| format!("node {name}: already waited for"))?;
        match tokio::time::timeout(START_GUARD, rx).await {
            Ok(Ok(Ok(line))) if line.starts_with("ready ") => Ok(()),
            Ok(Ok(Ok(line))) if line.is_empty() => Err(format!("node {name} exited before it was ready (its stderr is above)").into()),
            Ok(Ok(Ok(line))) => Err(format!("node {name} said {:?} instead of `ready`", line.trim()).into()),
            Ok(Ok(Err(e))) => Err(format!("node {name}: cannot read its output: {e}").into()),
            Ok(Err(_)) => Err(format!("node {name} has no output to read").into()),
            Err(_) => Err(format!("node {name} was not ready within {START_GUARD:?}").into()),
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: signalling our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        reap_within(&mut self.child, Duration::from_secs(10));
    }
}

/// Wait up to `grace` for `child` to exit, then kill it; reaped either way.
fn reap_within(child: &mut Child, grace: Duration) {
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The run's scratch directory (the cookie file), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> BenchResult<Scratch> {
        let dir = std::env::temp_dir().join(format!("pyvisor-cluster-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }

    /// Write `text` to a file only this user can read.
    fn write_secret(&self, name: &str, text: &str) -> BenchResult<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.0.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        writeln!(f, "{text}")?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port free on 127.0.0.1 a moment ago (a node binds it right after; ractor_cluster does
/// not report a port the system picks).
fn free_addr() -> BenchResult<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_else(|_| "?".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).map(|m| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    // The machine's CPUs online, not the ones this process may use (one, with --pin-cpu).
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

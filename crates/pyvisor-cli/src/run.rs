//! `pyvisor run TREE.toml`: start a supervision tree, show a live status table and lifecycle
//! events until Ctrl-C (or SIGTERM), then shut the tree down in order. SIGHUP rereads the file
//! and applies what changed (`Tree::reload`); a file that does not parse is rejected with the
//! reason and the running tree is kept. Under systemd
//! (`NOTIFY_SOCKET`), `notify` tells the service manager when the tree is ready, alive and
//! stopping. With `--http`, the endpoints of `pyvisor_cli::http`, listening from before the
//! tree starts.
//!
//! A command built on it (`pyvisor node`) adds what it runs beside the tree through
//! [`Extension`]: it sees the parsed file before anything starts, the tree once it has started,
//! and stops before the tree shuts down.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use pyvisor_core::ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use pyvisor_core::supervisor::{ChildState, ReloadReport, SupervisorError, SupervisorSpec, Tree};
use pyvisor_cli::http;
use pyvisor_core::{Interpreter, PoolEvent};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{control, notify, tree_file};

/// What a command built on `pyvisor run` adds to the run (`pyvisor node` serves the tree to a
/// cluster). `pyvisor run` itself adds nothing (`()`).
pub(crate) trait Extension {
    /// Before anything starts (no socket claimed, no worker started), with the parsed tree
    /// file: check it, start what runs beside the tree. An error ends the run with exit code 2.
    async fn before_start(&mut self, spec: &SupervisorSpec) -> Result<(), String>;
    /// The tree has started. An error ends the run with exit code 1 (the tree shut down).
    async fn started(&mut self, tree: &Tree) -> Result<(), String>;
    /// A reload (SIGHUP) has been applied to the tree, from `spec` (some changes may have
    /// failed: the report says which). Called only after [`Extension::started`] succeeded.
    async fn reloaded(&mut self, spec: &SupervisorSpec, tree: &Tree);
    /// Resolves with the reason when what it runs has failed: the run then stops, exit code 1.
    /// Polled in the run's loop, so cancel safe (never resolves if nothing can fail).
    async fn failed(&mut self) -> String;
    /// The run is stopping, the tree still up (after [`Extension::started`], whatever its
    /// outcome).
    async fn stopping(&mut self);
    /// The run is over: the tree shut down, or it never started.
    async fn stopped(&mut self);
}

impl Extension for () {
    async fn before_start(&mut self, _: &SupervisorSpec) -> Result<(), String> {
        Ok(())
    }
    async fn started(&mut self, _: &Tree) -> Result<(), String> {
        Ok(())
    }
    async fn reloaded(&mut self, _: &SupervisorSpec, _: &Tree) {}
    async fn failed(&mut self) -> String {
        std::future::pending().await
    }
    async fn stopping(&mut self) {}
    async fn stopped(&mut self) {}
}

/// Hosts the tree, so its failure reaches us as an ordinary supervision event.
struct Host;
impl Actor for Host {
    type Msg = ();
    type State = mpsc::UnboundedSender<String>;
    type Arguments = mpsc::UnboundedSender<String>;
    async fn pre_start(&self, _: ActorRef<()>, tx: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }
    async fn handle_supervisor_evt(&self, _: ActorRef<()>, evt: SupervisionEvent, tx: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(_, err) => {
                let _ = tx.send(format!("the tree failed: {err}"));
            }
            SupervisionEvent::ActorTerminated(_, _, reason) => {
                let _ = tx.send(format!("the tree stopped: {}", reason.unwrap_or_else(|| "normal".into())));
            }
            _ => {}
        }
        Ok(())
    }
}

/// The next delivery of a signal (never, if it could not be listened to).
async fn received(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

fn describe(path: &str, e: &PoolEvent) -> Option<String> {
    Some(match e {
        PoolEvent::WorkerSpawned { worker, pid, .. } => format!("{path}: worker {worker} spawned, pid {pid}"),
        PoolEvent::WorkerReady { worker, pid, startup, .. } => {
            format!("{path}: worker {worker} ready, pid {pid} ({} ms)", startup.as_millis())
        }
        PoolEvent::WorkerDied { certificate } => {
            format!("{path}: worker {} died: {}; {}", certificate.worker, certificate.cause, certificate.ending())
        }
        PoolEvent::RestartScheduled { index, failures, delay } => {
            format!("{path}: position {index} failed to start {failures} time(s); retry in {} ms", delay.as_millis())
        }
        PoolEvent::PoolFailed { reason } => format!("{path}: pool failed: {reason}"),
        PoolEvent::PoolStopped => format!("{path}: pool stopped"),
        _ => return None,
    })
}

struct Row {
    path: String,
    worker: String,
    pid: String,
    state: String,
    in_flight: String,
    served: String,
    restarts: String,
}

async fn rows(tree: &Tree, out: &mut Vec<Row>) {
    let Ok(children) = tree.children().await else { return };
    for c in children {
        let state = match &c.state {
            ChildState::Running => "running".to_string(),
            ChildState::Restarting { next_in } => format!("restarting in {} ms", next_in.as_millis()),
            ChildState::Starting => "starting".to_string(),
            ChildState::Stopped => "stopped".to_string(),
            ChildState::Failed { reason } => format!("failed: {}", reason.lines().next().unwrap_or("")),
            other => format!("{other:?}"),
        };
        let blank = || "-".to_string();
        match (c.kind, &c.state) {
            ("pool", ChildState::Running) => {
                if let Some(pool) = tree.pool(&c.id) {
                    for w in pool.status().await.workers {
                        out.push(Row {
                            path: c.path.clone(),
                            worker: w.worker.map_or_else(blank, |w| w.to_string()),
                            pid: w.pid.map_or_else(blank, |p| p.to_string()),
                            state: match w.restart_in {
                                Some(d) => format!("{} (restart in {} ms)", w.state, d.as_millis()),
                                None => w.state.to_string(),
                            },
                            in_flight: w.in_flight.to_string(),
                            served: w.served.to_string(),
                            restarts: w.restarts.to_string(),
                        });
                    }
                }
            }
            ("supervisor", ChildState::Running) => {
                out.push(Row { path: c.path.clone(), worker: "(supervisor)".into(), pid: blank(), state, in_flight: blank(), served: blank(), restarts: c.restarts.to_string() });
                if let Some(sub) = tree.subtree(&c.id) {
                    Box::pin(rows(&sub, out)).await;
                }
            }
            (kind, _) => out.push(Row {
                path: c.path.clone(),
                worker: format!("({kind})"),
                pid: blank(),
                state,
                in_flight: blank(),
                served: blank(),
                restarts: c.restarts.to_string(),
            }),
        }
    }
}

fn table(rows: &[Row]) -> String {
    let header = ["PATH", "WORKER", "PID", "STATE", "IN FLIGHT", "SERVED", "RESTARTS"];
    let cells: Vec<[&str; 7]> = rows
        .iter()
        .map(|r| [r.path.as_str(), &r.worker, &r.pid, &r.state, &r.in_flight, &r.served, &r.restarts])
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: [&str; 7]| {
        cols.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    let mut s = line(header);
    for row in cells {
        s.push('\n');
        s.push_str(&line(row));
    }
    s
}

/// Read and parse the tree file.
fn load(file: &Path, interpreter: &Interpreter, sink: &tree_file::EventSink) -> Result<SupervisorSpec, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let base = file.parent().map(PathBuf::from).unwrap_or_default();
    tree_file::parse(&text, &base, interpreter, sink.clone()).map_err(|e| format!("{}: {e}", file.display()))
}

/// A reload in progress: the tree's own, on a task, so that the loop keeps showing status,
/// events and signals meanwhile. Yields its outcome, the new shutdown budget and the spec
/// applied.
type Reloading = JoinHandle<(Result<ReloadReport, SupervisorError>, Duration, SupervisorSpec)>;

/// SIGHUP: reread the file and, if it parses, start applying it. A file that does not parse is
/// rejected here, with the reason, and the running tree is kept as it is.
fn begin_reload(file: &Path, interpreter: &Interpreter, sink: &tree_file::EventSink, tree: &Tree, sd: &notify::Notifier) -> Option<Reloading> {
    sd.reloading();
    println!("reload: rereading {}", file.display());
    match load(file, interpreter, sink) {
        Ok(spec) => {
            let tree = tree.clone();
            let budget = spec.shutdown_budget();
            Some(tokio::spawn(async move { (tree.reload(spec.clone()).await, budget, spec) }))
        }
        Err(e) => {
            // The reason may run over several lines (toml shows the spot): the verdict first.
            let line = format!("reload rejected, the running tree is kept: {e}");
            eprintln!("{line}");
            sd.reloaded(&line);
            None
        }
    }
}

/// The outcome of the reload in progress (never, if there is none).
async fn reload_done(r: &mut Option<Reloading>) -> Result<(Result<ReloadReport, SupervisorError>, Duration, SupervisorSpec), tokio::task::JoinError> {
    match r {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

/// Print a lifecycle event: kept for the live screen on a terminal, a line otherwise.
fn show(line: String, tty: bool, recent: &mut Vec<String>) {
    if tty {
        recent.push(line);
        let excess = recent.len().saturating_sub(10);
        recent.drain(..excess);
    } else {
        println!("event: {line}");
    }
}

pub async fn run(interpreter: Interpreter, file: PathBuf, http_addr: Option<SocketAddr>, control_path: Option<PathBuf>) -> ExitCode {
    run_with(interpreter, file, http_addr, control_path, ()).await
}

/// `pyvisor run` with `ext` beside the tree (see [`Extension`]).
pub(crate) async fn run_with<E: Extension>(interpreter: Interpreter, file: PathBuf, http_addr: Option<SocketAddr>, control_path: Option<PathBuf>, mut ext: E) -> ExitCode {
    // Listened to from the very start, not once the tree is up: a SIGTERM while workers load
    // stops what started (it does not kill the run outright), a SIGHUP then is kept for later.
    let int = signal(SignalKind::interrupt()).ok();
    let term = signal(SignalKind::terminate()).ok();
    let hup = signal(SignalKind::hangup()).ok();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel::<String>();
    let sink: tree_file::EventSink = Arc::new(move |path: &str, e: &PoolEvent| {
        if let Some(line) = describe(path, e) {
            let _ = ev_tx.send(line);
        }
    });
    let spec = match load(&file, &interpreter, &sink) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = ext.before_start(&spec).await {
        eprintln!("error: {e}");
        ext.stopped().await;
        return ExitCode::from(2);
    }
    let code = supervise(interpreter, file, http_addr, control_path, spec, sink, ev_rx, Signals { int, term, hup }, &mut ext).await;
    ext.stopped().await;
    code
}

/// The signals the run listens to, from its very start.
struct Signals {
    int: Option<Signal>,
    term: Option<Signal>,
    hup: Option<Signal>,
}

/// The run once the file is parsed: claim the sockets, start the tree, show it, reload it,
/// stop it.
#[allow(clippy::too_many_arguments)]
async fn supervise<E: Extension>(
    interpreter: Interpreter,
    file: PathBuf,
    http_addr: Option<SocketAddr>,
    control_path: Option<PathBuf>,
    spec: SupervisorSpec,
    sink: tree_file::EventSink,
    mut ev_rx: mpsc::UnboundedReceiver<String>,
    signals: Signals,
    ext: &mut E,
) -> ExitCode {
    let Signals { mut int, mut term, mut hup } = signals;
    // The status socket, claimed before any worker starts (a second run on the same path stops
    // here); dropped, and so removed, on every way out below.
    let control = match control::Control::start(control_path.as_deref(), spec.name(), &file).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let sd = notify::Notifier::from_captured_env();
    sd.status("starting the tree");
    let mut shutdown_budget = spec.shutdown_budget();
    // `--http`: listening before the tree starts (liveness passes while workers load).
    let endpoints = match http_addr {
        Some(addr) => match http::bind(addr).await {
            Ok(server) => {
                println!("http: listening on {}", server.local_addr());
                Some(server)
            }
            Err(e) => {
                eprintln!("error: --http: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let (host_tx, mut host_rx) = mpsc::unbounded_channel();
    let (host, host_join) = match Actor::spawn(None, Host, host_tx).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let tty = std::io::stdout().is_terminal();
    let mut recent: Vec<String> = Vec::new();
    let mut reload_wanted = false;
    // Boxed so that it can be dropped (abandoned) when a signal stops the start.
    let mut start = Box::pin(Tree::start_linked(spec, host.get_cell()));
    let stop_signal = loop {
        tokio::select! {
            started = &mut start => match started {
                Ok(tree) => break Ok(tree),
                Err(e) => {
                    while let Ok(line) = ev_rx.try_recv() {
                        println!("{line}");
                    }
                    eprintln!("error: the tree did not start: {e}");
                    sd.status(&format!("the tree did not start: {e}"));
                    host.stop(None);
                    return ExitCode::from(1);
                }
            },
            _ = received(&mut int) => break Err("SIGINT"),
            _ = received(&mut term) => break Err("SIGTERM"),
            _ = received(&mut hup) => {
                reload_wanted = true;
                println!("reload: the tree is still starting; the file is reread once it has started");
            }
            Some(line) = ev_rx.recv() => show(line, false, &mut recent),
        }
    };
    let tree = match stop_signal {
        Ok(tree) => tree,
        Err(which) => {
            // Nothing serves yet, so nothing drains: the supervisor (killed with its host) and
            // every pool that started are killed, and their processes buried; the run's own
            // processes that remain are killed at exit (the run marker).
            control.stopping();
            println!("{which} while the tree was starting: stopping what started");
            let _draining = sd.stopping(Duration::ZERO);
            if let Some(e) = &endpoints {
                e.stopping();
            }
            drop(start);
            let _ = host.kill_and_wait(Some(Duration::from_secs(10))).await;
            let _ = host_join.await;
            if let Some(e) = endpoints {
                e.shutdown().await;
            }
            drop(control);
            println!("stopped");
            return ExitCode::SUCCESS;
        }
    };
    if let Some(e) = &endpoints {
        e.attach(tree.clone());
    }
    control.running(tree.clone());
    println!("tree `{}` started; Ctrl-C stops it, SIGHUP reloads the file", file.display());
    println!("status from another shell: pyvisor status --control {}", control.path().display());
    let _watch = sd.watch(tree.clone());
    let mut reloading: Option<Reloading> = None;
    let started = ext.started(&tree).await;
    if std::mem::take(&mut reload_wanted) && started.is_ok() {
        reloading = begin_reload(&file, &interpreter, &sink, &tree, &sd);
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let code = loop {
        if let Err(e) = &started {
            eprintln!("error: {e}");
            break ExitCode::from(1);
        }
        tokio::select! {
            _ = received(&mut int) => break ExitCode::SUCCESS,
            _ = received(&mut term) => break ExitCode::SUCCESS,
            _ = received(&mut hup) => {
                if reloading.is_some() {
                    // Reread once the one in progress is done: the file may have changed again.
                    reload_wanted = true;
                    println!("reload: one is in progress; the file is reread after it");
                } else {
                    reloading = begin_reload(&file, &interpreter, &sink, &tree, &sd);
                }
            }
            done = reload_done(&mut reloading) => {
                reloading = None;
                let (outcome, applied) = match done {
                    Ok((Ok(report), budget, spec)) => {
                        shutdown_budget = budget;
                        for (path, why) in &report.failed {
                            eprintln!("reload: {path} could not change: {why}");
                        }
                        (format!("reloaded: {report}"), Some(spec))
                    }
                    Ok((Err(e), _, _)) => (format!("reload failed: {e}"), None),
                    Err(e) => (format!("reload failed: {e}"), None),
                };
                println!("{outcome}");
                if let Some(spec) = applied {
                    ext.reloaded(&spec, &tree).await;
                }
                sd.reloaded(&outcome);
                if std::mem::take(&mut reload_wanted) {
                    reloading = begin_reload(&file, &interpreter, &sink, &tree, &sd);
                }
            }
            Some(line) = ev_rx.recv() => show(line, tty, &mut recent),
            Some(line) = host_rx.recv() => {
                println!("{line}");
                sd.tree_failed(&line);
                break ExitCode::from(1);
            }
            why = ext.failed() => {
                eprintln!("error: {why}");
                break ExitCode::from(1);
            }
            _ = tick.tick() => {
                let mut r = Vec::new();
                rows(&tree, &mut r).await;
                if tty {
                    print!("\x1b[2J\x1b[H{}\n\nrecent events:\n{}\n", table(&r), recent.join("\n"));
                } else {
                    println!("{}\n", table(&r));
                }
            }
        }
    };
    control.stopping();
    ext.stopping().await;
    println!("stopping the tree (children in reverse order)...");
    if let Some(r) = reloading.take() {
        // A pool it was starting is linked to its supervisor and stops with the tree.
        r.abort();
        println!("reload: abandoned (stopping)");
    }
    let draining = sd.stopping(shutdown_budget);
    if let Some(e) = &endpoints {
        e.stopping();
    }
    tree.shutdown().await;
    drop(draining);
    while let Ok(line) = ev_rx.try_recv() {
        println!("event: {line}");
    }
    host.stop(None);
    let _ = host_join.await;
    if let Some(e) = endpoints {
        e.shutdown().await;
    }
    drop(control);
    println!("stopped");
    code
}

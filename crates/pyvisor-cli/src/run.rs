//! `pyvisor run TREE.toml`: start a supervision tree, show a live status table and lifecycle
//! events until Ctrl-C (or SIGTERM), then shut the tree down in order. Under systemd
//! (`NOTIFY_SOCKET`), `notify` tells the service manager when the tree is ready, alive and
//! stopping. With `--http`, the endpoints of `pyvisor_cli::http`, listening from before the
//! tree starts.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use pyvisor_core::ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use pyvisor_core::supervisor::{ChildState, Tree};
use pyvisor_cli::http;
use pyvisor_core::{Interpreter, PoolEvent};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

use crate::{control, notify, tree_file};

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

pub async fn run(interpreter: Interpreter, file: PathBuf, http_addr: Option<SocketAddr>, control_path: Option<PathBuf>) -> ExitCode {
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let base = file.parent().map(PathBuf::from).unwrap_or_default();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<String>();
    let sink: tree_file::EventSink = Arc::new(move |path: &str, e: &PoolEvent| {
        if let Some(line) = describe(path, e) {
            let _ = ev_tx.send(line);
        }
    });
    let spec = match tree_file::parse(&text, &base, &interpreter, sink) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
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
    let shutdown_budget = spec.shutdown_budget();
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
    let tree = match Tree::start_linked(spec, host.get_cell()).await {
        Ok(t) => t,
        Err(e) => {
            while let Ok(line) = ev_rx.try_recv() {
                println!("{line}");
            }
            eprintln!("error: the tree did not start: {e}");
            sd.status(&format!("the tree did not start: {e}"));
            host.stop(None);
            return ExitCode::from(1);
        }
    };
    if let Some(e) = &endpoints {
        e.attach(tree.clone());
    }
    control.running(tree.clone());
    println!("tree `{}` started; Ctrl-C stops it", file.display());
    println!("status from another shell: pyvisor status --control {}", control.path().display());
    let _watch = sd.watch(tree.clone());
    let tty = std::io::stdout().is_terminal();
    let mut recent: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Listened to from here on, not re-created per iteration: a signal that arrives while the
    // loop is printing is kept for the next `select!` (a fresh `ctrl_c()` would miss it).
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    let code = loop {
        tokio::select! {
            _ = received(&mut int) => break ExitCode::SUCCESS,
            _ = received(&mut term) => break ExitCode::SUCCESS,
            Some(line) = ev_rx.recv() => {
                if tty {
                    recent.push(line);
                    let excess = recent.len().saturating_sub(10);
                    recent.drain(..excess);
                } else {
                    println!("event: {line}");
                }
            }
            Some(line) = host_rx.recv() => {
                println!("{line}");
                sd.tree_failed(&line);
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
    println!("stopping the tree (children in reverse order)...");
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

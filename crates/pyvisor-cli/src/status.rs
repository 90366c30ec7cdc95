//! `pyvisor status`: ask a running `pyvisor run` for its tree through its control socket
//! (`control.rs` has the path rule and the wire format) and print it as a table, or as the raw
//! JSON with `--json`.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::control::{self, Node, Snapshot, MAX_REPLY, WIRE_VERSION};

/// How long the whole exchange may take (the server bounds its own work to less).
const TIMEOUT: Duration = Duration::from_secs(20);
/// Directory entries looked at when finding the one running tree.
const MAX_ENTRIES: usize = 10_000;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The tree's name (its root supervisor's `name`, default `root`); without it, the only run
    /// in the default directory.
    name: Option<String>,
    /// The run's control socket, as given to `pyvisor run --control PATH`.
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    control: Option<PathBuf>,
    /// Print the JSON reply as it came (wire version 1), on one line.
    #[arg(long)]
    json: bool,
}

/// Why the status could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StatusError {
    /// No socket at the path.
    #[error("no `pyvisor run` serves status at {0} (no such socket): is it running, and was it started with this --control PATH or tree name?")]
    NoSocket(PathBuf),
    /// A socket file nobody listens on.
    #[error("no `pyvisor run` answers at {0}: the socket file is left from a run that was killed (the next run there replaces it)")]
    Stale(PathBuf),
    /// The socket belongs to someone else.
    #[error("permission denied at {0}: the socket belongs to the user who started that run; ask as that user (or root)")]
    Denied(PathBuf),
    /// Another failure to connect.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
    /// Reading or writing failed midway.
    #[error("the exchange with {path} failed: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
    /// No full reply in time.
    #[error("no reply from {0} within {1} s: the run may be overloaded or stopped")]
    Timeout(PathBuf, u64),
    /// The reply passed the cap.
    #[error("the reply from {0} passed {1} bytes; refusing to read more")]
    TooLarge(PathBuf, usize),
    /// The reply is not what a pyvisor run sends.
    #[error("the reply from {path} is not a pyvisor status ({detail}); is another program listening there?")]
    Malformed {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Another wire version.
    #[error("the run at {path} speaks status wire version {got}, this pyvisor speaks {ours}: use the pyvisor binary that started the run", ours = WIRE_VERSION)]
    Version {
        /// The socket.
        path: PathBuf,
        /// The version it sent.
        got: u64,
    },
    /// The server answered with an error.
    #[error("the run at {path} answered: {message}")]
    Server {
        /// The socket.
        path: PathBuf,
        /// Its message.
        message: String,
    },
    /// No name, and the default directory holds no socket or several.
    #[error("{0}")]
    Choose(String),
    /// The name cannot be a socket's name.
    #[error(transparent)]
    Path(#[from] control::ControlError),
}

pub async fn run(args: StatusArgs) -> ExitCode {
    let path = match socket_path(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            // A name that cannot be a socket's is a usage error; no run to be found is not.
            return ExitCode::from(if matches!(e, StatusError::Path(_)) { 2 } else { 1 });
        }
    };
    match fetch(&path).await {
        Ok((raw, snapshot)) => {
            let text = if args.json { raw } else { render(&path, &snapshot) };
            let mut out = std::io::stdout().lock();
            match writeln!(out, "{text}").and_then(|()| out.flush()) {
                // A reader that stopped early (`| head`) got what it wanted.
                Err(e) if e.kind() != ErrorKind::BrokenPipe => {
                    eprintln!("error: cannot write the status to stdout: {e}");
                    ExitCode::from(1)
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--control PATH`, else the default path of NAME, else the only socket in the default
/// directory.
fn socket_path(args: &StatusArgs) -> Result<PathBuf, StatusError> {
    if let Some(p) = &args.control {
        return Ok(p.clone());
    }
    if let Some(name) = &args.name {
        return Ok(control::default_path(name)?);
    }
    let dir = control::default_dir();
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .take(MAX_ENTRIES)
            .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_suffix(".sock").map(str::to_string))
            .filter(|n| control::valid_name(n))
            .collect(),
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(StatusError::Choose(format!("cannot list {}: {e}; name the tree or pass --control PATH", dir.display()))),
    };
    names.sort();
    match names.as_slice() {
        [one] => Ok(dir.join(format!("{one}.sock"))),
        [] => Err(StatusError::Choose(format!(
            "no `pyvisor run` has a control socket in {}: is one running (as this user)? A run started with --control PATH is asked with `pyvisor status --control PATH`",
            dir.display()
        ))),
        several => Err(StatusError::Choose(format!(
            "several runs have control sockets in {}: name one: {}",
            dir.display(),
            several.iter().map(|n| format!("`pyvisor status {n}`")).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Asks the run at `path`; returns the reply line and the snapshot it holds.
pub async fn fetch(path: &Path) -> Result<(String, Snapshot), StatusError> {
    match tokio::time::timeout(TIMEOUT, exchange(path)).await {
        Ok(r) => r,
        Err(_) => Err(StatusError::Timeout(path.to_path_buf(), TIMEOUT.as_secs())),
    }
}

async fn exchange(path: &Path) -> Result<(String, Snapshot), StatusError> {
    let p = || path.to_path_buf();
    let mut stream = UnixStream::connect(path).await.map_err(|e| match e.kind() {
        ErrorKind::NotFound => StatusError::NoSocket(p()),
        ErrorKind::ConnectionRefused => StatusError::Stale(p()),
        ErrorKind::PermissionDenied => StatusError::Denied(p()),
        _ => StatusError::Connect { path: p(), source: e },
    })?;
    stream.write_all(b"status\n").await.map_err(|source| StatusError::Io { path: p(), source })?;
    // One line, read up to the cap as it arrives.
    let mut reply = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(n) => n,
            // The line is complete: whatever the connection does next does not matter.
            Err(_) if reply.contains(&b'\n') => 0,
            Err(source) => return Err(StatusError::Io { path: p(), source }),
        };
        if n == 0 {
            break;
        }
        if reply.len() + n > MAX_REPLY {
            return Err(StatusError::TooLarge(p(), MAX_REPLY));
        }
        reply.extend_from_slice(&chunk[..n]);
        if reply.contains(&b'\n') {
            break;
        }
    }
    let end = reply.iter().position(|&b| b == b'\n').unwrap_or(reply.len());
    let line = std::str::from_utf8(&reply[..end])
        .map_err(|_| StatusError::Malformed { path: p(), detail: "not UTF-8".into() })?
        .to_string();
    let value: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| StatusError::Malformed { path: p(), detail: format!("not JSON: {e}") })?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(WIRE_VERSION) => {}
        Some(got) => return Err(StatusError::Version { path: p(), got }),
        None => return Err(StatusError::Malformed { path: p(), detail: "no `version`".into() }),
    }
    if let Some(message) = value.get("error") {
        let message = message.as_str().map_or_else(|| message.to_string(), str::to_string);
        return Err(StatusError::Server { path: p(), message });
    }
    let snapshot: Snapshot =
        serde_json::from_value(value).map_err(|e| StatusError::Malformed { path: p(), detail: e.to_string() })?;
    Ok((line, snapshot))
}

/// The header lines and a table like `pyvisor run`'s: one row per worker of a running pool,
/// one per supervisor, one per child that is not running.
fn render(path: &Path, s: &Snapshot) -> String {
    let mut out = format!(
        "tree `{}` ({}), pid {}, up {}, {}{}\ncontrol: {}\n",
        s.name,
        s.tree_file,
        s.pid,
        uptime(s.uptime_ms),
        s.phase,
        if s.ready { ", ready" } else { ", not ready" },
        path.display()
    );
    let mut rows: Vec<[String; 8]> = Vec::new();
    add_rows(&s.children, &mut rows);
    let header = ["PATH", "KIND", "WORKER", "PID", "STATE", "IN FLIGHT", "SERVED", "RESTARTS"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String; 8]| {
        cols.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    out.push_str(&line(&header));
    for r in &rows {
        out.push('\n');
        out.push_str(&line(r));
    }
    if rows.is_empty() {
        out.push_str(if s.phase == "running" { "\n(no children)" } else { "\n(the tree is not running yet or any more)" });
    }
    out
}

fn add_rows(nodes: &[Node], rows: &mut Vec<[String; 8]>) {
    let dash = || "-".to_string();
    for n in nodes {
        let state = match (&n.reason, n.restart_in_ms) {
            (Some(reason), _) => format!("{}: {}", n.state, reason.lines().next().unwrap_or("")),
            (None, Some(ms)) => format!("{} in {ms} ms", n.state),
            (None, None) => n.state.clone(),
        };
        match &n.pool {
            Some(pool) => {
                for w in &pool.workers {
                    let state = match w.restart_in_ms {
                        Some(ms) => format!("{} (restart in {ms} ms)", w.state),
                        None if w.tainted => format!("{} (tainted)", w.state),
                        None => w.state.clone(),
                    };
                    rows.push([
                        n.path.clone(),
                        n.kind.clone(),
                        w.worker.clone().unwrap_or_else(dash),
                        w.pid.map_or_else(dash, |p| p.to_string()),
                        state,
                        w.in_flight.to_string(),
                        w.served.to_string(),
                        w.restarts.to_string(),
                    ]);
                }
                if pool.workers.is_empty() {
                    rows.push([n.path.clone(), n.kind.clone(), dash(), dash(), state, dash(), dash(), n.restarts.to_string()]);
                }
            }
            None => {
                rows.push([n.path.clone(), n.kind.clone(), dash(), dash(), state, dash(), dash(), n.restarts.to_string()]);
                add_rows(&n.children, rows);
            }
        }
    }
}

fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A server that answers any connection with `reply` (written in pieces), then closes.
    async fn fake_server(tag: &str, reply: Vec<u8>) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pyvisor-status-fake-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut request = [0u8; 7];
                let _ = s.read_exact(&mut request).await;
                assert_eq!(&request, b"status\n");
                for piece in reply.chunks(1 << 20) {
                    if s.write_all(piece).await.is_err() {
                        break;
                    }
                }
            }
        });
        path
    }

    #[tokio::test]
    async fn replies_that_are_not_a_status_are_named() {
        let p = fake_server("version", b"{\"version\": 2, \"everything\": \"new\"}\n".to_vec()).await;
        let e = fetch(&p).await.unwrap_err();
        assert!(matches!(e, StatusError::Version { got: 2, .. }), "{e}");
        assert!(e.to_string().contains("speaks status wire version 2, this pyvisor speaks 1"), "{e}");

        let p = fake_server("garbage", b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).await;
        let e = fetch(&p).await.unwrap_err();
        assert!(matches!(e, StatusError::Malformed { .. }) && e.to_string().contains("not JSON"), "{e}");

        let p = fake_server("error", b"{\"version\": 1, \"error\": \"busy\"}\n".to_vec()).await;
        let e = fetch(&p).await.unwrap_err();
        assert!(e.to_string().ends_with("answered: busy"), "{e}");

        let p = fake_server("shape", b"{\"version\": 1, \"name\": 7}\n".to_vec()).await;
        assert!(matches!(fetch(&p).await.unwrap_err(), StatusError::Malformed { .. }));

        // An endless line is cut at the cap, not read into memory whole.
        let p = fake_server("huge", vec![b' '; MAX_REPLY + (1 << 20)]).await;
        let e = fetch(&p).await.unwrap_err();
        assert!(matches!(e, StatusError::TooLarge(_, MAX_REPLY)), "{e}");
        for tag in ["version", "garbage", "error", "shape", "huge"] {
            let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("pyvisor-status-fake-{tag}-{}", std::process::id())));
        }
    }

    #[test]
    fn the_table_has_a_row_per_worker_supervisor_and_idle_child() {
        let v = serde_json::json!({
            "version": 1, "name": "t", "tree_file": "/x/t.toml", "pid": 1, "run_id": "1-2-3",
            "uptime_ms": 61_000, "phase": "running", "ready": false,
            "children": [
                {"id": "a", "path": "a", "kind": "pool", "state": "running", "restarts": 0,
                 "pool": {"ready": 1, "min_ready": 1, "queued": 0, "closed": false, "crashes": 1, "retried": 0,
                          "poisoned": 0, "recycles": 0, "workers": [
                    {"index": 0, "worker": "w1", "pid": 11, "state": "ready", "in_flight": 2, "served": 5, "restarts": 0, "rss_bytes": null, "tainted": false},
                    {"index": 1, "worker": null, "pid": null, "state": "dead", "in_flight": 0, "served": 0, "restarts": 3, "rss_bytes": null, "restart_in_ms": 400, "tainted": false}]},
                 "children": []},
                {"id": "s", "path": "s", "kind": "supervisor", "state": "running", "restarts": 1, "children": [
                    {"id": "b", "path": "s/b", "kind": "pool", "state": "failed", "reason": "too many start failures\nmore", "restarts": 2, "children": []}]}
            ]
        });
        let s: Snapshot = serde_json::from_value(v).unwrap();
        let t = render(Path::new("/r/t.sock"), &s);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert!(t.starts_with("tree `t` (/x/t.toml), pid 1, up 1m01s, running, not ready\ncontrol: /r/t.sock\nPATH"), "{t}");
        assert_eq!(lines[3], ["a", "pool", "w1", "11", "ready", "2", "5", "0"], "{t}");
        assert_eq!(lines[4], ["a", "pool", "-", "-", "dead", "(restart", "in", "400", "ms)", "0", "0", "3"], "{t}");
        assert_eq!(lines[5], ["s", "supervisor", "-", "-", "running", "-", "-", "1"], "{t}");
        assert_eq!(lines[6][..5], ["s/b", "pool", "-", "-", "failed:"], "{t}");
        assert!(t.lines().nth(6).unwrap().contains("failed: too many start failures") && !t.contains("more"), "{t}");
        assert_eq!(lines.len(), 7, "{t}");
    }
}

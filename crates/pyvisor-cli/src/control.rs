//! The control socket of `pyvisor run`: the server side of `pyvisor status`.
//!
//! Owns:
//! - the path rule ([`default_dir`], [`default_path`]): `--control PATH` if given, else
//!   `$XDG_RUNTIME_DIR/pyvisor/NAME.sock`, else `/run/pyvisor/NAME.sock` for root, else
//!   `/tmp/pyvisor-UID/NAME.sock`, where NAME is the tree file's root supervisor name;
//! - claiming that path ([`Control::start`]): its directory (created 0700 if missing; the
//!   default one, whose name others can predict, refused unless it is this user's and private),
//!   a socket file with mode 0600 from the first moment it has its name, refusal when a live
//!   run already answers there, replacement of a stale socket file left by a dead run;
//! - the server: one request line in (at most [`MAX_REQUEST`] bytes, enforced while it
//!   arrives), one JSON line out ([`Snapshot`] or an error), connection closed;
//! - the wire types ([`Snapshot`] and its parts), which `status.rs` reads back;
//! - removing the socket file when the [`Control`] is dropped (every way `pyvisor run` ends
//!   short of SIGKILL; the next run replaces what a SIGKILLed one left).
//!
//! Wire format, version [`WIRE_VERSION`] (docs/operations.md, "Status from another shell"):
//! the client sends `status\n`; the server answers one line of JSON, either the snapshot
//! (`{"version":1,"name":…,"phase":…,"ready":…,"children":[…]}`) or
//! `{"version":1,"error":"…"}`, then closes the connection. Later versions only add fields.

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyvisor_core::supervisor::{ChildReport, ChildState, Tree};
use pyvisor_core::PoolStatus;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// The version of the wire format; a reply carries it in `version`.
pub const WIRE_VERSION: u32 = 1;
/// The longest request line the server reads, newline included.
pub const MAX_REQUEST: usize = 256;
/// The longest reply a client reads (a tree of thousands of workers fits many times over).
pub const MAX_REPLY: usize = 32 << 20;
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8;
/// How long a client may take to send its request, and to read the reply.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the tree may take to describe itself.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The root supervisor's name cannot be a file name.
    #[error(
        "the tree's name `{0}` cannot name a control socket (use letters, digits, `.`, `_` or `-`, at most 64, not starting with `.`): \
         set `name` under [supervisor] in the tree file, or pass --control PATH"
    )]
    BadName(String),
    /// The socket path does not fit in a Unix socket address.
    #[error(
        "the control socket path {path} needs {len} bytes (counting the temporary name it is first bound under), and a Unix socket \
         path holds at most {max}: pass a shorter --control PATH"
    )]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes (or that of the temporary name bound next to it).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The directory could not be created.
    #[error("cannot create the control directory {dir}: {source}; pass --control PATH to put the socket elsewhere")]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
    /// The default directory exists but others could use it.
    #[error("the control directory {dir} {why}; it must be a directory of yours that only you can enter (fix: `chmod 700 {dir}`, or remove it), or pass --control PATH")]
    UnsafeDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A live run already answers at the path.
    #[error(
        "another `pyvisor run` already serves status at {0}: stop it first, or give this run its own socket \
         with --control PATH (or another `name` under [supervisor] in its tree file)"
    )]
    InUse(PathBuf),
    /// Something other than a socket has the path.
    #[error("{0} exists and is not a socket; pyvisor will not replace it: remove it, or pass another --control PATH")]
    NotASocket(PathBuf),
    /// The existing socket could not be probed.
    #[error("cannot tell whether a run serves status at {path}: {source}; remove the file if no run uses it, or pass another --control PATH")]
    Probe {
        /// The path.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
    /// Binding or naming the socket failed.
    #[error("cannot listen on the control socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The system's reason.
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// The path rule.

/// The directory default control sockets live in: `$XDG_RUNTIME_DIR/pyvisor` when that variable
/// holds an absolute path, else `/run/pyvisor` for root, else `/tmp/pyvisor-UID`.
pub fn default_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|p| p.is_absolute()) {
        return xdg.join("pyvisor");
    }
    let uid = euid();
    if uid == 0 {
        PathBuf::from("/run/pyvisor")
    } else {
        PathBuf::from(format!("/tmp/pyvisor-{uid}"))
    }
}

/// Whether `name` can be a socket's file name: `[A-Za-z0-9._-]{1,64}`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The default control socket of the tree named `name`: `default_dir()/NAME.sock`.
pub fn default_path(name: &str) -> Result<PathBuf, ControlError> {
    if !valid_name(name) {
        return Err(ControlError::BadName(name.to_string()));
    }
    Ok(default_dir().join(format!("{name}.sock")))
}

fn check_len(path: &Path) -> Result<(), ControlError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ControlError::PathTooLong { path: path.to_path_buf(), len, max: MAX_SOCKET_PATH });
    }
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes sure `dir` exists. A directory pyvisor creates gets mode 0700. With `strict` (the
/// default directory, whose name others can predict), an existing one must be a real directory
/// owned by this user that nobody else can enter.
fn prepare_dir(dir: &Path, strict: bool) -> Result<(), ControlError> {
    let create_err = |source| ControlError::CreateDir { dir: dir.to_path_buf(), source };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let mut b = std::fs::DirBuilder::new();
            b.mode(0o700).recursive(!strict);
            match b.create(dir) {
                Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(create_err),
                // Created meanwhile by another run: check it like any existing one.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => prepare_dir(dir, strict),
                Err(e) => Err(create_err(e)),
            }
        }
        Err(e) => Err(create_err(e)),
        Ok(m) if !strict => {
            if m.is_dir() || std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
                Ok(())
            } else {
                Err(create_err(std::io::Error::other("it exists and is not a directory")))
            }
        }
        Ok(m) => {
            let why = if !m.is_dir() {
                Some("is not a directory (a symbolic link or a file)".to_string())
            } else if m.uid() != euid() {
                Some(format!("belongs to uid {}, not to you (uid {})", m.uid(), euid()))
            } else if m.mode() & 0o077 != 0 {
                Some(format!("has mode {:04o}: others can enter it", m.mode() & 0o7777))
            } else {
                None
            };
            match why {
                Some(why) => Err(ControlError::UnsafeDir { dir: dir.to_path_buf(), why }),
                None => Ok(()),
            }
        }
    }
}

/// What is at a control path now.
enum Occupant {
    Nothing,
    /// A socket file nobody listens on (its run died without removing it).
    Stale,
    Live,
}

async fn probe(path: &Path) -> Result<Occupant, ControlError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Occupant::Nothing),
        Err(e) => return Err(ControlError::Probe { path: path.to_path_buf(), source: e }),
        Ok(m) if !m.file_type().is_socket() => return Err(ControlError::NotASocket(path.to_path_buf())),
        Ok(_) => {}
    }
    match tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(path)).await {
        Ok(Ok(_)) => Ok(Occupant::Live),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => Ok(Occupant::Stale),
        Ok(Err(e)) if e.kind() == ErrorKind::NotFound => Ok(Occupant::Nothing),
        // A full backlog: somebody is listening.
        Ok(Err(e)) if e.kind() == ErrorKind::WouldBlock => Ok(Occupant::Live),
        Ok(Err(e)) => Err(ControlError::Probe { path: path.to_path_buf(), source: e }),
        Err(_) => Ok(Occupant::Live),
    }
}

/// Binds a listener at `path` whose socket file has mode 0600 before it carries that name: it
/// is bound under a temporary name in a private (0700) directory next to `path`, chmod'ed, then
/// hard-linked to `path` (which fails, instead of replacing, if `path` was taken meanwhile).
fn bind_private(path: &Path) -> Result<(std::os::unix::net::UnixListener, (u64, u64)), ControlError> {
    let bind_err = |source| ControlError::Bind { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let private = dir.join(format!(".pvb-{:x}-{nonce:x}", std::process::id()));
    let tmp = private.join("s");
    // The temporary name is bound too: it must fit as well.
    let len = tmp.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ControlError::PathTooLong { path: path.to_path_buf(), len, max: MAX_SOCKET_PATH });
    }
    std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(bind_err)?;
    let result: std::io::Result<_> = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&tmp, path)?;
        let m = std::fs::symlink_metadata(path)?;
        Ok((listener, (m.dev(), m.ino())))
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    result.map_err(bind_err)
}

// ---------------------------------------------------------------------------------------------
// The wire types.

/// The reply to `status`: the whole tree as the run sees it now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`WIRE_VERSION`].
    pub version: u32,
    /// The root supervisor's name.
    pub name: String,
    /// The tree file the run started from.
    pub tree_file: String,
    /// The `pyvisor run` process.
    pub pid: u32,
    /// Its run id (`PYVISOR_RUN_ID` in every worker's environment).
    pub run_id: String,
    /// Time since the run started, ms.
    pub uptime_ms: u64,
    /// `starting`, `running` or `stopping`.
    pub phase: String,
    /// Every supervisor running and every pool with at least `min_ready` ready workers.
    pub ready: bool,
    /// The root supervisor's children, in start order (empty unless `running`).
    pub children: Vec<Node>,
}

/// One child of a supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Node {
    /// Its id.
    pub id: String,
    /// Its path from the root (`etl/loader`).
    pub path: String,
    /// `pool`, `supervisor` or `actor`.
    pub kind: String,
    /// `running`, `restarting`, `stopped` or `failed`.
    pub state: String,
    /// Why it failed (state `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Time until its restart, ms (state `restarting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_in_ms: Option<u64>,
    /// Restarts by its supervisor so far.
    pub restarts: u32,
    /// A running pool's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolNode>,
    /// A running supervisor's children.
    #[serde(default)]
    pub children: Vec<Node>,
}

/// A running pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolNode {
    /// Workers ready now.
    pub ready: usize,
    /// The fewest ready workers it counts as ready with.
    pub min_ready: usize,
    /// Calls waiting for a worker.
    pub queued: usize,
    /// Whether it is closed (shut down or failed).
    pub closed: bool,
    /// Worker deaths.
    pub crashes: u64,
    /// Attempts retried after crashes.
    pub retried: u64,
    /// Calls failed as poison requests.
    pub poisoned: u64,
    /// Workers recycled.
    pub recycles: u64,
    /// One entry per position.
    pub workers: Vec<WorkerNode>,
}

/// One position of a pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerNode {
    /// Position in the pool.
    pub index: usize,
    /// The worker there (`w3`), if any.
    pub worker: Option<String>,
    /// Its pid.
    pub pid: Option<u32>,
    /// `starting`, `ready`, `draining` or `dead`.
    pub state: String,
    /// Calls outstanding on it.
    pub in_flight: usize,
    /// Calls it completed.
    pub served: u64,
    /// Replacements of this position so far.
    pub restarts: u32,
    /// RSS from its last beat, bytes.
    pub rss_bytes: Option<u64>,
    /// Time until a pending restart, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_in_ms: Option<u64>,
    /// In a taint window.
    pub tainted: bool,
}

impl PoolNode {
    fn from_status(s: PoolStatus) -> Self {
        PoolNode {
            ready: s.ready(),
            min_ready: s.min_ready,
            queued: s.queued,
            closed: s.closed,
            crashes: s.crashes,
            retried: s.retried,
            poisoned: s.poisoned,
            recycles: s.recycles,
            workers: s
                .workers
                .into_iter()
                .map(|w| WorkerNode {
                    index: w.index,
                    worker: w.worker.map(|w| w.to_string()),
                    pid: w.pid,
                    state: w.state.to_string(),
                    in_flight: w.in_flight,
                    served: w.served,
                    restarts: w.restarts,
                    rss_bytes: w.rss,
                    restart_in_ms: w.restart_in.map(millis),
                    tainted: w.tainted,
                })
                .collect(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The nodes of a tree snapshot, recursively.
fn nodes(reports: Vec<ChildReport>) -> Vec<Node> {
    reports
        .into_iter()
        .map(|r| {
            let c = r.child;
            let (mut state, mut reason, restart_in_ms) = match &c.state {
                ChildState::Running => ("running", None, None),
                ChildState::Restarting { next_in } => ("restarting", None, Some(millis(*next_in))),
                ChildState::Starting => ("starting", None, None),
                ChildState::Stopped => ("stopped", None, None),
                ChildState::Failed { reason } => ("failed", Some(reason.clone()), None),
                _ => ("unknown", None, None),
            };
            if let Some(why) = r.unavailable {
                // Between its start and its registration, being replaced, or not answering.
                state = "restarting";
                reason = Some(why);
            }
            Node {
                id: c.id,
                path: c.path,
                kind: c.kind.to_string(),
                state: state.to_string(),
                reason,
                restart_in_ms,
                restarts: c.restarts,
                pool: r.pool.map(PoolNode::from_status),
                children: r.children.map(nodes).unwrap_or_default(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The server.

const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const STOPPING: u8 = 2;

/// What the server describes: the run's identity, its phase and (once started) its tree.
struct Shared {
    name: String,
    tree_file: String,
    started: Instant,
    phase: AtomicU8,
    tree: Mutex<Option<Tree>>,
}

impl Shared {
    async fn snapshot(&self) -> Result<Snapshot, String> {
        let phase = self.phase.load(Ordering::Acquire);
        let tree = if phase == RUNNING { self.tree.lock().ok().and_then(|t| t.clone()) } else { None };
        // The readiness judgement is the core's, on the same snapshot (`TreeStatus::readiness`).
        let (children, ready) = match &tree {
            Some(t) => match tokio::time::timeout(SNAPSHOT_TIMEOUT, t.status()).await {
                Ok(Ok(status)) => {
                    let ready = status.readiness().is_ok();
                    (nodes(status.children), ready)
                }
                Ok(Err(e)) => return Err(format!("the tree is not running: {e}")),
                Err(_) => return Err(format!("the tree did not describe itself within {} s", SNAPSHOT_TIMEOUT.as_secs())),
            },
            None => (Vec::new(), false),
        };
        Ok(Snapshot {
            version: WIRE_VERSION,
            name: self.name.clone(),
            tree_file: self.tree_file.clone(),
            pid: std::process::id(),
            run_id: pyvisor_core::run_id().to_string(),
            uptime_ms: millis(self.started.elapsed()),
            phase: match phase {
                STARTING => "starting",
                RUNNING => "running",
                _ => "stopping",
            }
            .to_string(),
            ready,
            children,
        })
    }
}

/// The control socket of one run: serves `status` until dropped, then removes its file.
pub struct Control {
    path: PathBuf,
    /// The socket file's (device, inode), so that only our own file is removed.
    identity: (u64, u64),
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Control {
    /// Claims the control socket (`path`, else the default path for `name`) and starts serving
    /// `status` at once (phase `starting` until [`Control::running`]). Call inside the runtime.
    pub async fn start(path: Option<&Path>, name: &str, tree_file: &Path) -> Result<Control, ControlError> {
        let path = match path {
            Some(p) => {
                prepare_dir(p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")), false)?;
                p.to_path_buf()
            }
            None => {
                let p = default_path(name)?;
                prepare_dir(&default_dir(), true)?;
                p
            }
        };
        check_len(&path)?;
        // Twice: a start that raced ours to the path is probed again.
        let mut bound = None;
        for _ in 0..2 {
            match probe(&path).await? {
                Occupant::Live => return Err(ControlError::InUse(path)),
                Occupant::Stale => match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(ControlError::Probe { path, source: e }),
                },
                Occupant::Nothing => {}
            }
            match bind_private(&path) {
                Ok(b) => {
                    bound = Some(b);
                    break;
                }
                Err(ControlError::Bind { source, .. }) if source.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        let Some((std_listener, identity)) = bound else { return Err(ControlError::InUse(path)) };
        let listener = std_listener
            .set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(std_listener))
            .map_err(|source| ControlError::Bind { path: path.clone(), source })?;
        let abs = std::fs::canonicalize(tree_file).unwrap_or_else(|_| tree_file.to_path_buf());
        let shared = Arc::new(Shared {
            name: name.to_string(),
            tree_file: abs.to_string_lossy().into_owned(),
            started: Instant::now(),
            phase: AtomicU8::new(STARTING),
            tree: Mutex::new(None),
        });
        let task = tokio::spawn(serve(listener, Arc::clone(&shared)));
        Ok(Control { path, identity, shared, task })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tree has started: describe it from now on.
    pub fn running(&self, tree: Tree) {
        if let Ok(mut t) = self.shared.tree.lock() {
            *t = Some(tree);
        }
        self.shared.phase.store(RUNNING, Ordering::Release);
    }

    /// The tree is being stopped: answer with phase `stopping` and no children (the tree's
    /// supervisors are busy stopping and would not answer promptly).
    pub fn stopping(&self) {
        self.shared.phase.store(STOPPING, Ordering::Release);
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Dropped with this task: aborts the connections in progress.
    let mut connections = JoinSet::new();
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    if let Err(e) = answer(stream, &shared).await {
                        tracing::debug!(error = %e, "control connection ended early");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // E.g. out of file descriptors: do not spin.
                tracing::warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A request line as it arrived.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Status,
    TooLong,
    Unknown(String),
}

/// Reads one request line: at most [`MAX_REQUEST`] bytes, newline included (the end of the
/// stream also ends the line).
async fn read_request(stream: &mut UnixStream) -> std::io::Result<Request> {
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 128];
    loop {
        let room = MAX_REQUEST - buf.len();
        if room == 0 {
            return Ok(Request::TooLong);
        }
        let take = room.min(chunk.len());
        let n = stream.read(&mut chunk[..take]).await?;
        if n == 0 {
            break;
        }
        if let Some(end) = chunk[..n].iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&chunk[..end]);
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.trim_end_matches('\r').trim();
    Ok(if line == "status" { Request::Status } else { Request::Unknown(line.chars().take(64).collect()) })
}

fn error_line(message: &str) -> String {
    serde_json::json!({ "version": WIRE_VERSION, "error": message }).to_string()
}

async fn answer(mut stream: UnixStream, shared: &Shared) -> std::io::Result<()> {
    // Only this user (and root) can reach the 0600 socket; checked again in case the file's
    // mode or directory was changed by hand.
    let me = euid();
    let reply = match stream.peer_cred() {
        Ok(c) if c.uid() != me && c.uid() != 0 => error_line(&format!("uid {} may not ask the run of uid {me}", c.uid())),
        _ => match tokio::time::timeout(IO_TIMEOUT, read_request(&mut stream)).await {
            Err(_) => error_line(&format!("no request within {} s; send `status` and a newline", IO_TIMEOUT.as_secs())),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Request::TooLong)) => {
                error_line(&format!("request longer than {MAX_REQUEST} bytes; send `status` and a newline"))
            }
            Ok(Ok(Request::Unknown(r))) => error_line(&format!("unknown request {r:?}; this server answers `status` (wire version {WIRE_VERSION})")),
            Ok(Ok(Request::Status)) => match shared.snapshot().await {
                Ok(s) => serde_json::to_string(&s).unwrap_or_else(|e| error_line(&format!("cannot encode the status: {e}"))),
                Err(e) => error_line(&e),
            },
        },
    };
    let write = async {
        stream.write_all(reply.as_bytes()).await?;
        stream.write_all(b"\n").await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(IO_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(ErrorKind::TimedOut, "the client did not read the reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyvisor_core::supervisor::{Strategy, SupervisorSpec};
    use tokio::io::AsyncBufReadExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pyvisor-control-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Sends `request` raw (the write may fail once the server closes), returns the reply line.
    async fn ask(path: &Path, request: &[u8]) -> serde_json::Value {
        let mut s = UnixStream::connect(path).await.expect("the server listens");
        let _ = s.write_all(request).await;
        let _ = s.shutdown().await;
        let mut line = String::new();
        let mut r = tokio::io::BufReader::new(s);
        tokio::time::timeout(Duration::from_secs(30), r.read_line(&mut line)).await.expect("a reply in time").expect("readable");
        serde_json::from_str(line.trim_end()).unwrap_or_else(|e| panic!("not one JSON line ({e}): {line:?}"))
    }

    #[test]
    fn names_that_can_be_file_names() {
        for ok in ["root", "ml-service", "a.b_c", "X9"] {
            assert!(valid_name(ok), "{ok}");
        }
        let long = "x".repeat(65);
        for bad in ["", ".hidden", "a/b", "..", "sp ace", "é", long.as_str()] {
            assert!(!valid_name(bad), "{bad}");
            assert!(matches!(default_path(bad), Err(ControlError::BadName(_))));
        }
    }

    #[tokio::test]
    async fn bad_requests_get_an_error_and_the_server_goes_on() {
        let dir = temp_dir("bad");
        let path = dir.join("sub/c.sock");
        let control = Control::start(Some(&path), "t", Path::new("tree.toml")).await.expect("starts");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.join("sub")).unwrap().permissions().mode() & 0o777, 0o700);

        // Before the tree runs: phase starting, not ready.
        let v = ask(&path, b"status\n").await;
        assert_eq!(v["phase"], "starting");
        assert_eq!(v["ready"], false);

        // Oversized: more than the cap, without a newline, and far more than the cap.
        let v = ask(&path, &[b'x'; MAX_REQUEST + 1]).await;
        assert!(v["error"].as_str().unwrap().contains("longer than 256 bytes"), "{v}");
        let v = ask(&path, &vec![b's'; 1 << 20]).await;
        assert!(v["error"].as_str().unwrap().contains("longer than"), "{v}");
        // Malformed: unknown words, binary junk, nothing at all.
        let v = ask(&path, b"stats please\n").await;
        assert!(v["error"].as_str().unwrap().contains("unknown request \"stats please\""), "{v}");
        let v = ask(&path, &[0xff, 0x00, 0xc3, b'\n']).await;
        assert!(v["error"].as_str().unwrap().contains("unknown request"), "{v}");
        let v = ask(&path, b"").await;
        assert!(v["error"].as_str().unwrap().contains("unknown request"), "{v}");
        // A client that says nothing and keeps the connection open does not block others.
        let _silent = UnixStream::connect(&path).await.unwrap();

        // The server still answers, now with the (empty) tree.
        let tree = Tree::start(SupervisorSpec::new("t", Strategy::OneForOne)).await.expect("an empty tree starts");
        control.running(tree.clone());
        let v = ask(&path, b"status\r\n").await;
        assert_eq!(v["version"], WIRE_VERSION);
        assert_eq!(v["name"], "t");
        assert_eq!(v["phase"], "running");
        assert_eq!(v["ready"], true);
        assert_eq!(v["pid"], std::process::id());
        let snapshot: Snapshot = serde_json::from_value(v).expect("a snapshot");
        assert!(snapshot.children.is_empty());

        // A second claim on the live path is refused and leaves the first one serving.
        let again = Control::start(Some(&path), "t", Path::new("tree.toml")).await;
        assert!(matches!(again, Err(ControlError::InUse(_))), "{:?}", again.err());
        assert_eq!(ask(&path, b"status\n").await["phase"], "running");

        control.stopping();
        assert_eq!(ask(&path, b"status\n").await["phase"], "stopping");
        drop(control);
        assert!(!path.exists(), "the socket file is removed");
        tree.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_file_is_not() {
        let dir = temp_dir("stale");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        // A socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let control = Control::start(Some(&path), "t", Path::new("tree.toml")).await.expect("replaces the stale socket");
        assert_eq!(ask(&path, b"status\n").await["phase"], "starting");
        drop(control);
        assert!(!path.exists());

        std::fs::write(&path, "not a socket").unwrap();
        let r = Control::start(Some(&path), "t", Path::new("tree.toml")).await;
        assert!(matches!(r, Err(ControlError::NotASocket(_))), "{:?}", r.err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_default_directory_must_be_private() {
        let dir = temp_dir("private");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = prepare_dir(&dir, true).unwrap_err();
        assert!(e.to_string().contains("has mode 0755") && e.to_string().contains("chmod 700"), "{e}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        prepare_dir(&dir, true).expect("a private directory is fine");
        let created = dir.join("made");
        prepare_dir(&created, true).expect("created");
        assert_eq!(std::fs::metadata(&created).unwrap().permissions().mode() & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The HTTP endpoints of a running supervision tree: `pyvisor run TREE --http ADDR`, or any
//! program that runs a [`Tree`] and wants the same endpoints.
//!
//! This module owns the listener, the four routes and their answers, nothing else: what
//! *ready* means is the core's ([`Tree::readiness`]), the status JSON is the core's
//! [`TreeStatus`], and the metrics are the core's
//! plain-value snapshot ([`pyvisor_core::metrics`]).
//!
//! | route | answer |
//! |---|---|
//! | [`HEALTHZ`] | `200 ok`: the process is alive and serving |
//! | [`READYZ`] | `200 ready` when the tree is ready; `503` with one reason per line otherwise (also while the tree is starting or stopping) |
//! | [`STATUS`] | `200` and the tree as JSON (`ready`, `reasons`, then [`TreeStatus`]'s fields); `503` while starting or when the tree does not answer |
//! | [`METRICS`] | `200` and every metric in the Prometheus text format |
//!
//! The endpoints answer from [`bind`] on, before a tree is attached ([`Server::attach`]): a
//! liveness probe passes while models load, readiness fails until the tree is up. Nothing here
//! authenticates; bind to loopback (the default host) unless a network policy guards the port.
//!
//! ```no_run
//! # async fn demo(tree: pyvisor_core::supervisor::Tree) -> Result<(), pyvisor_cli::http::HttpError> {
//! use pyvisor_cli::http;
//! let server = http::serve(tree, http::parse_addr("9090")?).await?; // 127.0.0.1:9090
//! println!("http: listening on {}", server.local_addr());
//! // ... run ...
//! server.shutdown().await;
//! # Ok(()) }
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use pyvisor_core::supervisor::{Tree, TreeStatus};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Liveness: `200` while the process serves.
pub const HEALTHZ: &str = "/healthz";
/// Readiness: `200` when the tree is ready, `503` with the reasons otherwise.
pub const READYZ: &str = "/readyz";
/// The tree as JSON.
pub const STATUS: &str = "/status";
/// Prometheus text exposition of pyvisor's metrics.
pub const METRICS: &str = "/metrics";

/// The host of an address given as a bare port (`--http 9090`).
pub const DEFAULT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The longest an endpoint waits for the tree's answer before it answers `503` itself.
pub const TREE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Server::shutdown`] lets requests in progress finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const TEXT: &str = "text/plain; charset=utf-8";

/// Why the endpoints could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The address is neither a port nor `IP:PORT`.
    #[error("`{0}` is not an address to listen on: give PORT (on 127.0.0.1), IP:PORT or [IPv6]:PORT")]
    BadAddress(String),
    /// The listener could not be opened (port taken, no permission, no such address).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
}

/// Parse `--http`'s value: `PORT` (on [`DEFAULT_HOST`]), `IP:PORT` or `[IPv6]:PORT`
/// (`0.0.0.0:9090` listens on every interface: only when asked for).
pub fn parse_addr(s: &str) -> Result<SocketAddr, HttpError> {
    let s = s.trim();
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(DEFAULT_HOST, port));
    }
    s.parse::<SocketAddr>().map_err(|_| HttpError::BadAddress(s.to_string()))
}

/// Where the served process is in its life.
enum Phase {
    /// No tree yet (it is starting).
    Starting,
    /// The tree runs.
    Serving(Tree),
    /// The tree is being shut down.
    Stopping(Tree),
}

struct Shared {
    phase: RwLock<Phase>,
}

impl Shared {
    fn set(&self, p: Phase) {
        match self.phase.write() {
            Ok(mut g) => *g = p,
            Err(e) => *e.into_inner() = p,
        }
    }

    /// The tree, and whether it is stopping; or why there is none.
    fn tree(&self) -> Result<(Tree, bool), &'static str> {
        let g = match self.phase.read() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        match &*g {
            Phase::Starting => Err("starting: the tree is not up yet"),
            Phase::Serving(t) => Ok((t.clone(), false)),
            Phase::Stopping(t) => Ok((t.clone(), true)),
        }
    }
}

/// The running endpoints. Dropping it stops them too (gracefully, in the background).
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Listen on `addr` and serve the endpoints at once, with no tree yet: `/healthz` and
/// `/metrics` answer, `/readyz` and `/status` say the tree is starting until
/// [`Server::attach`]. Also turns on the metric totals that `/metrics` reports
/// ([`pyvisor_core::metrics::enable`]): call it before starting the tree so they count from
/// the first worker. Port 0 picks a free port ([`Server::local_addr`]). Must run inside a
/// tokio runtime.
pub async fn bind(addr: SocketAddr) -> Result<Server, HttpError> {
    pyvisor_core::metrics::enable();
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(|source| HttpError::Bind { addr, source })?;
    let shared = Arc::new(Shared { phase: RwLock::new(Phase::Starting) });
    let app = Router::new()
        .route(HEALTHZ, get(healthz))
        .route(READYZ, get(readyz))
        .route(STATUS, get(status))
        .route(METRICS, get(metrics))
        .with_state(Arc::clone(&shared));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        // The signal fires on `shutdown` or when the `Server` is dropped (the sender goes).
        let served = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stopped.await;
        });
        if let Err(e) = served.await {
            tracing::warn!(error = %e, "http: the endpoints stopped");
        }
    });
    Ok(Server { addr: local, shared, stop: Some(stop), task: Some(task) })
}

/// [`bind`], then [`Server::attach`] `tree`: the endpoints of a tree that is already running.
pub async fn serve(tree: Tree, addr: SocketAddr) -> Result<Server, HttpError> {
    let server = bind(addr).await?;
    server.attach(tree);
    Ok(server)
}

impl Server {
    /// The address the endpoints listen on (with the port chosen when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve this tree: `/readyz` and `/status` answer from it from now on.
    pub fn attach(&self, tree: Tree) {
        self.shared.set(Phase::Serving(tree));
    }

    /// The tree is being shut down: `/readyz` answers `503 stopping` (so that load balancers
    /// stop sending work), `/status` still shows the tree.
    pub fn stopping(&self) {
        let tree = self.shared.tree().ok().map(|(t, _)| t);
        self.shared.set(tree.map_or(Phase::Starting, Phase::Stopping));
    }

    /// Stop listening; requests in progress get up to [`SHUTDOWN_GRACE`] to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

fn text(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, TEXT)], body).into_response()
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n".into())
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let tree = match shared.tree() {
        Ok((_, true)) => return text(StatusCode::SERVICE_UNAVAILABLE, "stopping: the tree is shutting down\n".into()),
        Ok((t, false)) => t,
        Err(why) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    };
    match tokio::time::timeout(TREE_ANSWER_TIMEOUT, tree.readiness()).await {
        Ok(Ok(())) => text(StatusCode::OK, "ready\n".into()),
        Ok(Err(not_ready)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{not_ready}\n")),
        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, no_answer()),
    }
}

fn no_answer() -> String {
    format!("the tree did not answer within {} s\n", TREE_ANSWER_TIMEOUT.as_secs())
}

/// `/status`'s body: the judgement first, then the tree.
#[derive(serde::Serialize)]
struct StatusBody {
    ready: bool,
    reasons: Vec<String>,
    #[serde(flatten)]
    tree: TreeStatus,
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    let (tree, stopping) = match shared.tree() {
        Ok(t) => t,
        Err(why) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    };
    let snapshot = match tokio::time::timeout(TREE_ANSWER_TIMEOUT, tree.status()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("the tree does not answer: {e}\n")),
        Err(_) => return text(StatusCode::SERVICE_UNAVAILABLE, no_answer()),
    };
    let mut reasons: Vec<String> = match snapshot.readiness() {
        Ok(()) => Vec::new(),
        Err(e) => e.reasons.iter().map(ToString::to_string).collect(),
    };
    if stopping {
        reasons.insert(0, "stopping: the tree is shutting down".into());
    }
    let body = StatusBody { ready: reasons.is_empty(), reasons, tree: snapshot };
    match serde_json::to_string_pretty(&body) {
        Ok(json) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the status: {e}\n")),
    }
}

async fn metrics() -> Response {
    let body = pyvisor_core::metrics::snapshot().to_prometheus();
    (StatusCode::OK, [(header::CONTENT_TYPE, pyvisor_core::metrics::PROMETHEUS_CONTENT_TYPE)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_listens_on_loopback_and_an_explicit_host_is_kept() {
        assert_eq!(parse_addr("9090").unwrap(), "127.0.0.1:9090".parse().unwrap());
        assert_eq!(parse_addr("0.0.0.0:9090").unwrap(), "0.0.0.0:9090".parse().unwrap());
        assert_eq!(parse_addr("[::1]:0").unwrap(), "[::1]:0".parse().unwrap());
        for bad in ["", "localhost", "70000", "1.2.3.4", "host:80"] {
            let e = parse_addr(bad).unwrap_err();
            assert!(e.to_string().contains("not an address"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn a_taken_port_is_a_bind_error_naming_the_address() {
        let first = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let e = bind(first.local_addr()).await.unwrap_err();
        assert!(matches!(e, HttpError::Bind { addr, .. } if addr == first.local_addr()), "{e}");
        first.shutdown().await;
    }
}

//! One pyvisor node of a cluster: a `ractor_cluster` node server listening on an address, the
//! cookie every peer must prove it knows, connecting to peers, and what the node knows of them
//! (sessions opened, authenticated, ready, closed — as [`NodeEvent`]s and a table of peers).
//!
//! Owns the node server actor and its event subscription, and holds the node's call port and
//! its table of call channels (`call_port`, `channel`), closing a peer's channels when its
//! session ends. Not what runs on the nodes (pools are served and called elsewhere), not liveness (ractor_cluster times nothing out: a node
//! heartbeat of our own sits above this), not reconnecting (`seeds` redials).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{ClientConnectErr, IncomingEncryptionMode, NodeEventSubscription, NodeServer, NodeServerMessage, NodeSessionMessage};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::call_port::CallPort;
use crate::channel::{self, Channel, ChannelError, Channels};
use crate::error::ClusterError;
use crate::heartbeat::{self, Beat, HeartbeatPolicy, Misses, NodeBeatMsg};
use crate::node_loss::{LossCause, NodeTaint};
use crate::tls::{self, NodeTls};

/// How long a lost peer is tainted unless configured otherwise (a worker slot's default).
pub const DEFAULT_TAINT_WINDOW: Duration = Duration::from_secs(5);

/// How to run a node: its name (unique in the cluster), where it listens, its cookie.
///
/// ```
/// use pyvisor_cluster::NodeConfig;
/// let config = NodeConfig::new("a", "127.0.0.1:7400".parse()?, "s3cret")?;
/// assert_eq!(config.full_name(), "a@127.0.0.1");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct NodeConfig {
    name: String,
    listen: SocketAddr,
    cookie: String,
    max_frame: u64,
    heartbeat: HeartbeatPolicy,
    taint_window: Duration,
    tls: Option<NodeTls>,
    call_port: u16,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the cookie.
        f.debug_struct("NodeConfig").field("name", &self.name).field("listen", &self.listen).finish_non_exhaustive()
    }
}

impl NodeConfig {
    /// A node named `name` listening on `listen`, proving `cookie` to its peers (a shared
    /// secret: peers with another cookie are refused). The name must be non-empty without `@`,
    /// the cookie non-empty.
    pub fn new(name: &str, listen: SocketAddr, cookie: &str) -> Result<Self, ClusterError> {
        if name.is_empty() || name.contains('@') || name.chars().any(char::is_whitespace) {
            return Err(ClusterError::InvalidConfig(format!("a node name must be non-empty, without `@` or spaces, got {name:?}")));
        }
        if cookie.is_empty() {
            return Err(ClusterError::InvalidConfig("the cookie must not be empty".into()));
        }
        if listen.port() == 0 {
            // ractor_cluster does not report the port the system picks.
            return Err(ClusterError::InvalidConfig("the listen port must be given (0 is not supported)".into()));
        }
        Ok(NodeConfig {
            name: name.to_string(),
            listen,
            cookie: cookie.to_string(),
            max_frame: ractor_cluster::DEFAULT_MAX_INBOUND_FRAME_SIZE,
            heartbeat: HeartbeatPolicy::default(),
            taint_window: DEFAULT_TAINT_WINDOW,
            tls: None,
            call_port: 0,
        })
    }

    /// Read the cookie from a file (its first line, without surrounding whitespace), as
    /// `pyvisor node --cookie-file` does: a cookie never appears on a command line.
    pub fn cookie_from_file(path: &std::path::Path) -> Result<String, ClusterError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClusterError::InvalidConfig(format!("cannot read the cookie file {}: {e}", path.display())))?;
        let cookie = text.lines().next().unwrap_or("").trim().to_string();
        if cookie.is_empty() {
            return Err(ClusterError::InvalidConfig(format!("the cookie file {} is empty", path.display())));
        }
        Ok(cookie)
    }

    /// The largest message a peer may send this node (default 16 MiB, ractor_cluster's), on
    /// its session and on its call channel: a larger one closes that connection. Peers learn
    /// it: a call larger than the serving node takes fails at once as `Codec` (nothing sent),
    /// a result larger than the calling node takes comes back as the error
    /// `result_too_large`. At most 4 GiB − 1 (frames have a 32-bit length).
    #[must_use]
    pub fn max_frame(mut self, bytes: u64) -> Self {
        self.max_frame = bytes.min(u64::from(u32::MAX));
        self
    }

    /// How peers are watched: a peer that misses this many pings in a row has its session
    /// stopped, which ends its calls in flight as a lost node (default: every 500 ms, 4
    /// misses). See [`HeartbeatPolicy`].
    #[must_use]
    pub fn heartbeat(mut self, policy: HeartbeatPolicy) -> Self {
        self.heartbeat = policy;
        self
    }

    /// How long a lost peer stays tainted (default 5 s, as a worker's slot): when it comes
    /// back within that time, calls go to it only if no untainted member of their pool is
    /// left. Zero: never taint. See [`NodeTaint`].
    #[must_use]
    pub fn taint_window(mut self, window: Duration) -> Self {
        self.taint_window = window;
        self
    }

    /// Encrypt every session with TLS (see [`NodeTls`]): peers are accepted and dialed over
    /// TLS only, so every node of the cluster needs it. The cookie is still checked.
    #[must_use]
    pub fn tls(mut self, tls: NodeTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The port peers open call channels on (default 0: one the system picks, told to peers
    /// over their session). Set it where a firewall must let it through; it listens on the
    /// same IP as the node. See docs/cluster.md, "What crosses the wire".
    #[must_use]
    pub fn call_port(mut self, port: u16) -> Self {
        self.call_port = port;
        self
    }

    /// The node's name in the cluster: `name@listen-ip`.
    pub fn full_name(&self) -> String {
        format!("{}@{}", self.name, self.listen.ip())
    }
}

/// What happened to one of the node's sessions with a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A connection is up, not yet authenticated.
    Opened { peer_addr: String, inbound: bool },
    /// The peer proved the cookie (and the session won the election between duplicate
    /// connections).
    Authenticated { peer: String, peer_addr: String, inbound: bool },
    /// The peer's actors and process groups are known here: the session is usable.
    Ready { peer: String, peer_addr: String, inbound: bool },
    /// The session ended (closed, failed authentication, lost an election, or was stopped).
    /// `peer` is `None` when it never said its name.
    Disconnected { peer: Option<String>, peer_addr: String, inbound: bool },
    /// The peer missed `missed` heartbeats in a row: its session is being stopped (a
    /// `Disconnected` follows).
    Silent { peer: String, missed: u32 },
}

/// A peer this node has a ready session with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its name (`name@ip`).
    pub name: String,
    /// The address of its end of the session.
    pub addr: String,
    /// Whether it dialed this node.
    pub inbound: bool,
    /// ractor_cluster's id of the session (the `node` of its actors' ids; a new one on every
    /// connection).
    pub node_id: u64,
}

/// A running node (cheap to clone: every clone is the same node).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use pyvisor_cluster::{Node, NodeConfig};
/// let node = Node::start(NodeConfig::new("a", "127.0.0.1:7400".parse()?, "s3cret")?).await?;
/// let peer = node.connect("127.0.0.1:7401", Duration::from_secs(5)).await?;
/// println!("connected to {}", peer.name);
/// node.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    name: String,
    listen: SocketAddr,
    server: ActorRef<NodeServerMessage>,
    events: broadcast::Sender<NodeEvent>,
    peers: PeerTable,
    join: Mutex<Option<JoinHandle<()>>>,
    beat: ActorRef<NodeBeatMsg>,
    monitor: JoinHandle<()>,
    /// With TLS: the listener peers are accepted on, and how to dial them.
    tls: Option<(NodeTls, JoinHandle<()>)>,
    /// `true` once the node is stopping (what tasks that outlive a call, e.g. `seeds`, watch).
    halt: watch::Sender<bool>,
    /// Where peers open call channels to this node.
    calls: CallPort,
    /// This node's call channels to its peers.
    channels: Arc<Channels>,
    max_frame: usize,
}

impl NodeInner {
    /// Stop the heartbeat, the TLS listener, the call port, the call channels and the node
    /// server (its sessions with it).
    fn stop(&self) {
        self.halt.send_replace(true);
        self.monitor.abort();
        if let Some((_, listener)) = &self.tls {
            listener.abort();
        }
        self.beat.stop(None);
        self.calls.stop();
        self.channels.close_all();
        self.server.stop(None);
    }
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        // The last handle gone: the node goes too.
        self.stop();
    }
}

/// The peers with a ready session, by name, with their session actors (what the heartbeat
/// stops); the peers the heartbeat gave up; the taint windows of lost peers. Shared by the
/// node, its event subscription and its heartbeat monitor.
#[derive(Clone)]
struct PeerTable(Arc<Mutex<Table>>);

struct Table {
    ready: HashMap<String, Entry>,
    /// Peers given up by the heartbeat (misses), until they are ready again.
    silent: HashMap<String, u32>,
    taint: NodeTaint,
}

/// A ready peer and its session actor.
type Entry = (Peer, ActorRef<NodeSessionMessage>);

impl PeerTable {
    fn new(taint_window: Duration) -> Self {
        PeerTable(Arc::new(Mutex::new(Table { ready: HashMap::new(), silent: HashMap::new(), taint: NodeTaint::new(taint_window) })))
    }

    fn ready(&self, peer: Peer, session: ActorRef<NodeSessionMessage>) {
        if let Ok(mut t) = self.0.lock() {
            t.silent.remove(&peer.name);
            t.ready.insert(peer.name.clone(), (peer, session));
        }
    }

    /// The call channel to `name` broke: the peer is lost for calls, and tainted from now.
    fn channel_lost(&self, name: &str) {
        if let Ok(mut t) = self.0.lock() {
            t.taint.lost(name, Instant::now());
        }
    }

    /// Forget `name` if `addr` is its session's (a losing duplicate leaves it in place): the
    /// peer is lost, and tainted from now. Whether it was.
    fn disconnected(&self, name: &str, addr: &str) -> bool {
        let Ok(mut t) = self.0.lock() else { return false };
        if t.ready.get(name).is_none_or(|(p, _)| p.addr != addr) {
            return false;
        }
        t.ready.remove(name);
        t.taint.lost(name, Instant::now());
        true
    }

    /// The heartbeat gave `name` up after `missed` misses.
    fn silent(&self, name: &str, missed: u32) {
        if let Ok(mut t) = self.0.lock() {
            t.silent.insert(name.to_string(), missed);
        }
    }

    fn get(&self, name: &str) -> Option<Peer> {
        self.0.lock().ok()?.ready.get(name).map(|(p, _)| p.clone())
    }

    fn all(&self) -> Vec<Peer> {
        let mut v: Vec<Peer> = self.0.lock().map(|t| t.ready.values().map(|(p, _)| p.clone()).collect()).unwrap_or_default();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The peer and session with ractor_cluster id `node_id`.
    fn by_node_id(&self, node_id: u64) -> Option<Entry> {
        self.0.lock().ok()?.ready.values().find(|(p, _)| p.node_id == node_id).cloned()
    }

    fn node_ids(&self) -> Vec<u64> {
        self.0.lock().map(|t| t.ready.values().map(|(p, _)| p.node_id).collect()).unwrap_or_default()
    }

    fn cause(&self, name: &str) -> LossCause {
        match self.0.lock().ok().and_then(|t| t.silent.get(name).copied()) {
            Some(missed) => LossCause::Silent { missed },
            None => LossCause::Closed,
        }
    }

    fn is_tainted(&self, name: &str) -> bool {
        self.0.lock().is_ok_and(|t| t.taint.is_tainted(name, Instant::now()))
    }

    fn tainted(&self) -> Vec<(String, Duration)> {
        self.0.lock().map(|t| t.taint.tainted(Instant::now())).unwrap_or_default()
    }
}

impl Node {
    /// Start the node: listen on the configured address and accept peers that prove the
    /// cookie. Fails if the address cannot be bound.
    pub async fn start(config: NodeConfig) -> Result<Node, ClusterError> {
        let hostname = config.listen.ip().to_string();
        let (port, ip, encryption) = match &config.tls {
            None => (config.listen.port(), config.listen.ip(), None),
            // TLS peers come through a listener of ours (`tls`); ractor's own listens on a
            // loopback port nobody is told, TLS only, so nothing gets in through it.
            Some(t) => (0, IpAddr::V4(Ipv4Addr::LOCALHOST), Some(IncomingEncryptionMode::Tls(t.acceptor.clone()))),
        };
        let server = NodeServer::new(
            port,
            config.cookie.clone(),
            config.name.clone(),
            hostname,
            encryption,
            // Isolated: peers are the ones we dial or that dial us; a transitive node would
            // dial its peers' peers in the clear whatever our encryption.
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(ip)
        .with_max_inbound_frame_size(config.max_frame);
        let (server, join) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| ClusterError::Bind { addr: config.listen, detail: e.to_string() })?;
        let tls = match config.tls.clone() {
            None => None,
            Some(t) => match tls::listen(config.listen, t.clone(), server.clone()).await {
                Ok(listener) => Some((t, listener)),
                Err(e) => {
                    server.stop(None);
                    return Err(e);
                }
            },
        };
        let halt = watch::Sender::new(false);
        let max_frame = usize::try_from(config.max_frame).unwrap_or(usize::MAX);
        // The names of peers whose session ended: their channels to this node's call port end.
        let (gone, _) = broadcast::channel(256);
        let calls = match CallPort::start(SocketAddr::new(config.listen.ip(), config.call_port), config.tls.clone(), max_frame, halt.subscribe(), gone.clone()).await {
            Ok(calls) => calls,
            Err(e) => {
                if let Some((_, listener)) = &tls {
                    listener.abort();
                }
                server.stop(None);
                return Err(e);
            }
        };
        let channels = Arc::new(Channels::default());
        let (events, _) = broadcast::channel(1024);
        let peers = PeerTable::new(config.taint_window);
        let forward = Forward { events: events.clone(), peers: peers.clone(), channels: Arc::clone(&channels), gone };
        server
            .cast(NodeServerMessage::SubscribeToEvents { id: "pyvisor".into(), subscription: Box::new(forward) })
            .map_err(|e| ClusterError::Bind { addr: config.listen, detail: e.to_string() })?;
        // The listener bound its socket in the server's start (a taken port fails the spawn).
        let (beat, _) = Actor::spawn(None, Beat, ())
            .await
            .map_err(|e| ClusterError::Bind { addr: config.listen, detail: format!("the heartbeat actor: {e}") })?;
        ractor::pg::join(heartbeat::GROUP.to_string(), vec![beat.get_cell()]);
        let monitor = tokio::spawn(watch(config.heartbeat, peers.clone(), events.clone()));
        Ok(Node {
            inner: Arc::new(NodeInner {
                name: config.full_name(),
                listen: config.listen,
                server,
                events,
                peers,
                join: Mutex::new(Some(join)),
                beat,
                monitor,
                tls,
                halt,
                calls,
                channels,
                max_frame,
            }),
        })
    }

    /// This node's name (`name@ip`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Where it listens.
    pub fn listen_addr(&self) -> SocketAddr {
        self.inner.listen
    }

    /// Events of this node's sessions from now on.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// The peers this node has a ready session with, by name.
    pub fn peers(&self) -> Vec<Peer> {
        self.inner.peers.all()
    }

    /// Connect to the node listening at `addr` and wait (up to `timeout`, the name lookup
    /// included) until the session is ready; a name is looked up without blocking the runtime
    /// and each address it resolves to is tried in turn. A peer with another cookie closes the
    /// session: [`ClusterError::Refused`].
    pub async fn connect(&self, addr: impl tokio::net::ToSocketAddrs, timeout: Duration) -> Result<Peer, ClusterError> {
        let until = tokio::time::Instant::now() + timeout;
        let addrs: Vec<SocketAddr> = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
            .await
            .map_err(|_| ClusterError::InvalidConfig(format!("the address was not looked up within {timeout:?}")))?
            .map_err(|e| ClusterError::InvalidConfig(format!("not an address: {e}")))?
            .collect();
        let mut last = ClusterError::InvalidConfig("the address resolves to nothing".into());
        for addr in addrs {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match self.connect_addr(addr, left).await {
                Ok(peer) => return Ok(peer),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// [`Node::connect`] to one address.
    pub(crate) async fn connect_addr(&self, addr: SocketAddr, timeout: Duration) -> Result<Peer, ClusterError> {
        // Listen before dialing: the session's events may come before the dial returns.
        let mut rx = self.events();
        let server = &self.inner.server;
        let wanted = addr.to_string();
        let wait = async {
            let dialed = match &self.inner.tls {
                None => ractor_cluster::client_connect(server, addr).await,
                Some((t, _)) => ractor_cluster::client_connect_enc(server, addr, t.connector.clone(), t.server_name.clone()).await,
            };
            match dialed {
                Ok(()) => {}
                Err(ClientConnectErr::Encryption(e)) => return Err(ClusterError::Tls { addr, detail: e.to_string() }),
                Err(e) => return Err(ClusterError::Connect { addr, detail: e.to_string() }),
            }
            loop {
                match rx.recv().await {
                    Ok(NodeEvent::Ready { peer, peer_addr, inbound: false }) if peer_addr == wanted => {
                        return self.inner.peers.get(&peer).ok_or(ClusterError::Refused { addr });
                    }
                    Ok(NodeEvent::Disconnected { peer_addr, inbound: false, .. }) if peer_addr == wanted => {
                        return Err(ClusterError::Refused { addr });
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(ClusterError::Stopped),
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| ClusterError::ConnectTimeout { addr, after: timeout })?
    }

    /// The name of the peer whose session has ractor_cluster id `node_id`.
    pub(crate) fn peer_by_node_id(&self, node_id: u64) -> Option<String> {
        self.inner.peers.by_node_id(node_id).map(|(p, _)| p.name)
    }

    /// Why the peer `name` was lost: given up by the heartbeat, else its session closed.
    pub(crate) fn loss_cause(&self, name: &str) -> LossCause {
        self.inner.peers.cause(name)
    }

    /// Whether the peer `name` is in its taint window (lost less than the window ago).
    pub fn is_tainted(&self, name: &str) -> bool {
        self.inner.peers.is_tainted(name)
    }

    /// The peers in their taint window, with the time each has left.
    pub fn tainted(&self) -> Vec<(String, Duration)> {
        self.inner.peers.tainted()
    }

    /// Serve `pool` to the cluster under its name: nodes connected to this one (and this one)
    /// can call it with a [`crate::RemotePool`] of that name. Served until the returned handle
    /// drops.
    pub async fn serve(&self, pool: pyvisor_core::Pool) -> Result<crate::Served, ClusterError> {
        let name = pool.name().to_string();
        crate::serve::serve(&name, crate::serve::Source::Fixed(pool), self.inner.calls.offers()).await
    }

    /// Serve the pool `name` found by `lookup` at each call: for a pool that may not exist
    /// for a while — a child of a supervision tree that is removed, reloaded or not started
    /// yet — e.g. `node.serve_with("models", move || tree.pool("models"))` (a tree's pool
    /// handle itself follows its supervisor's restarts). While `lookup` finds none, calls are
    /// answered as not running there, and callers send them to another node.
    pub async fn serve_with(&self, name: &str, lookup: impl Fn() -> Option<pyvisor_core::Pool> + Send + Sync + 'static) -> Result<crate::Served, ClusterError> {
        crate::serve::serve(name, crate::serve::Source::Lookup(Arc::new(lookup)), self.inner.calls.offers()).await
    }

    /// Where peers open call channels to this node (its call port).
    pub fn call_addr(&self) -> SocketAddr {
        self.inner.calls.addr()
    }

    /// The call channel to the node of `member` (a peer's pool member), opened if there is
    /// none, within `budget` (at most `channel::OPEN_TIMEOUT`). `Err`: nothing was sent.
    pub(crate) async fn channel(&self, member: &ActorCell, budget: Duration) -> Result<Arc<Channel>, ChannelError> {
        let node_id = member.get_id().node();
        let inner = &self.inner;
        // The common case: open already (a session's end removes its channel at once).
        if let Some(c) = inner.channels.find(node_id) {
            return Ok(c);
        }
        let Some((peer, _)) = inner.peers.by_node_id(node_id) else {
            return Err(ChannelError::NoSession);
        };
        let open = || async {
            let opening = async {
                let offer = channel::ask_offer(&member.clone().into()).await?;
                let session_ip = peer.addr.parse::<SocketAddr>().map(|a| a.ip()).map_err(|e| format!("its session address {:?}: {e}", peer.addr))?;
                let (peers, name) = (inner.peers.clone(), peer.name.clone());
                let tls = inner.tls.as_ref().map(|(t, _)| t);
                channel::dial(offer, session_ip, tls, &inner.name, inner.max_frame, move || peers.channel_lost(&name)).await
            };
            // Bounded here, not only by the caller's budget: a failure of the whole opening is
            // remembered (calls meanwhile go elsewhere at once).
            tokio::time::timeout(channel::OPEN_TIMEOUT, opening).await.map_err(|_| format!("no call channel within {:?}", channel::OPEN_TIMEOUT))?
        };
        let budget = budget.min(channel::OPEN_TIMEOUT);
        let opening = tokio::time::timeout(budget, inner.channels.get(node_id, open));
        let c = opening.await.map_err(|_| ChannelError::Failed(format!("no call channel within {budget:?}")))??;
        // The session may have ended while the channel opened: nothing of it is left to call.
        if inner.peers.by_node_id(node_id).is_none() {
            inner.channels.session_ended(node_id);
            return Err(ChannelError::NoSession);
        }
        Ok(c)
    }

    /// Becomes `true` when the node stops (shut down, or its last handle dropped; the sender
    /// is gone then too).
    pub(crate) fn halted(&self) -> watch::Receiver<bool> {
        self.inner.halt.subscribe()
    }

    /// A handle that does not keep the node running.
    pub(crate) fn downgrade(&self) -> WeakNode {
        WeakNode(Arc::downgrade(&self.inner))
    }

    /// Stop the node: its sessions close (peers see this node disconnect).
    pub async fn shutdown(&self) {
        self.inner.stop();
        let join = self.inner.join.lock().ok().and_then(|mut j| j.take());
        if let Some(join) = join {
            let _ = join.await;
        }
    }
}

/// A [`Node`] that may have stopped: tasks that must not keep it running hold this.
#[derive(Clone)]
pub(crate) struct WeakNode(Weak<NodeInner>);

impl WeakNode {
    /// The node, while any handle of it is left.
    pub(crate) fn upgrade(&self) -> Option<Node> {
        self.0.upgrade().map(|inner| Node { inner })
    }
}

/// The heartbeat monitor: every interval, ping each peer's beat actor; stop the session of a
/// peer that missed `policy.misses` in a row.
async fn watch(policy: HeartbeatPolicy, peers: PeerTable, events: broadcast::Sender<NodeEvent>) {
    let mut misses = Misses::default();
    let mut seq = 0u64;
    loop {
        tokio::time::sleep(policy.interval).await;
        seq += 1;
        // Only this node's sessions (other nodes in the same process share ractor's registry).
        let ours = peers.node_ids();
        let round: Vec<(u64, bool)> = heartbeat::ping_round(seq, policy.interval).await.into_iter().filter(|(n, _)| ours.contains(n)).collect();
        misses.retain(&ours);
        for (node, answered) in round {
            if !misses.record(node, answered, policy.misses) {
                continue;
            }
            // Gone meanwhile: nothing left to stop.
            let Some((peer, session)) = peers.by_node_id(node) else { continue };
            tracing::warn!(peer = %peer.name, missed = policy.misses, "a peer stopped answering the heartbeat: its session is stopped");
            peers.silent(&peer.name, policy.misses);
            let _ = events.send(NodeEvent::Silent { peer: peer.name, missed: policy.misses });
            session.stop(Some("pyvisor: no heartbeat".into()));
        }
    }
}

/// The node server's event subscription: keeps the peer table and passes events on.
struct Forward {
    events: broadcast::Sender<NodeEvent>,
    peers: PeerTable,
    channels: Arc<Channels>,
    gone: broadcast::Sender<String>,
}

fn peer_name(ses: &NodeServerSessionInformation) -> Option<String> {
    ses.peer_name.as_ref().map(|n| n.name.clone())
}

impl NodeEventSubscription for Forward {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        let _ = self.events.send(NodeEvent::Opened { peer_addr: ses.peer_addr, inbound: ses.is_server });
    }

    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let peer = peer_name(&ses);
        if let Some(name) = &peer {
            if self.peers.disconnected(name, &ses.peer_addr) {
                // Its channels to this node's call port end (their calls are abandoned).
                let _ = self.gone.send(name.clone());
            }
        }
        // Its calls in flight are lost now (the channel may outlive the session: a stopped
        // process keeps its sockets open).
        self.channels.session_ended(ses.node_id);
        let _ = self.events.send(NodeEvent::Disconnected { peer, peer_addr: ses.peer_addr, inbound: ses.is_server });
    }

    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        if let Some(peer) = peer_name(&ses) {
            let _ = self.events.send(NodeEvent::Authenticated { peer, peer_addr: ses.peer_addr, inbound: ses.is_server });
        }
    }

    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        let Some(peer) = peer_name(&ses) else { return };
        let entry = Peer { name: peer.clone(), addr: ses.peer_addr.clone(), inbound: ses.is_server, node_id: ses.node_id };
        self.peers.ready(entry, ses.actor.clone());
        let _ = self.events.send(NodeEvent::Ready { peer, peer_addr: ses.peer_addr, inbound: ses.is_server });
    }
}

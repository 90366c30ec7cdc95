//! Seeds kept connected. ractor_cluster does not reconnect by itself: a node given seed
//! addresses ([`Node::join`]) dials each one until its session is ready, and dials it again
//! whenever that session ends (the seed restarted, the connection dropped, the heartbeat gave it
//! up), waiting longer after each failed attempt in a row ([`SeedPolicy`]). A seed given by
//! host name ([`SeedAddr`]) is looked up again at each attempt, and each address it resolves to
//! is tried in turn: a seed that comes back elsewhere under its name is found there.
//!
//! Owns the seed addresses, the redial tasks, their handle ([`Seeds`]) and what they report
//! ([`SeedStatus`]), and the redial decision ([`Redial`], a plain value). Not the sessions (`node`), not liveness (the
//! heartbeat decides that a silent seed's session ends; this only notices that it did).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use pyvisor_core::{Backoff, Jitter};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::error::ClusterError;
use crate::node::{Node, NodeEvent, Peer, WeakNode};

/// How long a session closed by ractor_cluster's election (both ends dialed each other) may
/// take to show the session that won.
const SURVIVOR_WAIT: Duration = Duration::from_secs(2);

/// How often a ready seed's session is looked at besides on every session event.
const RECHECK: Duration = Duration::from_secs(1);

/// A seed as given: an IP address and port, or a host name and port (looked up at each
/// attempt). Parsed from `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`.
///
/// ```
/// use pyvisor_cluster::SeedAddr;
/// let by_ip: SeedAddr = "127.0.0.1:7400".parse()?;
/// assert_eq!(by_ip, SeedAddr::Ip("127.0.0.1:7400".parse()?));
/// let by_name: SeedAddr = "node-a.internal:7400".parse()?;
/// assert_eq!(by_name, SeedAddr::Name { host: "node-a.internal".into(), port: 7400 });
/// assert_eq!(by_name.to_string(), "node-a.internal:7400");
/// assert!("node-a.internal".parse::<SeedAddr>().is_err(), "a port is needed");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SeedAddr {
    /// An IP address and port, dialed as they are.
    Ip(SocketAddr),
    /// A host name and port: the name is resolved at each attempt.
    Name {
        /// The host name.
        host: String,
        /// The port.
        port: u16,
    },
}

impl From<SocketAddr> for SeedAddr {
    fn from(addr: SocketAddr) -> Self {
        SeedAddr::Ip(addr)
    }
}

impl FromStr for SeedAddr {
    type Err = ClusterError;

    fn from_str(s: &str) -> Result<Self, ClusterError> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(SeedAddr::Ip(addr));
        }
        let bad = |why: &str| ClusterError::InvalidConfig(format!("seed {s:?}: {why} (want IP:PORT, [IPv6]:PORT or HOST:PORT)"));
        let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
        let valid = |label: &str| !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        let labels: Vec<&str> = host.trim_end_matches('.').split('.').collect();
        if host.is_empty() || host.len() > 253 || !labels.iter().all(|l| valid(l)) {
            return Err(bad("not a host name or IP address"));
        }
        // A name's last label is never all digits: `10.0.0.256` or `1.2.3` is a mistyped IP.
        if labels.last().is_some_and(|l| l.chars().all(|c| c.is_ascii_digit())) {
            return Err(bad("not a valid IP address"));
        }
        Ok(SeedAddr::Name { host: host.to_string(), port })
    }
}

impl fmt::Display for SeedAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SeedAddr::Ip(addr) => addr.fmt(f),
            SeedAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl SeedAddr {
    /// The addresses to try now: the IP address, or what the name resolves to (within
    /// `limit`), in the resolver's order.
    async fn resolve(&self, limit: Duration) -> Result<Vec<SocketAddr>, ClusterError> {
        let (host, port) = match self {
            SeedAddr::Ip(addr) => return Ok(vec![*addr]),
            SeedAddr::Name { host, port } => (host.as_str(), *port),
        };
        let failed = |detail: String| ClusterError::Resolve { seed: self.to_string(), detail };
        #[cfg(test)]
        let found: Vec<SocketAddr> = match tests::names::answer(host) {
            Some(answer) => answer.map_err(failed)?,
            None => lookup(host, port, limit).await.map_err(failed)?,
        };
        #[cfg(not(test))]
        let found = lookup(host, port, limit).await.map_err(failed)?;
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for addr in found {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(failed("the name has no address".into()));
        }
        Ok(addrs)
    }
}

/// What the system's resolver says `host` is, within `limit`.
async fn lookup(host: &str, port: u16, limit: Duration) -> Result<Vec<SocketAddr>, String> {
    match tokio::time::timeout(limit, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(found)) => Ok(found.collect()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// How seeds are dialed and dialed again.
///
/// ```
/// use std::time::Duration;
/// use pyvisor_cluster::SeedPolicy;
/// use pyvisor_core::Backoff;
/// let policy = SeedPolicy::default()
///     .backoff(Backoff::default().base(Duration::from_millis(500)).cap(Duration::from_secs(30)))
///     .attempt_timeout(Duration::from_secs(5));
/// assert_eq!(policy.attempt_timeout, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct SeedPolicy {
    /// The wait before the next attempt after the n-th failure in a row (default 200 ms × 2,
    /// capped at 5 s, equal jitter).
    pub backoff: Backoff,
    /// How long one attempt may take: TCP, TLS, the cookie, until the session is ready
    /// (default 10 s).
    pub attempt_timeout: Duration,
    /// A session that lasted at least this long (default 10 s) was a success: when it ends the
    /// seed is dialed again at once and the failures count from zero. One that ended sooner
    /// counts as a failed attempt, so a seed that accepts sessions and drops them is not dialed
    /// in a tight loop.
    pub stable: Duration,
}

impl Default for SeedPolicy {
    fn default() -> Self {
        SeedPolicy {
            backoff: Backoff::default().base(Duration::from_millis(200)).cap(Duration::from_secs(5)).jitter(Jitter::Equal),
            attempt_timeout: Duration::from_secs(10),
            stable: Duration::from_secs(10),
        }
    }
}

impl SeedPolicy {
    /// Set the backoff between failed attempts.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Set how long one attempt may take.
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Set how long a session must last to reset the failures.
    #[must_use]
    pub fn stable(mut self, stable: Duration) -> Self {
        self.stable = stable;
        self
    }
}

/// When to dial one seed next: the count of failures in a row and the wait each one earns. A
/// plain value (no clock, no I/O).
#[derive(Debug, Clone)]
pub(crate) struct Redial {
    backoff: Backoff,
    stable: Duration,
    failures: u32,
}

impl Redial {
    pub(crate) fn new(policy: &SeedPolicy) -> Self {
        Redial { backoff: policy.backoff, stable: policy.stable, failures: 0 }
    }

    /// An attempt failed: the wait before the next one.
    pub(crate) fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.delay(self.failures)
    }

    /// A ready session ended after `lasted`: the wait before dialing again (none after a
    /// stable session; a short one counts as a failed attempt).
    pub(crate) fn ended(&mut self, lasted: Duration) -> Duration {
        if lasted >= self.stable {
            self.failures = 0;
            Duration::ZERO
        } else {
            self.failed()
        }
    }

    /// Failed attempts in a row.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

/// What is known of one seed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SeedStatus {
    /// Its address, as given.
    pub addr: SeedAddr,
    /// The node there (`name@ip`) while this node has a ready session with it, whichever end
    /// dialed.
    pub peer: Option<String>,
    /// Whether it has been reached at least once.
    pub reached: bool,
    /// Failed attempts in a row (a session that lasted [`SeedPolicy::stable`] resets them).
    pub failures: u32,
    /// The last attempt's error, until the seed is reached again.
    pub last_error: Option<ClusterError>,
}

impl SeedStatus {
    /// Not reached yet, and the last attempt was refused (another cookie) or failed its TLS
    /// handshake: a configuration error rather than a seed that is down.
    fn refused_before_reached(&self) -> bool {
        !self.reached && self.last_error.as_ref().is_some_and(ClusterError::is_refusal)
    }
}

/// The seeds of a node, kept connected ([`Node::join`]). Dropping it (or [`Seeds::stop`]) stops
/// dialing them; sessions already ready stay. Dialing stops by itself when the node stops.
pub struct Seeds {
    tasks: Vec<JoinHandle<()>>,
    status: watch::Receiver<Vec<SeedStatus>>,
}

impl std::fmt::Debug for Seeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seeds").field("status", &*self.status.borrow()).finish_non_exhaustive()
    }
}

impl Seeds {
    /// Each seed's state, in the order given (without duplicates and this node's own address).
    pub fn status(&self) -> Vec<SeedStatus> {
        self.status.borrow().clone()
    }

    /// Wait until every seed has been reached at least once; [`ClusterError::Stopped`] if the
    /// node stops first. The future does not borrow the handle.
    pub fn reached(&self) -> impl std::future::Future<Output = Result<(), ClusterError>> + Send + 'static {
        let mut rx = self.status.clone();
        async move { rx.wait_for(|all| all.iter().all(|s| s.reached)).await.map(|_| ()).map_err(|_| ClusterError::Stopped) }
    }

    /// Like [`Seeds::reached`], but ends with the error as soon as a seed not reached yet refused
    /// the session (another cookie: [`ClusterError::Refused`]) or failed the TLS handshake
    /// ([`ClusterError::Tls`]): a configuration error, which a program starting up may prefer
    /// to stop on. The seeds are dialed again either way (a peer may be fixed meanwhile).
    pub fn reached_or_refused(&self) -> impl std::future::Future<Output = Result<(), ClusterError>> + Send + 'static {
        let mut rx = self.status.clone();
        async move {
            let all = rx
                .wait_for(|all| all.iter().all(|s| s.reached) || all.iter().any(SeedStatus::refused_before_reached))
                .await
                .map_err(|_| ClusterError::Stopped)?;
            match all.iter().find(|s| s.refused_before_reached()).and_then(|s| s.last_error.clone()) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }

    /// Stop dialing the seeds (as dropping the handle does).
    pub fn stop(self) {}
}

impl Drop for Seeds {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Node {
    /// Keep this node connected to `seeds`: dial each one until its session is ready, and
    /// again whenever that session ends, with `policy`'s backoff between failed attempts; each
    /// failed attempt is logged (a refused session or a failed TLS handshake as a warning).
    /// A seed already connected through a session it dialed itself counts as reached. This
    /// node's own address and repeated addresses are left out, so every node of a cluster may
    /// be given the same seed list. Dialing goes on until the returned [`Seeds`] drops or the
    /// node stops (it does not keep the node running). Call it inside a tokio runtime.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use pyvisor_cluster::{Node, NodeConfig, SeedAddr, SeedPolicy};
    /// let node = Node::start(NodeConfig::new("b", "127.0.0.1:7401".parse()?, "s3cret")?).await?;
    /// let seeds: Vec<SeedAddr> = vec!["127.0.0.1:7400".parse()?, "node-c.internal:7400".parse()?];
    /// let seeds = node.join(seeds, SeedPolicy::default());
    /// seeds.reached().await?;
    /// println!("joined: {:?}", node.peers());
    /// # Ok(()) }
    /// ```
    pub fn join(&self, seeds: impl IntoIterator<Item = impl Into<SeedAddr>>, policy: SeedPolicy) -> Seeds {
        let mut addrs: Vec<SeedAddr> = Vec::new();
        for addr in seeds {
            let addr = addr.into();
            if addr == SeedAddr::Ip(self.listen_addr()) {
                tracing::debug!(seed = %addr, "a seed is this node's own address: left out");
            } else if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        let initial = addrs.iter().map(|addr| SeedStatus { addr: addr.clone(), peer: None, reached: false, failures: 0, last_error: None }).collect();
        let (tx, status) = watch::channel(initial);
        let tasks = addrs
            .into_iter()
            .enumerate()
            .map(|(index, addr)| {
                let seed = Seed { node: self.downgrade(), halt: self.halted(), addr, index, policy, status: tx.clone() };
                tokio::spawn(seed.keep())
            })
            .collect();
        Seeds { tasks, status }
    }
}

/// One seed's redial task.
struct Seed {
    node: WeakNode,
    halt: watch::Receiver<bool>,
    addr: SeedAddr,
    index: usize,
    policy: SeedPolicy,
    status: watch::Sender<Vec<SeedStatus>>,
}

/// Resolves when the node stops (or is gone).
async fn halted(halt: &mut watch::Receiver<bool>) {
    let _ = halt.wait_for(|stopped| *stopped).await;
}

impl Seed {
    async fn keep(mut self) {
        let mut redial = Redial::new(&self.policy);
        // The name of the node at this address, once known: a ready session with it counts as
        // reached whichever end dialed.
        let mut known: Option<String> = None;
        let mut wait = Duration::ZERO;
        loop {
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = halted(&mut self.halt) => return,
                }
            }
            let Some(node) = self.node.upgrade() else { return };
            if *self.halt.borrow() {
                return;
            }
            let mut events = node.events();
            let already = known.as_deref().and_then(|name| node.peers().into_iter().find(|p| p.name == name));
            let attempt = match already {
                Some(peer) => Ok(Some(peer)),
                None => tokio::select! {
                    r = dial(&node, &self.addr, &self.policy, &mut events) => r,
                    () = halted(&mut self.halt) => return,
                },
            };
            drop(node);
            match attempt {
                Ok(None) => {
                    // The name resolves to this node only: nothing to dial now; looked up
                    // again later (the name may move).
                    tracing::debug!(seed = %self.addr, "a seed resolves to this node's own address: left out");
                    self.update(|s| {
                        s.reached = true;
                        s.failures = 0;
                        s.last_error = None;
                    });
                    wait = self.policy.stable.max(RECHECK);
                }
                Ok(Some(peer)) => {
                    tracing::info!(seed = %self.addr, peer = %peer.name, "seed reached");
                    known = Some(peer.name.clone());
                    self.update(|s| {
                        s.peer = Some(peer.name.clone());
                        s.reached = true;
                        s.last_error = None;
                    });
                    let since = Instant::now();
                    if !self.session_ends(&peer.name, &mut events).await {
                        return;
                    }
                    wait = redial.ended(since.elapsed());
                    let failures = redial.failures();
                    self.update(|s| {
                        s.peer = None;
                        s.failures = failures;
                    });
                    tracing::info!(seed = %self.addr, peer = %peer.name, redial_in = ?wait, "the session with a seed ended: dialing it again");
                }
                Err((error, learned)) => {
                    if learned.is_some() {
                        known = learned;
                    }
                    wait = redial.failed();
                    let failures = redial.failures();
                    if error.is_refusal() {
                        tracing::warn!(seed = %self.addr, failures, retry_in = ?wait, "cannot join a seed: {error}");
                    } else {
                        tracing::info!(seed = %self.addr, failures, retry_in = ?wait, "cannot reach a seed yet: {error}");
                    }
                    self.update(|s| {
                        s.failures = failures;
                        s.last_error = Some(error);
                    });
                }
            }
        }
    }

    fn update(&self, f: impl FnOnce(&mut SeedStatus)) {
        self.status.send_modify(|all| {
            if let Some(s) = all.get_mut(self.index) {
                f(s);
            }
        });
    }

    /// Wait until the peer `name` has no ready session with this node: `false` if the node
    /// stopped first.
    async fn session_ends(&mut self, name: &str, events: &mut broadcast::Receiver<NodeEvent>) -> bool {
        loop {
            match self.node.upgrade() {
                None => return false,
                Some(node) => {
                    if !node.peers().iter().any(|p| p.name == name) {
                        return true;
                    }
                }
            }
            tokio::select! {
                () = halted(&mut self.halt) => return false,
                r = events.recv() => {
                    if matches!(r, Err(broadcast::error::RecvError::Closed)) {
                        return false;
                    }
                }
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

/// One attempt: resolve `seed` and dial each of its addresses in turn (this node's own left
/// out) until one gives a session, all within the policy's attempt timeout; the last failure
/// otherwise. `None`: the seed resolves to this node's own address only.
async fn dial(
    node: &Node,
    seed: &SeedAddr,
    policy: &SeedPolicy,
    events: &mut broadcast::Receiver<NodeEvent>,
) -> Result<Option<Peer>, (ClusterError, Option<String>)> {
    let until = tokio::time::Instant::now() + policy.attempt_timeout;
    let addrs = seed.resolve(policy.attempt_timeout).await.map_err(|e| (e, None))?;
    let others: Vec<SocketAddr> = addrs.into_iter().filter(|a| !is_self(*a, node.listen_addr())).collect();
    // A refusal (cookie, TLS) is reported only if no address was merely unreachable: a stale
    // address now used by something else must not read as a configuration error.
    let (mut refusal, mut other) = (None, None);
    for (i, &addr) in others.iter().enumerate() {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        // Each address gets its part of what is left (at least 1 s): one that drops packets
        // does not use up the attempt.
        let part = (left / (others.len() - i) as u32).max(Duration::from_secs(1)).min(left);
        match dial_addr(node, addr, part, events).await {
            Ok(peer) => return Ok(Some(peer)),
            Err(e) if e.0.is_refusal() => refusal = refusal.or(Some(e)),
            Err(e) => other = other.or(Some(e)),
        }
    }
    match (other.or(refusal), others.first()) {
        (Some(e), _) => Err(e),
        (None, Some(&addr)) => Err((ClusterError::ConnectTimeout { addr, after: policy.attempt_timeout }, None)),
        (None, None) => Ok(None),
    }
}

/// Whether a seed's resolved address `addr` is this node listening on `listen`: the same
/// address; or the same port on an address of this host while it listens on all of them; or
/// the same port on a loopback address while it listens on another one (a host's own name
/// often maps to 127.0.1.1 in /etc/hosts).
fn is_self(addr: SocketAddr, listen: SocketAddr) -> bool {
    if addr == listen {
        return true;
    }
    if addr.port() != listen.port() {
        return false;
    }
    let local = || addr.ip().is_loopback() || std::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)).is_ok();
    (listen.ip().is_unspecified() && local()) || (addr.ip().is_loopback() && !listen.ip().is_loopback())
}

/// Dial `addr` and wait (up to `limit`) for its session. A session the peer closed because
/// another session between the two won ractor_cluster's election (both ends dialed each other)
/// is no failure: the surviving one is returned. A failure comes with the peer's name when it
/// said it.
async fn dial_addr(
    node: &Node,
    addr: SocketAddr,
    limit: Duration,
    events: &mut broadcast::Receiver<NodeEvent>,
) -> Result<Peer, (ClusterError, Option<String>)> {
    let error = match node.connect_addr(addr, limit).await {
        Ok(peer) => return Ok(peer),
        Err(e @ ClusterError::Refused { .. }) => e,
        Err(e) => return Err((e, None)),
    };
    // The name the peer gave on the session that closed (sent before `connect` returned).
    let wanted = addr.to_string();
    let mut name = None;
    loop {
        match events.try_recv() {
            Ok(NodeEvent::Disconnected { peer: Some(peer), peer_addr, inbound: false }) if peer_addr == wanted => name = Some(peer),
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
    let Some(name) = name else { return Err((error, None)) };
    let until = tokio::time::Instant::now() + SURVIVOR_WAIT.min(limit);
    loop {
        if let Some(peer) = node.peers().into_iter().find(|p| p.name == name) {
            return Ok(peer);
        }
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return Err((error, Some(name))),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::NodeConfig;

    /// Names these tests answer themselves, ahead of the system's resolver: a name can then
    /// fail to resolve and start resolving while a node keeps dialing it.
    pub(crate) mod names {
        use std::collections::HashMap;
        use std::net::SocketAddr;
        use std::sync::Mutex;

        /// A name's answer: its addresses, or why it does not resolve.
        type Answer = Result<Vec<SocketAddr>, String>;

        static NAMES: Mutex<Option<HashMap<String, Answer>>> = Mutex::new(None);

        /// From now on `host` resolves as `answer` says.
        pub(crate) fn set(host: &str, answer: Answer) {
            if let Ok(mut names) = NAMES.lock() {
                names.get_or_insert_with(HashMap::new).insert(host.to_string(), answer);
            }
        }

        /// What `host` resolves to here, if these tests answer it.
        pub(crate) fn answer(host: &str) -> Option<Answer> {
            NAMES.lock().ok()?.as_ref()?.get(host).cloned()
        }
    }

    /// An address on 127.0.0.1 that was free a moment ago.
    fn free_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_name_that_starts_resolving_is_looked_up_again_and_its_node_reached() {
        let guard = Duration::from_secs(60);
        let b = Node::start(NodeConfig::new("seedb", free_addr(), "s3cret").expect("config")).await.expect("node b");
        let a = Node::start(NodeConfig::new("seeda", free_addr(), "s3cret").expect("config")).await.expect("node a");
        let host = "seed-b-later.pyvisor.test";
        names::set(host, Err("not known yet".into()));
        let seed: SeedAddr = format!("{host}:{}", b.listen_addr().port()).parse().expect("a seed");
        let fast = Backoff::default().base(Duration::from_millis(50)).cap(Duration::from_millis(200)).jitter(Jitter::None);
        let seeds = a.join([seed], SeedPolicy::default().backoff(fast).attempt_timeout(Duration::from_secs(5)));
        // Tried and failed more than once, each time as a name that does not resolve.
        let failing = tokio::time::timeout(guard, async {
            loop {
                let status = seeds.status();
                if status[0].failures >= 2 {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("attempts go on");
        assert!(matches!(status_error(&failing), Some(ClusterError::Resolve { .. })), "{failing:?}");
        assert!(a.peers().is_empty());
        // The name now resolves to B: a later attempt looks it up again and reaches B.
        names::set(host, Ok(vec![b.listen_addr()]));
        tokio::time::timeout(guard, seeds.reached()).await.expect("reached in time").expect("reached");
        assert!(a.peers().iter().any(|p| p.name.starts_with("seedb")), "{:?}", a.peers());
        drop(seeds);
        a.shutdown().await;
        b.shutdown().await;
    }

    fn status_error(status: &[SeedStatus]) -> Option<&ClusterError> {
        status.first()?.last_error.as_ref()
    }

    fn exact() -> SeedPolicy {
        SeedPolicy::default()
            .backoff(Backoff::default().base(Duration::from_millis(200)).cap(Duration::from_secs(5)).jitter(Jitter::None))
            .stable(Duration::from_secs(10))
    }

    #[test]
    fn failed_attempts_back_off_and_a_stable_session_resets_them() {
        let mut r = Redial::new(&exact());
        let waits: Vec<u128> = (0..7).map(|_| r.failed().as_millis()).collect();
        assert_eq!(waits, vec![200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(r.failures(), 7);
        // Reached, then lost after a while: dialed again at once, from zero.
        assert_eq!(r.ended(Duration::from_secs(60)), Duration::ZERO);
        assert_eq!(r.failures(), 0);
        assert_eq!(r.failed(), Duration::from_millis(200));
    }

    #[test]
    fn a_session_that_ends_at_once_counts_as_a_failure() {
        let mut r = Redial::new(&exact());
        // A seed that accepts sessions and drops them: the waits grow as for failed attempts.
        let waits: Vec<u128> = (0..4).map(|_| r.ended(Duration::from_millis(50)).as_millis()).collect();
        assert_eq!(waits, vec![200, 400, 800, 1600]);
        assert_eq!(r.ended(Duration::from_secs(10)), Duration::ZERO);
    }

    #[test]
    fn the_default_backoff_stays_within_its_bounds() {
        let mut r = Redial::new(&SeedPolicy::default());
        for n in 1..40u32 {
            let wait = r.failed();
            let exact = SeedPolicy::default().backoff.jitter(Jitter::None).delay(n);
            assert!(wait >= exact / 2 && wait <= exact && wait <= Duration::from_secs(5), "{n}: {wait:?}");
        }
    }

    #[test]
    fn seeds_parse_as_ip_addresses_or_host_names_with_a_port() {
        let ok = |s: &str| s.parse::<SeedAddr>().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("10.0.0.5:7400"), SeedAddr::Ip("10.0.0.5:7400".parse().expect("addr")));
        assert_eq!(ok("[::1]:7400"), SeedAddr::Ip("[::1]:7400".parse().expect("addr")));
        assert_eq!(ok("localhost:7400"), SeedAddr::Name { host: "localhost".into(), port: 7400 });
        assert_eq!(ok("node-b.pyvisor_svc.example.:1"), SeedAddr::Name { host: "node-b.pyvisor_svc.example.".into(), port: 1 });
        for s in ["node-b.internal:7400", "[::1]:7400", "10.0.0.5:7400"] {
            assert_eq!(ok(s).to_string(), s, "shown as given");
        }
        for bad in ["", "node-b", "node-b:", ":7400", "node-b:0", "node-b:70000", "node-b:port", "node b:7400", "a..b:7400", "::1:7400", "[::1]", "http://node-b:7400", "10.0.0.256:7400", "1.2.3:7400"] {
            let e = bad.parse::<SeedAddr>().expect_err(bad);
            assert!(matches!(&e, ClusterError::InvalidConfig(m) if m.contains("HOST:PORT")), "{bad}: {e}");
        }
    }

    #[test]
    fn a_resolved_address_is_this_node_only_on_its_port_and_one_of_its_addresses() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert!(is_self(a("10.0.0.1:7400"), a("10.0.0.1:7400")));
        // Another node on this host, another port.
        assert!(!is_self(a("10.0.0.1:7401"), a("10.0.0.1:7400")));
        // Listening on every address: this host's addresses on that port are this node.
        assert!(is_self(a("127.0.0.1:7400"), a("0.0.0.0:7400")));
        assert!(!is_self(a("192.0.2.7:7400"), a("0.0.0.0:7400")), "an address of no interface here (TEST-NET-1)");
        // Listening on an interface's address: the host's own name mapped to 127.0.1.1.
        assert!(is_self(a("127.0.1.1:7400"), a("10.0.0.1:7400")));
        // Listening on loopback: another loopback address is another node.
        assert!(!is_self(a("127.0.0.2:7400"), a("127.0.0.1:7400")));
    }

    #[tokio::test]
    async fn a_name_resolves_at_each_attempt_and_a_bad_one_is_a_resolve_error() {
        let seed: SeedAddr = "localhost:7400".parse().expect("a seed");
        let addrs = seed.resolve(Duration::from_secs(10)).await.expect("localhost resolves");
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 7400), "{addrs:?}");
        let ip = SeedAddr::Ip("10.0.0.5:7400".parse().expect("addr"));
        assert_eq!(ip.resolve(Duration::from_secs(1)).await.expect("an IP"), vec!["10.0.0.5:7400".parse().expect("addr")]);
        // `.invalid` never resolves (RFC 2606).
        let nowhere: SeedAddr = "no-such-node.invalid:7400".parse().expect("a seed");
        let e = nowhere.resolve(Duration::from_secs(10)).await.expect_err("does not resolve");
        assert!(matches!(&e, ClusterError::Resolve { seed, .. } if seed == "no-such-node.invalid:7400"), "{e}");
    }

    #[test]
    fn only_a_refusal_before_the_first_contact_is_a_configuration_error() {
        let addr: SocketAddr = "127.0.0.1:7400".parse().expect("addr");
        let mut s = SeedStatus { addr: addr.into(), peer: None, reached: false, failures: 1, last_error: Some(ClusterError::Refused { addr }) };
        assert!(s.refused_before_reached());
        s.last_error = Some(ClusterError::Tls { addr, detail: "bad certificate".into() });
        assert!(s.refused_before_reached());
        s.last_error = Some(ClusterError::Connect { addr, detail: "connection refused".into() });
        assert!(!s.refused_before_reached(), "a seed that is down is waited for");
        s.last_error = Some(ClusterError::Refused { addr });
        s.reached = true;
        assert!(!s.refused_before_reached(), "after the first contact everything is retried");
    }
}

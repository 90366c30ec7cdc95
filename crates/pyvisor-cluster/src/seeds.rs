//! Seeds kept connected. ractor_cluster does not reconnect by itself: a node given seed
//! addresses ([`Node::join`]) dials each one until its session is ready, and dials it again
//! whenever that session ends (the seed restarted, the connection dropped, the heartbeat gave it
//! up), waiting longer after each failed attempt in a row ([`SeedPolicy`]).
//!
//! Owns the redial tasks, their handle ([`Seeds`]) and what they report ([`SeedStatus`]), and
//! the redial decision ([`Redial`], a plain value). Not the sessions (`node`), not liveness (the
//! heartbeat decides that a silent seed's session ends; this only notices that it did).

use std::net::SocketAddr;
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
    /// Its address.
    pub addr: SocketAddr,
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
    /// use pyvisor_cluster::{Node, NodeConfig, SeedPolicy};
    /// let node = Node::start(NodeConfig::new("b", "127.0.0.1:7401".parse()?, "s3cret")?).await?;
    /// let seeds = node.join(vec!["127.0.0.1:7400".parse()?], SeedPolicy::default());
    /// seeds.reached().await?;
    /// println!("joined: {:?}", node.peers());
    /// # Ok(()) }
    /// ```
    pub fn join(&self, seeds: impl IntoIterator<Item = SocketAddr>, policy: SeedPolicy) -> Seeds {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for addr in seeds {
            if addr == self.listen_addr() {
                tracing::debug!(seed = %addr, "a seed is this node's own address: left out");
            } else if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        let initial = addrs.iter().map(|&addr| SeedStatus { addr, peer: None, reached: false, failures: 0, last_error: None }).collect();
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
    addr: SocketAddr,
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
                Some(peer) => Ok(peer),
                None => tokio::select! {
                    r = dial(&node, self.addr, &self.policy, &mut events) => r,
                    () = halted(&mut self.halt) => return,
                },
            };
            drop(node);
            match attempt {
                Ok(peer) => {
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

/// One attempt: dial `addr` and wait for its session. A session the peer closed because another
/// session between the two won ractor_cluster's election (both ends dialed each other) is no
/// failure: the surviving one is returned. A failure comes with the peer's name when it said it.
async fn dial(
    node: &Node,
    addr: SocketAddr,
    policy: &SeedPolicy,
    events: &mut broadcast::Receiver<NodeEvent>,
) -> Result<Peer, (ClusterError, Option<String>)> {
    let error = match node.connect(addr, policy.attempt_timeout).await {
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
    let until = tokio::time::Instant::now() + SURVIVOR_WAIT.min(policy.attempt_timeout);
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
mod tests {
    use super::*;

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
    fn only_a_refusal_before_the_first_contact_is_a_configuration_error() {
        let addr: SocketAddr = "127.0.0.1:7400".parse().expect("addr");
        let mut s = SeedStatus { addr, peer: None, reached: false, failures: 1, last_error: Some(ClusterError::Refused { addr }) };
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

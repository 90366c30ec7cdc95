//! Admission of accepted connections to their handshake, the same for the call port and a TLS
//! node's session listener: at most a fixed number in their handshake at once (the rest wait in
//! the listen queue), and at most a share of those from one source — an IPv4 address, or an
//! IPv6 /64 — so that one host's silent connections cannot take every place. A connection
//! from a source whose share is taken waits for a place (not holding one meanwhile), up to
//! [`HANDSHAKE_TIMEOUT`] and up to [`WAITING_PER_SOURCE`] waiting per source; past either it is
//! closed. So a burst of peers behind one address (a NAT, one host's nodes) is only delayed.
//!
//! Owns the accept loop, the places and shares, and what counts as one source. Not the
//! handshakes themselves (`call_port`, `tls`), not the frames (`link`).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// How long a peer has to complete its handshake (TLS, or a call channel's hello), and how
/// long a connection may wait for its source's share before that.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many connections in their handshake at once; further ones wait to be accepted.
pub const MAX_HANDSHAKES: usize = 64;

/// At most this many of the [`MAX_HANDSHAKES`] from one source (an IPv4 address, an IPv6
/// /64); further ones from there wait for a place of that share (up to [`HANDSHAKE_TIMEOUT`],
/// at most [`WAITING_PER_SOURCE`] of them; past that they are closed). Peers behind one
/// address (one host, a NAT) are delayed by milliseconds when many open at once; one host's
/// connections that never finish their handshake hold at most this many places.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 16;

/// At most this many connections from one source wait for a place; more are closed at once.
pub const WAITING_PER_SOURCE: usize = 64;

/// Accept connections on `listener` for ever (until the task is aborted), each handled by
/// `handle` in a task of its own once it has a [`HandshakeSlot`]: at most `slots` connections
/// hold one at once (the rest wait in the listen queue), at most `per_source` of them from one
/// source (more wait for their source's share, see the module doc). The handler drops the slot
/// when its handshake is over. A failed `accept` (out of file descriptors) waits 100 ms.
pub(crate) fn accept_loop<F, Fut>(listener: TcpListener, slots: usize, per_source: usize, handle: F) -> JoinHandle<()>
where
    F: Fn(TcpStream, SocketAddr, HandshakeSlot) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(slots));
    let sources = Sources::new(per_source, WAITING_PER_SOURCE);
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
            let (stream, peer_addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match sources.enter(Source::of(peer_addr.ip())) {
                Entered::Now(share) => {
                    tokio::spawn(handle(stream, peer_addr, HandshakeSlot { _place: permit, _share: share }));
                }
                Entered::Wait(ticket) => {
                    // In line for its source's share, holding no place meanwhile.
                    drop(permit);
                    let (slots, handle) = (Arc::clone(&slots), Arc::clone(&handle));
                    tokio::spawn(async move {
                        let Ok(share) = tokio::time::timeout(HANDSHAKE_TIMEOUT, ticket.wait()).await else {
                            tracing::debug!(%peer_addr, "closed: its source's connections held every place of its share for {HANDSHAKE_TIMEOUT:?}");
                            return;
                        };
                        let Ok(place) = slots.acquire_owned().await else { return };
                        handle(stream, peer_addr, HandshakeSlot { _place: place, _share: share }).await;
                    });
                }
                Entered::Full => {
                    tracing::warn!(%peer_addr, "closed: {} connections from its source are in their handshake or waiting for it", per_source + WAITING_PER_SOURCE);
                }
            }
        }
    })
}

/// Where a connection comes from, as far as handshake limits go: an IPv4 address (an IPv6
/// address that maps one counts as it), or an IPv6 /64 (a host usually has a whole one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(Ipv4Addr),
    V6(u64),
}

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

/// A connection's place among those in their handshake (see [`accept_loop`]): given back when
/// dropped.
pub(crate) struct HandshakeSlot {
    _place: OwnedSemaphorePermit,
    _share: Share,
}

/// Each source's share of the places and its connections (holding a share or waiting for one).
#[derive(Clone)]
struct Sources {
    inner: Arc<Mutex<HashMap<Source, SourceState>>>,
    per_source: usize,
    waiting: usize,
}

struct SourceState {
    share: Arc<Semaphore>,
    /// Connections holding a share or waiting for one.
    users: usize,
}

/// How a connection entered its source's line.
enum Entered {
    /// It holds a share.
    Now(Share),
    /// It waits for one.
    Wait(Ticket),
    /// Its source has as many connections in line as it may: close it.
    Full,
}

/// A connection counted in its source's line (until dropped).
struct Member {
    sources: Sources,
    source: Source,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut all = self.sources.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = all.get_mut(&self.source) {
            state.users = state.users.saturating_sub(1);
            if state.users == 0 {
                all.remove(&self.source);
            }
        }
    }
}

/// A share of its source's places, held.
struct Share {
    _permit: OwnedSemaphorePermit,
    _member: Member,
}

/// A connection waiting for a share.
struct Ticket {
    share: Arc<Semaphore>,
    member: Member,
}

impl Ticket {
    async fn wait(self) -> Share {
        match self.share.acquire_owned().await {
            Ok(permit) => Share { _permit: permit, _member: self.member },
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Sources {
    fn new(per_source: usize, waiting: usize) -> Sources {
        Sources { inner: Arc::default(), per_source, waiting }
    }

    /// Count a connection from `source` in: with a share if one is free, else waiting for one,
    /// unless its source has `per_source + waiting` in line already.
    fn enter(&self, source: Source) -> Entered {
        let mut all = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let state = all.entry(source).or_insert_with(|| SourceState { share: Arc::new(Semaphore::new(self.per_source)), users: 0 });
        if state.users >= self.per_source + self.waiting {
            return Entered::Full;
        }
        state.users += 1;
        let share = Arc::clone(&state.share);
        drop(all);
        let member = Member { sources: self.clone(), source };
        match Arc::clone(&share).try_acquire_owned() {
            Ok(permit) => Entered::Now(Share { _permit: permit, _member: member }),
            Err(_) => Entered::Wait(Ticket { share, member }),
        }
    }

    /// Connections from `source` in line (tests).
    #[cfg(test)]
    fn users(&self, source: Source) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).get(&source).map_or(0, |s| s.users)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("an IP");
        assert_eq!(Source::of(ip("10.0.0.5")), Source::V4("10.0.0.5".parse().expect("v4")));
        assert_ne!(Source::of(ip("10.0.0.5")), Source::of(ip("10.0.0.6")));
        // An IPv4-mapped IPv6 address is that IPv4 address.
        assert_eq!(Source::of(ip("::ffff:10.0.0.5")), Source::of(ip("10.0.0.5")));
        // One /64 is one source; the next /64 is another.
        assert_eq!(Source::of(ip("2001:db8:1:2::1")), Source::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(Source::of(ip("2001:db8:1:2::1")), Source::of(ip("2001:db8:1:3::1")));
    }

    #[tokio::test]
    async fn past_its_share_a_source_waits_and_past_its_line_it_is_refused() {
        let sources = Sources::new(2, 1);
        let (a, b) = (Source::of("10.0.0.1".parse().expect("ip")), Source::of("10.0.0.2".parse().expect("ip")));
        let first = match sources.enter(a) { Entered::Now(s) => s, _ => panic!("a share") };
        let _second = match sources.enter(a) { Entered::Now(s) => s, _ => panic!("a share") };
        let third = match sources.enter(a) { Entered::Wait(t) => t, _ => panic!("waits") };
        assert!(matches!(sources.enter(a), Entered::Full), "a fourth is refused");
        // Another source has its own share.
        assert!(matches!(sources.enter(b), Entered::Now(_)));
        assert_eq!(sources.users(b), 0, "forgotten once its one connection is done");
        // The waiting one gets the share the first gives back.
        let waiting = tokio::spawn(third.wait());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        let share = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("a share freed").expect("task");
        assert_eq!(sources.users(a), 2);
        drop(share);
        drop(_second);
        assert_eq!(sources.users(a), 0, "a source with no connection is forgotten");
    }
}

//! The calling end of call channels: one connection to each peer node session this node has
//! called, opened on the first call (an offer asked of one of the peer's members over the
//! session, then a connection to the peer's call port presenting the offer's token), carrying
//! every call to that node with its cancel frames, and the replies back to the calls waiting.
//!
//! A channel ends when its connection breaks or the peer's session ends (`Channels::
//! session_ended`): every call waiting on it whose frame was written whole then sees its reply
//! sender dropped, which the caller treats as the node lost mid-call; the others are told they
//! were not sent (on TLS as on plain TCP). A channel that could not be opened sent nothing.
//!
//! Owns [`Channels`] (the table of open channels, by session) and [`Channel`]. Not the serving
//! end (`call_port`), not the frames (`wire`), not what a lost call means (`remote`).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use ractor::rpc::CallResult;
use ractor::ActorRef;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::link::{self, FrameWriter, Refused};
use crate::tls::NodeTls;
use crate::wire::{self, ChannelHello, ChannelOffer, ChannelWelcome, Frame, PoolMemberMsg, WIRE_VERSION};

/// The longest a channel takes to open (offer, connect, handshake) before the call goes
/// elsewhere; a call with less time left waits only that. Longer than a call port's handshake
/// limit: a connection queued behind clients that never say anything is accepted in time.
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a failed opening is remembered: calls to that node meanwhile go elsewhere at once
/// instead of each waiting for the same failure.
pub(crate) const FAILED_OPEN_MEMORY: Duration = Duration::from_secs(5);

/// Why no channel to a member's node could be had (nothing was sent either way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChannelError {
    /// This node has no session with it (it is going or gone).
    NoSession,
    /// Opening failed (or failed less than [`FAILED_OPEN_MEMORY`] ago), and why.
    Failed(String),
}

/// The open channels of one node, by the ractor_cluster session id of the peer they go to.
#[derive(Default)]
pub(crate) struct Channels {
    open: Mutex<HashMap<u64, Arc<Channel>>>,
    /// One opening at a time per session: the callers that find none open wait for it.
    opening: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// Openings that failed, with when and why.
    failed: Mutex<HashMap<u64, (Instant, String)>>,
    /// The node stopped: no channel opens any more.
    closed: AtomicBool,
}

impl Channels {
    /// The open channel to session `node_id`, or a new one from `open`.
    pub(crate) async fn get<F, Fut>(&self, node_id: u64, open: F) -> Result<Arc<Channel>, ChannelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Channel, String>>,
    {
        if let Some(c) = self.find(node_id) {
            return Ok(c);
        }
        self.recent_failure(node_id)?;
        let lock = self.opening.lock().map_err(|_| ChannelError::NoSession)?.entry(node_id).or_default().clone();
        let _opening = lock.lock().await;
        if let Some(c) = self.find(node_id) {
            return Ok(c);
        }
        // The caller before this one may have just failed.
        self.recent_failure(node_id)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(ChannelError::NoSession);
        }
        let c = match open().await {
            Ok(c) => Arc::new(c),
            Err(why) => {
                if let Ok(mut failed) = self.failed.lock() {
                    failed.insert(node_id, (Instant::now(), why.clone()));
                }
                return Err(ChannelError::Failed(why));
            }
        };
        if let Ok(mut open) = self.open.lock() {
            open.insert(node_id, Arc::clone(&c));
        }
        // Stopped meanwhile: what `close_all` did not see is closed here.
        if self.closed.load(Ordering::Acquire) {
            self.close_all();
            return Err(ChannelError::NoSession);
        }
        Ok(c)
    }

    /// The open channel to session `node_id`, if there is one.
    pub(crate) fn find(&self, node_id: u64) -> Option<Arc<Channel>> {
        self.open.lock().ok()?.get(&node_id).filter(|c| c.is_open()).cloned()
    }

    /// `Err` while an opening to `node_id` failed less than [`FAILED_OPEN_MEMORY`] ago.
    fn recent_failure(&self, node_id: u64) -> Result<(), ChannelError> {
        let Ok(mut failed) = self.failed.lock() else { return Ok(()) };
        match failed.get(&node_id) {
            Some((when, why)) if when.elapsed() < FAILED_OPEN_MEMORY => Err(ChannelError::Failed(format!("{why} (less than {FAILED_OPEN_MEMORY:?} ago)"))),
            Some(_) => {
                failed.remove(&node_id);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The session `node_id` ended: its channel closes, and the calls waiting on it are lost.
    pub(crate) fn session_ended(&self, node_id: u64) {
        let channel = self.open.lock().ok().and_then(|mut open| open.remove(&node_id));
        if let Ok(mut opening) = self.opening.lock() {
            opening.remove(&node_id);
        }
        if let Ok(mut failed) = self.failed.lock() {
            failed.remove(&node_id);
        }
        if let Some(c) = channel {
            c.close();
        }
    }

    /// Close every channel; none opens any more (the node stops).
    pub(crate) fn close_all(&self) {
        self.closed.store(true, Ordering::Release);
        let all: Vec<Arc<Channel>> = self.open.lock().map(|mut open| open.drain().map(|(_, c)| c).collect()).unwrap_or_default();
        for c in all {
            c.close();
        }
    }
}

/// What became of a call sent on a channel (a dropped sender: the channel broke after the call
/// frame was written whole — the call may have run there).
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The serving node's encoded reply.
    Reply(Bytes),
    /// The channel closed before the call frame was written whole: the peer cannot have run it.
    NotSent,
}

/// Why a call was not sent on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The channel had closed.
    Closed,
    /// The call frame is larger than the serving node takes.
    TooLarge { len: usize, max: usize },
}

/// A waiting call: where its outcome goes, and its frame's end offset among the bytes taken
/// by the writer.
type Waiter = (oneshot::Sender<Outcome>, u64);

/// The calls waiting for a reply on one channel (`None` once it closed).
#[derive(Default)]
struct Waiting(Mutex<Option<HashMap<u64, Waiter>>>);

impl Waiting {
    fn reply(&self, id: u64, body: Bytes) {
        if let Some((tx, _)) = self.0.lock().ok().and_then(|mut w| w.as_mut()?.remove(&id)) {
            let _ = tx.send(Outcome::Reply(body));
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut w) = self.0.lock() {
            if let Some(w) = w.as_mut() {
                w.remove(&id);
            }
        }
    }

    /// Closed with `written` bytes written to the socket: a call whose frame ends beyond that
    /// is told it was not sent; every other waiting call's sender drops (lost).
    fn close(&self, written: u64) {
        let waiting = self.0.lock().ok().and_then(|mut w| w.take()).unwrap_or_default();
        for (_, (tx, end)) in waiting {
            if end > written {
                let _ = tx.send(Outcome::NotSent);
            }
        }
    }
}

/// What a channel's handle and its reader share.
struct Shared {
    out: Arc<FrameWriter>,
    waiting: Waiting,
}

impl Shared {
    /// Close the connection (the peer sees it end) and settle the waiting calls.
    fn close(&self) {
        self.out.close();
        self.waiting.close(self.out.written());
    }
}

/// One open call channel.
pub(crate) struct Channel {
    shared: Arc<Shared>,
    reader: AbortHandle,
    /// The largest frame body the serving node takes.
    peer_max: usize,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.close();
    }
}

impl Channel {
    /// A channel on a plain TCP connection through its handshake (frames written by their
    /// senders); `lost` runs when the connection breaks (not when the channel is closed from
    /// this end).
    fn plain(stream: TcpStream, max_frame: usize, peer_max: usize, lost: impl FnOnce() + Send + 'static) -> Channel {
        let (input, output) = stream.into_split();
        // Unsent call frames are capped at two of the largest the peer takes; a caller beyond
        // that waits for room (under its deadline).
        let writer = FrameWriter::tcp(output, link::unsent_cap(peer_max));
        Channel::reading(input, max_frame, peer_max, writer, lost)
    }

    /// A channel on an encrypted connection through its handshake (frames written by the
    /// writer's flusher task; the same cap).
    fn encrypted<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S, max_frame: usize, peer_max: usize, lost: impl FnOnce() + Send + 'static) -> Channel {
        let (input, output) = tokio::io::split(stream);
        let writer = FrameWriter::stream(Box::new(output), link::unsent_cap(peer_max));
        Channel::reading(input, max_frame, peer_max, writer, lost)
    }

    /// Start the reader that hands each reply to its call; when the connection breaks it
    /// closes the channel (both ways: the serving node sees it end and abandons the calls).
    fn reading<R: AsyncRead + Unpin + Send + 'static>(input: R, max_frame: usize, peer_max: usize, out: Arc<FrameWriter>, lost: impl FnOnce() + Send + 'static) -> Channel {
        let shared = Arc::new(Shared { out, waiting: Waiting(Mutex::new(Some(HashMap::new()))) });
        let on_read = Arc::clone(&shared);
        let reader = tokio::spawn(async move {
            let mut frames = link::frames(input, max_frame);
            let why = loop {
                match frames.next().await {
                    Some(Ok(frame)) => match Frame::decode(frame) {
                        Ok(Frame::Reply { id, body }) => on_read.waiting.reply(id, body),
                        Ok(_) => break "a call or cancel frame from the serving end".to_string(),
                        Err(e) => break e,
                    },
                    Some(Err(e)) => break e.to_string(),
                    None => break "closed by the serving node".to_string(),
                }
            };
            tracing::debug!("a call channel broke: {why}");
            on_read.close();
            lost();
        });
        Channel { shared, reader: reader.abort_handle(), peer_max }
    }

    /// Whether calls can still be sent on it.
    pub(crate) fn is_open(&self) -> bool {
        self.shared.waiting.0.lock().is_ok_and(|w| w.is_some())
    }

    /// Send the call frame `frame` of call `id` (waiting while the unsent frames are at their
    /// cap: bound it with the call's deadline); its outcome comes on the receiver (dropped
    /// unanswered: the channel broke after the frame was written whole, the call may have
    /// run). `Err`: nothing was sent.
    pub(crate) async fn send(&self, id: u64, frame: Bytes) -> Result<oneshot::Receiver<Outcome>, SendError> {
        let body = frame.len().saturating_sub(pyvisor_protocol::LENGTH_PREFIX);
        if body > self.peer_max {
            return Err(SendError::TooLarge { len: body, max: self.peer_max });
        }
        let (tx, rx) = oneshot::channel();
        let w = &self.shared.out;
        let mut tx = Some(tx);
        let sent = w
            .until_room(|| {
                // Under the waiting lock: a close settles this call with its offset.
                let mut waiting = self.shared.waiting.0.lock().map_err(|_| Refused::Closed)?;
                let map = waiting.as_mut().ok_or(Refused::Closed)?;
                let end = w.send(&frame)?;
                if let Some(tx) = tx.take() {
                    map.insert(id, (tx, end));
                }
                Ok(())
            })
            .await;
        sent.map(|()| rx).map_err(|_| SendError::Closed)
    }

    /// The caller gave up call `id`: forget it here, and tell the serving node (a cancel is
    /// never refused for want of room).
    pub(crate) fn cancel(&self, id: u64) {
        self.shared.waiting.forget(id);
        let _ = self.shared.out.send_uncapped(&Frame::Cancel { id }.encode());
    }

    /// Close from this end: the peer sees the connection end; the calls waiting are lost, or
    /// not sent when their frame was not written whole.
    pub(crate) fn close(&self) {
        self.reader.abort();
        self.shared.close();
    }
}

/// Ask the member `member` (on the peer) for an offer, over its node's session.
pub(crate) async fn ask_offer(member: &ActorRef<PoolMemberMsg>) -> Result<ChannelOffer, String> {
    // Untimed here: the caller bounds the whole opening (a ractor reply port with a timeout is
    // dropped by ractor_cluster's forwarding when it expires, seen as a closed session).
    match member.call(PoolMemberMsg::Offer, None).await {
        Ok(CallResult::Success(body)) => wire::decode::<ChannelOffer>(&body).map_err(|e| format!("its offer: {e}")),
        Ok(CallResult::Timeout) => Err("no offer in time".into()),
        Ok(CallResult::SenderError) | Err(_) => Err("the member is gone (its session ended)".into()),
    }
}

/// Open a channel as `offer` says (to `session_ip` when it names no host): connect, TLS if
/// `tls`, present the token as node `me`. `lost` runs if the connection later breaks.
pub(crate) async fn dial(
    offer: ChannelOffer,
    session_ip: IpAddr,
    tls: Option<&NodeTls>,
    me: &str,
    max_frame: usize,
    lost: impl FnOnce() + Send + 'static,
) -> Result<Channel, String> {
    let ip = offer.host.as_deref().and_then(|h| h.parse().ok()).unwrap_or(session_ip);
    let addr = SocketAddr::new(ip, offer.port);
    let tcp = TcpStream::connect(addr).await.map_err(|e| format!("cannot connect to its call port {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    link::keepalive(&tcp);
    let peer_max = usize::try_from(offer.max_frame).unwrap_or(usize::MAX);
    let hello = ChannelHello { v: WIRE_VERSION, token: offer.token, node: me.to_string(), max_frame: max_frame as u64 };
    match tls {
        None => {
            let mut stream = tcp;
            handshake(&mut stream, &hello).await?;
            Ok(Channel::plain(stream, max_frame, peer_max, lost))
        }
        Some(t) => {
            let mut stream =
                t.connector.connect(t.server_name.clone(), tcp).await.map_err(|e| format!("the TLS handshake with its call port {addr}: {e}"))?;
            handshake(&mut stream, &hello).await?;
            Ok(Channel::encrypted(stream, max_frame, peer_max, lost))
        }
    }
}

/// Present the hello and read the answer.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, hello: &ChannelHello) -> Result<(), String> {
    stream.write_all(&wire::handshake_frame(hello)).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let frame = link::read_handshake(stream).await?;
    let welcome: ChannelWelcome = wire::decode(&frame)?;
    match welcome.refused {
        None => Ok(()),
        Some(why) => Err(format!("its call port refused the channel: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A serving end of our own: accepts one channel (any token), welcomes it, and hands the
    /// connection to the test.
    async fn serving_end(peer_max: u64) -> (ChannelOffer, tokio::task::JoinHandle<TcpStream>) {
        let (offer, listener) = serving_end_on(peer_max).await;
        let accepted = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accepts");
            let _hello = link::read_handshake(&mut s).await.expect("a hello");
            s.write_all(&wire::handshake_frame(&ChannelWelcome { v: WIRE_VERSION, refused: None })).await.expect("writes");
            s
        });
        (offer, accepted)
    }

    fn call_frame(id: u64, body_len: usize) -> Bytes {
        Frame::Call { id, member: 1, body: Bytes::from(vec![0xc0; body_len]) }.encode()
    }

    #[tokio::test]
    async fn a_broken_reply_stream_closes_the_connection_and_loses_the_calls_in_flight() {
        let (offer, accepted) = serving_end(1 << 20).await;
        let lost = Arc::new(AtomicBool::new(false));
        let noticed = Arc::clone(&lost);
        let channel = dial(offer, "127.0.0.1".parse().expect("an IP"), None, "a@127.0.0.1", 1 << 20, move || noticed.store(true, Ordering::SeqCst))
            .await
            .expect("the channel opens");
        let mut server = accepted.await.expect("accepted");
        let waiting = channel.send(7, call_frame(7, 10)).await.expect("sent");
        // The call frame arrived whole; then the serving end sends a frame of no known kind.
        let mut got = vec![0u8; call_frame(7, 10).len()];
        server.read_exact(&mut got).await.expect("the call frame");
        server.write_all(&[0, 0, 0, 9, 99, 0, 0, 0, 0, 0, 0, 0, 7]).await.expect("writes");
        let outcome = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("settled");
        assert!(outcome.is_err(), "a call written whole is lost (it may have run), got {outcome:?}");
        assert!(lost.load(Ordering::SeqCst), "the broken channel was not reported");
        assert!(!channel.is_open());
        // The serving end sees the connection end (and would abandon the calls it runs).
        let mut rest = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), server.read(&mut rest)).await.expect("not left open");
        assert!(matches!(read, Ok(0) | Err(_)), "the connection stayed open: {read:?}");
    }

    /// A TLS serving end of our own (a self-signed certificate for `localhost`, made here):
    /// accepts one channel, welcomes it, and hands the encrypted stream to the test.
    async fn tls_serving_end(peer_max: u64) -> (ChannelOffer, NodeTls, tokio::task::JoinHandle<tokio_rustls::server::TlsStream<TcpStream>>) {
        let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
        let dir = std::env::temp_dir().join(format!("pyvisor-channel-tls-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let (pem, key) = (dir.join("node.pem"), dir.join("node.key"));
        std::fs::write(&pem, cert.pem()).expect("write the certificate");
        std::fs::write(&key, signing_key.serialize_pem()).expect("write the key");
        let tls = NodeTls::from_pem_files(&pem, &key, &pem, "localhost").expect("TLS settings");
        let _ = std::fs::remove_dir_all(&dir);
        let (offer, plain) = serving_end_on(peer_max).await;
        let acceptor = tls.acceptor.clone();
        let accepted = tokio::spawn(async move {
            let (s, _) = plain.accept().await.expect("accepts");
            let mut s = acceptor.accept(s).await.expect("the TLS handshake");
            let _hello = link::read_handshake(&mut s).await.expect("a hello");
            s.write_all(&wire::handshake_frame(&ChannelWelcome { v: WIRE_VERSION, refused: None })).await.expect("writes");
            s.flush().await.expect("flushes");
            s
        });
        (offer, tls, accepted)
    }

    /// A listener for a serving end, and the offer naming it.
    async fn serving_end_on(peer_max: u64) -> (ChannelOffer, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let port = listener.local_addr().expect("an address").port();
        (ChannelOffer { v: WIRE_VERSION, host: Some("127.0.0.1".into()), port, token: vec![1; 16], max_frame: peer_max }, listener)
    }

    /// Send calls on `channel` until its unsent frames reach their cap (the serving end reads
    /// nothing), drop the serving end with `drop_server`, and count the calls told "not
    /// sent" and those lost.
    async fn fill_then_break(channel: &Channel, drop_server: impl FnOnce()) -> (usize, usize) {
        let mut outcomes = Vec::new();
        for id in 2..200 {
            match tokio::time::timeout(Duration::from_millis(200), channel.send(id, call_frame(id, 200 * 1024))).await {
                Ok(Ok(rx)) => outcomes.push(rx),
                Ok(Err(e)) => panic!("send {id}: {e:?}"),
                Err(_) => break, // waiting for room: backpressure
            }
        }
        assert!(outcomes.len() < 198, "the unsent frames were never capped");
        drop_server();
        let (mut not_sent, mut lost) = (0, 0);
        for rx in outcomes {
            match tokio::time::timeout(Duration::from_secs(5), rx).await.expect("settled") {
                Ok(Outcome::NotSent) => not_sent += 1,
                Err(_) => lost += 1,
                Ok(Outcome::Reply(_)) => panic!("no reply was sent"),
            }
        }
        (not_sent, lost)
    }

    #[tokio::test]
    async fn on_tls_too_calls_not_written_whole_when_the_channel_breaks_were_not_sent() {
        let (offer, tls, accepted) = tls_serving_end(256 * 1024).await;
        let channel =
            dial(offer, "127.0.0.1".parse().expect("an IP"), Some(&tls), "a@127.0.0.1", 1 << 20, || {}).await.expect("the channel opens");
        let server = accepted.await.expect("accepted");
        let (not_sent, lost) = fill_then_break(&channel, move || drop(server)).await;
        assert!(lost >= 1, "the frames the TLS stream took may have been read: lost, not `not sent`");
        assert!(not_sent >= 1, "frames that never left this process were reported as lost");
    }

    #[tokio::test]
    async fn calls_not_written_whole_when_the_channel_breaks_were_not_sent_and_a_call_too_large_is_refused() {
        let (offer, accepted) = serving_end(256 * 1024).await;
        let channel = dial(offer, "127.0.0.1".parse().expect("an IP"), None, "a@127.0.0.1", 1 << 20, || {}).await.expect("the channel opens");
        let server = accepted.await.expect("accepted");
        // Larger than the serving end takes: refused, nothing written.
        assert_eq!(channel.send(1, call_frame(1, 256 * 1024)).await.err(), Some(SendError::TooLarge { len: 256 * 1024 + 17, max: 256 * 1024 }));
        // The serving end reads nothing: frames fill the socket, then wait unsent, then the
        // senders wait for room.
        let (not_sent, lost) = fill_then_break(&channel, move || drop(server)).await;
        assert!(lost >= 1, "the frames the socket took may have been read: lost, not `not sent`");
        assert!(not_sent >= 1, "frames that never left this process were reported as lost");
    }
}

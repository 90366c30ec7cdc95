//! A node's call port: the listener call channels from peers arrive on, and serving them.
//!
//! A peer asks one of this node's pool members for an offer over its ractor_cluster session
//! (authenticated by the cookie, and encrypted with TLS when the node has it): the call port's
//! address and a random token good for one connection within [`TOKEN_LIFE`]. The peer
//! connects (with TLS if this node has it, the same certificates as the session) and presents
//! the token in its first frame; anything else — a wrong, used or expired token, another wire
//! version, garbage, silence past [`HANDSHAKE_TIMEOUT`] — is refused and the connection closed.
//! At most [`MAX_HANDSHAKES`] connections are in their handshake at once, at most
//! [`MAX_HANDSHAKES_PER_SOURCE`] of them from one address (more are closed at once: one host's
//! silent connections cannot keep every peer out). After the handshake
//! the channel's one task runs each call frame (`serve::call`, polled there: no hop between
//! tasks) and writes its reply — waiting, and reading no new call meanwhile, while the caller
//! does not read its replies (backpressure, never a dropped channel); a result larger than the
//! caller takes is answered `result_too_large`; a cancel frame abandons its call. When the
//! connection ends — closed by the caller, the caller's session ended, TCP keepalive gave a
//! vanished caller up (~25 s), or this node halts — the calls still running for it are
//! abandoned too.
//!
//! Owns the listener, the tokens and the serving end of each channel. Not the calling end
//! (`channel`), not the frames (`wire`), not running a call (`serve`).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::ClusterError;
use crate::link::{self, FrameWriter};
use crate::serve::{self, Offers};
use crate::admission::{self, HANDSHAKE_TIMEOUT, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE};
#[cfg(test)]
use crate::admission::WAITING_PER_SOURCE;
use crate::tls::NodeTls;
use crate::wire::{self, ChannelHello, ChannelOffer, ChannelWelcome, Frame, WIRE_VERSION};

/// How long an offered token opens a channel.
pub const TOKEN_LIFE: Duration = Duration::from_secs(30);

/// Tokens handed out and not used yet, with when each expires.
#[derive(Default)]
struct Tokens(Mutex<HashMap<[u8; 16], Instant>>);

impl Tokens {
    fn issue(&self) -> [u8; 16] {
        let token: [u8; 16] = rand::random();
        if let Ok(mut t) = self.0.lock() {
            let now = Instant::now();
            t.retain(|_, until| *until > now);
            t.insert(token, now + TOKEN_LIFE);
        }
        token
    }

    /// Use `token`: `true` once for each token issued, within its life.
    fn take(&self, token: &[u8]) -> bool {
        let Ok(token) = <[u8; 16]>::try_from(token) else { return false };
        self.0.lock().ok().and_then(|mut t| t.remove(&token)).is_some_and(|until| until > Instant::now())
    }
}

/// A node's call port (stops listening when dropped; the channels it accepted end when the
/// node halts, or when their peer's session ends).
pub(crate) struct CallPort {
    addr: SocketAddr,
    tokens: Arc<Tokens>,
    max_frame: usize,
    task: JoinHandle<()>,
}

impl Drop for CallPort {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What every connection of a call port needs.
#[derive(Clone)]
struct Ctx {
    tokens: Arc<Tokens>,
    tls: Option<NodeTls>,
    max_frame: usize,
    halt: watch::Receiver<bool>,
    /// The names of peers whose session ended.
    gone: broadcast::Sender<String>,
}

impl CallPort {
    /// Listen on `addr` (port 0: one the system picks); channels carry frames of at most
    /// `max_frame` bytes, and end when `halt` turns `true` or when their peer's name is sent on
    /// `gone` (its session ended).
    pub(crate) async fn start(
        addr: SocketAddr,
        tls: Option<NodeTls>,
        max_frame: usize,
        halt: watch::Receiver<bool>,
        gone: broadcast::Sender<String>,
    ) -> Result<CallPort, ClusterError> {
        let bind = |detail: String| ClusterError::Bind { addr, detail: format!("the call port: {detail}") };
        let listener = TcpListener::bind(addr).await.map_err(|e| bind(e.to_string()))?;
        let addr = listener.local_addr().map_err(|e| bind(e.to_string()))?;
        let tokens = Arc::new(Tokens::default());
        let ctx = Ctx { tokens: Arc::clone(&tokens), tls, max_frame, halt, gone };
        let task = admission::accept_loop(listener, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_SOURCE, move |stream, peer_addr, slot| {
            let ctx = ctx.clone();
            async move {
                if let Err(why) = accept(stream, ctx, slot).await {
                    tracing::warn!(%peer_addr, "a call channel was refused: {why}");
                }
            }
        });
        Ok(CallPort { addr, tokens, max_frame, task })
    }

    /// Stop listening (channels already accepted end when the node halts).
    pub(crate) fn stop(&self) {
        self.task.abort();
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What this node's members hand out: the port's address, the largest frame it takes, and
    /// a fresh token each time.
    pub(crate) fn offers(&self) -> Offers {
        let tokens = Arc::clone(&self.tokens);
        let ip = self.addr.ip();
        let host = (!ip.is_unspecified()).then(|| ip.to_string());
        let (port, max_frame) = (self.addr.port(), self.max_frame as u64);
        Arc::new(move || ChannelOffer { v: WIRE_VERSION, host: host.clone(), port, token: tokens.issue().to_vec(), max_frame })
    }
}

/// The peer of an accepted channel: its node name and the largest frame it takes.
struct Peer {
    node: String,
    max_frame: usize,
}

/// Take one connection through its handshake (TLS if any, then the token) within
/// [`HANDSHAKE_TIMEOUT`], give its handshake slot back, and serve it.
async fn accept(stream: TcpStream, ctx: Ctx, slot: admission::HandshakeSlot) -> Result<(), String> {
    let late = || format!("no handshake within {HANDSHAKE_TIMEOUT:?}");
    link::keepalive(&stream);
    // Subscribed before the handshake: a session that ends from now on ends the channel.
    let gone = ctx.gone.subscribe();
    match &ctx.tls {
        None => {
            let mut stream = stream;
            let peer = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, &ctx.tokens)).await.map_err(|_| late())??;
            drop(slot);
            let (input, output) = stream.into_split();
            // Unsent replies are capped at two of the largest frames the peer takes; beyond
            // that this channel stops reading calls until they are written.
            let writer = FrameWriter::tcp(output, link::unsent_cap(peer.max_frame));
            serve_channel(input, Replies(writer), &ctx, gone, peer).await;
        }
        Some(tls) => {
            let shake = async {
                let mut stream = tls.acceptor.accept(stream).await.map_err(|e| format!("TLS handshake: {e}"))?;
                let peer = handshake(&mut stream, &ctx.tokens).await?;
                Ok::<_, String>((stream, peer))
            };
            let (stream, peer) = tokio::time::timeout(HANDSHAKE_TIMEOUT, shake).await.map_err(|_| late())??;
            drop(slot);
            let (input, output) = tokio::io::split(stream);
            let writer = FrameWriter::stream(Box::new(output), link::unsent_cap(peer.max_frame));
            serve_channel(input, Replies(writer), &ctx, gone, peer).await;
        }
    }
    Ok(())
}

/// Read the peer's hello, check its token, answer: the peer, when accepted.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, tokens: &Tokens) -> Result<Peer, String> {
    let frame = link::read_handshake(stream).await?;
    let verdict = match wire::decode::<ChannelHello>(&frame) {
        Ok(hello) if tokens.take(&hello.token) => Ok(Peer { node: hello.node, max_frame: usize::try_from(hello.max_frame).unwrap_or(usize::MAX) }),
        Ok(_) => Err("an unknown, used or expired token".to_string()),
        Err(e) => Err(e),
    };
    let welcome = ChannelWelcome { v: WIRE_VERSION, refused: verdict.as_ref().err().cloned() };
    stream.write_all(&wire::handshake_frame(&welcome)).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    verdict
}

/// Where a channel's replies are written (closed when the channel ends).
struct Replies(Arc<FrameWriter>);

impl Replies {
    /// Write one reply, waiting while the peer does not read (backpressure: no new call is
    /// read meanwhile).
    async fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.send_waiting(frame).await.map(drop).map_err(|_| std::io::Error::other("the connection is closed"))
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The error kind of a reply too large for the caller to take: the call ran, its result
/// cannot be sent.
pub(crate) const RESULT_TOO_LARGE: &str = "result_too_large";

/// Serve one accepted channel until it ends, the node halts or the peer's session ends: one
/// task reads the frames, runs the calls (polled here, not spawned: no hop between tasks) and
/// writes their replies.
async fn serve_channel<R: AsyncRead + Unpin>(input: R, mut out: Replies, ctx: &Ctx, mut gone: broadcast::Receiver<String>, peer: Peer) {
    let mut halt = ctx.halt.clone();
    let mut frames = link::frames(input, ctx.max_frame);
    let mut running = FuturesUnordered::new();
    let mut cancels: HashMap<u64, oneshot::Sender<()>> = HashMap::new();
    let why = loop {
        let reply = tokio::select! {
            frame = frames.next() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => break e.to_string(),
                    None => break "closed by the caller".to_string(),
                };
                match Frame::decode(frame) {
                    Ok(Frame::Call { id, member, body }) => {
                        match cancels.entry(id) {
                            // A caller's ids are unique while its calls run: refuse, do not
                            // replace (the first call would never be answered).
                            Entry::Occupied(_) => {
                                let message = format!("call id {id} is already running on this channel");
                                Frame::Reply { id, body: serve::refusal("protocol", message).into() }.encode()
                            }
                            Entry::Vacant(slot) => {
                                let (cancel, cancelled) = oneshot::channel::<()>();
                                slot.insert(cancel);
                                // Copied out of the read buffer: a long call does not pin it.
                                let body = body.to_vec();
                                running.push(async move {
                                    tokio::select! {
                                        reply = serve::call(member, &body) => (id, Some(reply)),
                                        // Dropping the call abandons it (its worker is sent `cancel`).
                                        Ok(()) = cancelled => (id, None),
                                    }
                                });
                                continue;
                            }
                        }
                    }
                    Ok(Frame::Cancel { id }) => {
                        if let Some(cancel) = cancels.remove(&id) {
                            let _ = cancel.send(());
                        }
                        continue;
                    }
                    Ok(Frame::Reply { .. }) => break "a reply frame from the calling end".to_string(),
                    Err(e) => break e,
                }
            }
            Some((id, reply)) = running.next(), if !running.is_empty() => {
                cancels.remove(&id);
                let Some(body) = reply else { continue };
                let len = body.len();
                let frame = Frame::Reply { id, body: body.into() }.encode();
                if frame.len() - pyvisor_protocol::LENGTH_PREFIX > peer.max_frame {
                    // Sent, it would break the caller's channel and every call on it.
                    let message = format!("the result ({len} bytes) is larger than the calling node takes ({} bytes, its `max_frame`)", peer.max_frame);
                    Frame::Reply { id, body: serve::refusal(RESULT_TOO_LARGE, message).into() }.encode()
                } else {
                    frame
                }
            }
            _ = halt.wait_for(|halted| *halted) => break "this node stopped".to_string(),
            name = gone.recv() => match name {
                Ok(name) if name == peer.node => break "the caller's session ended".to_string(),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break "this node stopped".to_string(),
            },
        };
        // Written within the same watch: a peer that stops reading must not keep this task
        // past the node's halt or its session's end.
        let sent = tokio::select! {
            sent = out.send(&reply) => sent.map_err(|e| e.to_string()),
            _ = halt.wait_for(|halted| *halted) => Err("this node stopped".to_string()),
        };
        if let Err(e) = sent {
            break e;
        }
    };
    // The caller is gone: its calls still running are abandoned (dropped), as a dropped local
    // call is.
    tracing::debug!(peer = %peer.node, abandoned = running.len(), "a call channel ended: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{WireCall, WireReply};
    use tokio::io::AsyncReadExt;

    async fn port(max_frame: usize) -> (CallPort, watch::Sender<bool>) {
        let (port, halt, _gone) = port_telling_ends(max_frame).await;
        (port, halt)
    }

    /// A call port, its halt, and where the ends of peers' sessions are told.
    async fn port_telling_ends(max_frame: usize) -> (CallPort, watch::Sender<bool>, broadcast::Sender<String>) {
        let (halt, halted) = watch::channel(false);
        let (gone, _) = broadcast::channel(16);
        let port = CallPort::start("127.0.0.1:0".parse().expect("an address"), None, max_frame, halted, gone.clone()).await.expect("the call port listens");
        (port, halt, gone)
    }

    /// Connect and present `token`; the welcome's refusal, if any.
    async fn hello(port: &CallPort, token: Vec<u8>) -> (TcpStream, Option<String>) {
        hello_on(TcpStream::connect(port.addr()).await.expect("connects"), token).await
    }

    /// Present `token` on `s`; the welcome's refusal, if any.
    async fn hello_on(mut s: TcpStream, token: Vec<u8>) -> (TcpStream, Option<String>) {
        s.write_all(&wire::handshake_frame(&ChannelHello { v: WIRE_VERSION, token, node: "test@127.0.0.1".into(), max_frame: 1 << 20 })).await.expect("writes");
        let welcome: ChannelWelcome = wire::decode(&link::read_handshake(&mut s).await.expect("a welcome")).expect("decodes");
        (s, welcome.refused)
    }

    /// A call frame `id` for a member this process does not serve (answered "not running").
    fn unserved_call(id: u64) -> bytes::Bytes {
        let call = WireCall {
            v: WIRE_VERSION,
            function: "f".into(),
            payload: vec![0xc0],
            budget_ms: None,
            traceparent: None,
            tracestate: None,
            idempotent: None,
            call_id: Some(id),
            affinity: None,
            idempotency_key: None,
        };
        Frame::Call { id, member: u64::MAX, body: wire::encode(&call).into() }.encode()
    }

    /// Whether the other end closed the connection (within a guard).
    async fn closed(s: &mut TcpStream) -> bool {
        closed_within(s, Duration::from_secs(5)).await
    }

    /// Whether the other end closed the connection within `limit`.
    async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(limit, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn a_channel_opens_with_a_fresh_token_once_and_never_with_another() {
        let (port, _halt) = port(1 << 20).await;
        let (mut forged, refused) = hello(&port, vec![7; 16]).await;
        assert!(refused.is_some_and(|r| r.contains("token")), "a forged token was accepted");
        assert!(closed(&mut forged).await, "a refused connection stays open");
        let token = (port.offers())().token;
        let (_ok, refused) = hello(&port, token.clone()).await;
        assert_eq!(refused, None);
        let (mut again, refused) = hello(&port, token).await;
        assert!(refused.is_some(), "a used token opened a second channel");
        assert!(closed(&mut again).await);
    }

    #[tokio::test]
    async fn garbage_or_an_oversized_frame_closes_the_connection() {
        let (port, _halt) = port(1 << 20).await;
        // A hello announcing 1 GiB: refused at its length prefix, nothing reserved for it.
        let mut huge = TcpStream::connect(port.addr()).await.expect("connects");
        huge.write_all(&(1u32 << 30).to_be_bytes()).await.expect("writes");
        assert!(closed(&mut huge).await, "an oversized hello was waited for");
        // Not MessagePack.
        let mut garbage = TcpStream::connect(port.addr()).await.expect("connects");
        garbage.write_all(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]).await.expect("writes");
        assert!(link::read_handshake(&mut garbage).await.is_ok_and(|f| wire::decode::<ChannelWelcome>(&f).is_ok_and(|w| w.refused.is_some())));
        assert!(closed(&mut garbage).await);
        // Through the handshake, then a frame over the channel's cap.
        let (mut s, refused) = hello(&port, (port.offers())().token).await;
        assert_eq!(refused, None);
        s.write_all(&((1u32 << 20) + 1).to_be_bytes()).await.expect("writes");
        assert!(closed(&mut s).await, "a frame over the cap was waited for");
    }

    #[tokio::test]
    async fn silent_clients_do_not_keep_a_peer_out() {
        let (port, _halt) = port(1 << 20).await;
        let mut silent = Vec::new();
        for _ in 0..8 {
            silent.push(TcpStream::connect(port.addr()).await.expect("connects"));
        }
        let (_s, refused) = tokio::time::timeout(Duration::from_secs(5), hello(&port, (port.offers())().token)).await.expect("a peer got through");
        assert_eq!(refused, None);
    }

    /// A connection to `port` from `source` (another loopback address stands for another host).
    async fn connect_from(port: &CallPort, source: [u8; 4]) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.bind((std::net::Ipv4Addr::from(source), 0).into()).expect("binds the source address");
        socket.connect(port.addr()).await.expect("connects")
    }

    #[tokio::test]
    async fn one_host_cannot_take_every_handshake_slot() {
        let (port, _halt) = port(1 << 20).await;
        // One host opens more silent connections than there are places in all: its share
        // holds places, the next ones wait in line, the one past the line is closed.
        let mut silent = Vec::new();
        for _ in 0..MAX_HANDSHAKES_PER_SOURCE + WAITING_PER_SOURCE + 1 {
            silent.push(connect_from(&port, [127, 0, 0, 2]).await);
        }
        let past = silent.len() - 1;
        assert!(closed(&mut silent[past]).await, "a connection past the host's line was kept");
        assert!(!closed_within(&mut silent[0], Duration::from_millis(200)).await, "a connection within the host's share was closed");
        assert!(!closed_within(&mut silent[past - 1], Duration::from_millis(200)).await, "a connection in line was closed");
        // A peer on another address gets in long before the silent ones' time is up.
        let (_s, refused) = tokio::time::timeout(Duration::from_secs(5), hello(&port, (port.offers())().token)).await.expect("a peer got through");
        assert_eq!(refused, None);
    }

    #[tokio::test]
    async fn a_burst_of_peers_behind_one_address_waits_for_places_and_gets_in() {
        let (port, _halt) = port(1 << 20).await;
        let n = MAX_HANDSHAKES_PER_SOURCE + 8;
        // Connected first, all from one address: more than its share are in line at once.
        let mut streams = Vec::new();
        for _ in 0..n {
            streams.push(connect_from(&port, [127, 0, 0, 3]).await);
        }
        let hellos: Vec<_> = streams.into_iter().map(|s| hello_on(s, (port.offers())().token)).collect();
        let welcomes = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(hellos)).await.expect("every peer got an answer");
        assert!(welcomes.iter().all(|(_, refused)| refused.is_none()), "{:?}", welcomes.iter().map(|w| &w.1).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_call_for_a_member_not_served_here_is_answered_not_running() {
        let (port, _halt) = port(1 << 20).await;
        let (mut s, refused) = hello(&port, (port.offers())().token).await;
        assert_eq!(refused, None);
        s.write_all(&unserved_call(5)).await.expect("writes");
        let mut frames = link::frames(&mut s, 1 << 20);
        let frame = tokio::time::timeout(Duration::from_secs(5), frames.next()).await.expect("an answer").expect("a frame").expect("readable");
        let Ok(Frame::Reply { id: 5, body }) = Frame::decode(frame) else { panic!("not the call's reply") };
        let reply: WireReply = wire::decode(&body).expect("decodes");
        assert!(matches!(reply.result, Err(e) if e.kind == serve::NOT_RUNNING));
    }

    #[tokio::test]
    async fn a_channel_ends_when_its_callers_session_ends_and_only_then() {
        let (port, _halt, gone) = port_telling_ends(1 << 20).await;
        let (s, refused) = hello(&port, (port.offers())().token).await;
        assert_eq!(refused, None);
        let mut frames = link::frames(s, 1 << 20);
        // Another node's session ends: this channel still serves.
        gone.send("other@127.0.0.1".into()).expect("the channel listens");
        frames.get_mut().write_all(&unserved_call(1)).await.expect("writes");
        let frame = tokio::time::timeout(Duration::from_secs(5), frames.next()).await.expect("an answer").expect("a frame").expect("readable");
        assert!(matches!(Frame::decode(frame), Ok(Frame::Reply { id: 1, .. })), "not the call's reply");
        // Its caller's session ends (a stopped caller keeps its sockets open): the channel ends.
        gone.send("test@127.0.0.1".into()).expect("the channel listens");
        assert!(closed(frames.get_mut()).await, "the channel outlived its caller's session");
    }

    #[tokio::test]
    async fn a_caller_that_stops_reading_slows_its_channel_down_and_loses_no_reply() {
        let (port, _halt) = port(1 << 20).await;
        let (s, refused) = hello(&port, (port.offers())().token).await;
        assert_eq!(refused, None);
        let (mut input, mut output) = s.into_split();
        // Calls for a member not served here: each answered at once (~120 B), far more in all
        // than the unsent cap (2 MiB for a caller taking 1 MiB frames) and the sockets hold.
        const CALLS: u64 = 150_000;

        let writer = tokio::spawn(async move {
            for id in 0..CALLS {
                output.write_all(&unserved_call(id)).await?;
            }
            Ok::<_, std::io::Error>(output)
        });
        // Not reading for a while: the serving end must wait, not give the channel up.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut frames = link::frames(&mut input, 1 << 20);
        let mut answered = 0u64;
        while answered < CALLS {
            let frame = tokio::time::timeout(Duration::from_secs(30), frames.next()).await.expect("replies keep coming");
            let Some(Ok(frame)) = frame else { panic!("the channel ended after {answered} replies: {frame:?}") };
            assert!(matches!(Frame::decode(frame), Ok(Frame::Reply { .. })));
            answered += 1;
        }
        let _still_open = writer.await.expect("the writer ran").expect("every call was taken");
    }

    #[test]
    fn a_token_is_good_once_and_only_as_issued() {
        let tokens = Tokens::default();
        let t = tokens.issue();
        assert!(!tokens.take(&t[..15]), "a prefix of a token");
        assert!(tokens.take(&t));
        assert!(!tokens.take(&t), "a token twice");
        assert!(!tokens.take(&[0; 16]));
    }
}

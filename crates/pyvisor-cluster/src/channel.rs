//! The calling end of call channels: one connection to each peer node session this node has
//! called, opened on the first call (an offer asked of one of the peer's members over the
//! session, then a connection to the peer's call port presenting the offer's token), carrying
//! every call to that node with its cancel frames, and the replies back to the calls waiting.
//!
//! A channel ends when its connection breaks or the peer's session ends (`Channels::
//! session_ended`): every call waiting on it then sees its reply sender dropped, which the
//! caller treats as the node lost mid-call. A channel that could not be opened sent nothing.
//!
//! Owns [`Channels`] (the table of open channels, by session) and [`Channel`]. Not the serving
//! end (`call_port`), not the frames (`wire`), not what a lost call means (`remote`).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use ractor::rpc::CallResult;
use ractor::ActorRef;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};

use crate::link::{self, DirectWriter};
use crate::tls::NodeTls;
use crate::wire::{self, ChannelHello, ChannelOffer, ChannelWelcome, Frame, PoolMemberMsg, WIRE_VERSION};

/// The longest a channel takes to open (offer, connect, handshake) before the call goes
/// elsewhere; a call with less time left waits only that.
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// The open channels of one node, by the ractor_cluster session id of the peer they go to.
#[derive(Default)]
pub(crate) struct Channels {
    open: Mutex<HashMap<u64, Arc<Channel>>>,
    /// One opening at a time per session: the callers that find none open wait for it.
    opening: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
}

impl Channels {
    /// The open channel to session `node_id`, or a new one from `open`.
    pub(crate) async fn get<F, Fut>(&self, node_id: u64, open: F) -> Result<Arc<Channel>, String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Channel, String>>,
    {
        if let Some(c) = self.find(node_id) {
            return Ok(c);
        }
        let lock = self.opening.lock().map_err(|_| "a poisoned lock")?.entry(node_id).or_default().clone();
        let _opening = lock.lock().await;
        if let Some(c) = self.find(node_id) {
            return Ok(c);
        }
        let c = Arc::new(open().await?);
        if let Ok(mut open) = self.open.lock() {
            open.insert(node_id, Arc::clone(&c));
        }
        Ok(c)
    }

    fn find(&self, node_id: u64) -> Option<Arc<Channel>> {
        self.open.lock().ok()?.get(&node_id).filter(|c| c.is_open()).cloned()
    }

    /// The session `node_id` ended: its channel closes, and the calls waiting on it are lost.
    pub(crate) fn session_ended(&self, node_id: u64) {
        let channel = self.open.lock().ok().and_then(|mut open| open.remove(&node_id));
        if let Ok(mut opening) = self.opening.lock() {
            opening.remove(&node_id);
        }
        if let Some(c) = channel {
            c.close();
        }
    }

    /// Close every channel (the node stops).
    pub(crate) fn close_all(&self) {
        let all: Vec<Arc<Channel>> = self.open.lock().map(|mut open| open.drain().map(|(_, c)| c).collect()).unwrap_or_default();
        for c in all {
            c.close();
        }
    }
}

/// The calls waiting for a reply on one channel (`None` once it closed).
#[derive(Default)]
struct Waiting(Mutex<Option<HashMap<u64, oneshot::Sender<Bytes>>>>);

impl Waiting {
    fn reply(&self, id: u64, body: Bytes) {
        if let Some(tx) = self.0.lock().ok().and_then(|mut w| w.as_mut()?.remove(&id)) {
            let _ = tx.send(body);
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut w) = self.0.lock() {
            if let Some(w) = w.as_mut() {
                w.remove(&id);
            }
        }
    }

    /// Closed: every waiting call's sender drops.
    fn close(&self) {
        let waiting = self.0.lock().ok().and_then(|mut w| w.take());
        drop(waiting);
    }
}

/// How frames leave: written by the sender itself (plain TCP), or through a writer task
/// (TLS: an encrypted stream cannot be written without awaiting).
enum Out {
    Direct(Arc<DirectWriter>),
    Queued(mpsc::Sender<Bytes>),
}

/// One open call channel.
pub(crate) struct Channel {
    out: Out,
    waiting: Arc<Waiting>,
    tasks: [AbortHandle; 2],
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
    fn plain(stream: TcpStream, max_frame: usize, lost: impl FnOnce() + Send + 'static) -> Channel {
        let (input, output) = stream.into_split();
        // Unsent bytes are capped at two of the largest frames the peer takes.
        let (writer, flusher) = DirectWriter::start(output, max_frame.saturating_mul(2).max(1 << 20));
        let waiting = Arc::new(Waiting(Mutex::new(Some(HashMap::new()))));
        Channel::reading(input, max_frame, Out::Direct(writer), flusher, waiting, lost)
    }

    /// A channel on an encrypted connection through its handshake (frames written by a
    /// writer task).
    fn encrypted<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S, max_frame: usize, lost: impl FnOnce() + Send + 'static) -> Channel {
        let (input, output) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(link::WRITE_QUEUE);
        let waiting = Arc::new(Waiting(Mutex::new(Some(HashMap::new()))));
        let on_write = Arc::clone(&waiting);
        let writer = tokio::spawn(async move {
            if link::write_frames(output, rx).await.is_err() {
                on_write.close();
            }
        });
        Channel::reading(input, max_frame, Out::Queued(tx), writer, waiting, lost)
    }

    /// Start the reader that hands each reply to its call; `writer` is the task that writes
    /// (or flushes) the frames.
    fn reading<R: AsyncRead + Unpin + Send + 'static>(
        input: R,
        max_frame: usize,
        out: Out,
        writer: JoinHandle<()>,
        waiting: Arc<Waiting>,
        lost: impl FnOnce() + Send + 'static,
    ) -> Channel {
        let on_read = Arc::clone(&waiting);
        let reader = tokio::spawn(async move {
            let mut frames = link::frames(input, max_frame);
            let why = loop {
                match frames.next().await {
                    Some(Ok(frame)) => match Frame::decode(frame) {
                        Ok(Frame::Reply { id, body }) => on_read.reply(id, body),
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
        Channel { out, waiting, tasks: [writer.abort_handle(), reader.abort_handle()] }
    }

    /// Whether calls can still be sent on it.
    pub(crate) fn is_open(&self) -> bool {
        self.waiting.0.lock().is_ok_and(|w| w.is_some())
    }

    /// Send the call frame `frame` of call `id`; its reply comes on the receiver (dropped
    /// unanswered: the channel broke, the call may have run). `None`: the channel had closed,
    /// nothing was sent.
    pub(crate) async fn send(&self, id: u64, frame: Bytes) -> Option<oneshot::Receiver<Bytes>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = self.waiting.0.lock().ok()?;
            w.as_mut()?.insert(id, tx);
        }
        let sent = match &self.out {
            Out::Direct(w) => w.send(&frame).is_ok(),
            Out::Queued(tx) => tx.send(frame).await.is_ok(),
        };
        if !sent {
            self.waiting.forget(id);
            return None;
        }
        Some(rx)
    }

    /// The caller gave up call `id`: forget it here, and tell the serving node.
    pub(crate) fn cancel(&self, id: u64) {
        self.waiting.forget(id);
        let frame = Frame::Cancel { id }.encode();
        match &self.out {
            Out::Direct(w) => {
                let _ = w.send(&frame);
            }
            Out::Queued(tx) => {
                if let Err(mpsc::error::TrySendError::Full(frame)) = tx.try_send(frame) {
                    // Queue full: the cancel waits its turn rather than being lost.
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(frame).await;
                    });
                }
            }
        }
    }

    /// Close from this end: the calls waiting are lost.
    pub(crate) fn close(&self) {
        self.waiting.close();
        if let Out::Direct(w) = &self.out {
            w.close();
        }
        for t in &self.tasks {
            t.abort();
        }
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
    let hello = ChannelHello { v: WIRE_VERSION, token: offer.token, node: me.to_string() };
    match tls {
        None => {
            let mut stream = tcp;
            handshake(&mut stream, &hello).await?;
            Ok(Channel::plain(stream, max_frame, lost))
        }
        Some(t) => {
            let mut stream =
                t.connector.connect(t.server_name.clone(), tcp).await.map_err(|e| format!("the TLS handshake with its call port {addr}: {e}"))?;
            handshake(&mut stream, &hello).await?;
            Ok(Channel::encrypted(stream, max_frame, lost))
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

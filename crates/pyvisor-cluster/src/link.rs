//! The plumbing of a call channel's connection, the same at both ends: accepting connections
//! with a bound on those not yet through their handshake, writing frames (straight from the
//! sending task on a plain TCP stream — no hop to a writer task; through a writer task that
//! sends many per write under load on a TLS stream), reading the one handshake frame each
//! side sends first, with a small cap, and TCP keepalive.
//!
//! Owns no protocol knowledge beyond "a frame is a length-prefixed body" (`wire` has the
//! frames, `channel` and `call_port` the two ends).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use pyvisor_protocol::FrameCodec;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;

/// Frames queued for one connection's writer before senders wait.
pub(crate) const WRITE_QUEUE: usize = 1024;

/// The largest handshake frame either side accepts (a hello or welcome is well under 1 KiB).
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 4096;

/// Read capacity of a connection's frame reader at the start.
pub(crate) const READ_CAPACITY: usize = 64 * 1024;

/// The cap on a connection's unsent bytes when the other end takes frames of up to
/// `peer_max` bytes: two of the largest (at least 1 MiB).
pub(crate) fn unsent_cap(peer_max: usize) -> usize {
    peer_max.saturating_mul(2).max(1 << 20)
}

/// Accept connections on `listener` for ever (until the task is aborted), each handled by
/// `handle` in a task of its own with a [`HandshakeSlot`]: at most `slots` connections are
/// between accept and the moment their handler drops the slot (their handshake), the rest
/// wait in the listen queue; and at most `per_source` of those come from one source (an IPv4
/// address, an IPv6 /64): a connection beyond that is closed at once, so one host cannot take
/// every slot. A failed `accept` (out of file descriptors) waits 100 ms.
pub(crate) fn accept_loop<F, Fut>(listener: TcpListener, slots: usize, per_source: usize, handle: F) -> JoinHandle<()>
where
    F: Fn(TcpStream, SocketAddr, HandshakeSlot) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(slots));
    let sources: Arc<Mutex<HashMap<Source, usize>>> = Arc::default();
    tokio::spawn(async move {
        loop {
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
            match listener.accept().await {
                Ok((stream, peer_addr)) => {
                    let Some(slot) = HandshakeSlot::take(permit, &sources, Source::of(peer_addr.ip()), per_source) else {
                        tracing::debug!(%peer_addr, "closed: {per_source} connections from that source are in their handshake already");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle(stream, peer_addr, slot));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Where a connection comes from, as far as handshake limits go: an IPv4 address (an IPv6
/// address that maps one counts as it), or an IPv6 /64 (a host usually has a whole one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(Ipv4Addr),
    V6(u64),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
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
    _permit: OwnedSemaphorePermit,
    sources: Arc<Mutex<HashMap<Source, usize>>>,
    source: Source,
}

impl HandshakeSlot {
    /// A slot for a connection from `source`, unless `per_source` of them are taken.
    fn take(permit: OwnedSemaphorePermit, sources: &Arc<Mutex<HashMap<Source, usize>>>, source: Source, per_source: usize) -> Option<HandshakeSlot> {
        let mut taken = sources.lock().unwrap_or_else(|e| e.into_inner());
        let n = taken.entry(source).or_insert(0);
        if *n >= per_source {
            return None;
        }
        *n += 1;
        Some(HandshakeSlot { _permit: permit, sources: Arc::clone(sources), source })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut taken = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = taken.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                taken.remove(&self.source);
            }
        }
    }
}

/// Write the frames sent on `rx` to `out` in order: whatever is queued when the writer wakes
/// goes out in one flush. Ends when every sender is gone or a write fails (`Err`: the
/// connection is broken).
pub(crate) async fn write_frames<W: AsyncWrite + Unpin>(out: W, mut rx: mpsc::Receiver<Bytes>) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(READ_CAPACITY, out);
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, 64).await > 0 {
        for frame in batch.drain(..) {
            out.write_all(&frame).await?;
        }
        out.flush().await?;
    }
    let _ = out.shutdown().await;
    Ok(())
}

/// Why a frame was not taken (none of its bytes were written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The connection is closed or broken.
    Closed,
    /// The bytes waiting unsent are at their cap: wait ([`DirectWriter::send_waiting`]).
    Full,
}

/// The writing end of a plain TCP connection, shared by the tasks that send on it: a frame is
/// written by its sender with a non-blocking write under a short lock; only what the socket
/// does not take at once waits in a buffer that a flusher task writes when the socket is
/// writable. Order is kept and a sender dropped mid-call never leaves half a frame.
///
/// The buffer holds at most `cap` bytes plus the rest of one frame: a frame that finds it
/// fuller than that waits (backpressure on the sender), except the small frames sent with
/// [`DirectWriter::send_uncapped`] (cancels), which must never be lost. Every byte taken and
/// every byte written to the socket is counted, so what was surely not written when the
/// connection closed is known ([`DirectWriter::written`]).
pub(crate) struct DirectWriter {
    half: OwnedWriteHalf,
    state: Mutex<Unsent>,
    /// Wakes the flusher: bytes wait.
    wake: Notify,
    /// Wakes senders waiting for room, and on close.
    drained: Notify,
    cap: usize,
}

struct Unsent {
    bytes: BytesMut,
    closed: bool,
    /// Bytes of frames taken so far (the end offset of the last frame taken).
    taken: u64,
    /// Bytes written to the socket so far.
    written: u64,
}

impl DirectWriter {
    /// Share `half`; at most about `cap` bytes wait unsent (see above). Its flusher task ends
    /// when the writer closes.
    pub(crate) fn start(half: OwnedWriteHalf, cap: usize) -> Arc<DirectWriter> {
        let state = Unsent { bytes: BytesMut::new(), closed: false, taken: 0, written: 0 };
        let w = Arc::new(DirectWriter { half, state: Mutex::new(state), wake: Notify::new(), drained: Notify::new(), cap });
        tokio::spawn(flush_unsent(Arc::clone(&w)));
        w
    }

    /// Take one whole frame (never blocks): its end offset among the bytes taken.
    pub(crate) fn send(&self, frame: &[u8]) -> Result<u64, Refused> {
        self.take(frame, true)
    }

    /// [`DirectWriter::send`] without the cap: for small frames that must not be refused.
    pub(crate) fn send_uncapped(&self, frame: &[u8]) -> Result<u64, Refused> {
        self.take(frame, false)
    }

    /// [`DirectWriter::send`], waiting while the unsent bytes are at their cap.
    pub(crate) async fn send_waiting(&self, frame: &[u8]) -> Result<u64, Refused> {
        self.until_room(|| self.send(frame)).await
    }

    /// Run `attempt` (a [`DirectWriter::send`] with whatever must happen under the same
    /// lock) again each time room is made, while it finds the unsent bytes at their cap.
    pub(crate) async fn until_room<T>(&self, mut attempt: impl FnMut() -> Result<T, Refused>) -> Result<T, Refused> {
        loop {
            let room = self.drained.notified();
            tokio::pin!(room);
            // Registered before the attempt: a drain between the attempt and the wait wakes it.
            room.as_mut().enable();
            match attempt() {
                Err(Refused::Full) => room.await,
                other => return other,
            }
        }
    }

    fn take(&self, frame: &[u8], capped: bool) -> Result<u64, Refused> {
        let mut st = self.state.lock().map_err(|_| Refused::Closed)?;
        if st.closed {
            return Err(Refused::Closed);
        }
        let mut rest = frame;
        if st.bytes.is_empty() {
            match self.half.try_write(frame) {
                Ok(n) => {
                    st.written += n as u64;
                    rest = &frame[n..];
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    drop(st);
                    self.close();
                    return Err(Refused::Closed);
                }
            }
        } else if capped && st.bytes.len() + frame.len() > self.cap {
            return Err(Refused::Full);
        }
        st.taken += frame.len() as u64;
        let end = st.taken;
        if !rest.is_empty() {
            st.bytes.extend_from_slice(rest);
            drop(st);
            self.wake.notify_one();
        }
        Ok(end)
    }

    /// Bytes written to the socket so far: a frame whose end offset is beyond it when the
    /// connection closed never reached the peer whole (so it cannot have been run there).
    pub(crate) fn written(&self) -> u64 {
        self.state.lock().map_or(0, |st| st.written)
    }

    /// No more frames; what waits unsent is dropped and the connection shut down both ways
    /// (the peer reads its end).
    pub(crate) fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.closed = true;
            st.bytes = BytesMut::new();
        }
        let _ = socket2::SockRef::from(self.half.as_ref()).shutdown(std::net::Shutdown::Both);
        self.wake.notify_one();
        self.drained.notify_waiters();
    }
}

/// Write what the senders left unsent whenever the socket can take it; ends when the writer
/// closes or the socket breaks (then the writer is closed).
async fn flush_unsent(w: Arc<DirectWriter>) {
    loop {
        w.wake.notified().await;
        loop {
            let done = {
                let Ok(mut st) = w.state.lock() else { return };
                if st.closed {
                    return;
                }
                if st.bytes.is_empty() {
                    true
                } else {
                    match w.half.try_write(&st.bytes) {
                        Ok(n) => {
                            let _ = st.bytes.split_to(n);
                            st.written += n as u64;
                            st.bytes.is_empty()
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                        Err(_) => {
                            drop(st);
                            w.close();
                            return;
                        }
                    }
                }
            };
            // Room was made: senders waiting for it try again.
            w.drained.notify_waiters();
            if done {
                break;
            }
            if w.half.writable().await.is_err() {
                w.close();
                return;
            }
        }
    }
}

/// TCP keepalive on a channel's connection: a peer that vanished without closing it (powered
/// off, partitioned, its connection dropped by a middlebox) is noticed within about 25 s on
/// both ends, even while its session looks healthy.
pub(crate) fn keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new().with_time(Duration::from_secs(10)).with_interval(Duration::from_secs(5)).with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// A reader of channel frames of at most `max_frame` bytes from `input`.
pub(crate) fn frames<R: AsyncRead>(input: R, max_frame: usize) -> FramedRead<R, FrameCodec> {
    FramedRead::with_capacity(input, FrameCodec::new(max_frame), READ_CAPACITY)
}

/// Read the one handshake frame the other side sends before anything else (at most
/// [`MAX_HANDSHAKE_FRAME`] bytes). Anything sent beyond it before this side answered is a
/// protocol error.
pub(crate) async fn read_handshake<S: AsyncRead + Unpin>(stream: &mut S) -> Result<BytesMut, String> {
    let mut reader = FramedRead::new(stream, FrameCodec::new(MAX_HANDSHAKE_FRAME));
    let frame = match reader.next().await {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("the connection closed before the handshake".into()),
    };
    if !reader.read_buffer().is_empty() {
        return Err("frames sent before the handshake was answered".into());
    }
    Ok(frame)
}

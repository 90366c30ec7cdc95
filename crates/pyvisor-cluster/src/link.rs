//! The plumbing of a call channel's connection, the same at both ends: writing frames
//! (straight from the sending task on a plain TCP stream — no hop to a writer task; through a
//! writer task that sends many per write under load on a TLS stream), reading the one
//! handshake frame each side sends first, with a small cap, and TCP keepalive.
//!
//! Owns no protocol knowledge beyond "a frame is a length-prefixed body" (`wire` has the
//! frames, `channel` and `call_port` the two ends), and not which connections may start their
//! handshake (`admission`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use pyvisor_protocol::FrameCodec;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
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

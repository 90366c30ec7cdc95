//! The plumbing of a call channel's connection, the same at both ends: writing frames with a
//! cap on what waits unsent and a count of what was written ([`FrameWriter`]: straight from
//! the sending task on a plain TCP stream — no hop to a writer task; through a flusher task
//! that writes whatever waits at once on a TLS stream), reading the one handshake frame each
//! side sends first, with a small cap, and TCP keepalive.
//!
//! Owns no protocol knowledge beyond "a frame is a length-prefixed body" (`wire` has the
//! frames, `channel` and `call_port` the two ends), and not which connections may start their
//! handshake (`admission`).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use pyvisor_protocol::FrameCodec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::AbortHandle;
use tokio_util::codec::FramedRead;

/// The largest handshake frame either side accepts (a hello or welcome is well under 1 KiB).
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 4096;

/// Read capacity of a connection's frame reader at the start.
pub(crate) const READ_CAPACITY: usize = 64 * 1024;

/// The cap on a connection's unsent bytes when the other end takes frames of up to
/// `peer_max` bytes: two of the largest (at least 1 MiB).
pub(crate) fn unsent_cap(peer_max: usize) -> usize {
    peer_max.saturating_mul(2).max(1 << 20)
}

/// Why a frame was not taken (none of its bytes were written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The connection is closed or broken.
    Closed,
    /// The bytes waiting unsent are at their cap: wait ([`FrameWriter::send_waiting`]).
    Full,
}

/// The writing end of a channel's connection, shared by the tasks that send on it. On a plain
/// TCP connection a frame is written by its sender with a non-blocking write under a short lock
/// and only what the socket does not take at once waits in a buffer; on an encrypted stream
/// (which cannot be written without polling it) every frame waits there. A flusher task writes
/// the buffer whenever the connection can take it. Order is kept and a sender dropped mid-call
/// never leaves half a frame.
///
/// The buffer holds at most `cap` bytes plus the rest of one frame: a frame that finds it
/// fuller than that waits (backpressure on the sender), except the small frames sent with
/// [`FrameWriter::send_uncapped`] (cancels), which must never be lost. Every byte taken and
/// every byte handed to the connection is counted, so what was surely not written when the
/// connection closed is known ([`FrameWriter::written`]).
pub(crate) struct FrameWriter {
    /// The socket, when frames are written to it straight (plain TCP); `None`: the stream in
    /// [`Unsent::stream`] is written by the flusher only.
    direct: Option<OwnedWriteHalf>,
    state: Mutex<Unsent>,
    /// Wakes the flusher: bytes wait.
    wake: Notify,
    /// Wakes senders waiting for room, and on close.
    drained: Notify,
    cap: usize,
}

/// A stream a [`FrameWriter`] writes through its flusher (an encrypted one).
pub(crate) type BoxedWrite = Box<dyn AsyncWrite + Unpin + Send>;

struct Unsent {
    bytes: BytesMut,
    closed: bool,
    /// Bytes of frames taken so far (the end offset of the last frame taken).
    taken: u64,
    /// Bytes handed to the connection so far (for an encrypted stream: taken by the stream,
    /// which may still hold some; counted as written, so a call is never told "not sent"
    /// when its bytes may have left).
    written: u64,
    /// The encrypted stream (dropped on close: the connection ends once its reading half
    /// is gone too).
    stream: Option<BoxedWrite>,
    /// The flusher task, ended on close.
    flusher: Option<AbortHandle>,
}

impl FrameWriter {
    /// Share the plain TCP socket `half`; at most about `cap` bytes wait unsent (see above).
    /// Its flusher task ends when the writer closes.
    pub(crate) fn tcp(half: OwnedWriteHalf, cap: usize) -> Arc<FrameWriter> {
        FrameWriter::start(Some(half), None, cap)
    }

    /// Share the encrypted stream `stream` (written by the flusher task only); at most about
    /// `cap` bytes wait unsent.
    pub(crate) fn stream(stream: BoxedWrite, cap: usize) -> Arc<FrameWriter> {
        FrameWriter::start(None, Some(stream), cap)
    }

    fn start(direct: Option<OwnedWriteHalf>, stream: Option<BoxedWrite>, cap: usize) -> Arc<FrameWriter> {
        let encrypted = stream.is_some();
        let state = Unsent { bytes: BytesMut::new(), closed: false, taken: 0, written: 0, stream, flusher: None };
        let w = Arc::new(FrameWriter { direct, state: Mutex::new(state), wake: Notify::new(), drained: Notify::new(), cap });
        let flusher = if encrypted { tokio::spawn(flush_stream(Arc::clone(&w))) } else { tokio::spawn(flush_unsent(Arc::clone(&w))) };
        match w.state.lock() {
            Ok(mut st) if !st.closed => st.flusher = Some(flusher.abort_handle()),
            _ => flusher.abort(),
        }
        w
    }

    /// Take one whole frame (never blocks): its end offset among the bytes taken.
    pub(crate) fn send(&self, frame: &[u8]) -> Result<u64, Refused> {
        self.take(frame, true)
    }

    /// [`FrameWriter::send`] without the cap: for small frames that must not be refused.
    pub(crate) fn send_uncapped(&self, frame: &[u8]) -> Result<u64, Refused> {
        self.take(frame, false)
    }

    /// [`FrameWriter::send`], waiting while the unsent bytes are at their cap.
    pub(crate) async fn send_waiting(&self, frame: &[u8]) -> Result<u64, Refused> {
        self.until_room(|| self.send(frame)).await
    }

    /// Run `attempt` (a [`FrameWriter::send`] with whatever must happen under the same
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
            if let Some(half) = &self.direct {
                match half.try_write(frame) {
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

    /// Bytes written to the connection so far: a frame whose end offset is beyond it when the
    /// connection closed never reached the peer whole (so it cannot have been run there).
    pub(crate) fn written(&self) -> u64 {
        self.state.lock().map_or(0, |st| st.written)
    }

    /// No more frames; what waits unsent is dropped and the connection shut down (a plain
    /// socket both ways at once; an encrypted stream once its reading half is gone too): the
    /// peer reads its end.
    pub(crate) fn close(&self) {
        let (stream, flusher) = match self.state.lock() {
            Ok(mut st) => {
                st.closed = true;
                st.bytes = BytesMut::new();
                (st.stream.take(), st.flusher.take())
            }
            Err(_) => (None, None),
        };
        if let Some(flusher) = flusher {
            flusher.abort();
        }
        drop(stream);
        if let Some(half) = &self.direct {
            let _ = socket2::SockRef::from(half.as_ref()).shutdown(std::net::Shutdown::Both);
        }
        self.wake.notify_one();
        self.drained.notify_waiters();
    }

    /// Write what waits to the encrypted stream as far as it takes it now, then flush it;
    /// `Ready(Err)`: the stream is broken or the writer closed.
    fn poll_stream(&self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        let Ok(mut guard) = self.state.lock() else { return Poll::Ready(Err(())) };
        let st = &mut *guard;
        if st.closed {
            return Poll::Ready(Err(()));
        }
        let Some(stream) = st.stream.as_mut() else { return Poll::Ready(Err(())) };
        let mut progressed = false;
        let polled = loop {
            if st.bytes.is_empty() {
                break Pin::new(&mut **stream).poll_flush(cx).map_err(drop);
            }
            match Pin::new(&mut **stream).poll_write(cx, &st.bytes) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(())),
                Poll::Ready(Err(_)) => {
                    // A TLS stream may have pushed part of what it was handed to the socket
                    // before failing: count all of it as written (lost, never "not sent").
                    st.written += st.bytes.len() as u64;
                    break Poll::Ready(Err(()));
                }
                Poll::Ready(Ok(n)) => {
                    st.bytes.advance(n);
                    st.written += n as u64;
                    progressed = true;
                }
                Poll::Pending => break Poll::Pending,
            }
        };
        drop(guard);
        if progressed {
            // Room was made: senders waiting for it try again.
            self.drained.notify_waiters();
        }
        polled
    }
}

/// Write what the senders left unsent on a plain socket whenever it can take it; ends when
/// the writer closes or the socket breaks (then the writer is closed).
async fn flush_unsent(w: Arc<FrameWriter>) {
    let Some(half) = &w.direct else { return };
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
                    match half.try_write(&st.bytes) {
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
            if half.writable().await.is_err() {
                w.close();
                return;
            }
        }
    }
}

/// Write what the senders left to the encrypted stream (each write under the writer's lock,
/// so a close counts exactly what the stream took); ends when the writer closes (it aborts
/// this task) or the stream breaks (then the writer is closed).
async fn flush_stream(w: Arc<FrameWriter>) {
    loop {
        w.wake.notified().await;
        if std::future::poll_fn(|cx| w.poll_stream(cx)).await.is_err() {
            w.close();
            return;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A stream that, like a TLS stream, pushes part of a write to its socket and then fails
    /// within the same `poll_write` (on its second call).
    struct PartThenBroken {
        pushed: Arc<AtomicUsize>,
        calls: usize,
    }

    impl AsyncWrite for PartThenBroken {
        fn poll_write(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            let part = buf.len().min(8 * 1024);
            self.pushed.fetch_add(part, Ordering::SeqCst);
            if self.calls == 2 {
                return Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()));
            }
            Poll::Ready(Ok(part))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn bytes_a_failing_stream_may_have_sent_count_as_written() {
        let pushed = Arc::new(AtomicUsize::new(0));
        let w = FrameWriter::stream(Box::new(PartThenBroken { pushed: Arc::clone(&pushed), calls: 0 }), 1 << 20);
        // Taken before the flusher runs (current-thread runtime).
        let ends: Vec<u64> = (0..4).map(|_| w.send(&[0u8; 4096]).expect("taken")).collect();
        tokio::time::timeout(Duration::from_secs(5), async {
            while w.send(&[0u8; 1]) != Err(Refused::Closed) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the broken stream closes the writer");
        let (pushed, written) = (pushed.load(Ordering::SeqCst) as u64, w.written());
        let left_but_not_counted = ends.iter().filter(|&&end| end <= pushed && end > written).count();
        assert_eq!(left_but_not_counted, 0, "{pushed} bytes left, {written} counted: frames that left would be told \"not sent\"");
    }
}

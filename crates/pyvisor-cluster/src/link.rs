//! The plumbing of a call channel's connection, the same at both ends: accepting connections
//! with a bound on those not yet through their handshake, writing frames (straight from the
//! sending task on a plain TCP stream — no hop to a writer task; through a writer task that
//! sends many per write under load on a TLS stream), and reading the one handshake frame each
//! side sends first, with a small cap.
//!
//! Owns no protocol knowledge beyond "a frame is a length-prefixed body" (`wire` has the
//! frames, `channel` and `call_port` the two ends).

use std::future::Future;
use std::net::SocketAddr;
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

/// Accept connections on `listener` for ever (until the task is aborted), each handled by
/// `handle` in a task of its own with a permit of `slots`: at most that many connections are
/// between accept and the moment their handler drops the permit (their handshake), the rest
/// wait in the listen queue. A failed `accept` (out of file descriptors) waits 100 ms.
pub(crate) fn accept_loop<F, Fut>(listener: TcpListener, slots: usize, handle: F) -> JoinHandle<()>
where
    F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(slots));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
            match listener.accept().await {
                Ok((stream, peer_addr)) => {
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

/// The connection is closed or broken, or its unsent bytes are at their cap: the frame was
/// not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotSent;

/// The writing end of a plain TCP connection, shared by the tasks that send on it: a frame is
/// written by its sender with a non-blocking write under a short lock; only what the socket
/// does not take at once waits in a buffer (capped) that a flusher task writes when the socket
/// is writable. Order is kept and a sender dropped mid-call never leaves half a frame.
pub(crate) struct DirectWriter {
    half: OwnedWriteHalf,
    state: Mutex<Unsent>,
    wake: Notify,
    cap: usize,
}

struct Unsent {
    bytes: BytesMut,
    closed: bool,
}

impl DirectWriter {
    /// Share `half`; at most `cap` bytes wait unsent (a frame beyond that is refused).
    pub(crate) fn start(half: OwnedWriteHalf, cap: usize) -> (Arc<DirectWriter>, JoinHandle<()>) {
        let w = Arc::new(DirectWriter { half, state: Mutex::new(Unsent { bytes: BytesMut::new(), closed: false }), wake: Notify::new(), cap });
        let flusher = tokio::spawn(flush_unsent(Arc::clone(&w)));
        (w, flusher)
    }

    /// Send one whole frame (never blocks).
    pub(crate) fn send(&self, frame: &[u8]) -> Result<(), NotSent> {
        let mut st = self.state.lock().map_err(|_| NotSent)?;
        if st.closed {
            return Err(NotSent);
        }
        let mut rest = frame;
        if st.bytes.is_empty() {
            match self.half.try_write(frame) {
                Ok(n) if n == frame.len() => return Ok(()),
                Ok(n) => rest = &frame[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    st.closed = true;
                    return Err(NotSent);
                }
            }
        } else if st.bytes.len() + frame.len() > self.cap {
            return Err(NotSent);
        }
        st.bytes.extend_from_slice(rest);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// No more frames; what waits unsent is dropped.
    pub(crate) fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.closed = true;
            st.bytes = BytesMut::new();
        }
        self.wake.notify_one();
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
                            st.bytes.is_empty()
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                        Err(_) => {
                            st.closed = true;
                            return;
                        }
                    }
                }
            };
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

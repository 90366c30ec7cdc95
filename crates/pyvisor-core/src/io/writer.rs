//! The frame writer: how callers put frames on a worker's socket without an actor or task hop.
//!
//! A caller writes its frame straight into the socket with a non-blocking `try_write` under a
//! short lock. Only when the socket buffer is full does the rest go to a pending buffer that a
//! flusher task drains when the socket is writable — so under load many frames leave in one
//! write, order is kept, and a caller's future being dropped can never leave half a frame.
//! Out-of-band buffers: their fds go first, as one datagram on the worker's **fd channel** (a
//! datagram socketpair beside the stream), then the `fds` message and its frame on the stream,
//! both under the same lock — so datagrams and `fds` messages are in the same order, and the
//! worker reads its stream with a plain `recv` (no `recvmsg` on the call path).
//! Owns no protocol knowledge: it moves bytes (and fds).

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::os::memfd::{try_send_vectored_with_fds, SharedBytes};

/// The socket is closed or broken; the worker is gone or going.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteClosed;

/// What became of a frame with buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BuffersSent {
    /// Its fds went on the fd channel and the frame is queued.
    OutOfBand,
    /// Nothing was written: the fd channel is absent or full (the worker has not read it);
    /// the caller sends the frame with its buffers in band instead.
    NoRoom,
}

struct Inner {
    pending: BytesMut,
    closed: bool,
}

/// Shared writer of one worker's socket.
pub(crate) struct FrameWriter {
    stream: Arc<OwnedWriteHalf>,
    /// The worker's fd channel (a non-blocking datagram socket), when it takes buffers.
    fd_channel: Option<UnixDatagram>,
    inner: Mutex<Inner>,
    wake: Notify,
    flusher_running: AtomicBool,
}

impl FrameWriter {
    /// Wrap a write half (and the fd channel, for a worker that takes out-of-band buffers) and
    /// start its flusher task.
    pub(crate) fn start(stream: OwnedWriteHalf, fd_channel: Option<UnixDatagram>) -> Arc<Self> {
        let fd_channel = fd_channel.filter(|c| c.set_nonblocking(true).is_ok());
        let w = Arc::new(FrameWriter {
            stream: Arc::new(stream),
            fd_channel,
            inner: Mutex::new(Inner { pending: BytesMut::new(), closed: false }),
            wake: Notify::new(),
            flusher_running: AtomicBool::new(true),
        });
        tokio::spawn(flush_loop(Arc::clone(&w)));
        w
    }

    /// Queue one complete frame. Never blocks, never splits a frame across callers.
    pub(crate) fn send(&self, frame: &[u8]) -> Result<(), WriteClosed> {
        self.send_parts(frame, &[])
    }

    /// Queue one frame given as two parts (a head and an already-encoded payload), written with
    /// one vectored write so that the payload is not copied unless the socket is full.
    pub(crate) fn send_parts(&self, head: &[u8], body: &[u8]) -> Result<(), WriteClosed> {
        let g = self.inner.lock().map_err(|_| WriteClosed)?;
        if g.closed {
            return Err(WriteClosed);
        }
        self.queue(g, &[head, body])
    }

    /// Queue one frame that uses out-of-band `buffers`: their fds as one datagram on the fd
    /// channel, then `fds_frame` (the `fds` message that announces them), `head` and `body` on
    /// the stream, nothing between. [`BuffersSent::NoRoom`] (nothing written) when the fd
    /// channel cannot take the datagram now.
    pub(crate) fn send_with_buffers(&self, fds_frame: &[u8], buffers: &[SharedBytes], head: &[u8], body: &[u8]) -> Result<BuffersSent, WriteClosed> {
        let g = self.inner.lock().map_err(|_| WriteClosed)?;
        if g.closed {
            return Err(WriteClosed);
        }
        let Some(channel) = &self.fd_channel else { return Ok(BuffersSent::NoRoom) };
        let fds: Vec<BorrowedFd<'_>> = buffers.iter().map(SharedBytes::fd).collect();
        match try_send_vectored_with_fds(channel.as_fd(), &[IoSlice::new(&[0])], &fds) {
            Ok(1) => {}
            // Full (the worker has not read its datagrams), or gone: in band instead (a gone
            // worker's stream write fails next, and its actor fails the call).
            _ => return Ok(BuffersSent::NoRoom),
        }
        self.queue(g, &[fds_frame, head, body]).map(|()| BuffersSent::OutOfBand)
    }

    /// Write `parts` (one frame) at once if nothing is pending and the socket takes it, else
    /// queue what is left for the flusher. Called with the lock held.
    fn queue(&self, mut g: std::sync::MutexGuard<'_, Inner>, parts: &[&[u8]]) -> Result<(), WriteClosed> {
        if !g.pending.is_empty() {
            for p in parts {
                g.pending.extend_from_slice(p);
            }
            return Ok(());
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let sent = match self.stream.try_write_vectored(&slices) {
            Ok(n) if n == total => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                g.closed = true;
                drop(g);
                self.wake.notify_one();
                return Err(WriteClosed);
            }
        };
        let mut skip = sent;
        for p in parts {
            let s = skip.min(p.len());
            g.pending.extend_from_slice(&p[s..]);
            skip -= s;
        }
        drop(g);
        self.wake.notify_one();
        Ok(())
    }

    /// Stop writing: later sends fail and the flusher exits.
    pub(crate) fn close(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.closed = true;
            g.pending.clear();
        }
        self.wake.notify_one();
    }

    #[cfg(test)]
    fn flusher_running(&self) -> bool {
        self.flusher_running.load(Ordering::SeqCst)
    }
}

async fn flush_loop(w: Arc<FrameWriter>) {
    loop {
        w.wake.notified().await;
        loop {
            {
                let g = match w.inner.lock() {
                    Ok(g) => g,
                    Err(_) => break,
                };
                if g.closed {
                    w.flusher_running.store(false, Ordering::SeqCst);
                    return;
                }
                if g.pending.is_empty() {
                    break;
                }
            }
            if w.stream.writable().await.is_err() {
                w.close();
                continue;
            }
            let mut g = match w.inner.lock() {
                Ok(g) => g,
                Err(_) => break,
            };
            if g.closed || g.pending.is_empty() {
                continue;
            }
            match w.stream.try_write(&g.pending) {
                Ok(n) => g.pending.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    g.closed = true;
                    g.pending.clear();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn large_writes_keep_order_and_close_stops_the_flusher() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_ra, wa) = a.into_split();
        let w = FrameWriter::start(wa, None);
        // Far more than a socket buffer: most of it goes through the flusher.
        let frames: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 64 * 1024]).collect();
        for (i, f) in frames.iter().enumerate() {
            if i % 2 == 0 {
                w.send(f).unwrap();
            } else {
                // Split at an odd place: the two parts must arrive as one frame, in order.
                w.send_parts(&f[..777], &f[777..]).unwrap();
            }
        }
        let mut b = b;
        let mut got = vec![0u8; 64 * 64 * 1024];
        b.read_exact(&mut got).await.unwrap();
        for (i, chunk) in got.chunks(64 * 1024).enumerate() {
            assert!(chunk.iter().all(|x| *x == i as u8), "frame {i} out of order");
        }
        w.close();
        assert!(w.send(b"x").is_err());
        for _ in 0..100 {
            if !w.flusher_running() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("flusher did not stop");
    }

    /// Frames with buffers, written at once and behind a full stream: each frame's fds are
    /// one datagram on the fd channel, in the order of the frames; a full fd channel writes
    /// nothing and says so.
    // The guard only orders this test against the fd-counting ones (no task waits on it).
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fds_go_as_datagrams_in_frame_order_and_a_full_channel_writes_nothing() {
        let _turn = crate::os::memfd::tests::counting();
        use crate::os::memfd::recv_with_fds;
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        let (_ra, wa) = a.into_split();
        let w = FrameWriter::start(wa, Some(ours));
        let filler = vec![0xEEu8; 100 * 1024];
        for i in 0..40u8 {
            if i % 2 == 1 {
                let buf = SharedBytes::from_slice(&[i; 10]).unwrap();
                assert_eq!(w.send_with_buffers(&[i], std::slice::from_ref(&buf), b"", &filler).unwrap(), BuffersSent::OutOfBand);
            } else {
                w.send_parts(&[i], &filler).unwrap();
            }
        }
        // The stream: every frame, in order (most of it through the flusher).
        let mut b = b;
        let mut got = vec![0u8; 40 * (1 + filler.len())];
        tokio::io::AsyncReadExt::read_exact(&mut b, &mut got).await.unwrap();
        for (i, frame) in got.chunks(1 + filler.len()).enumerate() {
            assert_eq!(frame[0] as usize, i, "frame {i} in order");
        }
        // The fd channel: one datagram per frame with buffers, in the same order.
        let mut one = [std::mem::MaybeUninit::<u8>::uninit(); 4];
        for i in (0..40u8).filter(|i| i % 2 == 1) {
            let r = recv_with_fds(theirs.as_fd(), &mut one).unwrap().unwrap();
            assert_eq!((r.bytes, r.fds.len()), (1, 1));
            let m = SharedBytes::from_fd(r.fds.into_iter().next().unwrap(), 10, 0).unwrap();
            assert_eq!(m.as_slice(), &[i; 10]);
        }
        // A channel nobody reads fills up: then nothing is written (the caller goes in band).
        let buf = SharedBytes::from_slice(b"x").unwrap();
        let mut outcome = BuffersSent::OutOfBand;
        for _ in 0..100_000 {
            outcome = w.send_with_buffers(b"F", std::slice::from_ref(&buf), b"H", b"B").unwrap();
            if outcome == BuffersSent::NoRoom {
                break;
            }
        }
        assert_eq!(outcome, BuffersSent::NoRoom);
        // Without a channel: no room at all.
        let (c, _d) = tokio::net::UnixStream::pair().unwrap();
        let (_rc, wc) = c.into_split();
        let none = FrameWriter::start(wc, None);
        assert_eq!(none.send_with_buffers(b"F", std::slice::from_ref(&buf), b"H", b"B").unwrap(), BuffersSent::NoRoom);
    }
}

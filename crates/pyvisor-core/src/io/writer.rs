//! The frame writer: how callers put frames on a worker's socket without an actor or task hop.
//!
//! A caller writes its frame straight into the socket with a non-blocking `try_write` under a
//! short lock. Only when the socket buffer is full does the rest go to a pending buffer that a
//! flusher task drains when the socket is writable — so under load many frames leave in one
//! write, order is kept, and a caller's future being dropped can never leave half a frame.
//! Out-of-band buffers: a frame may carry sealed memfds, passed with `SCM_RIGHTS` on the
//! `sendmsg` that writes its first byte — at once, or by the flusher when it reaches that
//! byte (the buffers are kept alive until then).
//! Owns no protocol knowledge: it moves bytes (and fds).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::net::unix::OwnedWriteHalf;
use tokio::io::Interest;
use tokio::sync::Notify;

use crate::os::memfd::{try_send_vectored_with_fds, SharedBytes};

/// The socket is closed or broken; the worker is gone or going.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteClosed;

struct Inner {
    pending: BytesMut,
    /// Fds to attach to the pending byte at this offset (offsets ascending, relative to the
    /// start of `pending`).
    marks: VecDeque<(usize, Vec<SharedBytes>)>,
    closed: bool,
}

impl Inner {
    fn advance(&mut self, n: usize) {
        self.pending.advance(n);
        for (at, _) in self.marks.iter_mut() {
            *at -= n;
        }
    }

    fn clear(&mut self) {
        self.pending.clear();
        self.marks.clear();
    }
}

/// Shared writer of one worker's socket.
pub(crate) struct FrameWriter {
    stream: Arc<OwnedWriteHalf>,
    inner: Mutex<Inner>,
    wake: Notify,
    flusher_running: AtomicBool,
}

impl FrameWriter {
    /// Wrap a write half and start its flusher task.
    pub(crate) fn start(stream: OwnedWriteHalf) -> Arc<Self> {
        let w = Arc::new(FrameWriter {
            stream: Arc::new(stream),
            inner: Mutex::new(Inner { pending: BytesMut::new(), marks: VecDeque::new(), closed: false }),
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
        let mut g = self.inner.lock().map_err(|_| WriteClosed)?;
        if g.closed {
            return Err(WriteClosed);
        }
        if !g.pending.is_empty() {
            g.pending.extend_from_slice(head);
            g.pending.extend_from_slice(body);
            return Ok(());
        }
        let total = head.len() + body.len();
        match self.stream.try_write_vectored(&[std::io::IoSlice::new(head), std::io::IoSlice::new(body)]) {
            Ok(n) if n == total => Ok(()),
            Ok(n) => {
                if n < head.len() {
                    g.pending.extend_from_slice(&head[n..]);
                    g.pending.extend_from_slice(body);
                } else {
                    g.pending.extend_from_slice(&body[n - head.len()..]);
                }
                drop(g);
                self.wake.notify_one();
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                g.pending.extend_from_slice(head);
                g.pending.extend_from_slice(body);
                drop(g);
                self.wake.notify_one();
                Ok(())
            }
            Err(_) => {
                g.closed = true;
                drop(g);
                self.wake.notify_one();
                Err(WriteClosed)
            }
        }
    }

    /// Queue one frame that uses out-of-band `buffers`: `fds_frame` (the `fds` message that
    /// announces them) goes with their fds attached, then `head` and `body`, nothing between.
    pub(crate) fn send_with_buffers(&self, fds_frame: &[u8], buffers: &[SharedBytes], head: &[u8], body: &[u8]) -> Result<(), WriteClosed> {
        let mut g = self.inner.lock().map_err(|_| WriteClosed)?;
        if g.closed {
            return Err(WriteClosed);
        }
        let parts = [fds_frame, head, body];
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut sent = 0;
        if g.pending.is_empty() {
            let fds: Vec<BorrowedFd<'_>> = buffers.iter().map(SharedBytes::fd).collect();
            let slices = parts.map(IoSlice::new);
            let sock = self.stream.as_ref().as_ref();
            match sock.try_io(Interest::WRITABLE, || try_send_vectored_with_fds(sock.as_fd(), &slices, &fds)) {
                Ok(n) if n == total => return Ok(()),
                Ok(n) => sent = n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    g.closed = true;
                    drop(g);
                    self.wake.notify_one();
                    return Err(WriteClosed);
                }
            }
        }
        if sent == 0 {
            // The fds go with this frame's first byte, whenever the flusher reaches it.
            let at = g.pending.len();
            g.marks.push_back((at, buffers.to_vec()));
        }
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
            g.clear();
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
            let written = match g.marks.front() {
                // The next byte carries fds: one sendmsg with them, up to the next such byte.
                Some((0, buffers)) => {
                    let end = g.marks.get(1).map_or(g.pending.len(), |(at, _)| *at);
                    let fds: Vec<BorrowedFd<'_>> = buffers.iter().map(SharedBytes::fd).collect();
                    let sock = w.stream.as_ref().as_ref();
                    let slice = [IoSlice::new(&g.pending[..end])];
                    let r = sock.try_io(Interest::WRITABLE, || try_send_vectored_with_fds(sock.as_fd(), &slice, &fds));
                    drop(fds);
                    if matches!(r, Ok(n) if n > 0) {
                        g.marks.pop_front();
                    }
                    r
                }
                Some((at, _)) => {
                    let at = *at;
                    w.stream.try_write(&g.pending[..at])
                }
                None => w.stream.try_write(&g.pending),
            };
            match written {
                Ok(n) => g.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    g.closed = true;
                    g.clear();
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
        let w = FrameWriter::start(wa);
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

    /// Frames with buffers, written at once and behind a full socket (by the flusher): each
    /// frame's fds arrive with its first byte — never earlier, never with another frame.
    /// (Two threads: the test reads blocking while the flusher writes.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fds_arrive_with_the_first_byte_of_their_frame_also_through_the_flusher() {
        use crate::os::memfd::recv_with_fds;
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (_ra, wa) = a.into_split();
        let w = FrameWriter::start(wa);
        // Frame i: a 1-byte marker `i` then filler; odd frames carry a buffer holding `i`.
        let filler = vec![0xEEu8; 100 * 1024];
        let mut buffers = Vec::new();
        for i in 0..40u8 {
            if i % 2 == 1 {
                let buf = SharedBytes::from_slice(&[i; 10]).unwrap();
                w.send_with_buffers(&[i], std::slice::from_ref(&buf), b"", &filler).unwrap();
                buffers.push(buf);
            } else {
                w.send_parts(&[i], &filler).unwrap();
            }
        }
        drop(buffers); // the writer keeps what it has not sent yet
        let b = b.into_std().unwrap();
        b.set_nonblocking(false).unwrap();
        let frame = 1 + filler.len();
        let total = 40 * frame;
        let mut got = 0usize;
        let mut seen = Vec::new();
        let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); 64 * 1024];
        while got < total {
            let r = recv_with_fds(std::os::fd::AsFd::as_fd(&b), &mut buf).unwrap().unwrap();
            if !r.fds.is_empty() {
                // Linux ends a read after the segment that carries fds (not before): the read
                // that brings them holds the first byte of their frame (frames are longer than
                // a read here, so exactly one frame starts in it).
                let start = got.div_ceil(frame) * frame;
                assert!(start < got + r.bytes, "fds arrived in a read that holds no frame's first byte");
                let k = start / frame;
                // SAFETY: recvmsg wrote the first `r.bytes` bytes.
                let marker = unsafe { buf[start - got].assume_init() };
                assert_eq!(marker as usize, k);
                assert_eq!(k % 2, 1, "fds with a frame that has none");
                for fd in r.fds {
                    let m = SharedBytes::from_fd(fd, 10, 0).unwrap();
                    assert_eq!(m.as_slice(), &[marker; 10]);
                    seen.push(marker);
                }
            }
            got += r.bytes;
        }
        assert_eq!(seen, (0..40u8).filter(|i| i % 2 == 1).collect::<Vec<_>>());
    }
}

//! The frame writer: how callers put frames on a worker's socket without an actor or task hop.
//!
//! A caller writes its frame straight into the socket with a non-blocking `try_write` under a
//! short lock. Only when the socket buffer is full does the rest go to a pending buffer that a
//! flusher task drains when the socket is writable — so under load many frames leave in one
//! write, order is kept, and a caller's future being dropped can never leave half a frame.
//! Owns no protocol knowledge: it moves bytes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

/// The socket is closed or broken; the worker is gone or going.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteClosed;

struct Inner {
    pending: BytesMut,
    closed: bool,
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
}

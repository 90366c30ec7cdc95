//! Reading one worker's socket: frames in, decoded messages out, and the fds that came with
//! them.
//!
//! Owns framing and decoding of what a worker sends, the fds it passes (`SCM_RIGHTS`, kept in
//! arrival order for the `fds` message that claims them, at most [`MAX_QUEUED_FDS`]; cut
//! ancillary data is a violation), and the verdict on how reading ended (EOF, or a protocol
//! violation such as an oversized or malformed frame). It hands every message to a sink and
//! knows nothing of calls, slots or actors: the worker module wires the sink (replies to their
//! callers, beats to the slot, `hello` to the actor).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use futures::StreamExt;
use pyvisor_protocol::{decode_worker_message, frame_codec, FrameError, WorkerMessage, MAX_FDS_PER_FRAME};
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::unix::OwnedReadHalf;
use tokio_util::codec::FramedRead;

use crate::os::memfd::{recv_with_fds, BufferViolation};

/// How reading ended.
#[derive(Debug, Clone)]
pub(crate) enum ReadEnd {
    /// The worker closed its end (it exited, or closed the socket), or nobody listens any more.
    Eof,
    /// The worker broke the protocol; it must be killed.
    Protocol(String),
}

/// Fds received and not yet claimed by an `fds` message beyond which the worker is killed:
/// two frames' worth (an `fds` message's fds may arrive while the frame before it is decoded).
pub(crate) const MAX_QUEUED_FDS: usize = 2 * MAX_FDS_PER_FRAME;

/// The fds a worker passed, in arrival order.
#[derive(Default)]
pub(crate) struct ReceivedFds {
    queue: Mutex<VecDeque<OwnedFd>>,
    /// Why reading the socket broke the rules (cut ancillary data, too many fds).
    violation: Mutex<Option<String>>,
}

impl ReceivedFds {
    /// Take the `n` oldest fds (`None` when fewer arrived: a protocol violation).
    pub(crate) fn take(&self, n: usize) -> Option<Vec<OwnedFd>> {
        let mut q = self.queue.lock().ok()?;
        (q.len() >= n).then(|| q.drain(..n).collect())
    }
}

/// The read half, read with `recvmsg` so that the fds sent with frames are kept.
struct FdReadHalf {
    half: OwnedReadHalf,
    fds: Arc<ReceivedFds>,
}

impl AsyncRead for FdReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.half.as_ref().poll_read_ready(cx))?;
            let stream = this.half.as_ref();
            // SAFETY: recvmsg only writes into the unfilled part; it is marked initialized
            // below for exactly the bytes the kernel wrote.
            let unfilled = unsafe { buf.unfilled_mut() };
            match stream.try_io(Interest::READABLE, || recv_with_fds(stream.as_fd(), unfilled)) {
                Ok(Ok(got)) => {
                    // SAFETY: the kernel wrote `got.bytes` bytes at the start of `unfilled`.
                    unsafe { buf.assume_init(got.bytes) };
                    buf.advance(got.bytes);
                    if !got.fds.is_empty() {
                        let over = match this.fds.queue.lock() {
                            Ok(mut q) => {
                                q.extend(got.fds);
                                q.len() > MAX_QUEUED_FDS
                            }
                            Err(_) => true,
                        };
                        if over {
                            return Poll::Ready(Err(this.violate(format!("more than {MAX_QUEUED_FDS} fds passed and not claimed by an fds message"))));
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                // The fds that came are closed as they drop.
                Ok(Err(v)) => return Poll::Ready(Err(this.violate(v.to_string()))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl FdReadHalf {
    fn violate(&self, why: String) -> io::Error {
        if let Ok(mut v) = self.fds.violation.lock() {
            *v = Some(why.clone());
        }
        io::Error::other(why)
    }
}

/// Read frames until EOF or a protocol error, handing each decoded message (and the fds
/// received so far) to `sink`; a sink that returns an end stops the reading with it. Fds left
/// unclaimed are closed when reading ends.
pub(crate) async fn read_frames<F>(read: OwnedReadHalf, max_frame: usize, mut sink: F) -> ReadEnd
where
    F: FnMut(WorkerMessage, &ReceivedFds) -> Option<ReadEnd>,
{
    let fds = Arc::new(ReceivedFds::default());
    let reader = FdReadHalf { half: read, fds: Arc::clone(&fds) };
    let mut framed = FramedRead::with_capacity(reader, frame_codec(max_frame), 64 * 1024);
    loop {
        match framed.next().await {
            None => return ReadEnd::Eof,
            Some(Err(e @ FrameError::TooLong { .. })) => return ReadEnd::Protocol(e.to_string()),
            // A frame cut short by the worker's death, or a failed read: the worker is gone —
            // unless the read failed on the rules of fd passing.
            Some(Err(_)) => {
                return match fds.violation.lock().ok().and_then(|mut v| v.take()) {
                    Some(why) => ReadEnd::Protocol(why),
                    None => ReadEnd::Eof,
                }
            }
            Some(Ok(frame)) => match decode_worker_message(frame.freeze()) {
                Ok(m) => {
                    if let Some(end) = sink(m, &fds) {
                        return end;
                    }
                }
                Err(e) => return ReadEnd::Protocol(e.to_string()),
            },
        }
    }
}

/// What a violation of the fd rules says (for the sink's checks of claimed fds).
pub(crate) fn fd_violation(v: &BufferViolation) -> ReadEnd {
    ReadEnd::Protocol(v.to_string())
}

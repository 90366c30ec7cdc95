//! Reading one worker's socket: frames in, decoded messages out.
//!
//! Owns framing and decoding of what a worker sends, and the verdict on how reading ended
//! (EOF, or a protocol violation such as an oversized or malformed frame). It hands every
//! message to a sink and knows nothing of calls, slots or actors: the worker module wires the
//! sink (replies to their callers, beats to the slot, `hello` to the actor).

use futures::StreamExt;
use pyvisor_protocol::{decode_worker_message, frame_codec, FrameError, WorkerMessage};
use tokio::net::unix::OwnedReadHalf;
use tokio_util::codec::FramedRead;

/// How reading ended.
#[derive(Debug, Clone)]
pub(crate) enum ReadEnd {
    /// The worker closed its end (it exited, or closed the socket), or nobody listens any more.
    Eof,
    /// The worker broke the protocol; it must be killed.
    Protocol(String),
}

/// Read frames until EOF or a protocol error, handing each decoded message to `sink`; a sink
/// that returns an end stops the reading with it.
pub(crate) async fn read_frames<F>(read: OwnedReadHalf, max_frame: usize, mut sink: F) -> ReadEnd
where
    F: FnMut(WorkerMessage) -> Option<ReadEnd>,
{
    let mut framed = FramedRead::with_capacity(read, frame_codec(max_frame), 64 * 1024);
    loop {
        match framed.next().await {
            None => return ReadEnd::Eof,
            Some(Err(e @ FrameError::TooLong { .. })) => return ReadEnd::Protocol(e.to_string()),
            // A frame cut short by the worker's death, or a failed read: the worker is gone.
            Some(Err(_)) => return ReadEnd::Eof,
            Some(Ok(frame)) => match decode_worker_message(frame.freeze()) {
                Ok(m) => {
                    if let Some(end) = sink(m) {
                        return end;
                    }
                }
                Err(e) => return ReadEnd::Protocol(e.to_string()),
            },
        }
    }
}

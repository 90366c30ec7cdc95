//! The reader task of one worker's socket: frames in, replies to their callers.
//!
//! Owns decoding of worker frames and delivery: replies go straight to the waiting caller
//! through the slot's call table (no actor hop), beats are recorded on the slot, `hello` goes
//! to the worker actor. It ends on EOF or a protocol error and reports which to the actor; it
//! never decides what happens to the worker.

use std::sync::Arc;

use futures::StreamExt;
use pyvisor_protocol::{decode_worker_message, frame_codec, WorkerMessage};
use ractor::ActorRef;
use tokio::net::unix::OwnedReadHalf;
use tokio_util::codec::FramedRead;

use crate::pool::PoolShared;
use crate::slot::{Failure, Outcome, WorkerSlot};
use crate::worker::WorkerMsg;

/// How the reader ended.
#[derive(Debug, Clone)]
pub(crate) enum ReadEnd {
    /// The worker closed its end (it exited, or closed the socket).
    Eof,
    /// The worker broke the protocol; it must be killed.
    Protocol(String),
}

pub(crate) async fn read_loop(
    read: OwnedReadHalf,
    max_frame: usize,
    slot: Arc<WorkerSlot>,
    shared: Arc<PoolShared>,
    actor: ActorRef<WorkerMsg>,
) {
    let mut framed = FramedRead::with_capacity(read, frame_codec(max_frame), 64 * 1024);
    let end = loop {
        match framed.next().await {
            None => break ReadEnd::Eof,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                break ReadEnd::Protocol(format!("{e} (max_frame is {max_frame} bytes)"))
            }
            Some(Err(_)) => break ReadEnd::Eof,
            Some(Ok(frame)) => match decode_worker_message(frame.freeze()) {
                Ok(WorkerMessage::Reply(r)) => {
                    let outcome = Outcome { result: r.outcome.map_err(Failure::Remote), span: r.span };
                    if slot.complete(r.id, r.attempt, outcome) {
                        shared.queue.on_release();
                    }
                }
                Ok(WorkerMessage::Beat(b)) => slot.record_beat(b),
                Ok(WorkerMessage::Pong { beat, .. }) => slot.record_beat(beat),
                Ok(WorkerMessage::Hello(h)) => {
                    if actor.cast(WorkerMsg::Hello(h)).is_err() {
                        break ReadEnd::Eof;
                    }
                }
                Ok(_) => {}
                Err(e) => break ReadEnd::Protocol(e.to_string()),
            },
        }
    };
    let _ = actor.cast(WorkerMsg::ConnectionLost(end));
}

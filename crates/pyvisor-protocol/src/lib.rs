//! The pyvisor wire protocol: frames and messages between the Rust parent and a Python worker.
//!
//! This crate owns the byte format only — `docs/protocol.md` is its normative description. It
//! does not own sockets, processes or the call table (those live in `pyvisor-core`).
//!
//! Every frame is a 4-byte big-endian length and one MessagePack value. Every message is an
//! array whose first element is its type. The hot-path messages (`call`, `reply`) carry the
//! user's value last, so it is spliced in and out as already-encoded bytes, never re-encoded.
//!
//! ```
//! use pyvisor_protocol::{encode_call, CallHeader, decode_worker_message, WorkerMessage};
//! let payload = rmp_serde::to_vec(&(1, "two")).unwrap();
//! let frame = encode_call(&CallHeader { id: 7, attempt: 1, function: "echo",
//!     deadline_ms: None, traceparent: None, tracestate: None }, &payload);
//! assert_eq!(u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize, frame.len() - 4);
//! // A reply frame body as the worker would send it: [2, id, attempt, true, span, value]
//! // (span is nil: the call carried no traceparent)
//! let mut body = Vec::new();
//! rmp::encode::write_array_len(&mut body, 6).unwrap();
//! rmp::encode::write_uint(&mut body, 2).unwrap();
//! rmp::encode::write_uint(&mut body, 7).unwrap();
//! rmp::encode::write_uint(&mut body, 1).unwrap();
//! rmp::encode::write_bool(&mut body, true).unwrap();
//! rmp::encode::write_nil(&mut body).unwrap();
//! body.extend_from_slice(&payload);
//! match decode_worker_message(bytes::Bytes::from(body)).unwrap() {
//!     WorkerMessage::Reply(r) => {
//!         assert_eq!((r.id, r.attempt), (7, 1));
//!         let value: (u8, String) = rmp_serde::from_slice(&r.outcome.unwrap()).unwrap();
//!         assert_eq!(value, (1, "two".to_string()));
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```

mod buffers;
mod frame;
mod message;
mod walk;

pub use buffers::{check_buffer_refs, encode_fds, inline_buffers, write_buffer_ref, BufferRefError, EXT_BUFFER, MAX_FDS_PER_FRAME};
pub use frame::{frame_codec, FrameCodec, FrameError, DEFAULT_MAX_FRAME, LENGTH_PREFIX, READ_CHUNK};
pub use message::*;

/// The protocol version this crate speaks. A worker announcing another version is rejected.
/// Version 2: `reply` carries the function's span timing (`[2, id, attempt, ok, span, value]`).
pub const PROTOCOL_VERSION: u32 = 2;

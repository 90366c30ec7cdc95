//! Framing: a 4-byte big-endian length, then one MessagePack value.
//!
//! Decoding uses `tokio-util`'s length-delimited codec with the maximum frame size enforced;
//! encoding is done by the message encoders in [`crate::message`], which write the prefix
//! themselves so a frame is one contiguous buffer (one `write`).

use tokio_util::codec::LengthDelimitedCodec;

/// The codec type used to read frames from a worker.
pub type FrameCodec = LengthDelimitedCodec;

/// Size of the length prefix in bytes.
pub const LENGTH_PREFIX: usize = 4;

/// Default maximum frame body size: 64 MiB.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// A decoder for frames of at most `max_frame` body bytes. A longer frame is a decode error
/// (`InvalidData`), which the caller must treat as a protocol error.
///
/// ```
/// use bytes::BytesMut;
/// use tokio_util::codec::Decoder;
/// let mut codec = pyvisor_protocol::frame_codec(8);
/// let mut buf = BytesMut::from(&[0u8, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9][..]);
/// assert!(codec.decode(&mut buf).is_err()); // 9 > 8: refused
/// ```
pub fn frame_codec(max_frame: usize) -> FrameCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(LENGTH_PREFIX)
        .big_endian()
        .max_frame_length(max_frame)
        .new_codec()
}

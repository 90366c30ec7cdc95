//! Framing: a 4-byte big-endian length, then one MessagePack value.
//!
//! [`FrameCodec`] decodes frames with the maximum frame size enforced, and allocates only as the
//! bytes of a frame arrive: a length prefix alone never makes it reserve the announced length
//! (a worker that sends a prefix announcing 64 MiB and then stalls costs the parent one read
//! chunk, not 64 MiB). Encoding is done by the message encoders in [`crate::message`], which
//! write the prefix themselves so a frame is one contiguous buffer (one `write`).
//!
//! # Memory bound
//!
//! While a frame is incomplete the codec offers the next read at most
//! `max(READ_CHUNK, bytes of the frame already buffered)` of spare room, capped at what the frame
//! still needs. The buffer therefore grows by doubling as the body arrives (so a large frame
//! costs a logarithmic number of copies), and what it holds is never more than about twice what
//! has arrived plus one [`READ_CHUNK`]. A whole frame is split off the read buffer and handed out
//! without a copy.

use std::io;

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Size of the length prefix in bytes.
pub const LENGTH_PREFIX: usize = 4;

/// Default maximum frame body size: 64 MiB.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// The smallest spare room the codec asks for while a frame is incomplete: one read's worth.
/// Beyond it, the room offered grows with what has arrived (doubling), never with what the
/// length prefix announces.
///
/// ```
/// use bytes::BytesMut;
/// use tokio_util::codec::Decoder;
/// let mut codec = pyvisor_protocol::frame_codec(pyvisor_protocol::DEFAULT_MAX_FRAME);
/// // A prefix announcing 64 MiB, and nothing else yet.
/// let mut buf = BytesMut::from(&(64u32 << 20).to_be_bytes()[..]);
/// assert!(codec.decode(&mut buf).unwrap().is_none());
/// assert!(buf.capacity() <= 2 * pyvisor_protocol::READ_CHUNK);
/// ```
pub const READ_CHUNK: usize = 64 * 1024;

/// Why a frame could not be read.
///
/// ```
/// use bytes::BytesMut;
/// use tokio_util::codec::Decoder;
/// use pyvisor_protocol::{frame_codec, FrameError};
/// let mut buf = BytesMut::from(&[0u8, 0, 0, 5, b'a'][..]);
/// match frame_codec(16).decode_eof(&mut buf) {
///     Err(FrameError::Truncated { buffered: 5, expected: 9 }) => {}
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the maximum frame size: a protocol error, detected
    /// before any of the body is read.
    #[error("frame of {len} bytes exceeds the maximum frame size of {max} bytes")]
    TooLong {
        /// The announced body length.
        len: usize,
        /// The maximum frame size in force.
        max: usize,
    },
    /// The stream ended inside a frame (the peer died or closed mid-write).
    #[error("stream ended inside a frame: {buffered} bytes of it were read, {expected} expected")]
    Truncated {
        /// Bytes of the frame (prefix included) that arrived.
        buffered: usize,
        /// Bytes the frame needed (prefix included, once the prefix was read).
        expected: usize,
    },
    /// Reading the stream failed.
    #[error("reading frames: {0}")]
    Io(#[from] io::Error),
}

impl From<FrameError> for io::Error {
    /// [`FrameError::TooLong`] becomes `InvalidData`, [`FrameError::Truncated`] `UnexpectedEof`.
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => e,
            e @ FrameError::TooLong { .. } => io::Error::new(io::ErrorKind::InvalidData, e),
            e @ FrameError::Truncated { .. } => io::Error::new(io::ErrorKind::UnexpectedEof, e),
        }
    }
}

/// Decoder of length-prefixed frames (4-byte big-endian length, then the body) that refuses a
/// length over its maximum at once and allocates only as the body arrives.
///
/// Each item is one frame's body (prefix removed), split off the read buffer without a copy.
///
/// ```
/// use bytes::BytesMut;
/// use tokio_util::codec::Decoder;
/// use pyvisor_protocol::{FrameCodec, FrameError};
/// let mut codec = FrameCodec::new(16);
/// let mut buf = BytesMut::from(&[0u8, 0, 0, 3, b'a', b'b'][..]);
/// assert!(codec.decode(&mut buf).unwrap().is_none()); // body incomplete
/// buf.extend_from_slice(b"c");
/// assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"abc");
/// let mut buf = BytesMut::from(&[0u8, 0, 0, 17][..]);
/// assert!(matches!(codec.decode(&mut buf), Err(FrameError::TooLong { len: 17, max: 16 })));
/// ```
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
    /// Body length of the frame being read, once its prefix has been consumed.
    body_len: Option<usize>,
}

impl FrameCodec {
    /// A codec for frames of at most `max_frame` body bytes.
    ///
    /// ```
    /// let codec = pyvisor_protocol::FrameCodec::new(1024);
    /// assert_eq!(codec.max_frame(), 1024);
    /// ```
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame, body_len: None }
    }

    /// The maximum frame body size this codec accepts.
    ///
    /// ```
    /// assert_eq!(pyvisor_protocol::frame_codec(64).max_frame(), 64);
    /// ```
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Make room for the rest of an incomplete frame of `body_len` bytes, in proportion to what
    /// has arrived. Never reserves the announced length ahead of the bytes.
    fn make_room(src: &mut BytesMut, body_len: usize) {
        let have = src.len();
        let missing = body_len.saturating_sub(have);
        let spare = src.capacity() - have;
        // Only a full buffer grows: the next read then gets room for up to what has arrived
        // (at least one chunk). `reserve` may round up to twice the allocation, which keeps
        // within the bound: at most 2 × received + READ_CHUNK.
        if spare == 0 {
            src.reserve(missing.min(READ_CHUNK.max(have)));
        }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        let body_len = match self.body_len {
            Some(n) => n,
            None => {
                let Some(prefix) = src.get(..LENGTH_PREFIX) else {
                    return Ok(None);
                };
                let mut raw = [0u8; LENGTH_PREFIX];
                raw.copy_from_slice(prefix);
                let announced = u32::from_be_bytes(raw);
                // usize is at least 32 bits on every target this crate builds for.
                let n = usize::try_from(announced).unwrap_or(usize::MAX);
                if n > self.max_frame {
                    return Err(FrameError::TooLong { len: n, max: self.max_frame });
                }
                src.advance(LENGTH_PREFIX);
                self.body_len = Some(n);
                n
            }
        };
        if src.len() >= body_len {
            self.body_len = None;
            return Ok(Some(src.split_to(body_len)));
        }
        Self::make_room(src, body_len);
        Ok(None)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() && self.body_len.is_none() => Ok(None),
            None => {
                let prefix = if self.body_len.is_some() { LENGTH_PREFIX } else { 0 };
                let expected = self.body_len.map_or(LENGTH_PREFIX, |n| n + LENGTH_PREFIX);
                Err(FrameError::Truncated { buffered: buf.len() + prefix, expected })
            }
        }
    }
}

/// A decoder for frames of at most `max_frame` body bytes. A longer frame is a decode error
/// ([`FrameError::TooLong`], `InvalidData` as an `io::Error`), which the caller must treat as a
/// protocol error.
///
/// ```
/// use bytes::BytesMut;
/// use tokio_util::codec::Decoder;
/// let mut codec = pyvisor_protocol::frame_codec(8);
/// let mut buf = BytesMut::from(&[0u8, 0, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9][..]);
/// let err = codec.decode(&mut buf).unwrap_err(); // 9 > 8: refused
/// assert_eq!(err.to_string(), "frame of 9 bytes exceeds the maximum frame size of 8 bytes");
/// assert_eq!(std::io::Error::from(err).kind(), std::io::ErrorKind::InvalidData);
/// ```
pub fn frame_codec(max_frame: usize) -> FrameCodec {
    FrameCodec::new(max_frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn whole_frames_come_out_in_order_without_copy() {
        let mut codec = FrameCodec::new(100);
        let mut stream = frame(b"one");
        stream.extend(frame(b""));
        stream.extend(frame(b"three"));
        let mut buf = BytesMut::from(&stream[..]);
        let base = buf.as_ptr() as usize;
        let a = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(&a[..], b"one");
        assert_eq!(a.as_ptr() as usize, base + 4, "the frame is a view of the read buffer");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"three");
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    }

    #[test]
    fn byte_by_byte_reassembles() {
        let mut codec = FrameCodec::new(100);
        let stream = [frame(b"hello"), frame(b"x")].concat();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in stream {
            buf.extend_from_slice(&[b]);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f.to_vec());
            }
        }
        assert_eq!(out, vec![b"hello".to_vec(), b"x".to_vec()]);
    }

    #[test]
    fn a_lying_prefix_reserves_one_chunk_not_its_length() {
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::from(&(DEFAULT_MAX_FRAME as u32).to_be_bytes()[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() <= 2 * READ_CHUNK, "capacity {}", buf.capacity());
        assert!(buf.capacity() >= READ_CHUNK.min(DEFAULT_MAX_FRAME));
    }

    #[test]
    fn too_long_is_refused_at_the_prefix() {
        let mut codec = FrameCodec::new(10);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 11][..]);
        match codec.decode(&mut buf) {
            Err(FrameError::TooLong { len: 11, max: 10 }) => {}
            other => panic!("{other:?}"),
        }
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(codec.decode(&mut buf), Err(FrameError::TooLong { len, .. }) if len == u32::MAX as usize));
    }

    #[test]
    fn eof_inside_a_frame_is_truncated() {
        let mut codec = FrameCodec::new(10);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 5, 1, 2][..]);
        match codec.decode_eof(&mut buf) {
            Err(FrameError::Truncated { buffered: 6, expected: 9 }) => {}
            other => panic!("{other:?}"),
        }
        let mut codec = FrameCodec::new(10);
        let mut buf = BytesMut::from(&[0u8, 0][..]);
        match codec.decode_eof(&mut buf) {
            Err(FrameError::Truncated { buffered: 2, expected: 4 }) => {}
            other => panic!("{other:?}"),
        }
    }
}

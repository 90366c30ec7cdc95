//! The frame reader allocates as bytes arrive, never ahead of them.
//!
//! A worker that sends a length prefix announcing 64 MiB and then trickles (or never sends) the
//! body must not make the parent reserve 64 MiB. The path measured is the parent's own:
//! `FramedRead::with_capacity(reader, frame_codec(max), 64 KiB)` (see
//! `pyvisor-core/src/io/reader.rs`), polled after every 8 KiB piece that arrives, with a
//! counting allocator reporting the bytes live on this thread.
//!
//! The bound asserted: live ≤ 2 × received + `READ_CHUNK` + a small constant (the read buffer
//! grows by doubling as the body arrives), and right after the prefix alone, live ≤ one read
//! chunk. tokio-util's `LengthDelimitedCodec` (the codec used before) fails it at the prefix:
//! it reserves the announced length at once (`length_delimited_codec_breaks_the_bound`).

mod support;

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use pyvisor_protocol::{frame_codec, DEFAULT_MAX_FRAME, READ_CHUNK};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::{Decoder, FramedRead, LengthDelimitedCodec};

#[global_allocator]
static ALLOC: support::alloc::Counting = support::alloc::Counting;

/// Read-buffer capacity the parent's reader starts with.
const READER_CAPACITY: usize = 64 * 1024;
/// Size of each piece of the body as it arrives.
const PIECE: usize = 8 * 1024;
/// Slack for the reader's own small allocations (the `FramedRead` state, the pieces queued).
const SLACK: usize = 4 * 1024;

/// An in-memory socket: yields what was pushed, then `Pending` (nothing more has arrived yet).
#[derive(Default)]
struct Feed {
    pending: VecDeque<Bytes>,
}

impl AsyncRead for Feed {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let Some(mut piece) = self.pending.pop_front() else {
            return Poll::Pending;
        };
        let n = piece.len().min(buf.remaining());
        buf.put_slice(&piece.split_to(n));
        if !piece.is_empty() {
            self.pending.push_front(piece);
        }
        Poll::Ready(Ok(()))
    }
}

/// Poll until the reader waits for more bytes; return the frame lengths it produced.
fn drain<D>(framed: &mut FramedRead<Feed, D>) -> Result<Vec<usize>, String>
where
    D: Decoder<Item = BytesMut>,
    D::Error: std::fmt::Display,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut frames = Vec::new();
    loop {
        match Pin::new(&mut *framed).poll_next(&mut cx) {
            Poll::Pending => return Ok(frames),
            Poll::Ready(Some(Ok(f))) => frames.push(f.len()),
            Poll::Ready(Some(Err(e))) => return Err(e.to_string()),
            Poll::Ready(None) => return Err("end of stream".into()),
        }
    }
}

/// Send a prefix announcing `body_len` bytes, then the body in [`PIECE`]s, polling the reader
/// after each; fail at the first step where the bytes live exceed the bound.
fn feed_checking_the_bound<D>(codec: D, body_len: usize) -> Result<(), String>
where
    D: Decoder<Item = BytesMut>,
    D::Error: std::fmt::Display,
{
    let piece = Bytes::from(vec![0xa5u8; PIECE]);
    support::alloc::start();
    let result = (|| {
        let mut framed = FramedRead::with_capacity(Feed::default(), codec, READER_CAPACITY);
        let prefix = u32::try_from(body_len).map_err(|e| e.to_string())?.to_be_bytes();
        framed.get_mut().pending.push_back(Bytes::copy_from_slice(&prefix));
        let mut received = prefix.len();
        if !drain(&mut framed)?.is_empty() {
            return Err("a frame came out of a prefix".into());
        }
        let live = support::alloc::live().max(0) as usize;
        if live > READER_CAPACITY.max(READ_CHUNK) + SLACK {
            return Err(format!(
                "after the prefix alone ({received} bytes received): {live} bytes live"
            ));
        }
        let mut frames = Vec::new();
        while received < body_len + prefix.len() {
            let n = PIECE.min(body_len + prefix.len() - received);
            framed.get_mut().pending.push_back(piece.slice(..n));
            received += n;
            frames.extend(drain(&mut framed)?);
            let live = support::alloc::live().max(0) as usize;
            let bound = 2 * received + READ_CHUNK.max(READER_CAPACITY) + SLACK;
            if live > bound {
                return Err(format!("{received} bytes received: {live} bytes live, bound {bound}"));
            }
        }
        if frames != [body_len] {
            return Err(format!("frames {frames:?}, expected one of {body_len} bytes"));
        }
        Ok(())
    })();
    support::alloc::stop();
    result
}

#[test]
fn a_64_mib_frame_allocates_as_it_arrives() {
    feed_checking_the_bound(frame_codec(DEFAULT_MAX_FRAME), DEFAULT_MAX_FRAME).unwrap();
}

#[test]
fn a_stalled_prefix_costs_one_read_chunk() {
    for announced in [READ_CHUNK + 1, 1 << 20, DEFAULT_MAX_FRAME] {
        let piece = Bytes::copy_from_slice(&(announced as u32).to_be_bytes());
        let ((), peak) = support::alloc::measure(|| {
            let mut framed = FramedRead::with_capacity(Feed::default(), frame_codec(DEFAULT_MAX_FRAME), READER_CAPACITY);
            framed.get_mut().pending.push_back(piece.clone());
            assert_eq!(drain(&mut framed), Ok(vec![]));
            // And a few bytes of body change nothing.
            framed.get_mut().pending.push_back(Bytes::from_static(b"abc"));
            assert_eq!(drain(&mut framed), Ok(vec![]));
        });
        assert!(peak <= READER_CAPACITY + SLACK, "announced {announced}: peak {peak} bytes");
    }
}

#[test]
fn length_delimited_codec_breaks_the_bound() {
    // The codec this crate used before: it reserves the announced 64 MiB on seeing the prefix.
    let old = LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(DEFAULT_MAX_FRAME)
        .new_codec();
    let err = feed_checking_the_bound(old, DEFAULT_MAX_FRAME).unwrap_err();
    eprintln!("LengthDelimitedCodec: {err}");
    assert!(err.starts_with("after the prefix alone"), "{err}");
}

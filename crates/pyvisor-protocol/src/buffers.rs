//! Out-of-band buffers on the wire (docs/buffers.md and docs/protocol.md, issue 16): the `fds`
//! message that announces the sealed memfds the next frame uses, and the references to them
//! inside a MessagePack value (ext type [`EXT_BUFFER`], a 4-byte big-endian buffer index).
//!
//! Owns the byte format only: [`encode_fds`], the `fds` message's decoding (in
//! [`crate::decode_worker_message`]), and [`inline_buffers`], which turns a value with
//! references into the same value with the buffers' bytes in band (the one-copy path, for
//! types that are not `SharedBytes`). Not the fds themselves (`pyvisor-core`'s `os::memfd`).

use std::borrow::Cow;

use crate::frame::LENGTH_PREFIX;

/// MessagePack ext type of a reference to an out-of-band buffer.
pub const EXT_BUFFER: i8 = 80;

/// The most buffers (fds) one frame may use.
pub const MAX_FDS_PER_FRAME: usize = 16;

/// Encode an `fds` frame (`[12, [len_0, …]]`): the next frame uses these buffers, in order.
/// Send it by one `sendmsg` carrying its fds.
///
/// ```
/// let f = pyvisor_protocol::encode_fds(&[4096, 1 << 20]);
/// let v: (u8, Vec<u64>) = rmp_serde::from_slice(&f[4..]).unwrap();
/// assert_eq!(v, (12, vec![4096, 1 << 20]));
/// ```
pub fn encode_fds(lens: &[u64]) -> Vec<u8> {
    let mut buf = vec![0; LENGTH_PREFIX];
    let _ = rmp::encode::write_array_len(&mut buf, 2);
    let _ = rmp::encode::write_uint(&mut buf, u64::from(crate::msg_type::FDS));
    let _ = rmp::encode::write_array_len(&mut buf, lens.len() as u32);
    for l in lens {
        let _ = rmp::encode::write_uint(&mut buf, *l);
    }
    let len = (buf.len() - LENGTH_PREFIX) as u32;
    buf[..LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
    buf
}

/// Write a reference to buffer `index` (an ext [`EXT_BUFFER`] of 4 bytes).
pub fn write_buffer_ref(out: &mut Vec<u8>, index: u32) {
    let _ = rmp::encode::write_ext_meta(out, 4, EXT_BUFFER);
    out.extend_from_slice(&index.to_be_bytes());
}

/// A value whose buffer references cannot be resolved.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BufferRefError {
    /// A reference names a buffer the frame does not have.
    #[error("reference to buffer {index}, the frame has {count}")]
    NoSuchBuffer {
        /// The index referenced.
        index: u32,
        /// Buffers the frame has.
        count: usize,
    },
    /// An ext of type 80 that is not a 4-byte reference.
    #[error("a buffer reference of {0} bytes (4 expected)")]
    BadReference(u32),
    /// The value is not MessagePack (cut short, or a reserved byte).
    #[error("not a MessagePack value: {0}")]
    Malformed(&'static str),
    /// A buffer too large for a MessagePack `bin` (over 4 GiB).
    #[error("buffer {0} is too large to inline")]
    TooLarge(u32),
    /// A buffer referenced twice: each is used exactly once (else 6 bytes of references could
    /// ask for any number of copies).
    #[error("buffer {0} referenced more than once")]
    Repeated(u32),
    /// A buffer the value never references.
    #[error("buffer {0} is never referenced")]
    Unused(u32),
}

/// `value` with every buffer reference replaced by the referenced bytes as a MessagePack `bin`
/// (one copy of each). Every buffer must be referenced exactly once, so the result is at most
/// `value` plus the buffers (and 5 bytes of header each). Borrowed back unchanged when there
/// are no buffers. Walks the value without recursion; every length is checked against what
/// remains.
///
/// ```
/// use pyvisor_protocol::{inline_buffers, write_buffer_ref};
/// let mut value = vec![0x92, 0x01]; // [1, <buffer 0>]
/// write_buffer_ref(&mut value, 0);
/// let inlined = inline_buffers(&value, &[b"abc"]).unwrap();
/// let v = rmpv::decode::read_value(&mut &inlined[..]).unwrap();
/// assert_eq!(v, rmpv::Value::Array(vec![1.into(), rmpv::Value::Binary(b"abc".to_vec())]));
/// ```
pub fn inline_buffers<'v>(value: &'v [u8], buffers: &[&[u8]]) -> Result<Cow<'v, [u8]>, BufferRefError> {
    if buffers.is_empty() {
        return Ok(Cow::Borrowed(value));
    }
    let mut out: Option<Vec<u8>> = None;
    // Bytes of `value` already copied to `out`.
    let mut copied = 0;
    walk_refs(value, buffers.len(), |start, end, index| {
        let data = buffers[index as usize];
        let len = u32::try_from(data.len()).map_err(|_| BufferRefError::TooLarge(index))?;
        let o = out.get_or_insert_with(|| Vec::with_capacity(value.len() + data.len() + 5));
        o.extend_from_slice(&value[copied..start]);
        let _ = rmp::encode::write_bin_len(o, len);
        o.extend_from_slice(data);
        copied = end;
        Ok(())
    })?;
    Ok(match out {
        None => Cow::Borrowed(value),
        Some(mut o) => {
            o.extend_from_slice(&value[copied..]);
            Cow::Owned(o)
        }
    })
}

/// Check that `value` is one MessagePack value whose buffer references name each of `count`
/// buffers exactly once, without copying anything: what a reader checks before it hands a
/// value and its buffers on (the same rules as [`inline_buffers`]).
///
/// ```
/// use pyvisor_protocol::{check_buffer_refs, write_buffer_ref, BufferRefError};
/// let mut value = vec![0x92, 0x01]; // [1, <buffer 0>]
/// write_buffer_ref(&mut value, 0);
/// assert_eq!(check_buffer_refs(&value, 1), Ok(()));
/// assert_eq!(check_buffer_refs(&value, 2), Err(BufferRefError::Unused(1)));
/// ```
pub fn check_buffer_refs(value: &[u8], count: usize) -> Result<(), BufferRefError> {
    walk_refs(value, count, |_, _, _| Ok(()))
}

/// Walk the one value in `value` (no recursion; every length checked against what remains),
/// calling `on_ref(start, end, index)` for each buffer reference in order (`value[start..end]`
/// is the reference, whichever ext form carries it); each of `count`
/// buffers must be referenced exactly once.
fn walk_refs(value: &[u8], count: usize, mut on_ref: impl FnMut(usize, usize, u32) -> Result<(), BufferRefError>) -> Result<(), BufferRefError> {
    let mut used = vec![false; count];
    let mut rd: &[u8] = value;
    let mut pending: u64 = 1;
    let cut = || BufferRefError::Malformed("value cut short");
    while pending > 0 {
        pending -= 1;
        let start = value.len() - rd.len();
        let head = crate::walk::read_head(&mut rd).map_err(BufferRefError::Malformed)?;
        let body = usize::try_from(head.body).ok().filter(|&n| n <= rd.len()).ok_or_else(cut)?;
        if head.ext == Some(EXT_BUFFER) {
            let index: [u8; 4] = rd.get(..4).filter(|_| body == 4).and_then(|b| b.try_into().ok()).ok_or(BufferRefError::BadReference(head.body as u32))?;
            let index = u32::from_be_bytes(index);
            let slot = used.get_mut(index as usize).ok_or(BufferRefError::NoSuchBuffer { index, count })?;
            if std::mem::replace(slot, true) {
                return Err(BufferRefError::Repeated(index));
            }
            rd = &rd[4..];
            on_ref(start, value.len() - rd.len(), index)?;
            continue;
        }
        rd = &rd[body..];
        pending += head.elements;
        // Every element takes at least one byte: a count beyond what remains is a lie.
        if pending > rd.len() as u64 {
            return Err(cut());
        }
    }
    if !rd.is_empty() {
        return Err(BufferRefError::Malformed("bytes after the value"));
    }
    if let Some(unused) = used.iter().position(|u| !u) {
        return Err(BufferRefError::Unused(unused as u32));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(v: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).expect("encodes");
        out
    }

    #[test]
    fn references_become_bin_and_everything_else_is_kept() {
        let big = vec![7u8; 70_000];
        let small = b"xyz".to_vec();
        let v = rmpv::Value::Map(vec![
            ("a".into(), rmpv::Value::Ext(EXT_BUFFER, 1u32.to_be_bytes().to_vec())),
            ("b".into(), rmpv::Value::Array(vec![1.into(), rmpv::Value::Ext(EXT_BUFFER, 0u32.to_be_bytes().to_vec()), "s".into()])),
            ("c".into(), rmpv::Value::Ext(5, vec![1, 2, 3, 4])),
            ("d".into(), rmpv::Value::Binary(vec![9; 300])),
        ]);
        let bytes = pack(&v);
        let inlined = inline_buffers(&bytes, &[&small, &big]).expect("resolves");
        let back = rmpv::decode::read_value(&mut &inlined[..]).expect("a value");
        let expected = rmpv::Value::Map(vec![
            ("a".into(), rmpv::Value::Binary(big.clone())),
            ("b".into(), rmpv::Value::Array(vec![1.into(), rmpv::Value::Binary(small.clone()), "s".into()])),
            ("c".into(), rmpv::Value::Ext(5, vec![1, 2, 3, 4])),
            ("d".into(), rmpv::Value::Binary(vec![9; 300])),
        ]);
        assert_eq!(back, expected);
        // No buffers: the same bytes, not copied.
        let plain = pack(&rmpv::Value::Array(vec![1.into(), "x".into()]));
        assert!(matches!(inline_buffers(&plain, &[]), Ok(Cow::Borrowed(b)) if b == &plain[..]));
    }

    #[test]
    fn bad_references_and_lying_values_are_errors() {
        let r = |i: u32| pack(&rmpv::Value::Ext(EXT_BUFFER, i.to_be_bytes().to_vec()));
        let refs = |ix: &[u32]| pack(&rmpv::Value::Array(ix.iter().map(|i| rmpv::Value::Ext(EXT_BUFFER, i.to_be_bytes().to_vec())).collect()));
        // Each buffer exactly once: a repeat could ask for any number of copies.
        assert_eq!(inline_buffers(&refs(&[0, 0, 0]), &[b"a"]).err(), Some(BufferRefError::Repeated(0)));
        assert_eq!(inline_buffers(&refs(&[1]), &[b"a", b"b"]).err(), Some(BufferRefError::Unused(0)));
        assert!(inline_buffers(&refs(&[1, 0]), &[b"a", b"b"]).is_ok());
        let plain = pack(&rmpv::Value::Nil);
        assert_eq!(inline_buffers(&plain, &[b"a"]).err(), Some(BufferRefError::Unused(0)));
        assert_eq!(inline_buffers(&r(2), &[b"a", b"b"]).err(), Some(BufferRefError::NoSuchBuffer { index: 2, count: 2 }));
        assert_eq!(inline_buffers(&pack(&rmpv::Value::Ext(EXT_BUFFER, vec![0; 8])), &[b"a"]).err(), Some(BufferRefError::BadReference(8)));
        assert!(matches!(inline_buffers(&pack(&rmpv::Value::Ext(EXT_BUFFER, vec![0; 3])), &[b"a"]), Err(BufferRefError::BadReference(3))));
        for hostile in [vec![0xdd, 0xff, 0xff, 0xff, 0xff], vec![0xc6, 0xff, 0xff, 0xff, 0xff, 0], vec![0xc1], vec![0x92, 0x01], vec![0x01, 0x02]] {
            assert!(inline_buffers(&hostile, &[b"a"]).is_err(), "{hostile:?}");
            assert!(check_buffer_refs(&hostile, 1).is_err(), "{hostile:?}");
        }
        // The check says what inlining would.
        for (value, count) in [(refs(&[0, 0]), 1), (refs(&[1]), 2), (refs(&[1, 0]), 2), (r(2), 2), (plain.clone(), 1), (plain.clone(), 0)] {
            let bufs: Vec<&[u8]> = (0..count).map(|_| &b"z"[..]).collect();
            assert_eq!(check_buffer_refs(&value, count), inline_buffers(&value, &bufs).map(|_| ()), "{value:?}");
        }
        // A reference in the long ext form (`ext 8`, 7 bytes) is resolved as well.
        let long = [0x92, 0x01, 0xc7, 0x04, EXT_BUFFER as u8, 0, 0, 0, 0];
        let inlined = inline_buffers(&long, &[b"ab"]).expect("resolves");
        assert_eq!(&inlined[..], &[0x92, 0x01, 0xc4, 0x02, b'a', b'b']);
    }
}

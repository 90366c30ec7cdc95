//! Out-of-band buffers in calls: when a byte value travels as a sealed memfd instead of inside
//! the frame (docs/buffers.md; the wire format is in docs/protocol.md, "Out-of-band buffers").
//!
//! Owns the pool's [`BufferPolicy`] (out of band or in band, the worker's threshold for its
//! results, the largest buffer), how a [`SharedBytes`] serializes (a reference to a buffer
//! collected while a call's input is encoded, else plain `bin`) and deserializes, and the
//! [`Payload`] a call carries to its writer: the encoded bytes and the buffers they reference.
//! Not the memfds themselves ([`crate::os::memfd`]), not the byte format of references
//! (`pyvisor_protocol::buffers`), not when a frame is written (the call path and the writer).

use std::cell::RefCell;
use std::sync::Arc;

use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
use serde::ser::{Serialize, Serializer};

pub use crate::os::memfd::SharedBytes;

/// The default [`BufferPolicy::threshold`]: values of at least this many bytes travel out of
/// band. Measured (docs/benchmarks.md, "Out-of-band buffers"; the result taken as
/// `SharedBytes`): a round trip of a buffer out and a new one back costs 0.8× of in band at
/// 4 MiB, about the same at 1 MiB, 1.6× at 64 KiB (the memfd's set-up and page faults), 0.3× at
/// 16 MiB. 4 MiB keeps every size under it on the path it has always taken.
pub const DEFAULT_BUFFER_THRESHOLD: usize = 4 << 20;

/// The default [`BufferPolicy::max_buffer`]: 1 GiB.
pub const DEFAULT_MAX_BUFFER: usize = 1 << 30;

/// How a pool moves large byte values (a plain value: compare, copy, keep in a spec).
///
/// ```
/// use pyvisor_core::{BufferPolicy, PoolSpec};
/// let spec = PoolSpec::script("worker.py").buffers(BufferPolicy::default().max_buffer(256 << 20));
/// let in_band = PoolSpec::script("worker.py").buffers(BufferPolicy::in_band());
/// # let _ = (spec, in_band);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferPolicy {
    pub(crate) out_of_band: bool,
    pub(crate) threshold: usize,
    pub(crate) max_buffer: usize,
    pub(crate) max_bytes_in_flight: usize,
}

/// The default [`BufferPolicy::max_bytes_in_flight`]: 4 GiB.
pub const DEFAULT_MAX_BYTES_IN_FLIGHT: usize = 4 << 30;

impl Default for BufferPolicy {
    fn default() -> Self {
        BufferPolicy {
            out_of_band: true,
            threshold: DEFAULT_BUFFER_THRESHOLD,
            max_buffer: DEFAULT_MAX_BUFFER,
            max_bytes_in_flight: DEFAULT_MAX_BYTES_IN_FLIGHT,
        }
    }
}

impl BufferPolicy {
    /// Everything in band, as without memfds (the fallback; `max_frame` then bounds the whole
    /// call, buffers included).
    #[must_use]
    pub fn in_band() -> Self {
        BufferPolicy { out_of_band: false, ..Self::default() }
    }
    /// Values of at least `bytes` travel out of band: a [`SharedBytes`] in a call's input, and
    /// a worker's result (or stream item) of bytes, `bytearray`, `memoryview` or any buffer
    /// (numpy arrays). Smaller ones travel in band (below it the memfd's set-up costs more
    /// than the copies it saves). Default [`DEFAULT_BUFFER_THRESHOLD`].
    #[must_use]
    pub fn threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }
    /// The largest single buffer, either direction (`max_frame` does not bound buffers). A
    /// larger input fails with [`crate::CallError::BufferTooLarge`]; a worker that sends a
    /// larger one is killed. Default [`DEFAULT_MAX_BUFFER`].
    #[must_use]
    pub fn max_buffer(mut self, bytes: usize) -> Self {
        self.max_buffer = bytes;
        self
    }
    /// The most bytes of call inputs' out-of-band buffers in flight at once in the pool (from
    /// admission to the call's outcome, retries included). A call past it waits, as in the
    /// queue, up to the queue timeout (`QueueTimeout`) or its deadline; a call larger than the
    /// whole cap waits until nothing else holds any. Default [`DEFAULT_MAX_BYTES_IN_FLIGHT`].
    #[must_use]
    pub fn max_bytes_in_flight(mut self, bytes: usize) -> Self {
        self.max_bytes_in_flight = bytes;
        self
    }
    /// Whether buffers travel out of band.
    pub fn is_out_of_band(&self) -> bool {
        self.out_of_band
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.threshold < 1024 {
            return Err(format!("the buffer threshold must be at least 1 KiB, got {}", self.threshold));
        }
        if self.max_buffer == 0 || self.max_buffer > u32::MAX as usize {
            return Err(format!("max_buffer must be between 1 byte and 4 GiB, got {}", self.max_buffer));
        }
        if self.max_bytes_in_flight < 1024 {
            return Err(format!("max_bytes_in_flight must be at least 1 KiB, got {}", self.max_bytes_in_flight));
        }
        if self.out_of_band && self.threshold > self.max_buffer {
            return Err(format!("the buffer threshold ({}) must not exceed max_buffer ({})", self.threshold, self.max_buffer));
        }
        Ok(())
    }
}

/// Whether this process can make sealed memfds (probed once). Without them every pool works
/// in band.
pub fn memfd_available() -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| SharedBytes::from_slice(b"probe").is_ok())
}

/// The pool's budget of out-of-band bytes in flight (`BufferPolicy::max_bytes_in_flight`), in
/// KiB permits.
#[derive(Debug)]
pub(crate) struct BufferBudget {
    permits: Arc<tokio::sync::Semaphore>,
    total: u32,
}

impl BufferBudget {
    pub(crate) fn new(policy: &BufferPolicy) -> Self {
        let total = u32::try_from(policy.max_bytes_in_flight.div_ceil(1024)).unwrap_or(u32::MAX).max(1);
        BufferBudget { permits: Arc::new(tokio::sync::Semaphore::new(total as usize)), total }
    }

    /// Take room for `buffers` (nothing for none), waiting until `until`; `None` when the time
    /// ran out. The room is given back when the permit drops.
    pub(crate) async fn acquire(&self, buffers: &[SharedBytes], until: tokio::time::Instant) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
        let bytes: usize = buffers.iter().map(SharedBytes::len).sum();
        if bytes == 0 {
            return Some(None);
        }
        let need = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX).min(self.total);
        match tokio::time::timeout_at(until, Arc::clone(&self.permits).acquire_many_owned(need)).await {
            Ok(Ok(p)) => Some(Some(p)),
            // Never closed; and a timeout is a timeout.
            _ => None,
        }
    }

    /// KiB of room left (for tests and status).
    #[cfg(test)]
    pub(crate) fn available_kib(&self) -> usize {
        self.permits.available_permits()
    }
}

/// An encoded call input and the buffers it references (index `i` = `buffers[i]`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Payload {
    pub bytes: Vec<u8>,
    /// `None` for none (a plain call allocates nothing for it).
    pub buffers: Option<Arc<[SharedBytes]>>,
}

impl Payload {
    #[cfg(test)]
    fn list(&self) -> &[SharedBytes] {
        self.buffers.as_deref().unwrap_or(&[])
    }
}

/// A worker's reply value and the out-of-band buffers it references (index `i` =
/// `buffers[i]`; the reader checked that each is referenced exactly once). Cheap to clone: the
/// buffers are shared mappings of the worker's sealed memfds, never copied by the reader.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) value: bytes::Bytes,
    /// `None` for none (a reply in band allocates nothing for it).
    pub(crate) buffers: Option<Arc<[SharedBytes]>>,
}

impl Reply {
    /// A reply without buffers.
    #[cfg(test)]
    pub(crate) fn in_band(value: bytes::Bytes) -> Self {
        Reply { value, buffers: None }
    }

    /// The reply as self-contained MessagePack: each buffer's bytes copied in as `bin` (what
    /// the raw API and the tower service return).
    pub(crate) fn into_inlined(self) -> Result<bytes::Bytes, pyvisor_protocol::BufferRefError> {
        match self.buffers {
            None => Ok(self.value),
            Some(ref buffers) => inline_bytes(&self.value, buffers),
        }
    }

    /// Decode as `O`. A [`SharedBytes`] in `O` takes its buffer as it is (no copy); when some
    /// buffer is decoded as another type (`Vec<u8>`, `serde_bytes::ByteBuf`, a dynamic value)
    /// the value is decoded again with the buffers' bytes copied in, so every type reads what it
    /// would have read in band.
    pub(crate) fn decode<O: serde::de::DeserializeOwned>(&self) -> Result<O, String> {
        let Some(buffers) = &self.buffers else {
            return rmp_serde::from_slice(&self.value).map_err(|e| e.to_string());
        };
        let resolving = Resolving { buffers: Arc::clone(buffers), taken: vec![false; buffers.len()] };
        let previous = RESOLVING.with(|r| r.replace(Some(resolving)));
        let first = rmp_serde::from_slice::<O>(&self.value);
        let resolved = RESOLVING.with(|r| r.replace(previous));
        if let (Ok(v), Some(r)) = (first, resolved) {
            if r.taken.iter().all(|t| *t) {
                return Ok(v);
            }
        }
        let inlined = inline_bytes(&self.value, buffers).map_err(|e| e.to_string())?;
        rmp_serde::from_slice(&inlined).map_err(|e| e.to_string())
    }
}

/// `value` with each buffer reference replaced by that buffer's bytes as `bin` (one copy of
/// each; every buffer referenced exactly once), borrowed back when `buffers` is empty: a call's
/// input for a worker that takes no fds, a reply for the raw API, a stream item.
pub(crate) fn inline<'v>(value: &'v [u8], buffers: &[SharedBytes]) -> Result<std::borrow::Cow<'v, [u8]>, pyvisor_protocol::BufferRefError> {
    let slices: Vec<&[u8]> = buffers.iter().map(SharedBytes::as_slice).collect();
    pyvisor_protocol::inline_buffers(value, &slices)
}

/// [`inline`] for a value held as `Bytes` (the same `Bytes` back when nothing was inlined).
pub(crate) fn inline_bytes(value: &bytes::Bytes, buffers: &[SharedBytes]) -> Result<bytes::Bytes, pyvisor_protocol::BufferRefError> {
    Ok(match inline(value, buffers)? {
        std::borrow::Cow::Borrowed(_) => value.clone(),
        std::borrow::Cow::Owned(v) => bytes::Bytes::from(v),
    })
}

/// The buffers of the reply being decoded on this thread, and which a [`SharedBytes`] took.
struct Resolving {
    buffers: Arc<[SharedBytes]>,
    taken: Vec<bool>,
}

thread_local! {
    /// The reply being decoded on this thread (`None`: a buffer reference is refused).
    static RESOLVING: RefCell<Option<Resolving>> = const { RefCell::new(None) };
}

/// The buffer a reference names in the reply being decoded, once (a second claim, or no reply
/// being decoded, is an error: the caller then decodes the value inlined).
fn take_buffer(tag: i8, index: &[u8]) -> Result<SharedBytes, String> {
    if tag != pyvisor_protocol::EXT_BUFFER {
        return Err(format!("an ext value of type {tag} is not bytes"));
    }
    let index = <[u8; 4]>::try_from(index).map(u32::from_be_bytes).map_err(|_| "a malformed buffer reference".to_string())?;
    RESOLVING.with(|r| {
        let mut r = r.borrow_mut();
        let r = r.as_mut().ok_or("a buffer reference outside a reply")?;
        let taken = r.taken.get_mut(index as usize).ok_or("a reference to a buffer the reply does not have")?;
        if std::mem::replace(taken, true) {
            return Err("a buffer referenced twice".to_string());
        }
        Ok(r.buffers[index as usize].clone())
    })
}

thread_local! {
    /// The buffers of the input being encoded on this thread (`None`: not collecting, a
    /// `SharedBytes` is plain `bin`).
    static COLLECTING: RefCell<Option<(usize, Vec<SharedBytes>)>> = const { RefCell::new(None) };
}

/// Encode `input` as a call's MessagePack payload; with `out_of_band: Some(threshold)`, every
/// [`SharedBytes`] in it of at least `threshold` bytes (up to the per-frame fd limit) becomes a
/// reference to a buffer of the payload.
pub(crate) fn encode<I: Serialize + ?Sized>(input: &I, out_of_band: Option<usize>) -> Result<Payload, rmp_serde::encode::Error> {
    let Some(threshold) = out_of_band else {
        return Ok(Payload { bytes: rmp_serde::to_vec_named(input)?, buffers: None });
    };
    let previous = COLLECTING.with(|c| c.replace(Some((threshold, Vec::new()))));
    let bytes = rmp_serde::to_vec_named(input);
    let buffers = COLLECTING.with(|c| c.replace(previous)).map(|(_, b)| b).unwrap_or_default();
    Ok(Payload { bytes: bytes?, buffers: (!buffers.is_empty()).then(|| Arc::from(buffers)) })
}

/// A buffer reference's ext payload as MessagePack wants it: `(type, bin)`.
struct ExtRef(u32);

impl Serialize for ExtRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        struct Bin<'a>(&'a [u8]);
        impl Serialize for Bin<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&pyvisor_protocol::EXT_BUFFER)?;
        t.serialize_element(&Bin(&self.0.to_be_bytes()))?;
        t.end()
    }
}

impl Serialize for SharedBytes {
    /// A reference to an out-of-band buffer while a call's input is encoded for a pool that
    /// sends buffers out of band and it is at least the pool's threshold; plain `bin`
    /// otherwise.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let index = COLLECTING.with(|c| {
            let mut c = c.borrow_mut();
            let (threshold, list) = c.as_mut()?;
            if self.len() < *threshold || list.len() >= pyvisor_protocol::MAX_FDS_PER_FRAME {
                return None;
            }
            list.push(self.clone());
            Some(list.len() as u32 - 1)
        });
        match index {
            Some(i) => s.serialize_newtype_struct(rmp_serde::MSGPACK_EXT_STRUCT_NAME, &ExtRef(i)),
            None => s.serialize_bytes(self.as_slice()),
        }
    }
}

impl<'de> Deserialize<'de> for SharedBytes {
    /// From a reply's out-of-band buffer: that buffer, as the worker sealed it (no copy); from
    /// `bin`: one copy, into a new sealed memfd.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SharedVisitor)
    }
}

struct SharedVisitor;

impl<'de> Visitor<'de> for SharedVisitor {
    type Value = SharedBytes;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes or an out-of-band buffer")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<SharedBytes, E> {
        SharedBytes::from_slice(v).map_err(|e| E::custom(format!("cannot make a memfd: {e}")))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<SharedBytes, D::Error> {
        // An ext value (rmp-serde hands it over as a newtype of `(type, data)`).
        let (tag, index): (i8, ExtData) = Deserialize::deserialize(d)?;
        take_buffer(tag, &index.0).map_err(serde::de::Error::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SharedBytes, A::Error> {
        // A MessagePack array of small integers also deserializes as bytes elsewhere; accept it.
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        self.visit_bytes(&v)
    }

}

/// An ext value's data (at most a few bytes: a reference is 4).
struct ExtData(Vec<u8>);

impl<'de> Deserialize<'de> for ExtData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ExtData;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an ext value's data")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ExtData, E> {
                if v.len() > 16 {
                    return Err(E::custom("an ext value longer than a buffer reference"));
                }
                Ok(ExtData(v.to_vec()))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Just enough of `serde_bytes` to read bytes back in tests.
#[cfg(test)]
mod serde_bytes_shim {
    pub(super) struct ByteBuf(pub Vec<u8>);

    impl<'de> serde::Deserialize<'de> for ByteBuf {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = ByteBuf;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_bytes_are_references_while_collecting_and_bin_otherwise() {
        let _turn = crate::os::memfd::tests::counting();
        let b = SharedBytes::from_slice(&[1, 2, 3]).expect("memfd");
        let p = encode(&(5u8, &b, "x"), Some(1)).expect("encodes");
        assert_eq!(p.list().len(), 1);
        assert!(p.list()[0].same_mapping(&b));
        let mut expected = vec![0x93, 0x05];
        pyvisor_protocol::write_buffer_ref(&mut expected, 0);
        expected.extend_from_slice(&[0xa1, b'x']);
        assert_eq!(p.bytes, expected);
        let inline = encode(&(5u8, &b, "x"), None).expect("encodes");
        assert!(inline.list().is_empty());
        assert_eq!(inline.bytes, vec![0x93, 0x05, 0xc4, 3, 1, 2, 3, 0xa1, b'x']);
        // Under the threshold: in band.
        assert!(encode(&(5u8, &b, "x"), Some(4)).expect("encodes").list().is_empty());
        // Not collecting outside `encode`.
        assert_eq!(rmp_serde::to_vec(&b).expect("encodes"), vec![0xc4, 3, 1, 2, 3]);
    }

    #[test]
    fn more_buffers_than_one_frame_may_carry_go_in_band() {
        let _turn = crate::os::memfd::tests::counting();
        let many: Vec<SharedBytes> = (0..20u8).map(|i| SharedBytes::from_slice(&[i]).expect("memfd")).collect();
        let p = encode(&many, Some(1)).expect("encodes");
        assert_eq!(p.list().len(), pyvisor_protocol::MAX_FDS_PER_FRAME);
        let inlined = pyvisor_protocol::inline_buffers(&p.bytes, &p.list().iter().map(|b| b.as_slice()).collect::<Vec<_>>()).expect("refs");
        let back: Vec<serde_bytes_shim::ByteBuf> = rmp_serde::from_slice(&inlined).expect("decodes");
        assert_eq!(back.iter().map(|b| b.0.clone()).collect::<Vec<_>>(), (0..20u8).map(|i| vec![i]).collect::<Vec<_>>());
    }

    #[test]
    fn shared_bytes_decode_from_bin_and_refuse_a_reference() {
        let _turn = crate::os::memfd::tests::counting();
        let copied: SharedBytes = rmp_serde::from_slice(&[0xc4, 2, 7, 8]).expect("decodes");
        assert_eq!(copied.as_slice(), &[7, 8]);
        let mut value = Vec::new();
        pyvisor_protocol::write_buffer_ref(&mut value, 0);
        assert!(rmp_serde::from_slice::<SharedBytes>(&value).is_err());
    }

    /// A reply `[1, <buffer 0>, <buffer 1>]` with two mapped buffers.
    fn reply_with_two() -> (Reply, SharedBytes, SharedBytes) {
        let (a, b) = (SharedBytes::from_slice(b"first").expect("memfd"), SharedBytes::from_slice(b"second").expect("memfd"));
        let mut value = vec![0x93, 0x01];
        pyvisor_protocol::write_buffer_ref(&mut value, 0);
        pyvisor_protocol::write_buffer_ref(&mut value, 1);
        let reply = Reply { value: bytes::Bytes::from(value), buffers: Some(Arc::from(vec![a.clone(), b.clone()])) };
        (reply, a, b)
    }

    #[test]
    fn a_reply_decoded_into_shared_bytes_takes_its_buffers_without_a_copy() {
        let _turn = crate::os::memfd::tests::counting();
        let (reply, a, b) = reply_with_two();
        let (n, x, y): (u8, SharedBytes, SharedBytes) = reply.decode().expect("decodes");
        assert_eq!(n, 1);
        assert!(x.same_mapping(&a) && y.same_mapping(&b), "the worker's mappings, not copies");
        // Decoded again (an idempotency key's kept reply): the same mappings again.
        let (_, x2, _): (u8, SharedBytes, SharedBytes) = reply.decode().expect("decodes again");
        assert!(x2.same_mapping(&a));
    }

    #[test]
    fn a_reply_decoded_into_other_types_reads_its_buffers_as_bytes() {
        let _turn = crate::os::memfd::tests::counting();
        let (reply, a, _) = reply_with_two();
        let (_, x, y): (u8, serde_bytes_shim::ByteBuf, serde_bytes_shim::ByteBuf) = reply.decode().expect("decodes");
        assert_eq!((x.0.as_slice(), y.0.as_slice()), (&b"first"[..], &b"second"[..]));
        // One of each: the SharedBytes is then a copy (the value is decoded inlined).
        let (_, x, y): (u8, SharedBytes, serde_bytes_shim::ByteBuf) = reply.decode().expect("decodes");
        assert_eq!((x.as_slice(), y.0.as_slice()), (&b"first"[..], &b"second"[..]));
        assert!(!x.same_mapping(&a));
        // A type that skips a value: every buffer must be taken by a SharedBytes, else inlined.
        let (_, x, _): (u8, SharedBytes, serde::de::IgnoredAny) = reply.decode().expect("decodes");
        assert_eq!(x.as_slice(), b"first");
        // A dynamic value sees `bin`, as in band (never the reference's ext).
        let v: rmpv::Value = reply.decode().expect("decodes");
        assert_eq!(v, rmpv::Value::Array(vec![1.into(), rmpv::Value::Binary(b"first".to_vec()), rmpv::Value::Binary(b"second".to_vec())]));
        // What the raw API returns: self-contained MessagePack.
        let raw = reply.clone().into_inlined().expect("inlines");
        assert_eq!(rmpv::decode::read_value(&mut &raw[..]).expect("a value"), v);
        // The wrong type is still an error.
        assert!(reply.decode::<(u8, u8, u8)>().is_err());
    }

    // The guard only orders this test against the fd-counting ones (no task waits on it).
    #[allow(clippy::await_holding_lock)]
    #[tokio::test]
    async fn the_budget_makes_calls_wait_and_gives_room_back() {
        let _turn = crate::os::memfd::tests::counting();
        let budget = BufferBudget::new(&BufferPolicy::default().max_bytes_in_flight(100 * 1024));
        let big = SharedBytes::from_slice(&[0; 60 * 1024]).expect("memfd");
        let soon = || tokio::time::Instant::now() + std::time::Duration::from_millis(50);
        let first = budget.acquire(std::slice::from_ref(&big), soon()).await.expect("room").expect("a permit");
        assert_eq!(budget.available_kib(), 40);
        assert!(budget.acquire(std::slice::from_ref(&big), soon()).await.is_none(), "no room: waited, then gave up");
        assert!(budget.acquire(&[], soon()).await.expect("nothing to hold").is_none());
        drop(first);
        let huge = SharedBytes::from_slice(&vec![0; 300 * 1024]).expect("memfd");
        let all = budget.acquire(std::slice::from_ref(&huge), soon()).await.expect("the whole budget").expect("a permit");
        assert_eq!(budget.available_kib(), 0);
        drop(all);
        assert_eq!(budget.available_kib(), 100);
    }

    #[test]
    fn policies_are_checked() {
        let _turn = crate::os::memfd::tests::counting();
        assert!(BufferPolicy::default().validate().is_ok());
        assert!(BufferPolicy::default().threshold(10).validate().is_err());
        assert!(BufferPolicy::default().max_buffer(0).validate().is_err());
        assert!(BufferPolicy::default().max_buffer(1 << 20).validate().is_err(), "threshold over max_buffer");
        assert!(BufferPolicy::default().threshold(64 << 10).max_buffer(1 << 20).validate().is_ok());
        assert!(!BufferPolicy::in_band().is_out_of_band());
        assert!(memfd_available());
    }
}

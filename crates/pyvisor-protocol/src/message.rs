//! Messages: their Rust types, the encoders for parent → worker messages and the decoder for
//! worker → parent messages. Layouts are those of `docs/protocol.md`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::frame::LENGTH_PREFIX;

/// Message type codes: the first element of every message array.
pub mod msg_type {
    /// worker → parent, first frame.
    pub const HELLO: u8 = 0;
    /// parent → worker.
    pub const CALL: u8 = 1;
    /// worker → parent.
    pub const REPLY: u8 = 2;
    /// parent → worker.
    pub const CANCEL: u8 = 3;
    /// worker → parent, on a timer.
    pub const BEAT: u8 = 4;
    /// parent → worker.
    pub const PING: u8 = 5;
    /// worker → parent.
    pub const PONG: u8 = 6;
    /// parent → worker.
    pub const SHUTDOWN: u8 = 7;
    /// worker → parent, capability `started`: the function of a call that asked for it is
    /// about to run.
    pub const STARTED: u8 = 8;
    /// parent → worker, capability `call_options`: a `call` with an options map.
    pub const CALL_OPTIONS: u8 = 9;
    /// worker → parent, capability `stream`: one item of a stream.
    pub const ITEM: u8 = 10;
    /// parent → worker, capability `stream`: more credit for a stream.
    pub const CREDIT: u8 = 11;
    /// either direction, capability `oob` (issue 16; the adapter does not announce it yet):
    /// the next frame uses the sealed memfds sent with this message.
    pub const FDS: u8 = 12;
}

/// The capabilities a worker may announce in `hello` (`capabilities`, an array of str): new
/// messages and options used only with workers that announce them, without a protocol version
/// change. Names this version does not know are ignored.
pub mod capability {
    /// The worker understands `call_options` (message 9).
    pub const CALL_OPTIONS: &str = "call_options";
    /// The worker sends `started` (message 8) for calls whose options ask for it (`ack_start`).
    pub const STARTED: &str = "started";
    /// The worker runs generator functions as streams (`item`, `credit`, the `stream` option).
    pub const STREAM: &str = "stream";
    /// The worker sends and takes out-of-band buffers (sealed memfds, the `fds` message).
    pub const OOB: &str = "oob";
}

/// The set of capabilities a worker announced that this version knows, as bits (cheap to keep
/// in an atomic and test on the call path).
///
/// ```
/// use pyvisor_protocol::Capabilities;
/// let caps = Capabilities::from_names(["started", "call_options", "teleport"]);
/// assert!(caps.acks_start());
/// assert!(!Capabilities::NONE.acks_start());
/// assert_eq!(Capabilities::from_bits(caps.bits()), caps);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities(u8);

impl Capabilities {
    /// A worker that announced none (or no `capabilities` key).
    pub const NONE: Capabilities = Capabilities(0);
    const CALL_OPTIONS: u8 = 1;
    const STARTED: u8 = 2;
    const STREAM: u8 = 4;
    const OOB: u8 = 8;

    /// The known capabilities among `names` (unknown names are ignored).
    pub fn from_names<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> Self {
        let mut bits = 0;
        for n in names {
            match n.as_ref() {
                capability::CALL_OPTIONS => bits |= Self::CALL_OPTIONS,
                capability::STARTED => bits |= Self::STARTED,
                capability::STREAM => bits |= Self::STREAM,
                capability::OOB => bits |= Self::OOB,
                _ => {}
            }
        }
        Capabilities(bits)
    }
    /// The set as bits (for an atomic).
    pub fn bits(self) -> u8 {
        self.0
    }
    /// The set from [`Capabilities::bits`].
    pub fn from_bits(bits: u8) -> Self {
        Capabilities(bits & (Self::CALL_OPTIONS | Self::STARTED | Self::STREAM | Self::OOB))
    }
    /// The worker takes `call_options`.
    pub fn call_options(self) -> bool {
        self.0 & Self::CALL_OPTIONS != 0
    }
    /// The worker takes `call_options` and acknowledges the start of calls that ask for it:
    /// whether such a call started is known after its worker died.
    pub fn acks_start(self) -> bool {
        self.0 & (Self::CALL_OPTIONS | Self::STARTED) == Self::CALL_OPTIONS | Self::STARTED
    }
    /// The worker passes out-of-band buffers (`fds` messages with sealed memfds).
    pub fn oob(self) -> bool {
        self.0 & Self::OOB != 0
    }
    /// The worker takes `call_options` and runs generator functions as streams.
    pub fn streams(self) -> bool {
        self.0 & (Self::CALL_OPTIONS | Self::STREAM) == Self::CALL_OPTIONS | Self::STREAM
    }
}

/// How a worker runs an exposed function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ExecKind {
    /// Plain function, run inline in arrival order.
    #[default]
    Inline,
    /// `async def`, run on the worker's asyncio loop.
    Async,
    /// Plain function on its own thread pool (`@expose(threads=N)`).
    Threads,
    /// A kind this version does not know.
    #[serde(other)]
    Unknown,
}

/// One exposed function, as announced in `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionInfo {
    /// Exposed name.
    pub name: String,
    /// Whether calls to it may be retried after a crash.
    #[serde(default)]
    pub idempotent: bool,
    /// How the worker runs it.
    #[serde(default)]
    pub kind: ExecKind,
    /// Thread pool size for [`ExecKind::Threads`], else 0.
    #[serde(default)]
    pub threads: u32,
    /// A generator function: called as a stream (`docs/protocol.md`, "Streams").
    #[serde(default)]
    pub stream: bool,
}

/// The worker's `hello`: it is ready once this arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the worker speaks.
    pub protocol: u32,
    /// The worker's pid (as it sees it).
    pub pid: u32,
    /// `pyvisor_worker` version.
    #[serde(default)]
    pub adapter: String,
    /// Python version.
    #[serde(default)]
    pub python: String,
    /// Exposed functions, `health` included.
    #[serde(default)]
    pub functions: Vec<FunctionInfo>,
    /// Capabilities the worker announced (names; see [`capability`]). Absent: none.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

impl Hello {
    /// The announced capabilities this version knows.
    pub fn capability_set(&self) -> Capabilities {
        Capabilities::from_names(&self.capabilities)
    }
}

/// Where a call held by the worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Phase {
    /// Received, waiting behind other inline calls.
    Queued,
    /// Running.
    Running,
    /// A phase this version does not know.
    #[serde(other)]
    Unknown,
}

/// One call the worker holds, as reported in a beat: `[id, attempt, phase, started_ms]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    /// Call id.
    pub id: u64,
    /// Attempt number.
    pub attempt: u32,
    /// Queued or running.
    pub phase: Phase,
    /// When the worker received it, ms since the Unix epoch.
    pub started_ms: u64,
}

/// A heartbeat (also the body of a `pong`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// Increments per beat.
    #[serde(default)]
    pub seq: u64,
    /// Resident set size in bytes.
    #[serde(default)]
    pub rss: u64,
    /// Calls the worker holds.
    #[serde(default)]
    pub in_progress: Vec<InProgress>,
    /// Calls completed since the worker started.
    #[serde(default)]
    pub served: u64,
    /// Whether the worker's watchdog still runs (`None`: it has none, or does not say).
    #[serde(default)]
    pub watchdog: Option<bool>,
}

/// What kind of failure a worker reported for a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RemoteErrorKind {
    /// The user's function raised.
    Exception,
    /// No function of that name is exposed.
    UnknownFunction,
    /// The call was cancelled before or while it ran.
    Cancelled,
    /// The return value exceeds the maximum frame size.
    ReplyTooLarge,
    /// The return value cannot be encoded as MessagePack.
    Unserializable,
    /// The adapter itself failed.
    Internal,
    /// The worker refused the call without running it (it is shutting down): the parent
    /// routes the call to another worker.
    Refused,
    /// A stream call to a function that is not a generator, or a plain call to one that is;
    /// the function did not run.
    StreamMismatch,
    /// A kind this version does not know.
    #[serde(other)]
    Other,
}

/// A failure reported by the worker in a `reply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// What kind of failure.
    pub kind: RemoteErrorKind,
    /// Python exception class (qualified).
    #[serde(rename = "type", default)]
    pub type_name: String,
    /// `str(exception)`.
    #[serde(default)]
    pub message: String,
    /// Formatted Python traceback.
    #[serde(default)]
    pub traceback: Option<String>,
    /// For [`RemoteErrorKind::UnknownFunction`]: the exposed names.
    #[serde(default)]
    pub functions: Option<Vec<String>>,
}

/// When the worker ran a traced call's function, and the id it gave that span: the parent
/// records the function's span from it (`docs/protocol.md`, "reply").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanTiming {
    /// The function span's id (non-zero), chosen by the worker; spans the function makes are
    /// its children.
    pub span_id: u64,
    /// Just before the function ran, nanoseconds since the Unix epoch (the worker's clock).
    pub start_unix_ns: u64,
    /// Just after it returned or raised.
    pub end_unix_ns: u64,
}

/// A `reply`: the value is the still-encoded MessagePack bytes of the result.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// Call id.
    pub id: u64,
    /// Attempt it answers.
    pub attempt: u32,
    /// The function's timing, for a call that carried a `traceparent` and ran.
    pub span: Option<SpanTiming>,
    /// Encoded value, or the worker's error.
    pub outcome: Result<Bytes, RemoteError>,
}

/// A message from a worker.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum WorkerMessage {
    /// The handshake.
    Hello(Hello),
    /// A call's result.
    Reply(Reply),
    /// A heartbeat.
    Beat(Beat),
    /// The function of call `id`, attempt `attempt`, is about to run (sent only for calls
    /// whose options asked for it).
    Started {
        /// Call id.
        id: u64,
        /// Attempt number.
        attempt: u32,
    },
    /// The next frame uses out-of-band buffers of these lengths, whose fds came with this
    /// message (capability `oob`, `docs/buffers.md and docs/protocol.md`).
    Fds(Vec<u64>),
    /// One item of a stream (capability `stream`).
    Item {
        /// The stream's call id.
        id: u64,
        /// Attempt number.
        attempt: u32,
        /// 0 for the attempt's first item, then +1 per item.
        seq: u64,
        /// The encoded value: a zero-copy slice of the frame.
        value: Bytes,
    },
    /// The answer to a `ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
        /// The worker's state.
        beat: Beat,
    },
}

/// A frame from a worker that does not follow the protocol. The worker must be killed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The frame is not a MessagePack array headed by a message type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The message type is not one a worker may send.
    #[error("unexpected message type {0} from worker")]
    UnexpectedType(u64),
    /// A field has the wrong type or a map does not decode.
    #[error("bad `{field}` in {message}: {detail}")]
    BadField {
        /// Message name.
        message: &'static str,
        /// Field name.
        field: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// The header fields of a `call`; the payload is passed separately, already encoded.
#[derive(Debug, Clone, Copy)]
pub struct CallHeader<'a> {
    /// Call id.
    pub id: u64,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Function name.
    pub function: &'a str,
    /// Absolute deadline in ms since the Unix epoch.
    pub deadline_ms: Option<u64>,
    /// W3C traceparent.
    pub traceparent: Option<&'a str>,
    /// W3C tracestate.
    pub tracestate: Option<&'a str>,
}

/// The options map of a `call_options` message. Receivers ignore keys they do not know.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WireCallOptions {
    /// Ask the worker for a `started` message right before the function runs.
    pub ack_start: bool,
    /// Run the call as a stream with this initial credit (items); send only to a worker that
    /// announced `stream`.
    pub stream: Option<u32>,
}

impl WireCallOptions {
    /// Options asking for the start acknowledgement.
    pub fn ack_start() -> Self {
        WireCallOptions { ack_start: true, stream: None }
    }
    /// Options of a stream call with `credit` items of initial credit (at least 1).
    pub fn stream(credit: u32) -> Self {
        WireCallOptions { ack_start: false, stream: Some(credit.max(1)) }
    }
}

// Writing MessagePack into a Vec cannot fail; these wrappers keep that in one place.
fn put_uint(buf: &mut Vec<u8>, v: u64) {
    let r = rmp::encode::write_uint(buf, v);
    debug_assert!(r.is_ok());
}
fn put_str(buf: &mut Vec<u8>, s: &str) {
    let r = rmp::encode::write_str(buf, s);
    debug_assert!(r.is_ok());
}
fn put_array_len(buf: &mut Vec<u8>, n: u32) {
    let r = rmp::encode::write_array_len(buf, n);
    debug_assert!(r.is_ok());
}
fn put_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(buf, s),
        None => rmp::encode::write_nil(buf).unwrap_or(()),
    }
}

/// Start a frame: reserve the length prefix.
fn begin(capacity: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(LENGTH_PREFIX + capacity);
    buf.extend_from_slice(&[0; LENGTH_PREFIX]);
    buf
}

/// Finish a frame: fill in the length prefix.
fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = (buf.len() - LENGTH_PREFIX) as u32;
    buf[..LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
    buf
}

/// Size of a call frame body before its payload, an upper bound used to check the frame limit.
pub fn call_overhead(h: &CallHeader<'_>) -> usize {
    48 + h.function.len()
        + h.traceparent.map_or(0, str::len)
        + h.tracestate.map_or(0, str::len)
}

/// Encode the head of a `call` frame: the length prefix (counting `payload_len` more bytes) and
/// every field before the payload. Writing the head and then the payload makes the whole frame,
/// without copying the payload (see [`encode_call`] for one buffer).
pub fn encode_call_head(h: &CallHeader<'_>, payload_len: usize) -> Vec<u8> {
    let mut buf = begin(call_overhead(h));
    write_call_fields(&mut buf, h);
    let len = (buf.len() - LENGTH_PREFIX + payload_len) as u32;
    buf[..LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
    buf
}

/// Bytes a `call_options` frame may have beyond the `call` frame of the same call (its options
/// map): with [`call_overhead`], an upper bound to check the frame limit against.
pub const CALL_OPTIONS_EXTRA: usize = 32;

/// Encode the head of a `call_options` frame (`[9, id, attempt, function, deadline_ms,
/// traceparent, tracestate, {options}, payload]`): like [`encode_call_head`], the payload
/// follows. Send it only to a worker whose `hello` announced `call_options`.
///
/// ```
/// use pyvisor_protocol::{encode_call_options_head, CallHeader, WireCallOptions};
/// let h = CallHeader { id: 1, attempt: 1, function: "f", deadline_ms: None, traceparent: None, tracestate: None };
/// let mut frame = encode_call_options_head(&h, WireCallOptions::ack_start(), 1);
/// frame.push(0xc0); // the payload: nil
/// let v: rmpv::Value = rmp_serde::from_slice(&frame[4..]).unwrap();
/// let a = v.as_array().unwrap();
/// assert_eq!((a.len(), a[0].as_u64()), (9, Some(9)));
/// assert_eq!(a[7].as_map().unwrap()[0].1.as_bool(), Some(true));
/// ```
pub fn encode_call_options_head(h: &CallHeader<'_>, options: WireCallOptions, payload_len: usize) -> Vec<u8> {
    let mut buf = begin(call_overhead(h) + CALL_OPTIONS_EXTRA);
    write_fields(&mut buf, msg_type::CALL_OPTIONS, 9, h);
    let r = rmp::encode::write_map_len(&mut buf, if options.stream.is_some() { 2 } else { 1 });
    debug_assert!(r.is_ok());
    put_str(&mut buf, "ack_start");
    let r = rmp::encode::write_bool(&mut buf, options.ack_start);
    debug_assert!(r.is_ok());
    if let Some(credit) = options.stream {
        put_str(&mut buf, "stream");
        put_uint(&mut buf, u64::from(credit.max(1)));
    }
    let len = (buf.len() - LENGTH_PREFIX + payload_len) as u32;
    buf[..LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
    buf
}

fn write_call_fields(buf: &mut Vec<u8>, h: &CallHeader<'_>) {
    write_fields(buf, msg_type::CALL, 8, h);
}

fn write_fields(buf: &mut Vec<u8>, ty: u8, elements: u32, h: &CallHeader<'_>) {
    put_array_len(buf, elements);
    put_uint(buf, u64::from(ty));
    put_uint(buf, h.id);
    put_uint(buf, u64::from(h.attempt));
    put_str(buf, h.function);
    match h.deadline_ms {
        Some(d) => put_uint(buf, d),
        None => rmp::encode::write_nil(buf).unwrap_or(()),
    }
    put_opt_str(buf, h.traceparent);
    put_opt_str(buf, h.tracestate);
}

/// Encode a complete `call` frame (prefix included) around an already-encoded payload.
pub fn encode_call(h: &CallHeader<'_>, payload: &[u8]) -> Vec<u8> {
    let mut buf = begin(call_overhead(h) + payload.len());
    write_call_fields(&mut buf, h);
    buf.extend_from_slice(payload);
    finish(buf)
}

/// Encode a complete `credit` frame: the worker may send `n` more items of stream `id`.
///
/// ```
/// let f = pyvisor_protocol::encode_credit(7, 128);
/// let v: (u8, u64, u64) = rmp_serde::from_slice(&f[4..]).unwrap();
/// assert_eq!(v, (11, 7, 128));
/// ```
pub fn encode_credit(id: u64, n: u64) -> Vec<u8> {
    let mut buf = begin(20);
    put_array_len(&mut buf, 3);
    put_uint(&mut buf, u64::from(msg_type::CREDIT));
    put_uint(&mut buf, id);
    put_uint(&mut buf, n);
    finish(buf)
}

/// Encode a complete `cancel` frame.
pub fn encode_cancel(id: u64) -> Vec<u8> {
    let mut buf = begin(12);
    put_array_len(&mut buf, 2);
    put_uint(&mut buf, u64::from(msg_type::CANCEL));
    put_uint(&mut buf, id);
    finish(buf)
}

/// Encode a complete `ping` frame.
pub fn encode_ping(nonce: u64) -> Vec<u8> {
    let mut buf = begin(12);
    put_array_len(&mut buf, 2);
    put_uint(&mut buf, u64::from(msg_type::PING));
    put_uint(&mut buf, nonce);
    finish(buf)
}

/// Encode a complete `shutdown` frame.
pub fn encode_shutdown(grace_ms: u64) -> Vec<u8> {
    let mut buf = begin(12);
    put_array_len(&mut buf, 2);
    put_uint(&mut buf, u64::from(msg_type::SHUTDOWN));
    put_uint(&mut buf, grace_ms);
    finish(buf)
}

fn malformed(e: impl std::fmt::Display) -> ProtocolError {
    ProtocolError::Malformed(e.to_string())
}

fn read_u64(rd: &mut &[u8], message: &'static str, field: &'static str) -> Result<u64, ProtocolError> {
    rmp::decode::read_int(rd).map_err(|e| ProtocolError::BadField {
        message,
        field,
        detail: e.to_string(),
    })
}

/// How deeply the maps of `hello`, `beat`, `pong` and a reply's error may nest (containers
/// inside containers, the map itself included). The protocol's own fields nest at most 3 deep;
/// a deeper value is a protocol error, refused before it is decoded.
///
/// ```
/// use pyvisor_protocol::{decode_worker_message, ProtocolError, MAX_MAP_DEPTH};
/// // [4, {"x": [[[ ... nil ... ]]]}]: a beat whose map nests one level too deep
/// let mut body = vec![0x92, 0x04, 0x81, 0xa1, b'x'];
/// body.extend(std::iter::repeat(0x91).take(MAX_MAP_DEPTH));
/// body.push(0xc0);
/// let err = decode_worker_message(body.into()).unwrap_err();
/// assert!(matches!(err, ProtocolError::BadField { message: "beat", .. }));
/// assert!(err.to_string().contains("nests deeper than 32"));
/// ```
pub const MAX_MAP_DEPTH: usize = 32;

/// Check the MessagePack value at the start of `rd` before it is decoded: it nests at most
/// [`MAX_MAP_DEPTH`] containers deep, and declares no more than its bytes can hold (every
/// array, map, string, binary and extension length fits in the bytes that remain; each element
/// takes at least one byte). Walks the value without allocating or recursing.
///
/// Without this check, a 20-byte frame declaring 2³² elements made the parent preallocate
/// 1 MiB (serde caps its preallocation there), and a frame nesting a thousand maps overflowed
/// a 2 MiB thread stack in a debug build (rmp-serde recurses up to 1024 levels).
fn check_map_value(mut rd: &[u8]) -> Result<(), String> {
    // Values still to read in each open container; level 0 holds the value itself.
    let mut remaining = [0u64; MAX_MAP_DEPTH + 1];
    remaining[0] = 1;
    let mut depth = 0;
    // Values still to read in all; each needs at least one byte, so it may not exceed `rd.len()`.
    let mut pending: u64 = 1;
    loop {
        while remaining[depth] == 0 {
            if depth == 0 {
                return Ok(());
            }
            depth -= 1;
        }
        remaining[depth] -= 1;
        pending -= 1;
        let head = crate::walk::read_head(&mut rd)?;
        let body = usize::try_from(head.body).ok().filter(|&n| n <= rd.len());
        let body = body.ok_or_else(|| format!("declares more bytes than the {} that remain", rd.len()))?;
        rd = &rd[body..];
        if head.elements > 0 {
            if depth == MAX_MAP_DEPTH {
                return Err(format!("nests deeper than {MAX_MAP_DEPTH} levels"));
            }
            depth += 1;
            remaining[depth] = head.elements;
            pending += head.elements;
            if pending > rd.len() as u64 {
                return Err(format!(
                    "declares {pending} more values than the {} bytes that remain can hold",
                    rd.len()
                ));
            }
        }
    }
}

fn read_map<T: for<'de> Deserialize<'de>>(
    rd: &mut &[u8],
    message: &'static str,
    field: &'static str,
) -> Result<T, ProtocolError> {
    check_map_value(rd).map_err(|detail| ProtocolError::BadField { message, field, detail })?;
    // Reading through `&mut &[u8]` consumes exactly one value and advances the cursor.
    let start: &[u8] = rd;
    let mut de = rmp_serde::Deserializer::new(&mut *rd);
    T::deserialize(&mut de).map_err(|e| {
        // Decode again, on the error path only, to name the key that failed (`functions`).
        let mut again: &[u8] = start;
        let mut de = rmp_serde::Deserializer::new(&mut again);
        let detail = match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Err(traced) if !traced.path().to_string().is_empty() && traced.path().to_string() != "?" => {
                format!("`{}`: {e}", traced.path())
            }
            _ => e.to_string(),
        };
        ProtocolError::BadField { message, field, detail }
    })
}

/// A reply's `span` element: `nil` or `[span_id, start_ns, end_ns]`.
fn read_span(rd: &mut &[u8]) -> Result<Option<SpanTiming>, ProtocolError> {
    let bad = |detail: String| ProtocolError::BadField { message: "reply", field: "span", detail };
    if rd.first() == Some(&0xc0) {
        *rd = &rd[1..];
        return Ok(None);
    }
    let n = rmp::decode::read_array_len(rd).map_err(|e| bad(e.to_string()))?;
    if n != 3 {
        return Err(bad(format!("{n} elements, expected nil or [span_id, start_ns, end_ns]")));
    }
    let span_id = read_u64(rd, "reply", "span")?;
    let start_unix_ns = read_u64(rd, "reply", "span")?;
    let end_unix_ns = read_u64(rd, "reply", "span")?;
    if span_id == 0 {
        return Err(bad("span id 0".into()));
    }
    Ok(Some(SpanTiming { span_id, start_unix_ns, end_unix_ns }))
}

/// Decode one frame body (length prefix already removed) from a worker.
///
/// The reply value is returned as a zero-copy slice of `body`.
pub fn decode_worker_message(body: Bytes) -> Result<WorkerMessage, ProtocolError> {
    let total = body.len();
    let mut rd: &[u8] = &body;
    let len = rmp::decode::read_array_len(&mut rd).map_err(malformed)?;
    if len == 0 {
        return Err(malformed("empty array"));
    }
    let ty: u64 = rmp::decode::read_int(&mut rd).map_err(malformed)?;
    match ty {
        t if t == u64::from(msg_type::REPLY) => {
            if len != 6 {
                return Err(malformed(format!("reply has {len} elements, expected 6")));
            }
            let id = read_u64(&mut rd, "reply", "id")?;
            let attempt = read_u64(&mut rd, "reply", "attempt")?;
            let attempt = u32::try_from(attempt).map_err(|e| ProtocolError::BadField {
                message: "reply",
                field: "attempt",
                detail: e.to_string(),
            })?;
            let ok = rmp::decode::read_bool(&mut rd).map_err(|e| ProtocolError::BadField {
                message: "reply",
                field: "ok",
                detail: e.to_string(),
            })?;
            let span = read_span(&mut rd)?;
            let outcome = if ok {
                if rd.is_empty() {
                    return Err(malformed("reply has no value"));
                }
                let start = total - rd.len();
                Ok(body.slice(start..))
            } else {
                Err(read_map::<RemoteError>(&mut rd, "reply", "error")?)
            };
            Ok(WorkerMessage::Reply(Reply { id, attempt, span, outcome }))
        }
        t if t == u64::from(msg_type::ITEM) => {
            if len != 5 {
                return Err(malformed(format!("item has {len} elements, expected 5")));
            }
            let id = read_u64(&mut rd, "item", "id")?;
            let attempt = read_u64(&mut rd, "item", "attempt")?;
            let attempt = u32::try_from(attempt).map_err(|e| ProtocolError::BadField {
                message: "item",
                field: "attempt",
                detail: e.to_string(),
            })?;
            let seq = read_u64(&mut rd, "item", "seq")?;
            if rd.is_empty() {
                return Err(malformed("item has no value"));
            }
            let start = total - rd.len();
            Ok(WorkerMessage::Item { id, attempt, seq, value: body.slice(start..) })
        }
        t if t == u64::from(msg_type::FDS) => {
            if len != 2 {
                return Err(malformed(format!("fds has {len} elements, expected 2")));
            }
            let bad = |detail: String| ProtocolError::BadField { message: "fds", field: "lens", detail };
            let n = rmp::decode::read_array_len(&mut rd).map_err(|e| bad(e.to_string()))? as usize;
            if n == 0 || n > crate::MAX_FDS_PER_FRAME {
                return Err(bad(format!("{n} buffers, 1 to {} allowed", crate::MAX_FDS_PER_FRAME)));
            }
            let lens = (0..n).map(|_| read_u64(&mut rd, "fds", "lens")).collect::<Result<Vec<u64>, _>>()?;
            Ok(WorkerMessage::Fds(lens))
        }
        t if t == u64::from(msg_type::STARTED) => {
            if len != 3 {
                return Err(malformed(format!("started has {len} elements, expected 3")));
            }
            let id = read_u64(&mut rd, "started", "id")?;
            let attempt = read_u64(&mut rd, "started", "attempt")?;
            let attempt = u32::try_from(attempt).map_err(|e| ProtocolError::BadField {
                message: "started",
                field: "attempt",
                detail: e.to_string(),
            })?;
            Ok(WorkerMessage::Started { id, attempt })
        }
        t if t == u64::from(msg_type::BEAT) => {
            Ok(WorkerMessage::Beat(read_map(&mut rd, "beat", "body")?))
        }
        t if t == u64::from(msg_type::HELLO) => {
            Ok(WorkerMessage::Hello(read_map(&mut rd, "hello", "body")?))
        }
        t if t == u64::from(msg_type::PONG) => {
            let nonce = read_u64(&mut rd, "pong", "nonce")?;
            let beat = read_map(&mut rd, "pong", "body")?;
            Ok(WorkerMessage::Pong { nonce, beat })
        }
        other => Err(ProtocolError::UnexpectedType(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(frame: &[u8]) -> &[u8] {
        let n = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        assert_eq!(n, frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn call_frame_has_all_fields_and_payload_last() {
        let payload = rmp_serde::to_vec(&vec![1u8, 2, 3]).unwrap();
        let f = encode_call(
            &CallHeader {
                id: u64::MAX,
                attempt: 3,
                function: "predict",
                deadline_ms: Some(1_700_000_000_000),
                traceparent: Some("00-abc-def-01"),
                tracestate: None,
            },
            &payload,
        );
        let v: rmpv::Value = rmp_serde::from_slice(body_of(&f)).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 8);
        assert_eq!(a[0].as_u64(), Some(1));
        assert_eq!(a[1].as_u64(), Some(u64::MAX));
        assert_eq!(a[2].as_u64(), Some(3));
        assert_eq!(a[3].as_str(), Some("predict"));
        assert_eq!(a[4].as_u64(), Some(1_700_000_000_000));
        assert_eq!(a[5].as_str(), Some("00-abc-def-01"));
        assert!(a[6].is_nil());
        assert_eq!(a[7].as_array().unwrap().len(), 3);
    }

    #[test]
    fn head_plus_payload_is_the_whole_frame() {
        let payload = rmp_serde::to_vec(&"a payload").unwrap();
        let h = CallHeader { id: 3, attempt: 2, function: "f", deadline_ms: None, traceparent: Some("tp"), tracestate: Some("ts") };
        let mut split = encode_call_head(&h, payload.len());
        split.extend_from_slice(&payload);
        assert_eq!(split, encode_call(&h, &payload));
    }

    #[test]
    fn control_frames_encode() {
        for (f, ty, arg) in [
            (encode_cancel(9), 3, 9),
            (encode_ping(5), 5, 5),
            (encode_shutdown(2000), 7, 2000),
        ] {
            let v: (u8, u64) = rmp_serde::from_slice(body_of(&f)).unwrap();
            assert_eq!(v, (ty, arg));
        }
    }

    #[test]
    fn decodes_error_reply_and_beat_and_hello() {
        let err = rmpv::Value::Map(vec![
            ("kind".into(), "exception".into()),
            ("type".into(), "ValueError".into()),
            ("message".into(), "bad".into()),
            ("traceback".into(), "Traceback...".into()),
            ("future_key".into(), 1.into()),
        ]);
        let span = rmpv::Value::Array(vec![u64::MAX.into(), 10.into(), 20.into()]);
        let msg = rmpv::Value::Array(vec![2.into(), 4.into(), 1.into(), false.into(), span, err]);
        let body = rmp_serde::to_vec(&msg).unwrap();
        match decode_worker_message(body.into()).unwrap() {
            WorkerMessage::Reply(Reply { id: 4, attempt: 1, span: Some(s), outcome: Err(e) }) => {
                assert_eq!(s, SpanTiming { span_id: u64::MAX, start_unix_ns: 10, end_unix_ns: 20 });
                assert_eq!(e.kind, RemoteErrorKind::Exception);
                assert_eq!(e.type_name, "ValueError");
                assert_eq!(e.traceback.as_deref(), Some("Traceback..."));
            }
            other => panic!("{other:?}"),
        }
        let beat = rmpv::Value::Map(vec![
            ("seq".into(), 3.into()),
            ("rss".into(), 1000.into()),
            (
                "in_progress".into(),
                rmpv::Value::Array(vec![rmpv::Value::Array(vec![
                    7.into(),
                    1.into(),
                    "running".into(),
                    123.into(),
                ])]),
            ),
            ("served".into(), 2.into()),
        ]);
        let body = rmp_serde::to_vec(&rmpv::Value::Array(vec![4.into(), beat])).unwrap();
        match decode_worker_message(body.into()).unwrap() {
            WorkerMessage::Beat(b) => {
                assert_eq!(b.in_progress[0].phase, Phase::Running);
                assert_eq!(b.rss, 1000);
            }
            other => panic!("{other:?}"),
        }
        let hello = rmpv::Value::Map(vec![
            ("protocol".into(), 1.into()),
            ("pid".into(), 42.into()),
            (
                "functions".into(),
                rmpv::Value::Array(vec![rmpv::Value::Map(vec![
                    ("name".into(), "f".into()),
                    ("idempotent".into(), true.into()),
                    ("kind".into(), "async".into()),
                    ("threads".into(), 0.into()),
                ])]),
            ),
        ]);
        let body = rmp_serde::to_vec(&rmpv::Value::Array(vec![0.into(), hello])).unwrap();
        match decode_worker_message(body.into()).unwrap() {
            WorkerMessage::Hello(h) => {
                assert_eq!(h.pid, 42);
                assert_eq!(h.functions[0].kind, ExecKind::Async);
            }
            other => panic!("{other:?}"),
        }
    }

    fn beat_with(value: &[u8]) -> Vec<u8> {
        let mut body = vec![0x92, 0x04, 0x81, 0xa1, b'x'];
        body.extend_from_slice(value);
        body
    }

    #[test]
    fn map_values_nest_at_most_max_map_depth() {
        // The beat map is level 1: its value may add MAX_MAP_DEPTH - 1 levels.
        let nested = |levels: usize| {
            let mut v = vec![0x91; levels];
            v.push(0xc0);
            beat_with(&v)
        };
        assert!(matches!(
            decode_worker_message(nested(MAX_MAP_DEPTH - 1).into()),
            Ok(WorkerMessage::Beat(_))
        ));
        match decode_worker_message(nested(MAX_MAP_DEPTH).into()) {
            Err(ProtocolError::BadField { message: "beat", field: "body", detail }) => {
                assert!(detail.contains("nests deeper"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn map_values_declare_no_more_than_their_bytes_hold() {
        for (value, what) in [
            (&[0xdd, 0xff, 0xff, 0xff, 0xff][..], "array32"),
            (&[0xdf, 0x00, 0x00, 0x00, 0x01, 0xc0][..], "map32 of one pair, one byte left"),
            (&[0xdb, 0x00, 0x00, 0x00, 0x09, b'a'][..], "str32"),
            (&[0xc6, 0xff, 0xff, 0xff, 0xff][..], "bin32"),
            (&[0xc9, 0x00, 0x00, 0x00, 0x02, 0x01, 0x00][..], "ext32"),
            (&[0xd8, 0x01][..], "fixext16 cut short"),
            (&[0xcf, 0x01][..], "u64 cut short"),
            (&[0xc1][..], "reserved byte"),
            (&[][..], "nothing"),
        ] {
            match decode_worker_message(beat_with(value).into()) {
                Err(ProtocolError::BadField { message: "beat", field: "body", .. }) => {}
                other => panic!("{what}: {other:?}"),
            }
        }
        // Exactly as many bytes as declared is fine (unknown keys are ignored).
        let ok = [0xdc, 0x00, 0x02, 0xc0, 0xc0];
        assert!(matches!(decode_worker_message(beat_with(&ok).into()), Ok(WorkerMessage::Beat(_))));
    }

    #[test]
    fn call_options_frame_is_call_plus_options_before_the_payload() {
        let payload = rmp_serde::to_vec(&"p").unwrap();
        let h = CallHeader { id: 5, attempt: 2, function: "f", deadline_ms: Some(9), traceparent: None, tracestate: Some("ts") };
        let mut f = encode_call_options_head(&h, WireCallOptions::ack_start(), payload.len());
        f.extend_from_slice(&payload);
        let v: rmpv::Value = rmp_serde::from_slice(body_of(&f)).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 9);
        assert_eq!(a[0].as_u64(), Some(9));
        assert_eq!((a[1].as_u64(), a[2].as_u64(), a[3].as_str(), a[4].as_u64()), (Some(5), Some(2), Some("f"), Some(9)));
        assert!(a[5].is_nil());
        assert_eq!(a[6].as_str(), Some("ts"));
        let opts = a[7].as_map().unwrap();
        assert_eq!(opts.len(), 1);
        assert_eq!((opts[0].0.as_str(), opts[0].1.as_bool()), (Some("ack_start"), Some(true)));
        assert_eq!(a[8].as_str(), Some("p"));
        assert!(f.len() <= encode_call(&h, &payload).len() + CALL_OPTIONS_EXTRA);
        // The same fields as `call`, the options map inserted before the payload.
        let plain = encode_call(&h, &payload);
        let p: rmpv::Value = rmp_serde::from_slice(body_of(&plain)).unwrap();
        assert_eq!(&p.as_array().unwrap()[1..7], &a[1..7]);
    }

    #[test]
    fn decodes_started_and_checks_its_fields() {
        let body = rmp_serde::to_vec(&(8u8, 7u64, 3u32)).unwrap();
        assert_eq!(decode_worker_message(body.into()).unwrap(), WorkerMessage::Started { id: 7, attempt: 3 });
        for bad in [
            rmp_serde::to_vec(&(8u8, 7u64)).unwrap(),
            rmp_serde::to_vec(&(8u8, 7u64, 3u32, 1u8)).unwrap(),
            rmp_serde::to_vec(&(8u8, "7", 3u32)).unwrap(),
            rmp_serde::to_vec(&(8u8, 7u64, true)).unwrap(),
            rmp_serde::to_vec(&(8u8, -1i64, 3u32)).unwrap(),
            rmp_serde::to_vec(&(8u8, 7u64, u64::from(u32::MAX) + 1)).unwrap(),
        ] {
            assert!(decode_worker_message(bad.into()).is_err());
        }
    }

    #[test]
    fn decodes_items_with_their_value_spliced_and_checks_their_fields() {
        let value = rmp_serde::to_vec(&("x", 1u8)).unwrap();
        let mut body = rmp_serde::to_vec(&(10u8, 7u64, 2u32, 41u64)).unwrap();
        body[0] = 0x95; // five elements: the value follows, already encoded
        body.extend_from_slice(&value);
        match decode_worker_message(body.into()).unwrap() {
            WorkerMessage::Item { id, attempt, seq, value: v } => {
                assert_eq!((id, attempt, seq), (7, 2, 41));
                assert_eq!(&v[..], &value[..]);
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            rmp_serde::to_vec(&(10u8, 7u64, 2u32, 41u64)).unwrap(),
            rmp_serde::to_vec(&(10u8, 7u64, 2u32, -1i64, 0u8)).unwrap(),
            rmp_serde::to_vec(&(10u8, 7u64, u64::from(u32::MAX) + 1, 0u64, 0u8)).unwrap(),
            rmp_serde::to_vec(&(10u8, "7", 2u32, 0u64, 0u8)).unwrap(),
        ] {
            assert!(decode_worker_message(bad.into()).is_err());
        }
    }

    #[test]
    fn stream_call_options_carry_the_credit_within_the_extra_bound() {
        let h = CallHeader { id: 1, attempt: 1, function: "f", deadline_ms: None, traceparent: None, tracestate: None };
        let plain = encode_call_head(&h, 0);
        for opts in [WireCallOptions::stream(u32::MAX), WireCallOptions { ack_start: true, stream: Some(u32::MAX) }] {
            let mut f = encode_call_options_head(&h, opts, 1);
            assert!(f.len() - plain.len() <= CALL_OPTIONS_EXTRA, "{} extra bytes", f.len() - plain.len());
            f.push(0xc0);
            let v: rmpv::Value = rmp_serde::from_slice(&f[4..]).unwrap();
            let map = v.as_array().unwrap()[7].as_map().unwrap().clone();
            let get = |k: &str| map.iter().find(|(key, _)| key.as_str() == Some(k)).map(|(_, v)| v.clone());
            assert_eq!(get("stream").and_then(|v| v.as_u64()), Some(u64::from(u32::MAX)));
            assert_eq!(get("ack_start").and_then(|v| v.as_bool()), Some(opts.ack_start));
        }
        // A credit of 0 is sent as 1: the worker could never send anything.
        assert_eq!(WireCallOptions::stream(0).stream, Some(1));
        assert!(Capabilities::from_names(["call_options", "stream"]).streams());
        assert!(!Capabilities::from_names(["stream"]).streams());
    }

    #[test]
    fn hello_capabilities_default_to_none_and_unknown_ones_are_ignored() {
        let hello = |caps: Option<rmpv::Value>| {
            let mut m = vec![("protocol".into(), 2.into()), ("pid".into(), 1.into())];
            if let Some(c) = caps {
                m.push(("capabilities".into(), c));
            }
            let body = rmp_serde::to_vec(&rmpv::Value::Array(vec![0.into(), rmpv::Value::Map(m)])).unwrap();
            decode_worker_message(body.into())
        };
        match hello(None).unwrap() {
            WorkerMessage::Hello(h) => assert_eq!(h.capability_set(), Capabilities::NONE),
            other => panic!("{other:?}"),
        }
        let caps = rmpv::Value::Array(vec!["call_options".into(), "started".into(), "stream".into()]);
        match hello(Some(caps)).unwrap() {
            WorkerMessage::Hello(h) => assert!(h.capability_set().acks_start()),
            other => panic!("{other:?}"),
        }
        // Only `started` without `call_options` cannot be asked for acknowledgements.
        match hello(Some(rmpv::Value::Array(vec!["started".into()]))).unwrap() {
            WorkerMessage::Hello(h) => assert!(!h.capability_set().acks_start()),
            other => panic!("{other:?}"),
        }
        assert!(hello(Some(rmpv::Value::Array(vec![1.into()]))).is_err());
        assert!(hello(Some("started".into())).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for body in [
            vec![],
            vec![0xc1],
            vec![0x91, 0x09],
            vec![0x95, 0x02, 0x01],
            vec![0x92, 0x04, 0x05],
            vec![0x95, 0x02, 0x01, 0x01, 0xc3],
            // six elements, but a span that is not nil or [id, start, end]
            vec![0x96, 0x02, 0x01, 0x01, 0xc3, 0x01, 0x01],
            vec![0x96, 0x02, 0x01, 0x01, 0xc3, 0x92, 0x01, 0x01, 0x01],
            // span id 0
            vec![0x96, 0x02, 0x01, 0x01, 0xc3, 0x93, 0x00, 0x01, 0x01, 0x01],
        ] {
            assert!(decode_worker_message(body.into()).is_err());
        }
    }
}

//! The fuzz harness: what one input is checked for, and the generators of inputs.
//!
//! An input is a byte stream as the parent receives it from a worker's socket. [`check`] feeds it
//! to [`FrameCodec`] in pieces, the way `FramedRead` reads (the buffer grows only by the reader's
//! `reserve(1)` and by the codec), parses every frame with [`decode_worker_message`], and checks:
//! every error is one of the typed variants, and the bytes allocated stay within a bound
//! relative to the input's size (counted by [`super::alloc`], which the binary must install as
//! its global allocator). Panics are left to the caller (proptest, or `catch_unwind`).

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;
use pyvisor_protocol::{
    decode_worker_message, Beat, ExecKind, FrameCodec, FrameError, FunctionInfo, Hello, InProgress, Phase,
    ProtocolError, RemoteError, RemoteErrorKind, Reply, SpanTiming, WorkerMessage, READ_CHUNK,
};
use rmpv::Value;
use tokio_util::codec::Decoder;

use super::alloc;

/// Maximum frame size used while fuzzing: lengths above it are refused, lengths below it that
/// the input does not fill are frames cut short.
pub const MAX_FRAME: usize = 1 << 20;
/// The read buffer `FramedRead` starts with by default.
const INITIAL_BUFFER: usize = 8 * 1024;
/// Bytes the harness itself may need around the code measured.
const SLACK: usize = 8 * 1024;
/// Bound on the bytes the frame decoder may hold, for `n` input bytes.
pub fn decoder_bound(n: usize) -> usize {
    2 * n + READ_CHUNK + INITIAL_BUFFER + SLACK
}
/// Bound on the bytes parsing one frame body of `n` bytes may allocate: no declared length may
/// make it allocate ahead of the bytes (each element of the largest decoded type costs at most
/// 64 bytes, and needs at least one input byte).
pub fn parser_bound(n: usize) -> usize {
    64 * n + SLACK
}

/// What went wrong with one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A stage allocated more than its bound.
    Alloc {
        /// `decoder` or `parser`.
        stage: &'static str,
        /// Peak bytes live.
        peak: usize,
        /// The bound for this input.
        bound: usize,
    },
    /// An error outside the typed variants known here (a new variant needs a look).
    UntypedError(String),
}

/// What one input produced.
#[derive(Debug, Default)]
pub struct Report {
    /// Messages decoded, in order.
    pub messages: Vec<WorkerMessage>,
    /// One kind per error met (frame errors end the stream; message errors do not, so later
    /// frames are still exercised).
    pub errors: Vec<String>,
}

fn frame_error_kind(e: &FrameError) -> Result<String, Failure> {
    match e {
        FrameError::TooLong { .. } => Ok("frame: too long".into()),
        FrameError::Truncated { .. } => Ok("frame: truncated".into()),
        FrameError::Io(_) => Ok("frame: io".into()),
        #[allow(unreachable_patterns)]
        other => Err(Failure::UntypedError(other.to_string())),
    }
}

fn protocol_error_kind(e: &ProtocolError) -> Result<String, Failure> {
    match e {
        ProtocolError::Malformed(_) => Ok("message: malformed".into()),
        ProtocolError::UnexpectedType(_) => Ok("message: unexpected type".into()),
        ProtocolError::BadField { message, field, .. } => Ok(format!("message: bad {message}.{field}")),
        #[allow(unreachable_patterns)]
        other => Err(Failure::UntypedError(other.to_string())),
    }
}

/// Feed `input` to the frame decoder in reads of at most `piece` bytes, then parse each frame.
pub fn check(input: &[u8], piece: usize) -> Result<Report, Failure> {
    let piece = piece.max(1);
    let mut report = Report::default();

    alloc::start();
    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut buf = BytesMut::with_capacity(INITIAL_BUFFER);
    let mut frames = Vec::new();
    let mut rest = input;
    let mut frame_error = None;
    'read: loop {
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f.freeze()),
                Ok(None) => break,
                Err(e) => {
                    frame_error = Some(e);
                    break 'read;
                }
            }
        }
        if rest.is_empty() {
            match codec.decode_eof(&mut buf) {
                Ok(Some(f)) => frames.push(f.freeze()),
                Ok(None) => {}
                Err(e) => frame_error = Some(e),
            }
            break;
        }
        // As `FramedRead`: room for one byte at least, then read what fits.
        buf.reserve(1);
        let n = piece.min(rest.len()).min(buf.capacity() - buf.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
    drop(buf);
    alloc::stop();
    let peak = usize::try_from(alloc::peak()).unwrap_or(0);
    let bound = decoder_bound(input.len());
    if peak > bound {
        return Err(Failure::Alloc { stage: "decoder", peak, bound });
    }

    for frame in frames {
        let n = frame.len();
        alloc::start();
        let parsed = decode_worker_message(frame);
        alloc::stop();
        let peak = usize::try_from(alloc::peak()).unwrap_or(0);
        if peak > parser_bound(n) {
            return Err(Failure::Alloc { stage: "parser", peak, bound: parser_bound(n) });
        }
        match parsed {
            Ok(m) => report.messages.push(m),
            Err(e) => report.errors.push(protocol_error_kind(&e)?),
        }
    }
    if let Some(e) = frame_error {
        report.errors.push(frame_error_kind(&e)?);
    }
    Ok(report)
}

/// A frame: the 4-byte big-endian length, then `body`.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// MessagePack encoding of a value (into a `Vec`, which cannot fail).
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap_or(());
    out
}

// ---- valid messages, and their encodings as a worker writes them ----

fn s(x: &str) -> Value {
    Value::from(x)
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Queued => "queued",
        Phase::Running => "running",
        _ => "paused-in-a-later-version",
    }
}

fn beat_value(b: &Beat) -> Value {
    let in_progress = b
        .in_progress
        .iter()
        .map(|c| Value::Array(vec![c.id.into(), c.attempt.into(), s(phase_name(c.phase)), c.started_ms.into()]))
        .collect();
    let mut map = vec![
        (s("seq"), b.seq.into()),
        (s("rss"), b.rss.into()),
        (s("in_progress"), Value::Array(in_progress)),
        (s("served"), b.served.into()),
        (s("watchdog"), b.watchdog.map_or(Value::Nil, Value::from)),
    ];
    map.push((s("a_key_from_the_future"), Value::Array(vec![1.into(), s("x")])));
    Value::Map(map)
}

fn kind_name(k: ExecKind) -> &'static str {
    match k {
        ExecKind::Inline => "inline",
        ExecKind::Async => "async",
        ExecKind::Threads => "threads",
        _ => "a-kind-from-the-future",
    }
}

fn hello_value(h: &Hello) -> Value {
    let functions = h
        .functions
        .iter()
        .map(|f| {
            Value::Map(vec![
                (s("name"), s(&f.name)),
                (s("idempotent"), f.idempotent.into()),
                (s("kind"), s(kind_name(f.kind))),
                (s("threads"), f.threads.into()),
            ])
        })
        .collect();
    Value::Map(vec![
        (s("protocol"), h.protocol.into()),
        (s("pid"), h.pid.into()),
        (s("adapter"), s(&h.adapter)),
        (s("python"), s(&h.python)),
        (s("functions"), Value::Array(functions)),
        (s("capabilities"), Value::Array(h.capabilities.iter().map(|c| s(c)).collect())),
    ])
}

fn error_kind_name(k: &RemoteErrorKind) -> &'static str {
    match k {
        RemoteErrorKind::Exception => "exception",
        RemoteErrorKind::UnknownFunction => "unknown_function",
        RemoteErrorKind::Cancelled => "cancelled",
        RemoteErrorKind::ReplyTooLarge => "reply_too_large",
        RemoteErrorKind::Unserializable => "unserializable",
        RemoteErrorKind::Internal => "internal",
        RemoteErrorKind::Refused => "refused",
        RemoteErrorKind::StreamMismatch => "stream_mismatch",
        _ => "a-kind-from-the-future",
    }
}

fn error_value(e: &RemoteError) -> Value {
    Value::Map(vec![
        (s("kind"), s(error_kind_name(&e.kind))),
        (s("type"), s(&e.type_name)),
        (s("message"), s(&e.message)),
        (s("traceback"), e.traceback.as_deref().map_or(Value::Nil, s)),
        (
            s("functions"),
            e.functions.as_ref().map_or(Value::Nil, |f| Value::Array(f.iter().map(|x| s(x)).collect())),
        ),
    ])
}

/// The frame body a worker sends for `m`.
pub fn encode_message(m: &WorkerMessage) -> Vec<u8> {
    match m {
        WorkerMessage::Hello(h) => encode(&Value::Array(vec![0.into(), hello_value(h)])),
        WorkerMessage::Beat(b) => encode(&Value::Array(vec![4.into(), beat_value(b)])),
        WorkerMessage::Pong { nonce, beat } => encode(&Value::Array(vec![6.into(), (*nonce).into(), beat_value(beat)])),
        WorkerMessage::Started { id, attempt } => encode(&Value::Array(vec![8.into(), (*id).into(), (*attempt).into()])),
        WorkerMessage::Fds(lens) => encode(&Value::Array(vec![12.into(), Value::Array(lens.iter().map(|l| (*l).into()).collect())])),
        WorkerMessage::Item { id, attempt, seq, value } => {
            // The value goes in as the worker's encoder wrote it: spliced, not re-encoded.
            let mut out = encode(&Value::Array(vec![10.into(), (*id).into(), (*attempt).into(), (*seq).into()]));
            out[0] = 0x95;
            out.extend_from_slice(value);
            out
        }
        WorkerMessage::Reply(r) => {
            let span = r.span.map_or(Value::Nil, |t| {
                Value::Array(vec![t.span_id.into(), t.start_unix_ns.into(), t.end_unix_ns.into()])
            });
            let head = Value::Array(vec![
                2.into(),
                r.id.into(),
                r.attempt.into(),
                r.outcome.is_ok().into(),
                span,
            ]);
            // The array header says 6; the value is spliced after the five head elements.
            let mut out = encode(&head);
            out[0] = 0x96;
            match &r.outcome {
                Ok(v) => out.extend_from_slice(v),
                Err(e) => out.extend_from_slice(&encode(&error_value(e))),
            }
            out
        }
        _ => Vec::new(),
    }
}

/// Any MessagePack value: scalars of every family, nested arrays and maps.
pub fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<f32>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        vec(any::<u8>(), 0..16).prop_map(Value::Binary),
        (any::<i8>(), vec(any::<u8>(), 0..8)).prop_map(|(t, d)| Value::Ext(t, d)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((inner.clone(), inner), 0..6).prop_map(Value::Map),
        ]
    })
}

fn arb_beat() -> impl Strategy<Value = Beat> {
    let call = (any::<u64>(), any::<u32>(), prop_oneof![Just(Phase::Queued), Just(Phase::Running), Just(Phase::Unknown)], any::<u64>())
        .prop_map(|(id, attempt, phase, started_ms)| InProgress { id, attempt, phase, started_ms });
    (any::<u64>(), any::<u64>(), vec(call, 0..4), any::<u64>(), any::<Option<bool>>()).prop_map(
        |(seq, rss, in_progress, served, watchdog)| Beat { seq, rss, in_progress, served, watchdog },
    )
}

fn arb_hello() -> impl Strategy<Value = Hello> {
    let kind = prop_oneof![Just(ExecKind::Inline), Just(ExecKind::Async), Just(ExecKind::Threads), Just(ExecKind::Unknown)];
    let function = ("\\PC{0,10}", any::<bool>(), kind, any::<u32>())
        .prop_map(|(name, idempotent, kind, threads)| FunctionInfo { name, idempotent, kind, threads, stream: false });
    let caps = vec(prop_oneof![Just("call_options".to_string()), Just("started".to_string()), "\\PC{0,6}"], 0..3);
    (any::<u32>(), any::<u32>(), "\\PC{0,8}", "\\PC{0,8}", vec(function, 0..4), caps).prop_map(
        |(protocol, pid, adapter, python, functions, capabilities)| Hello { protocol, pid, adapter, python, functions, capabilities },
    )
}

fn arb_remote_error() -> impl Strategy<Value = RemoteError> {
    let kind = prop_oneof![
        Just(RemoteErrorKind::Exception),
        Just(RemoteErrorKind::UnknownFunction),
        Just(RemoteErrorKind::Cancelled),
        Just(RemoteErrorKind::ReplyTooLarge),
        Just(RemoteErrorKind::Unserializable),
        Just(RemoteErrorKind::Internal),
        Just(RemoteErrorKind::Refused),
        Just(RemoteErrorKind::Other),
    ];
    (kind, "\\PC{0,10}", "\\PC{0,20}", proptest::option::of("\\PC{0,20}"), proptest::option::of(vec("\\PC{0,6}", 0..3)))
        .prop_map(|(kind, type_name, message, traceback, functions)| RemoteError { kind, type_name, message, traceback, functions })
}

/// Any valid worker message.
pub fn arb_message() -> impl Strategy<Value = WorkerMessage> {
    let span = proptest::option::of((1..=u64::MAX, any::<u64>(), any::<u64>()).prop_map(|(span_id, a, b)| SpanTiming {
        span_id,
        start_unix_ns: a,
        end_unix_ns: b,
    }));
    let outcome = prop_oneof![
        arb_value().prop_map(|v| Ok(bytes::Bytes::from(encode(&v)))),
        arb_remote_error().prop_map(Err),
    ];
    let reply = (any::<u64>(), any::<u32>(), span, outcome)
        .prop_map(|(id, attempt, span, outcome)| WorkerMessage::Reply(Reply { id, attempt, span, outcome }));
    prop_oneof![
        3 => reply,
        1 => arb_beat().prop_map(WorkerMessage::Beat),
        1 => arb_hello().prop_map(WorkerMessage::Hello),
        1 => (any::<u64>(), arb_beat()).prop_map(|(nonce, beat)| WorkerMessage::Pong { nonce, beat }),
        1 => (any::<u64>(), any::<u32>()).prop_map(|(id, attempt)| WorkerMessage::Started { id, attempt }),
        1 => proptest::collection::vec(any::<u64>(), 1..=16).prop_map(WorkerMessage::Fds),
        1 => (any::<u64>(), any::<u32>(), any::<u64>(), arb_value())
            .prop_map(|(id, attempt, seq, v)| WorkerMessage::Item { id, attempt, seq, value: bytes::Bytes::from(encode(&v)) }),
    ]
}

// ---- hostile shapes ----

/// Byte sequences that announce more than they hold, nest deeply, or are not MessagePack.
pub fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // 32-bit lengths: array, map, str, bin, ext
        Just(vec![0xdd, 0xff, 0xff, 0xff, 0xff]),
        Just(vec![0xdf, 0xff, 0xff, 0xff, 0xff]),
        Just(vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'a']),
        Just(vec![0xc6, 0xff, 0xff, 0xff, 0xff, 0]),
        Just(vec![0xc9, 0xff, 0xff, 0xff, 0xff, 1]),
        // 16-bit lengths
        Just(vec![0xdc, 0xff, 0xff, 0x01]),
        Just(vec![0xde, 0xff, 0xff, 0xa1, b'k']),
        Just(vec![0xda, 0xff, 0xff]),
        // a number cut short, the never-used byte, a bad UTF-8 string
        Just(vec![0xcf, 0x01]),
        Just(vec![0xc1]),
        Just(vec![0xa2, 0xff, 0xfe]),
        // deep nesting: arrays and maps
        (1usize..3000).prop_map(|n| {
            let mut v = vec![0x91; n];
            v.push(0xc0);
            v
        }),
        (1usize..1500).prop_map(|n| {
            let mut v = Vec::with_capacity(3 * n + 1);
            for _ in 0..n {
                v.extend_from_slice(&[0x81, 0xa1, b'k']);
            }
            v.push(0xc0);
            v
        }),
        // a declared length, then some arbitrary bytes
        (prop_oneof![Just(0xddu8), Just(0xdf), Just(0xdc), Just(0xde)], any::<u32>(), vec(any::<u8>(), 0..32)).prop_map(
            |(marker, len, tail)| {
                let mut v = vec![marker];
                if marker == 0xdc || marker == 0xde {
                    v.extend_from_slice(&(len as u16).to_be_bytes());
                } else {
                    v.extend_from_slice(&len.to_be_bytes());
                }
                v.extend(tail);
                v
            }
        ),
    ]
}

/// Keys the parser knows, to build maps that look right and hold the wrong things.
const KEYS: &[&str] = &[
    "seq", "rss", "in_progress", "served", "watchdog", "protocol", "pid", "adapter", "python", "functions", "name",
    "idempotent", "kind", "threads", "type", "message", "traceback",
];

/// A field value: arbitrary, or a map of known keys with arbitrary values, or valid pieces.
fn field_value() -> impl Strategy<Value = Value> {
    let known_map = vec((proptest::sample::select(KEYS), arb_value()), 0..6)
        .prop_map(|kv| Value::Map(kv.into_iter().map(|(k, v)| (s(k), v)).collect()));
    prop_oneof![
        3 => arb_value(),
        2 => known_map,
        1 => arb_beat().prop_map(|b| beat_value(&b)),
        1 => arb_hello().prop_map(|h| hello_value(&h)),
        1 => arb_remote_error().prop_map(|e| error_value(&e)),
        1 => (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| Value::Array(vec![a.into(), b.into(), c.into()])),
        1 => (0u64..4).prop_map(Value::from),
    ]
}

/// A body shaped like a message: an array whose head is a type code, whose declared length may
/// lie, whose fields are drawn from [`field_value`], and which may end in hostile bytes.
pub fn shaped_body() -> impl Strategy<Value = Vec<u8>> {
    let ty = prop_oneof![4 => 0u64..=7, 1 => any::<u64>()];
    (ty, vec(field_value(), 0..7), proptest::option::of(0u32..10), proptest::option::of(hostile_bytes())).prop_map(
        |(ty, fields, declared, hostile)| {
            let mut items = vec![Value::from(ty)];
            items.extend(fields);
            let real = items.len() as u32 + u32::from(hostile.is_some());
            let declared = declared.unwrap_or(real);
            let mut out = Vec::new();
            rmp::encode::write_array_len(&mut out, declared).unwrap_or(rmp::Marker::Null);
            for v in &items {
                out.extend(encode(v));
            }
            if let Some(h) = hostile {
                out.extend(h);
            }
            out
        },
    )
}

/// One change to a byte stream made of frames.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Cut the stream at this point (modulo its length).
    Truncate(usize),
    /// Flip one bit.
    FlipBit(usize, u8),
    /// Overwrite one byte.
    SetByte(usize, u8),
    /// Rewrite the length prefix at the start of the stream.
    LieLength(u32),
    /// Insert bytes.
    Insert(usize, Vec<u8>),
    /// Remove a byte.
    Remove(usize),
}

/// Any [`Mutation`], with lengths chosen near the interesting edges.
pub fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let lie = prop_oneof![
        Just(0u32),
        Just(u32::MAX),
        Just(MAX_FRAME as u32),
        Just(MAX_FRAME as u32 + 1),
        0u32..64,
        any::<u32>(),
    ];
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::SetByte(p, b)),
        lie.prop_map(Mutation::LieLength),
        (any::<usize>(), prop_oneof![vec(any::<u8>(), 1..8), hostile_bytes()]).prop_map(|(p, b)| Mutation::Insert(p, b)),
        any::<usize>().prop_map(Mutation::Remove),
    ]
}

/// Apply `m` to `stream`.
pub fn mutate(stream: &mut Vec<u8>, m: &Mutation) {
    let len = stream.len();
    match m {
        Mutation::Truncate(at) => stream.truncate(at % (len + 1)),
        Mutation::FlipBit(p, b) if len > 0 => stream[p % len] ^= 1 << (b % 8),
        Mutation::SetByte(p, v) if len > 0 => stream[p % len] = *v,
        Mutation::LieLength(n) if len >= 4 => stream[..4].copy_from_slice(&n.to_be_bytes()),
        Mutation::Insert(p, bytes) => {
            let at = p % (len + 1);
            stream.splice(at..at, bytes.iter().copied());
        }
        Mutation::Remove(p) if len > 0 => {
            stream.remove(p % len);
        }
        _ => {}
    }
}

/// Any input: valid frames, message-shaped frames, raw bytes in a frame or alone; then
/// mutations. Also returns the read size to feed it with.
pub fn arb_input() -> impl Strategy<Value = (Vec<u8>, usize)> {
    let body = prop_oneof![
        2 => arb_message().prop_map(|m| encode_message(&m)),
        3 => shaped_body(),
        1 => vec(any::<u8>(), 0..64),
        1 => hostile_bytes(),
    ];
    let stream = prop_oneof![
        6 => vec(body, 1..4).prop_map(|bodies| bodies.iter().flat_map(|b| frame(b)).collect::<Vec<u8>>()),
        1 => vec(any::<u8>(), 0..128),
    ];
    let piece = prop_oneof![Just(usize::MAX), 1usize..8, 8usize..4096];
    (stream, vec(arb_mutation(), 0..3), piece).prop_map(|(mut stream, muts, piece)| {
        for m in &muts {
            mutate(&mut stream, m);
        }
        (stream, piece)
    })
}

// ---- the seed corpus ----

fn sample_beat() -> Beat {
    Beat {
        seq: 3,
        rss: 1 << 20,
        in_progress: vec![InProgress { id: 7, attempt: 1, phase: Phase::Running, started_ms: 1_700_000_000_000 }],
        served: 2,
        watchdog: Some(true),
    }
}

fn sample_hello() -> Hello {
    Hello {
        protocol: 2,
        pid: 42,
        adapter: "0.1.0".into(),
        python: "3.12.1".into(),
        functions: vec![FunctionInfo { name: "health".into(), idempotent: true, kind: ExecKind::Inline, threads: 0, stream: false }],
        capabilities: vec!["call_options".into(), "started".into()],
    }
}

fn sample_error() -> RemoteError {
    RemoteError {
        kind: RemoteErrorKind::Exception,
        type_name: "ValueError".into(),
        message: "bad".into(),
        traceback: Some("Traceback...".into()),
        functions: None,
    }
}

/// Bodies of valid messages, one of each kind, named.
pub fn valid_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ok = WorkerMessage::Reply(Reply {
        id: 7,
        attempt: 1,
        span: None,
        outcome: Ok(bytes::Bytes::from(encode(&Value::Array(vec![1.into(), s("two")])))),
    });
    let traced = WorkerMessage::Reply(Reply {
        id: u64::MAX,
        attempt: u32::MAX,
        span: Some(SpanTiming { span_id: 9, start_unix_ns: 10, end_unix_ns: 20 }),
        outcome: Err(sample_error()),
    });
    vec![
        ("hello", encode_message(&WorkerMessage::Hello(sample_hello()))),
        ("beat", encode_message(&WorkerMessage::Beat(sample_beat()))),
        ("pong", encode_message(&WorkerMessage::Pong { nonce: 5, beat: sample_beat() })),
        ("started", encode_message(&WorkerMessage::Started { id: u64::MAX, attempt: u32::MAX })),
        ("fds", encode_message(&WorkerMessage::Fds(vec![4096, u64::MAX]))),
        ("item", encode_message(&WorkerMessage::Item { id: u64::MAX, attempt: u32::MAX, seq: u64::MAX, value: bytes::Bytes::from(encode(&s("v"))) })),
        ("reply-ok", encode_message(&ok)),
        ("reply-error-traced", encode_message(&traced)),
    ]
}

/// Every crash-prone shape thought of, as whole input streams, named.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let valid = valid_seeds();
    for (name, body) in &valid {
        out.push((format!("valid-{name}"), frame(body)));
    }
    out.push(("valid-all-in-one-write".into(), valid.iter().flat_map(|(_, b)| frame(b)).collect()));
    out.push(("valid-empty-reply-value-bin".into(), frame(&[0x96, 2, 1, 1, 0xc3, 0xc0, 0xc4, 0])));

    // Length prefixes that lie.
    out.push(("prefix-only-64mib".into(), (64u32 << 20).to_be_bytes().to_vec()));
    out.push(("prefix-only-at-max".into(), (MAX_FRAME as u32).to_be_bytes().to_vec()));
    out.push(("prefix-u32-max".into(), u32::MAX.to_be_bytes().to_vec()));
    out.push(("prefix-max-plus-one-with-body".into(), {
        let mut v = (MAX_FRAME as u32 + 1).to_be_bytes().to_vec();
        v.extend_from_slice(&valid[1].1);
        v
    }));
    out.push(("prefix-partial".into(), vec![0, 0]));
    out.push(("frame-empty".into(), frame(&[])));
    for (name, body) in &valid {
        let f = frame(body);
        out.push((format!("truncated-{name}"), f[..f.len() - 1].to_vec()));
        let mut short = f.clone();
        short[..4].copy_from_slice(&(body.len() as u32 - 1).to_be_bytes());
        out.push((format!("length-short-{name}"), short));
        let mut flipped = f.clone();
        let mid = 4 + body.len() / 2;
        flipped[mid] ^= 0x80;
        out.push((format!("bitflip-{name}"), flipped));
    }

    // Bodies that are not messages.
    for (name, body) in [
        ("body-not-array", vec![0x05]),
        ("body-empty-array", vec![0x90]),
        ("body-never-used-byte", vec![0xc1]),
        ("body-type-unknown", vec![0x91, 0x09]),
        ("body-type-call-from-worker", vec![0x92, 0x01, 0x00]),
        ("body-type-huge", vec![0x91, 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        ("body-type-negative", vec![0x91, 0xff]),
        ("reply-five-elements", vec![0x95, 2, 1, 1, 0xc3, 0xc0]),
        ("reply-no-value", vec![0x96, 2, 1, 1, 0xc3, 0xc0]),
        ("reply-attempt-over-u32", vec![0x96, 2, 1, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0, 0xc3, 0xc0, 0xc0]),
        ("reply-ok-not-bool", vec![0x96, 2, 1, 1, 0x01, 0xc0, 0xc0]),
        ("reply-span-id-zero", vec![0x96, 2, 1, 1, 0xc3, 0x93, 0, 1, 1, 0xc0]),
        ("reply-span-two-elements", vec![0x96, 2, 1, 1, 0xc3, 0x92, 1, 1, 0xc0]),
        ("reply-error-not-map", vec![0x96, 2, 1, 1, 0xc2, 0xc0, 0x01]),
        ("reply-error-no-kind", vec![0x96, 2, 1, 1, 0xc2, 0xc0, 0x80]),
        ("beat-not-map", vec![0x92, 4, 0x01]),
        ("beat-missing", vec![0x91, 4]),
        ("pong-no-nonce", vec![0x91, 6]),
        ("hello-not-map", vec![0x92, 0, 0xc0]),
    ] {
        out.push((name.to_string(), frame(&body)));
    }

    // Declared lengths far beyond the bytes, in every position the parser reads a map or array.
    let heads: [(&str, Vec<u8>); 6] = [
        ("beat", vec![0x92, 4]),
        ("hello", vec![0x92, 0]),
        ("pong", vec![0x93, 6, 1]),
        ("reply-error", vec![0x96, 2, 1, 1, 0xc2, 0xc0]),
        ("reply-span", vec![0x96, 2, 1, 1, 0xc3]),
        ("beat-in-progress", vec![0x92, 4, 0x81, 0xab, b'i', b'n', b'_', b'p', b'r', b'o', b'g', b'r', b'e', b's', b's']),
    ];
    let tails: [(&str, Vec<u8>); 7] = [
        ("array32", vec![0xdd, 0xff, 0xff, 0xff, 0xff]),
        ("map32", vec![0xdf, 0xff, 0xff, 0xff, 0xff]),
        ("str32", vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'a']),
        ("bin32", vec![0xc6, 0xff, 0xff, 0xff, 0xff, 0]),
        ("ext32", vec![0xc9, 0xff, 0xff, 0xff, 0xff, 1]),
        ("array16", vec![0xdc, 0xff, 0xff, 0x01]),
        ("deep-array", {
            let mut v = vec![0x91; 5000];
            v.push(0xc0);
            v
        }),
    ];
    for (h, head) in &heads {
        for (t, tail) in &tails {
            let mut body = head.clone();
            body.extend_from_slice(tail);
            out.push((format!("huge-{h}-{t}"), frame(&body)));
        }
    }
    // Deep nesting inside a known map, under a key the parser ignores and one it reads.
    for key in ["future", "in_progress", "functions"] {
        let mut body = vec![0x92, 4, 0x81];
        rmp::encode::write_str(&mut body, key).unwrap_or(());
        let mut deep = Vec::new();
        for _ in 0..2000 {
            deep.extend_from_slice(&[0x81, 0xa1, b'k']);
        }
        deep.push(0xc0);
        body.extend(deep);
        out.push((format!("deep-map-under-{key}"), frame(&body)));
    }
    out
}

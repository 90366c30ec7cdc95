//! What crosses the wire between nodes: the one cluster message a served pool's member answers
//! ([`PoolMemberMsg`]: where to open a call channel to its node), the call channel's handshake
//! ([`ChannelOffer`], [`ChannelHello`], [`ChannelWelcome`]) and frames ([`Frame`]: call, cancel,
//! reply), and the versioned MessagePack bodies the frames carry ([`WireCall`], [`WireReply`]).
//! Owns their encoding and its checks; not routing, not serving, not the connections.
//!
//! A frame is the core protocol's framing (a 4-byte big-endian length, then the body; read with
//! `pyvisor_protocol::FrameCodec`, which enforces the cap as bytes arrive); a channel frame's
//! body is a one-byte kind, the call id (8 bytes, big-endian), for a call the member's actor pid
//! (8 bytes), then the MessagePack body. A body this node cannot decode is answered with an
//! error reply, never dropped (which would leave the caller to time out).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pyvisor_protocol::LENGTH_PREFIX;
use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};

/// The version of the bodies; a node refuses another. 2: calls on call channels (version 1
/// sent them as ractor_cluster RPCs; a cluster runs one version: upgrade every node together).
pub(crate) const WIRE_VERSION: u8 = 2;

/// The message a served pool's member actor takes (the variant name is ractor_cluster's
/// wire tag: never rename it).
#[derive(RactorClusterMessage)]
pub enum PoolMemberMsg {
    /// Where to open a call channel to the member's node: an encoded [`ChannelOffer`] out,
    /// with a token good for one connection. Asked over the node's authenticated session, so
    /// only a peer that proved the cookie (and, with TLS, its certificate) gets one.
    #[rpc]
    Offer(RpcReplyPort<Vec<u8>>),
}

/// Where a node takes call channels, and the single-use token that opens one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ChannelOffer {
    pub v: u8,
    /// The node's call port's IP (`None`: the one its session is with).
    pub host: Option<String>,
    pub port: u16,
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// The largest frame body the node takes: a caller sends no larger call.
    pub max_frame: u64,
}

/// The first frame on a call channel, from the node that opened it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ChannelHello {
    pub v: u8,
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// The opening node's name (whose session's end ends the channel).
    pub node: String,
    /// The largest frame body the opening node takes: no larger reply is sent it.
    pub max_frame: u64,
}

/// The answer to a [`ChannelHello`]: accepted, or why not (then the connection closes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ChannelWelcome {
    pub v: u8,
    pub refused: Option<String>,
}

/// A call channel frame, after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// Run the encoded [`WireCall`] `body` on the pool served by the member actor `member`.
    Call { id: u64, member: u64, body: Bytes },
    /// The caller gave up the call `id` (dropped, or out of time): the serving node abandons
    /// it, as a local caller's drop does (the worker is sent `cancel`).
    Cancel { id: u64 },
    /// The outcome of the call `id`: an encoded [`WireReply`].
    Reply { id: u64, body: Bytes },
}

const KIND_CALL: u8 = 1;
const KIND_CANCEL: u8 = 2;
const KIND_REPLY: u8 = 3;

impl Frame {
    /// The frame, length prefix included, as one buffer (one write).
    pub(crate) fn encode(&self) -> Bytes {
        let (kind, id, member, body): (u8, u64, Option<u64>, &[u8]) = match self {
            Frame::Call { id, member, body } => (KIND_CALL, *id, Some(*member), body),
            Frame::Cancel { id } => (KIND_CANCEL, *id, None, &[]),
            Frame::Reply { id, body } => (KIND_REPLY, *id, None, body),
        };
        let head = 1 + 8 + if member.is_some() { 8 } else { 0 };
        let mut out = BytesMut::with_capacity(LENGTH_PREFIX + head + body.len());
        // Bodies are capped far below 4 GiB by the frame limit of the node reading them.
        out.put_u32(u32::try_from(head + body.len()).unwrap_or(u32::MAX));
        out.put_u8(kind);
        out.put_u64(id);
        if let Some(m) = member {
            out.put_u64(m);
        }
        out.put_slice(body);
        out.freeze()
    }

    /// A frame's body (its length prefix already taken off by the codec).
    pub(crate) fn decode(frame: BytesMut) -> Result<Frame, String> {
        let mut b = frame.freeze();
        if b.remaining() < 9 {
            return Err(format!("a channel frame of {} bytes (at least 9 expected)", b.len()));
        }
        let kind = b.get_u8();
        let id = b.get_u64();
        match kind {
            KIND_CALL if b.remaining() >= 8 => {
                let member = b.get_u64();
                Ok(Frame::Call { id, member, body: b })
            }
            KIND_CANCEL => Ok(Frame::Cancel { id }),
            KIND_REPLY => Ok(Frame::Reply { id, body: b }),
            other => Err(format!("a channel frame of unknown kind {other} or too short")),
        }
    }
}

/// A handshake body as one frame (length prefix included).
pub(crate) fn handshake_frame<T: Serialize>(value: &T) -> Bytes {
    let body = encode(value);
    let mut out = BytesMut::with_capacity(LENGTH_PREFIX + body.len());
    out.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
    out.put_slice(&body);
    out.freeze()
}

/// A call as it crosses the node boundary: the function, its already-encoded MessagePack
/// input, the time left (not a deadline: the nodes' clocks differ), the caller's trace
/// context, idempotency override, affinity and idempotency keys, and the id a later `Cancel`
/// names. Fields added later are optional, so an older node's body still decodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct WireCall {
    pub v: u8,
    pub function: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Milliseconds left when sent (`None`: the serving pool's own timeout).
    pub budget_ms: Option<u64>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub idempotent: Option<bool>,
    /// The caller's id of the call (a random start per process, then counted; the channel
    /// frame carries the same id, which the serving end uses).
    #[serde(default)]
    pub call_id: Option<u64>,
    #[serde(default)]
    pub affinity: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A call's outcome as it comes back: the encoded result, or what went wrong there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct WireReply {
    pub v: u8,
    pub result: Result<serde_bytes::ByteBuf, WireError>,
    /// Whether the function is idempotent (its `@expose`), when the serving pool knows it:
    /// the caller remembers it for calls without an override.
    #[serde(default)]
    pub idempotent: Option<bool>,
}

/// A failed call on the serving node: the `CallError` kind (`CallError::kind`) and its text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct WireError {
    pub kind: String,
    pub message: String,
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings, bytes and numbers: encoding cannot fail.
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

/// Decode a body and check its version.
pub(crate) fn decode<'a, T: Deserialize<'a> + Versioned>(bytes: &'a [u8]) -> Result<T, String> {
    let value: T = rmp_serde::from_slice(bytes).map_err(|e| format!("an undecodable message: {e}"))?;
    if value.version() != WIRE_VERSION {
        return Err(format!("wire version {} (this node speaks {WIRE_VERSION})", value.version()));
    }
    Ok(value)
}

/// A body with a version field.
pub(crate) trait Versioned {
    fn version(&self) -> u8;
}

/// Each body's version is its `v` field.
macro_rules! versioned {
    ($($body:ty),*) => {$(
        impl Versioned for $body {
            fn version(&self) -> u8 {
                self.v
            }
        }
    )*};
}

versioned!(WireCall, WireReply, ChannelOffer, ChannelHello, ChannelWelcome);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_and_other_versions_or_garbage_are_refused() {
        let call = WireCall {
            v: WIRE_VERSION,
            function: "f".into(),
            payload: vec![0x91, 0x01],
            budget_ms: Some(1500),
            traceparent: Some("00-abc-def-01".into()),
            tracestate: None,
            idempotent: Some(true),
            call_id: Some(7),
            affinity: Some("session-1".into()),
            idempotency_key: None,
        };
        let bytes = encode(&call);
        assert_eq!(decode::<WireCall>(&bytes), Ok(call.clone()));
        let old = encode(&WireCall { v: 9, ..call });
        assert!(decode::<WireCall>(&old).unwrap_err().contains("wire version 9"));
        assert!(decode::<WireCall>(&[0xc1]).is_err());
        let reply = WireReply { v: WIRE_VERSION, result: Err(WireError { kind: "timeout".into(), message: "m".into() }), idempotent: Some(false) };
        assert_eq!(decode::<WireReply>(&encode(&reply)), Ok(reply));
    }

    #[test]
    fn channel_frames_round_trip_and_short_or_unknown_ones_are_refused() {
        let frames = [
            Frame::Call { id: 7, member: 42, body: Bytes::from_static(b"\x91\x01") },
            Frame::Cancel { id: u64::MAX },
            Frame::Reply { id: 1, body: Bytes::new() },
        ];
        for frame in frames {
            let bytes = frame.encode();
            let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            assert_eq!(len, bytes.len() - LENGTH_PREFIX);
            assert_eq!(Frame::decode(BytesMut::from(&bytes[LENGTH_PREFIX..])), Ok(frame));
        }
        assert!(Frame::decode(BytesMut::from(&[KIND_CALL, 0, 0, 0, 0, 0, 0, 0, 1][..])).is_err(), "a call without its member");
        assert!(Frame::decode(BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0, 1][..])).is_err());
        assert!(Frame::decode(BytesMut::from(&[KIND_REPLY, 0][..])).is_err());
    }

    #[test]
    fn a_body_without_the_later_fields_still_decodes() {
        #[derive(Serialize)]
        struct FirstCall<'a> {
            v: u8,
            function: &'a str,
            #[serde(with = "serde_bytes")]
            payload: &'a [u8],
            budget_ms: Option<u64>,
            traceparent: Option<String>,
            tracestate: Option<String>,
            idempotent: Option<bool>,
        }
        let old = FirstCall { v: WIRE_VERSION, function: "f", payload: &[0xc0], budget_ms: None, traceparent: None, tracestate: None, idempotent: None };
        let call: WireCall = decode(&encode(&old)).expect("decodes");
        assert_eq!((call.call_id, call.affinity, call.idempotency_key), (None, None, None));
    }
}

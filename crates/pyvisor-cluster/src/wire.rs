//! What crosses the wire between nodes: the one cluster message a served pool answers
//! ([`PoolMemberMsg`]) and the versioned MessagePack bodies it carries ([`WireCall`],
//! [`WireReply`]). Owns their encoding and its checks; not routing, not serving.
//!
//! The bodies travel as opaque bytes inside ractor_cluster's message, so a body this node
//! cannot decode is answered with an error reply instead of being dropped by ractor (which
//! leaves the caller to time out).

use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};

/// The version of the bodies; a node refuses another.
pub(crate) const WIRE_VERSION: u8 = 1;

/// The message a served pool's member actor takes (the variant name is ractor_cluster's
/// wire tag: never rename it).
#[derive(RactorClusterMessage)]
pub enum PoolMemberMsg {
    /// A call: an encoded [`WireCall`] in, an encoded [`WireReply`] out.
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// The caller gave up the call with this `call_id` (dropped, or out of time): the serving
    /// node abandons it, as a local caller's drop does (the worker is sent `cancel`).
    Cancel(u64),
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
    /// Random per call, for `PoolMemberMsg::Cancel`.
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

impl Versioned for WireCall {
    fn version(&self) -> u8 {
        self.v
    }
}

impl Versioned for WireReply {
    fn version(&self) -> u8 {
        self.v
    }
}

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

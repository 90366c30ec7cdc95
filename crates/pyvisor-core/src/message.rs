//! [`local_message!`](crate::local_message): `ractor::Message` for an actor message type that
//! works with and without ractor's `cluster` feature. Owns nothing else.
//!
//! Without `cluster`, ractor implements `Message` for every `Send + 'static` type, and a
//! hand-written impl conflicts with it; with `cluster` (multi-node mode, crates/pyvisor-cluster)
//! that blanket impl is gone and every message type needs one. Which of the two holds is decided
//! by the whole build's features, not by the crate that defines the type — so the impl is
//! written by this macro, whose expansion follows pyvisor-core's own `cluster` feature (the one
//! that forwards `ractor/cluster`).

#[doc(hidden)]
pub use ractor as __ractor;

/// Implement `ractor::Message` for local actor message types when the build has ractor's
/// `cluster` feature (pyvisor's multi-node mode); expand to nothing otherwise. Use it for every
/// message type of your own actors in a program that may enable `pyvisor/cluster`.
///
/// ```
/// use ractor::RpcReplyPort;
/// enum AppMsg {
///     Predict(f64, RpcReplyPort<f64>),
/// }
/// pyvisor_core::local_message!(AppMsg);
/// ```
#[cfg(feature = "cluster")]
#[macro_export]
macro_rules! local_message {
    ($($t:ty),+ $(,)?) => {
        $(impl $crate::message::__ractor::Message for $t {})+
    };
}

/// Implement `ractor::Message` for local actor message types when the build has ractor's
/// `cluster` feature (pyvisor's multi-node mode); expand to nothing otherwise. Use it for every
/// message type of your own actors in a program that may enable `pyvisor/cluster`.
///
/// ```
/// use ractor::RpcReplyPort;
/// enum AppMsg {
///     Predict(f64, RpcReplyPort<f64>),
/// }
/// pyvisor_core::local_message!(AppMsg);
/// ```
#[cfg(not(feature = "cluster"))]
#[macro_export]
macro_rules! local_message {
    ($($t:ty),+ $(,)?) => {};
}

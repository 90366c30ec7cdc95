//! What a call's waiter is finally told: [`Outcome`] (the reply value or a [`Failure`], the
//! function's span timing, whether it started). Shared by the call table (`slot`) and a
//! stream's flow (`stream`), below both; owns no behaviour.

use std::sync::Arc;

use crate::buffers::Reply;
use pyvisor_protocol::{RemoteError, SpanTiming};

use crate::death::DeathCertificate;

/// Why a call ended without a reply value.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    Remote(RemoteError),
    Crashed(Arc<DeathCertificate>),
    ShutDown,
}

/// What a waiting caller gets: the result, and the function's span timing when the worker
/// reported one (a traced call that ran).
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) result: Result<Reply, Failure>,
    pub(crate) span: Option<SpanTiming>,
    /// For a crash: whether the function had started, when known (the start acknowledgement,
    /// `super::slot`); `None`
    /// for replies and whenever it is not known.
    pub(crate) started: Option<bool>,
}


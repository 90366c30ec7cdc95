//! Wall-clock conversions for the wire: a monotonic deadline as the milliseconds since the Unix
//! epoch that a `call` frame carries. Owns nothing else.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// `at` as milliseconds since the Unix epoch (0 if the system clock is before the epoch).
pub(crate) fn unix_ms(at: Instant) -> u64 {
    let from_now = at.saturating_duration_since(Instant::now());
    (SystemTime::now() + from_now).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

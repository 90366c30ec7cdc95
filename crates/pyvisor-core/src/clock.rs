//! Wall-clock conversions for the wire: a monotonic deadline as the milliseconds since the Unix
//! epoch that a `call` frame carries. Owns nothing else.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// `at` as milliseconds since the Unix epoch (0 if the system clock is before the epoch,
/// `u64::MAX` past what it can represent).
pub(crate) fn unix_ms(at: Instant) -> u64 {
    let from_now = at.saturating_duration_since(Instant::now());
    match SystemTime::now().checked_add(from_now) {
        Some(t) => t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => u64::MAX,
    }
}

//! The quarantine: fingerprints (function + payload hash) of poison requests, refused until
//! their window ends, with the certificates that convicted them.
//!
//! Owns the entries, their expiry and their bound. It does not decide what is poison (`retry`)
//! nor share itself between callers (the pool wraps it in its lock).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use crate::death::DeathCertificate;

/// Entries a pool's quarantine holds at most.
pub(crate) const QUARANTINE_CAP: usize = 1024;

/// A call's fingerprint: its function and payload, hashed (stable within one build).
/// Out-of-band buffers count with their bytes (two calls that differ only in a buffer are
/// different requests). Hashes every byte: paid when a quarantine
/// is active, a call is quarantined or an idempotency key is checked.
pub(crate) fn fingerprint(function: &str, payload: &[u8], buffers: &[crate::os::memfd::SharedBytes]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    function.hash(&mut h);
    payload.hash(&mut h);
    for b in buffers {
        b.as_slice().hash(&mut h);
    }
    h.finish()
}

/// A quarantined fingerprint: refused until `until`, because of `certificates`.
#[derive(Debug, Clone)]
pub(crate) struct Quarantined {
    pub until: Instant,
    pub certificates: Vec<Arc<DeathCertificate>>,
}

/// Fingerprints of poison requests, at most `cap` of them.
#[derive(Debug)]
pub(crate) struct Quarantine {
    cap: usize,
    entries: HashMap<u64, Quarantined>,
}

impl Quarantine {
    /// An empty quarantine holding at most `cap` entries (0: it holds none).
    pub(crate) fn new(cap: usize) -> Self {
        Quarantine { cap, entries: HashMap::new() }
    }

    /// Quarantine `fp` until `until` (replacing an entry for it). When full, the entry that
    /// expires first makes room.
    pub(crate) fn insert(&mut self, fp: u64, until: Instant, certificates: Vec<Arc<DeathCertificate>>) {
        if self.cap == 0 {
            return;
        }
        if !self.entries.contains_key(&fp) && self.entries.len() >= self.cap {
            let first = self.entries.iter().min_by_key(|(_, q)| q.until).map(|(fp, _)| *fp);
            if let Some(first) = first {
                self.entries.remove(&first);
            }
        }
        self.entries.insert(fp, Quarantined { until, certificates });
    }

    /// The entry for `fp`, if it is still quarantined at `now`. Expired entries are dropped.
    pub(crate) fn get(&mut self, fp: u64, now: Instant) -> Option<Quarantined> {
        self.expire(now);
        self.entries.get(&fp).cloned()
    }

    /// Entries still quarantined at `now`.
    pub(crate) fn len(&mut self, now: Instant) -> usize {
        self.expire(now);
        self.entries.len()
    }

    fn expire(&mut self, now: Instant) {
        self.entries.retain(|_, q| q.until > now);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::barrier::testing::death;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn fingerprints_tell_function_and_payload_apart() {
        let _turn = crate::os::memfd::tests::counting();
        assert_eq!(fingerprint("f", b"x", &[]), fingerprint("f", b"x", &[]));
        assert_ne!(fingerprint("f", b"x", &[]), fingerprint("g", b"x", &[]));
        assert_ne!(fingerprint("f", b"x", &[]), fingerprint("f", b"y", &[]));
        assert_ne!(fingerprint("ab", b"c", &[]), fingerprint("a", b"bc", &[]));
        let (x, y) = (crate::os::memfd::SharedBytes::from_slice(b"x").unwrap(), crate::os::memfd::SharedBytes::from_slice(b"y").unwrap());
        assert_ne!(fingerprint("f", b"r", std::slice::from_ref(&x)), fingerprint("f", b"r", &[y]));
        assert_eq!(fingerprint("f", b"r", std::slice::from_ref(&x)), fingerprint("f", b"r", &[crate::os::memfd::SharedBytes::from_slice(b"x").unwrap()]));
    }

    #[test]
    fn entries_are_refused_until_they_expire() {
        let (base, mut q) = (Instant::now(), Quarantine::new(8));
        let cert = Arc::new(death(None, Some(libc::SIGSEGV), &[(1, false)]));
        q.insert(fingerprint("f", b"x", &[]), base + secs(300), vec![Arc::clone(&cert)]);
        let hit = q.get(fingerprint("f", b"x", &[]), base + secs(10)).unwrap();
        assert_eq!(hit.until, base + secs(300));
        assert!(Arc::ptr_eq(&hit.certificates[0], &cert));
        assert!(q.get(fingerprint("f", b"y", &[]), base + secs(10)).is_none());
        assert_eq!(q.len(base + secs(299)), 1);
        assert!(q.get(fingerprint("f", b"x", &[]), base + secs(300)).is_none(), "expired at `until`");
        assert_eq!(q.len(base + secs(10)), 0, "the expired entry was dropped");
    }

    #[test]
    fn when_full_the_entry_that_expires_first_makes_room() {
        let (base, mut q) = (Instant::now(), Quarantine::new(3));
        q.insert(1, base + secs(30), Vec::new());
        q.insert(2, base + secs(10), Vec::new());
        q.insert(3, base + secs(20), Vec::new());
        q.insert(3, base + secs(25), Vec::new()); // replaces: no eviction
        assert_eq!(q.len(base), 3);
        q.insert(4, base + secs(40), Vec::new());
        assert_eq!(q.len(base), 3);
        assert!(q.get(2, base).is_none());
        for fp in [1, 3, 4] {
            assert!(q.get(fp, base).is_some(), "{fp}");
        }
        let mut none = Quarantine::new(0);
        none.insert(1, base + secs(30), Vec::new());
        assert_eq!(none.len(base), 0);
    }
}

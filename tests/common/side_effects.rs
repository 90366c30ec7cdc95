//! Side effects of non-idempotent calls: the worker appends each call's token to a log (one
//! `O_APPEND` write per call, see tests/workers/chaos_target.py and soak_target.py).

use std::collections::{HashMap, HashSet};
use std::path::Path;

/// What the log shows against what the callers saw: each non-idempotent call ran at most once,
/// each one reported ok ran, and nothing ran that was never called. Returns the violations.
pub fn check(log: &Path, recorded_ok: &[String], issued: &[String]) -> Vec<String> {
    let mut violations = Vec::new();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counts: HashMap<&str, u32> = HashMap::new();
    for line in text.lines() {
        *counts.entry(line).or_default() += 1;
    }
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(10).collect();
    if !repeated.is_empty() {
        violations.push(format!("non-idempotent calls ran more than once (token, runs): {repeated:?}"));
    }
    let missing: Vec<_> = recorded_ok.iter().filter(|tok| !counts.contains_key(tok.as_str())).take(10).collect();
    if !missing.is_empty() {
        violations.push(format!("non-idempotent calls reported ok without their side effect: {missing:?}"));
    }
    let issued: HashSet<&str> = issued.iter().map(String::as_str).collect();
    let unknown: Vec<_> = counts.keys().filter(|tok| !issued.contains(*tok)).take(10).collect();
    if !unknown.is_empty() {
        violations.push(format!("side effects of calls never made: {unknown:?}"));
    }
    violations
}

//! Fuzzing of the frame decoder and the worker-message parser, inside `cargo test`.
//!
//! Structure-aware inputs (valid frames, message-shaped bodies with fields of random shapes,
//! huge declared lengths, deep nesting, then truncations, bit flips and length lies) and raw
//! bytes, fed in reads of random sizes. Properties: no panic, every error typed, allocations
//! bounded relative to the input's size, valid messages round-trip. The corpus in
//! `fuzz/corpus` is replayed in full. The long run is `cargo run --release -p pyvisor-protocol
//! --example fuzz -- --minutes 10` (docs/fuzzing.md).

mod support;

use std::path::PathBuf;

use proptest::collection::vec;
use proptest::prelude::*;
use support::harness;

#[global_allocator]
static ALLOC: support::alloc::Counting = support::alloc::Counting;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn any_input_is_refused_cleanly_and_within_bounds((input, piece) in harness::arb_input()) {
        if let Err(f) = harness::check(&input, piece) {
            prop_assert!(false, "{f:?} on {} bytes", input.len());
        }
    }

    #[test]
    fn valid_messages_round_trip(messages in vec(harness::arb_message(), 1..4), piece in 1usize..300) {
        let stream: Vec<u8> = messages.iter().flat_map(|m| harness::frame(&harness::encode_message(m))).collect();
        let report = harness::check(&stream, piece).map_err(|f| TestCaseError::fail(format!("{f:?}")))?;
        prop_assert!(report.errors.is_empty(), "{:?}", report.errors);
        prop_assert_eq!(report.messages, messages);
    }
}

#[test]
fn the_corpus_replays_cleanly() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("fuzz/corpus exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    files.sort();
    assert!(files.len() >= 30, "the corpus has {} files", files.len());
    for path in files {
        let input = std::fs::read(&path).expect("corpus file reads");
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        for piece in [usize::MAX, 1, 3, 4096] {
            match harness::check(&input, piece) {
                Ok(report) if name.starts_with("valid-") => {
                    assert!(report.errors.is_empty(), "{name}: {:?}", report.errors);
                    assert!(!report.messages.is_empty(), "{name}: no message");
                }
                // A flipped bit may leave a valid message; anything found is checked for the
                // properties only.
                Ok(_) if name.starts_with("bitflip-") || name.starts_with("found-") => {}
                Ok(report) => assert!(!report.errors.is_empty(), "{name}: expected a protocol error, got {:?}", report.messages),
                Err(f) => panic!("{name} (reads of {piece}): {f:?}"),
            }
        }
    }
}

#[test]
fn the_seeds_are_in_the_corpus() {
    for (name, bytes) in harness::seeds() {
        let path = corpus_dir().join(format!("{name}.bin"));
        let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (write the seeds: cargo run -p pyvisor-protocol --example fuzz -- --write-seeds)", path.display()));
        assert_eq!(stored, bytes, "{name}.bin differs from the seed");
    }
}

/// Found by the seed corpus: serde preallocates up to 1 MiB from a declared length, so a
/// 20-byte beat whose `in_progress` declared 2³² entries made the parent allocate 1 MiB.
#[test]
fn a_declared_length_does_not_make_the_parser_allocate_ahead() {
    for (name, input) in harness::seeds().into_iter().filter(|(n, _)| n.starts_with("huge-")) {
        let report = harness::check(&input, usize::MAX).unwrap_or_else(|f| panic!("{name}: {f:?}"));
        assert!(!report.errors.is_empty() && report.messages.is_empty(), "{name}: {report:?}");
    }
}

/// Found by the seed corpus: rmp-serde recurses once per nesting level (up to 1024), which
/// overflowed a 2 MiB thread stack (debug build) decoding a beat that nests a thousand maps.
/// Run on a thread with a small stack: the parser must refuse deep nesting before it recurses.
#[test]
fn deep_nesting_is_refused_without_recursing() {
    let deep: Vec<(String, Vec<u8>)> =
        harness::seeds().into_iter().filter(|(n, _)| n.contains("deep")).collect();
    assert!(deep.len() >= 6);
    let outcome = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            deep.iter()
                .map(|(name, input)| (name.clone(), harness::check(input, usize::MAX).map(|r| (r.messages.len(), r.errors))))
                .collect::<Vec<_>>()
        })
        .expect("thread starts")
        .join()
        .expect("no panic, no overflow");
    for (name, r) in outcome {
        match r {
            Ok((0, errors)) => assert_eq!(errors.len(), 1, "{name}: {errors:?}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

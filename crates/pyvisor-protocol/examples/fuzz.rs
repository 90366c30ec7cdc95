//! The long run of the protocol fuzzer (docs/fuzzing.md).
//!
//! ```text
//! cargo run --release -p pyvisor-protocol --example fuzz -- --minutes 10 [--seed N] [--corpus DIR]
//! cargo run -p pyvisor-protocol --example fuzz -- --write-seeds
//! ```
//!
//! Runs generated inputs and mutated corpus inputs through the harness of `tests/fuzz.rs` for
//! the given time, prints progress every 10 s (cases, cases/s, kinds of error met), and saves
//! every failing input (panic, allocation over its bound, untyped error) into the corpus as
//! `found-<hash>.bin`. Exits with status 1 if anything failed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use support::harness;

#[global_allocator]
static ALLOC: support::alloc::Counting = support::alloc::Counting;

struct Args {
    minutes: f64,
    seed: u64,
    corpus: PathBuf,
    write_seeds: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        minutes: 1.0,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        corpus: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("corpus"),
        write_seeds: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--minutes" => args.minutes = value("--minutes")?.parse().map_err(|e| format!("--minutes: {e}"))?,
            "--seed" => args.seed = value("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--corpus" => args.corpus = PathBuf::from(value("--corpus")?),
            "--write-seeds" => args.write_seeds = true,
            other => return Err(format!("unknown argument {other}; see docs/fuzzing.md")),
        }
    }
    Ok(args)
}

/// FNV-1a, to name a saved input by its content.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn load_corpus(dir: &PathBuf) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fuzz: {e}");
            return ExitCode::from(2);
        }
    };
    if args.write_seeds {
        if let Err(e) = std::fs::create_dir_all(&args.corpus) {
            eprintln!("fuzz: {}: {e}", args.corpus.display());
            return ExitCode::from(2);
        }
        let seeds = harness::seeds();
        for (name, bytes) in &seeds {
            let path = args.corpus.join(format!("{name}.bin"));
            if let Err(e) = std::fs::write(&path, bytes) {
                eprintln!("fuzz: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
        println!("wrote {} seeds into {}", seeds.len(), args.corpus.display());
        return ExitCode::SUCCESS;
    }

    let corpus = load_corpus(&args.corpus);
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&args.seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let generated = harness::arb_input();
    let mutations = (0..corpus.len().max(1), vec(harness::arb_mutation(), 1..4), prop_oneof_piece());

    // Panics are counted and saved, not printed one by one.
    std::panic::set_hook(Box::new(|_| {}));
    println!(
        "fuzzing for {} min, seed {}, {} corpus inputs from {}",
        args.minutes,
        args.seed,
        corpus.len(),
        args.corpus.display()
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.minutes * 60.0);
    let mut next_report = started + Duration::from_secs(10);
    let (mut cases, mut generated_cases, mut mutated_cases, mut messages) = (0u64, 0u64, 0u64, 0u64);
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures = 0u64;

    while Instant::now() < deadline {
        let (input, piece) = if corpus.is_empty() || cases % 2 == 0 {
            generated_cases += 1;
            match generated.new_tree(&mut runner) {
                Ok(t) => t.current(),
                Err(_) => continue,
            }
        } else {
            mutated_cases += 1;
            let Ok(tree) = mutations.new_tree(&mut runner) else { continue };
            let (i, muts, piece) = tree.current();
            let mut input = corpus[i % corpus.len()].clone();
            for m in &muts {
                harness::mutate(&mut input, m);
            }
            (input, piece)
        };
        cases += 1;
        let failure = match catch_unwind(AssertUnwindSafe(|| harness::check(&input, piece))) {
            Ok(Ok(report)) => {
                messages += report.messages.len() as u64;
                for k in report.errors {
                    *kinds.entry(k).or_default() += 1;
                }
                None
            }
            Ok(Err(f)) => Some(format!("{f:?}")),
            Err(panic) => Some(format!(
                "panic: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        };
        if let Some(f) = failure {
            failures += 1;
            support::alloc::stop();
            let path = args.corpus.join(format!("found-{:016x}.bin", fnv(&input)));
            let saved = std::fs::write(&path, &input).map_or_else(|e| format!("not saved: {e}"), |()| path.display().to_string());
            println!("FAILURE #{failures} (read size {piece}): {f}\n  input {} bytes -> {saved}", input.len());
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(10);
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{:>6.0} s  {cases} cases ({:.0}/s)  {messages} messages decoded  {} error kinds  {failures} failures",
                secs,
                cases as f64 / secs,
                kinds.len()
            );
        }
    }

    let secs = started.elapsed().as_secs_f64();
    println!("\n## summary\n");
    println!("- seed: {}", args.seed);
    println!("- duration: {secs:.0} s");
    println!("- cases: {cases} ({generated_cases} generated, {mutated_cases} mutated from the corpus), {:.0} cases/s", cases as f64 / secs);
    println!("- messages decoded: {messages}");
    println!("- failures: {failures}");
    println!("- errors by kind:");
    for (k, n) in &kinds {
        println!("  - {k}: {n}");
    }
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Read sizes for mutated corpus inputs: whole, tiny, or middling.
fn prop_oneof_piece() -> impl Strategy<Value = usize> {
    proptest::prop_oneof![proptest::strategy::Just(usize::MAX), 1usize..8, 8usize..4096]
}

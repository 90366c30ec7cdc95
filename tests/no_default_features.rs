//! The facade without its default features (issue 14, item 6): the OTLP transport stack
//! (opentelemetry-otlp, tonic, hyper, reqwest, ...) is out of its dependency graph while the
//! default build has it, and `cargo check -p pyvisor --no-default-features` builds.
//!
//! Runs cargo itself, offline, on this workspace; the check goes to a target directory of its
//! own (next to this test's), so it neither waits for nor disturbs the build that runs the
//! tests. A cold check compiles the dependencies' metadata once; later runs take seconds.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Crates that carry OTLP over the wire, and only that, in the default build.
const TRANSPORT: [&str; 6] = ["opentelemetry-otlp", "opentelemetry-proto", "tonic", "hyper", "reqwest", "h2"];

fn cargo(args: &[&str]) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "cargo {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

/// The names of the crates in pyvisor's normal dependency graph.
fn dependencies(features: &[&str]) -> BTreeSet<String> {
    let mut args = vec!["tree", "-p", "pyvisor", "-e", "normal", "--prefix", "none", "--offline"];
    args.extend_from_slice(features);
    let out = cargo(&args);
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

/// `target/` of the build that made this test (target/debug/deps/no_default_features-HASH).
fn target_root() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.ancestors().nth(3).expect("target directory").to_path_buf()
}

#[test]
fn pyvisor_builds_without_otlp_and_leaves_its_transport_stack_out() {
    let full = dependencies(&[]);
    let lean = dependencies(&["--no-default-features"]);
    for name in TRANSPORT {
        assert!(full.contains(name), "{name} is in the default build: {full:?}");
        assert!(!lean.contains(name), "{name} is in the build without `otlp`: {lean:?}");
    }
    // What in-process spans, metrics and W3C propagation need stays.
    for name in ["pyvisor-core", "opentelemetry", "opentelemetry_sdk", "tracing-subscriber"] {
        assert!(lean.contains(name), "{name} missing without `otlp`: {lean:?}");
    }
    let target = target_root().join("no-default-features");
    cargo(&["check", "-p", "pyvisor", "--no-default-features", "--lib", "--offline", "--target-dir", target.to_str().expect("UTF-8 path")]);
}

//! The deployment examples against the code they deploy: the Kubernetes manifest's probes, the
//! Dockerfile's command line (through `pyvisor`'s own argument parser) and the systemd unit
//! (`systemd-analyze verify`, where it exists). No image is built: no container engine is
//! assumed.

use std::path::{Path, PathBuf};
use std::process::Command;

// The routes the `--http` server serves: the probes must name them.
use pyvisor_cli::http::{HEALTHZ, READYZ};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The port the examples publish the endpoints on (the Dockerfile's `--http 0.0.0.0:8080`).
const PORT: u16 = 8080;

/// A child's shutdown timeout when its tree file names none (`ChildSpec`'s default,
/// docs/supervision.md).
const DEFAULT_SHUTDOWN_SECS: f64 = 15.0;

/// The sum of the top-level children's shutdown timeouts of a tree file: the longest an
/// ordered shutdown waits before its last kill (a nested supervisor's timeout bounds its subtree).
fn shutdown_budget_secs(tree_file: &str) -> f64 {
    let v: toml::Value = toml::from_str(&read(tree_file)).unwrap();
    v["supervisor"]["children"]
        .as_array()
        .map(|children| {
            children
                .iter()
                .map(|c| match (c.get("brutal_kill").and_then(toml::Value::as_bool), c.get("shutdown_timeout_secs")) {
                    (Some(true), _) => 0.0,
                    (_, Some(t)) => t.as_float().or_else(|| t.as_integer().map(|i| i as f64)).unwrap(),
                    (_, None) => DEFAULT_SHUTDOWN_SECS,
                })
                .sum()
        })
        .unwrap_or(0.0)
}

/// The lines nested under the first line that is `key:` (or `- key:`), by indentation: enough
/// YAML for a manifest written as block mappings, which the checks below assert it is.
fn block<'a>(lines: &[&'a str], key: &str) -> Vec<&'a str> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let head = format!("{key}:");
    let Some(at) = lines.iter().position(|l| {
        let t = l.trim_start().trim_start_matches("- ");
        t == head || t.starts_with(&format!("{head} #"))
    }) else {
        panic!("no `{key}:` block in the manifest")
    };
    let own = indent(lines[at]);
    lines[at + 1..].iter().copied().take_while(|l| l.trim().is_empty() || indent(l) > own).collect()
}

/// The value of the first `key: value` among `lines`.
fn value<'a>(lines: &[&'a str], key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| {
        let t = l.trim_start().trim_start_matches("- ");
        let v = t.strip_prefix(key)?.strip_prefix(':')?;
        Some(v.split(" #").next().unwrap_or("").trim().trim_matches('"'))
    })
}

#[test]
fn the_kubernetes_probes_use_the_endpoints_and_the_port() {
    let text = read("examples/deploy/kubernetes.yaml");
    // Block style only (no flow mappings, no tabs): what `block` and `value` read.
    assert!(!text.contains('\t'), "tabs in the manifest");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    assert_eq!(value(&lines, "kind"), Some("Deployment"));

    for (probe, path) in [("livenessProbe", HEALTHZ), ("readinessProbe", READYZ)] {
        let b = block(&lines, probe);
        let get = block(&b, "httpGet");
        assert_eq!(value(&get, "path"), Some(path), "{probe}: {get:?}");
        assert_eq!(value(&get, "port"), Some(PORT.to_string().as_str()), "{probe}: {get:?}");
    }
    let ports = block(&lines, "ports");
    assert_eq!(value(&ports, "containerPort"), Some(PORT.to_string().as_str()));

    let limits = block(&block(&lines, "resources"), "limits");
    assert!(value(&limits, "memory").is_some() && value(&limits, "cpu").is_some(), "resource limits: {limits:?}");

    // SIGKILL comes only after the grace period: more than the example tree's shutdown timeouts.
    let grace: f64 = value(&lines, "terminationGracePeriodSeconds").expect("a grace period").parse().unwrap();
    let budget = shutdown_budget_secs("examples/tree.toml");
    assert!(grace > budget, "terminationGracePeriodSeconds {grace} does not exceed the shutdown timeouts' sum {budget}");
}

/// The final stage's exec-form `ENTRYPOINT` + `CMD`, as one argument vector.
fn dockerfile_command(text: &str) -> Vec<String> {
    // Join continuation lines, then keep the last stage.
    let joined = text.replace("\\\n", " ");
    let lines: Vec<&str> = joined.lines().collect();
    let from = lines.iter().rposition(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM ")).expect("a FROM line");
    let exec = |word: &str| -> Vec<String> {
        lines[from..]
            .iter()
            .rev()
            .find_map(|l| l.trim_start().strip_prefix(word))
            .map(|rest| {
                serde_json::from_str::<Vec<String>>(rest.trim())
                    .unwrap_or_else(|e| panic!("{word} is not in exec form (a JSON array): {rest} ({e})"))
            })
            .unwrap_or_default()
    };
    let mut argv = exec("ENTRYPOINT ");
    argv.extend(exec("CMD "));
    argv
}

/// The arguments after the `pyvisor` program in `argv` (after an init such as tini).
fn pyvisor_args(argv: &[String]) -> Vec<String> {
    let at = argv
        .iter()
        .position(|a| Path::new(a).file_name().is_some_and(|f| f == "pyvisor"))
        .unwrap_or_else(|| panic!("no pyvisor in the command line {argv:?}"));
    argv[at + 1..].to_vec()
}

/// Parse `args` with the `pyvisor` binary's own parser, without running anything: clap reads
/// the arguments in order, failing at the first it does not accept (an unknown flag, a bad
/// value), and `--help` at the end stops it before the command runs. Returns (accepted, stderr).
fn parses(args: &[String]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pyvisor")).args(args).arg("--help").output().expect("pyvisor runs");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_dockerfile_command_line_parses_with_the_cli() {
    // The method can fail: a flag `pyvisor run` does not have is refused before `--help`.
    let (ok, err) = parses(&["run".into(), "/app/tree.toml".into(), "--no-such-flag".into()]);
    assert!(!ok && err.contains("--no-such-flag"), "{err}");

    let text = read("examples/deploy/Dockerfile");
    let args = pyvisor_args(&dockerfile_command(&text));
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    // The tree it runs is one the image contains.
    let tree = args.iter().skip(1).find(|a| !a.starts_with('-')).expect("a tree file argument");
    assert!(text.lines().any(|l| l.starts_with("COPY ") && l.trim_end().ends_with(&format!(" {tree}"))), "no COPY to {tree}");
    // The endpoints listen on every interface of the container, on the published port.
    let http = args.iter().position(|a| a == "--http").and_then(|i| args.get(i + 1)).expect("--http ADDRESS");
    assert_eq!(http.parse::<std::net::SocketAddr>().map(|a| (a.ip().is_unspecified(), a.port())).ok(), Some((true, PORT)), "{http}");
    assert!(text.lines().any(|l| l.trim() == format!("EXPOSE {PORT}")), "EXPOSE {PORT}");

    let (ok, err) = parses(&args);
    assert!(ok, "the Dockerfile's command line does not parse: {args:?}\n{err}");
}

fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).map(str::trim)
}

/// A systemd time span in seconds (`45s`, `1min 30s`, `2min`, a bare number of seconds).
fn seconds(span: &str) -> f64 {
    span.split_whitespace()
        .map(|part| {
            let split = part.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(part.len());
            let (n, unit) = part.split_at(split);
            let n: f64 = n.parse().unwrap_or_else(|_| panic!("not a time span: {span}"));
            n * match unit {
                "" | "s" | "sec" => 1.0,
                "min" | "m" => 60.0,
                "h" => 3600.0,
                "ms" => 0.001,
                other => panic!("unit {other} in {span}"),
            }
        })
        .sum()
}

#[test]
fn the_systemd_unit_is_a_notify_service_sized_for_its_tree() {
    let unit = read("examples/systemd/pyvisor.service");
    for (key, want) in [("Type", "notify"), ("KillMode", "mixed"), ("Restart", "on-failure"), ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes")] {
        assert_eq!(unit_value(&unit, key), Some(want), "{key}");
    }
    for key in ["WatchdogSec", "MemoryMax", "TasksMax", "ExecReload"] {
        assert!(unit_value(&unit, key).is_some(), "no {key}=");
    }
    let budget = shutdown_budget_secs("examples/tree.toml");
    let stop = seconds(unit_value(&unit, "TimeoutStopSec").expect("TimeoutStopSec"));
    assert!(stop > budget, "TimeoutStopSec {stop} s does not exceed the shutdown timeouts' sum {budget} s");

    // Its command line parses too.
    let exec: Vec<String> = unit_value(&unit, "ExecStart").unwrap().split_whitespace().map(str::to_string).collect();
    let (ok, err) = parses(&pyvisor_args(&exec));
    assert!(ok, "ExecStart does not parse: {exec:?}\n{err}");

    let Some(analyze) = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("systemd-analyze")).find(|f| f.is_file()))
    else {
        eprintln!("skipped `systemd-analyze verify`: systemd-analyze is not on PATH");
        return;
    };
    // verify also checks that ExecStart's program exists: point it at the binary just built
    // (the unit's install path, /usr/local/bin/pyvisor, is not expected on a test machine).
    let dir = std::env::temp_dir().join(format!("pyvisor-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("pyvisor.service");
    let program = &exec[0];
    std::fs::write(&copy, unit.replace(&format!("ExecStart={program} "), &format!("ExecStart={} ", env!("CARGO_BIN_EXE_pyvisor")))).unwrap();
    let out = Command::new(&analyze).arg("verify").arg(&copy).output().expect("systemd-analyze runs");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() && said.contains("System has not been booted with systemd") {
        eprintln!("skipped `systemd-analyze verify`: {}", said.trim());
        return;
    }
    // verify exits 0 after some warnings (an unparsable value is "ignored"): any line about
    // the unit is a failure.
    let about: Vec<&str> = said.lines().filter(|l| l.contains("pyvisor.service")).collect();
    assert!(out.status.success() && about.is_empty(), "systemd-analyze verify:\n{said}");
}

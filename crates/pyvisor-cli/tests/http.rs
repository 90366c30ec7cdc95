//! The HTTP endpoints against real Python workers, with a real HTTP client (reqwest):
//! `pyvisor run TREE --http 127.0.0.1:0` as a process (health, readiness that turns 503 while a
//! pool is below `min_ready` and 200 again, status, a clean stop), and the same server in
//! process (`pyvisor_cli::http`) over a tree the test calls into (the call counter matches).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pyvisor_cli::http::{self, HEALTHZ, METRICS, READYZ, STATUS};
use pyvisor_core::supervisor::{ChildSpec, Strategy, SupervisorSpec, Tree};
use pyvisor_core::{PoolSpec, RecyclePolicy};
use serde_json::Value;
use common::{alive, python, root};

fn worker(name: &str) -> String {
    root().join("tests/workers").join(name).canonicalize().expect("worker script exists").to_string_lossy().into_owned()
}

fn client() -> reqwest::Client {
    // No proxy: the endpoints are on loopback, whatever the environment says.
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().expect("an HTTP client")
}

/// GET `path`: status code, content type, body.
async fn get(c: &reqwest::Client, base: &str, path: &str) -> (u16, String, String) {
    let r = c.get(format!("{base}{path}")).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let code = r.status().as_u16();
    let ctype = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (code, ctype, r.text().await.unwrap_or_else(|e| panic!("GET {path} body: {e}")))
}

/// GET `path` until `want` holds (a guard, not a budget: the state arrives within seconds).
async fn poll(c: &reqwest::Client, base: &str, path: &str, guard: Duration, want: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let start = Instant::now();
    loop {
        let (code, _, body) = get(c, base, path).await;
        if want(code, &body) {
            return (code, body);
        }
        assert!(start.elapsed() < guard, "GET {path} never reached the state wanted within {guard:?}; last: {code} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/status` JSON: the child at `path`.
fn child<'a>(status: &'a Value, path: &str) -> &'a Value {
    fn find<'a>(children: &'a Value, path: &str) -> Option<&'a Value> {
        children.as_array()?.iter().find_map(|c| if c["path"] == path { Some(c) } else { find(&c["children"], path) })
    }
    find(&status["children"], path).unwrap_or_else(|| panic!("no child {path} in {status:#}"))
}

fn pids(pool: &Value) -> Vec<u32> {
    pool["pool"]["workers"].as_array().expect("workers").iter().filter_map(|w| w["pid"].as_u64()).map(|p| p as u32).collect()
}

// ---- a Prometheus text-format parser, strict enough to catch a malformed exposition ----

#[derive(Debug, Clone, PartialEq)]
struct PromSample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Label pairs without `le`, in order: one histogram series.
type Labels = Vec<(String, String)>;

#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    help: HashMap<String, String>,
    samples: Vec<PromSample>,
}

impl Exposition {
    /// The value of the sample named `name` with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.iter().find(|s| s.name == name && s.labels == want).map(|s| s.value)
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':') && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_') && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// The family a sample belongs to: itself, or a histogram's base for `_bucket`/`_sum`/`_count`.
fn family_of(name: &str, types: &HashMap<String, String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| t == "histogram" || t == "summary") {
                return base.to_string();
            }
        }
    }
    name.to_string()
}

fn parse_exposition(text: &str) -> Result<Exposition, String> {
    let mut e = Exposition::default();
    let mut seen_samples_of: std::collections::HashSet<String> = Default::default();
    for (n, line) in text.lines().enumerate() {
        let at = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').ok_or_else(|| at("HELP without text".into()))?;
            if !is_metric_name(name) || e.help.insert(name.to_string(), help.to_string()).is_some() {
                return Err(at("bad or repeated HELP".into()));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| at("TYPE without kind".into()))?;
            if !is_metric_name(name) || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at("bad TYPE".into()));
            }
            if seen_samples_of.contains(name) || e.types.insert(name.to_string(), kind.to_string()).is_some() {
                return Err(at("TYPE repeated or after its samples".into()));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        // name{label="value",...} value [timestamp]
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at("bad metric name".into()));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            loop {
                let start = match chars.peek() {
                    Some((_, '}')) => {
                        chars.next();
                        break;
                    }
                    Some((i, _)) => *i,
                    None => return Err(at("unclosed labels".into())),
                };
                let eq = r[start..].find('=').ok_or_else(|| at("label without =".into()))? + start;
                let key = &r[start..eq];
                if !is_label_name(key) || !r[eq + 1..].starts_with('"') {
                    return Err(at(format!("bad label {key:?}")));
                }
                while chars.peek().is_some_and(|(i, _)| *i <= eq + 1) {
                    chars.next();
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            _ => return Err(at("bad escape".into())),
                        },
                        Some((_, '"')) => break,
                        Some((_, c)) => value.push(c),
                        None => return Err(at("unclosed label value".into())),
                    }
                }
                if labels.insert(key.to_string(), value).is_some() {
                    return Err(at(format!("repeated label {key}")));
                }
                match chars.next() {
                    Some((_, ',')) => {}
                    Some((_, '}')) => break,
                    _ => return Err(at("expected , or }".into())),
                }
            }
            let consumed = chars.peek().map_or(r.len(), |(i, _)| *i);
            rest = &r[consumed..];
        }
        let mut fields = rest.strip_prefix(' ').ok_or_else(|| at("no space before the value".into()))?.split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| at("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let family = family_of(name, &e.types);
        if !e.types.contains_key(&family) {
            return Err(at(format!("sample of {family} before (or without) its TYPE")));
        }
        seen_samples_of.insert(family);
        e.samples.push(PromSample { name: name.to_string(), labels, value });
    }
    // Histograms: cumulative buckets ending in +Inf, which equals _count.
    for (base, kind) in &e.types {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for s in e.samples.iter().filter(|s| s.name == format!("{base}_bucket")) {
            let le = parse_value(s.labels.get("le").ok_or("a bucket without le")?)?;
            let key = s.labels.iter().filter(|(k, _)| *k != "le").map(|(k, v)| (k.clone(), v.clone())).collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, buckets) in series {
            let ordered = buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
            let last = buckets.last().copied().unwrap_or((0.0, 0.0));
            let labels: Vec<(&str, &str)> = key.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let count = e.value(&format!("{base}_count"), &labels);
            if !ordered || last.0 != f64::INFINITY || count != Some(last.1) {
                return Err(format!("histogram {base}{key:?}: buckets {buckets:?}, count {count:?}"));
            }
        }
    }
    Ok(e)
}

#[test]
fn the_parser_rejects_malformed_expositions() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 3\n";
    let e = parse_exposition(good).unwrap();
    assert_eq!(e.value("a_total", &[("x", "1"), ("y", "q\"")]), Some(3.0));
    for bad in [
        "a_total 3\n",                                         // no TYPE
        "# TYPE a_total counter\na_total{x=1} 3\n",           // unquoted label value
        "# TYPE a_total counter\na_total{x=\"1\"}3\n",        // no space
        "# TYPE a_total counter\na_total three\n",            // not a number
        "# TYPE a_total counter\n9a_total 1\n",               // bad name
        "# TYPE a_total countr\na_total 1\n",                 // bad type
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", // not cumulative
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\n", // no +Inf
    ] {
        assert!(parse_exposition(bad).is_err(), "accepted: {bad:?}");
    }
}

// ---- `pyvisor run --http` as a process ----

/// The run's stdout lines, read on a thread (the live status table never blocks on the pipe).
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().expect("stdout piped");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("pyvisor run: {line}");
        }
    });
    rx
}

/// Kills the run if the test fails half way (no process left behind).
struct Run(Child);
impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_readiness_that_follows_a_pool_below_min_ready() {
    let dir = std::env::temp_dir().join(format!("pyvisor-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hold = dir.join("hold");
    let _ = std::fs::remove_file(&hold);
    let tree = dir.join("tree.toml");
    std::fs::write(
        &tree,
        format!(
            r#"
[supervisor]
name = "root"
strategy = "one_for_one"

[[supervisor.children]]
pool = "api"
script = "{basic}"
workers = 1

[[supervisor.children]]
supervisor = "etl"
strategy = "one_for_one"

  [[supervisor.children.children]]
  pool = "loader"
  script = "{slow}"
  workers = 2
  min_ready = 2
  env = {{ PYVISOR_TEST_HOLD = "{hold}" }}
"#,
            basic = worker("basic.py"),
            slow = worker("slow_start.py"),
            hold = hold.display()
        ),
    )
    .unwrap();
    let mut run = Run(
        Command::new(env!("CARGO_BIN_EXE_pyvisor"))
            .env("PYVISOR_PYTHON", python())
            .env("PYVISOR_LOG", "warn")
            .args(["run", &tree.to_string_lossy(), "--http", "127.0.0.1:0"])
            // Its own control socket: runs of tests in parallel must not meet at the default path.
            .arg("--control")
            .arg(tree.with_extension("sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pyvisor run starts"),
    );
    let lines = lines_of(&mut run.0);
    let addr = loop {
        // A guard: the line comes before the tree starts.
        let line = lines.recv_timeout(Duration::from_secs(60)).expect("`http: listening on ADDR` on stdout");
        if let Some(a) = line.strip_prefix("http: listening on ") {
            break a.trim().to_string();
        }
    };
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{addr}");
    let base = format!("http://{addr}");
    let c = client();

    let (code, ctype, body) = get(&c, &base, HEALTHZ).await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    poll(&c, &base, READYZ, Duration::from_secs(60), |code, _| code == 200).await;

    let (code, ctype, body) = get(&c, &base, STATUS).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(ctype, "application/json");
    let status: Value = serde_json::from_str(&body).expect("/status is JSON");
    assert_eq!(status["ready"], true, "{status:#}");
    let api = child(&status, "api");
    assert_eq!((api["kind"].as_str(), api["state"].as_str()), (Some("pool"), Some("running")));
    assert_eq!(pids(api).len(), 1, "{api:#}");
    assert_eq!(child(&status, "etl")["kind"], "supervisor");
    let loader = child(&status, "etl/loader");
    assert_eq!(loader["pool"]["min_ready"], 2);
    let before = pids(loader);
    assert_eq!(before.len(), 2, "{loader:#}");
    for pid in pids(api).iter().chain(&before) {
        assert!(alive(*pid), "pid {pid} from /status is not a live process");
    }

    // Below min_ready: one loader worker killed while its replacement is held at import.
    std::fs::write(&hold, b"").unwrap();
    let victim = before[0];
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let (_, reason) = poll(&c, &base, READYZ, Duration::from_secs(20), |code, _| code == 503).await;
    assert_eq!(reason, "pool etl/loader: 1 of 2 workers ready (min_ready 2)\n");
    // It stays unready while the replacement is held (not a blip).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, _, body) = get(&c, &base, READYZ).await;
    assert_eq!((code, body.as_str()), (503, "pool etl/loader: 1 of 2 workers ready (min_ready 2)\n"));
    let held: Value = serde_json::from_str(&get(&c, &base, STATUS).await.2).unwrap();
    assert_eq!(held["ready"], false);
    assert_eq!(held["reasons"][0], "pool etl/loader: 1 of 2 workers ready (min_ready 2)");
    let states: Vec<&str> = child(&held, "etl/loader")["pool"]["workers"].as_array().unwrap().iter().filter_map(|w| w["state"].as_str()).collect();
    assert!(states.contains(&"starting") && states.contains(&"ready"), "{states:?}");

    // Released: ready again, with a new worker in the killed one's place.
    std::fs::remove_file(&hold).unwrap();
    let (_, body) = poll(&c, &base, READYZ, Duration::from_secs(30), |code, _| code == 200).await;
    assert_eq!(body, "ready\n");
    let after: Value = serde_json::from_str(&get(&c, &base, STATUS).await.2).unwrap();
    let loader = child(&after, "etl/loader");
    let now = pids(loader);
    assert_eq!(now.len(), 2);
    assert!(!now.contains(&victim) && now.contains(&before[1]), "before {before:?}, now {now:?}");
    let restarts: u64 = loader["pool"]["workers"].as_array().unwrap().iter().filter_map(|w| w["restarts"].as_u64()).sum();
    assert_eq!(restarts, 1, "{loader:#}");
    let deaths = loader["pool"]["last_deaths"].as_array().expect("last_deaths");
    assert_eq!(deaths.len(), 1, "{loader:#}");
    assert_eq!(deaths[0]["pid"], victim);

    // /metrics of the run: parses, and counts the crash and the replacement.
    let (code, ctype, text) = get(&c, &base, METRICS).await;
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let m = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let loader_label = [("pyvisor_pool", "loader"), ("pyvisor_restart_kind", "replacement")];
    assert_eq!(m.value("pyvisor_worker_restarts_total", &loader_label), Some(1.0), "{text}");
    assert_eq!(m.value("pyvisor_workers", &[("pyvisor_pool", "loader"), ("pyvisor_worker_state", "ready")]), Some(2.0), "{text}");

    // SIGTERM: a clean stop, every worker gone.
    assert_eq!(unsafe { libc::kill(run.0.id() as i32, libc::SIGTERM) }, 0);
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = run.0.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "`pyvisor run` did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    for pid in pids(api).into_iter().chain(now) {
        assert!(!alive(pid), "worker {pid} outlived `pyvisor run`");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- the same server in process ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_calls_made_through_the_tree() {
    let server = http::bind("127.0.0.1:0".parse().unwrap()).await.expect("listens");
    let base = format!("http://{}", server.local_addr());
    let c = client();
    // Before a tree is attached: alive, not ready, no status.
    assert_eq!(get(&c, &base, HEALTHZ).await.0, 200);
    let (code, _, body) = get(&c, &base, READYZ).await;
    assert_eq!(code, 503);
    assert!(body.starts_with("starting"), "{body}");
    assert_eq!(get(&c, &base, STATUS).await.0, 503);
    assert_eq!(get(&c, &base, "/nope").await.0, 404);
    assert_eq!(c.post(format!("{base}{HEALTHZ}")).send().await.expect("POST answers").status().as_u16(), 405);

    let tree = Tree::start(
        SupervisorSpec::new("root", Strategy::OneForOne)
            .child(ChildSpec::pool("metered", PoolSpec::script(worker("basic.py")).python(python()).workers(2).recycle(RecyclePolicy::default().min_ready(2)))),
    )
    .await
    .expect("the tree starts");
    server.attach(tree.clone());
    let pool = tree.pool("metered").expect("running");
    const OK: usize = 37;
    const FAILED: usize = 3;
    for i in 0..OK {
        let v: u64 = pool.call("echo", &(i as u64)).await.expect("echo");
        assert_eq!(v, i as u64);
    }
    for _ in 0..FAILED {
        assert!(matches!(pool.call::<_, ()>("fail", "boom").await, Err(pyvisor_core::CallError::Python { .. })));
    }

    let (code, ctype, text) = get(&c, &base, METRICS).await;
    assert_eq!(code, 200);
    assert_eq!(ctype, pyvisor_core::metrics::PROMETHEUS_CONTENT_TYPE);
    let m = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let echo = [("pyvisor_pool", "metered"), ("rpc_method", "echo"), ("pyvisor_outcome", "ok")];
    let fail = [("pyvisor_pool", "metered"), ("rpc_method", "fail"), ("pyvisor_outcome", "python")];
    assert_eq!(m.value("pyvisor_calls_total", &echo), Some(OK as f64), "{text}");
    assert_eq!(m.value("pyvisor_calls_total", &fail), Some(FAILED as f64), "{text}");
    assert_eq!(m.value("pyvisor_call_duration_seconds_count", &echo), Some(OK as f64), "{text}");
    let sum = m.value("pyvisor_call_duration_seconds_sum", &echo).expect("a latency sum");
    assert!(sum > 0.0 && sum < OK as f64 * 10.0, "{sum}");
    assert_eq!(m.value("pyvisor_workers", &[("pyvisor_pool", "metered"), ("pyvisor_worker_state", "ready")]), Some(2.0), "{text}");
    assert_eq!(m.value("pyvisor_queue_depth", &[("pyvisor_pool", "metered")]), Some(0.0), "{text}");
    assert_eq!(m.value("pyvisor_calls_in_flight", &[("pyvisor_pool", "metered")]), Some(0.0), "{text}");
    for family in ["pyvisor_calls_total", "pyvisor_call_duration_seconds", "pyvisor_worker_crashes_total", "pyvisor_worker_memory_bytes"] {
        assert!(m.types.contains_key(family) && m.help.contains_key(family), "{family} declared in\n{text}");
    }

    // Ready, and /status lists the pool's workers with live pids and what they served.
    assert_eq!(get(&c, &base, READYZ).await, (200, "text/plain; charset=utf-8".to_string(), "ready\n".to_string()));
    let status: Value = serde_json::from_str(&get(&c, &base, STATUS).await.2).expect("JSON");
    let metered = child(&status, "metered");
    let p = pids(metered);
    assert_eq!(p.len(), 2);
    assert!(p.iter().all(|pid| alive(*pid)), "{p:?}");
    let served: u64 = metered["pool"]["workers"].as_array().unwrap().iter().filter_map(|w| w["served"].as_u64()).sum();
    assert_eq!(served, (OK + FAILED) as u64, "{metered:#}");

    // Stopping: not ready any more, status still answers.
    server.stopping();
    let (code, _, body) = get(&c, &base, READYZ).await;
    assert_eq!((code, body.starts_with("stopping")), (503, true), "{body}");
    assert_eq!(get(&c, &base, STATUS).await.0, 200);
    tree.shutdown().await;
    server.shutdown().await;
    assert!(c.get(format!("{base}{HEALTHZ}")).send().await.is_err(), "the endpoints stopped listening");
}

/// A tree file with one `basic.py` pool, in a directory of its own.
fn basic_tree(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pyvisor-http-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tree = dir.join("tree.toml");
    let text = format!("[supervisor]\nstrategy = \"one_for_one\"\n[[supervisor.children]]\npool = \"p\"\nscript = \"{}\"\nworkers = 1\n", worker("basic.py"));
    std::fs::write(&tree, text).unwrap();
    tree
}

fn run_with_http(tree: &std::path::Path, http: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pyvisor"));
    c.env("PYVISOR_PYTHON", python()).env("PYVISOR_LOG", "warn").args(["run", &tree.to_string_lossy(), "--http", http]).arg("--control").arg(tree.with_extension("sock")).stdin(Stdio::null());
    c
}

#[test]
fn run_refuses_a_bad_or_taken_address_before_starting_anything() {
    let tree = basic_tree("refuse");
    let out = run_with_http(&tree, "localhost").output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an address"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = run_with_http(&tree, &format!("127.0.0.1:{port}")).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let (stdout, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(err.contains(&format!("cannot listen on 127.0.0.1:{port}")), "{err}");
    assert!(!stdout.contains("started") && !err.contains("worker spawned"), "nothing starts: {stdout}\n{err}");
    let _ = std::fs::remove_dir_all(tree.parent().unwrap());
}

#[test]
fn a_bare_port_listens_on_loopback() {
    let tree = basic_tree("bare");
    let mut run = Run(run_with_http(&tree, "0").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("runs"));
    let lines = lines_of(&mut run.0);
    let line = loop {
        let l = lines.recv_timeout(Duration::from_secs(60)).expect("the listening line");
        if l.starts_with("http: listening on ") {
            break l;
        }
    };
    let addr: std::net::SocketAddr = line["http: listening on ".len()..].parse().expect("an address");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    assert_eq!(unsafe { libc::kill(run.0.id() as i32, libc::SIGTERM) }, 0);
    let start = Instant::now();
    while run.0.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(60), "`pyvisor run` did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(tree.parent().unwrap());
}

//! Supervision trees in TOML for `pyvisor run`: the same tree as in code, pools and supervisors.
//!
//! Errors name the line and the field: syntax and unknown fields come from `toml`'s own
//! messages; the checks made here point at the child's id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pyvisor_core::supervisor::{ChildSpec, Restart, Shutdown, Strategy, SupervisorSpec};
use pyvisor_core::{Confinement, Interpreter, PoolEvent, PoolSpec, Principal, RecyclePolicy};
use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    supervisor: SupervisorToml,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SupervisorToml {
    name: Option<String>,
    strategy: Option<Strategy>,
    max_restarts: Option<u32>,
    period_secs: Option<f64>,
    healthy_secs: Option<f64>,
    #[serde(default)]
    children: Vec<ChildToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChildToml {
    pool: Option<Spanned<String>>,
    supervisor: Option<Spanned<String>>,
    restart: Option<Restart>,
    shutdown_timeout_secs: Option<f64>,
    brutal_kill: Option<bool>,
    // pool fields
    script: Option<PathBuf>,
    module: Option<String>,
    python: Option<PathBuf>,
    args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    cwd: Option<PathBuf>,
    workers: Option<usize>,
    min_ready: Option<usize>,
    max_in_flight: Option<usize>,
    max_queue: Option<usize>,
    queue_timeout_secs: Option<f64>,
    call_timeout_secs: Option<f64>,
    start_timeout_secs: Option<f64>,
    confine: Option<ConfineToml>,
    // supervisor fields
    strategy: Option<Strategy>,
    max_restarts: Option<u32>,
    period_secs: Option<f64>,
    healthy_secs: Option<f64>,
    #[serde(default)]
    children: Vec<ChildToml>,
}

/// A pool's `confine` table (docs/configuration.md, "Confinement"); every key is optional and
/// off when absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfineToml {
    address_space_bytes: Option<u64>,
    open_files: Option<u64>,
    cpu_time_secs: Option<u64>,
    core_size_bytes: Option<u64>,
    allow_env: Option<Vec<String>>,
    deny_env: Option<Vec<String>>,
    user: Option<PrincipalToml>,
    group: Option<PrincipalToml>,
    no_new_privs: Option<bool>,
}

/// A user or group: a name or a numeric id.
#[derive(Deserialize)]
#[serde(untagged)]
enum PrincipalToml {
    Id(u32),
    Name(String),
}

impl From<PrincipalToml> for Principal {
    fn from(p: PrincipalToml) -> Self {
        match p {
            PrincipalToml::Id(id) => Principal::Id(id),
            PrincipalToml::Name(n) => Principal::Name(n),
        }
    }
}

/// The confinement of a `confine` table, checked (limits, lists, users, root) so that a bad
/// value fails the file, naming the child and the field.
fn confinement(t: ConfineToml, at: &str) -> Result<Confinement, String> {
    let mut c = Confinement::default();
    if let Some(v) = t.address_space_bytes {
        c = c.address_space(v);
    }
    if let Some(v) = t.open_files {
        c = c.open_files(v);
    }
    if let Some(v) = t.cpu_time_secs {
        c = c.cpu_time(v);
    }
    if let Some(v) = t.core_size_bytes {
        c = c.core_size(v);
    }
    if let Some(v) = t.allow_env {
        c = c.allow_env(v);
    }
    if let Some(v) = t.deny_env {
        c = c.deny_env(v);
    }
    if let Some(u) = t.user {
        c = c.user(u);
    }
    if let Some(g) = t.group {
        c = c.group(g);
    }
    if let Some(on) = t.no_new_privs {
        c = c.no_new_privs(on);
    }
    c.check().map_err(|e| format!("{at}: {e}"))?;
    Ok(c)
}

/// Called with (pool path, event) for every pool event in the tree.
pub type EventSink = std::sync::Arc<dyn Fn(&str, &PoolEvent) + Send + Sync>;

struct Ctx<'a> {
    text: &'a str,
    base: &'a Path,
    interpreter: &'a Interpreter,
    events: EventSink,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())].matches('\n').count() + 1
    }
}

fn secs(field: &str, v: Option<f64>, at: &str) -> Result<Option<Duration>, String> {
    match v {
        None => Ok(None),
        Some(s) => match Duration::try_from_secs_f64(s) {
            // Longer would overflow a deadline computed from it, later, in a worker or a call.
            Ok(d) if d > pyvisor_core::MAX_DURATION => Err(format!(
                "{at}: `{field}` is too long: {s} seconds (at most {} days)",
                pyvisor_core::MAX_DURATION.as_secs() / 86_400
            )),
            Ok(d) => Ok(Some(d)),
            Err(_) => Err(format!("{at}: `{field}` must be a non-negative number of seconds, got {s}")),
        },
    }
}

/// Parse a tree file. `base` is the directory relative paths resolve against (the file's).
pub fn parse(text: &str, base: &Path, interpreter: &Interpreter, events: EventSink) -> Result<SupervisorSpec, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let ctx = Ctx { text, base, interpreter, events };
    let s = file.supervisor;
    let name = s.name.unwrap_or_else(|| "root".into());
    supervisor(&ctx, &name, "", "[supervisor]", s.strategy, s.max_restarts, s.period_secs, s.healthy_secs, s.children)
}

#[allow(clippy::too_many_arguments)]
fn supervisor(
    ctx: &Ctx<'_>,
    name: &str,
    path: &str,
    at: &str,
    strategy: Option<Strategy>,
    max_restarts: Option<u32>,
    period: Option<f64>,
    healthy: Option<f64>,
    children: Vec<ChildToml>,
) -> Result<SupervisorSpec, String> {
    let strategy = strategy.ok_or_else(|| format!("{at}: missing field `strategy` (one_for_one, one_for_all or rest_for_one)"))?;
    let mut spec = SupervisorSpec::new(name, strategy);
    if max_restarts.is_some() || period.is_some() {
        spec = spec.intensity(max_restarts.unwrap_or(3), secs("period_secs", period, at)?.unwrap_or(Duration::from_secs(5)));
    }
    if let Some(h) = secs("healthy_secs", healthy, at)? {
        spec = spec.healthy_period(h);
    }
    let mut seen = std::collections::HashSet::new();
    for c in children {
        let child = child(ctx, path, c, &mut seen)?;
        spec = spec.child(child);
    }
    Ok(spec)
}

fn child(ctx: &Ctx<'_>, parent: &str, c: ChildToml, seen: &mut std::collections::HashSet<String>) -> Result<ChildSpec, String> {
    let (id, offset, is_pool) = match (&c.pool, &c.supervisor) {
        (Some(p), None) => (p.get_ref().clone(), p.span().start, true),
        (None, Some(s)) => (s.get_ref().clone(), s.span().start, false),
        (Some(p), Some(_)) => {
            return Err(format!("line {}: a child is either `pool = \"id\"` or `supervisor = \"id\"`, not both", ctx.line(p.span().start)))
        }
        (None, None) => return Err("a child needs `pool = \"id\"` or `supervisor = \"id\"`".to_string()),
    };
    let at = format!("line {}: child `{id}`", ctx.line(offset));
    if id.is_empty() || id.contains('/') {
        return Err(format!("{at}: ids must be non-empty and contain no `/`"));
    }
    if !seen.insert(id.clone()) {
        return Err(format!("{at}: duplicate id under the same supervisor"));
    }
    let path = if parent.is_empty() { id.clone() } else { format!("{parent}/{id}") };
    let pool_only = [
        ("script", c.script.is_some()),
        ("module", c.module.is_some()),
        ("python", c.python.is_some()),
        ("args", c.args.is_some()),
        ("env", c.env.is_some()),
        ("cwd", c.cwd.is_some()),
        ("workers", c.workers.is_some()),
        ("min_ready", c.min_ready.is_some()),
        ("max_in_flight", c.max_in_flight.is_some()),
        ("max_queue", c.max_queue.is_some()),
        ("queue_timeout_secs", c.queue_timeout_secs.is_some()),
        ("call_timeout_secs", c.call_timeout_secs.is_some()),
        ("start_timeout_secs", c.start_timeout_secs.is_some()),
        ("confine", c.confine.is_some()),
    ];
    let sup_only = [
        ("strategy", c.strategy.is_some()),
        ("max_restarts", c.max_restarts.is_some()),
        ("period_secs", c.period_secs.is_some()),
        ("healthy_secs", c.healthy_secs.is_some()),
        ("children", !c.children.is_empty()),
    ];
    let wrong = if is_pool { sup_only.iter().find(|f| f.1) } else { pool_only.iter().find(|f| f.1) };
    if let Some((field, _)) = wrong {
        let kind = if is_pool { "a pool" } else { "a supervisor" };
        return Err(format!("{at}: `{field}` does not apply to {kind}"));
    }
    let mut spec = if is_pool {
        let mut p = match (c.script, c.module) {
            (Some(s), None) => PoolSpec::script(if s.is_absolute() { s } else { ctx.base.join(s) }),
            (None, Some(m)) => PoolSpec::module(m),
            _ => return Err(format!("{at}: a pool needs exactly one of `script` or `module`")),
        };
        p = match (c.python, ctx.interpreter) {
            (Some(py), _) => p.python(if py.components().count() > 1 && py.is_relative() { ctx.base.join(py) } else { py }),
            (None, interpreter) => p.interpreter(interpreter.clone()),
        };
        if let Some(a) = c.args {
            p = p.args(a);
        }
        for (k, v) in c.env.unwrap_or_default() {
            p = p.env(k, v);
        }
        if let Some(d) = c.cwd {
            p = p.cwd(if d.is_absolute() { d } else { ctx.base.join(d) });
        }
        if let Some(n) = c.workers {
            p = p.workers(n);
        }
        if let Some(n) = c.min_ready {
            p = p.recycle(RecyclePolicy::default().min_ready(n));
        }
        if let Some(n) = c.max_in_flight {
            p = p.max_in_flight(n);
        }
        if let Some(n) = c.max_queue {
            p = p.max_queue(n);
        }
        if let Some(d) = secs("queue_timeout_secs", c.queue_timeout_secs, &at)? {
            p = p.queue_timeout(d);
        }
        if let Some(d) = secs("call_timeout_secs", c.call_timeout_secs, &at)? {
            p = p.call_timeout(Some(d));
        }
        if let Some(d) = secs("start_timeout_secs", c.start_timeout_secs, &at)? {
            p = p.start_timeout(d);
        }
        if let Some(t) = c.confine {
            p = p.confine(confinement(t, &at)?);
        }
        let sink = ctx.events.clone();
        let event_path = path.clone();
        p = p.on_event(move |e| sink(&event_path, e));
        ChildSpec::pool(id.clone(), p)
    } else {
        let sub = supervisor(ctx, &id, &path, &at, c.strategy, c.max_restarts, c.period_secs, c.healthy_secs, c.children)?;
        ChildSpec::supervisor(id.clone(), sub)
    };
    if let Some(r) = c.restart {
        spec = spec.restart(r);
    }
    match (c.brutal_kill, secs("shutdown_timeout_secs", c.shutdown_timeout_secs, &at)?) {
        (Some(true), Some(_)) => return Err(format!("{at}: `brutal_kill` and `shutdown_timeout_secs` exclude each other")),
        (Some(true), None) => spec = spec.shutdown(Shutdown::Brutal),
        (_, Some(d)) => spec = spec.shutdown(Shutdown::Timeout(d)),
        _ => {}
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<SupervisorSpec, String> {
        parse(s, Path::new("/base"), &Interpreter::Default, std::sync::Arc::new(|_, _| {}))
    }

    #[test]
    fn parses_a_nested_tree() {
        let spec = parse_str(
            r#"
[supervisor]
strategy = "one_for_one"
max_restarts = 2
period_secs = 10

[[supervisor.children]]
pool = "ml"
script = "workers/ml.py"
workers = 2

[[supervisor.children]]
supervisor = "etl"
strategy = "rest_for_one"

  [[supervisor.children.children]]
  pool = "loader"
  module = "etl.loader"
  restart = "transient"
  brutal_kill = true
"#,
        )
        .unwrap();
        assert_eq!(spec.children().len(), 2);
        assert_eq!(spec.children()[1].id(), "etl");
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        let e = parse_str("[supervisor]\nstrategy = \"one_for_one\"\n[[supervisor.children]]\npool = \"a\"\nscript = \"a.py\"\nwokers = 2\n").unwrap_err();
        assert!(e.contains("line 6") && e.contains("wokers"), "{e}");
        let e = parse_str("[supervisor]\nstrategy = \"one_for_one\"\n\n[[supervisor.children]]\npool = \"a\"\n").unwrap_err();
        assert!(e.contains("line 5") && e.contains("`a`") && e.contains("script"), "{e}");
        let e = parse_str("[supervisor]\nstrategy = \"one_for_none\"\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("one_for_none"), "{e}");
        let e = parse_str("[supervisor]\nstrategy = \"one_for_one\"\n[[supervisor.children]]\nsupervisor = \"s\"\nstrategy = \"one_for_one\"\nworkers = 3\n").unwrap_err();
        assert!(e.contains("line 4") && e.contains("`workers` does not apply to a supervisor"), "{e}");
        let e = parse_str("[supervisor]\nstrategy = \"one_for_one\"\n[[supervisor.children]]\nsupervisor = \"s\"\nmin_ready = 1\n").unwrap_err();
        assert!(e.contains("line 4") && e.contains("`min_ready` does not apply to a supervisor"), "{e}");
        parse_str(&format!("{POOL}workers = 3\nmin_ready = 3\n")).unwrap();
        let e = parse_str("[supervisor]\nstrategy = \"one_for_one\"\n[[supervisor.children]]\npool = \"a\"\nscript = \"a\"\n[[supervisor.children]]\npool = \"a\"\nscript = \"b\"\n").unwrap_err();
        assert!(e.contains("line 7") && e.contains("duplicate"), "{e}");
        assert!(parse_str("[supervisor\n").unwrap_err().contains("line 1"));
    }

    #[test]
    fn durations_too_long_for_the_clock_name_the_field() {
        let e = parse_str("[supervisor]\nstrategy = \"one_for_one\"\n[[supervisor.children]]\npool = \"a\"\nscript = \"a.py\"\ncall_timeout_secs = 1e19\n").unwrap_err();
        assert!(e.contains("call_timeout_secs") && e.contains("too long"), "{e}");
        let e = parse_str("[supervisor]\nstrategy = \"one_for_one\"\nperiod_secs = 1e30\n").unwrap_err();
        assert!(e.contains("period_secs"), "{e}");
        let e = parse_str("[supervisor]\nstrategy = \"one_for_one\"\n[[supervisor.children]]\npool = \"a\"\nscript = \"a.py\"\ncall_timeout_secs = -1\n").unwrap_err();
        assert!(e.contains("call_timeout_secs") && e.contains("non-negative"), "{e}");
    }

    const POOL: &str = "[supervisor]\nstrategy = \"one_for_one\"\n[[supervisor.children]]\npool = \"a\"\nscript = \"a.py\"\n";

    #[test]
    fn a_confine_table_sets_every_option() {
        use pyvisor_core::{Limit, Resource};
        let table = "address_space_bytes = 2147483648\nopen_files = 256\ncpu_time_secs = 60\ncore_size_bytes = 0\n\
                     allow_env = [\"PATH\", \"LC_*\"]\nno_new_privs = true\n";
        let c = confinement(toml::from_str(table).unwrap(), "here").unwrap();
        let expected = Confinement::default()
            .limit(Resource::AddressSpace, Limit::fixed(2 << 30))
            .limit(Resource::OpenFiles, Limit::fixed(256))
            .limit(Resource::CpuTime, Limit::new(60, 61))
            .limit(Resource::CoreSize, Limit::fixed(0))
            .allow_env(["PATH", "LC_*"])
            .no_new_privs(true);
        assert_eq!(c, expected);
        let ids = confinement(toml::from_str("deny_env = [\"AWS_*\"]\nuser = 0\ngroup = \"root\"\n").unwrap(), "here");
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(ids.unwrap(), Confinement::default().deny_env(["AWS_*"]).user(0u32).group("root"));
        } else {
            assert!(ids.unwrap_err().contains("needs a parent running as root"));
        }
        // In a file: a sub-table of the child, or an inline table.
        parse_str(&format!("{POOL}[supervisor.children.confine]\n{table}")).unwrap();
        parse_str(&format!("{POOL}confine = {{ deny_env = [\"AWS_*\"] }}\n")).unwrap();
    }

    #[test]
    fn bad_confine_values_name_the_line_and_the_field() {
        let e = parse_str(&format!("{POOL}[supervisor.children.confine]\nopen_flies = 3\n")).unwrap_err();
        assert!(e.contains("open_flies") && e.contains("line 7"), "{e}");
        let e = parse_str(&format!("{POOL}[supervisor.children.confine]\ncpu_time_secs = -1\n")).unwrap_err();
        assert!(e.contains("cpu_time_secs") && e.contains("line 7"), "{e}");
        let e = parse_str(&format!("{POOL}[supervisor.children.confine]\ncpu_time_secs = 0\n")).unwrap_err();
        assert!(e.contains("line 4") && e.contains("`a`") && e.contains("confine.cpu_time"), "{e}");
        let e = parse_str(&format!("{POOL}confine = {{ allow_env = [\"A\"], deny_env = [\"B\"] }}\n")).unwrap_err();
        assert!(e.contains("`a`") && e.contains("allow_env and deny_env"), "{e}");
        let e = parse_str(&format!("{POOL}confine = {{ allow_env = [\"A=B\"] }}\n")).unwrap_err();
        assert!(e.contains("confine.allow_env"), "{e}");
        let e = parse_str(&format!("{POOL}confine = {{ user = \"no-such-user-pyvisor\" }}\n")).unwrap_err();
        assert!(e.contains("confine.user"), "{e}");
        let e = parse_str("[supervisor]\nstrategy = \"one_for_one\"\n[[supervisor.children]]\nsupervisor = \"s\"\nstrategy = \"one_for_one\"\nconfine = { open_files = 3 }\n").unwrap_err();
        assert!(e.contains("`confine` does not apply to a supervisor"), "{e}");
    }
}

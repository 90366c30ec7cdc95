//! `pyvisor`: call a Python function, check an installation, benchmark a pool, run a tree and
//! ask a running one for its status; with the `cluster` feature, run a tree as a node of a
//! cluster (`pyvisor node`).

mod bench;
mod chaos;
mod control;
#[cfg(feature = "cluster")]
mod node;
mod notify;
mod run;
mod status;
mod tree_file;
mod value;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pyvisor_core::{CallOptions, Interpreter, Pool, PoolSpec};

#[derive(Parser)]
#[command(name = "pyvisor", version, about = "Supervised Python worker pools", long_about = None)]
struct Cli {
    /// Python interpreter (default: $PYVISOR_PYTHON, else python3 on PATH).
    #[arg(long, global = true, value_name = "PATH")]
    python: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start one worker running SCRIPT, call FUNCTION with the JSON argument, print the result.
    Call {
        /// Worker script (uses @expose and run_worker()).
        script: PathBuf,
        /// Exposed function name.
        function: String,
        /// The argument, as JSON.
        json: String,
        /// Call timeout in seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Check the interpreter, msgpack and the pyvisor_worker adapter; say what to fix.
    Doctor {
        /// Also start this worker script and list its functions.
        #[arg(long)]
        script: Option<PathBuf>,
    },
    /// Run calls through a pool and report latency, throughput and errors.
    Bench(bench::BenchArgs),
    /// Load a pool while killing random workers; report what was saved and the recovery time.
    Chaos(chaos::ChaosArgs),
    /// Start a supervision tree from a TOML file; show live status until Ctrl-C. SIGHUP rereads
    /// the file and applies what changed (docs/operations.md, "Reload").
    Run {
        /// The tree file (see docs/supervision.md and examples/tree.toml).
        tree: PathBuf,
        /// Serve /healthz, /readyz, /status and /metrics on PORT (127.0.0.1) or IP:PORT
        /// (docs/operations.md, "Endpoints"). Off unless given.
        #[arg(long, value_name = "[IP:]PORT", value_parser = pyvisor_cli::http::parse_addr)]
        http: Option<std::net::SocketAddr>,
        /// Serve `pyvisor status` on this Unix socket instead of the default path
        /// (docs/operations.md, "Status from another shell").
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
    /// Print the tree of a running `pyvisor run` (from another shell), through its control socket.
    Status(status::StatusArgs),
    /// Run a tree from a TOML file as a node of a cluster: as `pyvisor run`, and its pools are
    /// served to the other nodes (docs/cluster.md, "Running nodes").
    #[cfg(feature = "cluster")]
    Node(Box<node::NodeCmd>),
    /// (This build has no multi-node mode: says so.)
    #[cfg(not(feature = "cluster"))]
    #[command(hide = true, disable_help_flag = true)]
    Node {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run { .. } | Command::Node { .. }) {
        // Before any thread starts: it takes systemd's variables out of the environment.
        notify::capture_env();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // Inside the runtime (the gRPC exporter needs it); dropped, and so flushed, before it ends.
    let telemetry = {
        let _enter = rt.enter();
        pyvisor_core::telemetry::init()
    };
    let interpreter = Interpreter::from_option(cli.python);
    let telemetry = std::sync::Arc::new(telemetry);
    let flusher = std::sync::Arc::clone(&telemetry);
    let code = rt.block_on(async move {
        let code = match cli.command {
            Command::Call { script, function, json, timeout } => call(interpreter, script, function, json, timeout).await,
            Command::Doctor { script } => doctor(interpreter, script).await,
            Command::Bench(args) => bench::run(interpreter, args).await,
            Command::Run { tree, http, control } => run::run(interpreter, tree, http, control).await,
            Command::Status(args) => status::run(args).await,
            Command::Chaos(args) => chaos::run(interpreter, args).await,
            #[cfg(feature = "cluster")]
            Command::Node(cmd) => node::run(interpreter, *cmd).await,
            #[cfg(not(feature = "cluster"))]
            Command::Node { .. } => {
                eprintln!("error: `pyvisor node` needs multi-node mode, which this pyvisor was built without: build it with `--features cluster` (cargo install --path crates/pyvisor-cli --features cluster)");
                ExitCode::from(2)
            }
        };
        // Flush while the runtime still drives the exporters (on a blocking thread: the HTTP
        // exporter's flush blocks).
        let _ = tokio::task::spawn_blocking(move || flusher.flush()).await;
        code
    });
    drop(telemetry);
    code
}

fn spec_for(interpreter: &Interpreter, script: PathBuf) -> PoolSpec {
    PoolSpec::script(script).interpreter(interpreter.clone())
}

async fn call(interpreter: Interpreter, script: PathBuf, function: String, json: String, timeout: f64) -> ExitCode {
    let input: serde_json::Value = match serde_json::from_str(&json) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: the argument is not valid JSON: {e}\nexample: pyvisor call worker.py add '[1, 2]'");
            return ExitCode::from(2);
        }
    };
    let payload = match value::json_to_msgpack(&input) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot encode the argument: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(timeout) = Duration::try_from_secs_f64(timeout).ok().filter(|d| !d.is_zero()) else {
        eprintln!("error: --timeout must be a positive number of seconds");
        return ExitCode::from(2);
    };
    let pool = match Pool::start(spec_for(&interpreter, script).name("call").workers(1)).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result = pool.call_raw(&function, &payload, CallOptions::new().timeout(timeout)).await;
    pool.shutdown().await;
    match result {
        Ok(bytes) => match value::msgpack_to_json(&bytes) {
            Ok(v) => {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string()));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: the result is not valid MessagePack: {e}");
                ExitCode::from(1)
            }
        },
        Err(pyvisor_core::CallError::Python { function, error }) => {
            eprintln!("error: `{function}` raised {}: {}", error.type_name, error.message);
            if let Some(tb) = &error.traceback {
                eprintln!("{}", tb.trim_end());
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

const PROBE: &str = r#"
import json, sys
r = {"python": sys.version.split()[0], "executable": sys.executable}
try:
    import msgpack
    r["msgpack"] = ".".join(map(str, msgpack.version))
except Exception as e:
    r["msgpack_error"] = repr(e)
try:
    import pyvisor_worker as p
    r["adapter"] = p.__version__
    r["protocol"] = p.PROTOCOL_VERSION
    try:
        from pyvisor_worker._oob import oob_supported
        r["oob"] = oob_supported()
    except ImportError:
        pass
except Exception as e:
    r["adapter_error"] = repr(e)
print(json.dumps(r))
"#;

async fn doctor(interpreter: Interpreter, script: Option<PathBuf>) -> ExitCode {
    let mut ok = true;
    let configured = interpreter.configured();
    let python = match interpreter.resolve() {
        Ok(p) => {
            println!("ok   interpreter: {}", p.display());
            p
        }
        Err(e) => {
            println!("FAIL {e}");
            return ExitCode::from(1);
        }
    };
    let out = tokio::process::Command::new(&python).arg("-c").arg(PROBE).output().await;
    let info: serde_json::Value = match out {
        Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout).unwrap_or_default(),
        Ok(o) => {
            println!("FAIL {} does not run Python code: {}", configured.display(), String::from_utf8_lossy(&o.stderr).trim());
            return ExitCode::from(1);
        }
        Err(e) => {
            println!("FAIL cannot run {}: {e}", configured.display());
            return ExitCode::from(1);
        }
    };
    let field = |k: &str| info.get(k).and_then(|v| v.as_str().map(str::to_string).or_else(|| v.as_u64().map(|n| n.to_string())));
    println!("ok   python {}", field("python").unwrap_or_default());
    match (field("msgpack"), field("msgpack_error")) {
        (Some(v), _) => println!("ok   msgpack {v}"),
        (_, err) => {
            ok = false;
            println!("FAIL msgpack cannot be imported ({}); fix: {} -m pip install msgpack", err.unwrap_or_default(), python.display());
        }
    }
    match (field("adapter"), field("adapter_error")) {
        (Some(v), _) => {
            println!("ok   pyvisor_worker {v}");
            let proto = info.get("protocol").and_then(serde_json::Value::as_u64);
            if proto != Some(u64::from(pyvisor_core::protocol::PROTOCOL_VERSION)) {
                ok = false;
                println!(
                    "FAIL pyvisor_worker speaks protocol {:?}, this pyvisor speaks {}; fix: reinstall the adapter from this repository ({} -m pip install ./python_adapter)",
                    proto,
                    pyvisor_core::protocol::PROTOCOL_VERSION,
                    python.display()
                );
            } else {
                println!("ok   protocol {}", pyvisor_core::protocol::PROTOCOL_VERSION);
            }
            // Out-of-band buffers need sealed memfds on both sides; without them the same API
            // works in band (docs/buffers.md).
            let worker_oob = info.get("oob").and_then(serde_json::Value::as_bool);
            match (pyvisor_core::memfd_available(), worker_oob) {
                (true, Some(true)) => println!("ok   buffers: out of band (sealed memfds on both sides; BufferPolicy::in_band() turns it off)"),
                (true, None) => println!("note buffers: in band (this pyvisor_worker predates out-of-band buffers; reinstall it for them)"),
                (true, Some(false)) => println!("note buffers: in band (the worker's Python cannot make sealed memfds: old kernel or seccomp); max_frame bounds whole calls"),
                (false, _) => println!("note buffers: in band (this process cannot make sealed memfds: old kernel or seccomp); max_frame bounds whole calls"),
            }
        }
        (_, err) => {
            ok = false;
            println!(
                "FAIL pyvisor_worker cannot be imported ({}); fix: {} -m pip install ./python_adapter (from the pyvisor repository), or point --python / PYVISOR_PYTHON at a venv that has it (make demo creates .venv)",
                err.unwrap_or_default(),
                python.display()
            );
        }
    }
    if let (true, Some(script)) = (ok, script) {
        match Pool::start(spec_for(&interpreter, script.clone()).name("doctor").workers(1)).await {
            Ok(pool) => {
                let names: Vec<String> = pool.functions().into_iter().map(|f| f.name).collect();
                println!("ok   {} starts; exposes: {}", script.display(), names.join(", "));
                pool.shutdown().await;
            }
            Err(e) => {
                ok = false;
                println!("FAIL {} does not start: {e}", script.display());
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

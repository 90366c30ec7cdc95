//! The command-line arguments of a node process ([`NodeArgs`], a clap `Args` struct): the
//! `pyvisor-cluster-node` binary and `pyvisor node` both flatten it, so they take the same
//! flags.
//!
//! Owns turning them into a [`NodeConfig`] and starting the node with its seeds. Not what a
//! node serves (each command's own arguments), not the node (`node`), not redialing (`seeds`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ClusterError;
use crate::node::{Node, NodeConfig};
use crate::seeds::{SeedAddr, SeedPolicy, Seeds};
use crate::tls::NodeTls;
use crate::HeartbeatPolicy;

/// A node's flags: `--name --listen --cookie-file [--join HOST:PORT]... [--heartbeat-ms]
/// [--heartbeat-misses] [--taint-window-ms] [--tls-cert --tls-key --tls-ca
/// [--tls-server-name]]`.
///
/// ```
/// use clap::Parser;
/// use pyvisor_cluster::NodeArgs;
///
/// #[derive(Parser)]
/// struct Cli {
///     #[command(flatten)]
///     node: NodeArgs,
/// }
///
/// let cli = Cli::try_parse_from([
///     "my-node", "--name", "b", "--listen", "127.0.0.1:7401", "--cookie-file", "cookie",
///     "--join", "127.0.0.1:7400", "--join", "node-c.internal:7402",
/// ])?;
/// assert_eq!(cli.node.join.len(), 2);
/// assert_eq!(cli.node.join[1].to_string(), "node-c.internal:7402");
/// // A seed without a port is refused when the flags are read.
/// assert!(Cli::try_parse_from(["my-node", "--name", "b", "--listen", "127.0.0.1:7401", "--cookie-file", "c", "--join", "node-c"]).is_err());
/// assert_eq!(cli.node.heartbeat_ms, 500);
/// # Ok::<(), clap::Error>(())
/// ```
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// The node's name, unique in the cluster (it is known as NAME@IP, the IP of --listen).
    #[arg(long)]
    pub name: String,
    /// Where the node listens for its peers.
    #[arg(long, value_name = "IP:PORT")]
    pub listen: SocketAddr,
    /// A file whose first line is the cluster's cookie (never on the command line).
    #[arg(long, value_name = "PATH")]
    pub cookie_file: PathBuf,
    /// A seed node to join (repeatable): dialed until its session is ready, and again, with
    /// backoff, whenever that session ends. IP:PORT, [IPv6]:PORT or HOST:PORT (a name is
    /// looked up again at each attempt). The node's own address is ignored, so every node may
    /// be given the same list.
    #[arg(long, value_name = "HOST:PORT")]
    pub join: Vec<SeedAddr>,
    /// The port peers open call channels on, on the --listen IP (default: one the system
    /// picks, told to peers over their session). Fix it where a firewall must let it through.
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    pub call_port: u16,
    /// Ping every peer this often (milliseconds) ...
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// ... and give a peer up after this many misses in a row.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub heartbeat_misses: u32,
    /// How long a lost peer stays tainted (milliseconds; 0: never): calls go to it only when
    /// no other member of their pool is left.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub taint_window_ms: u64,
    /// TLS between nodes (mutual): this node's certificate chain (PEM). With --tls-key and
    /// --tls-ca; every node of the cluster then needs TLS.
    #[arg(long, value_name = "PATH", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate(s) that signed every node's certificate (PEM; for a self-signed
    /// certificate, the certificate itself).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// The name every node's certificate is valid for.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    pub tls_server_name: String,
}

impl NodeArgs {
    /// The node's configuration: reads the cookie file and, with TLS, the PEM files.
    pub fn config(&self) -> Result<NodeConfig, ClusterError> {
        let cookie = NodeConfig::cookie_from_file(&self.cookie_file)?;
        let heartbeat = HeartbeatPolicy::new(Duration::from_millis(self.heartbeat_ms), self.heartbeat_misses);
        let mut config =
            NodeConfig::new(&self.name, self.listen, &cookie)?
            .heartbeat(heartbeat)
            .taint_window(Duration::from_millis(self.taint_window_ms))
            .call_port(self.call_port);
        if let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            config = config.tls(NodeTls::from_pem_files(cert, key, ca, &self.tls_server_name)?);
        }
        Ok(config)
    }

    /// Start the node and keep it connected to the `--join` seeds (with the default
    /// [`SeedPolicy`]): [`Seeds::reached`] tells when each has been reached once. Call it
    /// inside a tokio runtime.
    pub async fn start(&self) -> Result<(Node, Seeds), ClusterError> {
        let node = Node::start(self.config()?).await?;
        let seeds = node.join(self.join.iter().cloned(), SeedPolicy::default());
        Ok((node, seeds))
    }
}

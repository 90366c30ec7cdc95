//! TLS between nodes, with a self-signed certificate made here: node A (this test) and node B
//! (a `pyvisor-cluster-node` process) both use it, mutually; B joins A and A's calls run on B.
//! A client that connects to A and never completes a handshake does not stop A from accepting
//! B; a node without TLS, or with a certificate A's CA did not sign, gets no session.

mod common;

use std::path::Path;
use std::time::Duration;

use common::node_process::{scratch, self_signed, Extra, NodeProcess};
use common::{eventually, free_addr};
use pyvisor_cluster::{ClusterError, Node, NodeConfig, NodeTls, RemotePool};
use pyvisor_core::CallOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_over_mutual_tls_and_refuse_peers_without_it() {
    let (dir, cookie, side_log) = scratch("tls");
    let (cert, key) = self_signed(&dir, "cluster");
    let tls = NodeTls::from_pem_files(&cert, &key, &cert, "localhost").expect("TLS settings");
    let a = Node::start(NodeConfig::new("a", free_addr(), "s3cret").expect("config").tls(tls)).await.expect("node a");

    // A client that connects and says nothing, held open while B joins.
    let _silent = std::net::TcpStream::connect(a.listen_addr()).expect("a silent client connects");

    let path = |p: &Path| p.to_string_lossy().into_owned();
    let tls_args = vec!["--tls-cert".into(), path(&cert), "--tls-key".into(), path(&key), "--tls-ca".into(), path(&cert)];
    let _b = NodeProcess::start_with("b", "work", free_addr(), &cookie, &[a.listen_addr()], &side_log, Extra { args: tls_args, ..Extra::default() });
    let work = RemotePool::new(&a, "work");
    assert!(eventually(Duration::from_secs(20), || work.members() == vec!["b@127.0.0.1".to_string()]).await, "{:?}", work.members());
    for i in 0..5u64 {
        let (node, x): (String, u64) = work.call_with("where", &i, CallOptions::new().timeout(Duration::from_secs(20))).await.expect("a call over TLS");
        assert_eq!((node.as_str(), x), ("b", i));
    }

    // A node without TLS: no session (A's listener speaks TLS only).
    let plain = Node::start(NodeConfig::new("plain", free_addr(), "s3cret").expect("config")).await.expect("node plain");
    let refused = plain.connect(a.listen_addr(), Duration::from_secs(15)).await;
    assert!(matches!(refused, Err(ClusterError::Refused { .. } | ClusterError::ConnectTimeout { .. })), "{refused:?}");
    plain.shutdown().await;

    // A node whose certificate A's CA did not sign (and which does not trust A's): no session.
    let (other_cert, other_key) = self_signed(&dir, "other");
    let other_tls = NodeTls::from_pem_files(&other_cert, &other_key, &other_cert, "localhost").expect("TLS settings");
    let other = Node::start(NodeConfig::new("other", free_addr(), "s3cret").expect("config").tls(other_tls)).await.expect("node other");
    let refused = other.connect(a.listen_addr(), Duration::from_secs(15)).await;
    assert!(matches!(refused, Err(ClusterError::Tls { .. })), "{refused:?}");
    other.shutdown().await;

    let peers: Vec<String> = a.peers().into_iter().map(|p| p.name).collect();
    assert_eq!(peers, vec!["b@127.0.0.1".to_string()]);
    a.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreadable_or_empty_tls_files_are_clear_errors() {
    let (dir, _, _) = scratch("tls-files");
    let (cert, key) = self_signed(&dir, "n");
    let missing = dir.join("missing.pem");
    let err = NodeTls::from_pem_files(&missing, &key, &cert, "localhost").expect_err("no such file");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let err = NodeTls::from_pem_files(&cert, &key, &empty, "localhost").expect_err("an empty CA file");
    assert!(err.to_string().contains("no certificate"), "{err}");
    let err = NodeTls::from_pem_files(&cert, &cert, &cert, "localhost").expect_err("a certificate is no key");
    assert!(err.to_string().contains("private key"), "{err}");
    let err = NodeTls::from_pem_files(&cert, &key, &cert, "not a name!").expect_err("a bad server name");
    assert!(matches!(err, ClusterError::InvalidConfig(_)), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

//! Nodes over real TCP on 127.0.0.1: a peer with the same cookie becomes a ready session on
//! both sides; a peer with another cookie is refused and never appears among the peers; a
//! stopped node disappears from its peer's table. (Several nodes in one process: enough for
//! sessions and cookies; what runs on nodes is tested with separate processes.)

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::free_addr;
use pyvisor_cluster::{ClusterError, Node, NodeConfig, NodeEvent};

async fn node(name: &str, cookie: &str) -> Node {
    Node::start(NodeConfig::new(name, free_addr(), cookie).expect("config")).await.expect("node starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_the_same_cookie_connect_and_another_cookie_is_refused() {
    let a = node("a", "s3cret").await;
    let b = node("b", "s3cret").await;
    let c = node("c", "not-the-same").await;
    let guard = Duration::from_secs(10);

    let peer = a.connect(b.listen_addr(), guard).await.expect("same cookie: connected");
    assert_eq!(peer.name, b.name());
    assert!(!peer.inbound);
    assert!(common::eventually(Duration::from_secs(10), || b.peers().iter().any(|p| p.name == a.name() && p.inbound)).await, "b sees a: {:?}", b.peers());

    let mut c_events = c.events();
    match a.connect(c.listen_addr(), guard).await {
        Err(ClusterError::Refused { addr }) => assert_eq!(addr, c.listen_addr()),
        other => panic!("another cookie must be refused, got {other:?}"),
    }
    assert_eq!(a.peers().iter().map(|p| p.name.clone()).collect::<Vec<_>>(), vec![b.name().to_string()]);
    assert!(c.peers().is_empty(), "c never authenticated a: {:?}", c.peers());
    // c saw a connection that never became a session.
    let mut saw = Vec::new();
    while let Ok(e) = c_events.try_recv() {
        saw.push(e);
    }
    assert!(!saw.iter().any(|e| matches!(e, NodeEvent::Authenticated { .. } | NodeEvent::Ready { .. })), "{saw:?}");

    // A node that stops leaves its peers' tables.
    b.shutdown().await;
    assert!(common::eventually(Duration::from_secs(10), || a.peers().is_empty()).await, "a still lists {:?}", a.peers());
    a.shutdown().await;
    c.shutdown().await;
}

#[tokio::test]
async fn bad_settings_and_unreachable_peers_are_clear_errors() {
    let addr: SocketAddr = "127.0.0.1:7400".parse().expect("addr");
    assert!(matches!(NodeConfig::new("", addr, "x"), Err(ClusterError::InvalidConfig(_))));
    assert!(matches!(NodeConfig::new("a@b", addr, "x"), Err(ClusterError::InvalidConfig(_))));
    assert!(matches!(NodeConfig::new("a", addr, ""), Err(ClusterError::InvalidConfig(_))));
    assert!(matches!(NodeConfig::new("a", "127.0.0.1:0".parse().expect("addr"), "x"), Err(ClusterError::InvalidConfig(_))));
    // The cookie never shows in a config's Debug.
    assert!(!format!("{:?}", NodeConfig::new("a", addr, "hush").expect("config")).contains("hush"));

    let dir = std::env::temp_dir().join(format!("pyvisor-cookie-{}", std::process::id()));
    std::fs::write(&dir, "  from-a-file \nsecond line\n").expect("write");
    assert_eq!(NodeConfig::cookie_from_file(&dir).expect("read"), "from-a-file");
    std::fs::write(&dir, "\n").expect("write");
    assert!(matches!(NodeConfig::cookie_from_file(&dir), Err(ClusterError::InvalidConfig(_))));
    let _ = std::fs::remove_file(&dir);

    // Nothing listening there.
    let a = node("lonely", "x").await;
    let nobody = free_addr();
    assert!(matches!(a.connect(nobody, Duration::from_secs(5)).await, Err(ClusterError::Connect { .. })));
    // Its own address is taken.
    let taken = Node::start(NodeConfig::new("twin", a.listen_addr(), "x").expect("config")).await;
    assert!(matches!(taken, Err(ClusterError::Bind { .. })), "{:?}", taken.err());
    // A call port fixed by configuration is the one it listens on; one that is taken (here,
    // `a`'s) is a clear error, and the node does not start.
    let port = free_addr().port();
    let fixed = Node::start(NodeConfig::new("fixed", free_addr(), "x").expect("config").call_port(port)).await.expect("node starts");
    assert_eq!(fixed.call_addr().port(), port);
    let clash = Node::start(NodeConfig::new("clash", free_addr(), "x").expect("config").call_port(a.call_addr().port())).await;
    assert!(matches!(&clash, Err(ClusterError::Bind { detail, .. }) if detail.contains("call port")), "{:?}", clash.err());
    fixed.shutdown().await;
    a.shutdown().await;
}

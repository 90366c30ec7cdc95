//! Helpers shared by the cluster tests.

pub mod node_process;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// A port free on 127.0.0.1 a moment ago (a node binds it right after).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr")
}

/// Wait (a guard, not a timing claim) up to `guard` until `f` holds; whether it does.
pub async fn eventually(guard: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = tokio::time::Instant::now() + guard;
    while tokio::time::Instant::now() < until {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

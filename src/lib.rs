pub use pyvisor_core::*;

/// Multi-node mode (feature `cluster`): nodes, cookies, sessions. See docs/cluster.md.
#[cfg(feature = "cluster")]
pub use pyvisor_cluster as cluster;

/// The code blocks of docs/typed_handles_and_tower.md, compiled as doctests so the page cannot
/// drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../docs/typed_handles_and_tower.md")]
pub struct TypedHandlesAndTowerDoc;

//! The registry of a tree: paths (`"etl/loader"`) to what runs there now. Shared by every
//! supervisor of one tree; read by `Tree::pool` and `Tree::subtree`. Owns nothing that runs.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ractor::ActorCell;

use crate::pool::Pool;

/// What the registry knows at a path.
#[derive(Clone)]
pub(crate) enum Registered {
    Pool(Pool),
    /// A nested supervisor (its actor; tree handles type it).
    Supervisor(ActorCell),
}

/// Paths of a tree (`"etl/loader"`) to the pools and supervisors running there now.
pub(crate) type Registry = Arc<RwLock<HashMap<String, Registered>>>;

/// The path of child `id` under `prefix`.
pub(crate) fn join_path(prefix: &str, id: &str) -> String {
    if prefix.is_empty() {
        id.to_string()
    } else {
        format!("{prefix}/{id}")
    }
}

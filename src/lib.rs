pub use pyvisor_core::*;

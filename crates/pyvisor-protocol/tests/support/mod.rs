//! Shared by the protocol crate's test binaries and its `fuzz` example.
#![allow(dead_code)]

pub mod alloc;
pub mod harness;

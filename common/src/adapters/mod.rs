//! Adapters: one module per backing technology, each implementing a port of `crate::ports`.

pub mod embedded;
pub mod kafka;
pub mod scylla;

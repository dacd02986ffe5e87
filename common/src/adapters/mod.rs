//! Adapters: one module per backing technology, each implementing a port of `crate::ports`.

pub mod embedded;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "scylla")]
pub mod scylla;

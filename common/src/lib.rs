//! Shared code of msghash, the content-addressed message store.
//!
//! Layout, in the order a request meets it:
//! - [`digest`]: the `Digest` newtype (SHA-256, parsed only from 64 hex characters);
//! - [`event`]: the `MessageHashed` event and its versioned JSON envelope;
//! - [`partition`]: the pure digest → partition function every service agrees on;
//! - [`ports`]: the `EventLog`, `ReadModel` and `ModelGenerations` traits the services
//!   depend on; [`generation`]: the read-model handle that follows the active generation;
//! - [`adapters`]: their implementations (Kafka through rdkafka, ScyllaDB through scylla);
//! - [`http`]: the error type and its single mapping to HTTP, bounded JSON bodies, the TLS
//!   server; [`tls`]: certificates; [`config`]: flags and `MSGHASH_*` variables;
//!   [`telemetry`]: logging; [`metrics`]: Prometheus metrics, `/metrics`, the request
//!   observer; [`shutdown`]: the signal-driven cancellation token; [`service`]: the
//!   `Application` shape every service has, its `main` and exit code; [`console`]: what the
//!   binaries print, without a panic when it cannot be written.

pub mod adapters;
pub mod config;
pub mod console;
pub mod digest;
pub mod event;
pub mod generation;
pub mod http;
pub mod metrics;
pub mod partition;
pub mod ports;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use digest::Digest;
pub use event::MessageHashed;
pub use partition::partition_for;
pub use ports::{
    EventLog, Generation, GenerationState, LogError, ModelError, ModelGenerations, Offset,
    ProjectionBatch, ReadModel,
};

//! Test support shared by every crate's tests, so that no test file carries its own copy:
//!
//! - [`servers`]: the real Apache Kafka broker and Apache Cassandra node that `scripts/test`
//!   starts once per run, and unique topic and keyspace names that keep tests apart on them;
//! - [`router`]: calling an axum router in process and scraping its `/metrics`;
//! - [`exposition`]: reading the Prometheus text format strictly;
//! - [`fakes`]: a read model that knows only its applied offsets, for unit tests;
//! - [`load`]: readers and a writer hammering a router while something else happens;
//! - [`process`]: a service binary run as its own process on port 0;
//! - [`stack`]: `scripts/dev-stack` (single or `--cluster`) run by a test;
//! - [`slow`]: slow clients that trickle a request head or body a byte at a time;
//! - [`tmpfs`]: a small tmpfs to fill until a write fails (the disk-full tests).
//!
//! A test that needs a server and finds none fails with a line saying how to get one; it is
//! never skipped.

pub mod exposition;
pub mod fakes;
pub mod files;
pub mod load;
pub mod process;
pub mod router;
pub mod servers;
pub mod slow;
pub mod stack;
pub mod tmpfs;

//! # cql-server: an in-memory ScyllaDB stand-in for tests
//!
//! A small CQL server speaking native protocol **v4**, good enough for the
//! real `scylla` Rust driver (1.x) to connect, create keyspaces and tables,
//! prepare and execute statements, page through tables and run batches.
//! It is **test infrastructure only**: single node, in memory, no
//! persistence, no authentication, loopback addresses only.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let server = cql_server::start("127.0.0.1:0").await?;
//! let addr = server.local_addr(); // give this to SessionBuilder::known_node
//! // ... run the test ...
//! drop(server); // or server.shutdown().await
//! # Ok(()) }
//! ```
//!
//! ## How it relates to kassandra
//!
//! The [`kassandra`](https://crates.io/crates/kassandra) crate (pinned to
//! 0.14.0) is embedded as the engine: its `KvEngine<Memory>` stores the rows,
//! its catalog keeps the schema and fills the `system` / `system_schema`
//! tables the driver reads, and its row encoder writes result values.
//! kassandra has no server loop of its own, and the layers between the wire
//! and the engine had the bugs that broke the driver, so this crate replaces
//! them:
//!
//! * **Prepared metadata.** kassandra reported every `WHERE`/`VALUES` entry,
//!   literals included, as a bind variable, so the driver could not execute
//!   its own `SELECT ... FROM system.local WHERE key='local'` and failed
//!   after DDL with an "empty peers" error. Here only real `?` / `:name`
//!   markers are variables, partition key indexes are correct and result
//!   metadata matches what EXECUTE returns. No special `SessionBuilder`
//!   settings are needed.
//! * **Strict parsing.** kassandra's parser accepted a prefix of a statement
//!   and dropped the rest (so `WHERE k IN (...)` silently became a full
//!   scan). The parser here either understands the whole statement or
//!   returns a `SyntaxError` / `Invalid` error naming the unsupported
//!   feature. kassandra's parser, planner and executors are therefore not
//!   used; statements run directly against its engine.
//! * **Semantics.** NULL writes delete the column (kassandra kept the old
//!   value) and read back as NULL; `pk = ? AND ck = ?` returns one row
//!   (kassandra returned every row from `ck` on); restrictions on non-key
//!   columns need `ALLOW FILTERING` and are then really applied; deleting a
//!   whole partition vs. one row is explicit; unpaged reads return every row
//!   (kassandra stopped at 100); paging uses its own opaque state;
//!   `IF NOT EXISTS` on an existing keyspace/table is a no-op `Void` result.
//! * **Robustness.** Frames are decoded with bounds checks; bad bodies get a
//!   `ProtocolError` frame and the connection keeps working; a bad header
//!   (wrong version, absurd length) gets an error frame and closes only that
//!   connection. Any panic inside request handling is caught and returned as
//!   a `ServerError` frame; the global lock recovers from poisoning.
//! * **Driver bookkeeping.** `system.local` carries a parseable token,
//!   partitioner, `rpc_address` and a fixed `schema_version` (so schema
//!   agreement succeeds at once); `system_schema.columns.type` strings are
//!   corrected (kassandra wrote `bool`).
//!
//! ## Supported
//!
//! `CREATE KEYSPACE [IF NOT EXISTS]`, `CREATE TABLE [IF NOT EXISTS]` (simple,
//! composite and clustering keys; `WITH` options accepted and ignored),
//! `DROP TABLE [IF EXISTS]`, `USE`, `TRUNCATE`, `INSERT [IF NOT EXISTS]`,
//! `UPDATE ... SET c = v [IF EXISTS]`, `DELETE [cols] ... [IF EXISTS]`
//! (whole partition or full primary key), `SELECT` with `*`, column lists, aliases, `COUNT(*)`,
//! `DISTINCT`, `=`/`IN` on the partition key, `=`/`<`/`>`/`<=`/`>=`/`IN` on
//! clustering columns, other columns with `ALLOW FILTERING`, `LIMIT`,
//! `token(<partition key>)` as selector and in `=`/`<`/`>`/`<=`/`>=`
//! restrictions against `token(...)` or a bigint (Murmur3Partitioner tokens,
//! see the `token` module; full scans of user tables return partitions in
//! token order, so `token(k) > token(?)` cursors page correctly),
//! `ORDER BY <clustering> ASC`; QUERY, PREPARE, EXECUTE and BATCH (logged
//! and unlogged) requests; paging; named values. Types: ascii, bigint, blob,
//! boolean, date, double, float, inet, int, smallint, text/varchar, time,
//! timestamp, timeuuid, tinyint, uuid and list/set/map of those.
//!
//! ## Not supported (clear error instead)
//!
//! `USING TTL` / `USING TIMESTAMP` (writes apply in arrival order; the
//! protocol-level default timestamp is ignored), LWT conditions other than
//! `IF [NOT] EXISTS`, counters, `DROP` other than `DROP TABLE`, `ALTER`,
//! `BEGIN BATCH` text batches, user types, tuples, decimal/varint/duration,
//! secondary indexes,
//! materialized views, functions and aggregates other than `COUNT(*)`,
//! `ORDER BY ... DESC` / `CLUSTERING ORDER ... DESC`, `SELECT JSON`,
//! `GROUP BY`, `PER PARTITION LIMIT`, `token(...) IN`, range deletes, compression,
//! authentication, TLS, events (REGISTER is accepted, no events are pushed).
//! Consistency levels are accepted and ignored (there is one replica).

mod cql;
mod db;
mod proto;
mod server;
mod token;

pub use server::{start, Server};

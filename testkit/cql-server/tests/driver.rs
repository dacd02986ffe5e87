//! The real `scylla` 1.x driver against `cql_server::start("127.0.0.1:0")`.

use std::collections::{BTreeMap, BTreeSet};

use cql_server::Server;
use futures::{future::try_join_all, TryStreamExt};
use scylla::{
    client::{session::Session, session_builder::SessionBuilder},
    statement::{batch::Batch, prepared::PreparedStatement, Consistency, Statement},
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const CREATE_KEYSPACE: &str = "CREATE KEYSPACE IF NOT EXISTS msghash WITH replication = \
     {'class': 'SimpleStrategy', 'replication_factor': 1}";

async fn start() -> Result<(Server, Session), Box<dyn std::error::Error + Send + Sync>> {
    let server = cql_server::start("127.0.0.1:0").await?;
    let session = connect(&server).await?;
    Ok((server, session))
}

/// A plain `SessionBuilder`: no special settings are needed.
async fn connect(server: &Server) -> Result<Session, Box<dyn std::error::Error + Send + Sync>> {
    Ok(SessionBuilder::new()
        .known_node(server.local_addr().to_string())
        .build()
        .await?)
}

async fn create_schema(session: &Session, suffix: &str) -> TestResult {
    session.query_unpaged(CREATE_KEYSPACE, ()).await?;
    session.query_unpaged(CREATE_KEYSPACE, ()).await?;
    for ddl in [
        "CREATE TABLE IF NOT EXISTS msghash.messages{} (digest blob PRIMARY KEY, message text)",
        "CREATE TABLE IF NOT EXISTS msghash.projection_offsets{} (partition int PRIMARY KEY, applied_offset bigint)",
        "CREATE TABLE IF NOT EXISTS msghash.meta{} (name text PRIMARY KEY, value text)",
    ] {
        let ddl = ddl.replace("{}", suffix);
        session.query_unpaged(ddl.as_str(), ()).await?;
        // Second run is a no-op.
        session.query_unpaged(ddl.as_str(), ()).await?;
    }
    Ok(())
}

async fn prepare(
    session: &Session,
    cql: &str,
    consistency: Consistency,
) -> Result<PreparedStatement, Box<dyn std::error::Error + Send + Sync>> {
    let mut p = session.prepare(cql).await?;
    p.set_is_idempotent(true);
    p.set_consistency(consistency);
    Ok(p)
}

fn digest(i: u32) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[..4].copy_from_slice(&i.to_be_bytes());
    d[31] = 0xAB;
    d
}

#[tokio::test]
async fn session_builds_with_default_builder_and_reads_system_local() -> TestResult {
    let (_server, session) = start().await?;
    let rows = session
        .query_unpaged(
            "SELECT cluster_name, data_center FROM system.local WHERE key = 'local'",
            (),
        )
        .await?
        .into_rows_result()?;
    let (cluster, dc) = rows.single_row::<(String, String)>()?;
    assert_eq!(cluster, "cql-server");
    assert_eq!(dc, "datacenter1");
    // The driver's own prepared statement on system.local works (no markers).
    let p = session
        .prepare("SELECT host_id, rpc_address, data_center, rack, tokens, cluster_name FROM system.local WHERE key='local'")
        .await?;
    assert_eq!(p.get_variable_col_specs().len(), 0);
    let n = session
        .execute_unpaged(&p, ())
        .await?
        .into_rows_result()?
        .rows_num();
    assert_eq!(n, 1);
    Ok(())
}

#[tokio::test]
async fn ddl_is_idempotent_and_schema_agreement_succeeds() -> TestResult {
    let (_server, session) = start().await?;
    create_schema(&session, "").await?;
    create_schema(&session, "_g2").await?;
    session.await_schema_agreement().await?;
    session.refresh_metadata().await?;
    let state = session.get_cluster_state();
    let ks = state
        .get_keyspace("msghash")
        .ok_or("keyspace missing from metadata")?;
    for table in [
        "messages",
        "projection_offsets",
        "meta",
        "messages_g2",
        "meta_g2",
    ] {
        assert!(
            ks.tables.contains_key(table),
            "{table} missing: {:?}",
            ks.tables.keys()
        );
    }
    let messages = &ks.tables["messages"];
    assert_eq!(messages.partition_key, vec!["digest".to_owned()]);
    // CREATE without IF NOT EXISTS on an existing table is an error.
    let err = session
        .query_unpaged(
            "CREATE TABLE msghash.meta (name text PRIMARY KEY, value text)",
            (),
        )
        .await;
    assert!(err.is_err());
    Ok(())
}

#[tokio::test]
async fn messages_round_trip_with_prepared_statements() -> TestResult {
    let (_server, session) = start().await?;
    create_schema(&session, "").await?;
    let insert = prepare(
        &session,
        "INSERT INTO msghash.messages (digest, message) VALUES (?, ?)",
        Consistency::LocalQuorum,
    )
    .await?;
    assert_eq!(insert.get_variable_col_specs().len(), 2);
    let select = prepare(
        &session,
        "SELECT message FROM msghash.messages WHERE digest = ?",
        Consistency::One,
    )
    .await?;
    assert_eq!(select.get_variable_col_specs().len(), 1);
    assert_eq!(select.get_variable_pk_indexes().len(), 1);

    let samples = ["hello", "", "héllo 🌍 日本", "quote ' and \"double\""];
    for (i, msg) in samples.iter().enumerate() {
        session
            .execute_unpaged(&insert, (digest(i as u32), msg.to_string()))
            .await?;
    }
    for (i, msg) in samples.iter().enumerate() {
        let rows = session
            .execute_unpaged(&select, (digest(i as u32),))
            .await?
            .into_rows_result()?;
        let (got,) = rows.single_row::<(String,)>()?;
        assert_eq!(got.as_bytes(), msg.as_bytes());
    }
    let rows = session
        .execute_unpaged(&select, (digest(999),))
        .await?
        .into_rows_result()?;
    assert_eq!(rows.maybe_first_row::<(String,)>()?, None);
    Ok(())
}

#[tokio::test]
async fn projection_offsets_upsert_and_full_scan() -> TestResult {
    let (_server, session) = start().await?;
    create_schema(&session, "").await?;
    let insert = prepare(
        &session,
        "INSERT INTO msghash.projection_offsets (partition, applied_offset) VALUES (?, ?)",
        Consistency::LocalQuorum,
    )
    .await?;
    let select_one = prepare(
        &session,
        "SELECT applied_offset FROM msghash.projection_offsets WHERE partition = ?",
        Consistency::LocalQuorum,
    )
    .await?;
    let select_all = prepare(
        &session,
        "SELECT partition, applied_offset FROM msghash.projection_offsets",
        Consistency::One,
    )
    .await?;

    for p in 0..8i32 {
        session
            .execute_unpaged(&insert, (p, 100i64 + p as i64))
            .await?;
    }
    // Upsert: the second insert overwrites.
    session.execute_unpaged(&insert, (3i32, i64::MAX)).await?;
    session.execute_unpaged(&insert, (-5i32, -1i64)).await?;

    let (offset,) = session
        .execute_unpaged(&select_one, (3i32,))
        .await?
        .into_rows_result()?
        .single_row::<(i64,)>()?;
    assert_eq!(offset, i64::MAX);
    let none = session
        .execute_unpaged(&select_one, (42i32,))
        .await?
        .into_rows_result()?;
    assert_eq!(none.rows_num(), 0);

    let all: BTreeMap<i32, i64> = session
        .execute_unpaged(&select_all, ())
        .await?
        .into_rows_result()?
        .rows::<(i32, i64)>()?
        .collect::<Result<_, _>>()?;
    let mut expected: BTreeMap<i32, i64> = (0..8).map(|p| (p, 100 + p as i64)).collect();
    expected.insert(3, i64::MAX);
    expected.insert(-5, -1);
    assert_eq!(all, expected);
    Ok(())
}

#[tokio::test]
async fn meta_text_key_value() -> TestResult {
    let (_server, session) = start().await?;
    create_schema(&session, "").await?;
    let insert = prepare(
        &session,
        "INSERT INTO msghash.meta (name, value) VALUES (?, ?)",
        Consistency::LocalQuorum,
    )
    .await?;
    let select = prepare(
        &session,
        "SELECT value FROM msghash.meta WHERE name = ?",
        Consistency::LocalQuorum,
    )
    .await?;
    session
        .execute_unpaged(&insert, ("schema_version", "1"))
        .await?;
    session
        .execute_unpaged(&insert, ("schema_version", "2"))
        .await?;
    session.execute_unpaged(&insert, ("ünïcode 🌍", "")).await?;
    let get = |name: &'static str| {
        let session = &session;
        let select = &select;
        async move {
            session
                .execute_unpaged(select, (name,))
                .await?
                .into_rows_result()?
                .maybe_first_row::<(String,)>()
                .map(|r| r.map(|(v,)| v))
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        }
    };
    assert_eq!(get("schema_version").await?.as_deref(), Some("2"));
    assert_eq!(get("ünïcode 🌍").await?.as_deref(), Some(""));
    assert_eq!(get("missing").await?, None);
    let all = session
        .query_unpaged("SELECT name, value FROM msghash.meta", ())
        .await?
        .into_rows_result()?
        .rows::<(String, String)>()?
        .count();
    assert_eq!(all, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_prepared_inserts_and_selects() -> TestResult {
    let (_server, session) = start().await?;
    create_schema(&session, "").await?;
    let insert = prepare(
        &session,
        "INSERT INTO msghash.messages (digest, message) VALUES (?, ?)",
        Consistency::LocalQuorum,
    )
    .await?;
    let select = prepare(
        &session,
        "SELECT message FROM msghash.messages WHERE digest = ?",
        Consistency::LocalQuorum,
    )
    .await?;
    // Each future inserts then reads back its own row; all run at once.
    try_join_all((0..1000u32).map(|i| {
        let session = &session;
        let (insert, select) = (&insert, &select);
        async move {
            let msg = format!("message #{i} ✓");
            session
                .execute_unpaged(insert, (digest(i), msg.clone()))
                .await?;
            let (got,) = session
                .execute_unpaged(select, (digest(i),))
                .await?
                .into_rows_result()?
                .single_row::<(String,)>()?;
            assert_eq!(got, msg);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }
    }))
    .await?;
    let count = session
        .query_unpaged("SELECT COUNT(*) FROM msghash.messages", ())
        .await?
        .into_rows_result()?
        .single_row::<(i64,)>()?
        .0;
    assert_eq!(count, 1000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_at_once() -> TestResult {
    let server = cql_server::start("127.0.0.1:0").await?;
    let (a, b) = tokio::try_join!(connect(&server), connect(&server))?;
    create_schema(&a, "").await?;
    let insert_a = prepare(
        &a,
        "INSERT INTO msghash.projection_offsets (partition, applied_offset) VALUES (?, ?)",
        Consistency::LocalQuorum,
    )
    .await?;
    let insert_b = prepare(
        &b,
        "INSERT INTO msghash.projection_offsets (partition, applied_offset) VALUES (?, ?)",
        Consistency::LocalQuorum,
    )
    .await?;
    let writes_a = try_join_all((0..200i32).map(|p| a.execute_unpaged(&insert_a, (p, p as i64))));
    let writes_b = try_join_all((200..400i32).map(|p| b.execute_unpaged(&insert_b, (p, p as i64))));
    tokio::try_join!(writes_a, writes_b)?;
    for session in [&a, &b] {
        let rows: Vec<(i32, i64)> = session
            .query_iter(
                "SELECT partition, applied_offset FROM msghash.projection_offsets",
                (),
            )
            .await?
            .rows_stream::<(i32, i64)>()?
            .try_collect()
            .await?;
        assert_eq!(rows.len(), 400);
        assert!(rows.iter().all(|(p, o)| *p as i64 == *o));
    }
    Ok(())
}

#[tokio::test]
async fn paged_full_table_reads_return_every_row() -> TestResult {
    let (_server, session) = start().await?;
    create_schema(&session, "").await?;
    let insert = prepare(
        &session,
        "INSERT INTO msghash.messages (digest, message) VALUES (?, ?)",
        Consistency::One,
    )
    .await?;
    let n = 3500u32;
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        try_join_all(
            chunk
                .iter()
                .map(|&i| session.execute_unpaged(&insert, (digest(i), i.to_string()))),
        )
        .await?;
    }
    let expected: BTreeSet<(Vec<u8>, String)> =
        (0..n).map(|i| (digest(i), i.to_string())).collect();

    // Small pages through an unprepared statement.
    let mut stmt = Statement::new("SELECT digest, message FROM msghash.messages");
    stmt.set_page_size(97);
    let rows: BTreeSet<(Vec<u8>, String)> = session
        .query_iter(stmt, ())
        .await?
        .rows_stream::<(Vec<u8>, String)>()?
        .try_collect()
        .await?;
    assert_eq!(rows, expected);

    // Default page size (5000) through a prepared statement.
    let all = session
        .prepare("SELECT digest, message FROM msghash.messages")
        .await?;
    let rows: Vec<(Vec<u8>, String)> = session
        .execute_iter(all.clone(), ())
        .await?
        .rows_stream::<(Vec<u8>, String)>()?
        .try_collect()
        .await?;
    assert_eq!(rows.len(), n as usize);
    assert_eq!(rows.into_iter().collect::<BTreeSet<_>>(), expected);

    // Unpaged reads return everything too.
    let unpaged = session
        .execute_unpaged(&all, ())
        .await?
        .into_rows_result()?;
    assert_eq!(unpaged.rows_num(), n as usize);

    // LIMIT across pages.
    let mut limited = Statement::new("SELECT digest FROM msghash.messages LIMIT 250");
    limited.set_page_size(100);
    let count = session
        .query_iter(limited, ())
        .await?
        .rows_stream::<(Vec<u8>,)>()?
        .try_collect::<Vec<_>>()
        .await?
        .len();
    assert_eq!(count, 250);
    Ok(())
}

#[tokio::test]
async fn clustering_keys_nulls_deletes_and_batches() -> TestResult {
    let (_server, session) = start().await?;
    session.query_unpaged(CREATE_KEYSPACE, ()).await?;
    session
        .query_unpaged(
            "CREATE TABLE msghash.events (stream text, seq bigint, kind text, body blob, \
             PRIMARY KEY (stream, seq)) WITH CLUSTERING ORDER BY (seq ASC)",
            (),
        )
        .await?;
    let insert = prepare(
        &session,
        "INSERT INTO msghash.events (stream, seq, kind, body) VALUES (?, ?, ?, ?)",
        Consistency::LocalQuorum,
    )
    .await?;
    let mut batch = Batch::default();
    for _ in 0..20 {
        batch.append_statement(insert.clone());
    }
    let values: Vec<(String, i64, Option<String>, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                (if i % 2 == 0 { "a" } else { "b" }).to_owned(),
                i as i64,
                Some(format!("k{i}")),
                vec![i as u8],
            )
        })
        .collect();
    session.batch(&batch, values).await?;

    // Exact clustering key -> exactly one row (kassandra returned a range).
    let one = session
        .query_unpaged(
            "SELECT seq, kind FROM msghash.events WHERE stream = ? AND seq = ?",
            ("a", 4i64),
        )
        .await?
        .into_rows_result()?
        .rows::<(i64, Option<String>)>()?
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(one, vec![(4, Some("k4".to_owned()))]);

    // Range on the clustering column, in clustering order.
    let range: Vec<i64> = session
        .query_unpaged(
            "SELECT seq FROM msghash.events WHERE stream = 'a' AND seq >= 6 AND seq < 12",
            (),
        )
        .await?
        .into_rows_result()?
        .rows::<(i64,)>()?
        .map(|r| r.map(|(s,)| s))
        .collect::<Result<_, _>>()?;
    assert_eq!(range, vec![6, 8, 10]);

    // NULL overwrites (deletes) the column and reads back as NULL.
    session
        .execute_unpaged(&insert, ("a", 4i64, None::<String>, vec![9u8]))
        .await?;
    let (kind,) = session
        .query_unpaged(
            "SELECT kind FROM msghash.events WHERE stream = 'a' AND seq = 4",
            (),
        )
        .await?
        .into_rows_result()?
        .single_row::<(Option<String>,)>()?;
    assert_eq!(kind, None);

    // Row delete, then partition delete.
    session
        .query_unpaged(
            "DELETE FROM msghash.events WHERE stream = 'a' AND seq = 0",
            (),
        )
        .await?;
    let count = |stream: &'static str| {
        let session = &session;
        async move {
            Ok::<i64, Box<dyn std::error::Error + Send + Sync>>(
                session
                    .query_unpaged(
                        "SELECT COUNT(*) FROM msghash.events WHERE stream = ?",
                        (stream,),
                    )
                    .await?
                    .into_rows_result()?
                    .single_row::<(i64,)>()?
                    .0,
            )
        }
    };
    assert_eq!(count("a").await?, 9);
    session
        .query_unpaged("DELETE FROM msghash.events WHERE stream = 'b'", ())
        .await?;
    assert_eq!(count("b").await?, 0);
    assert_eq!(count("a").await?, 9);

    // IN on the partition key.
    let n = session
        .query_unpaged(
            "SELECT seq FROM msghash.events WHERE stream IN ('a', 'b', 'zz')",
            (),
        )
        .await?
        .into_rows_result()?
        .rows_num();
    assert_eq!(n, 9);

    // TRUNCATE empties the table.
    session.query_unpaged("TRUNCATE msghash.events", ()).await?;
    assert_eq!(count("a").await?, 0);
    Ok(())
}

#[tokio::test]
async fn use_keyspace_lwt_and_update() -> TestResult {
    let (_server, session) = start().await?;
    create_schema(&session, "").await?;
    session.use_keyspace("msghash", false).await?;
    let lwt = session
        .prepare("INSERT INTO meta (name, value) VALUES (?, ?) IF NOT EXISTS")
        .await?;
    let first = session
        .execute_unpaged(&lwt, ("owner", "a"))
        .await?
        .into_rows_result()?;
    let (applied,) = first.first_row::<(bool,)>()?;
    assert!(applied);
    let second = session
        .execute_unpaged(&lwt, ("owner", "b"))
        .await?
        .into_rows_result()?;
    let (applied, _name, value) = second.first_row::<(bool, Option<String>, Option<String>)>()?;
    assert!(!applied);
    assert_eq!(value.as_deref(), Some("a"));

    session
        .query_unpaged("UPDATE meta SET value = ? WHERE name = ?", ("c", "owner"))
        .await?;
    let (value,) = session
        .query_unpaged("SELECT value FROM meta WHERE name = 'owner'", ())
        .await?
        .into_rows_result()?
        .single_row::<(String,)>()?;
    assert_eq!(value, "c");
    Ok(())
}

#[tokio::test]
async fn drop_table_removes_table_rows_and_metadata() -> TestResult {
    let (_server, session) = start().await?;
    create_schema(&session, "").await?;
    session
        .query_unpaged("CREATE TABLE msghash.t (k int PRIMARY KEY, v text)", ())
        .await?;
    let insert = prepare(
        &session,
        "INSERT INTO msghash.t (k, v) VALUES (?, ?)",
        Consistency::One,
    )
    .await?;
    for k in 0..3i32 {
        session
            .execute_unpaged(&insert, (k, format!("v{k}")))
            .await?;
    }
    let select = prepare(&session, "SELECT k, v FROM msghash.t", Consistency::One).await?;
    assert_eq!(
        session
            .execute_unpaged(&select, ())
            .await?
            .into_rows_result()?
            .rows_num(),
        3
    );

    session
        .query_unpaged("DROP TABLE IF EXISTS msghash.t", ())
        .await?;
    let err = session
        .query_unpaged("SELECT * FROM msghash.t", ())
        .await
        .err()
        .ok_or("SELECT on a dropped table should fail")?;
    assert!(
        err.to_string().contains("unconfigured table msghash.t"),
        "{err}"
    );
    // Statements prepared before the drop fail too (the driver re-prepares).
    for err in [
        session.execute_unpaged(&select, ()).await.err(),
        session.execute_unpaged(&insert, (9, "x")).await.err(),
    ] {
        let err = err.ok_or("a statement prepared on a dropped table should fail")?;
        assert!(
            err.to_string().contains("unconfigured table msghash.t"),
            "{err}"
        );
    }
    // The driver's schema metadata no longer has the table.
    session.refresh_metadata().await?;
    let state = session.get_cluster_state();
    let ks = state
        .get_keyspace("msghash")
        .ok_or("keyspace missing from metadata")?;
    assert!(!ks.tables.contains_key("t"), "{:?}", ks.tables.keys());
    assert!(ks.tables.contains_key("meta"), "{:?}", ks.tables.keys());
    // IF EXISTS on a missing table is fine; without it, it is an error.
    session
        .query_unpaged("DROP TABLE IF EXISTS msghash.t", ())
        .await?;
    assert!(session
        .query_unpaged("DROP TABLE msghash.t", ())
        .await
        .is_err());
    // Created again, the table starts empty.
    session
        .query_unpaged(
            "CREATE TABLE IF NOT EXISTS msghash.t (k int PRIMARY KEY, v text)",
            (),
        )
        .await?;
    assert_eq!(
        session
            .query_unpaged("SELECT * FROM msghash.t", ())
            .await?
            .into_rows_result()?
            .rows_num(),
        0
    );
    let insert = prepare(
        &session,
        "INSERT INTO msghash.t (k, v) VALUES (?, ?)",
        Consistency::One,
    )
    .await?;
    session.execute_unpaged(&insert, (1, "again")).await?;
    assert_eq!(
        session
            .query_unpaged("SELECT * FROM msghash.t", ())
            .await?
            .into_rows_result()?
            .rows_num(),
        1
    );
    Ok(())
}

#[tokio::test]
async fn unsupported_statements_get_errors_and_session_survives() -> TestResult {
    let (_server, session) = start().await?;
    create_schema(&session, "").await?;
    for bad in [
        "DROP KEYSPACE msghash",
        "DROP INDEX msghash.meta_value",
        "ALTER TABLE msghash.meta ADD x int",
        "INSERT INTO msghash.meta (name, value) VALUES ('a', 'b') USING TTL 10",
        "SELECT * FROM msghash.meta WHERE value = 'x'",
        "SELECT * FROM msghash.meta ORDER BY value DESC",
        "SELECT * FROM msghash.meta WHERE name = 'a' garbage",
        "SELECT * FROM nowhere.nothing",
        "UPDATE msghash.projection_offsets SET applied_offset = applied_offset + 1 WHERE partition = 1",
        "CREATE TABLE msghash.c (k int PRIMARY KEY, n counter)",
        "this is not cql",
    ] {
        let result = session.query_unpaged(bad, ()).await;
        assert!(result.is_err(), "{bad} should fail");
        assert!(session.prepare(bad).await.is_err(), "{bad} should not prepare");
    }
    // Still fully usable.
    session
        .query_unpaged(
            "INSERT INTO msghash.meta (name, value) VALUES ('still', 'alive')",
            (),
        )
        .await?;
    let n = session
        .query_unpaged("SELECT * FROM msghash.meta", ())
        .await?
        .into_rows_result()?
        .rows_num();
    assert_eq!(n, 1);
    // With ALLOW FILTERING a regular-column restriction is really applied.
    let n = session
        .query_unpaged(
            "SELECT * FROM msghash.meta WHERE value = 'nope' ALLOW FILTERING",
            (),
        )
        .await?
        .into_rows_result()?
        .rows_num();
    assert_eq!(n, 0);
    Ok(())
}

#[tokio::test]
async fn composite_keys_collections_and_types() -> TestResult {
    use std::collections::{BTreeMap as Map, BTreeSet as Set};
    let (_server, session) = start().await?;
    session.query_unpaged(CREATE_KEYSPACE, ()).await?;
    session
        .query_unpaged(
            "CREATE TABLE msghash.wide (tenant text, bucket int, a bigint, b text, \
             flag boolean, score double, ids set<int>, tags list<text>, attrs map<text, bigint>, \
             PRIMARY KEY ((tenant, bucket), a, b))",
            (),
        )
        .await?;
    let insert = session
        .prepare(
            "INSERT INTO msghash.wide (tenant, bucket, a, b, flag, score, ids, tags, attrs) \
             VALUES (:tenant, :bucket, :a, :b, :flag, :score, :ids, :tags, :attrs)",
        )
        .await?;
    assert_eq!(insert.get_variable_pk_indexes().len(), 2);
    for a in 0..3i64 {
        for b in ["x", "y"] {
            let ids: Set<i32> = [3, 1, 2].into();
            let attrs: Map<String, i64> = [("k".to_owned(), a)].into();
            session
                .execute_unpaged(
                    &insert,
                    (
                        "t1",
                        7i32,
                        a,
                        b,
                        a % 2 == 0,
                        -(a as f64) / 2.0,
                        ids,
                        vec!["p", "q"],
                        attrs,
                    ),
                )
                .await?;
        }
    }
    // Clustering prefix.
    let rows = session
        .query_unpaged(
            "SELECT a, b, flag, score, ids, tags, attrs FROM msghash.wide \
             WHERE tenant = ? AND bucket = ? AND a = ?",
            ("t1", 7i32, 1i64),
        )
        .await?
        .into_rows_result()?
        .rows::<(
            i64,
            String,
            bool,
            f64,
            Set<i32>,
            Vec<String>,
            Map<String, i64>,
        )>()?
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, 1);
    assert_eq!(rows[0].1, "x");
    assert!(!rows[0].2);
    assert_eq!(rows[0].3, -0.5);
    assert_eq!(rows[0].4, [1, 2, 3].into());
    assert_eq!(rows[0].5, vec!["p".to_owned(), "q".to_owned()]);
    assert_eq!(rows[0].6, [("k".to_owned(), 1)].into());

    // IN ? bound to a list, on a clustering column.
    let n = session
        .query_unpaged(
            "SELECT a FROM msghash.wide WHERE tenant = 't1' AND bucket = 7 AND a IN ?",
            (vec![0i64, 2],),
        )
        .await?
        .into_rows_result()?
        .rows_num();
    assert_eq!(n, 4);

    // Partial partition key needs ALLOW FILTERING; with it, filtering works.
    assert!(session
        .query_unpaged("SELECT a FROM msghash.wide WHERE tenant = 't1'", ())
        .await
        .is_err());
    let n = session
        .query_unpaged(
            "SELECT a FROM msghash.wide WHERE tenant = 't1' AND score < 0 ALLOW FILTERING",
            (),
        )
        .await?
        .into_rows_result()?
        .rows_num();
    assert_eq!(n, 4);

    // Missing key parts are rejected, not silently stored.
    assert!(session
        .query_unpaged(
            "INSERT INTO msghash.wide (tenant, bucket, a) VALUES ('t', 1, 1)",
            ()
        )
        .await
        .is_err());

    // DISTINCT partition keys.
    let n = session
        .query_unpaged("SELECT DISTINCT tenant, bucket FROM msghash.wide", ())
        .await?
        .into_rows_result()?
        .rows_num();
    assert_eq!(n, 1);
    Ok(())
}

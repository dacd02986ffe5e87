//! `token(...)` restrictions and selectors through the real `scylla` driver,
//! checked against the driver's own Murmur3Partitioner.

use std::collections::BTreeSet;

use futures::{future::try_join_all, TryStreamExt};
use scylla::{
    client::{session::Session, session_builder::SessionBuilder},
    frame::response::result::{ColumnType, NativeType},
    routing::partitioner::{Murmur3Partitioner, Partitioner},
    statement::{prepared::PreparedStatement, Statement},
};
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), Error>;

const PAGE: i32 = 100;

async fn start() -> Result<(cql_server::Server, Session), Error> {
    let server = cql_server::start("127.0.0.1:0").await?;
    let session = SessionBuilder::new()
        .known_node(server.local_addr().to_string())
        .build()
        .await?;
    session
        .query_unpaged(
            "CREATE KEYSPACE tk WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
            (),
        )
        .await?;
    session
        .query_unpaged(
            "CREATE TABLE tk.messages (digest blob PRIMARY KEY, message text)",
            (),
        )
        .await?;
    Ok((server, session))
}

/// Deterministic pseudo-random bytes (splitmix64), all byte values occur.
fn random_bytes(state: &mut u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend(z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The driver's token of a single-column partition key value.
fn driver_token(key: &[u8]) -> i64 {
    Murmur3Partitioner.hash_one(key).value()
}

async fn insert_digests(session: &Session, n: usize, seed: u64) -> Result<Vec<Vec<u8>>, Error> {
    let insert = session
        .prepare("INSERT INTO tk.messages (digest, message) VALUES (?, ?)")
        .await?;
    let mut state = seed;
    let digests: Vec<Vec<u8>> = (0..n).map(|_| random_bytes(&mut state, 32)).collect();
    for chunk in digests.chunks(500) {
        try_join_all(
            chunk
                .iter()
                .map(|d| session.execute_unpaged(&insert, (d.clone(), "m"))),
        )
        .await?;
    }
    Ok(digests)
}

async fn digests_of(
    session: &Session,
    stmt: &PreparedStatement,
    values: impl scylla::serialize::row::SerializeRow,
) -> Result<Vec<Vec<u8>>, Error> {
    Ok(session
        .execute_unpaged(stmt, values)
        .await?
        .into_rows_result()?
        .rows::<(Vec<u8>,)>()?
        .map(|r| r.map(|(d,)| d))
        .collect::<Result<_, _>>()?)
}

fn native_types(p: &PreparedStatement) -> Vec<ColumnType<'static>> {
    p.get_variable_col_specs()
        .iter()
        .map(|s| s.typ().clone())
        .collect()
}

#[tokio::test]
async fn cursor_paging_by_token_visits_every_digest_once_in_token_order() -> TestResult {
    let (_server, session) = start().await?;
    let digests = insert_digests(&session, 2500, 0x5eed).await?;
    let expected: BTreeSet<Vec<u8>> = digests.iter().cloned().collect();
    assert_eq!(expected.len(), 2500);

    let first = session
        .prepare("SELECT digest FROM tk.messages LIMIT ?")
        .await?;
    let next = session
        .prepare("SELECT digest FROM tk.messages WHERE token(digest) > token(?) LIMIT ?")
        .await?;
    assert_eq!(
        native_types(&first),
        vec![ColumnType::Native(NativeType::Int)]
    );
    assert_eq!(
        native_types(&next),
        vec![
            ColumnType::Native(NativeType::Blob),
            ColumnType::Native(NativeType::Int)
        ]
    );
    assert_eq!(next.get_variable_col_specs().len(), 2);

    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut page = digests_of(&session, &first, (PAGE,)).await?;
    let mut pages = 1;
    loop {
        assert!(page.len() <= PAGE as usize);
        let full = page.len() == PAGE as usize;
        seen.extend(page.iter().cloned());
        if !full {
            break;
        }
        let cursor = page.last().cloned().ok_or("empty full page")?;
        page = digests_of(&session, &next, (cursor, PAGE)).await?;
        pages += 1;
        assert!(pages < 100, "paging does not terminate");
    }
    // 2500 rows in pages of 100: 25 full pages and a final empty one.
    assert_eq!(pages, 26);
    assert!(page.is_empty());
    assert_eq!(seen.len(), 2500, "every digest exactly once");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), expected);
    let tokens: Vec<i64> = seen.iter().map(|d| driver_token(d)).collect();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing token order"
    );

    // With an uneven page size the last page is short.
    let short = digests_of(
        &session,
        &next,
        (seen[2500 - 7 - 1].clone(), 10i32), // 7 rows left after this cursor
    )
    .await?;
    assert_eq!(short, seen[2500 - 7..].to_vec());

    // The full scan (driver paging) also returns rows in token order.
    let mut scan = Statement::new("SELECT digest FROM tk.messages");
    scan.set_page_size(77);
    let scanned: Vec<Vec<u8>> = session
        .query_iter(scan, ())
        .await?
        .rows_stream::<(Vec<u8>,)>()?
        .map_ok(|(d,)| d)
        .try_collect()
        .await?;
    assert_eq!(scanned, seen);
    Ok(())
}

#[tokio::test]
async fn token_selector_and_bigint_cursor_match_the_driver() -> TestResult {
    let (_server, session) = start().await?;
    let digests = insert_digests(&session, 1000, 42).await?;
    // Odd lengths exercise every tail length and sign-extended tail bytes.
    let insert = session
        .prepare("INSERT INTO tk.messages (digest, message) VALUES (?, ?)")
        .await?;
    let mut state = 7u64;
    let mut all: BTreeSet<Vec<u8>> = digests.into_iter().collect();
    for len in 1..=40 {
        for _ in 0..5 {
            let key = random_bytes(&mut state, len);
            session
                .execute_unpaged(&insert, (key.clone(), "odd"))
                .await?;
            all.insert(key);
        }
    }
    for key in [vec![0u8], vec![0xff], vec![0x80; 15], vec![0x7f; 17]] {
        session
            .execute_unpaged(&insert, (key.clone(), "edge"))
            .await?;
        all.insert(key);
    }

    let by_token = session
        .prepare("SELECT token(digest), digest FROM tk.messages WHERE token(digest) > ? LIMIT ?")
        .await?;
    assert_eq!(
        native_types(&by_token),
        vec![
            ColumnType::Native(NativeType::BigInt),
            ColumnType::Native(NativeType::Int)
        ]
    );
    let result_types: Vec<_> = by_token
        .get_current_result_set_col_specs()
        .get()
        .iter()
        .map(|s| (s.name().to_owned(), s.typ().clone()))
        .collect();
    assert_eq!(
        result_types,
        vec![
            (
                "system.token(digest)".to_owned(),
                ColumnType::Native(NativeType::BigInt)
            ),
            ("digest".to_owned(), ColumnType::Native(NativeType::Blob)),
        ]
    );

    let mut cursor = i64::MIN;
    let mut seen: Vec<(i64, Vec<u8>)> = Vec::new();
    loop {
        let page: Vec<(i64, Vec<u8>)> = session
            .execute_unpaged(&by_token, (cursor, PAGE))
            .await?
            .into_rows_result()?
            .rows::<(i64, Vec<u8>)>()?
            .collect::<Result<_, _>>()?;
        let Some((last, _)) = page.last() else { break };
        cursor = *last;
        seen.extend(page);
    }
    assert_eq!(seen.len(), all.len());
    for (token, key) in &seen {
        assert_eq!(*token, driver_token(key), "token of {key:02x?}");
    }
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(
        seen.iter().map(|(_, k)| k.clone()).collect::<BTreeSet<_>>(),
        all
    );

    // Known Cassandra-compatible values, and the other operators.
    let (t,) = session
        .query_unpaged(
            "SELECT token(digest) FROM tk.messages WHERE digest = 0x00",
            (),
        )
        .await?
        .into_rows_result()?
        .single_row::<(i64,)>()?;
    assert_eq!(t, driver_token(&[0]));
    let mid = seen[seen.len() / 2].0;
    let count = |cql: &'static str, bound: i64| {
        let session = &session;
        async move {
            Ok::<usize, Error>(
                session
                    .query_unpaged(cql, (bound,))
                    .await?
                    .into_rows_result()?
                    .rows_num(),
            )
        }
    };
    let half = seen.len() / 2;
    let n = seen.len();
    assert_eq!(
        count(
            "SELECT digest FROM tk.messages WHERE token(digest) < ?",
            mid
        )
        .await?,
        half
    );
    assert_eq!(
        count(
            "SELECT digest FROM tk.messages WHERE token(digest) <= ?",
            mid
        )
        .await?,
        half + 1
    );
    assert_eq!(
        count(
            "SELECT digest FROM tk.messages WHERE token(digest) >= ?",
            mid
        )
        .await?,
        n - half
    );
    assert_eq!(
        count(
            "SELECT digest FROM tk.messages WHERE token(digest) = ?",
            mid
        )
        .await?,
        1
    );
    // A closed range, with a literal token(<blob>) lower bound.
    let lo = &seen[10];
    let rows = session
        .query_unpaged(
            format!(
                "SELECT digest FROM tk.messages WHERE token(digest) >= token(0x{}) \
                 AND token(digest) < ?",
                lo.1.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
            (seen[20].0,),
        )
        .await?
        .into_rows_result()?
        .rows::<(Vec<u8>,)>()?
        .map(|r| r.map(|(d,)| d))
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(
        rows,
        seen[10..20]
            .iter()
            .map(|(_, k)| k.clone())
            .collect::<Vec<_>>()
    );
    // Paging through a token range with the driver's own paging.
    let mut ranged = Statement::new("SELECT digest FROM tk.messages WHERE token(digest) > ?");
    ranged.set_page_size(33);
    let rest: Vec<Vec<u8>> = session
        .query_iter(ranged, (mid,))
        .await?
        .rows_stream::<(Vec<u8>,)>()?
        .map_ok(|(d,)| d)
        .try_collect()
        .await?;
    assert_eq!(
        rest,
        seen[half + 1..]
            .iter()
            .map(|(_, k)| k.clone())
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test]
async fn composite_and_typed_keys_match_the_drivers_compute_token() -> TestResult {
    let (_server, session) = start().await?;
    session
        .query_unpaged(
            "CREATE TABLE tk.wide (tenant text, bucket int, id uuid, seq bigint, v text, \
             PRIMARY KEY ((tenant, bucket, id), seq))",
            (),
        )
        .await?;
    session
        .query_unpaged("CREATE TABLE tk.ints (k int PRIMARY KEY, v text)", ())
        .await?;
    let insert = session
        .prepare("INSERT INTO tk.wide (tenant, bucket, id, seq, v) VALUES (?, ?, ?, ?, 'x')")
        .await?;
    let mut keys = Vec::new();
    for i in 0..60i32 {
        let key = (
            format!("tenant-{}", i % 7),
            i * 31 - 900,
            Uuid::from_u128(0x0123_4567_89ab_cdef_u128.wrapping_mul(i as u128 + 1)),
        );
        for seq in 0..3i64 {
            session
                .execute_unpaged(&insert, (key.0.clone(), key.1, key.2, seq))
                .await?;
        }
        keys.push(key);
    }
    for k in [1i32, 2, -1, 128, 0] {
        session
            .query_unpaged("INSERT INTO tk.ints (k, v) VALUES (?, 'v')", (k,))
            .await?;
    }
    session.refresh_metadata().await?;
    let state = session.get_cluster_state();

    let rows: Vec<(i64, String, i32, Uuid, i64)> = session
        .query_unpaged(
            "SELECT token(tenant, bucket, id) AS t, tenant, bucket, id, seq FROM tk.wide",
            (),
        )
        .await?
        .into_rows_result()?
        .rows()?
        .collect::<Result<_, _>>()?;
    assert_eq!(rows.len(), 180);
    for (t, tenant, bucket, id, _) in &rows {
        let expected = state
            .compute_token("tk", "wide", &(tenant, bucket, id))?
            .value();
        assert_eq!(*t, expected);
    }
    // Token order across partitions, clustering order inside each one.
    assert!(rows.windows(2).all(|w| (w[0].0, w[0].4) < (w[1].0, w[1].4)));

    // token(?, ?, ?) binds the three partition key types.
    let p = session
        .prepare(
            "SELECT seq FROM tk.wide WHERE token(tenant, bucket, id) = token(?, ?, ?) \
             AND token(tenant, bucket, id) <= ?",
        )
        .await?;
    assert_eq!(
        native_types(&p),
        vec![
            ColumnType::Native(NativeType::Text),
            ColumnType::Native(NativeType::Int),
            ColumnType::Native(NativeType::Uuid),
            ColumnType::Native(NativeType::BigInt),
        ]
    );
    let k = &keys[5];
    let n = session
        .execute_unpaged(&p, (k.0.clone(), k.1, k.2, i64::MAX))
        .await?
        .into_rows_result()?
        .rows_num();
    assert_eq!(n, 3);

    // Cassandra's own token() of int keys (cqlsh / dtest fixtures).
    let ints: Vec<(i32, i64)> = session
        .query_unpaged("SELECT k, token(k) FROM tk.ints", ())
        .await?
        .into_rows_result()?
        .rows()?
        .collect::<Result<_, _>>()?;
    for (k, t) in &ints {
        assert_eq!(*t, state.compute_token("tk", "ints", &(k,))?.value());
    }
    assert!(ints.contains(&(1, -4069959284402364209)));
    assert!(ints.contains(&(2, -3248873570005575792)));
    Ok(())
}

#[tokio::test]
async fn bad_token_restrictions_are_rejected() -> TestResult {
    let (_server, session) = start().await?;
    for bad in [
        // Not the partition key.
        "SELECT * FROM tk.messages WHERE token(message) > 0",
        // Mixed with a normal partition key relation.
        "SELECT * FROM tk.messages WHERE digest = 0x01 AND token(digest) > 0",
        // Wrong argument count on the right-hand side.
        "SELECT * FROM tk.messages WHERE token(digest) > token(0x01, 0x02)",
        // A token is a bigint.
        "SELECT * FROM tk.messages WHERE token(digest) > 'abc'",
        "SELECT token(message) FROM tk.messages",
        "DELETE FROM tk.messages WHERE token(digest) > 0",
        "SELECT * FROM tk.messages WHERE token(digest) IN (1, 2)",
    ] {
        assert!(
            session.query_unpaged(bad, ()).await.is_err(),
            "{bad} should fail"
        );
    }
    // A non-key restriction next to a token range still needs ALLOW FILTERING.
    assert!(session
        .query_unpaged(
            "SELECT * FROM tk.messages WHERE token(digest) > 0 AND message = 'm'",
            ()
        )
        .await
        .is_err());
    session
        .query_unpaged(
            "SELECT * FROM tk.messages WHERE token(digest) > 0 AND message = 'm' ALLOW FILTERING",
            (),
        )
        .await?;
    Ok(())
}

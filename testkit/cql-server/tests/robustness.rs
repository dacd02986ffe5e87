//! Malformed input on raw sockets: the server answers with error frames and
//! keeps serving (the same connection when framing is intact, other clients
//! always).

use cql_server::Server;
use scylla::client::session_builder::SessionBuilder;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const STARTUP: u8 = 0x01;
const OPTIONS: u8 = 0x05;
const QUERY: u8 = 0x07;
const PREPARE: u8 = 0x09;
const EXECUTE: u8 = 0x0A;
const REGISTER: u8 = 0x0B;
const BATCH: u8 = 0x0D;

const ERROR: u8 = 0x00;
const READY: u8 = 0x02;
const SUPPORTED: u8 = 0x06;
const RESULT: u8 = 0x08;

fn frame(stream: i16, opcode: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0x04, 0];
    f.extend(stream.to_be_bytes());
    f.push(opcode);
    f.extend((body.len() as u32).to_be_bytes());
    f.extend(body);
    f
}

/// Reads one response frame: (stream, opcode, body).
async fn read_frame(s: &mut TcpStream) -> std::io::Result<(i16, u8, Vec<u8>)> {
    let mut h = [0u8; 9];
    s.read_exact(&mut h).await?;
    assert_eq!(h[0], 0x84, "response version");
    let len = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) as usize;
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((i16::from_be_bytes([h[2], h[3]]), h[4], body))
}

fn error_code(body: &[u8]) -> i32 {
    i32::from_be_bytes([body[0], body[1], body[2], body[3]])
}

fn query_body(cql: &str) -> Vec<u8> {
    let mut b = (cql.len() as u32).to_be_bytes().to_vec();
    b.extend(cql.as_bytes());
    b.extend(1u16.to_be_bytes()); // consistency ONE
    b.push(0); // flags
    b
}

fn startup_body() -> Vec<u8> {
    let mut b = 1u16.to_be_bytes().to_vec();
    for s in ["CQL_VERSION", "3.0.0"] {
        b.extend((s.len() as u16).to_be_bytes());
        b.extend(s.as_bytes());
    }
    b
}

async fn driver_still_works(server: &Server) -> TestResult {
    let session = SessionBuilder::new()
        .known_node(server.local_addr().to_string())
        .build()
        .await?;
    let rows = session
        .query_unpaged("SELECT key FROM system.local", ())
        .await?
        .into_rows_result()?;
    assert_eq!(rows.rows_num(), 1);
    Ok(())
}

#[tokio::test]
async fn garbage_bytes_get_an_error_frame_and_the_server_survives() -> TestResult {
    let server = cql_server::start("127.0.0.1:0").await?;
    let mut raw = TcpStream::connect(server.local_addr()).await?;
    raw.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await?;
    let (_, op, body) = read_frame(&mut raw).await?;
    assert_eq!(op, ERROR);
    assert_eq!(error_code(&body), 0x000A); // ProtocolError
                                           // The server closes this (unsynchronisable) connection...
    let mut rest = Vec::new();
    raw.read_to_end(&mut rest).await?;
    // ...but keeps serving everyone else.
    driver_still_works(&server).await
}

#[tokio::test]
async fn malformed_frames_keep_the_connection_usable() -> TestResult {
    let server = cql_server::start("127.0.0.1:0").await?;
    let mut s = TcpStream::connect(server.local_addr()).await?;

    s.write_all(&frame(1, OPTIONS, &[])).await?;
    assert_eq!(read_frame(&mut s).await?.1, SUPPORTED);
    s.write_all(&frame(2, STARTUP, &startup_body())).await?;
    assert_eq!(read_frame(&mut s).await?.1, READY);

    let mut bad_utf8 = query_body("SELECT key FROM system.local");
    bad_utf8[6] = 0xFF;
    let cases: Vec<(u8, Vec<u8>)> = vec![
        (QUERY, vec![0, 0, 0]),                         // truncated length
        (QUERY, vec![0x7f, 0xff, 0xff, 0xff, b'x']),    // length beyond body
        (QUERY, bad_utf8),                              // invalid UTF-8
        (QUERY, query_body("SELECT * FROM nowhere.x")), // unknown table
        (QUERY, query_body("SELEKT nonsense")),         // syntax error
        (QUERY, {
            let mut b = query_body("SELECT key FROM system.local WHERE key = ?");
            let n = b.len();
            b[n - 1] = 0x01; // VALUES flag ...
            b.extend(1u16.to_be_bytes());
            b.extend((-7i32).to_be_bytes()); // ... with an invalid value length
            b
        }),
        (EXECUTE, vec![0, 3, 1, 2, 3, 0, 1, 0]), // unknown prepared id
        (PREPARE, vec![0, 0, 0, 4, b'a', b'b']),
        (BATCH, vec![7, 0, 1]),
        (REGISTER, vec![0, 5, b'a']),
        (0x42, b"unknown opcode".to_vec()),
    ];
    for (i, (op, body)) in cases.into_iter().enumerate() {
        let stream = 100 + i as i16;
        s.write_all(&frame(stream, op, &body)).await?;
        let (got_stream, got_op, _) = read_frame(&mut s).await?;
        assert_eq!(got_stream, stream);
        assert_eq!(got_op, ERROR, "case {i} (opcode {op:#x})");
    }

    // Same connection still answers real queries.
    s.write_all(&frame(
        7,
        QUERY,
        &query_body("SELECT key FROM system.local"),
    ))
    .await?;
    let (stream, op, _) = read_frame(&mut s).await?;
    assert_eq!((stream, op), (7, RESULT));
    driver_still_works(&server).await
}

/// Deterministic fuzzing of request bodies: every frame gets an answer and
/// the connection never drops.
#[tokio::test]
async fn fuzzed_bodies_always_get_an_answer() -> TestResult {
    let server = cql_server::start("127.0.0.1:0").await?;
    let mut s = TcpStream::connect(server.local_addr()).await?;
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let templates = [
        query_body("SELECT key, tokens FROM system.local WHERE key = 'local'"),
        query_body("INSERT INTO ks.t (a, b) VALUES (?, ?)"),
        startup_body(),
    ];
    for i in 0..1500u32 {
        let op =
            [QUERY, PREPARE, EXECUTE, BATCH, STARTUP, REGISTER, OPTIONS][(next() % 7) as usize];
        let mut body = templates[(next() % 3) as usize].clone();
        // Flip, truncate or extend randomly.
        for _ in 0..(next() % 4) {
            if !body.is_empty() {
                let at = (next() as usize) % body.len();
                body[at] = next() as u8;
            }
        }
        match next() % 3 {
            0 => body.truncate((next() as usize) % (body.len() + 1)),
            1 => body.extend((0..next() % 16).map(|_| next() as u8)),
            _ => {}
        }
        let stream = (i % 30000) as i16;
        s.write_all(&frame(stream, op, &body)).await?;
        let (got, got_op, _) = read_frame(&mut s).await?;
        assert_eq!(got, stream);
        assert!(matches!(got_op, ERROR | READY | SUPPORTED | RESULT));
    }
    driver_still_works(&server).await
}

#[tokio::test]
async fn drop_stops_the_server() -> TestResult {
    let server = cql_server::start("127.0.0.1:0").await?;
    let addr = server.local_addr();
    let mut open = TcpStream::connect(addr).await?;
    server.shutdown().await;
    // The open connection is closed (EOF, or a reset if it was still in the
    // accept backlog) and new ones are refused.
    let mut buf = Vec::new();
    let _closed = open.read_to_end(&mut buf).await;
    assert!(buf.is_empty());
    assert!(TcpStream::connect(addr).await.is_err());
    // Non-loopback addresses are refused.
    assert!(cql_server::start("0.0.0.0:0").await.is_err());
    Ok(())
}

//! The HTTPS server every service runs (`msghash_common::http::Server`), against clients that
//! hold connections: too many at once, too slow with a head or a body, idle, and HTTP/2
//! with more streams than allowed. In process, with short limits.

use axum::routing::{get, post};
use axum::Router;
use msghash_common::http::{BodyLimit, ConnectionLimits, JsonBody, RequestBody, Server};
use msghash_common::tls::{ensure_generated, server_config, CertSource};
use msghash_testkit::slow::{tls_connector, trickle, Trickle};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(serde::Deserialize)]
struct Note {
    #[allow(dead_code)]
    text: String,
}

impl RequestBody for Note {
    const INVALID: &'static str = "a note";
}

struct Running {
    address: SocketAddr,
    ca: PathBuf,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(limits: ConnectionLimits) -> Running {
    serve_with(limits, msghash_common::http::Guards::default()).await
}

async fn serve_guarded(guards: msghash_common::http::Guards) -> Running {
    serve_with(limits(), guards).await
}

/// The server with `limits` and `guards`, around a few routes.
async fn serve_with(limits: ConnectionLimits, guards: msghash_common::http::Guards) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = ensure_generated(dir.path()).expect("certificate");
    let tls = server_config(&CertSource::Files {
        cert: cert.clone(),
        key,
    })
    .expect("TLS config");
    let router = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route("/health/live", get(|| async { "live" }))
        .route(
            "/messages",
            post(|JsonBody(_): JsonBody<Note>| async { "noted" }),
        )
        .with_state(BodyLimit(1024 * 1024));
    let router =
        msghash_common::http::observe(msghash_common::http::with_error_fallbacks(router), "unit");
    let server = Server::bind("127.0.0.1:0".parse().expect("addr"), tls, router, limits)
        .expect("bind")
        .guarded(guards);
    let address = server.address();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(stop.clone()));
    Running {
        address,
        ca: cert,
        stop,
        _dir: dir,
    }
}

fn limits() -> ConnectionLimits {
    ConnectionLimits {
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        max_connections: 1000,
        http2_max_streams: 128,
    }
}

/// A TLS connection that has answered one GET /hello over HTTP/1.1 (and stays open).
async fn open_connection(
    server: &Running,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(server.address)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = tls_connector(&server.ca)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET /hello HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"hello") {
        let n = tls.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("closed after {:?}", String::from_utf8_lossy(&got)));
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(tls)
}

#[tokio::test]
async fn past_the_connection_cap_a_new_connection_is_closed_at_once_until_a_place_frees() {
    let server = serve(ConnectionLimits {
        max_connections: 3,
        ..limits()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open_connection(&server).await.expect("under the cap"));
    }
    let started = Instant::now();
    let refused = open_connection(&server).await;
    assert!(refused.is_err(), "a fourth connection was served");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the fourth connection was held, not closed: {:?}",
        started.elapsed()
    );

    drop(held.pop());
    // The server sees the close a moment later: retry until the freed place is taken.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open_connection(&server).await {
            Ok(conn) => {
                held.push(conn);
                break;
            }
            Err(e) if Instant::now() > deadline => panic!("the freed place was not reused: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // The connections under the cap still work.
    let mut first = held.remove(0);
    first
        .write_all(b"GET /hello HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    assert!(first.read(&mut buf).await.expect("read") > 0);
}

#[tokio::test]
async fn a_head_or_a_body_sent_too_slowly_is_cut_off_at_its_timeout() {
    let timeout = Duration::from_millis(1500);
    let server = serve(ConnectionLimits {
        header_timeout: timeout,
        body_timeout: timeout,
        ..limits()
    })
    .await;
    let open = Arc::new(AtomicUsize::new(0));
    for kind in [Trickle::Head, Trickle::Body] {
        let closed = trickle(
            server.address,
            tls_connector(&server.ca),
            kind,
            Duration::from_millis(100),
            Duration::from_secs(20),
            open.clone(),
        )
        .await
        .expect("connection");
        let after = closed
            .after
            .unwrap_or_else(|| panic!("{kind:?}: still open after 20 s"));
        assert!(
            after >= timeout - Duration::from_millis(200) && after < timeout * 3,
            "{kind:?}: closed after {after:?}, timeout {timeout:?}"
        );
        if kind == Trickle::Body {
            assert_eq!(
                closed.answer.as_deref(),
                Some("HTTP/1.1 408 Request Timeout")
            );
        }
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_millis(1500);
    let server = serve(ConnectionLimits {
        idle_timeout: idle,
        ..limits()
    })
    .await;
    let mut conn = open_connection(&server).await.expect("connection");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(20), conn.read(&mut buf)).await;
    let after = started.elapsed();
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "idle connection still open after 20 s: {read:?}"
    );
    assert!(
        after >= idle - Duration::from_millis(200) && after < idle * 3,
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn http2_announces_its_stream_limit_and_an_idle_http2_connection_is_closed() {
    let idle = Duration::from_millis(1500);
    let server = serve(ConnectionLimits {
        idle_timeout: idle,
        http2_max_streams: 7,
        ..limits()
    })
    .await;
    let pem = std::fs::read(&server.ca).expect("CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
        let cert: rustls_pki_types::CertificateDer = cert.expect("PEM");
        roots.add(cert).expect("CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(server.address).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let (client, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::get("https://localhost/hello")
        .body(())
        .expect("request");
    let (response, _) = client.send_request(request, true).expect("send");
    let response = response.await.expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(client.current_max_send_streams(), 7);

    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(20), connection).await;
    let after = started.elapsed();
    assert!(
        ended.is_ok(),
        "idle HTTP/2 connection still open after 20 s"
    );
    assert!(after < idle * 3, "closed after {after:?}");
}

fn https_client(server: &Running) -> reqwest::Client {
    let pem = std::fs::read(&server.ca).expect("CA");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .resolve("localhost", server.address)
        .build()
        .expect("client")
}

#[tokio::test]
async fn over_its_rate_a_client_gets_429_with_retry_after_and_health_checks_are_never_limited() {
    use msghash_common::http::{Guards, RateLimit};
    use std::num::NonZeroU32;
    let three = NonZeroU32::new(3).expect("3");
    for trusted in [false, true] {
        // One token a minute: the burst stays spent however slow the machine is.
        let server = serve_guarded(Guards {
            rate_limit: RateLimit::one_every(Duration::from_secs(60), three),
            trusted_proxies: if trusted {
                vec!["127.0.0.1/32".parse().expect("net")]
            } else {
                Vec::new()
            },
            ..Guards::default()
        })
        .await;
        let client = https_client(&server);
        let base = format!("https://localhost:{}", server.address.port());
        let get = |path: &str, forwarded: &str| {
            client
                .get(format!("{base}{path}"))
                .header("x-forwarded-for", forwarded.to_owned())
                .send()
        };
        for _ in 0..3 {
            assert_eq!(get("/hello", "192.0.2.1").await.expect("get").status(), 200);
        }
        let limited = get("/hello", "192.0.2.1").await.expect("get");
        assert_eq!(limited.status(), 429);
        // The seconds until the next token, rounded up: a minute less what the requests
        // since the burst took.
        let retry_after: u64 = limited.headers()["retry-after"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds");
        assert!(
            (30..=60).contains(&retry_after),
            "Retry-After {retry_after}"
        );
        assert!(limited.headers().contains_key("x-request-id"));
        let body: serde_json::Value = limited.json().await.expect("json");
        assert_eq!(
            body,
            serde_json::json!({ "err_msg": "Too many requests, retry later" })
        );
        assert_eq!(
            get("/health/live", "192.0.2.1")
                .await
                .expect("get")
                .status(),
            200
        );
        // Another address in X-Forwarded-For is another client only when it comes from a
        // trusted proxy; anyone else cannot dodge the limit by sending the header.
        let other = get("/hello", "192.0.2.2").await.expect("get").status();
        assert_eq!(other, if trusted { 200 } else { 429 }, "trusted {trusted}");
    }
}

#[tokio::test]
async fn with_api_keys_a_post_needs_a_valid_bearer_key_reads_stay_open_and_sighup_reloads() {
    use msghash_common::http::guard::key_file_line;
    use msghash_common::http::{ApiKeys, Guards, KeyScope};
    let keys_dir = tempfile::tempdir().expect("dir");
    let path = keys_dir.path().join("keys");
    std::fs::write(&path, format!("{}\n", key_file_line("first-key"))).expect("write");
    let server = serve_guarded(Guards {
        api_keys: Some(ApiKeys::load(&path, KeyScope::Writes).expect("keys")),
        ..Guards::default()
    })
    .await;
    let client = https_client(&server);
    let base = format!("https://localhost:{}", server.address.port());
    let post = |key: Option<&str>| {
        let mut request = client
            .post(format!("{base}/messages"))
            .json(&serde_json::json!({ "text": "hi" }));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    for key in [None, Some("wrong-key")] {
        let refused = post(key).await.expect("post");
        assert_eq!(refused.status(), 401, "{key:?}");
        assert_eq!(refused.headers()["www-authenticate"], "Bearer");
        let body: serde_json::Value = refused.json().await.expect("json");
        assert_eq!(
            body,
            serde_json::json!({ "err_msg": "Missing or invalid API key" })
        );
    }
    assert_eq!(post(Some("first-key")).await.expect("post").status(), 200);
    let read = client
        .get(format!("{base}/hello"))
        .send()
        .await
        .expect("get");
    assert_eq!(read.status(), 200);

    // A new file and SIGHUP: the new key works, the old one no longer does.
    std::fs::write(&path, format!("{}\n", key_file_line("second-key"))).expect("write");
    let pid = std::process::id().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        if post(Some("second-key")).await.expect("post").status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload the keys");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(post(Some("first-key")).await.expect("post").status(), 401);
}

#[tokio::test]
async fn requests_refused_for_their_key_still_count_against_the_rate_limit() {
    use msghash_common::http::guard::key_file_line;
    use msghash_common::http::{ApiKeys, Guards, KeyScope, RateLimit};
    use std::num::NonZeroU32;
    let keys_dir = tempfile::tempdir().expect("dir");
    let path = keys_dir.path().join("keys");
    std::fs::write(&path, format!("{}\n", key_file_line("the-key"))).expect("write");
    let server = serve_guarded(Guards {
        api_keys: Some(ApiKeys::load(&path, KeyScope::All).expect("keys")),
        rate_limit: RateLimit::one_every(Duration::from_secs(60), NonZeroU32::new(2).expect("2")),
        ..Guards::default()
    })
    .await;
    let client = https_client(&server);
    let base = format!("https://localhost:{}", server.address.port());
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = client
            .post(format!("{base}/messages"))
            .bearer_auth("a-guess")
            .json(&serde_json::json!({ "text": "hi" }))
            .send()
            .await
            .expect("post");
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 429], "key guessing is rate-limited");
    // The document the edge serves as /openapi.json needs no key and is never limited.
    for path in ["/openapi.json", "/openapi/edge.json", "/health/live"] {
        let r = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("get");
        assert!(
            r.status() != 401 && r.status() != 429,
            "{path}: {}",
            r.status()
        );
    }
}

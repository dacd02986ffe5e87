//! Slow clients, as an attacker runs them: TLS connections that send a request's head, or
//! its body, one byte at a time, so that a server without deadlines keeps them open for as
//! long as they like. Each one reports when the server closed it (and with what answer).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// A TLS connector (HTTP/1.1 by ALPN) trusting the PEM certificate at `ca`.
pub fn tls_connector(ca: &Path) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA certificate file") {
        roots
            .add(cert.expect("PEM certificate"))
            .expect("usable CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// What a slow client trickles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trickle {
    /// A request head that never ends: one more byte of a header value each tick.
    Head,
    /// A whole head announcing a 100,000-byte JSON body, then the body a byte each tick.
    Body,
}

/// How one slow client ended.
#[derive(Debug, Clone)]
pub struct Closed {
    pub trickle: Trickle,
    /// From the end of the TLS handshake to the server closing the connection; `None` when
    /// it was still open when the client gave up.
    pub after: Option<Duration>,
    /// The status line the server answered before closing, if any.
    pub answer: Option<String>,
}

/// Connects to `addr` over TLS (for `localhost`), then trickles a byte every `tick` until
/// the server closes the connection or `give_up` passes. `open` counts the connections open
/// at the moment. An error is a connection that could not be set up.
pub async fn trickle(
    addr: SocketAddr,
    connector: TlsConnector,
    trickle: Trickle,
    tick: Duration,
    give_up: Duration,
    open: Arc<AtomicUsize>,
) -> Result<Closed, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(Duration::from_secs(30), connector.connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake took over 30 s".to_owned())?
        .map_err(|e| format!("TLS handshake: {e}"))?;
    open.fetch_add(1, Ordering::SeqCst);
    let started = Instant::now();
    let (mut reader, mut writer) = tokio::io::split(tls);
    let sender = tokio::spawn(async move {
        let (head, byte): (&[u8], u8) = match trickle {
            Trickle::Head => (b"GET /messages HTTP/1.1\r\nhost: localhost\r\nx-slow: ", b'a'),
            Trickle::Body => (
                b"POST /messages HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"message\":\"",
                b'a',
            ),
        };
        let first = match trickle {
            Trickle::Head => &head[..1],
            Trickle::Body => head,
        };
        if writer.write_all(first).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        let mut rest = head[first.len()..]
            .iter()
            .copied()
            .chain(std::iter::repeat(byte));
        let mut ticks = tokio::time::interval(tick);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            let Some(next) = rest.next() else { return };
            if writer.write_all(&[next]).await.is_err() || writer.flush().await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(give_up, async {
        let mut buf = [0u8; 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    sender.abort();
    open.fetch_sub(1, Ordering::SeqCst);
    let answer = (!answer.is_empty()).then(|| {
        String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    });
    Ok(Closed {
        trickle,
        after: read.is_ok().then(|| started.elapsed()),
        answer,
    })
}

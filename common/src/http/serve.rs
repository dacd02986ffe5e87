//! [`Server`]: a service's HTTPS port, bound in `Application::build`, served with a graceful
//! drain on shutdown, and guarded against slow, idle and too many clients by its
//! [`ConnectionLimits`]:
//! - at most `max_connections` at once: past it a new connection is closed as soon as it is
//!   accepted (counted in `msghash_http_refused_connections_total`), before any TLS work;
//! - the TLS handshake, and then the head of each request, must arrive within
//!   `header_timeout` (hyper's header-read timer also runs while an HTTP/1.1 keep-alive
//!   connection waits for its next request, so that wait is bounded by it too);
//! - a request body must arrive within `body_timeout` of its head (408, see
//!   [`super::body`]);
//! - a connection on which no byte moves either way for `idle_timeout` is closed (an idle
//!   HTTP/2 connection, or a client that stops reading its answer; an HTTP/2 client that
//!   keeps sending frames without requests is bounded only by the cap);
//! - an HTTP/2 connection carries at most `http2_max_streams` concurrent streams, with
//!   bounded headers and reset-stream floods cut off (hyper's limits). No keep-alive pings:
//!   they would keep an idle connection busy; a dead peer is found by the idle timeout.

use super::guard::Guards;
use super::observe::{fronted, Front};
use axum::{Extension, Router};
use axum_server::accept::Accept;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;

/// How long in-flight requests may take to finish after shutdown is requested.
pub const GRACE: Duration = Duration::from_secs(10);

/// The largest request head (request line and headers) over HTTP/1.1, and header list over
/// HTTP/2, in bytes. Bigger: the connection is closed (HTTP/1.1: 431).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The limits of [`Server`] (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub http2_max_streams: u32,
}

impl Default for ConnectionLimits {
    /// The documented defaults (README, `MSGHASH_HTTP_*`).
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            http2_max_streams: 128,
        }
    }
}

/// How long a request body may take to arrive, counted from its head: the server puts it in
/// every request's extensions for [`super::read_json`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimeout(pub Duration);

/// A service's HTTPS port, bound but not yet serving: every service's
/// `Application::build` makes one, so the port is known (and can be 0, for tests, and read
/// back) before anything is served; `run_until_stopped` then serves it.
pub struct Server {
    listener: std::net::TcpListener,
    address: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: ConnectionLimits,
    guards: Arc<Guards>,
    front: Option<Front>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) for `router` over `tls`, with `limits`.
    pub fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        router: Router,
        limits: ConnectionLimits,
    ) -> std::io::Result<Server> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        Ok(Server {
            listener,
            address,
            tls,
            router,
            limits,
            guards: Arc::new(Guards::default()),
            front: None,
        })
    }

    /// Puts `guards` (rate limit, API keys) on every request; see [`super::guard`].
    pub fn guarded(mut self, guards: Guards) -> Server {
        self.guards = Arc::new(guards);
        self
    }

    /// Answers what `front` can before routing (see [`Front`]); `None`: every request is
    /// routed.
    pub fn fronted(mut self, front: Option<Front>) -> Server {
        self.front = front;
        self
    }

    /// The address actually bound.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish (up to
    /// [`GRACE`]).
    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let limits = self.limits;
        // Present at 0 from the start.
        ::metrics::gauge!(crate::metrics::names::HTTP_OPEN_CONNECTIONS).increment(0.0);
        ::metrics::counter!(crate::metrics::names::HTTP_REFUSED_CONNECTIONS_TOTAL).increment(0);
        ::metrics::counter!(crate::metrics::names::HTTP_RATE_LIMITED_TOTAL).increment(0);
        let handle = axum_server::Handle::new();
        let watcher = handle.clone();
        let shutdown_upkeep = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            watcher.graceful_shutdown(Some(GRACE));
        });
        let guard = Guard {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            idle_timeout: limits.idle_timeout,
        };
        let tls = RustlsAcceptor::new(RustlsConfig::from_config(self.tls))
            .handshake_timeout(limits.header_timeout)
            .acceptor(guard);
        let mut server = axum_server::from_tcp(self.listener)?
            .acceptor(tls)
            .first_request_timeout(limits.header_timeout)
            .handle(handle);
        let builder = server.http_builder();
        builder
            .http1()
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_HEADER_BYTES);
        builder
            .http2()
            .max_concurrent_streams(limits.http2_max_streams)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(256));
        // Listening for SIGHUP before serving: from then on it reloads, never terminates.
        let hangups = match &self.guards.api_keys {
            Some(_) => match signal(SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGHUP: API keys will not reload");
                    None
                }
            },
            None => None,
        };
        tokio::spawn(upkeep(self.guards.clone(), hangups, shutdown_upkeep));
        // Around the whole router, not through `Router::layer`: that wraps every route in
        // one more boxed service, which axum clones for every request (docs/performance.md).
        let app = tower::ServiceBuilder::new()
            .layer(Extension(BodyTimeout(limits.body_timeout)))
            .layer(Extension(self.guards))
            .service(fronted(self.front, self.router));
        server
            .serve(
                axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
                    SocketAddr,
                >(app),
            )
            .await
    }
}

/// The acceptor under TLS: refuses a connection past the cap, and puts the idle timeout on
/// the socket (so the TLS bytes count as traffic too).
#[derive(Clone)]
struct Guard {
    permits: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl<S> Accept<TcpStream, S> for Guard {
    type Stream = Guarded;
    type Service = S;
    type Future = std::future::Ready<io::Result<(Guarded, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            ::metrics::counter!(crate::metrics::names::HTTP_REFUSED_CONNECTIONS_TOTAL).increment(1);
            return std::future::ready(Err(io::Error::other("connection limit reached")));
        };
        // Answers are small and written whole: do not hold them back for more.
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_read_timeout(Some(self.idle_timeout));
        stream.set_write_timeout(Some(self.idle_timeout));
        ::metrics::gauge!(crate::metrics::names::HTTP_OPEN_CONNECTIONS).increment(1.0);
        std::future::ready(Ok((
            Guarded {
                stream: Box::pin(stream),
                _permit: permit,
            },
            service,
        )))
    }
}

/// An accepted connection: its socket with the idle timeout, and its place under the cap
/// (given back, and the open-connections gauge lowered, when it is dropped).
struct Guarded {
    stream: Pin<Box<TimeoutStream<TcpStream>>>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        ::metrics::gauge!(crate::metrics::names::HTTP_OPEN_CONNECTIONS).decrement(1.0);
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream.as_mut().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.as_mut().poll_shutdown(cx)
    }
}

/// While the server runs: forgets idle rate-limit buckets every minute, and reloads the API
/// keys on SIGHUP (a bad file keeps the keys in use, and says why).
async fn upkeep(guards: Arc<Guards>, mut hangups: Option<Signal>, shutdown: CancellationToken) {
    let mut minutes = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = minutes.tick() => {
                if let Some(limit) = &guards.rate_limit {
                    limit.forget_idle();
                }
            }
            Some(()) = async {
                match hangups.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(keys) = &guards.api_keys {
                    match keys.reload() {
                        Ok(n) => tracing::info!(keys = n, "API keys reloaded"),
                        Err(e) => tracing::error!(error = %e, "API keys not reloaded; the previous keys stay in use"),
                    }
                }
            }
        }
    }
}

//! [`Server`]: a service's HTTPS port, bound in `Application::build`, served with a graceful
//! drain on shutdown.

use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long in-flight requests may take to finish after shutdown is requested.
pub const GRACE: Duration = Duration::from_secs(10);

/// A service's HTTPS port, bound but not yet serving: every service's
/// `Application::build` makes one, so the port is known (and can be 0, for tests, and read
/// back) before anything is served; `run_until_stopped` then serves it.
pub struct Server {
    listener: std::net::TcpListener,
    address: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) for `router` over `tls`.
    pub fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        router: Router,
    ) -> std::io::Result<Server> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        Ok(Server {
            listener,
            address,
            tls,
            router,
        })
    }

    /// The address actually bound.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish (up to
    /// [`GRACE`]).
    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let handle = axum_server::Handle::new();
        let watcher = handle.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            watcher.graceful_shutdown(Some(GRACE));
        });
        let config = axum_server::tls_rustls::RustlsConfig::from_config(self.tls);
        axum_server::from_tcp_rustls(self.listener, config)?
            .handle(handle)
            .serve(self.router.into_make_service())
            .await
    }
}

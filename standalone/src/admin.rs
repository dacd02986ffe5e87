//! The running `msghash`'s admin interface, and the client `msghash replay` and
//! `msghash status` use.
//!
//! It is HTTP on a Unix socket in the data directory (`<data dir>/admin.sock`, mode 0600),
//! not on the TLS port: only someone who can already read the data can rebuild it, a second
//! terminal finds it through the same `MSGHASH_DATA_DIR`, and nothing is exposed on the
//! network. The data files stay locked by the server, so the rebuild runs inside it.
//!
//! - `GET /status`: the [`projector::Status`] as JSON.
//! - `POST /replay[?drop_old=true][&max_rate=<events/s>]`: starts a replay (or attaches to
//!   the one running, whose settings stay) and streams JSON lines: `{"progress": …}` about
//!   once a second, then `{"done": report}` or `{"error": "…"}`. The replay belongs to the
//!   server: a client that goes away does not stop it.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use msghash_common::shutdown::Shutdown;
use msghash_common::{EventLog, ModelGenerations};
use projector::{Progress, ReplayReport, ReplaySettings, Status};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The socket's file name inside the data directory.
pub const SOCKET_FILE: &str = "admin.sock";

/// One line of the `POST /replay` stream.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayEvent {
    Started,
    Progress(Progress),
    Done(ReplayReport),
    Error(String),
}

impl ReplayEvent {
    fn is_final(&self) -> bool {
        matches!(self, ReplayEvent::Done(_) | ReplayEvent::Error(_))
    }
}

#[derive(Clone)]
struct Admin {
    log: Arc<dyn EventLog>,
    generations: Arc<dyn ModelGenerations>,
    settings: ReplaySettings,
    /// The replay running now (or the last one, finished).
    running: Arc<Mutex<Option<watch::Receiver<ReplayEvent>>>>,
    shutdown: Shutdown,
}

/// The admin routes.
fn router(admin: Admin) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/replay", post(replay))
        .with_state(admin)
}

/// Serves the admin interface on `<dir>/admin.sock` until `shutdown`, then removes the
/// socket. Call it only while holding the data directory's lock: a socket file left by a
/// killed process is removed first.
pub fn serve(
    dir: &Path,
    log: Arc<dyn EventLog>,
    generations: Arc<dyn ModelGenerations>,
    settings: ReplaySettings,
    shutdown: Shutdown,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let path = dir.join(SOCKET_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    let app = router(Admin {
        log,
        generations,
        settings,
        running: Arc::default(),
        shutdown: shutdown.clone(),
    });
    Ok(tokio::spawn(async move {
        let stop = shutdown.clone();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "admin socket failed");
        }
        let _ = std::fs::remove_file(&path);
    }))
}

async fn status(State(admin): State<Admin>) -> Response {
    match Status::read(admin.log.as_ref(), admin.generations.as_ref()).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct ReplayParams {
    #[serde(default)]
    drop_old: bool,
    max_rate: Option<std::num::NonZeroU32>,
}

async fn replay(State(admin): State<Admin>, Query(params): Query<ReplayParams>) -> Response {
    let rx = {
        let mut running = match admin.running.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match running.as_ref() {
            Some(rx) if !rx.borrow().is_final() => rx.clone(),
            _ => {
                let rx = start_replay(&admin, &params);
                *running = Some(rx.clone());
                rx
            }
        }
    };
    let lines = futures::stream::unfold((rx, false), |(mut rx, ended)| async move {
        if ended {
            return None;
        }
        let event = rx.borrow_and_update().clone();
        let last = event.is_final();
        let mut line = serde_json::to_string(&event).unwrap_or_else(|e| {
            serde_json::json!({ "error": format!("cannot encode progress: {e}") }).to_string()
        });
        line.push('\n');
        if !last && rx.changed().await.is_err() {
            // The replay task is gone without a last word (the server is stopping).
            return Some((Ok::<_, std::convert::Infallible>(line), (rx, true)));
        }
        Some((Ok(line), (rx, last)))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(axum::body::Body::from_stream(lines))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn start_replay(admin: &Admin, params: &ReplayParams) -> watch::Receiver<ReplayEvent> {
    let (tx, rx) = watch::channel(ReplayEvent::Started);
    let settings = ReplaySettings {
        drop_old: params.drop_old,
        max_rate: params.max_rate,
        ..admin.settings.clone()
    };
    let (log, generations, shutdown) = (
        admin.log.clone(),
        admin.generations.clone(),
        admin.shutdown.clone(),
    );
    tokio::spawn(async move {
        let progress_tx = tx.clone();
        let mut on_progress = move |p: &Progress| {
            progress_tx.send_replace(ReplayEvent::Progress(p.clone()));
        };
        let result =
            projector::replay::replay(log, generations, settings, &mut on_progress, shutdown).await;
        let last = match result {
            Ok(Some(report)) => {
                tracing::info!(%report, "replay finished");
                ReplayEvent::Done(report)
            }
            Ok(None) => ReplayEvent::Error(
                "the server is stopping; the replay resumes when `msghash replay` runs again"
                    .into(),
            ),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "replay failed");
                ReplayEvent::Error(format!("replay failed: {e:#}"))
            }
        };
        tx.send_replace(last);
    });
    rx
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// Why the client could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no msghash server is running on data directory {} (cannot connect to {}: {source}); \
         start `msghash` with the same MSGHASH_DATA_DIR first",
        dir.display(), socket.display()
    )]
    NoServer {
        dir: PathBuf,
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the server answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("talking to the server failed: {0}")]
    Transport(String),
    #[error("{0}")]
    Replay(String),
}

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

async fn request(
    dir: &Path,
    method: &str,
    uri: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
    let socket = dir.join(SOCKET_FILE);
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|source| ClientError::NoServer {
            dir: dir.to_path_buf(),
            socket: socket.clone(),
            source,
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(transport)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "admin connection ended");
        }
    });
    let request = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "msghash")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(transport)?;
    let response = sender.send_request(request).await.map_err(transport)?;
    if !response.status().is_success() {
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(ClientError::Refused { status, body });
    }
    Ok(response)
}

/// `msghash status`: the running server's status.
pub async fn fetch_status(dir: &Path) -> Result<Status, ClientError> {
    let body = request(dir, "GET", "/status")
        .await?
        .into_body()
        .collect()
        .await
        .map_err(transport)?
        .to_bytes();
    serde_json::from_slice(&body).map_err(transport)
}

/// `msghash replay`: asks the running server to replay, calls `on_progress` for every
/// progress line, returns the report once readers are on the new generation.
pub async fn run_replay(
    dir: &Path,
    args: &crate::ReplayArgs,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<ReplayReport, ClientError> {
    let mut uri = format!("/replay?drop_old={}", args.drop_old);
    if let Some(rate) = args.max_rate {
        uri.push_str(&format!("&max_rate={rate}"));
    }
    let mut body = request(dir, "POST", &uri).await?.into_body();
    let mut pending = Vec::new();
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(120), body.frame()).await {
            Err(_) => return Err(transport("no progress from the server for 120 s")),
            Ok(None) => {
                return Err(transport(
                    "the server closed the stream before the replay finished",
                ))
            }
            Ok(Some(frame)) => frame.map_err(transport)?,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            match serde_json::from_slice::<ReplayEvent>(&line).map_err(transport)? {
                ReplayEvent::Started => {}
                ReplayEvent::Progress(p) => on_progress(&p),
                ReplayEvent::Done(report) => return Ok(report),
                ReplayEvent::Error(e) => return Err(ClientError::Replay(e)),
            }
        }
    }
}

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
use futures::StreamExt;
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
    /// A new replay started for this request.
    Started,
    /// A replay was already running: this request follows it, with its settings.
    Attached,
    Progress(Progress),
    Done(ReplayReport),
    Error(String),
}

/// What a replay's stream has to tell: its newest progress report (and how many it made)
/// and, once it ended, its last word. A watch channel keeps only the newest value, so the
/// last progress report and the end are kept apart: a stream that wakes after both sends
/// both.
#[derive(Debug, Clone, Default)]
struct ReplayState {
    reports: u64,
    progress: Option<Progress>,
    /// `Done` or `Error`.
    end: Option<ReplayEvent>,
}

impl ReplayState {
    /// Records a progress report, `Done` or `Error`; nothing else is kept.
    fn record(&mut self, event: ReplayEvent) {
        match event {
            ReplayEvent::Progress(p) => {
                self.reports += 1;
                self.progress = Some(p);
            }
            ReplayEvent::Started | ReplayEvent::Attached => {}
            end => self.end = Some(end),
        }
    }
}

#[derive(Clone)]
struct Admin {
    log: Arc<dyn EventLog>,
    generations: Arc<dyn ModelGenerations>,
    settings: ReplaySettings,
    /// The replay running now (or the last one, finished).
    running: Arc<Mutex<Option<watch::Receiver<ReplayState>>>>,
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
    let (rx, attached) = {
        let mut running = match admin.running.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match running.as_ref() {
            // Running: no end yet, and its task still holds the sender (a task that died
            // without an end, by a panic, is not followed again).
            Some(rx) if rx.borrow().end.is_none() && rx.has_changed().is_ok() => (rx.clone(), true),
            _ => {
                let rx = start_replay(&admin, &params);
                *running = Some(rx.clone());
                (rx, false)
            }
        }
    };
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(axum::body::Body::from_stream(
            event_lines(rx, attached).map(Ok::<_, std::convert::Infallible>),
        ))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The JSON lines of a replay's events, as the server streams them: `started` (or
/// `attached`, when `attached`), every progress report it sees (always the last one), then
/// the end. Each item is one or more whole lines.
fn event_lines(
    rx: watch::Receiver<ReplayState>,
    attached: bool,
) -> impl futures::Stream<Item = String> {
    fn line(event: &ReplayEvent) -> String {
        let mut line = serde_json::to_string(event).unwrap_or_else(|e| {
            serde_json::json!({ "error": format!("cannot encode progress: {e}") }).to_string()
        });
        line.push('\n');
        line
    }
    // (receiver, reports sent, first item, ended)
    futures::stream::unfold(
        (rx, 0, true, false),
        move |(mut rx, sent, first, ended)| async move {
            if ended || (!first && rx.changed().await.is_err()) {
                // Ended, or the replay task is gone without a last word (the server is
                // stopping): the client says the stream closed early.
                return None;
            }
            let state = rx.borrow_and_update().clone();
            let mut chunk = String::new();
            if first {
                chunk.push_str(&line(&if attached {
                    ReplayEvent::Attached
                } else {
                    ReplayEvent::Started
                }));
            }
            if let Some(progress) = state.progress.filter(|_| state.reports > sent) {
                chunk.push_str(&line(&ReplayEvent::Progress(progress)));
            }
            let ended = state.end.is_some();
            if let Some(end) = &state.end {
                chunk.push_str(&line(end));
            }
            Some((chunk, (rx, state.reports, false, ended)))
        },
    )
}

fn start_replay(admin: &Admin, params: &ReplayParams) -> watch::Receiver<ReplayState> {
    let (tx, rx) = watch::channel(ReplayState::default());
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
            progress_tx.send_modify(|state| state.record(ReplayEvent::Progress(p.clone())));
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
        tx.send_modify(|state| state.record(last));
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

/// `msghash replay`: asks the running server to replay, calls `on_event` for every line
/// before the last (`Started` or `Attached`, then `Progress`), returns the report once
/// readers are on the new generation.
pub async fn run_replay(
    dir: &Path,
    args: &crate::ReplayArgs,
    on_event: &mut dyn FnMut(&ReplayEvent),
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
                ReplayEvent::Done(report) => return Ok(report),
                ReplayEvent::Error(e) => return Err(ClientError::Replay(e)),
                event => on_event(&event),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tx: &watch::Sender<ReplayState>, event: ReplayEvent) {
        tx.send_modify(|state| state.record(event));
    }

    fn progress(applied: u64) -> ReplayEvent {
        ReplayEvent::Progress(Progress {
            generation: 1,
            phase: projector::Phase::Switched,
            applied,
            elapsed_secs: 0.5,
            partitions: Vec::new(),
        })
    }

    fn done(applied: u64) -> ReplayEvent {
        ReplayEvent::Done(ReplayReport {
            generation: 1,
            resumed: false,
            applied,
            dead_lettered: 0,
            elapsed_secs: 0.6,
            adopted: true,
            dropped: Vec::new(),
        })
    }

    /// The events in a chunk of lines.
    fn events(chunk: &str) -> Vec<ReplayEvent> {
        chunk
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON event"))
            .collect()
    }

    /// Whether `events` are a progress of `applied` events, then the end reporting as many.
    fn ends_with_progress_and_done(events: &[ReplayEvent], applied: u64) -> bool {
        matches!(
            events,
            [.., ReplayEvent::Progress(p), ReplayEvent::Done(r)]
                if p.applied == applied && r.applied == applied
        )
    }

    #[tokio::test]
    async fn the_last_progress_is_streamed_even_when_the_end_follows_before_the_stream_runs() {
        let (tx, rx) = watch::channel(ReplayState::default());
        record(&tx, progress(42));
        record(&tx, done(42));
        drop(tx);
        let chunks: Vec<String> = event_lines(rx, false).collect().await;
        let all = events(&chunks.concat());
        assert!(matches!(all.first(), Some(ReplayEvent::Started)), "{all:?}");
        assert!(ends_with_progress_and_done(&all, 42), "{all:?}");
    }

    #[tokio::test]
    async fn a_stream_that_wakes_after_the_last_progress_and_the_end_sends_both() {
        let (tx, rx) = watch::channel(ReplayState::default());
        record(&tx, progress(1));
        let mut lines = std::pin::pin!(event_lines(rx, true));
        let first = events(&lines.next().await.expect("a first chunk"));
        assert!(
            matches!(first.as_slice(), [ReplayEvent::Attached, ReplayEvent::Progress(p)] if p.applied == 1),
            "{first:?}"
        );
        record(&tx, progress(42));
        record(&tx, done(42));
        let rest: Vec<String> = lines.collect().await;
        let rest = events(&rest.concat());
        assert_eq!(rest.len(), 2, "{rest:?}");
        assert!(ends_with_progress_and_done(&rest, 42), "{rest:?}");
    }
}

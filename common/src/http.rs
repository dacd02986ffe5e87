//! What every HTTP service of msghash shares: the error type and its one mapping to HTTP,
//! the bounded JSON body reader, and the TLS server with graceful shutdown.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Every way a request can fail, as a client sees it. The text of an internal error never
/// reaches a client: it is logged where it happens, and the client gets a fixed sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("Message not found")]
    MessageNotFound,
    #[error("Not found")]
    RouteNotFound,
    #[error("Method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("Request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize, drained: bool },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("Service temporarily unavailable, retry later")]
    Unavailable { retry_after_secs: u32 },
    #[error("Internal server error")]
    Internal,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MessageNotFound | ApiError::RouteNotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status(),
            Json(serde_json::json!({ "err_msg": self.to_string() })),
        )
            .into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Unavailable { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            // The rest of an oversized body is still on the wire: close after answering so
            // it is not read as the next request.
            ApiError::PayloadTooLarge { drained: false, .. } => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// Unknown routes answer in the same JSON shape as every other error.
pub async fn route_not_found() -> ApiError {
    ApiError::RouteNotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Adds the JSON 404/405 fallbacks to a router.
pub fn with_error_fallbacks(router: Router) -> Router {
    router
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// How much of an oversized body is read and thrown away so that the client, still
/// sending, gets the 413 instead of a reset connection.
pub const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Reads a JSON body of at most `limit` bytes.
///
/// 415 unless the content type is JSON; 413 over the limit (after draining up to
/// [`DRAIN_LIMIT`] bytes, or at once when the client waits for `100 Continue`); 400 when the
/// body is not a JSON object that deserializes into `T`.
pub async fn read_json<T: DeserializeOwned>(
    request: Request,
    limit: usize,
    bad_body: &'static str,
) -> Result<T, ApiError> {
    let (parts, body) = request.into_parts();
    if !is_json(&parts.headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if declared.is_some_and(|n| n > limit as u64) && expects_continue {
        // The client has not sent the body yet and will not once it sees the answer.
        return Err(ApiError::PayloadTooLarge {
            limit,
            drained: true,
        });
    }
    let bytes = collect_bounded(body, limit).await?;
    // Only a JSON object is a request body: serde would also read a struct from an array.
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(value @ serde_json::Value::Object(_)) => {
            serde_json::from_value(value).map_err(|_| ApiError::BadRequest(bad_body))
        }
        _ => Err(ApiError::BadRequest(bad_body)),
    }
}

async fn collect_bounded(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut body = body;
    let mut buf = Vec::new();
    let mut seen = 0usize;
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    loop {
        let frame = if seen > limit {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(f) => f,
                Err(_) => {
                    return Err(ApiError::PayloadTooLarge {
                        limit,
                        drained: false,
                    })
                }
            }
        } else {
            body.frame().await
        };
        match frame {
            None => break,
            Some(Err(_)) if seen > limit => {
                return Err(ApiError::PayloadTooLarge {
                    limit,
                    drained: false,
                })
            }
            Some(Err(_)) => return Err(ApiError::BadRequest("Request body could not be read")),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                seen = seen.saturating_add(data.len());
                if seen <= limit {
                    buf.extend_from_slice(&data);
                } else if seen > DRAIN_LIMIT {
                    return Err(ApiError::PayloadTooLarge {
                        limit,
                        drained: false,
                    });
                }
            }
        }
    }
    if seen > limit {
        return Err(ApiError::PayloadTooLarge {
            limit,
            drained: true,
        });
    }
    Ok(buf)
}

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

/// `/health/live` (the process answers) and `/health/ready` (`ready()` says its
/// dependencies answer; 503 otherwise).
pub fn health_routes<F, Fut>(ready: F) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    use axum::routing::get;
    Router::new()
        .route(
            "/health/live",
            get(|| async { Json(serde_json::json!({"status": "live"})) }),
        )
        .route(
            "/health/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    match tokio::time::timeout(Duration::from_secs(2), ready()).await {
                        Ok(true) => Json(serde_json::json!({"status": "ready"})).into_response(),
                        _ => ApiError::Unavailable {
                            retry_after_secs: 1,
                        }
                        .into_response(),
                    }
                }
            }),
        )
}

/// Everything a service serves on its port: its own `routes`, `/health/live` and
/// `/health/ready` (from `ready`), `/metrics`, the JSON 404/405 fallbacks, all observed
/// under `service` (request id, one log event per request, HTTP metrics). Installs the
/// metrics recorder if that has not happened yet.
pub fn service_app<F, Fut>(service: &'static str, routes: Router, ready: F) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    crate::metrics::install();
    crate::metrics::observe(
        with_error_fallbacks(
            routes
                .merge(health_routes(ready))
                .merge(crate::metrics::routes()),
        ),
        service,
    )
}

/// Readiness of an event log and a read model: both answer (the log an end-offset
/// request, the model an applied-offset read).
pub fn log_and_model_ready(
    log: Arc<dyn crate::EventLog>,
    model: Arc<dyn crate::ReadModel>,
) -> impl Fn() -> futures::future::BoxFuture<'static, bool> + Clone + Send + Sync + 'static {
    move || {
        let (log, model) = (log.clone(), model.clone());
        Box::pin(async move {
            let (l, m) = tokio::join!(log.end_offset(0), model.applied_offset(0));
            l.is_ok() && m.is_ok()
        })
    }
}

/// Readiness of an event log: it answers an end-offset request.
pub fn log_ready(
    log: Arc<dyn crate::EventLog>,
) -> impl Fn() -> futures::future::BoxFuture<'static, bool> + Clone + Send + Sync + 'static {
    move || {
        let log = log.clone();
        Box::pin(async move { log.end_offset(0).await.is_ok() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    struct Body1 {
        message: String,
    }

    async fn body_of(response: Response) -> serde_json::Value {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("json")
    }

    #[tokio::test]
    async fn every_error_is_json_with_err_msg_and_no_internal_text() {
        let cases = [
            (ApiError::MessageNotFound, 404, "Message not found"),
            (ApiError::RouteNotFound, 404, "Not found"),
            (ApiError::MethodNotAllowed, 405, "Method not allowed"),
            (ApiError::BadRequest("bad"), 400, "bad"),
            (
                ApiError::PayloadTooLarge {
                    limit: 10,
                    drained: true,
                },
                413,
                "Request body exceeds the limit of 10 bytes",
            ),
            (
                ApiError::UnsupportedMediaType,
                415,
                "Content-Type must be application/json",
            ),
            (
                ApiError::Unavailable {
                    retry_after_secs: 3,
                },
                503,
                "Service temporarily unavailable, retry later",
            ),
            (ApiError::Internal, 500, "Internal server error"),
        ];
        for (error, status, text) in cases {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(
                body_of(response).await,
                serde_json::json!({ "err_msg": text })
            );
        }
        let response = ApiError::Unavailable {
            retry_after_secs: 3,
        }
        .into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        let response = ApiError::PayloadTooLarge {
            limit: 1,
            drained: false,
        }
        .into_response();
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }

    fn request(content_type: Option<&str>, body: Body) -> Request {
        let mut b = axum::http::Request::post("/messages");
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        b.body(body).expect("request")
    }

    async fn read(r: Request, limit: usize) -> Result<Body1, ApiError> {
        tokio::time::timeout(Duration::from_secs(5), read_json(r, limit, "bad body"))
            .await
            .expect("never hangs")
    }

    #[tokio::test]
    async fn json_bodies_are_checked_in_order_type_size_shape() {
        let ok = r#"{"message":"hi","extra":1}"#;
        assert_eq!(
            read(request(Some("application/json"), ok.into()), 100).await,
            Ok(Body1 {
                message: "hi".into()
            })
        );
        assert_eq!(
            read(request(Some("application/problem+json"), ok.into()), 100)
                .await
                .map(|b| b.message),
            Ok("hi".into())
        );
        assert_eq!(
            read(request(None, ok.into()), 100).await,
            Err(ApiError::UnsupportedMediaType)
        );
        assert_eq!(
            read(request(Some("text/json-ish"), ok.into()), 100).await,
            Err(ApiError::UnsupportedMediaType)
        );
        assert_eq!(
            read(request(Some("application/json"), ok.into()), 10).await,
            Err(ApiError::PayloadTooLarge {
                limit: 10,
                drained: true
            })
        );
        for bad in [r#"["hi"]"#, "\"hi\"", "{", r#"{"message":1}"#, ""] {
            assert_eq!(
                read(request(Some("application/json"), bad.into()), 100).await,
                Err(ApiError::BadRequest("bad body")),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn an_oversized_body_behind_expect_continue_is_refused_without_reading_it() {
        // A body that never arrives: reading it would hang the test.
        let never =
            Body::from_stream(futures::stream::pending::<Result<Vec<u8>, std::io::Error>>());
        let mut r = request(Some("application/json"), never);
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(8 * 1024 * 1024));
        r.headers_mut()
            .insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        assert_eq!(
            read(r, 1024).await,
            Err(ApiError::PayloadTooLarge {
                limit: 1024,
                drained: true
            })
        );
    }
}

//! `/health/live` and `/health/ready`, and the readiness checks the services use.

use super::openapi::{ErrorBody, HealthBody};
use super::ApiError;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

/// A readiness check: true when the service's dependencies answer.
type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// `/health/live` (the process answers) and `/health/ready` (`ready()` says its
/// dependencies answer; 503 otherwise).
pub fn health_routes<F, Fut>(ready_check: F) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let check: ReadyCheck = Arc::new(move || Box::pin(ready_check()));
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(check)
}

/// Liveness: the process serves.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "health",
    operation_id = "health_live",
    responses((status = 200, description = "The process serves", body = HealthBody)),
)]
pub(crate) async fn live() -> Json<HealthBody> {
    Json(HealthBody {
        status: "live".into(),
    })
}

/// Readiness: the service's dependencies answer (ingest: the event log; query and
/// `msghash`: the event log and the read model).
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "health",
    operation_id = "health_ready",
    responses(
        (status = 200, description = "Ready to serve", body = HealthBody),
        (status = 503, description = "A dependency does not answer", body = ErrorBody),
    ),
)]
pub(crate) async fn ready(State(check): State<ReadyCheck>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), check()).await {
        Ok(true) => Json(HealthBody {
            status: "ready".into(),
        })
        .into_response(),
        _ => ApiError::Unavailable {
            retry_after_secs: 1,
        }
        .into_response(),
    }
}
/// Readiness of an event log and a read model: both answer (the log [`crate::EventLog::ready`],
/// the model an applied-offset read).
pub fn log_and_model_ready(
    log: Arc<dyn crate::EventLog>,
    model: Arc<dyn crate::ReadModel>,
) -> impl Fn() -> futures::future::BoxFuture<'static, bool> + Clone + Send + Sync + 'static {
    move || {
        let (log, model) = (log.clone(), model.clone());
        Box::pin(async move {
            let (l, m) = tokio::join!(log.ready(), model.applied_offset(0));
            if let Err(e) = &l {
                tracing::info!(error = %e, "not ready: event log");
            }
            if let Err(e) = &m {
                tracing::info!(error = %e, "not ready: read model");
            }
            l.is_ok() && m.is_ok()
        })
    }
}

/// Readiness of an event log: [`crate::EventLog::ready`].
pub fn log_ready(
    log: Arc<dyn crate::EventLog>,
) -> impl Fn() -> futures::future::BoxFuture<'static, bool> + Clone + Send + Sync + 'static {
    move || {
        let log = log.clone();
        Box::pin(async move {
            let ready = log.ready().await;
            if let Err(e) = &ready {
                tracing::info!(error = %e, "not ready: event log");
            }
            ready.is_ok()
        })
    }
}

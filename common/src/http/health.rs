//! `/health/live` and `/health/ready`, and the readiness checks the services use.

use super::ApiError;
use axum::response::IntoResponse;
use axum::{Json, Router};
use std::sync::Arc;
use std::time::Duration;

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

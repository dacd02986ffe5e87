//! `/health/live` and `/health/ready`, and the readiness checks the services use.

use super::openapi::{ErrorBody, HealthBody};
use super::ApiError;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::{BoxFuture, FutureExt, Shared};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a readiness check answers the probes that come after it started: a flood of
/// probes (`/health/ready` is public behind the edge) runs the dependency checks at most
/// a few times a second, not once per probe, and a change is seen this much later at most.
const CHECK_FRESH: Duration = Duration::from_millis(250);

/// A readiness check shared by the probes of [`CHECK_FRESH`] since it started.
type SharedCheck = Shared<BoxFuture<'static, bool>>;

/// The readiness check: true when the service's dependencies answer. Concurrent and
/// closely following probes share one run of it.
#[derive(Clone)]
pub(crate) struct ReadyCheck {
    check: Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>,
    last: Arc<Mutex<Option<(Instant, SharedCheck)>>>,
}

impl ReadyCheck {
    /// The run of the check that a probe now waits for: the last one if it started within
    /// [`CHECK_FRESH`], finished or not, else a new one.
    fn run(&self) -> SharedCheck {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match &*last {
            Some((started, run)) if started.elapsed() < CHECK_FRESH => run.clone(),
            _ => {
                let run = (self.check)().shared();
                *last = Some((Instant::now(), run.clone()));
                run
            }
        }
    }
}

/// `/health/live` (the process answers) and `/health/ready` (`ready()` says its
/// dependencies answer; 503 otherwise).
pub fn health_routes<F, Fut>(ready_check: F) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let check = ReadyCheck {
        check: Arc::new(move || Box::pin(ready_check())),
        last: Arc::default(),
    };
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
    match tokio::time::timeout(Duration::from_secs(2), check.run()).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tower::ServiceExt;

    /// A flood of probes (`/health/ready` is public behind the edge) runs the dependency
    /// checks a few times, not once per probe, and a change of readiness is still seen.
    #[tokio::test]
    async fn concurrent_probes_share_one_check_and_a_change_is_seen_after_it() {
        let checks = Arc::new(AtomicUsize::new(0));
        let up = Arc::new(AtomicBool::new(true));
        let router = health_routes({
            let (checks, up) = (checks.clone(), up.clone());
            move || {
                let (checks, up) = (checks.clone(), up.clone());
                async move {
                    checks.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    up.load(Ordering::SeqCst)
                }
            }
        });
        let probe = |router: Router| async move {
            let request = Request::get("/health/ready")
                .body(Body::empty())
                .expect("request");
            router.oneshot(request).await.expect("answer").status()
        };
        let statuses = futures::future::join_all((0..100).map(|_| probe(router.clone()))).await;
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
        let ran = checks.load(Ordering::SeqCst);
        assert!(ran <= 2, "100 concurrent probes ran {ran} checks");

        up.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while probe(router.clone()).await != StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                std::time::Instant::now() < deadline,
                "the change was never seen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

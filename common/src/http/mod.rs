//! What every HTTP service of msghash shares:
//! - [`error`]: the error type and its one mapping to HTTP;
//! - [`body`]: the bounded JSON body reader;
//! - [`serve`]: the TLS server, bound first and served until shutdown;
//! - [`health`]: the health routes and readiness checks;
//! - [`guard`]: per-client rate limits and API keys;
//! - [`openapi`]: the OpenAPI document every service serves at `/openapi.json`;
//! - [`observe`]: the layers around every route (request id, tracing span, request log
//!   line and metrics, timeouts);
//! - [`service_app`] (here): a service's routes with health, `/metrics`, the JSON fallbacks
//!   and request observation around them.

pub mod body;
pub mod error;
pub mod guard;
pub mod health;
pub mod observe;
pub mod openapi;
pub mod serve;

pub use body::{decode_json, read_json, BodyLimit, JsonBody, RequestBody, DRAIN_LIMIT};
pub use error::{method_not_allowed, route_not_found, with_error_fallbacks, ApiError};
pub use guard::{ApiKeys, Guards, KeyScope, RateLimit};
pub use health::{health_routes, log_and_model_ready, log_ready};
pub use observe::{fronted, observe, Front, Fronted, REQUEST_ID, UNMATCHED_ROUTE};
pub use openapi::{openapi_route, ErrorBody};
pub use serve::{BodyTimeout, ConnectionLimits, Server, GRACE};

use axum::Router;

/// Everything a service serves on its port: its own `routes`, `/health/live` and
/// `/health/ready` (from `ready`), `/metrics`, the JSON 404/405 fallbacks, all observed
/// under `service` (see [`observe`]). Installs the
/// metrics recorder if that has not happened yet.
pub fn service_app<F, Fut>(service: &'static str, routes: Router, ready: F) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    crate::metrics::install();
    observe(
        with_error_fallbacks(
            routes
                .merge(health_routes(ready))
                .merge(crate::metrics::routes()),
        ),
        service,
    )
}

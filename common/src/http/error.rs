//! [`ApiError`]: every way a request can fail, as a client sees it, and its one mapping to
//! HTTP (a JSON `{"err_msg": ...}` body, the status, `Retry-After` where it helps).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};

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
    #[error("Missing or invalid API key")]
    Unauthorized,
    #[error("Too many requests, retry later")]
    TooManyRequests { retry_after_secs: u32 },
    #[error("Message too large for the event log")]
    EventTooLarge,
    #[error("Request body not received in time")]
    BodyTimeout,
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
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge { .. } | ApiError::EventTooLarge => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
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
            ApiError::Unavailable { retry_after_secs }
            | ApiError::TooManyRequests { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of an oversized body is still on the wire: close after answering so
            // it is not read as the next request.
            ApiError::PayloadTooLarge { drained: false, .. } | ApiError::BodyTimeout => {
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(response: Response) -> serde_json::Value {
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await;
        serde_json::from_slice(&body.expect("body")).expect("json")
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
            (ApiError::Unauthorized, 401, "Missing or invalid API key"),
            (
                ApiError::TooManyRequests {
                    retry_after_secs: 2,
                },
                429,
                "Too many requests, retry later",
            ),
            (
                ApiError::EventTooLarge,
                413,
                "Message too large for the event log",
            ),
            (
                ApiError::BodyTimeout,
                408,
                "Request body not received in time",
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
        let response = ApiError::TooManyRequests {
            retry_after_secs: 2,
        }
        .into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        let response = ApiError::Unauthorized.into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let response = ApiError::PayloadTooLarge {
            limit: 1,
            drained: false,
        }
        .into_response();
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }
}

//! The request observer and `/metrics` of every service, through a router in process:
//! request ids, and HTTP metrics under the route template, never the raw path.

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use msghash_common::http::{observe, REQUEST_ID, UNMATCHED_ROUTE};
use msghash_common::metrics::{install, names, routes, CONTENT_TYPE};
use msghash_testkit::exposition;
use msghash_testkit::router::call_text;
use tower::ServiceExt;

fn app() -> Router {
    install();
    let routes = Router::new()
        .route("/things/{id}", get(|| async { "thing" }))
        .merge(routes());
    observe(msghash_common::http::with_error_fallbacks(routes), "unit")
}

async fn call(app: &Router, request: axum::http::Request<Body>) -> Response {
    app.clone().oneshot(request).await.expect("infallible")
}

async fn scrape(app: &Router) -> exposition::Exposition {
    let request = axum::http::Request::get("/metrics")
        .body(Body::empty())
        .expect("request");
    let (_, headers, text) = call_text(app, request).await;
    assert_eq!(headers[header::CONTENT_TYPE], CONTENT_TYPE);
    exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[tokio::test]
async fn requests_get_an_id_and_count_under_their_route_template() {
    let app = app();
    let labels = [
        ("service", "unit"),
        ("route", "/things/{id}"),
        ("method", "GET"),
        ("status", "200"),
    ];
    let before = scrape(&app).await.sum(names::HTTP_REQUESTS_TOTAL, &labels);

    let response = call(
        &app,
        axum::http::Request::get("/things/42")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    let id = response.headers()[&REQUEST_ID].to_str().expect("ascii");
    assert_eq!(id.len(), 36, "a generated uuid: {id}");

    // A client's id is echoed; a malformed one is replaced.
    let response = call(
        &app,
        axum::http::Request::get("/things/7")
            .header(&REQUEST_ID, "client-id-1")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(response.headers()[&REQUEST_ID], "client-id-1");
    let response = call(
        &app,
        axum::http::Request::get("/nowhere")
            .header(&REQUEST_ID, "has space")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(response.status(), 404);
    assert_ne!(response.headers()[&REQUEST_ID], "has space");
    let response = call(
        &app,
        axum::http::Request::delete("/things/1")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(response.status(), 405);

    let after = scrape(&app).await;
    assert!(
        after.sum(names::HTTP_REQUESTS_TOTAL, &labels) >= before + 2.0,
        "two GETs counted under the template"
    );
    assert!(
        !after.has(names::HTTP_REQUESTS_TOTAL, &[("route", "/things/42")]),
        "never the raw path"
    );
    assert!(after.has(
        names::HTTP_REQUESTS_TOTAL,
        &[("route", UNMATCHED_ROUTE), ("status", "404")]
    ));
    assert!(after.has(
        names::HTTP_REQUESTS_TOTAL,
        &[("method", "DELETE"), ("status", "405")]
    ));
    assert_eq!(after.type_of(names::HTTP_REQUESTS_TOTAL), Some("counter"));
    assert_eq!(
        after.type_of(names::HTTP_REQUEST_DURATION_SECONDS),
        Some("histogram")
    );
    let bucket = format!("{}_bucket", names::HTTP_REQUEST_DURATION_SECONDS);
    for le in ["0.001", "10", "+Inf"] {
        assert!(
            after.has(
                &bucket,
                &[("service", "unit"), ("route", "/things/{id}"), ("le", le)]
            ),
            "bucket le={le}"
        );
    }
}

#[derive(serde::Deserialize)]
struct Note {
    #[allow(dead_code)]
    text: String,
}

impl msghash_common::http::RequestBody for Note {
    const INVALID: &'static str = "a note";
}

/// A router whose one handler never finishes, and one that reads a JSON body.
fn stalling_app() -> Router {
    use axum::routing::post;
    use msghash_common::http::{BodyLimit, JsonBody};
    let routes = Router::new()
        .route("/stall", get(std::future::pending::<&'static str>))
        .route(
            "/notes",
            post(|JsonBody(_): JsonBody<Note>| async { "noted" }),
        )
        .with_state(BodyLimit(1024));
    observe(msghash_common::http::with_error_fallbacks(routes), "unit")
}

#[tokio::test(start_paused = true)]
async fn a_stalled_request_gets_a_json_503_and_a_stalled_body_a_408() {
    use msghash_common::http::observe::{BODY_TIMEOUT, REQUEST_TIMEOUT};
    let app = stalling_app();
    let started = tokio::time::Instant::now();
    let request = axum::http::Request::get("/stall")
        .body(Body::empty())
        .expect("request");
    let (status, headers, text) = call_text(&app, request).await;
    assert_eq!(status, 503);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert!(headers.contains_key(&REQUEST_ID));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).expect("json"),
        serde_json::json!({ "err_msg": "Service temporarily unavailable, retry later" })
    );
    assert!(started.elapsed() >= REQUEST_TIMEOUT);

    // A client that sends its headers and then nothing of the body.
    let started = tokio::time::Instant::now();
    let never = Body::from_stream(futures::stream::pending::<Result<Vec<u8>, std::io::Error>>());
    let request = axum::http::Request::post("/notes")
        .header(header::CONTENT_TYPE, "application/json")
        .body(never)
        .expect("request");
    let (status, headers, text) = call_text(&app, request).await;
    assert_eq!(status, 408, "{text}");
    assert_eq!(headers[header::CONNECTION], "close");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).expect("json"),
        serde_json::json!({ "err_msg": "Request body not received in time" })
    );
    let waited = started.elapsed();
    assert!(
        waited >= BODY_TIMEOUT && waited < REQUEST_TIMEOUT,
        "{waited:?}"
    );

    let request = axum::http::Request::post("/notes")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"text":"hi"}"#))
        .expect("request");
    let (status, _, text) = call_text(&app, request).await;
    assert_eq!((status.as_u16(), text.as_str()), (200, "noted"));
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let app = app();
    let cached = Router::new().route(
        "/cached",
        get(|| async {
            (
                [(header::CACHE_CONTROL, "public, immutable")],
                "same for ever",
            )
        }),
    );
    let cached = observe(cached, "unit");
    for (router, path, cache) in [
        (&app, "/things/1", "no-store"),
        (&app, "/nowhere", "no-store"),
        (&cached, "/cached", "public, immutable"),
    ] {
        let request = axum::http::Request::get(path)
            .body(Body::empty())
            .expect("request");
        let response = call(router, request).await;
        let headers = response.headers();
        assert_eq!(
            headers[header::STRICT_TRANSPORT_SECURITY],
            "max-age=31536000",
            "{path}"
        );
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
        assert_eq!(
            headers[header::CACHE_CONTROL],
            cache,
            "{path}: the handler's own wins"
        );
    }
}

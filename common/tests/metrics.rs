//! The request observer and `/metrics` of every service, through a router in process:
//! request ids, and HTTP metrics under the route template, never the raw path.

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use msghash_common::metrics::{
    install, names, observe, routes, CONTENT_TYPE, REQUEST_ID, UNMATCHED_ROUTE,
};
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

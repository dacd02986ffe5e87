//! query's `GET /openapi.json`: an OpenAPI 3.1 document of its own routes (the GETs, the
//! `/message/{digest}` and `/all-messages` aliases) and health; and at `/openapi/edge.json`
//! the whole API's, which the edge serves as its `/openapi.json`.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use msghash_common::adapters::embedded::{EmbeddedLog, EmbeddedModel};
use msghash_testkit::router::{call, get_message, openapi};
use std::num::NonZeroU32;
use std::sync::Arc;

fn app(dir: &std::path::Path) -> axum::Router {
    let log = EmbeddedLog::open(dir, NonZeroU32::MIN).expect("log");
    let model = EmbeddedModel::open(dir).expect("model");
    query::app(
        Arc::new(log),
        Arc::new(model),
        query::QuerySettings::default(),
    )
}

#[tokio::test]
async fn openapi_json_describes_the_gets_their_aliases_and_health() {
    let dir = tempfile::tempdir().expect("temp dir");
    let app = app(dir.path());

    let (doc, operations) = openapi(&app).await;
    assert_eq!(
        operations,
        [
            "GET /all-messages",
            "GET /health/live",
            "GET /health/ready",
            "GET /message/{digest}",
            "GET /messages",
            "GET /messages/{digest}",
            "GET /openapi.json",
            "GET /openapi/edge.json",
        ]
    );
    assert_eq!(doc, query::openapi());

    for path in ["/messages/{digest}", "/message/{digest}"] {
        let get = &doc["paths"][path]["get"];
        let param = &get["parameters"][0];
        assert_eq!(param["name"], "digest");
        assert_eq!(param["in"], "path");
        // What Digest::parse accepts: 64 hex characters of either case.
        assert_eq!(param["schema"]["pattern"], "^[0-9a-fA-F]{64}$");
        let statuses: Vec<&String> = get["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .collect();
        assert_eq!(statuses, ["200", "401", "404", "429", "503"], "{path}");
    }
    for path in ["/messages", "/all-messages"] {
        let get = &doc["paths"][path]["get"];
        let statuses: Vec<&String> = get["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .collect();
        assert_eq!(statuses, ["200", "400", "401", "429", "503"], "{path}");
    }
    // A digest in upper case is looked up like the lower-case one (404 here: nothing stored),
    // and a malformed one names no message: 404 too, as documented.
    let (status, _, body) = get_message(&app, &"AB".repeat(32)).await;
    assert_eq!(
        (status, body["err_msg"].as_str()),
        (StatusCode::NOT_FOUND, Some("Message not found"))
    );
    let (status, _, _) = get_message(&app, "not-a-digest").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_edge_document_is_the_whole_api() {
    let dir = tempfile::tempdir().expect("temp dir");
    let app = app(dir.path());
    let request = Request::get(query::EDGE_OPENAPI_PATH)
        .body(Body::empty())
        .expect("request");
    let (status, _, doc) = call(&app, request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc, query::full_openapi());
    assert_eq!(doc["openapi"], "3.1.0");
    let messages = doc["paths"]["/messages"].as_object().expect("/messages");
    let mut methods: Vec<&String> = messages.keys().collect();
    methods.sort();
    assert_eq!(methods, ["get", "post"]);
    assert!(doc["paths"]["/messages/{digest}"]["get"].is_object());
    // Both GETs of a message take the digest a 201 answers.
    let links = &doc["paths"]["/messages"]["post"]["responses"]["201"]["links"];
    for (link, path) in [
        ("GetMessage", "/messages/{digest}"),
        ("GetMessageAlias", "/message/{digest}"),
    ] {
        assert_eq!(
            links[link]["operationId"],
            doc["paths"][path]["get"]["operationId"]
        );
    }
    assert!(doc["paths"].get(query::EDGE_OPENAPI_PATH).is_none());
}

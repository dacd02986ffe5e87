//! ingest's `GET /openapi.json`: an OpenAPI 3.1 document of its own route (`POST /messages`)
//! and health, with every status the route answers.

use ingest::IngestSettings;
use msghash_common::adapters::embedded::EmbeddedLog;
use msghash_testkit::router::openapi;
use std::num::NonZeroU32;
use std::sync::Arc;

#[tokio::test]
async fn openapi_json_describes_the_post_and_health() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = EmbeddedLog::open(dir.path(), NonZeroU32::MIN).expect("log");
    let app = ingest::app(Arc::new(log), IngestSettings::default());

    let (doc, operations) = openapi(&app).await;
    assert_eq!(
        operations,
        [
            "GET /health/live",
            "GET /health/ready",
            "GET /openapi.json",
            "POST /messages"
        ]
    );
    assert_eq!(doc, ingest::openapi());

    let post = &doc["paths"]["/messages"]["post"];
    let body = &post["requestBody"]["content"]["application/json"]["schema"]["$ref"];
    assert_eq!(body, "#/components/schemas/PostMessage");
    assert_eq!(
        doc["components"]["schemas"]["PostMessage"]["required"],
        serde_json::json!(["message"])
    );
    let statuses: Vec<&String> = post["responses"]
        .as_object()
        .expect("responses")
        .keys()
        .collect();
    assert_eq!(
        statuses,
        ["201", "400", "401", "408", "413", "415", "429", "503"]
    );
    assert_eq!(
        post["responses"]["429"]["headers"]["Retry-After"]["$ref"],
        "#/components/headers/Retry-After"
    );
    assert!(post["responses"]["201"]["headers"]["Location"].is_object());
    assert_eq!(
        post["responses"]["503"]["headers"]["Retry-After"]["$ref"],
        "#/components/headers/Retry-After"
    );
    for status in ["400", "401", "408", "413", "415", "429", "503"] {
        let schema = &post["responses"][status]["content"]["application/json"]["schema"];
        assert_eq!(schema["$ref"], "#/components/schemas/ErrorBody", "{status}");
    }
}

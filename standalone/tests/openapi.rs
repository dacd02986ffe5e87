//! `msghash`'s `GET /openapi.json`: the whole API, ingest's POST and query's GETs, the same
//! document the edge of the distributed stack serves.

use msghash_common::adapters::embedded::{EmbeddedGenerations, EmbeddedLog};
use msghash_common::generation::LiveModel;
use msghash_testkit::router::openapi;
use std::num::NonZeroU32;
use std::sync::Arc;

#[tokio::test]
async fn openapi_json_describes_the_whole_api() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Arc::new(EmbeddedLog::open(dir.path(), NonZeroU32::MIN).expect("log"));
    let generations = Arc::new(EmbeddedGenerations::open(dir.path()).expect("generations"));
    let model = LiveModel::open(generations).await.expect("model");
    let app = msghash::app(
        log,
        model,
        ingest::IngestSettings::default(),
        query::QuerySettings::default(),
    );

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
            "POST /messages",
        ]
    );
    assert_eq!(doc, query::full_openapi());
    assert_eq!(doc["info"]["title"], "msghash");
}

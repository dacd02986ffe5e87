//! One place that sets up logging: JSON lines on stdout by default, text on request.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `format` is `json` or `text`; `filter` uses
/// EnvFilter syntax. Calling it twice is harmless (the second call does nothing).
pub fn init(format: &str, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let _ = if format == "text" {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    };
}

/// For tests: logs only when `TEST_LOG` is set, so test output stays readable.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init("text", "debug");
    }
}

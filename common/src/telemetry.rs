//! One place that sets up logging: JSON lines on stdout by default, text on request, and
//! optionally the same lines in daily-rotated files too.

use std::io::IsTerminal;
use std::path::PathBuf;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How log lines look on stdout (and in the log files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line: for machines, the default of the services.
    Json,
    /// Human-readable lines: the default of `msghash`.
    Text,
}

/// Installs the global subscriber, logging to stdout; `filter` uses EnvFilter syntax.
/// Calling it twice is harmless (the second call does nothing). Keep the returned guard
/// until the process ends: stdout is written by a background thread, which dropping the
/// guard flushes and stops.
pub fn init(format: LogFormat, filter: &str) -> LogGuard {
    // Without files nothing can fail.
    init_with_files(format, filter, None).unwrap_or_default()
}

/// Log files beside stdout: `<dir>/<prefix>.<YYYY-MM-DD>.log`, a new one each day, the
/// newest `retention` kept.
#[derive(Debug, Clone)]
pub struct LogFiles {
    pub dir: PathBuf,
    pub prefix: String,
    pub retention: usize,
}

/// Keeps the log writers (stdout's and the files') alive. Dropping it flushes what is still
/// buffered, so keep it until the process ends (in `main`).
#[must_use = "dropping the guard stops writing the logs"]
#[derive(Default)]
pub struct LogGuard {
    _stdout: Option<tracing_appender::non_blocking::WorkerGuard>,
    _file: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// How many lines stdout's writer may have queued before a request that logs waits for it.
const STDOUT_QUEUED_LINES: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot use log directory {dir}: {reason}")]
    LogDir { dir: PathBuf, reason: String },
}

type Base = Layered<EnvFilter, Registry>;
type BoxedLayer = Box<dyn Layer<Base> + Send + Sync>;

fn fmt_layer<W>(json: bool, writer: W, ansi: bool) -> BoxedLayer
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_ansi(ansi)
        .with_writer(writer);
    if json {
        layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed()
    } else if ansi {
        layer.boxed()
    } else {
        layer.fmt_fields(PlainFields).boxed()
    }
}

/// The text format's fields without colours: the same `name=value` text as
/// tracing-subscriber's `DefaultFields` with ANSI off, minus its cost. `DefaultFields` writes
/// every field name through nu_ansi_term's `Display` (italic name, dimmed `=`) even when
/// the styles are empty: 8 % of a GET hit's instructions, for the names of the `request`
/// line (docs/performance.md, item 13). The message and errors (which it escapes and
/// lists with their sources) are still written by `DefaultVisitor` itself.
struct PlainFields;

impl<'a> MakeVisitor<Writer<'a>> for PlainFields {
    type Visitor = PlainVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> PlainVisitor<'a> {
        PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        }
    }
}

struct PlainVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: std::fmt::Result,
}

impl PlainVisitor<'_> {
    /// A space before every field but the first; false when nothing more is to be written.
    fn pad(&mut self) -> bool {
        if self.result.is_err() {
            return false;
        }
        if self.is_empty {
            self.is_empty = false;
        } else {
            self.result = self.writer.write_char(' ');
        }
        self.result.is_ok()
    }

    /// `DefaultVisitor`'s own rendering of one field, after the space.
    fn default_for(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.pad() {
            let mut visitor = DefaultVisitor::new(self.writer.by_ref(), true);
            record(&mut visitor);
            self.result = visitor.finish();
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.default_for(|v| v.record_str(field, value));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.default_for(|v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let name = field.name();
        // What `DefaultVisitor` leaves out: the `log` crate's metadata, already in the line.
        if name.starts_with("log.") {
            return;
        }
        if name == "message" || name.starts_with("r#") {
            self.default_for(|v| v.record_debug(field, value));
            return;
        }
        if self.pad() {
            self.result = self
                .writer
                .write_str(name)
                .and_then(|()| self.writer.write_char('='))
                .and_then(|()| write!(self.writer, "{value:?}"));
        }
    }
}

impl VisitOutput<std::fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> std::fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        &mut self.writer
    }
}

/// [`init`], plus the same lines written to daily-rotated files when `files` is given
/// (through a background writer: keep the returned guard for the process lifetime).
pub fn init_with_files(
    format: LogFormat,
    filter: &str,
    files: Option<&LogFiles>,
) -> Result<LogGuard, TelemetryError> {
    install(format, filter, files, Stdout::Background)
}

/// How lines reach stdout.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stdout {
    /// Queued to a background thread that writes them in batches (one `write` for many
    /// lines): a synchronous `write` per line on the request's thread cost about a sixth of
    /// a GET hit (docs/performance.md). Never lossy: when the queue is full, the logging
    /// thread waits, as it would on a slow stdout anyway.
    Background,
    /// Written by the thread that logs, line by line (tests, which want their lines at once).
    Direct,
}

fn install(
    format: LogFormat,
    filter: &str,
    files: Option<&LogFiles>,
    stdout: Stdout,
) -> Result<LogGuard, TelemetryError> {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = format == LogFormat::Json;
    let ansi = std::io::stdout().is_terminal();
    let mut stdout_guard = None;
    let mut layers: Vec<BoxedLayer> = vec![match stdout {
        Stdout::Direct => fmt_layer(json, std::io::stdout, ansi),
        Stdout::Background => {
            let (writer, worker) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(false)
                .buffered_lines_limit(STDOUT_QUEUED_LINES)
                .thread_name("msghash-stdout-log")
                // Batches: the writer thread flushes whenever its queue is empty.
                .finish(std::io::BufWriter::with_capacity(
                    64 * 1024,
                    std::io::stdout(),
                ));
            stdout_guard = Some(worker);
            fmt_layer(json, writer, ansi)
        }
    }];
    let mut guard = None;
    if let Some(files) = files {
        let err = |reason: String| TelemetryError::LogDir {
            dir: files.dir.clone(),
            reason,
        };
        std::fs::create_dir_all(&files.dir).map_err(|e| err(e.to_string()))?;
        let appender = tracing_appender::rolling::RollingFileAppender::builder()
            .rotation(tracing_appender::rolling::Rotation::DAILY)
            .filename_prefix(&files.prefix)
            .filename_suffix("log")
            .max_log_files(files.retention.max(1))
            .build(&files.dir)
            .map_err(|e| err(e.to_string()))?;
        let (writer, worker) = tracing_appender::non_blocking(appender);
        layers.push(fmt_layer(json, writer, false));
        guard = Some(worker);
    }
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init()
        .is_ok();
    if !installed {
        // Another subscriber was there first: these writers have nothing to write.
        return Ok(LogGuard::default());
    }
    Ok(LogGuard {
        _stdout: stdout_guard,
        _file: guard,
    })
}

/// For tests: logs only when `TEST_LOG` is set, so test output stays readable.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = install(LogFormat::Text, "debug", None, Stdout::Direct);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer failure")]
    struct Outer(#[source] std::io::Error);

    /// Every kind of field our code logs, inside a span with fields of its own.
    fn emit() {
        let span = tracing::info_span!("request", request_id = %"abc-1", r#type = "t");
        let _entered = span.enter();
        let error = Outer(std::io::Error::other("inner \u{1b}[31mred"));
        tracing::info!(
            service = %"msghash",
            route = %"/messages/{digest}",
            quoted = "a str",
            status = 200u16,
            latency_ms = 0.125,
            ok = true,
            negative = -3i64,
            debug = ?Some(1),
            "request"
        );
        tracing::warn!(
            error = &error as &dyn std::error::Error,
            "failed: {}",
            "\u{1b}[2Jcleared"
        );
        tracing::info!("only a message");
        tracing::info!(r#type = "raw name", "raw");
    }

    fn lines(plain: bool) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .with_writer(move || writer.clone());
        if plain {
            tracing::subscriber::with_default(builder.fmt_fields(PlainFields).finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        let bytes = out.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    #[test]
    fn plain_fields_write_exactly_what_the_default_fields_write_without_colours() {
        let (plain, default) = (lines(true), lines(false));
        assert_eq!(plain.lines().count(), 4, "{plain}");
        assert_eq!(plain, default);
        // Escapes in the message are still neutralised.
        assert!(!plain.contains('\u{1b}'), "{plain}");
    }
}

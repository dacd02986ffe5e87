//! The shape every msghash service (`ingest`, `query`, `projector`) has, and what their
//! binaries share, so that each `main.rs` is a few lines.
//!
//! A service is an [`Application`]: `build` connects to what it needs and binds its port
//! (port 0 picks a free one, and [`Application::address`] says which), then
//! `run_until_stopped` serves until the shutdown token is cancelled. [`main`] parses the
//! flags, sets up logging, builds, runs until SIGINT/SIGTERM and turns the outcome into the
//! exit code ([`exit_code`]).

use crate::config::LogArgs;
use crate::ports::LogError;
use crate::shutdown::{on_signals, Shutdown};
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

/// A service, connected and bound to its port but not serving yet.
pub trait Application: Sized + Send {
    /// The service's name in its log and error lines.
    const NAME: &'static str;
    /// Its flags and `MSGHASH_*` variables.
    type Cli: clap::Parser + Send;

    /// The logging flags among `cli`.
    fn log_args(cli: &Self::Cli) -> &LogArgs;

    /// Connects to the event log (and the read model), binds the port.
    fn build(cli: Self::Cli) -> impl Future<Output = anyhow::Result<Self>> + Send;

    /// The address actually bound.
    fn address(&self) -> SocketAddr;

    /// The port actually bound.
    fn port(&self) -> u16 {
        self.address().port()
    }

    /// Serves until `shutdown` is cancelled, then drains in-flight requests.
    fn run_until_stopped(
        self,
        shutdown: Shutdown,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// The whole `main` of a service binary called `service`: flags, logging, then [`run`] on
/// a new runtime ([`block_on`]).
pub fn main<A: Application>(service: &str) -> ExitCode {
    let cli = <A::Cli as clap::Parser>::parse();
    let log = A::log_args(&cli);
    // Kept until the runtime is gone, so the lines logged while it shuts down are written
    // too: dropping it flushes the lines still queued.
    let _log_guard = crate::telemetry::init(log.log_format, &log.log);
    crate::http::observe::set_log_sample(log.log_sample);
    crate::http::observe::set_log_rate(log.log_rate);
    block_on(service, run::<A>(cli))
}

/// Runs `main` (a service's async main) on a new multi-threaded runtime, after
/// [`limit_malloc_arenas`]; exit code 1 when the runtime cannot start.
pub fn block_on(service: &str, main: impl Future<Output = ExitCode>) -> ExitCode {
    limit_malloc_arenas();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            crate::console::err(format_args!(
                "{service}: cannot start the async runtime: {e}"
            ));
            ExitCode::FAILURE
        }
    }
}

/// Gives the memory freed since the last call back to the operating system (glibc keeps it
/// otherwise, for later allocations). For after a large piece of work, such as a projection
/// batch of thousands of events: a few milliseconds. Other platforms: nothing to do.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heaps to the kernel; it takes
    // the arenas' locks like any allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Allocations of at least this many bytes get pages of their own (glibc's
/// `M_MMAP_THRESHOLD`, 128 KiB by default, raised by glibc as large blocks are freed).
pub const MMAP_THRESHOLD: i32 = 16 * 1024;

/// Maps allocations of [`MMAP_THRESHOLD`] bytes and more apart from glibc's heaps, unless
/// `GLIBC_TUNABLES` says otherwise, so that freeing them gives their pages back at once.
/// The embedded read model's flushes and compactions (fjall) allocate and free such
/// buffers from threads of their own, which otherwise fragments the heaps: measured after
/// a POST load on the standalone binary, 74 MiB resident against 33-50 MiB with it, and
/// no fewer POSTs a second (docs/performance.md, items 25 and 26). Call it first thing in
/// `main`, before any thread starts. Other platforms and allocators: nothing to do.
pub fn map_large_allocations_apart() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only sets a tuning parameter of glibc's allocator; it is called
        // before other threads exist, and an unknown value is refused with a 0 return.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// How many malloc arenas glibc may create, unless `MALLOC_ARENA_MAX` says otherwise.
pub const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`] (its default is 8 per core), unless the
/// environment sets `MALLOC_ARENA_MAX`. Every runtime thread that allocates under
/// contention otherwise gets an arena of its own, each keeping freed memory: measured after
/// a POST load on the standalone binary, 76 MiB resident against 63 MiB with 2 arenas, for
/// the same throughput (docs/performance.md). Call it first thing in `main`, before any
/// thread starts. Other platforms and allocators: nothing to do.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tuning parameter of glibc's allocator; it is called
        // before other threads exist, and an unknown value is refused with a 0 return.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// Builds `A` from `cli` and runs it until SIGINT or SIGTERM; the exit code says how it
/// ended.
pub async fn run<A: Application>(cli: A::Cli) -> ExitCode {
    let result = async { A::build(cli).await?.run_until_stopped(on_signals()).await };
    exit_code(A::NAME, result.await)
}

/// Success, or the error on stderr (one line with its causes) and the exit code:
/// 2 when the event log is set up wrongly (see [`LogError::exit_code`]) or the API key file
/// is unusable, 1 otherwise.
pub fn exit_code(service: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "{service} stopped");
            crate::console::err(format_args!("{service}: {e:#}"));
            if e.downcast_ref::<crate::http::guard::KeyFileError>()
                .is_some()
            {
                return ExitCode::from(2);
            }
            ExitCode::from(LogError::exit_code(&e))
        }
    }
}

/// What every distributed service opens first, in this order: the metrics recorder, its
/// TLS server configuration (generating a certificate when told to), and the broker
/// (checking the topic).
#[cfg(feature = "kafka")]
pub async fn connect_tls_and_log(
    tls: &crate::config::TlsArgs,
    kafka: crate::adapters::kafka::KafkaSettings,
) -> anyhow::Result<(
    std::sync::Arc<rustls::ServerConfig>,
    std::sync::Arc<dyn crate::EventLog>,
)> {
    crate::metrics::install();
    let tls = crate::tls::server_config(&tls.source())?;
    let log = crate::adapters::kafka::KafkaLog::connect(kafka).await?;
    Ok((tls, std::sync::Arc::new(log)))
}

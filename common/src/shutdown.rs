//! Graceful shutdown: one token, cancelled on SIGINT or SIGTERM, that every task watches.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// A token cancelled when the process receives SIGINT (Ctrl-C) or SIGTERM.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}

/// A periodic task's clock: ticks every `period` (the first tick at once; a late tick does
/// not make the next ones come faster) until the shutdown token is cancelled.
///
/// ```text
/// let mut ticker = Ticker::new(period, shutdown);
/// while ticker.tick().await { /* the periodic work */ }
/// ```
pub struct Ticker {
    interval: tokio::time::Interval,
    shutdown: CancellationToken,
}

impl Ticker {
    pub fn new(period: Duration, shutdown: CancellationToken) -> Ticker {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticker { interval, shutdown }
    }

    /// Waits for the next tick: `true`, or `false` once shutdown is requested.
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_ticker_ticks_at_once_then_every_period_and_stops_on_shutdown() {
        let shutdown = CancellationToken::new();
        let mut ticker = Ticker::new(Duration::from_secs(5), shutdown.clone());
        let started = tokio::time::Instant::now();
        assert!(ticker.tick().await);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(ticker.tick().await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        shutdown.cancel();
        assert!(!ticker.tick().await);
    }
}

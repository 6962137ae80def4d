//! Shutdown: one [`CancellationToken`] cancelled by SIGTERM or SIGINT; every task watches it and
//! the process drains within a deadline shorter than systemd's stop timeout.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long in-flight work may take to finish after a shutdown signal.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested, draining");
        cancel.cancel();
    });
    Ok(token)
}

/// SIGHUP, the reload request (`systemctl reload`, `ExecReload=/bin/kill -HUP $MAINPID`).
pub fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// systemd's notification protocol (`Type=notify`). Each call is a no-op outside systemd
/// (no `$NOTIFY_SOCKET`); a failure to notify is logged, never fatal.
pub mod systemd {
    use sd_notify::NotifyState;

    fn send(state: NotifyState<'_>, what: &'static str) {
        if let Err(error) = sd_notify::notify(&[state]) {
            tracing::warn!(%error, what, "cannot notify systemd");
        }
    }

    /// READY=1: start-up finished.
    pub fn ready() {
        send(NotifyState::Ready, "READY=1");
    }

    /// WATCHDOG=1: the scan loop is alive.
    pub fn watchdog() {
        send(NotifyState::Watchdog, "WATCHDOG=1");
    }

    /// How often the scan loop sends WATCHDOG=1: a third of systemd's `WatchdogSec=`
    /// (`$WATCHDOG_USEC`), or every 10 s when no watchdog is set.
    pub fn watchdog_period() -> std::time::Duration {
        sd_notify::watchdog_enabled()
            .map_or(std::time::Duration::from_secs(10), |d| d / 3)
            .max(std::time::Duration::from_millis(100))
    }

    /// STOPPING=1: draining.
    pub fn stopping() {
        send(NotifyState::Stopping, "STOPPING=1");
    }
}

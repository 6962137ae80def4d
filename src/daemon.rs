//! `wxpay-reconciler run`: the scheduler, the scan loop, the gauge refresher, the HTTP
//! listener and the optional notify listener as tasks of one `JoinSet`, stopped through one `CancellationToken` and drained
//! within [`DRAIN_DEADLINE`](crate::shutdown::DRAIN_DEADLINE).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::http::{self, Health};
use crate::notify::{self, NotifyApp};
use crate::reconcile::policy::Policy;
use crate::reconcile::scanner::{ScanSettings, Scanner};
use crate::shutdown::{DRAIN_DEADLINE, systemd};
use crate::store::{ConnectOptions, InstanceLock, Store, StoreError, SummaryRequest};
use crate::telemetry::{OpenCounts, Telemetry};
use crate::wxpay::{WxPayClient, WxPayError};

/// Why the daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("scheduler: {0}")]
    Scheduler(String),
    #[error("WeChat Pay client: {0}")]
    Client(#[from] WxPayError),
}

/// Opens the configured database (`create_if_missing` only for `migrate`).
pub async fn open_store(settings: &Settings, create_if_missing: bool) -> Result<Store, StoreError> {
    Store::connect(&ConnectOptions {
        url: settings.database.url.clone(),
        max_connections: settings.database.max_connections,
        create_if_missing,
        acquire_timeout: Duration::from_secs(5),
    })
    .await
}

/// The scanner of these settings, on `store`.
pub fn scanner(
    settings: &Settings,
    store: Store,
    telemetry: Telemetry,
) -> Result<Scanner, DaemonError> {
    let client = Arc::new(WxPayClient::new(settings.wechat.client_config())?);
    let s = &settings.schedule;
    Ok(Scanner::new(
        store,
        client,
        &settings.merchants,
        ScanSettings {
            batch_size: s.batch_size,
            lease: TimeDelta::seconds(i64::try_from(s.lease_seconds).unwrap_or(i64::MAX / 1000)),
            concurrency: settings.wechat.concurrency as usize,
            max_qps: settings.wechat.max_qps,
            policy: policy(settings),
        },
        telemetry,
    ))
}

pub fn policy(settings: &Settings) -> Policy {
    let s = &settings.schedule;
    Policy {
        grace: TimeDelta::seconds(i64::try_from(s.grace_seconds).unwrap_or(0)),
        give_up_after: TimeDelta::hours(i64::try_from(s.give_up_after_hours).unwrap_or(24)),
        default_expiry: TimeDelta::minutes(i64::try_from(s.default_expiry_minutes).unwrap_or(120)),
        close_expired: s.close_expired,
    }
}

/// A running daemon.
pub struct Daemon {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Where `POST /wxpay/v2/notify` is served, when `[notify] listen` is set.
    pub notify_addr: Option<SocketAddr>,
    pub telemetry: Telemetry,
    pub health: Arc<Health>,
    /// Applies a reloaded configuration (SIGHUP).
    pub reloader: Reloader,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    scheduler: JobScheduler,
    /// SQLite: held while running, so a second daemon on the same file refuses to start.
    _instance_lock: Option<InstanceLock>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Checks the schema, starts every task, and tells systemd it is ready. Returns once
    /// running; [`Daemon::wait`] waits for `stop` and drains.
    pub async fn start(
        settings: &Settings,
        stop: CancellationToken,
    ) -> Result<Daemon, DaemonError> {
        let store = open_store(settings, false).await?;
        let instance_lock = store.lock_instance()?;
        store.check_schema().await?;
        let telemetry = Telemetry::new(settings.merchants.iter().map(|m| m.mch_id.as_str()));
        let scanner = scanner(settings, store.clone(), telemetry.clone())?;
        let health = Health::new(Duration::from_secs(
            settings.metrics.ready_max_scan_age_seconds,
        ));

        let listener = tokio::net::TcpListener::bind(settings.metrics.listen)
            .await
            .map_err(|source| DaemonError::Listen {
                addr: settings.metrics.listen,
                source,
            })?;
        let metrics_addr = listener
            .local_addr()
            .map_err(|source| DaemonError::Listen {
                addr: settings.metrics.listen,
                source,
            })?;

        let mut tasks = JoinSet::new();
        let app = http::router(telemetry.clone(), health.clone());
        let http_stop = stop.clone();
        tasks.spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(http_stop.cancelled_owned())
                .await
            {
                tracing::error!(%error, "metrics listener failed");
            }
        });

        let notify_addr = match settings.notify.listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::Listen { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| DaemonError::Listen { addr, source })?;
                let app = notify::router(Arc::new(NotifyApp::new(
                    store.clone(),
                    telemetry.clone(),
                    policy(settings),
                    &settings.merchants,
                )));
                let notify_stop = stop.clone();
                tasks.spawn(async move {
                    if let Err(error) = axum::serve(listener, app)
                        .with_graceful_shutdown(notify_stop.cancelled_owned())
                        .await
                    {
                        tracing::error!(%error, "notify listener failed");
                    }
                });
                Some(bound)
            }
            None => None,
        };

        let (tick_tx, tick_rx) = mpsc::channel::<()>(1);
        let scanning = Arc::new(AtomicBool::new(false));
        let (scanner_tx, scanner_rx) = watch::channel(scanner);
        tasks.spawn(scan_loop(
            scanner_rx,
            tick_rx,
            scanning.clone(),
            health.clone(),
            stop.clone(),
        ));
        let (gauges_tx, gauges_rx) = watch::channel(GaugeSettings::of(settings));
        tasks.spawn(gauge_loop(
            store.clone(),
            settings
                .merchants
                .iter()
                .map(|m| m.mch_id.to_string())
                .collect(),
            gauges_rx,
            telemetry.clone(),
            health.clone(),
            stop.clone(),
        ));

        let scheduler = JobScheduler::new()
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        let ticker = Ticker {
            tick: tick_tx,
            scanning,
            telemetry: telemetry.clone(),
        };
        let job_id = scheduler
            .add(ticker.job(&settings.schedule.scan_cron)?)
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
        scheduler
            .start()
            .await
            .map_err(|e| DaemonError::Scheduler(e.to_string()))?;

        systemd::ready();
        tracing::info!(
            metrics = %metrics_addr,
            notify = ?notify_addr,
            database = %settings.database.url,
            merchants = settings.merchants.len(),
            scan_cron = %settings.schedule.scan_cron,
            "reconciler running"
        );
        let reloader = Reloader {
            inner: Arc::new(ReloadState {
                current: tokio::sync::Mutex::new(ReloadCurrent {
                    settings: settings.clone(),
                    job_id,
                }),
                store,
                telemetry: telemetry.clone(),
                scanner: scanner_tx,
                gauges: gauges_tx,
                scheduler: scheduler.clone(),
                ticker,
            }),
        };
        Ok(Daemon {
            metrics_addr,
            notify_addr,
            telemetry,
            health,
            reloader,
            stop,
            tasks,
            scheduler,
            _instance_lock: instance_lock,
        })
    }

    /// Waits for the stop token, then stops claiming, lets in-flight queries finish within
    /// [`DRAIN_DEADLINE`] (abandoned ones come back when their lease passes) and returns.
    pub async fn wait(mut self) -> Result<(), DaemonError> {
        self.stop.cancelled().await;
        systemd::stopping();
        if let Err(error) = self.scheduler.shutdown().await {
            tracing::warn!(%error, "scheduler did not stop cleanly");
        }
        let tasks = &mut self.tasks;
        let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
            while let Some(joined) = tasks.join_next().await {
                if let Err(error) = joined {
                    tracing::error!(%error, "task failed");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(deadline = ?DRAIN_DEADLINE, "in-flight work abandoned at the drain deadline; its leases will expire");
            self.tasks.abort_all();
        }
        tracing::info!("reconciler stopped");
        Ok(())
    }
}

/// Runs a scan per tick. It feeds systemd's watchdog every [`systemd::watchdog_period`] while
/// it waits for a tick, and during a scan as long as the scan makes progress (a claim or a
/// finished order) within [`Scanner::stall_limit`] (two leases): a scan stuck longer than that
/// can only write fenced-off results, so the watchdog is left to restart the daemon. The
/// scheduler itself is not watched this way: a scheduler that stopped ticking shows as
/// `/readyz` failing and the not-scanning alert.
async fn scan_loop(
    scanner: watch::Receiver<Scanner>,
    mut ticks: mpsc::Receiver<()>,
    scanning: Arc<AtomicBool>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let mut pet = tokio::time::interval(systemd::watchdog_period());
    pet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            tick = ticks.recv() => if tick.is_none() { break },
            _ = pet.tick() => {
                systemd::watchdog();
                continue;
            }
            _ = stop.cancelled() => break,
        }
        scanning.store(true, Ordering::Release);
        // The latest settings (SIGHUP) apply from the next scan on.
        let current = scanner.borrow().clone();
        let stall_limit = current.stall_limit();
        // Milliseconds from the scan's start to its latest progress.
        let started = Instant::now();
        let last_progress = AtomicU64::new(0);
        let progress = || last_progress.store(millis(started.elapsed()), Ordering::Relaxed);
        let scan = current.scan(&stop, &progress);
        tokio::pin!(scan);
        let result = loop {
            tokio::select! {
                result = &mut scan => break result,
                _ = pet.tick() => {
                    let stalled = started.elapsed().saturating_sub(Duration::from_millis(
                        last_progress.load(Ordering::Relaxed),
                    ));
                    if stalled <= stall_limit {
                        systemd::watchdog();
                    } else {
                        tracing::error!(stalled_seconds = stalled.as_secs(), "scan made no progress for two leases; leaving the systemd watchdog to restart the daemon");
                    }
                }
            }
        };
        match result {
            Ok(report) => {
                health.scan_succeeded();
                if report.claimed > 0 {
                    tracing::info!(
                        claimed = report.claimed,
                        settled = report.settled,
                        rescheduled = report.rescheduled,
                        noop = report.noop,
                        abandoned = report.abandoned,
                        "scan done"
                    );
                }
            }
            Err(error) => {
                // Already counted in db_errors_total; the next tick tries again.
                health.db(false);
                tracing::warn!(%error, "scan failed; retrying at the next tick");
            }
        }
        scanning.store(false, Ordering::Release);
        systemd::watchdog();
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What the gauge loop needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GaugeSettings {
    every: Duration,
    stuck_after: TimeDelta,
    default_expiry: TimeDelta,
}

impl GaugeSettings {
    fn of(settings: &Settings) -> GaugeSettings {
        GaugeSettings {
            every: Duration::from_secs(settings.metrics.refresh_seconds),
            stuck_after: TimeDelta::seconds(
                i64::try_from(settings.metrics.stuck_after_seconds).unwrap_or(300),
            ),
            default_expiry: policy(settings).default_expiry,
        }
    }
}

async fn gauge_loop(
    store: Store,
    merchants: Vec<String>,
    gauge_settings: watch::Receiver<GaugeSettings>,
    telemetry: Telemetry,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let every = gauge_settings.borrow().every;
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.cancelled() => break,
        }
        // Folds the histogram samples recorded since into their buckets: memory stays flat
        // whether or not anything scrapes /metrics.
        telemetry.upkeep();
        let gauges = *gauge_settings.borrow();
        let now = Utc::now();
        let request = SummaryRequest {
            now,
            stuck_before: now - gauges.stuck_after,
            expired_if_created_before: now - gauges.default_expiry,
        };
        let read = async {
            let summary = store.open_summary(&request).await?;
            let attention = store.attention().await?;
            Ok::<_, StoreError>((summary, attention))
        };
        match read.await {
            Ok((summary, attention)) => {
                health.db(true);
                for mch in &merchants {
                    let mut counts = summary
                        .iter()
                        .find(|s| &s.mch_id == mch)
                        .map(|s| OpenCounts {
                            open: s.open,
                            stuck: s.stuck,
                            expired: s.expired,
                            oldest_age: s
                                .oldest_created_at
                                .and_then(|t| (now - t).to_std().ok())
                                .unwrap_or_default(),
                            ..OpenCounts::default()
                        })
                        .unwrap_or_default();
                    if let Some(a) = attention.iter().find(|a| &a.mch_id == mch) {
                        counts.amount_mismatch = a.amount_mismatch;
                        counts.set_aside = a.set_aside;
                    }
                    telemetry.open_orders(mch, &counts);
                }
            }
            Err(error) => {
                health.db(false);
                telemetry.db_error("gauges", &error);
            }
        }
    }
}

/// Turns cron ticks into scan requests; a tick that finds a scan running (or one queued) is
/// skipped and counted.
#[derive(Clone)]
struct Ticker {
    tick: mpsc::Sender<()>,
    scanning: Arc<AtomicBool>,
    telemetry: Telemetry,
}

impl Ticker {
    fn job(&self, cron: &str) -> Result<Job, DaemonError> {
        let ticker = self.clone();
        Job::new_async(cron, move |_, _| {
            if ticker.scanning.load(Ordering::Acquire) || ticker.tick.try_send(()).is_err() {
                ticker.telemetry.scan_skipped();
            }
            Box::pin(async {})
        })
        .map_err(|e| DaemonError::Scheduler(e.to_string()))
    }
}

/// Applies a new configuration to a running daemon (SIGHUP). What can change safely changes at
/// once: `[log] level`, every `[schedule]` key, `wechat.max_qps` and `wechat.concurrency`. The
/// rest (database, merchants and keys, listen addresses, other `[wechat]` and `[metrics]` keys)
/// needs a restart: it is kept as it was, and the sections are named in a warning.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<ReloadState>,
}

struct ReloadState {
    current: tokio::sync::Mutex<ReloadCurrent>,
    store: Store,
    telemetry: Telemetry,
    scanner: watch::Sender<Scanner>,
    gauges: watch::Sender<GaugeSettings>,
    scheduler: JobScheduler,
    ticker: Ticker,
}

struct ReloadCurrent {
    settings: Settings,
    job_id: uuid::Uuid,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    /// Applies `new` (already loaded and validated). Returns the sections that changed but need
    /// a restart; counts a success in `config_reloads_total` (a failure is the caller's to
    /// report with [`Reloader::rejected`]).
    pub async fn reload(&self, new: &Settings) -> Result<Vec<&'static str>, DaemonError> {
        let result = self.apply(new).await;
        if result.is_ok() {
            self.inner.telemetry.config_reload(Ok(()));
        }
        result
    }

    /// A reload that could not even be attempted (the file is invalid): counted, logged, and
    /// the running settings stay.
    pub fn rejected(&self, error: &str) {
        self.inner.telemetry.config_reload(Err(error));
    }

    async fn apply(&self, new: &Settings) -> Result<Vec<&'static str>, DaemonError> {
        let state = &self.inner;
        let mut current = state.current.lock().await;
        let old = &current.settings;
        let restart = needs_restart(old, new);
        // The running settings with the reloadable parts of the new ones.
        let mut next = old.clone();
        next.schedule = new.schedule.clone();
        next.wechat.max_qps = new.wechat.max_qps;
        next.wechat.concurrency = new.wechat.concurrency;
        next.log = new.log.clone();

        crate::telemetry::set_log_level(&next.log.level).map_err(DaemonError::Scheduler)?;
        let scanner = scanner(&next, state.store.clone(), state.telemetry.clone())?;
        if next.schedule.scan_cron != old.schedule.scan_cron {
            let job = state.ticker.job(&next.schedule.scan_cron)?;
            let id = state
                .scheduler
                .add(job)
                .await
                .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
            state
                .scheduler
                .remove(&current.job_id)
                .await
                .map_err(|e| DaemonError::Scheduler(e.to_string()))?;
            current.job_id = id;
        }
        state.scanner.send_replace(scanner);
        state.gauges.send_replace(GaugeSettings::of(&next));
        if !restart.is_empty() {
            tracing::warn!(
                sections = %restart.join(", "),
                "changed settings need a restart to take effect; keeping the running ones"
            );
        }
        tracing::info!(
            scan_cron = %next.schedule.scan_cron,
            max_qps = next.wechat.max_qps,
            concurrency = next.wechat.concurrency,
            log_level = %next.log.level,
            "configuration reloaded"
        );
        current.settings = next;
        Ok(restart)
    }
}

/// The sections of `new` that differ from `old` in keys a reload does not apply.
fn needs_restart(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if !old.database.url.same_as(&new.database.url)
        || old.database.max_connections != new.database.max_connections
    {
        changed.push("database");
    }
    let wechat = |s: &Settings| {
        let mut w = s.wechat.clone();
        w.max_qps = 0;
        w.concurrency = 0;
        format!("{w:?}")
    };
    if wechat(old) != wechat(new) {
        changed.push("wechat");
    }
    let same_merchants = old.merchants.len() == new.merchants.len()
        && old.merchants.iter().zip(&new.merchants).all(|(a, b)| {
            a.mch_id == b.mch_id
                && a.appid == b.appid
                && a.sub_mch_id == b.sub_mch_id
                && a.sign_type == b.sign_type
                && a.key.same_as(&b.key)
        });
    if !same_merchants {
        changed.push("merchants");
    }
    if format!("{:?}", old.metrics) != format!("{:?}", new.metrics) {
        changed.push("metrics");
    }
    if old.notify.listen != new.notify.listen {
        changed.push("notify");
    }
    changed
}

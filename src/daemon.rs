//! `wxpay-reconciler run`: the scheduler, the scan loop, the gauge refresher, the HTTP
//! listener and the optional notify listener as tasks of one `JoinSet`, stopped through one `CancellationToken` and drained
//! within [`DRAIN_DEADLINE`](crate::shutdown::DRAIN_DEADLINE).
//!
//! The tasks are supervised: one that ends or panics while the daemon is not stopping is
//! logged at once, fails `/readyz` ("task X stopped"), stops the systemd watchdog pings, and
//! the daemon drains the rest and [`Daemon::wait`] returns [`DaemonError::TaskFailed`], so that
//! `run` exits non-zero and systemd restarts it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinError, JoinSet};
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::gateway::Gateway;
use crate::http::{self, Health};
use crate::listener::{self, Listener};
use crate::notify::{self, NotifyApp};
use crate::reconcile::policy::Policy;
use crate::reconcile::scanner::{ScanSettings, Scanner};
use crate::shutdown::{DRAIN_DEADLINE, systemd};
use crate::store::{ConnectOptions, InstanceLock, Store, StoreError, SummaryRequest};
use crate::telemetry::{DbOp, OpenCounts, Telemetry};
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
    /// A task ended or panicked while the daemon was running; the rest was drained.
    #[error("task {task} {how} while the daemon was running; stopped so that it can be restarted")]
    TaskFailed {
        task: &'static str,
        how: &'static str,
    },
}

/// How a test makes a task fail ([`TaskHooks::fail`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskFailure {
    /// The task's future returns, as if its loop had ended.
    End,
    /// The task panics.
    Panic,
}

/// A test hook, and nothing else: makes one of the daemon's tasks end or panic, so that tests
/// can watch the supervision (the daemon has no real way to lose a task on purpose). The
/// binary uses it only in debug builds, through `WXPAY_RECONCILER_TEST_FAIL_TASK`.
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct TaskHooks {
    fail: Arc<Mutex<HashMap<&'static str, oneshot::Sender<TaskFailure>>>>,
}

impl std::fmt::Debug for TaskHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHooks").finish_non_exhaustive()
    }
}

impl TaskHooks {
    /// Makes `task` fail as `how`; false when there is no such task (or it was already used).
    pub fn fail(&self, task: &str, how: TaskFailure) -> bool {
        let sender = self
            .fail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(task);
        sender.is_some_and(|s| s.send(how).is_ok())
    }
}

/// The daemon's tasks, each known by the name logs, `/readyz` and [`DaemonError::TaskFailed`]
/// use: `metrics`, `notify`, `scan`, `gauges`.
struct Tasks {
    set: JoinSet<()>,
    names: HashMap<tokio::task::Id, &'static str>,
    hooks: TaskHooks,
}

impl Tasks {
    fn new() -> Tasks {
        Tasks {
            set: JoinSet::new(),
            names: HashMap::new(),
            hooks: TaskHooks::default(),
        }
    }

    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let (fail_tx, fail_rx) = oneshot::channel();
        self.hooks
            .fail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, fail_tx);
        let handle = self.set.spawn(async move {
            tokio::select! {
                () = task => {}
                Ok(how) = fail_rx => match how {
                    TaskFailure::End => {}
                    TaskFailure::Panic => panic!("task {name}: panic injected by a test hook"),
                },
            }
        });
        self.names.insert(handle.id(), name);
    }

    /// The next task to finish: its name and how it ended (`None` when there are none left).
    async fn next(&mut self) -> Option<(&'static str, Result<(), JoinError>)> {
        let joined = self.set.join_next_with_id().await?;
        let id = match &joined {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let name = self.names.remove(&id).unwrap_or("unknown");
        Some((name, joined.map(|_| ())))
    }
}

/// "ended", "panicked" or "was cancelled" (a panic's message is on stderr already, from the
/// panic hook).
fn how_it_ended(result: &Result<(), JoinError>) -> &'static str {
    match result {
        Ok(()) => "ended",
        Err(e) if e.is_panic() => "panicked",
        Err(_) => "was cancelled",
    }
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
    let client = Arc::new(Gateway::V2(WxPayClient::new(
        settings.wechat.client_config(),
    )?));
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
    /// Stops the scan, the gauges and the notify listener (a child of `stop`).
    work_stop: CancellationToken,
    /// Stops the metrics listener (a child of `stop`): after the others when a task failed,
    /// so that `/readyz` tells why while they drain.
    metrics_stop: CancellationToken,
    tasks: Tasks,
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

        let mut tasks = Tasks::new();
        let work_stop = stop.child_token();
        let metrics_stop = stop.child_token();
        tasks.spawn(
            "metrics",
            listener::serve(
                listener,
                http::router(telemetry.clone(), health.clone()),
                Listener::Metrics,
                settings.metrics.limits(),
                telemetry.clone(),
                metrics_stop.clone(),
            ),
        );

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
                tasks.spawn(
                    "notify",
                    listener::serve(
                        listener,
                        app,
                        Listener::Notify,
                        settings.notify.limits(),
                        telemetry.clone(),
                        work_stop.clone(),
                    ),
                );
                Some(bound)
            }
            None => None,
        };

        let (tick_tx, tick_rx) = mpsc::channel::<()>(1);
        let scanning = Arc::new(AtomicBool::new(false));
        let (scanner_tx, scanner_rx) = watch::channel(scanner);
        tasks.spawn(
            "scan",
            scan_loop(
                scanner_rx,
                tick_rx,
                scanning.clone(),
                health.clone(),
                work_stop.clone(),
            ),
        );
        let (gauges_tx, gauges_rx) = watch::channel(GaugeSettings::of(settings));
        tasks.spawn(
            "gauges",
            gauge_loop(
                store.clone(),
                settings
                    .merchants
                    .iter()
                    .map(|m| m.mch_id.to_string())
                    .collect(),
                gauges_rx,
                telemetry.clone(),
                health.clone(),
                work_stop.clone(),
            ),
        );

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
            work_stop,
            metrics_stop,
            tasks,
            scheduler,
            _instance_lock: instance_lock,
        })
    }

    /// The test hook that makes a task fail ([`TaskHooks`]).
    #[doc(hidden)]
    pub fn task_hooks(&self) -> TaskHooks {
        self.tasks.hooks.clone()
    }

    /// Runs until the stop token fires or a task ends, then stops claiming, lets in-flight
    /// queries finish within [`DRAIN_DEADLINE`] (abandoned ones come back when their lease
    /// passes) and returns: `Ok` after a stop, [`DaemonError::TaskFailed`] after a task ended or
    /// panicked on its own.
    pub async fn wait(mut self) -> Result<(), DaemonError> {
        let failed = tokio::select! {
            biased;
            _ = self.stop.cancelled() => None,
            Some((task, result)) = self.tasks.next(), if !self.stop.is_cancelled() => {
                let how = how_it_ended(&result);
                // Readiness fails and the watchdog pings stop before anything else happens.
                self.health.task_stopped(task);
                tracing::error!(task, how, "a task of the daemon stopped while it was running; /readyz fails, the systemd watchdog is no longer fed, draining and exiting");
                Some(DaemonError::TaskFailed { task, how })
            }
        };
        systemd::stopping();
        // After a failure the metrics listener answers (/readyz: not ready, and why) until the
        // rest has drained.
        self.work_stop.cancel();
        if failed.is_none() {
            self.metrics_stop.cancel();
        }
        if let Err(error) = self.scheduler.shutdown().await {
            tracing::warn!(%error, "scheduler did not stop cleanly");
        }
        let tasks = &mut self.tasks;
        let metrics_stop = &self.metrics_stop;
        let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
            loop {
                if tasks.names.values().all(|name| *name == "metrics") {
                    metrics_stop.cancel();
                }
                let Some((task, result)) = tasks.next().await else {
                    break;
                };
                if let Err(error) = result {
                    tracing::error!(task, %error, "task failed while draining");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(deadline = ?DRAIN_DEADLINE, "in-flight work abandoned at the drain deadline; its leases will expire");
            self.tasks.set.abort_all();
        }
        // Ends what else watches the token (the SIGHUP handler of `run`).
        self.stop.cancel();
        tracing::info!("reconciler stopped");
        match failed {
            Some(error) => Err(error),
            None => Ok(()),
        }
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
                pet_watchdog(&health);
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
                        pet_watchdog(&health);
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
        pet_watchdog(&health);
    }
}

/// WATCHDOG=1, unless a task of the daemon has stopped: then systemd is left to notice (if
/// the daemon does not exit first).
fn pet_watchdog(health: &Health) {
    if health.failed_task().is_none() {
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
                telemetry.db_error(DbOp::Gauges, &error);
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
        && old
            .merchants
            .iter()
            .zip(&new.merchants)
            .all(|(a, b)| a.same_as(b));
    if !same_merchants {
        changed.push("merchants");
    }
    if format!("{:?}", old.metrics) != format!("{:?}", new.metrics) {
        changed.push("metrics");
    }
    if format!("{:?}", old.notify) != format!("{:?}", new.notify) {
        changed.push("notify");
    }
    changed
}

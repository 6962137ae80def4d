//! The daemon's scheduled jobs: each a [`Job`] with a name (its task's, in logs, `/readyz` and
//! [`DaemonError::TaskFailed`]), a [`Schedule`] (cron or interval), an [`Overlap`] rule, and a
//! run. Today: `scan` (the scan loop, cron, skip-and-count) and `gauges` (the order gauges,
//! every `[metrics] refresh_seconds`, waiting). Each runs in a task of its own;
//! [`Scheduler`] ticks the cron ones through one `JobScheduler` and re-adds them when a reload
//! changes their expression.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::{mpsc, watch};
use tokio::time::{Interval, MissedTickBehavior};
use tokio_cron_scheduler::{Job as CronJob, JobScheduler};
use tokio_util::sync::CancellationToken;

use super::wiring::{ScannerParts, Wiring, policy};
use super::{DaemonError, Tasks};
use crate::config::Settings;
use crate::http::Health;
use crate::reconcile::bills::{BillRunner, newest_bill_gauges};
use crate::reconcile::refund_scan::RefundScanReport;
use crate::reconcile::scanner::{ScanReport, Scanner};
use crate::shutdown::systemd;
use crate::store::{Attention, OpenSummary, Store, StoreError, SummaryRequest};
use crate::telemetry::{DbOp, OpenCounts, Telemetry};

/// When a job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Schedule {
    /// A six-field cron expression, seconds first, in UTC; reloadable.
    Cron(String),
    /// The same in Beijing time (UTC+8, no daylight saving time): the bills'.
    BeijingCron(String),
    /// Every period, the first at once; fixed until a restart.
    Every(Duration),
}

/// What becomes of a tick that comes while the job's previous run goes on.
#[derive(Debug, Clone, Copy)]
pub(super) enum Overlap {
    /// Dropped, and counted with this event (the job's own metric).
    SkipAndCount(fn(&Telemetry)),
    /// Kept (one at most): the next run starts when this one ends.
    Wait,
}

impl Overlap {
    /// Whether a tick during a run is taken and dropped rather than left waiting.
    fn skips(self) -> bool {
        matches!(self, Overlap::SkipAndCount(_))
    }

    /// A tick was dropped: counted, under [`Overlap::SkipAndCount`].
    fn dropped(self, telemetry: &Telemetry) {
        if let Overlap::SkipAndCount(count) = self {
            count(telemetry);
        }
    }
}

/// One run of a job, started by [`Job::start`].
pub(super) struct Run<F> {
    pub work: F,
    /// For a job that feeds the watchdog: how long this run may go without progress before it
    /// stops feeding it (`None`: as long as it takes).
    pub stall_limit: Option<Duration>,
}

/// Progress within a run: the job calls [`Progress::made`] whenever it moves on.
pub(super) struct Progress {
    started: Instant,
    /// Milliseconds from the run's start to its latest progress.
    last: AtomicU64,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    pub fn made(&self) {
        self.last
            .store(millis(self.started.elapsed()), Ordering::Relaxed);
    }

    fn stalled(&self) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// A job of the daemon.
pub(super) trait Job: Send + Sync + 'static {
    /// Its task's name.
    const NAME: &'static str;
    const OVERLAP: Overlap;
    /// Whether it feeds systemd's watchdog: every [`systemd::watchdog_period`] between runs,
    /// and during a run as long as it progresses within the run's `stall_limit`.
    const FEEDS_WATCHDOG: bool;
    /// Whether a run starts at once, before the first tick (to catch up after downtime).
    const RUNS_AT_START: bool = false;
    /// The error logged when a run stops feeding the watchdog.
    const STALLED: &'static str = "the job made no progress within its stall limit; leaving the systemd watchdog to restart the daemon";
    /// Its schedule in these settings.
    fn schedule(settings: &Settings) -> Schedule;
    /// Starts one run; `stop` is the daemon's (a run ends soon after it fires).
    fn start<'a>(
        &'a self,
        progress: &'a Progress,
        stop: &'a CancellationToken,
    ) -> Run<impl Future<Output = ()> + Send + 'a>;
}

/// What every job's task shares.
#[derive(Clone)]
struct JobContext {
    telemetry: Telemetry,
    health: Arc<Health>,
    stop: CancellationToken,
}

/// A job's ticks: a cron job's, through a channel of one, or an interval's.
enum Ticks {
    Cron(mpsc::Receiver<()>),
    Every(Interval),
}

impl Ticks {
    /// The next tick; false when there will be none.
    async fn next(&mut self) -> bool {
        match self {
            Ticks::Cron(ticks) => ticks.recv().await.is_some(),
            Ticks::Every(interval) => {
                interval.tick().await;
                true
            }
        }
    }
}

/// Runs `job` at each tick until `stop`, one run at a time.
async fn run_job<J: Job>(job: J, mut ticks: Ticks, ctx: JobContext) {
    let mut pet = tokio::time::interval(systemd::watchdog_period());
    pet.set_missed_tick_behavior(MissedTickBehavior::Delay);
    if J::RUNS_AT_START {
        run_once(&job, &mut ticks, &mut pet, &ctx).await;
    }
    loop {
        tokio::select! {
            more = ticks.next() => if !more { break },
            _ = pet.tick(), if J::FEEDS_WATCHDOG => {
                pet_watchdog(&ctx.health);
                continue;
            }
            _ = ctx.stop.cancelled() => break,
        }
        run_once(&job, &mut ticks, &mut pet, &ctx).await;
        if J::FEEDS_WATCHDOG {
            pet_watchdog(&ctx.health);
        }
    }
}

/// One run, feeding the watchdog while it progresses (for a job that feeds it), and applying
/// the overlap rule to the ticks that come meanwhile.
async fn run_once<J: Job>(job: &J, ticks: &mut Ticks, pet: &mut Interval, ctx: &JobContext) {
    let progress = Progress::new();
    let Run { work, stall_limit } = job.start(&progress, &ctx.stop);
    tokio::pin!(work);
    let mut ticking = true;
    loop {
        tokio::select! {
            () = &mut work => break,
            _ = pet.tick(), if J::FEEDS_WATCHDOG => {
                let stalled = progress.stalled();
                if stall_limit.is_none_or(|limit| stalled <= limit) {
                    pet_watchdog(&ctx.health);
                } else {
                    tracing::error!(job = J::NAME, stalled_seconds = stalled.as_secs(), "{}", J::STALLED);
                }
            }
            more = ticks.next(), if ticking && J::OVERLAP.skips() => {
                ticking = more;
                if more {
                    J::OVERLAP.dropped(&ctx.telemetry);
                }
            }
        }
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

fn scheduler_error(error: impl std::fmt::Display) -> DaemonError {
    DaemonError::Scheduler(error.to_string())
}

/// Turns a cron job's ticks into runs: a tick that finds one queued is dropped (and, under
/// [`Overlap::SkipAndCount`], counted; a tick during a run is the runner's to count).
#[derive(Clone)]
struct Ticker {
    tick: mpsc::Sender<()>,
    overlap: Overlap,
    telemetry: Telemetry,
}

impl Ticker {
    async fn add(
        &self,
        cron: &JobScheduler,
        expr: &str,
        beijing: bool,
    ) -> Result<uuid::Uuid, DaemonError> {
        let ticker = self.clone();
        let tick = move |_, _| -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
            if ticker.tick.try_send(()).is_err() {
                ticker.overlap.dropped(&ticker.telemetry);
            }
            Box::pin(async {})
        };
        let job = if beijing {
            CronJob::new_async_tz(expr, crate::reconcile::bills::beijing(), tick)
        } else {
            CronJob::new_async(expr, tick)
        }
        .map_err(scheduler_error)?;
        cron.add(job).await.map_err(scheduler_error)
    }
}

/// A job on a cron schedule, as added to the scheduler.
struct CronEntry {
    schedule_of: fn(&Settings) -> Schedule,
    expr: String,
    id: uuid::Uuid,
    ticker: Ticker,
}

/// Spawns the jobs and ticks those on a cron schedule.
struct Scheduler {
    cron: JobScheduler,
    entries: Vec<CronEntry>,
}

impl Scheduler {
    async fn new() -> Result<Scheduler, DaemonError> {
        Ok(Scheduler {
            cron: JobScheduler::new().await.map_err(scheduler_error)?,
            entries: Vec::new(),
        })
    }

    /// Spawns `job` as the task [`Job::NAME`], on its schedule in `settings`.
    async fn spawn<J: Job>(
        &mut self,
        tasks: &mut Tasks,
        job: J,
        settings: &Settings,
        ctx: JobContext,
    ) -> Result<(), DaemonError> {
        let ticks = match J::schedule(settings) {
            Schedule::Cron(expr) | Schedule::BeijingCron(expr) => {
                let beijing = matches!(J::schedule(settings), Schedule::BeijingCron(_));
                let (tick, ticks) = mpsc::channel(1);
                let ticker = Ticker {
                    tick,
                    overlap: J::OVERLAP,
                    telemetry: ctx.telemetry.clone(),
                };
                let id = ticker.add(&self.cron, &expr, beijing).await?;
                self.entries.push(CronEntry {
                    schedule_of: J::schedule,
                    expr,
                    id,
                    ticker,
                });
                Ticks::Cron(ticks)
            }
            Schedule::Every(period) => {
                let mut interval = tokio::time::interval(period);
                interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                Ticks::Every(interval)
            }
        };
        tasks.spawn(J::NAME, run_job(job, ticks, ctx));
        Ok(())
    }

    /// Re-adds each cron job whose expression differs in `settings`.
    async fn reschedule(&mut self, settings: &Settings) -> Result<(), DaemonError> {
        for entry in &mut self.entries {
            let (expr, beijing) = match (entry.schedule_of)(settings) {
                Schedule::Cron(expr) => (expr, false),
                Schedule::BeijingCron(expr) => (expr, true),
                Schedule::Every(_) => continue,
            };
            if expr == entry.expr {
                continue;
            }
            let id = entry.ticker.add(&self.cron, &expr, beijing).await?;
            self.cron.remove(&entry.id).await.map_err(scheduler_error)?;
            entry.id = id;
            entry.expr = expr;
        }
        Ok(())
    }
}

/// The running jobs, and what a reload changes in them.
pub(super) struct Jobs {
    scheduler: Scheduler,
    scanners: ScannerParts,
    scanner: watch::Sender<Scanner>,
    gauges: watch::Sender<GaugeSettings>,
}

impl Jobs {
    /// Spawns the scan and the gauges, and starts ticking them.
    pub async fn start(
        tasks: &mut Tasks,
        settings: &Settings,
        wiring: &Wiring,
        stop: CancellationToken,
    ) -> Result<Jobs, DaemonError> {
        let ctx = JobContext {
            telemetry: wiring.telemetry().clone(),
            health: wiring.health.clone(),
            stop,
        };
        let mut scheduler = Scheduler::new().await?;
        let (scanner, scanner_rx) = watch::channel(wiring.scanners.build(settings));
        let scan = ScanJob {
            scanner: scanner_rx,
            health: wiring.health.clone(),
        };
        scheduler.spawn(tasks, scan, settings, ctx.clone()).await?;
        let (gauges, gauges_rx) = watch::channel(GaugeSettings::of(settings));
        let refresh = GaugeJob {
            store: wiring.store().clone(),
            merchants: settings
                .merchants
                .iter()
                .map(|m| m.mch_id.to_string())
                .collect(),
            settings: gauges_rx,
            telemetry: wiring.telemetry().clone(),
            health: wiring.health.clone(),
            bills: settings.bills.enabled,
        };
        if settings.bills.enabled {
            let runner = super::wiring::bill_runner(
                settings,
                wiring.store().clone(),
                Some(wiring.scanners.client.clone()),
                wiring.telemetry().clone(),
            );
            wiring
                .telemetry()
                .zero_bill_series(settings.merchants.iter().map(|m| m.mch_id.as_str()));
            let bills = BillJob {
                runner,
                telemetry: wiring.telemetry().clone(),
                health: wiring.health.clone(),
            };
            scheduler.spawn(tasks, bills, settings, ctx.clone()).await?;
        }
        scheduler.spawn(tasks, refresh, settings, ctx).await?;
        scheduler.cron.start().await.map_err(scheduler_error)?;
        Ok(Jobs {
            scheduler,
            scanners: wiring.scanners.clone(),
            scanner,
            gauges,
        })
    }

    /// The cron scheduler, to shut down.
    pub fn cron(&self) -> JobScheduler {
        self.scheduler.cron.clone()
    }

    /// Applies reloaded settings from the next run on: the cron schedules, a scanner with the
    /// new limits (on the same client: its failover state stays), the gauges' settings.
    pub async fn reconfigure(&mut self, settings: &Settings) -> Result<(), DaemonError> {
        self.scheduler.reschedule(settings).await?;
        self.scanner.send_replace(self.scanners.build(settings));
        self.gauges.send_replace(GaugeSettings::of(settings));
        Ok(())
    }

    /// The scanner the next scan uses.
    #[cfg(test)]
    pub fn scanner(&self) -> Scanner {
        self.scanner.borrow().clone()
    }

    /// The client the scanners are built on.
    #[cfg(test)]
    pub fn client(&self) -> &super::wiring::Client {
        &self.scanners.client
    }
}

/// The scan: claims due orders and settles what WeChat answers. It feeds systemd's watchdog
/// while it waits for a tick, and during a scan as long as the scan makes progress (a claim or
/// a finished order) within [`Scanner::stall_limit`] (two leases): a scan stuck longer than
/// that can only write fenced-off results, so the watchdog is left to restart the daemon. The
/// scheduler itself is not watched this way: a scheduler that stopped ticking shows as
/// `/readyz` failing and the not-scanning alert.
struct ScanJob {
    scanner: watch::Receiver<Scanner>,
    health: Arc<Health>,
}

impl Job for ScanJob {
    const NAME: &'static str = "scan";
    const OVERLAP: Overlap = Overlap::SkipAndCount(Telemetry::scan_skipped);
    const FEEDS_WATCHDOG: bool = true;
    const STALLED: &'static str =
        "scan made no progress for two leases; leaving the systemd watchdog to restart the daemon";

    fn schedule(settings: &Settings) -> Schedule {
        Schedule::Cron(settings.schedule.scan_cron.clone())
    }

    fn start<'a>(
        &'a self,
        progress: &'a Progress,
        stop: &'a CancellationToken,
    ) -> Run<impl Future<Output = ()> + Send + 'a> {
        // The latest settings (SIGHUP) apply from the next scan on.
        let scanner = self.scanner.borrow().clone();
        Run {
            stall_limit: Some(scanner.stall_limit()),
            work: async move {
                let result = scanner.scan(stop, &|| progress.made()).await;
                let orders_ok = result.is_ok();
                scan_finished(&self.health, result);
                // Refunds after the orders, under the same rate limit and leases.
                if orders_ok {
                    refund_scan_finished(
                        &self.health,
                        scanner.scan_refunds(stop, &|| progress.made()).await,
                    );
                }
            },
        }
    }
}

fn scan_finished(health: &Health, result: Result<ScanReport, StoreError>) {
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
}

fn refund_scan_finished(health: &Health, result: Result<RefundScanReport, StoreError>) {
    match result {
        Ok(report) => {
            if report.claimed > 0 {
                tracing::info!(
                    claimed = report.claimed,
                    finished = report.finished,
                    rescheduled = report.rescheduled,
                    gave_up = report.gave_up,
                    noop = report.noop,
                    abandoned = report.abandoned,
                    "refund scan done"
                );
            }
        }
        Err(error) => {
            health.db(false);
            tracing::warn!(%error, "refund scan failed; retrying at the next tick");
        }
    }
}

/// The daily bills: at start (to catch up after downtime) and at each `[bills] cron` tick
/// (Beijing time), every merchant's due days. Within a run, a day WeChat is still making (or
/// whose fetch failed) is asked again at its next attempt, until the run's days are settled or
/// [`BILL_RUN_LIMIT`] has passed (the next tick's catch-up takes over). `[bills]` keys other
/// than `cron` apply at the next start.
struct BillJob {
    runner: BillRunner,
    telemetry: Telemetry,
    health: Arc<Health>,
}

/// How long one run of the bill job keeps retrying days that are not ready.
const BILL_RUN_LIMIT: Duration = Duration::from_secs(12 * 3600);

impl Job for BillJob {
    const NAME: &'static str = "bills";
    const OVERLAP: Overlap = Overlap::Wait;
    const FEEDS_WATCHDOG: bool = false;
    const RUNS_AT_START: bool = true;

    fn schedule(settings: &Settings) -> Schedule {
        Schedule::BeijingCron(settings.bills.cron.clone())
    }

    fn start<'a>(
        &'a self,
        _progress: &'a Progress,
        stop: &'a CancellationToken,
    ) -> Run<impl Future<Output = ()> + Send + 'a> {
        Run {
            stall_limit: None,
            work: self.run(stop),
        }
    }
}

impl BillJob {
    /// One run; the daemon's stop ends it at once (a download or a batch cut short is
    /// dropped: its transaction rolls back, and the day, still claimed, runs again once its
    /// lease ends).
    async fn run(&self, stop: &CancellationToken) {
        tokio::select! {
            () = self.run_days(stop) => {}
            () = stop.cancelled() => {}
        }
    }

    async fn run_days(&self, stop: &CancellationToken) {
        let started = Instant::now();
        loop {
            let retry = match self.runner.run_due(Utc::now(), stop).await {
                Ok(retry) => retry,
                Err(error) => {
                    if let crate::reconcile::bills::BillRunError::Store(e) = &error {
                        self.telemetry.db_error(DbOp::Bills, e);
                        self.health.db(false);
                    }
                    tracing::warn!(%error, "bill run failed; retrying at its next attempt");
                    Some(Utc::now() + TimeDelta::minutes(5))
                }
            };
            let Some(at) = retry else { break };
            let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            if started.elapsed() + wait > BILL_RUN_LIMIT {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => break,
            }
        }
    }
}

/// What the gauge job needs to know (reloadable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GaugeSettings {
    stuck_after: TimeDelta,
    default_expiry: TimeDelta,
}

impl GaugeSettings {
    fn of(settings: &Settings) -> GaugeSettings {
        GaugeSettings {
            stuck_after: TimeDelta::seconds(
                i64::try_from(settings.metrics.stuck_after_seconds).unwrap_or(300),
            ),
            default_expiry: policy(settings).default_expiry,
        }
    }
}

/// The order gauges of every merchant (open, stuck, expired, oldest, attention), and the
/// histograms' upkeep.
struct GaugeJob {
    store: Store,
    merchants: Vec<String>,
    settings: watch::Receiver<GaugeSettings>,
    telemetry: Telemetry,
    health: Arc<Health>,
    /// `[bills] enabled`: the gauges of each merchant's newest reconciled bill too, from the
    /// table (whoever reconciled it: this instance, another, or `bills reconcile`).
    bills: bool,
}

impl Job for GaugeJob {
    const NAME: &'static str = "gauges";
    const OVERLAP: Overlap = Overlap::Wait;
    const FEEDS_WATCHDOG: bool = false;

    fn schedule(settings: &Settings) -> Schedule {
        Schedule::Every(Duration::from_secs(settings.metrics.refresh_seconds))
    }

    fn start<'a>(
        &'a self,
        _progress: &'a Progress,
        _stop: &'a CancellationToken,
    ) -> Run<impl Future<Output = ()> + Send + 'a> {
        Run {
            stall_limit: None,
            work: self.refresh(),
        }
    }
}

impl GaugeJob {
    async fn refresh(&self) {
        // Folds the histogram samples recorded since into their buckets: memory stays flat
        // whether or not anything scrapes /metrics.
        self.telemetry.upkeep();
        let gauges = *self.settings.borrow();
        let now = Utc::now();
        let request = SummaryRequest {
            now,
            stuck_before: now - gauges.stuck_after,
            expired_if_created_before: now - gauges.default_expiry,
        };
        let read = async {
            let summary = self.store.open_summary(&request).await?;
            let attention = self.store.attention().await?;
            let refunds = self.store.refund_summary().await?;
            Ok::<_, StoreError>((summary, attention, refunds))
        };
        match read.await {
            Ok((summary, attention, refunds)) => {
                self.health.db(true);
                self.publish(&summary, &attention, now);
                for mch in &self.merchants {
                    let of = refunds.iter().find(|r| &r.mch_id == mch);
                    self.telemetry.refund_gauges(mch, of, now);
                }
                if self.bills {
                    match newest_bill_gauges(&self.store).await {
                        Ok(bills) => {
                            for (mch, g) in bills.iter().filter(|(m, _)| self.merchants.contains(m))
                            {
                                self.telemetry.bill_gauges(mch, g);
                            }
                        }
                        Err(error) => self.telemetry.db_error(DbOp::Bills, &error),
                    }
                }
            }
            Err(error) => {
                self.health.db(false);
                self.telemetry.db_error(DbOp::Gauges, &error);
            }
        }
    }

    fn publish(&self, summary: &[OpenSummary], attention: &[Attention], now: DateTime<Utc>) {
        for mch in &self.merchants {
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
            self.telemetry.open_orders(mch, &counts);
        }
    }
}

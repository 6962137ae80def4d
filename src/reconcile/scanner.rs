//! One scan: claim due orders batch after batch, query WeChat for each with bounded concurrency
//! and a global rate limit, decide, and apply the decision under the claim's lease.
//!
//! No database transaction is open while a query is in flight: the claim commits before the
//! first query, and each order's write is its own short transaction after its reply.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::policy::{self, Policy};
use super::settle::{self, Planned, Report, Reported, Settler, Verdict, order_view};
use crate::domain::{OutTradeNo, Source};
use crate::gateway::{Gateway, GatewayError, Merchant, OrderRef, RetryHint};
use crate::store::{
    Applied, Backend, Change, ClaimRequest, Claimed, ClaimedOrder, Guard, OrderRow, Store,
    StoreError, UnreadableOrder, Write,
};
use crate::telemetry::{DbOp, Telemetry};

/// Writes committed together by a scan's writer (one transaction, one fsync).
pub const MAX_WRITE_BATCH: usize = 64;

/// One order's write, waiting for the scan's writer.
struct WriteRequest {
    row: OrderRow,
    guard: Guard,
    change: Change,
    reply: oneshot::Sender<Result<(Applied, Change), StoreError>>,
}

/// How long every query waits after WeChat answered FREQUENCY_LIMITED.
pub const RATE_LIMITED_PAUSE: Duration = Duration::from_secs(5);

/// The scanner's settings.
#[derive(Debug, Clone)]
pub struct ScanSettings {
    pub batch_size: u32,
    pub lease: TimeDelta,
    pub concurrency: usize,
    pub max_qps: u32,
    pub policy: Policy,
    /// How refunds are polled (after the orders, in the same scan); `None`: not at all.
    pub refunds: Option<super::refund_policy::RefundPolicy>,
}

/// What one scan did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub claimed: usize,
    pub settled: usize,
    pub rescheduled: usize,
    pub noop: usize,
    pub abandoned: usize,
    /// Orders set aside: a value in their row cannot be used.
    pub set_aside: usize,
}

/// Claims, queries, decides and applies. Cheap to clone.
#[derive(Clone)]
pub struct Scanner {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) store: Store,
    pub(super) gateway: Arc<Gateway>,
    pub(super) merchants: HashMap<String, Merchant>,
    pub(super) settings: ScanSettings,
    limiter: DefaultDirectRateLimiter,
    paused_until: Mutex<Option<Instant>>,
    pub(super) telemetry: Telemetry,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// What happened to one claimed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    Settled,
    Rescheduled,
    NoOp,
    Abandoned,
    SetAside,
}

impl Scanner {
    pub fn new(
        store: Store,
        gateway: Arc<Gateway>,
        merchants: &[Merchant],
        settings: ScanSettings,
        telemetry: Telemetry,
    ) -> Scanner {
        let qps = NonZeroU32::new(settings.max_qps).unwrap_or(NonZeroU32::MIN);
        // A small burst keeps the achieved rate close to the cap without idling at start.
        let burst = NonZeroU32::new((settings.max_qps / 10).max(1)).unwrap_or(NonZeroU32::MIN);
        Scanner {
            inner: Arc::new(Inner {
                store,
                gateway,
                merchants: merchants
                    .iter()
                    .map(|m| (m.mch_id.as_str().to_owned(), m.clone()))
                    .collect(),
                limiter: RateLimiter::direct(Quota::per_second(qps).allow_burst(burst)),
                settings,
                paused_until: Mutex::new(None),
                telemetry,
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// How long a scan may go without progress (a claim, a finished order) before it counts as
    /// stuck: two leases. After one, anything it still writes is fenced off anyway; the second
    /// covers an order that waits for the rate limiter, closes, then queries, all at their
    /// timeouts.
    pub fn stall_limit(&self) -> Duration {
        2 * self
            .inner
            .settings
            .lease
            .to_std()
            .unwrap_or(Duration::from_secs(60))
    }

    /// Drains every due order: claims a batch, and keeps claiming while batches come back full,
    /// with up to `concurrency` queries in flight. Once `stop` is cancelled, no new order is
    /// started; claimed but unstarted orders are left to their lease. `progress` is called at
    /// each claim and each finished order (the daemon feeds systemd's watchdog from it).
    pub async fn scan(
        &self,
        stop: &CancellationToken,
        progress: &(dyn Fn() + Sync),
    ) -> Result<ScanReport, StoreError> {
        let started = Instant::now();
        let inner = &self.inner;
        let batch = inner.settings.batch_size;
        let slots = Arc::new(Semaphore::new(inner.settings.concurrency.max(1)));
        let mut in_flight: JoinSet<Result<Processed, StoreError>> = JoinSet::new();
        // Every order's write goes through one writer that commits whatever is waiting in one
        // transaction: under load, dozens of guarded writes share one commit.
        let (writes, queue) = mpsc::channel::<WriteRequest>(MAX_WRITE_BATCH * 2);
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        let mut writers = JoinSet::new();
        // SQLite has one writer at a time anyway; a server database takes a few in parallel,
        // each batch paying its round trips while another commits.
        let writer_count = match inner.store.backend() {
            Backend::Sqlite => 1,
            _ => 4,
        };
        for _ in 0..writer_count {
            writers.spawn(writer_loop(inner.store.clone(), queue.clone()));
        }
        let mut report = ScanReport::default();
        let mut first_error: Option<StoreError> = None;
        'claiming: while !stop.is_cancelled() {
            progress();
            let now = Utc::now();
            let request = ClaimRequest {
                now,
                grace: inner.settings.policy.grace,
                lease_until: now + inner.settings.lease,
                limit: batch,
            };
            let claimed = match inner.store.claim_due(&request).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    inner.telemetry.db_error(DbOp::Claim, &e);
                    first_error.get_or_insert(e);
                    break;
                }
            };
            report.claimed += claimed.len();
            let full = claimed.len() as u32 >= batch;
            let mut orders = claimed.into_iter();
            while let Some(order) = orders.next() {
                let permit = tokio::select! {
                    permit = slots.clone().acquire_owned() => permit,
                    _ = stop.cancelled() => {
                        // Not started: their leases bring them back.
                        report.abandoned += 1 + orders.len();
                        break 'claiming;
                    }
                };
                let Ok(permit) = permit else { break 'claiming };
                let scanner = self.clone();
                let stop = stop.clone();
                let writes = writes.clone();
                in_flight.spawn(async move {
                    let processed = scanner.process(order, &stop, &writes).await;
                    drop(permit);
                    processed
                });
                while let Some(joined) = in_flight.try_join_next() {
                    tally(&inner.telemetry, joined, &mut report, &mut first_error);
                    progress();
                }
            }
            if !full {
                break;
            }
        }
        while let Some(joined) = in_flight.join_next().await {
            tally(&inner.telemetry, joined, &mut report, &mut first_error);
            progress();
        }
        drop(writes);
        while let Some(joined) = writers.join_next().await {
            if let Err(e) = joined {
                tracing::error!(error = %e, "writer task failed");
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        inner.telemetry.scan_finished(
            started.elapsed(),
            report.claimed,
            Utc::now().timestamp_millis() as f64 / 1000.0,
        );
        Ok(report)
    }

    /// Queries one claimed order and applies the decision; sets aside a row it cannot use.
    async fn process(
        &self,
        claimed: Claimed,
        stop: &CancellationToken,
        writes: &mpsc::Sender<WriteRequest>,
    ) -> Result<Processed, StoreError> {
        let inner = &self.inner;
        if stop.is_cancelled() {
            return Ok(Processed::Abandoned);
        }
        let order = match claimed {
            Claimed::Order(order) => order,
            Claimed::Unreadable(row) => return self.set_aside(&row).await,
        };
        let row = &order.row;
        let Some(merchant) = inner.merchants.get(row.mch_id.as_str()) else {
            return self.unconfigured(&order, writes).await;
        };
        let out_trade_no = match usable(row, merchant) {
            Ok(()) => row.out_trade_no.clone(),
            Err(reason) => {
                return self
                    .set_aside(&UnreadableOrder {
                        id: row.id,
                        lease: Some(order.lease),
                        mch_id: Some(row.mch_id.to_string()),
                        out_trade_no: Some(row.out_trade_no.to_string()),
                        reason,
                    })
                    .await;
            }
        };
        self.visit(&order, merchant, out_trade_no, stop, writes)
            .await
    }

    /// An order of a merchant not configured here: not ours to query; look again later, in
    /// case the configuration gains it.
    async fn unconfigured(
        &self,
        order: &ClaimedOrder,
        writes: &mpsc::Sender<WriteRequest>,
    ) -> Result<Processed, StoreError> {
        let row = &order.row;
        let change = Change::Reschedule {
            at: Utc::now() + TimeDelta::minutes(10),
            note: Some(format!(
                "merchant {} is not configured",
                crate::text::quote(row.mch_id.as_str())
            )),
        };
        // Both names come from the application's table: quoted, never raw.
        tracing::warn!(
            mch_id = %crate::text::quote(row.mch_id.as_str()),
            out_trade_no = %crate::text::quote(row.out_trade_no.as_str()),
            "order of an unconfigured merchant"
        );
        self.write(row, order.guard(), change, writes).await
    }

    /// Closes an expired order or queries it, in its turn, and writes what the answer decides.
    async fn visit(
        &self,
        order: &ClaimedOrder,
        merchant: &Merchant,
        out_trade_no: OutTradeNo,
        stop: &CancellationToken,
        writes: &mpsc::Sender<WriteRequest>,
    ) -> Result<Processed, StoreError> {
        let row = &order.row;
        if self
            .inner
            .settings
            .policy
            .should_close(&order_view(row), Utc::now())
        {
            if !self.take_turn(stop).await {
                return Ok(Processed::Abandoned);
            }
            if let Some(processed) = self.close(order, merchant, &out_trade_no, writes).await? {
                return Ok(processed);
            }
            // ORDERPAID: the customer paid at the last moment; query and settle it.
        }

        if !self.take_turn(stop).await {
            return Ok(Processed::Abandoned);
        }
        self.query(order, merchant, out_trade_no, writes).await
    }

    /// Queries an order and writes what the answer decides; after a lost write, applies the
    /// verified report to what the order has become.
    async fn query(
        &self,
        order: &ClaimedOrder,
        merchant: &Merchant,
        out_trade_no: OutTradeNo,
        writes: &mpsc::Sender<WriteRequest>,
    ) -> Result<Processed, StoreError> {
        let (inner, row) = (&self.inner, &order.row);
        let started = Instant::now();
        let outcome = inner
            .gateway
            .order_query(merchant, &OrderRef::OutTradeNo(out_trade_no))
            .await;
        inner.telemetry.orderquery(
            row.mch_id.as_str(),
            row.out_trade_no.as_str(),
            &outcome,
            started.elapsed(),
        );
        self.slow_down_if_asked(outcome.as_ref().err());
        let report = Report {
            reported: Reported::Query(&outcome),
            source: Source::Poll,
        };
        let change = match settle::plan(
            report.decide(&order_view(row), &inner.settings.policy),
            report.source,
        ) {
            Planned::Write(change) => change,
            Planned::Nothing { .. } => return Ok(Processed::NoOp),
        };
        let moves = matches!(change, Change::Settle { .. } | Change::Anomaly { .. });
        let processed = self.write(row, order.guard(), change, writes).await?;
        if processed != Processed::NoOp || !moves {
            return Ok(processed);
        }
        // The order moved under us (the merchant's handler, a notification).
        let settler = Settler {
            store: &inner.store,
            telemetry: &inner.telemetry,
            policy: &inner.settings.policy,
        };
        Ok(processed_of(
            &settler.apply_after_lost_write(row, report).await?,
        ))
    }

    /// Closes an expired order at WeChat and writes what the answer decides; `None` when
    /// WeChat says it is paid (query it instead).
    async fn close(
        &self,
        order: &ClaimedOrder,
        merchant: &Merchant,
        out_trade_no: &OutTradeNo,
        writes: &mpsc::Sender<WriteRequest>,
    ) -> Result<Option<Processed>, StoreError> {
        let inner = &self.inner;
        let row = &order.row;
        let answer = inner.gateway.close_order(merchant, out_trade_no).await;
        inner
            .telemetry
            .closeorder(row.mch_id.as_str(), row.out_trade_no.as_str(), &answer);
        self.slow_down_if_asked(answer.as_ref().err());
        let policy = &inner.settings.policy;
        let Some(decision) = policy::decide_close(
            &order_view(row),
            &answer,
            Utc::now(),
            rand::random::<f64>(),
            policy,
        ) else {
            return Ok(None);
        };
        Ok(Some(match settle::plan(decision, Source::Expire) {
            Planned::Write(change) => self.write(row, order.guard(), change, writes).await?,
            Planned::Nothing { .. } => Processed::NoOp,
        }))
    }

    /// After FREQUENCY_LIMITED, every query of this scanner waits a little.
    pub(super) fn slow_down_if_asked(&self, error: Option<&GatewayError>) {
        if error.is_some_and(|e| e.retry_hint() == RetryHint::SlowDown) {
            *lock(&self.inner.paused_until) = Some(Instant::now() + RATE_LIMITED_PAUSE);
        }
    }

    /// Sets a claimed order aside under its lease (a person must fix its row), and says so.
    async fn set_aside(&self, row: &UnreadableOrder) -> Result<Processed, StoreError> {
        let inner = &self.inner;
        let applied = inner
            .store
            .set_aside(row.id, row.lease, &row.reason, Utc::now())
            .await?;
        if applied == Applied::NoOp {
            return Ok(Processed::NoOp);
        }
        inner.telemetry.set_aside(
            row.mch_id.as_deref(),
            row.out_trade_no.as_deref(),
            row.id,
            &row.reason,
        );
        Ok(Processed::SetAside)
    }

    /// Hands a change to the scan's writer, waits for its commit, and reports it (a give-up
    /// is counted as it is handed over).
    async fn write(
        &self,
        row: &OrderRow,
        guard: Guard,
        change: Change,
        writes: &mpsc::Sender<WriteRequest>,
    ) -> Result<Processed, StoreError> {
        if let Change::GiveUp { reason } = &change {
            self.inner
                .telemetry
                .gave_up(row.mch_id.as_str(), row.out_trade_no.as_str(), reason);
        }
        let (reply, done) = oneshot::channel();
        let request = WriteRequest {
            row: row.clone(),
            guard,
            change,
            reply,
        };
        writes
            .send(request)
            .await
            .map_err(|_| StoreError::WriterStopped)?;
        let (applied, change) = done.await.map_err(|_| StoreError::WriterStopped)??;
        let telemetry = &self.inner.telemetry;
        Ok(match applied {
            Applied::Done => processed_of(&settle::recorded(telemetry, row, &change)),
            Applied::NoOp => {
                let source = match &change {
                    Change::Settle { source, .. } | Change::Anomaly { source, .. } => *source,
                    Change::Reschedule { .. } | Change::GiveUp { .. } => Source::Poll,
                };
                telemetry.noop(row.mch_id.as_str(), row.out_trade_no.as_str(), source);
                Processed::NoOp
            }
        })
    }

    /// Waits for this order's turn to call WeChat; `false` when stopped first.
    pub(super) async fn take_turn(&self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = self.wait_for_turn() => true,
            _ = stop.cancelled() => false,
        }
    }

    /// Waits for the rate limiter, and for any pause WeChat asked for.
    async fn wait_for_turn(&self) {
        loop {
            let paused = *lock(&self.inner.paused_until);
            match paused {
                Some(until) if until > Instant::now() => {
                    tokio::time::sleep_until(until.into()).await;
                }
                _ => break,
            }
        }
        self.inner.limiter.until_ready().await;
    }
}

/// Commits waiting writes in batches of up to [`MAX_WRITE_BATCH`] until every sender is gone.
async fn writer_loop(store: Store, queue: Arc<tokio::sync::Mutex<mpsc::Receiver<WriteRequest>>>) {
    let mut batch: Vec<WriteRequest> = Vec::with_capacity(MAX_WRITE_BATCH);
    loop {
        let received = queue
            .lock()
            .await
            .recv_many(&mut batch, MAX_WRITE_BATCH)
            .await;
        if received == 0 {
            break;
        }
        let writes: Vec<Write<'_>> = batch
            .iter()
            .map(|r| Write {
                order: &r.row,
                guard: r.guard,
                change: &r.change,
            })
            .collect();
        let result = store.apply_many(&writes, Utc::now()).await;
        drop(writes);
        match result {
            Ok(applied) => {
                for (request, applied) in batch.drain(..).zip(applied) {
                    // The order's task may be gone (aborted); its result then has no reader.
                    let _unread = request.reply.send(Ok((applied, request.change)));
                }
            }
            Err(e) => {
                for request in batch.drain(..) {
                    let _unread = request.reply.send(Err(e.same()));
                }
            }
        }
    }
}

type Joined = Result<Result<Processed, StoreError>, tokio::task::JoinError>;

/// Adds one finished order to the scan's report.
fn tally(
    telemetry: &Telemetry,
    joined: Joined,
    report: &mut ScanReport,
    first_error: &mut Option<StoreError>,
) {
    match joined {
        Ok(Ok(Processed::Settled)) => report.settled += 1,
        Ok(Ok(Processed::Rescheduled)) => report.rescheduled += 1,
        Ok(Ok(Processed::NoOp)) => report.noop += 1,
        Ok(Ok(Processed::Abandoned)) => report.abandoned += 1,
        Ok(Ok(Processed::SetAside)) => report.set_aside += 1,
        Ok(Err(e)) => {
            telemetry.db_error(DbOp::Apply, &e);
            report.abandoned += 1;
            first_error.get_or_insert(e);
        }
        Err(e) => {
            tracing::error!(error = %e, "order task failed");
            report.abandoned += 1;
        }
    }
}

/// What a claimed order's report came to, for the scan's tally.
fn processed_of(verdict: &Verdict) -> Processed {
    match verdict {
        Verdict::Moved { .. } | Verdict::Anomaly(_) => Processed::Settled,
        Verdict::StillOpen => Processed::Rescheduled,
        Verdict::Unchanged { .. } | Verdict::LeaseLost => Processed::NoOp,
    }
}

/// Whether a claimed order can be asked about: its appid is its merchant's (its out_trade_no
/// and amount are parsed with the row). Otherwise why not (it is set aside: a report for
/// another appid must never settle it).
fn usable(row: &OrderRow, merchant: &Merchant) -> Result<(), String> {
    if row.appid != merchant.appid {
        return Err(format!(
            "appid {} is not the appid configured for merchant {} ({})",
            crate::text::quote(row.appid.as_str()),
            merchant.mch_id,
            merchant.appid
        ));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain counters and an error slot: consistent even after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

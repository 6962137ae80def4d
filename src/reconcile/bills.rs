//! The T+1 run: one merchant's daily bill of one Beijing day against the shop's tables.
//!
//! 1. Claim the day (`wxpay_bills`, a lease as for orders: one instance runs a day; the claim
//!    deletes the day's previous findings, so a re-run replaces them).
//! 2. Fetch it ([`Gateway::download_bill`], or a file a person downloaded). No bill is an empty
//!    bill; a bill still being made is asked again after `retry_minutes`.
//! 3. Verify it, before anything is applied: the SHA-1 WeChat gave (v3), every line readable,
//!    every row of this merchant, the rows adding up to the summary line. A bill that fails is
//!    refused whole and counted.
//! 4. Compare it, streaming: a parser thread sends batches of rows; each batch is matched with
//!    one lookup of its orders and one of its refunds ([`super::bill_compare`]); what it
//!    decides goes through the one [`Settler`] (payments) or the refund rules (refunds), and
//!    the batch's findings are written under the day's lease.
//! 5. Then the shop's side: every order paid, and every refund succeeded, on that day that the
//!    bill did not list is `local_only`. Which were listed is a bitmap over the day's id span
//!    ([`Seen`]), so memory does not grow with the bill; the day's ids are paged, and a page's
//!    rows read whole only when it holds an id the bill did not list.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, TimeDelta, TimeZone, Utc};
use sha1::{Digest, Sha1};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bill_compare::{self, PaymentCheck, RefundCheck};
use super::policy::Policy;
use super::refund_policy::{RefundPolicy, decide_refund_report};
use super::refund_scan::RefundOrder;
use super::settle::{Report, Reported, Settler, Verdict};
use crate::bill::{self, BillError, BillReader, BillRow, MilliFen, RowKind, SummaryCheck};
use crate::config::BillSettings;
use crate::domain::{OrderState, RefundState, Source};
use crate::gateway::{BillAnswer, Gateway, GatewayError, Merchant};
use crate::store::{
    BillClaim, BillClaimRequest, BillEnd, BillOrigin, BillState, BillTotals, FindingAction,
    FindingKind, FindingObject, IdSpan, NewFinding, RefundApplied, RefundChange, RefundGuard,
    Store, StoreError,
};
use crate::telemetry::{BillFailure, BillGauges, Telemetry};

/// Rows matched per lookup.
pub const BATCH_ROWS: usize = 1000;
/// Local rows read per page of the shop's side.
const PAGE_ROWS: u32 = 1000;
/// Findings of one kind logged one by one per run; the rest are counted.
const LOGGED_PER_KIND: usize = 20;
/// A bitmap of the day's ids is used while their span is at most this many ids (16 MiB).
const MAX_BITMAP_SPAN: i64 = 1 << 27;

/// China Standard Time (UTC+8, no daylight saving time): the bill's clock.
pub fn beijing() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).unwrap_or_else(|| unreachable!("+08:00 is a valid offset"))
}

/// The Beijing day `date` as the UTC instants `[from, to)`.
pub fn day_bounds(date: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = |d: NaiveDate| {
        beijing()
            .from_local_datetime(&d.and_time(NaiveTime::MIN))
            .single()
            .map_or(DateTime::<Utc>::MIN_UTC, |t| t.with_timezone(&Utc))
    };
    (start(date), start(date.succ_opt().unwrap_or(date)))
}

/// Today's date in Beijing.
pub fn beijing_today(now: DateTime<Utc>) -> NaiveDate {
    now.with_timezone(&beijing()).date_naive()
}

/// The days a run at `now` looks at: the last `catch_up_days` Beijing days whose bill WeChat
/// has made by now (from 10:00 the next day), oldest first.
pub fn due_days(now: DateTime<Utc>, catch_up_days: u32) -> Vec<NaiveDate> {
    let today = beijing_today(now);
    (1..=i64::from(catch_up_days))
        .rev()
        .filter_map(|back| today.checked_sub_signed(TimeDelta::days(back)))
        .filter(|d| {
            let (_, next_midnight) = day_bounds(*d);
            now >= next_midnight + TimeDelta::hours(10)
        })
        .collect()
}

/// Where a run's bill comes from.
#[derive(Debug, Clone)]
pub enum BillInput {
    /// Downloaded from WeChat.
    Download,
    /// A file a person downloaded from the merchant platform (plain or gzip).
    File(PathBuf),
}

/// One day to run.
#[derive(Debug, Clone)]
pub struct DayRequest<'a> {
    pub merchant: &'a Merchant,
    pub bill_date: NaiveDate,
    pub input: BillInput,
    /// Run the day even if it was reconciled or is not due (`bills reconcile`).
    pub force: bool,
}

/// What a day's run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DayOutcome {
    Reconciled(DaySummary),
    /// WeChat is still making the bill (or a fetch failed): asked again then.
    Retry {
        at: DateTime<Utc>,
        failure: Option<BillFailure>,
        reason: String,
    },
    /// The bill was refused whole: nothing of it was applied.
    Refused {
        failure: BillFailure,
        reason: String,
    },
    /// Another instance runs this day.
    Busy,
    /// Nothing to do: already reconciled, or its next attempt is not due.
    NotDue(BillState),
    /// This run's lease on the day was lost (it took too long); the other instance's run wins.
    LeaseLost,
    /// The daemon is stopping: the day stays claimed until its lease ends, then runs again
    /// (what was applied is not applied twice).
    Stopped,
}

/// A reconciled day.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DaySummary {
    /// No bill existed (a quiet day at WeChat).
    pub empty: bool,
    pub totals: Totals,
    pub sha1: Option<String>,
    pub findings: Vec<(FindingKind, i64)>,
}

impl DaySummary {
    pub fn count(&self, kind: FindingKind) -> i64 {
        self.findings
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n)
    }
}

/// The bill's own totals, as verified against its summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub rows: i64,
    pub payments: i64,
    pub refunds: i64,
    /// The payments' order amounts, fen.
    pub total_fee: i64,
    /// The refunds' amounts, fen.
    pub refund_fee: i64,
    pub fee: MilliFen,
}

/// Why a run stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum BillRunError {
    /// The database failed (retryable: the day is run again at the next attempt).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The bill could not be read a second time as it was read the first (a changed file).
    #[error("the bill changed while it was read: {0}")]
    Reread(String),
}

/// Runs bill days. Cheap to clone.
#[derive(Clone)]
pub struct BillRunner {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    gateway: Option<Arc<Gateway>>,
    telemetry: Telemetry,
    policy: Policy,
    refund_policy: RefundPolicy,
    settings: BillSettings,
    merchants: Vec<Merchant>,
}

/// Everything a [`BillRunner`] is built from.
pub struct BillRunnerParts {
    pub store: Store,
    /// `None`: files only (an offline `bills reconcile --file`).
    pub gateway: Option<Arc<Gateway>>,
    pub telemetry: Telemetry,
    pub policy: Policy,
    pub refund_policy: RefundPolicy,
    pub settings: BillSettings,
    pub merchants: Vec<Merchant>,
}

/// How far a run got, for its lease.
struct Held {
    bill_id: i64,
    lease: i64,
    until: DateTime<Utc>,
}

impl BillRunner {
    pub fn new(parts: BillRunnerParts) -> BillRunner {
        BillRunner {
            inner: Arc::new(Inner {
                store: parts.store,
                gateway: parts.gateway,
                telemetry: parts.telemetry,
                policy: parts.policy,
                refund_policy: parts.refund_policy,
                settings: parts.settings,
                merchants: parts.merchants,
            }),
        }
    }

    pub fn merchants(&self) -> &[Merchant] {
        &self.inner.merchants
    }

    /// Every merchant's due days (see [`due_days`]), each claimed and run unless another
    /// instance holds it or it is done; the earliest retry asked for, if any.
    pub async fn run_due(
        &self,
        now: DateTime<Utc>,
        stop: &CancellationToken,
    ) -> Result<Option<DateTime<Utc>>, BillRunError> {
        let mut retry: Option<DateTime<Utc>> = None;
        for merchant in &self.inner.merchants {
            for bill_date in due_days(now, self.inner.settings.catch_up_days) {
                if stop.is_cancelled() {
                    return Ok(retry);
                }
                let req = DayRequest {
                    merchant,
                    bill_date,
                    input: BillInput::Download,
                    force: false,
                };
                match self.run_day(&req, stop).await? {
                    DayOutcome::Retry { at, .. } => {
                        retry = Some(retry.map_or(at, |r| r.min(at)));
                    }
                    DayOutcome::Reconciled(s) => tracing::info!(
                        mch_id = merchant.mch_id.as_str(),
                        bill_date = %bill_date,
                        rows = s.totals.rows,
                        local_only = s.count(FindingKind::LocalOnly),
                        remote_only = s.count(FindingKind::RemoteOnly),
                        amount_diff = s.count(FindingKind::AmountDiff),
                        settled_by_bill = s.count(FindingKind::SettledByBill),
                        "daily bill reconciled"
                    ),
                    _ => {}
                }
            }
        }
        Ok(retry)
    }

    /// Claims and runs one day.
    pub async fn run_day(
        &self,
        req: &DayRequest<'_>,
        stop: &CancellationToken,
    ) -> Result<DayOutcome, BillRunError> {
        let inner = &self.inner;
        let mch_id = req.merchant.mch_id.as_str();
        let now = Utc::now();
        let claim = inner
            .store
            .claim_bill(&BillClaimRequest {
                mch_id,
                bill_date: req.bill_date,
                now,
                lease_for: self.lease_for(),
                force: req.force,
            })
            .await?;
        let mut held = match claim {
            BillClaim::Claimed { bill_id, lease } => Held {
                bill_id,
                lease,
                until: now + self.lease_for(),
            },
            BillClaim::Busy => return Ok(DayOutcome::Busy),
            BillClaim::NotDue { state } => return Ok(DayOutcome::NotDue(state)),
        };
        let (file, origin, expected_sha1) = match self.fetch(req).await {
            Fetched::File { file, origin, sha1 } => (Some(file), origin, sha1),
            Fetched::Empty => (None, BillOrigin::Download, None),
            Fetched::Retry { failure, reason } => {
                let at = Utc::now() + self.retry_after();
                if let Some(f) = failure {
                    inner
                        .telemetry
                        .bill_failed(mch_id, req.bill_date, f, &reason);
                }
                let state = if failure.is_some() {
                    BillState::Failed
                } else {
                    BillState::NotReady
                };
                let end = BillEnd {
                    state,
                    origin: Some(BillOrigin::Download),
                    sha1: None,
                    totals: None,
                    summary_check: None,
                    last_error: Some(&reason),
                    next_attempt_at: Some(at),
                    now: Utc::now(),
                };
                if !inner
                    .store
                    .finish_bill(held.bill_id, held.lease, &end)
                    .await?
                {
                    return Ok(DayOutcome::LeaseLost);
                }
                return Ok(DayOutcome::Retry {
                    at,
                    failure,
                    reason,
                });
            }
            Fetched::Refused { failure, reason } => {
                return self.refuse(req, &held, None, failure, reason).await;
            }
        };
        let (from, to) = day_bounds(req.bill_date);
        let mut sides = Sides {
            orders: Seen::new(inner.store.paid_span(mch_id, from, to).await?),
            refunds: Seen::new(inner.store.refund_span(mch_id, from, to).await?),
        };
        let (totals, sha1) = match file {
            None => (Totals::default(), None),
            Some(file) => {
                let merchant_ids = merchant_ids(req.merchant);
                let verified = tokio::task::spawn_blocking(move || {
                    let v = verify(&file, expected_sha1.as_deref(), &merchant_ids);
                    (file, v)
                })
                .await
                .map_err(|e| BillRunError::Reread(e.to_string()))?;
                let (file, verdict) = verified;
                match verdict {
                    Err((failure, reason)) => {
                        let origin = Some(origin);
                        return self.refuse(req, &held, origin, failure, reason).await;
                    }
                    Ok((totals, sha1)) => {
                        match self
                            .compare_bill(req, &mut held, file, &mut sides, stop)
                            .await?
                        {
                            Compared::Done => (totals, Some(sha1)),
                            Compared::LeaseLost => return Ok(DayOutcome::LeaseLost),
                            Compared::Stopped => return Ok(DayOutcome::Stopped),
                        }
                    }
                }
            }
        };
        match self.local_side(req, &mut held, &sides).await? {
            Compared::Done => {}
            Compared::LeaseLost => return Ok(DayOutcome::LeaseLost),
            Compared::Stopped => return Ok(DayOutcome::Stopped),
        }
        let end = BillEnd {
            state: BillState::Reconciled,
            origin: Some(origin),
            sha1: sha1.as_deref(),
            totals: Some(BillTotals {
                row_count: totals.rows,
                payment_count: totals.payments,
                refund_count: totals.refunds,
                total_fee: totals.total_fee,
                refund_fee: totals.refund_fee,
                fee_milli_fen: totals.fee.get(),
            }),
            // An empty day has no summary to check.
            summary_check: sha1.is_some().then_some("adds_up"),
            last_error: None,
            next_attempt_at: None,
            now: Utc::now(),
        };
        if !inner
            .store
            .finish_bill(held.bill_id, held.lease, &end)
            .await?
        {
            return Ok(DayOutcome::LeaseLost);
        }
        let record = inner.store.bill(mch_id, req.bill_date).await?;
        let findings = record.map(|r| r.findings).unwrap_or_default();
        // The gauges show the merchant's newest reconciled day (a catch-up of an older day
        // does not take them back).
        for (mch, g) in newest_bill_gauges(&inner.store).await? {
            if mch == mch_id {
                inner.telemetry.bill_gauges(mch_id, &g);
            }
        }
        Ok(DayOutcome::Reconciled(DaySummary {
            empty: sha1.is_none(),
            totals,
            sha1,
            findings,
        }))
    }

    fn lease_for(&self) -> TimeDelta {
        TimeDelta::seconds(i64::try_from(self.inner.settings.lease_seconds).unwrap_or(300))
    }

    fn retry_after(&self) -> TimeDelta {
        TimeDelta::minutes(i64::try_from(self.inner.settings.retry_minutes).unwrap_or(30))
    }

    /// Ends the day as refused: counted, logged, the reason stored; a downloaded bill is asked
    /// for again after `retry_minutes` (WeChat may serve a good copy), a file is not.
    async fn refuse(
        &self,
        req: &DayRequest<'_>,
        held: &Held,
        origin: Option<BillOrigin>,
        failure: BillFailure,
        reason: String,
    ) -> Result<DayOutcome, BillRunError> {
        let inner = &self.inner;
        let mch_id = req.merchant.mch_id.as_str();
        inner
            .telemetry
            .bill_failed(mch_id, req.bill_date, failure, &reason);
        let next_attempt_at = match req.input {
            BillInput::Download => Some(Utc::now() + self.retry_after()),
            BillInput::File(_) => None,
        };
        let summary_check = matches!(failure, BillFailure::SummaryMismatch).then_some("differs");
        let end = BillEnd {
            state: BillState::Refused,
            origin,
            sha1: None,
            totals: None,
            summary_check,
            last_error: Some(&reason),
            next_attempt_at,
            now: Utc::now(),
        };
        if !inner
            .store
            .finish_bill(held.bill_id, held.lease, &end)
            .await?
        {
            return Ok(DayOutcome::LeaseLost);
        }
        Ok(DayOutcome::Refused { failure, reason })
    }

    async fn fetch(&self, req: &DayRequest<'_>) -> Fetched {
        match &req.input {
            BillInput::File(path) => match std::fs::File::open(path) {
                Ok(file) => Fetched::File {
                    file,
                    origin: BillOrigin::File,
                    sha1: None,
                },
                Err(e) => Fetched::Refused {
                    failure: BillFailure::Malformed,
                    reason: format!("{}: {e}", path.display()),
                },
            },
            BillInput::Download => {
                let Some(gateway) = &self.inner.gateway else {
                    return Fetched::Retry {
                        failure: Some(BillFailure::Rejected),
                        reason: "no WeChat client in this run".into(),
                    };
                };
                match gateway.download_bill(req.merchant, req.bill_date).await {
                    Ok(BillAnswer::Empty) => Fetched::Empty,
                    Ok(BillAnswer::NotReady) => Fetched::Retry {
                        failure: None,
                        reason: "WeChat is still making the bill".into(),
                    },
                    Ok(BillAnswer::File(f)) => Fetched::File {
                        file: f.file,
                        origin: BillOrigin::Download,
                        sha1: f.sha1,
                    },
                    Err(e) => Fetched::Retry {
                        failure: Some(fetch_failure(&e)),
                        reason: e.to_string(),
                    },
                }
            }
        }
    }

    /// Pass 2: the bill's rows against the shop's, batch by batch, from a parser thread.
    async fn compare_bill(
        &self,
        req: &DayRequest<'_>,
        held: &mut Held,
        mut file: std::fs::File,
        sides: &mut Sides,
        stop: &CancellationToken,
    ) -> Result<Compared, BillRunError> {
        let (tx, mut rx) = mpsc::channel::<Result<Vec<BillRow>, String>>(2);
        let reader = tokio::task::spawn_blocking(move || {
            let text = file
                .seek(SeekFrom::Start(0))
                .and_then(|_| bill::open_text(file));
            match text {
                Ok(text) => stream_rows(text, &tx),
                Err(e) => {
                    // The receiver is gone only when the run stopped.
                    let _ = tx.blocking_send(Err(e.to_string()));
                }
            }
        });
        let mut logged = Logged::default();
        let mut outcome = Compared::Done;
        while let Some(batch) = rx.recv().await {
            let rows = match batch {
                Ok(rows) => rows,
                Err(e) => {
                    drop(rx);
                    let _ = reader.await;
                    return Err(BillRunError::Reread(e));
                }
            };
            if stop.is_cancelled() {
                outcome = Compared::Stopped;
                break;
            }
            if !self.renew(held).await? {
                outcome = Compared::LeaseLost;
                break;
            }
            if !self
                .compare_batch(req, held, &rows, sides, &mut logged)
                .await?
            {
                outcome = Compared::LeaseLost;
                break;
            }
        }
        drop(rx);
        // The parser thread ends at its next send once the receiver is gone.
        let _ = reader.await;
        Ok(outcome)
    }

    /// Renews the day's lease when half of it has gone; false when it was lost.
    async fn renew(&self, held: &mut Held) -> Result<bool, BillRunError> {
        let now = Utc::now();
        if held.until - now > self.lease_for() / 2 {
            return Ok(true);
        }
        let until = now + self.lease_for();
        if !self
            .inner
            .store
            .extend_bill_lease(held.bill_id, held.lease, until)
            .await?
        {
            return Ok(false);
        }
        held.until = until;
        Ok(true)
    }

    /// One batch: one lookup of its orders, one of its refunds, each row compared and what it
    /// decides applied, then its findings written under the lease (false: the lease was lost).
    async fn compare_batch(
        &self,
        req: &DayRequest<'_>,
        held: &Held,
        rows: &[BillRow],
        sides: &mut Sides,
        logged: &mut Logged,
    ) -> Result<bool, BillRunError> {
        let inner = &self.inner;
        let mch_id = req.merchant.mch_id.as_str();
        let trade_nos: Vec<&str> = distinct(
            rows.iter()
                .filter(|r| matches!(r.kind, RowKind::Payment))
                .map(|r| r.out_trade_no.as_str()),
        );
        let refund_nos: Vec<&str> = distinct(rows.iter().filter_map(|r| match &r.kind {
            RowKind::Refund(f) => Some(f.out_refund_no.as_str()),
            RowKind::Payment => None,
        }));
        let orders = if trade_nos.is_empty() {
            HashMap::new()
        } else {
            let reads = inner
                .store
                .orders_by_out_trade_no(mch_id, &trade_nos)
                .await?;
            by_number(
                reads,
                |o| o.out_trade_no.as_str(),
                |u| (u.out_trade_no.clone(), u.id, u.reason.clone()),
            )
        };
        let refunds = if refund_nos.is_empty() {
            HashMap::new()
        } else {
            let reads = inner
                .store
                .refunds_by_out_refund_no(mch_id, &refund_nos)
                .await?;
            by_number(
                reads,
                |r| r.out_refund_no.as_str(),
                |u| (u.out_refund_no.clone(), u.id, u.reason.clone()),
            )
        };
        let mut findings: Vec<Finding> = Vec::new();
        for row in rows {
            let finding = match &row.kind {
                RowKind::Payment => match orders.get(row.out_trade_no.as_str()) {
                    Some(Err(reason)) => Some(unreadable_finding(row, None, reason)),
                    local => {
                        let local = local.and_then(|l| l.as_ref().ok());
                        if let Some(order) = local {
                            sides.orders.insert(order.id);
                        }
                        self.payment(row, local).await?
                    }
                },
                RowKind::Refund(refund) => match refunds.get(refund.out_refund_no.as_str()) {
                    Some(Err(reason)) => Some(unreadable_finding(row, Some(refund), reason)),
                    local => {
                        let local = local.and_then(|l| l.as_ref().ok());
                        if let Some(r) = local {
                            sides.refunds.insert(r.id);
                        }
                        self.refund(row, refund, local).await?
                    }
                },
            };
            findings.extend(finding);
        }
        self.write_findings(req, held, &findings, logged).await
    }

    /// One payment row: its finding, if any, after applying what it decides.
    async fn payment(
        &self,
        row: &BillRow,
        local: Option<&crate::store::OrderRow>,
    ) -> Result<Option<Finding>, BillRunError> {
        let remote = Some(row.total_fee.get());
        let base = |kind, action, detail: String| Finding {
            kind,
            object: FindingObject::Payment,
            out_trade_no: row.out_trade_no.clone(),
            out_refund_no: None,
            transaction_id: Some(row.transaction_id.clone()),
            local_fee: local.map(|o| o.total_fee.get()),
            remote_fee: remote,
            local_state: local.map(|o| o.state.as_str().to_owned()),
            remote_state: Some(row.trade_state.clone()),
            action,
            line: row.line,
            detail,
        };
        Ok(match bill_compare::check_payment(row, local) {
            PaymentCheck::Matches => None,
            PaymentCheck::RemoteOnly { detail } => Some(base(
                FindingKind::RemoteOnly,
                FindingAction::Reported,
                detail,
            )),
            PaymentCheck::Differs { kind, detail } => {
                Some(base(kind, FindingAction::Reported, detail))
            }
            PaymentCheck::Settle(report) => {
                let Some(order) = local else {
                    return Ok(None);
                };
                let settler = Settler {
                    store: &self.inner.store,
                    telemetry: &self.inner.telemetry,
                    policy: &self.inner.policy,
                };
                let report = Report {
                    reported: Reported::Payment(&report),
                    source: Source::Bill,
                };
                let verdict = settler.apply_report(order.clone(), None, report).await?;
                settled_finding(verdict, order.state).map(|(kind, action, detail)| {
                    let mut f = base(kind, action, detail);
                    f.local_state = Some(order.state.as_str().to_owned());
                    f
                })
            }
        })
    }

    /// One refund row: its finding, if any, after applying what it decides.
    async fn refund(
        &self,
        row: &BillRow,
        refund: &bill::BillRefund,
        local: Option<&crate::store::RefundRow>,
    ) -> Result<Option<Finding>, BillRunError> {
        let base = |kind, action, detail: String| Finding {
            kind,
            object: FindingObject::Refund,
            out_trade_no: row.out_trade_no.clone(),
            out_refund_no: Some(refund.out_refund_no.clone()),
            transaction_id: Some(row.transaction_id.clone()),
            local_fee: local.map(|r| r.refund_fee.get()),
            remote_fee: Some(refund.refund_fee.get()),
            local_state: local.map(|r| r.state.as_str().to_owned()),
            remote_state: Some(refund.status.clone()),
            action,
            line: row.line,
            detail,
        };
        Ok(match bill_compare::check_refund(row, refund, local) {
            RefundCheck::Matches => None,
            RefundCheck::RemoteOnly { detail } => Some(base(
                FindingKind::RemoteOnly,
                FindingAction::Reported,
                detail,
            )),
            RefundCheck::Differs { kind, detail } => {
                Some(base(kind, FindingAction::Reported, detail))
            }
            RefundCheck::Settle(report) => {
                let Some(local) = local else {
                    return Ok(None);
                };
                self.settle_refund(local, &report)
                    .await?
                    .map(|(kind, action, detail)| base(kind, action, detail))
            }
        })
    }

    /// A refund open locally that the bill says ended: decided by the refund rules, written
    /// under the refund's guard (no lease, as a notification's).
    async fn settle_refund(
        &self,
        row: &crate::store::RefundRow,
        report: &crate::gateway::RefundReport,
    ) -> Result<Option<(FindingKind, FindingAction, String)>, BillRunError> {
        let inner = &self.inner;
        let order = RefundOrder::of(&inner.store, row).await?;
        let now = Utc::now();
        let change = decide_refund_report(
            &order.view(row),
            report,
            Source::Bill,
            now,
            0.0,
            &inner.refund_policy,
        );
        if !matches!(change, RefundChange::Finish { .. }) {
            return Ok(None);
        }
        let guard = RefundGuard {
            refund_id: row.id,
            lease: None,
        };
        Ok(match inner.store.apply_refund(guard, &change, now).await? {
            RefundApplied::Done {
                state,
                order_refunded,
            } => {
                inner.telemetry.refund_finished(
                    row.mch_id.as_str(),
                    row.out_refund_no.as_str(),
                    state,
                    Source::Bill,
                    order_refunded,
                );
                Some(match state {
                    RefundState::AmountMismatch => (
                        FindingKind::AmountDiff,
                        FindingAction::Quarantined,
                        "the bill's refund does not match the row: quarantined as AMOUNT_MISMATCH"
                            .into(),
                    ),
                    RefundState::Success => (
                        FindingKind::SettledByBill,
                        FindingAction::Settled,
                        "refund SUCCESS by the daily bill".into(),
                    ),
                    other => (
                        FindingKind::StateDiff,
                        FindingAction::Settled,
                        format!("refund {} by the daily bill", other.as_str()),
                    ),
                })
            }
            // Another writer finished it first.
            RefundApplied::NoOp => None,
        })
    }

    /// The shop's side of the day: every order paid (and refund succeeded) on it that the bill
    /// did not list, a `local_only` finding each. The day's rows are paged by id within their
    /// span as it is now (the orders the bill settled included), ids only: a page's rows are
    /// read whole only when one of its ids was not in the bill.
    async fn local_side(
        &self,
        req: &DayRequest<'_>,
        held: &mut Held,
        sides: &Sides,
    ) -> Result<Compared, BillRunError> {
        let mut logged = Logged::default();
        for side in [Side::Orders, Side::Refunds] {
            let seen = match side {
                Side::Orders => &sides.orders,
                Side::Refunds => &sides.refunds,
            };
            // From the day's first id to its last (the store reads pages in id order).
            let span = self.local_span(side, req).await?;
            let (mut after, last_id) = match (span.min_id, span.max_id) {
                (Some(lo), Some(hi)) => (lo.saturating_sub(1), hi),
                _ => (0, -1),
            };
            while after < last_id {
                let ids = self.local_ids(side, req, after).await?;
                let Some(&last) = ids.last() else { break };
                let mut findings = Vec::new();
                if ids.iter().any(|id| !seen.contains(*id)) {
                    findings = self
                        .local_page(side, req, after)
                        .await?
                        .iter()
                        .filter(|l| l.id() <= last && !seen.contains(l.id()))
                        .filter_map(Local::finding)
                        .collect();
                }
                after = last;
                if !self.renew(held).await?
                    || !self
                        .write_findings(req, held, &findings, &mut logged)
                        .await?
                {
                    return Ok(Compared::LeaseLost);
                }
                if ids.len() < PAGE_ROWS as usize {
                    break;
                }
            }
        }
        Ok(Compared::Done)
    }

    async fn local_span(&self, side: Side, req: &DayRequest<'_>) -> Result<IdSpan, StoreError> {
        let (from, to) = day_bounds(req.bill_date);
        let mch_id = req.merchant.mch_id.as_str();
        match side {
            Side::Orders => self.inner.store.paid_span(mch_id, from, to).await,
            Side::Refunds => self.inner.store.refund_span(mch_id, from, to).await,
        }
    }

    /// The ids alone of the page [`Self::local_page`] would read.
    async fn local_ids(
        &self,
        side: Side,
        req: &DayRequest<'_>,
        after: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let (from, to) = day_bounds(req.bill_date);
        let (store, mch_id) = (&self.inner.store, req.merchant.mch_id.as_str());
        match side {
            Side::Orders => {
                store
                    .paid_ids_between(mch_id, from, to, after, PAGE_ROWS)
                    .await
            }
            Side::Refunds => {
                store
                    .refund_ids_succeeded_between(mch_id, from, to, after, PAGE_ROWS)
                    .await
            }
        }
    }

    /// One page of the day's paid orders or succeeded refunds after `after`.
    async fn local_page(
        &self,
        side: Side,
        req: &DayRequest<'_>,
        after: i64,
    ) -> Result<Vec<Local>, StoreError> {
        let (from, to) = day_bounds(req.bill_date);
        let (store, mch_id) = (&self.inner.store, req.merchant.mch_id.as_str());
        Ok(match side {
            Side::Orders => store
                .paid_between(mch_id, from, to, after, PAGE_ROWS)
                .await?
                .into_iter()
                .map(|o| {
                    o.map_or_else(
                        |u| Local::unreadable("order", u.id, &u.reason),
                        Local::Order,
                    )
                })
                .collect(),
            Side::Refunds => store
                .refunds_succeeded_between(mch_id, from, to, after, PAGE_ROWS)
                .await?
                .into_iter()
                .map(|r| {
                    r.map_or_else(
                        |u| Local::unreadable("refund", u.id, &u.reason),
                        Local::Refund,
                    )
                })
                .collect(),
        })
    }

    /// Writes findings under the lease and logs them (the first few of each kind per run).
    async fn write_findings(
        &self,
        req: &DayRequest<'_>,
        held: &Held,
        findings: &[Finding],
        logged: &mut Logged,
    ) -> Result<bool, BillRunError> {
        if findings.is_empty() {
            return Ok(true);
        }
        let mch_id = req.merchant.mch_id.as_str();
        let rows: Vec<NewFinding<'_>> = findings
            .iter()
            .map(|f| NewFinding {
                kind: f.kind,
                object: f.object,
                mch_id,
                bill_date: req.bill_date,
                out_trade_no: bill_compare::key(&f.out_trade_no),
                out_refund_no: f.out_refund_no.as_deref().map(bill_compare::key),
                transaction_id: f.transaction_id.as_deref().map(bill_compare::key),
                local_fee: f.local_fee,
                remote_fee: f.remote_fee,
                local_state: f.local_state.as_deref().map(state_key),
                remote_state: f.remote_state.as_deref().map(state_key),
                action: f.action,
                line: (f.line > 0).then_some(f.line),
                detail: Some(&f.detail),
            })
            .collect();
        if !self
            .inner
            .store
            .insert_findings(held.bill_id, held.lease, &rows)
            .await?
        {
            return Ok(false);
        }
        for f in findings {
            if logged.take(f.kind) {
                let number = f.out_refund_no.as_deref().unwrap_or(&f.out_trade_no);
                self.inner
                    .telemetry
                    .bill_finding(mch_id, req.bill_date, f.kind, number, &f.detail);
            }
        }
        Ok(true)
    }
}

/// The gauges of each merchant's newest reconciled bill, from the table.
pub async fn newest_bill_gauges(store: &Store) -> Result<Vec<(String, BillGauges)>, StoreError> {
    let mut out = Vec::new();
    for (mch_id, bill_date, _) in store.last_reconciled().await? {
        if let Some(r) = store.bill(&mch_id, bill_date).await? {
            let (day_start, _) = day_bounds(r.bill_date);
            let g = BillGauges {
                day_start_unix: day_start.timestamp(),
                fee_milli_fen: r.totals.map_or(0, |t| t.fee_milli_fen),
                findings: r.findings,
            };
            out.push((mch_id, g));
        }
    }
    Ok(out)
}

/// What fetching gave.
enum Fetched {
    File {
        file: std::fs::File,
        origin: BillOrigin,
        sha1: Option<String>,
    },
    Empty,
    Retry {
        failure: Option<BillFailure>,
        reason: String,
    },
    Refused {
        failure: BillFailure,
        reason: String,
    },
}

enum Compared {
    Done,
    LeaseLost,
    Stopped,
}

/// The fetch failure's reason label.
fn fetch_failure(e: &GatewayError) -> BillFailure {
    if e.is_transient() {
        BillFailure::Transport
    } else {
        BillFailure::Rejected
    }
}

/// The merchant numbers a bill row of this merchant may carry in 商户号 / 特约商户号.
fn merchant_ids(m: &Merchant) -> Vec<String> {
    let mut ids = vec![m.mch_id.as_str().to_owned()];
    if let Some(sub) = &m.sub_mch_id {
        ids.push(sub.as_str().to_owned());
    }
    ids
}

/// A batch's rows of the shop by their number; a row this program cannot read is kept by the
/// number it shows, with why (logged), so that its bill row is not taken for one the shop lacks.
fn by_number<T, U>(
    reads: Vec<Result<T, U>>,
    number: impl Fn(&T) -> &str,
    unreadable: impl Fn(&U) -> (Option<String>, i64, String),
) -> HashMap<String, Result<T, String>> {
    let mut map = HashMap::new();
    for read in reads {
        match read {
            Ok(row) => {
                map.insert(number(&row).to_owned(), Ok(row));
            }
            Err(u) => {
                let (no, id, reason) = unreadable(&u);
                tracing::warn!(
                    id,
                    reason = %reason,
                    "a row of the shop's named in the bill cannot be read; reported, not compared"
                );
                if let Some(no) = no {
                    map.insert(no, Err(reason));
                }
            }
        }
    }
    map
}

/// The finding of a bill row whose row in the shop's table cannot be read.
fn unreadable_finding(row: &BillRow, refund: Option<&bill::BillRefund>, reason: &str) -> Finding {
    Finding {
        kind: FindingKind::StateDiff,
        object: if refund.is_some() {
            FindingObject::Refund
        } else {
            FindingObject::Payment
        },
        out_trade_no: row.out_trade_no.clone(),
        out_refund_no: refund.map(|r| r.out_refund_no.clone()),
        transaction_id: Some(row.transaction_id.clone()),
        local_fee: None,
        remote_fee: Some(refund.map_or(row.total_fee, |r| r.refund_fee).get()),
        local_state: None,
        remote_state: Some(refund.map_or(row.trade_state.clone(), |r| r.status.clone())),
        action: FindingAction::Reported,
        line: row.line,
        detail: format!("the shop's row cannot be read: {reason}"),
    }
}

/// The two sides of the shop's day.
#[derive(Debug, Clone, Copy)]
enum Side {
    Orders,
    Refunds,
}

/// A row of the shop's day: an order paid on it, a refund succeeded on it, or a row this
/// program cannot read (logged, left out of the comparison; the scan sets an open one aside and
/// `status` lists it).
enum Local {
    Order(crate::store::OrderRow),
    Refund(crate::store::RefundRow),
    Unreadable(i64),
}

impl Local {
    fn unreadable(what: &str, id: i64, reason: &str) -> Local {
        tracing::warn!(
            row = what,
            id,
            reason,
            "a row paid on the bill's day cannot be read; it is left out of the comparison"
        );
        Local::Unreadable(id)
    }

    fn id(&self) -> i64 {
        match self {
            Local::Order(o) => o.id,
            Local::Refund(r) => r.id,
            Local::Unreadable(id) => *id,
        }
    }

    /// Its `local_only` finding (none for an unreadable row).
    fn finding(&self) -> Option<Finding> {
        let (object, out_trade_no, out_refund_no, transaction_id, fee, state, detail) = match self {
            Local::Order(o) => (
                FindingObject::Payment,
                o.out_trade_no.as_str(),
                None,
                o.transaction_id.clone(),
                o.total_fee,
                o.state.as_str(),
                "paid here on this day; WeChat's bill does not list it",
            ),
            Local::Refund(r) => (
                FindingObject::Refund,
                r.out_trade_no.as_str(),
                Some(r.out_refund_no.as_str().to_owned()),
                None,
                r.refund_fee,
                r.state.as_str(),
                "refunded here on this day; WeChat's bill does not list it",
            ),
            Local::Unreadable(_) => return None,
        };
        Some(Finding {
            kind: FindingKind::LocalOnly,
            object,
            out_trade_no: out_trade_no.to_owned(),
            out_refund_no,
            transaction_id,
            local_fee: Some(fee.get()),
            remote_fee: None,
            local_state: Some(state.to_owned()),
            remote_state: None,
            action: FindingAction::Reported,
            line: 0,
            detail: detail.into(),
        })
    }
}

/// A state column of a finding (32 characters).
fn state_key(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The distinct values, in first-seen order.
fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = HashSet::new();
    values.filter(|v| seen.insert(*v)).collect()
}

/// What a Settler's verdict on a bill's payment finds.
fn settled_finding(
    verdict: Verdict,
    was: OrderState,
) -> Option<(FindingKind, FindingAction, String)> {
    match verdict {
        Verdict::Moved {
            to: OrderState::AmountMismatch,
            ..
        } => Some((
            FindingKind::AmountDiff,
            FindingAction::Quarantined,
            "the bill's amount or currency is not the order's: quarantined as AMOUNT_MISMATCH"
                .into(),
        )),
        Verdict::Moved { to, .. } => Some((
            FindingKind::SettledByBill,
            FindingAction::Settled,
            format!("{} by the daily bill", to.as_str()),
        )),
        Verdict::Anomaly(a) => Some((
            FindingKind::PaidAfterClose,
            FindingAction::Recorded,
            format!("{a}: WeChat took the payment of an order closed here; refund or fulfil it"),
        )),
        Verdict::Unchanged { reason } if !was.is_open() => Some((
            FindingKind::PaidAfterClose,
            FindingAction::Reported,
            format!("paid at WeChat, {} here ({reason})", was.as_str()),
        )),
        Verdict::Unchanged { .. } | Verdict::StillOpen | Verdict::LeaseLost => None,
    }
}

/// One finding, owned, before it is written.
#[derive(Debug, Clone)]
struct Finding {
    kind: FindingKind,
    object: FindingObject,
    out_trade_no: String,
    out_refund_no: Option<String>,
    transaction_id: Option<String>,
    local_fee: Option<i64>,
    remote_fee: Option<i64>,
    local_state: Option<String>,
    remote_state: Option<String>,
    action: FindingAction,
    line: u64,
    detail: String,
}

/// How many findings of each kind were logged in this run.
#[derive(Default)]
struct Logged(HashMap<&'static str, usize>);

impl Logged {
    fn take(&mut self, kind: FindingKind) -> bool {
        let n = self.0.entry(kind.as_str()).or_insert(0);
        *n += 1;
        *n <= LOGGED_PER_KIND
    }
}

/// Which local rows of the day the bill listed: orders and refunds.
struct Sides {
    orders: Seen,
    refunds: Seen,
}

/// A set of row ids: a bitmap over the day's id span, and a set for the few ids outside it
/// (rows the bill settled, rows paid on another day). Its size follows the day's id span, not
/// the bill.
pub struct Seen {
    base: i64,
    bits: Vec<u64>,
    outside: HashSet<i64>,
}

impl Seen {
    pub fn new(span: IdSpan) -> Seen {
        let (base, len) = match (span.min_id, span.max_id) {
            (Some(lo), Some(hi)) => match hi.checked_sub(lo) {
                Some(d) if (0..MAX_BITMAP_SPAN).contains(&d) => (lo, d + 1),
                _ => (0, 0),
            },
            _ => (0, 0),
        };
        Seen {
            base,
            bits: vec![0; usize::try_from((len + 63) / 64).unwrap_or(0)],
            outside: HashSet::new(),
        }
    }

    fn slot(&self, id: i64) -> Option<(usize, u64)> {
        let offset = usize::try_from(id.checked_sub(self.base)?).ok()?;
        (offset / 64 < self.bits.len()).then_some((offset / 64, 1u64 << (offset % 64)))
    }

    pub fn insert(&mut self, id: i64) {
        match self.slot(id) {
            Some((word, bit)) => self.bits[word] |= bit,
            None => {
                self.outside.insert(id);
            }
        }
    }

    pub fn contains(&self, id: i64) -> bool {
        match self.slot(id) {
            Some((word, bit)) => self.bits[word] & bit != 0,
            None => self.outside.contains(&id),
        }
    }
}

/// Pass 1, on a blocking thread: the SHA-1 WeChat gave (when it gave one), then every row read,
/// of this merchant, adding up to the summary line. The verified totals and the text's SHA-1,
/// or why the bill is refused.
pub fn verify(
    file: &std::fs::File,
    expected_sha1: Option<&str>,
    merchant_ids: &[String],
) -> Result<(Totals, String), (BillFailure, String)> {
    let open = || {
        let mut f = file
            .try_clone()
            .map_err(|e| (BillFailure::Malformed, e.to_string()))?;
        f.seek(SeekFrom::Start(0))
            .map_err(|e| (BillFailure::Malformed, e.to_string()))?;
        bill::open_text(f).map_err(|e| (BillFailure::Malformed, e.to_string()))
    };
    let mut hasher = Sha1::new();
    let mut text = open()?;
    loop {
        let buf = text
            .fill_buf()
            .map_err(|e| (BillFailure::Malformed, format!("reading the bill: {e}")))?;
        if buf.is_empty() {
            break;
        }
        hasher.update(buf);
        let n = buf.len();
        text.consume(n);
    }
    let sha1 = hex::encode(hasher.finalize());
    if let Some(expected) = expected_sha1
        && !expected.eq_ignore_ascii_case(&sha1)
    {
        return Err((
            BillFailure::HashMismatch,
            format!(
                "the bill's SHA-1 is {sha1}, WeChat said {}",
                crate::text::quote(expected)
            ),
        ));
    }
    let mut reader = BillReader::new(open()?).map_err(malformed)?;
    let mut totals = Totals::default();
    while let Some(row) = reader.next_row().map_err(malformed)? {
        let ours = merchant_ids
            .iter()
            .any(|m| *m == row.mch_id || row.sub_mch_id.as_deref() == Some(m.as_str()));
        if !ours {
            return Err((
                BillFailure::WrongMerchant,
                format!(
                    "line {}: merchant {} is not this bill's",
                    row.line,
                    crate::text::quote(&row.mch_id)
                ),
            ));
        }
        totals.rows += 1;
        totals.fee = MilliFen(totals.fee.get() + row.fee.get());
        match &row.kind {
            RowKind::Payment => {
                totals.payments += 1;
                totals.total_fee += row.total_fee.get();
            }
            RowKind::Refund(r) => {
                totals.refunds += 1;
                totals.refund_fee += r.refund_fee.get();
            }
        }
    }
    match reader.check() {
        SummaryCheck::AddsUp => Ok((totals, sha1)),
        SummaryCheck::Differs(what) => Err((
            BillFailure::SummaryMismatch,
            format!("the rows do not add up to the summary: {}", what.join("; ")),
        )),
        SummaryCheck::Missing => Err((
            BillFailure::SummaryMismatch,
            "the bill ends without its summary lines".into(),
        )),
    }
}

fn malformed(e: BillError) -> (BillFailure, String) {
    (BillFailure::Malformed, e.to_string())
}

/// Pass 2's parser thread: rows in batches of [`BATCH_ROWS`], until the end or the receiver
/// is gone.
fn stream_rows(text: impl BufRead, tx: &mpsc::Sender<Result<Vec<BillRow>, String>>) {
    let mut reader = match BillReader::new(text) {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.blocking_send(Err(e.to_string()));
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH_ROWS);
    loop {
        match reader.next_row() {
            Ok(Some(row)) => {
                batch.push(row);
                if batch.len() == BATCH_ROWS
                    && tx
                        .blocking_send(Ok(std::mem::replace(
                            &mut batch,
                            Vec::with_capacity(BATCH_ROWS),
                        )))
                        .is_err()
                {
                    return;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.blocking_send(Err(e.to_string()));
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_bill_day_is_a_beijing_calendar_day() {
        assert_eq!(
            day_bounds(date("2026-11-30")),
            (utc("2026-11-29T16:00:00Z"), utc("2026-11-30T16:00:00Z"))
        );
        assert_eq!(
            beijing_today(utc("2026-11-30T15:59:59Z")),
            date("2026-11-30")
        );
        assert_eq!(
            beijing_today(utc("2026-11-30T16:00:00Z")),
            date("2026-12-01")
        );
    }

    #[test]
    fn a_day_is_due_from_ten_oclock_the_next_morning() {
        // 09:59:59 Beijing on 12-01: the bill of 11-30 is not made yet.
        assert_eq!(
            due_days(utc("2026-12-01T01:59:59Z"), 3),
            vec![date("2026-11-28"), date("2026-11-29")]
        );
        assert_eq!(
            due_days(utc("2026-12-01T02:00:00Z"), 3),
            vec![date("2026-11-28"), date("2026-11-29"), date("2026-11-30")]
        );
        assert_eq!(
            due_days(utc("2026-12-01T02:00:00Z"), 1),
            vec![date("2026-11-30")]
        );
    }

    #[test]
    fn seen_holds_ids_inside_and_outside_the_days_span() {
        let mut seen = Seen::new(IdSpan {
            min_id: Some(100),
            max_id: Some(1_000),
            count: 5,
        });
        for id in [100, 163, 164, 1_000, 99, 5_000, -1] {
            assert!(!seen.contains(id));
            seen.insert(id);
            assert!(seen.contains(id), "{id}");
        }
        for id in [101, 165, 999, 1_001, 98] {
            assert!(!seen.contains(id), "{id}");
        }
        assert_eq!(seen.bits.len(), 15, "901 ids in 64-bit words");
        assert_eq!(seen.outside.len(), 3);
        // A span too wide for a bitmap: a set only, and still exact.
        let mut wide = Seen::new(IdSpan {
            min_id: Some(1),
            max_id: Some(i64::MAX),
            count: 2,
        });
        wide.insert(i64::MAX);
        assert!(wide.bits.is_empty() && wide.contains(i64::MAX) && !wide.contains(1));
        let extreme = Seen::new(IdSpan {
            min_id: Some(i64::MIN),
            max_id: Some(i64::MAX),
            count: 2,
        });
        assert!(extreme.bits.is_empty() && !extreme.contains(0));
        let mut empty = Seen::new(IdSpan::default());
        empty.insert(7);
        assert!(empty.contains(7) && !empty.contains(8));
    }

    #[test]
    fn a_row_the_shop_cannot_read_is_kept_by_its_number_never_taken_for_a_missing_one() {
        type Unreadable<'a> = (Option<&'a str>, i64);
        let reads: Vec<Result<(&str, i64), Unreadable<'_>>> =
            vec![Ok(("a", 1)), Err((Some("b c"), 2)), Err((None, 3))];
        let map = by_number(
            reads,
            |r| r.0,
            |u| (u.0.map(str::to_owned), u.1, "bad".to_owned()),
        );
        assert_eq!(map.get("a"), Some(&Ok(("a", 1))));
        assert_eq!(map.get("b c"), Some(&Err("bad".to_owned())));
        assert_eq!(
            map.len(),
            2,
            "a row without a readable number cannot be matched"
        );
    }

    #[test]
    fn what_the_settler_did_is_the_finding() {
        use OrderState as S;
        let f = |v: Verdict, was: OrderState| settled_finding(v, was).map(|(k, a, _)| (k, a));
        assert_eq!(
            f(
                Verdict::Moved {
                    from: S::NotPay,
                    to: S::Success
                },
                S::NotPay
            ),
            Some((FindingKind::SettledByBill, FindingAction::Settled))
        );
        assert_eq!(
            f(
                Verdict::Moved {
                    from: S::NotPay,
                    to: S::AmountMismatch
                },
                S::NotPay
            ),
            Some((FindingKind::AmountDiff, FindingAction::Quarantined))
        );
        assert_eq!(
            f(
                Verdict::Anomaly(crate::domain::Anomaly::PaidAfterClose),
                S::Closed
            ),
            Some((FindingKind::PaidAfterClose, FindingAction::Recorded))
        );
        assert_eq!(
            f(
                Verdict::Unchanged {
                    reason: "repeat".into()
                },
                S::Closed
            ),
            Some((FindingKind::PaidAfterClose, FindingAction::Reported))
        );
        assert_eq!(
            f(Verdict::Unchanged { reason: "x".into() }, S::NotPay),
            None
        );
        assert_eq!(f(Verdict::LeaseLost, S::UserPaying), None);
    }
}

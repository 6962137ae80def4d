//! The refund part of a scan: claims due refunds in `PROCESSING`, batch after batch, queries
//! WeChat for each under the scanner's own rate limit and concurrency (refunds share the
//! instance's QPS budget with payments), decides with the refund policy and applies the
//! decision under the claim's lease. No transaction is open while a query is in flight.

use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::refund_policy::{RefundPolicy, RefundView, decide_refund};
use super::scanner::Scanner;
use crate::domain::Currency;
use crate::store::{
    ClaimedRefund, ClaimedRefundRow, RefundApplied, RefundChange, RefundClaim, RefundGuard,
    StoreError,
};
use crate::telemetry::DbOp;

/// What one refund scan did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefundScanReport {
    pub claimed: usize,
    /// Refunds that reached a final state (`AMOUNT_MISMATCH` included).
    pub finished: usize,
    pub rescheduled: usize,
    /// Polling stopped: the horizon passed, or the row cannot be read.
    pub gave_up: usize,
    pub noop: usize,
    pub abandoned: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Finished,
    Rescheduled,
    GaveUp,
    NoOp,
    Abandoned,
}

impl Scanner {
    /// Drains every due refund (nothing when refunds are not polled). Once `stop` is
    /// cancelled no new refund is started; claimed ones are left to their lease.
    pub async fn scan_refunds(
        &self,
        stop: &CancellationToken,
        progress: &(dyn Fn() + Sync),
    ) -> Result<RefundScanReport, StoreError> {
        let inner = &self.inner;
        let mut report = RefundScanReport::default();
        let Some(policy) = inner.settings.refunds else {
            return Ok(report);
        };
        let batch = inner.settings.batch_size;
        let slots = Arc::new(Semaphore::new(inner.settings.concurrency.max(1)));
        let mut first_error = None;
        while !stop.is_cancelled() {
            progress();
            let now = Utc::now();
            let claimed = match inner
                .store
                .claim_due_refunds(&RefundClaim {
                    now,
                    first_delay: policy.first_delay,
                    lease_until: now + inner.settings.lease,
                    limit: batch,
                })
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    inner.telemetry.db_error(DbOp::Claim, &e);
                    return Err(e);
                }
            };
            report.claimed += claimed.len();
            let full = claimed.len() as u32 >= batch;
            let mut tasks: JoinSet<Result<Done, StoreError>> = JoinSet::new();
            for c in claimed {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let (scanner, stop) = (self.clone(), stop.clone());
                tasks.spawn(async move {
                    let done = scanner.refund(c, &stop, &policy).await;
                    drop(permit);
                    done
                });
            }
            while let Some(joined) = tasks.join_next().await {
                progress();
                match joined {
                    Ok(Ok(Done::Finished)) => report.finished += 1,
                    Ok(Ok(Done::Rescheduled)) => report.rescheduled += 1,
                    Ok(Ok(Done::GaveUp)) => report.gave_up += 1,
                    Ok(Ok(Done::NoOp)) => report.noop += 1,
                    Ok(Ok(Done::Abandoned)) => report.abandoned += 1,
                    Ok(Err(e)) => {
                        inner.telemetry.db_error(DbOp::Apply, &e);
                        report.abandoned += 1;
                        first_error.get_or_insert(e);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "refund task failed");
                        report.abandoned += 1;
                    }
                }
            }
            if !full || first_error.is_some() {
                break;
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Queries one claimed refund and applies what the answer decides.
    async fn refund(
        &self,
        claimed: ClaimedRefundRow,
        stop: &CancellationToken,
        policy: &RefundPolicy,
    ) -> Result<Done, StoreError> {
        let inner = &self.inner;
        let refund: ClaimedRefund = match claimed {
            ClaimedRefundRow::Refund(r) => r,
            ClaimedRefundRow::Unreadable(u) => {
                tracing::error!(
                    refund_row_id = u.id,
                    reason = %u.reason,
                    "a refund row cannot be read; polling it stops (fix the row, then clear gave_up_at)"
                );
                let guard = RefundGuard {
                    refund_id: u.id,
                    lease: Some(u.lease),
                };
                let change = RefundChange::GiveUp { reason: u.reason };
                return self.write_refund(guard, &change, None).await;
            }
        };
        let row = &refund.row;
        let Some(merchant) = inner.merchants.get(row.mch_id.as_str()) else {
            let change = RefundChange::Reschedule {
                at: Utc::now() + TimeDelta::minutes(10),
                note: Some(format!(
                    "merchant {} is not configured",
                    crate::text::quote(row.mch_id.as_str())
                )),
            };
            return self.write_refund(refund.guard(), &change, None).await;
        };
        if !self.take_turn(stop).await {
            return Ok(Done::Abandoned);
        }
        let outcome = inner
            .gateway
            .refund_query(merchant, &row.out_refund_no)
            .await;
        inner
            .telemetry
            .refundquery(row.mch_id.as_str(), row.out_refund_no.as_str(), &outcome);
        self.slow_down_if_asked(outcome.as_ref().err());
        let order = RefundOrder::of(&inner.store, row).await?;
        let change = decide_refund(
            &order.view(row),
            &outcome,
            Utc::now(),
            rand::random::<f64>(),
            policy,
        );
        self.write_refund(refund.guard(), &change, Some(row)).await
    }

    async fn write_refund(
        &self,
        guard: RefundGuard,
        change: &RefundChange,
        row: Option<&crate::store::RefundRow>,
    ) -> Result<Done, StoreError> {
        let inner = &self.inner;
        let applied = inner.store.apply_refund(guard, change, Utc::now()).await?;
        let (mch_id, out_refund_no) =
            row.map_or(("", ""), |r| (r.mch_id.as_str(), r.out_refund_no.as_str()));
        Ok(match (applied, change) {
            (RefundApplied::NoOp, _) => {
                tracing::info!(
                    mch_id,
                    out_refund_no,
                    "refund already moved by another writer; nothing recorded"
                );
                Done::NoOp
            }
            (
                RefundApplied::Done {
                    state,
                    order_refunded,
                },
                RefundChange::Finish { source, .. },
            ) => {
                inner.telemetry.refund_finished(
                    mch_id,
                    out_refund_no,
                    state,
                    *source,
                    order_refunded,
                );
                Done::Finished
            }
            (RefundApplied::Done { .. }, RefundChange::Reschedule { .. }) => Done::Rescheduled,
            (RefundApplied::Done { .. }, RefundChange::GiveUp { reason }) => {
                tracing::warn!(mch_id, out_refund_no, reason = %reason, "stopped polling a refund");
                Done::GaveUp
            }
        })
    }
}

/// What the refund rules need of a refund's order: its amount and currency.
#[derive(Debug, Clone)]
pub struct RefundOrder {
    /// `None`: the order is gone (the foreign key prevents it).
    pub total: Option<crate::domain::Fen>,
    pub currency: Currency,
}

impl RefundOrder {
    /// The order of `row`, read.
    pub async fn of(
        store: &crate::store::Store,
        row: &crate::store::RefundRow,
    ) -> Result<RefundOrder, StoreError> {
        let order = store
            .find_order(row.mch_id.as_str(), row.out_trade_no.as_str())
            .await?;
        Ok(RefundOrder {
            total: order.as_ref().map(|o| o.total_fee),
            currency: order.map_or_else(Currency::cny, |o| o.fee_type),
        })
    }

    /// The view the refund rules decide on.
    pub fn view<'a>(&'a self, row: &'a crate::store::RefundRow) -> RefundView<'a> {
        RefundView {
            row,
            order_total: self.total,
            order_currency: &self.currency,
        }
    }
}

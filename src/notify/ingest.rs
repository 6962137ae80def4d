//! A verified payment notification, whatever its protocol, applied to its order: found by
//! merchant and out_trade_no, refused when it is for another app than the order's, then applied
//! by the one [`Settler`] with source `notify`. Answers in neutral terms; each protocol renders
//! them in its own format.

use chrono::Utc;

use crate::domain::Source;
use crate::gateway::{RefundReport, TradeReport};
use crate::reconcile::refund_policy::decide_refund_report;
use crate::reconcile::refund_scan::RefundOrder;
use crate::reconcile::settle::{Report, Reported, Settler, Verdict};
use crate::store::{OrderRow, RefundApplied, RefundChange, RefundGuard};
use crate::telemetry::{DbOp, NotifyOutcome};

use super::NotifyApp;

/// What became of a verified payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ingested {
    /// Durable (applied now, or already there): acknowledge, counted under `outcome`.
    Acknowledged(NotifyOutcome),
    /// Not applied, for a reason WeChat's retry will not change: answer FAIL with a generic
    /// `reason`; `why` goes to the log.
    Refused {
        outcome: NotifyOutcome,
        reason: &'static str,
        why: String,
    },
    /// Not applied now (the database): answer FAIL so that WeChat retries.
    Unavailable,
}

/// Applies a verified payment to its order, if it has one here and is for the order's app.
pub(super) async fn ingest(app: &NotifyApp, mch_id: &str, report: &TradeReport) -> Ingested {
    let out_trade_no = report.out_trade_no.as_str();
    let row = match app.store.find_order(mch_id, out_trade_no).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            return Ingested::Refused {
                outcome: NotifyOutcome::UnknownOrder,
                reason: "unknown order",
                why: format!("no order {out_trade_no}"),
            };
        }
        Err(e) => {
            app.telemetry.db_error(DbOp::Notify, &e);
            return Ingested::Unavailable;
        }
    };
    if let Some(refused) = foreign_app(&row, report) {
        return refused;
    }
    let settler = Settler {
        store: &app.store,
        telemetry: &app.telemetry,
        policy: &app.policy,
    };
    let report = Report {
        reported: Reported::Payment(report),
        source: Source::Notify,
    };
    match settler.apply_report(row, None, report).await {
        Ok(Verdict::Unchanged { .. }) => Ingested::Acknowledged(NotifyOutcome::Repeat),
        Ok(v) if v.is_durable() => Ingested::Acknowledged(NotifyOutcome::Ok),
        Ok(v) => {
            // Cannot happen for a payment report without a lease; never acknowledge on doubt.
            Ingested::Refused {
                outcome: NotifyOutcome::DbError,
                reason: "temporarily unavailable",
                why: format!("order {out_trade_no} not applied: {v:?}"),
            }
        }
        Err(e) => {
            app.telemetry.db_error(DbOp::Notify, &e);
            Ingested::Unavailable
        }
    }
}

/// A refusal when the payment is verified but the order was registered for another app: never
/// applied to it.
fn foreign_app(row: &OrderRow, report: &TradeReport) -> Option<Ingested> {
    let appid = report.appid.as_ref()?;
    (*appid != row.appid).then(|| Ingested::Refused {
        outcome: NotifyOutcome::Mismatch,
        reason: "invalid notification",
        why: format!(
            "order {} has appid {}, the notification {appid}",
            report.out_trade_no,
            crate::text::quote(row.appid.as_str())
        ),
    })
}

/// Applies a verified refund report (a refund notification) to its refund, if `wxpay_refunds`
/// holds it: decided by the refund policy, written with the refund's guard (no lease), source
/// `notify`. A refund already final is a repeat; a report that does not describe the row
/// quarantines it as `AMOUNT_MISMATCH` (durable: acknowledged).
pub(super) async fn ingest_refund(
    app: &NotifyApp,
    mch_id: &str,
    report: &RefundReport,
) -> Ingested {
    let out_refund_no = report.out_refund_no.as_str();
    let row = match app.store.find_refund(mch_id, out_refund_no).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            return Ingested::Refused {
                outcome: NotifyOutcome::UnknownRefund,
                reason: "unknown refund",
                why: format!("no refund {out_refund_no}"),
            };
        }
        Err(e) => {
            app.telemetry.db_error(DbOp::Notify, &e);
            return Ingested::Unavailable;
        }
    };
    if !row.state.is_open() {
        if report.status.label() != row.state.as_str() {
            tracing::warn!(
                mch_id,
                out_refund_no,
                state = row.state.as_str(),
                reported = report.status.label(),
                "refund notification for a refund already final in another state; nothing changed"
            );
        }
        return Ingested::Acknowledged(NotifyOutcome::Repeat);
    }
    let order = match RefundOrder::of(&app.store, &row).await {
        Ok(order) => order,
        Err(e) => {
            app.telemetry.db_error(DbOp::Notify, &e);
            return Ingested::Unavailable;
        }
    };
    let now = Utc::now();
    let change = decide_refund_report(
        &order.view(&row),
        report,
        Source::Notify,
        now,
        0.0,
        &app.refunds,
    );
    if !matches!(change, RefundChange::Finish { .. }) {
        // Not final (a notification says PROCESSING, or a status this version does not know):
        // nothing to record; the poll goes on.
        return Ingested::Acknowledged(NotifyOutcome::Ignored);
    }
    let guard = RefundGuard {
        refund_id: row.id,
        lease: None,
    };
    match app.store.apply_refund(guard, &change, now).await {
        Ok(RefundApplied::Done {
            state,
            order_refunded,
        }) => {
            app.telemetry.refund_finished(
                mch_id,
                out_refund_no,
                state,
                Source::Notify,
                order_refunded,
            );
            Ingested::Acknowledged(NotifyOutcome::Ok)
        }
        // The poll (or another delivery) finished it first.
        Ok(RefundApplied::NoOp) => Ingested::Acknowledged(NotifyOutcome::Repeat),
        Err(e) => {
            app.telemetry.db_error(DbOp::Notify, &e);
            Ingested::Unavailable
        }
    }
}

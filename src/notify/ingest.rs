//! A verified payment notification, whatever its protocol, applied to its order: found by
//! merchant and out_trade_no, refused when it is for another app than the order's, then applied
//! by the one [`Settler`] with source `notify`. Answers in neutral terms; each protocol renders
//! them in its own format.

use crate::domain::Source;
use crate::gateway::TradeReport;
use crate::reconcile::settle::{Report, Reported, Settler, Verdict};
use crate::store::OrderRow;
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

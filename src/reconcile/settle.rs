//! Applying a verified WeChat report to an order, whoever brought it: the notify endpoint,
//! `query --apply`, or a scan whose guarded write found the order moved under it. One loop:
//! decide with the shared policy, apply under the guard, and when the guard fails (someone else
//! moved the order), read the order again and decide again against what is there now. States
//! only move forward, so the loop ends within a few rounds.

use chrono::Utc;

use super::policy::{self, Decision, OrderView, Policy};
use crate::domain::{Anomaly, OrderState, Source};
use crate::gateway::{GatewayError, QueryAnswer, TradeReport};
use crate::store::{Applied, Change, Guard, OrderRow, Store, StoreError};
use crate::telemetry::Telemetry;

/// At most this many decide-and-apply rounds (each lost race moves the order forward).
const MAX_ROUNDS: usize = 4;

/// What applying a report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A state change was recorded, with its event.
    Moved { from: OrderState, to: OrderState },
    /// An anomaly event was recorded; the state is untouched.
    Anomaly(Anomaly),
    /// Still open: the next query was scheduled (or polling stopped).
    StillOpen,
    /// Nothing to record: the order already says this (a repeat), or the report is old news.
    Unchanged { reason: String },
    /// The order is still open but another instance holds its lease now: its write wins.
    LeaseLost,
}

impl Verdict {
    /// Whether the report is reflected in the database (durably, once), so a notification can
    /// be acknowledged.
    pub fn is_durable(&self) -> bool {
        matches!(
            self,
            Verdict::Moved { .. } | Verdict::Anomaly(_) | Verdict::Unchanged { .. }
        )
    }
}

/// Everything [`Settler::apply_report`] needs.
#[derive(Clone, Copy)]
pub struct Settler<'a> {
    pub store: &'a Store,
    pub telemetry: &'a Telemetry,
    pub policy: &'a Policy,
}

/// What WeChat said, however it came.
#[derive(Debug, Clone, Copy)]
pub enum Reported<'a> {
    /// A query's outcome: a report, ORDERNOTEXIST, or why there was no answer.
    Query(&'a Result<QueryAnswer, GatewayError>),
    /// A verified payment notification.
    Payment(&'a TradeReport),
}

/// One report to apply to one order.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    pub reported: Reported<'a>,
    /// Who brought it; only the scan's own sources write a schedule ([`Source::is_scan`]).
    pub source: Source,
}

impl Report<'_> {
    /// The policy's decision on this report for `order`.
    pub fn decide(&self, order: &OrderView, policy: &Policy) -> Decision {
        let (now, jitter) = (Utc::now(), rand::random::<f64>());
        match self.reported {
            Reported::Query(outcome) => policy::decide(order, outcome, now, jitter, policy),
            Reported::Payment(report) => policy::decide_report(order, report, now, jitter, policy),
        }
    }
}

impl Settler<'_> {
    /// Decides and applies `report` to `row`, under `lease` when the caller holds one. Counts
    /// what happened (transitions, anomalies, and one no-op when nothing was recorded) under
    /// the report's source.
    pub async fn apply_report(
        &self,
        row: OrderRow,
        lease: Option<i64>,
        report: Report<'_>,
    ) -> Result<Verdict, StoreError> {
        let (mch_id, out_trade_no) = (row.mch_id.clone(), row.out_trade_no.clone());
        let verdict = self.rounds(row, lease, report).await?;
        if matches!(verdict, Verdict::Unchanged { .. } | Verdict::LeaseLost) {
            self.telemetry
                .noop(mch_id.as_str(), out_trade_no.as_str(), report.source);
        }
        Ok(verdict)
    }

    /// After the scan's write of `report` for `row` lost its guard (the caller counted that
    /// no-op): when the order is no longer open, applies the report to what is there now (a
    /// verified report still counts against its new state: REFUND after SUCCESS,
    /// PAID_AFTER_CLOSE). Counts what it records, never a second no-op.
    pub async fn apply_after_lost_write(
        &self,
        row: &OrderRow,
        report: Report<'_>,
    ) -> Result<Verdict, StoreError> {
        let Some(now) = self.store.order(row.id).await? else {
            return Ok(Verdict::Unchanged {
                reason: "the order is gone".into(),
            });
        };
        if now.state.is_open() {
            // Another instance holds it: its write wins.
            return Ok(Verdict::LeaseLost);
        }
        self.rounds(now, None, report).await
    }

    /// Decide, apply under the guard, and after a lost race read the order again and decide
    /// against its new state.
    async fn rounds(
        &self,
        mut row: OrderRow,
        mut lease: Option<i64>,
        report: Report<'_>,
    ) -> Result<Verdict, StoreError> {
        for _ in 0..MAX_ROUNDS {
            let decision = report.decide(&order_view(&row), self.policy);
            let change = match plan(decision, report.source) {
                Planned::Write(change) => change,
                Planned::Nothing { reason } => return Ok(Verdict::Unchanged { reason }),
            };
            let guard = Guard {
                order_id: row.id,
                from: row.state,
                lease,
            };
            if self.store.apply(&row, guard, &change, Utc::now()).await? == Applied::Done {
                return Ok(recorded(self.telemetry, &row, &change));
            }
            // Someone else wrote first: look at what is there now.
            let Some(now) = self.store.order(row.id).await? else {
                return Err(StoreError::OrderGone(row.id));
            };
            if now.state == row.state && !now.state.is_open() {
                // Only an anomaly can miss without a move: it is recorded already.
                return Ok(Verdict::Unchanged {
                    reason: "already recorded".into(),
                });
            }
            if now.state.is_open() && lease.is_some() {
                return Ok(Verdict::LeaseLost);
            }
            row = now;
            lease = None;
        }
        Err(StoreError::KeptMoving {
            id: row.id,
            attempts: MAX_ROUNDS,
        })
    }
}

/// Counts and logs a change that was applied to `row`: the one record of every writer (the
/// scan's batches, a notification, `query --apply`).
pub fn recorded(telemetry: &Telemetry, row: &OrderRow, change: &Change) -> Verdict {
    match change {
        Change::Settle {
            settlement, source, ..
        } => {
            telemetry.transition(
                row.mch_id.as_str(),
                row.out_trade_no.as_str(),
                row.state,
                settlement.to,
                *source,
            );
            Verdict::Moved {
                from: row.state,
                to: settlement.to,
            }
        }
        Change::Anomaly {
            anomaly,
            report,
            source,
        } => {
            telemetry.paid_after_close(
                row.mch_id.as_str(),
                row.out_trade_no.as_str(),
                report.transaction_id.as_ref().map(|t| t.as_str()),
                report.reported_fee.map(|f| f.get()),
                *source,
            );
            Verdict::Anomaly(*anomaly)
        }
        Change::Reschedule { .. } | Change::GiveUp { .. } => Verdict::StillOpen,
    }
}

/// What a decision writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    Write(Change),
    /// Nothing to write, and why.
    Nothing {
        reason: String,
    },
}

/// The store write for a decision. Only the scan writes a schedule: a report from outside it
/// (a notification, `query --apply`) that moves nothing writes nothing.
pub fn plan(decision: Decision, source: Source) -> Planned {
    let scan = source.is_scan();
    let nothing = |reason| Planned::Nothing { reason };
    match decision {
        Decision::Settle(settlement) | Decision::Quarantine(settlement) => {
            Planned::Write(Change::Settle { settlement, source })
        }
        Decision::Anomaly { anomaly, report } => Planned::Write(Change::Anomaly {
            anomaly,
            report,
            source,
        }),
        Decision::Reschedule { at, note } if scan => {
            Planned::Write(Change::Reschedule { at, note })
        }
        Decision::GiveUp { reason } if scan => Planned::Write(Change::GiveUp { reason }),
        Decision::Reschedule { note, .. } => {
            nothing(note.unwrap_or_else(|| "the order stays open".into()))
        }
        Decision::GiveUp { reason } | Decision::Nothing { reason } => nothing(reason),
    }
}

/// The policy's view of a stored order.
pub fn order_view(row: &OrderRow) -> OrderView {
    OrderView {
        state: row.state,
        total_fee: row.total_fee,
        fee_type: row.fee_type.to_string(),
        appid: row.appid.to_string(),
        created_at: row.created_at,
        expires_at: row.expires_at,
        query_count: u32::try_from(row.query_count).unwrap_or(u32::MAX),
    }
}

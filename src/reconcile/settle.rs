//! Applying a verified WeChat report to an order, whoever brought it: the notify endpoint,
//! `query --apply`, or a scan whose guarded write found the order moved under it. One loop:
//! decide with the shared policy, apply under the guard, and when the guard fails (someone else
//! moved the order), read the order again and decide again against what is there now. States
//! only move forward, so the loop ends within a few rounds.

use chrono::Utc;

use super::policy::{self, Decision, Policy};
use super::scanner::order_view;
use crate::domain::{Anomaly, OrderState, Source};
use crate::store::{Applied, Change, Guard, OrderRow, Store, StoreError};
use crate::telemetry::Telemetry;
use crate::wxpay::{QueryAnswer, WxPayError};

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

/// Everything [`apply_report`] needs.
#[derive(Clone, Copy)]
pub struct Settler<'a> {
    pub store: &'a Store,
    pub telemetry: &'a Telemetry,
    pub policy: &'a Policy,
}

/// One report to apply to one order.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    /// The verified answer (a notification is an `Order` report with trade_state SUCCESS).
    pub outcome: &'a Result<QueryAnswer, WxPayError>,
    pub source: Source,
    /// Whether it came from a query of WeChat (counts in `query_count`).
    pub queried: bool,
}

impl Settler<'_> {
    /// Decides and applies `report` to `row`, under `lease` when the caller holds one. Counts
    /// what happened (transitions, anomalies, no-ops) under the report's source.
    pub async fn apply_report(
        &self,
        mut row: OrderRow,
        mut lease: Option<i64>,
        report: Report<'_>,
    ) -> Result<Verdict, StoreError> {
        for _ in 0..MAX_ROUNDS {
            let decision = policy::decide(
                &order_view(&row),
                report.outcome,
                Utc::now(),
                rand::random::<f64>(),
                self.policy,
            );
            let change = match change_of(decision, report.source, report.queried) {
                Ok(change) => change,
                Err(reason) => {
                    self.telemetry
                        .noop(&row.mch_id, &row.out_trade_no, report.source);
                    return Ok(Verdict::Unchanged { reason });
                }
            };
            let guard = Guard {
                order_id: row.id,
                from: row.state,
                lease,
            };
            if self.store.apply(&row, guard, &change, Utc::now()).await? == Applied::Done {
                return Ok(self.record(&row, &change, report.source));
            }
            // Someone else wrote first: look at what is there now.
            let Some(now) = self.store.order(row.id).await? else {
                return Err(StoreError::OrderGone(row.id));
            };
            if now.state == row.state && !now.state.is_open() {
                // Only an anomaly can miss without a move: it is recorded already.
                self.telemetry
                    .noop(&row.mch_id, &row.out_trade_no, report.source);
                return Ok(Verdict::Unchanged {
                    reason: "already recorded".into(),
                });
            }
            if now.state.is_open() && lease.is_some() {
                self.telemetry
                    .noop(&row.mch_id, &row.out_trade_no, report.source);
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

    /// Counts and logs an applied change.
    fn record(&self, row: &OrderRow, change: &Change, source: Source) -> Verdict {
        match change {
            Change::Settle { settlement, .. } => {
                self.telemetry.transition(
                    &row.mch_id,
                    &row.out_trade_no,
                    row.state,
                    settlement.to,
                    source,
                );
                Verdict::Moved {
                    from: row.state,
                    to: settlement.to,
                }
            }
            Change::Anomaly {
                anomaly, report, ..
            } => {
                self.telemetry.paid_after_close(
                    &row.mch_id,
                    &row.out_trade_no,
                    report.transaction_id.as_ref().map(|t| t.as_str()),
                    report.reported_fee.map(|f| f.get()),
                    source,
                );
                Verdict::Anomaly(*anomaly)
            }
            Change::Reschedule { .. } | Change::GiveUp { .. } => Verdict::StillOpen,
        }
    }
}

/// The store write for a decision, or why there is none. Only a query reschedules an order: a
/// notification that decides nothing writes nothing.
pub fn change_of(decision: Decision, source: Source, queried: bool) -> Result<Change, String> {
    match decision {
        Decision::Settle(settlement) | Decision::Quarantine(settlement) => Ok(Change::Settle {
            settlement,
            source,
            queried,
        }),
        Decision::Anomaly { anomaly, report } => Ok(Change::Anomaly {
            anomaly,
            report,
            source,
        }),
        Decision::Reschedule { at, note } if queried => Ok(Change::Reschedule { at, note }),
        Decision::GiveUp { reason } if queried => Ok(Change::GiveUp { reason }),
        Decision::Reschedule { note, .. } => {
            Err(note.unwrap_or_else(|| "the order stays open".into()))
        }
        Decision::GiveUp { reason } => Err(reason),
        Decision::Nothing { reason } => Err(reason),
    }
}

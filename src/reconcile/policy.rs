//! The whole reconciliation policy as one pure function: no IO, no clock, no randomness (the
//! caller passes `now` and a jitter draw), so every rule is unit-testable.
//!
//! - SUCCESS (or REFUND) with `total_fee` equal to the stored amount → that state; with another
//!   amount → `AMOUNT_MISMATCH`, never paid.
//! - CLOSED / REVOKED / PAYERROR → that state.
//! - NOTPAY / USERPAYING / ACCEPT / an unknown state, and every transient error → ask again on
//!   the backoff schedule, state untouched.
//! - ORDERNOTEXIST → ask again until the order's expiry, then CLOSED locally.
//! - Past `give_up_after` or the end of the schedule → stop polling (an order still to be
//!   closed keeps one visit, at its close time).
//! - Past its expiry (and never within 5 minutes of creation), with `close_expired`: close at
//!   WeChat first ([`decide_close`]); ORDERPAID means query and settle, never close; a failing
//!   close is retried, never given up.
//! - An order that is no longer open ([`decide`] on a settled order, e.g. a notification after a
//!   poll): a repeat changes nothing; REFUND after SUCCESS → REFUND (the one move out of a
//!   terminal state); a payment for an order closed locally → the `PAID_AFTER_CLOSE` anomaly,
//!   state untouched.

use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::{Anomaly, Fen, OrderState, TradeState};
use crate::gateway::{CloseAnswer, GatewayError, QueryAnswer, RetryHint, TradeReport};

/// A state change to apply; it lives with the domain (the store writes it too).
pub use crate::domain::Settlement;

/// Intervals after each query, modelled on WeChat's own notification retries
/// (15s, 15s, 30s, 3m, 10m, 20m, 30m, 30m, 30m, 60m, 3h, 3h, 3h, 6h, 6h: 24h4m in all).
pub const SCHEDULE_SECONDS: [i64; 15] = [
    15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600, 10800, 10800, 10800, 21600, 21600,
];

/// At most this many queries per order: the first, then one after each interval.
pub const MAX_QUERIES: u32 = SCHEDULE_SECONDS.len() as u32 + 1;

/// How long an order is payable when the app did not set `expires_at` (the prepay_id's life);
/// the default of `schedule.default_expiry_minutes`.
pub const DEFAULT_PREPAY_LIFETIME: TimeDelta = TimeDelta::hours(2);

/// WeChat refuses closeorder sooner than this after the order's creation.
pub const MIN_CLOSE_AGE: TimeDelta = TimeDelta::minutes(5);

/// After a failed closeorder, try again this long later (stretched by jitter).
pub const CLOSE_RETRY: TimeDelta = TimeDelta::seconds(60);

/// Past the give-up horizon a failing closeorder is still retried (an order left open at
/// WeChat can still be paid), this long apart.
pub const CLOSE_RETRY_LATE: TimeDelta = TimeDelta::hours(1);

/// After FREQUENCY_LIMITED, the order is not asked again sooner than this.
pub const SLOW_DOWN: TimeDelta = TimeDelta::seconds(60);

/// Jitter stretches an interval by up to this fraction (never shortens it).
pub const MAX_JITTER: f64 = 0.10;

/// The knobs of the policy, from `[schedule]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// First query this long after the order's creation.
    pub grace: TimeDelta,
    /// Stop polling an order this long after its creation.
    pub give_up_after: TimeDelta,
    /// How long an order is payable when it has no `expires_at`.
    pub default_expiry: TimeDelta,
    /// Close expired open orders at WeChat (closeorder), then locally.
    pub close_expired: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            grace: TimeDelta::seconds(15),
            give_up_after: TimeDelta::hours(24),
            default_expiry: DEFAULT_PREPAY_LIFETIME,
            close_expired: true,
        }
    }
}

impl Policy {
    /// When an order stops being payable.
    pub fn expiry(&self, order: &OrderView) -> DateTime<Utc> {
        order
            .expires_at
            .unwrap_or(order.created_at + self.default_expiry)
    }

    /// When the daemon closes an open order at WeChat: its expiry, never sooner than
    /// [`MIN_CLOSE_AGE`] after creation; `None` with `close_expired` off.
    pub fn close_at(&self, order: &OrderView) -> Option<DateTime<Utc>> {
        self.close_expired
            .then(|| self.expiry(order).max(order.created_at + MIN_CLOSE_AGE))
    }

    /// Whether a claimed open order is to be closed rather than queried.
    pub fn should_close(&self, order: &OrderView, now: DateTime<Utc>) -> bool {
        order.state.is_open() && self.close_at(order).is_some_and(|at| now >= at)
    }
}

/// What the policy needs to know about an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderView {
    pub state: OrderState,
    pub total_fee: Fen,
    /// The order's currency: a payment in another one is not this order's amount.
    pub fee_type: String,
    /// The order's own appid: a report from another appid is not about this order.
    pub appid: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Queries made before the one being decided.
    pub query_count: u32,
}

/// What to do with an order after a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Move to a final state.
    Settle(Settlement),
    /// Paid, but not the stored amount: `AMOUNT_MISMATCH`, never SUCCESS.
    Quarantine(Settlement),
    /// Ask again at `at`; `note` says why (an error, or WeChat's open state).
    Reschedule {
        at: DateTime<Utc>,
        note: Option<String>,
    },
    /// Stop polling this order.
    GiveUp { reason: String },
    /// A payment for an order closed locally: record the anomaly, leave the state.
    Anomaly {
        anomaly: Anomaly,
        report: Settlement,
    },
    /// Nothing to write: the report repeats what the order already says, or is older news.
    Nothing { reason: String },
}

/// Decides what a query's outcome means for an order. `jitter` is a draw from `0.0..=1.0`.
pub fn decide(
    order: &OrderView,
    outcome: &Result<QueryAnswer, GatewayError>,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &Policy,
) -> Decision {
    let at = Moment::new(order, now, jitter, policy);
    match outcome {
        Ok(QueryAnswer::Order(report)) => decide_report(order, report, now, jitter, policy),
        Ok(QueryAnswer::NotExist) if order.state.is_open() => at.not_exist(),
        Ok(QueryAnswer::NotExist) => Decision::Nothing {
            reason: format!("order is {}; WeChat: ORDERNOTEXIST", order.state),
        },
        Err(e) if order.state.is_open() => {
            at.again(Some(e.to_string()), e.retry_hint() == RetryHint::SlowDown)
        }
        Err(e) => Decision::Nothing {
            reason: format!("order is {}; {e}", order.state),
        },
    }
}

/// Decides what a verified trade report (a query's, or a payment notification's) means for
/// an order.
pub fn decide_report(
    order: &OrderView,
    report: &TradeReport,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &Policy,
) -> Decision {
    let at = Moment::new(order, now, jitter, policy);
    if let Some(other) = foreign_appid(order, report) {
        // Verified, but about a payment to another app: never settles this order.
        return if order.state.is_open() {
            at.again(Some(other), false)
        } else {
            Decision::Nothing { reason: other }
        };
    }
    if !order.state.is_open() {
        return decide_settled(order, report);
    }
    match &report.trade_state {
        TradeState::Success => paid(order, report, OrderState::Success),
        TradeState::Refund => paid(order, report, OrderState::Refund),
        TradeState::Closed => settle(report, OrderState::Closed),
        TradeState::Revoked => settle(report, OrderState::Revoked),
        TradeState::PayError => settle(report, OrderState::PayError),
        TradeState::NotPay | TradeState::UserPaying | TradeState::Accept => {
            at.again(Some(report.trade_state.to_string()), false)
        }
        TradeState::Unknown(s) => at.again(Some(format!("unknown trade_state {s:?}")), false),
    }
}

/// An open order, and when and how a decision about it is made.
struct Moment<'a> {
    order: &'a OrderView,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &'a Policy,
}

impl<'a> Moment<'a> {
    fn new(order: &'a OrderView, now: DateTime<Utc>, jitter: f64, policy: &'a Policy) -> Self {
        Moment {
            order,
            now,
            jitter,
            policy,
        }
    }

    /// Ask again on the schedule, or give up past it.
    fn again(&self, note: Option<String>, slow_down: bool) -> Decision {
        let order = self.order;
        match next_query_at(order, self.now, self.jitter, self.policy, slow_down) {
            Some(at) => Decision::Reschedule { at, note },
            None => Decision::GiveUp {
                reason: format!(
                    "gave up after {} queries{}",
                    order.query_count + 1,
                    note.map(|n| format!("; last: {n}")).unwrap_or_default()
                ),
            },
        }
    }

    /// ORDERNOTEXIST: ask again until the order's expiry, then close it locally.
    fn not_exist(&self) -> Decision {
        let expiry = self.policy.expiry(self.order);
        if self.now >= expiry {
            return Decision::Settle(Settlement {
                to: OrderState::Closed,
                transaction_id: None,
                paid_at: None,
                reported_fee: None,
                detail: Some(
                    "ORDERNOTEXIST: WeChat never accepted the order, and it has expired".into(),
                ),
            });
        }
        let next = next_query_at(self.order, self.now, self.jitter, self.policy, false);
        Decision::Reschedule {
            // Ask once more right at the expiry, then close.
            at: next.map_or(expiry, |at| at.min(expiry)),
            note: Some("ORDERNOTEXIST".into()),
        }
    }
}

/// A verified report about an order that is no longer open (a notification or a poll that lost
/// a race, `query --apply`). Only three things can happen: SUCCESS → REFUND, the
/// `PAID_AFTER_CLOSE` anomaly, or nothing.
fn decide_settled(order: &OrderView, report: &TradeReport) -> Decision {
    let nothing = |reason: String| Decision::Nothing { reason };
    let paid = matches!(report.trade_state, TradeState::Success | TradeState::Refund);
    let exact =
        report.amount == Some(order.total_fee) && report.currency.as_str() == order.fee_type;
    let reported = || Settlement {
        to: order.state,
        transaction_id: report.transaction_id.clone(),
        paid_at: report.paid_at,
        reported_fee: report.amount,
        detail: None,
    };
    match (order.state, &report.trade_state) {
        (OrderState::Success, TradeState::Refund) if exact => Decision::Settle(Settlement {
            to: OrderState::Refund,
            detail: report.state_desc.clone(),
            ..reported()
        }),
        (OrderState::Closed | OrderState::Revoked | OrderState::PayError, _) if paid => {
            Decision::Anomaly {
                anomaly: Anomaly::PaidAfterClose,
                report: Settlement {
                    detail: Some(format!(
                        "WeChat reports {} with total_fee {} for an order that is {} here: refund or fulfil it",
                        report.trade_state,
                        report
                            .amount
                            .map(|f| f.get().to_string())
                            .unwrap_or_else(|| "?".into()),
                        order.state
                    )),
                    ..reported()
                },
            }
        }
        (state, reported_state) => nothing(format!(
            "order is already {state}; WeChat reports {reported_state}"
        )),
    }
}

/// Decides what a closeorder answer means for an expired open order: `None` when WeChat says
/// the order is paid (query it and [`decide`] on the report; a paid order never ends CLOSED).
pub fn decide_close(
    order: &OrderView,
    outcome: &Result<CloseAnswer, GatewayError>,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &Policy,
) -> Option<Decision> {
    let closed = |detail: &str| {
        Some(Decision::Settle(Settlement {
            to: OrderState::Closed,
            transaction_id: None,
            paid_at: None,
            reported_fee: None,
            detail: Some(format!(
                "expired at {}: {detail}",
                policy.expiry(order).format("%Y-%m-%d %H:%M:%S UTC")
            )),
        }))
    };
    match outcome {
        Ok(CloseAnswer::Closed) => closed("closed at WeChat"),
        Ok(CloseAnswer::OrderClosed) => closed("already closed at WeChat (ORDERCLOSED)"),
        Ok(CloseAnswer::NotExist) => closed("WeChat never accepted the order (ORDERNOTEXIST)"),
        Ok(CloseAnswer::OrderPaid) => None,
        // Never given up: an expired order still open at WeChat can still be paid. It stays
        // in `expired_open_orders` until the close goes through.
        Err(e) => Some(Decision::Reschedule {
            at: close_retry_at(order, now, jitter, policy),
            note: Some(format!("closeorder: {e}")),
        }),
    }
}

/// Why a report is about another app than the order's (`None` when it is the order's, or says
/// no appid, as a payment notification may not).
fn foreign_appid(order: &OrderView, report: &TradeReport) -> Option<String> {
    let appid = report.appid.as_ref()?;
    (appid.as_str() != order.appid).then(|| {
        format!(
            "WeChat's report is for appid {appid}, the order's appid is {}",
            crate::text::quote(&order.appid)
        )
    })
}

/// A paid report: the amount and its currency decide between the reported state and
/// quarantine.
fn paid(order: &OrderView, report: &TradeReport, to: OrderState) -> Decision {
    let settlement = |to, detail| Settlement {
        to,
        transaction_id: report.transaction_id.clone(),
        paid_at: report.paid_at,
        reported_fee: report.amount,
        detail,
    };
    let currency = report.currency.as_str();
    if currency != order.fee_type {
        return Decision::Quarantine(settlement(
            OrderState::AmountMismatch,
            Some(format!(
                "WeChat reports {to} in {currency}, the order is in {}",
                crate::text::quote(&order.fee_type)
            )),
        ));
    }
    match report.amount {
        Some(fee) if fee == order.total_fee => Decision::Settle(settlement(to, None)),
        Some(fee) => Decision::Quarantine(settlement(
            OrderState::AmountMismatch,
            Some(format!(
                "WeChat reports {to} with total_fee {fee}, the order is {}",
                order.total_fee
            )),
        )),
        // The client refuses paid reports without total_fee; never pay on doubt regardless.
        None => Decision::Quarantine(settlement(
            OrderState::AmountMismatch,
            Some(format!("WeChat reports {to} without total_fee")),
        )),
    }
}

fn settle(report: &TradeReport, to: OrderState) -> Decision {
    Decision::Settle(Settlement {
        to,
        transaction_id: report.transaction_id.clone(),
        paid_at: None,
        reported_fee: report.amount,
        detail: report.state_desc.clone(),
    })
}

/// When to try closing an expired order again: [`CLOSE_RETRY`] later, [`CLOSE_RETRY_LATE`]
/// once past the give-up horizon, stretched by up to [`MAX_JITTER`].
fn close_retry_at(
    order: &OrderView,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &Policy,
) -> DateTime<Utc> {
    let late = now >= order.created_at + policy.give_up_after;
    let retry = if late { CLOSE_RETRY_LATE } else { CLOSE_RETRY };
    let stretch = 1.0 + MAX_JITTER * jitter.clamp(0.0, 1.0);
    now + TimeDelta::milliseconds((retry.num_milliseconds() as f64 * stretch).round() as i64)
}

/// When to ask next after the query being decided, or `None` to give up: the interval for this
/// query's position in [`SCHEDULE_SECONDS`], stretched by up to [`MAX_JITTER`], at least
/// [`SLOW_DOWN`] after a rate limit, never past `give_up_after`, and no later than the time
/// to close the order (with `close_expired`), so expired orders close on time. Past the
/// schedule or the horizon, an order still to be closed is visited once more, at its close
/// time: polling stops, the close does not. An order already due to be closed (a close that
/// answered ORDERPAID, then a query that settled nothing) is never given up: it comes back
/// for another close, which leads to another query.
pub fn next_query_at(
    order: &OrderView,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &Policy,
    slow_down: bool,
) -> Option<DateTime<Utc>> {
    if policy.close_at(order).is_some_and(|at| at <= now) {
        return Some(close_retry_at(order, now, jitter, policy));
    }
    let close_at = policy.close_at(order).filter(|at| *at > now);
    let polled = usize::try_from(order.query_count)
        .ok()
        .and_then(|index| SCHEDULE_SECONDS.get(index))
        .map(|base| {
            let stretch = 1.0 + MAX_JITTER * jitter.clamp(0.0, 1.0);
            // Whole milliseconds; the product of two small positive numbers cannot overflow.
            let mut interval =
                TimeDelta::milliseconds((*base as f64 * 1000.0 * stretch).round() as i64);
            if slow_down {
                interval = interval.max(SLOW_DOWN);
            }
            let at = now + interval;
            close_at.map_or(at, |close| at.min(close))
        })
        .filter(|at| *at <= order.created_at + policy.give_up_after);
    polled.or(close_at)
}

/// When an order that was never queried is first due.
pub fn first_query_at(created_at: DateTime<Utc>, policy: &Policy) -> DateTime<Utc> {
    created_at + policy.grace
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Currency, OutTradeNo, TransactionId};
    use crate::gateway::Failure;
    use proptest::prelude::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .to_utc()
    }

    fn order(fee: i64) -> OrderView {
        OrderView {
            state: OrderState::NotPay,
            total_fee: Fen::new(fee).unwrap(),
            fee_type: "CNY".into(),
            appid: "wxd930ea5d5a258f4f".into(),
            created_at: t0(),
            expires_at: None,
            query_count: 0,
        }
    }

    fn report(state: TradeState, fee: Option<i64>) -> Result<QueryAnswer, GatewayError> {
        let paid = matches!(state, TradeState::Success | TradeState::Refund);
        Ok(QueryAnswer::Order(TradeReport {
            out_trade_no: OutTradeNo::parse("o1").unwrap(),
            trade_state: state,
            state_desc: None,
            transaction_id: paid.then(|| TransactionId::parse("4200000001").unwrap()),
            amount: fee.map(|f| Fen::new(f).unwrap()),
            currency: Currency::cny(),
            payer_amount: None,
            paid_at: paid.then(|| t0() + TimeDelta::seconds(5)),
            appid: None,
        }))
    }

    /// A failure of `failure`'s class, as a client reports it.
    fn failed(failure: Failure) -> GatewayError {
        GatewayError::new(failure, format!("{} (test)", failure.as_str()))
    }

    fn timeout() -> GatewayError {
        failed(Failure::Timeout)
    }

    fn now() -> DateTime<Utc> {
        t0() + TimeDelta::seconds(20)
    }

    /// [`decide`] at `now`, without jitter, under the default policy.
    fn decide_at(
        order: &OrderView,
        outcome: &Result<QueryAnswer, GatewayError>,
        now: DateTime<Utc>,
    ) -> Decision {
        decide(order, outcome, now, 0.0, &Policy::default())
    }

    #[test]
    fn paid_with_the_stored_amount_settles_as_success() {
        let d = decide_at(&order(100), &report(TradeState::Success, Some(100)), now());
        let Decision::Settle(s) = d else {
            panic!("{d:?}")
        };
        assert_eq!(s.to, OrderState::Success);
        assert_eq!(s.paid_at, Some(t0() + TimeDelta::seconds(5)));
        assert_eq!(s.transaction_id.unwrap().as_str(), "4200000001");
    }

    #[test]
    fn paid_with_another_amount_is_quarantined_never_paid() {
        for fee in [Some(99), Some(101), Some(1), None] {
            for state in [TradeState::Success, TradeState::Refund] {
                let d = decide_at(&order(100), &report(state.clone(), fee), now());
                let Decision::Quarantine(s) = d else {
                    panic!("{fee:?} {state}: {d:?}")
                };
                assert_eq!(s.to, OrderState::AmountMismatch);
            }
        }
    }

    #[test]
    fn final_wechat_states_are_applied() {
        for (ts, to) in [
            (TradeState::Refund, OrderState::Refund),
            (TradeState::Closed, OrderState::Closed),
            (TradeState::Revoked, OrderState::Revoked),
            (TradeState::PayError, OrderState::PayError),
        ] {
            let d = decide_at(&order(100), &report(ts.clone(), Some(100)), now());
            assert!(
                matches!(&d, Decision::Settle(s) if s.to == to),
                "{ts}: {d:?}"
            );
        }
    }

    #[test]
    fn open_unknown_and_transient_outcomes_reschedule_without_changing_state() {
        let outcomes = vec![
            report(TradeState::NotPay, None),
            report(TradeState::UserPaying, None),
            report(TradeState::Accept, None),
            report(TradeState::Unknown("NEW".into()), Some(100)),
            Err(timeout()),
            Err(failed(Failure::HttpStatus)),
            Err(failed(Failure::SignInvalid)),
            Err(failed(Failure::ReturnFail)),
            Err(failed(Failure::ResultFail)),
        ];
        for o in outcomes {
            let d = decide_at(&order(100), &o, now());
            assert_eq!(
                d,
                Decision::Reschedule {
                    at: now() + TimeDelta::seconds(15),
                    note: match &d {
                        Decision::Reschedule { note, .. } => note.clone(),
                        _ => None,
                    }
                },
                "{o:?}"
            );
        }
    }

    #[test]
    fn frequency_limited_slows_down() {
        let o = Err(failed(Failure::ResultFail).with_retry(RetryHint::SlowDown));
        let d = decide_at(&order(100), &o, now());
        assert!(
            matches!(d, Decision::Reschedule { at, .. } if at == now() + SLOW_DOWN),
            "{d:?}"
        );
    }

    #[test]
    fn order_not_exist_polls_until_expiry_then_closes() {
        let o = Ok(QueryAnswer::NotExist);
        let mut late = order(100);
        late.query_count = 5;
        // 20 minutes in: ask again (10 min interval... capped at the expiry).
        let d = decide_at(&late, &o, t0() + TimeDelta::minutes(20));
        assert!(
            matches!(d, Decision::Reschedule { at, .. } if at == t0() + TimeDelta::minutes(40)),
            "{d:?}"
        );
        let d = decide_at(&late, &o, t0() + TimeDelta::minutes(110));
        assert!(
            matches!(d, Decision::Reschedule { at, .. } if at == t0() + TimeDelta::hours(2)),
            "capped at expiry: {d:?}"
        );
        let d = decide_at(&late, &o, t0() + TimeDelta::hours(2));
        assert!(
            matches!(&d, Decision::Settle(s) if s.to == OrderState::Closed),
            "{d:?}"
        );
        // An explicit expires_at wins.
        late.expires_at = Some(t0() + TimeDelta::minutes(30));
        let d = decide_at(&late, &o, t0() + TimeDelta::minutes(31));
        assert!(
            matches!(&d, Decision::Settle(s) if s.to == OrderState::Closed),
            "{d:?}"
        );
    }

    #[test]
    fn polling_stops_at_the_give_up_horizon() {
        let mut o = order(100);
        o.query_count = 14; // the last interval is 6h
        let policy = Policy {
            give_up_after: TimeDelta::hours(20),
            close_expired: false,
            ..Policy::default()
        };
        let d = decide(
            &o,
            &report(TradeState::NotPay, None),
            t0() + TimeDelta::hours(18),
            0.0,
            &policy,
        );
        assert!(matches!(d, Decision::GiveUp { .. }), "{d:?}");
        o.query_count = MAX_QUERIES - 1;
        let d = decide(
            &o,
            &report(TradeState::NotPay, None),
            t0(),
            0.0,
            &Policy {
                give_up_after: TimeDelta::days(30),
                ..policy
            },
        );
        assert!(
            matches!(d, Decision::GiveUp { .. }),
            "past the schedule: {d:?}"
        );
    }

    #[test]
    fn jitter_only_stretches() {
        let o = order(100);
        let a = next_query_at(&o, now(), 0.0, &Policy::default(), false).unwrap();
        let b = next_query_at(&o, now(), 1.0, &Policy::default(), false).unwrap();
        assert_eq!(a, now() + TimeDelta::seconds(15));
        assert_eq!(b, now() + TimeDelta::milliseconds(16_500));
    }

    fn settled(state: OrderState) -> OrderView {
        OrderView {
            state,
            ..order(100)
        }
    }

    #[test]
    fn a_repeat_for_a_settled_order_changes_nothing() {
        for state in [
            OrderState::Success,
            OrderState::Refund,
            OrderState::AmountMismatch,
        ] {
            let d = decide_at(
                &settled(state),
                &report(TradeState::Success, Some(100)),
                now(),
            );
            assert!(matches!(d, Decision::Nothing { .. }), "{state}: {d:?}");
        }
        // Errors and open answers about a settled order change nothing either.
        for o in [Err(timeout()), report(TradeState::NotPay, None)] {
            let d = decide_at(&settled(OrderState::Success), &o, now());
            assert!(matches!(d, Decision::Nothing { .. }), "{d:?}");
        }
    }

    #[test]
    fn refund_after_success_is_the_one_move_out_of_a_terminal_state() {
        let d = decide_at(
            &settled(OrderState::Success),
            &report(TradeState::Refund, Some(100)),
            now(),
        );
        assert!(
            matches!(&d, Decision::Settle(s) if s.to == OrderState::Refund),
            "{d:?}"
        );
        // Not from any other terminal state, and not with another amount.
        for state in [OrderState::Refund, OrderState::AmountMismatch] {
            let d = decide_at(
                &settled(state),
                &report(TradeState::Refund, Some(100)),
                now(),
            );
            assert!(matches!(d, Decision::Nothing { .. }), "{state}: {d:?}");
        }
        let d = decide_at(
            &settled(OrderState::Success),
            &report(TradeState::Refund, Some(99)),
            now(),
        );
        assert!(matches!(d, Decision::Nothing { .. }), "{d:?}");
    }

    #[test]
    fn a_payment_for_a_closed_order_is_an_anomaly_never_a_state_change() {
        for state in [
            OrderState::Closed,
            OrderState::Revoked,
            OrderState::PayError,
        ] {
            for fee in [Some(100), Some(5)] {
                let d = decide_at(&settled(state), &report(TradeState::Success, fee), now());
                let Decision::Anomaly { anomaly, report } = &d else {
                    panic!("{state}: {d:?}")
                };
                assert_eq!(*anomaly, Anomaly::PaidAfterClose);
                assert_eq!(report.to, state, "the state stays");
                assert_eq!(report.reported_fee.map(|f| f.get()), fee);
                assert!(report.transaction_id.is_some());
            }
        }
        let d = decide_at(
            &settled(OrderState::Closed),
            &report(TradeState::Closed, None),
            now(),
        );
        assert!(matches!(d, Decision::Nothing { .. }), "{d:?}");
    }

    #[test]
    fn expired_orders_close_on_time_but_never_within_five_minutes() {
        let policy = Policy::default();
        let o = order(100);
        assert_eq!(policy.close_at(&o), Some(t0() + TimeDelta::hours(2)));
        assert!(!policy.should_close(&o, t0() + TimeDelta::minutes(119)));
        assert!(policy.should_close(&o, t0() + TimeDelta::hours(2)));
        // An app expiry of one minute still waits for WeChat's five.
        let short = OrderView {
            expires_at: Some(t0() + TimeDelta::minutes(1)),
            ..order(100)
        };
        assert_eq!(policy.close_at(&short), Some(t0() + MIN_CLOSE_AGE));
        assert!(!policy.should_close(&short, t0() + TimeDelta::minutes(4)));
        // The poll after a 3h interval is pulled in to the close time.
        let mut late = order(100);
        late.query_count = 10;
        let at = next_query_at(&late, t0() + TimeDelta::minutes(100), 0.0, &policy, false);
        assert_eq!(at, Some(t0() + TimeDelta::hours(2)));
        // Off: neither closes nor pulls in.
        let off = Policy {
            close_expired: false,
            ..policy
        };
        assert!(!off.should_close(&o, t0() + TimeDelta::hours(5)));
        let at = next_query_at(&late, t0() + TimeDelta::minutes(100), 0.0, &off, false);
        assert_eq!(at, Some(t0() + TimeDelta::minutes(280)));
        // A settled order is never closed.
        assert!(!policy.should_close(&settled(OrderState::Success), t0() + TimeDelta::hours(5)));
    }

    #[test]
    fn closeorder_answers() {
        let policy = Policy::default();
        let o = order(100);
        let at = t0() + TimeDelta::hours(2);
        for answer in [
            CloseAnswer::Closed,
            CloseAnswer::OrderClosed,
            CloseAnswer::NotExist,
        ] {
            let d = decide_close(&o, &Ok(answer), at, 0.0, &policy);
            assert!(
                matches!(&d, Some(Decision::Settle(s)) if s.to == OrderState::Closed),
                "{answer:?}: {d:?}"
            );
        }
        assert_eq!(
            decide_close(&o, &Ok(CloseAnswer::OrderPaid), at, 0.0, &policy),
            None,
            "paid: query, never close"
        );
        let d = decide_close(&o, &Err(timeout()), at, 0.0, &policy);
        assert!(
            matches!(&d, Some(Decision::Reschedule { at: next, .. }) if *next == at + CLOSE_RETRY),
            "{d:?}"
        );
        // Past the give-up horizon a failing close is retried hourly, never given up: the order
        // could still be paid at WeChat.
        let late = t0() + TimeDelta::hours(24);
        let d = decide_close(&o, &Err(timeout()), late, 0.0, &policy);
        assert!(
            matches!(&d, Some(Decision::Reschedule { at: next, .. }) if *next == late + CLOSE_RETRY_LATE),
            "{d:?}"
        );
    }

    #[test]
    fn a_paid_answer_to_a_close_is_never_given_up() {
        // closeorder answered ORDERPAID; the query that follows fails (or says NOTPAY), past
        // the horizon and past the schedule: the order comes back to be closed (and so queried)
        // again, never given up.
        let mut o = order(100);
        o.query_count = MAX_QUERIES - 1;
        let policy = Policy::default();
        for now in [t0() + TimeDelta::hours(3), t0() + TimeDelta::hours(30)] {
            for outcome in [Err(timeout()), report(TradeState::NotPay, None)] {
                let d = decide(&o, &outcome, now, 0.0, &policy);
                let retry = if now >= t0() + policy.give_up_after {
                    CLOSE_RETRY_LATE
                } else {
                    CLOSE_RETRY
                };
                assert!(
                    matches!(&d, Decision::Reschedule { at, .. } if *at == now + retry),
                    "{now}: {d:?}"
                );
                assert!(
                    policy.should_close(&o, now + retry),
                    "the next visit closes"
                );
            }
        }
    }

    #[test]
    fn an_expiry_past_the_give_up_horizon_still_gets_its_close() {
        let mut o = order(100);
        o.expires_at = Some(t0() + TimeDelta::hours(30));
        o.query_count = 14; // the last interval is 6h, past the 24h horizon
        let now = t0() + TimeDelta::hours(20);
        let notpay = report(TradeState::NotPay, None);
        let d = decide_at(&o, &notpay, now);
        assert!(
            matches!(&d, Decision::Reschedule { at, .. } if *at == t0() + TimeDelta::hours(30)),
            "polling stops, the close at expiry does not: {d:?}"
        );
        o.query_count = MAX_QUERIES - 1;
        let d = decide_at(&o, &notpay, now);
        assert!(
            matches!(&d, Decision::Reschedule { at, .. } if *at == t0() + TimeDelta::hours(30)),
            "past the schedule too: {d:?}"
        );
        let policy = Policy {
            close_expired: false,
            ..Policy::default()
        };
        let d = decide(&o, &notpay, now, 0.0, &policy);
        assert!(
            matches!(d, Decision::GiveUp { .. }),
            "without close_expired the horizon ends it: {d:?}"
        );
    }

    proptest! {
        /// However late the scans run and whatever the jitter, an order that never settles is
        /// queried at most MAX_QUERIES times, never before its schedule allows, and never after
        /// the give-up horizon.
        #[test]
        fn never_queried_more_than_the_schedule_allows(
            delays in proptest::collection::vec(0i64..120_000, 20),
            jitters in proptest::collection::vec(0.0f64..=1.0, 20),
            transient in proptest::collection::vec(any::<bool>(), 20),
        ) {
            let policy = Policy { close_expired: false, ..Policy::default() };
            let mut o = order(100);
            let mut due = first_query_at(o.created_at, &policy);
            let mut queried_at = Vec::new();
            for i in 0..20 {
                let now = due + TimeDelta::milliseconds(delays[i]);
                queried_at.push(now);
                let outcome = if transient[i] { Err(timeout()) } else { report(TradeState::NotPay, None) };
                match decide(&o, &outcome, now, jitters[i], &policy) {
                    Decision::Reschedule { at, .. } => {
                        let min = TimeDelta::seconds(SCHEDULE_SECONDS[o.query_count as usize]);
                        prop_assert!(at - now >= min);
                        prop_assert!(at <= o.created_at + policy.give_up_after);
                        o.query_count += 1;
                        due = at;
                    }
                    Decision::GiveUp { .. } => break,
                    d => prop_assert!(false, "unexpected {:?}", d),
                }
            }
            prop_assert!(queried_at.len() as u32 <= MAX_QUERIES);
            prop_assert!(queried_at.iter().all(|t| *t <= o.created_at + policy.give_up_after + TimeDelta::minutes(2)));
        }
    }
}

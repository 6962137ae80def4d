//! The whole reconciliation policy as one pure function: no IO, no clock, no randomness (the
//! caller passes `now` and a jitter draw), so every rule is unit-testable.
//!
//! - SUCCESS (or REFUND) with `total_fee` equal to the stored amount → that state; with another
//!   amount → `AMOUNT_MISMATCH`, never paid.
//! - CLOSED / REVOKED / PAYERROR → that state.
//! - NOTPAY / USERPAYING / ACCEPT / an unknown state, and every transient error → ask again on
//!   the backoff schedule, state untouched.
//! - ORDERNOTEXIST → ask again until the order's expiry, then CLOSED locally.
//! - Past `give_up_after` or the end of the schedule → stop polling.

use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::{Fen, OrderState, TradeState, TransactionId};
use crate::wxpay::{QueryAnswer, RetryHint, TradeReport, WxPayError};

/// Intervals after each query, modelled on WeChat's own notification retries
/// (15s, 15s, 30s, 3m, 10m, 20m, 30m, 30m, 30m, 60m, 3h, 3h, 3h, 6h, 6h: 24h4m in all).
pub const SCHEDULE_SECONDS: [i64; 15] = [
    15, 15, 30, 180, 600, 1200, 1800, 1800, 1800, 3600, 10800, 10800, 10800, 21600, 21600,
];

/// At most this many queries per order: the first, then one after each interval.
pub const MAX_QUERIES: u32 = SCHEDULE_SECONDS.len() as u32 + 1;

/// How long an order is payable when the app did not set `expires_at` (the prepay_id's life).
pub const DEFAULT_PREPAY_LIFETIME: TimeDelta = TimeDelta::hours(2);

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
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            grace: TimeDelta::seconds(15),
            give_up_after: TimeDelta::hours(24),
        }
    }
}

/// What the policy needs to know about an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderView {
    pub state: OrderState,
    pub total_fee: Fen,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Queries made before the one being decided.
    pub query_count: u32,
}

impl OrderView {
    /// When the order stops being payable.
    pub fn expiry(&self) -> DateTime<Utc> {
        self.expires_at
            .unwrap_or(self.created_at + DEFAULT_PREPAY_LIFETIME)
    }
}

/// A state change to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub to: OrderState,
    pub transaction_id: Option<TransactionId>,
    pub paid_at: Option<DateTime<Utc>>,
    /// What WeChat reported.
    pub reported_fee: Option<Fen>,
    /// Why, in words (recorded with the event).
    pub detail: Option<String>,
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
}

/// Decides what a query's outcome means for an open order. `jitter` is a draw from `0.0..=1.0`.
pub fn decide(
    order: &OrderView,
    outcome: &Result<QueryAnswer, WxPayError>,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &Policy,
) -> Decision {
    let again = |note: Option<String>, slow_down: bool| match next_query_at(
        order, now, jitter, policy, slow_down,
    ) {
        Some(at) => Decision::Reschedule { at, note },
        None => Decision::GiveUp {
            reason: format!(
                "gave up after {} queries{}",
                order.query_count + 1,
                note.map(|n| format!("; last: {n}")).unwrap_or_default()
            ),
        },
    };
    match outcome {
        Err(e) => again(Some(e.to_string()), e.retry_hint() == RetryHint::SlowDown),
        Ok(QueryAnswer::NotExist) => {
            if now >= order.expiry() {
                Decision::Settle(Settlement {
                    to: OrderState::Closed,
                    transaction_id: None,
                    paid_at: None,
                    reported_fee: None,
                    detail: Some(
                        "ORDERNOTEXIST: WeChat never accepted the order, and it has expired".into(),
                    ),
                })
            } else {
                match next_query_at(order, now, jitter, policy, false) {
                    // Ask once more right at the expiry, then close.
                    Some(at) => Decision::Reschedule {
                        at: at.min(order.expiry()),
                        note: Some("ORDERNOTEXIST".into()),
                    },
                    None => Decision::Reschedule {
                        at: order.expiry(),
                        note: Some("ORDERNOTEXIST".into()),
                    },
                }
            }
        }
        Ok(QueryAnswer::Order(report)) => match &report.trade_state {
            TradeState::Success => paid(order, report, OrderState::Success),
            TradeState::Refund => paid(order, report, OrderState::Refund),
            TradeState::Closed => settle(report, OrderState::Closed),
            TradeState::Revoked => settle(report, OrderState::Revoked),
            TradeState::PayError => settle(report, OrderState::PayError),
            TradeState::NotPay | TradeState::UserPaying | TradeState::Accept => {
                again(Some(report.trade_state.to_string()), false)
            }
            TradeState::Unknown(s) => again(Some(format!("unknown trade_state {s:?}")), false),
        },
    }
}

/// A paid report: the amount decides between the reported state and quarantine.
fn paid(order: &OrderView, report: &TradeReport, to: OrderState) -> Decision {
    let settlement = |to, detail| Settlement {
        to,
        transaction_id: report.transaction_id.clone(),
        paid_at: report.time_end,
        reported_fee: report.total_fee,
        detail,
    };
    match report.total_fee {
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
        reported_fee: report.total_fee,
        detail: report.trade_state_desc.clone(),
    })
}

/// When to ask next after the query being decided, or `None` to give up: the interval for this
/// query's position in [`SCHEDULE_SECONDS`], stretched by up to [`MAX_JITTER`], at least
/// [`SLOW_DOWN`] after a rate limit, and never past `give_up_after`.
pub fn next_query_at(
    order: &OrderView,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &Policy,
    slow_down: bool,
) -> Option<DateTime<Utc>> {
    let index = usize::try_from(order.query_count).ok()?;
    let base = *SCHEDULE_SECONDS.get(index)?;
    let stretch = 1.0 + MAX_JITTER * jitter.clamp(0.0, 1.0);
    // Whole milliseconds; the product of two small positive numbers cannot overflow.
    let mut interval = TimeDelta::milliseconds((base as f64 * 1000.0 * stretch).round() as i64);
    if slow_down {
        interval = interval.max(SLOW_DOWN);
    }
    let at = now + interval;
    (at <= order.created_at + policy.give_up_after).then_some(at)
}

/// When an order that was never queried is first due.
pub fn first_query_at(created_at: DateTime<Utc>, policy: &Policy) -> DateTime<Utc> {
    created_at + policy.grace
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::OutTradeNo;
    use crate::wxpay::{ErrCode, SignError};
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
            created_at: t0(),
            expires_at: None,
            query_count: 0,
        }
    }

    fn report(state: TradeState, fee: Option<i64>) -> Result<QueryAnswer, WxPayError> {
        let paid = matches!(state, TradeState::Success | TradeState::Refund);
        Ok(QueryAnswer::Order(TradeReport {
            out_trade_no: OutTradeNo::parse("o1").unwrap(),
            trade_state: state,
            trade_state_desc: None,
            transaction_id: paid.then(|| TransactionId::parse("4200000001").unwrap()),
            total_fee: fee.map(|f| Fen::new(f).unwrap()),
            cash_fee: None,
            time_end: paid.then(|| t0() + TimeDelta::seconds(5)),
        }))
    }

    fn now() -> DateTime<Utc> {
        t0() + TimeDelta::seconds(20)
    }

    #[test]
    fn paid_with_the_stored_amount_settles_as_success() {
        let d = decide(
            &order(100),
            &report(TradeState::Success, Some(100)),
            now(),
            0.0,
            &Policy::default(),
        );
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
                let d = decide(
                    &order(100),
                    &report(state.clone(), fee),
                    now(),
                    0.0,
                    &Policy::default(),
                );
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
            let d = decide(
                &order(100),
                &report(ts.clone(), Some(100)),
                now(),
                0.0,
                &Policy::default(),
            );
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
            Err(WxPayError::Timeout),
            Err(WxPayError::HttpStatus(502)),
            Err(WxPayError::Sign(SignError::Invalid)),
            Err(WxPayError::ReturnFail("x".into())),
            Err(WxPayError::ResultFail {
                code: ErrCode::SystemError,
                description: String::new(),
            }),
        ];
        for o in outcomes {
            let d = decide(&order(100), &o, now(), 0.0, &Policy::default());
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
        let o = Err(WxPayError::ResultFail {
            code: ErrCode::FrequencyLimited,
            description: String::new(),
        });
        let d = decide(&order(100), &o, now(), 0.0, &Policy::default());
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
        let d = decide(
            &late,
            &o,
            t0() + TimeDelta::minutes(20),
            0.0,
            &Policy::default(),
        );
        assert!(
            matches!(d, Decision::Reschedule { at, .. } if at == t0() + TimeDelta::minutes(40)),
            "{d:?}"
        );
        let d = decide(
            &late,
            &o,
            t0() + TimeDelta::minutes(110),
            0.0,
            &Policy::default(),
        );
        assert!(
            matches!(d, Decision::Reschedule { at, .. } if at == t0() + TimeDelta::hours(2)),
            "capped at expiry: {d:?}"
        );
        let d = decide(
            &late,
            &o,
            t0() + TimeDelta::hours(2),
            0.0,
            &Policy::default(),
        );
        assert!(
            matches!(&d, Decision::Settle(s) if s.to == OrderState::Closed),
            "{d:?}"
        );
        // An explicit expires_at wins.
        late.expires_at = Some(t0() + TimeDelta::minutes(30));
        let d = decide(
            &late,
            &o,
            t0() + TimeDelta::minutes(31),
            0.0,
            &Policy::default(),
        );
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
            grace: TimeDelta::seconds(15),
            give_up_after: TimeDelta::hours(20),
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
            let policy = Policy::default();
            let mut o = order(100);
            let mut due = first_query_at(o.created_at, &policy);
            let mut queried_at = Vec::new();
            for i in 0..20 {
                let now = due + TimeDelta::milliseconds(delays[i]);
                queried_at.push(now);
                let outcome = if transient[i] { Err(WxPayError::Timeout) } else { report(TradeState::NotPay, None) };
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

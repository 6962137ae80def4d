//! What a refund query's answer (or a refund notification) means for a refund, as one pure
//! function: no IO, no clock (the caller passes `now` and a jitter draw).
//!
//! - Before any change, the verified report must describe the row: its `out_refund_no`, its
//!   order (`out_trade_no`), its amount (`refund_fee`), and the order's amount and currency.
//!   A verified report that disagrees sets the refund aside as `AMOUNT_MISMATCH`; it is never
//!   applied.
//! - `SUCCESS`, `CLOSED`, `ABNORMAL` → that state (the store then checks that the order's
//!   successful refunds never add up to more than its total, and moves the order to `REFUND`).
//! - `PROCESSING`, an unknown status, and every transient error → ask again on the refund
//!   schedule; a rate limit waits at least [`super::policy::SLOW_DOWN`].
//! - WeChat knows no such refund → ask again until `not_found_after` has passed since the
//!   registration (the merchant may register it before calling WeChat), then `NOT_FOUND`.
//! - Past the horizon, polling stops (the refund stays `PROCESSING`, counted and alerted).

use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::{Currency, Fen, RefundState, RefundStatus, Source};
use crate::gateway::{GatewayError, RefundAnswer, RefundReport, RetryHint};
use crate::store::{RefundChange, RefundOutcome, RefundRow};

use super::policy::{MAX_JITTER, SLOW_DOWN};

/// Intervals after each query: balance refunds arrive within minutes, card refunds may take
/// days. The last interval repeats until the horizon.
pub const REFUND_SCHEDULE_SECONDS: [i64; 10] =
    [60, 120, 300, 600, 1800, 3600, 7200, 14400, 21600, 28800];

/// The knobs, from `[refunds]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundPolicy {
    /// The first query this long after the registration.
    pub first_delay: TimeDelta,
    /// Stop polling a refund this long after its registration.
    pub horizon: TimeDelta,
    /// A refund WeChat does not know is `NOT_FOUND` only this long after its registration.
    pub not_found_after: TimeDelta,
}

impl Default for RefundPolicy {
    fn default() -> Self {
        RefundPolicy {
            first_delay: TimeDelta::seconds(60),
            horizon: TimeDelta::days(15),
            not_found_after: TimeDelta::hours(1),
        }
    }
}

/// What the policy looks at: the refund, and its order's amount and currency.
#[derive(Debug, Clone, Copy)]
pub struct RefundView<'a> {
    pub row: &'a RefundRow,
    /// The order's `total_fee` (`None`: the order is gone, which the foreign key prevents).
    pub order_total: Option<Fen>,
    pub order_currency: &'a Currency,
}

/// Decides a query's outcome for an open refund.
pub fn decide_refund(
    view: &RefundView<'_>,
    outcome: &Result<RefundAnswer, GatewayError>,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &RefundPolicy,
) -> RefundChange {
    match outcome {
        Ok(RefundAnswer::Refund(report)) => {
            decide_refund_report(view, report, Source::Poll, now, jitter, policy)
        }
        Ok(RefundAnswer::NotExist) => {
            if now >= view.row.created_at + policy.not_found_after {
                finish(
                    RefundState::NotFound,
                    None,
                    Some(format!(
                        "WeChat knows no refund {} {} after its registration",
                        view.row.out_refund_no,
                        human(policy.not_found_after)
                    )),
                    Source::Poll,
                )
            } else {
                again(
                    view.row,
                    now,
                    jitter,
                    policy,
                    "WeChat knows no such refund yet".into(),
                    false,
                )
            }
        }
        Err(e) => again(
            view.row,
            now,
            jitter,
            policy,
            e.to_string(),
            e.retry_hint() == RetryHint::SlowDown,
        ),
    }
}

/// Decides a verified refund report (a query's or a notification's) for an open refund.
pub fn decide_refund_report(
    view: &RefundView<'_>,
    report: &RefundReport,
    source: Source,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &RefundPolicy,
) -> RefundChange {
    if let Some(why) = mismatch(view, report) {
        return finish(RefundState::AmountMismatch, Some(report), Some(why), source);
    }
    match &report.status {
        RefundStatus::Success => finish(RefundState::Success, Some(report), None, source),
        RefundStatus::Closed => finish(RefundState::Closed, Some(report), None, source),
        RefundStatus::Abnormal => finish(
            RefundState::Abnormal,
            Some(report),
            Some("ABNORMAL: the refund could not reach the payer's account".into()),
            source,
        ),
        RefundStatus::Processing => {
            again(view.row, now, jitter, policy, "PROCESSING".into(), false)
        }
        RefundStatus::Unknown(s) => again(
            view.row,
            now,
            jitter,
            policy,
            format!("unknown refund status {}", crate::text::quote(s)),
            false,
        ),
    }
}

/// Why a verified report does not describe this refund, if it does not.
fn mismatch(view: &RefundView<'_>, report: &RefundReport) -> Option<String> {
    let row = view.row;
    if report.out_refund_no != row.out_refund_no {
        return Some(format!(
            "WeChat's refund is {}, the row's {}",
            report.out_refund_no, row.out_refund_no
        ));
    }
    if report.out_trade_no != row.out_trade_no {
        return Some(format!(
            "WeChat's refund belongs to order {}, the row names {}",
            report.out_trade_no, row.out_trade_no
        ));
    }
    if report.refund_fee != row.refund_fee {
        return Some(format!(
            "WeChat refunds {} fen, the row says {} fen",
            report.refund_fee, row.refund_fee
        ));
    }
    if let (Some(remote), Some(local)) = (report.total_fee, view.order_total)
        && remote != local
    {
        return Some(format!(
            "WeChat's order total is {remote} fen, the order's total_fee {local} fen"
        ));
    }
    if &report.currency != view.order_currency {
        return Some(format!(
            "WeChat's refund is in {}, the order in {}",
            report.currency, view.order_currency
        ));
    }
    None
}

fn finish(
    to: RefundState,
    report: Option<&RefundReport>,
    detail: Option<String>,
    source: Source,
) -> RefundChange {
    RefundChange::Finish {
        outcome: RefundOutcome {
            to,
            refund_id: report.and_then(|r| r.refund_id.clone()),
            success_time: report.and_then(|r| r.success_time),
            recv_account: report.and_then(|r| r.recv_account.clone()),
            reported_fee: report.map(|r| r.refund_fee),
            detail,
        },
        source,
    }
}

/// Ask again on the schedule, or stop past the horizon.
fn again(
    row: &RefundRow,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &RefundPolicy,
    note: String,
    slow_down: bool,
) -> RefundChange {
    match next_refund_query_at(row, now, jitter, policy, slow_down) {
        Some(at) => RefundChange::Reschedule {
            at,
            note: Some(note),
        },
        None => RefundChange::GiveUp {
            reason: format!(
                "still open {} after its registration (last: {note})",
                human(policy.horizon)
            ),
        },
    }
}

/// When to ask next after the query being decided, or `None` past the horizon: the interval
/// for this query's position in [`REFUND_SCHEDULE_SECONDS`] (the last one repeating),
/// stretched by up to [`MAX_JITTER`], at least [`SLOW_DOWN`] after a rate limit.
pub fn next_refund_query_at(
    row: &RefundRow,
    now: DateTime<Utc>,
    jitter: f64,
    policy: &RefundPolicy,
    slow_down: bool,
) -> Option<DateTime<Utc>> {
    let index = usize::try_from(row.query_count)
        .unwrap_or(0)
        .min(REFUND_SCHEDULE_SECONDS.len() - 1);
    let base = REFUND_SCHEDULE_SECONDS[index];
    let stretch = 1.0 + MAX_JITTER * jitter.clamp(0.0, 1.0);
    let mut interval = TimeDelta::milliseconds((base as f64 * 1000.0 * stretch).round() as i64);
    if slow_down {
        interval = interval.max(SLOW_DOWN);
    }
    let at = now + interval;
    (at <= row.created_at + policy.horizon).then_some(at)
}

fn human(d: TimeDelta) -> String {
    if d.num_days() >= 1 && d.num_seconds() % 86_400 == 0 {
        format!("{} days", d.num_days())
    } else if d.num_hours() >= 1 && d.num_seconds() % 3600 == 0 {
        format!("{} hours", d.num_hours())
    } else {
        format!("{} seconds", d.num_seconds())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{MchId, OutRefundNo, OutTradeNo, RefundId};
    use crate::gateway::Failure;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .to_utc()
    }

    fn row(query_count: i64) -> RefundRow {
        RefundRow {
            id: 1,
            mch_id: MchId::parse("10000100").unwrap(),
            out_trade_no: OutTradeNo::parse("T1").unwrap(),
            out_refund_no: OutRefundNo::parse("R1").unwrap(),
            refund_fee: Fen::new(300).unwrap(),
            state: RefundState::Processing,
            refund_id: None,
            success_time: None,
            refund_recv_accout: None,
            created_at: t0(),
            query_count,
            next_query_at: None,
            last_queried_at: None,
            last_error: None,
            gave_up_at: None,
        }
    }

    fn report(status: RefundStatus) -> RefundReport {
        RefundReport {
            out_refund_no: OutRefundNo::parse("R1").unwrap(),
            out_trade_no: OutTradeNo::parse("T1").unwrap(),
            status,
            refund_id: Some(RefundId::parse("50000000382019052709732678859").unwrap()),
            refund_fee: Fen::new(300).unwrap(),
            total_fee: Some(Fen::new(1000).unwrap()),
            currency: Currency::cny(),
            success_time: Some(t0()),
            recv_account: Some("支付用户的零钱".into()),
        }
    }

    fn decide_with(
        row: &RefundRow,
        outcome: Result<RefundAnswer, GatewayError>,
        now: DateTime<Utc>,
    ) -> RefundChange {
        let cny = Currency::cny();
        let view = RefundView {
            row,
            order_total: Some(Fen::new(1000).unwrap()),
            order_currency: &cny,
        };
        decide_refund(&view, &outcome, now, 0.0, &RefundPolicy::default())
    }

    fn to(change: &RefundChange) -> Option<RefundState> {
        match change {
            RefundChange::Finish { outcome, .. } => Some(outcome.to),
            _ => None,
        }
    }

    #[test]
    fn final_statuses_finish_and_processing_asks_again() {
        let r = row(0);
        let now = t0() + TimeDelta::minutes(1);
        for (status, state) in [
            (RefundStatus::Success, RefundState::Success),
            (RefundStatus::Closed, RefundState::Closed),
            (RefundStatus::Abnormal, RefundState::Abnormal),
        ] {
            let c = decide_with(&r, Ok(RefundAnswer::Refund(report(status))), now);
            assert_eq!(to(&c), Some(state));
        }
        for status in [
            RefundStatus::Processing,
            RefundStatus::Unknown("NEW".into()),
        ] {
            let c = decide_with(&r, Ok(RefundAnswer::Refund(report(status))), now);
            assert_eq!(
                c,
                RefundChange::Reschedule {
                    at: now + TimeDelta::seconds(60),
                    note: match &c {
                        RefundChange::Reschedule { note, .. } => note.clone(),
                        _ => None,
                    }
                }
            );
        }
    }

    #[test]
    fn a_report_that_does_not_describe_the_row_is_quarantined_never_applied() {
        let r = row(0);
        let now = t0() + TimeDelta::minutes(1);
        let mut fee = report(RefundStatus::Success);
        fee.refund_fee = Fen::new(301).unwrap();
        let mut order = report(RefundStatus::Success);
        order.out_trade_no = OutTradeNo::parse("T2").unwrap();
        let mut total = report(RefundStatus::Success);
        total.total_fee = Some(Fen::new(999).unwrap());
        let mut currency = report(RefundStatus::Closed);
        currency.currency = Currency::parse("USD").unwrap();
        for bad in [fee, order, total, currency] {
            let c = decide_with(&r, Ok(RefundAnswer::Refund(bad)), now);
            assert_eq!(to(&c), Some(RefundState::AmountMismatch), "{c:?}");
        }
    }

    #[test]
    fn not_found_only_after_the_grace_and_errors_back_off() {
        let r = row(0);
        let early = decide_with(
            &r,
            Ok(RefundAnswer::NotExist),
            t0() + TimeDelta::minutes(10),
        );
        assert!(
            matches!(early, RefundChange::Reschedule { .. }),
            "{early:?}"
        );
        let late = decide_with(
            &r,
            Ok(RefundAnswer::NotExist),
            t0() + TimeDelta::minutes(61),
        );
        assert_eq!(to(&late), Some(RefundState::NotFound));

        let limited = GatewayError::new(Failure::ResultFail, "FREQUENCY_LIMITED")
            .with_retry(RetryHint::SlowDown);
        let now = t0() + TimeDelta::minutes(1);
        match decide_with(&r, Err(limited), now) {
            RefundChange::Reschedule { at, .. } => assert!(at >= now + SLOW_DOWN),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_schedule_backs_off_then_repeats_until_the_horizon() {
        let policy = RefundPolicy::default();
        let now = t0();
        let at = |n| next_refund_query_at(&row(n), now, 0.0, &policy, false).unwrap();
        assert_eq!(at(0), now + TimeDelta::seconds(60));
        assert_eq!(at(4), now + TimeDelta::seconds(1800));
        assert_eq!(at(9), now + TimeDelta::hours(8));
        assert_eq!(at(500), now + TimeDelta::hours(8));
        let late = t0() + TimeDelta::days(15) - TimeDelta::hours(1);
        assert_eq!(
            next_refund_query_at(&row(40), late, 0.0, &policy, false),
            None
        );
        match decide_with(
            &row(40),
            Ok(RefundAnswer::Refund(report(RefundStatus::Processing))),
            late,
        ) {
            RefundChange::GiveUp { reason } => assert!(reason.contains("15 days"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}

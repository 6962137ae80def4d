//! One bill row against the shop's row: what the comparison finds, as pure functions (no IO,
//! no clock). [`super::bills`] applies what they decide.
//!
//! A payment row of WeChat's bill is a payment WeChat took. Against `wxpay_orders`:
//! - no order → `remote_only` (reported, never invented);
//! - an open or closed order → a [`TradeReport`] for the one [`super::settle::Settler`]
//!   (SUCCESS only at the stored amount and currency, else `AMOUNT_MISMATCH`; a closed order
//!   gets its one `PAID_AFTER_CLOSE` event);
//! - a paid order (`SUCCESS`, `REFUND`) → compared: amount and currency (`amount_diff`),
//!   `transaction_id` (`state_diff`);
//! - an order quarantined (`AMOUNT_MISMATCH`) → `amount_diff` (reported again).
//!
//! A refund row against `wxpay_refunds` likewise: no refund → `remote_only`; a refund still
//! `PROCESSING` that WeChat's bill says succeeded → a [`RefundReport`] for the refund rules;
//! otherwise the amounts and the states are compared.

use crate::bill::{BillRefund, BillRow};
use crate::domain::{
    AppId, Currency, OrderState, OutRefundNo, OutTradeNo, RefundId, RefundState, RefundStatus,
    TradeState, TransactionId,
};
use crate::gateway::{RefundReport, TradeReport};
use crate::store::{FindingKind, OrderRow, RefundRow};

/// What one payment row of the bill asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCheck {
    /// Agrees with the shop's row.
    Matches,
    /// The shop has no such order.
    RemoteOnly { detail: String },
    /// To be applied through the Settler (the order is open or closed locally).
    Settle(Box<TradeReport>),
    /// Differs, reported only.
    Differs { kind: FindingKind, detail: String },
}

/// What one refund row of the bill asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundCheck {
    Matches,
    RemoteOnly {
        detail: String,
    },
    /// The refund is open locally and WeChat's bill says how it ended: the refund rules decide.
    Settle(Box<RefundReport>),
    Differs {
        kind: FindingKind,
        detail: String,
    },
}

/// Whether a payment row says WeChat took the money (交易状态 SUCCESS).
pub fn is_paid(row: &BillRow) -> bool {
    row.trade_state == "SUCCESS"
}

/// The payment row `row` against the shop's order `local` (already looked up by
/// `(mch_id, out_trade_no)`).
pub fn check_payment(row: &BillRow, local: Option<&OrderRow>) -> PaymentCheck {
    let Some(order) = local else {
        return PaymentCheck::RemoteOnly {
            detail: format!(
                "WeChat's bill has a {} payment the shop's table lacks",
                crate::text::quote(&row.trade_state)
            ),
        };
    };
    let paid = is_paid(row);
    match order.state {
        OrderState::NotPay
        | OrderState::UserPaying
        | OrderState::Closed
        | OrderState::Revoked
        | OrderState::PayError => {
            if !paid {
                return PaymentCheck::Matches;
            }
            match payment_report(row) {
                Ok(report) => PaymentCheck::Settle(Box::new(report)),
                Err(why) => PaymentCheck::Differs {
                    kind: FindingKind::StateDiff,
                    detail: format!("the bill's row cannot be used: {why}"),
                },
            }
        }
        OrderState::Success | OrderState::Refund => {
            if !paid {
                return PaymentCheck::Differs {
                    kind: FindingKind::StateDiff,
                    detail: format!(
                        "paid here, {} in WeChat's bill",
                        crate::text::quote(&row.trade_state)
                    ),
                };
            }
            if let Some(detail) = amount_differs(row, order) {
                return PaymentCheck::Differs {
                    kind: FindingKind::AmountDiff,
                    detail,
                };
            }
            match &order.transaction_id {
                Some(t) if t != &row.transaction_id => PaymentCheck::Differs {
                    kind: FindingKind::StateDiff,
                    detail: format!(
                        "transaction_id {} here, {} in the bill",
                        crate::text::quote(t),
                        crate::text::quote(&row.transaction_id)
                    ),
                },
                _ => PaymentCheck::Matches,
            }
        }
        OrderState::AmountMismatch => PaymentCheck::Differs {
            kind: FindingKind::AmountDiff,
            detail: amount_differs(row, order).unwrap_or_else(|| {
                "the order is quarantined (AMOUNT_MISMATCH); the bill's amount equals it".into()
            }),
        },
    }
}

/// Why the bill's amount is not the order's, if it is not.
fn amount_differs(row: &BillRow, order: &OrderRow) -> Option<String> {
    if row.currency != order.fee_type.as_str() {
        return Some(format!(
            "currency {} here, {} in the bill",
            order.fee_type.as_str(),
            crate::text::quote(&row.currency)
        ));
    }
    (row.total_fee != order.total_fee).then(|| {
        format!(
            "{} fen here, {} fen in the bill",
            order.total_fee.get(),
            row.total_fee.get()
        )
    })
}

/// The payment row as a report, as verified as the bill it came in.
pub fn payment_report(row: &BillRow) -> Result<TradeReport, String> {
    let out_trade_no = OutTradeNo::parse(&row.out_trade_no).map_err(|e| e.to_string())?;
    let transaction_id = TransactionId::parse(&row.transaction_id).map_err(|e| e.to_string())?;
    let currency = Currency::parse(&row.currency).map_err(|e| e.to_string())?;
    let appid = AppId::parse(&row.appid).ok();
    Ok(TradeReport {
        out_trade_no,
        trade_state: TradeState::Success,
        state_desc: None,
        transaction_id: Some(transaction_id),
        amount: Some(row.total_fee),
        currency,
        payer_amount: None,
        paid_at: Some(row.trade_time),
        appid,
    })
}

/// The refund columns' 退款状态 as a refund status.
fn refund_status(refund: &BillRefund) -> RefundStatus {
    RefundStatus::parse_v2(&refund.status)
}

/// The refund row `row` (its refund columns `refund`) against the shop's refund `local`
/// (looked up by `(mch_id, out_refund_no)`).
pub fn check_refund(row: &BillRow, refund: &BillRefund, local: Option<&RefundRow>) -> RefundCheck {
    let Some(local) = local else {
        return RefundCheck::RemoteOnly {
            detail: format!(
                "WeChat's bill has a {} refund the shop's table lacks",
                crate::text::quote(&refund.status)
            ),
        };
    };
    if local.out_trade_no.as_str() != row.out_trade_no {
        return RefundCheck::Differs {
            kind: FindingKind::StateDiff,
            detail: format!(
                "the refund belongs to order {} here, to {} in the bill",
                crate::text::quote(local.out_trade_no.as_str()),
                crate::text::quote(&row.out_trade_no)
            ),
        };
    }
    let status = refund_status(refund);
    if local.state.is_open() {
        if matches!(status, RefundStatus::Processing | RefundStatus::Unknown(_)) {
            return RefundCheck::Matches;
        }
        return match refund_report(row, refund, status) {
            Ok(report) => RefundCheck::Settle(Box::new(report)),
            Err(why) => RefundCheck::Differs {
                kind: FindingKind::StateDiff,
                detail: format!("the bill's row cannot be used: {why}"),
            },
        };
    }
    if local.state == RefundState::AmountMismatch || refund.refund_fee != local.refund_fee {
        return RefundCheck::Differs {
            kind: FindingKind::AmountDiff,
            detail: format!(
                "{} fen here ({}), {} fen in the bill",
                local.refund_fee.get(),
                local.state.as_str(),
                refund.refund_fee.get()
            ),
        };
    }
    if status.label() != local.state.as_str() {
        return RefundCheck::Differs {
            kind: FindingKind::StateDiff,
            detail: format!(
                "{} here, {} in the bill",
                local.state.as_str(),
                crate::text::quote(&refund.status)
            ),
        };
    }
    RefundCheck::Matches
}

/// The refund row as a report.
fn refund_report(
    row: &BillRow,
    refund: &BillRefund,
    status: RefundStatus,
) -> Result<RefundReport, String> {
    let success_time = matches!(status, RefundStatus::Success)
        .then(|| refund.succeeded_at.unwrap_or(row.trade_time));
    Ok(RefundReport {
        out_refund_no: OutRefundNo::parse(&refund.out_refund_no).map_err(|e| e.to_string())?,
        out_trade_no: OutTradeNo::parse(&row.out_trade_no).map_err(|e| e.to_string())?,
        status,
        refund_id: RefundId::parse(&refund.refund_id).ok(),
        refund_fee: refund.refund_fee,
        total_fee: None,
        currency: Currency::parse(&row.currency).map_err(|e| e.to_string())?,
        success_time,
        recv_account: None,
    })
}

/// A bounded key column of a finding (the tables hold 64 characters).
pub fn key(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::bill::{MilliFen, RowKind};
    use crate::domain::{Fen, MchId};

    fn fen(f: i64) -> Fen {
        Fen::new(f).unwrap()
    }

    fn payment(state: &str, total: i64) -> BillRow {
        BillRow {
            line: 2,
            trade_time: Utc::now(),
            appid: "wxd930ea5d5a258f4f".into(),
            mch_id: "10000100".into(),
            sub_mch_id: None,
            transaction_id: "4200000001".into(),
            out_trade_no: "o1".into(),
            trade_type: "JSAPI".into(),
            trade_state: state.into(),
            currency: "CNY".into(),
            total_fee: fen(total),
            settlement_total_fee: fen(total),
            kind: RowKind::Payment,
            fee: MilliFen(0),
            rate: "0.60%".into(),
            extra: Vec::new(),
        }
    }

    fn order(state: OrderState, total: i64, txid: Option<&str>) -> OrderRow {
        OrderRow {
            id: 1,
            mch_id: MchId::parse("10000100").unwrap(),
            appid: AppId::parse("wxd930ea5d5a258f4f").unwrap(),
            out_trade_no: OutTradeNo::parse("o1").unwrap(),
            total_fee: fen(total),
            state,
            transaction_id: txid.map(str::to_owned),
            paid_at: None,
            created_at: Utc::now(),
            expires_at: None,
            query_count: 0,
            next_query_at: None,
            last_queried_at: None,
            last_error: None,
            gave_up_at: None,
            fee_type: Currency::cny(),
            set_aside_at: None,
            set_aside_reason: None,
        }
    }

    fn kind(c: PaymentCheck) -> Option<FindingKind> {
        match c {
            PaymentCheck::Differs { kind, .. } => Some(kind),
            PaymentCheck::RemoteOnly { .. } => Some(FindingKind::RemoteOnly),
            PaymentCheck::Matches | PaymentCheck::Settle(_) => None,
        }
    }

    #[test]
    fn a_payment_row_against_each_state_of_the_order() {
        let paid = payment("SUCCESS", 100);
        assert_eq!(
            kind(check_payment(&paid, None)),
            Some(FindingKind::RemoteOnly)
        );
        for open in [
            OrderState::NotPay,
            OrderState::UserPaying,
            OrderState::Closed,
        ] {
            match check_payment(&paid, Some(&order(open, 100, None))) {
                PaymentCheck::Settle(r) => {
                    assert_eq!(r.trade_state, TradeState::Success);
                    assert_eq!(
                        r.amount,
                        Some(fen(100)),
                        "the order's amount, not settlement"
                    );
                    assert_eq!(r.transaction_id.unwrap().as_str(), "4200000001");
                }
                other => panic!("{open}: {other:?}"),
            }
        }
        let success = order(OrderState::Success, 100, Some("4200000001"));
        assert_eq!(check_payment(&paid, Some(&success)), PaymentCheck::Matches);
        let refunded = order(OrderState::Refund, 100, None);
        assert_eq!(check_payment(&paid, Some(&refunded)), PaymentCheck::Matches);
        let other_amount = order(OrderState::Success, 101, None);
        assert_eq!(
            kind(check_payment(&paid, Some(&other_amount))),
            Some(FindingKind::AmountDiff)
        );
        let other_tx = order(OrderState::Success, 100, Some("4200000002"));
        assert_eq!(
            kind(check_payment(&paid, Some(&other_tx))),
            Some(FindingKind::StateDiff)
        );
        let quarantined = order(OrderState::AmountMismatch, 100, None);
        assert_eq!(
            kind(check_payment(&paid, Some(&quarantined))),
            Some(FindingKind::AmountDiff)
        );
        let mut usd = paid.clone();
        usd.currency = "USD".into();
        assert_eq!(
            kind(check_payment(&usd, Some(&success))),
            Some(FindingKind::AmountDiff)
        );
        // A row of a revoked payment: nothing to settle, but a paid order disagrees.
        let revoked = payment("REVOKED", 100);
        assert_eq!(
            check_payment(&revoked, Some(&order(OrderState::NotPay, 100, None))),
            PaymentCheck::Matches
        );
        assert_eq!(
            kind(check_payment(&revoked, Some(&success))),
            Some(FindingKind::StateDiff)
        );
        // A row whose number this program cannot use is never settled.
        let mut bad = paid.clone();
        bad.transaction_id = "not a transaction id".into();
        assert_eq!(
            kind(check_payment(
                &bad,
                Some(&order(OrderState::NotPay, 100, None))
            )),
            Some(FindingKind::StateDiff)
        );
    }

    #[test]
    fn finding_keys_are_cut_to_their_columns() {
        let long = "x".repeat(70) + "é";
        assert_eq!(key(&long).chars().count(), 64);
        assert_eq!(key("short"), "short");
        assert_eq!(key(&"é".repeat(65)).chars().count(), 64);
    }
}

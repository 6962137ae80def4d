//! Domain values, parsed once at the edge ("parse, don't validate").
//!
//! A value of one of these types is valid by construction: code that holds a [`Fen`] never has to
//! ask whether it is negative, code that holds an [`OutTradeNo`] never has to ask whether WeChat
//! would accept it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::text::quote;

/// Why a value could not be parsed. Says what was expected, never echoes secrets (none of these
/// types hold one), and quotes the input bounded and escaped ([`quote`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: {reason}")]
pub struct ParseError {
    pub what: &'static str,
    pub reason: String,
}

impl ParseError {
    pub fn new(what: &'static str, reason: impl Into<String>) -> Self {
        Self {
            what,
            reason: reason.into(),
        }
    }
}

/// An amount of money in fen (1/100 yuan), WeChat's only unit. Never negative, never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fen(i64);

impl Fen {
    pub const ZERO: Fen = Fen(0);

    /// A non-negative amount.
    pub fn new(fen: i64) -> Result<Self, ParseError> {
        if fen < 0 {
            return Err(ParseError::new("amount", format!("{fen} is negative")));
        }
        Ok(Fen(fen))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl FromStr for Fen {
    type Err = ParseError;

    /// WeChat's decimal form: ASCII digits only (no sign, no decimal point, no spaces).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 18 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::new(
                "amount",
                format!("{} is not a whole number of fen", quote(s)),
            ));
        }
        // At most 18 digits always fits an i64.
        s.parse::<i64>()
            .map(Fen)
            .map_err(|e| ParseError::new("amount", e.to_string()))
    }
}

impl fmt::Display for Fen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Text identifiers, one a line: `Name("field", max length, which bytes are allowed);`.
macro_rules! text_id {
    ($($(#[$doc:meta])* $name:ident($what:literal, $max:expr, $ok:expr);)+) => {
        $(text_id!(@one $(#[$doc])* $name, $what, $max, $ok);)+
    };
    (@one $(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl TryFrom<String> for $name {
            type Error = ParseError;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(&s)
            }
        }

        impl $name {
            pub fn parse(s: &str) -> Result<Self, ParseError> {
                let ok: fn(u8) -> bool = $ok;
                if s.is_empty() || s.len() > $max {
                    return Err(ParseError::new(
                        $what,
                        format!("{} must be 1 to {} characters", quote(s), $max),
                    ));
                }
                if let Some(bad) = s.bytes().find(|b| !ok(*b)) {
                    return Err(ParseError::new(
                        $what,
                        format!("{} contains the character {:?}", quote(s), bad as char),
                    ));
                }
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

text_id! {
    /// A merchant number (`mch_id`, `sub_mch_id`): up to 32 ASCII letters and digits.
    MchId("mch_id", 32, |b| b.is_ascii_alphanumeric());
    /// An official account / mini program id (`appid`): up to 32 ASCII letters and digits.
    AppId("appid", 32, |b| b.is_ascii_alphanumeric());
    /// The merchant's order number: up to 32 characters of `0-9 A-Z a-z _ - | * @`, WeChat's rule.
    OutTradeNo("out_trade_no", 32, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'|' | b'*' | b'@')
    });
    /// WeChat's payment number (`transaction_id`): up to 32 ASCII letters and digits.
    TransactionId("transaction_id", 32, |b| b.is_ascii_alphanumeric());
    /// A currency (`fee_type`): ISO 4217 letters as WeChat writes them (`CNY`, `USD`, …).
    Currency("fee_type", 16, |b| b.is_ascii_uppercase());
    /// The merchant's refund number: up to 64 characters of `0-9 A-Z a-z _ - | * @`, WeChat's rule.
    OutRefundNo("out_refund_no", 64, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'|' | b'*' | b'@')
    });
    /// WeChat's refund number (`refund_id`): up to 32 ASCII letters and digits.
    RefundId("refund_id", 32, |b| b.is_ascii_alphanumeric());
}

impl Currency {
    /// China's yuan, the currency of an order that names none.
    pub fn cny() -> Currency {
        Currency("CNY".to_owned())
    }
}

/// What WeChat says about an order (`trade_state` of an orderquery reply).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TradeState {
    /// Paid.
    Success,
    /// Paid, then (partly) refunded.
    Refund,
    /// Not paid (yet).
    NotPay,
    /// Closed: can no longer be paid.
    Closed,
    /// Cancelled (micropay).
    Revoked,
    /// The customer is entering their password (micropay).
    UserPaying,
    /// Payment failed at the bank.
    PayError,
    /// Accepted, awaiting the bank (some payment methods).
    Accept,
    /// A value this version does not know. Kept, never a panic, and never treated as paid.
    Unknown(String),
}

impl TradeState {
    pub fn parse(s: &str) -> TradeState {
        match s {
            "SUCCESS" => TradeState::Success,
            "REFUND" => TradeState::Refund,
            "NOTPAY" => TradeState::NotPay,
            "CLOSED" => TradeState::Closed,
            "REVOKED" => TradeState::Revoked,
            "USERPAYING" => TradeState::UserPaying,
            "PAYERROR" => TradeState::PayError,
            "ACCEPT" => TradeState::Accept,
            other => TradeState::Unknown(other.to_owned()),
        }
    }

    /// WeChat's name of the state; an unknown one as WeChat sent it.
    pub fn as_str(&self) -> &str {
        match self {
            TradeState::Unknown(s) => s,
            known => known.label(),
        }
    }

    /// A bounded label for metrics: a known state by its name, unknown values all as
    /// `"unknown"`.
    pub fn label(&self) -> &'static str {
        match self {
            TradeState::Success => "SUCCESS",
            TradeState::Refund => "REFUND",
            TradeState::NotPay => "NOTPAY",
            TradeState::Closed => "CLOSED",
            TradeState::Revoked => "REVOKED",
            TradeState::UserPaying => "USERPAYING",
            TradeState::PayError => "PAYERROR",
            TradeState::Accept => "ACCEPT",
            TradeState::Unknown(_) => "unknown",
        }
    }
}

impl fmt::Display for TradeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What WeChat says about a refund (v2 `refund_status_$n`, v3 `status` / `refund_status`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RefundStatus {
    /// The money went back.
    Success,
    /// The refund was closed without paying out (v2 `REFUNDCLOSE`).
    Closed,
    /// Still on its way (v2 `PROCESSING`).
    Processing,
    /// The refund could not reach the payer's card or account: a person must act (v2 `CHANGE`).
    Abnormal,
    /// A value this version does not know: in flight, counted, never a result.
    Unknown(String),
}

impl RefundStatus {
    /// v2's words (`SUCCESS`, `REFUNDCLOSE`, `PROCESSING`, `CHANGE`).
    pub fn parse_v2(s: &str) -> RefundStatus {
        match s {
            "SUCCESS" => RefundStatus::Success,
            "REFUNDCLOSE" => RefundStatus::Closed,
            "PROCESSING" => RefundStatus::Processing,
            "CHANGE" => RefundStatus::Abnormal,
            other => RefundStatus::Unknown(other.to_owned()),
        }
    }

    /// v3's words (`SUCCESS`, `CLOSED`, `PROCESSING`, `ABNORMAL`).
    pub fn parse_v3(s: &str) -> RefundStatus {
        match s {
            "SUCCESS" => RefundStatus::Success,
            "CLOSED" => RefundStatus::Closed,
            "PROCESSING" => RefundStatus::Processing,
            "ABNORMAL" => RefundStatus::Abnormal,
            other => RefundStatus::Unknown(other.to_owned()),
        }
    }

    /// A bounded label for metrics and logs: unknown values all as `"unknown"`.
    pub fn label(&self) -> &'static str {
        match self {
            RefundStatus::Success => "SUCCESS",
            RefundStatus::Closed => "CLOSED",
            RefundStatus::Processing => "PROCESSING",
            RefundStatus::Abnormal => "ABNORMAL",
            RefundStatus::Unknown(_) => "unknown",
        }
    }
}

/// A refund's state in `wxpay_refunds.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefundState {
    /// Registered by the merchant, not final at WeChat: polled.
    Processing,
    Success,
    Closed,
    /// WeChat could not pay it out (v2 `CHANGE`): a person must act.
    Abnormal,
    /// WeChat never received it (after the grace): the merchant may retry with the same
    /// `out_refund_no`.
    NotFound,
    /// WeChat's refund disagrees with the row (amount, order, or the order's total): set aside.
    AmountMismatch,
}

impl RefundState {
    pub const ALL: [RefundState; 6] = [
        RefundState::Processing,
        RefundState::Success,
        RefundState::Closed,
        RefundState::Abnormal,
        RefundState::NotFound,
        RefundState::AmountMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefundState::Processing => "PROCESSING",
            RefundState::Success => "SUCCESS",
            RefundState::Closed => "CLOSED",
            RefundState::Abnormal => "ABNORMAL",
            RefundState::NotFound => "NOT_FOUND",
            RefundState::AmountMismatch => "AMOUNT_MISMATCH",
        }
    }

    /// The state the daemon polls.
    pub fn is_open(self) -> bool {
        self == RefundState::Processing
    }
}

impl FromStr for RefundState {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RefundState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                ParseError::new("refund state", format!("{} is not a known state", quote(s)))
            })
    }
}

impl fmt::Display for RefundState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An order's state in `wxpay_orders.state`: WeChat's trade states plus the local
/// `AMOUNT_MISMATCH` quarantine. Never a free string inside the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OrderState {
    NotPay,
    UserPaying,
    Success,
    Refund,
    Closed,
    Revoked,
    PayError,
    AmountMismatch,
}

impl OrderState {
    /// The states the daemon polls.
    pub const OPEN: [OrderState; 2] = [OrderState::NotPay, OrderState::UserPaying];
    pub const ALL: [OrderState; 8] = [
        OrderState::NotPay,
        OrderState::UserPaying,
        OrderState::Success,
        OrderState::Refund,
        OrderState::Closed,
        OrderState::Revoked,
        OrderState::PayError,
        OrderState::AmountMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::NotPay => "NOTPAY",
            OrderState::UserPaying => "USERPAYING",
            OrderState::Success => "SUCCESS",
            OrderState::Refund => "REFUND",
            OrderState::Closed => "CLOSED",
            OrderState::Revoked => "REVOKED",
            OrderState::PayError => "PAYERROR",
            OrderState::AmountMismatch => "AMOUNT_MISMATCH",
        }
    }

    pub fn is_open(self) -> bool {
        OrderState::OPEN.contains(&self)
    }
}

impl FromStr for OrderState {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OrderState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                ParseError::new("order state", format!("{} is not a known state", quote(s)))
            })
    }
}

impl fmt::Display for OrderState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

/// An event that records a fact without changing the order's state (`wxpay_order_events.to_state`
/// holds its name; it cannot collide with a state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Anomaly {
    /// A verified payment for an order that is closed locally: the merchant must refund or
    /// fulfil it.
    PaidAfterClose,
}

impl Anomaly {
    pub fn as_str(self) -> &'static str {
        match self {
            Anomaly::PaidAfterClose => "PAID_AFTER_CLOSE",
        }
    }
}

impl Anomaly {
    pub const ALL: [Anomaly; 1] = [Anomaly::PaidAfterClose];
}

/// What an event records (`wxpay_order_events.to_state`): a state the order moved to, or an
/// anomaly that changed no state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventTo {
    State(OrderState),
    Anomaly(Anomaly),
}

impl EventTo {
    pub fn parse(s: &str) -> Result<EventTo, ParseError> {
        if let Some(a) = Anomaly::ALL.iter().find(|a| a.as_str() == s) {
            return Ok(EventTo::Anomaly(*a));
        }
        OrderState::from_str(s).map(EventTo::State)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventTo::State(s) => s.as_str(),
            EventTo::Anomaly(a) => a.as_str(),
        }
    }
}

impl fmt::Display for EventTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who moved an order (`wxpay_order_events.source`, the `source` metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Poll,
    Notify,
    Expire,
    Manual,
    /// The daily bill (its reconciliation settles what WeChat's bill says was paid).
    Bill,
}

impl Source {
    /// Whether a write from this source follows the scan's own query (a poll, or a close at
    /// expiry): only such a write counts in `query_count` and writes a schedule (the next
    /// query, or the end of polling).
    pub fn is_scan(self) -> bool {
        match self {
            Source::Poll | Source::Expire => true,
            Source::Notify | Source::Manual | Source::Bill => false,
        }
    }

    pub const ALL: [Source; 5] = [
        Source::Poll,
        Source::Notify,
        Source::Expire,
        Source::Manual,
        Source::Bill,
    ];

    pub fn parse(s: &str) -> Result<Source, ParseError> {
        Source::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| ParseError::new("source", format!("{} is no source", quote(s))))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Poll => "poll",
            Source::Notify => "notify",
            Source::Expire => "expire",
            Source::Manual => "manual",
            Source::Bill => "bill",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_error_quotes_a_huge_input_short_and_escaped() {
        let huge = format!("\"\n{}", "\"".repeat(40_000));
        let errors = [
            OutTradeNo::parse(&huge).unwrap_err(),
            huge.parse::<Fen>().unwrap_err(),
            huge.parse::<OrderState>().unwrap_err(),
            MchId::parse("1\nERROR forged").unwrap_err(),
        ];
        for e in errors {
            let shown = e.to_string();
            assert!(shown.len() < 300, "{} bytes: {shown}", shown.len());
            assert!(!shown.contains('\n'), "{shown}");
        }
    }

    #[test]
    fn fen_accepts_only_plain_digits() {
        assert_eq!("1".parse::<Fen>().map(Fen::get), Ok(1));
        assert_eq!("000123".parse::<Fen>().map(Fen::get), Ok(123));
        for bad in [
            "",
            "-1",
            "+1",
            "1.00",
            " 1",
            "1 ",
            "1e3",
            "0x10",
            "9999999999999999999",
        ] {
            assert!(bad.parse::<Fen>().is_err(), "{bad:?} must be rejected");
        }
        assert!(Fen::new(-1).is_err());
    }

    #[test]
    fn ids_follow_wechat_rules() {
        assert!(OutTradeNo::parse("1415757673").is_ok());
        assert!(OutTradeNo::parse("a_b-c|d*e@f").is_ok());
        assert!(OutTradeNo::parse("").is_err());
        assert!(OutTradeNo::parse(&"x".repeat(33)).is_err());
        assert!(OutTradeNo::parse("has space").is_err());
        assert!(OutTradeNo::parse("订单").is_err());
        assert!(MchId::parse("1900000109").is_ok());
        assert!(MchId::parse("19-00").is_err());
        assert!(AppId::parse("wxd930ea5d5a258f4f").is_ok());
    }

    #[test]
    fn trade_state_keeps_unknown_values() {
        assert_eq!(TradeState::parse("SUCCESS"), TradeState::Success);
        let unknown = TradeState::parse("SOMETHING_NEW");
        assert_eq!(unknown.as_str(), "SOMETHING_NEW");
        assert_eq!(unknown.label(), "unknown");
    }
}

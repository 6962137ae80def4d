//! API v3's JSON bodies, read strictly: a transaction (an orderquery answer, or the decrypted
//! resource of a `TRANSACTION.SUCCESS` notification), a refund (a refund query's answer), an error body, the certificates list and
//! a notification's envelope. Unknown fields are ignored (WeChat adds fields); a repeated
//! field, a wrong type or a missing required field is refused.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::domain::{
    AppId, Currency, Fen, MchId, OutRefundNo, OutTradeNo, ParseError, RefundId, RefundStatus,
    TradeState, TransactionId,
};
use crate::gateway::report::{RefundReport, TradeReport};

/// The most of a body any v3 answer or notification may have (a certificates list of a few
/// certificates is the largest: about 6 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why a v3 body cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("not the expected JSON: {0}")]
    Json(String),
    #[error("field {field}: {reason}")]
    Field { field: &'static str, reason: String },
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, BodyError> {
    serde_json::from_slice(body).map_err(|e| {
        // serde_json's message names the field and position, never more than a short value.
        BodyError::Json(crate::text::quote_with(&e.to_string(), 160))
    })
}

fn field<T>(field: &'static str, r: Result<T, ParseError>) -> Result<T, BodyError> {
    r.map_err(|e| BodyError::Field {
        field,
        reason: e.to_string(),
    })
}

#[derive(Debug, Deserialize)]
struct RawAmount {
    total: Option<i64>,
    payer_total: Option<i64>,
    currency: Option<String>,
}

/// A transaction as WeChat reports it (orderquery, notification resource).
#[derive(Debug, Deserialize)]
pub struct RawTransaction {
    appid: Option<String>,
    mchid: Option<String>,
    sp_mchid: Option<String>,
    sub_mchid: Option<String>,
    sp_appid: Option<String>,
    sub_appid: Option<String>,
    out_trade_no: String,
    transaction_id: Option<String>,
    trade_state: String,
    trade_state_desc: Option<String>,
    success_time: Option<String>,
    amount: Option<RawAmount>,
}

/// A parsed transaction: the neutral report plus who it names, to check against the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub report: TradeReport,
    /// `mchid` (direct merchants) or `sp_mchid` (service providers).
    pub mch_id: Option<String>,
    /// `sub_mchid`, for service providers.
    pub sub_mch_id: Option<String>,
}

impl Transaction {
    /// Reads a transaction; a paid one (SUCCESS, REFUND) needs its transaction id, amount,
    /// currency and success time.
    pub fn parse(body: &[u8]) -> Result<Transaction, BodyError> {
        let raw: RawTransaction = json(body)?;
        let trade_state = TradeState::parse(&raw.trade_state);
        let paid = matches!(trade_state, TradeState::Success | TradeState::Refund);
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        let amount = raw.amount.as_ref();
        let fen =
            |name: &'static str, v: Option<i64>| v.map(|v| field(name, Fen::new(v))).transpose();
        let currency = nonempty(amount.and_then(|a| a.currency.clone()));
        if paid && currency.is_none() {
            return Err(BodyError::Field {
                field: "amount.currency",
                reason: "missing in a paid order".into(),
            });
        }
        let appid = nonempty(raw.sub_appid.or(raw.appid).or(raw.sp_appid));
        let report = TradeReport {
            out_trade_no: field("out_trade_no", OutTradeNo::parse(&raw.out_trade_no))?,
            state_desc: nonempty(raw.trade_state_desc),
            transaction_id: nonempty(raw.transaction_id)
                .map(|t| field("transaction_id", TransactionId::parse(&t)))
                .transpose()?,
            amount: fen("amount.total", amount.and_then(|a| a.total))?,
            payer_amount: fen("amount.payer_total", amount.and_then(|a| a.payer_total))?,
            currency: match currency {
                Some(c) => field("amount.currency", Currency::parse(&c))?,
                None => Currency::cny(),
            },
            paid_at: nonempty(raw.success_time)
                .map(|t| parse_time("success_time", &t))
                .transpose()?,
            appid: appid
                .map(|a| field("appid", AppId::parse(&a)))
                .transpose()?,
            trade_state,
        };
        if paid {
            for (name, missing) in [
                ("transaction_id", report.transaction_id.is_none()),
                ("amount.total", report.amount.is_none()),
                ("success_time", report.paid_at.is_none()),
            ] {
                if missing {
                    return Err(BodyError::Field {
                        field: name,
                        reason: "missing in a paid order".into(),
                    });
                }
            }
        }
        Ok(Transaction {
            report,
            mch_id: nonempty(raw.sp_mchid.or(raw.mchid)),
            sub_mch_id: nonempty(raw.sub_mchid),
        })
    }

    /// Checks that the transaction is the merchant's: `mchid` (or `sp_mchid` and `sub_mchid`).
    pub fn check_merchant(
        &self,
        mch_id: &MchId,
        sub_mch_id: Option<&MchId>,
    ) -> Result<(), Mismatch> {
        let mismatch = |field: &'static str, got: Option<&str>, want: &str| Mismatch {
            field,
            expected: want.to_owned(),
            got: got.unwrap_or_default().chars().take(64).collect(),
        };
        if self.mch_id.as_deref() != Some(mch_id.as_str()) {
            return Err(mismatch("mchid", self.mch_id.as_deref(), mch_id.as_str()));
        }
        match sub_mch_id {
            Some(sub) if self.sub_mch_id.as_deref() != Some(sub.as_str()) => Err(mismatch(
                "sub_mchid",
                self.sub_mch_id.as_deref(),
                sub.as_str(),
            )),
            None if self.sub_mch_id.is_some() => {
                Err(mismatch("sub_mchid", self.sub_mch_id.as_deref(), ""))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawRefundAmount {
    refund: i64,
    total: Option<i64>,
    currency: Option<String>,
}

/// A refund as `GET /v3/refund/domestic/refunds/{out_refund_no}` answers it.
#[derive(Debug, Deserialize)]
struct RawRefund {
    out_refund_no: String,
    out_trade_no: String,
    refund_id: Option<String>,
    /// `refund_status` in a refund notification's resource.
    #[serde(alias = "refund_status")]
    status: String,
    success_time: Option<String>,
    user_received_account: Option<String>,
    amount: RawRefundAmount,
}

/// The most characters kept of `user_received_account` (WeChat: string[1, 64]).
pub const MAX_RECV_ACCOUNT_CHARS: usize = 64;

/// The most characters kept of a refund status this version does not know.
const MAX_UNKNOWN_STATUS_CHARS: usize = 32;

/// Reads a refund query's answer into the neutral report. `amount.refund` is required; a
/// SUCCESS needs its `refund_id` and `success_time`; an unknown `status` is kept (bounded) as
/// [`RefundStatus::Unknown`]; `amount.currency` defaults to CNY.
pub fn parse_refund(body: &[u8]) -> Result<RefundReport, BodyError> {
    let raw: RawRefund = json(body)?;
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let status = match RefundStatus::parse_v3(&raw.status) {
        RefundStatus::Unknown(u) => {
            RefundStatus::Unknown(u.chars().take(MAX_UNKNOWN_STATUS_CHARS).collect())
        }
        known => known,
    };
    let report = RefundReport {
        out_refund_no: field("out_refund_no", OutRefundNo::parse(&raw.out_refund_no))?,
        out_trade_no: field("out_trade_no", OutTradeNo::parse(&raw.out_trade_no))?,
        refund_id: nonempty(raw.refund_id)
            .map(|r| field("refund_id", RefundId::parse(&r)))
            .transpose()?,
        refund_fee: field("amount.refund", Fen::new(raw.amount.refund))?,
        total_fee: raw
            .amount
            .total
            .map(|t| field("amount.total", Fen::new(t)))
            .transpose()?,
        currency: match nonempty(raw.amount.currency) {
            Some(c) => field("amount.currency", Currency::parse(&c))?,
            None => Currency::cny(),
        },
        success_time: nonempty(raw.success_time)
            .map(|t| parse_time("success_time", &t))
            .transpose()?,
        recv_account: nonempty(raw.user_received_account)
            .map(|a| a.chars().take(MAX_RECV_ACCOUNT_CHARS).collect()),
        status,
    };
    if report.status == RefundStatus::Success {
        for (name, missing) in [
            ("refund_id", report.refund_id.is_none()),
            ("success_time", report.success_time.is_none()),
        ] {
            if missing {
                return Err(BodyError::Field {
                    field: name,
                    reason: "missing in a successful refund".into(),
                });
            }
        }
    }
    Ok(report)
}

/// Who a refund notification's resource names: `mchid`, or `sp_mchid` and `sub_mchid`.
#[derive(Debug, Deserialize)]
struct RawRefundMerchant {
    mchid: Option<String>,
    sp_mchid: Option<String>,
    sub_mchid: Option<String>,
}

/// Reads the decrypted resource of a `REFUND.*` notification (the query's shape, with
/// `refund_status` for `status`) and checks that it is `mch_id`'s (and `sub_mch_id`'s).
pub fn parse_refund_notice(
    body: &[u8],
    mch_id: &MchId,
    sub_mch_id: Option<&MchId>,
) -> Result<Result<RefundReport, Mismatch>, BodyError> {
    let report = parse_refund(body)?;
    let who: RawRefundMerchant = json(body)?;
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let named = Transaction {
        report: TradeReport {
            out_trade_no: report.out_trade_no.clone(),
            trade_state: crate::domain::TradeState::Refund,
            state_desc: None,
            transaction_id: None,
            amount: None,
            currency: Currency::cny(),
            payer_amount: None,
            paid_at: None,
            appid: None,
        },
        mch_id: nonempty(who.sp_mchid.or(who.mchid)),
        sub_mch_id: nonempty(who.sub_mchid),
    };
    Ok(named.check_merchant(mch_id, sub_mch_id).map(|()| report))
}

/// A verified message about another merchant than the one asked about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "field {field} is {}, expected {}",
    crate::text::quote(got),
    crate::text::quote(expected)
)]
pub struct Mismatch {
    pub field: &'static str,
    pub expected: String,
    pub got: String,
}

/// RFC 3339 (`2021-03-22T10:29:05+08:00`) to UTC.
fn parse_time(name: &'static str, s: &str) -> Result<DateTime<Utc>, BodyError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| BodyError::Field {
            field: name,
            reason: format!("{} is not an RFC 3339 time: {e}", crate::text::quote(s)),
        })
}

/// An error body: `{"code":…,"message":…}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

impl ErrorBody {
    /// The error body of a non-2xx answer, when it is one.
    pub fn parse(body: &[u8]) -> Option<ErrorBody> {
        serde_json::from_slice(body).ok()
    }
}

/// What WeChat encrypts with the APIv3 key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Encrypted {
    pub algorithm: String,
    pub nonce: String,
    #[serde(default)]
    pub associated_data: String,
    pub ciphertext: String,
    #[serde(default)]
    pub original_type: Option<String>,
}

/// One entry of `GET /v3/certificates`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CertificateEntry {
    pub serial_no: String,
    pub encrypt_certificate: Encrypted,
}

/// `GET /v3/certificates`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Certificates {
    pub data: Vec<CertificateEntry>,
}

impl Certificates {
    pub fn parse(body: &[u8]) -> Result<Certificates, BodyError> {
        json(body)
    }
}

/// A notification's envelope (its resource still encrypted).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Notification {
    pub id: String,
    pub event_type: String,
    #[serde(default)]
    pub resource_type: Option<String>,
    pub resource: Encrypted,
}

impl Notification {
    pub fn parse(body: &[u8]) -> Result<Notification, BodyError> {
        json(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/wxpay-v3")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn the_skit_refund_query_sample_parses() {
        let r = parse_refund(&fixture("sample_refund_query_success_skit.json")).unwrap();
        assert_eq!(r.out_refund_no.as_str(), "sdk12345678920210326145039");
        assert_eq!(r.out_trade_no.as_str(), "sdk12345678920210326145039");
        assert_eq!(r.status, RefundStatus::Success);
        assert_eq!(
            r.refund_id.unwrap().as_str(),
            "50001307732021032607480019805"
        );
        assert_eq!(
            (r.refund_fee.get(), r.total_fee.map(Fen::get)),
            (1, Some(1))
        );
        assert_eq!(r.currency.as_str(), "CNY");
        assert_eq!(
            r.success_time.unwrap().to_rfc3339(),
            "2021-03-26T06:52:11+00:00"
        );
        assert_eq!(r.recv_account.as_deref(), Some("支付用户零钱"));
    }

    #[test]
    fn the_logged_processing_refund_parses() {
        let r = parse_refund(&fixture("real_refund_create_processing_logged.json")).unwrap();
        assert_eq!(r.status, RefundStatus::Processing);
        assert_eq!(r.out_refund_no.as_str(), "1818571211644825600");
        assert_eq!(
            (r.refund_fee.get(), r.total_fee.map(Fen::get)),
            (10, Some(10))
        );
        assert_eq!(r.success_time, None);
    }

    fn body(status: &str, refund: &str) -> Vec<u8> {
        format!(
            r#"{{"out_refund_no":"r1","out_trade_no":"o1","refund_id":"5000","status":"{status}","success_time":"2021-03-26T14:52:11+08:00","amount":{{"refund":{refund},"total":9007199254740993,"currency":"CNY"}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn statuses_amounts_and_strictness() {
        for (wire, status) in [
            ("CLOSED", RefundStatus::Closed),
            ("ABNORMAL", RefundStatus::Abnormal),
            ("PROCESSING", RefundStatus::Processing),
            ("REFUNDCLOSE", RefundStatus::Unknown("REFUNDCLOSE".into())),
        ] {
            let r = parse_refund(&body(wire, "9007199254740993")).unwrap();
            assert_eq!(r.status, status);
            assert_eq!(r.refund_fee.get(), 9_007_199_254_740_993);
            assert_eq!(r.total_fee.unwrap().get(), 9_007_199_254_740_993);
        }
        for bad in ["1.5", "-1", "\"1\"", "null"] {
            assert!(parse_refund(&body("SUCCESS", bad)).is_err(), "{bad}");
        }
        let twice = br#"{"out_refund_no":"r1","out_refund_no":"r2","out_trade_no":"o1","status":"PROCESSING","amount":{"refund":1}}"#;
        assert!(parse_refund(twice).is_err(), "a repeated field is refused");
        let no_time = br#"{"out_refund_no":"r1","out_trade_no":"o1","refund_id":"5000","status":"SUCCESS","amount":{"refund":1}}"#;
        assert!(parse_refund(no_time).is_err(), "SUCCESS needs its time");
        let long = format!(
            r#"{{"out_refund_no":"r1","out_trade_no":"o1","status":"{}","user_received_account":"{}","amount":{{"refund":1}}}}"#,
            "Z".repeat(3000),
            "卡".repeat(3000)
        );
        let r = parse_refund(long.as_bytes()).unwrap();
        assert!(matches!(&r.status, RefundStatus::Unknown(u) if u.len() <= 32));
        assert_eq!(
            r.recv_account.unwrap().chars().count(),
            MAX_RECV_ACCOUNT_CHARS
        );
        assert_eq!(r.currency, Currency::cny());
    }
}

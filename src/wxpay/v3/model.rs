//! API v3's JSON bodies, read strictly: a transaction (an orderquery answer, or the decrypted
//! resource of a `TRANSACTION.SUCCESS` notification), an error body, the certificates list and
//! a notification's envelope. Unknown fields are ignored (WeChat adds fields); a repeated
//! field, a wrong type or a missing required field is refused.

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::domain::{
    AppId, Currency, Fen, MchId, OutTradeNo, ParseError, TradeState, TransactionId,
};
use crate::gateway::report::TradeReport;

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

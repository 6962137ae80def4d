//! What can go wrong when talking to WeChat Pay. Every variant is *transient* for the order it
//! concerns (a bill request refused for its parameters, [`WxPayError::BillRefused`], is not
//! worth asking again the same way): the answer says nothing reliable about the order, so its state must not change and
//! the caller asks again later. Definitive answers (the order's state, ORDERNOTEXIST, ORDERPAID,
//! ORDERCLOSED) are not errors; they are the `Ok` side of the client's calls.

use super::sign::SignError;
use super::xml::{EncodeError, XmlError};
use crate::gateway::report::{Failure, GatewayError, RetryHint};
use crate::text::quote;

/// A `result_code=FAIL` error code. The ones the daemon acts on are named; the rest are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrCode {
    OrderNotExist,
    SystemError,
    FrequencyLimited,
    OrderPaid,
    OrderClosed,
    /// refundquery: WeChat knows no refund of this number.
    RefundNotExist,
    Other(String),
}

impl ErrCode {
    pub fn parse(s: &str) -> ErrCode {
        match s {
            "ORDERNOTEXIST" => ErrCode::OrderNotExist,
            "SYSTEMERROR" => ErrCode::SystemError,
            "FREQUENCY_LIMITED" => ErrCode::FrequencyLimited,
            "ORDERPAID" => ErrCode::OrderPaid,
            "ORDERCLOSED" => ErrCode::OrderClosed,
            "REFUNDNOTEXIST" => ErrCode::RefundNotExist,
            other => ErrCode::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ErrCode::OrderNotExist => "ORDERNOTEXIST",
            ErrCode::SystemError => "SYSTEMERROR",
            ErrCode::FrequencyLimited => "FREQUENCY_LIMITED",
            ErrCode::OrderPaid => "ORDERPAID",
            ErrCode::OrderClosed => "ORDERCLOSED",
            ErrCode::RefundNotExist => "REFUNDNOTEXIST",
            ErrCode::Other(s) => s,
        }
    }
}

impl std::fmt::Display for ErrCode {
    /// A code WeChat did not document is quoted, bounded and escaped: it is outside input.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrCode::Other(s) => f.write_str(&quote(s)),
            known => f.write_str(known.as_str()),
        }
    }
}

/// Why a reply cannot be used. None of these messages contains a key or a signature, and each
/// quotes what the reply said through [`quote`] (bounded, control characters escaped): an
/// unsigned `return_msg` with a newline cannot forge a log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WxPayError {
    #[error("no reply within the timeout")]
    Timeout,
    #[error("transport error: {0}")]
    Transport(String),
    #[error("HTTP status {0}")]
    HttpStatus(u16),
    #[error("malformed reply: {0}")]
    Malformed(#[from] XmlError),
    #[error("reply field {field}: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error("WeChat refused the request (return_code FAIL): {}", quote(.0))]
    ReturnFail(String),
    #[error("reply rejected: {0}")]
    Sign(#[from] SignError),
    #[error(
        "reply field {field} is {}, the request had {}",
        quote(got),
        quote(expected)
    )]
    Mismatch {
        field: &'static str,
        expected: String,
        got: String,
    },
    #[error("WeChat answered result_code FAIL: {code} ({})", quote(description))]
    ResultFail { code: ErrCode, description: String },
    #[error("request could not be encoded: {0}")]
    Encode(#[from] EncodeError),
    /// The merchant is configured for another API: nothing was sent or trusted.
    #[error("merchant {0} is not configured for API v2")]
    NotV2(String),
    /// `downloadbill` refused for what was asked (`invalid bill_date`, a closed bill API):
    /// asking again the same way cannot succeed.
    #[error("WeChat refused the bill request (return_code FAIL): {}", quote(.0))]
    BillRefused(String),
    /// A bill larger than any the daemon accepts.
    #[error("the bill is larger than {0} bytes")]
    BillTooLarge(u64),
    /// The temporary file a bill is downloaded to.
    #[error("temporary bill file: {0}")]
    TempFile(String),
}

impl WxPayError {
    /// How to retry. Every error is transient for the order; this says how urgently not to.
    pub fn retry_hint(&self) -> RetryHint {
        match self {
            WxPayError::ResultFail {
                code: ErrCode::FrequencyLimited,
                ..
            } => RetryHint::SlowDown,
            _ => RetryHint::Backoff,
        }
    }

    /// The bounded `outcome` label of `orderquery_requests_total` (DESIGN.md metrics contract,
    /// extended with `mismatch` for replies that do not echo the request).
    pub fn outcome(&self) -> &'static str {
        self.failure().as_str()
    }

    /// The neutral class of this error.
    pub fn failure(&self) -> Failure {
        match self {
            WxPayError::Timeout => Failure::Timeout,
            WxPayError::Transport(_) | WxPayError::Encode(_) | WxPayError::TempFile(_) => {
                Failure::TransportError
            }
            WxPayError::HttpStatus(_) => Failure::HttpStatus,
            WxPayError::Malformed(_)
            | WxPayError::BadField { .. }
            | WxPayError::BillTooLarge(_) => Failure::Malformed,
            WxPayError::ReturnFail(_) | WxPayError::BillRefused(_) => Failure::ReturnFail,
            WxPayError::Sign(_) => Failure::SignInvalid,
            WxPayError::Mismatch { .. } | WxPayError::NotV2(_) => Failure::Mismatch,
            WxPayError::ResultFail { .. } => Failure::ResultFail,
        }
    }

    /// Whether the reply proves our configuration (key, sign type, appid, mch_id) is wrong or
    /// someone forges replies: worth an operator's attention, not only a retry.
    pub fn is_suspicious(&self) -> bool {
        self.failure().is_suspicious()
    }
}

impl From<WxPayError> for GatewayError {
    fn from(e: WxPayError) -> GatewayError {
        let g = GatewayError::new(e.failure(), e.to_string()).with_retry(e.retry_hint());
        match e {
            WxPayError::BillRefused(_) => g.permanent(),
            _ => g,
        }
    }
}

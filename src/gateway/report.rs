//! What WeChat says about a payment, in no protocol's words: the verified answers of a query
//! and a close, a trade report (a query's or a payment notification's), a day's bill as
//! downloaded, and why a call gave no answer. Each protocol's client converts its wire results
//! into these; nothing here knows a wire format.

use chrono::{DateTime, Utc};

use crate::domain::{
    AppId, Currency, Fen, OutRefundNo, OutTradeNo, RefundId, RefundStatus, TradeState,
    TransactionId,
};

/// Which order to ask about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderRef {
    OutTradeNo(OutTradeNo),
    TransactionId(TransactionId),
}

/// A verified report about one payment order: a query's answer, or a payment notification
/// (which reports trade state SUCCESS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TradeReport {
    pub out_trade_no: OutTradeNo,
    pub trade_state: TradeState,
    /// WeChat's words for the state, when it gave any.
    pub state_desc: Option<String>,
    pub transaction_id: Option<TransactionId>,
    /// What WeChat says the order's amount is (always present for SUCCESS and REFUND).
    pub amount: Option<Fen>,
    /// The currency of `amount`.
    pub currency: Currency,
    /// What the payer paid (after coupons), when reported.
    pub payer_amount: Option<Fen>,
    /// When the customer paid (always present for SUCCESS and REFUND).
    pub paid_at: Option<DateTime<Utc>>,
    /// The app the payment was made in, when the message says.
    pub appid: Option<AppId>,
}

/// A definitive query answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryAnswer {
    Order(TradeReport),
    /// WeChat never accepted this order.
    NotExist,
}

/// A verified report about one refund: a refund query's answer (the entry of this
/// `out_refund_no`, never one found by position) or a refund notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundReport {
    pub out_refund_no: OutRefundNo,
    /// The order the refund belongs to, as WeChat names it.
    pub out_trade_no: OutTradeNo,
    pub status: RefundStatus,
    pub refund_id: Option<RefundId>,
    /// What WeChat refunds (v2 `refund_fee_$n`, v3 `amount.refund`).
    pub refund_fee: Fen,
    /// The order's amount as WeChat knows it (v2 `total_fee`, v3 `amount.total`).
    pub total_fee: Option<Fen>,
    pub currency: Currency,
    /// When the money went back (SUCCESS only).
    pub success_time: Option<DateTime<Utc>>,
    /// Where the money went (v2 `refund_recv_accout_$n`, v3 `user_received_account`), bounded.
    pub recv_account: Option<String>,
}

/// A definitive refund query answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundAnswer {
    Refund(RefundReport),
    /// WeChat knows no refund of this number (v2 `REFUNDNOTEXIST`, v3 `RESOURCE_NOT_EXISTS`).
    NotExist,
}

/// A definitive close answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseAnswer {
    Closed,
    /// The customer paid: query and settle it, never close it locally.
    OrderPaid,
    /// Already closed.
    OrderClosed,
    /// WeChat never accepted this order.
    NotExist,
}

impl CloseAnswer {
    /// Every answer, in the order of their labels.
    pub const ALL: [CloseAnswer; 4] = [
        CloseAnswer::Closed,
        CloseAnswer::OrderPaid,
        CloseAnswer::OrderClosed,
        CloseAnswer::NotExist,
    ];

    /// The bounded `outcome` label of `closeorder_requests_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseAnswer::Closed => "closed",
            CloseAnswer::OrderPaid => "order_paid",
            CloseAnswer::OrderClosed => "order_closed",
            CloseAnswer::NotExist => "order_not_exist",
        }
    }
}

/// What a platform certificate download found (API v3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateRefresh {
    /// The certificates now held: serial and expiry.
    Updated(Vec<(String, DateTime<Utc>)>),
    /// `RESOURCE_NOT_EXISTS`: the merchant has no platform certificate, only the public key.
    PublicKeyOnly,
}

/// What WeChat answered for one merchant's trade bill of one Beijing day.
#[derive(Debug)]
pub enum BillAnswer {
    /// No bill: nothing traded that day (v2 `No Bill Exist`, v3 `NO_STATEMENT_EXIST`). An
    /// empty bill, not a failure.
    Empty,
    /// Not generated yet (v2 `Bill Creating`, v3 `STATEMENT_CREATING`): ask again in 30
    /// minutes.
    NotReady,
    /// The bill, downloaded to an anonymous temporary file, rewound to 0.
    File(BillFile),
}

/// A downloaded bill: an anonymous temporary file (`tempfile::tempfile()`, gone when dropped),
/// positioned at its start. Its `Debug` shows no content.
pub struct BillFile {
    pub file: std::fs::File,
    /// Whether the bytes are gzip (both APIs are asked for GZIP; told by the magic `1f 8b`, not
    /// by what was asked).
    pub gzip: bool,
    /// v3: WeChat's SHA-1 of the DECOMPRESSED text (BOM included), lower-case hex, for the
    /// caller to check before using a byte of it; v2: `None` (v2 gives no hash).
    pub sha1: Option<String>,
    /// Bytes downloaded (compressed, when `gzip`).
    pub bytes: u64,
}

impl std::fmt::Debug for BillFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BillFile")
            .field("gzip", &self.gzip)
            .field("sha1", &self.sha1)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// What the caller should do before asking again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryHint {
    /// Ask again on the normal backoff schedule.
    Backoff,
    /// WeChat rate-limited us: slow down before anything else.
    SlowDown,
}

/// The reasons a v3 message is not verified ([`GatewayError::reason`] of a
/// [`Failure::Unverified`]; the `reason` label of `unverified_messages_total`).
pub const UNVERIFIED_REASONS: [&str; 7] = [
    "missing_header",
    "signtest_probe",
    "signature_type",
    "bad_timestamp",
    "unknown_serial",
    "bad_signature",
    "stale_timestamp",
];

/// Why a call gave no usable answer, as a bounded class (the `outcome` label of
/// `orderquery_requests_total` and of `closeorder_requests_total`'s failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    Timeout,
    TransportError,
    HttpStatus,
    ReturnFail,
    ResultFail,
    SignInvalid,
    Malformed,
    /// A correctly signed reply that does not echo the request.
    Mismatch,
    /// A v3 answer whose signature could not be checked: a probe, a missing header, an
    /// unknown serial or a stale timestamp (the reason is [`GatewayError::reason`]).
    Unverified,
}

impl Failure {
    /// Every class, in the order of their labels.
    pub const ALL: [Failure; 9] = [
        Failure::Timeout,
        Failure::TransportError,
        Failure::HttpStatus,
        Failure::ReturnFail,
        Failure::ResultFail,
        Failure::SignInvalid,
        Failure::Malformed,
        Failure::Mismatch,
        Failure::Unverified,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::TransportError => "transport_error",
            Failure::HttpStatus => "http_status",
            Failure::ReturnFail => "return_fail",
            Failure::ResultFail => "result_fail",
            Failure::SignInvalid => "sign_invalid",
            Failure::Malformed => "malformed",
            Failure::Mismatch => "mismatch",
            Failure::Unverified => "unverified",
        }
    }

    /// Whether a failure of this class proves our configuration (key, sign type, appid,
    /// mch_id) wrong or someone forges replies.
    pub fn is_suspicious(self) -> bool {
        matches!(
            self,
            Failure::SignInvalid | Failure::Mismatch | Failure::ReturnFail
        )
    }
}

/// A call that gave no usable answer. Says nothing reliable about the order, so the order's
/// state never changes on it. The message is the protocol's own (already bounded and quoted:
/// it holds no key and no raw outside text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GatewayError {
    failure: Failure,
    retry: RetryHint,
    /// A bounded detail label of the failure (why a v3 answer was not verified).
    reason: Option<&'static str>,
    /// Asking again the same way cannot succeed (a bill request WeChat refused for its
    /// parameters: `invalid bill_date`, a closed bill API).
    permanent: bool,
    message: String,
}

impl GatewayError {
    /// A failure to retry on the normal schedule.
    pub fn new(failure: Failure, message: impl Into<String>) -> GatewayError {
        GatewayError {
            failure,
            retry: RetryHint::Backoff,
            reason: None,
            permanent: false,
            message: message.into(),
        }
    }

    /// The same failure, which asking again the same way cannot cure ([`Self::is_transient`]
    /// is then false).
    pub fn permanent(self) -> GatewayError {
        GatewayError {
            permanent: true,
            ..self
        }
    }

    /// The same failure, with the given retry hint.
    pub fn with_retry(self, retry: RetryHint) -> GatewayError {
        GatewayError { retry, ..self }
    }

    /// The same failure, with a bounded detail label.
    pub fn with_reason(self, reason: &'static str) -> GatewayError {
        GatewayError {
            reason: Some(reason),
            ..self
        }
    }

    pub fn failure(&self) -> Failure {
        self.failure
    }

    /// The bounded detail label, when the failure has one.
    pub fn reason(&self) -> Option<&'static str> {
        self.reason
    }

    /// The bounded `outcome` label.
    pub fn outcome(&self) -> &'static str {
        self.failure.as_str()
    }

    pub fn retry_hint(&self) -> RetryHint {
        self.retry
    }

    /// Whether asking again later may succeed. Every class is (the order is asked again on its
    /// schedule; a new class must say so here), but for an error made [`Self::permanent`]: a
    /// bill request WeChat refused for what it asked.
    pub fn is_transient(&self) -> bool {
        if self.permanent {
            return false;
        }
        match self.failure {
            Failure::Timeout
            | Failure::TransportError
            | Failure::HttpStatus
            | Failure::ReturnFail
            | Failure::ResultFail
            | Failure::SignInvalid
            | Failure::Malformed
            | Failure::Mismatch
            | Failure::Unverified => true,
        }
    }

    /// Whether the reply proves our configuration (key, sign type, appid, mch_id) wrong or
    /// someone forges replies: worth an operator's attention, not only a retry.
    pub fn is_suspicious(&self) -> bool {
        self.failure.is_suspicious()
    }
}

//! WeChat Pay's daily trade bill (对账单): its rows as typed values, read as a stream.
//!
//! The same text for v2 (`downloadbill`) and v3 (`tradebill`): a header line, data lines whose
//! every field starts with a backtick, a summary title and a summary line. Columns are mapped by
//! their header name, never by position ([`parse`]). Nothing here does IO but reading the
//! given reader ([`source`]: gzip sniffed and decoded as it is read, the SHA-1 WeChat v3 gives),
//! and nothing here knows the database.

pub mod parse;
pub mod source;

use std::fmt;

use chrono::{DateTime, Utc};

use crate::domain::Fen;

pub use parse::{BillReader, MAX_COLUMNS, MAX_LINE_BYTES, MAX_TEXT_CHARS, SummaryCheck};
pub use source::{open_text, sha1_hex_of};

/// A fee, exact: thousandths of a fen (the bill writes fees in yuan with 5 decimals:
/// `0.27000` yuan = 27_000 milli-fen). May be negative (a refund returns its fee).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MilliFen(pub i64);

impl MilliFen {
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for MilliFen {
    /// In yuan with 5 decimals, as the bill writes it (`-0.27000`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:05}", abs / 100_000, abs % 100_000)
    }
}

/// Which bill: `ALL`, `SUCCESS` (payments only) or `REFUND` (refunds only). Told by the header:
/// a REFUND bill has 退款申请时间 / 退款成功时间, a SUCCESS bill has no refund columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillType {
    All,
    Success,
    Refund,
}

/// The header family: today's (应结订单金额, 订单金额, 代金券金额, 充值券退款金额, 申请退款金额,
/// 费率备注, 特约商户号: 27/20/29 columns) or the older one (总金额, 企业红包金额 or
/// 代金券或立减优惠金额, 子商户号: 24/18/26 columns). Told by 应结订单金额 (current) or 总金额 (old).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Current,
    Old,
}

/// What a data line is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowKind {
    /// A payment (交易状态 SUCCESS, or REVOKED for a revoked MICROPAY, or anything but REFUND;
    /// every line of a SUCCESS bill). Its refund columns (`0` ids, `0.00` amounts) are ignored.
    Payment,
    /// A refund (交易状态 REFUND in an ALL or REFUND bill), with its own columns.
    Refund(BillRefund),
}

/// The refund columns of a refund line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillRefund {
    /// 微信退款单号.
    pub refund_id: String,
    /// 商户退款单号.
    pub out_refund_no: String,
    /// What the merchant asked to refund: 申请退款金额 (current), 退款金额 (old).
    pub refund_fee: Fen,
    /// What was refunded after coupons: 退款金额 (current and old).
    pub settlement_refund_fee: Fen,
    /// 退款状态 as written (SUCCESS, PROCESSING, FAIL, CHANGE, …), bounded.
    pub status: String,
    /// 退款申请时间 (REFUND bills only; `None` elsewhere or when empty), UTC.
    pub applied_at: Option<DateTime<Utc>>,
    /// 退款成功时间 (REFUND bills only; `None` elsewhere or when empty), UTC.
    pub succeeded_at: Option<DateTime<Utc>>,
}

/// One data line, typed. Texts are as written (backtick removed), bounded to 256 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillRow {
    /// The line number in the file (1 = the header).
    pub line: u64,
    /// 交易时间, Beijing time (UTC+8) converted to UTC. For a refund line it is not the
    /// payment's time: in an ALL bill it is the refund's time (its success time in the apo-soft
    /// fixtures); in a REFUND bill the fixtures disagree (the original payment's time, or
    /// 退款申请时间). Place a refund by its own columns, never by this.
    pub trade_time: DateTime<Utc>,
    pub appid: String,
    /// 商户号.
    pub mch_id: String,
    /// 特约商户号 / 子商户号, `None` when empty or `0`.
    pub sub_mch_id: Option<String>,
    /// 微信订单号.
    pub transaction_id: String,
    /// 商户订单号.
    pub out_trade_no: String,
    /// 交易类型 (JSAPI, NATIVE, …).
    pub trade_type: String,
    /// 交易状态 as written (SUCCESS, REFUND, REVOKED, …).
    pub trade_state: String,
    /// 货币种类 (CNY).
    pub currency: String,
    /// The order's amount: 订单金额 (current), 总金额 (old), as written (WeChat writes `0.00`
    /// on a refund line).
    pub total_fee: Fen,
    /// What WeChat settles: 应结订单金额 (current: 订单金额 less the non-recharge coupons
    /// 免充值券), 总金额 (old), as written (`0.00` on a refund line).
    pub settlement_total_fee: Fen,
    pub kind: RowKind,
    /// 手续费, exact; negative on a refund line that returns a fee.
    pub fee: MilliFen,
    /// 费率 as written (`0.60%`).
    pub rate: String,
    /// Columns this parser does not know, by header name, as written (both bounded). Known
    /// columns not typed here (设备号, 用户标识, 付款银行, 代金券金额, 退款类型, 商品名称,
    /// 商户数据包, 费率备注, the coupon refund amount) are dropped.
    pub extra: Vec<(String, String)>,
}

/// The summary line, as WeChat wrote it, mapped by its title line's names (current: 7 values,
/// old: 5). Each value is what [`crate::bill::BillReader::check`] recomputes from the rows
/// (every row's value as typed; a payment line adds nothing to the refund totals). Old-format
/// bills lack `total_fee` and `refund_fee`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// 总交易单数: every data line, refunds included (`45.0` is read as 45).
    pub rows: u64,
    /// 应结订单总金额 (current) / 总交易额 (old): the sum of every line's
    /// `settlement_total_fee` (refund lines write 0, so: the payments' settled amount, before
    /// refunds).
    pub settlement_total_fee: Fen,
    /// 退款总金额 (current) / 总退款金额 (old): the sum of the refund lines'
    /// `settlement_refund_fee` (退款金额). 0 when a SUCCESS bill's summary omits it.
    pub settlement_refund_fee: Fen,
    /// 充值券退款总金额 (current) / 总企业红包退款金额 or 总代金券或立减优惠退款金额 (old): the
    /// sum of the refund lines' coupon refund column (充值券退款金额 / 企业红包退款金额 /
    /// 代金券或立减优惠退款金额; not in [`BillRefund`]). `None` when the summary omits it.
    pub coupon_refund_fee: Option<Fen>,
    /// 手续费总金额: the sum of `fee` over every line, refunds' negative fees included (the
    /// summary may write fewer decimals, `0.08`).
    pub fee: MilliFen,
    /// 订单总金额: the sum of every line's `total_fee` (current format only).
    pub total_fee: Option<Fen>,
    /// 申请退款总金额: the sum of the refund lines' `refund_fee` (current format only).
    pub refund_fee: Option<Fen>,
    /// Summary values this parser does not know, by title, as written (bounded); not checked.
    pub extra: Vec<(String, String)>,
}

/// Why a bill text could not be read. Every variant names the line; outside text is quoted
/// through `text::quote`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillError {
    #[error("line {line}: {reason}")]
    Format { line: u64, reason: String },
    #[error("reading the bill: {0}")]
    Io(String),
}

impl BillError {
    /// Whether reading again may help: an IO error (a cut download, a corrupt gzip stream) may
    /// be fetched again; a text that is not a bill stays one.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BillError::Io(_))
    }

    pub fn line(&self) -> Option<u64> {
        match self {
            BillError::Format { line, .. } => Some(*line),
            BillError::Io(_) => None,
        }
    }
}

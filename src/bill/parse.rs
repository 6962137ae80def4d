//! The bill text as a stream of [`BillRow`]s.
//!
//! The format, as the fixtures of `../shared/fixtures/wxpay-bills` show it:
//! - line 1, the header: column names separated by `,` (a UTF-8 BOM before it or not);
//! - data lines: every field starts with a backtick, fields are separated by `` ,` ``, so a
//!   line is `` `v1,`v2,…,`vn `` (a current-format line ends in `` ,` ``: an empty 费率备注);
//! - the summary title (names, no backticks, `总交易单数` first) and its values line
//!   (backticked), then nothing.
//!
//! Lines end in LF or CRLF, the last one may have no end. Columns are found by their header
//! name, never by position, in both header families ([`Family`]). Amounts are yuan with at most
//! 2 decimals read into exact [`Fen`], fees are signed yuan with at most 5 decimals read into
//! exact [`MilliFen`]: integer arithmetic only. Times are Beijing time (UTC+8, no daylight
//! saving time) read into UTC.
//!
//! Bounded on hostile input: a line longer than [`MAX_LINE_BYTES`] is an error (lines are read
//! into one reused buffer, never further than that), a header of more than [`MAX_COLUMNS`]
//! columns is one, every text kept is cut to [`MAX_TEXT_CHARS`] characters. Memory per row is
//! constant: nothing is collected, the reader keeps only running totals for
//! [`BillReader::check`].

use std::io::{BufRead, ErrorKind};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};

use super::{BillError, BillRefund, BillRow, BillType, Family, MilliFen, RowKind, Summary};
use crate::domain::Fen;
use crate::text::quote;
use crate::wxpay::time::china_standard_time;

/// The longest line read (bytes, its end included); a longer one is an error naming it.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Every text kept from a bill (a [`BillRow`]'s strings, `extra` names and values) is cut to
/// this many characters, on a character boundary.
pub const MAX_TEXT_CHARS: usize = 256;

/// The most columns a header (or a summary title) may name. WeChat's have 18 to 29.
pub const MAX_COLUMNS: usize = 128;

/// The summary title's first name.
const SUMMARY_TITLE: &str = "总交易单数";

/// Every column name this parser knows, in both families: the others are kept in `extra`.
const KNOWN_COLUMNS: &[&str] = &[
    "交易时间",
    "公众账号ID",
    "商户号",
    "特约商户号",
    "子商户号",
    "设备号",
    "微信订单号",
    "商户订单号",
    "用户标识",
    "交易类型",
    "交易状态",
    "付款银行",
    "货币种类",
    "应结订单金额",
    "代金券金额",
    "总金额",
    "企业红包金额",
    "代金券或立减优惠金额",
    "退款申请时间",
    "退款成功时间",
    "微信退款单号",
    "商户退款单号",
    "退款金额",
    "充值券退款金额",
    "企业红包退款金额",
    "代金券或立减优惠退款金额",
    "退款类型",
    "退款状态",
    "商品名称",
    "商户数据包",
    "手续费",
    "费率",
    "订单金额",
    "申请退款金额",
    "费率备注",
];

/// Names only a fund-flow bill (资金账单) has.
const FUND_FLOW_COLUMNS: &[&str] = &["记账时间", "资金流水单号", "收支类型", "业务凭证号"];

/// Reads a bill line by line: [`BillReader::new`] reads the header, [`BillReader::next_row`]
/// each data line, and after the last row [`BillReader::summary`] / [`BillReader::check`]
/// tell the summary and whether the rows add up to it.
///
/// The first summary ends the data: a non-empty line after its values line is an error.
/// After an error, [`BillReader::next_row`] returns the same error again.
pub struct BillReader<R> {
    reader: R,
    /// The number of the last line read (1 = the header).
    line: u64,
    /// The current line's bytes, reused.
    buf: Vec<u8>,
    /// The current line's fields as byte ranges of `buf`, reused.
    fields: Vec<(usize, usize)>,
    columns: Columns,
    bill_type: BillType,
    family: Family,
    state: State,
    summary: Option<(Summary, SummaryTitles)>,
    totals: Totals,
}

/// The summary against the rows read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SummaryCheck {
    /// Every summary value equals the value recomputed from the rows.
    AddsUp,
    /// These summary values differ from the rows (e.g. `总交易单数 says 48, the rows are 1`).
    Differs(Vec<String>),
    /// The file ended without a summary (or the rows are not all read yet).
    Missing,
}

enum State {
    Rows,
    Done,
    Failed(BillError),
}

/// Running sums of the rows read, exact (i128: no input can overflow them).
#[derive(Default)]
struct Totals {
    rows: u64,
    settlement_total_fee: i128,
    total_fee: i128,
    settlement_refund_fee: i128,
    refund_fee: i128,
    coupon_refund_fee: i128,
    fee: i128,
}

/// The titles the summary values were found under, for [`BillReader::check`]'s words.
struct SummaryTitles {
    settlement_total_fee: &'static str,
    settlement_refund_fee: Option<&'static str>,
    coupon_refund_fee: Option<&'static str>,
}

/// A column of the header: where it is and what it is called.
#[derive(Debug, Clone, Copy)]
struct Col {
    idx: usize,
    name: &'static str,
}

/// The header, mapped.
struct Columns {
    count: usize,
    trade_time: Col,
    appid: Col,
    mch_id: Col,
    sub_mch_id: Option<Col>,
    transaction_id: Col,
    out_trade_no: Col,
    trade_type: Col,
    trade_state: Col,
    currency: Col,
    total_fee: Col,
    settlement_total_fee: Col,
    fee: Col,
    rate: Col,
    /// ALL and REFUND bills only.
    refund: Option<RefundCols>,
    /// Unknown columns: where, and the header's name (bounded).
    extra: Vec<(usize, String)>,
}

struct RefundCols {
    refund_id: Col,
    out_refund_no: Col,
    refund_fee: Col,
    settlement_refund_fee: Col,
    coupon_refund_fee: Option<Col>,
    status: Col,
    /// REFUND bills only.
    applied_at: Option<Col>,
    succeeded_at: Option<Col>,
}

impl<R: BufRead> BillReader<R> {
    /// Reads the header line and maps its columns; refuses what is not a trade bill (a
    /// fund-flow bill, a TAB-separated file, an XML or JSON reply) or lacks a needed column.
    pub fn new(reader: R) -> Result<Self, BillError> {
        let mut me = BillReader {
            reader,
            line: 0,
            buf: Vec::with_capacity(1024),
            fields: Vec::with_capacity(32),
            columns: Columns::placeholder(),
            bill_type: BillType::All,
            family: Family::Current,
            state: State::Rows,
            summary: None,
            totals: Totals::default(),
        };
        if !me.read_line()? {
            return Err(format_error(1, "the text is empty: no header line".into()));
        }
        let text = utf8(&me.buf, me.line)?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let (columns, family, bill_type) =
            Columns::from_header(text).map_err(|reason| format_error(1, reason))?;
        me.columns = columns;
        me.family = family;
        me.bill_type = bill_type;
        Ok(me)
    }

    pub fn bill_type(&self) -> BillType {
        self.bill_type
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The data lines read so far.
    pub fn rows_read(&self) -> u64 {
        self.totals.rows
    }

    /// The next data line; `None` after the last (the summary is then read, and nothing may
    /// follow it but empty lines).
    pub fn next_row(&mut self) -> Result<Option<BillRow>, BillError> {
        match &self.state {
            State::Rows => {}
            State::Done => return Ok(None),
            State::Failed(e) => return Err(e.clone()),
        }
        match self.step() {
            Ok(row) => {
                if row.is_none() {
                    self.state = State::Done;
                }
                Ok(row)
            }
            Err(e) => {
                self.state = State::Failed(e.clone());
                Err(e)
            }
        }
    }

    /// The summary, once [`Self::next_row`] returned `None`.
    pub fn summary(&self) -> Option<&Summary> {
        self.summary.as_ref().map(|(s, _)| s)
    }

    /// The summary against the rows, once [`Self::next_row`] returned `None`: every value
    /// recomputed from the rows exactly, each difference in words.
    pub fn check(&self) -> SummaryCheck {
        let Some((summary, titles)) = &self.summary else {
            return SummaryCheck::Missing;
        };
        let t = &self.totals;
        let mut diffs = Vec::new();
        if summary.rows != t.rows {
            diffs.push(format!(
                "{SUMMARY_TITLE} says {}, the rows are {}",
                summary.rows, t.rows
            ));
        }
        let mut money = |title: &str, said: i64, rows: i128| {
            if i128::from(said) != rows {
                diffs.push(format!(
                    "{title} says {}, the rows add up to {}",
                    yuan_text(i128::from(said)),
                    yuan_text(rows)
                ));
            }
        };
        money(
            titles.settlement_total_fee,
            summary.settlement_total_fee.get(),
            t.settlement_total_fee,
        );
        money(
            titles.settlement_refund_fee.unwrap_or("退款总金额"),
            summary.settlement_refund_fee.get(),
            t.settlement_refund_fee,
        );
        if let (Some(said), Some(title)) = (summary.coupon_refund_fee, titles.coupon_refund_fee) {
            money(title, said.get(), t.coupon_refund_fee);
        }
        if let Some(said) = summary.total_fee {
            money("订单总金额", said.get(), t.total_fee);
        }
        if let Some(said) = summary.refund_fee {
            money("申请退款总金额", said.get(), t.refund_fee);
        }
        if i128::from(summary.fee.get()) != t.fee {
            diffs.push(format!(
                "手续费总金额 says {}, the rows add up to {}",
                summary.fee,
                fee_text(t.fee)
            ));
        }
        if diffs.is_empty() {
            SummaryCheck::AddsUp
        } else {
            SummaryCheck::Differs(diffs)
        }
    }

    /// One data line, or the summary and the end.
    fn step(&mut self) -> Result<Option<BillRow>, BillError> {
        if !self.read_line()? {
            return Ok(None);
        }
        let line = self.line;
        let text = utf8(&self.buf, line)?;
        if text.is_empty() {
            return Err(format_error(
                line,
                "an empty line among the rows (a bill has none before its summary)".into(),
            ));
        }
        if is_summary_title(text) {
            let titles = split_names(text).map_err(|r| format_error(line, r))?;
            let summary = self.read_summary(titles)?;
            self.expect_end()?;
            // Only a bill read to its end has a summary to check.
            self.summary = Some(summary);
            return Ok(None);
        }
        if !split_fields(text, &mut self.fields) {
            return Err(format_error(line, not_backticked(text)));
        }
        if self.fields.len() != self.columns.count {
            return Err(format_error(
                line,
                format!(
                    "{} fields, the header has {} columns",
                    self.fields.len(),
                    self.columns.count
                ),
            ));
        }
        let (row, coupon_refund) = parse_row(text, &self.fields, &self.columns, line)
            .map_err(|r| format_error(line, r))?;
        let t = &mut self.totals;
        t.rows += 1;
        t.settlement_total_fee += i128::from(row.settlement_total_fee.get());
        t.total_fee += i128::from(row.total_fee.get());
        t.fee += i128::from(row.fee.get());
        if let RowKind::Refund(r) = &row.kind {
            t.settlement_refund_fee += i128::from(r.settlement_refund_fee.get());
            t.refund_fee += i128::from(r.refund_fee.get());
            t.coupon_refund_fee += i128::from(coupon_refund.get());
        }
        Ok(Some(row))
    }

    /// The summary's values line, mapped by the title's names.
    fn read_summary(&mut self, titles: Vec<String>) -> Result<(Summary, SummaryTitles), BillError> {
        let title_line = self.line;
        if !self.read_line()? {
            return Err(format_error(
                title_line,
                "the summary title has no values line after it".into(),
            ));
        }
        let line = self.line;
        let text = utf8(&self.buf, line)?;
        if !split_fields(text, &mut self.fields) {
            return Err(format_error(line, not_backticked(text)));
        }
        if self.fields.len() != titles.len() {
            return Err(format_error(
                line,
                format!(
                    "the summary has {} values, its title {} names",
                    self.fields.len(),
                    titles.len()
                ),
            ));
        }
        let values = self.fields.iter().map(|&(a, b)| &text[a..b]);
        parse_summary(&titles, values, self.bill_type, title_line)
            .map_err(|r| format_error(line, r))
    }

    /// Nothing but empty lines after the summary.
    fn expect_end(&mut self) -> Result<(), BillError> {
        while self.read_line()? {
            if !self.buf.iter().all(u8::is_ascii_whitespace) {
                return Err(format_error(
                    self.line,
                    "text after the summary (the summary ends a bill)".into(),
                ));
            }
        }
        Ok(())
    }

    /// The next line into `buf`, without its LF or CRLF; `false` at the end of the text.
    /// Never reads a line further than [`MAX_LINE_BYTES`].
    fn read_line(&mut self) -> Result<bool, BillError> {
        self.buf.clear();
        let number = self.line + 1;
        let mut read_any = false;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(BillError::Io(format!("line {number}: {e}"))),
            };
            if available.is_empty() {
                break;
            }
            read_any = true;
            let (take, end) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (available.len(), false),
            };
            if self.buf.len() + take + usize::from(end) > MAX_LINE_BYTES {
                return Err(format_error(
                    number,
                    format!("the line is longer than {MAX_LINE_BYTES} bytes"),
                ));
            }
            self.buf.extend_from_slice(&available[..take]);
            self.reader.consume(take + usize::from(end));
            if end {
                break;
            }
        }
        if !read_any {
            return Ok(false);
        }
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        self.line = number;
        Ok(true)
    }
}

impl Columns {
    /// Before the header is read (never used for a row).
    fn placeholder() -> Columns {
        let c = Col { idx: 0, name: "" };
        Columns {
            count: 0,
            trade_time: c,
            appid: c,
            mch_id: c,
            sub_mch_id: None,
            transaction_id: c,
            out_trade_no: c,
            trade_type: c,
            trade_state: c,
            currency: c,
            total_fee: c,
            settlement_total_fee: c,
            fee: c,
            rate: c,
            refund: None,
            extra: Vec::new(),
        }
    }

    /// The header line (BOM removed) mapped by name, with the family and the bill type it
    /// tells; the reason when it is not a trade bill's header.
    fn from_header(text: &str) -> Result<(Columns, Family, BillType), String> {
        let start = text.trim_start();
        if start.starts_with('<') {
            return Err("not a trade bill: an XML text (an error reply from WeChat?)".into());
        }
        if start.starts_with('{') {
            return Err("not a trade bill: a JSON text (an error reply from WeChat?)".into());
        }
        if start.starts_with('`') {
            return Err("no header: the first line is a data line".into());
        }
        if text.contains('\t') && !text.contains(',') {
            return Err(
                "the fields are TAB-separated and do not start with a backtick: not a \
                 bill as WeChat sends it (a file re-saved by a spreadsheet?)"
                    .into(),
            );
        }
        let names = split_names(text)?;
        let has = |n: &str| names.iter().any(|h| h == n);
        if FUND_FLOW_COLUMNS.iter().any(|n| has(n))
            || names.iter().any(|h| h.starts_with("收支金额"))
        {
            return Err("not a trade bill: a fund-flow bill (资金账单)".into());
        }
        let find = |name: &'static str| {
            names
                .iter()
                .position(|h| h == name)
                .map(|idx| Col { idx, name })
        };
        let need = |name: &'static str| {
            find(name).ok_or_else(|| {
                format!("not a trade bill, or not one this parser knows: no column {name}")
            })
        };
        let either = |a: &'static str, b: &'static str| find(a).or_else(|| find(b));

        let trade_time = need("交易时间")?;
        let (family, settlement_total_fee, total_fee) = if let Some(settled) = find("应结订单金额")
        {
            (Family::Current, settled, need("订单金额")?)
        } else if let Some(total) = find("总金额") {
            (Family::Old, total, total)
        } else {
            return Err("no column 应结订单金额 (today's bills) nor 总金额 (older bills)".into());
        };
        let times = [find("退款申请时间"), find("退款成功时间")];
        let has_refund_columns = ["微信退款单号", "商户退款单号", "退款金额", "退款状态"]
            .iter()
            .any(|n| has(n));
        let bill_type = if times.iter().any(Option::is_some) {
            BillType::Refund
        } else if has_refund_columns {
            BillType::All
        } else {
            BillType::Success
        };
        let refund = match bill_type {
            BillType::Success => None,
            BillType::All | BillType::Refund => {
                let settlement_refund_fee = need("退款金额")?;
                let refund_fee = match family {
                    Family::Current => need("申请退款金额")?,
                    Family::Old => settlement_refund_fee,
                };
                let (applied_at, succeeded_at) = if bill_type == BillType::Refund {
                    (Some(need("退款申请时间")?), Some(need("退款成功时间")?))
                } else {
                    (None, None)
                };
                Some(RefundCols {
                    refund_id: need("微信退款单号")?,
                    out_refund_no: need("商户退款单号")?,
                    refund_fee,
                    settlement_refund_fee,
                    coupon_refund_fee: find("充值券退款金额")
                        .or_else(|| either("企业红包退款金额", "代金券或立减优惠退款金额")),
                    status: need("退款状态")?,
                    applied_at,
                    succeeded_at,
                })
            }
        };
        let extra = names
            .iter()
            .enumerate()
            .filter(|(_, n)| !KNOWN_COLUMNS.contains(&n.as_str()))
            .map(|(i, n)| (i, bounded(n)))
            .collect();
        let columns = Columns {
            count: names.len(),
            trade_time,
            appid: need("公众账号ID")?,
            mch_id: need("商户号")?,
            sub_mch_id: either("特约商户号", "子商户号"),
            transaction_id: need("微信订单号")?,
            out_trade_no: need("商户订单号")?,
            trade_type: need("交易类型")?,
            trade_state: need("交易状态")?,
            currency: need("货币种类")?,
            total_fee,
            settlement_total_fee,
            fee: need("手续费")?,
            rate: need("费率")?,
            refund,
            extra,
        };
        Ok((columns, family, bill_type))
    }
}

/// A header or summary title: names separated by `,`, trimmed; none empty or repeated, at
/// most [`MAX_COLUMNS`].
fn split_names(text: &str) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = Vec::new();
    for (i, name) in text.split(',').enumerate() {
        if i == MAX_COLUMNS {
            return Err(format!("more than {MAX_COLUMNS} columns"));
        }
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("column {} has no name", i + 1));
        }
        if names.iter().any(|n| n == name) {
            return Err(format!("the column {} appears twice", quote(name)));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

/// A line of names (no backtick) one of which is `总交易单数` (WeChat's first).
fn is_summary_title(text: &str) -> bool {
    !text.starts_with('`') && text.split(',').any(|n| n.trim() == SUMMARY_TITLE)
}

/// Splits a backticked line (`` `a,`b,`c ``) into the byte ranges of its values; `false` when
/// it does not start with a backtick.
fn split_fields(text: &str, out: &mut Vec<(usize, usize)>) -> bool {
    out.clear();
    let b = text.as_bytes();
    if b.first() != Some(&b'`') {
        return false;
    }
    let mut start = 1;
    let mut from = 1;
    while let Some(p) = b[from..].iter().position(|&c| c == b'`') {
        let tick = from + p;
        // `tick >= 1` always: the search starts after the first backtick.
        if b[tick - 1] == b',' {
            out.push((start, tick - 1));
            start = tick + 1;
        }
        from = tick + 1;
    }
    out.push((start, b.len()));
    true
}

fn not_backticked(text: &str) -> String {
    if text.contains('\t') {
        "the fields do not start with a backtick (TAB-separated: a file re-saved by a \
         spreadsheet?)"
            .into()
    } else {
        "the fields do not start with a backtick: not a bill line".into()
    }
}

/// One data line, typed, and its coupon refund amount (counted for the summary only).
fn parse_row(
    text: &str,
    fields: &[(usize, usize)],
    c: &Columns,
    line: u64,
) -> Result<(BillRow, Fen), String> {
    let get = |col: Col| {
        let (a, b) = fields[col.idx];
        &text[a..b]
    };
    let trade_state = get(c.trade_state);
    let (kind, coupon_refund) = match &c.refund {
        Some(r) if trade_state == "REFUND" => {
            let coupon_refund = match r.coupon_refund_fee {
                Some(col) => yuan(col.name, get(col))?,
                None => Fen::ZERO,
            };
            let refund = BillRefund {
                refund_id: bounded(get(r.refund_id)),
                out_refund_no: bounded(get(r.out_refund_no)),
                refund_fee: yuan(r.refund_fee.name, get(r.refund_fee))?,
                settlement_refund_fee: yuan(
                    r.settlement_refund_fee.name,
                    get(r.settlement_refund_fee),
                )?,
                status: bounded(get(r.status)),
                applied_at: optional_time(r.applied_at, &get)?,
                succeeded_at: optional_time(r.succeeded_at, &get)?,
            };
            (RowKind::Refund(refund), coupon_refund)
        }
        _ => (RowKind::Payment, Fen::ZERO),
    };
    let sub_mch_id = c
        .sub_mch_id
        .map(get)
        .filter(|v| !v.is_empty() && *v != "0")
        .map(bounded);
    let extra = c
        .extra
        .iter()
        .map(|(i, name)| {
            let (a, b) = fields[*i];
            (name.clone(), bounded(&text[a..b]))
        })
        .collect();
    let row = BillRow {
        line,
        trade_time: time(c.trade_time.name, get(c.trade_time))?,
        appid: bounded(get(c.appid)),
        mch_id: bounded(get(c.mch_id)),
        sub_mch_id,
        transaction_id: bounded(get(c.transaction_id)),
        out_trade_no: bounded(get(c.out_trade_no)),
        trade_type: bounded(get(c.trade_type)),
        trade_state: bounded(trade_state),
        currency: bounded(get(c.currency)),
        total_fee: yuan(c.total_fee.name, get(c.total_fee))?,
        settlement_total_fee: yuan(c.settlement_total_fee.name, get(c.settlement_total_fee))?,
        kind,
        fee: fee(c.fee.name, get(c.fee))?,
        rate: bounded(get(c.rate)),
        extra,
    };
    Ok((row, coupon_refund))
}

/// The summary titles this parser knows, each with its names in both families.
const SETTLED_TITLES: &[&str] = &["应结订单总金额", "总交易额"];
const REFUNDED_TITLES: &[&str] = &["退款总金额", "总退款金额"];
const COUPON_TITLES: &[&str] = &[
    "充值券退款总金额",
    "总企业红包退款金额",
    "总代金券或立减优惠退款金额",
];

/// `title` as the `'static` name of `names` it is, if it is one.
fn known(title: &str, names: &[&'static str]) -> Option<&'static str> {
    names.iter().copied().find(|n| *n == title)
}

/// The summary's values by their titles.
fn parse_summary<'v>(
    titles: &[String],
    values: impl Iterator<Item = &'v str>,
    bill_type: BillType,
    title_line: u64,
) -> Result<(Summary, SummaryTitles), String> {
    let mut rows = None;
    let mut settled: Option<(Fen, &'static str)> = None;
    let mut refunded: Option<(Fen, &'static str)> = None;
    let mut coupon: Option<(Fen, &'static str)> = None;
    let mut fee_total = None;
    let mut total_fee = None;
    let mut refund_fee = None;
    let mut extra = Vec::new();
    for (title, value) in titles.iter().zip(values) {
        let title = title.as_str();
        if title == SUMMARY_TITLE {
            rows = Some(count(value)?);
        } else if let Some(name) = known(title, SETTLED_TITLES) {
            settled = Some((yuan(name, value)?, name));
        } else if let Some(name) = known(title, REFUNDED_TITLES) {
            refunded = Some((yuan(name, value)?, name));
        } else if let Some(name) = known(title, COUPON_TITLES) {
            coupon = Some((yuan(name, value)?, name));
        } else if title == "手续费总金额" {
            fee_total = Some(fee(title, value)?);
        } else if title == "订单总金额" {
            total_fee = Some(yuan(title, value)?);
        } else if title == "申请退款总金额" {
            refund_fee = Some(yuan(title, value)?);
        } else {
            extra.push((bounded(title), bounded(value)));
        }
    }
    let lacks = |name: &str| format!("the summary title (line {title_line}) has no {name}");
    let rows = rows.ok_or_else(|| lacks(SUMMARY_TITLE))?;
    let (settlement_total_fee, settled_title) =
        settled.ok_or_else(|| lacks("应结订单总金额 (or 总交易额)"))?;
    let fee_total = fee_total.ok_or_else(|| lacks("手续费总金额"))?;
    let (settlement_refund_fee, refunded_title) = match (refunded, bill_type) {
        (Some((v, t)), _) => (v, Some(t)),
        (None, BillType::Success) => (Fen::ZERO, None),
        (None, _) => return Err(lacks("退款总金额 (or 总退款金额)")),
    };
    let summary = Summary {
        rows,
        settlement_total_fee,
        settlement_refund_fee,
        coupon_refund_fee: coupon.map(|(v, _)| v),
        fee: fee_total,
        total_fee,
        refund_fee,
        extra,
    };
    let titles = SummaryTitles {
        settlement_total_fee: settled_title,
        settlement_refund_fee: refunded_title,
        coupon_refund_fee: coupon.map(|(_, t)| t),
    };
    Ok((summary, titles))
}

fn format_error(line: u64, reason: String) -> BillError {
    BillError::Format { line, reason }
}

fn utf8(buf: &[u8], line: u64) -> Result<&str, BillError> {
    std::str::from_utf8(buf).map_err(|e| {
        format_error(
            line,
            format!(
                "not UTF-8 (at byte {}; a bill re-saved in another encoding?)",
                e.valid_up_to() + 1
            ),
        )
    })
}

/// `s` cut to [`MAX_TEXT_CHARS`] characters, on a character boundary.
fn bounded(s: &str) -> String {
    if s.len() <= MAX_TEXT_CHARS {
        return s.to_owned();
    }
    match s.char_indices().nth(MAX_TEXT_CHARS) {
        Some((cut, _)) => s[..cut].to_owned(),
        None => s.to_owned(),
    }
}

/// An amount in yuan (`0.88`, `0.0`, `50.00`, `0`) as fen.
fn yuan(column: &str, v: &str) -> Result<Fen, String> {
    decimal(v, 2)
        .and_then(|fen| Fen::new(fen).ok())
        .ok_or_else(|| {
            format!(
                "{column}: {} is not an amount in yuan (digits, at most 2 decimals, no sign)",
                quote(v)
            )
        })
}

/// A fee in yuan with at most 5 decimals, signed (`-0.27000`, `0.01000`, `0`, `0.08`), as
/// thousandths of a fen.
fn fee(column: &str, v: &str) -> Result<MilliFen, String> {
    let (negative, digits) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    decimal(digits, 5)
        .map(|m| MilliFen(if negative { -m } else { m }))
        .ok_or_else(|| {
            format!(
                "{column}: {} is not a fee in yuan (digits, at most 5 decimals, `-` or no sign)",
                quote(v)
            )
        })
}

/// `digits[.digits]` with at most `scale` decimals, as an integer of 10^-scale units. At most
/// 12 integer digits (a trillion yuan), so the result always fits an i64.
fn decimal(v: &str, scale: u32) -> Option<i64> {
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (v, None),
    };
    if int.is_empty() || int.len() > 12 {
        return None;
    }
    let mut n: i64 = 0;
    for b in int.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(b - b'0');
    }
    let mut places = 0;
    if let Some(f) = frac {
        if f.is_empty() || f.len() > scale as usize {
            return None;
        }
        for b in f.bytes() {
            if !b.is_ascii_digit() {
                return None;
            }
            n = n * 10 + i64::from(b - b'0');
            places += 1;
        }
    }
    Some(n * 10i64.pow(scale - places))
}

/// 总交易单数: a whole number, written `45` or `45.0`.
fn count(v: &str) -> Result<u64, String> {
    let bad = || format!("{SUMMARY_TITLE}: {} is not a count", quote(v));
    let (int, frac) = match v.split_once('.') {
        Some((i, f)) => (i, f),
        None => (v, "0"),
    };
    if int.is_empty()
        || int.len() > 18
        || !int.bytes().all(|b| b.is_ascii_digit())
        || frac.is_empty()
        || frac.len() > 2
        || !frac.bytes().all(|b| b == b'0')
    {
        return Err(bad());
    }
    int.parse().map_err(|_| bad())
}

/// `YYYY-MM-DD HH:MM:SS`, Beijing time, as UTC; the colons may be full-width (`：`, the old
/// documentation's sample).
fn time(column: &str, v: &str) -> Result<DateTime<Utc>, String> {
    beijing_time(v)
        .ok_or_else(|| format!("{column}: {} is not a time YYYY-MM-DD HH:MM:SS", quote(v)))
}

/// A time column that may be absent or empty (a refund not yet succeeded).
fn optional_time<'t>(
    col: Option<Col>,
    get: &impl Fn(Col) -> &'t str,
) -> Result<Option<DateTime<Utc>>, String> {
    match col {
        None => Ok(None),
        Some(c) => match get(c) {
            "" => Ok(None),
            v => time(c.name, v).map(Some),
        },
    }
}

fn beijing_time(v: &str) -> Option<DateTime<Utc>> {
    let mut p = TimeText { b: v.as_bytes() };
    let year = p.digits(4)?;
    p.byte(b'-')?;
    let month = p.digits(2)?;
    p.byte(b'-')?;
    let day = p.digits(2)?;
    p.byte(b' ')?;
    let hour = p.digits(2)?;
    p.colon()?;
    let minute = p.digits(2)?;
    p.colon()?;
    let second = p.digits(2)?;
    if !p.b.is_empty() {
        return None;
    }
    let naive = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?
        .and_hms_opt(hour, minute, second)?;
    china_standard_time()
        .from_local_datetime(&naive)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

/// The rest of a time being read.
struct TimeText<'a> {
    b: &'a [u8],
}

impl TimeText<'_> {
    fn digits(&mut self, n: usize) -> Option<u32> {
        let (head, rest) = self.b.split_at_checked(n)?;
        let mut v = 0;
        for &d in head {
            if !d.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(d - b'0');
        }
        self.b = rest;
        Some(v)
    }

    fn byte(&mut self, want: u8) -> Option<()> {
        self.b = self.b.strip_prefix(&[want])?;
        Some(())
    }

    /// `:` or the full-width `：` (U+FF1A).
    fn colon(&mut self) -> Option<()> {
        if let Some(rest) = self.b.strip_prefix(b":") {
            self.b = rest;
        } else {
            self.b = self.b.strip_prefix("\u{ff1a}".as_bytes())?;
        }
        Some(())
    }
}

/// Fen as yuan with 2 decimals (`5.76`, `-0.01`).
fn yuan_text(fen: i128) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    let abs = fen.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// Milli-fen as yuan with 5 decimals, as [`MilliFen`] shows itself.
fn fee_text(milli: i128) -> String {
    let sign = if milli < 0 { "-" } else { "" };
    let abs = milli.unsigned_abs();
    format!("{sign}{}.{:05}", abs / 100_000, abs % 100_000)
}

#[cfg(test)]
mod tests {
    use std::io::{self, Read};

    use super::*;

    /// Today's ALL header (27 columns).
    const ALL: &str = "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,\
        交易类型,交易状态,付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,\
        充值券退款金额,退款类型,退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注";

    /// The current summary title (7 names).
    const SUMMARY7: &str = "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额";

    /// A payment (xjryanse's, attach simplified) and a refund of an older order with a
    /// coupon: 申请退款金额 50.00, 退款金额 49.00 (1.00 of 充值券), fee -0.27000.
    const PAYMENT: &str = "`2024-07-09 10:06:33,`wxe1696e7c7db8e7f4,`1579507281,`0,`,\
        `4200002360202407091150650780,`5622334254839656448,`oVgfJ5TrnzDOSuaxbFc33mw-5LUY,`JSAPI,\
        `SUCCESS,`OTHERS,`CNY,`60.00,`0.00,`0,`0,`0.00,`0.00,`,`,`商品,`{\"a\":1},`0.32000,`0.54%,\
        `60.00,`0.00,`";
    const REFUND: &str = "`2024-07-09 16:47:58,`wxe1696e7c7db8e7f4,`1579507281,`1511458511,`,\
        `4200002166202406250324636876,`5617363390111199232,`oVgfJ5d35c6iAXrRCnfhOGF9aHT8,`JSAPI,\
        `REFUND,`OTHERS,`CNY,`0.00,`0.00,`50302709992024070991956632208,`5622435300878286848,\
        `49.00,`1.00,`ORIGINAL,`SUCCESS,`商品,`,`-0.27000,`0.54%,`0.00,`50.00,`";
    /// The summary of PAYMENT + REFUND.
    const SUMS: &str = "`2,`60.00,`49.00,`1.00,`0.05000,`60.00,`50.00";

    fn bill(lines: &[&str]) -> String {
        let mut s = lines.join("\n");
        s.push('\n');
        s
    }

    fn read_all(text: &str) -> (BillReader<io::Cursor<Vec<u8>>>, Vec<BillRow>) {
        let mut r = BillReader::new(io::Cursor::new(text.as_bytes().to_vec())).unwrap();
        let mut rows = Vec::new();
        while let Some(row) = r.next_row().unwrap() {
            rows.push(row);
        }
        (r, rows)
    }

    /// The first error reading `text` (the header's or a row's).
    fn error_of(text: &[u8]) -> BillError {
        let mut r = match BillReader::new(text) {
            Ok(r) => r,
            Err(e) => return e,
        };
        loop {
            match r.next_row() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("no error in {:?}", String::from_utf8_lossy(text)),
                Err(e) => return e,
            }
        }
    }

    fn reason(e: &BillError) -> &str {
        match e {
            BillError::Format { reason, .. } => reason,
            BillError::Io(s) => s,
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn fen(v: i64) -> Fen {
        Fen::new(v).unwrap()
    }

    #[test]
    fn a_current_all_bill_reads_into_typed_rows_that_add_up() {
        let (r, rows) = read_all(&bill(&[ALL, PAYMENT, REFUND, SUMMARY7, SUMS]));
        assert_eq!(
            (r.family(), r.bill_type()),
            (Family::Current, BillType::All)
        );
        assert_eq!(rows.len(), 2);
        let p = &rows[0];
        assert_eq!(p.line, 2);
        assert_eq!(p.trade_time, utc("2024-07-09T02:06:33Z"));
        assert_eq!(p.appid, "wxe1696e7c7db8e7f4");
        assert_eq!(p.mch_id, "1579507281");
        assert_eq!(p.sub_mch_id, None);
        assert_eq!(p.transaction_id, "4200002360202407091150650780");
        assert_eq!(p.out_trade_no, "5622334254839656448");
        assert_eq!(
            (p.trade_type.as_str(), p.trade_state.as_str()),
            ("JSAPI", "SUCCESS")
        );
        assert_eq!(p.currency, "CNY");
        assert_eq!(
            (p.total_fee, p.settlement_total_fee),
            (fen(6000), fen(6000))
        );
        assert_eq!(p.kind, RowKind::Payment, "its `0` refund ids are ignored");
        assert_eq!(p.fee, MilliFen(32_000));
        assert_eq!(p.rate, "0.54%");
        assert!(p.extra.is_empty());

        let f = &rows[1];
        assert_eq!(f.line, 3);
        assert_eq!(f.sub_mch_id.as_deref(), Some("1511458511"));
        assert_eq!(
            (f.total_fee, f.settlement_total_fee),
            (Fen::ZERO, Fen::ZERO)
        );
        assert_eq!(f.fee, MilliFen(-27_000));
        assert_eq!(
            f.kind,
            RowKind::Refund(BillRefund {
                refund_id: "50302709992024070991956632208".into(),
                out_refund_no: "5622435300878286848".into(),
                refund_fee: fen(5000),
                settlement_refund_fee: fen(4900),
                status: "SUCCESS".into(),
                applied_at: None,
                succeeded_at: None,
            })
        );
        let s = r.summary().unwrap();
        assert_eq!(s.rows, 2);
        assert_eq!(s.settlement_total_fee, fen(6000));
        assert_eq!(s.settlement_refund_fee, fen(4900));
        assert_eq!(s.coupon_refund_fee, Some(fen(100)));
        assert_eq!(s.fee, MilliFen(5_000));
        assert_eq!(s.total_fee, Some(fen(6000)));
        assert_eq!(s.refund_fee, Some(fen(5000)));
        assert!(s.extra.is_empty());
        assert_eq!(r.check(), SummaryCheck::AddsUp);
        assert_eq!(r.rows_read(), 2);
    }

    /// The header and every row in another order, with an unknown column: the same rows.
    #[test]
    fn columns_are_mapped_by_header_name_never_by_position() {
        let shuffle = |line: &str, sep: &str| -> String {
            let mut v: Vec<&str> = if sep == "," {
                line.split(',').collect()
            } else {
                line[1..].split(",`").collect()
            };
            v.reverse();
            v.swap(0, 13);
            v.insert(5, if sep == "," { "新的列" } else { "新值" });
            if sep == "," {
                v.join(",")
            } else {
                format!("`{}", v.join(",`"))
            }
        };
        let (plain, rows) = read_all(&bill(&[ALL, PAYMENT, REFUND, SUMMARY7, SUMS]));
        let mixed_text = bill(&[
            &shuffle(ALL, ","),
            &shuffle(PAYMENT, ",`"),
            &shuffle(REFUND, ",`"),
            SUMMARY7,
            SUMS,
        ]);
        let (mixed, mixed_rows) = read_all(&mixed_text);
        assert_eq!(mixed.family(), plain.family());
        assert_eq!(mixed.bill_type(), plain.bill_type());
        assert_eq!(mixed_rows.len(), 2);
        for (a, b) in rows.iter().zip(&mixed_rows) {
            assert_eq!(b.extra, vec![("新的列".to_owned(), "新值".to_owned())]);
            let mut b = b.clone();
            b.extra.clear();
            assert_eq!(a, &b);
        }
        assert_eq!(mixed.check(), SummaryCheck::AddsUp);

        // The summary by its titles too.
        let titles: Vec<&str> = SUMMARY7.split(',').rev().collect();
        let mut values: Vec<&str> = SUMS[1..].split(",`").collect();
        values.reverse();
        let (r, _) = read_all(&bill(&[
            ALL,
            PAYMENT,
            REFUND,
            &titles.join(","),
            &format!("`{}", values.join(",`")),
        ]));
        assert_eq!(r.summary(), plain.summary());
        assert_eq!(r.check(), SummaryCheck::AddsUp);
    }

    #[test]
    fn bom_crlf_and_a_missing_final_newline_read_the_same() {
        let lf = bill(&[ALL, PAYMENT, REFUND, SUMMARY7, SUMS]);
        let (plain, rows) = read_all(&lf);
        let crlf = lf.replace('\n', "\r\n");
        for text in [
            format!("\u{feff}{lf}"),
            crlf.clone(),
            format!("\u{feff}{crlf}"),
            lf.trim_end().to_owned(),
            format!("\u{feff}{}", crlf.trim_end()),
            format!("{lf}\n\r\n  \n"),
        ] {
            let (r, got) = read_all(&text);
            assert_eq!(got, rows, "{text:?}");
            assert_eq!(r.summary(), plain.summary(), "{text:?}");
            assert_eq!(r.check(), SummaryCheck::AddsUp, "{text:?}");
        }
        // A BOM is only a BOM before the header.
        let e = error_of(format!("{ALL}\n\u{feff}{PAYMENT}\n").as_bytes());
        assert_eq!(e.line(), Some(2));
    }

    #[test]
    fn a_row_with_another_field_count_is_an_error_naming_its_line() {
        let short = PAYMENT.strip_suffix(",`").unwrap();
        let long = format!("{PAYMENT},`x");
        for bad in [short, long.as_str()] {
            let e = error_of(bill(&[ALL, REFUND, REFUND, bad, SUMMARY7, SUMS]).as_bytes());
            assert_eq!(e.line(), Some(4), "{e}");
            assert!(reason(&e).contains("the header has 27 columns"), "{e}");
        }
        // The summary's values against its title.
        let e = error_of(bill(&[ALL, PAYMENT, SUMMARY7, "`1,`60.00"]).as_bytes());
        assert_eq!(e.line(), Some(4), "{e}");
    }

    #[test]
    fn a_line_that_is_not_backticked_or_empty_or_not_utf8_is_refused_with_its_line() {
        let e = error_of(bill(&[ALL, PAYMENT, &PAYMENT.replace('`', "")]).as_bytes());
        assert_eq!(e.line(), Some(3));
        assert!(reason(&e).contains("do not start with a backtick"), "{e}");
        let e = error_of(bill(&[ALL, PAYMENT, "", SUMMARY7, SUMS]).as_bytes());
        assert_eq!(e.line(), Some(3));
        let mut gbk = bill(&[ALL, PAYMENT]).into_bytes();
        gbk.extend_from_slice(b"`\xbd\xbb\xd2\xd7,`x\n");
        let e = error_of(&gbk);
        assert_eq!(e.line(), Some(3));
        assert!(reason(&e).contains("not UTF-8"), "{e}");
        let e = error_of(b"\xff\xfe\x00\x00\n");
        assert_eq!(e.line(), Some(1));
    }

    #[test]
    fn an_error_stays_and_is_given_again() {
        let text = bill(&[ALL, "garbage", PAYMENT]);
        let mut r = BillReader::new(text.as_bytes()).unwrap();
        let first = r.next_row().unwrap_err();
        assert_eq!(r.next_row().unwrap_err(), first);
        assert_eq!(r.check(), SummaryCheck::Missing);
        assert!(!first.is_retryable());
    }

    #[test]
    fn amounts_are_exact_fen_and_anything_else_is_refused() {
        for (v, want) in [
            ("0.88", 88),
            ("0.0", 0),
            ("50.00", 5000),
            ("0", 0),
            ("1.5", 150),
            ("00.01", 1),
            ("999999999999.99", 99_999_999_999_999),
        ] {
            assert_eq!(yuan("金额", v), Ok(fen(want)), "{v}");
        }
        for v in [
            "",
            "-1",
            "+1",
            "-0.00",
            "1.234",
            ".5",
            "1.",
            "1e3",
            " 1",
            "1 ",
            "1,00",
            "１",
            "0x10",
            "1000000000000",
            "NaN",
            "1..0",
        ] {
            let e = yuan("订单金额", v).unwrap_err();
            assert!(e.starts_with("订单金额: "), "{e}");
        }
        assert!(
            yuan("x", "\"\n").unwrap_err().contains("\"\\\"\\n\""),
            "quoted"
        );
    }

    #[test]
    fn fees_are_exact_milli_fen_signed() {
        for (v, want) in [
            ("-0.27000", -27_000),
            ("0.01000", 1_000),
            ("0.00000", 0),
            ("0", 0),
            ("-0", 0),
            ("0.08", 8_000),
            ("4.33000", 433_000),
            ("0.00001", 1),
            ("-12.5", -1_250_000),
        ] {
            assert_eq!(fee("手续费", v), Ok(MilliFen(want)), "{v}");
        }
        for v in [
            "", "-", "+0.1", "--1", "0.000001", "0.1-", "1.2.3", "- 1", "0,01", "-.5",
        ] {
            assert!(fee("手续费", v).is_err(), "{v}");
        }
        assert_eq!(MilliFen(-27_000).to_string(), "-0.27000");
    }

    #[test]
    fn the_row_count_may_be_written_with_a_zero_decimal() {
        for (v, want) in [("45", 45), ("45.0", 45), ("45.00", 45), ("0", 0)] {
            assert_eq!(count(v), Ok(want), "{v}");
        }
        for v in ["", "45.1", "45.", "-1", "4 5", ".0", "45.000", "1e3"] {
            assert!(count(v).is_err(), "{v}");
        }
    }

    #[test]
    fn times_are_beijing_time_read_into_utc() {
        for (v, want) in [
            ("2018-08-20 14:40:09", "2018-08-20T06:40:09Z"),
            ("2024-07-01 03:00:00", "2024-06-30T19:00:00Z"),
            ("2014-11-10 16：33：45", "2014-11-10T08:33:45Z"),
            ("2024-02-29 23:59:59", "2024-02-29T15:59:59Z"),
        ] {
            assert_eq!(beijing_time(v), Some(utc(want)), "{v}");
        }
        for v in [
            "",
            "2016/5/4 2:18",
            "2018-08-20T14:40:09",
            "2018-02-30 00:00:00",
            "2018-08-20 24:00:00",
            "2018-08-20 14:40:09 ",
            "2018-08-20 14:40",
            "2018-8-20 14:40:09",
            "2018-08-20 14:40:60",
            "２018-08-20 14:40:09",
        ] {
            assert_eq!(beijing_time(v), None, "{v}");
        }
        let e = error_of(bill(&[ALL, &PAYMENT.replace("2024-07-09 10:06:33", "x")]).as_bytes());
        assert_eq!(e.line(), Some(2));
        assert!(reason(&e).starts_with("交易时间: \"x\""), "{e}");
    }

    #[test]
    fn old_format_bills_read_by_their_own_names() {
        let header = "交易时间,公众账号ID,商户号,子商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,\
            交易状态,付款银行,货币种类,总金额,企业红包金额,微信退款单号,商户退款单号,退款金额,\
            企业红包退款金额,退款类型,退款状态,商品名称,商户数据包,手续费,费率";
        let pay = "`2015-10-28 13:52:05,`wx2350ab66021a97e5,`1242048202,`0,`,`1005680240201510281363742443,\
            `dicwdkof7s8tpfgrl7vmxa6xhd7udrmt,`ouBB,`NATIVE,`SUCCESS,`CFT,`CNY,`0.88,`0.00,`0,`0,`0,`0,\
            `,`,` 测试产品,`,`0.01000,`0.60%";
        let refund = "`2018-08-21 18:13:12,`wx34723380b2d8a699,`1510598081,`1511458511,`,\
            `4200000145201808202300523655,`2018082010,`oDod,`NATIVE,`REFUND,`CFT,`CNY,`0.00,`0.00,\
            `50000707812018082106030155182,`10124132620180820230052365515348463,`0.01,`0.00,`ORIGINAL,\
            `SUCCESS,`测试,`,`0.00000,`1.00%";
        let (r, rows) = read_all(&bill(&[
            header,
            pay,
            refund,
            "总交易单数,总交易额,总退款金额,总企业红包退款金额,手续费总金额",
            "`2,`0.88,`0.01,`0.00,`0.01000",
        ]));
        assert_eq!((r.family(), r.bill_type()), (Family::Old, BillType::All));
        assert_eq!(
            (rows[0].total_fee, rows[0].settlement_total_fee),
            (fen(88), fen(88))
        );
        assert_eq!(rows[0].sub_mch_id, None);
        let RowKind::Refund(f) = &rows[1].kind else {
            panic!("{:?}", rows[1]);
        };
        assert_eq!((f.refund_fee, f.settlement_refund_fee), (fen(1), fen(1)));
        let s = r.summary().unwrap();
        assert_eq!(
            (s.total_fee, s.refund_fee, s.coupon_refund_fee),
            (None, None, Some(Fen::ZERO))
        );
        assert_eq!(r.check(), SummaryCheck::AddsUp);

        // 18 columns (SUCCESS) and 26 (REFUND) of the same family.
        let success: Vec<&str> = header.split(',').filter(|n| !n.contains("退款")).collect();
        assert_eq!(success.len(), 18);
        let success = success.join(",");
        let r = BillReader::new(success.as_bytes()).unwrap();
        assert_eq!(
            (r.family(), r.bill_type()),
            (Family::Old, BillType::Success)
        );
        let refund_header =
            header.replace("企业红包金额,", "企业红包金额,退款申请时间,退款成功时间,");
        assert_eq!(refund_header.split(',').count(), 26);
        let r = BillReader::new(refund_header.as_bytes()).unwrap();
        assert_eq!((r.family(), r.bill_type()), (Family::Old, BillType::Refund));
        // 代金券或立减优惠 names (the old documentation's sample).
        let doc = header.replace("企业红包", "代金券或立减优惠");
        let r = BillReader::new(doc.as_bytes()).unwrap();
        assert_eq!((r.family(), r.bill_type()), (Family::Old, BillType::All));
    }

    #[test]
    fn refund_bills_carry_the_refund_times_and_success_bills_only_payments() {
        let header = ALL.replace("代金券金额,", "代金券金额,退款申请时间,退款成功时间,");
        assert_eq!(header.split(',').count(), 29);
        let row = REFUND.replace(
            "`0.00,`0.00,`503",
            "`0.00,`0.00,`2024-07-09 16:47:50,`,`503",
        );
        let (r, rows) = read_all(&bill(&[&header, &row]));
        assert_eq!(r.bill_type(), BillType::Refund);
        let RowKind::Refund(f) = &rows[0].kind else {
            panic!("{:?}", rows[0]);
        };
        assert_eq!(f.applied_at, Some(utc("2024-07-09T08:47:50Z")));
        assert_eq!(f.succeeded_at, None, "empty: not succeeded yet");
        assert_eq!(r.check(), SummaryCheck::Missing);

        // SUCCESS: 20 columns, no refund columns; every row a payment.
        let names: Vec<&str> = ALL.split(',').filter(|n| !n.contains("退款")).collect();
        assert_eq!(names.len(), 20);
        let values: Vec<&str> = ALL
            .split(',')
            .zip(REFUND[1..].split(",`"))
            .filter(|(n, _)| !n.contains("退款"))
            .map(|(_, v)| v)
            .collect();
        let (r, rows) = read_all(&bill(&[
            &names.join(","),
            &format!("`{}", values.join(",`")),
            SUMMARY7,
            "`1,`0.00,`0.00,`0.00,`-0.27000,`0.00,`0.00",
        ]));
        assert_eq!(r.bill_type(), BillType::Success);
        assert_eq!(rows[0].kind, RowKind::Payment);
        assert_eq!(r.check(), SummaryCheck::AddsUp);
        // A SUCCESS summary may omit the refund totals.
        let (r, _) = read_all(&bill(&[
            &names.join(","),
            &format!("`{}", values.join(",`")),
            "总交易单数,应结订单总金额,手续费总金额,订单总金额",
            "`1,`0.00,`-0.27000,`0.00",
        ]));
        assert_eq!(r.check(), SummaryCheck::AddsUp);
    }

    #[test]
    fn a_header_that_is_not_a_trade_bill_or_lacks_a_column_is_refused_by_name() {
        let cases: &[(&str, &str)] = &[
            (
                "记账时间,微信支付业务单号,资金流水单号,业务名称,业务类型,收支类型,收支金额（元）,账户结余（元）",
                "fund-flow",
            ),
            (
                "交易时间\t公众账号ID\t商户号",
                "do not start with a backtick",
            ),
            (
                "<xml><return_code><![CDATA[FAIL]]></return_code></xml>",
                "XML",
            ),
            ("{\"code\":\"NO_STATEMENT_EXIST\"}", "JSON"),
            ("`2024-07-09 10:06:33,`wx", "data line"),
            ("", "empty"),
            ("交易时间,公众账号ID,交易时间", "appears twice"),
            ("交易时间,,商户号", "no name"),
            ("交易时间,公众账号ID", "应结订单金额"),
        ];
        for (header, why) in cases {
            let e = BillReader::new(header.as_bytes()).err().unwrap();
            assert_eq!(e.line(), Some(1), "{header}");
            assert!(reason(&e).contains(why), "{header}: {e}");
        }
        for missing in [
            "商户订单号",
            "交易时间",
            "订单金额",
            "申请退款金额",
            "手续费",
            "退款状态",
        ] {
            let header: Vec<&str> = ALL.split(',').filter(|n| *n != missing).collect();
            let e = BillReader::new(header.join(",").as_bytes()).err().unwrap();
            assert!(reason(&e).ends_with(&format!("no column {missing}")), "{e}");
        }
        let wide: Vec<String> = (0..=MAX_COLUMNS).map(|i| format!("列{i}")).collect();
        let wide = wide.join(",");
        let e = BillReader::new(wide.as_bytes()).err().unwrap();
        assert!(reason(&e).contains("more than"), "{e}");
    }

    #[test]
    fn a_summary_that_does_not_add_up_says_which_values_differ_in_words() {
        let (r, rows) = read_all(&bill(&[
            ALL,
            PAYMENT,
            SUMMARY7,
            "`48,`5.76,`1.42,`0.00,`0.01000,`5.76,`1.42",
        ]));
        assert_eq!(rows.len(), 1);
        let SummaryCheck::Differs(d) = r.check() else {
            panic!("{:?}", r.check());
        };
        assert_eq!(
            d,
            vec![
                "总交易单数 says 48, the rows are 1",
                "应结订单总金额 says 5.76, the rows add up to 60.00",
                "退款总金额 says 1.42, the rows add up to 0.00",
                "订单总金额 says 5.76, the rows add up to 60.00",
                "申请退款总金额 says 1.42, the rows add up to 0.00",
                "手续费总金额 says 0.01000, the rows add up to 0.32000",
            ]
        );
        // The coupon refund total too.
        let (r, _) = read_all(&bill(&[
            ALL,
            PAYMENT,
            REFUND,
            SUMMARY7,
            "`2,`60.00,`49.00,`0.00,`0.05000,`60.00,`50.00",
        ]));
        assert_eq!(
            r.check(),
            SummaryCheck::Differs(vec![
                "充值券退款总金额 says 0.00, the rows add up to 1.00".into()
            ])
        );
        // No summary at all.
        let (r, _) = read_all(&bill(&[ALL, PAYMENT]));
        assert_eq!((r.summary(), r.check()), (None, SummaryCheck::Missing));
        let (r, rows) = read_all(ALL);
        assert!(rows.is_empty());
        assert_eq!(r.check(), SummaryCheck::Missing);
    }

    #[test]
    fn the_first_summary_ends_the_bill() {
        let text = bill(&[ALL, PAYMENT, SUMMARY7, SUMS, PAYMENT, SUMMARY7, SUMS]);
        let e = error_of(text.as_bytes());
        assert_eq!(e.line(), Some(5));
        assert!(reason(&e).contains("after the summary"), "{e}");
        // A bill refused past its summary has none to check.
        let mut r = BillReader::new(text.as_bytes()).unwrap();
        assert!(r.next_row().unwrap().is_some());
        assert!(r.next_row().is_err());
        assert_eq!((r.summary(), r.check()), (None, SummaryCheck::Missing));
        let e = error_of(bill(&[ALL, PAYMENT, SUMMARY7]).as_bytes());
        assert_eq!(e.line(), Some(3));
        assert!(reason(&e).contains("no values line"), "{e}");
        let e = error_of(bill(&[ALL, PAYMENT, SUMMARY7, "`1,`x,`0,`0,`0,`0,`0"]).as_bytes());
        assert_eq!(e.line(), Some(4));
        assert!(reason(&e).starts_with("应结订单总金额: \"x\""), "{e}");
        let e = error_of(bill(&[ALL, PAYMENT, "总交易单数,订单总金额", "`1,`60.00"]).as_bytes());
        assert!(reason(&e).contains("has no 应结订单总金额"), "{e}");
        // An unknown summary value is kept, not checked.
        let (r, _) = read_all(&bill(&[
            ALL,
            PAYMENT,
            &format!("{SUMMARY7},新总额"),
            "`1,`60.00,`0.00,`0.00,`0.32000,`60.00,`0.00,`7",
        ]));
        assert_eq!(
            r.summary().unwrap().extra,
            vec![("新总额".into(), "7".into())]
        );
        assert_eq!(r.check(), SummaryCheck::AddsUp);
    }

    #[test]
    fn texts_are_cut_to_256_characters_on_a_character_boundary() {
        let long_id = "中".repeat(300);
        let long_name = "列".repeat(300);
        let header = format!("{ALL},{long_name}");
        let row = format!(
            "{},`{}",
            PAYMENT.replace("5622334254839656448", &long_id),
            "値".repeat(300)
        );
        let (_, rows) = read_all(&bill(&[&header, &row]));
        assert_eq!(rows[0].out_trade_no, "中".repeat(MAX_TEXT_CHARS));
        assert_eq!(rows[0].extra[0].0, "列".repeat(MAX_TEXT_CHARS));
        assert_eq!(rows[0].extra[0].1, "値".repeat(MAX_TEXT_CHARS));
        assert_eq!(bounded("abc"), "abc");
    }

    /// An endless line is refused once it is longer than the bound, without reading on.
    #[test]
    fn a_line_longer_than_the_bound_is_an_error_naming_it() {
        let endless = io::BufReader::new(io::repeat(b'a'));
        let e = BillReader::new(endless).err().unwrap();
        assert_eq!(e.line(), Some(1));
        assert!(reason(&e).contains("longer than 65536 bytes"), "{e}");

        let head = bill(&[ALL, PAYMENT]);
        let endless = io::BufReader::new(head.as_bytes().chain(io::repeat(b'`')));
        let mut r = BillReader::new(endless).unwrap();
        assert!(r.next_row().unwrap().is_some());
        let e = r.next_row().unwrap_err();
        assert_eq!(e.line(), Some(3));

        // Exactly the bound is a line.
        let ok = format!(
            "{}{}\n",
            PAYMENT,
            "x".repeat(MAX_LINE_BYTES - PAYMENT.len() - 1)
        );
        let text = format!("{ALL}\n{ok}");
        let mut r = BillReader::new(text.as_bytes()).unwrap();
        assert!(r.next_row().unwrap().is_some());
        let too_long = format!(
            "{}{}\n",
            PAYMENT,
            "x".repeat(MAX_LINE_BYTES - PAYMENT.len())
        );
        let e = error_of(format!("{ALL}\n{too_long}").as_bytes());
        assert_eq!(e.line(), Some(2));
    }

    #[test]
    fn an_io_error_is_told_as_one() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "corrupt deflate stream",
                ))
            }
        }
        let head = format!("{ALL}\n{PAYMENT}\n");
        let mut r = BillReader::new(io::BufReader::new(head.as_bytes().chain(Broken))).unwrap();
        assert!(r.next_row().unwrap().is_some());
        let e = r.next_row().unwrap_err();
        assert!(
            matches!(&e, BillError::Io(m) if m.contains("line 3")),
            "{e}"
        );
        assert!(e.is_retryable());
    }

    #[test]
    fn backticks_and_commas_inside_a_value_stay_in_it() {
        let row = PAYMENT.replace("`{\"a\":1}", "`{\"a\":1,\"b\":`2`}");
        let header = ALL.replace("商户数据包", "附加");
        let (_, rows) = read_all(&bill(&[&header, &row]));
        assert_eq!(
            rows[0].extra,
            vec![("附加".into(), "{\"a\":1,\"b\":`2`}".into())]
        );
        let mut f = Vec::new();
        assert!(split_fields("`,`", &mut f));
        assert_eq!(f, vec![(1, 1), (3, 3)]);
        assert!(split_fields("`", &mut f));
        assert_eq!(f, vec![(1, 1)]);
        assert!(!split_fields("a,`b", &mut f));
    }
}

#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;

    use super::*;

    const SAMPLE: &[u8] = include_bytes!(
        "../../tests/fixtures/wxpay-bills/v3_all_official_sample_bom_crlf_45rows.csv"
    );

    /// Reads `bytes` to the end: the rows read, or the error (which names a line).
    fn read_all(bytes: &[u8]) -> Result<u64, BillError> {
        let mut reader = BillReader::new(bytes)?;
        let mut rows = 0;
        while reader.next_row()?.is_some() {
            rows += 1;
            assert!(rows <= bytes.len() as u64, "more rows than bytes");
        }
        let _ = reader.check();
        Ok(rows)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A real bill with bytes overwritten, inserted or cut anywhere never panics the
        /// reader: it reads, or it names the line it refuses.
        #[test]
        fn a_damaged_bill_is_read_or_refused_by_line(
            edits in proptest::collection::vec((0usize..SAMPLE.len(), any::<u8>(), 0u8..3), 1..8),
        ) {
            let mut bytes = SAMPLE.to_vec();
            for (at, byte, how) in edits {
                let at = at.min(bytes.len());
                match how {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    _ => bytes.truncate(at.max(1)),
                }
            }
            match read_all(&bytes) {
                Ok(rows) => prop_assert!(rows <= 46),
                Err(e) => prop_assert!(e.line().is_some() || matches!(e, BillError::Io(_)), "{e}"),
            }
        }

        /// Arbitrary bytes are refused or read, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = read_all(&bytes);
        }
    }
}

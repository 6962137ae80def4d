//! The simulator's daily trade bills, generated from its own orders and refunds in WeChat's
//! current `ALL` format: a UTF-8 BOM, CRLF line ends, the 27-column header, every data field
//! after a backtick, amounts in yuan with 2 decimals, fees in yuan with 5 decimals, times in
//! Beijing time, then the summary title and its values, which add up.
//!
//! The bill of Beijing day D for merchant M has a payment line for each order paid within D
//! (交易状态 `SUCCESS`, also when refunded since), and a refund line for each refund that
//! succeeded within D (交易状态 `REFUND`, at its success time, naming its order even when the
//! order was paid on an earlier day). The fee is 0.60% of the amount rounded to whole fen,
//! negative on a refund line. [`write_bill`] writes any rows as they come (benchmarks use it
//! for bills of millions of lines); the endpoints (`wechat.rs`, `v3.rs`) use [`SimState::bill`].

use std::io::{self, Write};

use axum::body::Bytes;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use sha1::{Digest, Sha1};

use super::state::{BillFaults, BillStats, SimState, lock};
use crate::domain::{RefundStatus, TradeState};
use crate::wxpay::time::china_standard_time;

/// The byte-order mark WeChat starts a bill with.
pub const BOM: &str = "\u{feff}";

/// The header of today's `ALL` bill (27 columns), as WeChat writes it.
pub const HEADER: &str = "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注";

/// The title of the summary line.
pub const SUMMARY_TITLE: &str =
    "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额";

/// The fee rate of every line, as written.
pub const FEE_RATE: &str = "0.60%";

/// One line of a bill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// 交易时间: when the order was paid, or when the refund succeeded.
    pub time: DateTime<Utc>,
    pub appid: String,
    pub mch_id: String,
    /// 特约商户号 (`0` when `None`).
    pub sub_mch_id: Option<String>,
    pub transaction_id: String,
    pub out_trade_no: String,
    /// 用户标识.
    pub openid: String,
    pub trade_type: String,
    /// 商品名称.
    pub body: String,
    /// 商户数据包.
    pub attach: String,
    pub kind: RowKind,
}

/// What a line is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowKind {
    /// The order was paid `total_fee` fen.
    Payment { total_fee: i64 },
    /// A refund of `refund_fee` fen succeeded.
    Refund {
        refund_id: String,
        out_refund_no: String,
        refund_fee: i64,
    },
}

/// The summary values of a written bill (fen, fees in thousandths of a fen).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// 总交易单数: every line, refunds included.
    pub rows: u64,
    /// 应结订单总金额 (= 订单总金额 here: no coupons).
    pub settlement_total_fee: i64,
    /// 退款总金额 (= 申请退款总金额 here).
    pub refund_fee: i64,
    /// 手续费总金额, in thousandths of a fen.
    pub fee_milli_fen: i64,
}

/// The fee of an amount: 0.60%, rounded to whole fen (half up).
pub fn fee_fen(amount_fen: i64) -> i64 {
    let sign = amount_fen.signum();
    let abs = i128::from(amount_fen).abs();
    let fee = (abs * 6 + 500) / 1000;
    sign * i64::try_from(fee).unwrap_or(i64::MAX)
}

/// Fen as yuan with 2 decimals (`-0.27`).
fn yuan(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    let abs = fen.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// Thousandths of a fen as yuan with 5 decimals (`-0.27000`).
fn yuan5(milli_fen: i64) -> String {
    let sign = if milli_fen < 0 { "-" } else { "" };
    let abs = milli_fen.unsigned_abs();
    format!("{sign}{}.{:05}", abs / 100_000, abs % 100_000)
}

/// A text as a field can hold it: no backtick, no line break.
fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(['`', '\r', '\n']) {
        s.replace('`', "'").replace(['\r', '\n'], " ").into()
    } else {
        s.into()
    }
}

/// Writes a bill of `rows` to `out` (pass `&mut w` to keep `w`): BOM, header, one line per
/// row in the order given, the summary title and values; CRLF after every line. Buffered
/// inside; memory does not grow with the rows. Returns the summary's values.
pub fn write_bill<W: Write, I: IntoIterator<Item = Row>>(out: W, rows: I) -> io::Result<Totals> {
    let mut out = io::BufWriter::with_capacity(64 * 1024, out);
    write!(out, "{BOM}{HEADER}\r\n")?;
    let cst = china_standard_time();
    let mut totals = Totals::default();
    for row in rows {
        let (amount, refund_id, out_refund_no, refund_fee, state, refund_type, refund_status) =
            match &row.kind {
                RowKind::Payment { total_fee } => (*total_fee, "0", "0", 0, "SUCCESS", "", ""),
                RowKind::Refund {
                    refund_id,
                    out_refund_no,
                    refund_fee,
                } => (
                    0,
                    refund_id.as_str(),
                    out_refund_no.as_str(),
                    *refund_fee,
                    "REFUND",
                    "ORIGINAL",
                    "SUCCESS",
                ),
            };
        let fee_milli = (fee_fen(amount) - fee_fen(refund_fee)).saturating_mul(1000);
        totals.rows += 1;
        totals.settlement_total_fee = totals.settlement_total_fee.saturating_add(amount);
        totals.refund_fee = totals.refund_fee.saturating_add(refund_fee);
        totals.fee_milli_fen = totals.fee_milli_fen.saturating_add(fee_milli);
        let time = row.time.with_timezone(&cst).format("%Y-%m-%d %H:%M:%S");
        let fields: [&dyn std::fmt::Display; 27] = [
            &time,
            &clean(&row.appid),
            &clean(&row.mch_id),
            &clean(row.sub_mch_id.as_deref().unwrap_or("0")),
            &"",
            &clean(&row.transaction_id),
            &clean(&row.out_trade_no),
            &clean(&row.openid),
            &clean(&row.trade_type),
            &state,
            &"OTHERS",
            &"CNY",
            &yuan(amount),
            &"0.00",
            &clean(refund_id),
            &clean(out_refund_no),
            &yuan(refund_fee),
            &"0.00",
            &refund_type,
            &refund_status,
            &clean(&row.body),
            &clean(&row.attach),
            &yuan5(fee_milli),
            &FEE_RATE,
            &yuan(amount),
            &yuan(refund_fee),
            &"",
        ];
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                out.write_all(b",")?;
            }
            write!(out, "`{field}")?;
        }
        out.write_all(b"\r\n")?;
    }
    write!(
        out,
        "{SUMMARY_TITLE}\r\n`{},`{},`{},`0.00,`{},`{},`{}\r\n",
        totals.rows,
        yuan(totals.settlement_total_fee),
        yuan(totals.refund_fee),
        yuan5(totals.fee_milli_fen),
        yuan(totals.settlement_total_fee),
        yuan(totals.refund_fee),
    )?;
    out.flush()?;
    Ok(totals)
}

/// A writer that hashes what goes through it (WeChat's `hash_value` is the SHA-1 of the text).
struct Sha1Writer<W> {
    inner: W,
    sha1: Sha1,
}

impl<W: Write> Write for Sha1Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha1.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A generated bill file.
#[derive(Debug, Clone)]
pub(crate) struct BillText {
    /// The text, or its gzip.
    pub bytes: Bytes,
    pub gzip: bool,
    /// The SHA-1 of the text (BOM included), lower-case hex.
    pub sha1: String,
}

/// What the bill of a day is, faults applied.
#[derive(Debug)]
pub(crate) enum BillOutcome {
    /// `No Bill Exist` / `NO_STATEMENT_EXIST`.
    NoBill,
    /// `Bill Creating` / `STATEMENT_CREATING`.
    Creating,
    File(BillText, BillFaults),
}

/// The first instant of Beijing day `date` and of the next one, in UTC.
fn beijing_day(date: NaiveDate) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let cst = china_standard_time();
    let start = cst
        .from_local_datetime(&date.and_hms_opt(0, 0, 0)?)
        .single()?;
    let end = cst
        .from_local_datetime(&date.succ_opt()?.and_hms_opt(0, 0, 0)?)
        .single()?;
    Some((start.with_timezone(&Utc), end.with_timezone(&Utc)))
}

/// Writes `rows` as a bill in memory, gzipped when asked, with the SHA-1 of its text.
pub(crate) fn render(rows: Vec<Row>, gzip: bool) -> io::Result<BillText> {
    let (bytes, sha1) = if gzip {
        let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut w = Sha1Writer {
            inner: encoder,
            sha1: Sha1::new(),
        };
        write_bill(&mut w, rows)?;
        (w.inner.finish()?, w.sha1.finalize())
    } else {
        let mut w = Sha1Writer {
            inner: Vec::new(),
            sha1: Sha1::new(),
        };
        write_bill(&mut w, rows)?;
        (w.inner, w.sha1.finalize())
    };
    Ok(BillText {
        bytes: Bytes::from(bytes),
        gzip,
        sha1: hex::encode(sha1),
    })
}

/// `2024-07-09` or `20240709`.
pub(crate) fn parse_bill_date(s: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .filter(|_| s.len() == 10)
        .or_else(|| {
            NaiveDate::parse_from_str(s, "%Y%m%d")
                .ok()
                .filter(|_| s.len() == 8)
        })
}

/// The SHA-1 of other bytes than the bill's (`wrong_hash`).
pub(crate) fn wrong_sha1(real: &str) -> String {
    hex::encode(Sha1::digest(format!("not {real}").as_bytes()))
}

impl SimState {
    /// The lines of merchant `mch_id`'s bill of Beijing day `date`, by time (then order
    /// number, payments first).
    pub fn bill_rows(&self, mch_id: &str, date: NaiveDate) -> Vec<Row> {
        let Some((start, end)) = beijing_day(date) else {
            return Vec::new();
        };
        let within = |t: DateTime<Utc>| start <= t && t < end;
        let sub_mch_id = self
            .merchants
            .get(mch_id)
            .and_then(|m| m.sub_mch_id.as_ref())
            .map(|s| s.as_str().to_owned());
        // Locked in the documented order: orders, then refunds.
        let orders = lock(&self.orders);
        let refunds = lock(&self.refunds);
        let mut rows = Vec::new();
        let line = |out_trade_no: &str, o: &super::state::SimOrder, time, kind| Row {
            time,
            appid: o.appid.clone(),
            mch_id: mch_id.to_owned(),
            sub_mch_id: sub_mch_id.clone(),
            transaction_id: o.transaction_id.clone().unwrap_or_default(),
            out_trade_no: out_trade_no.to_owned(),
            openid: o.openid.clone(),
            trade_type: o.trade_type.clone(),
            body: o.body.clone(),
            attach: o.attach.clone().unwrap_or_default(),
            kind,
        };
        for ((m, out_trade_no), o) in orders.iter() {
            let paid = matches!(o.state, TradeState::Success | TradeState::Refund);
            if m != mch_id || !paid || o.transaction_id.is_none() {
                continue;
            }
            if let Some(t) = o.time_end.filter(|t| within(*t)) {
                let total_fee = o.paid_fee.unwrap_or(o.total_fee);
                rows.push(line(out_trade_no, o, t, RowKind::Payment { total_fee }));
            }
        }
        for ((m, out_refund_no), r) in refunds.iter() {
            if m != mch_id || r.status != RefundStatus::Success {
                continue;
            }
            let Some(t) = r.success_time.filter(|t| within(*t)) else {
                continue;
            };
            let Some(o) = orders.get(&(m.clone(), r.out_trade_no.clone())) else {
                continue;
            };
            let kind = RowKind::Refund {
                refund_id: r.refund_id.clone(),
                out_refund_no: out_refund_no.clone(),
                refund_fee: r.refund_fee,
            };
            rows.push(line(&r.out_trade_no, o, t, kind));
        }
        rows.sort_by(|a, b| {
            let refund = |r: &Row| matches!(r.kind, RowKind::Refund { .. });
            (a.time, &a.out_trade_no, refund(a)).cmp(&(b.time, &b.out_trade_no, refund(b)))
        });
        rows
    }

    /// The bill WeChat answers for `mch_id`'s day `date` now: a `creating` fault first (one
    /// used up), then `no_bill`, then no bill for a day without lines, else the file.
    pub(crate) fn bill(
        &self,
        mch_id: &str,
        date: NaiveDate,
        gzip: bool,
    ) -> io::Result<BillOutcome> {
        let faults = {
            let mut all = lock(&self.bill_faults);
            let f = all.entry((mch_id.to_owned(), date)).or_default();
            if f.creating > 0 {
                f.creating -= 1;
                return Ok(BillOutcome::Creating);
            }
            *f
        };
        if faults.no_bill {
            return Ok(BillOutcome::NoBill);
        }
        let rows = self.bill_rows(mch_id, date);
        if rows.is_empty() {
            return Ok(BillOutcome::NoBill);
        }
        Ok(BillOutcome::File(render(rows, gzip)?, faults))
    }

    /// Replaces the faults of `mch_id`'s bill of `date`.
    pub fn set_bill_faults(&self, mch_id: &str, date: NaiveDate, faults: BillFaults) {
        lock(&self.bill_faults).insert((mch_id.to_owned(), date), faults);
    }

    /// Counts a `downloadbill` / `tradebill` request.
    pub(crate) fn count_bill_request(&self, mch_id: &str, date: NaiveDate) {
        lock(&self.bill_stats)
            .entry((mch_id.to_owned(), date))
            .or_default()
            .requests += 1;
    }

    /// Counts a served v3 download.
    pub(crate) fn count_bill_download(&self, mch_id: &str, date: NaiveDate) {
        lock(&self.bill_stats)
            .entry((mch_id.to_owned(), date))
            .or_default()
            .downloads += 1;
    }

    /// The counters of every bill asked for, by (mch_id, day).
    pub fn bill_stats(&self) -> Vec<((String, NaiveDate), BillStats)> {
        let mut all: Vec<_> = lock(&self.bill_stats)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(time: &str, kind: RowKind) -> Row {
        Row {
            time: DateTime::parse_from_rfc3339(time)
                .unwrap()
                .with_timezone(&Utc),
            appid: "wxd930ea5d5a258f4f".into(),
            mch_id: "10000100".into(),
            sub_mch_id: None,
            transaction_id: "4200000001".into(),
            out_trade_no: "o1".into(),
            openid: "oUser".into(),
            trade_type: "JSAPI".into(),
            body: "a`b\r\nc".into(),
            attach: String::new(),
            kind,
        }
    }

    #[test]
    fn fees_are_rounded_to_whole_fen() {
        assert_eq!(fee_fen(88), 1, "0.528 fen");
        assert_eq!(fee_fen(17), 0, "0.102 fen");
        assert_eq!(fee_fen(250), 2, "1.5 fen rounds half up");
        assert_eq!(fee_fen(5000), 30);
        assert_eq!(fee_fen(0), 0);
        assert_eq!(fee_fen(-5000), -30);
        assert_eq!(yuan5(-27_000), "-0.27000");
        assert_eq!(yuan(-1), "-0.01");
        assert_eq!(yuan(123_456), "1234.56");
    }

    #[test]
    fn a_bill_is_written_in_the_real_format_and_adds_up() {
        let mut out = Vec::new();
        let totals = write_bill(
            &mut out,
            [
                row(
                    "2024-07-09T10:06:33+08:00",
                    RowKind::Payment { total_fee: 6000 },
                ),
                row(
                    "2024-07-09T16:47:58+08:00",
                    RowKind::Refund {
                        refund_id: "5030".into(),
                        out_refund_no: "r1".into(),
                        refund_fee: 5000,
                    },
                ),
            ],
        )
        .unwrap();
        assert_eq!(
            totals,
            Totals {
                rows: 2,
                settlement_total_fee: 6000,
                refund_fee: 5000,
                fee_milli_fen: 36_000 - 30_000,
            }
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert_eq!(lines[0], format!("{BOM}{HEADER}"));
        assert_eq!(lines[0].split(',').count(), 27);
        assert_eq!(
            lines[1],
            "`2024-07-09 10:06:33,`wxd930ea5d5a258f4f,`10000100,`0,`,`4200000001,`o1,`oUser,`JSAPI,`SUCCESS,`OTHERS,`CNY,`60.00,`0.00,`0,`0,`0.00,`0.00,`,`,`a'b  c,`,`0.36000,`0.60%,`60.00,`0.00,`"
        );
        assert_eq!(
            lines[2],
            "`2024-07-09 16:47:58,`wxd930ea5d5a258f4f,`10000100,`0,`,`4200000001,`o1,`oUser,`JSAPI,`REFUND,`OTHERS,`CNY,`0.00,`0.00,`5030,`r1,`50.00,`0.00,`ORIGINAL,`SUCCESS,`a'b  c,`,`-0.30000,`0.60%,`0.00,`50.00,`"
        );
        assert_eq!(lines[3], SUMMARY_TITLE);
        assert_eq!(lines[4], "`2,`60.00,`50.00,`0.00,`0.06000,`60.00,`50.00");
        assert_eq!(lines[5], "", "ends with CRLF");
        // The header is the one of WeChat's official sample, byte for byte.
        let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/wxpay-bills/v3_all_official_sample_bom_crlf_45rows.csv");
        if let Ok(sample) = std::fs::read_to_string(sample) {
            assert!(sample.starts_with(&format!("{BOM}{HEADER}\r\n")));
            assert!(sample.contains(&format!("\r\n{SUMMARY_TITLE}\r\n")));
        }
    }

    #[test]
    fn gzip_bills_hash_their_text() {
        let rows = vec![row(
            "2024-07-09T10:06:33+08:00",
            RowKind::Payment { total_fee: 1 },
        )];
        let plain = render(rows.clone(), false).unwrap();
        let gz = render(rows, true).unwrap();
        assert_eq!(&gz.bytes[..2], &[0x1f, 0x8b]);
        assert_eq!(plain.sha1, hex::encode(Sha1::digest(&plain.bytes)));
        assert_eq!(gz.sha1, plain.sha1, "the hash is of the decompressed text");
        let mut text = Vec::new();
        io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz.bytes[..]), &mut text).unwrap();
        assert_eq!(text, plain.bytes);
        assert_ne!(wrong_sha1(&plain.sha1), plain.sha1);
        assert_eq!(wrong_sha1(&plain.sha1).len(), 40);
    }

    #[test]
    fn bill_days_are_beijing_days() {
        let (start, end) = beijing_day(NaiveDate::from_ymd_opt(2024, 7, 9).unwrap()).unwrap();
        assert_eq!(start.to_rfc3339(), "2024-07-08T16:00:00+00:00");
        assert_eq!(end.to_rfc3339(), "2024-07-09T16:00:00+00:00");
        assert_eq!(
            parse_bill_date("20240709"),
            NaiveDate::from_ymd_opt(2024, 7, 9)
        );
        assert_eq!(
            parse_bill_date("2024-07-09"),
            NaiveDate::from_ymd_opt(2024, 7, 9)
        );
        for bad in ["2024-7-9", "202407091", "2024-02-30", "", "x"] {
            assert_eq!(parse_bill_date(bad), None, "{bad}");
        }
    }
}

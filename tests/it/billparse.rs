//! Every bill of ../shared/fixtures/wxpay-bills (copied verbatim into tests/fixtures/wxpay-bills)
//! read the way its README says: the trade bills parse (rows, payments and refunds, family and
//! type, whether the summary adds up), the others are refused with their reason. The error
//! replies (XML, JSON) are not bills: the fetching suite reads them.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use wxpay_reconciler::bill::{
    BillError, BillReader, BillRow, BillType, Family, MilliFen, RowKind, Summary, SummaryCheck,
    open_text, sha1_hex_of,
};
use wxpay_reconciler::domain::Fen;

fn bills_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wxpay-bills")
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A trade bill that parses.
    Bill {
        family: Family,
        bill_type: BillType,
        payments: usize,
        refunds: usize,
        adds_up: bool,
    },
    /// Refused on this line, the reason containing this.
    Refused(u64, &'static str),
    /// Not a bill: an error reply of the download API (read by the fetching suite).
    NotABill,
}

use Expect::{Bill, NotABill, Refused};

const FUND_FLOW: Expect = Refused(1, "not a trade bill: a fund-flow bill");

/// Every file of the directory, as the README's table tells it.
const BILLS: &[(&str, Expect)] = &[
    (
        "v3_all_official_sample_bom_crlf_45rows.csv",
        Bill {
            family: Family::Current,
            bill_type: BillType::All,
            payments: 31,
            refunds: 14,
            adds_up: true,
        },
    ),
    (
        "v3_all_3rows_gunsluo.csv",
        Bill {
            family: Family::Current,
            bill_type: BillType::All,
            payments: 3,
            refunds: 0,
            adds_up: true,
        },
    ),
    (
        "v3_all_3rows_gunsluo.csv.gz",
        Bill {
            family: Family::Current,
            bill_type: BillType::All,
            payments: 3,
            refunds: 0,
            adds_up: true,
        },
    ),
    ("v3_fundflow_gunsluo_summary_mismatch.csv", FUND_FLOW),
    ("v3_fundflow_gunsluo_summary_mismatch.csv.gz", FUND_FLOW),
    (
        "v2_all_old_format_bom_6rows_apo_soft.txt",
        Bill {
            family: Family::Old,
            bill_type: BillType::All,
            payments: 6,
            refunds: 0,
            adds_up: true,
        },
    ),
    (
        "v2_refund_old_format_3rows_apo_soft.txt",
        Bill {
            family: Family::Old,
            bill_type: BillType::Refund,
            payments: 0,
            refunds: 3,
            adds_up: true,
        },
    ),
    (
        "v2_all_old_format_3refunds_apo_soft.txt",
        Bill {
            family: Family::Old,
            bill_type: BillType::All,
            payments: 0,
            refunds: 3,
            adds_up: true,
        },
    ),
    (
        "v2_all_bom_partial_refunds_daxpay.txt",
        Bill {
            family: Family::Current,
            bill_type: BillType::All,
            payments: 1,
            refunds: 2,
            adds_up: true,
        },
    ),
    (
        "v2_all_excerpt_refund_of_older_order_xjryanse.txt",
        Bill {
            family: Family::Current,
            bill_type: BillType::All,
            payments: 1,
            refunds: 1,
            adds_up: false,
        },
    ),
    (
        "v2_all_wxjava_masked_summary_mismatch.txt",
        Bill {
            family: Family::Current,
            bill_type: BillType::All,
            payments: 1,
            refunds: 0,
            adds_up: false,
        },
    ),
    (
        "v2_all_old_format_doc_sample_wxjava1275.txt",
        Bill {
            family: Family::Old,
            bill_type: BillType::All,
            payments: 2,
            refunds: 0,
            adds_up: true,
        },
    ),
    (
        "v2_success_wxjava_masked_summary_mismatch.txt",
        Bill {
            family: Family::Current,
            bill_type: BillType::Success,
            payments: 1,
            refunds: 0,
            adds_up: false,
        },
    ),
    (
        "v2_refund_wxjava_masked_summary_mismatch.txt",
        Bill {
            family: Family::Current,
            bill_type: BillType::Refund,
            payments: 0,
            refunds: 1,
            adds_up: false,
        },
    ),
    (
        "v2_sandbox_all_tsv_excel_mangled_elixir.txt",
        Refused(1, "do not start with a backtick"),
    ),
    ("v2_fundflow_doc_sample_elixir.txt", FUND_FLOW),
    ("v2_error_invalid_bill_date_apo_soft.xml", NotABill),
    ("v2_error_invalid_bill_type_apo_soft.xml", NotABill),
    ("v2_error_no_bill_exist_apo_soft.xml", NotABill),
    ("v2_error_no_bill_exist_20002_community.xml", NotABill),
    ("v3_error_no_statement_exist.json", NotABill),
    ("v3_error_statement_creating.json", NotABill),
    ("v3_tradebill_reply_official_doc.json", NotABill),
];

/// A bill read whole through `open_text` (gzip or not), as a test may.
struct Parsed {
    reader: BillReader<Box<dyn std::io::BufRead>>,
    rows: Vec<BillRow>,
}

fn open(name: &str) -> Result<BillReader<Box<dyn std::io::BufRead>>, BillError> {
    let file = File::open(bills_dir().join(name)).unwrap();
    BillReader::new(open_text(file).unwrap())
}

fn read(name: &str) -> Result<Parsed, BillError> {
    let mut reader = open(name)?;
    let mut rows = Vec::new();
    while let Some(row) = reader.next_row()? {
        rows.push(row);
    }
    Ok(Parsed { reader, rows })
}

fn bill(name: &str) -> Parsed {
    read(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn summary(r: &Parsed) -> &Summary {
    r.reader.summary().expect("a summary")
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn fen(v: i64) -> Fen {
    Fen::new(v).unwrap()
}

fn refunds(rows: &[BillRow]) -> Vec<(&BillRow, &wxpay_reconciler::bill::BillRefund)> {
    rows.iter()
        .filter_map(|r| match &r.kind {
            RowKind::Refund(f) => Some((r, f)),
            RowKind::Payment => None,
        })
        .collect()
}

#[test]
fn every_fixture_file_is_classified() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(bills_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "README.md" && !n.starts_with('.'))
        .collect();
    let listed: BTreeSet<String> = BILLS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        on_disk, listed,
        "a bill fixture was added or removed: classify it here"
    );
}

#[test]
fn fixtures_are_a_verbatim_copy_of_the_shared_ones() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/wxpay-bills");
    if !shared.is_dir() {
        eprintln!("../shared is not beside this clone; comparing nothing");
        return;
    }
    for name in BILLS.iter().map(|(n, _)| *n).chain(["README.md"]) {
        let ours = std::fs::read(bills_dir().join(name)).unwrap();
        let theirs = std::fs::read(shared.join(name)).unwrap();
        assert!(ours == theirs, "{name} differs from ../shared");
    }
}

#[test]
fn every_bill_parses_or_is_refused_as_its_readme_says() {
    for &(name, expect) in BILLS {
        match expect {
            NotABill => {}
            Refused(line, why) => {
                let e = read(name)
                    .err()
                    .unwrap_or_else(|| panic!("{name} was read"));
                assert_eq!(e.line(), Some(line), "{name}: {e}");
                assert!(e.to_string().contains(why), "{name}: {e}");
                assert!(!e.is_retryable(), "{name}");
            }
            Bill {
                family,
                bill_type,
                payments,
                refunds: refund_rows,
                adds_up,
            } => {
                let r = bill(name);
                assert_eq!(r.reader.family(), family, "{name}");
                assert_eq!(r.reader.bill_type(), bill_type, "{name}");
                let got_refunds = refunds(&r.rows).len();
                assert_eq!(
                    (r.rows.len() - got_refunds, got_refunds),
                    (payments, refund_rows),
                    "{name}"
                );
                assert_eq!(r.reader.rows_read(), r.rows.len() as u64, "{name}");
                // Lines are numbered from the header, one a row.
                for (i, row) in r.rows.iter().enumerate() {
                    assert_eq!(row.line, i as u64 + 2, "{name}");
                }
                match (r.reader.check(), adds_up) {
                    (SummaryCheck::AddsUp, true) => {}
                    (SummaryCheck::Differs(d), false) => {
                        assert!(!d.is_empty(), "{name}");
                        assert!(d[0].starts_with("总交易单数 says "), "{name}: {d:?}");
                    }
                    (other, _) => panic!("{name}: {other:?}"),
                }
            }
        }
    }
}

#[test]
fn the_official_v3_sample_reads_exactly() {
    let r = bill("v3_all_official_sample_bom_crlf_45rows.csv");
    let s = summary(&r);
    assert_eq!(s.rows, 45, "written 45.0");
    assert_eq!(s.settlement_total_fee, fen(47));
    assert_eq!(s.total_fee, Some(fen(47)));
    assert_eq!(s.settlement_refund_fee, fen(14));
    assert_eq!(s.refund_fee, Some(fen(14)));
    assert_eq!(s.coupon_refund_fee, Some(Fen::ZERO));
    assert_eq!(s.fee, MilliFen(8_000), "written 0.08");
    let fees: i64 = r.rows.iter().map(|row| row.fee.get()).sum();
    assert_eq!(fees, 8_000);
    let first = &r.rows[0];
    assert_eq!(first.trade_time, utc("2019-02-18T21:01:46Z"));
    assert_eq!(first.out_trade_no, "autotest_20190216081946_82335");
    assert!(first.extra.is_empty());
    let RowKind::Refund(f) = &first.kind else {
        panic!("{first:?}");
    };
    assert_eq!(f.out_refund_no, "REF4200000263201902167700963919");
    assert_eq!((f.refund_fee, f.settlement_refund_fee), (fen(1), fen(1)));
    // 应结订单金额 0.03 with 代金券金额 0.01 (a recharge coupon: still settled) and 订单金额 0.03.
    let last = r.rows.last().unwrap();
    assert_eq!(last.line, 46);
    assert_eq!(last.trade_state, "SUCCESS");
    assert_eq!(
        (last.total_fee, last.settlement_total_fee),
        (fen(3), fen(3))
    );
    assert_eq!(last.fee, MilliFen(1_000));
    assert_eq!(last.rate, "39.00%");
    assert_eq!(last.sub_mch_id, None, "`0`");
}

#[test]
fn a_refund_of_an_older_order_keeps_its_own_columns() {
    let r = bill("v2_all_excerpt_refund_of_older_order_xjryanse.txt");
    let refund = &r.rows[0];
    assert_eq!(refund.trade_time, utc("2024-07-09T08:47:58Z"));
    assert_eq!(refund.transaction_id, "4200002166202406250324636876");
    assert_eq!(refund.out_trade_no, "5617363390111199232");
    assert_eq!(refund.fee, MilliFen(-27_000));
    let RowKind::Refund(f) = &refund.kind else {
        panic!("{refund:?}");
    };
    assert_eq!(f.refund_id, "50302709992024070991956632208");
    assert_eq!(f.out_refund_no, "5622435300878286848");
    assert_eq!(
        (f.refund_fee, f.settlement_refund_fee),
        (fen(5000), fen(5000))
    );
    assert_eq!(f.status, "SUCCESS");
    assert_eq!((f.applied_at, f.succeeded_at), (None, None), "an ALL bill");
    let payment = &r.rows[1];
    assert_eq!(payment.kind, RowKind::Payment);
    assert_eq!(payment.total_fee, fen(6000));
    assert_eq!(payment.fee, MilliFen(32_000));
    // An excerpt: its summary is the whole day's.
    let SummaryCheck::Differs(d) = r.reader.check() else {
        panic!("{:?}", r.reader.check());
    };
    assert_eq!(d[0], "总交易单数 says 29, the rows are 2");
    assert!(
        d.contains(&"手续费总金额 says 4.33000, the rows add up to 0.05000".to_owned()),
        "{d:?}"
    );
}

#[test]
fn the_apo_soft_refund_bill_and_its_all_bill_tell_the_same_refunds() {
    let refund_bill = bill("v2_refund_old_format_3rows_apo_soft.txt");
    let first = &refund_bill.rows[0];
    // 交易时间 here is the original payment's time.
    assert_eq!(first.trade_time, utc("2018-08-20T06:40:09Z"));
    assert_eq!(first.sub_mch_id.as_deref(), Some("1511458511"));
    let RowKind::Refund(f) = &first.kind else {
        panic!("{first:?}");
    };
    assert_eq!(f.applied_at, Some(utc("2018-08-21T10:13:10Z")));
    assert_eq!(f.succeeded_at, Some(utc("2018-08-21T10:13:12Z")));
    assert_eq!(f.out_refund_no, "1012413262018082023005236551534846383");
    assert_eq!((f.refund_fee, f.settlement_refund_fee), (fen(1), fen(1)));
    assert_eq!(summary(&refund_bill).settlement_refund_fee, fen(3));
    assert_eq!(summary(&refund_bill).total_fee, None, "old format");

    // The ALL bill of the day: the same refunds, its 交易时间 = their 退款成功时间.
    let all = bill("v2_all_old_format_3refunds_apo_soft.txt");
    let by_refund = refunds(&refund_bill.rows);
    let in_all = refunds(&all.rows);
    assert_eq!(in_all.len(), 3);
    for (row, f) in in_all {
        let (_, same) = by_refund
            .iter()
            .find(|(_, g)| g.out_refund_no == f.out_refund_no)
            .unwrap_or_else(|| panic!("{} not in the REFUND bill", f.out_refund_no));
        assert_eq!(
            Some(row.trade_time),
            same.succeeded_at,
            "{}",
            f.out_refund_no
        );
        assert_eq!((f.applied_at, f.succeeded_at), (None, None));
        assert_eq!(f.refund_fee, same.refund_fee);
    }
}

#[test]
fn old_format_payments_read_exactly() {
    let r = bill("v2_all_old_format_bom_6rows_apo_soft.txt");
    let amounts: Vec<i64> = r.rows.iter().map(|row| row.total_fee.get()).collect();
    assert_eq!(amounts, [88, 17, 17, 17, 17, 17]);
    assert!(
        r.rows
            .iter()
            .all(|row| row.total_fee == row.settlement_total_fee)
    );
    assert_eq!(
        r.rows[0].fee,
        MilliFen(1_000),
        "0.88 at 0.6%, rounded to a fen"
    );
    assert_eq!(r.rows[1].fee, MilliFen(0));
    assert_eq!(r.rows[0].trade_time, utc("2015-10-28T05:52:05Z"));
    assert_eq!(summary(&r).settlement_total_fee, fen(173));
    assert_eq!(summary(&r).coupon_refund_fee, Some(Fen::ZERO));

    // The old documentation's sample: full-width colons, `0.0` amounts, a `0` fee.
    let doc = bill("v2_all_old_format_doc_sample_wxjava1275.txt");
    assert_eq!(doc.rows[0].trade_time, utc("2014-11-10T08:33:45Z"));
    assert_eq!(doc.rows[1].trade_time, utc("2014-11-10T08:46:14Z"));
    assert_eq!(doc.rows[0].fee, MilliFen(0));
    assert_eq!(doc.rows[0].trade_type, "MICROPAY");
    assert_eq!(summary(&doc).settlement_total_fee, fen(2));
}

#[test]
fn partial_refunds_of_one_payment_read_as_their_own_rows() {
    let r = bill("v2_all_bom_partial_refunds_daxpay.txt");
    assert!(
        r.rows
            .iter()
            .all(|row| row.transaction_id == "4200002086202401160745964084")
    );
    let f = refunds(&r.rows);
    assert_eq!(f[0].1.out_refund_no, "R1747268742516264960");
    assert_eq!(f[1].1.out_refund_no, "R1747275041228390400");
    assert!(f.iter().all(|(_, g)| g.refund_fee == fen(1)));
    assert_eq!(r.rows[0].total_fee, fen(2));
    assert_eq!(summary(&r).refund_fee, Some(fen(2)));
}

#[test]
fn the_masked_wxjava_bills_parse_and_do_not_add_up() {
    let all = bill("v2_all_wxjava_masked_summary_mismatch.txt");
    assert_eq!(
        all.rows[0].kind,
        RowKind::Payment,
        "its `0` refund ids ignored"
    );
    assert_eq!(
        all.reader.check(),
        SummaryCheck::Differs(vec![
            "总交易单数 says 48, the rows are 1".into(),
            "应结订单总金额 says 5.76, the rows add up to 6.00".into(),
            "退款总金额 says 1.42, the rows add up to 0.00".into(),
            "订单总金额 says 5.76, the rows add up to 6.00".into(),
            "申请退款总金额 says 1.42, the rows add up to 0.00".into(),
            "手续费总金额 says 0.01000, the rows add up to 0.04000".into(),
        ])
    );
    let success = bill("v2_success_wxjava_masked_summary_mismatch.txt");
    assert_eq!(summary(&success).rows, 31);
    let refund = bill("v2_refund_wxjava_masked_summary_mismatch.txt");
    assert_eq!(summary(&refund).fee, MilliFen(-2_000));
    let row = &refund.rows[0];
    let RowKind::Refund(f) = &row.kind else {
        panic!("{row:?}");
    };
    assert_eq!(
        f.applied_at,
        Some(row.trade_time),
        "交易时间 = 退款申请时间 here"
    );
    assert_eq!(f.succeeded_at, Some(utc("2019-07-23T12:53:40Z")));
    assert_eq!(f.refund_fee, fen(1));
}

#[test]
fn the_gzip_bill_is_the_plain_one_and_the_sha1_is_the_readmes() {
    let plain = bill("v3_all_3rows_gunsluo.csv");
    let gz = bill("v3_all_3rows_gunsluo.csv.gz");
    assert_eq!(plain.rows, gz.rows);
    assert_eq!(summary(&plain), summary(&gz));
    assert_eq!(
        plain.rows[1].trade_time,
        utc("2021-01-28T07:35:18Z"),
        "not in time order"
    );

    let dir = bills_dir();
    let text = |name: &str| {
        let mut v = Vec::new();
        open_text(File::open(dir.join(name)).unwrap())
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        v
    };
    assert_eq!(
        text("v3_all_3rows_gunsluo.csv.gz"),
        text("v3_all_3rows_gunsluo.csv")
    );
    assert_eq!(
        text("v3_fundflow_gunsluo_summary_mismatch.csv.gz"),
        text("v3_fundflow_gunsluo_summary_mismatch.csv")
    );
    for (name, sha1) in [
        (
            "v3_all_official_sample_bom_crlf_45rows.csv",
            "9bb6cd819be348f17a9cbcedddc8eb62fefbd790",
        ),
        (
            "v3_all_3rows_gunsluo.csv",
            "b18b51eb64422040e5ad738d47b358a40b1a7997",
        ),
        (
            "v3_all_3rows_gunsluo.csv.gz",
            "b18b51eb64422040e5ad738d47b358a40b1a7997",
        ),
    ] {
        let got = sha1_hex_of(open_text(File::open(dir.join(name)).unwrap()).unwrap()).unwrap();
        assert_eq!(got, sha1, "{name}");
    }
}

/// The way a downloaded file is used: its hash checked, then its rows read, from one file.
#[test]
fn one_file_is_hashed_then_parsed_in_two_passes() {
    for name in ["v3_all_3rows_gunsluo.csv.gz", "v3_all_3rows_gunsluo.csv"] {
        let mut file = File::open(bills_dir().join(name)).unwrap();
        let sha1 = sha1_hex_of(open_text(&mut file).unwrap()).unwrap();
        assert!(sha1.eq_ignore_ascii_case("B18B51EB64422040E5AD738D47B358A40B1A7997"));
        file.rewind().unwrap();
        let mut reader = BillReader::new(open_text(file).unwrap()).unwrap();
        let mut n = 0;
        while reader.next_row().unwrap().is_some() {
            n += 1;
        }
        assert_eq!((n, reader.check()), (3, SummaryCheck::AddsUp), "{name}");
    }
}

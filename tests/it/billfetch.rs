//! Fetching daily trade bills through the [`Gateway`] from the real simulator over HTTP: v2
//! (MD5, HMAC-SHA256, and under `/sandboxnew/`) and v3. A day with payments and a refund of an
//! order paid the day before, read back line by line in WeChat's format (BOM, CRLF, header,
//! backticks, the expected lines, a summary that adds up; v3: the SHA-1 of the decompressed text
//! is `hash_value`); a quiet day is an empty bill; `Bill Creating` twice, then the file; a wrong
//! hash; an expired download URL; a download URL on another host never requested; the error
//! fixtures of ../shared/fixtures/wxpay-bills through the real clients.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::StatusCode;
use chrono::{NaiveDate, Utc};
use serde_json::{Value, json};
use sha1::{Digest, Sha1};
use tokio::net::TcpListener;
use wxpay_reconciler::gateway::{BillAnswer, BillFile, Failure, Gateway, GatewayError, Merchant};
use wxpay_reconciler::sim::v3::{TEST_PUBLIC_KEY_ID, test_v3_merchant};
use wxpay_reconciler::wxpay::ClientConfig;
use wxpay_reconciler::wxpay::v3::PrivateKey;
use wxpay_reconciler::wxpay::v3::auth::response_message;

use crate::helpers::{TestSim, both_merchants, replay_server, unique_otn};

const HEADER: &str = "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注";
const SUMMARY_TITLE: &str =
    "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额";

fn gateway(url: &str) -> Gateway {
    let mut cfg = ClientConfig::new(url);
    cfg.timeout = std::time::Duration::from_millis(1500);
    Gateway::new(cfg).unwrap()
}

fn day(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

fn shared_fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wxpay-bills")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every merchant the simulator serves by default: the two v2 ones and the v3 one.
fn all_merchants() -> Vec<Merchant> {
    let mut all = both_merchants().to_vec();
    all.push(test_v3_merchant().unwrap());
    all
}

/// A bill file's text, decompressed when gzip.
fn text_of(mut bill: BillFile) -> Vec<u8> {
    let mut raw = Vec::new();
    bill.file.read_to_end(&mut raw).unwrap();
    assert_eq!(raw.len() as u64, bill.bytes);
    assert_eq!(bill.gzip, raw.starts_with(&[0x1f, 0x8b]));
    if !bill.gzip {
        return raw;
    }
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut text)
        .unwrap();
    text
}

fn sha1_hex(bytes: &[u8]) -> String {
    hex::encode(Sha1::digest(bytes))
}

fn file(answer: Result<BillAnswer, GatewayError>) -> BillFile {
    match answer {
        Ok(BillAnswer::File(f)) => f,
        other => panic!("expected a bill file, got {other:?}"),
    }
}

/// A bill read back: the header, the data lines' fields (backticks removed), the summary.
struct Bill {
    rows: Vec<Vec<String>>,
    summary: Vec<String>,
}

impl Bill {
    /// Reads WeChat's current ALL format strictly: BOM, CRLF everywhere (no bare LF), the
    /// 27-column header, every data field after a backtick, 27 of them, then the summary.
    fn read(text: &[u8]) -> Bill {
        let text = std::str::from_utf8(text).expect("UTF-8");
        let body = text.strip_prefix('\u{feff}').expect("a BOM");
        assert!(body.ends_with("\r\n"), "ends with CRLF");
        assert_eq!(
            body.matches('\n').count(),
            body.matches("\r\n").count(),
            "CRLF only"
        );
        let lines: Vec<&str> = body.trim_end_matches("\r\n").split("\r\n").collect();
        assert!(lines.len() >= 3, "{lines:?}");
        assert_eq!(lines[0], HEADER);
        let n = lines.len();
        assert_eq!(lines[n - 2], SUMMARY_TITLE);
        let fields = |line: &str| -> Vec<String> {
            let line = line
                .strip_prefix('`')
                .unwrap_or_else(|| panic!("no backtick: {line}"));
            line.split(",`").map(str::to_owned).collect()
        };
        let rows: Vec<Vec<String>> = lines[1..n - 2].iter().map(|l| fields(l)).collect();
        for r in &rows {
            assert_eq!(r.len(), 27, "{r:?}");
        }
        let summary = fields(lines[n - 1]);
        assert_eq!(summary.len(), 7);
        Bill { rows, summary }
    }

    /// The line of `out_trade_no` with 交易状态 `state`.
    fn row(&self, out_trade_no: &str, state: &str) -> &[String] {
        let found: Vec<&Vec<String>> = self
            .rows
            .iter()
            .filter(|r| r[6] == out_trade_no && r[9] == state)
            .collect();
        assert_eq!(found.len(), 1, "{out_trade_no} {state}: {:?}", self.rows);
        found[0]
    }
}

/// Creates an order at the simulator and pays it at `paid_at` (RFC 3339); its transaction_id.
async fn paid(
    sim: &TestSim,
    m: &Merchant,
    prefix: &str,
    fee: i64,
    paid_at: &str,
) -> (String, String) {
    let n = unique_otn(prefix);
    sim.create_order(m, &n, fee).await;
    let tx = sim
        .pay(m, &n, json!({"notify": "drop", "paid_at": paid_at}))
        .await;
    (n.as_str().to_owned(), tx)
}

async fn refund(sim: &TestSim, m: &Merchant, order: &str, body: Value) -> (u16, Value) {
    sim.control(
        "POST",
        &format!("/_sim/orders/{}/{order}/refunds", m.mch_id),
        body,
    )
    .await
}

async fn bill_faults(sim: &TestSim, m: &Merchant, date: &str, body: Value) {
    let (status, body) = sim
        .control("PUT", &format!("/_sim/bills/{}/{date}", m.mch_id), body)
        .await;
    assert_eq!(status, 200, "{body}");
}

/// One merchant's day: payments on the day, at its edges and beside it, a refund (succeeded on
/// the day) of an order paid the day before, a refund still processing, an unpaid order.
async fn a_day_of_one_merchant(sim: &TestSim, gw: &Gateway, m: &Merchant) {
    let mch = m.mch_id.as_str();
    let (older, older_tx) = paid(sim, m, "bo", 1000, "2024-07-08T12:00:00+08:00").await;
    let (status, r) = refund(
        sim,
        m,
        &older,
        json!({"out_refund_no": format!("{older}R"), "refund_fee": 300, "outcome": "SUCCESS",
               "success_time": "2024-07-09T09:15:00+08:00"}),
    )
    .await;
    assert_eq!(status, 201, "{r}");
    let refund_id = r["refund_id"].as_str().unwrap().to_owned();
    let (morning, morning_tx) = paid(sim, m, "bm", 6000, "2024-07-09T10:06:33+08:00").await;
    let (status, _) = refund(
        sim,
        m,
        &morning,
        json!({"out_refund_no": format!("{morning}R"), "refund_fee": 500, "outcome": "PROCESSING"}),
    )
    .await;
    assert_eq!(status, 201);
    let (midnight, _) = paid(sim, m, "bl", 250, "2024-07-09T23:59:59+08:00").await;
    let (next_day, _) = paid(sim, m, "bn", 77, "2024-07-10T00:00:00+08:00").await;
    let unpaid = unique_otn("bu");
    sim.create_order(m, &unpaid, 99).await;

    let f = file(gw.download_bill(m, day("2024-07-09")).await);
    assert!(f.gzip, "GZIP was asked for");
    let sha1 = f.sha1.clone();
    let text = text_of(f);
    match m.api() {
        wxpay_reconciler::gateway::Api::V3 => {
            assert_eq!(
                sha1,
                Some(sha1_hex(&text)),
                "hash_value is the SHA-1 of the text"
            );
        }
        wxpay_reconciler::gateway::Api::V2 => assert_eq!(sha1, None, "v2 gives no hash"),
    }
    let bill = Bill::read(&text);
    assert_eq!(bill.rows.len(), 3, "{:?}", bill.rows);
    let appid = m.appid.as_str();

    // The refund, at its success time, of the order paid the day before.
    let r = bill.row(&older, "REFUND");
    assert_eq!(r[0], "2024-07-09 09:15:00");
    assert_eq!(&r[1..4], [appid, mch, "0"]);
    assert_eq!(r[5], older_tx);
    assert_eq!(&r[11..14], ["CNY", "0.00", "0.00"]);
    let out_refund_no = format!("{older}R");
    assert_eq!(
        &r[14..20],
        [
            &refund_id,
            &out_refund_no,
            "3.00",
            "0.00",
            "ORIGINAL",
            "SUCCESS"
        ]
    );
    assert_eq!(&r[22..27], ["-0.02000", "0.60%", "0.00", "3.00", ""]);

    let p = bill.row(&morning, "SUCCESS");
    assert_eq!(p[0], "2024-07-09 10:06:33");
    assert_eq!(p[5], morning_tx);
    assert_eq!(p[8], "JSAPI");
    assert_eq!(
        &p[10..20],
        [
            "OTHERS", "CNY", "60.00", "0.00", "0", "0", "0.00", "0.00", "", ""
        ]
    );
    assert_eq!(&p[22..27], ["0.36000", "0.60%", "60.00", "0.00", ""]);
    let late = bill.row(&midnight, "SUCCESS");
    assert_eq!(late[0], "2024-07-09 23:59:59");
    assert_eq!(late[12], "2.50");
    assert_eq!(late[22], "0.02000", "1.5 fen rounds to 2");
    assert!(
        bill.rows
            .iter()
            .all(|r| r[6] != next_day && r[6] != unpaid.as_str())
    );
    let times: Vec<&str> = bill.rows.iter().map(|r| r[0].as_str()).collect();
    assert!(times.is_sorted(), "{times:?}");

    // 3 lines, 60.00 + 2.50 paid, 3.00 refunded, fees 0.36 + 0.02 - 0.02.
    assert_eq!(
        bill.summary,
        ["3", "62.50", "3.00", "0.00", "0.36000", "62.50", "3.00"]
    );

    // The day before: the older order's payment, SUCCESS although refunded since.
    let before = Bill::read(&text_of(file(gw.download_bill(m, day("2024-07-08")).await)));
    assert_eq!(before.rows.len(), 1);
    assert_eq!(before.row(&older, "SUCCESS")[12], "10.00");
    assert_eq!(
        before.summary,
        ["1", "10.00", "0.00", "0.00", "0.06000", "10.00", "0.00"]
    );

    // Counted per merchant and day.
    let (_, stats) = sim.control("GET", "/_sim/stats", json!({})).await;
    assert_eq!(stats["bills"][format!("{mch}/2024-07-09")], 1, "{stats}");
    let downloads = &stats["bill_downloads"][format!("{mch}/2024-07-09")];
    match m.api() {
        wxpay_reconciler::gateway::Api::V3 => assert_eq!(downloads, 1),
        wxpay_reconciler::gateway::Api::V2 => assert_eq!(downloads, 0),
    }
}

#[tokio::test]
async fn v2_and_v3_bills_hold_the_days_payments_and_refunds_in_wechats_format() {
    for m in all_merchants() {
        // A simulator each: the bill of a day is all of that merchant's day.
        let sim = TestSim::start().await;
        a_day_of_one_merchant(&sim, &gateway(&sim.url()), &m).await;
        sim.stop().await;
    }
}

#[tokio::test]
async fn the_sandbox_serves_v2_bills_too() {
    let sim = TestSim::start().await;
    let [m, _] = both_merchants();
    let (n, _) = paid(&sim, &m, "sb", 5, "2024-07-09T08:00:00+08:00").await;
    let gw = gateway(&format!("{}/sandboxnew", sim.url()));
    let bill = Bill::read(&text_of(file(
        gw.download_bill(&m, day("2024-07-09")).await,
    )));
    assert_eq!(
        bill.row(&n, "SUCCESS")[22],
        "0.00000",
        "0.03 fen rounds to 0"
    );
    sim.stop().await;
}

#[tokio::test]
async fn a_quiet_day_is_an_empty_bill_and_no_bill_overrides_a_busy_one() {
    let sim = TestSim::start().await;
    let gw = gateway(&sim.url());
    for m in all_merchants() {
        assert!(
            matches!(
                gw.download_bill(&m, day("2024-07-01")).await,
                Ok(BillAnswer::Empty)
            ),
            "{}",
            m.mch_id
        );
        paid(&sim, &m, "nb", 100, "2024-07-02T12:00:00+08:00").await;
        bill_faults(&sim, &m, "2024-07-02", json!({"no_bill": true})).await;
        assert!(matches!(
            gw.download_bill(&m, day("2024-07-02")).await,
            Ok(BillAnswer::Empty)
        ));
        bill_faults(&sim, &m, "20240702", json!({})).await;
        file(gw.download_bill(&m, day("2024-07-02")).await);
    }
    sim.stop().await;
}

#[tokio::test]
async fn bill_creating_twice_then_the_file() {
    let sim = TestSim::start().await;
    let gw = gateway(&sim.url());
    for m in all_merchants() {
        let (n, _) = paid(&sim, &m, "bc", 100, "2024-07-03T12:00:00+08:00").await;
        bill_faults(&sim, &m, "2024-07-03", json!({"creating": 2})).await;
        for _ in 0..2 {
            assert!(matches!(
                gw.download_bill(&m, day("2024-07-03")).await,
                Ok(BillAnswer::NotReady)
            ));
        }
        let bill = Bill::read(&text_of(file(
            gw.download_bill(&m, day("2024-07-03")).await,
        )));
        bill.row(&n, "SUCCESS");
        let (_, stats) = sim.control("GET", "/_sim/stats", json!({})).await;
        assert_eq!(stats["bills"][format!("{}/2024-07-03", m.mch_id)], 3);
    }
    sim.stop().await;
}

#[tokio::test]
async fn a_wrong_hash_is_passed_on_for_the_caller_to_refuse() {
    let sim = TestSim::start().await;
    let gw = gateway(&sim.url());
    let m = test_v3_merchant().unwrap();
    paid(&sim, &m, "wh", 100, "2024-07-04T12:00:00+08:00").await;
    bill_faults(&sim, &m, "2024-07-04", json!({"wrong_hash": true})).await;
    let f = file(gw.download_bill(&m, day("2024-07-04")).await);
    let claimed = f.sha1.clone().unwrap();
    let text = text_of(f);
    assert_eq!(claimed.len(), 40);
    assert_ne!(
        claimed,
        sha1_hex(&text),
        "the file is not what the hash says"
    );
    sim.stop().await;
}

#[tokio::test]
async fn an_expired_download_url_is_a_retryable_error() {
    let sim = TestSim::start().await;
    let gw = gateway(&sim.url());
    let m = test_v3_merchant().unwrap();
    paid(&sim, &m, "ex", 100, "2024-07-05T12:00:00+08:00").await;
    bill_faults(&sim, &m, "2024-07-05", json!({"expired_url": true})).await;
    let e = gw.download_bill(&m, day("2024-07-05")).await.unwrap_err();
    assert_eq!(e.failure(), Failure::HttpStatus, "{e}");
    assert!(e.is_transient(), "a new tradebill call gives a new URL");
    assert!(e.to_string().contains("400"), "{e}");
    bill_faults(&sim, &m, "2024-07-05", json!({})).await;
    file(gw.download_bill(&m, day("2024-07-05")).await);
    let (_, stats) = sim.control("GET", "/_sim/stats", json!({})).await;
    assert_eq!(stats["bills"][format!("{}/2024-07-05", m.mch_id)], 2);
    assert_eq!(
        stats["bill_downloads"][format!("{}/2024-07-05", m.mch_id)],
        1
    );
    sim.stop().await;
}

#[tokio::test]
async fn an_unsigned_download_is_refused() {
    let sim = TestSim::start().await;
    let m = test_v3_merchant().unwrap();
    paid(&sim, &m, "ds", 100, "2024-07-05T12:00:00+08:00").await;
    // The tradebill answer, through the client's own signing, then an unsigned download.
    let gw = gateway(&sim.url());
    file(gw.download_bill(&m, day("2024-07-05")).await);
    let resp = sim
        .http
        .get(format!("{}/v3/billdownload/file?token=whatever", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "an unsigned download");
    sim.stop().await;
}

/// A fake WeChat v3 host on a free port: answers every request with `status` and `body`,
/// signed with WeChat's test key under the public key id (as the simulator would), and counts
/// what it was asked.
async fn signed_server(status: u16, body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let key_pem = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/wxpay-v3/keys/go_sdk_test_private_key.pem"),
    )
    .unwrap();
    let key = Arc::new(PrivateKey::from_pem(&key_pem).unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let (key, body, counter) = (key.clone(), body.clone(), counter.clone());
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let timestamp = Utc::now().timestamp().to_string();
            let nonce = "fakenonce0123456789";
            let signature = key
                .sign(&response_message(&timestamp, nonce, &body))
                .unwrap();
            (
                StatusCode::from_u16(status).unwrap(),
                [
                    ("Wechatpay-Timestamp", timestamp),
                    ("Wechatpay-Nonce", nonce.to_owned()),
                    ("Wechatpay-Signature", signature),
                    ("Wechatpay-Serial", TEST_PUBLIC_KEY_ID.to_owned()),
                    ("Content-Type", "application/json".to_owned()),
                ],
                body,
            )
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hits)
}

#[tokio::test]
async fn a_download_url_on_another_host_is_never_requested() {
    let m = test_v3_merchant().unwrap();
    let (elsewhere, elsewhere_hits) = signed_server(200, b"not a bill".to_vec()).await;
    let answer = json!({
        "hash_type": "SHA1",
        "hash_value": "8823044c286bea726f149bfcfce0b0318122d755",
        "download_url": format!("{elsewhere}/v3/billdownload/file?token=t"),
    });
    let (wechat, wechat_hits) = signed_server(200, answer.to_string().into_bytes()).await;
    let e = gateway(&wechat)
        .download_bill(&m, day("2024-07-06"))
        .await
        .unwrap_err();
    assert_eq!(e.failure(), Failure::Mismatch, "{e}");
    assert!(e.is_suspicious());
    assert!(
        e.to_string().contains("not on the configured WeChat host"),
        "{e}"
    );
    assert_eq!(wechat_hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        elsewhere_hits.load(Ordering::SeqCst),
        0,
        "the merchant's signature never went to another host"
    );
}

#[tokio::test]
async fn the_v3_error_fixtures_are_answers_only_when_signed() {
    let m = test_v3_merchant().unwrap();
    for (name, empty) in [
        ("v3_error_no_statement_exist.json", true),
        ("v3_error_statement_creating.json", false),
    ] {
        let (url, _) = signed_server(400, shared_fixture(name)).await;
        match gateway(&url).download_bill(&m, day("2024-07-06")).await {
            Ok(BillAnswer::Empty) if empty => {}
            Ok(BillAnswer::NotReady) if !empty => {}
            other => panic!("{name}: {other:?}"),
        }
        // The same body unsigned proves nothing.
        let (url, _task) = replay_server(400, shared_fixture(name)).await;
        let e = gateway(&url)
            .download_bill(&m, day("2024-07-06"))
            .await
            .unwrap_err();
        assert_eq!(e.failure(), Failure::Unverified, "{name}: {e}");
    }
    // The official tradebill answer names WeChat's own host: not the one configured here.
    let (url, _) = signed_server(200, shared_fixture("v3_tradebill_reply_official_doc.json")).await;
    let e = gateway(&url)
        .download_bill(&m, day("2024-07-06"))
        .await
        .unwrap_err();
    assert_eq!(e.failure(), Failure::Mismatch);
}

#[tokio::test]
async fn the_v2_error_fixtures_through_the_client() {
    let [m, _] = both_merchants();
    for name in [
        "v2_error_no_bill_exist_apo_soft.xml",
        "v2_error_no_bill_exist_20002_community.xml",
    ] {
        let (url, _task) = replay_server(200, shared_fixture(name)).await;
        assert!(
            matches!(
                gateway(&url).download_bill(&m, day("2024-07-06")).await,
                Ok(BillAnswer::Empty)
            ),
            "{name}"
        );
    }
    for (name, reason) in [
        (
            "v2_error_invalid_bill_date_apo_soft.xml",
            "invalid bill_date",
        ),
        (
            "v2_error_invalid_bill_type_apo_soft.xml",
            "invalid bill_type",
        ),
    ] {
        let (url, _task) = replay_server(200, shared_fixture(name)).await;
        let e = gateway(&url)
            .download_bill(&m, day("2024-07-06"))
            .await
            .unwrap_err();
        assert!(!e.is_transient(), "{name}: asking again cannot cure it");
        assert_eq!(e.failure(), Failure::ReturnFail);
        assert!(e.to_string().contains(reason), "{e}");
    }
    // A fixture bill served as is (plain text, no gzip): handed over untouched.
    let sample = shared_fixture("v3_all_official_sample_bom_crlf_45rows.csv");
    let (url, _task) = replay_server(200, sample.clone()).await;
    let f = file(gateway(&url).download_bill(&m, day("2024-07-06")).await);
    assert!(!f.gzip);
    assert_eq!(f.sha1, None);
    assert_eq!(
        sha1_hex(&text_of(f)),
        "9bb6cd819be348f17a9cbcedddc8eb62fefbd790",
        "the README's SHA-1 of the sample"
    );
    // A gzip fixture, told by its magic.
    let (url, _task) = replay_server(200, shared_fixture("v3_all_3rows_gunsluo.csv.gz")).await;
    let f = file(gateway(&url).download_bill(&m, day("2024-07-06")).await);
    assert!(f.gzip);
    assert_eq!(text_of(f), shared_fixture("v3_all_3rows_gunsluo.csv"));
    // Not a 2xx: an error like any other.
    let (url, _task) = replay_server(503, b"busy".to_vec()).await;
    let e = gateway(&url)
        .download_bill(&m, day("2024-07-06"))
        .await
        .unwrap_err();
    assert_eq!(e.failure(), Failure::HttpStatus);
    assert!(e.is_transient());
}

#[tokio::test]
async fn simulator_bill_requests_are_checked_like_wechats() {
    let sim = TestSim::start().await;
    let [md5, _] = both_merchants();
    // A v3 merchant cannot use the v2 endpoint, nor a wrong key sign for one.
    let v3 = test_v3_merchant().unwrap();
    let e = gateway(&sim.url())
        .download_bill(
            &crate::helpers::merchant(
                v3.mch_id.as_str(),
                v3.appid.as_str(),
                wxpay_reconciler::wxpay::SignType::Md5,
                crate::helpers::MD5_KEY,
            ),
            day("2024-07-06"),
        )
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e}");
    let forged = crate::helpers::merchant(
        md5.mch_id.as_str(),
        md5.appid.as_str(),
        wxpay_reconciler::wxpay::SignType::Md5,
        "0123456789abcdef0123456789abcdef",
    );
    let e = gateway(&sim.url())
        .download_bill(&forged, day("2024-07-06"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("签名错误"), "{e}");

    // The control API: unknown merchants and bad dates.
    let (status, _) = sim
        .control("PUT", "/_sim/bills/999/2024-07-06", json!({}))
        .await;
    assert_eq!(status, 404);
    let (status, _) = sim
        .control("PUT", "/_sim/bills/10000100/2024-13-06", json!({}))
        .await;
    assert_eq!(status, 400);
    let (status, _) = sim
        .control(
            "PUT",
            "/_sim/bills/10000100/2024-07-06",
            json!({"creatin": 1}),
        )
        .await;
    assert_eq!(status, 422, "typos are refused");
    // GET shows the day's text, 404 without lines.
    let (status, _) = sim
        .control("GET", "/_sim/bills/10000100/2024-07-06", json!({}))
        .await;
    assert_eq!(status, 404);
    let (n, _) = paid(&sim, &md5, "sh", 100, "2024-07-06T12:00:00+08:00").await;
    let (status, text) = sim
        .control("GET", "/_sim/bills/10000100/2024-07-06", json!({}))
        .await;
    assert_eq!(status, 200);
    let bill = Bill::read(text.as_str().unwrap().as_bytes());
    bill.row(&n, "SUCCESS");
    sim.stop().await;
}

#[tokio::test]
async fn a_refunds_success_time_is_checked() {
    let sim = TestSim::start().await;
    let [m, _] = both_merchants();
    let (order, _) = paid(&sim, &m, "st", 100, "2024-07-07T12:00:00+08:00").await;
    let body = |no: &str, outcome: &str, t: &str| json!({"out_refund_no": no, "refund_fee": 10, "outcome": outcome, "success_time": t});
    let (status, _) = refund(
        &sim,
        &m,
        &order,
        body(
            &format!("{order}a"),
            "PROCESSING",
            "2024-07-08T00:00:00+08:00",
        ),
    )
    .await;
    assert_eq!(status, 400, "only a SUCCESS has a success time");
    let (status, _) = refund(
        &sim,
        &m,
        &order,
        body(&format!("{order}b"), "SUCCESS", "2024-07-07T11:59:59+08:00"),
    )
    .await;
    assert_eq!(status, 400, "not before the payment");
    let (status, _) = refund(
        &sim,
        &m,
        &order,
        body(&format!("{order}c"), "SUCCESS", "yesterday"),
    )
    .await;
    assert_eq!(status, 400);

    // A PROCESSING refund finished at a given time lands on that day's bill.
    let no = format!("{order}d");
    let (status, _) = refund(
        &sim,
        &m,
        &order,
        json!({"out_refund_no": no, "refund_fee": 40, "outcome": "PROCESSING"}),
    )
    .await;
    assert_eq!(status, 201);
    let finish = |t: &str| json!({"outcome": "SUCCESS", "success_time": t});
    let path = format!("/_sim/refunds/{}/{no}/finish", m.mch_id);
    let (status, _) = sim
        .control("POST", &path, finish("2024-07-01T00:00:00+08:00"))
        .await;
    assert_eq!(status, 400, "not before the payment");
    let (status, r) = sim
        .control("POST", &path, finish("2024-07-08T08:00:00+08:00"))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["success_time"], "2024-07-08T08:00:00+08:00");
    let gw = gateway(&sim.url());
    let bill = Bill::read(&text_of(file(
        gw.download_bill(&m, day("2024-07-08")).await,
    )));
    let line = bill.row(&order, "REFUND");
    assert_eq!(line[0], "2024-07-08 08:00:00");
    assert_eq!(line[15], no);
    assert_eq!(line[16], "0.40");
    sim.stop().await;
}

//! The whole payment flow on every backend the run covers: WeChat's notifications on the
//! notify endpoint, expiry with closeorder, payments after a local close, refunds.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use wxpay_reconciler::commands;
use wxpay_reconciler::config::Settings;
use wxpay_reconciler::daemon::{self, Daemon};
use wxpay_reconciler::domain::OrderState;
use wxpay_reconciler::notify::{self, NOTIFY_PATH, NotifyApp};
use wxpay_reconciler::store::NewOrder;
use wxpay_reconciler::telemetry::Telemetry;
use wxpay_reconciler::wxpay::SignType;
use wxpay_reconciler::wxpay::{Fields, Merchant, sign, xml};

use crate::db::{Kind, TestDb, backends};
use crate::engine::{Engine, metric_value};
use crate::frame::{for_each_backend, for_each_backend_with};
use crate::helpers::{MD5_KEY, fixture, hmac_merchant, md5_merchant, merchant, unique_otn};

/// A notify endpoint on a free port, for `store` and `merchants`; returns its URL.
pub(crate) async fn serve_notify(e: &Engine) -> String {
    serve_notify_for(
        &e.db,
        e.telemetry.clone(),
        &e.settings.merchants,
        daemon::policy(&e.settings),
    )
    .await
}

async fn serve_notify_for(
    db: &TestDb,
    telemetry: Telemetry,
    merchants: &[Merchant],
    policy: wxpay_reconciler::reconcile::policy::Policy,
) -> String {
    let app = notify::router(Arc::new(NotifyApp::new(
        db.store.clone(),
        telemetry,
        policy,
        merchants,
    )));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}{NOTIFY_PATH}")
}

/// Runs a scan whose query of `otn` takes a second, and while that query is in flight the
/// merchant's application moves the order from NOTPAY to `state` in its table; returns once the
/// scan is done. Clears the latency again.
async fn app_moves_the_order_during_a_scan(e: &Engine, otn: &str, state: &str) {
    // Long enough for the UPDATE to land first on a loaded machine.
    e.sim
        .faults(json!({"endpoint": "orderquery", "latency_ms": 1000}))
        .await;
    let scan = {
        let scanner = e.scanner.clone();
        tokio::spawn(async move { scanner.scan(&CancellationToken::new(), &|| {}).await })
    };
    while e.sim.sim.state.total_inflight() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        e.db.exec(
            "UPDATE wxpay_orders SET state = $1 WHERE out_trade_no = $2 AND state = 'NOTPAY'",
            &[state, otn]
        )
        .await,
        1
    );
    scan.await.unwrap().unwrap();
    e.sim.faults(json!({"endpoint": "orderquery"})).await;
}

/// A payment notification as WeChat sends it, signed with the merchant's key and sign type.
pub(crate) fn notification(m: &Merchant, otn: &str, fee: i64, transaction_id: &str) -> Fields {
    let mut f = Fields::new()
        .with("appid", m.appid.as_str())
        .with("bank_type", "CFT")
        .with("cash_fee", fee.to_string())
        .with("fee_type", "CNY")
        .with("is_subscribe", "N")
        .with("mch_id", m.mch_id.as_str())
        .with("nonce_str", "5K8264ILTKCH16CQ2502SI8ZNMTM67VS")
        .with("openid", "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o")
        .with("out_trade_no", otn)
        .with("result_code", "SUCCESS")
        .with("return_code", "SUCCESS")
        .with("time_end", "20261123101530")
        .with("total_fee", fee.to_string())
        .with("trade_type", "JSAPI")
        .with("transaction_id", transaction_id);
    sign::sign_in_place(&mut f, m.v2_key(), m.v2_sign_type());
    f
}

pub(crate) fn body(f: &Fields) -> String {
    xml::encode(f).unwrap()
}

/// POSTs a body; returns the HTTP status and WeChat's `return_code`.
pub(crate) async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
    let (status, answer) = post_answer(&reqwest::Client::new(), url, body).await;
    (status, answer.get("return_code").unwrap_or("").to_owned())
}

/// POSTs a body as XML; returns the HTTP status and the whole answer, decoded.
pub(crate) async fn post_answer(
    http: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Fields) {
    let resp = http
        .post(url)
        .header("content-type", "text/xml")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    let answer = xml::decode(&bytes).unwrap_or_else(|e| panic!("answer {bytes:?}: {e}"));
    (status, answer)
}

/// POSTs `len` bytes with chunked transfer encoding (no declared length) over a raw
/// connection; returns the HTTP status.
async fn post_chunked(url: &str, len: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST {NOTIFY_PATH} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'a'; 1 << 14];
    let mut sent = 0;
    while sent < len {
        let frame = format!("{:x}\r\n", chunk.len());
        // The server may answer and close before everything is sent.
        if conn.write_all(frame.as_bytes()).await.is_err()
            || conn.write_all(&chunk).await.is_err()
            || conn.write_all(b"\r\n").await.is_err()
        {
            break;
        }
        sent += chunk.len();
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"))
}

#[tokio::test]
async fn a_notification_settles_an_order_once_and_repeats_are_acknowledged() {
    for_each_backend(async |kind, e| {
        let url = serve_notify(e).await;
        for m in [md5_merchant(), hmac_merchant()] {
            let otn = e.order(&m, 2590).await;
            let txid = e
                .sim
                .pay(&m, &otn.parse().unwrap(), json!({"notify": "drop"}))
                .await;
            let n = body(&notification(&m, &otn, 2590, &txid));
            // WeChat delivers the same notification five times at once: one event, five SUCCESS.
            let answers =
                futures_util::future::join_all((0..5).map(|_| post(&url, n.clone()))).await;
            for (status, code) in &answers {
                assert_eq!((*status, code.as_str()), (200, "SUCCESS"), "{kind:?}");
            }
            let row = e.row(&otn).await;
            assert_eq!(row.state, OrderState::Success, "{kind:?}");
            assert_eq!(row.transaction_id.as_deref(), Some(txid.as_str()));
            assert_eq!(row.query_count, 0, "a notification is not a query");
            let events = e.events(&otn).await;
            assert_eq!(events.len(), 1, "{kind:?}: {events:?}");
            assert_eq!(
                (events[0].to_state.as_str(), events[0].source.as_str()),
                ("SUCCESS", "notify")
            );
            assert_eq!(events[0].total_fee, Some(2590));
            // A later repeat: SUCCESS, nothing recorded.
            assert_eq!(post(&url, n.clone()).await, (200, "SUCCESS".into()));
            assert_eq!(e.events(&otn).await.len(), 1);
            // Settled: the scanner never asks WeChat about it.
            assert_eq!(e.scan().await.claimed, 0);
            assert_eq!(e.queries(&otn), 0, "{kind:?}");
        }
        let text = e.telemetry.render();
        assert_eq!(
            metric_value(
                &text,
                "wxpay_reconciler_transitions_total{from=\"NOTPAY\",to=\"SUCCESS\",source=\"notify\"}"
            ),
            2.0,
            "{text}"
        );
        for m in ["10000100", "1900000109"] {
            assert_eq!(
                metric_value(
                    &text,
                    &format!(
                        "wxpay_reconciler_notify_requests_total{{mch_id=\"{m}\",outcome=\"ok\"}}"
                    )
                ),
                1.0,
                "{m}"
            );
            assert_eq!(
                metric_value(
                    &text,
                    &format!(
                        "wxpay_reconciler_notify_requests_total{{mch_id=\"{m}\",outcome=\"repeat\"}}"
                    )
                ),
                5.0,
                "{m}"
            );
        }
        assert_eq!(
            metric_value(&text, "wxpay_reconciler_noop_total{source=\"notify\"}"),
            10.0
        );
        assert!(text.contains("wxpay_reconciler_notify_duration_seconds_bucket"));
    })
    .await;
}

/// A body that never finishes arriving does not hold the endpoint: 408 after the deadline.
#[tokio::test]
async fn a_notification_body_that_never_arrives_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = crate::db::sqlite().await;
    let e = Engine::new(db).await;
    let url = serve_notify(&e).await;
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST {NOTIFY_PATH} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/xml\r\nContent-Length: 100\r\n\r\n<xml>"
    );
    let started = std::time::Instant::now();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(
        notify::BODY_DEADLINE + Duration::from_secs(5),
        conn.read(&mut answer),
    )
    .await
    .expect("answered within the deadline")
    .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() >= notify::BODY_DEADLINE - Duration::from_millis(100));
    assert_eq!(
        e.metric("wxpay_reconciler_notify_requests_total{mch_id=\"unknown\",outcome=\"timeout\"}"),
        1.0
    );
    e.finish().await;
}

/// A write that fails (here: the events table refuses notify events, as a broken database
/// would) is answered FAIL, leaves the order as it was, and WeChat's next attempt settles it.
#[tokio::test]
async fn a_database_error_answers_fail_changes_nothing_and_the_retry_settles() {
    for_each_backend(async |kind, e| {
        let url = serve_notify(e).await;
        let m = md5_merchant();
        let otn = e.order(&m, 880).await;
        let txid = e
            .sim
            .pay(&m, &otn.parse().unwrap(), json!({"notify": "drop"}))
            .await;
        let (break_it, repair) = match kind {
            Kind::Sqlite => (
                "CREATE TRIGGER test_outage BEFORE INSERT ON wxpay_order_events \
                 WHEN NEW.source = 'notify' BEGIN SELECT RAISE(ABORT, 'outage'); END",
                "DROP TRIGGER test_outage",
            ),
            Kind::Postgres | Kind::Mysql => (
                "ALTER TABLE wxpay_order_events ADD CONSTRAINT test_outage CHECK (source <> 'notify')",
                "ALTER TABLE wxpay_order_events DROP CONSTRAINT test_outage",
            ),
        };
        e.db.exec(break_it, &[]).await;
        let n = body(&notification(&m, &otn, 880, &txid));
        assert_eq!(
            post(&url, n.clone()).await,
            (503, "FAIL".into()),
            "{kind:?}"
        );
        let row = e.row(&otn).await;
        assert_eq!(
            row.state,
            OrderState::NotPay,
            "{kind:?}: nothing half-applied"
        );
        assert_eq!(row.transaction_id, None);
        assert!(e.events(&otn).await.is_empty());
        assert_eq!(
            e.metric(
                "wxpay_reconciler_notify_requests_total{mch_id=\"10000100\",outcome=\"db_error\"}"
            ),
            1.0
        );
        assert!(e.metric("wxpay_reconciler_db_errors_total{op=\"notify\"}") >= 1.0);
        // The database is back; WeChat retries.
        e.db.exec(repair, &[]).await;
        assert_eq!(post(&url, n).await, (200, "SUCCESS".into()), "{kind:?}");
        assert_eq!(e.row(&otn).await.state, OrderState::Success);
        assert_eq!(e.events(&otn).await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn forged_malformed_oversized_and_unknown_notifications_are_refused_and_change_nothing() {
    for_each_backend(async |kind, e| {
        let url = serve_notify(e).await;
        let m = md5_merchant();
        let otn = e.order(&m, 100).await;
        let txid = e
            .sim
            .pay(&m, &otn.parse().unwrap(), json!({"notify": "drop"}))
            .await;
        let good = notification(&m, &otn, 100, &txid);

        let mut forged = good.clone();
        forged.insert("total_fee", "1"); // changed after signing
        let mut wrong_key = good.clone();
        let other = merchant(
            "10000100",
            "wxd930ea5d5a258f4f",
            SignType::Md5,
            "0123456789abcdef0123456789abcdef",
        );
        sign::sign_in_place(&mut wrong_key, other.v2_key(), SignType::Md5);
        let wrong_appid = {
            let impostor = merchant("10000100", "wx0000000000000000", SignType::Md5, MD5_KEY);
            notification(&impostor, &otn, 100, &txid)
        };
        let unknown_order = notification(&m, "nosuchorder1", 100, &txid);
        let unknown_merchant = {
            let stranger = merchant("1234567890", "wxd930ea5d5a258f4f", SignType::Md5, MD5_KEY);
            notification(&stranger, &otn, 100, &txid)
        };
        let mut unsigned = good.clone();
        unsigned.remove("sign");
        // HMAC-SHA256 declared over an MD5 signature. (A genuine HMAC-SHA256 notification is
        // accepted for an MD5 merchant, and an MD5 one refused for an HMAC merchant:
        // hostile::wechat.)
        let mut wrong_type = good.clone();
        wrong_type.insert("sign_type", "HMAC-SHA256");

        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "forged signature",
                body(&forged).into_bytes(),
                "sign_invalid",
            ),
            ("another key", body(&wrong_key).into_bytes(), "sign_invalid"),
            ("unsigned", body(&unsigned).into_bytes(), "sign_invalid"),
            (
                "wrong sign_type",
                body(&wrong_type).into_bytes(),
                "sign_invalid",
            ),
            ("wrong appid", body(&wrong_appid).into_bytes(), "mismatch"),
            (
                "unknown order",
                body(&unknown_order).into_bytes(),
                "unknown_order",
            ),
            (
                "unknown merchant",
                body(&unknown_merchant).into_bytes(),
                "unknown_merchant",
            ),
            (
                "DOCTYPE",
                fixture("neg_xxe_doctype_wxjava.xml"),
                "malformed",
            ),
            (
                "XXE",
                fixture("neg_xxe_injection_wechatpay_php.xml"),
                "malformed",
            ),
            (
                "bad entity",
                fixture("neg_malformed_bad_entity_wechatpay_php.xml"),
                "malformed",
            ),
            (
                "not <xml>",
                fixture("neg_root_not_xml_fragment_injection_wechatpay_php.xml"),
                "malformed",
            ),
            (
                "return_code FAIL",
                fixture("notify_return_fail_elixir_wechat_pay.xml"),
                "return_fail",
            ),
            (
                "edited after signing",
                fixture("notify_success_coupons_wxjava.xml"),
                "sign_invalid",
            ),
            ("empty", Vec::new(), "malformed"),
        ];
        for (what, bytes, _) in &cases {
            let (status, code) = post(&url, bytes.clone()).await;
            assert_eq!((status, code.as_str()), (200, "FAIL"), "{kind:?}: {what}");
        }
        // 1 MiB, declared: refused before it is read.
        let big = format!("<xml>{}</xml>", "a".repeat(1 << 20));
        assert_eq!(
            post(&url, big.clone()).await,
            (413, "FAIL".into()),
            "{kind:?}"
        );
        // 1 MiB streamed without a length: cut off at the limit.
        assert_eq!(post_chunked(&url, 1 << 20).await, 413, "{kind:?}");

        let row = e.row(&otn).await;
        assert_eq!(row.state, OrderState::NotPay, "{kind:?}");
        assert!(e.events(&otn).await.is_empty(), "{kind:?}");
        let text = e.telemetry.render();
        for outcome in ["sign_invalid", "mismatch", "unknown_order"] {
            let expected = cases.iter().filter(|c| c.2 == outcome).count() as f64;
            let label = "10000100";
            assert_eq!(
                metric_value(
                    &text,
                    &format!(
                        "wxpay_reconciler_notify_requests_total{{mch_id=\"{label}\",outcome=\"{outcome}\"}}"
                    )
                ),
                expected,
                "{kind:?} {outcome}: {text}"
            );
        }
        assert!(
            metric_value(
                &text,
                "wxpay_reconciler_notify_requests_total{mch_id=\"unknown\",outcome=\"too_large\"}"
            ) >= 2.0
        );
        // The real notification still works afterwards.
        assert_eq!(post(&url, body(&good)).await, (200, "SUCCESS".into()));
        assert_eq!(e.row(&otn).await.state, OrderState::Success);
    })
    .await;
}

#[tokio::test]
async fn a_notification_racing_a_poll_records_one_event() {
    for_each_backend(async |kind, e| {
        let url = serve_notify(e).await;
        let m = md5_merchant();
        e.sim
            .faults(json!({"endpoint": "orderquery", "latency_ms": 150}))
            .await;
        let mut orders = Vec::new();
        for _ in 0..10 {
            let otn = e.order(&m, 70).await;
            let txid = e
                .sim
                .pay(&m, &otn.parse().unwrap(), json!({"notify": "drop"}))
                .await;
            orders.push((otn, txid));
        }
        let scan = {
            let scanner = e.scanner.clone();
            tokio::spawn(async move { scanner.scan(&CancellationToken::new(), &|| {}).await })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while e.sim.sim.state.total_inflight() < orders.len() as u64 {
            assert!(std::time::Instant::now() < deadline, "{kind:?}: no queries");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Notifications arrive while the queries are in flight, some before and some after the
        // poll's write.
        let mut posts = Vec::new();
        for (i, (otn, txid)) in orders.iter().enumerate() {
            let (url, n) = (url.clone(), body(&notification(&m, otn, 70, txid)));
            posts.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(if i % 2 == 0 { 0 } else { 140 })).await;
                post(&url, n).await
            }));
        }
        for p in posts {
            assert_eq!(p.await.unwrap(), (200, "SUCCESS".into()), "{kind:?}");
        }
        scan.await.unwrap().unwrap();
        let (mut by_notify, mut by_poll) = (0, 0);
        for (otn, _) in &orders {
            assert_eq!(e.row(otn).await.state, OrderState::Success, "{kind:?}");
            let events = e.events(otn).await;
            assert_eq!(events.len(), 1, "{kind:?}: {otn}: {events:?}");
            match events[0].source.as_str() {
                "notify" => by_notify += 1,
                "poll" => by_poll += 1,
                s => panic!("source {s}"),
            }
        }
        assert_eq!(by_notify + by_poll, orders.len());
        let noops = e.metric("wxpay_reconciler_noop_total{source=\"poll\"}")
            + e.metric("wxpay_reconciler_noop_total{source=\"notify\"}");
        assert_eq!(
            noops,
            orders.len() as f64,
            "{kind:?}: each loser is a no-op"
        );
    })
    .await;
}

#[tokio::test]
async fn a_notification_with_another_amount_quarantines_the_order() {
    for_each_backend(async |kind, e| {
        let url = serve_notify(e).await;
        let m = hmac_merchant();
        let otn = e.order(&m, 500).await;
        let txid = e
            .sim
            .pay(
                &m,
                &otn.parse().unwrap(),
                json!({"notify": "drop", "total_fee": 1}),
            )
            .await;
        assert_eq!(
            post(&url, body(&notification(&m, &otn, 1, &txid))).await,
            (200, "SUCCESS".into()),
            "{kind:?}: quarantined durably, WeChat need not retry"
        );
        let row = e.row(&otn).await;
        assert_eq!(row.state, OrderState::AmountMismatch, "{kind:?}");
        let events = e.events(&otn).await;
        assert_eq!(events.len(), 1);
        assert_eq!(
            (
                events[0].to_state.as_str(),
                events[0].source.as_str(),
                events[0].total_fee
            ),
            ("AMOUNT_MISMATCH", "notify", Some(1))
        );
        assert_eq!(
            e.metric("wxpay_reconciler_amount_mismatch_total{mch_id=\"1900000109\"}"),
            1.0
        );
    })
    .await;
}

/// Registers an order `minutes` old in the database and at WeChat (where a prepay_id lives
/// two hours: an order older than that can no longer be paid there).
async fn old_order(e: &Engine, m: &Merchant, fee: i64, minutes: u32) -> String {
    aged_order(e, m, fee, minutes, minutes).await
}

async fn aged_order(e: &Engine, m: &Merchant, fee: i64, minutes: u32, at_wechat: u32) -> String {
    let otn = unique_otn("x").to_string();
    e.db.store
        .insert_order(&NewOrder {
            mch_id: m.mch_id.as_str(),
            appid: m.appid.as_str(),
            out_trade_no: &otn,
            total_fee: fee,
        })
        .await
        .unwrap();
    e.db.backdate(&otn, minutes).await;
    let (status, body) = e
        .sim
        .control(
            "POST",
            &format!("/_sim/orders/{}/{otn}", m.mch_id),
            json!({"total_fee": fee, "age_seconds": at_wechat * 60}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    otn
}

#[tokio::test]
async fn expired_unpaid_orders_are_closed_at_wechat_once_then_locally() {
    for_each_backend(async |kind, e| {
        // WeChat's rule: no closeorder within 5 minutes of creation.
        let (status, _) = e
            .sim
            .control("PUT", "/_sim/config", json!({"close_min_age_ms": 300_000}))
            .await;
        assert_eq!(status, 200);
        let m = md5_merchant();
        let expired: Vec<String> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(old_order(e, &m, 10, 121).await);
            }
            v
        };
        // Expired by the app's own expires_at, but younger than 5 minutes: not closed yet.
        let young = old_order(e, &m, 10, 2).await;
        e.db.exec(
            match kind {
                crate::db::Kind::Sqlite => {
                    "UPDATE wxpay_orders SET expires_at = datetime('now', '-1 minute') WHERE out_trade_no = $1"
                }
                crate::db::Kind::Postgres => {
                    "UPDATE wxpay_orders SET expires_at = now() - interval '1 minute' WHERE out_trade_no = $1"
                }
                crate::db::Kind::Mysql => {
                    "UPDATE wxpay_orders SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE WHERE out_trade_no = $1"
                }
            },
            &[&young],
        )
        .await;
        // Not yet polled at all: the gauge shows them all as expired and open.
        let gauges =
            e.db.store
                .open_summary(&wxpay_reconciler::store::SummaryRequest {
                    now: chrono::Utc::now(),
                    stuck_before: chrono::Utc::now(),
                    expired_if_created_before: chrono::Utc::now() - chrono::TimeDelta::hours(2),
                })
                .await
                .unwrap();
        assert_eq!(gauges[0].expired, 4, "{kind:?}");

        let report = e.scan().await;
        assert_eq!(report.claimed, 4, "{kind:?}");
        for otn in &expired {
            let row = e.row(otn).await;
            assert_eq!(row.state, OrderState::Closed, "{kind:?}");
            let events = e.events(otn).await;
            assert_eq!(events.len(), 1);
            assert_eq!(
                (events[0].to_state.as_str(), events[0].source.as_str()),
                ("CLOSED", "expire")
            );
            let stats = e.sim.sim.state.order_stats(otn);
            assert_eq!(
                (stats.closes, stats.early_closes, stats.queries),
                (1, 0, 0),
                "{kind:?}"
            );
            assert_eq!(
                format!(
                    "{:?}",
                    e.sim.sim.state.order(m.mch_id.as_str(), otn).unwrap().state
                ),
                "Closed"
            );
        }
        // The young one was queried (NOTPAY), not closed, and is due again at its close time.
        let row = e.row(&young).await;
        assert_eq!(row.state, OrderState::NotPay);
        let stats = e.sim.sim.state.order_stats(&young);
        assert_eq!(
            (stats.closes, stats.early_closes, stats.queries),
            (0, 0, 1),
            "{kind:?}"
        );
        let due = row.next_query_at.unwrap();
        let close_at = row.created_at + chrono::TimeDelta::minutes(5);
        assert!(
            due <= close_at,
            "{kind:?}: next {due} after close time {close_at}"
        );
        // Closed orders are done: nothing more is claimed or sent.
        assert_eq!(e.scan().await.claimed, 0);
        assert_eq!(
            e.metric(
                "wxpay_reconciler_closeorder_requests_total{mch_id=\"10000100\",outcome=\"closed\"}"
            ),
            3.0
        );
        assert_eq!(
            e.metric("wxpay_reconciler_transitions_total{from=\"NOTPAY\",to=\"CLOSED\",source=\"expire\"}"),
            3.0
        );
    })
    .await;
}

#[tokio::test]
async fn an_order_paid_just_before_expiry_settles_as_success_never_closed() {
    for_each_backend(async |kind, e| {
        let m = hmac_merchant();
        // Expired here, and paid at WeChat in the prepay's last minute.
        let otn = aged_order(e, &m, 880, 125, 119).await;
        e.sim
            .pay(&m, &otn.parse().unwrap(), json!({"notify": "drop"}))
            .await;
        let report = e.scan().await;
        assert_eq!((report.claimed, report.settled), (1, 1), "{kind:?}");
        let row = e.row(&otn).await;
        assert_eq!(row.state, OrderState::Success, "{kind:?}");
        let events = e.events(&otn).await;
        assert_eq!(events.len(), 1, "{kind:?}: {events:?}");
        assert_eq!(events[0].to_state.as_str(), "SUCCESS");
        let stats = e.sim.sim.state.order_stats(&otn);
        assert_eq!(
            (stats.closes, stats.queries),
            (1, 1),
            "closeorder said ORDERPAID, then one query"
        );
        assert_eq!(
            e.metric("wxpay_reconciler_closeorder_requests_total{mch_id=\"1900000109\",outcome=\"order_paid\"}"),
            1.0
        );
    })
    .await;
}

#[tokio::test]
async fn closeorder_failures_retry_and_leave_the_order_open() {
    for_each_backend(async |kind, e| {
        let m = md5_merchant();
        let otn = old_order(e, &m, 10, 130).await;
        e.sim
            .faults(json!({"endpoint": "closeorder", "system_error_rate": 1.0}))
            .await;
        e.scan().await;
        let row = e.row(&otn).await;
        assert_eq!(row.state, OrderState::NotPay, "{kind:?}");
        assert!(row.last_error.unwrap_or_default().contains("closeorder"));
        assert!(e.events(&otn).await.is_empty());
        e.sim.faults(json!({"endpoint": "closeorder"})).await;
        e.db.make_due(&otn).await;
        e.scan().await;
        assert_eq!(e.row(&otn).await.state, OrderState::Closed, "{kind:?}");
        assert_eq!(e.sim.sim.state.order_stats(&otn).closes, 2);
    })
    .await;
}

#[tokio::test]
async fn with_close_expired_off_expired_orders_are_only_polled() {
    let tweak = |s: &mut Settings| s.schedule.close_expired = false;
    for_each_backend_with(tweak, async |kind, e| {
        let m = md5_merchant();
        let otn = old_order(e, &m, 10, 130).await;
        e.scan().await;
        assert_eq!(e.row(&otn).await.state, OrderState::NotPay, "{kind:?}");
        let stats = e.sim.sim.state.order_stats(&otn);
        assert_eq!((stats.closes, stats.queries), (0, 1), "{kind:?}");
    })
    .await;
}

#[tokio::test]
async fn refund_after_success_is_recorded_once() {
    for_each_backend(async |kind, e| {
        let m = md5_merchant();
        // Polling: the order is claimed while the merchant's handler marks it paid, and WeChat
        // answers REFUND: the scan's write loses, then applies SUCCESS → REFUND.
        let otn = e.order(&m, 300).await;
        e.pay(&m, &otn, json!({"notify": "drop"})).await;
        let (status, _) = e
            .sim
            .control(
                "POST",
                &format!("/_sim/orders/{}/{otn}/refund", m.mch_id),
                json!({}),
            )
            .await;
        assert_eq!(status, 200);
        app_moves_the_order_during_a_scan(e, &otn, "SUCCESS").await;
        let row = e.row(&otn).await;
        assert_eq!(row.state, OrderState::Refund, "{kind:?}");
        let events = e.events(&otn).await;
        assert_eq!(events.len(), 1, "{kind:?}: {events:?}");
        assert_eq!(
            (
                events[0].from_state.as_str(),
                events[0].to_state.as_str(),
                events[0].source.as_str()
            ),
            ("SUCCESS", "REFUND", "poll")
        );

        // `query --apply` on an order settled SUCCESS and refunded since: one REFUND event, and
        // asking again records nothing more.
        let otn = e.order(&m, 400).await;
        e.pay(&m, &otn, json!({"notify": "drop"})).await;
        e.scan().await;
        assert_eq!(e.row(&otn).await.state, OrderState::Success);
        e.sim
            .control(
                "POST",
                &format!("/_sim/orders/{}/{otn}/refund", m.mch_id),
                json!({}),
            )
            .await;
        let out = commands::query(&e.settings, &otn, None, true)
            .await
            .unwrap();
        assert!(out.contains("SUCCESS -> REFUND"), "{out}");
        let out = commands::query(&e.settings, &otn, None, true)
            .await
            .unwrap();
        assert!(out.contains("no change"), "{out}");
        let events = e.events(&otn).await;
        assert_eq!(
            events
                .iter()
                .map(|e| e.to_state.as_str())
                .collect::<Vec<_>>(),
            ["SUCCESS", "REFUND"],
            "{kind:?}"
        );
        assert_eq!(events[1].source.as_str(), "manual");
    })
    .await;
}

#[tokio::test]
async fn a_payment_for_an_order_the_app_closed_is_recorded_as_paid_after_close() {
    for_each_backend(async |kind, e| {
        let url = serve_notify(e).await;
        let m = md5_merchant();
        let otn = e.order(&m, 1200).await;
        // The app closes the order in its table only; the customer pays anyway.
        assert_eq!(
            e.db.exec(
                "UPDATE wxpay_orders SET state = 'CLOSED' WHERE out_trade_no = $1",
                &[&otn]
            )
            .await,
            1
        );
        let txid = e
            .sim
            .pay(&m, &otn.parse().unwrap(), json!({"notify": "drop"}))
            .await;
        let n = body(&notification(&m, &otn, 1200, &txid));
        for _ in 0..3 {
            assert_eq!(
                post(&url, n.clone()).await,
                (200, "SUCCESS".into()),
                "{kind:?}"
            );
        }
        let row = e.row(&otn).await;
        assert_eq!(row.state, OrderState::Closed, "{kind:?}: never reopened");
        let events = e.events(&otn).await;
        assert_eq!(events.len(), 1, "{kind:?}: {events:?}");
        let ev = &events[0];
        assert_eq!(
            (
                ev.from_state.as_str(),
                ev.to_state.as_str(),
                ev.source.as_str()
            ),
            ("CLOSED", "PAID_AFTER_CLOSE", "notify")
        );
        assert_eq!(ev.transaction_id.as_deref(), Some(txid.as_str()));
        assert_eq!(ev.total_fee, Some(1200));
        assert_eq!(
            e.metric("wxpay_reconciler_paid_after_close_total{mch_id=\"10000100\"}"),
            1.0
        );
        // On-call sees it in `status`, table and JSON.
        let status = commands::status(&e.settings, false, 5).await.unwrap();
        assert!(status.contains("PAID_AFTER_CLOSE"), "{status}");
        assert!(status.contains(&otn) && status.contains(&txid), "{status}");
        let json: serde_json::Value =
            serde_json::from_str(&commands::status(&e.settings, true, 5).await.unwrap()).unwrap();
        assert_eq!(json["paid_after_close"][0]["out_trade_no"], otn.as_str());
        // `query --apply` finds the same anomaly already recorded.
        let out = commands::query(&e.settings, &otn, None, true)
            .await
            .unwrap();
        assert!(out.contains("no change"), "{out}");
        assert_eq!(e.events(&otn).await.len(), 1);

        // Polling finds the same: the app closes the order while the scan's query is in
        // flight, WeChat answers SUCCESS; the scan's write loses and records the anomaly.
        let otn = e.order(&m, 1300).await;
        let txid = e
            .sim
            .pay(&m, &otn.parse().unwrap(), json!({"notify": "drop"}))
            .await;
        app_moves_the_order_during_a_scan(e, &otn, "CLOSED").await;
        assert_eq!(e.row(&otn).await.state, OrderState::Closed, "{kind:?}");
        let events = e.events(&otn).await;
        assert_eq!(events.len(), 1, "{kind:?}: {events:?}");
        assert_eq!(
            (
                events[0].to_state.as_str(),
                events[0].source.as_str(),
                events[0].transaction_id.as_deref()
            ),
            ("PAID_AFTER_CLOSE", "poll", Some(txid.as_str()))
        );
        assert_eq!(
            e.metric("wxpay_reconciler_paid_after_close_total{mch_id=\"10000100\"}"),
            2.0
        );
    })
    .await;
}

#[tokio::test]
async fn the_fixture_notifications_settle_matching_orders() {
    for db in backends().await {
        let kind = db.kind;
        // The elixir fixture: service-provider merchant 10000100, appid wx2421b1c4370ec43b,
        // sub_mch_id 10000100, MD5 with the published test key.
        let mut provider = merchant("10000100", "wx2421b1c4370ec43b", SignType::Md5, MD5_KEY);
        provider.sub_mch_id = Some(provider.mch_id.clone());
        let telemetry = Telemetry::new(["10000100"]);
        let url = serve_notify_for(&db, telemetry.clone(), &[provider], Default::default()).await;
        db.store
            .insert_order(&NewOrder {
                mch_id: "10000100",
                appid: "wx2421b1c4370ec43b",
                out_trade_no: "1409811653",
                total_fee: 1,
            })
            .await
            .unwrap();
        // The INVALID fixture names the same merchant and order, but was edited after signing:
        // refused for its signature, and the order stays unpaid.
        assert_eq!(
            post(&url, fixture("notify_success_coupons_wxjava.xml")).await,
            (200, "FAIL".into())
        );
        assert_eq!(
            metric_value(
                &telemetry.render(),
                "wxpay_reconciler_notify_requests_total{mch_id=\"10000100\",outcome=\"sign_invalid\"}"
            ),
            1.0,
            "{kind:?}"
        );
        assert_eq!(
            db.store.find("1409811653").await.unwrap()[0].state,
            OrderState::NotPay
        );
        let elixir = fixture("notify_success_elixir_wechat_pay.xml");
        assert_eq!(
            post(&url, elixir.clone()).await,
            (200, "SUCCESS".into()),
            "{kind:?}"
        );
        let row = db.store.find("1409811653").await.unwrap().remove(0);
        assert_eq!(row.state, OrderState::Success, "{kind:?}");
        assert_eq!(
            row.transaction_id.as_deref(),
            Some("1004400740201409030005092168")
        );
        // time_end 20140903131540 is China Standard Time.
        assert_eq!(
            row.paid_at.unwrap().to_rfc3339(),
            "2014-09-03T05:15:40+00:00",
            "{kind:?}"
        );
        assert_eq!(post(&url, elixir).await, (200, "SUCCESS".into()));
        assert_eq!(db.store.events(row.id).await.unwrap().len(), 1);
        // WeChat's published signing vector verifies with its merchant's key, but it is not a
        // payment notification (no return_code, no out_trade_no): refused, nothing changes.
        let doc = merchant("10000100", "wxd930ea5d5a258f4f", SignType::Md5, MD5_KEY);
        let url = serve_notify_for(&db, telemetry.clone(), &[doc], Default::default()).await;
        assert_eq!(
            post(&url, fixture("notify_doc_vector_skit.xml")).await,
            (200, "FAIL".into())
        );
        // The unverifiable doc sample is refused.
        assert_eq!(
            post(
                &url,
                fixture("notify_success_official_doc_sample_wechatpay_php.xml")
            )
            .await,
            (200, "FAIL".into())
        );
        let events = db.store.events_after(0, 100).await.unwrap();
        assert_eq!(
            events.len(),
            1,
            "{kind:?}: only the elixir payment: {events:?}"
        );
        db.cleanup().await;
    }
}

#[tokio::test]
async fn the_simulators_notification_reaches_the_daemons_endpoint_and_the_order_is_never_queried() {
    for db in backends().await {
        let kind = db.kind;
        let e = Engine::with(db, |s| {
            s.notify.listen = Some("127.0.0.1:0".parse().unwrap());
            // The first query would come 20 s after creation; the notification is faster.
            s.schedule.grace_seconds = 20;
        })
        .await;
        let stop = CancellationToken::new();
        let daemon = Daemon::start(&e.settings, stop.clone()).await.unwrap();
        let notify_url = format!("http://{}{NOTIFY_PATH}", daemon.notify_addr.unwrap());
        let m = hmac_merchant();
        let otn = unique_otn("n").to_string();
        e.db.store
            .insert_order(&NewOrder {
                mch_id: m.mch_id.as_str(),
                appid: m.appid.as_str(),
                out_trade_no: &otn,
                total_fee: 990,
            })
            .await
            .unwrap();
        let (status, body) = e
            .sim
            .control(
                "POST",
                &format!("/_sim/orders/{}/{otn}", m.mch_id),
                json!({"total_fee": 990, "notify_url": notify_url}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        e.pay(&m, &otn, json!({"notify": "deliver"})).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while e.row(&otn).await.state != OrderState::Success {
            assert!(
                std::time::Instant::now() < deadline,
                "{kind:?}: never settled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let events = e.events(&otn).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].source.as_str(), "notify", "{kind:?}");
        // Several scan ticks later: WeChat was never asked, and the notification was
        // acknowledged on its first delivery.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(e.queries(&otn), 0, "{kind:?}");
        let (_, shown) = e
            .sim
            .control(
                "GET",
                &format!("/_sim/orders/{}/{otn}", m.mch_id),
                json!(null),
            )
            .await;
        assert_eq!(shown["notify_delivered"], true, "{shown}");
        assert_eq!(shown["notify_attempts"], 1, "{shown}");
        let metrics = daemon.telemetry.render();
        assert_eq!(
            metric_value(
                &metrics,
                "wxpay_reconciler_notify_requests_total{mch_id=\"1900000109\",outcome=\"ok\"}"
            ),
            1.0
        );
        stop.cancel();
        daemon.wait().await.unwrap();
        e.finish().await;
    }
}

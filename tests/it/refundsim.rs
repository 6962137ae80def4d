//! Refund queries against the real simulator over HTTP, with both clients through the
//! [`Gateway`]: v2 MD5 and HMAC-SHA256 merchants and the v3 test merchant. PROCESSING, then
//! finished as SUCCESS (with its time and refund id); CLOSED; ABNORMAL; unknown refunds; the
//! control API refusing an over-refund; forged, unsigned and mismatched answers refused. And
//! the v2 fixture of tests/fixtures/wxpay-v2-refunds.

use serde_json::json;
use wxpay_reconciler::domain::{Fen, OutRefundNo, RefundStatus};
use wxpay_reconciler::gateway::{
    Failure, Gateway, GatewayError, Merchant, OrderRef, QueryAnswer, RefundAnswer, RefundReport,
};
use wxpay_reconciler::sim::v3::test_v3_merchant;
use wxpay_reconciler::wxpay::client::parse_refund_report;
use wxpay_reconciler::wxpay::{ClientConfig, SignType, sign, xml};

use crate::helpers::{
    MD5_KEY, TestSim, both_merchants, client_for, merchant, replay_server, unique_otn,
};

fn gateway(url: &str) -> Gateway {
    let mut cfg = ClientConfig::new(url);
    cfg.timeout = std::time::Duration::from_millis(1500);
    Gateway::new(cfg).unwrap()
}

fn orn(prefix: &str) -> OutRefundNo {
    OutRefundNo::parse(unique_otn(prefix).as_str()).unwrap()
}

fn refund(answer: Result<RefundAnswer, GatewayError>) -> RefundReport {
    match answer {
        Ok(RefundAnswer::Refund(r)) => r,
        other => panic!("expected a refund, got {other:?}"),
    }
}

/// A paid order of `total` fen at the simulator; its out_trade_no.
async fn paid_order(sim: &TestSim, m: &Merchant, total: i64) -> String {
    let n = unique_otn("rf");
    sim.create_order(m, &n, total).await;
    sim.pay(m, &n, json!({"notify": "drop"})).await;
    n.as_str().to_owned()
}

async fn new_refund(
    sim: &TestSim,
    m: &Merchant,
    out_trade_no: &str,
    no: &OutRefundNo,
    fee: i64,
    outcome: &str,
) -> (u16, serde_json::Value) {
    sim.control(
        "POST",
        &format!("/_sim/orders/{}/{out_trade_no}/refunds", m.mch_id),
        json!({"out_refund_no": no.as_str(), "refund_fee": fee, "outcome": outcome, "notify": "drop"}),
    )
    .await
}

/// The whole life of refunds of one order, for one merchant of either API.
async fn refunds_of_one_order(sim: &TestSim, gw: &Gateway, m: &Merchant) {
    let order = paid_order(sim, m, 1000).await;

    let processing = orn("p");
    let (status, body) = new_refund(sim, m, &order, &processing, 300, "PROCESSING").await;
    assert_eq!(status, 201, "{body}");
    let r = refund(gw.refund_query(m, &processing).await);
    assert_eq!(r.status, RefundStatus::Processing);
    assert_eq!(r.out_refund_no, processing);
    assert_eq!(r.out_trade_no.as_str(), order);
    assert_eq!(r.refund_fee, Fen::new(300).unwrap());
    assert_eq!(r.total_fee, Some(Fen::new(1000).unwrap()));
    assert_eq!(r.currency.as_str(), "CNY");
    assert_eq!(r.success_time, None);
    assert!(r.refund_id.is_some());

    // The order reports REFUND once refunded (WeChat's trade_state).
    match gw
        .order_query(
            m,
            &OrderRef::OutTradeNo(wxpay_reconciler::domain::OutTradeNo::parse(&order).unwrap()),
        )
        .await
        .unwrap()
    {
        QueryAnswer::Order(o) => assert_eq!(o.trade_state.as_str(), "REFUND"),
        other => panic!("{other:?}"),
    }

    let before = chrono::Utc::now() - chrono::TimeDelta::seconds(2);
    let (status, body) = sim
        .control(
            "POST",
            &format!("/_sim/refunds/{}/{}/finish", m.mch_id, processing.as_str()),
            json!({"outcome": "SUCCESS"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let done = refund(gw.refund_query(m, &processing).await);
    assert_eq!(done.status, RefundStatus::Success);
    assert_eq!(done.refund_id, r.refund_id, "the same refund");
    let at = done.success_time.expect("a success time");
    assert!(at >= before && at <= chrono::Utc::now(), "{at}");
    assert_eq!(done.refund_fee.get(), 300);
    // Finished once only.
    let (status, _) = sim
        .control(
            "POST",
            &format!("/_sim/refunds/{}/{}/finish", m.mch_id, processing.as_str()),
            json!({"outcome": "CLOSED"}),
        )
        .await;
    assert_eq!(status, 409);

    let closed = orn("c");
    assert_eq!(
        new_refund(sim, m, &order, &closed, 200, "CLOSED").await.0,
        201
    );
    assert_eq!(
        refund(gw.refund_query(m, &closed).await).status,
        RefundStatus::Closed
    );

    let abnormal = orn("a");
    assert_eq!(
        new_refund(sim, m, &order, &abnormal, 100, "ABNORMAL")
            .await
            .0,
        201
    );
    let a = refund(gw.refund_query(m, &abnormal).await);
    assert_eq!(
        (a.status, a.refund_fee.get()),
        (RefundStatus::Abnormal, 100)
    );

    // 300 + 100 refunded (the closed 200 went back): 600 left, 601 is refused.
    let (status, body) = new_refund(sim, m, &order, &orn("o"), 601, "SUCCESS").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = new_refund(sim, m, &order, &orn("z"), 0, "SUCCESS").await;
    assert_eq!(status, 400, "{body}");
    let last = orn("l");
    assert_eq!(
        new_refund(sim, m, &order, &last, 600, "SUCCESS").await.0,
        201
    );
    let l = refund(gw.refund_query(m, &last).await);
    assert_eq!(l.status, RefundStatus::Success);
    assert!(l.success_time.is_some() && l.refund_id.is_some());
    assert_eq!(
        new_refund(sim, m, &order, &orn("x"), 1, "SUCCESS").await.0,
        400
    );
    // The same number twice.
    assert_eq!(new_refund(sim, m, &order, &last, 1, "SUCCESS").await.0, 409);

    // An unpaid order cannot be refunded.
    let unpaid = unique_otn("up");
    sim.create_order(m, &unpaid, 500).await;
    let (status, body) = new_refund(sim, m, unpaid.as_str(), &orn("u"), 1, "SUCCESS").await;
    assert_eq!(status, 409, "{body}");

    assert_eq!(
        gw.refund_query(m, &orn("none")).await.unwrap(),
        RefundAnswer::NotExist
    );
}

#[tokio::test]
async fn refund_lifecycle_v2_md5_and_hmac_and_v3() {
    let sim = TestSim::start().await;
    let gw = gateway(&sim.url());
    for m in both_merchants() {
        refunds_of_one_order(&sim, &gw, &m).await;
    }
    refunds_of_one_order(&sim, &gw, &test_v3_merchant().unwrap()).await;
    sim.stop().await;
}

#[tokio::test]
async fn refundquery_is_served_under_sandboxnew_too() {
    let sim = TestSim::start().await;
    let gw = gateway(&format!("{}/sandboxnew", sim.url()));
    let [m, _] = both_merchants();
    let order = paid_order(&sim, &m, 50).await;
    let no = orn("s");
    assert_eq!(
        new_refund(&sim, &m, &order, &no, 50, "SUCCESS").await.0,
        201
    );
    assert_eq!(refund(gw.refund_query(&m, &no).await).refund_fee.get(), 50);
    sim.stop().await;
}

/// Every reply-corrupting fault of `refundquery` is refused, with its outcome, for both APIs.
#[tokio::test]
async fn forged_unsigned_and_mismatched_refund_answers_are_refused() {
    let sim = TestSim::start().await;
    let gw = gateway(&sim.url());
    let [v2, _] = both_merchants();
    let v3 = test_v3_merchant().unwrap();
    let mut asked = Vec::new();
    for m in [&v2, &v3] {
        let order = paid_order(&sim, m, 100).await;
        let no = orn("f");
        assert_eq!(new_refund(&sim, m, &order, &no, 10, "SUCCESS").await.0, 201);
        asked.push((m, no));
    }
    for (fault, v2_outcome, v3_outcome) in [
        ("bad_sign_rate", Failure::SignInvalid, Failure::Unverified),
        ("unsigned_rate", Failure::SignInvalid, Failure::Unverified),
        ("mismatch_rate", Failure::Mismatch, Failure::Mismatch),
        ("malformed_rate", Failure::Malformed, Failure::Malformed),
        (
            "system_error_rate",
            Failure::ResultFail,
            Failure::HttpStatus,
        ),
    ] {
        sim.faults(json!({"endpoint": "refundquery", fault: 1.0}))
            .await;
        for ((m, no), want) in asked.iter().zip([v2_outcome, v3_outcome]) {
            let e = gw.refund_query(m, no).await.unwrap_err();
            assert_eq!(e.failure(), want, "{fault} {}: {e}", m.mch_id);
            assert!(e.is_transient(), "{e}");
        }
        // Nor is a forged "no such refund" an answer.
        if fault == "bad_sign_rate" {
            let e = gw.refund_query(&v3, &orn("none")).await.unwrap_err();
            assert_eq!(e.failure(), Failure::Unverified, "{e}");
        }
    }
    // orderquery's faults are its own.
    sim.faults(json!({"endpoint": "refundquery"})).await;
    sim.faults(json!({"endpoint": "orderquery", "bad_sign_rate": 1.0}))
        .await;
    for (m, no) in &asked {
        assert_eq!(refund(gw.refund_query(m, no).await).refund_fee.get(), 10);
    }
    sim.stop().await;
}

const FIXTURE: &str = "wxjava_refundquery_doc_example_processing.xml";

fn v2_refund_fixture() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wxpay-v2-refunds")
        .join(FIXTURE);
    std::fs::read(path).unwrap()
}

/// The documentation's refundquery example, as WxJava's test suite carries it: decoded by the
/// strict codec and parsed with the signature check off (its key was never published).
#[test]
fn the_wxjava_refundquery_example_parses_with_the_signature_check_off() {
    let fields = xml::decode(&v2_refund_fixture()).unwrap();
    let doc_merchant = merchant("10000100", "wx2421b1c4370ec43b", SignType::Md5, MD5_KEY);
    let (key, _) = doc_merchant.v2_credentials().unwrap();
    assert!(
        sign::verify(&fields, key, SignType::Md5).is_err(),
        "the example is not signed with the published MD5 test key"
    );
    let r = parse_refund_report(&fields, &OutRefundNo::parse("1415701182").unwrap()).unwrap();
    assert_eq!(r.status, RefundStatus::Processing);
    assert_eq!(r.refund_fee.get(), 1);
    assert_eq!(
        r.refund_id.unwrap().as_str(),
        "2008450740201411110000174436"
    );
    assert_eq!(r.out_trade_no.as_str(), "1415757673");
    assert_eq!((r.total_fee, r.currency.as_str()), (None, "CNY"));
    assert_eq!((r.success_time, r.recv_account), (None, None));
    // Asked about another refund, the same reply is refused.
    assert!(parse_refund_report(&fields, &OutRefundNo::parse("1415701183").unwrap()).is_err());
}

/// The same example re-signed with the MD5 test key, through the real client over HTTP.
#[tokio::test]
async fn the_wxjava_refundquery_example_resigned_passes_the_real_client() {
    let mut fields = xml::decode(&v2_refund_fixture()).unwrap();
    fields.remove("sign");
    let m = merchant("10000100", "wx2421b1c4370ec43b", SignType::Md5, MD5_KEY);
    let (key, _) = m.v2_credentials().unwrap();
    let signature = sign::sign(&fields, key, SignType::Md5);
    fields.insert("sign", signature);
    let body = xml::encode(&fields).unwrap().into_bytes();
    let (url, task) = replay_server(200, body).await;
    let client = client_for(&url);
    let asked = OutRefundNo::parse("1415701182").unwrap();
    match client.refund_query(&m, &asked).await.unwrap() {
        RefundAnswer::Refund(r) => {
            assert_eq!(
                (r.status, r.refund_fee.get()),
                (RefundStatus::Processing, 1)
            );
        }
        other => panic!("{other:?}"),
    }
    // Another merchant's key: refused.
    let other = merchant(
        "10000100",
        "wx2421b1c4370ec43b",
        SignType::Md5,
        "0".repeat(32).as_str(),
    );
    assert_eq!(
        client
            .refund_query(&other, &asked)
            .await
            .unwrap_err()
            .outcome(),
        "sign_invalid"
    );
    // Asked about another refund: a signed reply about something else.
    let e = client
        .refund_query(&m, &OutRefundNo::parse("1415701183").unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.outcome(), "mismatch");
    task.abort();
}

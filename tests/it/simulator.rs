//! The simulator as a WeChat Pay v2 server: what it accepts, what it refuses, what it signs, its
//! control API, its counters and its notification delivery.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use wxpay_reconciler::wxpay::SignType;
use wxpay_reconciler::wxpay::client::verify_envelope;
use wxpay_reconciler::wxpay::notify::parse_payment;
use wxpay_reconciler::wxpay::{Credentials, Fields, Merchant, OrderRef, sign, xml};

use crate::helpers::{TestSim, both_merchants, hmac_merchant, md5_merchant, unique_otn};

/// Signs `fields` as `m` and POSTs them to `path`; returns the decoded reply.
async fn post_signed(sim: &TestSim, path: &str, m: &Merchant, mut fields: Fields) -> Fields {
    fields.insert("appid", m.appid.as_str());
    fields.insert("mch_id", m.mch_id.as_str());
    fields.insert("nonce_str", wxpay_reconciler::wxpay::client::nonce());
    sign::sign_in_place(&mut fields, m.v2_key(), m.v2_sign_type());
    post_raw(sim, path, xml::encode(&fields).unwrap().into_bytes()).await
}

async fn post_raw(sim: &TestSim, path: &str, body: Vec<u8>) -> Fields {
    let resp = sim
        .http
        .post(format!("{}{path}", sim.url()))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    xml::decode(&resp.bytes().await.unwrap()).unwrap()
}

fn unified_order(out_trade_no: &str, total_fee: i64) -> Fields {
    Fields::new()
        .with("body", "测试商品")
        .with("out_trade_no", out_trade_no)
        .with("total_fee", total_fee.to_string())
        .with("spbill_create_ip", "127.0.0.1")
        .with("notify_url", "http://127.0.0.1:9/notify")
        .with("trade_type", "JSAPI")
        .with("openid", "oUpF8uMEb4qRXf22hE3X68TekukE")
}

fn assert_fail_without_data(reply: &Fields, message: &str) {
    assert_eq!(reply.get("return_code"), Some("FAIL"), "{reply:?}");
    assert_eq!(reply.get("return_msg"), Some(message), "{reply:?}");
    assert_eq!(reply.len(), 2, "a FAIL reply carries no data: {reply:?}");
}

#[tokio::test]
async fn unifiedorder_answers_a_signed_prepay_id_and_is_idempotent() {
    let sim = TestSim::start().await;
    for m in both_merchants() {
        for prefix in ["", "/sandboxnew"] {
            let n = unique_otn("u");
            let path = format!("{prefix}/pay/unifiedorder");
            let reply = post_signed(&sim, &path, &m, unified_order(n.as_str(), 88)).await;
            verify_envelope(&m, &reply).unwrap_or_else(|e| panic!("{}: {e}", m.v2_sign_type()));
            assert_eq!(reply.get("result_code"), Some("SUCCESS"));
            let prepay = reply.get_nonempty("prepay_id").unwrap().to_owned();
            let again = post_signed(&sim, &path, &m, unified_order(n.as_str(), 88)).await;
            assert_eq!(
                again.get("prepay_id"),
                Some(prepay.as_str()),
                "same order, same prepay_id"
            );
            let other = post_signed(&sim, &path, &m, unified_order(n.as_str(), 89)).await;
            verify_envelope(&m, &other).unwrap();
            assert_eq!(other.get("result_code"), Some("FAIL"));
            assert_eq!(other.get("err_code"), Some("INVALID_REQUEST"));

            let order = sim.sim.state.order(m.mch_id.as_str(), n.as_str()).unwrap();
            assert_eq!(order.total_fee, 88);
            assert_eq!(
                order.notify_url.as_deref(),
                Some("http://127.0.0.1:9/notify")
            );
            assert_eq!(order.sign_type, m.v2_sign_type());
            assert_eq!(
                order.prepay_expires_at - order.created_at,
                chrono::TimeDelta::hours(2)
            );

            sim.pay(&m, &n, json!({"notify": "drop"})).await;
            let paid = post_signed(&sim, &path, &m, unified_order(n.as_str(), 88)).await;
            assert_eq!(paid.get("err_code"), Some("ORDERPAID"));
        }
    }
    sim.stop().await;
}

#[tokio::test]
async fn bad_requests_get_wechats_fail_answer_and_never_data() {
    let sim = TestSim::start().await;
    let m = md5_merchant();
    let n = unique_otn("bad");
    sim.create_order(&m, &n, 1).await;
    sim.pay(&m, &n, json!({"notify": "drop"})).await;
    let query = Fields::new().with("out_trade_no", n.as_str());

    // A bad signature.
    let mut forged = query.clone();
    forged.insert("appid", m.appid.as_str());
    forged.insert("mch_id", m.mch_id.as_str());
    forged.insert("nonce_str", "abc");
    forged.insert("sign", "9A0A8659F005D6984697E2CA0A9CF3B7");
    let reply = post_raw(
        &sim,
        "/pay/orderquery",
        xml::encode(&forged).unwrap().into_bytes(),
    )
    .await;
    assert_fail_without_data(&reply, "签名错误");

    // No signature at all.
    forged.remove("sign");
    let reply = post_raw(
        &sim,
        "/pay/orderquery",
        xml::encode(&forged).unwrap().into_bytes(),
    )
    .await;
    assert_fail_without_data(&reply, "签名错误");

    // Signed with MD5 but declaring HMAC-SHA256.
    let mut lying = forged.clone();
    lying.insert("sign", sign::sign(&forged, m.v2_key(), SignType::Md5));
    lying.insert("sign_type", "HMAC-SHA256");
    let reply = post_raw(
        &sim,
        "/pay/orderquery",
        xml::encode(&lying).unwrap().into_bytes(),
    )
    .await;
    assert_fail_without_data(&reply, "签名错误");

    // An unknown merchant, and a known one with another merchant's appid.
    let mut stranger = m.clone();
    stranger.mch_id = "1234567890".parse().unwrap();
    let reply = post_signed(&sim, "/pay/orderquery", &stranger, query.clone()).await;
    assert_fail_without_data(&reply, "mch_id参数错误");
    let mut wrong_app = m.clone();
    wrong_app.appid = hmac_merchant().appid;
    let reply = post_signed(&sim, "/pay/orderquery", &wrong_app, query.clone()).await;
    assert_fail_without_data(&reply, "appid和mch_id不匹配");

    // Bodies the strict codec refuses, including the shared XXE fixture.
    for body in [
        b"not xml".to_vec(),
        b"<xml><a>1</a><a>2</a></xml>".to_vec(),
        crate::helpers::fixture("neg_xxe_injection_wechatpay_php.xml"),
    ] {
        let reply = post_raw(&sim, "/pay/orderquery", body).await;
        assert_fail_without_data(&reply, "XML格式错误");
    }
    sim.stop().await;
}

#[tokio::test]
async fn every_success_reply_is_signed_with_the_requests_sign_type() {
    let sim = TestSim::start().await;
    let m = md5_merchant();
    let n = unique_otn("sig");
    sim.create_order(&m, &n, 3).await;
    // The MD5 merchant may ask with HMAC-SHA256 (as WeChat allows); the reply follows.
    for st in [SignType::Md5, SignType::HmacSha256] {
        let mut as_type = m.clone();
        as_type.credentials = Credentials::V2 {
            sign_type: st,
            key: m.v2_key().clone(),
        };
        let reply = post_signed(
            &sim,
            "/pay/orderquery",
            &as_type,
            Fields::new().with("out_trade_no", n.as_str()),
        )
        .await;
        verify_envelope(&as_type, &reply).unwrap_or_else(|e| panic!("{st}: {e}"));
        let other = if st == SignType::Md5 {
            SignType::HmacSha256
        } else {
            SignType::Md5
        };
        assert!(
            sign::verify(&reply, m.v2_key(), other).is_err(),
            "{st} reply must not verify as {other}"
        );
    }
    sim.stop().await;
}

#[tokio::test]
async fn the_control_api_refuses_impossible_changes() {
    let sim = TestSim::start().await;
    let m = md5_merchant();
    let n = unique_otn("ctl");
    let path = |action: &str| format!("/_sim/orders/{}/{}{action}", m.mch_id, n);

    let (status, _) = sim
        .control("POST", &path("/pay"), json!({"notify": "drop"}))
        .await;
    assert_eq!(status, 404, "unknown order without total_fee");
    let (status, _) = sim.control("POST", &path("/refund"), json!({})).await;
    assert_eq!(status, 404);
    let (status, _) = sim
        .control("POST", &path("/pay"), json!({"notify": "later"}))
        .await;
    assert_eq!(status, 422, "notify must be deliver or drop");

    // Paying an order the simulator never saw creates it, as paid, with that amount.
    let (status, body) = sim
        .control(
            "POST",
            &path("/pay"),
            json!({"notify": "drop", "total_fee": 500}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["transaction_id"].as_str().unwrap().len() >= 28);
    let (status, _) = sim
        .control("POST", &path("/pay"), json!({"notify": "drop"}))
        .await;
    assert_eq!(status, 409, "paid twice");
    let (status, _) = sim.control("POST", &path("/close"), json!({})).await;
    assert_eq!(status, 409, "a paid order cannot be closed");
    let (status, _) = sim.control("POST", &path("/refund"), json!({})).await;
    assert_eq!(status, 200);
    let (status, body) = sim.control("GET", &path(""), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["trade_state"], "REFUND");

    let (status, _) = sim
        .control(
            "PUT",
            "/_sim/faults",
            json!({"endpoint": "orderquery", "timeout_rate": 2}),
        )
        .await;
    assert_eq!(status, 400, "rates are 0..1");
    let (status, _) = sim
        .control("PUT", "/_sim/faults", json!({"endpoint": "refund"}))
        .await;
    assert_eq!(status, 400);
    let (status, _) = sim
        .control(
            "PUT",
            "/_sim/faults",
            json!({"endpoint": "orderquery", "timeout_rte": 1}),
        )
        .await;
    assert_eq!(status, 400, "typos are refused, not ignored");
    let (status, _) = sim
        .control(
            "POST",
            "/_sim/orders/999/x1/pay",
            json!({"notify": "drop", "total_fee": 1}),
        )
        .await;
    assert_eq!(status, 404, "unknown merchant");
    sim.stop().await;
}

#[tokio::test]
async fn a_paid_amount_other_than_the_ordered_one_is_reported_as_paid() {
    let sim = TestSim::start().await;
    let m = hmac_merchant();
    let n = unique_otn("amt");
    sim.create_order(&m, &n, 1000).await;
    sim.pay(&m, &n, json!({"notify": "drop", "total_fee": 1}))
        .await;
    let answer = sim
        .client()
        .order_query(&m, &OrderRef::OutTradeNo(n))
        .await
        .unwrap();
    let wxpay_reconciler::wxpay::QueryAnswer::Order(r) = answer else {
        panic!()
    };
    assert_eq!(r.amount.map(|f| f.get()), Some(1));
    sim.stop().await;
}

#[tokio::test]
async fn stats_count_queries_and_overlapping_queries_per_order() {
    let sim = TestSim::start().await;
    let m = md5_merchant();
    let n = unique_otn("cnt");
    sim.create_order(&m, &n, 1).await;
    sim.faults(json!({"endpoint": "orderquery", "latency_ms": 300}))
        .await;
    let client = Arc::new(sim.client());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, m, n) = (client.clone(), m.clone(), n.clone());
        tasks.spawn(async move { client.order_query(&m, &OrderRef::OutTradeNo(n)).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let other = unique_otn("cnt");
    client
        .order_query(&m, &OrderRef::OutTradeNo(other.clone()))
        .await
        .unwrap();

    let (status, stats) = sim.control("GET", "/_sim/stats", json!({})).await;
    assert_eq!(status, 200);
    let mine = &stats["orders"][n.as_str()];
    assert_eq!(mine["queries"], 4);
    assert_eq!(
        mine["max_inflight"], 4,
        "four concurrent queries overlapped: {stats}"
    );
    assert_eq!(mine["inflight"], 0);
    assert_eq!(stats["orders"][other.as_str()]["max_inflight"], 1);
    assert!(stats["requests"].as_u64().unwrap() >= 5);
    sim.stop().await;
}

/// A merchant's notify endpoint that refuses the first `refuse` notifications.
async fn notify_receiver(refuse: usize) -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let seen = received.clone();
    let app = axum::Router::new().route(
        "/notify",
        axum::routing::post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let mut all = seen.lock().unwrap();
                all.push(body.to_vec());
                let code = if all.len() > refuse { "SUCCESS" } else { "FAIL" };
                format!("<xml><return_code><![CDATA[{code}]]></return_code><return_msg><![CDATA[OK]]></return_msg></xml>")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/notify"), received)
}

#[tokio::test]
async fn notifications_follow_the_retry_schedule_until_acknowledged() {
    let sim = TestSim::start().await;
    let (status, _) = sim
        .control(
            "PUT",
            "/_sim/config",
            json!({"notify_retry_ms": [50, 50, 50, 50]}),
        )
        .await;
    assert_eq!(status, 200);
    for m in both_merchants() {
        let (url, received) = notify_receiver(2).await;
        let n = unique_otn("nt");
        let mut order = unified_order(n.as_str(), 321);
        order.insert("notify_url", url.as_str());
        let reply = post_signed(&sim, "/pay/unifiedorder", &m, order).await;
        assert_eq!(reply.get("result_code"), Some("SUCCESS"));
        let tx = sim.pay(&m, &n, json!({"notify": "deliver"})).await;

        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while received.lock().unwrap().len() < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let bodies = received.lock().unwrap().clone();
        assert_eq!(
            bodies.len(),
            3,
            "two refusals, then acknowledged, then silence"
        );
        for body in &bodies {
            let f = xml::decode(body).unwrap();
            verify_envelope(&m, &f).unwrap_or_else(|e| panic!("{}: {e}", m.v2_sign_type()));
            let report = parse_payment(&f).unwrap();
            assert_eq!(report.out_trade_no, n);
            assert_eq!(report.amount.map(|f| f.get()), Some(321));
            assert_eq!(
                report.transaction_id.as_ref().map(|t| t.as_str()),
                Some(tx.as_str())
            );
        }
        let (_, stats) = sim.control("GET", "/_sim/stats", json!({})).await;
        assert_eq!(stats["notifications"][n.as_str()]["attempts"], 3);
        assert_eq!(stats["notifications"][n.as_str()]["delivered"], true);

        // A dropped notification is never sent.
        let (url, received) = notify_receiver(0).await;
        let dropped = unique_otn("nt");
        let mut order = unified_order(dropped.as_str(), 5);
        order.insert("notify_url", url.as_str());
        post_signed(&sim, "/pay/unifiedorder", &m, order).await;
        sim.pay(&m, &dropped, json!({"notify": "drop"})).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(received.lock().unwrap().is_empty());
    }
    sim.stop().await;
}

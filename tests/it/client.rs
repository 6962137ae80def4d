//! The orderquery / closeorder client against the simulator on port 0: every outcome the
//! caller counts, induced through the simulator's fault injection, for both sign types.

use std::time::Duration;

use serde_json::json;
use wxpay_reconciler::domain::TradeState;
use wxpay_reconciler::wxpay::SignType;
use wxpay_reconciler::wxpay::{
    ClientConfig, CloseAnswer, ErrCode, OrderRef, QueryAnswer, RetryHint, SignError, TradeReport,
    WxPayClient, WxPayError,
};

use crate::helpers::{
    TestSim, both_merchants, closed_port_url, hmac_merchant, md5_merchant, merchant, unique_otn,
};

fn order(answer: Result<QueryAnswer, WxPayError>) -> TradeReport {
    match answer {
        Ok(QueryAnswer::Order(r)) => r,
        other => panic!("expected an order, got {other:?}"),
    }
}

#[tokio::test]
async fn an_order_goes_from_notpay_to_success_with_both_sign_types() {
    let sim = TestSim::start().await;
    let client = sim.client();
    for m in both_merchants() {
        let n = unique_otn("ok");
        sim.create_order(&m, &n, 1999).await;
        let by_no = OrderRef::OutTradeNo(n.clone());
        let before = order(client.order_query(&m, &by_no).await);
        assert_eq!(
            before.trade_state,
            TradeState::NotPay,
            "{}",
            m.v2_sign_type()
        );
        assert_eq!(before.transaction_id, None);

        let tx = sim.pay(&m, &n, json!({"notify": "drop"})).await;
        let after = order(client.order_query(&m, &by_no).await);
        assert_eq!(
            after.trade_state,
            TradeState::Success,
            "{}",
            m.v2_sign_type()
        );
        assert_eq!(after.out_trade_no, n);
        assert_eq!(after.amount.map(|f| f.get()), Some(1999));
        assert_eq!(after.payer_amount.map(|f| f.get()), Some(1999));
        assert_eq!(
            after.transaction_id.as_ref().map(|t| t.as_str()),
            Some(tx.as_str())
        );
        let paid_at = after.paid_at.expect("time_end");
        assert!((chrono::Utc::now() - paid_at).num_seconds().abs() < 5);
        assert_eq!(after.state_desc.as_deref(), Some("支付成功"));

        let by_tx = OrderRef::TransactionId(tx.parse().unwrap());
        assert_eq!(order(client.order_query(&m, &by_tx).await), after);
    }
    sim.stop().await;
}

#[tokio::test]
async fn every_trade_state_is_typed_and_unknown_ones_are_kept() {
    let sim = TestSim::start().await;
    let client = sim.client();
    let m = hmac_merchant();
    let n = unique_otn("st");
    sim.create_order(&m, &n, 100).await;
    for (raw, expected) in [
        ("NOTPAY", TradeState::NotPay),
        ("USERPAYING", TradeState::UserPaying),
        ("ACCEPT", TradeState::Accept),
        ("PAYERROR", TradeState::PayError),
        ("REVOKED", TradeState::Revoked),
        ("CLOSED", TradeState::Closed),
        ("SOMETHING_NEW", TradeState::Unknown("SOMETHING_NEW".into())),
    ] {
        let (status, body) = sim
            .control(
                "POST",
                &format!("/_sim/orders/{}/{}/state", m.mch_id, n),
                json!({ "trade_state": raw }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let r = order(
            client
                .order_query(&m, &OrderRef::OutTradeNo(n.clone()))
                .await,
        );
        assert_eq!(r.trade_state, expected);
    }
    // SUCCESS, then REFUND, through the control API.
    sim.control(
        "POST",
        &format!("/_sim/orders/{}/{}/state", m.mch_id, n),
        json!({ "trade_state": "NOTPAY" }),
    )
    .await;
    sim.pay(&m, &n, json!({"notify": "drop"})).await;
    let (status, _) = sim
        .control(
            "POST",
            &format!("/_sim/orders/{}/{}/refund", m.mch_id, n),
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    let r = order(
        client
            .order_query(&m, &OrderRef::OutTradeNo(n.clone()))
            .await,
    );
    assert_eq!(r.trade_state, TradeState::Refund);
    assert_eq!(r.amount.map(|f| f.get()), Some(100));
    sim.stop().await;
}

#[tokio::test]
async fn an_order_wechat_never_saw_is_order_not_exist() {
    let sim = TestSim::start().await;
    for m in both_merchants() {
        let answer = sim
            .client()
            .order_query(&m, &OrderRef::OutTradeNo(unique_otn("none")))
            .await;
        assert_eq!(answer, Ok(QueryAnswer::NotExist));
    }
    sim.stop().await;
}

/// Sets one fault at rate 1 on orderquery and returns the error a query gets.
async fn query_with_fault(
    sim: &TestSim,
    client: &WxPayClient,
    fault: serde_json::Value,
) -> Vec<WxPayError> {
    let mut body = fault;
    body["endpoint"] = json!("orderquery");
    sim.faults(body).await;
    let mut errors = Vec::new();
    for m in both_merchants() {
        let n = unique_otn("f");
        sim.create_order(&m, &n, 1).await;
        sim.pay(&m, &n, json!({"notify": "drop"})).await;
        match client.order_query(&m, &OrderRef::OutTradeNo(n)).await {
            Err(e) => errors.push(e),
            Ok(a) => panic!("{} must fail, got {a:?}", m.v2_sign_type()),
        }
    }
    sim.faults(json!({"endpoint": "orderquery"})).await;
    errors
}

#[tokio::test]
async fn each_failure_is_a_distinct_transient_outcome() {
    let sim = TestSim::start().await;
    let client = sim.client();
    type Case = (serde_json::Value, &'static str, fn(&WxPayError) -> bool);
    let cases: Vec<Case> = vec![
        (json!({"http_500_rate": 1.0}), "http_status", |e| {
            matches!(e, WxPayError::HttpStatus(500))
        }),
        (json!({"malformed_rate": 1.0}), "malformed", |e| {
            matches!(e, WxPayError::Malformed(_))
        }),
        (json!({"return_fail_rate": 1.0}), "return_fail", |e| {
            matches!(e, WxPayError::ReturnFail(_))
        }),
        (json!({"bad_sign_rate": 1.0}), "sign_invalid", |e| {
            matches!(e, WxPayError::Sign(SignError::Invalid))
        }),
        (json!({"unsigned_rate": 1.0}), "sign_invalid", |e| {
            matches!(e, WxPayError::Sign(SignError::Missing))
        }),
        (json!({"mismatch_rate": 1.0}), "mismatch", |e| {
            matches!(
                e,
                WxPayError::Mismatch {
                    field: "out_trade_no",
                    ..
                }
            )
        }),
        (json!({"system_error_rate": 1.0}), "result_fail", |e| {
            matches!(
                e,
                WxPayError::ResultFail {
                    code: ErrCode::SystemError,
                    ..
                }
            )
        }),
        (json!({"frequency_limited_rate": 1.0}), "result_fail", |e| {
            matches!(
                e,
                WxPayError::ResultFail {
                    code: ErrCode::FrequencyLimited,
                    ..
                }
            )
        }),
    ];
    for (fault, outcome, expected) in cases {
        for err in query_with_fault(&sim, &client, fault.clone()).await {
            assert!(expected(&err), "{fault}: got {err:?}");
            assert_eq!(err.outcome(), outcome, "{fault}");
            let hint = if outcome == "result_fail" && fault.get("frequency_limited_rate").is_some()
            {
                RetryHint::SlowDown
            } else {
                RetryHint::Backoff
            };
            assert_eq!(err.retry_hint(), hint, "{fault}");
        }
    }
    sim.stop().await;
}

#[tokio::test]
async fn a_reply_slower_than_the_timeout_is_a_timeout() {
    let sim = TestSim::start().await;
    let mut cfg = ClientConfig::new(sim.url());
    cfg.timeout = Duration::from_millis(300);
    cfg.connect_timeout = Duration::from_millis(300);
    let client = WxPayClient::new(cfg).unwrap();
    for fault in [json!({"timeout_rate": 1.0}), json!({"latency_ms": 2000})] {
        for err in query_with_fault(&sim, &client, fault.clone()).await {
            assert_eq!(err, WxPayError::Timeout, "{fault}");
            assert_eq!(err.outcome(), "timeout");
        }
    }
    sim.stop().await;
}

#[tokio::test]
async fn nothing_listening_is_a_transport_error() {
    let url = closed_port_url().await;
    let err = crate::helpers::client_for(&url)
        .order_query(&md5_merchant(), &OrderRef::OutTradeNo(unique_otn("t")))
        .await
        .unwrap_err();
    assert!(matches!(err, WxPayError::Transport(_)), "{err:?}");
    assert_eq!(err.outcome(), "transport_error");
}

#[tokio::test]
async fn a_wrong_key_or_sign_type_is_refused_by_wechat_and_by_us() {
    let sim = TestSim::start().await;
    let client = sim.client();
    let wrong_key = merchant(
        "10000100",
        "wxd930ea5d5a258f4f",
        SignType::Md5,
        "00000000000000000000000000000000",
    );
    let err = client
        .order_query(&wrong_key, &OrderRef::OutTradeNo(unique_otn("k")))
        .await
        .unwrap_err();
    assert_eq!(err, WxPayError::ReturnFail("签名错误".into()));
    assert!(err.is_suspicious());
    // The secret must not leak through the error's text or Debug.
    assert!(!format!("{err} {err:?} {wrong_key:?}").contains("00000000000000000000000000000000"));

    // Our MD5 merchant's reply is signed with MD5; a client expecting HMAC-SHA256 refuses it,
    // and vice versa (the request's sign type decides WeChat's reply's).
    let wrong_appid = merchant(
        "10000100",
        "wx0000000000000000",
        SignType::Md5,
        crate::helpers::MD5_KEY,
    );
    let err = client
        .order_query(&wrong_appid, &OrderRef::OutTradeNo(unique_otn("a")))
        .await
        .unwrap_err();
    assert_eq!(err, WxPayError::ReturnFail("appid和mch_id不匹配".into()));
    sim.stop().await;
}

#[tokio::test]
async fn closeorder_answers_closed_paid_already_closed_and_not_exist() {
    let sim = TestSim::start().await;
    let client = sim.client();
    for m in both_merchants() {
        let open = unique_otn("c");
        sim.create_order(&m, &open, 10).await;
        assert_eq!(client.close_order(&m, &open).await, Ok(CloseAnswer::Closed));
        assert_eq!(
            client.close_order(&m, &open).await,
            Ok(CloseAnswer::OrderClosed)
        );
        let r = order(
            client
                .order_query(&m, &OrderRef::OutTradeNo(open.clone()))
                .await,
        );
        assert_eq!(r.trade_state, TradeState::Closed);

        let paid = unique_otn("c");
        sim.create_order(&m, &paid, 10).await;
        sim.pay(&m, &paid, json!({"notify": "drop"})).await;
        assert_eq!(
            client.close_order(&m, &paid).await,
            Ok(CloseAnswer::OrderPaid)
        );

        assert_eq!(
            client.close_order(&m, &unique_otn("c")).await,
            Ok(CloseAnswer::NotExist)
        );

        sim.faults(json!({"endpoint": "closeorder", "system_error_rate": 1.0}))
            .await;
        let pending = unique_otn("c");
        sim.create_order(&m, &pending, 10).await;
        let err = client.close_order(&m, &pending).await.unwrap_err();
        assert!(
            matches!(
                err,
                WxPayError::ResultFail {
                    code: ErrCode::SystemError,
                    ..
                }
            ),
            "{err:?}"
        );
        sim.faults(json!({"endpoint": "closeorder", "mismatch_rate": 1.0}))
            .await;
        let err = client.close_order(&m, &pending).await.unwrap_err();
        assert!(
            matches!(err, WxPayError::Mismatch { field: "appid", .. }),
            "{err:?}"
        );
        sim.faults(json!({"endpoint": "closeorder"})).await;
        let r = order(
            client
                .order_query(&m, &OrderRef::OutTradeNo(pending.clone()))
                .await,
        );
        assert_eq!(
            r.trade_state,
            TradeState::Closed,
            "the mismatched reply's close did happen at WeChat"
        );
    }
    sim.stop().await;
}

#[tokio::test]
async fn repeated_connect_failures_fail_over_to_the_backup() {
    let sim = TestSim::start().await;
    let m = md5_merchant();
    let n = unique_otn("fo");
    sim.create_order(&m, &n, 5).await;
    let mut cfg = ClientConfig::new(closed_port_url().await);
    cfg.backup_base_url = Some(sim.url());
    cfg.connect_timeout = Duration::from_millis(300);
    let client = WxPayClient::new(cfg).unwrap();
    let q = OrderRef::OutTradeNo(n);
    for attempt in 1..=3 {
        let err = client.order_query(&m, &q).await.unwrap_err();
        assert!(
            matches!(err, WxPayError::Transport(_)),
            "attempt {attempt}: {err:?}"
        );
    }
    let r = order(client.order_query(&m, &q).await);
    assert_eq!(r.trade_state, TradeState::NotPay, "served by the backup");
    sim.stop().await;
}

#[tokio::test]
async fn oversized_replies_are_refused_before_they_are_read_whole() {
    let m = md5_merchant();
    let mut body = b"<xml><return_code>SUCCESS</return_code><pad>".to_vec();
    body.resize(70 * 1024, b'x');
    body.extend_from_slice(b"</pad></xml>");
    let (url, server) = crate::helpers::replay_server(200, body).await;
    let err = crate::helpers::client_for(&url)
        .order_query(&m, &OrderRef::OutTradeNo(unique_otn("big")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            WxPayError::Malformed(wxpay_reconciler::wxpay::XmlError::TooLarge(_))
        ),
        "{err:?}"
    );
    server.abort();
}

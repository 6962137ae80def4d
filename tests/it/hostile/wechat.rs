//! What WeChat's side of the wire may say, or an impostor on it, against the real client, the
//! real notify endpoint and every database: redirects, another currency, another app, a
//! sub-merchant, and the sign type of a notification.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::json;
use wxpay_reconciler::domain::OrderState;
use wxpay_reconciler::wxpay::SignType;
use wxpay_reconciler::wxpay::{Fields, sign};

use crate::db::backends;
use crate::engine::Engine;
use crate::frame::for_each_backend;
use crate::helpers::{hmac_merchant, md5_merchant};
use crate::lifecycle::{body, notification, post as post_body, serve_notify};

/// Answers every request with a redirect to `to` (the same path).
async fn redirector(to: String) -> String {
    let app = Router::new().route(
        "/pay/{*rest}",
        post(move |uri: axum::http::Uri| {
            let location = format!("{to}{}", uri.path());
            async move {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, location)],
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_redirect_is_never_followed_and_settles_nothing() {
    for db in backends().await {
        let kind = db.kind;
        // The simulator (a server that signs correctly) stands behind the redirect.
        let e = Engine::new(db).await;
        let hop = redirector(e.sim.url()).await;
        let e = Engine {
            scanner: {
                let mut s = e.settings.clone();
                s.wechat.base_url = hop;
                wxpay_reconciler::daemon::scanner(&s, e.db.store.clone(), e.telemetry.clone())
                    .unwrap()
            },
            ..e
        };
        let m = md5_merchant();
        let otn = e.order(&m, 100).await;
        e.pay(&m, &otn, json!({"notify": "drop"})).await;
        let report = e.scan().await;
        assert_eq!((report.claimed, report.settled), (1, 0), "{kind:?}");
        assert_eq!(e.row(&otn).await.state, OrderState::NotPay, "{kind:?}");
        assert_eq!(
            e.queries(&otn),
            0,
            "{kind:?}: the signed request reached another host"
        );
        assert_eq!(
            e.metric(&format!(
                "wxpay_reconciler_orderquery_requests_total{{mch_id=\"{}\",outcome=\"http_status\"}}",
                m.mch_id
            )),
            1.0,
            "{kind:?}"
        );
        e.finish().await;
    }
}

/// A payment notification (verified exactly as a reply) with some fields changed, re-signed.
fn changed(
    m: &wxpay_reconciler::wxpay::Merchant,
    otn: &str,
    txid: &str,
    set: &[(&str, &str)],
) -> Fields {
    let mut f = notification(m, otn, 100, txid);
    for (k, v) in set {
        f.insert(*k, *v);
    }
    sign::sign_in_place(&mut f, m.v2_key(), m.v2_sign_type());
    f
}

#[tokio::test]
async fn a_payment_in_another_currency_is_never_this_orders_amount() {
    for_each_backend(async |kind, e| {
        let url = serve_notify(e).await;
        let m = md5_merchant();
        let (otn, txid) = e.paid_order(&m, 100).await;
        // Signed by the merchant's key, total_fee as stored, but in US dollars.
        let usd = changed(&m, &otn, &txid, &[("fee_type", "USD")]);
        assert_eq!(
            post_body(&url, body(&usd)).await,
            (200, "SUCCESS".into()),
            "{kind:?}"
        );
        let row = e.row(&otn).await;
        assert_eq!(row.state, OrderState::AmountMismatch, "{kind:?}");
        let detail = e.events(&otn).await[0].detail.clone().unwrap_or_default();
        assert!(detail.contains("USD"), "{kind:?}: {detail}");

        // An order the application registered in USD is paid by a USD payment, not a CNY one.
        let (dollars, txid) = e.paid_order(&m, 100).await;
        e.db.exec(
            "UPDATE wxpay_orders SET fee_type = 'USD' WHERE out_trade_no = $1",
            &[&dollars],
        )
        .await;
        let cny = changed(&m, &dollars, &txid, &[("fee_type", "CNY")]);
        post_body(&url, body(&cny)).await;
        assert_eq!(
            e.row(&dollars).await.state,
            OrderState::AmountMismatch,
            "{kind:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_report_for_another_app_or_a_sub_merchant_settles_nothing() {
    for_each_backend(async |kind, e| {
        let url = serve_notify(e).await;
        let m = md5_merchant();
        // Registered for app B; the merchant's configured (and reported) app is A.
        let (other_app, txid) = e.paid_order(&m, 100).await;
        e.db.exec(
            "UPDATE wxpay_orders SET appid = 'wxotherapp0000000001' WHERE out_trade_no = $1",
            &[&other_app],
        )
        .await;
        let n = notification(&m, &other_app, 100, &txid);
        assert_eq!(
            post_body(&url, body(&n)).await,
            (200, "FAIL".into()),
            "{kind:?}"
        );
        assert_eq!(
            e.row(&other_app).await.state,
            OrderState::NotPay,
            "{kind:?}"
        );

        // The merchant has no sub-merchant: a notification naming one is not its own.
        let (otn, txid) = e.paid_order(&m, 100).await;
        let sub = changed(&m, &otn, &txid, &[("sub_mch_id", "1900000888")]);
        assert_eq!(
            post_body(&url, body(&sub)).await,
            (200, "FAIL".into()),
            "{kind:?}"
        );
        assert_eq!(e.row(&otn).await.state, OrderState::NotPay, "{kind:?}");
        assert_eq!(
            e.metric(&format!(
                "wxpay_reconciler_notify_requests_total{{mch_id=\"{}\",outcome=\"mismatch\"}}",
                m.mch_id
            )),
            2.0,
            "{kind:?}"
        );
        // Polling sets the other app's order aside and settles the other.
        let report = e.scan().await;
        assert_eq!(
            (report.settled, report.set_aside),
            (1, 1),
            "{kind:?} {report:?}"
        );
        assert_eq!(e.row(&otn).await.state, OrderState::Success, "{kind:?}");
    })
    .await;
}

#[tokio::test]
async fn notifications_are_accepted_in_the_orders_sign_type_but_never_downgraded() {
    for_each_backend(async |kind, e| {
        let url = serve_notify(e).await;
        // A merchant set to MD5 whose order was made with HMAC-SHA256: WeChat signs the
        // notification with HMAC-SHA256, declared or not.
        let m = md5_merchant();
        for declared in [true, false] {
            let (otn, txid) = e.paid_order(&m, 100).await;
            let mut n = notification(&m, &otn, 100, &txid);
            n.remove("sign");
            if declared {
                sign::sign_in_place(&mut n, m.v2_key(), SignType::HmacSha256);
            } else {
                let s = sign::sign(&n, m.v2_key(), SignType::HmacSha256);
                n.insert("sign", s);
            }
            assert_eq!(
                post_body(&url, body(&n)).await,
                (200, "SUCCESS".into()),
                "{kind:?} {declared}"
            );
            assert_eq!(
                e.row(&otn).await.state,
                OrderState::Success,
                "{kind:?} {declared}"
            );
        }
        // A merchant set to HMAC-SHA256 never takes MD5, whatever the message declares.
        let h = hmac_merchant();
        let (otn, txid) = e.paid_order(&h, 100).await;
        let mut n = notification(&h, &otn, 100, &txid);
        n.remove("sign_type");
        sign::sign_in_place(&mut n, h.v2_key(), SignType::Md5);
        assert_eq!(
            post_body(&url, body(&n)).await,
            (200, "FAIL".into()),
            "{kind:?}"
        );
        n.insert("sign_type", "MD5");
        n.remove("sign");
        let s = sign::sign(&n, h.v2_key(), SignType::Md5);
        n.insert("sign", s);
        assert_eq!(
            post_body(&url, body(&n)).await,
            (200, "FAIL".into()),
            "{kind:?}"
        );
        assert_eq!(e.row(&otn).await.state, OrderState::NotPay, "{kind:?}");
    })
    .await;
}

//! The v3 client against answers WeChat signed (tests/fixtures/wxpay-v3/derived_responses_signed.json),
//! replayed by a real HTTP server with their headers, on a clock set to when they were signed:
//! what it trusts, what it refuses and why, and what it sends.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use tokio::net::TcpListener;
use wxpay_reconciler::domain::{AppId, Fen, MchId, TradeState};
use wxpay_reconciler::gateway::{
    CloseAnswer, Failure, GatewayError, Merchant, OrderRef, QueryAnswer, RetryHint, V3Credentials,
};
use wxpay_reconciler::wxpay::ClientConfig;
use wxpay_reconciler::wxpay::v3::{
    ApiV3Key, Certificate, CertificateMode, PrivateKey, PublicKey, V3Client, WechatKeys,
    WechatPublicKey,
};

use crate::helpers::otn;

pub const PUBLIC_KEY_ID: &str = "PUB_KEY_ID_0000000000000024101100397200000006";
pub const APIV3_KEY: &str = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";
pub const MERCHANT_SERIAL: &str = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115";

pub fn v3_fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wxpay-v3")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json_fixture(name: &str) -> Value {
    serde_json::from_slice(&v3_fixture(name)).unwrap()
}

/// Which of WeChat's keys the merchant holds.
#[derive(Clone, Copy)]
pub enum Holds {
    PublicKey,
    Certificate,
    /// The merchant's own certificate where WeChat's should be (a misconfiguration).
    WrongCertificate,
}

/// A v3 merchant with the published test keys: the wechatpay-java merchant key, and WeChat's
/// wechatpay-go key as `holds` says.
pub fn v3_merchant(mch_id: &str, holds: Holds, now: DateTime<Utc>) -> Merchant {
    let (public_key, mode) = match holds {
        Holds::PublicKey => (
            Some(WechatPublicKey {
                id: PUBLIC_KEY_ID.into(),
                key: PublicKey::from_pem(&v3_fixture("keys/go_sdk_test_public_key.pem")).unwrap(),
            }),
            CertificateMode::Off,
        ),
        Holds::Certificate | Holds::WrongCertificate => (None, CertificateMode::Download),
    };
    let wechat = WechatKeys::new(public_key, mode);
    let cert_file = match holds {
        Holds::Certificate => Some("keys/go_sdk_test_cert_F5765756002FDD77.pem"),
        Holds::WrongCertificate => Some("keys/java_sdk_merchant_certificate.pem"),
        Holds::PublicKey => None,
    };
    if let Some(file) = cert_file {
        let mut cert = Certificate::from_pem(&v3_fixture(file)).unwrap();
        // Under WeChat's serial, so that only the key differs.
        cert.serial = "F5765756002FDD77".into();
        cert.not_before = now - chrono::TimeDelta::days(1);
        cert.not_after = now + chrono::TimeDelta::days(1);
        wechat.add_certificates(vec![cert], now);
    }
    Merchant::v3(
        MchId::parse(mch_id).unwrap(),
        AppId::parse("wxd678efh567hg6787").unwrap(),
        V3Credentials {
            private_key: PrivateKey::from_pem(&v3_fixture(
                "keys/java_sdk_merchant_private_key.pem",
            ))
            .unwrap(),
            cert_serial_no: MERCHANT_SERIAL.into(),
            apiv3_key: ApiV3Key::new(APIV3_KEY.as_bytes()).unwrap(),
            wechat,
        },
    )
}

/// One request as the replay server received it.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    path_and_query: String,
    headers: HeaderMap,
    body: String,
}

/// Serves `status`, `headers` and `body` to every request, and keeps what it received.
async fn replay(
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
) -> (String, Arc<Mutex<Vec<Received>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (headers, body_out, log) = (headers.clone(), body.clone(), log.clone());
        async move {
            let (parts, body_in) = req.into_parts();
            let bytes = axum::body::to_bytes(body_in, 1 << 16).await.unwrap();
            log.lock().unwrap().push(Received {
                method: parts.method.to_string(),
                path_and_query: parts.uri.path_and_query().unwrap().to_string(),
                headers: parts.headers,
                body: String::from_utf8(bytes.to_vec()).unwrap(),
            });
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.insert(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(&v).unwrap(),
                );
            }
            (StatusCode::from_u16(status).unwrap(), map, body_out)
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

/// A header set to a value, or removed (`None`).
type HeaderChange<'a> = (&'a str, Option<&'a str>);

/// A signed answer of the fixture, with some headers changed (`None`: removed).
fn answer(
    name: &str,
    change: &[(&str, Option<&str>)],
) -> (u16, Vec<(String, String)>, String, i64) {
    let v = json_fixture("derived_responses_signed.json");
    let r = &v["responses"][name];
    let mut headers: Vec<(String, String)> = r["headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    for (name, value) in change {
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(value) = value {
            headers.push(((*name).into(), (*value).into()));
        }
    }
    let ts: i64 = r["headers"]["Wechatpay-Timestamp"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (
        r["status"].as_u64().unwrap() as u16,
        headers,
        r["body"].as_str().unwrap().to_owned(),
        ts,
    )
}

static CLOCK: Mutex<Option<DateTime<Utc>>> = Mutex::new(None);

/// Clients built by one test share the process's clock cell, so the tests that set it run one
/// at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn fixed_clock() -> DateTime<Utc> {
    CLOCK.lock().unwrap().unwrap_or_else(Utc::now)
}

fn client(url: &str, now: DateTime<Utc>) -> V3Client {
    *CLOCK.lock().unwrap() = Some(now);
    V3Client::new(ClientConfig::new(url))
        .unwrap()
        .with_clock(fixed_clock)
}

fn at(ts: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(ts, 0).unwrap()
}

const FIXTURE_ORDER: &str = "1217752501201407033233368018";
const FIXTURE_MCH: &str = "1230000109";

async fn query(
    name: &str,
    change: &[(&str, Option<&str>)],
    holds: Holds,
    skew: i64,
) -> Result<QueryAnswer, GatewayError> {
    let (status, headers, body, ts) = answer(name, change);
    let (url, _) = replay(status, headers, body).await;
    let now = at(ts + skew);
    let m = v3_merchant(FIXTURE_MCH, holds, now);
    client(&url, now)
        .order_query(&m, &OrderRef::OutTradeNo(otn(FIXTURE_ORDER)))
        .await
        .map_err(GatewayError::from)
}

#[tokio::test]
async fn a_signed_success_answer_is_trusted_in_both_key_modes() {
    let _one = SERIAL.lock().await;
    for (holds, serial) in [
        (Holds::Certificate, "F5765756002FDD77"),
        (Holds::PublicKey, PUBLIC_KEY_ID),
    ] {
        let got = query(
            "orderquery_success",
            &[("Wechatpay-Serial", Some(serial))],
            holds,
            10,
        )
        .await
        .unwrap();
        let QueryAnswer::Order(r) = got else {
            panic!("{got:?}")
        };
        assert_eq!(r.trade_state, TradeState::Success);
        assert_eq!(r.amount, Some(Fen::new(1).unwrap()));
        assert_eq!(r.payer_amount, Some(Fen::new(1).unwrap()));
        assert_eq!(r.currency.as_str(), "CNY");
        assert_eq!(
            r.transaction_id.as_ref().map(|t| t.as_str()),
            Some("4200000891202103228088184743")
        );
        // 10:29:05 in Beijing is 02:29:05 UTC.
        assert_eq!(
            r.paid_at,
            Some(Utc.with_ymd_and_hms(2021, 3, 22, 2, 29, 5).unwrap())
        );
        assert_eq!(
            r.appid.as_ref().map(|a| a.as_str()),
            Some("wxd678efh567hg6787")
        );
    }
}

#[tokio::test]
async fn a_real_notpay_answer_without_currency_is_an_open_order() {
    let _one = SERIAL.lock().await;
    let got = query("orderquery_notpay", &[], Holds::Certificate, -10)
        .await
        .unwrap();
    let QueryAnswer::Order(r) = got else {
        panic!("{got:?}")
    };
    assert_eq!(r.trade_state, TradeState::NotPay);
    assert_eq!(r.transaction_id, None);
    assert_eq!(r.paid_at, None);
}

#[tokio::test]
async fn a_signed_404_order_not_exist_is_v2s_ordernotexist() {
    let _one = SERIAL.lock().await;
    let got = query("orderquery_404_order_not_exist", &[], Holds::Certificate, 0).await;
    assert_eq!(got, Ok(QueryAnswer::NotExist));
    // Unsigned, it is only a hint.
    let got = query(
        "orderquery_404_order_not_exist",
        &[("Wechatpay-Signature", None)],
        Holds::Certificate,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(got.failure(), Failure::Unverified);
}

/// Each way an answer fails verification is its own reason, and never a result.
#[tokio::test]
async fn unverified_answers_are_transient_and_say_why() {
    let _one = SERIAL.lock().await;
    let probe = "WECHATPAY/SIGNTEST/ZTFuQYnHKNPtLYXNVmjQLPUhvWq2X+6yjqvkPH8peW4iimvSCGBFgqxIufP7ZjH76mHKsFodRntpWNnlRg0yzpuYQGH/EhnwYAs/0aAVG4Y9gdL0MOGW0JCu043o5eYTSKMrpoNEaNIJEcGcZjvvJAxtolLqJmREHG237cVS3DLUO/uB0B21dGzZZPx4V13BffIIQPb+Yx+OrWXwpvjjgC20HLPNIREGyBYEPfDyzPHaBpXrxWeTVl7oAi3zfDVIx848iTx/cCWwqhNcSPVmBJGSLSuT6uV1PDcLW2W9/YCChxVMd9awXfgWkYiuaThCWBA==";
    let cases: Vec<(&str, Vec<HeaderChange>, Holds, i64)> = vec![
        (
            "signtest_probe",
            vec![("Wechatpay-Signature", Some(probe))],
            Holds::Certificate,
            0,
        ),
        (
            "missing_header",
            vec![("Wechatpay-Nonce", None)],
            Holds::Certificate,
            0,
        ),
        (
            "missing_header",
            vec![("Wechatpay-Serial", None)],
            Holds::Certificate,
            0,
        ),
        (
            "unknown_serial",
            vec![("Wechatpay-Serial", Some("0123456789ABCDEF"))],
            Holds::Certificate,
            0,
        ),
        ("stale_timestamp", vec![], Holds::Certificate, 301),
        ("stale_timestamp", vec![], Holds::Certificate, -301),
        ("bad_signature", vec![], Holds::WrongCertificate, 0),
        (
            "signature_type",
            vec![(
                "Wechatpay-Signature-Type",
                Some("WECHATPAY2-SHA256-RSA4096"),
            )],
            Holds::Certificate,
            0,
        ),
        (
            "bad_timestamp",
            vec![("Wechatpay-Timestamp", Some("yesterday"))],
            Holds::Certificate,
            0,
        ),
    ];
    for (reason, change, holds, skew) in cases {
        let e = query("orderquery_success", &change, holds, skew)
            .await
            .unwrap_err();
        assert_eq!(e.failure(), Failure::Unverified, "{reason}: {e}");
        assert_eq!(e.reason(), Some(reason), "{e}");
        assert!(e.is_transient());
    }
    // Within the window on either side it verifies.
    for skew in [-300, 300] {
        assert!(
            query("orderquery_success", &[], Holds::Certificate, skew)
                .await
                .is_ok()
        );
    }
}

#[tokio::test]
async fn an_answer_for_another_merchant_or_order_is_a_mismatch() {
    let _one = SERIAL.lock().await;
    let (status, headers, body, ts) = answer("orderquery_success", &[]);
    let (url, _) = replay(status, headers, body).await;
    let now = at(ts);
    let other = v3_merchant("1900000100", Holds::Certificate, now);
    let e = GatewayError::from(
        client(&url, now)
            .order_query(&other, &OrderRef::OutTradeNo(otn(FIXTURE_ORDER)))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.failure(), Failure::Mismatch, "{e}");
    let ours = v3_merchant(FIXTURE_MCH, Holds::Certificate, now);
    let e = GatewayError::from(
        client(&url, now)
            .order_query(&ours, &OrderRef::OutTradeNo(otn("another-order")))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.failure(), Failure::Mismatch, "{e}");
}

#[tokio::test]
async fn rate_limits_slow_down_and_server_errors_are_transient() {
    let _one = SERIAL.lock().await;
    let now = Utc::now();
    let m = v3_merchant(FIXTURE_MCH, Holds::Certificate, now);
    for (status, body, failure, hint) in [
        (
            429,
            r#"{"code":"RATELIMIT_EXCEEDED","message":"too fast"}"#,
            Failure::HttpStatus,
            RetryHint::SlowDown,
        ),
        (
            403,
            r#"{"code":"FREQUENCY_LIMITED","message":"too often"}"#,
            Failure::HttpStatus,
            RetryHint::SlowDown,
        ),
        (
            500,
            r#"{"code":"SYSTEM_ERROR","message":"busy"}"#,
            Failure::HttpStatus,
            RetryHint::Backoff,
        ),
        (
            502,
            "<html>bad gateway</html>",
            Failure::HttpStatus,
            RetryHint::Backoff,
        ),
    ] {
        let (url, _) = replay(status, vec![], body.into()).await;
        let e = GatewayError::from(
            client(&url, now)
                .order_query(&m, &OrderRef::OutTradeNo(otn(FIXTURE_ORDER)))
                .await
                .unwrap_err(),
        );
        assert_eq!(
            (e.failure(), e.retry_hint()),
            (failure, hint),
            "{status}: {e}"
        );
        assert!(e.is_transient());
    }
}

/// What the client sends: the signed GET, the Accept header, and in public-key mode the key
/// id as `Wechatpay-Serial`; the signature verifies with the merchant's certificate.
#[tokio::test]
async fn requests_are_signed_as_wechat_checks_them() {
    let _one = SERIAL.lock().await;
    let (status, headers, body, ts) = answer(
        "orderquery_success",
        &[("Wechatpay-Serial", Some(PUBLIC_KEY_ID))],
    );
    let (url, seen) = replay(status, headers, body).await;
    let now = at(ts);
    let m = v3_merchant(FIXTURE_MCH, Holds::PublicKey, now);
    client(&url, now)
        .order_query(&m, &OrderRef::OutTradeNo(otn(FIXTURE_ORDER)))
        .await
        .unwrap();
    let r = seen.lock().unwrap()[0].clone();
    assert_eq!(r.method, "GET");
    assert_eq!(
        r.path_and_query,
        format!("/v3/pay/transactions/out-trade-no/{FIXTURE_ORDER}?mchid={FIXTURE_MCH}")
    );
    assert_eq!(r.headers["accept"], "application/json");
    assert_eq!(r.headers["wechatpay-serial"], PUBLIC_KEY_ID);
    let auth = r.headers["authorization"].to_str().unwrap();
    let fields = auth
        .strip_prefix("WECHATPAY2-SHA256-RSA2048 ")
        .unwrap_or_else(|| panic!("{auth}"));
    let field = |name: &str| {
        fields
            .split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{name} in {auth}"))
            .to_owned()
    };
    assert_eq!(field("mchid"), FIXTURE_MCH);
    assert_eq!(field("serial_no"), MERCHANT_SERIAL);
    assert_eq!(field("timestamp"), ts.to_string());
    let message = format!(
        "GET\n{}\n{ts}\n{}\n\n",
        r.path_and_query,
        field("nonce_str")
    );
    let merchant_cert =
        Certificate::from_pem(&v3_fixture("keys/java_sdk_merchant_certificate.pem")).unwrap();
    merchant_cert
        .key
        .verify(message.as_bytes(), &field("signature"))
        .expect("the request signature verifies with the merchant certificate");
    assert!(r.body.is_empty());
}

/// A 204 proves nothing: a close is confirmed by a query, and only a verified CLOSED closes.
#[tokio::test]
async fn a_close_is_confirmed_by_a_query() {
    let _one = SERIAL.lock().await;
    // The replay answers the close's 204 to the query too: no trade state, so no close.
    let (status, headers, body, ts) = answer("closeorder_204", &[]);
    let (url, seen) = replay(status, headers, body).await;
    let now = at(ts);
    let m = v3_merchant(FIXTURE_MCH, Holds::Certificate, now);
    let got = client(&url, now)
        .close_order(&m, &otn(FIXTURE_ORDER))
        .await
        .map_err(GatewayError::from);
    assert!(got.is_err(), "{got:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].path_and_query,
        format!("/v3/pay/transactions/out-trade-no/{FIXTURE_ORDER}/close")
    );
    assert_eq!(
        serde_json::from_str::<Value>(&seen[0].body).unwrap(),
        serde_json::json!({"mchid": FIXTURE_MCH})
    );
    assert_eq!(seen[1].method, "GET", "the close is followed by a query");
    // A close whose query says SUCCESS is a payment to settle, never a close.
    let (status, headers, body, ts) = answer("orderquery_success", &[]);
    let (url, _) = replay(status, headers, body).await;
    let got = client(&url, at(ts))
        .close_order(&m, &otn(FIXTURE_ORDER))
        .await;
    assert_eq!(got.map_err(GatewayError::from), Ok(CloseAnswer::OrderPaid));
}

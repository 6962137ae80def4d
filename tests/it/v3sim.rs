//! The simulator as a WeChat Pay API v3 server, over real HTTP: requests signed with the
//! fixture merchant key, every answer verified with WeChat's keys, the JSON shapes, the key
//! modes and rotation, the faults, and notifications to a tiny receiver.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use serde_json::{Value, json};
use wxpay_reconciler::gateway::{Merchant, V3Credentials};
use wxpay_reconciler::sim::v3::{
    TEST_PUBLIC_KEY_ID, TEST_V3_APIV3_KEY, UNKNOWN_SERIAL, test_v3_merchant,
};
use wxpay_reconciler::wxpay::v3::auth::{
    Request, RequestSigner, SIGNTEST_PREFIX, SignedHeaders, Unverified,
};
use wxpay_reconciler::wxpay::v3::{ApiV3Key, Certificate, CertificateMode, PublicKey, WechatKeys};
use wxpay_reconciler::wxpay::v3::{PrivateKey, WechatPublicKey};

use crate::helpers::{TestSim, md5_merchant, unique_otn};

const CERT_F576: &str = "F5765756002FDD77";
const CERT_D7CE: &str = "D7CE59D1F522D701";
const MCH: &str = "1900000100";

fn keys_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wxpay-v3/keys")
}

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(keys_dir().join(name)).unwrap()
}

/// WeChat's keys as a verifier holds them: the public key and both certificates.
pub(crate) fn wechat_keys() -> Arc<WechatKeys> {
    let keys = WechatKeys::new(
        Some(WechatPublicKey {
            id: TEST_PUBLIC_KEY_ID.into(),
            key: PublicKey::from_pem(&key_file("go_sdk_test_public_key.pem")).unwrap(),
        }),
        CertificateMode::Download,
    );
    let certs = [CERT_F576, CERT_D7CE]
        .map(|s| Certificate::from_pem(&key_file(&format!("go_sdk_test_cert_{s}.pem"))).unwrap());
    keys.add_certificates(certs.to_vec(), Utc::now());
    keys
}

fn merchant() -> Merchant {
    test_v3_merchant().unwrap()
}

fn creds(m: &Merchant) -> &V3Credentials {
    m.v3_credentials().unwrap()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn verify(&self) -> Result<i64, Unverified> {
        let signed = SignedHeaders::from_headers(&self.headers)?;
        signed
            .verify(&self.body, Utc::now(), &wechat_keys())
            .map(|v| v.skew_seconds)
    }

    fn serial(&self) -> &str {
        self.headers["Wechatpay-Serial"].to_str().unwrap()
    }

    /// Verified, with the expected status: the JSON body (Null when empty).
    fn verified(&self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "{:?}", self.body);
        self.verify().unwrap_or_else(|e| panic!("{e}"));
        assert!(self.headers.contains_key("Request-ID"));
        assert_eq!(
            self.headers["Wechatpay-Signature-Type"],
            "WECHATPAY2-SHA256-RSA2048"
        );
        if self.body.is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }
}

/// Sends a request signed with `key` (the merchant's unless a test forges one).
async fn send_with(
    sim: &TestSim,
    key: &PrivateKey,
    mch_id: &str,
    method: &str,
    path_and_query: &str,
    body: &str,
    serial_header: Option<&str>,
) -> Answer {
    let nonce = wxpay_reconciler::wxpay::client::nonce();
    let authorization = RequestSigner {
        mch_id,
        serial_no: creds(&merchant()).cert_serial_no.as_str(),
        key,
    }
    .authorization(&Request {
        method,
        path_and_query,
        timestamp: Utc::now().timestamp(),
        nonce: &nonce,
        body,
    })
    .unwrap();
    let url = format!("{}{path_and_query}", sim.url());
    let mut req = match method {
        "GET" => sim.http.get(url),
        _ => sim.http.post(url).body(body.to_owned()),
    }
    .header("Authorization", authorization)
    .header("Accept", "application/json")
    .header("Content-Type", "application/json");
    if let Some(s) = serial_header {
        req = req.header("Wechatpay-Serial", s);
    }
    let resp = req.send().await.unwrap();
    Answer {
        status: resp.status(),
        headers: resp.headers().clone(),
        body: resp.bytes().await.unwrap(),
    }
}

async fn send(sim: &TestSim, method: &str, path_and_query: &str, body: &str) -> Answer {
    let m = merchant();
    send_with(
        sim,
        &creds(&m).private_key,
        MCH,
        method,
        path_and_query,
        body,
        None,
    )
    .await
}

async fn query(sim: &TestSim, out_trade_no: &str) -> Answer {
    send(
        sim,
        "GET",
        &format!("/v3/pay/transactions/out-trade-no/{out_trade_no}?mchid={MCH}"),
        "",
    )
    .await
}

async fn close(sim: &TestSim, out_trade_no: &str) -> Answer {
    send(
        sim,
        "POST",
        &format!("/v3/pay/transactions/out-trade-no/{out_trade_no}/close"),
        &json!({ "mchid": MCH }).to_string(),
    )
    .await
}

pub(crate) async fn create(sim: &TestSim, out_trade_no: &str, fee: i64) {
    let (status, body) = sim
        .control(
            "POST",
            &format!("/_sim/orders/{MCH}/{out_trade_no}"),
            json!({ "total_fee": fee }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

async fn set_keys(sim: &TestSim, body: Value) -> (u16, Value) {
    sim.control("PUT", &format!("/_sim/v3/{MCH}/keys"), body)
        .await
}

#[tokio::test]
async fn orderquery_answers_signed_transactions_shaped_like_wechats() {
    let sim = TestSim::start().await;
    let n = unique_otn("v3q");
    create(&sim, n.as_str(), 1234).await;

    let a = query(&sim, n.as_str()).await;
    let t = a.verified(200);
    assert_eq!(
        a.serial(),
        CERT_F576,
        "signed under the current certificate"
    );
    assert_eq!(t["trade_state"], "NOTPAY");
    assert_eq!(t["trade_state_desc"], "订单未支付");
    assert_eq!(t["mchid"], MCH);
    assert_eq!(t["appid"], "wxd678efh567hg6787");
    assert_eq!(t["out_trade_no"], n.as_str());
    assert_eq!(t["amount"], json!({"payer_currency": "CNY", "total": 1234}));
    for absent in ["transaction_id", "success_time", "payer"] {
        assert!(t.get(absent).is_none(), "NOTPAY has no {absent}: {t}");
    }

    let (status, paid) = sim
        .control(
            "POST",
            &format!("/_sim/orders/{MCH}/{n}/pay"),
            json!({"notify": "drop", "paid_at": "2023-05-06T15:17:31+08:00"}),
        )
        .await;
    assert_eq!(status, 200, "{paid}");
    let t = query(&sim, n.as_str()).await.verified(200);
    assert_eq!(t["trade_state"], "SUCCESS");
    assert_eq!(t["trade_state_desc"], "支付成功");
    assert_eq!(t["transaction_id"], paid["transaction_id"]);
    assert_eq!(t["success_time"], "2023-05-06T15:17:31+08:00");
    assert_eq!(
        t["amount"],
        json!({"currency": "CNY", "payer_currency": "CNY", "payer_total": 1234, "total": 1234})
    );
    assert!(t["payer"]["openid"].is_string());

    // Asking for the public key (Wechatpay-Serial) gets an answer under its id.
    let m = merchant();
    let path = format!("/v3/pay/transactions/out-trade-no/{n}?mchid={MCH}");
    let a = send_with(
        &sim,
        &creds(&m).private_key,
        MCH,
        "GET",
        &path,
        "",
        Some(TEST_PUBLIC_KEY_ID),
    )
    .await;
    a.verified(200);
    assert_eq!(a.serial(), TEST_PUBLIC_KEY_ID);

    let (status, _) = sim
        .control("POST", &format!("/_sim/orders/{MCH}/{n}/refund"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        query(&sim, n.as_str()).await.verified(200)["trade_state"],
        "REFUND"
    );

    let unknown = query(&sim, "nosuchorder1").await;
    assert_eq!(
        unknown.verified(404),
        json!({"code": "ORDER_NOT_EXIST", "message": "订单不存在"})
    );
    assert_eq!(sim.sim.state.order_stats(n.as_str()).queries, 4);
    sim.stop().await;
}

#[tokio::test]
async fn requests_that_do_not_verify_are_refused_with_sign_error() {
    let sim = TestSim::start().await;
    let n = unique_otn("v3a");
    create(&sim, n.as_str(), 5).await;
    let path = format!("/v3/pay/transactions/out-trade-no/{n}?mchid={MCH}");
    // Signed with the wrong key (WeChat's, not the merchant's).
    let wrong = PrivateKey::from_pem(&key_file("go_sdk_test_private_key.pem")).unwrap();
    let a = send_with(&sim, &wrong, MCH, "GET", &path, "", None).await;
    assert_eq!(a.verified(401)["code"], "SIGN_ERROR");
    // Signed over another path than the one requested.
    let m = merchant();
    let nonce = wxpay_reconciler::wxpay::client::nonce();
    let signed_elsewhere = RequestSigner {
        mch_id: MCH,
        serial_no: creds(&m).cert_serial_no.as_str(),
        key: &creds(&m).private_key,
    }
    .authorization(&Request {
        method: "GET",
        path_and_query: &format!("{path}&x=1"),
        timestamp: Utc::now().timestamp(),
        nonce: &nonce,
        body: "",
    })
    .unwrap();
    let resp = sim
        .http
        .get(format!("{}{path}", sim.url()))
        .header("Authorization", signed_elsewhere)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // No Authorization at all.
    let resp = sim
        .http
        .get(format!("{}{path}", sim.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(body["code"], "SIGN_ERROR");
    // A v2 merchant has no v3 keys.
    let a = send_with(
        &sim,
        &creds(&m).private_key,
        "10000100",
        "GET",
        &path,
        "",
        None,
    )
    .await;
    assert_eq!(a.verified(401)["code"], "SIGN_ERROR");
    // The query's mchid must be the signer's.
    let a = send(
        &sim,
        "GET",
        &format!("/v3/pay/transactions/out-trade-no/{n}?mchid=10000100"),
        "",
    )
    .await;
    assert_eq!(a.verified(400)["code"], "PARAM_ERROR");
    // The v2 endpoints answer a v3 merchant with a FAIL, never a panic.
    let md5 = md5_merchant();
    let xml = format!(
        "<xml><appid>wxd678efh567hg6787</appid><mch_id>{MCH}</mch_id><nonce_str>abc</nonce_str>\
         <out_trade_no>{n}</out_trade_no><sign>00</sign></xml>"
    );
    for path in ["/pay/orderquery", "/pay/closeorder", "/pay/unifiedorder"] {
        let resp = sim
            .http
            .post(format!("{}{path}", sim.url()))
            .body(xml.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(text.contains("FAIL"), "{text}");
    }
    // The v2 merchants still work after all that.
    sim.create_order(&md5, &unique_otn("v2ok"), 1).await;
    sim.stop().await;
}

#[tokio::test]
async fn close_answers_a_signed_204_and_keeps_wechats_close_rules() {
    let sim = TestSim::start().await;
    let n = unique_otn("v3c");
    create(&sim, n.as_str(), 7).await;
    let a = close(&sim, n.as_str()).await;
    assert_eq!(a.verified(204), Value::Null);
    assert!(a.body.is_empty());
    assert_eq!(
        query(&sim, n.as_str()).await.verified(200)["trade_state"],
        "CLOSED"
    );
    // A closed order stays closed, and closing it again is no error.
    close(&sim, n.as_str()).await.verified(204);
    let (status, _) = sim
        .control(
            "POST",
            &format!("/_sim/orders/{MCH}/{n}/pay"),
            json!({"notify": "drop"}),
        )
        .await;
    assert_eq!(status, 409, "a closed order cannot be paid");

    let paid = unique_otn("v3cp");
    create(&sim, paid.as_str(), 7).await;
    sim.control(
        "POST",
        &format!("/_sim/orders/{MCH}/{paid}/pay"),
        json!({"notify": "drop"}),
    )
    .await;
    let a = close(&sim, paid.as_str()).await;
    assert_eq!(a.verified(400)["code"], "ORDERPAID");
    assert_eq!(
        query(&sim, paid.as_str()).await.verified(200)["trade_state"],
        "SUCCESS"
    );

    assert_eq!(
        close(&sim, "nosuchorder2").await.verified(404)["code"],
        "ORDER_NOT_EXIST"
    );
    // The body's mchid must be the signer's.
    let a = send(
        &sim,
        "POST",
        &format!("/v3/pay/transactions/out-trade-no/{n}/close"),
        r#"{"mchid":"10000100"}"#,
    )
    .await;
    assert_eq!(a.verified(400)["code"], "PARAM_ERROR");
    sim.stop().await;
}

/// The certificates of a `GET /v3/certificates` answer, decrypted: (serial_no, certificate).
fn decrypt_certificates(body: &Value) -> Vec<(String, Certificate)> {
    let key = ApiV3Key::new(TEST_V3_APIV3_KEY.as_bytes()).unwrap();
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let e = &d["encrypt_certificate"];
            assert_eq!(e["algorithm"], "AEAD_AES_256_GCM");
            assert_eq!(e["associated_data"], "certificate");
            assert_eq!(e["nonce"].as_str().unwrap().len(), 12);
            let pem = key
                .decrypt(
                    e["nonce"].as_str().unwrap(),
                    "certificate",
                    e["ciphertext"].as_str().unwrap(),
                )
                .unwrap();
            let cert = Certificate::from_pem(&pem).unwrap();
            assert!(d["effective_time"].as_str().unwrap().ends_with("+08:00"));
            assert!(d["expire_time"].as_str().unwrap().ends_with("+08:00"));
            (d["serial_no"].as_str().unwrap().to_owned(), cert)
        })
        .collect()
}

#[tokio::test]
async fn certificates_decrypt_rotate_and_vanish_in_public_key_mode() {
    let sim = TestSim::start().await;
    let a = send(&sim, "GET", "/v3/certificates", "").await;
    let certs = decrypt_certificates(&a.verified(200));
    assert_eq!(a.serial(), CERT_F576);
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].0, CERT_F576);
    assert_eq!(certs[0].1.serial, CERT_F576);

    // A rotation: both certificates served, the new one signs.
    let (status, setup) = set_keys(
        &sim,
        json!({"certificates": [CERT_F576, CERT_D7CE], "sign_with": CERT_D7CE}),
    )
    .await;
    assert_eq!(status, 200, "{setup}");
    assert_eq!(setup["mode"], "both");
    let a = send(&sim, "GET", "/v3/certificates", "").await;
    let certs = decrypt_certificates(&a.verified(200));
    assert_eq!(a.serial(), CERT_D7CE);
    let serials: Vec<&str> = certs
        .iter()
        .map(|(s, c)| {
            assert_eq!(s, &c.serial);
            s.as_str()
        })
        .collect();
    assert_eq!(serials, [CERT_F576, CERT_D7CE]);
    let n = unique_otn("v3r");
    create(&sim, n.as_str(), 3).await;
    let q = query(&sim, n.as_str()).await;
    q.verified(200);
    assert_eq!(q.serial(), CERT_D7CE);

    // Certificates only: even a request naming the public key gets a certificate's serial.
    let (status, _) = set_keys(&sim, json!({"mode": "certificates"})).await;
    assert_eq!(status, 200);
    let m = merchant();
    let path = format!("/v3/pay/transactions/out-trade-no/{n}?mchid={MCH}");
    let a = send_with(
        &sim,
        &creds(&m).private_key,
        MCH,
        "GET",
        &path,
        "",
        Some(TEST_PUBLIC_KEY_ID),
    )
    .await;
    a.verified(200);
    assert_eq!(a.serial(), CERT_D7CE);

    // Public key only: no certificates, everything under the public key id.
    let (status, setup) = set_keys(&sim, json!({"mode": "public_key"})).await;
    assert_eq!(status, 200, "{setup}");
    assert_eq!(setup["sign_with"], TEST_PUBLIC_KEY_ID);
    let a = send(&sim, "GET", "/v3/certificates", "").await;
    let expected: Value = serde_json::from_slice(
        &std::fs::read(keys_dir().join("../real_error_no_platform_cert_wechatpay_php.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(a.verified(404), expected);
    assert_eq!(a.serial(), TEST_PUBLIC_KEY_ID);
    let q = query(&sim, n.as_str()).await;
    q.verified(200);
    assert_eq!(q.serial(), TEST_PUBLIC_KEY_ID);

    // Nonsense is refused, and changes nothing.
    for bad in [
        json!({"mode": "certificates", "certificates": []}),
        json!({"certificates": ["ABCDEF"]}),
        json!({"mode": "both", "sign_with": "ABCDEF"}),
        json!({"mode": "sideways"}),
        json!({"sing_with": CERT_F576}),
    ] {
        let (status, body) = set_keys(&sim, bad.clone()).await;
        assert!(status == 400 || status == 422, "{bad}: {status} {body}");
    }
    let (status, setup) = sim
        .control("GET", &format!("/_sim/v3/{MCH}/keys"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(setup["mode"], "public_key");
    assert_eq!(
        setup["available_certificates"],
        json!([CERT_F576, CERT_D7CE])
    );
    let (status, _) = sim
        .control("PUT", "/_sim/v3/10000100/keys", json!({}))
        .await;
    assert_eq!(status, 404, "a v2 merchant has no v3 keys");
    sim.stop().await;
}

#[tokio::test]
async fn each_fault_produces_what_it_says() {
    let sim = TestSim::start().await;
    let n = unique_otn("v3f");
    create(&sim, n.as_str(), 9).await;
    let fault = |f: Value| {
        let mut f = f;
        f["endpoint"] = json!("orderquery");
        f
    };

    sim.faults(fault(json!({"signtest_rate": 1}))).await;
    let a = query(&sim, n.as_str()).await;
    assert_eq!(a.status, 200);
    assert!(
        a.headers["Wechatpay-Signature"]
            .to_str()
            .unwrap()
            .starts_with(SIGNTEST_PREFIX)
    );
    assert_eq!(a.verify(), Err(Unverified::Probe));

    sim.faults(fault(json!({"rate_limit_rate": 1}))).await;
    let a = query(&sim, n.as_str()).await;
    assert_eq!(a.verified(429)["code"], "RATELIMIT_EXCEEDED");

    sim.faults(fault(json!({"system_error_rate": 1}))).await;
    assert_eq!(
        query(&sim, n.as_str()).await.verified(500)["code"],
        "SYSTEM_ERROR"
    );

    sim.faults(fault(json!({"timestamp_skew_seconds": 600})))
        .await;
    let skew = query(&sim, n.as_str())
        .await
        .verify()
        .unwrap_err()
        .skew_seconds();
    assert!(skew.is_some_and(|s| (595..=605).contains(&s)), "{skew:?}");
    sim.faults(fault(json!({"timestamp_skew_seconds": -100})))
        .await;
    let skew = query(&sim, n.as_str()).await.verify().unwrap();
    assert!((-105..=-95).contains(&skew), "{skew}");

    sim.faults(fault(json!({"unknown_serial_rate": 1}))).await;
    let a = query(&sim, n.as_str()).await;
    assert_eq!(a.serial(), UNKNOWN_SERIAL);
    assert!(matches!(a.verify(), Err(Unverified::UnknownSerial(_))));

    sim.faults(fault(json!({"bad_sign_rate": 1}))).await;
    assert!(matches!(
        query(&sim, n.as_str()).await.verify(),
        Err(Unverified::BadSignature(_))
    ));

    sim.faults(fault(json!({"unsigned_rate": 1}))).await;
    assert_eq!(
        query(&sim, n.as_str()).await.verify(),
        Err(Unverified::MissingHeader("Wechatpay-Signature"))
    );

    sim.faults(fault(json!({"malformed_rate": 1}))).await;
    let a = query(&sim, n.as_str()).await;
    a.verify().expect("a malformed body is still signed");
    assert!(serde_json::from_slice::<Value>(&a.body).is_err());

    sim.faults(fault(json!({"mismatch_rate": 1}))).await;
    assert_eq!(
        query(&sim, n.as_str()).await.verified(200)["out_trade_no"],
        "SIMMISMATCH"
    );

    sim.faults(fault(json!({"http_500_rate": 1}))).await;
    let a = query(&sim, n.as_str()).await;
    assert_eq!(a.status, 500);
    assert!(!a.headers.contains_key("Wechatpay-Signature"));

    sim.faults(fault(json!({"latency_ms": 300}))).await;
    let started = std::time::Instant::now();
    query(&sim, n.as_str()).await.verified(200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // Faults of one endpoint leave the others alone.
    sim.faults(json!({"endpoint": "certificates", "rate_limit_rate": 1}))
        .await;
    assert_eq!(send(&sim, "GET", "/v3/certificates", "").await.status, 429);
    sim.faults(fault(json!({}))).await;
    query(&sim, n.as_str()).await.verified(200);
    close(&sim, n.as_str()).await.verified(204);
    for bad in [
        json!({"endpoint": "closeorder", "timestamp_skew_seconds": "x"}),
        json!({"endpoint": "notify", "signtest_rate": 2}),
    ] {
        let (status, body) = sim.control("PUT", "/_sim/faults", bad).await;
        assert_eq!(status, 400, "{body}");
    }
    sim.stop().await;
}

/// What a test receiver got: the path, the headers and the body of each POST.
pub(crate) type Received = Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>>;

/// A receiver on a free port: answers 500 to the first `fail_first` POSTs, then 204.
pub(crate) async fn receiver(fail_first: usize) -> (String, Received, tokio::task::JoinHandle<()>) {
    let got: Received = Arc::default();
    let seen = got.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
            let seen = seen.clone();
            async move {
                let mut all = seen.lock().unwrap();
                all.push((uri.path().to_owned(), headers, body));
                if all.len() <= fail_first {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), got, task)
}

#[tokio::test]
async fn a_notification_is_delivered_signed_and_encrypted_and_retried_until_acknowledged() {
    let sim = TestSim::start().await;
    let (base, got, task) = receiver(1).await;
    let (status, cfg) = sim
        .control(
            "PUT",
            "/_sim/config",
            json!({"notify_retry_ms": [100, 100, 100], "notify_base_url": base}),
        )
        .await;
    assert_eq!(status, 200, "{cfg}");
    let n = unique_otn("v3n");
    create(&sim, n.as_str(), 4321).await;
    let (status, paid) = sim
        .control(
            "POST",
            &format!("/_sim/orders/{MCH}/{n}/pay"),
            json!({"notify": "deliver", "paid_at": "2024-08-05T17:33:41+08:00"}),
        )
        .await;
    assert_eq!(status, 200, "{paid}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while got.lock().unwrap().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no retry arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Delivered after one retry, then never again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = got.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    let order = sim.sim.state.order(MCH, n.as_str()).unwrap();
    assert_eq!(order.notify_attempts, 2);
    assert!(order.notify_delivered);

    let key = ApiV3Key::new(TEST_V3_APIV3_KEY.as_bytes()).unwrap();
    for (path, headers, body) in &received {
        assert_eq!(path, "/wxpay/v3/notify");
        let signed = SignedHeaders::from_headers(headers).unwrap();
        signed.verify(body, Utc::now(), &wechat_keys()).unwrap();
        assert_eq!(signed.serial, CERT_F576);
        let event: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(event["event_type"], "TRANSACTION.SUCCESS");
        assert_eq!(event["resource_type"], "encrypt-resource");
        assert_eq!(event["summary"], "支付成功");
        assert!(event["id"].as_str().unwrap().starts_with("EV-"));
        assert!(event["create_time"].as_str().unwrap().ends_with("+08:00"));
        let r = &event["resource"];
        assert_eq!(r["original_type"], "transaction");
        assert_eq!(r["algorithm"], "AEAD_AES_256_GCM");
        assert_eq!(r["associated_data"], "transaction");
        let plain = key
            .decrypt(
                r["nonce"].as_str().unwrap(),
                "transaction",
                r["ciphertext"].as_str().unwrap(),
            )
            .unwrap();
        let t: Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(t["out_trade_no"], n.as_str());
        assert_eq!(t["mchid"], MCH);
        assert_eq!(t["trade_state"], "SUCCESS");
        assert_eq!(t["amount"]["total"], 4321);
        assert_eq!(t["amount"]["currency"], "CNY");
        assert_eq!(t["transaction_id"], paid["transaction_id"]);
        assert_eq!(t["success_time"], "2024-08-05T17:33:41+08:00");
    }

    // Notification faults: a SIGNTEST probe under the public key id.
    let (status, _) = set_keys(&sim, json!({"sign_with": TEST_PUBLIC_KEY_ID})).await;
    assert_eq!(status, 200);
    sim.faults(json!({"endpoint": "notify", "signtest_rate": 1}))
        .await;
    let probe = unique_otn("v3p");
    create(&sim, probe.as_str(), 1).await;
    sim.control(
        "POST",
        &format!("/_sim/orders/{MCH}/{probe}/pay"),
        json!({"notify": "deliver"}),
    )
    .await;
    while got.lock().unwrap().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "no probe arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, headers, body) = got.lock().unwrap()[2].clone();
    let signed = SignedHeaders::from_headers(&headers).unwrap();
    assert_eq!(signed.serial, TEST_PUBLIC_KEY_ID);
    assert_eq!(
        signed.verify(&body, Utc::now(), &wechat_keys()),
        Err(Unverified::Probe)
    );
    task.abort();
    sim.stop().await;
}

#[tokio::test]
async fn a_service_provider_queries_its_sub_merchants_orders() {
    let mut sp = merchant();
    sp.sub_mch_id = Some(wxpay_reconciler::domain::MchId::parse("1900000111").unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = wxpay_reconciler::sim::RunningSimulator::start(listener, vec![sp]).unwrap();
    let sim = TestSim {
        sim: running,
        http: wxpay_reconciler::wxpay::client::http_client_builder()
            .build()
            .unwrap(),
    };
    let n = unique_otn("v3sp");
    create(&sim, n.as_str(), 66).await;
    sim.control(
        "POST",
        &format!("/_sim/orders/{MCH}/{n}/pay"),
        json!({"notify": "drop"}),
    )
    .await;
    let path = |sub: &str| {
        format!("/v3/pay/partner/transactions/out-trade-no/{n}?sp_mchid={MCH}&sub_mchid={sub}")
    };
    let t = send(&sim, "GET", &path("1900000111"), "")
        .await
        .verified(200);
    assert_eq!(t["sp_mchid"], MCH);
    assert_eq!(t["sub_mchid"], "1900000111");
    assert_eq!(t["sp_appid"], "wxd678efh567hg6787");
    assert!(t.get("mchid").is_none() && t.get("appid").is_none(), "{t}");
    assert!(t["payer"]["sp_openid"].is_string(), "{t}");
    assert_eq!(t["trade_state"], "SUCCESS");
    assert_eq!(t["amount"]["total"], 66);
    let a = send(&sim, "GET", &path("1900000999"), "").await;
    assert_eq!(a.verified(400)["code"], "PARAM_ERROR");
    sim.stop().await;
}

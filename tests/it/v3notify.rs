//! WeChat Pay API v3's notifications on the daemon's notify listener, on every backend the run
//! covers: made here as WeChat makes them (signed with WeChat's test key over
//! `TIMESTAMP\nNONCE\nBODY\n`, the transaction sealed with the APIv3 key), posted to a running
//! daemon, and judged by what users rely on: the HTTP status, the order and its events, and
//! the daemon's `/metrics`.

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use wxpay_reconciler::config::Settings;
use wxpay_reconciler::daemon::Daemon;
use wxpay_reconciler::domain::{AppId, MchId, OrderState};
use wxpay_reconciler::gateway::merchant::V3Credentials;
use wxpay_reconciler::notify::{NOTIFY_PATH, V3_NOTIFY_PATH};
use wxpay_reconciler::store::NewOrder;
use wxpay_reconciler::wxpay::Merchant;
use wxpay_reconciler::wxpay::v3::auth::response_message;
use wxpay_reconciler::wxpay::v3::{
    ApiV3Key, Certificate, CertificateMode, PrivateKey, PublicKey, WechatKeys, WechatPublicKey,
};

use crate::daemon::get;
use crate::engine::{Engine, metric_value};
use crate::frame::for_each_backend_with;
use crate::helpers::{hmac_merchant, unique_otn};
use crate::lifecycle::{body as v2_body, notification as v2_notification, post as v2_post};

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wxpay-v3/keys/");
const PUB_KEY_ID: &str = "PUB_KEY_ID_0000000000000024101100397200000006";
const CERT_SERIAL: &str = "F5765756002FDD77";
const APIV3_KEY: &[u8] = b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";
/// The v3 merchant whose WeChat key is the public key (public-key mode).
const PK_MCH: &str = "1900000100";
/// The v3 merchant whose WeChat key is the platform certificate (certificate mode).
const CERT_MCH: &str = "1900000101";
const APPID: &str = "wxd678efh567hg6787";

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(format!("{KEYS}{name}")).unwrap()
}

/// A v3 merchant; `public_key`: WeChat's key is only the public key (public-key mode, no
/// downloads), else the platform certificate, in download mode so that an unknown serial asks
/// for a refresh (the simulator does not know this merchant: its downloads fail and add none).
fn v3_merchant(mch_id: &str, public_key: bool) -> Merchant {
    let wechat = WechatKeys::new(
        public_key.then(|| WechatPublicKey {
            id: PUB_KEY_ID.into(),
            key: PublicKey::from_pem(&key_file("go_sdk_test_public_key.pem")).unwrap(),
        }),
        if public_key {
            CertificateMode::Off
        } else {
            CertificateMode::Download
        },
    );
    if !public_key {
        wechat.add_certificates(
            vec![
                Certificate::from_pem(&key_file("go_sdk_test_cert_F5765756002FDD77.pem")).unwrap(),
            ],
            Utc::now(),
        );
    }
    Merchant::v3(
        MchId::parse(mch_id).unwrap(),
        AppId::parse(APPID).unwrap(),
        V3Credentials {
            private_key: PrivateKey::from_pem(&key_file("java_sdk_merchant_private_key.pem"))
                .unwrap(),
            cert_serial_no: "5F1C72E2A8931B72A2E13AF8DEE92471EB397115".into(),
            apiv3_key: ApiV3Key::new(APIV3_KEY).unwrap(),
            wechat,
        },
    )
}

fn with_listener(s: &mut Settings) {
    s.notify.listen = Some("127.0.0.1:0".parse().unwrap());
    // The scanner leaves the orders alone: only notifications settle them here.
    s.schedule.grace_seconds = 3600;
    // In place of the simulator's own v3 test merchant of the same mch_id.
    s.merchants.retain(|m| m.mch_id.as_str() != PK_MCH);
    s.merchants.push(v3_merchant(PK_MCH, true));
    s.merchants.push(v3_merchant(CERT_MCH, false));
}

/// A daemon with the notify listener, on the engine's database.
struct Running {
    daemon: Daemon,
    stop: CancellationToken,
    base: String,
    http: reqwest::Client,
}

impl Running {
    async fn start(e: &Engine) -> Running {
        let stop = CancellationToken::new();
        let daemon = Daemon::start(&e.settings, stop.clone()).await.unwrap();
        let base = format!("http://{}", daemon.notify_addr.unwrap());
        Running {
            daemon,
            stop,
            base,
            http: reqwest::Client::new(),
        }
    }

    /// POSTs a v3 notification to `path`; returns the status and the body.
    async fn post(&self, path: &str, n: &Notification) -> (u16, String) {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(n.body.clone());
        for (name, value) in &n.headers {
            request = request.header(*name, value);
        }
        let resp = request.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }

    async fn metric(&self, needle: &str) -> f64 {
        let (status, text) = get(self.daemon.metrics_addr, "/metrics").await;
        assert_eq!(status, 200);
        metric_value(&text, needle)
    }

    async fn notify_count(&self, mch_id: &str, outcome: &str) -> f64 {
        self.metric(&format!(
            "wxpay_reconciler_notify_requests_total{{mch_id=\"{mch_id}\",outcome=\"{outcome}\"}}"
        ))
        .await
    }

    async fn unverified_count(&self, mch_id: &str, reason: &str) -> f64 {
        self.metric(&format!(
            "wxpay_reconciler_unverified_messages_total{{mch_id=\"{mch_id}\",source=\"notification\",reason=\"{reason}\"}}"
        ))
        .await
    }

    async fn stop(self) {
        self.stop.cancel();
        self.daemon.wait().await.unwrap();
    }
}

/// A notification as WeChat sends it.
#[derive(Clone)]
struct Notification {
    headers: Vec<(&'static str, String)>,
    body: String,
}

/// How a notification is made.
struct Make<'a> {
    event_type: &'a str,
    resource: serde_json::Value,
    serial: &'a str,
    apiv3_key: &'a [u8],
    /// Seconds from now.
    timestamp_offset: i64,
}

impl Make<'_> {
    fn payment<'a>(mch_id: &str, otn: &str, fee: i64, serial: &'a str) -> Make<'a> {
        Make {
            event_type: "TRANSACTION.SUCCESS",
            resource: transaction(mch_id, otn, fee),
            serial,
            apiv3_key: APIV3_KEY,
            timestamp_offset: 0,
        }
    }

    fn build(&self) -> Notification {
        let nonce = "fdasflkja484";
        let key = ApiV3Key::new(self.apiv3_key).unwrap();
        let plaintext = self.resource.to_string();
        let original_type = if self.event_type.starts_with("REFUND.") {
            "refund"
        } else {
            "transaction"
        };
        let ciphertext = key
            .encrypt(nonce, original_type, plaintext.as_bytes())
            .unwrap();
        let body = json!({
            "id": format!("EV-{}", unique_otn("ev")),
            "create_time": "2026-11-23T10:15:30+08:00",
            "resource_type": "encrypt-resource",
            "event_type": self.event_type,
            "summary": "支付成功",
            "resource": {
                "original_type": original_type,
                "algorithm": "AEAD_AES_256_GCM",
                "ciphertext": ciphertext,
                "associated_data": original_type,
                "nonce": nonce,
            }
        })
        .to_string();
        let timestamp = (Utc::now().timestamp() + self.timestamp_offset).to_string();
        let header_nonce = "NLm7VxggFq24tGEwqLJJj8MSVdddawmn";
        let signature = PrivateKey::from_pem(&key_file("go_sdk_test_private_key.pem"))
            .unwrap()
            .sign(&response_message(&timestamp, header_nonce, body.as_bytes()))
            .unwrap();
        Notification {
            headers: vec![
                ("Wechatpay-Timestamp", timestamp),
                ("Wechatpay-Nonce", header_nonce.into()),
                ("Wechatpay-Signature", signature),
                ("Wechatpay-Serial", self.serial.into()),
                (
                    "Wechatpay-Signature-Type",
                    "WECHATPAY2-SHA256-RSA2048".into(),
                ),
            ],
            body,
        }
    }
}

fn transaction(mch_id: &str, otn: &str, fee: i64) -> serde_json::Value {
    json!({
        "amount": {"currency": "CNY", "payer_currency": "CNY", "payer_total": fee, "total": fee},
        "appid": APPID,
        "attach": "",
        "bank_type": "OTHERS",
        "mchid": mch_id,
        "out_trade_no": otn,
        "payer": {"openid": "o4GgauJP_mgWEWictzA15WT15XXX"},
        "promotion_detail": [],
        "success_time": "2026-11-23T10:15:30+08:00",
        "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功",
        "trade_type": "JSAPI",
        "transaction_id": format!("42{}", otn.len() * 1_000_003 + fee as usize),
    })
}

/// The shop registers an order (the contract's INSERT).
async fn order(e: &Engine, mch_id: &str, appid: &str, fee: i64) -> String {
    let otn = unique_otn("v").to_string();
    e.db.store
        .insert_order(&NewOrder {
            mch_id,
            appid,
            out_trade_no: &otn,
            total_fee: fee,
        })
        .await
        .unwrap();
    otn
}

/// The merchant as the daemon has it (its WeChat keys shared with the test).
fn configured<'a>(e: &'a Engine, mch_id: &str) -> &'a Merchant {
    e.settings
        .merchants
        .iter()
        .find(|m| m.mch_id.as_str() == mch_id)
        .unwrap()
}

fn is_fail_json(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body).is_ok_and(|v| v["code"] == "FAIL")
}

#[tokio::test]
async fn a_verified_payment_settles_once_in_both_key_modes_beside_v2() {
    for_each_backend_with(with_listener, async |kind, e| {
        let d = Running::start(e).await;
        // Public-key mode and certificate mode: the serial names which key verifies.
        for (mch_id, serial) in [(PK_MCH, PUB_KEY_ID), (CERT_MCH, CERT_SERIAL)] {
            let otn = order(e, mch_id, APPID, 2590).await;
            let n = Make::payment(mch_id, &otn, 2590, serial).build();
            let (status, body) = d.post(V3_NOTIFY_PATH, &n).await;
            assert_eq!(status, 204, "{kind:?} {mch_id}: {body}");
            assert_eq!(body, "");
            let row = e.row(&otn).await;
            assert_eq!(row.state, OrderState::Success, "{kind:?}");
            assert_eq!(row.total_fee.get(), 2590);
            let events = e.events(&otn).await;
            assert_eq!(events.len(), 1, "{kind:?}: {events:?}");
            assert_eq!(
                (events[0].to_state.as_str(), events[0].source.as_str()),
                ("SUCCESS", "notify")
            );
            assert_eq!(events[0].total_fee, Some(2590));
            // WeChat repeats it (a new delivery, freshly signed): acknowledged, nothing twice;
            // also on the merchant's own path.
            let again = Make::payment(mch_id, &otn, 2590, serial).build();
            assert_eq!(d.post(V3_NOTIFY_PATH, &again).await.0, 204, "{kind:?}");
            let own = format!("{V3_NOTIFY_PATH}/{mch_id}");
            assert_eq!(d.post(&own, &again).await.0, 204, "{kind:?}");
            assert_eq!(e.events(&otn).await.len(), 1, "{kind:?}");
            assert_eq!(d.notify_count(mch_id, "ok").await, 1.0, "{kind:?}");
            assert_eq!(d.notify_count(mch_id, "repeat").await, 2.0, "{kind:?}");
            let skew = d
                .metric(&format!(
                    "wxpay_reconciler_wechatpay_clock_skew_seconds{{mch_id=\"{mch_id}\"}}"
                ))
                .await;
            assert!(skew.abs() <= 5.0, "{kind:?}: skew {skew}");
        }
        // Another amount than the order's: quarantined durably (acknowledged), never paid.
        let otn = order(e, PK_MCH, APPID, 500).await;
        let n = Make::payment(PK_MCH, &otn, 1, PUB_KEY_ID).build();
        assert_eq!(d.post(V3_NOTIFY_PATH, &n).await.0, 204, "{kind:?}");
        let row = e.row(&otn).await;
        assert_eq!(row.state, OrderState::AmountMismatch, "{kind:?}");
        let events = e.events(&otn).await;
        assert_eq!(
            (
                events.len(),
                events[0].to_state.as_str(),
                events[0].source.as_str(),
                events[0].total_fee
            ),
            (1, "AMOUNT_MISMATCH", "notify", Some(1)),
            "{kind:?}"
        );
        assert_eq!(
            d.metric(&format!(
                "wxpay_reconciler_amount_mismatch_total{{mch_id=\"{PK_MCH}\"}}"
            ))
            .await,
            1.0
        );
        // A v2 merchant's notification on the same listener still settles.
        let m = hmac_merchant();
        let otn = order(e, m.mch_id.as_str(), m.appid.as_str(), 990).await;
        let url = format!("{}{NOTIFY_PATH}", d.base);
        let v2 = v2_body(&v2_notification(&m, &otn, 990, "4200000000000000000000000001"));
        assert_eq!(v2_post(&url, v2).await, (200, "SUCCESS".into()), "{kind:?}");
        assert_eq!(e.row(&otn).await.state, OrderState::Success, "{kind:?}");
        assert_eq!(d.notify_count(m.mch_id.as_str(), "ok").await, 1.0);
        assert_eq!(
            d.metric("wxpay_reconciler_transitions_total{from=\"NOTPAY\",to=\"SUCCESS\",source=\"notify\"}")
                .await,
            3.0,
            "{kind:?}"
        );
        d.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unverified_notifications_are_refused_and_change_nothing() {
    for_each_backend_with(with_listener, async |kind, e| {
        let d = Running::start(e).await;
        let otn = order(e, PK_MCH, APPID, 100).await;
        let good = Make::payment(PK_MCH, &otn, 100, PUB_KEY_ID).build();
        // WeChat's probe: a 4xx, counted as a probe, never as a signature failure.
        let mut probe = good.clone();
        probe.headers[2].1 = format!("WECHATPAY/SIGNTEST/{}", &good.headers[2].1[19..]);
        let (status, body) = d.post(V3_NOTIFY_PATH, &probe).await;
        assert!((400..500).contains(&status), "{kind:?}: probe {status}");
        assert!(is_fail_json(&body), "{body}");
        assert_eq!(d.unverified_count(PK_MCH, "signtest_probe").await, 1.0);
        assert_eq!(d.notify_count(PK_MCH, "unverified").await, 1.0);
        assert_eq!(d.notify_count(PK_MCH, "sign_invalid").await, 0.0);
        // A serial no merchant knows: 5xx so that WeChat retries, and a certificate refresh is
        // asked for.
        let keys = Arc::clone(&configured(e, CERT_MCH).v3_credentials().unwrap().wechat);
        let asked = keys.refresh_requests();
        let unknown = Make::payment(PK_MCH, &otn, 100, "5157F09EFDC096DE15EBE81A47057A72").build();
        let (status, body) = d.post(V3_NOTIFY_PATH, &unknown).await;
        assert!(
            (500..600).contains(&status),
            "{kind:?}: unknown serial {status}"
        );
        assert!(is_fail_json(&body) && !body.contains("5157F09E"), "{body}");
        assert_eq!(
            keys.refresh_requests(),
            asked + 1,
            "{kind:?}: a certificate refresh was asked for"
        );
        assert_eq!(d.unverified_count("unknown", "unknown_serial").await, 1.0);
        assert_eq!(d.notify_count("unknown", "unverified").await, 1.0);
        // Signed 400 s ago: refused.
        let stale = Make {
            timestamp_offset: -400,
            ..Make::payment(PK_MCH, &otn, 100, PUB_KEY_ID)
        }
        .build();
        let (status, _) = d.post(V3_NOTIFY_PATH, &stale).await;
        assert!(!(200..300).contains(&status), "{kind:?}: stale {status}");
        assert_eq!(d.unverified_count(PK_MCH, "stale_timestamp").await, 1.0);
        // A body changed after signing: a signature failure.
        let mut forged = good.clone();
        forged.body = forged.body.replace("encrypt-resource", "encrypt-resourcf");
        let (status, body) = d.post(V3_NOTIFY_PATH, &forged).await;
        assert_eq!(status, 401, "{kind:?}");
        assert_eq!(body, r#"{"code":"FAIL","message":"invalid signature"}"#);
        assert_eq!(d.notify_count(PK_MCH, "sign_invalid").await, 1.0);
        // The public key's notification on the certificate merchant's path: that merchant
        // does not know the serial.
        let (status, _) = d.post(&format!("{V3_NOTIFY_PATH}/{CERT_MCH}"), &good).await;
        assert!(!(200..300).contains(&status), "{kind:?}: {status}");
        // A path naming a v2 merchant, or no merchant: refused as an unknown merchant.
        for other in ["1900000109", "1234567890"] {
            let (status, body) = d.post(&format!("{V3_NOTIFY_PATH}/{other}"), &good).await;
            assert_eq!(status, 401, "{kind:?}: {other}");
            assert!(is_fail_json(&body) && !body.contains(other), "{body}");
        }
        assert_eq!(d.notify_count("unknown", "unknown_merchant").await, 2.0);
        // Nothing changed.
        assert_eq!(e.row(&otn).await.state, OrderState::NotPay, "{kind:?}");
        assert!(e.events(&otn).await.is_empty(), "{kind:?}");
        // And the genuine one still settles.
        assert_eq!(d.post(V3_NOTIFY_PATH, &good).await.0, 204, "{kind:?}");
        assert_eq!(e.row(&otn).await.state, OrderState::Success, "{kind:?}");
        d.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_wrong_apiv3_key_and_other_events_are_counted_apart() {
    for_each_backend_with(with_listener, async |kind, e| {
        let d = Running::start(e).await;
        let otn = order(e, CERT_MCH, APPID, 300).await;
        // Sealed with another APIv3 key (the merchant reset it): 5xx, WeChat retries after the
        // key is fixed.
        let wrong = Make {
            apiv3_key: b"0123456789abcdef0123456789abcdef",
            ..Make::payment(CERT_MCH, &otn, 300, CERT_SERIAL)
        }
        .build();
        let (status, body) = d.post(V3_NOTIFY_PATH, &wrong).await;
        assert_eq!(status, 500, "{kind:?}: {body}");
        assert!(is_fail_json(&body), "{body}");
        assert_eq!(d.notify_count(CERT_MCH, "decrypt_failed").await, 1.0);
        assert_eq!(e.row(&otn).await.state, OrderState::NotPay, "{kind:?}");
        // An event this version does not act on (a transfer's bill): acknowledged, ignored,
        // nothing changes.
        let refund = Make {
            event_type: "MCHTRANSFER.BILL.FINISHED",
            resource: json!({
                "mch_id": CERT_MCH, "out_bill_no": otn, "transfer_bill_no": "1330000071100999991182020050700019480001",
                "state": "SUCCESS", "transfer_amount": 300
            }),
            ..Make::payment(CERT_MCH, &otn, 300, CERT_SERIAL)
        }
        .build();
        assert_eq!(d.post(V3_NOTIFY_PATH, &refund).await.0, 204, "{kind:?}");
        assert_eq!(d.notify_count(CERT_MCH, "ignored").await, 1.0);
        assert_eq!(e.row(&otn).await.state, OrderState::NotPay, "{kind:?}");
        assert!(e.events(&otn).await.is_empty(), "{kind:?}");
        // A TRANSACTION.SUCCESS of another merchant than the serial's: refused.
        let foreign = Make::payment(PK_MCH, &otn, 300, CERT_SERIAL).build();
        let (status, _) = d.post(V3_NOTIFY_PATH, &foreign).await;
        assert_eq!(status, 400, "{kind:?}");
        assert_eq!(d.notify_count(CERT_MCH, "mismatch").await, 1.0);
        // A payment of an order the shop never registered: refused (WeChat retries).
        let stray = Make::payment(CERT_MCH, unique_otn("stray").as_str(), 300, CERT_SERIAL).build();
        assert_eq!(d.post(V3_NOTIFY_PATH, &stray).await.0, 400, "{kind:?}");
        assert_eq!(d.notify_count(CERT_MCH, "unknown_order").await, 1.0);
        d.stop().await;
    })
    .await;
}

/// A refund's resource as WeChat's `REFUND.*` notifications carry it (the shape of the fixture
/// `sample_notify_resource_refund_skit.json`).
fn refund_resource(
    mch_id: &str,
    otn: &str,
    orn: &str,
    refund: i64,
    total: i64,
    status: &str,
) -> serde_json::Value {
    let mut r = json!({
        "mchid": mch_id,
        "transaction_id": "1008450740201411110005820873",
        "out_trade_no": otn,
        "refund_id": "50200207182018070300011301001",
        "out_refund_no": orn,
        "refund_status": status,
        "user_received_account": "招商银行信用卡0403",
        "amount": {"total": total, "refund": refund, "payer_total": total, "payer_refund": refund},
    });
    if status == "SUCCESS" {
        r["success_time"] = json!("2026-12-01T10:34:56+08:00");
    }
    r
}

#[tokio::test]
async fn a_verified_refund_notification_finishes_its_refund_once() {
    use wxpay_reconciler::domain::RefundState;
    for_each_backend_with(with_listener, async |kind, e| {
        let d = Running::start(e).await;
        let otn = order(e, PK_MCH, APPID, 1000).await;
        e.db.exec(
            "UPDATE wxpay_orders SET state = 'SUCCESS' WHERE out_trade_no = $1",
            &[&otn],
        )
        .await;
        let refunds = [("S", 300), ("O", 800), ("W", 100), ("A", 50)];
        for (p, fee) in refunds {
            e.db.exec(
                &format!(
                    "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES ($1, $2, $3, {fee})"
                ),
                &[PK_MCH, &otn, &format!("{p}{otn}")],
            )
            .await;
        }
        let notice = |p: &str, refund: i64, status: &str, event: &'static str| Make {
            event_type: event,
            resource: refund_resource(PK_MCH, &otn, &format!("{p}{otn}"), refund, 1000, status),
            serial: PUB_KEY_ID,
            apiv3_key: APIV3_KEY,
            timestamp_offset: 0,
        }
        .build();
        let state = async |p: &str| {
            e.db.store
                .find_refund(PK_MCH, &format!("{p}{otn}"))
                .await
                .unwrap()
                .unwrap()
        };

        let n = notice("S", 300, "SUCCESS", "REFUND.SUCCESS");
        let (status, body) = d.post(V3_NOTIFY_PATH, &n).await;
        assert_eq!(status, 204, "{kind:?}: {body}");
        let done = state("S").await;
        assert_eq!(done.state, RefundState::Success, "{kind:?}");
        assert_eq!(done.refund_id.as_deref(), Some("50200207182018070300011301001"));
        assert_eq!(done.refund_recv_accout.as_deref(), Some("招商银行信用卡0403"));
        assert!(done.success_time.is_some());
        assert_eq!(
            e.db.store.refund_events(done.id).await.unwrap(),
            vec![("PROCESSING".into(), "SUCCESS".into(), "notify".into())]
        );
        assert_eq!(e.row(&otn).await.state, OrderState::Refund, "{kind:?}");
        // WeChat delivers it again: acknowledged, nothing twice.
        assert_eq!(d.post(V3_NOTIFY_PATH, &n).await.0, 204);
        assert_eq!(e.db.store.refund_events(done.id).await.unwrap().len(), 1);
        assert_eq!(d.notify_count(PK_MCH, "ok").await, 1.0, "{kind:?}");
        assert_eq!(d.notify_count(PK_MCH, "repeat").await, 1.0, "{kind:?}");

        // 300 + 800 > 1000, and 150 fen for a refund of 100: quarantined, acknowledged.
        let over = notice("O", 800, "SUCCESS", "REFUND.SUCCESS");
        assert_eq!(d.post(V3_NOTIFY_PATH, &over).await.0, 204, "{kind:?}");
        assert_eq!(state("O").await.state, RefundState::AmountMismatch, "{kind:?}");
        let wrong = notice("W", 150, "SUCCESS", "REFUND.SUCCESS");
        assert_eq!(d.post(V3_NOTIFY_PATH, &wrong).await.0, 204, "{kind:?}");
        assert_eq!(state("W").await.state, RefundState::AmountMismatch, "{kind:?}");
        // ABNORMAL: the money did not reach the payer.
        let abnormal = notice("A", 50, "ABNORMAL", "REFUND.ABNORMAL");
        assert_eq!(d.post(V3_NOTIFY_PATH, &abnormal).await.0, 204, "{kind:?}");
        assert_eq!(state("A").await.state, RefundState::Abnormal, "{kind:?}");

        // A refund the shop never registered: refused (WeChat retries), counted.
        let unknown = notice("X", 10, "SUCCESS", "REFUND.SUCCESS");
        let (status, body) = d.post(V3_NOTIFY_PATH, &unknown).await;
        assert!(status >= 400 && is_fail_json(&body), "{kind:?}: {status} {body}");
        assert_eq!(d.notify_count(PK_MCH, "unknown_refund").await, 1.0);
        // Sealed with another APIv3 key: refused, nothing changes.
        let mut forged = Make {
            event_type: "REFUND.CLOSED",
            resource: refund_resource(PK_MCH, &otn, &format!("S{otn}"), 300, 1000, "CLOSED"),
            serial: PUB_KEY_ID,
            apiv3_key: b"0123456789abcdef0123456789abcdef",
            timestamp_offset: 0,
        };
        assert!(d.post(V3_NOTIFY_PATH, &forged.build()).await.0 >= 400);
        // Another merchant's refund under this merchant's key: refused.
        forged.apiv3_key = APIV3_KEY;
        forged.resource["mchid"] = json!(CERT_MCH);
        assert!(d.post(V3_NOTIFY_PATH, &forged.build()).await.0 >= 400);
        assert_eq!(state("S").await.state, RefundState::Success, "{kind:?}");
        assert_eq!(
            d.metric(&format!(
                "wxpay_reconciler_refund_transitions_total{{mch_id=\"{PK_MCH}\",to=\"AMOUNT_MISMATCH\",source=\"notify\"}}"
            ))
            .await,
            2.0,
            "{kind:?}"
        );
        d.stop().await;
    })
    .await;
}

//! Refund notifications (issue 15): v2's `POST /wxpay/v2/refund-notify` on a running daemon, on
//! every backend the run covers, fed by the simulator (`"notify":"deliver"`) and by bodies made
//! here as WeChat makes them (`req_info` AES-256-ECB with the MD5 of the API key); and the v3
//! `REFUND.*` notification the simulator sends, verified and decrypted as WeChat documents it.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use wxpay_reconciler::config::Settings;
use wxpay_reconciler::daemon::Daemon;
use wxpay_reconciler::domain::{OrderState, RefundState};
use wxpay_reconciler::notify::V2_REFUND_NOTIFY_PATH;
use wxpay_reconciler::sim::v3::TEST_V3_APIV3_KEY;
use wxpay_reconciler::wxpay::refund_notify::encrypt_req_info;
use wxpay_reconciler::wxpay::v3::ApiV3Key;
use wxpay_reconciler::wxpay::v3::auth::SignedHeaders;
use wxpay_reconciler::wxpay::{ApiKey, Fields, Merchant, xml};

use crate::daemon::get;
use crate::engine::{Engine, metric_value};
use crate::frame::for_each_backend_with;
use crate::helpers::{HMAC_KEY, MD5_KEY, TestSim, hmac_merchant, md5_merchant, unique_otn};

fn with_listener(s: &mut Settings) {
    s.notify.listen = Some("127.0.0.1:0".parse().unwrap());
    // Nothing is polled while the test runs: only notifications change a refund here.
    s.schedule.grace_seconds = 3600;
    s.refunds.first_query_seconds = 3600;
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

    /// POSTs a v2 refund notification; returns the HTTP status and the decoded XML answer.
    async fn post(&self, body: &str) -> (u16, Fields) {
        let resp = self
            .http
            .post(format!("{}{V2_REFUND_NOTIFY_PATH}", self.base))
            .header("content-type", "text/xml")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (status, xml::decode(&bytes).unwrap())
    }

    async fn notify_count(&self, mch_id: &str, outcome: &str) -> f64 {
        let (status, text) = get(self.daemon.metrics_addr, "/metrics").await;
        assert_eq!(status, 200);
        metric_value(
            &text,
            &format!(
                "wxpay_reconciler_notify_requests_total{{mch_id=\"{mch_id}\",outcome=\"{outcome}\"}}"
            ),
        )
    }

    async fn stop(self) {
        self.stop.cancel();
        self.daemon.wait().await.unwrap();
    }
}

/// A decrypted `req_info` as WeChat writes it.
struct Info<'a> {
    out_refund_no: &'a str,
    out_trade_no: &'a str,
    refund_id: &'a str,
    total_fee: i64,
    refund_fee: i64,
    status: &'a str,
}

impl Info<'_> {
    fn xml(&self) -> String {
        let mut f = Fields::new()
            .with("out_refund_no", self.out_refund_no)
            .with("out_trade_no", self.out_trade_no)
            .with("refund_account", "REFUND_SOURCE_RECHARGE_FUNDS")
            .with("refund_fee", self.refund_fee.to_string())
            .with("refund_id", self.refund_id)
            .with("refund_recv_accout", "支付用户零钱")
            .with("refund_request_source", "API")
            .with("refund_status", self.status)
            .with("settlement_refund_fee", self.refund_fee.to_string())
            .with("settlement_total_fee", self.total_fee.to_string())
            .with("total_fee", self.total_fee.to_string())
            .with("transaction_id", "4200000015201711256947025404");
        if self.status == "SUCCESS" {
            f.insert("success_time", "2026-11-25 15:36:17");
        }
        xml::encode_rooted(&f, "root").unwrap()
    }
}

/// The envelope WeChat POSTs around a `req_info`.
fn envelope(m: &Merchant, req_info: &str) -> String {
    xml::encode(
        &Fields::new()
            .with("return_code", "SUCCESS")
            .with("appid", m.appid.as_str())
            .with("mch_id", m.mch_id.as_str())
            .with("nonce_str", "TeqClE3i0mvn3DrK")
            .with("req_info", req_info),
    )
    .unwrap()
}

fn body(m: &Merchant, key: &str, info: &Info<'_>) -> String {
    let key = ApiKey::parse(key).unwrap();
    envelope(m, &encrypt_req_info(info.xml().as_bytes(), &key))
}

/// The shop's order, paid (as its own notification handler or the scan would have marked it).
async fn paid_order(e: &Engine, m: &Merchant, fee: i64) -> String {
    let (otn, txid) = e.paid_order(m, fee).await;
    e.db.exec(
        "UPDATE wxpay_orders SET state = 'SUCCESS', transaction_id = $1 WHERE out_trade_no = $2",
        &[&txid, &otn],
    )
    .await;
    otn
}

/// The shop registers a refund (the contract's INSERT).
async fn register(e: &Engine, m: &Merchant, otn: &str, orn: &str, fee: i64) {
    e.db.exec(
        &format!(
            "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES ($1, $2, $3, {fee})"
        ),
        &[m.mch_id.as_str(), otn, orn],
    )
    .await;
}

async fn refund_row(e: &Engine, m: &Merchant, orn: &str) -> wxpay_reconciler::store::RefundRow {
    e.db.store
        .find_refund(m.mch_id.as_str(), orn)
        .await
        .unwrap()
        .unwrap()
}

async fn wait_until<F: AsyncFn() -> bool>(what: &str, done: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_v2_refund_notification_is_applied_once_and_forged_ones_change_nothing() {
    for_each_backend_with(with_listener, async |kind, e| {
        let run = Running::start(e).await;
        let (status, cfg) = e
            .sim
            .control(
                "PUT",
                "/_sim/config",
                json!({"notify_retry_ms": [200, 200, 200], "notify_base_url": run.base}),
            )
            .await;
        assert_eq!(status, 200, "{cfg}");
        // The sign type plays no part: the key is the MD5 of the API key for both.
        for (m, own_key, other_key) in [
            (md5_merchant(), MD5_KEY, HMAC_KEY),
            (hmac_merchant(), HMAC_KEY, MD5_KEY),
        ] {
            one_merchant(kind, e, &run, &m, own_key, other_key).await;
        }
        run.stop().await;
    })
    .await;
}

async fn one_merchant(
    kind: crate::db::Kind,
    e: &Engine,
    run: &Running,
    m: &Merchant,
    own_key: &str,
    other_key: &str,
) {
    {
        let mch = m.mch_id.as_str().to_owned();

        let otn = paid_order(e, m, 1000).await;
        let ok = format!("S{otn}");
        register(e, m, &otn, &ok, 300).await;
        let (status, refund) = e
            .sim
            .control(
                "POST",
                &format!("/_sim/orders/{mch}/{otn}/refunds"),
                json!({"out_refund_no": ok, "refund_fee": 300, "outcome": "SUCCESS", "notify": "deliver"}),
            )
            .await;
        assert_eq!(status, 201, "{refund}");
        wait_until("the simulator's notification acknowledged", async || {
            e.sim
                .sim
                .state
                .refund(&mch, &ok)
                .is_some_and(|r| r.notify_delivered)
        })
        .await;
        let row = refund_row(e, m, &ok).await;
        assert_eq!(row.state, RefundState::Success, "{kind:?}");
        assert_eq!(row.refund_id.as_deref(), refund["refund_id"].as_str());
        assert!(row.success_time.is_some() && row.refund_recv_accout.is_some());
        assert_eq!(e.row(&otn).await.state, OrderState::Refund, "{kind:?}");
        let events = e.db.store.refund_events(row.id).await.unwrap();
        assert_eq!(
            events,
            [("PROCESSING".into(), "SUCCESS".into(), "notify".into())],
            "{kind:?}"
        );
        assert_eq!(run.notify_count(&mch, "ok").await, 1.0, "{kind:?}");
        assert_eq!(
            e.sim.sim.state.refund(&mch, &ok).unwrap().notify_attempts,
            1
        );

        // A redelivery (WeChat retries when it missed the answer): a repeat, nothing changes.
        let again = Info {
            out_refund_no: &ok,
            out_trade_no: &otn,
            refund_id: row.refund_id.as_deref().unwrap(),
            total_fee: 1000,
            refund_fee: 300,
            status: "SUCCESS",
        };
        let (status, answer) = run.post(&body(m, own_key, &again)).await;
        assert_eq!((status, answer.get("return_code")), (200, Some("SUCCESS")));
        assert_eq!(run.notify_count(&mch, "repeat").await, 1.0, "{kind:?}");
        assert_eq!(e.db.store.refund_events(row.id).await.unwrap(), events);
        assert_eq!(refund_row(e, m, &ok).await.success_time, row.success_time);

        // Forged (another key) and undecryptable notifications of an open refund: FAIL,
        // counted, nothing changes.
        let open = format!("P{otn}");
        register(e, m, &otn, &open, 100).await;
        let forged = Info {
            out_refund_no: &open,
            out_trade_no: &otn,
            refund_id: "50000404922017112502468056157",
            total_fee: 1000,
            refund_fee: 100,
            status: "SUCCESS",
        };
        let (status, answer) = run.post(&body(m, other_key, &forged)).await;
        assert_eq!((status, answer.get("return_code")), (200, Some("FAIL")));
        for garbage in ["AAAA", "%%%not base64%%%", &"A".repeat(4000)] {
            let (status, answer) = run.post(&envelope(m, garbage)).await;
            assert_eq!(
                (status, answer.get("return_code")),
                (200, Some("FAIL")),
                "{garbage}"
            );
        }
        let decrypt_failed = run.notify_count(&mch, "decrypt_failed").await;
        // A wrong key leaves bad padding (decrypt_failed) or, rarely, garbage that does not
        // parse (malformed): either way refused.
        let malformed = run.notify_count(&mch, "malformed").await;
        assert_eq!(decrypt_failed + malformed, 4.0, "{kind:?}");
        assert!(decrypt_failed >= 3.0, "{kind:?}");
        let still = refund_row(e, m, &open).await;
        assert_eq!(still.state, RefundState::Processing, "{kind:?}");
        assert!(e.db.store.refund_events(still.id).await.unwrap().is_empty());

        // An over-refund (300 already back, 800 more of a 1000 fen order), correctly
        // encrypted: quarantined, never applied, and acknowledged (it is durable).
        let over = format!("O{otn}");
        register(e, m, &otn, &over, 800).await;
        let info = Info {
            out_refund_no: &over,
            out_trade_no: &otn,
            refund_id: "50000404922017112502468056158",
            total_fee: 1000,
            refund_fee: 800,
            status: "SUCCESS",
        };
        let (status, answer) = run.post(&body(m, own_key, &info)).await;
        assert_eq!((status, answer.get("return_code")), (200, Some("SUCCESS")));
        let q = refund_row(e, m, &over).await;
        assert_eq!(q.state, RefundState::AmountMismatch, "{kind:?}");
        assert_eq!(e.row(&otn).await.state, OrderState::Refund);

        // A refund of an order of another app (appid of another merchant): refused.
        let other_app = envelope(
            &crate::helpers::merchant(
                m.mch_id.as_str(),
                "wx00000000000000ff",
                wxpay_reconciler::wxpay::SignType::Md5,
                own_key,
            ),
            &encrypt_req_info(forged.xml().as_bytes(), &ApiKey::parse(own_key).unwrap()),
        );
        let (_, answer) = run.post(&other_app).await;
        assert_eq!(answer.get("return_code"), Some("FAIL"));
        assert_eq!(refund_row(e, m, &open).await.state, RefundState::Processing);
    }
}

#[tokio::test]
async fn a_refund_finished_later_is_notified_then() {
    for_each_backend_with(with_listener, async |kind, e| {
        let m = md5_merchant();
        let mch = m.mch_id.as_str().to_owned();
        let run = Running::start(e).await;
        e.sim
            .control(
                "PUT",
                "/_sim/config",
                json!({"notify_retry_ms": vec![200; 20], "notify_base_url": run.base}),
            )
            .await;
        let otn = paid_order(e, &m, 700).await;
        let orn = format!("L{otn}");
        register(e, &m, &otn, &orn, 500).await;
        let (status, _) = e
            .sim
            .control(
                "POST",
                &format!("/_sim/orders/{mch}/{otn}/refunds"),
                json!({"out_refund_no": orn, "refund_fee": 500, "outcome": "PROCESSING", "notify": "deliver"}),
            )
            .await;
        assert_eq!(status, 201);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(e.sim.sim.state.refund(&mch, &orn).unwrap().notify_attempts, 0);
        let (status, _) = e
            .sim
            .control(
                "POST",
                &format!("/_sim/refunds/{mch}/{orn}/finish"),
                json!({"outcome": "ABNORMAL"}),
            )
            .await;
        assert_eq!(status, 200);
        wait_until("the ABNORMAL refund's notification", async || {
            e.sim
                .sim
                .state
                .refund(&mch, &orn)
                .is_some_and(|r| r.notify_delivered)
        })
        .await;
        let row = refund_row(e, &m, &orn).await;
        assert_eq!(row.state, RefundState::Abnormal, "{kind:?}");
        // Not a successful refund: the order stays SUCCESS.
        assert_eq!(e.row(&otn).await.state, OrderState::Success, "{kind:?}");

        // A notification that comes before the shop registered its refund is refused
        // (unknown_refund) and WeChat's retry applies it once the row is there.
        let early = format!("E{otn}");
        let (status, _) = e
            .sim
            .control(
                "POST",
                &format!("/_sim/orders/{mch}/{otn}/refunds"),
                json!({"out_refund_no": early, "refund_fee": 200, "outcome": "SUCCESS", "notify": "deliver"}),
            )
            .await;
        assert_eq!(status, 201);
        wait_until("the early notification refused", async || {
            run.notify_count(&mch, "unknown_refund").await >= 1.0
        })
        .await;
        assert!(!e.sim.sim.state.refund(&mch, &early).unwrap().notify_delivered);
        register(e, &m, &otn, &early, 200).await;
        wait_until("the retry applied", async || {
            e.sim
                .sim
                .state
                .refund(&mch, &early)
                .is_some_and(|r| r.notify_delivered)
        })
        .await;
        let row = refund_row(e, &m, &early).await;
        assert_eq!(row.state, RefundState::Success, "{kind:?}");
        assert!(e.sim.sim.state.refund(&mch, &early).unwrap().notify_attempts >= 2);
        assert_eq!(e.row(&otn).await.state, OrderState::Refund, "{kind:?}");
        run.stop().await;
    })
    .await;
}

/// The v3 refund notification the simulator sends: signed with WeChat's key, the resource
/// sealed with the APIv3 key (AAD `refund`), in WeChat's documented shape.
#[tokio::test]
async fn the_simulator_sends_v3_refund_notifications_signed_and_encrypted() {
    const MCH: &str = "1900000100";
    let sim = TestSim::start().await;
    let (base, got, task) = crate::v3sim::receiver(0).await;
    let (status, cfg) = sim
        .control(
            "PUT",
            "/_sim/config",
            json!({"notify_retry_ms": [100, 100], "notify_base_url": base}),
        )
        .await;
    assert_eq!(status, 200, "{cfg}");
    let otn = unique_otn("v3r");
    crate::v3sim::create(&sim, otn.as_str(), 999).await;
    let (status, paid) = sim
        .control(
            "POST",
            &format!("/_sim/orders/{MCH}/{otn}/pay"),
            json!({"notify": "drop"}),
        )
        .await;
    assert_eq!(status, 200, "{paid}");
    let refund = |orn: String, fee: i64, outcome: &str| {
        let sim = &sim;
        let otn = otn.clone();
        let outcome = outcome.to_owned();
        async move {
            let (status, r) = sim
                .control(
                    "POST",
                    &format!("/_sim/orders/{MCH}/{otn}/refunds"),
                    json!({"out_refund_no": orn, "refund_fee": fee, "outcome": outcome, "notify": "deliver"}),
                )
                .await;
            assert_eq!(status, 201, "{r}");
            r
        }
    };
    let ok = refund(format!("S{otn}"), 600, "SUCCESS").await;
    let closed = refund(format!("C{otn}"), 100, "CLOSED").await;
    let abnormal = refund(format!("A{otn}"), 200, "ABNORMAL").await;
    // Never notified: dropped.
    sim.control(
        "POST",
        &format!("/_sim/orders/{MCH}/{otn}/refunds"),
        json!({"out_refund_no": format!("D{otn}"), "refund_fee": 1, "outcome": "SUCCESS", "notify": "drop"}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "no refund notifications arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = got.lock().unwrap().clone();
    assert_eq!(received.len(), 3, "one each, the dropped one never");

    let key = ApiV3Key::new(TEST_V3_APIV3_KEY.as_bytes()).unwrap();
    let mut seen = Vec::new();
    for (path, headers, body) in &received {
        assert_eq!(path, "/wxpay/v3/notify");
        let signed = SignedHeaders::from_headers(headers).unwrap();
        signed
            .verify(body, chrono::Utc::now(), &crate::v3sim::wechat_keys())
            .unwrap();
        let event: Value = serde_json::from_slice(body).unwrap();
        let r = &event["resource"];
        assert_eq!(r["original_type"], "refund");
        assert_eq!(r["associated_data"], "refund");
        assert_eq!(r["algorithm"], "AEAD_AES_256_GCM");
        let plain = key
            .decrypt(
                r["nonce"].as_str().unwrap(),
                "refund",
                r["ciphertext"].as_str().unwrap(),
            )
            .unwrap();
        let d: Value = serde_json::from_slice(&plain).unwrap();
        let expected = [&ok, &closed, &abnormal]
            .into_iter()
            .find(|x| x["out_refund_no"] == d["out_refund_no"])
            .unwrap();
        assert_eq!(d["mchid"], MCH);
        assert_eq!(d["out_trade_no"], otn.as_str());
        assert_eq!(d["transaction_id"], paid["transaction_id"]);
        assert_eq!(d["refund_id"], expected["refund_id"]);
        assert_eq!(d["refund_status"], expected["status"]);
        assert_eq!(d["user_received_account"], "支付用户的零钱");
        let fee = expected["refund_fee"].as_i64().unwrap();
        assert_eq!(
            d["amount"],
            json!({"total": 999, "refund": fee, "payer_total": 999, "payer_refund": fee})
        );
        // The documented keys, and no others.
        let mut keys: Vec<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let status = d["refund_status"].as_str().unwrap().to_owned();
        if status == "SUCCESS" {
            assert!(d["success_time"].as_str().unwrap().ends_with("+08:00"));
            assert!(keys.contains(&"success_time"));
        } else {
            assert!(!keys.contains(&"success_time"), "{status}");
        }
        keys.retain(|k| *k != "success_time");
        assert_eq!(
            keys,
            [
                "amount",
                "mchid",
                "out_refund_no",
                "out_trade_no",
                "refund_id",
                "refund_status",
                "transaction_id",
                "user_received_account"
            ]
        );
        seen.push((event["event_type"].as_str().unwrap().to_owned(), status));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("REFUND.ABNORMAL".to_owned(), "ABNORMAL".to_owned()),
            ("REFUND.CLOSED".to_owned(), "CLOSED".to_owned()),
            ("REFUND.SUCCESS".to_owned(), "SUCCESS".to_owned()),
        ]
    );
    task.abort();
    sim.stop().await;
}

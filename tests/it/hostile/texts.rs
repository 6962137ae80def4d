//! Texts from WeChat's side of any length never stop a write: what the daemon stores (notes,
//! details, WeChat's descriptions) is bounded to what every backend's column holds, in
//! characters and bytes, cut on a character boundary. Played with a fake WeChat that answers
//! each order with a body of the test's choosing, on every backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use wxpay_reconciler::config::Settings;
use wxpay_reconciler::domain::OrderState;
use wxpay_reconciler::text::MAX_NOTE_CHARS;
use wxpay_reconciler::wxpay::SignType;
use wxpay_reconciler::wxpay::{Fields, sign, xml};

use crate::frame::for_each_backend_with;
use crate::helpers::{md5_merchant, unique_otn};

/// A WeChat that answers `orderquery` for each out_trade_no with a body set by the test.
#[derive(Clone, Default)]
struct FakeWechat {
    bodies: Arc<Mutex<HashMap<String, String>>>,
}

impl FakeWechat {
    async fn start(&self) -> String {
        let app = Router::new()
            .route("/pay/orderquery", post(answer))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn answer(&self, out_trade_no: &str, body: String) {
        self.bodies
            .lock()
            .unwrap()
            .insert(out_trade_no.to_owned(), body);
    }
}

async fn answer(State(fake): State<FakeWechat>, body: Bytes) -> String {
    let request = xml::decode(&body).unwrap();
    let otn = request.get("out_trade_no").unwrap_or_default().to_owned();
    fake.bodies
        .lock()
        .unwrap()
        .get(&otn)
        .cloned()
        .unwrap_or_default()
}

/// A correctly signed reply of the MD5 test merchant.
fn signed(mut fields: Fields) -> String {
    let m = md5_merchant();
    sign::sign_in_place(&mut fields, m.v2_key(), SignType::Md5);
    xml::encode(&fields).unwrap()
}

fn fits(text: &str) -> bool {
    text.chars().count() <= MAX_NOTE_CHARS && !text.contains('\n')
}

#[tokio::test]
async fn over_long_values_from_wechat_are_stored_bounded_on_every_backend() {
    let fake = FakeWechat::default();
    let url = fake.start().await;
    let tweak = |s: &mut Settings| s.wechat.base_url = url.clone();
    for_each_backend_with(tweak, async |kind, e| {
        let m = md5_merchant();
        let mut otns = Vec::new();
        for _ in 0..4 {
            let otn = unique_otn("long").to_string();
            e.db.store
                .insert_order(&wxpay_reconciler::store::NewOrder {
                    mch_id: m.mch_id.as_str(),
                    appid: m.appid.as_str(),
                    out_trade_no: &otn,
                    total_fee: 100,
                })
                .await
                .unwrap();
            otns.push(otn);
        }
        // Unsigned: a return_code of 40,000 quotes (escaped, it would double).
        fake.answer(
            &otns[0],
            format!(
                "<xml><return_code>{}</return_code></xml>",
                "\"".repeat(40_000)
            ),
        );
        // Unsigned FAIL: a return_msg of 20,000 three-byte characters and a forged log line.
        fake.answer(
            &otns[1],
            format!(
                "<xml><return_code>FAIL</return_code><return_msg><![CDATA[{}\nERROR forged line]]></return_msg></xml>",
                "界".repeat(20_000)
            ),
        );
        // Signed and definitive: CLOSED, with a description of 20,000 four-byte characters.
        fake.answer(
            &otns[2],
            signed(
                Fields::new()
                    .with("return_code", "SUCCESS")
                    .with("result_code", "SUCCESS")
                    .with("appid", m.appid.as_str())
                    .with("mch_id", m.mch_id.as_str())
                    .with("nonce_str", "n0nce")
                    .with("out_trade_no", otns[2].as_str())
                    .with("trade_state", "CLOSED")
                    .with("trade_state_desc", "😀".repeat(15_000)),
            ),
        );
        // Signed FAIL with a long err_code_des.
        fake.answer(
            &otns[3],
            signed(
                Fields::new()
                    .with("return_code", "SUCCESS")
                    .with("result_code", "FAIL")
                    .with("err_code", "SYSTEMERROR")
                    .with("err_code_des", "x".repeat(60_000))
                    .with("appid", m.appid.as_str())
                    .with("mch_id", m.mch_id.as_str())
                    .with("nonce_str", "n0nce"),
            ),
        );

        let report = e.scan().await;
        assert_eq!(report.claimed, 4, "{kind:?} {report:?}");
        assert_eq!(
            (report.settled, report.rescheduled, report.abandoned),
            (1, 3, 0),
            "{kind:?}: every write went through {report:?}"
        );
        for otn in &otns[..2] {
            let row = e.row(otn).await;
            assert_eq!(row.query_count, 1, "{kind:?} {otn}");
            let note = row.last_error.expect("a note");
            assert!(fits(&note), "{kind:?}: {} chars", note.chars().count());
        }
        let closed = e.row(&otns[2]).await;
        assert_eq!(closed.state, OrderState::Closed, "{kind:?}");
        let events = e.events(&otns[2]).await;
        let detail = events[0].detail.as_deref().expect("WeChat's description");
        assert!(fits(detail), "{kind:?}: {} chars", detail.chars().count());
        assert!(
            detail.starts_with("😀😀"),
            "{kind:?}: cut on a character boundary"
        );
        let row = e.row(&otns[3]).await;
        assert!(fits(row.last_error.as_deref().unwrap()), "{kind:?}");
    })
    .await;
}

//! Shared test harness: a simulator on port 0, the two test merchants, a client with short
//! timeouts, and the simulator's control API over real HTTP.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use wxpay_reconciler::domain::{AppId, MchId, OutTradeNo};
use wxpay_reconciler::sim::{self, RunningSimulator};
use wxpay_reconciler::wxpay::SignType;
use wxpay_reconciler::wxpay::{ApiKey, ClientConfig, Merchant, WxPayClient};

pub const MD5_KEY: &str = "192006250b4c09247ec02edce69f6a2d";
pub const HMAC_KEY: &str = "8934e7d15453e97507ef794cf7b0519d";

/// The fixture merchant signing with MD5 (`10000100`).
pub fn md5_merchant() -> Merchant {
    merchant("10000100", "wxd930ea5d5a258f4f", SignType::Md5, MD5_KEY)
}

/// The fixture merchant signing with HMAC-SHA256 (`1900000109`).
pub fn hmac_merchant() -> Merchant {
    merchant(
        "1900000109",
        "wx2421b1c4370ec43b",
        SignType::HmacSha256,
        HMAC_KEY,
    )
}

pub fn both_merchants() -> [Merchant; 2] {
    [md5_merchant(), hmac_merchant()]
}

pub fn merchant(mch_id: &str, appid: &str, sign_type: SignType, key: &str) -> Merchant {
    Merchant::v2(
        MchId::parse(mch_id).unwrap(),
        AppId::parse(appid).unwrap(),
        sign_type,
        ApiKey::parse(key).unwrap(),
    )
}

pub fn otn(s: &str) -> OutTradeNo {
    OutTradeNo::parse(s).unwrap()
}

/// A fresh, unique order number for one test.
pub fn unique_otn(prefix: &str) -> OutTradeNo {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    otn(&format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The fixtures shipped in the repository (a verbatim copy of ../shared/fixtures/wxpay-v2).
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wxpay-v2")
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// A simulator with the default merchants on a free port.
pub struct TestSim {
    pub sim: RunningSimulator,
    pub http: reqwest::Client,
}

impl TestSim {
    pub async fn start() -> TestSim {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = RunningSimulator::start(listener, sim::default_merchants()).unwrap();
        TestSim {
            sim,
            http: wxpay_reconciler::wxpay::client::http_client_builder()
                .build()
                .unwrap(),
        }
    }

    pub fn url(&self) -> String {
        self.sim.base_url()
    }

    /// A client for this simulator with short timeouts.
    pub fn client(&self) -> WxPayClient {
        client_for(&self.url())
    }

    /// Calls the control API; returns the status and the JSON body.
    pub async fn control(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let url = format!("{}{path}", self.url());
        let req = match method {
            "GET" => self.http.get(url),
            "PUT" => self.http.put(url),
            _ => self.http.post(url),
        };
        let resp = req
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Registers an order at the simulator (as unifiedorder would).
    pub async fn create_order(&self, m: &Merchant, out_trade_no: &OutTradeNo, total_fee: i64) {
        let (status, body) = self
            .control(
                "POST",
                &format!("/_sim/orders/{}/{}", m.mch_id, out_trade_no),
                serde_json::json!({ "total_fee": total_fee }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }

    /// The customer pays (notification dropped); returns the transaction_id.
    pub async fn pay(&self, m: &Merchant, out_trade_no: &OutTradeNo, body: Value) -> String {
        let (status, body) = self
            .control(
                "POST",
                &format!("/_sim/orders/{}/{}/pay", m.mch_id, out_trade_no),
                body,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["transaction_id"].as_str().unwrap().to_owned()
    }

    pub async fn faults(&self, body: Value) {
        let (status, body) = self.control("PUT", "/_sim/faults", body).await;
        assert_eq!(status, 200, "{body}");
    }

    pub async fn stop(self) {
        self.sim.shutdown(Duration::from_secs(2)).await.unwrap();
    }
}

pub fn client_for(base_url: &str) -> WxPayClient {
    let mut cfg = ClientConfig::new(base_url);
    cfg.timeout = Duration::from_millis(1500);
    cfg.connect_timeout = Duration::from_millis(500);
    WxPayClient::new(cfg).unwrap()
}

/// An HTTP server on a free port that answers every POST with `body` (to replay fixtures and
/// odd replies through the real client).
pub async fn replay_server(status: u16, body: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
    use axum::http::StatusCode;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        async move { (StatusCode::from_u16(status).unwrap(), body) }
    });
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), task)
}

/// A port on which nothing listens.
pub async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

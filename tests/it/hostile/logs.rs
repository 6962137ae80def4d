//! Log amplification and log forging, against the real binary: whatever an unauthenticated
//! client posts to the notify endpoint, and whatever an unsigned reply from "WeChat" says, the
//! log stays small, each line is one line, and the precise reason is still there.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use wxpay_reconciler::notify::NOTIFY_PATH;
use wxpay_reconciler::store::NewOrder;
use wxpay_reconciler::wxpay::SignType;
use wxpay_reconciler::wxpay::{Fields, Merchant, sign, xml};

use crate::helpers::{HMAC_KEY, hmac_merchant, md5_merchant, merchant, unique_otn};
use crate::process::RealDaemon;

/// The real daemon (`run`, SQLite, both test merchants, the notify endpoint on), its stderr
/// collected byte for byte.
pub(super) struct RunningDaemon {
    daemon: RealDaemon,
    pub notify_url: String,
    pub metrics: SocketAddr,
    pub db: crate::db::TestDb,
    _dir: tempfile::TempDir,
}

impl RunningDaemon {
    /// Starts `run` against `wechat_url` and waits for its "reconciler running" line.
    pub async fn start(wechat_url: &str) -> RunningDaemon {
        let db = crate::db::sqlite().await;
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &db.url, wechat_url);
        let daemon = RealDaemon::start(&config, &[], None).await;
        let notify = daemon.notify.unwrap();
        RunningDaemon {
            notify_url: format!("http://{notify}{NOTIFY_PATH}"),
            metrics: daemon.metrics,
            daemon,
            db,
            _dir: dir,
        }
    }

    /// Everything logged so far.
    pub fn log(&self) -> Vec<u8> {
        self.daemon.log_bytes()
    }

    pub fn log_len(&self) -> usize {
        self.daemon.log.lock().unwrap().bytes.len()
    }

    /// Waits until the log has stopped growing for a moment (the reader thread caught up).
    pub async fn settle_log(&self) -> usize {
        let mut last = self.log_len();
        loop {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let now = self.log_len();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    pub async fn wait_for_log(&self, needle: &str, bound: Duration) {
        let started = Instant::now();
        while !String::from_utf8_lossy(&self.log()).contains(needle) {
            assert!(
                started.elapsed() < bound,
                "no {needle:?} in the log:\n{}",
                String::from_utf8_lossy(&self.log())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn metrics_text(&self) -> String {
        http()
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        let child = &mut self.daemon.child;
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(12) {
                let _ = child.kill();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.db.cleanup().await;
    }
}

/// The daemon tests' config, with `wechat_url` as the backup too, the default metrics refresh
/// and the notify endpoint on.
fn write_config(dir: &Path, db_url: &str, wechat_url: &str) -> std::path::PathBuf {
    let path = crate::daemon::write_config(dir, db_url, wechat_url);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            "connect_timeout_ms = 1000",
            &format!("backup_base_url = \"{wechat_url}\"\nconnect_timeout_ms = 1000"),
        )
        .replace("refresh_seconds = 1\n", "")
        + "\n[notify]\nlisten = \"127.0.0.1:0\"\n";
    std::fs::write(&path, text).unwrap();
    path
}

/// A payment notification for `m` (as `lifecycle::notification` builds it), signed with `key`
/// under `sign_type`.
pub(super) fn notification(m: &Merchant, key: &str, sign_type: SignType) -> Fields {
    let otn = unique_otn("log").to_string();
    let mut f = crate::lifecycle::notification(m, &otn, 100, "4200000000202611230000000001");
    f.remove("sign");
    f.remove("sign_type");
    let key = wxpay_reconciler::wxpay::ApiKey::parse(key).unwrap();
    sign::sign_in_place(&mut f, &key, sign_type);
    f
}

/// A notification of merchant 1234567890, which is not configured.
pub(super) fn stranger_notification() -> Fields {
    let stranger = merchant(
        "1234567890",
        "wxd930ea5d5a258f4f",
        SignType::Md5,
        "0123456789abcdef0123456789abcdef",
    );
    notification(&stranger, "0123456789abcdef0123456789abcdef", SignType::Md5)
}

/// A notification of the configured MD5 merchant, signed with another key.
pub(super) fn forged_notification() -> Fields {
    notification(
        &md5_merchant(),
        "0123456789abcdef0123456789abcdef",
        SignType::Md5,
    )
}

/// A client as the daemon builds them (TLS set up the one way).
pub(super) fn http() -> reqwest::Client {
    wxpay_reconciler::wxpay::client::http_client_builder()
        .build()
        .unwrap()
}

/// POSTs `body`; returns the HTTP status and the decoded answer.
pub(super) async fn post(
    http: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Fields) {
    crate::lifecycle::post_answer(http, url, body).await
}

/// Lines of `log` that are not the subscriber's own (each of which starts with a timestamp).
fn foreign_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| !l.starts_with("20") || !l.contains('T'))
        .collect()
}

/// 64 KiB bodies an unauthenticated client may post, each built to make a long error.
fn big_bodies() -> Vec<(&'static str, String)> {
    let n = 60_000;
    let quotes = "\"".repeat(n);
    let half = "\"".repeat(n / 2);
    let controls = "\u{85}\u{202e}".repeat(n / 6);
    vec![
        (
            "an element name of quotes",
            format!("<xml><{half}>1</{half}></xml>"),
        ),
        ("a root of quotes", format!("<{half}>1</{half}>")),
        (
            "an entity of 60,000 letters",
            format!("<xml><a>&{};</a></xml>", "x".repeat(n)),
        ),
        (
            "a mismatched end tag",
            format!("<xml><a>1</{}></xml>", "b".repeat(n)),
        ),
        (
            "a return_msg of controls",
            format!(
                "<xml><return_code>FAIL</return_code><return_msg>{controls}</return_msg></xml>"
            ),
        ),
        (
            "an mch_id of quotes",
            format!(
                "<xml><return_code>SUCCESS</return_code><mch_id><![CDATA[{quotes}]]></mch_id></xml>"
            ),
        ),
        (
            "a sign_type of quotes",
            format!(
                "<xml><return_code>SUCCESS</return_code><mch_id>10000100</mch_id><sign>x</sign><sign_type><![CDATA[{quotes}]]></sign_type></xml>"
            ),
        ),
        (
            "a root with attributes",
            format!("<xml {}=\"1\"></xml>", "a".repeat(n)),
        ),
    ]
}

#[tokio::test]
async fn refused_notifications_write_short_lines_at_a_bounded_rate() {
    let daemon = RunningDaemon::start(&crate::helpers::closed_port_url().await).await;
    let http = http();

    // Each 64 KiB body: a FAIL, and at most a couple of KB of log with the reason in it.
    for (what, body) in big_bodies() {
        assert!(body.len() <= 64 * 1024, "{what}: {}", body.len());
        let before = daemon.settle_log().await;
        let (status, answer) = post(&http, &daemon.notify_url, body).await;
        assert_eq!(
            (status, answer.get("return_code")),
            (200, Some("FAIL")),
            "{what}"
        );
        let after = daemon.settle_log().await;
        let written = String::from_utf8_lossy(&daemon.log()[before..]).into_owned();
        assert!(
            after - before < 2048,
            "{what}: {} bytes of log for one request:\n{}",
            after - before,
            &written[..written.len().min(600)]
        );
        assert!(
            written.contains("notification refused"),
            "{what}: the refusal is still logged: {written}"
        );
    }

    // A burst of refusals: the metric counts each, the log keeps a bounded number of lines.
    let before = daemon.settle_log().await;
    let bodies = [
        xml::encode(&stranger_notification()).unwrap(),
        xml::encode(&forged_notification()).unwrap(),
    ];
    let counted_before = refusals_counted(&daemon).await;
    let sent = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (http, url, bodies, sent) = (
            http.clone(),
            daemon.notify_url.clone(),
            bodies.clone(),
            sent.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let (_, answer) = post(&http, &url, bodies[(t + i) % 2].clone()).await;
                assert_eq!(answer.get("return_code"), Some("FAIL"));
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    daemon.settle_log().await;
    let log = daemon.log();
    let burst = String::from_utf8_lossy(&log[before..]).into_owned();
    let lines = burst
        .lines()
        .filter(|l| l.contains("notification refused"))
        .count();
    // Ten lines per outcome (two here) and second, the partial seconds at both ends included.
    let bound = 10 * 2 * (elapsed.as_secs() as usize + 2);
    assert!(
        lines <= bound,
        "{lines} refusal lines for 400 refusals in {elapsed:?} (at most {bound})"
    );
    assert!(lines >= 2, "both kinds are still logged:\n{burst}");
    assert_eq!(
        refusals_counted(&daemon).await - counted_before,
        sent.load(Ordering::Relaxed),
        "every refusal is counted"
    );

    // The next refusal after a quiet second is logged, precisely, with the count left out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = daemon.settle_log().await;
    post(
        &http,
        &daemon.notify_url,
        xml::encode(&stranger_notification()).unwrap(),
    )
    .await;
    daemon.settle_log().await;
    let line = String::from_utf8_lossy(&daemon.log()[before..]).into_owned();
    assert!(
        line.contains("1234567890") && line.contains("not configured"),
        "the precise reason is logged: {line}"
    );
    if lines < sent.load(Ordering::Relaxed) {
        assert!(
            line.contains("suppressed="),
            "the lines left out are counted: {line}"
        );
    }
    let all = String::from_utf8_lossy(&daemon.log()).into_owned();
    assert!(foreign_lines(&all).is_empty(), "{:?}", foreign_lines(&all));
    daemon.stop().await;
}

/// `notify_requests_total` of the outcomes `unknown_merchant` and `sign_invalid`.
async fn refusals_counted(daemon: &RunningDaemon) -> usize {
    let metrics = daemon.metrics_text().await;
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("wxpay_reconciler_notify_requests_total")
                && (l.contains("outcome=\"unknown_merchant\"")
                    || l.contains("outcome=\"sign_invalid\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

/// Answers every POST with the next of `bodies`, round and round.
async fn cycling_server(bodies: Vec<String>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().fallback(move || {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let body = bodies[i % bodies.len()].clone();
        async move { body }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

const FORGED: &str = "ERROR forged line";

#[tokio::test]
async fn newlines_and_terminal_controls_from_outside_never_forge_a_log_line() {
    let m = md5_merchant();
    // An unsigned FAIL (anyone on the path can send one), and a signed result_code FAIL with
    // an undocumented err_code and a description that try the same.
    let unsigned = format!(
        "<xml><return_code>FAIL</return_code><return_msg><![CDATA[busy\n{FORGED} 1\r\n{FORGED} 2\u{9b}31m\u{202e}]]></return_msg></xml>"
    );
    let mut signed = Fields::new()
        .with("return_code", "SUCCESS")
        .with("result_code", "FAIL")
        .with("err_code", format!("X\n{FORGED} 3"))
        .with("err_code_des", format!("\n{FORGED} 4\u{85}"))
        .with("appid", m.appid.as_str())
        .with("mch_id", m.mch_id.as_str())
        .with("nonce_str", "5K8264ILTKCH16CQ2502SI8ZNMTM67VS");
    sign::sign_in_place(&mut signed, m.v2_key(), SignType::Md5);
    let mut mismatch = Fields::new()
        .with("return_code", "SUCCESS")
        .with("result_code", "SUCCESS")
        .with("appid", format!("wx\n{FORGED} 5"))
        .with("mch_id", m.mch_id.as_str())
        .with("nonce_str", "5K8264ILTKCH16CQ2502SI8ZNMTM67VS");
    sign::sign_in_place(&mut mismatch, m.v2_key(), SignType::Md5);
    let wechat = cycling_server(vec![
        unsigned,
        xml::encode(&signed).unwrap(),
        xml::encode(&mismatch).unwrap(),
    ])
    .await;
    let daemon = RunningDaemon::start(&wechat).await;
    // One order per kind of reply: the first scan queries each once.
    for _ in 0..3 {
        daemon
            .db
            .store
            .insert_order(&NewOrder {
                mch_id: m.mch_id.as_str(),
                appid: m.appid.as_str(),
                out_trade_no: unique_otn("forge").as_str(),
                total_fee: 100,
            })
            .await
            .unwrap();
    }

    // Notifications that try the same on the notify endpoint.
    let http = http();
    let hmac = hmac_merchant();
    let mut bodies = vec![
        format!(
            "<xml><return_code>FAIL</return_code><return_msg><![CDATA[x\n{FORGED} 6\u{9b}2J]]></return_msg></xml>"
        ),
        format!(
            "<xml><return_code>SUCCESS</return_code><mch_id><![CDATA[1\n{FORGED} 7]]></mch_id></xml>"
        ),
        format!(
            "<xml><return_code>SUCCESS</return_code><mch_id>10000100</mch_id><sign>x</sign><sign_type><![CDATA[\n{FORGED}]]></sign_type></xml>"
        ),
        format!("<xml><return_code><![CDATA[\n{FORGED} 9]]></return_code></xml>"),
    ];
    let mut bad_time = notification(&hmac, HMAC_KEY, SignType::HmacSha256);
    bad_time.insert("time_end", format!("2026\n{FORGED} 10"));
    sign::sign_in_place(&mut bad_time, hmac.v2_key(), SignType::HmacSha256);
    bodies.push(xml::encode(&bad_time).unwrap());
    for body in bodies {
        let (_, answer) = post(&http, &daemon.notify_url, body).await;
        assert_eq!(answer.get("return_code"), Some("FAIL"));
        let msg = answer.get("return_msg").unwrap_or_default();
        assert!(!msg.contains(FORGED), "the answer echoes nothing: {msg}");
    }

    // The daemon queried the order with every kind of reply.
    for needle in [
        "WeChat refused the request",
        "WeChat answered result_code FAIL",
        "reply field appid",
    ] {
        daemon.wait_for_log(needle, Duration::from_secs(20)).await;
    }
    daemon.settle_log().await;
    let log = String::from_utf8_lossy(&daemon.log()).into_owned();
    let forged: Vec<&str> = log
        .lines()
        .filter(|l| l.trim_start().starts_with(FORGED) || l.starts_with('\r'))
        .collect();
    assert!(forged.is_empty(), "forged lines: {forged:?}\n{log}");
    assert!(
        foreign_lines(&log).is_empty(),
        "every line is the daemon's own: {:?}",
        foreign_lines(&log)
    );
    for c in ['\u{9b}', '\u{85}', '\u{202e}', '\r'] {
        assert!(!log.contains(c), "a raw {c:?} in the log");
    }
    // The precise reasons are there, escaped.
    for n in [1, 2, 3, 4, 5, 6, 7, 10] {
        assert!(
            log.contains(&format!("{FORGED} {n}")),
            "reason {n} is logged:\n{log}"
        );
    }
    assert!(
        log.contains("outcome=\"sign_invalid\""),
        "reason 8 is logged:\n{log}"
    );
    daemon.stop().await;
}

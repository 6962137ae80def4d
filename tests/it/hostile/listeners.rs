//! Slow and half-open clients on both listeners (issue 12, "Listeners"): the real binary, with
//! a file-descriptor limit below what the attack opens, keeps answering notifications, health
//! checks and settling orders by scan while hundreds of connections are held; and it closes a
//! connection that sends no request within the header timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wxpay_reconciler::domain::OrderState;
use wxpay_reconciler::notify::NOTIFY_PATH;

use crate::daemon::{wait_for, write_config};
use crate::engine::{Engine, metric_value};
use crate::helpers::md5_merchant;
use crate::lifecycle::{body, notification};
use crate::process::RealDaemon;

/// `fut`, or a failure naming `what` after `bound` (the old listeners never answer).
async fn within<T>(what: &str, bound: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(bound, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {bound:?}"))
}

/// A client that does not wait for ever.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let resp = client()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// A connection that never finishes its request: nothing at all, or the start of one.
async fn hold(addr: SocketAddr, partial: Option<&str>) -> TcpStream {
    // The old listeners stopped accepting at the descriptor limit: the backlog filled up.
    let mut conn = within(
        "a connection to the listener",
        Duration::from_secs(10),
        TcpStream::connect(addr),
    )
    .await
    .unwrap();
    if let Some(head) = partial {
        conn.write_all(head.as_bytes()).await.unwrap();
    }
    conn
}

/// Waits until the server closes `conn` (end of stream or reset); `Err` after `bound`.
async fn closed_by_server(conn: &mut TcpStream, bound: Duration) -> Result<(), ()> {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(bound, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| ())
}

/// Connections the attack opens on each listener: more than the daemon's file-descriptor limit
/// leaves room for, and more than each listener's default `max_connections`.
const HELD: usize = 500;
/// The daemon's `RLIMIT_NOFILE` in this test (the unit sets 65536; the caps are 64 + 256).
const MAX_FDS: u64 = 700;
/// The default `header_timeout_seconds` of both listeners.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_half_open_connections_stop_neither_notifications_nor_scans_nor_health() {
    let db = crate::db::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::new(db).await;
    let config = write_config(dir.path(), &e.db.url, &e.sim.url());
    let mut daemon = RealDaemon::start(
        &config,
        &[("WXPAY_RECONCILER__NOTIFY__LISTEN", "127.0.0.1:0")],
        Some(MAX_FDS),
    )
    .await;
    let (metrics, notify) = (daemon.metrics, daemon.notify.unwrap());
    let m = md5_merchant();
    // Paid, its notification comes from the test below; unpaid at the simulator until then.
    let notified = e.order(&m, 990).await;
    // Paid with its notification lost: only a scan can settle it.
    let lost = e.order(&m, 120).await;
    assert_eq!(get(metrics, "/healthz").await.0, 200);

    // The attack: half-open connections, silent or stuck in their headers, on both listeners.
    let opened = Instant::now();
    let mut held = Vec::with_capacity(2 * HELD);
    for i in 0..HELD {
        let partial = |head: &'static str| (i % 2 == 1).then_some(head);
        held.push(hold(metrics, partial("GET /healthz HTTP/1.1\r\nHost: x\r\n")).await);
        held.push(
            hold(
                notify,
                partial("POST /wxpay/v2/notify HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n"),
            )
            .await,
        );
    }

    // While they are held: health answers.
    let (status, _) = within("/healthz under attack", Duration::from_secs(15), async {
        get(metrics, "/healthz").await
    })
    .await;
    assert_eq!(status, 200);
    within("/readyz under attack", Duration::from_secs(15), async {
        wait_for("/readyz", Duration::from_secs(10), async || {
            get(metrics, "/readyz").await.0 == 200
        })
        .await
    })
    .await;
    // A real signed notification is acknowledged and settles its order.
    let paid = notification(&m, &notified, 990, "4200000001202612011234567890");
    let url = format!("http://{notify}{NOTIFY_PATH}");
    let answer = within(
        "a notification under attack",
        Duration::from_secs(15),
        async {
            let resp = client()
                .post(&url)
                .header("content-type", "text/xml")
                .body(body(&paid))
                .send()
                .await
                .unwrap_or_else(|e| panic!("notification: {e}"));
            (resp.status().as_u16(), resp.text().await.unwrap())
        },
    )
    .await;
    assert_eq!(answer.0, 200, "{answer:?}");
    assert!(answer.1.contains("SUCCESS"), "{answer:?}");
    let row = e.row(&notified).await;
    assert_eq!(row.state, OrderState::Success);
    assert_eq!(e.events(&notified).await[0].source.as_str(), "notify");
    // A lost notification is still found by a scan (orderquery needs descriptors too).
    e.pay(&m, &lost, json!({"notify": "drop"})).await;
    wait_for(
        "a scan to settle the lost notification's order",
        Duration::from_secs(20),
        async || e.row(&lost).await.state == OrderState::Success,
    )
    .await;
    assert_eq!(e.events(&lost).await[0].source.as_str(), "poll");
    // The connections beyond each cap were closed, and counted.
    let (_, text) = get(metrics, "/metrics").await;
    for listener in ["metrics", "notify"] {
        let refused = metric_value(
            &text,
            &format!(
                "wxpay_reconciler_listener_refused_connections_total{{listener=\"{listener}\"}}"
            ),
        );
        assert!(refused >= 100.0, "{listener}: {refused} refused\n{text}");
    }

    // Every held connection is closed by the server: beyond the cap at once, the others when
    // their header timeout passes.
    let deadline = opened + HEADER_TIMEOUT + Duration::from_secs(8);
    let mut open = 0;
    for conn in &mut held {
        let left = deadline.saturating_duration_since(Instant::now());
        if closed_by_server(conn, left).await.is_err() {
            open += 1;
        }
    }
    assert_eq!(open, 0, "connections still open after the header timeout");
    drop(held);

    // One fresh connection of each kind: not cut at once, closed after the header timeout. A
    // keep-alive connection idle after its answer counts as one waiting for headers.
    let fresh = Instant::now();
    let mut silent = hold(notify, None).await;
    let mut partial = hold(metrics, Some("GET /metrics HTTP/1.1\r\n")).await;
    let mut idle = hold(metrics, Some("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).await;
    let mut answer = [0u8; 1024];
    let n = within(
        "/healthz on a raw connection",
        Duration::from_secs(5),
        async { idle.read(&mut answer).await.unwrap() },
    )
    .await;
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    let mut fresh_conns = [
        ("silent", &mut silent),
        ("partial", &mut partial),
        ("idle keep-alive", &mut idle),
    ];
    tokio::time::sleep_until((fresh + Duration::from_secs(3)).into()).await;
    for (what, conn) in &mut fresh_conns {
        assert!(
            closed_by_server(conn, Duration::from_millis(10))
                .await
                .is_err(),
            "{what}: closed before its header timeout"
        );
    }
    for (what, conn) in &mut fresh_conns {
        let left = (fresh + HEADER_TIMEOUT + Duration::from_secs(4))
            .saturating_duration_since(Instant::now());
        assert!(
            closed_by_server(conn, left).await.is_ok(),
            "{what}: still open {:?} after it was opened",
            fresh.elapsed()
        );
    }
    assert!(fresh.elapsed() >= HEADER_TIMEOUT - Duration::from_millis(500));

    let status = daemon.terminate().await;
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(log.contains("connection limit reached"), "{log}");
    drop(daemon);
    e.finish().await;
}

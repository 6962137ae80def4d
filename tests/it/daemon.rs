//! The daemon as an operator runs it: the real binary with a config file, its commands, its
//! HTTP endpoints, signals, and a database outage in the middle of a run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wxpay_reconciler::daemon::Daemon;
use wxpay_reconciler::domain::OrderState;

use crate::db::{Kind, backends};
use crate::engine::{Engine, metric_value};
use crate::helpers::{TestSim, md5_merchant};
use crate::process::{self, Ran, RealDaemon, signal, wait_exit};

/// Writes a config for `db_url` and `sim_url` (the default simulator merchants, keys in files).
pub(crate) fn write_config(dir: &Path, db_url: &str, sim_url: &str) -> PathBuf {
    std::fs::write(dir.join("md5.key"), crate::helpers::MD5_KEY).unwrap();
    std::fs::write(dir.join("hmac.key"), crate::helpers::HMAC_KEY).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[database]
url = "{db_url}"

[wechat]
base_url = "{sim_url}"
timeout_ms = 2000
connect_timeout_ms = 1000

[[merchants]]
mch_id = "10000100"
appid = "wxd930ea5d5a258f4f"
sign_type = "MD5"
api_key_file = "md5.key"

[[merchants]]
mch_id = "1900000109"
appid = "wx2421b1c4370ec43b"
sign_type = "HMAC-SHA256"
api_key_file = "hmac.key"

[schedule]
scan_cron = "* * * * * *"
grace_seconds = 0

[metrics]
listen = "127.0.0.1:0"
refresh_seconds = 1
"#
        ),
    )
    .unwrap();
    path
}

/// Runs a command to completion without blocking the test's runtime (the simulator lives there).
async fn run_cmd(config: &Path, args: &[&str]) -> (bool, String, String) {
    let mut command = process::command(Some(config));
    command.args(args).env("RUST_LOG", "warn");
    let ran = Ran::of_async(command).await;
    (ran.success(), ran.stdout, ran.stderr)
}

/// Starts `run`, waits for its "reconciler running" line; the rest of its stderr is collected.
async fn spawn_run(config: &Path) -> RealDaemon {
    spawn_run_logging(config, Some("info")).await
}

/// [`spawn_run`] with `RUST_LOG` set to `rust_log`, or unset (the config's `[log] level` rules).
async fn spawn_run_logging(config: &Path, rust_log: Option<&str>) -> RealDaemon {
    let mut command = process::command(Some(config));
    match rust_log {
        Some(level) => command.env("RUST_LOG", level),
        None => command.env_remove("RUST_LOG"),
    };
    RealDaemon::spawn(command).await
}

pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = wxpay_reconciler::wxpay::client::http_client_builder()
        .build()
        .unwrap();
    let resp = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

pub(crate) async fn wait_for(what: &str, bound: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < bound, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn run_settles_serves_metrics_and_drains_on_sigterm() {
    for db in backends().await {
        let kind = db.kind;
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::new(db).await;
        let config = write_config(dir.path(), &e.db.url, &e.sim.url());
        let m = md5_merchant();
        let paid = e.order(&m, 990).await;
        e.pay(&m, &paid, json!({"notify": "drop"})).await;
        let unpaid = e.order(&m, 10).await;

        let mut daemon = spawn_run(&config).await;
        let addr = daemon.metrics;
        wait_for(
            "the paid order to settle",
            Duration::from_secs(15),
            async || e.row(&paid).await.state == OrderState::Success,
        )
        .await;
        assert_eq!(e.row(&unpaid).await.state, OrderState::NotPay);

        assert_eq!(get(addr, "/healthz").await.0, 200);
        wait_for("/readyz", Duration::from_secs(5), async || {
            get(addr, "/readyz").await.0 == 200
        })
        .await;
        let (status, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        for name in [
            "wxpay_reconciler_stuck_orders{mch_id=\"10000100\"}",
            "wxpay_reconciler_oldest_unpaid_age_seconds{mch_id=\"1900000109\"}",
            "wxpay_reconciler_orderquery_requests_total{mch_id=\"10000100\",outcome=\"ok\"}",
            "wxpay_reconciler_orderquery_duration_seconds_bucket",
            "wxpay_reconciler_trade_state_total{mch_id=\"10000100\",trade_state=\"SUCCESS\"}",
            "wxpay_reconciler_transitions_total{from=\"NOTPAY\",to=\"SUCCESS\",source=\"poll\"}",
            "wxpay_reconciler_scan_duration_seconds_bucket",
            "wxpay_reconciler_scan_claimed_orders_bucket",
            "wxpay_reconciler_scan_overlap_skipped_total",
            "wxpay_reconciler_last_scan_success_timestamp_seconds",
            "wxpay_reconciler_db_errors_total{op=\"claim\"}",
            "wxpay_reconciler_amount_mismatch_total{mch_id=\"10000100\"}",
            "wxpay_reconciler_build_info{version=",
        ] {
            assert!(
                text.contains(name),
                "{kind:?}: /metrics lacks {name}:\n{text}"
            );
        }
        assert!(
            metric_value(
                &text,
                "wxpay_reconciler_last_scan_success_timestamp_seconds"
            ) > 1.7e9
        );
        assert!(
            !text.contains(crate::helpers::MD5_KEY) && !text.contains(&paid),
            "no secrets or order ids in metrics"
        );

        let started = Instant::now();
        signal(daemon.child.id(), "TERM");
        let status = wait_exit(&mut daemon.child, Duration::from_secs(12));
        assert!(
            status.success(),
            "{kind:?}: {status:?}\n{}",
            daemon.log_text()
        );
        assert!(started.elapsed() < Duration::from_secs(11));
        let log = daemon.log_text();
        assert!(log.contains("reconciler stopped"), "{log}");
        assert!(
            !log.contains(" ERROR "),
            "a clean run and stop logs no error:\n{log}"
        );
        assert!(
            !log.contains(crate::helpers::MD5_KEY) && !log.contains(crate::helpers::HMAC_KEY),
            "no key in logs"
        );
        e.finish().await;
    }
}

#[tokio::test]
async fn run_refuses_a_database_whose_schema_is_behind() {
    let sim = TestSim::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("orders.db");
    let config = write_config(
        dir.path(),
        &format!("sqlite://{}", db_path.display()),
        &sim.url(),
    );

    let (ok, _, err) = run_cmd(&config, &["run"]).await;
    assert!(!ok);
    assert!(
        err.contains("does not exist") && err.contains("wxpay-reconciler migrate"),
        "{err}"
    );

    // An existing but empty database.
    std::fs::File::create(&db_path).unwrap();
    let (ok, _, err) = run_cmd(&config, &["run"]).await;
    assert!(!ok);
    assert!(
        err.contains("schema is behind") && err.contains("wxpay-reconciler migrate"),
        "{err}"
    );
    let (ok, _, err) = run_cmd(&config, &["check-config"]).await;
    assert!(!ok, "{err}");

    let (ok, out, err) = run_cmd(&config, &["migrate"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("up to date"), "{out}");
    let (ok, out, err) = run_cmd(&config, &["check-config"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("schema up to date") && out.contains("10000100 (wxd930ea5d5a258f4f, MD5)"),
        "{out}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn migrate_creates_a_missing_sqlite_file_and_is_idempotent() {
    let sim = TestSim::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("sub-dir-free.db");
    let config = write_config(
        dir.path(),
        &format!("sqlite://{}", db_path.display()),
        &sim.url(),
    );
    for _ in 0..2 {
        let (ok, _, err) = run_cmd(&config, &["migrate"]).await;
        assert!(ok, "{err}");
    }
    assert!(db_path.exists());
    sim.stop().await;
}

#[tokio::test]
async fn status_and_query_tell_on_call_what_is_going_on() {
    for db in backends().await {
        let kind = db.kind;
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::new(db).await;
        let config = write_config(dir.path(), &e.db.url, &e.sim.url());
        let m = md5_merchant();
        let open = e.order(&m, 120).await;
        let paid = e.order(&m, 4500).await;
        e.pay(&m, &paid, json!({"notify": "drop"})).await;

        let (ok, out, err) = run_cmd(&config, &["status"]).await;
        assert!(ok, "{kind:?}: {err}");
        assert!(
            out.contains("Orders by state") && out.contains("NOTPAY"),
            "{out}"
        );
        assert!(
            out.contains(&open) && out.contains(&paid),
            "both open orders listed:\n{out}"
        );
        let (ok, out, _) = run_cmd(&config, &["status", "--json"]).await;
        assert!(ok);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["states"]["NOTPAY"], 2, "{v}");
        assert_eq!(v["open_by_merchant"][0]["mch_id"], "10000100");

        let (ok, out, err) = run_cmd(&config, &["query", &paid]).await;
        assert!(ok, "{kind:?}: {err}");
        assert!(
            out.contains("trade_state SUCCESS") && out.contains("total_fee 4500"),
            "{out}"
        );
        assert_eq!(
            e.row(&paid).await.state,
            OrderState::NotPay,
            "query alone changes nothing"
        );

        let (ok, out, err) = run_cmd(&config, &["query", &paid, "--apply"]).await;
        assert!(ok, "{kind:?}: {err}");
        assert!(
            out.contains("NOTPAY -> SUCCESS recorded (source manual)"),
            "{out}"
        );
        let events = e.events(&paid).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].source.as_str(), "manual");
        let (ok, out, _) = run_cmd(&config, &["query", &paid, "--apply"]).await;
        assert!(ok);
        assert!(out.contains("no change (order is already SUCCESS"), "{out}");
        assert_eq!(e.events(&paid).await.len(), 1, "nothing recorded twice");

        let (ok, out, _) = run_cmd(&config, &["query", &open, "--apply"]).await;
        assert!(ok);
        assert!(
            out.contains("NOTPAY") && out.contains("no transition"),
            "{out}"
        );
        let (ok, _, err) = run_cmd(&config, &["query", "nosuchorder1"]).await;
        assert!(!ok && err.contains("--mch-id"), "{err}");
        e.finish().await;
    }
}

/// A TCP forwarder that can be cut and restored: a database outage for one daemon only.
struct Outage {
    addr: SocketAddr,
    target: SocketAddr,
    stop: CancellationToken,
}

impl Outage {
    async fn start(target: SocketAddr) -> Outage {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(forward(listener, target, stop.clone()));
        Outage { addr, target, stop }
    }

    /// Drops every connection and refuses new ones.
    fn cut(&mut self) {
        self.stop.cancel();
    }

    async fn restore(&mut self) {
        self.stop = CancellationToken::new();
        let listener = TcpListener::bind(self.addr).await.unwrap();
        tokio::spawn(forward(listener, self.target, self.stop.clone()));
    }
}

async fn forward(listener: TcpListener, target: SocketAddr, stop: CancellationToken) {
    loop {
        let (mut inbound, _) = tokio::select! {
            accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
            _ = stop.cancelled() => return,
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

#[tokio::test]
async fn a_database_outage_mid_run_is_survived_and_caught_up() {
    let Some(db) = crate::db::postgres_only().await else {
        eprintln!("skipped: PostgreSQL not configured (SQLite is a local file, it has no outage)");
        return;
    };
    assert_eq!(db.kind, Kind::Postgres);
    let mut outage = Outage::start("127.0.0.1:5432".parse().unwrap()).await;
    let proxied = db.url.replace("127.0.0.1:5432", &outage.addr.to_string());
    assert_ne!(proxied, db.url, "the test URL must name 127.0.0.1:5432");
    let e = Engine::new(db).await;
    let mut settings = crate::engine::settings(&proxied, &e.sim.url());
    settings.database.max_connections = 2;
    settings.metrics.ready_max_scan_age_seconds = 3;
    let stop = CancellationToken::new();
    let daemon = Daemon::start(&settings, stop.clone()).await.unwrap();
    let addr = daemon.metrics_addr;
    let telemetry = daemon.telemetry.clone();
    let running = tokio::spawn(daemon.wait());

    let m = md5_merchant();
    let before = e.order(&m, 10).await;
    e.pay(&m, &before, json!({"notify": "drop"})).await;
    wait_for(
        "settling before the outage",
        Duration::from_secs(10),
        async || e.row(&before).await.state == OrderState::Success,
    )
    .await;

    outage.cut();
    let during = e.order(&m, 20).await;
    e.pay(&m, &during, json!({"notify": "drop"})).await;
    wait_for(
        "db errors to be counted",
        Duration::from_secs(15),
        async || {
            metric_value(
                &telemetry.render(),
                "wxpay_reconciler_db_errors_total{op=\"claim\"}",
            ) >= 1.0
        },
    )
    .await;
    wait_for("/readyz to fail", Duration::from_secs(10), async || {
        get(addr, "/readyz").await.0 == 503
    })
    .await;
    assert_eq!(
        get(addr, "/healthz").await.0,
        200,
        "alive through the outage"
    );
    assert_eq!(e.row(&during).await.state, OrderState::NotPay);

    outage.restore().await;
    wait_for(
        "catching up after the outage",
        Duration::from_secs(20),
        async || e.row(&during).await.state == OrderState::Success,
    )
    .await;
    wait_for("/readyz to recover", Duration::from_secs(10), async || {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(e.events(&during).await.len(), 1);
    stop.cancel();
    running.await.unwrap().unwrap();
    e.finish().await;
}

/// What the real binary told systemd through `$NOTIFY_SOCKET`, each with when it arrived.
pub(crate) struct SystemdListener {
    received: Arc<Mutex<Vec<(Instant, String)>>>,
    done: Arc<std::sync::atomic::AtomicBool>,
    reader: std::thread::JoinHandle<()>,
    pub(crate) path: PathBuf,
}

impl SystemdListener {
    pub(crate) fn bind(dir: &Path) -> SystemdListener {
        use std::os::unix::net::UnixDatagram;
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (received, done) = (received.clone(), done.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                        received.lock().unwrap().push((Instant::now(), message));
                    }
                }
            })
        };
        SystemdListener {
            received,
            done,
            reader,
            path,
        }
    }

    pub(crate) fn has(&self, what: &str) -> bool {
        self.received
            .lock()
            .unwrap()
            .iter()
            .any(|(_, m)| m.contains(what))
    }

    /// When each message containing `what` arrived.
    pub(crate) fn times_of(&self, what: &str) -> Vec<Instant> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.contains(what))
            .map(|(t, _)| *t)
            .collect()
    }

    /// The longest time between two WATCHDOG=1 in `[from, to]` (the window's edges count).
    fn longest_watchdog_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut times: Vec<Instant> = self
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, m)| m.contains("WATCHDOG=1") && *t >= from && *t <= to)
            .map(|(t, _)| *t)
            .collect();
        times.insert(0, from);
        times.push(to);
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap()
    }

    pub(crate) fn stop(self) {
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
        self.reader.join().unwrap();
    }
}

/// The real binary under a `Type=notify` service with `WatchdogSec=1.5`: READY=1, then
/// WATCHDOG=1 at least every 1.5 s, STOPPING=1 on SIGTERM and exit 0.
async fn run_under_systemd_watchdog(
    e: &Engine,
    env: &[(&str, &str)],
    busy: impl AsyncFn() -> bool,
) -> (Duration, std::process::ExitStatus) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &e.db.url, &e.sim.url());
    let systemd = SystemdListener::bind(dir.path());
    let mut child = tokio::process::Command::from(process::command(Some(&config)))
        .arg("run")
        .env("NOTIFY_SOCKET", &systemd.path)
        .env("WATCHDOG_USEC", "1500000")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .spawn()
        .unwrap();
    wait_for("READY=1", Duration::from_secs(10), async || {
        systemd.has("READY=1")
    })
    .await;
    wait_for(
        "the daemon to be in the state under test",
        Duration::from_secs(10),
        busy,
    )
    .await;
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let gap = systemd.longest_watchdog_gap(from, Instant::now());
    signal(child.id().unwrap(), "TERM");
    let status = tokio::time::timeout(Duration::from_secs(12), child.wait())
        .await
        .unwrap()
        .unwrap();
    wait_for("STOPPING=1", Duration::from_secs(2), async || {
        systemd.has("STOPPING=1")
    })
    .await;
    systemd.stop();
    (gap, status)
}

#[tokio::test]
async fn under_systemd_the_watchdog_is_fed_through_a_long_scan() {
    let db = crate::db::sqlite().await;
    let e = Engine::new(db).await;
    let m = md5_merchant();
    for _ in 0..30 {
        e.order(&m, 100).await;
    }
    // One query at a time, 1.2 s each: one scan of the 30 orders lasts 36 s, and no order
    // finishes within the watchdog's 1.5 s more than once.
    e.sim
        .faults(json!({"endpoint": "orderquery", "latency_ms": 1200}))
        .await;
    let (gap, status) = run_under_systemd_watchdog(
        &e,
        &[("WXPAY_RECONCILER__WECHAT__CONCURRENCY", "1")],
        async || e.sim.sim.state.requests() >= 2,
    )
    .await;
    assert!(status.success(), "{status}");
    assert!(
        gap < Duration::from_millis(1500),
        "WATCHDOG=1 gap of {gap:?} in a scan"
    );
    e.finish().await;
}

#[tokio::test]
async fn under_systemd_the_watchdog_is_fed_between_rare_scans() {
    let db = crate::db::sqlite().await;
    let e = Engine::new(db).await;
    // One scan a year: the loop waits for its tick all along.
    let (gap, status) = run_under_systemd_watchdog(
        &e,
        &[("WXPAY_RECONCILER__SCHEDULE__SCAN_CRON", "0 0 0 1 1 *")],
        async || true,
    )
    .await;
    assert!(status.success(), "{status}");
    assert!(
        gap < Duration::from_millis(1500),
        "WATCHDOG=1 gap of {gap:?} while idle"
    );
    e.finish().await;
}

#[tokio::test]
async fn overlapping_ticks_are_skipped_and_counted_and_the_gauges_show_stuck_orders() {
    let db = crate::db::sqlite().await;
    let e = Engine::new(db).await;
    let m = md5_merchant();
    let old = e.order(&m, 10).await;
    e.db.exec(
        "UPDATE wxpay_orders SET created_at = datetime('now', '-1 hour') WHERE out_trade_no = $1",
        &[&old],
    )
    .await;
    // A scan that outlives several one-second ticks.
    e.sim
        .faults(json!({"endpoint": "orderquery", "latency_ms": 2500}))
        .await;
    let stop = CancellationToken::new();
    let daemon = Daemon::start(&e.settings, stop.clone()).await.unwrap();
    let t = daemon.telemetry.clone();
    let running = tokio::spawn(daemon.wait());
    let metric = |name: &str| metric_value(&t.render(), name);
    wait_for("a skipped tick", Duration::from_secs(10), async || {
        metric("wxpay_reconciler_scan_overlap_skipped_total") >= 1.0
    })
    .await;
    wait_for("the stuck gauge", Duration::from_secs(5), async || {
        metric("wxpay_reconciler_stuck_orders{mch_id=\"10000100\"}") == 1.0
    })
    .await;
    assert!(metric("wxpay_reconciler_oldest_unpaid_age_seconds{mch_id=\"10000100\"}") >= 3599.0);
    assert_eq!(
        metric("wxpay_reconciler_open_orders{mch_id=\"10000100\"}"),
        1.0
    );
    assert_eq!(
        metric("wxpay_reconciler_stuck_orders{mch_id=\"1900000109\"}"),
        0.0
    );
    // The SQLite scan never ran twice at once: the simulator saw one query at a time.
    assert_eq!(e.sim.sim.state.order_stats(&old).max_inflight, 1);
    stop.cancel();
    running.await.unwrap().unwrap();
    e.finish().await;
}

#[tokio::test]
async fn a_second_daemon_on_the_same_sqlite_file_refuses_to_start() {
    let db = crate::db::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::new(db).await;
    let config = write_config(dir.path(), &e.db.url, &e.sim.url());
    let mut first = spawn_run(&config).await;
    let (ok, _, err) = run_cmd(&config, &["run"]).await;
    assert!(!ok);
    assert!(
        err.contains("another wxpay-reconciler is running on SQLite database")
            && err.contains(".lock"),
        "{err}"
    );
    signal(first.child.id(), "TERM");
    assert!(wait_exit(&mut first.child, Duration::from_secs(12)).success());
    // Once the first is gone, the lock is free again.
    let mut second = spawn_run(&config).await;
    signal(second.child.id(), "TERM");
    assert!(wait_exit(&mut second.child, Duration::from_secs(12)).success());
    e.finish().await;
}

/// A config for several short-lease instances: 1 s WeChat timeout, 7 s leases.
fn write_short_lease_config(dir: &Path, db_url: &str, sim_url: &str) -> PathBuf {
    let path = write_config(dir, db_url, sim_url);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("timeout_ms = 2000", "timeout_ms = 1000")
        .replace("connect_timeout_ms = 1000", "connect_timeout_ms = 500")
        .replace(
            "grace_seconds = 0",
            "grace_seconds = 0\nlease_seconds = 7\nbatch_size = 20",
        );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn a_daemon_paused_past_its_lease_finds_its_late_write_refused() {
    for db in crate::db::server_backends().await {
        let kind = db.kind;
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::new(db).await;
        let config = write_short_lease_config(dir.path(), &e.db.url, &e.sim.url());
        let m = md5_merchant();
        let mut orders = Vec::new();
        for _ in 0..3 {
            let otn = e.order(&m, 77).await;
            e.pay(&m, &otn, json!({"notify": "drop"})).await;
            orders.push(otn);
        }
        e.sim
            .faults(json!({"endpoint": "orderquery", "latency_ms": 600}))
            .await;
        let mut a = spawn_run(&config).await;
        let a_metrics = a.metrics;
        wait_for(
            "A's queries in flight",
            Duration::from_secs(10),
            async || e.sim.sim.state.total_inflight() >= orders.len() as u64,
        )
        .await;
        signal(a.child.id(), "STOP");
        e.sim.faults(json!({"endpoint": "orderquery"})).await;

        // B takes over once A's leases pass, and settles everything.
        let mut b = spawn_run(&config).await;
        for otn in &orders {
            wait_for("B to settle", Duration::from_secs(30), async || {
                e.row(otn).await.state == OrderState::Success
            })
            .await;
        }
        // A wakes up and writes what it learned before its pause: refused by the lease.
        signal(a.child.id(), "CONT");
        wait_for("A's refused write", Duration::from_secs(15), async || {
            metric_value(
                &get(a_metrics, "/metrics").await.1,
                "wxpay_reconciler_noop_total{source=\"poll\"}",
            ) >= 1.0
        })
        .await;
        let a_text = get(a_metrics, "/metrics").await.1;
        assert_eq!(
            metric_value(
                &a_text,
                "wxpay_reconciler_transitions_total{from=\"NOTPAY\",to=\"SUCCESS\",source=\"poll\"}"
            ),
            0.0,
            "{kind:?}: A settled nothing"
        );
        for otn in &orders {
            assert_eq!(
                e.events(otn).await.len(),
                1,
                "{kind:?}: {otn} recorded once"
            );
        }
        for daemon in [&a, &b] {
            signal(daemon.child.id(), "TERM");
        }
        assert!(wait_exit(&mut a.child, Duration::from_secs(12)).success());
        assert!(wait_exit(&mut b.child, Duration::from_secs(12)).success());
        e.finish().await;
    }
}

#[tokio::test]
async fn three_daemons_share_one_database_and_survive_a_sigkill() {
    for db in crate::db::server_backends().await {
        let kind = db.kind;
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::new(db).await;
        let config = write_short_lease_config(dir.path(), &e.db.url, &e.sim.url());
        let m = md5_merchant();
        let mut orders = Vec::new();
        for _ in 0..60 {
            let otn = e.order(&m, 5).await;
            e.pay(&m, &otn, json!({"notify": "drop"})).await;
            orders.push(otn);
        }
        e.sim
            .faults(json!({"endpoint": "orderquery", "latency_ms": 200}))
            .await;
        let mut daemons: Vec<RealDaemon> = Vec::new();
        for _ in 0..3 {
            daemons.push(spawn_run(&config).await);
        }
        wait_for("queries in flight", Duration::from_secs(10), async || {
            e.sim.sim.state.total_inflight() >= 1
        })
        .await;
        // One instance dies mid-scan, without a chance to clean up.
        signal(daemons[0].child.id(), "KILL");
        daemons[0].child.wait().unwrap();
        for otn in &orders {
            wait_for(
                "every order to settle",
                Duration::from_secs(40),
                async || e.row(otn).await.state == OrderState::Success,
            )
            .await;
        }
        for otn in &orders {
            let s = e.sim.sim.state.order_stats(otn);
            assert_eq!(
                s.max_inflight, 1,
                "{kind:?} {otn}: never queried by two instances at once"
            );
            assert!(
                s.queries <= 2,
                "{kind:?} {otn}: queried {} times",
                s.queries
            );
            assert_eq!(e.events(otn).await.len(), 1, "{kind:?} {otn}: settled once");
        }
        for d in daemons.iter_mut().skip(1) {
            signal(d.child.id(), "TERM");
            assert!(wait_exit(&mut d.child, Duration::from_secs(12)).success());
        }
        e.finish().await;
    }
}

#[tokio::test]
async fn sighup_reloads_what_is_safe_and_keeps_running_on_a_bad_file() {
    let db = crate::db::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let sim = TestSim::start().await;
    let config = write_config(dir.path(), &db.url, &sim.url());
    let original = std::fs::read_to_string(&config).unwrap();
    let mut daemon = spawn_run_logging(&config, None).await;
    let addr = daemon.metrics;
    let log = || daemon.log_text();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !log().contains("scan finished"),
        "info level at start:\n{}",
        log()
    );

    // Debug logs, another QPS cap and scan schedule: applied. Another metrics refresh: needs a
    // restart, and the warning says which section.
    std::fs::write(
        &config,
        original
            .replace("refresh_seconds = 1", "refresh_seconds = 2")
            .replace(
                "scan_cron = \"* * * * * *\"",
                "scan_cron = \"*/2 * * * * *\"",
            )
            .replace(
                "connect_timeout_ms = 1000",
                "connect_timeout_ms = 1000\nmax_qps = 7",
            )
            + "\n[log]\nlevel = \"debug\"\n",
    )
    .unwrap();
    signal(daemon.child.id(), "HUP");
    wait_for("the reload", Duration::from_secs(10), async || {
        log().contains("configuration reloaded")
    })
    .await;
    wait_for("debug lines", Duration::from_secs(10), async || {
        log().contains("scan finished")
    })
    .await;
    let text = log();
    assert!(
        text.lines()
            .any(|l| l.contains("need a restart") && l.contains("metrics")),
        "{text}"
    );
    assert!(text.contains("max_qps=7"), "{text}");
    let (_, metrics) = get(addr, "/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            "wxpay_reconciler_config_reloads_total{outcome=\"ok\"}"
        ),
        1.0,
        "{metrics}"
    );

    // A broken file: refused, counted, the daemon keeps its settings and keeps scanning.
    std::fs::write(&config, original.replace("* * * * * *", "every second")).unwrap();
    signal(daemon.child.id(), "HUP");
    wait_for("the refused reload", Duration::from_secs(10), async || {
        let (_, m) = get(addr, "/metrics").await;
        metric_value(
            &m,
            "wxpay_reconciler_config_reloads_total{outcome=\"error\"}",
        ) == 1.0
    })
    .await;
    assert!(
        log().contains("scan_cron"),
        "the error names the key:\n{}",
        log()
    );
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let before = log().matches("scan finished").count();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        log().matches("scan finished").count() > before,
        "still scanning"
    );

    signal(daemon.child.id(), "TERM");
    assert!(wait_exit(&mut daemon.child, Duration::from_secs(15)).success());
    sim.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn the_api_key_can_come_from_a_systemd_credential() {
    let db = crate::db::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let sim = TestSim::start().await;
    let config = write_config(dir.path(), &db.url, &sim.url());
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "api_key_file = \"md5.key\"",
        "api_key_credential = \"md5_key\"",
    );
    std::fs::write(&config, text).unwrap();
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(
        creds.path().join("md5_key"),
        format!("{}\n", crate::helpers::MD5_KEY),
    )
    .unwrap();
    let check = |creds: Option<&Path>| {
        let mut c = tokio::process::Command::from(process::command(Some(&config)));
        c.arg("check-config");
        match creds {
            Some(dir) => c.env("CREDENTIALS_DIRECTORY", dir),
            None => c.env_remove("CREDENTIALS_DIRECTORY"),
        };
        c.output()
    };
    let out = check(Some(creds.path())).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check(None).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("merchants[0].api_key_credential") && err.contains("CREDENTIALS_DIRECTORY"),
        "{err}"
    );
    assert!(!err.contains(crate::helpers::MD5_KEY));
    sim.stop().await;
    db.cleanup().await;
}

//! A task of the daemon that stops while it runs (issue 12, "Supervise the daemon's own
//! tasks"): logged at that moment, `/readyz` fails at once, the systemd watchdog pings stop on
//! purpose, and `run` exits non-zero by itself so that systemd restarts it.
//!
//! The daemon has no real way to lose a task (the one there was, a row decoder's panic, is
//! fixed), so the tests use the narrow hook `Daemon::task_hooks` (in the binary: debug builds,
//! `WXPAY_RECONCILER_TEST_FAIL_TASK=TASK:end|panic`, then SIGUSR1).

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use wxpay_reconciler::daemon::{Daemon, DaemonError, TaskFailure};

use crate::daemon::{SystemdListener, get, wait_for, write_config};
use crate::engine::Engine;
use crate::helpers::md5_merchant;
use crate::process::{RealDaemon, signal};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_task_that_ends_fails_readyz_stops_the_watchdog_and_exits_non_zero() {
    let db = crate::db::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::new(db).await;
    let config = write_config(dir.path(), &e.db.url, &e.sim.url());
    let systemd = SystemdListener::bind(dir.path());
    let socket = systemd.path.to_str().unwrap().to_owned();
    let mut daemon = RealDaemon::start(
        &config,
        &[
            ("NOTIFY_SOCKET", &socket),
            // WATCHDOG=1 every 0.5 s.
            ("WATCHDOG_USEC", "1500000"),
            ("WXPAY_RECONCILER__NOTIFY__LISTEN", "127.0.0.1:0"),
            ("WXPAY_RECONCILER__WECHAT__CONCURRENCY", "1"),
            ("WXPAY_RECONCILER_TEST_FAIL_TASK", "notify:end"),
        ],
        None,
    )
    .await;
    let metrics = daemon.metrics;
    wait_for("READY=1 and pings", Duration::from_secs(10), async || {
        systemd.times_of("WATCHDOG=1").len() >= 2
    })
    .await;
    wait_for("/readyz", Duration::from_secs(10), async || {
        get(metrics, "/readyz").await.0 == 200
    })
    .await;
    // A scan in flight when the task stops (queries take 3 s): the daemon drains it, and
    // during a scan the loop would normally go on feeding the watchdog.
    e.sim
        .faults(json!({"endpoint": "orderquery", "latency_ms": 3000}))
        .await;
    let m = md5_merchant();
    e.order(&m, 100).await;
    wait_for("a query in flight", Duration::from_secs(10), async || {
        e.sim.sim.state.total_inflight() > 0
    })
    .await;

    let killed = Instant::now();
    signal(daemon.child.id(), "USR1");
    // /readyz turns 503 at once, and says why.
    let mut not_ready = None;
    while killed.elapsed() < Duration::from_secs(2) {
        let (status, text) = get(metrics, "/readyz").await;
        if status == 503 {
            not_ready = Some((killed.elapsed(), text));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (after, text) =
        not_ready.unwrap_or_else(|| panic!("/readyz never failed:\n{}", daemon.log_text()));
    assert!(after < Duration::from_secs(1), "{after:?}");
    assert!(text.contains("task notify stopped"), "{text}");
    // The process exits by itself, non-zero, after draining the scan.
    let status = daemon.exit_within(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(1), "{status:?}\n{}", daemon.log_text());
    assert!(killed.elapsed() < Duration::from_secs(12));
    // Logged at that moment, as an error naming the task.
    let stopped_at = daemon
        .log
        .lock()
        .unwrap()
        .lines
        .iter()
        .find(|(_, l)| l.contains(" ERROR ") && l.contains("task=\"notify\""))
        .map(|(t, _)| *t)
        .unwrap_or_else(|| panic!("no error naming the task:\n{}", daemon.log_text()));
    assert!(stopped_at - killed < Duration::from_secs(1));
    let log = daemon.log_text();
    assert!(
        log.contains("error: task notify ended while the daemon was running"),
        "{log}"
    );
    // Pings before, none after (50 ms for the two channels to be read), STOPPING=1.
    let pings = systemd.times_of("WATCHDOG=1");
    assert!(pings.iter().any(|t| *t < killed), "{pings:?}");
    let late: Vec<_> = pings
        .iter()
        .filter(|t| **t > stopped_at + Duration::from_millis(50))
        .map(|t| t.duration_since(stopped_at))
        .collect();
    assert!(
        late.is_empty(),
        "WATCHDOG=1 after the task stopped: {late:?}"
    );
    assert!(systemd.has("STOPPING=1"));
    systemd.stop();
    drop(daemon);
    e.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_gauge_task_is_treated_the_same() {
    let db = crate::db::sqlite().await;
    let e = Engine::new(db).await;
    let stop = CancellationToken::new();
    let daemon = Daemon::start(&e.settings, stop.clone()).await.unwrap();
    let health = daemon.health.clone();
    let hooks = daemon.task_hooks();
    wait_for("ready", Duration::from_secs(5), async || {
        health.readiness().is_ok()
    })
    .await;
    let running = tokio::spawn(daemon.wait());
    assert!(hooks.fail("gauges", TaskFailure::Panic));
    wait_for("not ready", Duration::from_secs(1), async || {
        health.readiness().is_err()
    })
    .await;
    assert_eq!(health.readiness(), Err("task gauges stopped".to_owned()));
    // The watchdog is fed only while no task has stopped.
    assert_eq!(health.failed_task(), Some("gauges"));
    let result = tokio::time::timeout(Duration::from_secs(12), running)
        .await
        .expect("wait returns by itself within the drain deadline")
        .unwrap();
    match result {
        Err(DaemonError::TaskFailed { task, how }) => {
            assert_eq!((task, how), ("gauges", "panicked"));
        }
        other => panic!("{other:?}"),
    }
    // Everything else was drained and the stop token fired for whoever else watches it.
    assert!(stop.is_cancelled());
    e.finish().await;
}

//! The operator's HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process answers)
//! and `/readyz` (every task of the daemon runs, the database answered recently and a scan
//! completed recently).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::telemetry::Telemetry;

/// What `/readyz` reports on, updated by the scan loop and the gauge refresher.
#[derive(Debug)]
pub struct Health {
    db_ok: AtomicBool,
    last_scan_ok_ms: AtomicI64,
    started_ms: i64,
    max_scan_age: Duration,
    /// The first task of the daemon that stopped while it ran (`Daemon::wait`).
    failed_task: OnceLock<&'static str>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Health {
    pub fn new(max_scan_age: Duration) -> Arc<Health> {
        Arc::new(Health {
            db_ok: AtomicBool::new(true),
            last_scan_ok_ms: AtomicI64::new(0),
            started_ms: now_ms(),
            max_scan_age,
            failed_task: OnceLock::new(),
        })
    }

    /// A task of the daemon ended or panicked: not ready from now on.
    pub fn task_stopped(&self, task: &'static str) {
        let _first = self.failed_task.set(task);
    }

    /// The task that stopped, if one did.
    pub fn failed_task(&self) -> Option<&'static str> {
        self.failed_task.get().copied()
    }

    pub fn db(&self, ok: bool) {
        self.db_ok.store(ok, Ordering::Relaxed);
    }

    pub fn scan_succeeded(&self) {
        self.db_ok.store(true, Ordering::Relaxed);
        self.last_scan_ok_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// `Ok` when ready, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(task) = self.failed_task() {
            return Err(format!("task {task} stopped"));
        }
        if !self.db_ok.load(Ordering::Relaxed) {
            return Err("database unreachable".into());
        }
        let max = i64::try_from(self.max_scan_age.as_millis()).unwrap_or(i64::MAX);
        let last = self
            .last_scan_ok_ms
            .load(Ordering::Relaxed)
            .max(self.started_ms);
        if now_ms() - last > max {
            return Err(format!(
                "no scan completed in the last {} s",
                self.max_scan_age.as_secs()
            ));
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    telemetry: Telemetry,
    health: Arc<Health>,
}

pub fn router(telemetry: Telemetry, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { telemetry, health })
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.telemetry.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

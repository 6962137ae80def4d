//! `wxpay-reconciler run`: the daemon's jobs (the scan and the gauge refresher, [`jobs`]), the
//! metrics listener and the optional notify listener as tasks of one `JoinSet`, stopped
//! through one `CancellationToken` and drained within
//! [`DRAIN_DEADLINE`](crate::shutdown::DRAIN_DEADLINE). Their parts are built from the settings
//! in [`wiring`]; a SIGHUP applies what it can through the [`Reloader`] ([`reload`]).
//!
//! The tasks are supervised: one that ends or panics while the daemon is not stopping is
//! logged at once, fails `/readyz` ("task X stopped"), stops the systemd watchdog pings, and
//! the daemon drains the rest and [`Daemon::wait`] returns [`DaemonError::TaskFailed`], so that
//! `run` exits non-zero and systemd restarts it.

mod certificates;
mod jobs;
mod reload;
mod wiring;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinSet};
use tokio_cron_scheduler::JobScheduler;
use tokio_util::sync::CancellationToken;

pub use reload::Reloader;
pub use wiring::{bill_runner, open_store, policy, refund_policy, scanner};

use crate::config::Settings;
use crate::http::Health;
use crate::shutdown::{DRAIN_DEADLINE, systemd};
use crate::store::{InstanceLock, StoreError};
use crate::telemetry::Telemetry;
use jobs::Jobs;
use wiring::Wiring;

/// Why the daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("scheduler: {0}")]
    Scheduler(String),
    #[error("WeChat Pay client: {0}")]
    Client(#[from] crate::gateway::GatewayError),
    /// A task ended or panicked while the daemon was running; the rest was drained.
    #[error("task {task} {how} while the daemon was running; stopped so that it can be restarted")]
    TaskFailed {
        task: &'static str,
        how: &'static str,
    },
}

/// How a test makes a task fail ([`TaskHooks::fail`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskFailure {
    /// The task's future returns, as if its loop had ended.
    End,
    /// The task panics.
    Panic,
}

/// A test hook, and nothing else: makes one of the daemon's tasks end or panic, so that tests
/// can watch the supervision (the daemon has no real way to lose a task on purpose). The
/// binary uses it only in debug builds, through `WXPAY_RECONCILER_TEST_FAIL_TASK`.
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct TaskHooks {
    fail: Arc<Mutex<HashMap<&'static str, oneshot::Sender<TaskFailure>>>>,
}

impl std::fmt::Debug for TaskHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHooks").finish_non_exhaustive()
    }
}

impl TaskHooks {
    /// Makes `task` fail as `how`; false when there is no such task (or it was already used).
    pub fn fail(&self, task: &str, how: TaskFailure) -> bool {
        let sender = self
            .fail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(task);
        sender.is_some_and(|s| s.send(how).is_ok())
    }
}

/// The daemon's tasks, each known by the name logs, `/readyz` and [`DaemonError::TaskFailed`]
/// use: `metrics`, `notify`, `scan`, `gauges`.
struct Tasks {
    set: JoinSet<()>,
    names: HashMap<tokio::task::Id, &'static str>,
    hooks: TaskHooks,
}

impl Tasks {
    fn new() -> Tasks {
        Tasks {
            set: JoinSet::new(),
            names: HashMap::new(),
            hooks: TaskHooks::default(),
        }
    }

    fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let (fail_tx, fail_rx) = oneshot::channel();
        self.hooks
            .fail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, fail_tx);
        let handle = self.set.spawn(async move {
            tokio::select! {
                () = task => {}
                Ok(how) = fail_rx => match how {
                    TaskFailure::End => {}
                    TaskFailure::Panic => panic!("task {name}: panic injected by a test hook"),
                },
            }
        });
        self.names.insert(handle.id(), name);
    }

    /// The next task to finish: its name and how it ended (`None` when there are none left).
    async fn next(&mut self) -> Option<(&'static str, Result<(), JoinError>)> {
        let joined = self.set.join_next_with_id().await?;
        let id = match &joined {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let name = self.names.remove(&id).unwrap_or("unknown");
        Some((name, joined.map(|_| ())))
    }
}

/// "ended", "panicked" or "was cancelled" (a panic's message is on stderr already, from the
/// panic hook).
fn how_it_ended(result: &Result<(), JoinError>) -> &'static str {
    match result {
        Ok(()) => "ended",
        Err(e) if e.is_panic() => "panicked",
        Err(_) => "was cancelled",
    }
}

/// A running daemon.
pub struct Daemon {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Where `POST /wxpay/v2/notify` and `/wxpay/v3/notify` are served, when `[notify] listen` is set.
    pub notify_addr: Option<SocketAddr>,
    pub telemetry: Telemetry,
    pub health: Arc<Health>,
    /// Applies a reloaded configuration (SIGHUP).
    pub reloader: Reloader,
    stop: CancellationToken,
    /// Stops the scan, the gauges and the notify listener (a child of `stop`).
    work_stop: CancellationToken,
    /// Stops the metrics listener (a child of `stop`): after the others when a task failed,
    /// so that `/readyz` tells why while they drain.
    metrics_stop: CancellationToken,
    tasks: Tasks,
    scheduler: JobScheduler,
    /// SQLite: held while running, so a second daemon on the same file refuses to start.
    _instance_lock: Option<InstanceLock>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Checks the schema, starts every task, and tells systemd it is ready. Returns once
    /// running; [`Daemon::wait`] waits for `stop` and drains.
    pub async fn start(
        settings: &Settings,
        stop: CancellationToken,
    ) -> Result<Daemon, DaemonError> {
        let wiring = Wiring::open(settings).await?;
        let telemetry = wiring.telemetry().clone();
        let mut tasks = Tasks::new();
        let work_stop = stop.child_token();
        let metrics_stop = stop.child_token();
        let metrics_addr = wiring
            .metrics_listener(settings, metrics_stop.clone())
            .spawn(&mut tasks, &telemetry)
            .await?;
        let notify_addr = match wiring.notify_listener(settings, work_stop.clone()) {
            Some(notify) => Some(notify.spawn(&mut tasks, &telemetry).await?),
            None => None,
        };
        let jobs = Jobs::start(&mut tasks, settings, &wiring, work_stop.clone()).await?;
        tasks.spawn(
            "certificates",
            certificates::keep_fresh(
                wiring.scanners.client.clone(),
                settings.merchants.clone(),
                telemetry.clone(),
                work_stop.clone(),
            ),
        );
        let scheduler = jobs.cron();

        systemd::ready();
        tracing::info!(
            metrics = %metrics_addr,
            notify = ?notify_addr,
            database = %settings.database.url,
            merchants = settings.merchants.len(),
            scan_cron = %settings.schedule.scan_cron,
            "reconciler running"
        );
        Ok(Daemon {
            metrics_addr,
            notify_addr,
            reloader: Reloader::new(settings.clone(), jobs, telemetry.clone()),
            telemetry,
            health: wiring.health,
            stop,
            work_stop,
            metrics_stop,
            tasks,
            scheduler,
            _instance_lock: wiring.instance_lock,
        })
    }

    /// The test hook that makes a task fail ([`TaskHooks`]).
    #[doc(hidden)]
    pub fn task_hooks(&self) -> TaskHooks {
        self.tasks.hooks.clone()
    }

    /// Runs until the stop token fires or a task ends, then stops claiming, lets in-flight
    /// queries finish within [`DRAIN_DEADLINE`] (abandoned ones come back when their lease
    /// passes) and returns: `Ok` after a stop, [`DaemonError::TaskFailed`] after a task ended or
    /// panicked on its own.
    pub async fn wait(mut self) -> Result<(), DaemonError> {
        let failed = tokio::select! {
            biased;
            _ = self.stop.cancelled() => None,
            Some((task, result)) = self.tasks.next(), if !self.stop.is_cancelled() => {
                let how = how_it_ended(&result);
                // Readiness fails and the watchdog pings stop before anything else happens.
                self.health.task_stopped(task);
                tracing::error!(task, how, "a task of the daemon stopped while it was running; /readyz fails, the systemd watchdog is no longer fed, draining and exiting");
                Some(DaemonError::TaskFailed { task, how })
            }
        };
        systemd::stopping();
        // After a failure the metrics listener answers (/readyz: not ready, and why) until the
        // rest has drained.
        self.work_stop.cancel();
        if failed.is_none() {
            self.metrics_stop.cancel();
        }
        if let Err(error) = self.scheduler.shutdown().await {
            tracing::warn!(%error, "scheduler did not stop cleanly");
        }
        self.drain().await;
        // Ends what else watches the token (the SIGHUP loop, `Reloader::watch_hangups`).
        self.stop.cancel();
        tracing::info!("reconciler stopped");
        match failed {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Waits for the tasks within [`DRAIN_DEADLINE`], the metrics listener last; aborts what
    /// is left at the deadline.
    async fn drain(&mut self) {
        let tasks = &mut self.tasks;
        let metrics_stop = &self.metrics_stop;
        let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
            loop {
                if tasks.names.values().all(|name| *name == "metrics") {
                    metrics_stop.cancel();
                }
                let Some((task, result)) = tasks.next().await else {
                    break;
                };
                if let Err(error) = result {
                    tracing::error!(task, %error, "task failed while draining");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(deadline = ?DRAIN_DEADLINE, "in-flight work abandoned at the drain deadline; its leases will expire");
            self.tasks.set.abort_all();
        }
    }
}

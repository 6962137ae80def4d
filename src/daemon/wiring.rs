//! Builds the daemon's parts from [`Settings`]: the store, the WeChat Pay client (this file is
//! the only one of the daemon that names its type), the scanner, the policy, and the two
//! listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use chrono::TimeDelta;
use tokio_util::sync::CancellationToken;

use super::{DaemonError, Tasks};
use crate::config::Settings;
use crate::gateway::Gateway;
use crate::http::{self, Health};
use crate::listener::{self, Limits, Listener};
use crate::notify::{self, NotifyApp};
use crate::reconcile::bills::{BillRunner, BillRunnerParts};
use crate::reconcile::policy::Policy;
use crate::reconcile::refund_policy::RefundPolicy;
use crate::reconcile::scanner::{ScanSettings, Scanner};
use crate::store::{ConnectOptions, InstanceLock, Store, StoreError};
use crate::telemetry::Telemetry;

/// The WeChat Pay gateway, shared by every scanner the daemon builds: a reload keeps it, and
/// with it its connection pool and its primary/backup failover state.
pub(super) type Client = Arc<Gateway>;

/// The gateway of `settings.wechat`.
pub(super) fn client(settings: &Settings) -> Result<Client, DaemonError> {
    Ok(Arc::new(Gateway::new(settings.wechat.client_config())?))
}

/// Opens the configured database (`create_if_missing` only for `migrate`).
pub async fn open_store(settings: &Settings, create_if_missing: bool) -> Result<Store, StoreError> {
    Store::connect(&ConnectOptions {
        url: settings.database.url.clone(),
        max_connections: settings.database.max_connections,
        create_if_missing,
        acquire_timeout: Duration::from_secs(5),
    })
    .await
}

/// The scanner of these settings, on `store`, with a client of its own.
pub fn scanner(
    settings: &Settings,
    store: Store,
    telemetry: Telemetry,
) -> Result<Scanner, DaemonError> {
    let parts = ScannerParts {
        store,
        client: client(settings)?,
        telemetry,
    };
    Ok(parts.build(settings))
}

pub fn policy(settings: &Settings) -> Policy {
    let s = &settings.schedule;
    Policy {
        grace: TimeDelta::seconds(i64::try_from(s.grace_seconds).unwrap_or(0)),
        give_up_after: TimeDelta::hours(i64::try_from(s.give_up_after_hours).unwrap_or(24)),
        default_expiry: TimeDelta::minutes(i64::try_from(s.default_expiry_minutes).unwrap_or(120)),
        close_expired: s.close_expired,
    }
}

/// The refund policy of `[refunds]` (`None` when refunds are not polled).
pub fn refund_policy(settings: &Settings) -> Option<RefundPolicy> {
    let r = &settings.refunds;
    let secs = |n: u64| TimeDelta::seconds(i64::try_from(n).unwrap_or(i64::MAX / 1000));
    r.enabled.then(|| RefundPolicy {
        first_delay: secs(r.first_query_seconds),
        horizon: secs(r.horizon_days.saturating_mul(86_400)),
        not_found_after: secs(r.not_found_after_minutes.saturating_mul(60)),
    })
}

/// The bill runner of these settings (`[bills]`), on `store`; `gateway` `None` reads files
/// only.
pub fn bill_runner(
    settings: &Settings,
    store: Store,
    gateway: Option<Arc<Gateway>>,
    telemetry: Telemetry,
) -> BillRunner {
    BillRunner::new(BillRunnerParts {
        store,
        gateway,
        telemetry,
        policy: policy(settings),
        // With refund polling off, a refund the bill shows ended is still decided by the
        // same rules.
        refund_policy: refund_policy(settings).unwrap_or_default(),
        settings: settings.bills.clone(),
        merchants: settings.merchants.clone(),
    })
}

/// What every scanner of a running daemon shares; [`ScannerParts::build`] makes one for the
/// settings of the moment (at start, and at each reload).
#[derive(Clone)]
pub(super) struct ScannerParts {
    pub store: Store,
    pub client: Client,
    pub telemetry: Telemetry,
}

impl ScannerParts {
    pub fn build(&self, settings: &Settings) -> Scanner {
        let s = &settings.schedule;
        Scanner::new(
            self.store.clone(),
            self.client.clone(),
            &settings.merchants,
            ScanSettings {
                batch_size: s.batch_size,
                lease: TimeDelta::seconds(
                    i64::try_from(s.lease_seconds).unwrap_or(i64::MAX / 1000),
                ),
                concurrency: settings.wechat.concurrency as usize,
                max_qps: settings.wechat.max_qps,
                policy: policy(settings),
                refunds: refund_policy(settings),
            },
            self.telemetry.clone(),
        )
    }
}

/// The daemon's shared parts, built from the settings at start.
pub(super) struct Wiring {
    pub scanners: ScannerParts,
    pub health: Arc<Health>,
    /// SQLite: held while running, so a second daemon on the same file refuses to start.
    pub instance_lock: Option<InstanceLock>,
}

impl Wiring {
    /// Opens the store (locked for this instance, schema checked), the telemetry, the client
    /// and the health `/readyz` reports.
    pub async fn open(settings: &Settings) -> Result<Wiring, DaemonError> {
        let store = open_store(settings, false).await?;
        let instance_lock = store.lock_instance()?;
        store.check_schema().await?;
        let telemetry = Telemetry::new(settings.merchants.iter().map(|m| m.mch_id.as_str()));
        telemetry.merchant_apis(
            settings
                .merchants
                .iter()
                .map(|m| (m.mch_id.as_str(), m.api())),
        );
        let client = client(settings)?;
        let health = Health::new(Duration::from_secs(
            settings.metrics.ready_max_scan_age_seconds,
        ));
        Ok(Wiring {
            scanners: ScannerParts {
                store,
                client,
                telemetry,
            },
            health,
            instance_lock,
        })
    }

    pub fn store(&self) -> &Store {
        &self.scanners.store
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.scanners.telemetry
    }

    /// `/metrics`, `/healthz` and `/readyz` on `[metrics] listen`.
    pub fn metrics_listener(&self, settings: &Settings, stop: CancellationToken) -> Serve {
        Serve {
            which: Listener::Metrics,
            addr: settings.metrics.listen,
            app: http::router(self.telemetry().clone(), self.health.clone()),
            limits: settings.metrics.limits(),
            stop,
        }
    }

    /// `POST /wxpay/v2/notify` and `/wxpay/v3/notify[/{mch_id}]` on `[notify] listen`, when it is set.
    pub fn notify_listener(&self, settings: &Settings, stop: CancellationToken) -> Option<Serve> {
        let addr = settings.notify.listen?;
        let mut app = NotifyApp::new(
            self.store().clone(),
            self.telemetry().clone(),
            policy(settings),
            &settings.merchants,
        );
        if let Some(refunds) = refund_policy(settings) {
            app.refunds = refunds;
        }
        let app = notify::router(Arc::new(app));
        Some(Serve {
            which: Listener::Notify,
            addr,
            app,
            limits: settings.notify.limits(),
            stop,
        })
    }
}

/// One listener to bind and serve as a task of the daemon (named after it).
pub(super) struct Serve {
    pub which: Listener,
    pub addr: SocketAddr,
    pub app: Router,
    pub limits: Limits,
    pub stop: CancellationToken,
}

impl Serve {
    /// Binds, and serves as the task `which` until `stop`; returns the bound address.
    pub async fn spawn(
        self,
        tasks: &mut Tasks,
        telemetry: &Telemetry,
    ) -> Result<SocketAddr, DaemonError> {
        let addr = self.addr;
        let listen_error = |source| DaemonError::Listen { addr, source };
        let bound = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(listen_error)?;
        let local = bound.local_addr().map_err(listen_error)?;
        tasks.spawn(
            self.which.as_str(),
            listener::serve(
                bound,
                self.app,
                self.which,
                self.limits,
                telemetry.clone(),
                self.stop,
            ),
        );
        Ok(local)
    }
}

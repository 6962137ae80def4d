//! A WeChat Pay simulator: v2's `unifiedorder`, `orderquery`, `closeorder`, `refundquery`,
//! `downloadbill` (also under `/sandboxnew/`), v3's orderquery, refund query, close,
//! `GET /v3/certificates`, `tradebill` and the bill download (see [`v3`]; bills: [`bill`]), payment
//! notifications with WeChat's retry schedule, and a JSON control API for tests (pay, refunds,
//! close, fault injection, per-order counters), the same for v2 and v3 merchants. Orders live in
//! memory.
//!
//! It speaks the protocol through [`crate::wxpay`]'s codec and signer: the same strict decoder
//! that guards the daemon guards the simulator, and every SUCCESS reply is signed with the
//! merchant's key and the request's sign type.

pub mod bill;
mod control;
mod notify;
mod state;
pub mod v3;
mod wechat;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{
    DatabaseSettings, MetricsSettings, RefundSettings, ScheduleSettings, Settings, WechatSettings,
};
use crate::domain::{AppId, MchId};
use crate::gateway::Merchant;
use crate::store::DatabaseUrl;
use crate::wxpay::{ApiKey, SignType, xml::MAX_BODY_BYTES};

pub use state::{
    BILL_URL_LIFETIME, BillFaults, BillStats, Faults, Payment, SimError, SimSetupError, SimState,
    WECHAT_NOTIFY_RETRIES,
};
pub use v3::{KeyMode, KeySetup, WechatSide};

/// The test merchants served without a config: the two v2 ones of
/// ../shared/fixtures/wxpay-v2/README.md and the v3 one of the published v3 test keys
/// ([`v3::test_v3_merchant`]).
pub fn default_merchants() -> Vec<Merchant> {
    let m = |mch_id: &str, appid: &str, sign_type, key: &str| -> Option<Merchant> {
        Some(Merchant::v2(
            MchId::parse(mch_id).ok()?,
            AppId::parse(appid).ok()?,
            sign_type,
            ApiKey::parse(key).ok()?,
        ))
    };
    [
        m(
            "10000100",
            "wxd930ea5d5a258f4f",
            SignType::Md5,
            "192006250b4c09247ec02edce69f6a2d",
        ),
        m(
            "1900000109",
            "wx2421b1c4370ec43b",
            SignType::HmacSha256,
            "8934e7d15453e97507ef794cf7b0519d",
        ),
        v3::test_v3_merchant().ok(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The settings of a daemon working against the simulator at `sim_url`: a scan every second, no
/// grace, 30 s leases, the [`default_merchants`], metrics on an ephemeral port refreshed every
/// second, no backup URL. The demo, the tests and the benchmarks start from these and set what
/// they tune (`path` names who built them).
pub fn daemon_settings(db_url: &str, sim_url: &str) -> Settings {
    Settings {
        path: "(simulator)".into(),
        database: DatabaseSettings {
            url: DatabaseUrl::new(db_url),
            max_connections: 8,
        },
        wechat: WechatSettings {
            base_url: sim_url.to_owned(),
            backup_base_url: None,
            ..WechatSettings::default()
        },
        merchants: default_merchants(),
        schedule: ScheduleSettings {
            scan_cron: "* * * * * *".into(),
            grace_seconds: 0,
            lease_seconds: 30,
            ..ScheduleSettings::default()
        },
        // Refunds against the simulator: the first query a second after the registration.
        refunds: RefundSettings {
            first_query_seconds: 1,
            ..RefundSettings::default()
        },
        // Bills off: a test or the demo that reconciles a bill turns them on.
        bills: Default::default(),
        metrics: MetricsSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            refresh_seconds: 1,
            ..MetricsSettings::default()
        },
        notify: Default::default(),
        log: Default::default(),
        simulator: Default::default(),
    }
}

/// The simulator's HTTP routes.
pub fn router(state: Arc<SimState>) -> Router {
    let wechat = Router::new()
        .route("/pay/unifiedorder", post(wechat::unified_order))
        .route("/pay/orderquery", post(wechat::order_query))
        .route("/pay/closeorder", post(wechat::close_order))
        .route("/pay/refundquery", post(wechat::refund_query))
        .route("/pay/downloadbill", post(wechat::download_bill));
    // One order of the control API, or an action on it (`/pay`, …).
    let order = |action: &str| format!("/_sim/orders/{{mch_id}}/{{out_trade_no}}{action}");
    Router::new()
        .merge(wechat.clone())
        .nest("/sandboxnew", wechat)
        .route(
            "/v3/pay/transactions/out-trade-no/{out_trade_no}",
            get(v3::order_query),
        )
        .route(
            "/v3/pay/partner/transactions/out-trade-no/{out_trade_no}",
            get(v3::partner_order_query),
        )
        .route(
            "/v3/pay/transactions/out-trade-no/{out_trade_no}/close",
            post(v3::close_order),
        )
        .route(
            "/v3/refund/domestic/refunds/{out_refund_no}",
            get(v3::refund_query),
        )
        .route("/v3/certificates", get(v3::certificates))
        .route("/v3/bill/tradebill", get(v3::trade_bill))
        .route("/v3/billdownload/file", get(v3::bill_download))
        .route(&order(""), post(control::create).get(control::show))
        .route(&order("/pay"), post(control::pay))
        .route(&order("/refund"), post(control::refund))
        .route(&order("/refunds"), post(control::create_refund))
        .route(
            "/_sim/refunds/{mch_id}/{out_refund_no}/finish",
            post(control::finish_refund),
        )
        .route(&order("/close"), post(control::close))
        .route(&order("/state"), post(control::force_state))
        .route(
            "/_sim/faults",
            put(control::set_faults).get(control::get_faults),
        )
        .route("/_sim/config", put(control::set_config))
        .route(
            "/_sim/v3/{mch_id}/keys",
            put(v3::set_keys).get(v3::get_keys),
        )
        .route(
            "/_sim/bills/{mch_id}/{bill_date}",
            put(control::set_bill_faults).get(control::show_bill),
        )
        .route("/_sim/stats", get(control::stats))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// A simulator serving on a bound listener until its token is cancelled.
pub struct RunningSimulator {
    pub addr: SocketAddr,
    pub state: Arc<SimState>,
    token: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningSimulator {
    /// Starts serving `listener` (bind port 0 in tests); WeChat signs v3 answers with the
    /// embedded test keys.
    pub fn start(listener: TcpListener, merchants: Vec<Merchant>) -> std::io::Result<Self> {
        let wechat = WechatSide::test_keys().map_err(std::io::Error::other)?;
        RunningSimulator::start_with(listener, merchants, wechat)
    }

    /// [`RunningSimulator::start`] with WeChat's side of the v3 merchants given.
    pub fn start_with(
        listener: TcpListener,
        merchants: Vec<Merchant>,
        wechat: WechatSide,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let token = CancellationToken::new();
        let state = SimState::with_wechat(merchants, wechat, token.clone())
            .map_err(std::io::Error::other)?;
        let app = router(state.clone());
        let shutdown = token.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        });
        Ok(RunningSimulator {
            addr,
            state,
            token,
            task,
        })
    }

    /// `http://ADDR`, the value for `wechat.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets in-flight requests finish for at most `deadline`, then drops them.
    pub async fn shutdown(self, deadline: Duration) -> std::io::Result<()> {
        self.token.cancel();
        let mut task = self.task;
        match tokio::time::timeout(deadline, &mut task).await {
            Ok(joined) => joined.map_err(std::io::Error::other)?,
            Err(_elapsed) => {
                tracing::warn!(
                    ?deadline,
                    "simulator requests still in flight at the deadline; dropping them"
                );
                task.abort();
                Ok(())
            }
        }
    }

    /// Waits until the token is cancelled from outside (signals), then shuts down.
    pub async fn serve_until(
        self,
        stop: CancellationToken,
        deadline: Duration,
    ) -> std::io::Result<()> {
        stop.cancelled().await;
        self.shutdown(deadline).await
    }
}

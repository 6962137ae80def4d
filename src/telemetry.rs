//! Logging and metrics. Every event the daemon reports goes through one method of [`Telemetry`]
//! that both logs it (structured fields) and counts it, so the two never disagree. Label values
//! are bounded sets: configured merchants (anything else is `unknown`), outcomes, states,
//! sources; never an order id.
//!
//! Each daemon owns its recorder (no global), so several can run in one process (tests) and
//! each renders only its own `/metrics`.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use metrics::{KeyName, SharedString, Unit, counter, gauge, histogram};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tracing_subscriber::EnvFilter;

use crate::domain::{OrderState, RefundState, Source, TradeState};
use crate::gateway::Api;
use crate::gateway::report::{
    CloseAnswer, Failure, GatewayError, QueryAnswer, RefundAnswer, UNVERIFIED_REASONS,
};

/// The running subscriber's filter, reloadable (`[log] level`, SIGHUP).
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

fn filter(level: &str) -> EnvFilter {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // tokio-cron-scheduler logs a spurious ERROR ("Error receiving job removal Closed") from
    // this module whenever it shuts down; an operator must not see an error on every stop.
    // sqlx's PostgreSQL URL parser warns with the value of an unknown parameter (a mistyped
    // `pasword=`) and with whole lines of `.pgpass`: secrets (store::postgres says which).
    [
        "tokio_cron_scheduler::simple::to_code=off",
        "sqlx_postgres::options=off",
    ]
    .into_iter()
    .fold(filter, |f, d| match d.parse() {
        Ok(directive) => f.add_directive(directive),
        Err(_) => f,
    })
}

/// Installs the global log subscriber (stderr, `RUST_LOG`, else `default`). Safe to call twice.
pub fn init_logging(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned());
    let (layer, handle) = tracing_subscriber::reload::Layer::new(filter(&level));
    let installed = tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        )
        .try_init();
    // Err means a subscriber is already installed (a test harness): keep that one.
    if installed.is_ok() {
        let _first = LOG_FILTER.set(handle);
    }
}

/// Applies `[log] level` to the running subscriber, unless `RUST_LOG` is set (it wins).
pub fn set_log_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(());
    }
    EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?;
    match LOG_FILTER.get() {
        Some(handle) => handle.reload(filter(level)).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

/// Metric names (DESIGN.md metrics contract), prefix `wxpay_reconciler_`.
pub mod names {
    pub const STUCK_ORDERS: &str = "wxpay_reconciler_stuck_orders";
    pub const OLDEST_UNPAID_AGE: &str = "wxpay_reconciler_oldest_unpaid_age_seconds";
    pub const OPEN_ORDERS: &str = "wxpay_reconciler_open_orders";
    pub const ORDERQUERY_REQUESTS: &str = "wxpay_reconciler_orderquery_requests_total";
    pub const ORDERQUERY_DURATION: &str = "wxpay_reconciler_orderquery_duration_seconds";
    pub const TRADE_STATE: &str = "wxpay_reconciler_trade_state_total";
    pub const TRANSITIONS: &str = "wxpay_reconciler_transitions_total";
    pub const NOOP: &str = "wxpay_reconciler_noop_total";
    pub const AMOUNT_MISMATCH: &str = "wxpay_reconciler_amount_mismatch_total";
    pub const GAVE_UP: &str = "wxpay_reconciler_gave_up_total";
    pub const SCAN_DURATION: &str = "wxpay_reconciler_scan_duration_seconds";
    pub const SCAN_CLAIMED: &str = "wxpay_reconciler_scan_claimed_orders";
    pub const SCAN_OVERLAP_SKIPPED: &str = "wxpay_reconciler_scan_overlap_skipped_total";
    pub const LAST_SCAN_SUCCESS: &str = "wxpay_reconciler_last_scan_success_timestamp_seconds";
    pub const DB_ERRORS: &str = "wxpay_reconciler_db_errors_total";
    pub const BUILD_INFO: &str = "wxpay_reconciler_build_info";
    pub const NOTIFY_REQUESTS: &str = "wxpay_reconciler_notify_requests_total";
    pub const NOTIFY_DURATION: &str = "wxpay_reconciler_notify_duration_seconds";
    pub const CLOSEORDER_REQUESTS: &str = "wxpay_reconciler_closeorder_requests_total";
    pub const EXPIRED_OPEN_ORDERS: &str = "wxpay_reconciler_expired_open_orders";
    pub const PAID_AFTER_CLOSE: &str = "wxpay_reconciler_paid_after_close_total";
    pub const CONFIG_RELOADS: &str = "wxpay_reconciler_config_reloads_total";
    pub const AMOUNT_MISMATCH_ORDERS: &str = "wxpay_reconciler_amount_mismatch_orders";
    pub const SET_ASIDE_ORDERS: &str = "wxpay_reconciler_set_aside_orders";
    pub const LISTENER_REFUSED: &str = "wxpay_reconciler_listener_refused_connections_total";
    pub const UNVERIFIED: &str = "wxpay_reconciler_unverified_messages_total";
    pub const CLOCK_SKEW: &str = "wxpay_reconciler_wechatpay_clock_skew_seconds";
    pub const CERT_EXPIRY: &str = "wxpay_reconciler_platform_certificate_expiry_timestamp_seconds";
    pub const CERT_DOWNLOADS: &str = "wxpay_reconciler_certificate_downloads_total";
    pub const MERCHANT_INFO: &str = "wxpay_reconciler_merchant_info";
    pub const REFUNDQUERY_REQUESTS: &str = "wxpay_reconciler_refundquery_requests_total";
    pub const REFUND_TRANSITIONS: &str = "wxpay_reconciler_refund_transitions_total";
    pub const OPEN_REFUNDS: &str = "wxpay_reconciler_open_refunds";
    pub const STUCK_REFUNDS: &str = "wxpay_reconciler_stuck_refunds";
    pub const OLDEST_OPEN_REFUND_AGE: &str = "wxpay_reconciler_oldest_open_refund_age_seconds";
    pub const ABNORMAL_REFUNDS: &str = "wxpay_reconciler_abnormal_refunds";
    pub const AMOUNT_MISMATCH_REFUNDS: &str = "wxpay_reconciler_amount_mismatch_refunds";
    pub const BILL_FINDINGS: &str = "wxpay_reconciler_bill_findings";
    pub const LAST_RECONCILED_BILL_DAY: &str =
        "wxpay_reconciler_last_reconciled_bill_day_timestamp_seconds";
    pub const BILL_FEE: &str = "wxpay_reconciler_bill_fee_fen";
    pub const BILL_FETCH_ERRORS: &str = "wxpay_reconciler_bill_fetch_errors_total";
}

/// The `outcome` of `orderquery_requests_total`: a verified answer, or why there was none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryOutcome {
    Ok,
    Failed(Failure),
}

impl QueryOutcome {
    /// Every outcome: `ok`, then each failure class.
    pub fn all() -> impl Iterator<Item = QueryOutcome> {
        std::iter::once(QueryOutcome::Ok).chain(Failure::ALL.map(QueryOutcome::Failed))
    }

    /// The outcome of a query (ORDERNOTEXIST is a `result_fail` reply, however definitive).
    pub fn of(outcome: &Result<QueryAnswer, GatewayError>) -> QueryOutcome {
        match outcome {
            Ok(QueryAnswer::Order(_)) => QueryOutcome::Ok,
            Ok(QueryAnswer::NotExist) => QueryOutcome::Failed(Failure::ResultFail),
            Err(e) => QueryOutcome::Failed(e.failure()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QueryOutcome::Ok => "ok",
            QueryOutcome::Failed(f) => f.as_str(),
        }
    }
}

/// The `outcome` of `closeorder_requests_total`: WeChat's answer, or why there was none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseOutcome {
    Answered(CloseAnswer),
    Failed(Failure),
}

impl CloseOutcome {
    /// Every outcome: WeChat's answers, then each failure class.
    pub fn all() -> impl Iterator<Item = CloseOutcome> {
        CloseAnswer::ALL
            .map(CloseOutcome::Answered)
            .into_iter()
            .chain(Failure::ALL.map(CloseOutcome::Failed))
    }

    pub fn of(outcome: &Result<CloseAnswer, GatewayError>) -> CloseOutcome {
        match outcome {
            Ok(answer) => CloseOutcome::Answered(*answer),
            Err(e) => CloseOutcome::Failed(e.failure()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CloseOutcome::Answered(a) => a.as_str(),
            CloseOutcome::Failed(f) => f.as_str(),
        }
    }
}

/// The `outcome` of `notify_requests_total`: how a notification was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotifyOutcome {
    Ok,
    Repeat,
    SignInvalid,
    UnknownMerchant,
    UnknownOrder,
    /// A refund notification for a refund `wxpay_refunds` does not hold.
    UnknownRefund,
    Malformed,
    TooLarge,
    Timeout,
    ReturnFail,
    Mismatch,
    DbError,
    /// A v3 notification whose signature could not be checked (a probe, an unknown serial,
    /// a stale timestamp, a missing header).
    Unverified,
    /// A v3 notification whose resource did not decrypt: a wrong or reset APIv3 key.
    DecryptFailed,
    /// A v3 event this version does not act on: acknowledged, never guessed at.
    Ignored,
}

impl NotifyOutcome {
    pub const ALL: [NotifyOutcome; 15] = [
        NotifyOutcome::Ok,
        NotifyOutcome::Repeat,
        NotifyOutcome::SignInvalid,
        NotifyOutcome::UnknownMerchant,
        NotifyOutcome::UnknownOrder,
        NotifyOutcome::UnknownRefund,
        NotifyOutcome::Malformed,
        NotifyOutcome::TooLarge,
        NotifyOutcome::Timeout,
        NotifyOutcome::ReturnFail,
        NotifyOutcome::Mismatch,
        NotifyOutcome::DbError,
        NotifyOutcome::Unverified,
        NotifyOutcome::DecryptFailed,
        NotifyOutcome::Ignored,
    ];

    /// The outcomes that can come without a configured merchant (`mch_id="unknown"`): refused
    /// before a merchant is known, or naming another one.
    pub const WITHOUT_MERCHANT: [NotifyOutcome; 5] = [
        NotifyOutcome::UnknownMerchant,
        NotifyOutcome::Malformed,
        NotifyOutcome::TooLarge,
        NotifyOutcome::Timeout,
        NotifyOutcome::Unverified,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyOutcome::Ok => "ok",
            NotifyOutcome::Repeat => "repeat",
            NotifyOutcome::SignInvalid => "sign_invalid",
            NotifyOutcome::UnknownMerchant => "unknown_merchant",
            NotifyOutcome::UnknownOrder => "unknown_order",
            NotifyOutcome::UnknownRefund => "unknown_refund",
            NotifyOutcome::Malformed => "malformed",
            NotifyOutcome::TooLarge => "too_large",
            NotifyOutcome::Timeout => "timeout",
            NotifyOutcome::ReturnFail => "return_fail",
            NotifyOutcome::Mismatch => "mismatch",
            NotifyOutcome::DbError => "db_error",
            NotifyOutcome::Unverified => "unverified",
            NotifyOutcome::DecryptFailed => "decrypt_failed",
            NotifyOutcome::Ignored => "ignored",
        }
    }

    /// Whether a refusal of this kind suggests a wrong key or a forgery (logged as a warning).
    fn is_suspicious(self) -> bool {
        matches!(
            self,
            NotifyOutcome::SignInvalid
                | NotifyOutcome::Mismatch
                | NotifyOutcome::UnknownMerchant
                | NotifyOutcome::DecryptFailed
        )
    }
}

/// The `op` of `db_errors_total`: what the database was asked when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbOp {
    Claim,
    Apply,
    Gauges,
    Notify,
    Bills,
}

impl DbOp {
    pub const ALL: [DbOp; 5] = [
        DbOp::Claim,
        DbOp::Apply,
        DbOp::Gauges,
        DbOp::Notify,
        DbOp::Bills,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DbOp::Claim => "claim",
            DbOp::Apply => "apply",
            DbOp::Gauges => "gauges",
            DbOp::Notify => "notify",
            DbOp::Bills => "bills",
        }
    }
}

/// The `trade_state` values of `trade_state_total`: [`TradeState::label`] of every variant.
pub fn trade_state_labels() -> [&'static str; 9] {
    // Exhaustive on purpose: a new variant does not compile until it is listed below.
    fn listed(s: &TradeState) {
        match s {
            TradeState::Success
            | TradeState::Refund
            | TradeState::NotPay
            | TradeState::Closed
            | TradeState::Revoked
            | TradeState::UserPaying
            | TradeState::PayError
            | TradeState::Accept
            | TradeState::Unknown(_) => {}
        }
    }
    let all = [
        TradeState::Success,
        TradeState::Refund,
        TradeState::NotPay,
        TradeState::Closed,
        TradeState::Revoked,
        TradeState::UserPaying,
        TradeState::PayError,
        TradeState::Accept,
        TradeState::Unknown(String::new()),
    ];
    all.iter().for_each(listed);
    all.map(|s| s.label())
}

/// Every `(from, to, source)` of `transitions_total` a daemon's writers can count, per
/// `reconcile::policy`: a poll takes an open order to any final state (and, after losing a
/// race, SUCCESS to REFUND); a notification is always a payment (SUCCESS or
/// AMOUNT_MISMATCH); an expiry closes (CLOSED). `query --apply` (source `manual`) counts in its
/// own process, never in a daemon's `/metrics`.
pub fn transition_series() -> Vec<(OrderState, OrderState, Source)> {
    let finals = OrderState::ALL.into_iter().filter(|s| !s.is_open());
    let mut series = Vec::new();
    for from in OrderState::OPEN {
        for to in finals.clone() {
            series.push((from, to, Source::Poll));
        }
        for source in [Source::Notify, Source::Bill] {
            for to in [OrderState::Success, OrderState::AmountMismatch] {
                series.push((from, to, source));
            }
        }
        series.push((from, OrderState::Closed, Source::Expire));
    }
    series.push((OrderState::Success, OrderState::Refund, Source::Poll));
    series
}

/// The daemon's metrics and event log.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    merchants: HashSet<String>,
    refusals: RefusalLog,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// How a metric counts.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// What a metric's values are: a number of things, or seconds.
#[derive(Debug, Clone, Copy)]
enum Measure {
    Count,
    Seconds,
}

/// Every metric: its kind, what it measures, its name and its help text.
#[rustfmt::skip]
const DESCRIPTIONS: [(Kind, Measure, &str, &str); 41] = {
    use Kind::*;
    use Measure::*;
    use names::*;
    [
        (Gauge,     Count,   STUCK_ORDERS,           "Open orders older than metrics.stuck_after_seconds"),
        (Gauge,     Seconds, OLDEST_UNPAID_AGE,      "Age of the oldest open order (0 when none)"),
        (Gauge,     Count,   OPEN_ORDERS,            "Open orders (NOTPAY or USERPAYING)"),
        (Counter,   Count,   ORDERQUERY_REQUESTS,    "orderquery requests by outcome"),
        (Histogram, Seconds, ORDERQUERY_DURATION,    "orderquery request latency"),
        (Counter,   Count,   TRADE_STATE,            "trade_state values WeChat answered"),
        (Counter,   Count,   TRANSITIONS,            "Order state changes applied"),
        (Counter,   Count,   NOOP,                   "Writes that found the order already moved by someone else"),
        (Counter,   Count,   AMOUNT_MISMATCH,        "Orders quarantined because WeChat reported another amount"),
        (Counter,   Count,   GAVE_UP,                "Orders the daemon stopped polling (give_up_after_hours or end of schedule)"),
        (Histogram, Seconds, SCAN_DURATION,          "Duration of one scan"),
        (Histogram, Count,   SCAN_CLAIMED,           "Orders claimed per scan"),
        (Counter,   Count,   SCAN_OVERLAP_SKIPPED,   "Scan ticks skipped because the previous scan still ran"),
        (Gauge,     Seconds, LAST_SCAN_SUCCESS,      "Unix time of the last scan that completed"),
        (Counter,   Count,   DB_ERRORS,              "Database errors by operation"),
        (Gauge,     Count,   BUILD_INFO,             "Always 1; the version is a label"),
        (Counter,   Count,   NOTIFY_REQUESTS,        "Payment notifications received on the notify endpoint, by outcome"),
        (Histogram, Seconds, NOTIFY_DURATION,        "Time to verify, apply and answer one payment notification"),
        (Counter,   Count,   CLOSEORDER_REQUESTS,    "closeorder requests by outcome"),
        (Gauge,     Count,   EXPIRED_OPEN_ORDERS,    "Open orders past their expiry (expires_at, else schedule.default_expiry_minutes)"),
        (Counter,   Count,   PAID_AFTER_CLOSE,       "Verified payments for orders closed locally: refund or fulfil them"),
        (Counter,   Count,   CONFIG_RELOADS,         "Configuration reloads (SIGHUP) by outcome"),
        (Gauge,     Count,   AMOUNT_MISMATCH_ORDERS, "Orders in state AMOUNT_MISMATCH (quarantined until a person decides)"),
        (Gauge,     Count,   SET_ASIDE_ORDERS,       "Orders set aside because a value in their row cannot be used"),
        (Counter,   Count,   LISTENER_REFUSED,       "Connections closed because their listener was at max_connections"),
        (Counter,   Count,   UNVERIFIED,             "API v3 answers and notifications whose signature could not be checked, by reason"),
        (Gauge,     Seconds, CLOCK_SKEW,             "WeChat's clock minus ours, from the last correctly signed v3 message"),
        (Gauge,     Seconds, CERT_EXPIRY,            "Unix time a held WeChat Pay platform certificate expires"),
        (Counter,   Count,   CERT_DOWNLOADS,         "Platform certificate downloads (GET /v3/certificates) by outcome"),
        (Gauge,     Count,   MERCHANT_INFO,          "Always 1 per configured merchant; the API (v2, v3) is a label"),
        (Counter,   Count,   REFUNDQUERY_REQUESTS,   "Refund queries (v2 refundquery, v3 refund query) by outcome"),
        (Counter,   Count,   REFUND_TRANSITIONS,     "Refund state changes applied, by final state and source"),
        (Gauge,     Count,   OPEN_REFUNDS,           "Refunds in PROCESSING"),
        (Gauge,     Count,   STUCK_REFUNDS,          "Refunds still PROCESSING after refunds.horizon_days: polling stopped"),
        (Gauge,     Seconds, OLDEST_OPEN_REFUND_AGE, "Age of the oldest refund in PROCESSING (0 when none)"),
        (Gauge,     Count,   ABNORMAL_REFUNDS,       "Refunds in ABNORMAL: the money could not reach the payer, a person must act"),
        (Gauge,     Count,   AMOUNT_MISMATCH_REFUNDS, "Refunds in AMOUNT_MISMATCH (quarantined until a person decides)"),
        (Gauge,     Count,   BILL_FINDINGS,          "Findings of the merchant's last reconciled daily bill, by kind"),
        (Gauge,     Seconds, LAST_RECONCILED_BILL_DAY, "Unix time of the start (00:00 Beijing) of the last bill day reconciled (0: none yet)"),
        (Gauge,     Count,   BILL_FEE,               "WeChat's total fee (fen, exact to 1/1000) on the merchant's last reconciled bill"),
        (Counter,   Count,   BILL_FETCH_ERRORS,      "Daily bills not reconciled: fetch failures and refused bills, by reason"),
    ]
};

/// Describes every metric of [`DESCRIPTIONS`] to the current recorder.
fn describe_all() {
    metrics::with_recorder(|recorder| {
        for (kind, measure, name, help) in DESCRIPTIONS {
            let unit = match measure {
                Measure::Count => None,
                Measure::Seconds => Some(Unit::Seconds),
            };
            let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            match kind {
                Kind::Counter => recorder.describe_counter(name, unit, help),
                Kind::Gauge => recorder.describe_gauge(name, unit, help),
                Kind::Histogram => recorder.describe_histogram(name, unit, help),
            }
        }
    });
}

/// Sets the bounded series to zero (or registers them), so that they render from the first
/// scrape: the daemon's own, then each configured merchant's.
fn zero_series(merchants: &HashSet<String>) {
    use names::*;
    for outcome in ["ok", "error"] {
        counter!(CONFIG_RELOADS, "outcome" => outcome).absolute(0);
    }
    for listener in Listener::ALL {
        counter!(LISTENER_REFUSED, "listener" => listener.as_str()).absolute(0);
    }
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    counter!(SCAN_OVERLAP_SKIPPED).absolute(0);
    gauge!(LAST_SCAN_SUCCESS).set(0.0);
    // Registering a histogram renders it with zero counts until its first sample.
    let _ = histogram!(SCAN_DURATION);
    let _ = histogram!(SCAN_CLAIMED);
    for (from, to, source) in transition_series() {
        counter!(TRANSITIONS, "from" => from.as_str(), "to" => to.as_str(), "source" => source.as_str())
            .absolute(0);
    }
    for outcome in NotifyOutcome::WITHOUT_MERCHANT {
        counter!(NOTIFY_REQUESTS, "mch_id" => "unknown", "outcome" => outcome.as_str()).absolute(0);
    }
    for reason in UNVERIFIED_REASONS {
        counter!(UNVERIFIED, "mch_id" => "unknown", "source" => "notification", "reason" => reason)
            .absolute(0);
    }
    let _ = histogram!(NOTIFY_DURATION, "mch_id" => "unknown");
    for m in merchants {
        zero_merchant_series(m);
    }
    for source in Source::ALL {
        counter!(NOOP, "source" => source.as_str()).absolute(0);
    }
    for op in DbOp::ALL {
        counter!(DB_ERRORS, "op" => op.as_str()).absolute(0);
    }
}

/// The series of one configured merchant, at zero.
fn zero_merchant_series(m: &str) {
    use names::*;
    let m = m.to_owned();
    gauge!(AMOUNT_MISMATCH_ORDERS, "mch_id" => m.clone()).set(0.0);
    gauge!(SET_ASIDE_ORDERS, "mch_id" => m.clone()).set(0.0);
    let _ = histogram!(ORDERQUERY_DURATION, "mch_id" => m.clone());
    let _ = histogram!(NOTIFY_DURATION, "mch_id" => m.clone());
    for state in trade_state_labels() {
        counter!(TRADE_STATE, "mch_id" => m.clone(), "trade_state" => state).absolute(0);
    }
    gauge!(STUCK_ORDERS, "mch_id" => m.clone()).set(0.0);
    gauge!(OLDEST_UNPAID_AGE, "mch_id" => m.clone()).set(0.0);
    gauge!(OPEN_ORDERS, "mch_id" => m.clone()).set(0.0);
    counter!(AMOUNT_MISMATCH, "mch_id" => m.clone()).absolute(0);
    counter!(PAID_AFTER_CLOSE, "mch_id" => m.clone()).absolute(0);
    counter!(GAVE_UP, "mch_id" => m.clone()).absolute(0);
    gauge!(EXPIRED_OPEN_ORDERS, "mch_id" => m.clone()).set(0.0);
    for outcome in NotifyOutcome::ALL {
        counter!(NOTIFY_REQUESTS, "mch_id" => m.clone(), "outcome" => outcome.as_str()).absolute(0);
    }
    for outcome in CloseOutcome::all() {
        counter!(CLOSEORDER_REQUESTS, "mch_id" => m.clone(), "outcome" => outcome.as_str())
            .absolute(0);
    }
    for outcome in QueryOutcome::all() {
        counter!(ORDERQUERY_REQUESTS, "mch_id" => m.clone(), "outcome" => outcome.as_str())
            .absolute(0);
    }
    for source in ["answer", "notification"] {
        for reason in UNVERIFIED_REASONS {
            counter!(UNVERIFIED, "mch_id" => m.clone(), "source" => source, "reason" => reason)
                .absolute(0);
        }
    }
    for name in [
        OPEN_REFUNDS,
        STUCK_REFUNDS,
        OLDEST_OPEN_REFUND_AGE,
        ABNORMAL_REFUNDS,
        AMOUNT_MISMATCH_REFUNDS,
    ] {
        gauge!(name, "mch_id" => m.clone()).set(0.0);
    }
    for outcome in RefundQueryOutcome::all() {
        counter!(REFUNDQUERY_REQUESTS, "mch_id" => m.clone(), "outcome" => outcome.as_str())
            .absolute(0);
    }
    for to in RefundState::ALL.into_iter().filter(|s| !s.is_open()) {
        for source in [Source::Poll, Source::Notify, Source::Manual, Source::Bill] {
            counter!(REFUND_TRANSITIONS, "mch_id" => m.clone(), "to" => to.as_str(), "source" => source.as_str())
                .absolute(0);
        }
    }
}

/// The `reason` of `bill_fetch_errors_total`: why a day's bill was not reconciled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillFailure {
    /// No answer, or a retryable one (timeout, 5xx, an expired download URL).
    Transport,
    /// WeChat refused the request (a bad date, no permission): a person must look.
    Rejected,
    /// The download's SHA-1 differs from the hash WeChat gave: refused.
    HashMismatch,
    /// The rows do not add up to the bill's summary line: refused.
    SummaryMismatch,
    /// The text is not a trade bill this program can read: refused, naming the line.
    Malformed,
    /// Rows of another merchant: refused.
    WrongMerchant,
}

impl BillFailure {
    pub const ALL: [BillFailure; 6] = [
        BillFailure::Transport,
        BillFailure::Rejected,
        BillFailure::HashMismatch,
        BillFailure::SummaryMismatch,
        BillFailure::Malformed,
        BillFailure::WrongMerchant,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BillFailure::Transport => "transport",
            BillFailure::Rejected => "rejected",
            BillFailure::HashMismatch => "hash_mismatch",
            BillFailure::SummaryMismatch => "summary_mismatch",
            BillFailure::Malformed => "malformed",
            BillFailure::WrongMerchant => "wrong_merchant",
        }
    }

    /// Whether the bill itself was refused (rather than not fetched).
    pub fn is_refusal(self) -> bool {
        !matches!(self, BillFailure::Transport | BillFailure::Rejected)
    }
}

/// What the gauges of one merchant's last reconciled bill show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BillGauges {
    /// The bill day, as the Unix time of its start (00:00 Beijing).
    pub day_start_unix: i64,
    /// The day's total fee, in thousandths of a fen.
    pub fee_milli_fen: i64,
    /// Findings by kind (every kind; missing ones are 0).
    pub findings: Vec<(crate::store::FindingKind, i64)>,
}

/// The `outcome` of `refundquery_requests_total`: a verified answer (`ok`), WeChat knowing no
/// such refund (`not_exist`), or why there was none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundQueryOutcome {
    Ok,
    NotExist,
    Failed(Failure),
}

impl RefundQueryOutcome {
    pub fn all() -> impl Iterator<Item = RefundQueryOutcome> {
        [RefundQueryOutcome::Ok, RefundQueryOutcome::NotExist]
            .into_iter()
            .chain(Failure::ALL.map(RefundQueryOutcome::Failed))
    }

    pub fn of(outcome: &Result<RefundAnswer, GatewayError>) -> RefundQueryOutcome {
        match outcome {
            Ok(RefundAnswer::Refund(_)) => RefundQueryOutcome::Ok,
            Ok(RefundAnswer::NotExist) => RefundQueryOutcome::NotExist,
            Err(e) => RefundQueryOutcome::Failed(e.failure()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RefundQueryOutcome::Ok => "ok",
            RefundQueryOutcome::NotExist => "not_exist",
            RefundQueryOutcome::Failed(f) => f.as_str(),
        }
    }
}

const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const SCAN_BUCKETS: [f64; 11] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const CLAIM_BUCKETS: [f64; 9] = [0.0, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0];

impl Telemetry {
    /// A fresh recorder with every metric described, and the per-merchant series at zero so
    /// dashboards and `absent()` alerts see them from the first scrape.
    pub fn new<'a>(merchants: impl IntoIterator<Item = &'a str>) -> Telemetry {
        let builder = PrometheusBuilder::new();
        let builder = [
            (names::ORDERQUERY_DURATION, &LATENCY_BUCKETS[..]),
            (names::SCAN_DURATION, &SCAN_BUCKETS[..]),
            (names::SCAN_CLAIMED, &CLAIM_BUCKETS[..]),
            (names::NOTIFY_DURATION, &LATENCY_BUCKETS[..]),
        ]
        .into_iter()
        .fold(builder, |b, (name, buckets)| {
            // Only fails for an empty bucket list, and these are constants.
            b.set_buckets_for_metric(Matcher::Full(name.to_owned()), buckets)
                .unwrap_or_else(|_| unreachable!("non-empty buckets"))
        });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let t = Telemetry {
            inner: Arc::new(Inner {
                recorder,
                handle,
                merchants: merchants.into_iter().map(str::to_owned).collect(),
                refusals: RefusalLog::default(),
            }),
        };
        t.with(|| {
            describe_all();
            zero_series(&t.inner.merchants);
        });
        t
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.inner.recorder, f)
    }

    /// A bounded `mch_id` label: configured merchants by name, anything else `unknown`.
    pub fn mch_label(&self, mch_id: &str) -> String {
        if self.inner.merchants.contains(mch_id) {
            mch_id.to_owned()
        } else {
            "unknown".to_owned()
        }
    }

    /// Folds recorded histogram samples into their buckets. Without it (or a render), samples
    /// pile up in memory between scrapes; the gauge loop calls it on every tick.
    pub fn upkeep(&self) {
        self.inner.handle.run_upkeep();
    }

    /// The Prometheus text exposition of this daemon's metrics.
    pub fn render(&self) -> String {
        self.inner.handle.run_upkeep();
        self.inner.handle.render()
    }

    /// An orderquery answered or failed: counted by outcome with its latency, the trade state
    /// WeChat answered counted, a failure logged (a warning when it looks like a wrong key or
    /// a forgery).
    pub fn orderquery(
        &self,
        mch_id: &str,
        out_trade_no: &str,
        outcome: &Result<QueryAnswer, GatewayError>,
        elapsed: Duration,
    ) {
        let m = self.mch_label(mch_id);
        let label = QueryOutcome::of(outcome).as_str();
        match outcome {
            Ok(QueryAnswer::Order(report)) => {
                let state = report.trade_state.label();
                tracing::debug!(
                    mch_id,
                    out_trade_no,
                    trade_state = state,
                    "orderquery answered"
                );
                self.with(|| {
                    counter!(names::TRADE_STATE, "mch_id" => m.clone(), "trade_state" => state)
                        .increment(1)
                });
            }
            Ok(QueryAnswer::NotExist) => {
                tracing::debug!(mch_id, out_trade_no, "orderquery answered ORDERNOTEXIST");
            }
            Err(error) if error.is_suspicious() => {
                tracing::warn!(%error, mch_id, out_trade_no, outcome = label, "orderquery reply rejected");
            }
            Err(error) => {
                tracing::info!(%error, mch_id, out_trade_no, outcome = label, "orderquery failed; will retry");
            }
        }
        if let Err(e) = outcome {
            self.unverified_answer(&m, e);
        }
        self.with(|| {
            counter!(names::ORDERQUERY_REQUESTS, "mch_id" => m.clone(), "outcome" => label)
                .increment(1);
            histogram!(names::ORDERQUERY_DURATION, "mch_id" => m).record(elapsed.as_secs_f64());
        });
    }

    pub fn transition(
        &self,
        mch_id: &str,
        out_trade_no: &str,
        from: OrderState,
        to: OrderState,
        source: Source,
    ) {
        tracing::info!(
            mch_id,
            out_trade_no,
            from = from.as_str(),
            to = to.as_str(),
            source = source.as_str(),
            "order settled"
        );
        self.with(|| {
            counter!(names::TRANSITIONS, "from" => from.as_str(), "to" => to.as_str(), "source" => source.as_str())
                .increment(1)
        });
        if to == OrderState::AmountMismatch {
            let m = self.mch_label(mch_id);
            tracing::error!(
                mch_id,
                out_trade_no,
                "WeChat reports another amount than the order's: quarantined as AMOUNT_MISMATCH"
            );
            self.with(|| counter!(names::AMOUNT_MISMATCH, "mch_id" => m).increment(1));
        }
    }

    /// A refund query answered or failed: counted by outcome, a failure logged.
    pub fn refundquery(
        &self,
        mch_id: &str,
        out_refund_no: &str,
        outcome: &Result<RefundAnswer, GatewayError>,
    ) {
        let m = self.mch_label(mch_id);
        let label = RefundQueryOutcome::of(outcome).as_str();
        match outcome {
            Ok(RefundAnswer::Refund(report)) => {
                tracing::debug!(
                    mch_id,
                    out_refund_no,
                    status = report.status.label(),
                    "refund query answered"
                );
            }
            Ok(RefundAnswer::NotExist) => {
                tracing::debug!(
                    mch_id,
                    out_refund_no,
                    "refund query: WeChat knows no such refund"
                );
            }
            Err(error) if error.is_suspicious() => {
                tracing::warn!(%error, mch_id, out_refund_no, outcome = label, "refund query reply rejected");
            }
            Err(error) => {
                tracing::info!(%error, mch_id, out_refund_no, outcome = label, "refund query failed; will retry");
            }
        }
        if let Err(e) = outcome {
            self.unverified_answer(&m, e);
        }
        self.with(|| {
            counter!(names::REFUNDQUERY_REQUESTS, "mch_id" => m, "outcome" => label).increment(1)
        });
    }

    /// The refund gauges of one configured merchant (zeros when it has no such refund).
    pub fn refund_gauges(
        &self,
        mch_id: &str,
        summary: Option<&crate::store::RefundSummary>,
        now: chrono::DateTime<chrono::Utc>,
    ) {
        let m = self.mch_label(mch_id);
        let get = |f: fn(&crate::store::RefundSummary) -> i64| summary.map_or(0.0, |s| f(s) as f64);
        let oldest = summary
            .and_then(|s| s.oldest_open)
            .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
        self.with(|| {
            gauge!(names::OPEN_REFUNDS, "mch_id" => m.clone()).set(get(|s| s.open));
            gauge!(names::STUCK_REFUNDS, "mch_id" => m.clone()).set(get(|s| s.stuck));
            gauge!(names::OLDEST_OPEN_REFUND_AGE, "mch_id" => m.clone()).set(oldest);
            gauge!(names::ABNORMAL_REFUNDS, "mch_id" => m.clone()).set(get(|s| s.abnormal));
            gauge!(names::AMOUNT_MISMATCH_REFUNDS, "mch_id" => m).set(get(|s| s.amount_mismatch));
        });
    }

    /// The bill series of the merchants whose bills are reconciled, at zero (the day gauge at
    /// 0 means "never reconciled", which the missing-bill alert catches).
    pub fn zero_bill_series<'a>(&self, merchants: impl IntoIterator<Item = &'a str>) {
        for m in merchants {
            let m = self.mch_label(m);
            self.with(|| {
                for kind in crate::store::FindingKind::ALL {
                    gauge!(names::BILL_FINDINGS, "mch_id" => m.clone(), "kind" => kind.as_str())
                        .set(0.0);
                }
                gauge!(names::LAST_RECONCILED_BILL_DAY, "mch_id" => m.clone()).set(0.0);
                gauge!(names::BILL_FEE, "mch_id" => m.clone()).set(0.0);
                for reason in BillFailure::ALL {
                    counter!(names::BILL_FETCH_ERRORS, "mch_id" => m.clone(), "reason" => reason.as_str())
                        .absolute(0);
                }
            });
        }
    }

    /// The gauges of a merchant's last reconciled bill.
    pub fn bill_gauges(&self, mch_id: &str, g: &BillGauges) {
        let m = self.mch_label(mch_id);
        self.with(|| {
            for kind in crate::store::FindingKind::ALL {
                let n = g
                    .findings
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .map_or(0, |(_, n)| *n);
                gauge!(names::BILL_FINDINGS, "mch_id" => m.clone(), "kind" => kind.as_str())
                    .set(n as f64);
            }
            gauge!(names::LAST_RECONCILED_BILL_DAY, "mch_id" => m.clone())
                .set(g.day_start_unix as f64);
            gauge!(names::BILL_FEE, "mch_id" => m).set(g.fee_milli_fen as f64 / 1000.0);
        });
    }

    /// A day's bill was not reconciled: logged (an error for a refused bill, a warning for a
    /// failed fetch, which is retried) and counted by reason.
    pub fn bill_failed(
        &self,
        mch_id: &str,
        bill_date: chrono::NaiveDate,
        failure: BillFailure,
        error: &str,
    ) {
        let m = self.mch_label(mch_id);
        let date = bill_date.to_string();
        if failure.is_refusal() {
            tracing::error!(mch_id, bill_date = %date, reason = failure.as_str(), error, "daily bill refused: nothing of it was applied");
        } else {
            tracing::warn!(mch_id, bill_date = %date, reason = failure.as_str(), error, "daily bill not fetched; will retry");
        }
        self.with(|| {
            counter!(names::BILL_FETCH_ERRORS, "mch_id" => m, "reason" => failure.as_str())
                .increment(1)
        });
    }

    /// One finding of a bill run that a person must see (`local_only`, `amount_diff`,
    /// `remote_only`, `paid_after_close`, `state_diff`): logged; the gauges count them once
    /// the run ends.
    pub fn bill_finding(
        &self,
        mch_id: &str,
        bill_date: chrono::NaiveDate,
        kind: crate::store::FindingKind,
        number: &str,
        detail: &str,
    ) {
        use crate::store::FindingKind as K;
        let date = bill_date.to_string();
        let number = crate::text::quote(number);
        match kind {
            K::LocalOnly => {
                tracing::error!(mch_id, bill_date = %date, kind = kind.as_str(), number = %number, detail, "paid here but absent from WeChat's bill: the shop may have shipped for money it does not have")
            }
            K::AmountDiff => {
                tracing::error!(mch_id, bill_date = %date, kind = kind.as_str(), number = %number, detail, "the bill's amount differs from the shop's")
            }
            K::SettledByBill => {
                tracing::info!(mch_id, bill_date = %date, kind = kind.as_str(), number = %number, "settled by the daily bill (its notification and queries were lost)")
            }
            K::RemoteOnly | K::StateDiff | K::PaidAfterClose => {
                tracing::warn!(mch_id, bill_date = %date, kind = kind.as_str(), number = %number, detail, "the bill disagrees with the shop's tables")
            }
        }
    }

    /// A refund reached a final state (and, for a success, maybe its order `REFUND`).
    pub fn refund_finished(
        &self,
        mch_id: &str,
        out_refund_no: &str,
        to: RefundState,
        source: Source,
        order_refunded: bool,
    ) {
        let m = self.mch_label(mch_id);
        match to {
            RefundState::AmountMismatch => tracing::error!(
                mch_id,
                out_refund_no,
                source = source.as_str(),
                "WeChat's refund does not match the row (or would refund more than the order): quarantined as AMOUNT_MISMATCH"
            ),
            RefundState::Abnormal => tracing::error!(
                mch_id,
                out_refund_no,
                source = source.as_str(),
                "refund ABNORMAL: the money could not reach the payer; a person must act"
            ),
            _ => tracing::info!(
                mch_id,
                out_refund_no,
                to = to.as_str(),
                source = source.as_str(),
                order_refunded,
                "refund settled"
            ),
        }
        self.with(|| {
            counter!(names::REFUND_TRANSITIONS, "mch_id" => m, "to" => to.as_str(), "source" => source.as_str())
                .increment(1)
        });
    }

    pub fn noop(&self, mch_id: &str, out_trade_no: &str, source: Source) {
        tracing::info!(
            mch_id,
            out_trade_no,
            source = source.as_str(),
            "order already moved by another writer; nothing recorded"
        );
        self.with(|| counter!(names::NOOP, "source" => source.as_str()).increment(1));
    }

    pub fn gave_up(&self, mch_id: &str, out_trade_no: &str, reason: &str) {
        let m = self.mch_label(mch_id);
        tracing::warn!(
            mch_id,
            out_trade_no,
            reason,
            "stopped polling an unpaid order"
        );
        self.with(|| counter!(names::GAVE_UP, "mch_id" => m).increment(1));
    }

    /// An order set aside: a value in its row cannot be used, so it is neither queried nor
    /// settled until a person fixes it. Counted by the `set_aside_orders` gauge (from the
    /// database, so it survives restarts); the names come from the merchant's table and are
    /// quoted.
    pub fn set_aside(
        &self,
        mch_id: Option<&str>,
        out_trade_no: Option<&str>,
        order_id: i64,
        reason: &str,
    ) {
        tracing::warn!(
            mch_id = %crate::text::quote(mch_id.unwrap_or("?")),
            out_trade_no = %crate::text::quote(out_trade_no.unwrap_or("?")),
            order_id,
            reason = %crate::text::quote_with(reason, 300),
            "order set aside: a value in its row cannot be used; fix the row, then clear set_aside_at"
        );
    }

    pub fn scan_finished(&self, elapsed: Duration, claimed: usize, completed_at_unix: f64) {
        tracing::debug!(
            claimed,
            elapsed_ms = elapsed.as_millis() as u64,
            "scan finished"
        );
        self.with(|| {
            histogram!(names::SCAN_DURATION).record(elapsed.as_secs_f64());
            histogram!(names::SCAN_CLAIMED).record(claimed as f64);
            gauge!(names::LAST_SCAN_SUCCESS).set(completed_at_unix);
        });
    }

    /// A tick that found the previous scan still running. Normal while a backlog drains (a
    /// scan keeps claiming while batches come back full), so it is counted and logged at
    /// debug level; a scan that stops progressing is the watchdog's business.
    pub fn scan_skipped(&self) {
        tracing::debug!("scan tick skipped: the previous scan is still running");
        self.with(|| counter!(names::SCAN_OVERLAP_SKIPPED).increment(1));
    }

    pub fn db_error(&self, op: DbOp, error: &crate::store::StoreError) {
        let op = op.as_str();
        tracing::warn!(%error, op, "database error");
        self.with(|| counter!(names::DB_ERRORS, "op" => op).increment(1));
    }

    /// Sets the order gauges of one merchant (open, stuck, expired, oldest, AMOUNT_MISMATCH,
    /// set aside).
    pub fn open_orders(&self, mch_id: &str, summary: &OpenCounts) {
        let m = self.mch_label(mch_id);
        let OpenCounts {
            open,
            stuck,
            expired,
            oldest_age,
            amount_mismatch,
            set_aside,
        } = *summary;
        self.with(|| {
            gauge!(names::OPEN_ORDERS, "mch_id" => m.clone()).set(open as f64);
            gauge!(names::STUCK_ORDERS, "mch_id" => m.clone()).set(stuck as f64);
            gauge!(names::EXPIRED_OPEN_ORDERS, "mch_id" => m.clone()).set(expired as f64);
            gauge!(names::AMOUNT_MISMATCH_ORDERS, "mch_id" => m.clone())
                .set(amount_mismatch as f64);
            gauge!(names::SET_ASIDE_ORDERS, "mch_id" => m.clone()).set(set_aside as f64);
            gauge!(names::OLDEST_UNPAID_AGE, "mch_id" => m).set(oldest_age.as_secs_f64());
        });
    }
}

/// Refusal lines of the notify endpoint written per outcome and second, at most.
pub const REFUSAL_LINES_PER_SECOND: u32 = 10;
/// The most characters of a refusal's reason a log line keeps.
const REFUSAL_REASON_CHARS: usize = 320;

/// The refusal lines written in the current second, per outcome (a bounded set of labels).
#[derive(Default)]
struct RefusalLog {
    windows: std::sync::Mutex<std::collections::HashMap<NotifyOutcome, RefusalWindow>>,
}

struct RefusalWindow {
    started: std::time::Instant,
    lines: u32,
    suppressed: u64,
}

impl RefusalLog {
    /// `Some(lines left out since the last one written)` when this refusal may be logged.
    fn admit(&self, outcome: NotifyOutcome, now: std::time::Instant) -> Option<u64> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = windows.entry(outcome).or_insert(RefusalWindow {
            started: now,
            lines: 0,
            suppressed: 0,
        });
        if now.duration_since(w.started) >= Duration::from_secs(1) {
            w.started = now;
            w.lines = 0;
        }
        if w.lines < REFUSAL_LINES_PER_SECOND {
            w.lines += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// Which listener: the `listener` label of `listener_refused_connections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Metrics,
    Notify,
}

impl Listener {
    pub const ALL: [Listener; 2] = [Listener::Metrics, Listener::Notify];

    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Metrics => "metrics",
            Listener::Notify => "notify",
        }
    }
}

/// One merchant's open orders, for [`Telemetry::open_orders`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenCounts {
    pub open: i64,
    pub stuck: i64,
    pub expired: i64,
    pub oldest_age: Duration,
    /// Orders in state AMOUNT_MISMATCH (any age): the mismatch alert fires while it is > 0.
    pub amount_mismatch: i64,
    /// Orders set aside because a value in their row cannot be used.
    pub set_aside: i64,
}

impl Telemetry {
    /// A notification answered (`mch_id` of a configured merchant, else `unknown`), with the
    /// reason when it was refused. Anyone can post to the endpoint, so a refusal's reason is
    /// quoted bounded and escaped, and at most [`REFUSAL_LINES_PER_SECOND`] refusal lines per
    /// outcome are written each second; the next line written says how many were left out
    /// (`suppressed`). The metric counts every answer.
    pub fn notify(
        &self,
        mch_id: Option<&str>,
        outcome: NotifyOutcome,
        refusal: Option<&str>,
        elapsed: Duration,
    ) {
        if let Some(reason) = refusal {
            self.notify_refused(mch_id, outcome, reason);
        }
        let m = self.mch_label(mch_id.unwrap_or_default());
        self.with(|| {
            counter!(names::NOTIFY_REQUESTS, "mch_id" => m.clone(), "outcome" => outcome.as_str())
                .increment(1);
            histogram!(names::NOTIFY_DURATION, "mch_id" => m).record(elapsed.as_secs_f64());
        });
    }

    /// The log line of a refused notification, rate-limited.
    fn notify_refused(&self, mch_id: Option<&str>, outcome: NotifyOutcome, reason: &str) {
        let Some(suppressed) = self
            .inner
            .refusals
            .admit(outcome, std::time::Instant::now())
        else {
            return;
        };
        let suppressed = (suppressed > 0).then_some(suppressed);
        let mch_id = mch_id.unwrap_or_default();
        let reason = crate::text::quote_with(reason, REFUSAL_REASON_CHARS);
        let label = outcome.as_str();
        if outcome.is_suspicious() {
            tracing::warn!(mch_id, outcome = label, %reason, suppressed, "notification refused");
        } else {
            tracing::info!(mch_id, outcome = label, %reason, suppressed, "notification refused");
        }
    }

    /// A closeorder answered or failed, for an expired order: logged and counted.
    pub fn closeorder(
        &self,
        mch_id: &str,
        out_trade_no: &str,
        outcome: &Result<CloseAnswer, GatewayError>,
    ) {
        let label = CloseOutcome::of(outcome).as_str();
        match outcome {
            Ok(_) => tracing::info!(
                mch_id,
                out_trade_no,
                outcome = label,
                "closeorder for an expired order"
            ),
            Err(error) => tracing::info!(
                mch_id,
                out_trade_no,
                outcome = label,
                %error,
                "closeorder for an expired order"
            ),
        }
        let m = self.mch_label(mch_id);
        if let Err(e) = outcome {
            self.unverified_answer(&m, e);
        }
        self.with(|| {
            counter!(names::CLOSEORDER_REQUESTS, "mch_id" => m, "outcome" => label).increment(1)
        });
    }

    /// Counts why an answer was not verified (already logged with its call).
    fn unverified_answer(&self, m: &str, error: &GatewayError) {
        if let Some(reason) = error.reason() {
            self.with(|| {
                counter!(names::UNVERIFIED, "mch_id" => m.to_owned(), "source" => "answer", "reason" => reason)
                    .increment(1)
            });
        }
    }

    /// Counts why a notification was not verified (logged by [`Telemetry::notify`]).
    pub fn unverified_notification(&self, mch_id: Option<&str>, reason: &'static str) {
        let m = self.mch_label(mch_id.unwrap_or_default());
        self.with(|| {
            counter!(names::UNVERIFIED, "mch_id" => m, "source" => "notification", "reason" => reason)
                .increment(1)
        });
    }

    /// The API each configured merchant speaks (`merchant_info`), for dashboards.
    pub fn merchant_apis<'a>(&self, merchants: impl IntoIterator<Item = (&'a str, Api)>) {
        self.with(|| {
            for (m, api) in merchants {
                gauge!(names::MERCHANT_INFO, "mch_id" => m.to_owned(), "api" => api.as_str())
                    .set(1.0);
                if api == Api::V3 {
                    counter!(names::CERT_DOWNLOADS, "mch_id" => m.to_owned(), "outcome" => "ok").absolute(0);
                    counter!(names::CERT_DOWNLOADS, "mch_id" => m.to_owned(), "outcome" => "public_key_only").absolute(0);
                    counter!(names::CERT_DOWNLOADS, "mch_id" => m.to_owned(), "outcome" => "error").absolute(0);
                    gauge!(names::CLOCK_SKEW, "mch_id" => m.to_owned()).set(0.0);
                }
            }
        });
    }

    /// The skew WeChat's last correctly signed v3 message showed.
    pub fn clock_skew(&self, mch_id: &str, skew_seconds: i64) {
        let m = self.mch_label(mch_id);
        self.with(|| gauge!(names::CLOCK_SKEW, "mch_id" => m).set(skew_seconds as f64));
    }

    /// A platform certificate download: the certificates now held (serial, expiry).
    pub fn certificates_downloaded(
        &self,
        mch_id: &str,
        held: &[(String, chrono::DateTime<chrono::Utc>)],
    ) {
        let m = self.mch_label(mch_id);
        let serials: Vec<&str> = held.iter().map(|(s, _)| s.as_str()).collect();
        tracing::info!(
            mch_id,
            ?serials,
            "WeChat Pay platform certificates downloaded"
        );
        self.with(|| {
            counter!(names::CERT_DOWNLOADS, "mch_id" => m.clone(), "outcome" => "ok").increment(1);
            for (serial, expiry) in held {
                gauge!(names::CERT_EXPIRY, "mch_id" => m.clone(), "serial" => serial.clone())
                    .set(expiry.timestamp() as f64);
            }
        });
    }

    /// `GET /v3/certificates` said RESOURCE_NOT_EXISTS: the merchant has only the WeChat Pay
    /// public key. Said once at start-up; the job does not ask again.
    pub fn certificates_public_key_only(&self, mch_id: &str, has_public_key: bool) {
        let m = self.mch_label(mch_id);
        if has_public_key {
            tracing::warn!(
                mch_id,
                "merchant has no WeChat Pay platform certificate (RESOURCE_NOT_EXISTS): verifying with the WeChat Pay public key only; set platform_certificates = \"off\" to stop asking"
            );
        } else {
            tracing::error!(
                mch_id,
                "merchant has no WeChat Pay platform certificate (RESOURCE_NOT_EXISTS) and no wechatpay_public_key_file is configured: no v3 answer can be verified; configure the WeChat Pay public key"
            );
        }
        self.with(|| {
            counter!(names::CERT_DOWNLOADS, "mch_id" => m, "outcome" => "public_key_only")
                .increment(1)
        });
    }

    /// A platform certificate download that failed; the job tries again later.
    pub fn certificates_failed(&self, mch_id: &str, error: &GatewayError) {
        let m = self.mch_label(mch_id);
        tracing::warn!(%error, mch_id, "WeChat Pay platform certificate download failed; will retry");
        self.unverified_answer(&m, error);
        self.with(|| {
            counter!(names::CERT_DOWNLOADS, "mch_id" => m, "outcome" => "error").increment(1)
        });
    }

    /// A verified payment for an order closed locally, recorded once.
    pub fn paid_after_close(
        &self,
        mch_id: &str,
        out_trade_no: &str,
        transaction_id: Option<&str>,
        total_fee: Option<i64>,
        source: Source,
    ) {
        tracing::error!(
            mch_id,
            out_trade_no,
            transaction_id,
            total_fee,
            source = source.as_str(),
            "PAID_AFTER_CLOSE: WeChat took a payment for an order closed here; refund or fulfil it"
        );
        let m = self.mch_label(mch_id);
        self.with(|| counter!(names::PAID_AFTER_CLOSE, "mch_id" => m).increment(1));
    }

    /// A configuration reload (SIGHUP).
    pub fn config_reload(&self, result: Result<(), &str>) {
        let outcome = match result {
            Ok(()) => {
                tracing::info!("configuration reloaded");
                "ok"
            }
            Err(error) => {
                tracing::error!(
                    error,
                    "configuration reload failed; keeping the running settings"
                );
                "error"
            }
        };
        self.with(|| counter!(names::CONFIG_RELOADS, "outcome" => outcome).increment(1));
    }

    /// A connection closed because its listener was at `max_connections` (the oldest one not
    /// in a request, or the new one). Counted only: the listener logs it, rate-limited.
    pub fn listener_refused(&self, listener: &'static str) {
        self.with(|| counter!(names::LISTENER_REFUSED, "listener" => listener).increment(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Currency, Fen, OutTradeNo, TransactionId};
    use crate::gateway::report::TradeReport;
    use crate::reconcile::policy::{self, Decision, OrderView, Policy};
    use chrono::{TimeDelta, Utc};

    const MCH: &str = "1900000109";

    /// The value of the sample line `series` (name and labels, exactly as rendered).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_metric_and_its_known_series_exist_at_zero_before_any_event() {
        let t = Telemetry::new([MCH]);
        let text = t.render();
        use names::*;
        for name in [
            STUCK_ORDERS,
            OLDEST_UNPAID_AGE,
            OPEN_ORDERS,
            ORDERQUERY_REQUESTS,
            ORDERQUERY_DURATION,
            TRADE_STATE,
            TRANSITIONS,
            NOOP,
            AMOUNT_MISMATCH,
            GAVE_UP,
            SCAN_DURATION,
            SCAN_CLAIMED,
            SCAN_OVERLAP_SKIPPED,
            LAST_SCAN_SUCCESS,
            DB_ERRORS,
            BUILD_INFO,
            NOTIFY_REQUESTS,
            NOTIFY_DURATION,
            CLOSEORDER_REQUESTS,
            EXPIRED_OPEN_ORDERS,
            PAID_AFTER_CLOSE,
            CONFIG_RELOADS,
            AMOUNT_MISMATCH_ORDERS,
            SET_ASIDE_ORDERS,
        ] {
            let sampled = text
                .lines()
                .any(|l| l.starts_with(name) && !l.starts_with('#'));
            assert!(sampled, "{name} has no series:\n{text}");
        }
        let m = format!("mch_id=\"{MCH}\"");
        let mut zero = vec![
            format!("{ORDERQUERY_DURATION}_count{{{m}}}"),
            format!("{ORDERQUERY_DURATION}_bucket{{{m},le=\"+Inf\"}}"),
            format!("{NOTIFY_DURATION}_count{{{m}}}"),
            format!("{NOTIFY_DURATION}_count{{mch_id=\"unknown\"}}"),
            format!("{SCAN_DURATION}_count"),
            format!("{SCAN_CLAIMED}_count"),
            format!("{AMOUNT_MISMATCH_ORDERS}{{{m}}}"),
            format!("{SET_ASIDE_ORDERS}{{{m}}}"),
            format!("{NOTIFY_REQUESTS}{{mch_id=\"unknown\",outcome=\"unknown_merchant\"}}"),
        ];
        zero.extend(
            trade_state_labels().map(|s| format!("{TRADE_STATE}{{{m},trade_state=\"{s}\"}}")),
        );
        zero.extend(transition_series().into_iter().map(|(from, to, source)| {
            format!("{TRANSITIONS}{{from=\"{from}\",to=\"{to}\",source=\"{source}\"}}")
        }));
        zero.extend(DbOp::ALL.map(|op| format!("{DB_ERRORS}{{op=\"{}\"}}", op.as_str())));
        for series in &zero {
            assert_eq!(sample(&text, series), Some(0.0), "{series}:\n{text}");
        }
        assert!(zero.contains(&format!(
            "{TRANSITIONS}{{from=\"NOTPAY\",to=\"SUCCESS\",source=\"poll\"}}"
        )));
        // Bounded: every configured merchant, `unknown`, and nothing else.
        for line in text.lines().filter(|l| l.contains("mch_id=")) {
            assert!(
                line.contains(&m) || line.contains("mch_id=\"unknown\""),
                "{line}"
            );
        }
    }

    #[test]
    fn unconfigured_merchants_count_under_unknown() {
        let t = Telemetry::new([MCH]);
        let paid = QueryAnswer::Order(TradeReport {
            out_trade_no: OutTradeNo::parse("o1").unwrap(),
            trade_state: TradeState::Success,
            state_desc: None,
            transaction_id: Some(TransactionId::parse("4200000001").unwrap()),
            amount: Fen::new(1).ok(),
            currency: Currency::cny(),
            payer_amount: None,
            paid_at: Some(Utc::now()),
            appid: None,
        });
        t.orderquery("1234567890", "o1", &Ok(paid), Duration::from_millis(3));
        let text = t.render();
        let series = format!(
            "{}{{mch_id=\"unknown\",trade_state=\"SUCCESS\"}}",
            names::TRADE_STATE
        );
        assert_eq!(sample(&text, &series), Some(1.0), "{text}");
        assert!(!text.contains("1234567890"), "{text}");
    }

    #[test]
    fn open_orders_exports_the_mismatch_and_set_aside_gauges() {
        let t = Telemetry::new([MCH, "10000100"]);
        let counts = OpenCounts {
            open: 7,
            amount_mismatch: 2,
            set_aside: 3,
            ..OpenCounts::default()
        };
        t.open_orders(MCH, &counts);
        let text = t.render();
        let gauge = |name: &str, mch: &str| sample(&text, &format!("{name}{{mch_id=\"{mch}\"}}"));
        assert_eq!(gauge(names::OPEN_ORDERS, MCH), Some(7.0));
        assert_eq!(gauge(names::AMOUNT_MISMATCH_ORDERS, MCH), Some(2.0));
        assert_eq!(gauge(names::SET_ASIDE_ORDERS, MCH), Some(3.0));
        assert_eq!(gauge(names::AMOUNT_MISMATCH_ORDERS, "10000100"), Some(0.0));
        assert_eq!(gauge(names::SET_ASIDE_ORDERS, "10000100"), Some(0.0));
        // Back to zero when the orders are dealt with (a gauge, not a counter).
        t.open_orders(MCH, &OpenCounts::default());
        let text = t.render();
        let series = format!("{}{{mch_id=\"{MCH}\"}}", names::AMOUNT_MISMATCH_ORDERS);
        assert_eq!(sample(&text, &series), Some(0.0));
    }

    /// Every settlement the policy can decide, for each open state and each answer WeChat can
    /// give, lands on a pre-registered `transitions_total` series: no panel or rate() rule
    /// meets a series that appears only after its first event.
    #[test]
    fn transition_series_cover_every_move_the_policy_makes() {
        let series = transition_series();
        let registered = |from: OrderState, to: OrderState, source: Source| {
            assert!(
                series.contains(&(from, to, source)),
                "{from} -> {to} ({source}) is not pre-registered"
            );
        };
        let t0 = Utc::now() - TimeDelta::hours(3);
        let fee = |f: i64| Fen::new(f).unwrap_or_else(|_| unreachable!());
        let report = |state: TradeState, total_fee: Option<i64>| {
            Ok(QueryAnswer::Order(TradeReport {
                out_trade_no: OutTradeNo::parse("o1").unwrap(),
                trade_state: state,
                state_desc: None,
                transaction_id: Some(TransactionId::parse("4200000001").unwrap()),
                amount: total_fee.map(fee),
                currency: Currency::cny(),
                payer_amount: None,
                paid_at: Some(t0),
                appid: None,
            }))
        };
        let policy = Policy::default();
        let mut answers = vec![Ok(QueryAnswer::NotExist)];
        for state in trade_state_labels() {
            for total_fee in [Some(100), Some(99), None] {
                answers.push(report(TradeState::parse(state), total_fee));
            }
        }
        let moved = |d: &Decision| match d {
            Decision::Settle(s) | Decision::Quarantine(s) => Some(s.to),
            _ => None,
        };
        let mut seen = HashSet::new();
        for from in OrderState::ALL {
            for expires_at in [None, Some(t0), Some(Utc::now() + TimeDelta::hours(1))] {
                let order = OrderView {
                    state: from,
                    total_fee: fee(100),
                    fee_type: "CNY".into(),
                    appid: "wxd930ea5d5a258f4f".into(),
                    created_at: t0,
                    expires_at,
                    query_count: 3,
                };
                for answer in &answers {
                    let d = policy::decide(&order, answer, Utc::now(), 0.5, &policy);
                    if let Some(to) = moved(&d) {
                        registered(from, to, Source::Poll);
                        seen.insert((from, to, Source::Poll));
                        // A notification, and a bill's payment row, are read as a SUCCESS
                        // report.
                        let notified = matches!(answer, Ok(QueryAnswer::Order(r)) if r.trade_state == TradeState::Success);
                        if notified {
                            for source in [Source::Notify, Source::Bill] {
                                registered(from, to, source);
                                seen.insert((from, to, source));
                            }
                        }
                    }
                }
                // The scan closes only what `should_close` picks (open and expired).
                let closes = if policy.should_close(&order, Utc::now()) {
                    &CloseAnswer::ALL[..]
                } else {
                    &[]
                };
                for close in closes {
                    let d = policy::decide_close(&order, &Ok(*close), Utc::now(), 0.5, &policy);
                    if let Some(to) = d.as_ref().and_then(moved) {
                        registered(from, to, Source::Expire);
                        seen.insert((from, to, Source::Expire));
                    }
                }
            }
        }
        // And nothing pre-registered is impossible (a zero series for it would be noise).
        for s in &series {
            assert!(
                seen.contains(s),
                "{s:?} is registered but the policy never makes it"
            );
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn refusal_lines_are_limited_per_outcome_and_second_and_count_what_they_left_out() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        for _ in 0..REFUSAL_LINES_PER_SECOND {
            assert_eq!(log.admit(NotifyOutcome::Malformed, t0), Some(0));
        }
        assert_eq!(log.admit(NotifyOutcome::Malformed, t0), None);
        assert_eq!(log.admit(NotifyOutcome::Malformed, t0), None);
        // Another outcome has its own budget.
        assert_eq!(log.admit(NotifyOutcome::SignInvalid, t0), Some(0));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.admit(NotifyOutcome::Malformed, t1), Some(2));
        assert_eq!(log.admit(NotifyOutcome::Malformed, t1), Some(0));
    }
}

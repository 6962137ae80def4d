//! The simulator's in-memory world: merchants, orders, faults and counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::v3::{KeySetup, WechatSide, WechatSideError};
use crate::domain::{RefundStatus, TradeState};
use crate::gateway::{Api, Merchant};
use crate::wxpay::Fields;
use crate::wxpay::client::http_client_builder;
use crate::wxpay::sign::SignType;
use crate::wxpay::time::format_wechat_time;

/// How long a prepay_id stays valid.
pub const PREPAY_LIFETIME: chrono::TimeDelta = chrono::TimeDelta::hours(2);

/// WeChat's notification retry schedule: after the first attempt, wait these intervals.
pub const WECHAT_NOTIFY_RETRIES: [Duration; 15] = {
    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }
    [
        s(15),
        s(15),
        s(30),
        s(180),
        s(600),
        s(1200),
        s(1800),
        s(1800),
        s(1800),
        s(3600),
        s(10800),
        s(10800),
        s(10800),
        s(21600),
        s(21600),
    ]
};

/// An order as WeChat holds it.
#[derive(Debug, Clone)]
pub struct SimOrder {
    pub appid: String,
    /// What the merchant ordered.
    pub total_fee: i64,
    /// What the customer paid (differs from `total_fee` only when a test provokes it).
    pub paid_fee: Option<i64>,
    pub body: String,
    pub attach: Option<String>,
    pub openid: String,
    pub trade_type: String,
    pub notify_url: Option<String>,
    pub prepay_id: String,
    pub prepay_expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub state: TradeState,
    pub transaction_id: Option<String>,
    pub time_end: Option<DateTime<Utc>>,
    /// The sign type the order was created with; notifications use it.
    pub sign_type: SignType,
    pub notify_attempts: u32,
    pub notify_delivered: bool,
}

/// A refund as WeChat holds it, keyed by (mch_id, out_refund_no).
#[derive(Debug, Clone)]
pub struct SimRefund {
    pub out_trade_no: String,
    pub refund_fee: i64,
    /// Never `Unknown`.
    pub status: RefundStatus,
    pub refund_id: String,
    pub created_at: DateTime<Utc>,
    /// Set when the refund succeeds.
    pub success_time: Option<DateTime<Utc>>,
    /// Where the money went (`refund_recv_accout_$n`, `user_received_account`).
    pub recv_account: String,
    /// Whether the test asked for the refund notification to be delivered (`"notify"`): sent
    /// (by `notify.rs`) when the refund reaches a final state.
    pub notify_deliver: bool,
    pub notify_attempts: u32,
    pub notify_delivered: bool,
}

/// The v2 word of a refund status (`refund_status_$n`).
pub(crate) fn refund_status_v2(status: &RefundStatus) -> &'static str {
    match status {
        RefundStatus::Success => "SUCCESS",
        RefundStatus::Closed => "REFUNDCLOSE",
        RefundStatus::Processing => "PROCESSING",
        RefundStatus::Abnormal => "CHANGE",
        RefundStatus::Unknown(_) => "UNKNOWN",
    }
}

/// Per-order request counters (keyed by out_trade_no, as the control API reports them).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct OrderStats {
    pub queries: u64,
    pub inflight: u64,
    pub max_inflight: u64,
    pub closes: u64,
    /// closeorder calls refused because the order was younger than 5 minutes.
    pub early_closes: u64,
}

/// Fault injection for one endpoint. Rates are probabilities from 0 to 1, rolled per request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub latency_ms: u64,
    /// Never answer (the request hangs until the client gives up).
    pub timeout_rate: f64,
    pub http_500_rate: f64,
    /// A signed `result_code=FAIL` with `err_code=SYSTEMERROR`.
    pub system_error_rate: f64,
    /// A signed `result_code=FAIL` with `err_code=FREQUENCY_LIMITED`.
    pub frequency_limited_rate: f64,
    /// An unsigned `return_code=FAIL`.
    pub return_fail_rate: f64,
    /// A reply whose signature does not match.
    pub bad_sign_rate: f64,
    /// A reply without a signature.
    pub unsigned_rate: f64,
    /// A correctly signed reply that does not echo the request: another out_trade_no (orderquery)
    /// or another appid (the echo checks must catch it).
    pub mismatch_rate: f64,
    /// A body that is not XML (v2) or not JSON (v3, still signed).
    pub malformed_rate: f64,
    /// v3: a `Wechatpay-Signature` starting `WECHATPAY/SIGNTEST/` (WeChat's probe, never valid).
    pub signtest_rate: f64,
    /// v3: HTTP 429 `{"code":"RATELIMIT_EXCEEDED",…}`, signed.
    pub rate_limit_rate: f64,
    /// v3: a `Wechatpay-Serial` that names no key WeChat has.
    pub unknown_serial_rate: f64,
    /// v3: signs with a `Wechatpay-Timestamp` this many seconds off the clock (every answer).
    pub timestamp_skew_seconds: i64,
}

impl Faults {
    pub(crate) fn validate(&self) -> Result<(), String> {
        let rates = [
            ("timeout_rate", self.timeout_rate),
            ("http_500_rate", self.http_500_rate),
            ("system_error_rate", self.system_error_rate),
            ("frequency_limited_rate", self.frequency_limited_rate),
            ("return_fail_rate", self.return_fail_rate),
            ("bad_sign_rate", self.bad_sign_rate),
            ("unsigned_rate", self.unsigned_rate),
            ("mismatch_rate", self.mismatch_rate),
            ("malformed_rate", self.malformed_rate),
            ("signtest_rate", self.signtest_rate),
            ("rate_limit_rate", self.rate_limit_rate),
            ("unknown_serial_rate", self.unknown_serial_rate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1"));
            }
        }
        Ok(())
    }
}

/// The endpoints faults can be set for. `orderquery`, `closeorder` and `refundquery` cover both
/// the v2 and the v3 endpoint; `certificates` is v3's `GET /v3/certificates`; `notify` is the signature of v3
/// notifications (signtest, bad_sign, unknown_serial, timestamp_skew, unsigned, malformed);
/// `bills` is v2's `downloadbill`, v3's `tradebill` and the bill download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimEndpoint {
    UnifiedOrder,
    OrderQuery,
    CloseOrder,
    RefundQuery,
    Certificates,
    Notify,
    /// v2 `downloadbill`, v3 `tradebill` and the bill download.
    Bills,
}

impl SimEndpoint {
    pub const ALL: [SimEndpoint; 7] = [
        SimEndpoint::UnifiedOrder,
        SimEndpoint::OrderQuery,
        SimEndpoint::CloseOrder,
        SimEndpoint::RefundQuery,
        SimEndpoint::Certificates,
        SimEndpoint::Notify,
        SimEndpoint::Bills,
    ];
}

/// Whether a fault with this rate happens to this request.
pub(crate) fn roll(rate: f64) -> bool {
    rate > 0.0 && rand::random_bool(rate.min(1.0))
}

/// How long a v3 bill's `download_url` may be used (WeChat: 30 s).
pub const BILL_URL_LIFETIME: Duration = Duration::from_secs(30);

/// Faults of one merchant's bill of one day (`PUT /_sim/bills/{mch_id}/{bill_date}`); each call
/// replaces them, fields left out are 0 / false.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillFaults {
    /// Answer `Bill Creating` / `STATEMENT_CREATING` to the next this many requests.
    pub creating: u32,
    /// v3: the tradebill answer's `hash_value` is the SHA-1 of other bytes.
    pub wrong_hash: bool,
    /// v3: the `download_url` is expired already.
    pub expired_url: bool,
    /// No bill (`No Bill Exist` / `NO_STATEMENT_EXIST`) whatever the day holds.
    pub no_bill: bool,
}

/// Counters of one merchant's bill of one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BillStats {
    /// `downloadbill` / `tradebill` requests.
    pub requests: u64,
    /// v3 downloads of its file that were served.
    pub downloads: u64,
}

/// A generated v3 bill file waiting to be downloaded under its token.
#[derive(Debug, Clone)]
pub(crate) struct BillDownload {
    pub mch_id: String,
    pub bill_date: chrono::NaiveDate,
    pub bytes: axum::body::Bytes,
    pub gzip: bool,
    pub expires_at: std::time::Instant,
}

/// Everything the simulator knows.
pub struct SimState {
    pub(crate) merchants: HashMap<String, Merchant>,
    pub(crate) orders: Mutex<HashMap<(String, String), SimOrder>>,
    pub(crate) by_transaction: Mutex<HashMap<String, (String, String)>>,
    /// Refunds by (mch_id, out_refund_no). Locked after `orders` when both are held.
    pub(crate) refunds: Mutex<HashMap<(String, String), SimRefund>>,
    pub(crate) stats: Mutex<HashMap<String, OrderStats>>,
    pub(crate) faults: Mutex<HashMap<SimEndpoint, Faults>>,
    pub(crate) notify_retries: Mutex<Vec<Duration>>,
    /// WeChat refuses closeorder on orders younger than 5 minutes; off (zero) unless a test or
    /// `PUT /_sim/config` sets it, so that clients can close fresh orders.
    pub(crate) close_min_age: Mutex<Duration>,
    /// WeChat's side of the v3 merchants: its key, public key id and platform certificates.
    pub(crate) wechat: Arc<WechatSide>,
    /// Which of WeChat's keys each v3 merchant sees (by mch_id).
    pub(crate) v3_keys: Mutex<HashMap<String, KeySetup>>,
    /// Where v3 notifications of orders without a notify_url go: `{base}/wxpay/v3/notify`.
    pub(crate) notify_base_url: Mutex<Option<String>>,
    /// Bill faults and counters by (mch_id, bill day).
    pub(crate) bill_faults: Mutex<HashMap<(String, chrono::NaiveDate), BillFaults>>,
    pub(crate) bill_stats: Mutex<HashMap<(String, chrono::NaiveDate), BillStats>>,
    /// v3 bill files by download token.
    pub(crate) bill_downloads: Mutex<HashMap<String, BillDownload>>,
    pub(crate) requests: AtomicU64,
    pub(crate) sequence: AtomicU64,
    pub(crate) http: reqwest::Client,
    pub(crate) shutdown: CancellationToken,
}

impl std::fmt::Debug for SimState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimState")
            .field("merchants", &self.merchants.len())
            .field("requests", &self.requests.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Locks a mutex; the simulator's maps stay consistent even if a handler panicked mid-way
/// (each update is a single insert or field write).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a simulator could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SimSetupError {
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("WeChat's v3 keys: {0}")]
    Wechat(#[from] WechatSideError),
}

impl SimState {
    /// A simulator whose WeChat side signs with the embedded test keys.
    pub fn new(
        merchants: Vec<Merchant>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, SimSetupError> {
        SimState::with_wechat(merchants, WechatSide::test_keys()?, shutdown)
    }

    /// A simulator whose WeChat side is `wechat` (`simulate --config` with a `[simulator]`).
    pub fn with_wechat(
        merchants: Vec<Merchant>,
        wechat: WechatSide,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, SimSetupError> {
        let http = http_client_builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let v3_keys = merchants
            .iter()
            .filter(|m| m.api() == Api::V3)
            .map(|m| (m.mch_id.as_str().to_owned(), wechat.initial_setup()))
            .collect();
        Ok(Arc::new(SimState {
            wechat: Arc::new(wechat),
            v3_keys: Mutex::new(v3_keys),
            notify_base_url: Mutex::new(None),
            merchants: merchants
                .into_iter()
                .map(|m| (m.mch_id.as_str().to_owned(), m))
                .collect(),
            orders: Mutex::default(),
            by_transaction: Mutex::default(),
            refunds: Mutex::default(),
            stats: Mutex::default(),
            faults: Mutex::default(),
            notify_retries: Mutex::new(WECHAT_NOTIFY_RETRIES.to_vec()),
            close_min_age: Mutex::new(Duration::ZERO),
            bill_faults: Mutex::default(),
            bill_stats: Mutex::default(),
            bill_downloads: Mutex::default(),
            requests: AtomicU64::new(0),
            sequence: AtomicU64::new(1),
            http,
            shutdown,
        }))
    }

    /// Sends the v3 notifications of orders without a notify_url to `{base}/wxpay/v3/notify`.
    pub fn set_notify_base_url(&self, base: Option<String>) {
        *lock(&self.notify_base_url) = base;
    }

    /// What a v3 merchant sees of WeChat's keys (`None`: not a v3 merchant).
    pub fn v3_keys(&self, mch_id: &str) -> Option<super::v3::KeySetup> {
        lock(&self.v3_keys).get(mch_id).cloned()
    }

    /// Sets the same faults on every endpoint (the control API's `"endpoint": "all"`).
    pub fn set_faults_all(&self, faults: Faults) {
        let mut all = lock(&self.faults);
        for e in SimEndpoint::ALL {
            all.insert(e, faults);
        }
    }

    pub(crate) fn faults(&self, endpoint: SimEndpoint) -> Faults {
        lock(&self.faults)
            .get(&endpoint)
            .copied()
            .unwrap_or_default()
    }

    /// The counters of one order.
    pub fn order_stats(&self, out_trade_no: &str) -> OrderStats {
        lock(&self.stats)
            .get(out_trade_no)
            .copied()
            .unwrap_or_default()
    }

    /// Queries in flight right now, over all orders.
    pub fn total_inflight(&self) -> u64 {
        lock(&self.stats).values().map(|s| s.inflight).sum()
    }

    /// Requests served to the WeChat endpoints.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A copy of an order.
    pub fn order(&self, mch_id: &str, out_trade_no: &str) -> Option<SimOrder> {
        lock(&self.orders)
            .get(&(mch_id.to_owned(), out_trade_no.to_owned()))
            .cloned()
    }

    pub(crate) fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a query of an order for as long as the guard lives.
    pub(crate) fn track_query(self: &Arc<Self>, out_trade_no: &str) -> InflightGuard {
        let mut stats = lock(&self.stats);
        let s = stats.entry(out_trade_no.to_owned()).or_default();
        s.queries += 1;
        s.inflight += 1;
        s.max_inflight = s.max_inflight.max(s.inflight);
        InflightGuard {
            state: self.clone(),
            out_trade_no: out_trade_no.to_owned(),
        }
    }

    pub(crate) fn count_early_close(&self, out_trade_no: &str) {
        lock(&self.stats)
            .entry(out_trade_no.to_owned())
            .or_default()
            .early_closes += 1;
    }

    pub(crate) fn count_close(&self, out_trade_no: &str) {
        lock(&self.stats)
            .entry(out_trade_no.to_owned())
            .or_default()
            .closes += 1;
    }
}

/// Decrements an order's in-flight count when the request ends, however it ends.
pub(crate) struct InflightGuard {
    state: Arc<SimState>,
    out_trade_no: String,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Some(s) = lock(&self.state.stats).get_mut(&self.out_trade_no) {
            s.inflight = s.inflight.saturating_sub(1);
        }
    }
}

/// Why a control operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("unknown merchant")]
    UnknownMerchant,
    #[error("no such order (give total_fee to create and pay it at once)")]
    NoSuchOrder,
    #[error("no such refund")]
    NoSuchRefund,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
}

/// A payment the simulated customer made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub transaction_id: String,
    pub time_end: DateTime<Utc>,
    pub total_fee: i64,
}

impl SimState {
    fn new_order(
        &self,
        mch_id: &str,
        total_fee: i64,
        notify_url: Option<String>,
        sign_type: Option<SignType>,
    ) -> Result<SimOrder, SimError> {
        let merchant = self
            .merchants
            .get(mch_id)
            .ok_or(SimError::UnknownMerchant)?;
        let now = Utc::now();
        Ok(SimOrder {
            appid: merchant.appid.as_str().to_owned(),
            total_fee,
            paid_fee: None,
            body: "simulated order".into(),
            attach: None,
            openid: "oUpF8uMEb4qRXf22hE3X68TekukE".into(),
            trade_type: "JSAPI".into(),
            notify_url,
            prepay_id: format!("wx{}{:018}", format_wechat_time(now), self.next_sequence()),
            prepay_expires_at: now + PREPAY_LIFETIME,
            created_at: now,
            state: TradeState::NotPay,
            transaction_id: None,
            time_end: None,
            // A v3 order never signs with it.
            sign_type: sign_type
                .or(merchant.v2_credentials().map(|(_, t)| t))
                .unwrap_or(SignType::Md5),
            notify_attempts: 0,
            notify_delivered: false,
        })
    }

    /// Registers an unpaid order, as `unifiedorder` would.
    pub fn create_order(
        &self,
        mch_id: &str,
        out_trade_no: &str,
        total_fee: i64,
        notify_url: Option<String>,
        sign_type: Option<SignType>,
    ) -> Result<SimOrder, SimError> {
        if total_fee <= 0 {
            return Err(SimError::BadRequest(
                "total_fee must be a positive number of fen".into(),
            ));
        }
        let order = self.new_order(mch_id, total_fee, notify_url, sign_type)?;
        let mut orders = lock(&self.orders);
        let key = (mch_id.to_owned(), out_trade_no.to_owned());
        if orders.contains_key(&key) {
            return Err(SimError::Conflict("order exists".into()));
        }
        orders.insert(key, order.clone());
        Ok(order)
    }

    /// The customer pays `paid_fee` (default: the order's amount). An order the simulator does
    /// not know is created paid when `paid_fee` is given. No notification: `SimState::pay`
    /// (in `notify.rs`) adds it.
    pub(crate) fn record_payment(
        &self,
        mch_id: &str,
        out_trade_no: &str,
        paid_fee: Option<i64>,
        paid_at: Option<DateTime<Utc>>,
    ) -> Result<Payment, SimError> {
        if paid_fee.is_some_and(|f| f <= 0) {
            return Err(SimError::BadRequest(
                "total_fee must be a positive number of fen".into(),
            ));
        }
        let key = (mch_id.to_owned(), out_trade_no.to_owned());
        let now = Utc::now();
        let payment = {
            let mut orders = lock(&self.orders);
            if !orders.contains_key(&key) {
                let fee = paid_fee.ok_or(SimError::NoSuchOrder)?;
                let order = self.new_order(mch_id, fee, None, None)?;
                orders.insert(key.clone(), order);
            }
            let order = orders.get_mut(&key).ok_or(SimError::NoSuchOrder)?;
            if !matches!(
                order.state,
                TradeState::NotPay
                    | TradeState::UserPaying
                    | TradeState::PayError
                    | TradeState::Accept
            ) {
                return Err(SimError::Conflict(format!(
                    "order is {}, it cannot be paid",
                    order.state
                )));
            }
            if order.prepay_expires_at <= now {
                return Err(SimError::Conflict("the prepay_id has expired".into()));
            }
            let transaction_id = format!(
                "4200{}{:010}",
                format_wechat_time(now),
                self.next_sequence()
            );
            let paid_at = paid_at.unwrap_or(now);
            order.state = TradeState::Success;
            order.transaction_id = Some(transaction_id.clone());
            order.time_end = Some(paid_at);
            let total_fee = paid_fee.unwrap_or(order.total_fee);
            order.paid_fee = Some(total_fee);
            lock(&self.by_transaction).insert(transaction_id.clone(), key.clone());
            Payment {
                transaction_id,
                time_end: paid_at,
                total_fee,
            }
        };
        Ok(payment)
    }
}

impl SimState {
    /// A copy of a refund.
    pub fn refund(&self, mch_id: &str, out_refund_no: &str) -> Option<SimRefund> {
        lock(&self.refunds)
            .get(&(mch_id.to_owned(), out_refund_no.to_owned()))
            .cloned()
    }

    /// WeChat accepts a refund of a paid order: `refund_fee` fen, in `status` (PROCESSING, or
    /// already finished). The order's refunds that are not closed never add up to more than
    /// what was paid. The order reports `trade_state` REFUND from now on.
    pub fn create_refund(
        &self,
        mch_id: &str,
        out_trade_no: &str,
        out_refund_no: &str,
        refund_fee: i64,
        status: RefundStatus,
        notify_deliver: bool,
    ) -> Result<SimRefund, SimError> {
        self.create_refund_at(
            mch_id,
            out_trade_no,
            out_refund_no,
            refund_fee,
            status,
            notify_deliver,
            None,
        )
    }

    /// [`SimState::create_refund`]; a SUCCESS one succeeded at `success_time` (default: now;
    /// not before the payment, and only for SUCCESS; an earlier time is also when it was
    /// accepted).
    #[expect(
        clippy::too_many_arguments,
        reason = "the control API's fields, one each"
    )]
    pub fn create_refund_at(
        &self,
        mch_id: &str,
        out_trade_no: &str,
        out_refund_no: &str,
        refund_fee: i64,
        status: RefundStatus,
        notify_deliver: bool,
        success_time: Option<DateTime<Utc>>,
    ) -> Result<SimRefund, SimError> {
        if success_time.is_some() && status != RefundStatus::Success {
            return Err(SimError::BadRequest(
                "success_time is for a SUCCESS refund only".into(),
            ));
        }
        if !self.merchants.contains_key(mch_id) {
            return Err(SimError::UnknownMerchant);
        }
        if refund_fee <= 0 {
            return Err(SimError::BadRequest(
                "refund_fee must be a positive number of fen".into(),
            ));
        }
        if matches!(status, RefundStatus::Unknown(_)) {
            return Err(SimError::BadRequest("unknown refund outcome".into()));
        }
        let mut orders = lock(&self.orders);
        let order = orders
            .get_mut(&(mch_id.to_owned(), out_trade_no.to_owned()))
            .ok_or(SimError::NoSuchOrder)?;
        if !matches!(order.state, TradeState::Success | TradeState::Refund) {
            return Err(SimError::Conflict(format!(
                "order is {}, only a paid order can be refunded",
                order.state
            )));
        }
        if let (Some(t), Some(paid_at)) = (success_time, order.time_end)
            && t < paid_at
        {
            return Err(SimError::BadRequest(
                "success_time is before the payment".into(),
            ));
        }
        let paid = order.paid_fee.unwrap_or(order.total_fee);
        let mut refunds = lock(&self.refunds);
        let key = (mch_id.to_owned(), out_refund_no.to_owned());
        if refunds.contains_key(&key) {
            return Err(SimError::Conflict("refund exists".into()));
        }
        let refunded: i64 = refunds
            .iter()
            .filter(|((m, _), r)| {
                m == mch_id && r.out_trade_no == out_trade_no && r.status != RefundStatus::Closed
            })
            .map(|(_, r)| r.refund_fee)
            .sum();
        if refunded.saturating_add(refund_fee) > paid {
            return Err(SimError::BadRequest(format!(
                "refunds of {} fen would exceed the {paid} fen paid ({refunded} refunded already)",
                refunded.saturating_add(refund_fee)
            )));
        }
        let now = Utc::now();
        let refund = SimRefund {
            out_trade_no: out_trade_no.to_owned(),
            refund_fee,
            success_time: (status == RefundStatus::Success).then_some(success_time.unwrap_or(now)),
            // A refund placed in the past was accepted no later than it succeeded.
            created_at: success_time.map_or(now, |t| t.min(now)),
            status,
            refund_id: format!(
                "5000{}{:011}",
                format_wechat_time(now),
                self.next_sequence()
            ),
            recv_account: "支付用户的零钱".into(),
            notify_deliver,
            notify_attempts: 0,
            notify_delivered: false,
        };
        order.state = TradeState::Refund;
        refunds.insert(key, refund.clone());
        Ok(refund)
    }

    /// Finishes a PROCESSING refund as SUCCESS, CLOSED or ABNORMAL.
    pub fn finish_refund(
        &self,
        mch_id: &str,
        out_refund_no: &str,
        status: RefundStatus,
    ) -> Result<SimRefund, SimError> {
        self.finish_refund_at(mch_id, out_refund_no, status, None)
    }

    /// [`SimState::finish_refund`]; a SUCCESS succeeds at `success_time` (default: now; not
    /// before the payment, and only for SUCCESS; an earlier time moves the refund's acceptance
    /// back to it).
    pub fn finish_refund_at(
        &self,
        mch_id: &str,
        out_refund_no: &str,
        status: RefundStatus,
        success_time: Option<DateTime<Utc>>,
    ) -> Result<SimRefund, SimError> {
        if success_time.is_some() && status != RefundStatus::Success {
            return Err(SimError::BadRequest(
                "success_time is for a SUCCESS refund only".into(),
            ));
        }
        if !matches!(
            status,
            RefundStatus::Success | RefundStatus::Closed | RefundStatus::Abnormal
        ) {
            return Err(SimError::BadRequest(
                "outcome must be SUCCESS, CLOSED or ABNORMAL".into(),
            ));
        }
        // Locked in the documented order: orders, then refunds.
        let orders = lock(&self.orders);
        let mut refunds = lock(&self.refunds);
        let refund = refunds
            .get_mut(&(mch_id.to_owned(), out_refund_no.to_owned()))
            .ok_or(SimError::NoSuchRefund)?;
        if refund.status != RefundStatus::Processing {
            return Err(SimError::Conflict(format!(
                "refund is {}, only a PROCESSING one can be finished",
                refund.status.label()
            )));
        }
        if let Some(t) = success_time {
            let paid_at = orders
                .get(&(mch_id.to_owned(), refund.out_trade_no.clone()))
                .and_then(|o| o.time_end);
            if paid_at.is_some_and(|p| t < p) {
                return Err(SimError::BadRequest(
                    "success_time is before the payment".into(),
                ));
            }
            // A refund placed in the past was accepted no later than it succeeded.
            refund.created_at = refund.created_at.min(t);
        }
        if status == RefundStatus::Success {
            refund.success_time = Some(success_time.unwrap_or_else(Utc::now));
        }
        refund.status = status;
        Ok(refund.clone())
    }
}

/// `trade_state_desc` as WeChat words it.
pub(crate) fn trade_state_desc(state: &TradeState) -> &'static str {
    match state {
        TradeState::Success => "支付成功",
        TradeState::Refund => "转入退款",
        TradeState::NotPay => "订单未支付",
        TradeState::Closed => "已关闭",
        TradeState::Revoked => "已撤销（刷卡支付）",
        TradeState::UserPaying => "用户支付中",
        TradeState::PayError => "支付失败",
        TradeState::Accept => "已接收，等待扣款",
        TradeState::Unknown(_) => "未知状态",
    }
}

/// The order fields of an orderquery reply or a notification.
pub(crate) fn order_fields(out_trade_no: &str, order: &SimOrder) -> Fields {
    let mut f = Fields::new()
        .with("result_code", "SUCCESS")
        .with("out_trade_no", out_trade_no)
        .with("trade_state", order.state.as_str())
        .with("trade_state_desc", trade_state_desc(&order.state));
    if let (Some(tx), Some(time_end)) = (&order.transaction_id, order.time_end) {
        let paid = order.paid_fee.unwrap_or(order.total_fee).to_string();
        f.insert("openid", order.openid.as_str());
        f.insert("is_subscribe", "N");
        f.insert("trade_type", order.trade_type.as_str());
        f.insert("bank_type", "CFT");
        f.insert("total_fee", paid.as_str());
        f.insert("cash_fee", paid);
        f.insert("fee_type", "CNY");
        f.insert("transaction_id", tx.as_str());
        f.insert("time_end", format_wechat_time(time_end));
        if let Some(attach) = &order.attach {
            f.insert("attach", attach.as_str());
        }
    }
    f
}

/// What WeChat does with a close request (`closeorder`, v2 and v3 alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseOutcome {
    NotFound,
    /// Younger than the configured minimum age (WeChat's 5-minute rule, off by default).
    TooEarly,
    Paid,
    AlreadyClosed,
    Closed,
}

impl SimState {
    /// Closes an open order, as WeChat would, counting a close refused for the order's youth.
    pub(crate) fn close_at_wechat(&self, mch_id: &str, out_trade_no: &str) -> CloseOutcome {
        let outcome = {
            let mut orders = lock(&self.orders);
            match orders.get_mut(&(mch_id.to_owned(), out_trade_no.to_owned())) {
                None => CloseOutcome::NotFound,
                Some(o)
                    if (Utc::now() - o.created_at)
                        .to_std()
                        .is_ok_and(|age| age < *lock(&self.close_min_age)) =>
                {
                    CloseOutcome::TooEarly
                }
                Some(o) => match o.state {
                    TradeState::Success | TradeState::Refund => CloseOutcome::Paid,
                    TradeState::Closed | TradeState::Revoked => CloseOutcome::AlreadyClosed,
                    _ => {
                        o.state = TradeState::Closed;
                        CloseOutcome::Closed
                    }
                },
            }
        };
        if outcome == CloseOutcome::TooEarly {
            self.count_early_close(out_trade_no);
        }
        outcome
    }
}

//! The simulator's JSON control API (`/_sim/…`): what a customer or WeChat would do to an order,
//! fault injection, and counters.
#![expect(
    clippy::result_large_err,
    reason = "handlers return early with a ready axum Response; the size is irrelevant on these paths"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::state::{
    BillFaults, Faults, SimEndpoint, SimError, SimOrder, SimRefund, SimState, lock,
};
use crate::domain::{OutRefundNo, OutTradeNo, RefundStatus, TradeState};
use crate::wxpay::sign::SignType;
use crate::wxpay::time::format_wechat_time;

type Key = (String, String);

/// A handler's answer; an error answer is `Err`, so that it can return early with `?`.
type Answer = Result<Response, Response>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn no_such_order() -> Response {
    error(StatusCode::NOT_FOUND, "no such order")
}

fn order_key(state: &SimState, mch_id: String, out_trade_no: String) -> Result<Key, Response> {
    if !state.merchants.contains_key(&mch_id) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("unknown merchant {mch_id}"),
        ));
    }
    if OutTradeNo::parse(&out_trade_no).is_err() {
        return Err(error(StatusCode::BAD_REQUEST, "invalid out_trade_no"));
    }
    Ok((mch_id, out_trade_no))
}

fn order_json(key: &Key, o: &SimOrder) -> Value {
    json!({
        "mch_id": key.0,
        "out_trade_no": key.1,
        "appid": o.appid,
        "total_fee": o.total_fee,
        "paid_fee": o.paid_fee,
        "trade_state": o.state.as_str(),
        "transaction_id": o.transaction_id,
        "time_end": o.time_end.map(format_wechat_time),
        "prepay_id": o.prepay_id,
        "notify_url": o.notify_url,
        "notify_attempts": o.notify_attempts,
        "notify_delivered": o.notify_delivered,
    })
}

/// Body of `POST /_sim/orders/{mch_id}/{out_trade_no}`: registers an order as `unifiedorder`
/// would, for tests whose orders never went through `unifiedorder`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    total_fee: i64,
    #[serde(default)]
    notify_url: Option<String>,
    #[serde(default)]
    sign_type: Option<SignType>,
    /// Backdates the order (tests of expiry and of WeChat's 5-minute closeorder rule).
    #[serde(default)]
    age_seconds: u32,
}

pub async fn create(
    State(state): State<Arc<SimState>>,
    Path((mch_id, out_trade_no)): Path<(String, String)>,
    Json(body): Json<CreateBody>,
) -> Answer {
    let key = order_key(&state, mch_id, out_trade_no)?;
    let mut order = state
        .create_order(
            &key.0,
            &key.1,
            body.total_fee,
            body.notify_url,
            body.sign_type,
        )
        .map_err(sim_error)?;
    if body.age_seconds > 0 {
        let age = chrono::TimeDelta::seconds(i64::from(body.age_seconds));
        if let Some(o) = lock(&state.orders).get_mut(&key) {
            o.created_at -= age;
            o.prepay_expires_at -= age;
            order = o.clone();
        }
    }
    Ok((StatusCode::CREATED, Json(order_json(&key, &order))).into_response())
}

fn sim_error(e: SimError) -> Response {
    let status = match &e {
        SimError::UnknownMerchant | SimError::NoSuchOrder | SimError::NoSuchRefund => {
            StatusCode::NOT_FOUND
        }
        SimError::Conflict(_) => StatusCode::CONFLICT,
        SimError::BadRequest(_) => StatusCode::BAD_REQUEST,
    };
    error(status, e.to_string())
}

pub async fn show(
    State(state): State<Arc<SimState>>,
    Path((mch_id, out_trade_no)): Path<(String, String)>,
) -> Answer {
    let key = order_key(&state, mch_id, out_trade_no)?;
    let orders = lock(&state.orders);
    let order = orders.get(&key).ok_or_else(no_such_order)?;
    Ok(Json(order_json(&key, order)).into_response())
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum NotifyMode {
    Deliver,
    Drop,
}

/// Body of `…/pay`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayBody {
    notify: NotifyMode,
    /// What the customer pays; defaults to the order's amount. For an order the simulator does
    /// not know yet, creates it with this amount.
    #[serde(default)]
    total_fee: Option<i64>,
    /// When the customer paid (RFC 3339); defaults to now.
    #[serde(default)]
    paid_at: Option<String>,
}

pub async fn pay(
    State(state): State<Arc<SimState>>,
    Path((mch_id, out_trade_no)): Path<(String, String)>,
    Json(body): Json<PayBody>,
) -> Answer {
    let key = order_key(&state, mch_id, out_trade_no)?;
    let deliver = body.notify == NotifyMode::Deliver;
    let paid_at = rfc3339("paid_at", body.paid_at.as_deref())?;
    let paid = state
        .pay_at(&key.0, &key.1, body.total_fee, paid_at, deliver)
        .map_err(sim_error)?;
    Ok(Json(json!({
        "transaction_id": paid.transaction_id,
        "time_end": format_wechat_time(paid.time_end),
        "total_fee": paid.total_fee,
    }))
    .into_response())
}

/// Moves an order from one of `from` to `to`, or answers 404 / 409.
fn transition(state: &SimState, key: Key, from: &[TradeState], to: TradeState) -> Answer {
    let mut orders = lock(&state.orders);
    let order = orders.get_mut(&key).ok_or_else(no_such_order)?;
    if !from.contains(&order.state) {
        return Err(error(
            StatusCode::CONFLICT,
            format!("order is {}, expected one of {from:?}", order.state),
        ));
    }
    order.state = to;
    Ok(Json(order_json(&key, order)).into_response())
}

pub async fn refund(
    State(state): State<Arc<SimState>>,
    Path((mch_id, out_trade_no)): Path<(String, String)>,
) -> Answer {
    let key = order_key(&state, mch_id, out_trade_no)?;
    transition(&state, key, &[TradeState::Success], TradeState::Refund)
}

/// What a refund ends as (the control API's `outcome`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
enum RefundOutcome {
    Success,
    Closed,
    Abnormal,
    Processing,
}

impl RefundOutcome {
    fn status(self) -> RefundStatus {
        match self {
            RefundOutcome::Success => RefundStatus::Success,
            RefundOutcome::Closed => RefundStatus::Closed,
            RefundOutcome::Abnormal => RefundStatus::Abnormal,
            RefundOutcome::Processing => RefundStatus::Processing,
        }
    }
}

/// Body of `…/refunds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundBody {
    out_refund_no: String,
    refund_fee: i64,
    outcome: RefundOutcome,
    /// `deliver`: the refund notification is sent when the refund is final (now, or at
    /// `…/finish`); `drop` (the default): never.
    #[serde(default)]
    notify: Option<NotifyMode>,
    /// When a SUCCESS refund succeeded (RFC 3339); defaults to now.
    #[serde(default)]
    success_time: Option<String>,
}

/// An optional RFC 3339 time of a control body, or a 400 naming the field.
fn rfc3339(
    field: &str,
    value: Option<&str>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, Response> {
    value
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|_| {
                    error(
                        StatusCode::BAD_REQUEST,
                        format!("{field} is not an RFC 3339 time"),
                    )
                })
        })
        .transpose()
}

fn refund_json(mch_id: &str, out_refund_no: &str, r: &SimRefund) -> Value {
    json!({
        "mch_id": mch_id,
        "out_refund_no": out_refund_no,
        "out_trade_no": r.out_trade_no,
        "refund_id": r.refund_id,
        "refund_fee": r.refund_fee,
        "status": r.status.label(),
        "success_time": r.success_time.map(super::v3::format_v3_time),
        "notify": if r.notify_deliver { "deliver" } else { "drop" },
        "notify_attempts": r.notify_attempts,
        "notify_delivered": r.notify_delivered,
    })
}

/// `POST /_sim/orders/{mch_id}/{out_trade_no}/refunds`: WeChat accepts a refund of the paid
/// order (400 for a refund_fee of 0 or one that would refund more than was paid).
pub async fn create_refund(
    State(state): State<Arc<SimState>>,
    Path((mch_id, out_trade_no)): Path<(String, String)>,
    Json(body): Json<RefundBody>,
) -> Answer {
    let key = order_key(&state, mch_id, out_trade_no)?;
    if OutRefundNo::parse(&body.out_refund_no).is_err() {
        return Err(error(StatusCode::BAD_REQUEST, "invalid out_refund_no"));
    }
    let success_time = rfc3339("success_time", body.success_time.as_deref())?;
    let refund = state
        .create_refund_notifying_at(
            &key.0,
            &key.1,
            &body.out_refund_no,
            body.refund_fee,
            body.outcome.status(),
            body.notify == Some(NotifyMode::Deliver),
            success_time,
        )
        .map_err(sim_error)?;
    Ok((
        StatusCode::CREATED,
        Json(refund_json(&key.0, &body.out_refund_no, &refund)),
    )
        .into_response())
}

/// Body of `…/finish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishBody {
    outcome: RefundOutcome,
    /// When a SUCCESS refund succeeded (RFC 3339); defaults to now.
    #[serde(default)]
    success_time: Option<String>,
}

/// `POST /_sim/refunds/{mch_id}/{out_refund_no}/finish`: a PROCESSING refund ends.
pub async fn finish_refund(
    State(state): State<Arc<SimState>>,
    Path((mch_id, out_refund_no)): Path<(String, String)>,
    Json(body): Json<FinishBody>,
) -> Answer {
    if !state.merchants.contains_key(&mch_id) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("unknown merchant {mch_id}"),
        ));
    }
    let success_time = rfc3339("success_time", body.success_time.as_deref())?;
    let refund = state
        .finish_refund_notifying_at(&mch_id, &out_refund_no, body.outcome.status(), success_time)
        .map_err(sim_error)?;
    Ok(Json(refund_json(&mch_id, &out_refund_no, &refund)).into_response())
}

pub async fn close(
    State(state): State<Arc<SimState>>,
    Path((mch_id, out_trade_no)): Path<(String, String)>,
) -> Answer {
    let key = order_key(&state, mch_id, out_trade_no)?;
    let open = [
        TradeState::NotPay,
        TradeState::UserPaying,
        TradeState::PayError,
    ];
    transition(&state, key, &open, TradeState::Closed)
}

/// Body of `…/state`: forces any `trade_state`, known or not (for tests of rare states).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateBody {
    trade_state: String,
}

pub async fn force_state(
    State(state): State<Arc<SimState>>,
    Path((mch_id, out_trade_no)): Path<(String, String)>,
    Json(body): Json<StateBody>,
) -> Answer {
    let key = order_key(&state, mch_id, out_trade_no)?;
    let mut orders = lock(&state.orders);
    let order = orders.get_mut(&key).ok_or_else(no_such_order)?;
    order.state = TradeState::parse(&body.trade_state);
    Ok(Json(order_json(&key, order)).into_response())
}

/// `PUT /_sim/faults`: `{"endpoint": "orderquery" | "closeorder" | "unifiedorder" | "all", …rates}`.
/// Rates left out are 0: each call replaces the endpoint's faults.
pub async fn set_faults(
    State(state): State<Arc<SimState>>,
    Json(mut body): Json<Value>,
) -> Response {
    let Some(obj) = body.as_object_mut() else {
        return error(StatusCode::BAD_REQUEST, "expected a JSON object");
    };
    let endpoints: Vec<SimEndpoint> = match obj.remove("endpoint").as_ref().and_then(Value::as_str)
    {
        Some("all") => SimEndpoint::ALL.to_vec(),
        Some(name) => match serde_json::from_value(Value::String(name.to_owned())) {
            Ok(e) => vec![e],
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown endpoint {name:?}"),
                );
            }
        },
        None => return error(StatusCode::BAD_REQUEST, "missing \"endpoint\""),
    };
    let faults: Faults = match serde_json::from_value(body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err(e) = faults.validate() {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let mut all = lock(&state.faults);
    for e in endpoints {
        all.insert(e, faults);
    }
    Json(faults_json(&all)).into_response()
}

pub async fn get_faults(State(state): State<Arc<SimState>>) -> Response {
    Json(faults_json(&lock(&state.faults))).into_response()
}

fn faults_json(all: &std::collections::HashMap<SimEndpoint, Faults>) -> Value {
    let map: BTreeMap<String, Faults> = SimEndpoint::ALL
        .iter()
        .map(|e| {
            let name = serde_json::to_value(e)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            (name, all.get(e).copied().unwrap_or_default())
        })
        .collect();
    json!(map)
}

/// `PUT /_sim/config`: `{"notify_retry_ms": [15000, 15000, …]}` replaces WeChat's notification
/// retry schedule (tests shorten it); `{"close_min_age_ms": 300000}` turns on WeChat's rule that
/// an order younger than 5 minutes cannot be closed (refusals count as `early_closes`);
/// `{"notify_base_url": "http://HOST:PORT"}` sends the v3 notifications of orders without a
/// notify_url to `{base}/wxpay/v3/notify` (`""` turns it off).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigBody {
    #[serde(default)]
    notify_retry_ms: Option<Vec<u64>>,
    #[serde(default)]
    close_min_age_ms: Option<u64>,
    #[serde(default)]
    notify_base_url: Option<String>,
}

pub async fn set_config(
    State(state): State<Arc<SimState>>,
    Json(body): Json<ConfigBody>,
) -> Response {
    if let Some(retries) = &body.notify_retry_ms {
        *lock(&state.notify_retries) = retries
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
    }
    if let Some(ms) = body.close_min_age_ms {
        *lock(&state.close_min_age) = Duration::from_millis(ms);
    }
    if let Some(base) = body.notify_base_url {
        if !(base.is_empty() || base.starts_with("http://") || base.starts_with("https://")) {
            return error(
                StatusCode::BAD_REQUEST,
                "notify_base_url must be an http(s) URL",
            );
        }
        state.set_notify_base_url((!base.is_empty()).then_some(base));
    }
    let retries: Vec<u64> = lock(&state.notify_retries)
        .iter()
        .map(|d| d.as_millis() as u64)
        .collect();
    let close_min_age_ms = lock(&state.close_min_age).as_millis() as u64;
    let notify_base_url = lock(&state.notify_base_url).clone();
    Json(json!({
        "notify_retry_ms": retries,
        "close_min_age_ms": close_min_age_ms,
        "notify_base_url": notify_base_url,
    }))
    .into_response()
}

/// The merchant and day of a `/_sim/bills/{mch_id}/{bill_date}` path (`YYYY-MM-DD` or
/// `yyyyMMdd`).
fn bill_key(
    state: &SimState,
    mch_id: String,
    bill_date: &str,
) -> Result<(String, chrono::NaiveDate), Response> {
    if !state.merchants.contains_key(&mch_id) {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("unknown merchant {mch_id}"),
        ));
    }
    let date = super::bill::parse_bill_date(bill_date).ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "bill_date must be YYYY-MM-DD or yyyyMMdd",
        )
    })?;
    Ok((mch_id, date))
}

/// `PUT /_sim/bills/{mch_id}/{bill_date}` `{"creating":N,"wrong_hash":bool,"expired_url":bool,
/// "no_bill":bool}`: the faults of that bill (each call replaces them).
pub async fn set_bill_faults(
    State(state): State<Arc<SimState>>,
    Path((mch_id, bill_date)): Path<(String, String)>,
    Json(faults): Json<BillFaults>,
) -> Answer {
    let (mch_id, date) = bill_key(&state, mch_id, &bill_date)?;
    state.set_bill_faults(&mch_id, date, faults);
    Ok(Json(json!(faults)).into_response())
}

/// `GET /_sim/bills/{mch_id}/{bill_date}`: the bill's text as WeChat would serve it now (faults
/// aside), or 404 when the day has no lines.
pub async fn show_bill(
    State(state): State<Arc<SimState>>,
    Path((mch_id, bill_date)): Path<(String, String)>,
) -> Answer {
    let (mch_id, date) = bill_key(&state, mch_id, &bill_date)?;
    let rows = state.bill_rows(&mch_id, date);
    if rows.is_empty() {
        return Err(error(StatusCode::NOT_FOUND, "no bill: no lines that day"));
    }
    let text = super::bill::render(rows, false)
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/plain;charset=utf-8")],
        text.bytes,
    )
        .into_response())
}

#[derive(Serialize)]
struct NotificationStats {
    attempts: u32,
    delivered: bool,
}

pub async fn stats(State(state): State<Arc<SimState>>) -> Response {
    let orders: BTreeMap<String, Value> = lock(&state.stats)
        .iter()
        .map(|(k, s)| (k.clone(), json!(s)))
        .collect();
    let notifications: BTreeMap<String, NotificationStats> = lock(&state.orders)
        .iter()
        .filter(|(_, o)| o.notify_attempts > 0)
        .map(|((_, n), o)| {
            (
                n.clone(),
                NotificationStats {
                    attempts: o.notify_attempts,
                    delivered: o.notify_delivered,
                },
            )
        })
        .collect();
    let mut bills = BTreeMap::new();
    let mut bill_downloads = BTreeMap::new();
    for ((mch_id, date), s) in state.bill_stats() {
        let key = format!("{mch_id}/{date}");
        bills.insert(key.clone(), s.requests);
        bill_downloads.insert(key, s.downloads);
    }
    Json(json!({
        "orders": orders,
        "requests": state.requests(),
        "notifications": notifications,
        "bills": bills,
        "bill_downloads": bill_downloads,
    }))
    .into_response()
}

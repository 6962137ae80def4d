//! The WeChat Pay v2 endpoints of the simulator.
//!
//! Like WeChat: a request that cannot be decoded, names an unknown merchant or an appid that is
//! not the merchant's, or carries a bad or missing signature gets an unsigned
//! `return_code=FAIL` and no data. Every other reply is signed with the merchant's key, using the
//! request's `sign_type` (MD5 when absent).
#![expect(
    clippy::result_large_err,
    reason = "handlers return early with a ready axum Response; the size is irrelevant on these paths"
)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;

use super::state::{
    CloseOutcome, Faults, PREPAY_LIFETIME, SimEndpoint, SimOrder, SimState, lock, order_fields,
    refund_status_v2, roll,
};
use crate::domain::{Fen, OutTradeNo, TradeState};
use crate::gateway::Merchant;
use crate::wxpay::client::nonce;
use crate::wxpay::sign::{self, ApiKey, SignType, declared_sign_type};
use crate::wxpay::time::{format_wechat_datetime, format_wechat_time};
use crate::wxpay::{Fields, xml};

/// An authenticated request.
struct Request {
    merchant: Merchant,
    key: ApiKey,
    fields: Fields,
    sign_type: SignType,
}

/// The result part of a signed reply, or a FAIL envelope.
enum Answer {
    Fail(&'static str),
    Result(Fields),
}

fn xml_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/xml; charset=UTF-8")],
        body,
    )
        .into_response()
}

/// WeChat's unsigned `return_code=FAIL` answer.
fn fail(message: &str) -> Response {
    let f = Fields::new()
        .with("return_code", "FAIL")
        .with("return_msg", message);
    match xml::encode(&f) {
        Ok(body) => xml_response(StatusCode::OK, body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn result_fail(code: &str, description: &str) -> Fields {
    Fields::new()
        .with("result_code", "FAIL")
        .with("err_code", code)
        .with("err_code_des", description)
}

/// Counts the request, then decodes it and checks its merchant, appid and signature.
fn authenticate(state: &SimState, body: &[u8]) -> Result<Request, Response> {
    state
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let fields = xml::decode(body).map_err(|_| fail("XML格式错误"))?;
    let merchant = fields
        .get_nonempty("mch_id")
        .and_then(|id| state.merchants.get(id))
        .ok_or_else(|| fail("mch_id参数错误"))?
        .clone();
    if fields.get("appid") != Some(merchant.appid.as_str()) {
        return Err(fail("appid和mch_id不匹配"));
    }
    // A v3 merchant has no v2 API key here: it cannot sign a v2 request.
    let key = merchant
        .v2_credentials()
        .map(|(key, _)| key.clone())
        .ok_or_else(|| fail("商户未开通API v2，请使用API v3"))?;
    let sign_type = declared_sign_type(&fields).map_err(|_| fail("sign_type参数格式错误"))?;
    sign::verify(&fields, &key, sign_type).map_err(|_| fail("签名错误"))?;
    if fields.get_nonempty("nonce_str").is_none() {
        return Err(fail("缺少参数nonce_str"));
    }
    Ok(Request {
        merchant,
        key,
        fields,
        sign_type,
    })
}

/// Sleeps for the injected latency, then answers the faults that replace a reply entirely.
async fn faults_before(state: &SimState, endpoint: SimEndpoint) -> Result<Faults, Response> {
    let faults = state.faults(endpoint);
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if roll(faults.timeout_rate) {
        // Hang until the client gives up (it drops the connection) or the simulator stops.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(120)) => {}
            _ = state.shutdown.cancelled() => {}
        }
        return Err(StatusCode::GATEWAY_TIMEOUT.into_response());
    }
    if roll(faults.http_500_rate) {
        return Err((StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error").into_response());
    }
    if roll(faults.return_fail_rate) {
        return Err(fail("系统繁忙,请稍后再试"));
    }
    Ok(faults)
}

/// Result-level faults that replace the business answer (and so have no side effect).
fn result_fault(faults: &Faults) -> Option<Fields> {
    if roll(faults.system_error_rate) {
        return Some(result_fail("SYSTEMERROR", "系统错误"));
    }
    if roll(faults.frequency_limited_rate) {
        return Some(result_fail("FREQUENCY_LIMITED", "频率限制"));
    }
    None
}

/// Wraps a result in the signed envelope and applies the reply-corrupting faults.
fn reply(req: &Request, answer: Answer, faults: &Faults) -> Response {
    let result = match answer {
        Answer::Fail(message) => return fail(message),
        Answer::Result(r) => r,
    };
    if roll(faults.malformed_rate) {
        return xml_response(
            StatusCode::OK,
            "<xml><return_code><![CDATA[SUCCESS]]></return_code><result_code>".into(),
        );
    }
    let mut f = Fields::new()
        .with("return_code", "SUCCESS")
        .with("return_msg", "OK")
        .with("appid", req.merchant.appid.as_str())
        .with("mch_id", req.merchant.mch_id.as_str());
    if let Some(sub) = req.fields.get_nonempty("sub_mch_id") {
        f.insert("sub_mch_id", sub);
    }
    f.insert("nonce_str", nonce());
    for (k, v) in result.iter() {
        f.insert(k, v);
    }
    if roll(faults.mismatch_rate) {
        if f.get("out_refund_no_0").is_some() {
            f.insert("out_refund_no_0", "SIMMISMATCH");
        } else if f.get("out_trade_no").is_some() {
            f.insert("out_trade_no", "SIMMISMATCH");
        } else {
            f.insert("appid", "wx0000000000000000");
        }
    }
    let mut sign = sign::sign(&f, &req.key, req.sign_type);
    if roll(faults.bad_sign_rate) {
        let first = if sign.starts_with('A') { "B" } else { "A" };
        sign.replace_range(..1, first);
    }
    if !roll(faults.unsigned_rate) {
        f.insert("sign", sign);
    }
    match xml::encode(&f) {
        Ok(body) => xml_response(StatusCode::OK, body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

pub async fn order_query(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let req = match authenticate(&state, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let mch = req.merchant.mch_id.as_str().to_owned();
    let out_trade_no = match (
        req.fields.get_nonempty("out_trade_no"),
        req.fields.get_nonempty("transaction_id"),
    ) {
        (Some(n), _) => n.to_owned(),
        (None, Some(tx)) => lock(&state.by_transaction)
            .get(tx)
            .filter(|(m, _)| *m == mch)
            .map(|(_, n)| n.clone())
            .unwrap_or_default(),
        (None, None) => return fail("缺少参数out_trade_no或transaction_id"),
    };
    let _inflight = state.track_query(&out_trade_no);
    let faults = match faults_before(&state, SimEndpoint::OrderQuery).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let answer = match result_fault(&faults) {
        Some(r) => r,
        None => {
            let orders = lock(&state.orders);
            match orders.get(&(mch, out_trade_no.clone())) {
                Some(order) => order_fields(&out_trade_no, order),
                None => result_fail("ORDERNOTEXIST", "此交易订单号不存在"),
            }
        }
    };
    reply(&req, Answer::Result(answer), &faults)
}

/// `pay/refundquery` by `out_refund_no`: the refund as entry 0, with its order's fields.
pub async fn refund_query(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let req = match authenticate(&state, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(out_refund_no) = req.fields.get_nonempty("out_refund_no").map(str::to_owned) else {
        return fail("缺少参数out_refund_no");
    };
    let faults = match faults_before(&state, SimEndpoint::RefundQuery).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let answer = match result_fault(&faults) {
        Some(r) => r,
        None => refund_fields(&state, req.merchant.mch_id.as_str(), &out_refund_no),
    };
    reply(&req, Answer::Result(answer), &faults)
}

/// The result fields of a refundquery reply, as WeChat sends them (indexed from 0).
fn refund_fields(state: &SimState, mch_id: &str, out_refund_no: &str) -> Fields {
    let Some(refund) = state.refund(mch_id, out_refund_no) else {
        return result_fail("REFUNDNOTEXIST", "not exist");
    };
    let Some(order) = state.order(mch_id, &refund.out_trade_no) else {
        return result_fail("REFUNDNOTEXIST", "not exist");
    };
    let paid = order.paid_fee.unwrap_or(order.total_fee).to_string();
    let fee = refund.refund_fee.to_string();
    let mut f = Fields::new()
        .with("result_code", "SUCCESS")
        .with("out_trade_no", refund.out_trade_no.as_str())
        .with("transaction_id", order.transaction_id.unwrap_or_default())
        .with("total_fee", paid.as_str())
        .with("cash_fee", paid)
        .with("refund_fee", fee.as_str())
        .with("refund_count", "1")
        .with("out_refund_no_0", out_refund_no)
        .with("refund_id_0", refund.refund_id.as_str())
        .with("refund_channel_0", "ORIGINAL")
        .with("refund_fee_0", fee)
        .with("refund_status_0", refund_status_v2(&refund.status));
    if let Some(t) = refund.success_time {
        f.insert("refund_success_time_0", format_wechat_datetime(t));
    }
    f.insert("refund_recv_accout_0", refund.recv_account.as_str());
    f
}

pub async fn close_order(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let req = match authenticate(&state, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(out_trade_no) = req.fields.get_nonempty("out_trade_no").map(str::to_owned) else {
        return fail("缺少参数out_trade_no");
    };
    state.count_close(&out_trade_no);
    let faults = match faults_before(&state, SimEndpoint::CloseOrder).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let answer = match result_fault(&faults) {
        Some(r) => r,
        None => close(&state, &req, &out_trade_no),
    };
    reply(&req, Answer::Result(answer), &faults)
}

/// Closes an open order, as WeChat would.
fn close(state: &SimState, req: &Request, out_trade_no: &str) -> Fields {
    match state.close_at_wechat(req.merchant.mch_id.as_str(), out_trade_no) {
        CloseOutcome::NotFound => result_fail("ORDERNOTEXIST", "订单不存在"),
        // WeChat refuses to close an order younger than 5 minutes.
        CloseOutcome::TooEarly => result_fail(
            "SYSTEMERROR",
            "订单生成后不能马上调用关单接口，最短调用时间间隔为5分钟",
        ),
        CloseOutcome::Paid => result_fail("ORDERPAID", "订单已支付，不能发起关单"),
        CloseOutcome::AlreadyClosed => result_fail("ORDERCLOSED", "订单已关闭，无法重复关闭"),
        CloseOutcome::Closed => Fields::new()
            .with("result_code", "SUCCESS")
            .with("result_msg", "OK"),
    }
}

pub async fn unified_order(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let req = match authenticate(&state, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let faults = match faults_before(&state, SimEndpoint::UnifiedOrder).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let answer = match result_fault(&faults) {
        Some(r) => Answer::Result(r),
        None => create_order(&state, &req),
    };
    reply(&req, answer, &faults)
}

fn create_order(state: &SimState, req: &Request) -> Answer {
    let f = &req.fields;
    let (out_trade_no, total_fee, trade_type) = match unified_order_request(f) {
        Ok(parts) => parts,
        Err(answer) => return answer,
    };
    let prepay_id = match prepay(state, req, out_trade_no, total_fee, trade_type) {
        Ok(id) => id,
        Err(answer) => return answer,
    };
    let mut result = Fields::new()
        .with("result_code", "SUCCESS")
        .with("trade_type", trade_type)
        .with("prepay_id", prepay_id.as_str());
    if trade_type == "NATIVE" {
        result.insert(
            "code_url",
            format!("weixin://wxpay/bizpayurl?pr={prepay_id}"),
        );
    }
    if let Some(device) = f.get_nonempty("device_info") {
        result.insert("device_info", device);
    }
    Answer::Result(result)
}

/// A unifiedorder request's out_trade_no, total_fee and trade_type, or WeChat's answer to a
/// missing or malformed one.
fn unified_order_request(f: &Fields) -> Result<(&str, i64, &str), Answer> {
    for required in [
        "body",
        "out_trade_no",
        "total_fee",
        "notify_url",
        "trade_type",
    ] {
        if f.get_nonempty(required).is_none() {
            return Err(Answer::Fail(match required {
                "body" => "缺少参数body",
                "out_trade_no" => "缺少参数out_trade_no",
                "total_fee" => "缺少参数total_fee",
                "notify_url" => "缺少参数notify_url",
                _ => "缺少参数trade_type",
            }));
        }
    }
    let out_trade_no = f.get("out_trade_no").unwrap_or_default();
    if OutTradeNo::parse(out_trade_no).is_err() {
        return Err(Answer::Fail("out_trade_no参数格式错误"));
    }
    let total_fee = match f.get("total_fee").unwrap_or_default().parse::<Fen>() {
        Ok(fee) if fee.get() > 0 => fee.get(),
        _ => return Err(Answer::Fail("total_fee参数格式错误")),
    };
    let trade_type = f.get("trade_type").unwrap_or_default();
    if trade_type == "JSAPI" && f.get_nonempty("openid").is_none() {
        return Err(Answer::Result(result_fail(
            "PARAM_ERROR",
            "JSAPI支付必须传openid",
        )));
    }
    Ok((out_trade_no, total_fee, trade_type))
}

/// The order's prepay_id: the one still valid, else a new one (the order registered anew);
/// WeChat's answer for an order paid, closed or registered with another amount.
fn prepay(
    state: &SimState,
    req: &Request,
    out_trade_no: &str,
    total_fee: i64,
    trade_type: &str,
) -> Result<String, Answer> {
    let f = &req.fields;
    let now = Utc::now();
    let key = (
        req.merchant.mch_id.as_str().to_owned(),
        out_trade_no.to_owned(),
    );
    let mut orders = lock(&state.orders);
    match orders.get(&key) {
        Some(o) if matches!(o.state, TradeState::Success | TradeState::Refund) => {
            Err(Answer::Result(result_fail("ORDERPAID", "该订单已支付")))
        }
        Some(o) if matches!(o.state, TradeState::Closed | TradeState::Revoked) => {
            Err(Answer::Result(result_fail("ORDERCLOSED", "该订单已关闭")))
        }
        Some(o) if o.total_fee != total_fee => Err(Answer::Result(result_fail(
            "INVALID_REQUEST",
            "201 商户订单号重复",
        ))),
        Some(o) if o.prepay_expires_at > now => Ok(o.prepay_id.clone()),
        _ => {
            let prepay_id = format!("wx{}{:018}", format_wechat_time(now), state.next_sequence());
            let order = SimOrder {
                appid: req.merchant.appid.as_str().to_owned(),
                total_fee,
                paid_fee: None,
                body: f.get("body").unwrap_or_default().to_owned(),
                attach: f.get_nonempty("attach").map(str::to_owned),
                openid: f.get("openid").unwrap_or_default().to_owned(),
                trade_type: trade_type.to_owned(),
                notify_url: f.get_nonempty("notify_url").map(str::to_owned),
                prepay_id: prepay_id.clone(),
                prepay_expires_at: now + PREPAY_LIFETIME,
                created_at: orders.get(&key).map_or(now, |o| o.created_at),
                state: TradeState::NotPay,
                transaction_id: None,
                time_end: None,
                sign_type: req.sign_type,
                notify_attempts: 0,
                notify_delivered: false,
            };
            orders.insert(key, order);
            Ok(prepay_id)
        }
    }
}

/// `pay/downloadbill`: the merchant's `ALL` bill of `bill_date` (`yyyyMMdd`), plain or
/// `tar_type=GZIP`, unsigned (as WeChat sends it); the errors as WeChat's unsigned FAIL XML:
/// `No Bill Exist` (with `error_code` 20002) for a day without lines, `Bill Creating`,
/// `invalid bill_date`, `invalid bill_type` (only `ALL` is served), `invalid tar_type`.
/// Faults of endpoint `bills`: latency, timeout, HTTP 500, `return_fail_rate`, and
/// `system_error_rate` as a FAIL `SYSTEMERROR`.
pub async fn download_bill(State(state): State<Arc<SimState>>, body: Bytes) -> Response {
    let req = match authenticate(&state, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let Some(date) = req
        .fields
        .get("bill_date")
        .filter(|d| d.len() == 8)
        .and_then(super::bill::parse_bill_date)
    else {
        return fail("invalid bill_date");
    };
    if !matches!(req.fields.get("bill_type"), None | Some("" | "ALL")) {
        return fail("invalid bill_type");
    }
    let gzip = match req.fields.get_nonempty("tar_type") {
        None => false,
        Some("GZIP") => true,
        Some(_) => return fail("invalid tar_type"),
    };
    let mch_id = req.merchant.mch_id.as_str();
    state.count_bill_request(mch_id, date);
    let faults = match faults_before(&state, SimEndpoint::Bills).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    if roll(faults.system_error_rate) {
        return fail("SYSTEMERROR");
    }
    match state.bill(mch_id, date, gzip) {
        Ok(super::bill::BillOutcome::NoBill) => {
            let f = Fields::new()
                .with("return_code", "FAIL")
                .with("return_msg", "No Bill Exist")
                .with("error_code", "20002");
            match xml::encode(&f) {
                Ok(body) => xml_response(StatusCode::OK, body),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
            }
        }
        Ok(super::bill::BillOutcome::Creating) => fail("Bill Creating"),
        Ok(super::bill::BillOutcome::File(bill, _)) => {
            let content_type = if bill.gzip {
                "application/x-gzip"
            } else {
                "text/plain;charset=utf-8"
            };
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, content_type)],
                bill.bytes,
            )
                .into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

//! Payment and refund notifications, delivered like WeChat: at once, then on WeChat's retry
//! schedule until the merchant answers (v2: `return_code` SUCCESS; v3: any 2xx) or the schedule
//! runs out. A refund's (asked with `"notify":"deliver"`) is sent when it reaches a final state:
//! v2 to `{notify_base_url}/wxpay/v2/refund-notify` (else the order's `notify_url` with
//! `/wxpay/v2/notify` made `/wxpay/v2/refund-notify`), `req_info` AES-256-ECB with the MD5 of
//! the API key; v3 `REFUND.*` where the order's payment notification goes.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::state::{Payment, SimError, SimRefund, SimState, lock, order_fields, refund_status_v2};
use super::v3;
use crate::domain::RefundStatus;
use crate::gateway::Api;
use crate::wxpay::client::nonce;
use crate::wxpay::refund_notify::encrypt_req_info;
use crate::wxpay::time::format_wechat_datetime;
use crate::wxpay::{Fields, sign, xml};

type Key = (String, String);

/// What a delivery is of: a payment by (mch_id, out_trade_no), a refund by (mch_id, out_refund_no).
#[derive(Debug, Clone)]
enum Subject {
    Payment(Key),
    Refund(Key),
}

impl Subject {
    fn number(&self) -> &str {
        match self {
            Subject::Payment(k) | Subject::Refund(k) => &k.1,
        }
    }
}

impl SimState {
    /// The customer pays `paid_fee` (default: the order's amount). An order the simulator does
    /// not know is created paid when `paid_fee` is given. `notify` delivers the notification.
    pub fn pay(
        self: &Arc<Self>,
        mch_id: &str,
        out_trade_no: &str,
        paid_fee: Option<i64>,
        notify: bool,
    ) -> Result<Payment, SimError> {
        self.pay_at(mch_id, out_trade_no, paid_fee, None, notify)
    }

    /// [`SimState::pay`] at `paid_at` (default: now), the payment's `time_end` / `success_time`.
    pub fn pay_at(
        self: &Arc<Self>,
        mch_id: &str,
        out_trade_no: &str,
        paid_fee: Option<i64>,
        paid_at: Option<DateTime<Utc>>,
        notify: bool,
    ) -> Result<Payment, SimError> {
        let payment = self.record_payment(mch_id, out_trade_no, paid_fee, paid_at)?;
        if notify {
            spawn_delivery(
                self.clone(),
                Subject::Payment((mch_id.to_owned(), out_trade_no.to_owned())),
            );
        }
        Ok(payment)
    }

    /// [`SimState::create_refund`], then its notification when asked for and already final.
    pub fn create_refund_notifying(
        self: &Arc<Self>,
        mch_id: &str,
        out_trade_no: &str,
        out_refund_no: &str,
        refund_fee: i64,
        status: RefundStatus,
        notify_deliver: bool,
    ) -> Result<SimRefund, SimError> {
        self.create_refund_notifying_at(
            mch_id,
            out_trade_no,
            out_refund_no,
            refund_fee,
            status,
            notify_deliver,
            None,
        )
    }

    /// [`SimState::create_refund_at`], then its notification when asked for and already final.
    #[expect(
        clippy::too_many_arguments,
        reason = "the control API's fields, one each"
    )]
    pub fn create_refund_notifying_at(
        self: &Arc<Self>,
        mch_id: &str,
        out_trade_no: &str,
        out_refund_no: &str,
        refund_fee: i64,
        status: RefundStatus,
        notify_deliver: bool,
        success_time: Option<DateTime<Utc>>,
    ) -> Result<SimRefund, SimError> {
        let refund = self.create_refund_at(
            mch_id,
            out_trade_no,
            out_refund_no,
            refund_fee,
            status,
            notify_deliver,
            success_time,
        )?;
        self.notify_refund(mch_id, out_refund_no, &refund);
        Ok(refund)
    }

    /// [`SimState::finish_refund`], then its notification when asked for.
    pub fn finish_refund_notifying(
        self: &Arc<Self>,
        mch_id: &str,
        out_refund_no: &str,
        status: RefundStatus,
    ) -> Result<SimRefund, SimError> {
        self.finish_refund_notifying_at(mch_id, out_refund_no, status, None)
    }

    /// [`SimState::finish_refund_at`], then its notification when asked for.
    pub fn finish_refund_notifying_at(
        self: &Arc<Self>,
        mch_id: &str,
        out_refund_no: &str,
        status: RefundStatus,
        success_time: Option<DateTime<Utc>>,
    ) -> Result<SimRefund, SimError> {
        let refund = self.finish_refund_at(mch_id, out_refund_no, status, success_time)?;
        self.notify_refund(mch_id, out_refund_no, &refund);
        Ok(refund)
    }

    fn notify_refund(self: &Arc<Self>, mch_id: &str, out_refund_no: &str, refund: &SimRefund) {
        if refund.notify_deliver && refund.status != RefundStatus::Processing {
            spawn_delivery(
                self.clone(),
                Subject::Refund((mch_id.to_owned(), out_refund_no.to_owned())),
            );
        }
    }
}

fn spawn_delivery(state: Arc<SimState>, subject: Subject) {
    tokio::spawn(async move {
        let retries = lock(&state.notify_retries).clone();
        let mut waits = retries.into_iter();
        loop {
            let outcome = match &subject {
                Subject::Payment(key) => attempt(&state, key).await,
                Subject::Refund(key) => attempt_refund(&state, key).await,
            };
            match outcome {
                Attempt::Delivered | Attempt::Abandon => return,
                Attempt::Failed => {}
            }
            let Some(wait) = waits.next() else {
                tracing::info!(number = %subject.number(), "notification retries exhausted");
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = state.shutdown.cancelled() => return,
            }
        }
    });
}

enum Attempt {
    Delivered,
    Failed,
    Abandon,
}

async fn attempt(state: &SimState, key: &Key) -> Attempt {
    let Some(merchant) = state.merchants.get(&key.0) else {
        return Attempt::Abandon;
    };
    if merchant.api() == Api::V3 {
        return attempt_v3(state, merchant, key).await;
    }
    let Some((v2_key, _)) = merchant.v2_credentials() else {
        return Attempt::Abandon;
    };
    let (url, body) = {
        let mut orders = lock(&state.orders);
        let Some(order) = orders.get_mut(key) else {
            return Attempt::Abandon;
        };
        let Some(url) = order.notify_url.clone() else {
            return Attempt::Abandon;
        };
        order.notify_attempts += 1;
        let mut f = Fields::new()
            .with("return_code", "SUCCESS")
            .with("appid", order.appid.as_str())
            .with("mch_id", merchant.mch_id.as_str())
            .with("nonce_str", nonce());
        for (k, v) in order_fields(&key.1, order).iter() {
            // A notification reports a payment; it carries no trade_state.
            if k != "trade_state" && k != "trade_state_desc" {
                f.insert(k, v);
            }
        }
        sign::sign_in_place(&mut f, v2_key, order.sign_type);
        match xml::encode(&f) {
            Ok(body) => (url, body),
            Err(_) => return Attempt::Abandon,
        }
    };
    let delivered = post_v2(state, &url, body).await;
    if delivered {
        if let Some(order) = lock(&state.orders).get_mut(key) {
            order.notify_delivered = true;
        }
        Attempt::Delivered
    } else {
        tracing::debug!(out_trade_no = %key.1, "notification not acknowledged; will retry");
        Attempt::Failed
    }
}

/// POSTs a v2 body: delivered when answered 2xx with `return_code` SUCCESS.
async fn post_v2(state: &SimState, url: &str, body: String) -> bool {
    match state
        .http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=UTF-8")
        .body(body)
        .send()
        .await
    {
        Ok(resp) if resp.status().is_success() => match resp.bytes().await {
            Ok(b) => xml::decode(&b)
                .map(|f| f.get("return_code") == Some("SUCCESS"))
                .unwrap_or(false),
            Err(_) => false,
        },
        Ok(_) | Err(_) => false,
    }
}

/// POSTs a v3 notification: delivered when answered 2xx.
async fn post_v3(state: &SimState, notification: v3::Notification) -> bool {
    let mut request = state
        .http
        .post(&notification.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(notification.body);
    for (name, value) in notification.signature.headers() {
        request = request.header(name, value);
    }
    matches!(request.send().await, Ok(resp) if resp.status().is_success())
}

/// Where a v2 refund notification goes.
fn v2_refund_url(state: &SimState, order_notify_url: Option<&str>) -> Option<String> {
    const PAY: &str = crate::notify::NOTIFY_PATH;
    const REFUND: &str = crate::notify::V2_REFUND_NOTIFY_PATH;
    if let Some(base) = lock(&state.notify_base_url).clone() {
        return Some(format!("{}{REFUND}", base.trim_end_matches('/')));
    }
    let url = order_notify_url?;
    url.strip_suffix(PAY).map(|base| format!("{base}{REFUND}"))
}

/// The decrypted `req_info` of a v2 refund notification (WeChat's fields, `<root>`).
fn refund_req_info(
    out_refund_no: &str,
    refund: &SimRefund,
    order: &super::state::SimOrder,
) -> Fields {
    let total = order.paid_fee.unwrap_or(order.total_fee).to_string();
    let fee = refund.refund_fee.to_string();
    let mut f = Fields::new()
        .with("out_refund_no", out_refund_no)
        .with("out_trade_no", refund.out_trade_no.as_str())
        .with("refund_account", "REFUND_SOURCE_RECHARGE_FUNDS")
        .with("refund_fee", fee.as_str())
        .with("refund_id", refund.refund_id.as_str())
        .with("refund_recv_accout", refund.recv_account.as_str())
        .with("refund_request_source", "API")
        .with("refund_status", refund_status_v2(&refund.status))
        .with("settlement_refund_fee", fee)
        .with("settlement_total_fee", total.as_str())
        .with("total_fee", total)
        .with(
            "transaction_id",
            order.transaction_id.clone().unwrap_or_default(),
        );
    if let (RefundStatus::Success, Some(t)) = (&refund.status, refund.success_time) {
        f.insert("success_time", format_wechat_datetime(t));
    }
    f
}

/// One delivery of a refund notification, in the merchant's API.
async fn attempt_refund(state: &SimState, key: &Key) -> Attempt {
    let Some(merchant) = state.merchants.get(&key.0) else {
        return Attempt::Abandon;
    };
    enum Built {
        V2(String, String),
        V3(v3::Notification),
    }
    let built = {
        let orders = lock(&state.orders);
        let mut refunds = lock(&state.refunds);
        let Some(refund) = refunds.get_mut(key) else {
            return Attempt::Abandon;
        };
        let Some(order) = orders.get(&(key.0.clone(), refund.out_trade_no.clone())) else {
            return Attempt::Abandon;
        };
        let built = if merchant.api() == Api::V3 {
            match v3::refund_notification(state, merchant, &key.1, refund, order) {
                Some(n) => Built::V3(n),
                None => return Attempt::Abandon,
            }
        } else {
            let Some((v2_key, _)) = merchant.v2_credentials() else {
                return Attempt::Abandon;
            };
            let Some(url) = v2_refund_url(state, order.notify_url.as_deref()) else {
                return Attempt::Abandon;
            };
            let Ok(plain) = xml::encode_rooted(&refund_req_info(&key.1, refund, order), "root")
            else {
                return Attempt::Abandon;
            };
            let f = Fields::new()
                .with("return_code", "SUCCESS")
                .with("appid", order.appid.as_str())
                .with("mch_id", merchant.mch_id.as_str())
                .with("nonce_str", nonce())
                .with("req_info", encrypt_req_info(plain.as_bytes(), v2_key));
            match xml::encode(&f) {
                Ok(body) => Built::V2(url, body),
                Err(_) => return Attempt::Abandon,
            }
        };
        refund.notify_attempts += 1;
        built
    };
    let delivered = match built {
        Built::V2(url, body) => post_v2(state, &url, body).await,
        Built::V3(n) => post_v3(state, n).await,
    };
    if delivered {
        if let Some(refund) = lock(&state.refunds).get_mut(key) {
            refund.notify_delivered = true;
        }
        Attempt::Delivered
    } else {
        tracing::debug!(out_refund_no = %key.1, "refund notification not acknowledged; will retry");
        Attempt::Failed
    }
}

/// One v3 delivery: `TRANSACTION.SUCCESS`, acknowledged by any 2xx answer.
async fn attempt_v3(state: &SimState, merchant: &crate::gateway::Merchant, key: &Key) -> Attempt {
    let notification = {
        let mut orders = lock(&state.orders);
        let Some(order) = orders.get_mut(key) else {
            return Attempt::Abandon;
        };
        let Some(n) = v3::notification(state, merchant, &key.1, order) else {
            return Attempt::Abandon;
        };
        order.notify_attempts += 1;
        n
    };
    let delivered = post_v3(state, notification).await;
    if delivered {
        if let Some(order) = lock(&state.orders).get_mut(key) {
            order.notify_delivered = true;
        }
        Attempt::Delivered
    } else {
        tracing::debug!(out_trade_no = %key.1, "v3 notification not acknowledged; will retry");
        Attempt::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v2_refund_notification_goes_to_the_base_url_else_next_to_the_payment_one() {
        let state = SimState::new(Vec::new(), tokio_util::sync::CancellationToken::new()).unwrap();
        assert_eq!(
            v2_refund_url(&state, Some("https://shop.example/pay/wxpay/v2/notify")).as_deref(),
            Some("https://shop.example/pay/wxpay/v2/refund-notify")
        );
        // An order whose notify_url is not the daemon's endpoint: nowhere to send it.
        assert_eq!(v2_refund_url(&state, Some("https://shop.example/cb")), None);
        assert_eq!(v2_refund_url(&state, None), None);
        state.set_notify_base_url(Some("http://127.0.0.1:9/".into()));
        assert_eq!(
            v2_refund_url(&state, Some("https://shop.example/cb")).as_deref(),
            Some("http://127.0.0.1:9/wxpay/v2/refund-notify")
        );
    }
}

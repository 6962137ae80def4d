//! Payment notifications, delivered like WeChat: at once, then on WeChat's retry schedule until
//! the merchant answers (v2: `return_code` SUCCESS; v3: any 2xx) or the schedule runs out.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::state::{Payment, SimError, SimState, lock, order_fields};
use super::v3;
use crate::gateway::Api;
use crate::wxpay::client::nonce;
use crate::wxpay::{Fields, sign, xml};

type Key = (String, String);

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
            spawn_delivery(self.clone(), (mch_id.to_owned(), out_trade_no.to_owned()));
        }
        Ok(payment)
    }
}

fn spawn_delivery(state: Arc<SimState>, key: Key) {
    tokio::spawn(async move {
        let retries = lock(&state.notify_retries).clone();
        let mut waits = retries.into_iter();
        loop {
            match attempt(&state, &key).await {
                Attempt::Delivered | Attempt::Abandon => return,
                Attempt::Failed => {}
            }
            let Some(wait) = waits.next() else {
                tracing::info!(out_trade_no = %key.1, "notification retries exhausted");
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
    let delivered = match state
        .http
        .post(&url)
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
    };
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
    let mut request = state
        .http
        .post(&notification.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(notification.body);
    for (name, value) in notification.signature.headers() {
        request = request.header(name, value);
    }
    let delivered = matches!(request.send().await, Ok(resp) if resp.status().is_success());
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

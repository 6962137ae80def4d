//! `POST /wxpay/v3/notify` and `POST /wxpay/v3/notify/{mch_id}`: WeChat Pay API v3's
//! notifications, read by `wxpay::v3::notify::read_notification` (the `Wechatpay-*` headers and
//! the signature over the raw body with the key `Wechatpay-Serial` names, the timestamp, the
//! envelope, the resource opened with the merchant's APIv3 key, the transaction) and answered
//! as v3 expects: `204` once durable, else 4xx/5xx with `{"code":"FAIL","message":…}`, a
//! generic message (the precise reason is logged).
//!
//! The merchant is the v3 merchant whose WeChat key the serial names; with `{mch_id}` in the
//! path, only that one. A `TRANSACTION.SUCCESS` goes through the same neutral ingest as v2;
//! other events are acknowledged and counted as `ignored`, never guessed at.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;

use super::ingest::{self, Ingested};
use super::{NotifyApp, Reply, read_body};
use crate::gateway::Merchant;
use crate::telemetry::NotifyOutcome;
use crate::wxpay::v3::notify::{Event, NotifyError, UNAVAILABLE, read_notification};

/// The path WeChat posts every v3 event to (the merchant's `notify_url` points here).
pub const NOTIFY_PATH: &str = "/wxpay/v3/notify";
/// The same, for one merchant only.
pub const MERCHANT_NOTIFY_PATH: &str = "/wxpay/v3/notify/{mch_id}";

const JSON: &str = "application/json";

/// Acknowledged: `204 No Content`, WeChat stops retrying.
fn success(mch_id: Option<String>, outcome: NotifyOutcome) -> Reply {
    Reply {
        mch_id,
        status: StatusCode::NO_CONTENT,
        content_type: None,
        body: String::new(),
        outcome,
        refusal: None,
    }
}

/// Refused: WeChat retries later.
fn fail(
    mch_id: Option<String>,
    status: StatusCode,
    outcome: NotifyOutcome,
    message: &str,
    why: Option<String>,
) -> Reply {
    Reply {
        mch_id,
        status,
        content_type: Some(JSON),
        body: serde_json::json!({"code": "FAIL", "message": message}).to_string(),
        outcome,
        refusal: why,
    }
}

/// Which merchants a notification may be for: every configured one, or the one the path
/// names (`Err` when that one is not a configured v3 merchant).
fn scope<'a>(app: &'a NotifyApp, path_mch_id: Option<&str>) -> Result<Vec<&'a Merchant>, String> {
    match path_mch_id {
        None => Ok(app.merchants().collect()),
        Some(m) => app
            .merchant(m)
            .filter(|m| m.v3_credentials().is_some())
            .map(|m| vec![m])
            .ok_or_else(|| m.to_owned()),
    }
}

/// Reads, verifies and applies one notification.
pub(super) async fn handle(
    app: &NotifyApp,
    path_mch_id: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Reply {
    let bytes = match read_body(headers, body).await {
        Ok(bytes) => bytes,
        Err(e) => {
            return fail(
                None,
                e.status(),
                e.outcome(),
                e.reason(),
                Some(e.why().into()),
            );
        }
    };
    let read = scope(app, path_mch_id)
        .map_err(NotifyError::UnknownMerchant)
        .and_then(|merchants| read_notification(headers, &bytes, Utc::now(), merchants));
    let notified = match read {
        Ok(n) => n,
        Err(e) => {
            let mch_id = e.merchant().map(|m| m.as_str().to_owned());
            if let Some(reason) = e.unverified_reason() {
                app.telemetry
                    .unverified_notification(mch_id.as_deref(), reason);
            }
            if let NotifyError::Unverified { reason, .. } = &e
                && let (Some(m), Some(skew)) = (&mch_id, reason.skew_seconds())
            {
                app.telemetry.clock_skew(m, skew);
            }
            let status = StatusCode::from_u16(e.refusal().status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return fail(mch_id, status, e.outcome(), e.answer(), Some(e.to_string()));
        }
    };
    let mch_id = notified.merchant.mch_id.as_str().to_owned();
    app.telemetry.clock_skew(&mch_id, notified.skew_seconds);
    let ingested = match notified.event {
        Event::Paid(report) => ingest::ingest(app, &mch_id, &report).await,
        Event::Refund(report) => ingest::ingest_refund(app, &mch_id, &report).await,
        Event::Other { event_type, id } => {
            // Events this version does not act on: acknowledged, never guessed at.
            tracing::info!(
                mch_id,
                event_type,
                id,
                "v3 notification of an event this version does not act on; acknowledged"
            );
            return success(Some(mch_id), NotifyOutcome::Ignored);
        }
    };
    match ingested {
        Ingested::Acknowledged(outcome) => success(Some(mch_id), outcome),
        Ingested::Refused {
            outcome,
            reason,
            why,
        } => fail(
            Some(mch_id),
            StatusCode::BAD_REQUEST,
            outcome,
            reason,
            Some(why),
        ),
        Ingested::Unavailable => fail(
            Some(mch_id),
            StatusCode::SERVICE_UNAVAILABLE,
            NotifyOutcome::DbError,
            UNAVAILABLE,
            None,
        ),
    }
}

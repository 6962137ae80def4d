//! `POST /wxpay/v2/refund-notify`: WeChat Pay v2's refund notification, read by
//! `wxpay::refund_notify::read_refund_notification` (the merchant by `mch_id` and its `appid`,
//! `req_info` decrypted with its key, the report parsed), applied by `ingest::ingest_refund`
//! and answered in v2's XML: SUCCESS once durable, else FAIL with a generic reason.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};

use super::ingest::{self, Ingested};
use super::v2::{fail, success};
use super::{NotifyApp, Reply, read_body};
use crate::telemetry::NotifyOutcome;
use crate::wxpay::notify::UNAVAILABLE;
use crate::wxpay::refund_notify::read_refund_notification;

/// The path WeChat posts refund notifications to (the refund's `notify_url`, through the proxy).
pub const REFUND_NOTIFY_PATH: &str = "/wxpay/v2/refund-notify";

/// Reads, decrypts and applies one refund notification.
pub(super) async fn handle(app: &NotifyApp, headers: &HeaderMap, body: Body) -> Reply {
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
    let notification = match read_refund_notification(&bytes, |m| app.merchant(m.as_str())) {
        Ok(n) => n,
        Err(e) => {
            let mch_id = e.merchant().map(|m| m.as_str().to_owned());
            return fail(
                mch_id,
                StatusCode::OK,
                e.outcome(),
                e.answer(),
                Some(e.to_string()),
            );
        }
    };
    let mch_id = notification.merchant.mch_id.as_str().to_owned();
    match ingest::ingest_refund(app, &mch_id, &notification.report).await {
        Ingested::Acknowledged(outcome) => success(Some(mch_id), outcome),
        Ingested::Refused {
            outcome,
            reason,
            why,
        } => fail(Some(mch_id), StatusCode::OK, outcome, reason, Some(why)),
        Ingested::Unavailable => fail(
            Some(mch_id),
            StatusCode::SERVICE_UNAVAILABLE,
            NotifyOutcome::DbError,
            UNAVAILABLE,
            None,
        ),
    }
}

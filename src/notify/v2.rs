//! `POST /wxpay/v2/notify`: WeChat Pay v2's payment notification, read by
//! `wxpay::notify::read_notification` (strict decode, the merchant's signature under the sign
//! types it accepts, appid / mch_id / sub_mch_id, the payment fields) and answered in v2's XML:
//! SUCCESS once durable, else FAIL with a generic reason (the precise one is logged).

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};

use super::ingest::{self, Ingested};
use super::{NotifyApp, Reply, read_body};
use crate::telemetry::NotifyOutcome;
use crate::wxpay::notify::{ANSWER_SUCCESS, Notified, UNAVAILABLE, answer_fail, read_notification};

/// The path WeChat posts to (the merchant's `notify_url` points here through their proxy).
pub const NOTIFY_PATH: &str = "/wxpay/v2/notify";

const XML: &str = "text/xml; charset=utf-8";

pub(super) fn success(mch_id: Option<String>, outcome: NotifyOutcome) -> Reply {
    Reply {
        mch_id,
        status: StatusCode::OK,
        content_type: Some(XML),
        body: ANSWER_SUCCESS.to_owned(),
        outcome,
        refusal: None,
    }
}

pub(super) fn fail(
    mch_id: Option<String>,
    status: StatusCode,
    outcome: NotifyOutcome,
    reason: &str,
    why: Option<String>,
) -> Reply {
    Reply {
        mch_id,
        status,
        content_type: Some(XML),
        body: answer_fail(reason),
        outcome,
        refusal: why,
    }
}

/// Reads, verifies and applies one notification.
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
    let notification = match read_notification(&bytes, |m| app.merchant(m.as_str())) {
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
    let report = match notification.notified {
        Notified::Paid(report) => report,
        Notified::Failed { err_code } => {
            // A failed payment attempt settles nothing; polling keeps asking.
            tracing::info!(
                mch_id,
                err_code,
                "notification of a failed payment; nothing to do"
            );
            return success(Some(mch_id), NotifyOutcome::Ok);
        }
    };
    match ingest::ingest(app, &mch_id, &report).await {
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

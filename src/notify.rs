//! The notify endpoint (`[notify] listen`): `POST /wxpay/v2/notify` receives WeChat's payment
//! notifications on a listener of its own. Each is verified by `wxpay::notify` exactly as an
//! orderquery reply, then applied by the same [`Settler`] as every other report (source
//! `notify`). WeChat gets SUCCESS only once the result is committed (or was already there);
//! every other answer is FAIL, and WeChat retries later, so nothing is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use crate::domain::Source;
use crate::reconcile::policy::Policy;
use crate::reconcile::settle::{Report, Settler, Verdict};
use crate::store::Store;
use crate::telemetry::Telemetry;
use crate::wxpay::notify::{ANSWER_SUCCESS, Notified, UNAVAILABLE, answer_fail, read_notification};
use crate::wxpay::xml::MAX_BODY_BYTES;
use crate::wxpay::{Merchant, QueryAnswer};

/// The path WeChat posts to (the merchant's `notify_url` points here through their proxy).
pub const NOTIFY_PATH: &str = "/wxpay/v2/notify";

/// How long the whole body of a notification may take to arrive.
pub const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// What the endpoint needs.
pub struct NotifyApp {
    pub store: Store,
    pub telemetry: Telemetry,
    pub policy: Policy,
    merchants: HashMap<String, Merchant>,
}

impl NotifyApp {
    pub fn new(
        store: Store,
        telemetry: Telemetry,
        policy: Policy,
        merchants: &[Merchant],
    ) -> NotifyApp {
        NotifyApp {
            store,
            telemetry,
            policy,
            merchants: merchants
                .iter()
                .map(|m| (m.mch_id.as_str().to_owned(), m.clone()))
                .collect(),
        }
    }
}

pub fn router(app: Arc<NotifyApp>) -> Router {
    Router::new()
        .route(NOTIFY_PATH, post(notify))
        .with_state(app)
}

/// One answer: HTTP status, the XML body, and the `outcome` label.
struct Answer {
    status: StatusCode,
    body: String,
    outcome: &'static str,
}

impl Answer {
    fn success(outcome: &'static str) -> Answer {
        Answer {
            status: StatusCode::OK,
            body: ANSWER_SUCCESS.to_owned(),
            outcome,
        }
    }

    fn fail(status: StatusCode, outcome: &'static str, reason: &str) -> Answer {
        Answer {
            status,
            body: answer_fail(reason),
            outcome,
        }
    }
}

async fn notify(State(app): State<Arc<NotifyApp>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let (mch_id, answer) = handle(&app, &headers, body).await;
    app.telemetry
        .notify(mch_id.as_deref(), answer.outcome, started.elapsed());
    (
        answer.status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        answer.body,
    )
        .into_response()
}

async fn handle(app: &NotifyApp, headers: &HeaderMap, body: Body) -> (Option<String>, Answer) {
    let too_large = || Answer::fail(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "body too large");
    // Refused before reading when the length is declared, and cut off at the limit otherwise.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        app.telemetry
            .notify_refused(None, "too_large", "declared length over the limit");
        return (None, too_large());
    }
    let bytes =
        match tokio::time::timeout(BODY_DEADLINE, axum::body::to_bytes(body, MAX_BODY_BYTES)).await
        {
            Ok(Ok(b)) => b,
            Ok(Err(_)) => {
                app.telemetry
                    .notify_refused(None, "too_large", "body over the limit or cut off");
                return (None, too_large());
            }
            Err(_) => {
                // A body trickling in (or never finished) does not hold a connection for long.
                app.telemetry
                    .notify_refused(None, "timeout", "body not received in time");
                return (
                    None,
                    Answer::fail(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        "body not received in time",
                    ),
                );
            }
        };
    let notification = match read_notification(&bytes, |m| app.merchants.get(m.as_str())) {
        Ok(n) => n,
        Err(e) => {
            let mch_id = e.merchant().map(|m| m.as_str().to_owned());
            app.telemetry
                .notify_refused(mch_id.as_deref(), e.outcome(), &e.to_string());
            return (
                mch_id,
                Answer::fail(StatusCode::OK, e.outcome(), e.answer()),
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
            return (Some(mch_id), Answer::success("ok"));
        }
    };
    let out_trade_no = report.out_trade_no.as_str().to_owned();
    let row = match app.store.find_order(&mch_id, &out_trade_no).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            app.telemetry.notify_refused(
                Some(&mch_id),
                "unknown_order",
                &format!("no order {out_trade_no}"),
            );
            return (
                Some(mch_id),
                Answer::fail(StatusCode::OK, "unknown_order", "unknown order"),
            );
        }
        Err(e) => {
            app.telemetry.db_error("notify", &e);
            return (
                Some(mch_id),
                Answer::fail(StatusCode::SERVICE_UNAVAILABLE, "db_error", UNAVAILABLE),
            );
        }
    };
    if let Some(appid) = &report.appid
        && appid.as_str() != row.appid
    {
        // Verified, but the order was registered for another app: never applied to it.
        app.telemetry.notify_refused(
            Some(&mch_id),
            "mismatch",
            &format!(
                "order {out_trade_no} has appid {}, the notification {appid}",
                crate::text::quote(&row.appid)
            ),
        );
        return (
            Some(mch_id),
            Answer::fail(StatusCode::OK, "mismatch", "invalid notification"),
        );
    }
    let settler = Settler {
        store: &app.store,
        telemetry: &app.telemetry,
        policy: &app.policy,
    };
    let outcome = Ok(QueryAnswer::Order(report));
    let verdict = settler
        .apply_report(
            row,
            None,
            Report {
                outcome: &outcome,
                source: Source::Notify,
                queried: false,
            },
        )
        .await;
    let answer = match verdict {
        Ok(Verdict::Unchanged { .. }) => Answer::success("repeat"),
        Ok(v) if v.is_durable() => Answer::success("ok"),
        Ok(v) => {
            // Cannot happen for a payment report without a lease; never acknowledge on doubt.
            tracing::warn!(mch_id, out_trade_no, verdict = ?v, "notification not applied");
            Answer::fail(StatusCode::OK, "db_error", UNAVAILABLE)
        }
        Err(e) => {
            app.telemetry.db_error("notify", &e);
            Answer::fail(StatusCode::SERVICE_UNAVAILABLE, "db_error", UNAVAILABLE)
        }
    };
    (Some(mch_id), answer)
}

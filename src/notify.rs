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
use crate::gateway::{Merchant, TradeReport};
use crate::reconcile::policy::Policy;
use crate::reconcile::settle::{Report, Reported, Settler, Verdict};
use crate::store::{OrderRow, Store};
use crate::telemetry::{DbOp, NotifyOutcome, Telemetry};
use crate::wxpay::notify::{ANSWER_SUCCESS, Notified, UNAVAILABLE, answer_fail, read_notification};
use crate::wxpay::xml::MAX_BODY_BYTES;

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

/// One answer: HTTP status, the XML body, the outcome, and why it was refused (for the log).
struct Answer {
    status: StatusCode,
    body: String,
    outcome: NotifyOutcome,
    refusal: Option<String>,
}

impl Answer {
    fn success(outcome: NotifyOutcome) -> Answer {
        Answer {
            status: StatusCode::OK,
            body: ANSWER_SUCCESS.to_owned(),
            outcome,
            refusal: None,
        }
    }

    /// A FAIL answer whose reason is logged elsewhere (or needs no line).
    fn fail(status: StatusCode, outcome: NotifyOutcome, reason: &str) -> Answer {
        Answer {
            status,
            body: answer_fail(reason),
            outcome,
            refusal: None,
        }
    }

    /// A FAIL answer to a notification refused for `why` (logged, rate-limited).
    fn refused(
        status: StatusCode,
        outcome: NotifyOutcome,
        reason: &str,
        why: impl Into<String>,
    ) -> Answer {
        Answer {
            refusal: Some(why.into()),
            ..Answer::fail(status, outcome, reason)
        }
    }
}

async fn notify(State(app): State<Arc<NotifyApp>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let (mch_id, answer) = handle(&app, &headers, body).await;
    app.telemetry.notify(
        mch_id.as_deref(),
        answer.outcome,
        answer.refusal.as_deref(),
        started.elapsed(),
    );
    (
        answer.status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        answer.body,
    )
        .into_response()
}

/// Reads the body within [`BODY_DEADLINE`] and [`MAX_BODY_BYTES`].
async fn read_body(headers: &HeaderMap, body: Body) -> Result<axum::body::Bytes, Answer> {
    let too_large = |why: &str| {
        Answer::refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            NotifyOutcome::TooLarge,
            "body too large",
            why,
        )
    };
    // Refused before reading when the length is declared, and cut off at the limit otherwise.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large("declared length over the limit"));
    }
    match tokio::time::timeout(BODY_DEADLINE, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err(too_large("body over the limit or cut off")),
        // A body trickling in (or never finished) does not hold a connection for long.
        Err(_) => Err(Answer::refused(
            StatusCode::REQUEST_TIMEOUT,
            NotifyOutcome::Timeout,
            "body not received in time",
            "body not received in time",
        )),
    }
}

async fn handle(app: &NotifyApp, headers: &HeaderMap, body: Body) -> (Option<String>, Answer) {
    let bytes = match read_body(headers, body).await {
        Ok(bytes) => bytes,
        Err(answer) => return (None, answer),
    };
    let notification = match read_notification(&bytes, |m| app.merchants.get(m.as_str())) {
        Ok(n) => n,
        Err(e) => {
            let mch_id = e.merchant().map(|m| m.as_str().to_owned());
            let answer = Answer::refused(StatusCode::OK, e.outcome(), e.answer(), e.to_string());
            return (mch_id, answer);
        }
    };
    let mch_id = notification.merchant.mch_id.as_str().to_owned();
    let answer = match notification.notified {
        Notified::Paid(report) => ingest(app, &mch_id, &report).await,
        Notified::Failed { err_code } => {
            // A failed payment attempt settles nothing; polling keeps asking.
            tracing::info!(
                mch_id,
                err_code,
                "notification of a failed payment; nothing to do"
            );
            Answer::success(NotifyOutcome::Ok)
        }
    };
    (Some(mch_id), answer)
}

/// Applies a verified payment to its order, if it has one here and is for the order's app.
async fn ingest(app: &NotifyApp, mch_id: &str, report: &TradeReport) -> Answer {
    let unavailable = || {
        Answer::fail(
            StatusCode::SERVICE_UNAVAILABLE,
            NotifyOutcome::DbError,
            UNAVAILABLE,
        )
    };
    let out_trade_no = report.out_trade_no.as_str();
    let row = match app.store.find_order(mch_id, out_trade_no).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            return Answer::refused(
                StatusCode::OK,
                NotifyOutcome::UnknownOrder,
                "unknown order",
                format!("no order {out_trade_no}"),
            );
        }
        Err(e) => {
            app.telemetry.db_error(DbOp::Notify, &e);
            return unavailable();
        }
    };
    if let Some(refused) = foreign_app(&row, report) {
        return refused;
    }
    let settler = Settler {
        store: &app.store,
        telemetry: &app.telemetry,
        policy: &app.policy,
    };
    let report = Report {
        reported: Reported::Payment(report),
        source: Source::Notify,
    };
    match settler.apply_report(row, None, report).await {
        Ok(Verdict::Unchanged { .. }) => Answer::success(NotifyOutcome::Repeat),
        Ok(v) if v.is_durable() => Answer::success(NotifyOutcome::Ok),
        Ok(v) => {
            // Cannot happen for a payment report without a lease; never acknowledge on doubt.
            tracing::warn!(mch_id, out_trade_no, verdict = ?v, "notification not applied");
            Answer::fail(StatusCode::OK, NotifyOutcome::DbError, UNAVAILABLE)
        }
        Err(e) => {
            app.telemetry.db_error(DbOp::Notify, &e);
            unavailable()
        }
    }
}

/// A refusal when the payment is verified but the order was registered for another app: never
/// applied to it.
fn foreign_app(row: &OrderRow, report: &TradeReport) -> Option<Answer> {
    let appid = report.appid.as_ref()?;
    (appid.as_str() != row.appid).then(|| {
        Answer::refused(
            StatusCode::OK,
            NotifyOutcome::Mismatch,
            "invalid notification",
            format!(
                "order {} has appid {}, the notification {appid}",
                report.out_trade_no,
                crate::text::quote(&row.appid)
            ),
        )
    })
}

//! The notify endpoint (`[notify] listen`): WeChat's notifications on a listener of their own.
//! Three layers, so that another protocol is one more file:
//!
//! - this file, the transport: the router, the body read within [`BODY_DEADLINE`] and the body
//!   limit, and the one place an answer is logged and counted;
//! - `ingest`, protocol-neutral: a verified payment (a `TradeReport`) applied to its order
//!   by the same [`Settler`](crate::reconcile::settle::Settler) as every other report (source
//!   `notify`), or refused;
//! - `v2`: `POST /wxpay/v2/notify`, WeChat Pay v2's XML: verified by `wxpay::notify` exactly
//!   as an orderquery reply, answered in v2's XML;
//! - `v2_refund`: `POST /wxpay/v2/refund-notify`, v2's refund notification: `req_info`
//!   decrypted by `wxpay::refund_notify`, applied by `ingest::ingest_refund`, answered as `v2`;
//! - `v3`: `POST /wxpay/v3/notify` and `/wxpay/v3/notify/{mch_id}`, API v3's signed JSON with
//!   an encrypted resource: verified and decrypted by `wxpay::v3::notify` exactly as a signed
//!   answer (the merchant is the one whose WeChat key `Wechatpay-Serial` names), answered
//!   `204` or 4xx/5xx with v3's `{"code":"FAIL","message":…}`.
//!
//! Only `wxpay` verifies or decrypts; the protocol files map its verdicts to answers, and
//! `ingest` never sees a protocol. WeChat is acknowledged (v2 SUCCESS, v3 2xx) only once the
//! result is committed (or was already there); every other answer is a refusal, and WeChat
//! retries later, so nothing is lost.

mod ingest;
mod v2;
mod v2_refund;
mod v3;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use crate::gateway::Merchant;
use crate::reconcile::policy::Policy;
use crate::reconcile::refund_policy::RefundPolicy;
use crate::store::Store;
use crate::telemetry::{NotifyOutcome, Telemetry};

pub use v2::NOTIFY_PATH;
pub use v2_refund::REFUND_NOTIFY_PATH as V2_REFUND_NOTIFY_PATH;
pub use v3::{MERCHANT_NOTIFY_PATH as V3_MERCHANT_NOTIFY_PATH, NOTIFY_PATH as V3_NOTIFY_PATH};

/// How long the whole body of a notification may take to arrive.
pub const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest notification body read, of either protocol.
pub const MAX_BODY_BYTES: usize = {
    let (v2, v3) = (
        crate::wxpay::xml::MAX_BODY_BYTES,
        crate::wxpay::v3::model::MAX_BODY_BYTES,
    );
    if v2 > v3 { v2 } else { v3 }
};

/// What the endpoint needs.
pub struct NotifyApp {
    pub store: Store,
    pub telemetry: Telemetry,
    pub policy: Policy,
    /// How a refund notification is decided (`[refunds]`; used whether or not refunds are polled).
    pub refunds: RefundPolicy,
    /// By mch_id (ordered: a v3 serial several merchants know is tried in a stable order).
    merchants: BTreeMap<String, Merchant>,
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
            refunds: RefundPolicy::default(),
            merchants: merchants
                .iter()
                .map(|m| (m.mch_id.as_str().to_owned(), m.clone()))
                .collect(),
        }
    }

    fn merchant(&self, mch_id: &str) -> Option<&Merchant> {
        self.merchants.get(mch_id)
    }

    fn merchants(&self) -> impl Iterator<Item = &Merchant> {
        self.merchants.values()
    }
}

pub fn router(app: Arc<NotifyApp>) -> Router {
    Router::new()
        .route(NOTIFY_PATH, post(v2_notify))
        .route(V2_REFUND_NOTIFY_PATH, post(v2_refund_notify))
        .route(V3_NOTIFY_PATH, post(v3_notify))
        .route(V3_MERCHANT_NOTIFY_PATH, post(v3_merchant_notify))
        .with_state(app)
}

/// One answer as sent: HTTP status, content type and body, with the outcome and the merchant
/// it counts under, and why it was refused (for the log).
struct Reply {
    mch_id: Option<String>,
    status: StatusCode,
    /// `None` for an answer without a body (v3's 204).
    content_type: Option<&'static str>,
    body: String,
    outcome: NotifyOutcome,
    refusal: Option<String>,
}

async fn v2_notify(State(app): State<Arc<NotifyApp>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let reply = v2::handle(&app, &headers, body).await;
    answer(&app, reply, started)
}

async fn v2_refund_notify(
    State(app): State<Arc<NotifyApp>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let reply = v2_refund::handle(&app, &headers, body).await;
    answer(&app, reply, started)
}

async fn v3_notify(State(app): State<Arc<NotifyApp>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let reply = v3::handle(&app, None, &headers, body).await;
    answer(&app, reply, started)
}

async fn v3_merchant_notify(
    State(app): State<Arc<NotifyApp>>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    // A path that does not decode names no merchant: refused as an unknown one, and counted.
    let mch_id = path.map(|Path(m)| m).unwrap_or_default();
    let reply = v3::handle(&app, Some(&mch_id), &headers, body).await;
    answer(&app, reply, started)
}

/// Logs and counts a reply, then sends it.
fn answer(app: &NotifyApp, reply: Reply, started: Instant) -> Response {
    app.telemetry.notify(
        reply.mch_id.as_deref(),
        reply.outcome,
        reply.refusal.as_deref(),
        started.elapsed(),
    );
    match reply.content_type {
        Some(content_type) => (
            reply.status,
            [(header::CONTENT_TYPE, content_type)],
            reply.body,
        )
            .into_response(),
        None => reply.status.into_response(),
    }
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyError {
    /// Declared or found over [`MAX_BODY_BYTES`], or cut off.
    TooLarge(&'static str),
    /// Not received within [`BODY_DEADLINE`].
    Timeout,
}

impl BodyError {
    fn status(self) -> StatusCode {
        match self {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Timeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn outcome(self) -> NotifyOutcome {
        match self {
            BodyError::TooLarge(_) => NotifyOutcome::TooLarge,
            BodyError::Timeout => NotifyOutcome::Timeout,
        }
    }

    /// What the caller is told.
    fn reason(self) -> &'static str {
        match self {
            BodyError::TooLarge(_) => "body too large",
            BodyError::Timeout => "body not received in time",
        }
    }

    /// What the log says.
    fn why(self) -> &'static str {
        match self {
            BodyError::TooLarge(why) => why,
            BodyError::Timeout => "body not received in time",
        }
    }
}

/// Reads the body within [`BODY_DEADLINE`] and [`MAX_BODY_BYTES`]: refused before reading when
/// the length is declared, and cut off at the limit otherwise.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(BodyError::TooLarge("declared length over the limit"));
    }
    match tokio::time::timeout(BODY_DEADLINE, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err(BodyError::TooLarge("body over the limit or cut off")),
        // A body trickling in (or never finished) does not hold a connection for long.
        Err(_) => Err(BodyError::Timeout),
    }
}

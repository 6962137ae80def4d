//! The orderquery / closeorder client: sign ▸ POST ▸ decode ▸ verify ▸ typed answer.
//!
//! A reply is trusted only after, in this order: HTTP 2xx, a strict decode, `return_code`
//! SUCCESS, a valid signature with the merchant's key and sign type, and `appid` / `mch_id` /
//! `sub_mch_id` / the order's id echoing the request. Anything else is a [`WxPayError`], which
//! never changes an order's state.

use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use super::error::{ErrCode, WxPayError};
use super::sign::{self, SignType};
use super::time::{parse_wechat_datetime, parse_wechat_time};
use super::xml::{self, Fields, MAX_BODY_BYTES};
use crate::domain::{
    AppId, Currency, Fen, OutRefundNo, OutTradeNo, RefundId, RefundStatus, TradeState,
    TransactionId,
};
use crate::gateway::merchant::Merchant;
use crate::gateway::report::{
    CloseAnswer, OrderRef, QueryAnswer, RefundAnswer, RefundReport, TradeReport,
};

/// Where and how patiently to talk to WeChat.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// e.g. `https://api.mch.weixin.qq.com` (or a simulator's URL).
    pub base_url: String,
    /// Used after `failover_after` consecutive connect failures on `base_url`.
    pub backup_base_url: Option<String>,
    pub connect_timeout: Duration,
    /// The whole request, connect included.
    pub timeout: Duration,
    /// Consecutive connect/DNS failures on the primary that switch to the backup (WeChat's SDK:
    /// more than 2).
    pub failover_after: u32,
    /// How long to stay on the backup before trying the primary again (WeChat's SDK: 3 minutes).
    pub failback_after: Duration,
}

impl ClientConfig {
    pub fn new(base_url: impl Into<String>) -> Self {
        ClientConfig {
            base_url: base_url.into(),
            backup_base_url: None,
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            failover_after: 3,
            failback_after: Duration::from_secs(180),
        }
    }
}

/// A WeChat Pay v2 client with a keep-alive pool and primary/backup failover. Cheap to share
/// (`Arc`) across tasks.
#[derive(Debug)]
pub struct WxPayClient {
    pub(super) http: reqwest::Client,
    pub(super) config: ClientConfig,
    pub(super) failover: Failover,
}

static CRYPTO: Once = Once::new();

/// A reqwest builder with TLS ready (rustls with *ring*; certificates checked against the
/// platform's trust store) that never follows a redirect: WeChat's API does not redirect, and
/// following one would send a signed request to another host and trust its signed reply. A
/// 3xx is an `http_status` error like any other non-2xx. Every HTTP client of the process
/// starts here.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    CRYPTO.call_once(|| {
        // Err only means another provider is installed already, which serves as well.
        let _already_installed = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none())
}

/// The keep-alive client both protocols' clients talk to WeChat with: [`http_client_builder`]
/// with `config`'s timeouts.
pub(crate) fn pooled_client(config: &ClientConfig) -> Result<reqwest::Client, String> {
    http_client_builder()
        .connect_timeout(config.connect_timeout)
        .timeout(config.timeout)
        .pool_idle_timeout(Duration::from_secs(50))
        .tcp_nodelay(true)
        .user_agent(concat!("wxpay-reconciler/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build HTTP client: {e}"))
}

impl WxPayClient {
    pub fn new(config: ClientConfig) -> Result<Self, WxPayError> {
        let http = pooled_client(&config).map_err(WxPayError::Transport)?;
        Ok(WxPayClient {
            failover: Failover::new(config.failover_after, config.failback_after),
            http,
            config,
        })
    }

    /// `pay/orderquery`, verified.
    pub async fn order_query(
        &self,
        merchant: &Merchant,
        order: &OrderRef,
    ) -> Result<QueryAnswer, WxPayError> {
        let mut req = base_request(merchant);
        match order {
            OrderRef::OutTradeNo(n) => req.insert("out_trade_no", n.as_str()),
            OrderRef::TransactionId(t) => req.insert("transaction_id", t.as_str()),
        }
        let reply = self.call(merchant, "pay/orderquery", req).await?;
        match result_code(&reply)? {
            Ok(()) => {}
            Err(ErrCode::OrderNotExist) => return Ok(QueryAnswer::NotExist),
            Err(code) => return Err(result_fail(&reply, code)),
        }
        let report = parse_trade_report(&reply)?;
        match order {
            OrderRef::OutTradeNo(n) => echo(
                "out_trade_no",
                n.as_str(),
                Some(report.out_trade_no.as_str()),
            )?,
            OrderRef::TransactionId(t) => echo(
                "transaction_id",
                t.as_str(),
                report.transaction_id.as_ref().map(TransactionId::as_str),
            )?,
        }
        Ok(QueryAnswer::Order(report))
    }

    /// `pay/closeorder`, verified.
    pub async fn close_order(
        &self,
        merchant: &Merchant,
        out_trade_no: &OutTradeNo,
    ) -> Result<CloseAnswer, WxPayError> {
        let mut req = base_request(merchant);
        req.insert("out_trade_no", out_trade_no.as_str());
        let reply = self.call(merchant, "pay/closeorder", req).await?;
        match result_code(&reply)? {
            Ok(()) => Ok(CloseAnswer::Closed),
            Err(ErrCode::OrderPaid) => Ok(CloseAnswer::OrderPaid),
            Err(ErrCode::OrderClosed) => Ok(CloseAnswer::OrderClosed),
            Err(ErrCode::OrderNotExist) => Ok(CloseAnswer::NotExist),
            Err(code) => Err(result_fail(&reply, code)),
        }
    }

    /// `pay/refundquery` by `out_refund_no`, verified: the entry of this `out_refund_no` (found
    /// by its number, never by its position), or `REFUNDNOTEXIST`.
    pub async fn refund_query(
        &self,
        merchant: &Merchant,
        out_refund_no: &OutRefundNo,
    ) -> Result<RefundAnswer, WxPayError> {
        let mut req = base_request(merchant);
        req.insert("out_refund_no", out_refund_no.as_str());
        let reply = self.call(merchant, "pay/refundquery", req).await?;
        match result_code(&reply)? {
            Ok(()) => {}
            Err(ErrCode::RefundNotExist) => return Ok(RefundAnswer::NotExist),
            Err(code) => return Err(result_fail(&reply, code)),
        }
        Ok(RefundAnswer::Refund(parse_refund_report(
            &reply,
            out_refund_no,
        )?))
    }

    /// Signs, posts to the current endpoint and verifies the reply's envelope: status, codec,
    /// return_code, signature, appid / mch_id / sub_mch_id.
    async fn call(
        &self,
        merchant: &Merchant,
        path: &str,
        request: Fields,
    ) -> Result<Fields, WxPayError> {
        let response = self.post_signed(merchant, path, request, None).await?;
        let bytes = read_limited(response).await?;
        let reply = xml::decode(&bytes)?;
        verify_envelope(merchant, &reply)?;
        Ok(reply)
    }

    /// Signs `request` with the merchant's key and posts it to `path` on the current endpoint
    /// (recording the outcome for failover), with `timeout` instead of the client's when given;
    /// a 2xx response, else why not.
    pub(crate) async fn post_signed(
        &self,
        merchant: &Merchant,
        path: &str,
        mut request: Fields,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, WxPayError> {
        let (key, sign_type) = v2_credentials(merchant)?;
        sign::sign_in_place(&mut request, key, sign_type);
        let body = xml::encode(&request)?;
        let (endpoint, base) = self.failover.pick(
            Instant::now(),
            &self.config.base_url,
            self.config.backup_base_url.as_deref(),
        );
        let url = format!("{}/{path}", base.trim_end_matches('/'));
        let mut post = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8");
        if let Some(t) = timeout {
            post = post.timeout(t);
        }
        let response = match post.body(body).send().await {
            Ok(r) => {
                self.failover.record(endpoint, false, Instant::now());
                r
            }
            Err(e) => {
                self.failover
                    .record(endpoint, e.is_connect(), Instant::now());
                return Err(transport_error(&e));
            }
        };
        let status = response.status();
        if !status.is_success() {
            return Err(WxPayError::HttpStatus(status.as_u16()));
        }
        Ok(response)
    }
}

pub(super) fn base_request(merchant: &Merchant) -> Fields {
    let mut f = Fields::new()
        .with("appid", merchant.appid.as_str())
        .with("mch_id", merchant.mch_id.as_str());
    if let Some(sub) = &merchant.sub_mch_id {
        f.insert("sub_mch_id", sub.as_str());
    }
    f.insert("nonce_str", nonce());
    f
}

/// 32 random letters and digits, as WeChat's SDKs send.
pub fn nonce() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..32)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

pub(super) fn transport_error(e: &reqwest::Error) -> WxPayError {
    if e.is_timeout() {
        return WxPayError::Timeout;
    }
    WxPayError::Transport(error_chain(e))
}

/// What a transport error says, with the chain of its sources (connection refused, DNS,
/// reset); the URL holds no secret.
pub(crate) fn error_chain(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, WxPayError> {
    if let Some(len) = response.content_length()
        && len > MAX_BODY_BYTES as u64
    {
        return Err(xml::XmlError::TooLarge(usize::try_from(len).unwrap_or(usize::MAX)).into());
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(xml::XmlError::TooLarge(body.len() + chunk.len()).into());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(transport_error(&e)),
        }
    }
}

/// The checks every signed v2 reply gets: `return_code` SUCCESS, a valid signature of the
/// merchant's own sign type, and `appid` / `mch_id` / `sub_mch_id` of this merchant (a
/// `sub_mch_id` where the merchant has none is refused too).
pub fn verify_envelope(merchant: &Merchant, fields: &Fields) -> Result<(), WxPayError> {
    let (_, sign_type) = v2_credentials(merchant)?;
    envelope(merchant, fields, &[sign_type])
}

/// The merchant's v2 key and sign type, or why it has none.
pub(super) fn v2_credentials(merchant: &Merchant) -> Result<(&sign::ApiKey, SignType), WxPayError> {
    merchant
        .v2_credentials()
        .ok_or_else(|| WxPayError::NotV2(merchant.mch_id.to_string()))
}

/// [`verify_envelope`] for a notification, whose sign type is its order's
/// ([`sign::notification_sign_types`]: never weaker than the merchant's setting).
pub fn verify_notification_envelope(
    merchant: &Merchant,
    fields: &Fields,
) -> Result<(), WxPayError> {
    let (_, sign_type) = v2_credentials(merchant)?;
    envelope(merchant, fields, sign::notification_sign_types(sign_type))
}

fn envelope(merchant: &Merchant, fields: &Fields, accepted: &[SignType]) -> Result<(), WxPayError> {
    match fields.get("return_code") {
        Some("SUCCESS") => {}
        Some("FAIL") => {
            return Err(WxPayError::ReturnFail(
                fields.get("return_msg").unwrap_or_default().to_owned(),
            ));
        }
        other => {
            return Err(WxPayError::BadField {
                field: "return_code",
                reason: format!(
                    "{} is neither SUCCESS nor FAIL",
                    crate::text::quote(other.unwrap_or_default())
                ),
            });
        }
    }
    let (key, _) = v2_credentials(merchant)?;
    sign::verify_any(fields, key, accepted)?;
    echo("appid", merchant.appid.as_str(), fields.get("appid"))?;
    echo("mch_id", merchant.mch_id.as_str(), fields.get("mch_id"))?;
    match &merchant.sub_mch_id {
        Some(sub) => echo("sub_mch_id", sub.as_str(), fields.get("sub_mch_id"))?,
        // A message for a sub-merchant is not this merchant's own.
        None => {
            if let Some(sub) = fields.get_nonempty("sub_mch_id") {
                return Err(WxPayError::Mismatch {
                    field: "sub_mch_id",
                    expected: String::new(),
                    got: sub.chars().take(64).collect(),
                });
            }
        }
    }
    Ok(())
}

fn echo(field: &'static str, expected: &str, got: Option<&str>) -> Result<(), WxPayError> {
    if got == Some(expected) {
        Ok(())
    } else {
        Err(WxPayError::Mismatch {
            field,
            expected: expected.to_owned(),
            got: got.unwrap_or_default().chars().take(64).collect(),
        })
    }
}

/// `Ok(Ok(()))` for result_code SUCCESS, `Ok(Err(code))` for FAIL.
fn result_code(fields: &Fields) -> Result<Result<(), ErrCode>, WxPayError> {
    match fields.get("result_code") {
        Some("SUCCESS") => Ok(Ok(())),
        Some("FAIL") => Ok(Err(ErrCode::parse(
            fields.get("err_code").unwrap_or_default(),
        ))),
        other => Err(WxPayError::BadField {
            field: "result_code",
            reason: format!(
                "{} is neither SUCCESS nor FAIL",
                crate::text::quote(other.unwrap_or_default())
            ),
        }),
    }
}

fn result_fail(fields: &Fields, code: ErrCode) -> WxPayError {
    WxPayError::ResultFail {
        code,
        description: fields
            .get("err_code_des")
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect(),
    }
}

/// Parses the order fields of a verified orderquery reply. A reply without `trade_state` is
/// malformed: nothing is ever taken as paid by default (a payment notification, which has no
/// `trade_state`, is read by [`super::notify::parse_payment`]).
pub fn parse_trade_report(fields: &Fields) -> Result<TradeReport, WxPayError> {
    let trade_state = fields
        .get_nonempty("trade_state")
        .map(TradeState::parse)
        .ok_or_else(|| bad_field("trade_state", "missing"))?;
    order_fields(fields, trade_state)
}

/// A field of a verified message that cannot be used.
fn bad_field(field: &'static str, e: impl std::fmt::Display) -> WxPayError {
    WxPayError::BadField {
        field,
        reason: e.to_string(),
    }
}

/// The order fields of a verified message (a reply or a notification) that reports
/// `trade_state`; a paid state needs its transaction, amount and time. WeChat leaves
/// `fee_type` out for CNY.
pub(super) fn order_fields(
    fields: &Fields,
    trade_state: TradeState,
) -> Result<TradeReport, WxPayError> {
    fn optional<T>(
        fields: &Fields,
        name: &'static str,
        parse: impl Fn(&str) -> Result<T, crate::domain::ParseError>,
    ) -> Result<Option<T>, WxPayError> {
        fields
            .get_nonempty(name)
            .map(|v| parse(v).map_err(|e| bad_field(name, e)))
            .transpose()
    }
    let out_trade_no = optional(fields, "out_trade_no", OutTradeNo::parse)?
        .ok_or_else(|| bad_field("out_trade_no", "missing"))?;
    let report = TradeReport {
        out_trade_no,
        state_desc: fields.get_nonempty("trade_state_desc").map(str::to_owned),
        transaction_id: optional(fields, "transaction_id", TransactionId::parse)?,
        amount: optional(fields, "total_fee", str::parse::<Fen>)?,
        payer_amount: optional(fields, "cash_fee", str::parse::<Fen>)?,
        paid_at: optional(fields, "time_end", parse_wechat_time)?,
        currency: optional(fields, "fee_type", Currency::parse)?.unwrap_or_else(Currency::cny),
        appid: optional(fields, "appid", AppId::parse)?,
        trade_state,
    };
    if matches!(report.trade_state, TradeState::Success | TradeState::Refund) {
        if report.transaction_id.is_none() {
            return Err(bad_field("transaction_id", "missing in a paid order"));
        }
        if report.amount.is_none() {
            return Err(bad_field("total_fee", "missing in a paid order"));
        }
        if report.paid_at.is_none() {
            return Err(bad_field("time_end", "missing in a paid order"));
        }
    }
    Ok(report)
}

/// The most refund entries a refundquery reply may list (WeChat pages them by 20 when asked by
/// order; asked by `out_refund_no` it lists one).
pub const MAX_REFUND_ENTRIES: u32 = 100;

/// The most characters kept of `refund_recv_accout_$n` (WeChat: String(64)).
pub const MAX_RECV_ACCOUNT_CHARS: usize = 64;

/// The most characters kept of a refund status this version does not know.
const MAX_UNKNOWN_STATUS_CHARS: usize = 32;

/// Reads the entry of `asked` in a verified refundquery reply: `refund_count`, then the indexed
/// `out_refund_no_$n`, `refund_id_$n`, `refund_status_$n`, `refund_fee_$n`,
/// `refund_success_time_$n` (`yyyy-MM-dd HH:mm:ss`, China time), `refund_recv_accout_$n`;
/// and the order's `out_trade_no`, `total_fee`, `fee_type` (CNY when absent). The entry is
/// found by its number: a reply without it is a [`WxPayError::Mismatch`], one that lists it
/// twice is malformed. A SUCCESS needs its `refund_id` and success time.
pub fn parse_refund_report(
    fields: &Fields,
    asked: &OutRefundNo,
) -> Result<RefundReport, WxPayError> {
    let count: u32 = fields
        .get_nonempty("refund_count")
        .ok_or_else(|| bad_field("refund_count", "missing"))?
        .parse()
        .map_err(|_| {
            bad_field(
                "refund_count",
                format!(
                    "{} is not a count",
                    crate::text::quote(fields.get("refund_count").unwrap_or_default())
                ),
            )
        })?;
    if count > MAX_REFUND_ENTRIES {
        return Err(bad_field(
            "refund_count",
            format!("{count} entries, more than the {MAX_REFUND_ENTRIES} allowed"),
        ));
    }
    let mut found = None;
    let mut first_listed = None;
    for n in 0..count {
        let Some(no) = fields.get(&format!("out_refund_no_{n}")) else {
            return Err(bad_field(
                "out_refund_no_$n",
                format!("entry {n} is missing"),
            ));
        };
        first_listed.get_or_insert(no);
        if no == asked.as_str() {
            if found.is_some() {
                return Err(bad_field(
                    "out_refund_no_$n",
                    format!("{} is listed twice", crate::text::quote(no)),
                ));
            }
            found = Some(n);
        }
    }
    let Some(n) = found else {
        return Err(WxPayError::Mismatch {
            field: "out_refund_no",
            expected: asked.as_str().to_owned(),
            got: first_listed.unwrap_or_default().chars().take(64).collect(),
        });
    };
    let entry = |name: &str| fields.get_nonempty(&format!("{name}_{n}"));
    let status = entry("refund_status")
        .map(|s| match RefundStatus::parse_v2(s) {
            RefundStatus::Unknown(u) => {
                RefundStatus::Unknown(u.chars().take(MAX_UNKNOWN_STATUS_CHARS).collect())
            }
            known => known,
        })
        .ok_or_else(|| bad_field("refund_status_$n", "missing"))?;
    let refund_fee = entry("refund_fee")
        .ok_or_else(|| bad_field("refund_fee_$n", "missing"))?
        .parse::<Fen>()
        .map_err(|e| bad_field("refund_fee_$n", e))?;
    let refund_id = entry("refund_id")
        .map(RefundId::parse)
        .transpose()
        .map_err(|e| bad_field("refund_id_$n", e))?;
    let success_time = entry("refund_success_time")
        .map(parse_wechat_datetime)
        .transpose()
        .map_err(|e| bad_field("refund_success_time_$n", e))?;
    let recv_account = entry("refund_recv_accout")
        .map(|a| a.chars().take(MAX_RECV_ACCOUNT_CHARS).collect::<String>());
    let out_trade_no = fields
        .get_nonempty("out_trade_no")
        .ok_or_else(|| bad_field("out_trade_no", "missing"))
        .and_then(|s| OutTradeNo::parse(s).map_err(|e| bad_field("out_trade_no", e)))?;
    let total_fee = fields
        .get_nonempty("total_fee")
        .map(str::parse::<Fen>)
        .transpose()
        .map_err(|e| bad_field("total_fee", e))?;
    let currency = fields
        .get_nonempty("fee_type")
        .map(Currency::parse)
        .transpose()
        .map_err(|e| bad_field("fee_type", e))?
        .unwrap_or_else(Currency::cny);
    if status == RefundStatus::Success {
        if refund_id.is_none() {
            return Err(bad_field("refund_id_$n", "missing in a successful refund"));
        }
        if success_time.is_none() {
            return Err(bad_field(
                "refund_success_time_$n",
                "missing in a successful refund",
            ));
        }
    }
    Ok(RefundReport {
        out_refund_no: asked.clone(),
        out_trade_no,
        status,
        refund_id,
        refund_fee,
        total_fee,
        currency,
        success_time,
        recv_account,
    })
}

/// Which base URL a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Primary,
    Backup,
}

/// Primary/backup switching as WeChat's SDK does it: after `after` consecutive connect failures
/// on the primary, use the backup for `back_after`, then try the primary again.
#[derive(Debug)]
pub struct Failover {
    after: u32,
    back_after: Duration,
    state: Mutex<FailoverState>,
}

#[derive(Debug, Default)]
struct FailoverState {
    consecutive_failures: u32,
    backup_until: Option<Instant>,
}

impl Failover {
    pub fn new(after: u32, back_after: Duration) -> Self {
        Failover {
            after: after.max(1),
            back_after,
            state: Mutex::new(FailoverState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FailoverState> {
        // The state is two plain numbers: a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoint to use now, and its base URL.
    pub fn pick<'a>(
        &self,
        now: Instant,
        primary: &'a str,
        backup: Option<&'a str>,
    ) -> (Endpoint, &'a str) {
        let Some(backup) = backup else {
            return (Endpoint::Primary, primary);
        };
        let mut state = self.lock();
        match state.backup_until {
            Some(until) if now < until => (Endpoint::Backup, backup),
            Some(_) => {
                state.backup_until = None;
                state.consecutive_failures = 0;
                (Endpoint::Primary, primary)
            }
            None => (Endpoint::Primary, primary),
        }
    }

    /// Records how a request to `endpoint` went (`connect_failed`: the request never reached
    /// the server).
    pub fn record(&self, endpoint: Endpoint, connect_failed: bool, now: Instant) {
        if endpoint != Endpoint::Primary {
            return;
        }
        let mut state = self.lock();
        if !connect_failed {
            state.consecutive_failures = 0;
            return;
        }
        state.consecutive_failures += 1;
        if state.consecutive_failures >= self.after && state.backup_until.is_none() {
            state.backup_until = Some(now + self.back_after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_switches_after_repeated_connect_failures_and_comes_back() {
        let f = Failover::new(3, Duration::from_secs(180));
        let t0 = Instant::now();
        let pick = |t| f.pick(t, "p", Some("b")).0;
        assert_eq!(pick(t0), Endpoint::Primary);
        f.record(Endpoint::Primary, true, t0);
        f.record(Endpoint::Primary, true, t0);
        assert_eq!(pick(t0), Endpoint::Primary, "2 failures are not enough");
        f.record(Endpoint::Primary, false, t0);
        f.record(Endpoint::Primary, true, t0);
        f.record(Endpoint::Primary, true, t0);
        assert_eq!(pick(t0), Endpoint::Primary, "a success resets the count");
        f.record(Endpoint::Primary, true, t0);
        assert_eq!(pick(t0), Endpoint::Backup);
        f.record(Endpoint::Backup, true, t0);
        assert_eq!(pick(t0 + Duration::from_secs(179)), Endpoint::Backup);
        assert_eq!(pick(t0 + Duration::from_secs(180)), Endpoint::Primary);
        f.record(Endpoint::Primary, true, t0 + Duration::from_secs(181));
        assert_eq!(
            pick(t0 + Duration::from_secs(181)),
            Endpoint::Primary,
            "the count starts again after failing back"
        );
    }

    #[test]
    fn no_backup_means_primary_always() {
        let f = Failover::new(1, Duration::from_secs(1));
        f.record(Endpoint::Primary, true, Instant::now());
        assert_eq!(f.pick(Instant::now(), "p", None).0, Endpoint::Primary);
    }

    fn refund_reply(entries: &[(&str, &str, &str)]) -> Fields {
        let mut f = Fields::new()
            .with("return_code", "SUCCESS")
            .with("result_code", "SUCCESS")
            .with("out_trade_no", "order1")
            .with("transaction_id", "4200000032201712018244009390")
            .with("total_fee", "1000")
            .with("cash_fee", "1000")
            .with("refund_count", entries.len().to_string());
        for (n, (no, status, fee)) in entries.iter().enumerate() {
            f.insert(format!("out_refund_no_{n}"), *no);
            f.insert(
                format!("refund_id_{n}"),
                format!("5000060491201712010252455178{n}"),
            );
            f.insert(format!("refund_status_{n}"), *status);
            f.insert(format!("refund_fee_{n}"), *fee);
            f.insert(format!("refund_recv_accout_{n}"), "支付用户的零钱");
            f.insert(format!("refund_success_time_{n}"), "2017-12-01 12:56:40");
        }
        f
    }

    fn orn(s: &str) -> OutRefundNo {
        OutRefundNo::parse(s).unwrap()
    }

    #[test]
    fn the_refund_entry_is_found_by_its_number_not_its_position() {
        let f = refund_reply(&[
            ("r-first", "PROCESSING", "100"),
            ("r-second", "REFUNDCLOSE", "200"),
            ("r-third", "SUCCESS", "333"),
        ]);
        let r = parse_refund_report(&f, &orn("r-third")).unwrap();
        assert_eq!(r.out_refund_no.as_str(), "r-third");
        assert_eq!(r.status, RefundStatus::Success);
        assert_eq!(r.refund_fee, Fen::new(333).unwrap());
        assert_eq!(r.total_fee, Some(Fen::new(1000).unwrap()));
        assert_eq!(
            r.refund_id.unwrap().as_str(),
            "50000604912017120102524551782"
        );
        assert_eq!(r.currency, Currency::cny());
        assert_eq!(r.out_trade_no.as_str(), "order1");
        assert_eq!(
            r.success_time.unwrap().to_rfc3339(),
            "2017-12-01T04:56:40+00:00"
        );
        assert_eq!(r.recv_account.as_deref(), Some("支付用户的零钱"));
        let closed = parse_refund_report(&f, &orn("r-second")).unwrap();
        assert_eq!(closed.status, RefundStatus::Closed);
        assert_eq!(closed.refund_fee.get(), 200);
    }

    #[test]
    fn a_reply_without_the_asked_refund_is_a_mismatch() {
        let f = refund_reply(&[("r-other", "SUCCESS", "1")]);
        let e = parse_refund_report(&f, &orn("r-mine")).unwrap_err();
        assert!(
            matches!(
                e,
                WxPayError::Mismatch {
                    field: "out_refund_no",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.outcome(), "mismatch");
        // An entry beyond refund_count is not listed.
        let mut f = refund_reply(&[("r-other", "SUCCESS", "1")]);
        f.insert("out_refund_no_1", "r-mine");
        f.insert("refund_status_1", "SUCCESS");
        f.insert("refund_fee_1", "1");
        assert!(matches!(
            parse_refund_report(&f, &orn("r-mine")),
            Err(WxPayError::Mismatch { .. })
        ));
        // Listed twice is ambiguous.
        let f = refund_reply(&[("r-mine", "SUCCESS", "1"), ("r-mine", "PROCESSING", "1")]);
        assert_eq!(
            parse_refund_report(&f, &orn("r-mine"))
                .unwrap_err()
                .outcome(),
            "malformed"
        );
    }

    #[test]
    fn refund_statuses_and_amounts() {
        for (wire, status) in [
            ("PROCESSING", RefundStatus::Processing),
            ("CHANGE", RefundStatus::Abnormal),
            ("REFUNDCLOSE", RefundStatus::Closed),
            (
                "SOMETHING_NEW",
                RefundStatus::Unknown("SOMETHING_NEW".into()),
            ),
        ] {
            let f = refund_reply(&[("r1", wire, "9007199254740993")]);
            let r = parse_refund_report(&f, &orn("r1")).unwrap();
            assert_eq!(r.status, status);
            // Exact fen, beyond what a float holds.
            assert_eq!(r.refund_fee.get(), 9_007_199_254_740_993);
        }
        let long = "X".repeat(5000);
        let f = refund_reply(&[("r1", &long, "1")]);
        match parse_refund_report(&f, &orn("r1")).unwrap().status {
            RefundStatus::Unknown(u) => assert!(u.len() <= 32),
            other => panic!("{other:?}"),
        }
        for bad in ["1.00", "-1", "", "1e3"] {
            let f = refund_reply(&[("r1", "SUCCESS", bad)]);
            assert_eq!(
                parse_refund_report(&f, &orn("r1")).unwrap_err().outcome(),
                "malformed",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_refund_reply_is_read_strictly_and_bounded() {
        let mut f = refund_reply(&[("r1", "SUCCESS", "1")]);
        f.insert("refund_recv_accout_0", "卡".repeat(10_000));
        let r = parse_refund_report(&f, &orn("r1")).unwrap();
        assert_eq!(
            r.recv_account.unwrap().chars().count(),
            MAX_RECV_ACCOUNT_CHARS
        );
        let mut f = refund_reply(&[("r1", "SUCCESS", "1")]);
        f.remove("refund_success_time_0");
        assert!(
            parse_refund_report(&f, &orn("r1")).is_err(),
            "SUCCESS needs its time"
        );
        let mut f = refund_reply(&[("r1", "SUCCESS", "1")]);
        f.insert("refund_success_time_0", "20171201125640");
        assert!(parse_refund_report(&f, &orn("r1")).is_err());
        let mut f = refund_reply(&[("r1", "SUCCESS", "1")]);
        f.insert("refund_count", "100000");
        assert!(parse_refund_report(&f, &orn("r1")).is_err());
        let mut f = refund_reply(&[("r1", "SUCCESS", "1")]);
        f.remove("refund_count");
        assert!(parse_refund_report(&f, &orn("r1")).is_err());
        let mut f = refund_reply(&[("r1", "PROCESSING", "1")]);
        f.insert("fee_type", "USD");
        assert_eq!(
            parse_refund_report(&f, &orn("r1"))
                .unwrap()
                .currency
                .as_str(),
            "USD"
        );
    }

    #[test]
    fn nonce_is_32_alphanumerics() {
        let n = nonce();
        assert_eq!(n.len(), 32);
        assert!(n.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(n, nonce());
    }
}

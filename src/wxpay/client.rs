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
use super::time::parse_wechat_time;
use super::xml::{self, Fields, MAX_BODY_BYTES};
use crate::domain::{AppId, Currency, Fen, OutTradeNo, TradeState, TransactionId};
use crate::gateway::merchant::Merchant;
use crate::gateway::report::{CloseAnswer, OrderRef, QueryAnswer, TradeReport};

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
    http: reqwest::Client,
    config: ClientConfig,
    failover: Failover,
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

    /// Signs, posts to the current endpoint and verifies the reply's envelope: status, codec,
    /// return_code, signature, appid / mch_id / sub_mch_id.
    async fn call(
        &self,
        merchant: &Merchant,
        path: &str,
        mut request: Fields,
    ) -> Result<Fields, WxPayError> {
        let (key, sign_type) = v2_credentials(merchant)?;
        sign::sign_in_place(&mut request, key, sign_type);
        let body = xml::encode(&request)?;
        let (endpoint, base) = self.failover.pick(
            Instant::now(),
            &self.config.base_url,
            self.config.backup_base_url.as_deref(),
        );
        let url = format!("{}/{path}", base.trim_end_matches('/'));
        let sent = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .body(body)
            .send()
            .await;
        let response = match sent {
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
        let bytes = read_limited(response).await?;
        let reply = xml::decode(&bytes)?;
        verify_envelope(merchant, &reply)?;
        Ok(reply)
    }
}

fn base_request(merchant: &Merchant) -> Fields {
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

fn transport_error(e: &reqwest::Error) -> WxPayError {
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
fn v2_credentials(merchant: &Merchant) -> Result<(&sign::ApiKey, SignType), WxPayError> {
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

    #[test]
    fn nonce_is_32_alphanumerics() {
        let n = nonce();
        assert_eq!(n.len(), 32);
        assert!(n.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(n, nonce());
    }
}

//! The v3 orderquery / closeorder / certificates client: sign ▸ send ▸ verify ▸ parse ▸ typed
//! answer.
//!
//! An answer is trusted only after, in this order: HTTP 2xx, the four `Wechatpay-*` headers,
//! not a probe, the signature over the raw body with the key its serial names, a timestamp
//! within 300 s, a strict parse, and `mchid` / `out_trade_no` echoing the request. A non-2xx
//! answer is a hint at most; only a verified `404 ORDER_NOT_EXIST` is an answer. A close is
//! always confirmed by a query: a 204 proves nothing about the order.

use std::time::Instant;

use chrono::{DateTime, Utc};

use super::auth::{Request, RequestSigner, SignedHeaders, Unverified, Verified};
use super::crypto::Certificate;
use super::error::V3Error;
use super::keys::WechatKeys;
use super::model::{Certificates, ErrorBody, MAX_BODY_BYTES, Transaction, parse_refund};
use crate::domain::{OutRefundNo, OutTradeNo, TradeState, TransactionId};
use crate::gateway::merchant::{Merchant, V3Credentials};
use crate::gateway::report::{
    CertificateRefresh, CloseAnswer, OrderRef, QueryAnswer, RefundAnswer,
};
use crate::wxpay::client::{ClientConfig, Failover, error_chain, nonce, pooled_client};

/// A WeChat Pay v3 client with a keep-alive pool and primary/backup failover. Cheap to share
/// (`Arc`) across tasks.
#[derive(Debug)]
pub struct V3Client {
    pub(super) http: reqwest::Client,
    pub(super) config: ClientConfig,
    pub(super) failover: Failover,
    /// Our clock, for the timestamp check and the request's own timestamp.
    pub(super) clock: fn() -> DateTime<Utc>,
}

/// An answer as it came: its status, body and whether its signature verified.
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) body: Vec<u8>,
    headers: Result<SignedHeaders, Unverified>,
    verified: Result<Verified, Unverified>,
}

impl Answer {
    /// The body of a verified 2xx answer.
    pub(super) fn verified_body(self, keys: &WechatKeys) -> Result<Vec<u8>, V3Error> {
        match self.verified {
            Ok(_) => Ok(self.body),
            Err(u) => {
                if matches!(u, Unverified::UnknownSerial(_)) {
                    keys.want_refresh();
                }
                Err(V3Error::Unverified(u))
            }
        }
    }

    /// The error of a non-2xx answer (a hint: the order's state never changes on it).
    pub(super) fn error(&self) -> V3Error {
        status_error(self.status, &self.body)
    }

    pub(super) fn code(&self) -> Option<String> {
        ErrorBody::parse(&self.body).map(|b| b.code)
    }
}

pub(super) fn credentials(merchant: &Merchant) -> Result<&V3Credentials, V3Error> {
    merchant
        .v3_credentials()
        .ok_or_else(|| V3Error::NotV3(merchant.mch_id.to_string()))
}

impl V3Client {
    pub fn new(config: ClientConfig) -> Result<Self, V3Error> {
        let http = pooled_client(&config).map_err(V3Error::Transport)?;
        Ok(V3Client {
            failover: Failover::new(config.failover_after, config.failback_after),
            http,
            config,
            clock: Utc::now,
        })
    }

    /// The same client on another clock (tests replaying answers signed in the past).
    pub fn with_clock(self, clock: fn() -> DateTime<Utc>) -> V3Client {
        V3Client { clock, ..self }
    }

    /// The path of an order, for a direct merchant or a service provider's sub-merchant.
    fn order_path(merchant: &Merchant, order: &OrderRef) -> String {
        let (by, id) = match order {
            OrderRef::OutTradeNo(n) => ("out-trade-no", n.as_str()),
            OrderRef::TransactionId(t) => ("id", t.as_str()),
        };
        match &merchant.sub_mch_id {
            Some(sub) => format!(
                "/v3/pay/partner/transactions/{by}/{id}?sp_mchid={}&sub_mchid={sub}",
                merchant.mch_id
            ),
            None => format!("/v3/pay/transactions/{by}/{id}?mchid={}", merchant.mch_id),
        }
    }

    /// orderquery, verified.
    pub async fn order_query(
        &self,
        merchant: &Merchant,
        order: &OrderRef,
    ) -> Result<QueryAnswer, V3Error> {
        let creds = credentials(merchant)?;
        let answer = self
            .call(
                merchant,
                creds,
                "GET",
                &Self::order_path(merchant, order),
                "",
            )
            .await?;
        if !(200..300).contains(&answer.status) {
            if answer.status == 404 && answer.code().as_deref() == Some("ORDER_NOT_EXIST") {
                // Only a verified "no such order" is an answer.
                answer.verified_body(&creds.wechat)?;
                return Ok(QueryAnswer::NotExist);
            }
            return Err(answer.error());
        }
        let body = answer.verified_body(&creds.wechat)?;
        let transaction = Transaction::parse(&body)?;
        transaction.check_merchant(&merchant.mch_id, merchant.sub_mch_id.as_ref())?;
        let report = &transaction.report;
        match order {
            OrderRef::OutTradeNo(n) => {
                echo("out_trade_no", n.as_str(), report.out_trade_no.as_str())?
            }
            OrderRef::TransactionId(t) => echo(
                "transaction_id",
                t.as_str(),
                report
                    .transaction_id
                    .as_ref()
                    .map(TransactionId::as_str)
                    .unwrap_or_default(),
            )?,
        }
        Ok(QueryAnswer::Order(transaction.report))
    }

    /// The path of a refund query (a service provider names its sub-merchant).
    fn refund_path(merchant: &Merchant, out_refund_no: &OutRefundNo) -> String {
        match &merchant.sub_mch_id {
            Some(sub) => format!("/v3/refund/domestic/refunds/{out_refund_no}?sub_mchid={sub}"),
            None => format!("/v3/refund/domestic/refunds/{out_refund_no}"),
        }
    }

    /// `GET /v3/refund/domestic/refunds/{out_refund_no}`, verified as any answer; a verified
    /// 404 `RESOURCE_NOT_EXISTS` is [`RefundAnswer::NotExist`]. The answer must name the refund
    /// asked about.
    pub async fn refund_query(
        &self,
        merchant: &Merchant,
        out_refund_no: &OutRefundNo,
    ) -> Result<RefundAnswer, V3Error> {
        let creds = credentials(merchant)?;
        let answer = self
            .call(
                merchant,
                creds,
                "GET",
                &Self::refund_path(merchant, out_refund_no),
                "",
            )
            .await?;
        if !(200..300).contains(&answer.status) {
            if answer.status == 404 && answer.code().as_deref() == Some("RESOURCE_NOT_EXISTS") {
                // Only a verified "no such refund" is an answer.
                answer.verified_body(&creds.wechat)?;
                return Ok(RefundAnswer::NotExist);
            }
            return Err(answer.error());
        }
        let body = answer.verified_body(&creds.wechat)?;
        let report = parse_refund(&body)?;
        echo(
            "out_refund_no",
            out_refund_no.as_str(),
            report.out_refund_no.as_str(),
        )?;
        Ok(RefundAnswer::Refund(report))
    }

    /// closeorder, then a query that says what the order is now.
    pub async fn close_order(
        &self,
        merchant: &Merchant,
        out_trade_no: &OutTradeNo,
    ) -> Result<CloseAnswer, V3Error> {
        let creds = credentials(merchant)?;
        let (path, body) = match &merchant.sub_mch_id {
            Some(sub) => (
                format!("/v3/pay/partner/transactions/out-trade-no/{out_trade_no}/close"),
                serde_json::json!({"sp_mchid": merchant.mch_id.as_str(), "sub_mchid": sub.as_str()}),
            ),
            None => (
                format!("/v3/pay/transactions/out-trade-no/{out_trade_no}/close"),
                serde_json::json!({"mchid": merchant.mch_id.as_str()}),
            ),
        };
        let answer = self
            .call(merchant, creds, "POST", &path, &body.to_string())
            .await?;
        let closed_by_us = if (200..300).contains(&answer.status) {
            answer.verified_body(&creds.wechat)?;
            true
        } else {
            match answer.code().as_deref() {
                Some("ORDER_CLOSED" | "ORDER_PAID" | "ORDERPAID" | "ORDER_NOT_EXIST") => false,
                _ => return Err(answer.error()),
            }
        };
        let order = OrderRef::OutTradeNo(out_trade_no.clone());
        Ok(match self.order_query(merchant, &order).await? {
            QueryAnswer::NotExist => CloseAnswer::NotExist,
            QueryAnswer::Order(report) => match report.trade_state {
                TradeState::Closed if closed_by_us => CloseAnswer::Closed,
                TradeState::Closed => CloseAnswer::OrderClosed,
                // Paid, or ended another way: query it and settle what it says.
                TradeState::Success
                | TradeState::Refund
                | TradeState::Revoked
                | TradeState::PayError => CloseAnswer::OrderPaid,
                other => return Err(V3Error::NotClosed(other.label().to_owned())),
            },
        })
    }

    /// `GET /v3/certificates`: decrypts each certificate with the APIv3 key, checks its serial
    /// and validity, verifies the answer (with a key already held, or, the first time, with
    /// the certificate the answer names among the downloaded ones), and keeps every valid one.
    pub async fn download_certificates(
        &self,
        merchant: &Merchant,
    ) -> Result<CertificateRefresh, V3Error> {
        let creds = credentials(merchant)?;
        let answer = self
            .call(merchant, creds, "GET", "/v3/certificates", "")
            .await?;
        if !(200..300).contains(&answer.status) {
            if answer.code().as_deref() == Some("RESOURCE_NOT_EXISTS") {
                return Ok(CertificateRefresh::PublicKeyOnly);
            }
            return Err(answer.error());
        }
        let now = (self.clock)();
        let list = Certificates::parse(&answer.body)?;
        let mut fresh = Vec::with_capacity(list.data.len());
        for entry in &list.data {
            let e = &entry.encrypt_certificate;
            let pem = creds
                .apiv3_key
                .decrypt(&e.nonce, &e.associated_data, &e.ciphertext)
                .map_err(V3Error::Decrypt)?;
            let cert = Certificate::from_pem(&pem).map_err(V3Error::Decrypt)?;
            if !cert.serial.eq_ignore_ascii_case(&entry.serial_no) {
                return Err(V3Error::Mismatch {
                    field: "serial_no",
                    expected: cert.serial,
                    got: entry.serial_no.clone(),
                });
            }
            fresh.push(cert);
        }
        let keys = &creds.wechat;
        if let Err(u) = &answer.verified {
            // Bootstrap: nothing held yet verifies the list; the certificate it names among
            // the downloaded ones must (their content was authenticated by the APIv3 key).
            let bootstrap = matches!(u, Unverified::UnknownSerial(_)) && !keys.has_certificates();
            let headers = answer
                .headers
                .as_ref()
                .map_err(|u| V3Error::Unverified(u.clone()))?;
            if !bootstrap {
                return Err(V3Error::Unverified(u.clone()));
            }
            let own = WechatKeys::new(None, keys.certificate_mode());
            own.add_certificates(fresh.clone(), now);
            headers
                .verify(&answer.body, now, &own)
                .map_err(V3Error::Unverified)?;
        }
        keys.add_certificates(fresh, now);
        Ok(CertificateRefresh::Updated(
            keys.certificates()
                .into_iter()
                .map(|c| (c.serial, c.not_after))
                .collect(),
        ))
    }

    /// Signs and sends one request to the current endpoint; reads the answer within the body
    /// limit and checks its signature (the caller decides what an unverified answer means).
    pub(super) async fn call(
        &self,
        merchant: &Merchant,
        creds: &V3Credentials,
        method: &str,
        path_and_query: &str,
        body: &str,
    ) -> Result<Answer, V3Error> {
        let nonce = nonce();
        let authorization = RequestSigner {
            mch_id: merchant.mch_id.as_str(),
            serial_no: &creds.cert_serial_no,
            key: &creds.private_key,
        }
        .authorization(&Request {
            method,
            path_and_query,
            timestamp: (self.clock)().timestamp(),
            nonce: &nonce,
            body,
        })
        .map_err(V3Error::Signing)?;
        let (endpoint, base) = self.failover.pick(
            Instant::now(),
            &self.config.base_url,
            self.config.backup_base_url.as_deref(),
        );
        let url = format!("{}{path_and_query}", base.trim_end_matches('/'));
        let mut request = match method {
            "POST" => self
                .http
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_owned()),
            _ => self.http.get(&url),
        }
        .header(reqwest::header::AUTHORIZATION, authorization)
        .header(reqwest::header::ACCEPT, "application/json");
        if let Some(pk) = creds.wechat.public_key() {
            request = request.header("Wechatpay-Serial", &pk.id);
        }
        let response = match request.send().await {
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
        let status = response.status().as_u16();
        let headers = SignedHeaders::from_headers(response.headers());
        let body = read_limited(response).await?;
        let verified = headers
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|h| h.verify(&body, (self.clock)(), &creds.wechat));
        match &verified {
            Ok(v) => creds.wechat.observe_skew(v.skew_seconds),
            Err(u) => {
                if let Some(skew) = u.skew_seconds() {
                    creds.wechat.observe_skew(skew);
                }
            }
        }
        Ok(Answer {
            status,
            body,
            headers,
            verified,
        })
    }
}

/// The error of a non-2xx answer of `status` with `body` (a hint: nothing changes on it).
pub(super) fn status_error(status: u16, body: &[u8]) -> V3Error {
    let body = ErrorBody::parse(body);
    let code = body.as_ref().map(|b| b.code.clone());
    if status == 429
        || code
            .as_deref()
            .is_some_and(|c| c == "RATELIMIT_EXCEEDED" || c == "FREQUENCY_LIMITED")
    {
        return V3Error::RateLimited {
            status,
            code: code.unwrap_or_default(),
        };
    }
    V3Error::HttpStatus {
        status,
        message: body.map(|b| b.message).unwrap_or_default(),
        code,
    }
}

fn echo(field: &'static str, expected: &str, got: &str) -> Result<(), V3Error> {
    if expected == got {
        return Ok(());
    }
    Err(V3Error::Mismatch {
        field,
        expected: expected.to_owned(),
        got: got.chars().take(64).collect(),
    })
}

pub(super) fn transport_error(e: &reqwest::Error) -> V3Error {
    if e.is_timeout() {
        return V3Error::Timeout;
    }
    V3Error::Transport(error_chain(e))
}

pub(super) async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, V3Error> {
    if let Some(len) = response.content_length()
        && len > MAX_BODY_BYTES as u64
    {
        return Err(V3Error::TooLarge(MAX_BODY_BYTES));
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(V3Error::TooLarge(MAX_BODY_BYTES));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(transport_error(&e)),
        }
    }
}

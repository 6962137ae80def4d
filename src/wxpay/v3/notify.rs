//! WeChat Pay API v3's notifications (the JSON body POSTed to `notify_url`), read exactly as a
//! signed answer is: the `Wechatpay-*` headers, the signature over the raw body with the key
//! that `Wechatpay-Serial` names, the timestamp within [`MAX_SKEW_SECONDS`] of `now`; then the
//! envelope, its `AEAD_AES_256_GCM` resource opened with the merchant's APIv3 key, and for a
//! `TRANSACTION.SUCCESS` the transaction it carries. The merchant is the v3 merchant whose
//! WeChat key the serial names. Nothing else in the daemon verifies or decrypts them.
//!
//! [`MAX_SKEW_SECONDS`]: super::auth::MAX_SKEW_SECONDS

use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;

use super::auth::{SignedHeaders, Unverified};
use super::crypto::CryptoError;
use super::model::{Notification, Transaction, parse_refund_notice};
use crate::domain::{MchId, TradeState};
use crate::gateway::merchant::Merchant;
use crate::gateway::report::{RefundReport, TradeReport};
use crate::telemetry::NotifyOutcome;
use crate::text::quote;

/// The one resource algorithm of API v3.
pub const ALGORITHM: &str = "AEAD_AES_256_GCM";
/// The event of a payment.
pub const TRANSACTION_SUCCESS: &str = "TRANSACTION.SUCCESS";

/// The refund events a v3 notification may carry (resource `original_type` `refund`).
pub const REFUND_EVENTS: [&str; 3] = ["REFUND.SUCCESS", "REFUND.ABNORMAL", "REFUND.CLOSED"];

/// The answer to a body that is not a usable notification.
pub const INVALID_NOTIFICATION: &str = "invalid notification";
/// The answer to a notification that is not verified (unknown merchant included).
pub const INVALID_SIGNATURE: &str = "invalid signature";
/// The answer when the notification cannot be used now, but can be later (WeChat retries).
pub const UNAVAILABLE: &str = "temporarily unavailable";

/// Why a notification cannot be used. Each maps to one `outcome`, one HTTP status and one
/// generic answer; the message is for the log and quotes what came from outside through
/// [`quote`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyError {
    /// The path named a merchant that is not configured, or not for API v3.
    #[error("merchant {} is not configured for API v3", quote(.0))]
    UnknownMerchant(String),
    /// The headers, the signature or the timestamp did not verify (`merchant` when the serial
    /// named one).
    #[error("{}not verified: {reason}", merchant_prefix(.merchant.as_ref()))]
    Unverified {
        merchant: Option<MchId>,
        reason: Unverified,
    },
    /// Verified, but not a notification this daemon can read.
    #[error("merchant {0}: malformed notification: {1}")]
    Malformed(MchId, String),
    /// The resource did not open with the merchant's APIv3 key: a wrong or reset key.
    #[error("merchant {0}: the resource does not decrypt with the APIv3 key: {1}")]
    Decrypt(MchId, CryptoError),
    /// A verified, decrypted payment that is not the merchant's, or not a payment.
    #[error("merchant {0}: {1}")]
    Mismatch(MchId, String),
}

fn merchant_prefix(m: Option<&MchId>) -> String {
    m.map(|m| format!("merchant {m}: ")).unwrap_or_default()
}

/// How a refusal is answered: the status class WeChat acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the request itself is not a notification.
    BadRequest,
    /// 401: not verified (a probe included: WeChat expects a 4xx to it).
    Unauthorized,
    /// 500: our side cannot read it (the APIv3 key); WeChat retries after it is fixed.
    Internal,
    /// 503: not verifiable yet (an unknown serial: certificates are being refreshed).
    Unavailable,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::Unauthorized => 401,
            Refusal::Internal => 500,
            Refusal::Unavailable => 503,
        }
    }
}

impl NotifyError {
    /// The `outcome` of `notify_requests_total`.
    pub fn outcome(&self) -> NotifyOutcome {
        match self {
            NotifyError::UnknownMerchant(_) => NotifyOutcome::UnknownMerchant,
            NotifyError::Unverified {
                reason: Unverified::BadSignature(_),
                ..
            } => NotifyOutcome::SignInvalid,
            NotifyError::Unverified { .. } => NotifyOutcome::Unverified,
            NotifyError::Malformed(..) => NotifyOutcome::Malformed,
            NotifyError::Decrypt(..) => NotifyOutcome::DecryptFailed,
            NotifyError::Mismatch(..) => NotifyOutcome::Mismatch,
        }
    }

    /// The `reason` of `unverified_messages_total{source="notification"}`, when unverified.
    pub fn unverified_reason(&self) -> Option<&'static str> {
        match self {
            NotifyError::Unverified { reason, .. } => Some(reason.as_str()),
            _ => None,
        }
    }

    /// How WeChat is answered.
    pub fn refusal(&self) -> Refusal {
        match self {
            NotifyError::UnknownMerchant(_) => Refusal::Unauthorized,
            NotifyError::Unverified { reason, .. } => match reason {
                Unverified::MissingHeader(_)
                | Unverified::SignatureType
                | Unverified::BadTimestamp => Refusal::BadRequest,
                Unverified::UnknownSerial(_) => Refusal::Unavailable,
                Unverified::Probe | Unverified::BadSignature(_) | Unverified::Stale { .. } => {
                    Refusal::Unauthorized
                }
            },
            NotifyError::Malformed(..) | NotifyError::Mismatch(..) => Refusal::BadRequest,
            NotifyError::Decrypt(..) => Refusal::Internal,
        }
    }

    /// What WeChat is told: a short, stable reason per class that tells an unauthenticated
    /// caller nothing it did not send (no merchant, no serial, no echo).
    pub fn answer(&self) -> &'static str {
        match self.refusal() {
            Refusal::BadRequest => INVALID_NOTIFICATION,
            Refusal::Unauthorized => INVALID_SIGNATURE,
            Refusal::Internal | Refusal::Unavailable => UNAVAILABLE,
        }
    }

    /// The configured merchant the notification is for, when it got that far.
    pub fn merchant(&self) -> Option<&MchId> {
        match self {
            NotifyError::UnknownMerchant(_) => None,
            NotifyError::Unverified { merchant, .. } => merchant.as_ref(),
            NotifyError::Malformed(m, _)
            | NotifyError::Decrypt(m, _)
            | NotifyError::Mismatch(m, _) => Some(m),
        }
    }
}

/// What a verified notification says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `TRANSACTION.SUCCESS`: the customer paid (a [`TradeReport`] of trade state SUCCESS).
    Paid(TradeReport),
    /// `REFUND.SUCCESS`, `REFUND.ABNORMAL`, `REFUND.CLOSED`: a refund reached a final state.
    Refund(RefundReport),
    /// Any other event: verified and decrypted, not acted on here.
    Other {
        /// The envelope's `event_type`, quoted and bounded.
        event_type: String,
        /// The envelope's `id`, quoted and bounded.
        id: String,
    },
}

/// A verified notification, the merchant it is for, and how far WeChat's clock was from ours.
#[derive(Debug, Clone)]
pub struct Notified<'m> {
    pub merchant: &'m Merchant,
    pub event: Event,
    pub skew_seconds: i64,
}

/// Reads one notification: `merchants` are the merchants it may be for (every configured one,
/// or the one the path names); the v3 ones whose WeChat keys know `Wechatpay-Serial` are
/// tried. An unknown serial asks their certificates job for a refresh.
pub fn read_notification<'m>(
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<Utc>,
    merchants: impl IntoIterator<Item = &'m Merchant>,
) -> Result<Notified<'m>, NotifyError> {
    let unverified = |merchant: Option<&Merchant>, reason| NotifyError::Unverified {
        merchant: merchant.map(|m| m.mch_id.clone()),
        reason,
    };
    let v3: Vec<&'m Merchant> = merchants
        .into_iter()
        .filter(|m| m.v3_credentials().is_some())
        .collect();
    let signed = SignedHeaders::from_headers(headers).map_err(|r| unverified(None, r))?;
    let candidates: Vec<&'m Merchant> = v3
        .iter()
        .copied()
        .filter(|m| keys(m).is_some_and(|k| k.knows(&signed.serial)))
        .collect();
    // A probe is refused before any key is tried: never a signature failure, never a refresh.
    if signed.signature.starts_with(super::auth::SIGNTEST_PREFIX) {
        return Err(unverified(candidates.first().copied(), Unverified::Probe));
    }
    let Some(first) = candidates.first().copied() else {
        for m in &v3 {
            if let Some(k) = keys(m) {
                k.want_refresh();
            }
        }
        let merchant = (v3.len() == 1).then(|| v3[0]);
        return Err(unverified(
            merchant,
            Unverified::UnknownSerial(quote(&signed.serial)),
        ));
    };
    // Every candidate knows the serial; the ones whose key verifies the body go on.
    let mut verified = Vec::with_capacity(candidates.len());
    let mut refused = None;
    for m in candidates {
        let Some(k) = keys(m) else { continue };
        match signed.verify(body, now, k) {
            Ok(v) => {
                k.observe_skew(v.skew_seconds);
                verified.push((m, v.skew_seconds));
            }
            Err(reason) => {
                if let Some(skew) = reason.skew_seconds() {
                    k.observe_skew(skew);
                }
                // Known but no longer valid (an expired certificate): a fresh one is needed.
                if matches!(reason, Unverified::UnknownSerial(_)) {
                    k.want_refresh();
                }
                refused.get_or_insert((m, reason));
            }
        }
    }
    if verified.is_empty() {
        let (m, reason) =
            refused.unwrap_or((first, Unverified::UnknownSerial(quote(&signed.serial))));
        return Err(unverified(Some(m), reason));
    }
    // The merchant is the one whose APIv3 key opens the resource (and, for a payment, whom
    // it names); with several candidates, the most telling failure is kept.
    let (mut decrypt_error, mut other_error) = (None, None);
    for (m, skew_seconds) in verified {
        match open(m, body) {
            Ok(event) => {
                return Ok(Notified {
                    merchant: m,
                    event,
                    skew_seconds,
                });
            }
            Err(e @ NotifyError::Decrypt(..)) => {
                decrypt_error.get_or_insert(e);
            }
            Err(e) => {
                other_error.get_or_insert(e);
            }
        }
    }
    Err(other_error.or(decrypt_error).unwrap_or_else(|| {
        unverified(Some(first), Unverified::BadSignature(quote(&signed.serial)))
    }))
}

fn keys(m: &Merchant) -> Option<&super::WechatKeys> {
    m.v3_credentials().map(|c| &*c.wechat)
}

/// The envelope of a verified body, its resource opened with `m`'s APIv3 key, and the event.
fn open(m: &Merchant, body: &[u8]) -> Result<Event, NotifyError> {
    let mch_id = &m.mch_id;
    let malformed = |why: String| NotifyError::Malformed(mch_id.clone(), why);
    let creds = m
        .v3_credentials()
        .ok_or_else(|| NotifyError::UnknownMerchant(mch_id.to_string()))?;
    let envelope = Notification::parse(body).map_err(|e| malformed(e.to_string()))?;
    let resource = &envelope.resource;
    if resource.algorithm != ALGORITHM {
        return Err(malformed(format!(
            "resource.algorithm is {}, expected {ALGORITHM}",
            quote(&resource.algorithm)
        )));
    }
    let plain = creds
        .apiv3_key
        .decrypt(
            &resource.nonce,
            &resource.associated_data,
            &resource.ciphertext,
        )
        .map_err(|e| match e {
            CryptoError::Tag => NotifyError::Decrypt(mch_id.clone(), e),
            other => malformed(format!("resource: {other}")),
        })?;
    if REFUND_EVENTS.contains(&envelope.event_type.as_str()) {
        let report = parse_refund_notice(&plain, mch_id, m.sub_mch_id.as_ref())
            .map_err(|e| malformed(format!("refund: {e}")))?
            .map_err(|e| NotifyError::Mismatch(mch_id.clone(), e.to_string()))?;
        return Ok(Event::Refund(report));
    }
    if envelope.event_type != TRANSACTION_SUCCESS {
        return Ok(Event::Other {
            event_type: quote(&envelope.event_type),
            id: quote(&envelope.id),
        });
    }
    let transaction =
        Transaction::parse(&plain).map_err(|e| malformed(format!("transaction: {e}")))?;
    transaction
        .check_merchant(mch_id, m.sub_mch_id.as_ref())
        .map_err(|e| NotifyError::Mismatch(mch_id.clone(), e.to_string()))?;
    if transaction.report.trade_state != TradeState::Success {
        return Err(NotifyError::Mismatch(
            mch_id.clone(),
            format!(
                "a {TRANSACTION_SUCCESS} of trade_state {}",
                quote(transaction.report.trade_state.label())
            ),
        ));
    }
    Ok(Event::Paid(transaction.report))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domain::AppId;
    use crate::gateway::merchant::V3Credentials;
    use crate::wxpay::v3::{
        ApiV3Key, Certificate, CertificateMode, PrivateKey, PublicKey, WechatKeys, WechatPublicKey,
    };

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wxpay-v3/");
    const PUB_KEY_ID: &str = "PUB_KEY_ID_0000000000000024101100397200000006";
    const APIV3_KEY: &[u8] = b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";

    fn file(name: &str) -> Vec<u8> {
        std::fs::read(format!("{DIR}{name}")).expect("fixture")
    }

    fn fixture() -> serde_json::Value {
        serde_json::from_slice(&file("derived_notify_transaction_success.json")).expect("json")
    }

    fn headers(v: &serde_json::Value) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in v.as_object().expect("headers") {
            h.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).expect("name"),
                value.as_str().expect("text").parse().expect("value"),
            );
        }
        h
    }

    /// The fixture's merchant (1230000109), WeChat's keys in both modes, `mode` for downloads.
    fn merchant(apiv3_key: &[u8], mode: CertificateMode) -> Merchant {
        let now = DateTime::parse_from_rfc3339("2024-08-05T09:33:51Z")
            .expect("time")
            .with_timezone(&Utc);
        let wechat = WechatKeys::new(
            Some(WechatPublicKey {
                id: PUB_KEY_ID.into(),
                key: PublicKey::from_pem(&file("keys/go_sdk_test_public_key.pem")).expect("pk"),
            }),
            mode,
        );
        wechat.add_certificates(
            vec![
                Certificate::from_pem(&file("keys/go_sdk_test_cert_F5765756002FDD77.pem"))
                    .expect("cert"),
            ],
            now,
        );
        Merchant::v3(
            MchId::parse("1230000109").expect("mch_id"),
            AppId::parse("wxd678efh567hg6787").expect("appid"),
            V3Credentials {
                private_key: PrivateKey::from_pem(&file("keys/java_sdk_merchant_private_key.pem"))
                    .expect("key"),
                cert_serial_no: "5F1C72E2A8931B72A2E13AF8DEE92471EB397115".into(),
                apiv3_key: ApiV3Key::new(apiv3_key).expect("apiv3 key"),
                wechat: Arc::<WechatKeys>::clone(&wechat),
            },
        )
    }

    fn at(offset_seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_722_850_421 + offset_seconds, 0).expect("time")
    }

    #[test]
    fn the_fixture_notification_is_verified_decrypted_and_read() {
        let f = fixture();
        let n = &f["notification"];
        let body = n["body"].as_str().expect("body").as_bytes();
        let m = merchant(APIV3_KEY, CertificateMode::Off);
        let mut h = headers(&n["headers"]);
        // Certificate mode (the fixture's serial), then public-key mode: the serial only picks
        // the key.
        for serial in ["F5765756002FDD77", PUB_KEY_ID] {
            h.insert("Wechatpay-Serial", serial.parse().expect("serial"));
            let read = read_notification(&h, body, at(10), [&m]).expect("verified");
            assert_eq!(read.merchant.mch_id.as_str(), "1230000109");
            assert_eq!(read.skew_seconds, -10);
            let Event::Paid(r) = read.event else {
                panic!("not a payment: {:?}", read.event)
            };
            let e = &n["expected"];
            assert_eq!(r.out_trade_no.as_str(), e["out_trade_no"]);
            assert_eq!(
                r.transaction_id.as_ref().map(|t| t.as_str()),
                e["transaction_id"].as_str()
            );
            assert_eq!(r.amount.map(|a| a.get()), e["amount_total_fen"].as_i64());
            assert_eq!(
                r.payer_amount.map(|a| a.get()),
                e["payer_total_fen"].as_i64()
            );
            assert_eq!(r.currency.as_str(), "CNY");
            assert_eq!(r.appid.as_ref().map(|a| a.as_str()), e["appid"].as_str());
            assert_eq!(r.trade_state, TradeState::Success);
            assert_eq!(
                r.paid_at.map(|t| t.to_rfc3339()),
                Some("2021-03-22T02:29:05+00:00".into())
            );
        }
        assert_eq!(
            m.v3_credentials().expect("v3").wechat.last_skew_seconds(),
            Some(-10)
        );
    }

    #[test]
    fn the_fixture_probe_is_refused_as_a_probe() {
        let f = fixture();
        let body = f["notification"]["body"].as_str().expect("body").as_bytes();
        let m = merchant(APIV3_KEY, CertificateMode::Download);
        let e = read_notification(
            &headers(&f["signtest_probe_headers"]["headers"]),
            body,
            at(10),
            [&m],
        )
        .expect_err("a probe");
        assert_eq!(e.unverified_reason(), Some("signtest_probe"));
        assert_eq!(e.outcome(), NotifyOutcome::Unverified);
        assert_eq!(e.refusal(), Refusal::Unauthorized);
        assert!((400..500).contains(&e.refusal().status()));
    }

    #[test]
    fn refusals_are_classified_and_answered_generically() {
        let f = fixture();
        let n = &f["notification"];
        let body = n["body"].as_str().expect("body").as_bytes();
        let h = headers(&n["headers"]);
        let m = merchant(APIV3_KEY, CertificateMode::Download);
        let check = |e: NotifyError, outcome, reason: Option<&str>, status: u16| {
            assert_eq!(e.outcome(), outcome, "{e}");
            assert_eq!(e.unverified_reason(), reason, "{e}");
            assert_eq!(e.refusal().status(), status, "{e}");
            assert!(!e.answer().contains("1230000109") && !e.answer().contains("F5765"));
            let message = e.to_string();
            assert!(message.len() < 300 && !message.contains('\n'), "{message}");
        };
        // Stale: correctly signed, 400 s old; the skew is recorded all the same.
        let stale = read_notification(&h, body, at(400), [&m]).expect_err("stale");
        assert_eq!(stale.merchant().map(|m| m.as_str()), Some("1230000109"));
        check(
            stale,
            NotifyOutcome::Unverified,
            Some("stale_timestamp"),
            401,
        );
        // A changed body.
        let mut forged = body.to_vec();
        forged[10] ^= 1;
        check(
            read_notification(&h, &forged, at(10), [&m]).expect_err("forged"),
            NotifyOutcome::SignInvalid,
            Some("bad_signature"),
            401,
        );
        // A wrong APIv3 key.
        let wrong = merchant(b"0123456789abcdef0123456789abcdef", CertificateMode::Off);
        check(
            read_notification(&h, body, at(10), [&wrong]).expect_err("wrong key"),
            NotifyOutcome::DecryptFailed,
            None,
            500,
        );
        // An unknown serial: 503, and the certificates are to be refreshed.
        let mut unknown = h.clone();
        unknown.insert("Wechatpay-Serial", "0BADC0DE\"x".parse().expect("serial"));
        let keys = Arc::clone(&m.v3_credentials().expect("v3").wechat);
        let refresh = keys.refresh_wanted();
        check(
            read_notification(&unknown, body, at(10), [&m]).expect_err("unknown serial"),
            NotifyOutcome::Unverified,
            Some("unknown_serial"),
            503,
        );
        futures_util::FutureExt::now_or_never(refresh).expect("a refresh was asked for");
        // A missing header, another signature type.
        let mut missing = h.clone();
        missing.remove("Wechatpay-Nonce");
        check(
            read_notification(&missing, body, at(10), [&m]).expect_err("missing"),
            NotifyOutcome::Unverified,
            Some("missing_header"),
            400,
        );
        let mut other_type = h.clone();
        other_type.insert("Wechatpay-Signature-Type", "HMAC".parse().expect("type"));
        check(
            read_notification(&other_type, body, at(10), [&m]).expect_err("type"),
            NotifyOutcome::Unverified,
            Some("signature_type"),
            400,
        );
        // Another merchant than the transaction names (same keys, another mch_id).
        let mut other = merchant(APIV3_KEY, CertificateMode::Off);
        other.mch_id = MchId::parse("1900000100").expect("mch_id");
        check(
            read_notification(&h, body, at(10), [&other]).expect_err("another merchant"),
            NotifyOutcome::Mismatch,
            None,
            400,
        );
        // A v2 merchant is never a candidate.
        let v2 = Merchant::v2(
            MchId::parse("1230000109").expect("mch_id"),
            AppId::parse("wxd678efh567hg6787").expect("appid"),
            crate::wxpay::SignType::Md5,
            crate::wxpay::ApiKey::parse("192006250b4c09247ec02edce69f6a2d").expect("key"),
        );
        check(
            read_notification(&h, body, at(10), [&v2]).expect_err("v2"),
            NotifyOutcome::Unverified,
            Some("unknown_serial"),
            503,
        );
    }

    #[test]
    fn of_several_merchants_with_the_same_keys_the_one_the_transaction_names_is_chosen() {
        let f = fixture();
        let n = &f["notification"];
        let body = n["body"].as_str().expect("body").as_bytes();
        let mut other = merchant(APIV3_KEY, CertificateMode::Off);
        other.mch_id = MchId::parse("1900000100").expect("mch_id");
        let m = merchant(APIV3_KEY, CertificateMode::Off);
        let read = read_notification(&headers(&n["headers"]), body, at(10), [&other, &m])
            .expect("verified");
        assert_eq!(read.merchant.mch_id.as_str(), "1230000109");
    }
}

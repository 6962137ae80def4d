//! API v3's message signatures: the `Authorization` header of a request, and the check of a
//! signed answer or notification (`Wechatpay-Timestamp`, `-Nonce`, `-Signature`, `-Serial`,
//! `-Signature-Type`) against WeChat's keys, with the clock passed in.

use chrono::{DateTime, Utc};
use reqwest::header::HeaderMap;

use super::crypto::{CryptoError, PrivateKey, SCHEME};
use super::keys::WechatKeys;

/// How far a signed message's timestamp may be from our clock (WeChat's SDKs: 5 minutes).
pub const MAX_SKEW_SECONDS: i64 = 300;
/// The prefix of the signature of WeChat's deliberate probes: never a valid signature.
pub const SIGNTEST_PREFIX: &str = "WECHATPAY/SIGNTEST/";

/// `METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nBODY\n`: what a request's signature covers.
pub fn request_message(
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: &str,
    body: &str,
) -> String {
    format!("{method}\n{path_and_query}\n{timestamp}\n{nonce}\n{body}\n")
}

/// `TIMESTAMP\nNONCE\nBODY\n`: what an answer's or a notification's signature covers.
pub fn response_message(timestamp: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(timestamp.len() + nonce.len() + body.len() + 3);
    m.extend_from_slice(timestamp.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(nonce.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(body);
    m.push(b'\n');
    m
}

/// Who signs a request, and with which key.
#[derive(Debug, Clone, Copy)]
pub struct RequestSigner<'a> {
    pub mch_id: &'a str,
    /// The serial of the merchant's API certificate.
    pub serial_no: &'a str,
    pub key: &'a PrivateKey,
}

/// One request to sign.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path_and_query: &'a str,
    pub timestamp: i64,
    pub nonce: &'a str,
    pub body: &'a str,
}

impl RequestSigner<'_> {
    /// The `Authorization` header value for `request`.
    pub fn authorization(&self, request: &Request<'_>) -> Result<String, CryptoError> {
        let message = request_message(
            request.method,
            request.path_and_query,
            request.timestamp,
            request.nonce,
            request.body,
        );
        let signature = self.key.sign(message.as_bytes())?;
        Ok(format!(
            "{SCHEME} mchid=\"{}\",nonce_str=\"{}\",timestamp=\"{}\",serial_no=\"{}\",signature=\"{signature}\"",
            self.mch_id, request.nonce, request.timestamp, self.serial_no
        ))
    }
}

/// The `Wechatpay-*` headers of a signed answer or notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub timestamp: String,
    pub nonce: String,
    pub signature: String,
    pub serial: String,
    /// Absent on some answers; when present it must be [`SCHEME`].
    pub signature_type: Option<String>,
}

/// Why a message is not verified: never a result, always transient, each counted as its own
/// outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    #[error("header {0} is missing or not text")]
    MissingHeader(&'static str),
    #[error("a WECHATPAY/SIGNTEST/ probe (WeChat checks that unverified messages are refused)")]
    Probe,
    #[error("signature type is not {SCHEME}")]
    SignatureType,
    #[error("Wechatpay-Timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("no known WeChat key has serial {0}")]
    UnknownSerial(String),
    #[error("the signature does not verify with the key of serial {0}")]
    BadSignature(String),
    #[error("signed {skew_seconds} s away from our clock (at most {MAX_SKEW_SECONDS} s)")]
    Stale { skew_seconds: i64 },
}

impl Unverified {
    /// The bounded label of this reason.
    pub fn as_str(&self) -> &'static str {
        match self {
            Unverified::MissingHeader(_) => "missing_header",
            Unverified::Probe => "signtest_probe",
            Unverified::SignatureType => "signature_type",
            Unverified::BadTimestamp => "bad_timestamp",
            Unverified::UnknownSerial(_) => "unknown_serial",
            Unverified::BadSignature(_) => "bad_signature",
            Unverified::Stale { .. } => "stale_timestamp",
        }
    }

    /// The observed skew, when the message was correctly signed but too old or too new.
    pub fn skew_seconds(&self) -> Option<i64> {
        match self {
            Unverified::Stale { skew_seconds } => Some(*skew_seconds),
            _ => None,
        }
    }
}

/// A verified message: how far its signer's clock was from ours (positive: theirs ahead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub skew_seconds: i64,
}

/// The most of a header value a message quotes.
const MAX_HEADER_BYTES: usize = 1024;

impl SignedHeaders {
    /// Reads the headers; a missing, non-text or oversized one is refused.
    pub fn from_headers(headers: &HeaderMap) -> Result<SignedHeaders, Unverified> {
        let get = |name: &'static str| -> Result<String, Unverified> {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.len() <= MAX_HEADER_BYTES)
                .map(|v| v.trim().to_owned())
                .ok_or(Unverified::MissingHeader(name))
        };
        Ok(SignedHeaders {
            timestamp: get("Wechatpay-Timestamp")?,
            nonce: get("Wechatpay-Nonce")?,
            signature: get("Wechatpay-Signature")?,
            serial: get("Wechatpay-Serial")?,
            signature_type: match headers.get("Wechatpay-Signature-Type") {
                None => None,
                Some(_) => Some(get("Wechatpay-Signature-Type")?),
            },
        })
    }

    /// Checks the signature over `body` with the key the serial names, then the timestamp
    /// against `now`. A probe is refused before any key is tried.
    pub fn verify(
        &self,
        body: &[u8],
        now: DateTime<Utc>,
        keys: &WechatKeys,
    ) -> Result<Verified, Unverified> {
        if self.signature.starts_with(SIGNTEST_PREFIX) {
            return Err(Unverified::Probe);
        }
        if self.signature_type.as_deref().is_some_and(|t| t != SCHEME) {
            return Err(Unverified::SignatureType);
        }
        let timestamp: i64 = self
            .timestamp
            .parse()
            .map_err(|_| Unverified::BadTimestamp)?;
        let serial = crate::text::quote(&self.serial);
        let key = keys
            .key_for(&self.serial, now)
            .ok_or_else(|| Unverified::UnknownSerial(serial.clone()))?;
        key.verify(
            &response_message(&self.timestamp, &self.nonce, body),
            &self.signature,
        )
        .map_err(|_| Unverified::BadSignature(serial))?;
        let skew_seconds = timestamp.saturating_sub(now.timestamp());
        if skew_seconds.abs() > MAX_SKEW_SECONDS {
            return Err(Unverified::Stale { skew_seconds });
        }
        Ok(Verified { skew_seconds })
    }
}

//! Why a v3 call gave no usable answer. Every error is transient for the order: its state
//! never changes on one.

use super::auth::Unverified;
use super::crypto::CryptoError;
use super::model::BodyError;
use crate::gateway::report::{Failure, GatewayError, RetryHint};
use crate::text::quote;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V3Error {
    #[error("no answer within the timeout")]
    Timeout,
    #[error("transport error: {0}")]
    Transport(String),
    /// A non-2xx answer: a hint at most, never a result.
    #[error("HTTP status {status}{}", code.as_ref().map(|c| format!(" {}: {}", quote(c), quote(message))).unwrap_or_default())]
    HttpStatus {
        status: u16,
        code: Option<String>,
        message: String,
    },
    /// WeChat rate-limited us (429 RATELIMIT_EXCEEDED / FREQUENCY_LIMITED): slow down.
    #[error("rate limited: HTTP {status} {}", quote(code))]
    RateLimited { status: u16, code: String },
    /// A 2xx answer that is not verified: never a result.
    #[error("answer not verified: {0}")]
    Unverified(Unverified),
    #[error("malformed answer: {0}")]
    Malformed(#[from] BodyError),
    #[error(
        "answer field {field} is {}, the request had {}",
        quote(got),
        quote(expected)
    )]
    Mismatch {
        field: &'static str,
        expected: String,
        got: String,
    },
    /// The answer's body is larger than any real answer.
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    #[error("cannot sign the request: {0}")]
    Signing(CryptoError),
    /// Decrypting what WeChat encrypted failed: the APIv3 key is wrong or was reset.
    #[error("cannot decrypt: {0}")]
    Decrypt(CryptoError),
    /// A close that the following query does not confirm.
    #[error("closeorder not confirmed: the order is still {0}")]
    NotClosed(String),
    #[error("merchant {0} is not configured for API v3")]
    NotV3(String),
    /// A bill's `download_url` not on the configured WeChat host (or its backup): the signed
    /// request was not sent.
    #[error("download_url {} is not on the configured WeChat host; not requested", quote(.0))]
    DownloadUrl(String),
    /// The temporary file a bill is downloaded to.
    #[error("temporary bill file: {0}")]
    TempFile(String),
}

impl V3Error {
    pub fn failure(&self) -> Failure {
        match self {
            V3Error::Timeout => Failure::Timeout,
            V3Error::Transport(_) | V3Error::Signing(_) | V3Error::TempFile(_) => {
                Failure::TransportError
            }
            V3Error::HttpStatus { .. } | V3Error::RateLimited { .. } => Failure::HttpStatus,
            V3Error::Unverified(_) => Failure::Unverified,
            V3Error::Malformed(_) | V3Error::TooLarge(_) => Failure::Malformed,
            V3Error::Mismatch { .. } | V3Error::NotV3(_) | V3Error::DownloadUrl(_) => {
                Failure::Mismatch
            }
            V3Error::Decrypt(_) => Failure::SignInvalid,
            V3Error::NotClosed(_) => Failure::ResultFail,
        }
    }

    pub fn retry_hint(&self) -> RetryHint {
        match self {
            V3Error::RateLimited { .. } => RetryHint::SlowDown,
            _ => RetryHint::Backoff,
        }
    }

    /// The reason label of an unverified answer.
    pub fn unverified(&self) -> Option<&Unverified> {
        match self {
            V3Error::Unverified(u) => Some(u),
            _ => None,
        }
    }
}

impl From<super::model::Mismatch> for V3Error {
    fn from(m: super::model::Mismatch) -> V3Error {
        V3Error::Mismatch {
            field: m.field,
            expected: m.expected,
            got: m.got,
        }
    }
}

impl From<V3Error> for GatewayError {
    fn from(e: V3Error) -> GatewayError {
        let reason = e.unverified().map(Unverified::as_str);
        let g = GatewayError::new(e.failure(), e.to_string()).with_retry(e.retry_hint());
        match reason {
            Some(r) => g.with_reason(r),
            None => g,
        }
    }
}

//! v3 trade bills: `GET /v3/bill/tradebill?bill_date=YYYY-MM-DD&bill_type=ALL&tar_type=GZIP`, a
//! verified answer `{hash_type, hash_value, download_url}`, then a **signed** GET of
//! `download_url` streamed into a temporary file (see [`crate::wxpay::bill`]).
//!
//! The download's answer is not signed (WeChat signs none): the file is trusted only through
//! `hash_value`, the SHA-1 of the decompressed text, which the caller checks. The
//! `download_url` may live only 30 s, so the file is fetched right after the tradebill call; an
//! expired one answers 4xx, a retryable error.
//!
//! **The download URL is checked before anything is sent to it**: its scheme, host and port
//! must be those of the configured `base_url` or `backup_base_url`. The request carries the
//! merchant's signature, which must never go to another host, whoever put that host in the
//! (verified) answer.

use std::time::Instant;

use chrono::NaiveDate;
use serde::Deserialize;

use super::auth::{Request, RequestSigner};
use super::client::{V3Client, credentials, read_limited, status_error, transport_error};
use super::error::V3Error;
use super::model::BodyError;
use crate::gateway::merchant::{Merchant, V3Credentials};
use crate::gateway::report::BillAnswer;
use crate::wxpay::bill::{
    Downloaded, MAX_BILL_BYTES, StreamError, bill_timeout, stream_to_tempfile,
};
use crate::wxpay::client::{Endpoint, nonce};

/// A verified tradebill answer, checked: WeChat's SHA-1 of the decompressed file and where to
/// get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TradeBill {
    /// Lower-case hex, 40 characters.
    pub sha1: String,
    pub download_url: String,
}

#[derive(Deserialize)]
struct RawTradeBill {
    hash_type: String,
    hash_value: String,
    download_url: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> V3Error {
    V3Error::Malformed(BodyError::Field {
        field,
        reason: reason.into(),
    })
}

/// Reads a tradebill answer's body: `hash_type` must be `SHA1` and `hash_value` 40 hex digits
/// (kept in lower case).
pub fn parse_trade_bill(body: &[u8]) -> Result<TradeBill, V3Error> {
    let raw: RawTradeBill = serde_json::from_slice(body).map_err(|e| {
        V3Error::Malformed(BodyError::Json(crate::text::quote_with(
            &e.to_string(),
            160,
        )))
    })?;
    if raw.hash_type != "SHA1" {
        return Err(bad(
            "hash_type",
            format!("{} is not SHA1", crate::text::quote(&raw.hash_type)),
        ));
    }
    if raw.hash_value.len() != 40 || !raw.hash_value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(
            "hash_value",
            format!(
                "{} is not 40 hex digits",
                crate::text::quote(&raw.hash_value)
            ),
        ));
    }
    Ok(TradeBill {
        sha1: raw.hash_value.to_ascii_lowercase(),
        download_url: raw.download_url,
    })
}

/// What a non-2xx tradebill answer's code means for the bill, when it means something:
/// `NO_STATEMENT_EXIST` (no bill: a quiet day) is [`BillAnswer::Empty`], `STATEMENT_CREATING`
/// [`BillAnswer::NotReady`]. WeChat answers both with HTTP 400; they are told by their code.
pub fn no_file_answer(error_body: &[u8]) -> Option<BillAnswer> {
    match super::model::ErrorBody::parse(error_body)?.code.as_str() {
        "NO_STATEMENT_EXIST" => Some(BillAnswer::Empty),
        "STATEMENT_CREATING" => Some(BillAnswer::NotReady),
        _ => None,
    }
}

/// `download_url`, parsed, when its scheme, host and port are those of `base_url` or `backup`
/// (and it carries no credentials); which of the two it is on. Anything else is refused: the
/// signed request would hand the merchant's signature to another host.
pub fn check_download_url(
    download_url: &str,
    base_url: &str,
    backup: Option<&str>,
) -> Result<(reqwest::Url, Endpoint), V3Error> {
    let refused = || V3Error::DownloadUrl(download_url.to_owned());
    let url = reqwest::Url::parse(download_url).map_err(|_| refused())?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(refused());
    }
    let same_origin = |base: &str| {
        reqwest::Url::parse(base).is_ok_and(|b| {
            b.scheme() == url.scheme()
                && b.host_str().is_some()
                && b.host_str() == url.host_str()
                && b.port_or_known_default() == url.port_or_known_default()
        })
    };
    if same_origin(base_url) {
        return Ok((url, Endpoint::Primary));
    }
    if backup.is_some_and(same_origin) {
        return Ok((url, Endpoint::Backup));
    }
    Err(refused())
}

impl From<StreamError> for V3Error {
    fn from(e: StreamError) -> V3Error {
        match e {
            StreamError::Transport(e) => transport_error(&e),
            StreamError::TooLarge => {
                V3Error::TooLarge(usize::try_from(MAX_BILL_BYTES).unwrap_or(usize::MAX))
            }
            StreamError::File(e) => V3Error::TempFile(e.to_string()),
        }
    }
}

impl V3Client {
    /// The trade bill (`ALL`, `GZIP`) of the Beijing day `bill_date`: the verified tradebill
    /// answer, then its file (see the module documentation). `NO_STATEMENT_EXIST` and
    /// `STATEMENT_CREATING` are answers only when verified, like `ORDER_NOT_EXIST`.
    pub async fn download_bill(
        &self,
        merchant: &Merchant,
        bill_date: NaiveDate,
    ) -> Result<BillAnswer, V3Error> {
        let creds = credentials(merchant)?;
        let mut path = format!(
            "/v3/bill/tradebill?bill_date={}&bill_type=ALL&tar_type=GZIP",
            bill_date.format("%Y-%m-%d")
        );
        if let Some(sub) = &merchant.sub_mch_id {
            path.push_str("&sub_mchid=");
            path.push_str(sub.as_str());
        }
        let answer = self.call(merchant, creds, "GET", &path, "").await?;
        if !(200..300).contains(&answer.status) {
            return match no_file_answer(&answer.body) {
                Some(no_file) => {
                    answer.verified_body(&creds.wechat)?;
                    Ok(no_file)
                }
                None => Err(answer.error()),
            };
        }
        let body = answer.verified_body(&creds.wechat)?;
        let bill = parse_trade_bill(&body)?;
        let (url, endpoint) = check_download_url(
            &bill.download_url,
            &self.config.base_url,
            self.config.backup_base_url.as_deref(),
        )?;
        let downloaded = self.download(merchant, creds, url, endpoint).await?;
        Ok(BillAnswer::File(downloaded.into_bill_file(Some(bill.sha1))))
    }

    /// A signed GET of an (already checked) download URL: `Authorization` over its path and
    /// query; the answer is not signed, so no signature is looked for.
    async fn download(
        &self,
        merchant: &Merchant,
        creds: &V3Credentials,
        url: reqwest::Url,
        endpoint: Endpoint,
    ) -> Result<Downloaded, V3Error> {
        let path_and_query = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let nonce = nonce();
        let authorization = RequestSigner {
            mch_id: merchant.mch_id.as_str(),
            serial_no: &creds.cert_serial_no,
            key: &creds.private_key,
        }
        .authorization(&Request {
            method: "GET",
            path_and_query: &path_and_query,
            timestamp: (self.clock)().timestamp(),
            nonce: &nonce,
            body: "",
        })
        .map_err(V3Error::Signing)?;
        let sent = self
            .http
            .get(url)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .timeout(bill_timeout(&self.config))
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
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            // An expired URL (WeChat: about 30 s) among others: ask for a new one.
            let body = read_limited(response).await.unwrap_or_default();
            return Err(status_error(status, &body));
        }
        Ok(stream_to_tempfile(response).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::report::GatewayError;

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/wxpay-bills")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn the_official_tradebill_answer_is_read_and_checked() {
        let bill = parse_trade_bill(&fixture("v3_tradebill_reply_official_doc.json")).unwrap();
        assert_eq!(bill.sha1, "8823044c286bea726f149bfcfce0b0318122d755");
        let (url, endpoint) = check_download_url(
            &bill.download_url,
            "https://api.mch.weixin.qq.com",
            Some("https://api2.mch.weixin.qq.com"),
        )
        .unwrap();
        assert_eq!(endpoint, Endpoint::Primary);
        assert_eq!(url.path(), "/v3/billdownload/file");
        assert!(url.query().unwrap().starts_with("token=6XIv5TUP"));

        let with = |hash_type: &str, hash_value: &str| {
            format!(
                r#"{{"hash_type":"{hash_type}","hash_value":"{hash_value}","download_url":"https://api.mch.weixin.qq.com/v3/billdownload/file?token=x"}}"#
            )
            .into_bytes()
        };
        let upper = parse_trade_bill(&with("SHA1", &"AB".repeat(20))).unwrap();
        assert_eq!(upper.sha1, "ab".repeat(20));
        for (t, v) in [
            ("MD5", "ab".repeat(20)),
            ("SHA256", "ab".repeat(20)),
            ("SHA1", "ab".repeat(19)),
            ("SHA1", format!("{}zz", "ab".repeat(19))),
            ("SHA1", String::new()),
        ] {
            let e = parse_trade_bill(&with(t, &v)).unwrap_err();
            assert_eq!(GatewayError::from(e).outcome(), "malformed", "{t} {v}");
        }
        assert!(parse_trade_bill(b"{\"hash_type\":\"SHA1\"}").is_err());
    }

    #[test]
    fn the_error_fixtures_are_an_empty_bill_and_a_bill_not_ready() {
        assert!(matches!(
            no_file_answer(&fixture("v3_error_no_statement_exist.json")),
            Some(BillAnswer::Empty)
        ));
        assert!(matches!(
            no_file_answer(&fixture("v3_error_statement_creating.json")),
            Some(BillAnswer::NotReady)
        ));
        assert!(no_file_answer(br#"{"code":"PARAM_ERROR","message":"x"}"#).is_none());
        assert!(no_file_answer(b"not json").is_none());
    }

    #[test]
    fn a_download_url_on_another_host_is_refused() {
        let base = "https://api.mch.weixin.qq.com";
        let backup = Some("https://api2.mch.weixin.qq.com");
        assert_eq!(
            check_download_url(
                "https://api2.mch.weixin.qq.com/v3/billdownload/file?token=t",
                base,
                backup
            )
            .unwrap()
            .1,
            Endpoint::Backup
        );
        assert!(
            check_download_url("https://API.mch.weixin.qq.com:443/v3/x?token=t", base, None)
                .is_ok(),
            "the same origin, written otherwise"
        );
        for bad in [
            "http://api.mch.weixin.qq.com/v3/billdownload/file?token=t",
            "https://api.mch.weixin.qq.com:8443/v3/billdownload/file?token=t",
            "https://evil.example/v3/billdownload/file?token=t",
            "https://api.mch.weixin.qq.com.evil.example/v3/billdownload/file",
            "https://user:pw@api.mch.weixin.qq.com/v3/billdownload/file",
            "/v3/billdownload/file?token=t",
            "",
        ] {
            let e = check_download_url(bad, base, backup).unwrap_err();
            assert!(matches!(e, V3Error::DownloadUrl(_)), "{bad}");
            let g = GatewayError::from(e);
            assert_eq!(g.outcome(), "mismatch", "{bad}");
            assert!(g.is_suspicious());
        }
        // Nothing is allowed when the base URL itself cannot be read.
        assert!(check_download_url("https://a.example/x", "not a url", None).is_err());
    }
}

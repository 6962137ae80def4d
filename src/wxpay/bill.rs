//! Daily trade bills, fetched: v2's `POST /pay/downloadbill`, and the streaming of a bill's bytes
//! into an anonymous temporary file that v2 and v3 share.
//!
//! A bill is downloaded within [`MAX_BILL_BYTES`] and [`BILL_DOWNLOAD_TIMEOUT`] (a bill of a busy
//! day is far larger and slower than any other answer), chunk by chunk, never held in memory.
//! What comes back is handed over as a [`BillFile`], rewound: parsing it, and for v3 checking
//! its SHA-1, is the caller's.
//!
//! v2's bill is neither signed nor hashed: there is nothing to verify but that it parses and
//! adds up. An error comes back as plain, unsigned XML (`return_code` FAIL, `return_msg`,
//! sometimes `error_code`) even when GZIP was asked for; [`read_downloadbill_reply`] tells it
//! from a bill.

use std::io::{Seek, Write};
use std::time::Duration;

use chrono::NaiveDate;

use super::client::{ClientConfig, WxPayClient, base_request, transport_error};
use super::error::WxPayError;
use super::xml::{self, MAX_BODY_BYTES};
use crate::gateway::merchant::Merchant;
use crate::gateway::report::{BillAnswer, BillFile};

/// The largest bill downloaded (compressed size when gzip): 1 GiB, several times a
/// 1,000,000-row day. A larger answer is refused before it fills the disk.
pub const MAX_BILL_BYTES: u64 = 1 << 30;

/// The whole of one bill download (request, answer and body), instead of the client's request
/// timeout (a few seconds, for orderquery): a gzip bill of a busy day is tens of megabytes.
/// The connect timeout stays the client's. A configured request timeout longer than this one
/// wins.
pub const BILL_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// The gzip magic number.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The timeout of one bill download with `config`.
pub(crate) fn bill_timeout(config: &ClientConfig) -> Duration {
    config.timeout.max(BILL_DOWNLOAD_TIMEOUT)
}

/// A body streamed into a temporary file.
pub(crate) struct Downloaded {
    /// Rewound to 0.
    pub file: std::fs::File,
    pub bytes: u64,
    /// The first bytes (at most [`MAX_BODY_BYTES`]): enough to tell an XML error reply, and the
    /// gzip magic.
    pub head: Vec<u8>,
}

impl Downloaded {
    pub fn is_gzip(&self) -> bool {
        self.head.starts_with(&GZIP_MAGIC)
    }

    /// Whether `head` is the whole body.
    pub fn head_is_whole(&self) -> bool {
        self.bytes <= self.head.len() as u64
    }

    pub fn into_bill_file(self, sha1: Option<String>) -> BillFile {
        BillFile {
            gzip: self.is_gzip(),
            file: self.file,
            sha1,
            bytes: self.bytes,
        }
    }
}

/// Why a body could not be streamed into its file.
pub(crate) enum StreamError {
    Transport(reqwest::Error),
    /// More than [`MAX_BILL_BYTES`] (announced, or read so far).
    TooLarge,
    File(std::io::Error),
}

impl From<StreamError> for WxPayError {
    fn from(e: StreamError) -> WxPayError {
        match e {
            StreamError::Transport(e) => transport_error(&e),
            StreamError::TooLarge => WxPayError::BillTooLarge(MAX_BILL_BYTES),
            StreamError::File(e) => WxPayError::TempFile(e.to_string()),
        }
    }
}

/// Streams a response's body into an anonymous temporary file (`tempfile::tempfile()`: no
/// name, gone when dropped), chunk by chunk, refusing more than [`MAX_BILL_BYTES`]. The writes
/// go to the page cache through a buffer, on the calling task: they take microseconds, so no
/// blocking pool is involved.
pub(crate) async fn stream_to_tempfile(
    mut response: reqwest::Response,
) -> Result<Downloaded, StreamError> {
    if let Some(len) = response.content_length()
        && len > MAX_BILL_BYTES
    {
        return Err(StreamError::TooLarge);
    }
    let file = tempfile::tempfile().map_err(StreamError::File)?;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    let mut bytes: u64 = 0;
    let mut head = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                bytes = bytes.saturating_add(chunk.len() as u64);
                if bytes > MAX_BILL_BYTES {
                    return Err(StreamError::TooLarge);
                }
                if head.len() < MAX_BODY_BYTES {
                    let take = (MAX_BODY_BYTES - head.len()).min(chunk.len());
                    head.extend_from_slice(&chunk[..take]);
                }
                out.write_all(&chunk).map_err(StreamError::File)?;
            }
            Ok(None) => break,
            Err(e) => return Err(StreamError::Transport(e)),
        }
    }
    let mut file = out
        .into_inner()
        .map_err(|e| StreamError::File(e.into_error()))?;
    file.flush().map_err(StreamError::File)?;
    file.rewind().map_err(StreamError::File)?;
    Ok(Downloaded { file, bytes, head })
}

/// What a `downloadbill` answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownloadBillReply {
    /// Not an XML reply: the bill itself (gzip or text).
    Bill,
    /// `No Bill Exist` (or `error_code` 20002): nothing traded that day.
    NoBill,
    /// `Bill Creating`: not generated yet.
    Creating,
}

/// `return_msg`s of a failure that asking again may cure (WeChat's downloadbill error table:
/// "SYSTEMERROR 下载失败 请尝试重新调用", the compression failures "请稍后重试"), compared
/// ignoring ASCII case.
const TRANSIENT_MESSAGES: [&str; 4] = [
    "SYSTEMERROR",
    "system error",
    "CompressGZip Error",
    "UnCompressGZip Error",
];

/// Tells a `downloadbill` answer from its first bytes `head` (`whole`: `head` is the entire
/// body). gzip, or text that does not start with `<`, is the bill (a bill starts with its BOM
/// or `交易时间`). An XML document is WeChat's unsigned error reply: `No Bill Exist` (WeChat's
/// docs spell it `NO Bill Exist`; any ASCII case) or `error_code` 20002 is
/// [`DownloadBillReply::NoBill`], `Bill Creating` [`DownloadBillReply::Creating`]; a system or
/// compression error is a retryable [`WxPayError::ReturnFail`]; any other FAIL (`invalid
/// bill_date`, `invalid bill_type`, `SIGN ERROR`, a closed bill API) is
/// [`WxPayError::BillRefused`], which asking again cannot cure.
pub fn read_downloadbill_reply(head: &[u8], whole: bool) -> Result<DownloadBillReply, WxPayError> {
    if head.starts_with(&GZIP_MAGIC) {
        return Ok(DownloadBillReply::Bill);
    }
    // A BOM before an XML reply would not make it a bill.
    let head = head.strip_prefix("\u{feff}".as_bytes()).unwrap_or(head);
    let Some(first) = head.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Err(WxPayError::BadField {
            field: "downloadbill",
            reason: "an empty answer, neither a bill nor an error reply".into(),
        });
    };
    if *first != b'<' {
        return Ok(DownloadBillReply::Bill);
    }
    if !whole {
        return Err(xml::XmlError::TooLarge(MAX_BODY_BYTES + 1).into());
    }
    let reply = xml::decode(head)?;
    let message = reply.get("return_msg").unwrap_or_default().trim();
    let error_code = reply.get_nonempty("error_code").map(str::trim);
    match reply.get("return_code") {
        Some("FAIL") => {}
        Some("SUCCESS") => {
            return Err(WxPayError::BadField {
                field: "return_code",
                reason: "an XML reply with return_code SUCCESS instead of the bill".into(),
            });
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
    if message.eq_ignore_ascii_case("No Bill Exist") || error_code == Some("20002") {
        return Ok(DownloadBillReply::NoBill);
    }
    if message.eq_ignore_ascii_case("Bill Creating") {
        return Ok(DownloadBillReply::Creating);
    }
    if TRANSIENT_MESSAGES
        .iter()
        .any(|t| message.eq_ignore_ascii_case(t))
        || message.contains("系统繁忙")
        || message.contains("系统错误")
    {
        return Err(WxPayError::ReturnFail(message.to_owned()));
    }
    Err(WxPayError::BillRefused(match error_code {
        Some(code) => format!("{message} (error_code {code})"),
        None => message.to_owned(),
    }))
}

impl WxPayClient {
    /// `pay/downloadbill` of the Beijing day `bill_date` (`yyyyMMdd`), `bill_type=ALL`,
    /// `tar_type=GZIP`, signed with the merchant's sign type; the body streamed into a
    /// temporary file (see the module documentation). Failover as for the other calls.
    pub async fn download_bill(
        &self,
        merchant: &Merchant,
        bill_date: NaiveDate,
    ) -> Result<BillAnswer, WxPayError> {
        let mut request = base_request(merchant);
        request.insert("bill_date", bill_date.format("%Y%m%d").to_string());
        request.insert("bill_type", "ALL");
        request.insert("tar_type", "GZIP");
        let timeout = Some(bill_timeout(&self.config));
        let response = self
            .post_signed(merchant, "pay/downloadbill", request, timeout)
            .await?;
        let downloaded = stream_to_tempfile(response).await?;
        match read_downloadbill_reply(&downloaded.head, downloaded.head_is_whole())? {
            DownloadBillReply::Bill => Ok(BillAnswer::File(downloaded.into_bill_file(None))),
            DownloadBillReply::NoBill => Ok(BillAnswer::Empty),
            DownloadBillReply::Creating => Ok(BillAnswer::NotReady),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::report::GatewayError;

    /// A fixture of tests/fixtures/wxpay-bills (a copy of ../shared/fixtures/wxpay-bills).
    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/wxpay-bills")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn the_error_fixtures_are_told_from_a_bill() {
        for (name, expected) in [
            (
                "v2_error_no_bill_exist_apo_soft.xml",
                DownloadBillReply::NoBill,
            ),
            (
                "v2_error_no_bill_exist_20002_community.xml",
                DownloadBillReply::NoBill,
            ),
        ] {
            assert_eq!(
                read_downloadbill_reply(&fixture(name), true).unwrap(),
                expected,
                "{name}"
            );
        }
        for (name, reason) in [
            (
                "v2_error_invalid_bill_date_apo_soft.xml",
                "invalid bill_date",
            ),
            (
                "v2_error_invalid_bill_type_apo_soft.xml",
                "invalid bill_type",
            ),
        ] {
            let e = read_downloadbill_reply(&fixture(name), true).unwrap_err();
            assert!(matches!(e, WxPayError::BillRefused(_)), "{name}: {e:?}");
            let g = GatewayError::from(e);
            assert!(!g.is_transient(), "{name}: asking again cannot cure it");
            assert_eq!(g.outcome(), "return_fail");
            assert!(g.to_string().contains(reason), "{name}: {g}");
        }
        // The bills themselves, text (with and without a BOM) and gzip.
        for name in [
            "v3_all_official_sample_bom_crlf_45rows.csv",
            "v3_all_3rows_gunsluo.csv",
            "v3_all_3rows_gunsluo.csv.gz",
            "v2_all_old_format_bom_6rows_apo_soft.txt",
        ] {
            let body = fixture(name);
            let whole = body.len() <= MAX_BODY_BYTES;
            assert_eq!(
                read_downloadbill_reply(&body, whole).unwrap(),
                DownloadBillReply::Bill,
                "{name}"
            );
        }
    }

    #[test]
    fn bill_creating_and_transient_failures_are_asked_again() {
        let reply = |msg: &str| {
            format!(
                "<xml><return_code><![CDATA[FAIL]]></return_code><return_msg><![CDATA[{msg}]]></return_msg></xml>"
            )
            .into_bytes()
        };
        assert_eq!(
            read_downloadbill_reply(&reply("Bill Creating"), true).unwrap(),
            DownloadBillReply::Creating
        );
        assert_eq!(
            read_downloadbill_reply(&reply("NO Bill Exist"), true).unwrap(),
            DownloadBillReply::NoBill,
            "the docs' spelling"
        );
        for msg in ["SYSTEMERROR", "CompressGZip Error", "系统繁忙,请稍后再试"] {
            let e = read_downloadbill_reply(&reply(msg), true).unwrap_err();
            assert!(matches!(e, WxPayError::ReturnFail(_)), "{msg}: {e:?}");
            assert!(GatewayError::from(e).is_transient(), "{msg}");
        }
        // Outside text is bounded and escaped in the message.
        let e = read_downloadbill_reply(&reply(&format!("bad\n{}", "x".repeat(500))), true)
            .unwrap_err();
        let shown = e.to_string();
        assert!(!shown.contains('\n') && shown.len() < 200, "{shown}");
        // An XML reply that is not an error, one too large to be one, and an empty answer.
        let success = b"<xml><return_code>SUCCESS</return_code></xml>";
        assert!(read_downloadbill_reply(success, true).is_err());
        assert!(read_downloadbill_reply(b"<xml><return_code>", false).is_err());
        assert!(read_downloadbill_reply(b"  \r\n", true).is_err());
        assert!(read_downloadbill_reply(b"<xml><return_code>FAIL", true).is_err());
        let mut with_bom = "\u{feff}".as_bytes().to_vec();
        with_bom.extend_from_slice(&reply("No Bill Exist"));
        assert_eq!(
            read_downloadbill_reply(&with_bom, true).unwrap(),
            DownloadBillReply::NoBill
        );
    }
}

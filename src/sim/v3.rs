//! WeChat Pay API v3 in the simulator: the v3 test merchant, WeChat's side of its keys, and the
//! v3 endpoints over the same orders as v2 (the control API is the same for both).
//!
//! **Requests** must carry `Authorization: WECHATPAY2-SHA256-RSA2048 mchid="…",nonce_str="…",
//! timestamp="…",serial_no="…",signature="…"` over `METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nBODY\n`,
//! signed with the merchant's API key (serial = the merchant's `cert_serial_no`, timestamp within
//! 5 minutes); anything else is `401 {"code":"SIGN_ERROR",…}`.
//!
//! **Answers** are JSON, signed with WeChat's key over `TIMESTAMP\nNONCE\nBODY\n` (errors too, as
//! WeChat does): `Wechatpay-Timestamp`, `-Nonce`, `-Signature`, `-Serial`, `-Signature-Type`, and
//! `Request-ID`. The serial: a request whose `Wechatpay-Serial` is the public key id gets the
//! public key id (when the merchant's mode has the public key); otherwise the merchant's
//! `sign_with` (the current platform certificate; always the public key id in `public_key` mode).
//! One private key is behind every serial, so the serial only says which key WeChat claims.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /v3/pay/transactions/out-trade-no/{no}?mchid=` | 200 the transaction (NOTPAY without amount.currency, transaction_id, payer, success_time; SUCCESS with them, `success_time` RFC 3339 +08:00); unknown: 404 `ORDER_NOT_EXIST` |
//! | `GET /v3/pay/partner/transactions/out-trade-no/{no}?sp_mchid=&sub_mchid=` | the same for a merchant with a `sub_mch_id` (sp_/sub_ fields) |
//! | `POST /v3/pay/transactions/out-trade-no/{no}/close` `{"mchid":…}` | 204 (also for an order already closed); paid: 400 `ORDERPAID`; unknown: 404 `ORDER_NOT_EXIST` |
//! | `GET /v3/certificates` | the served platform certificates, each PEM sealed with the merchant's APIv3 key (AAD `certificate`); `public_key` mode: 404 `RESOURCE_NOT_EXISTS` |
//! | `GET /v3/bill/tradebill?bill_date=&bill_type=ALL&tar_type=GZIP` | `{hash_type, hash_value, download_url}` of the day's bill ([`super::bill`]); no lines: 400 `NO_STATEMENT_EXIST`; 400 `STATEMENT_CREATING` as told |
//! | `GET /v3/billdownload/file?token=` | the file (signed request, unsigned answer), for 30 s |
//!
//! **Keys.** WeChat's side (embedded: the wechatpay-go test key, public key id
//! `PUB_KEY_ID_0000000000000024101100397200000006`, certificates `F5765756002FDD77` and
//! `D7CE59D1F522D701`, both over that key; `simulate --config` takes `[simulator]`). Each v3
//! merchant starts in mode `both` serving the first certificate and signing with it.
//! `PUT /_sim/v3/{mch_id}/keys` `{"mode":"public_key"|"certificates"|"both",
//! "certificates":[SERIAL,…],"sign_with":SERIAL}` (each field optional) changes what it sees:
//! `certificates` are the ones `GET /v3/certificates` serves, `sign_with` signs answers and
//! notifications that do not ask for the public key (a served certificate, or in `both` the
//! public key id). A rotation: serve both certificates, then `sign_with` the new one.
//! `GET` on the same path shows the setup, the public key id and every certificate known.
//!
//! **Faults** (`PUT /_sim/faults`, endpoints `orderquery`, `closeorder`, `certificates`, and
//! `notify` for notifications' signatures): `latency_ms`, `timeout_rate`, `http_500_rate`
//! (unsigned plain 500, as from a proxy), `system_error_rate` (signed 500 `SYSTEM_ERROR`),
//! `rate_limit_rate` (signed 429 `RATELIMIT_EXCEEDED`), `bad_sign_rate`, `signtest_rate`
//! (`WECHATPAY/SIGNTEST/…`), `unknown_serial_rate`, `timestamp_skew_seconds`, `unsigned_rate`
//! (no `Wechatpay-Signature`), `mismatch_rate` (another out_trade_no), `malformed_rate` (a body
//! that is not JSON, correctly signed).
//!
//! **Notifications**: `pay` with `"notify":"deliver"` POSTs `TRANSACTION.SUCCESS` (the
//! transaction sealed with the APIv3 key, AAD `transaction`), signed like an answer, to the
//! order's `notify_url`, else to `{notify_base_url}/wxpay/v3/notify` (`PUT /_sim/config`), on
//! WeChat's retry schedule until a 2xx answer.
#![expect(
    clippy::result_large_err,
    reason = "handlers return early with a ready axum Response; the size is irrelevant on these paths"
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::bill::{BillOutcome, parse_bill_date, wrong_sha1};
use super::state::{
    BILL_URL_LIFETIME, BillDownload, CloseOutcome, Faults, SimEndpoint, SimOrder, SimRefund,
    SimState, lock, roll, trade_state_desc,
};
use crate::config::SimulatorSettings;
use crate::domain::{AppId, MchId, RefundStatus, TradeState};
use crate::gateway::{Merchant, V3Credentials};
use crate::wxpay::client::nonce;
use crate::wxpay::v3::auth::{
    MAX_SKEW_SECONDS, SIGNTEST_PREFIX, request_message, response_message,
};
use crate::wxpay::v3::crypto::SCHEME;
use crate::wxpay::v3::{
    ApiV3Key, Certificate, CertificateMode, CryptoError, PrivateKey, PublicKey, WechatKeys,
    WechatPublicKey,
};

/// WeChat's test key (wechatpay-go's published test key; not a secret).
const WECHAT_KEY_PEM: &[u8] =
    include_bytes!("../../tests/fixtures/wxpay-v3/keys/go_sdk_test_private_key.pem");
const WECHAT_PUBLIC_KEY_PEM: &[u8] =
    include_bytes!("../../tests/fixtures/wxpay-v3/keys/go_sdk_test_public_key.pem");
const CERT_F576: &str =
    include_str!("../../tests/fixtures/wxpay-v3/keys/go_sdk_test_cert_F5765756002FDD77.pem");
const CERT_D7CE: &str =
    include_str!("../../tests/fixtures/wxpay-v3/keys/go_sdk_test_cert_D7CE59D1F522D701.pem");
/// The v3 test merchant's API key (wechatpay-java's published test key; not a secret).
const MERCHANT_KEY_PEM: &[u8] =
    include_bytes!("../../tests/fixtures/wxpay-v3/keys/java_sdk_merchant_private_key.pem");

/// The v3 test merchant.
pub const TEST_V3_MCH_ID: &str = "1900000100";
pub const TEST_V3_APPID: &str = "wxd678efh567hg6787";
/// The serial of the v3 test merchant's API certificate.
pub const TEST_V3_MERCHANT_SERIAL: &str = "5F1C72E2A8931B72A2E13AF8DEE92471EB397115";
/// The v3 test merchant's APIv3 key (wechatpay-java's test configuration).
pub const TEST_V3_APIV3_KEY: &str = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";
/// The id of WeChat's test public key (the one of the official doc example).
pub const TEST_PUBLIC_KEY_ID: &str = "PUB_KEY_ID_0000000000000024101100397200000006";
/// A serial no key of WeChat has (`unknown_serial_rate`); hex, like a certificate serial.
pub const UNKNOWN_SERIAL: &str = "7E57000000000000000000000000000000DEAD01";
/// Where v3 notifications go on the notify base URL.
pub const V3_NOTIFY_PATH: &str = "/wxpay/v3/notify";

/// China Standard Time, the offset WeChat writes its times in.
fn cst() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).unwrap_or_else(|| unreachable!("+08:00 is a valid offset"))
}

/// `2023-05-06T15:17:31+08:00`.
pub fn format_v3_time(t: DateTime<Utc>) -> String {
    t.with_timezone(&cst())
        .to_rfc3339_opts(SecondsFormat::Secs, false)
}

/// The v3 test merchant of the published test keys, as the daemon sees it (WeChat's public key
/// under its id, certificates downloaded).
pub fn test_v3_merchant() -> Result<Merchant, CryptoError> {
    let wechat = WechatKeys::new(
        Some(WechatPublicKey {
            id: TEST_PUBLIC_KEY_ID.to_owned(),
            key: PublicKey::from_pem(WECHAT_PUBLIC_KEY_PEM)?,
        }),
        CertificateMode::Download,
    );
    let credentials = V3Credentials {
        private_key: PrivateKey::from_pem(MERCHANT_KEY_PEM)?,
        cert_serial_no: TEST_V3_MERCHANT_SERIAL.to_owned(),
        apiv3_key: ApiV3Key::new(TEST_V3_APIV3_KEY.as_bytes())?,
        wechat,
    };
    let (Ok(mch_id), Ok(appid)) = (MchId::parse(TEST_V3_MCH_ID), AppId::parse(TEST_V3_APPID))
    else {
        unreachable!("the test merchant's ids are valid");
    };
    Ok(Merchant::v3(mch_id, appid, credentials))
}

/// A platform certificate WeChat can serve: its PEM and what it says.
#[derive(Debug, Clone)]
pub struct PlatformCertificate {
    pub pem: String,
    pub cert: Certificate,
}

/// WeChat's side of every v3 merchant: one private key, named by the public key id or by any of
/// the platform certificates over it.
pub struct WechatSide {
    key: PrivateKey,
    public_key_id: String,
    certificates: Vec<PlatformCertificate>,
}

impl std::fmt::Debug for WechatSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WechatSide")
            .field("public_key_id", &self.public_key_id)
            .field(
                "certificates",
                &self
                    .certificates
                    .iter()
                    .map(|c| c.cert.serial.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Why WeChat's side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WechatSideError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("platform certificate {serial} is not over WeChat's private key")]
    NotOverKey { serial: String },
    #[error("the embedded test keys: {0}")]
    Embedded(#[from] CryptoError),
}

impl WechatSide {
    /// The embedded test keys: the wechatpay-go key, its public key id and both certificates.
    pub fn test_keys() -> Result<WechatSide, WechatSideError> {
        let certs = [CERT_F576, CERT_D7CE]
            .into_iter()
            .map(|pem| {
                Ok(PlatformCertificate {
                    pem: pem.to_owned(),
                    cert: Certificate::from_pem(pem.as_bytes())?,
                })
            })
            .collect::<Result<Vec<_>, CryptoError>>()?;
        WechatSide::new(
            PrivateKey::from_pem(WECHAT_KEY_PEM)?,
            TEST_PUBLIC_KEY_ID.to_owned(),
            certs,
        )
    }

    /// `[simulator]` of a config: each setting left out falls back to the test keys (a key
    /// file without certificate files: public-key mode only).
    pub fn from_settings(s: &SimulatorSettings) -> Result<WechatSide, WechatSideError> {
        let read = |p: &std::path::Path| -> Result<Vec<u8>, WechatSideError> {
            let bytes = std::fs::read(p).map_err(|e| WechatSideError::File {
                path: p.display().to_string(),
                message: e.to_string(),
            })?;
            if bytes.len() > 64 * 1024 {
                return Err(WechatSideError::File {
                    path: p.display().to_string(),
                    message: "larger than 64 KiB, not a PEM key or certificate".into(),
                });
            }
            Ok(bytes)
        };
        let bad = |p: &std::path::Path, e: CryptoError| WechatSideError::File {
            path: p.display().to_string(),
            message: e.to_string(),
        };
        let test = WechatSide::test_keys()?;
        let key = match &s.wechatpay_private_key_file {
            Some(p) => PrivateKey::from_pem(&read(p)?).map_err(|e| bad(p, e))?,
            None => test.key.clone(),
        };
        let mut certs = Vec::new();
        for p in &s.platform_certificate_files {
            let pem = String::from_utf8(read(p)?).map_err(|_| WechatSideError::File {
                path: p.display().to_string(),
                message: "not UTF-8 text".into(),
            })?;
            let cert = Certificate::from_pem(pem.as_bytes()).map_err(|e| bad(p, e))?;
            certs.push(PlatformCertificate { pem, cert });
        }
        if s.wechatpay_private_key_file.is_none() && s.platform_certificate_files.is_empty() {
            certs = test.certificates;
        }
        let id = s
            .wechatpay_public_key_id
            .clone()
            .unwrap_or_else(|| TEST_PUBLIC_KEY_ID.to_owned());
        WechatSide::new(key, id, certs)
    }

    fn new(
        key: PrivateKey,
        public_key_id: String,
        certificates: Vec<PlatformCertificate>,
    ) -> Result<WechatSide, WechatSideError> {
        let public = key.public_key();
        let mut kept: Vec<PlatformCertificate> = Vec::new();
        for c in certificates {
            if c.cert.key != public {
                return Err(WechatSideError::NotOverKey {
                    serial: c.cert.serial,
                });
            }
            if !kept.iter().any(|k| k.cert.serial == c.cert.serial) {
                kept.push(c);
            }
        }
        Ok(WechatSide {
            key,
            public_key_id,
            certificates: kept,
        })
    }

    pub fn public_key_id(&self) -> &str {
        &self.public_key_id
    }

    /// Every certificate WeChat has (served or not).
    pub fn certificates(&self) -> &[PlatformCertificate] {
        &self.certificates
    }

    fn certificate(&self, serial: &str) -> Option<&PlatformCertificate> {
        self.certificates
            .iter()
            .find(|c| c.cert.serial.eq_ignore_ascii_case(serial))
    }

    /// A new merchant's setup: both modes, the first certificate (public key only without one).
    pub(crate) fn initial_setup(&self) -> KeySetup {
        match self.certificates.first() {
            Some(c) => KeySetup {
                mode: KeyMode::Both,
                certificates: vec![c.cert.serial.clone()],
                sign_with: c.cert.serial.clone(),
            },
            None => KeySetup {
                mode: KeyMode::PublicKey,
                certificates: Vec::new(),
                sign_with: self.public_key_id.clone(),
            },
        }
    }
}

/// Which of WeChat's keys a merchant has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyMode {
    /// "WeChat Pay public key" only: no platform certificates (`GET /v3/certificates` is 404).
    PublicKey,
    /// Platform certificates only.
    Certificates,
    /// Both (WeChat's migration period).
    Both,
}

/// What one v3 merchant sees of WeChat's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeySetup {
    pub mode: KeyMode,
    /// The serials `GET /v3/certificates` serves.
    pub certificates: Vec<String>,
    /// The serial answers and notifications are signed under unless the request asks for the
    /// public key.
    pub sign_with: String,
}

impl KeySetup {
    /// The serial an answer is signed under; `requested` is the request's `Wechatpay-Serial`.
    fn serial(&self, requested: Option<&str>, public_key_id: &str) -> String {
        match self.mode {
            KeyMode::PublicKey => public_key_id.to_owned(),
            KeyMode::Both if requested == Some(public_key_id) => public_key_id.to_owned(),
            KeyMode::Certificates | KeyMode::Both => self.sign_with.clone(),
        }
    }
}

/// Body of `PUT /_sim/v3/{mch_id}/keys`; each field left out keeps its value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysBody {
    #[serde(default)]
    mode: Option<KeyMode>,
    #[serde(default)]
    certificates: Option<Vec<String>>,
    #[serde(default)]
    sign_with: Option<String>,
}

impl KeysBody {
    fn apply(self, current: &KeySetup, wechat: &WechatSide) -> Result<KeySetup, String> {
        let mode = self.mode.unwrap_or(current.mode);
        let mut certificates: Vec<String> = Vec::new();
        for serial in self
            .certificates
            .unwrap_or_else(|| current.certificates.clone())
        {
            let known = wechat
                .certificate(&serial)
                .ok_or_else(|| format!("no certificate {}", crate::text::quote(&serial)))?;
            if !certificates.contains(&known.cert.serial) {
                certificates.push(known.cert.serial.clone());
            }
        }
        if mode != KeyMode::PublicKey && certificates.is_empty() {
            return Err("modes certificates and both need at least one certificate".into());
        }
        let pk = wechat.public_key_id();
        // The serial as WeChat writes it, when this mode can sign under it.
        let canonical = |s: &str| -> Option<String> {
            if mode != KeyMode::Certificates && s.eq_ignore_ascii_case(pk) {
                return Some(pk.to_owned());
            }
            if mode == KeyMode::PublicKey {
                return None;
            }
            certificates
                .iter()
                .find(|c| c.eq_ignore_ascii_case(s))
                .cloned()
        };
        let sign_with = match self.sign_with {
            Some(s) => canonical(&s).ok_or_else(|| {
                format!(
                    "sign_with {} is neither a served certificate nor (in modes both and public_key) the public key id",
                    crate::text::quote(&s)
                )
            })?,
            None => canonical(&current.sign_with).unwrap_or_else(|| {
                match certificates.first() {
                    Some(c) if mode != KeyMode::PublicKey => c.clone(),
                    _ => pk.to_owned(),
                }
            }),
        };
        Ok(KeySetup {
            mode,
            certificates,
            sign_with,
        })
    }
}

fn keys_json(state: &SimState, setup: &KeySetup) -> Value {
    json!({
        "mode": setup.mode,
        "certificates": setup.certificates,
        "sign_with": setup.sign_with,
        "public_key_id": state.wechat.public_key_id(),
        "available_certificates": state
            .wechat
            .certificates()
            .iter()
            .map(|c| c.cert.serial.clone())
            .collect::<Vec<_>>(),
    })
}

fn control_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// `GET /_sim/v3/{mch_id}/keys`.
pub async fn get_keys(State(state): State<Arc<SimState>>, Path(mch_id): Path<String>) -> Response {
    match lock(&state.v3_keys).get(&mch_id) {
        Some(setup) => axum::Json(keys_json(&state, setup)).into_response(),
        None => control_error(StatusCode::NOT_FOUND, "no such v3 merchant"),
    }
}

/// `PUT /_sim/v3/{mch_id}/keys`.
pub async fn set_keys(
    State(state): State<Arc<SimState>>,
    Path(mch_id): Path<String>,
    axum::Json(body): axum::Json<KeysBody>,
) -> Response {
    let mut all = lock(&state.v3_keys);
    let Some(current) = all.get_mut(&mch_id) else {
        return control_error(StatusCode::NOT_FOUND, "no such v3 merchant");
    };
    match body.apply(current, &state.wechat) {
        Ok(setup) => {
            *current = setup;
            axum::Json(keys_json(&state, current)).into_response()
        }
        Err(e) => control_error(StatusCode::BAD_REQUEST, e),
    }
}

/// The `Wechatpay-*` headers of one signed message.
pub(crate) struct Signature {
    pub timestamp: String,
    pub nonce: String,
    /// `None` with `unsigned_rate`.
    pub signature: Option<String>,
    pub serial: String,
}

impl Signature {
    pub(crate) fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            ("Wechatpay-Timestamp", self.timestamp.clone()),
            ("Wechatpay-Nonce", self.nonce.clone()),
            ("Wechatpay-Serial", self.serial.clone()),
            ("Wechatpay-Signature-Type", SCHEME.to_owned()),
        ];
        if let Some(s) = &self.signature {
            h.push(("Wechatpay-Signature", s.clone()));
        }
        h
    }
}

/// Signs `body` under `serial` with WeChat's key, applying the signature faults.
pub(crate) fn sign_body(
    wechat: &WechatSide,
    serial: String,
    faults: &Faults,
    body: &[u8],
) -> Result<Signature, CryptoError> {
    let timestamp = Utc::now()
        .timestamp()
        .saturating_add(faults.timestamp_skew_seconds)
        .to_string();
    let nonce = nonce();
    let mut signature = wechat
        .key
        .sign(&response_message(&timestamp, &nonce, body))?;
    if roll(faults.bad_sign_rate) {
        let first = if signature.starts_with('A') { "B" } else { "A" };
        signature.replace_range(..1, first);
    }
    if roll(faults.signtest_rate) && signature.len() > SIGNTEST_PREFIX.len() {
        signature.replace_range(..SIGNTEST_PREFIX.len(), SIGNTEST_PREFIX);
    }
    let serial = if roll(faults.unknown_serial_rate) {
        UNKNOWN_SERIAL.to_owned()
    } else {
        serial
    };
    Ok(Signature {
        timestamp,
        nonce,
        signature: (!roll(faults.unsigned_rate)).then_some(signature),
        serial,
    })
}

/// How one request's answers are signed.
struct Signing {
    serial: String,
    faults: Faults,
}

/// A signed JSON answer (`None`: an empty body, as 204).
fn answer(
    state: &SimState,
    signing: &Signing,
    status: StatusCode,
    body: Option<&Value>,
) -> Response {
    let bytes: Vec<u8> = match body {
        None => Vec::new(),
        Some(_) if roll(signing.faults.malformed_rate) => b"{\"code\":\"SYSTEM_ERR".to_vec(),
        Some(v) => match serde_json::to_vec(v) {
            Ok(b) => b,
            Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        },
    };
    let signature = match sign_body(
        &state.wechat,
        signing.serial.clone(),
        &signing.faults,
        &bytes,
    ) {
        Ok(s) => s,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let mut builder = Response::builder()
        .status(status)
        .header("Request-ID", request_id());
    for (name, value) in signature.headers() {
        builder = builder.header(name, value);
    }
    if body.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "application/json; charset=utf-8");
    }
    builder
        .body(Body::from(bytes))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn error_body(code: &str, message: &str) -> Value {
    json!({ "code": code, "message": message })
}

fn error(
    state: &SimState,
    signing: &Signing,
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response {
    answer(state, signing, status, Some(&error_body(code, message)))
}

/// `08E0C7A0A10610…`: unique enough for a test to tell requests apart.
fn request_id() -> String {
    format!(
        "{:016X}{:016X}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// An authenticated v3 request.
struct Authed {
    merchant: Merchant,
    credentials: V3Credentials,
    signing: Signing,
}

/// The fields of an `Authorization` header of [`SCHEME`], in any order.
fn parse_authorization(value: &str) -> Option<HashMap<&str, &str>> {
    let rest = value.strip_prefix(SCHEME)?.strip_prefix(' ')?;
    let mut fields = HashMap::new();
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        let v = v.strip_prefix('"')?.strip_suffix('"')?;
        fields.insert(k, v);
    }
    Some(fields)
}

/// The serial WeChat signs under for `mch_id` (the default setup for one it does not know).
fn signing_for(
    state: &SimState,
    mch_id: Option<&str>,
    headers: &HeaderMap,
    faults: Faults,
) -> Signing {
    let requested = headers
        .get("Wechatpay-Serial")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let setup = mch_id
        .and_then(|m| lock(&state.v3_keys).get(m).cloned())
        .unwrap_or_else(|| state.wechat.initial_setup());
    Signing {
        serial: setup.serial(requested, state.wechat.public_key_id()),
        faults,
    }
}

/// Counts the request, then checks its `Authorization` against the merchant's key.
fn authenticate(
    state: &SimState,
    endpoint: SimEndpoint,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Authed, Response> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let faults = state.faults(endpoint);
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_authorization);
    let mch_id = auth.as_ref().and_then(|a| a.get("mchid").copied());
    let signing = signing_for(state, mch_id, headers, faults);
    let sign_error = |message: &str| {
        error(
            state,
            &signing,
            StatusCode::UNAUTHORIZED,
            "SIGN_ERROR",
            message,
        )
    };
    let Some(auth) = auth else {
        return Err(sign_error(
            "Http头Authorization值格式错误，请参考《微信支付商户REST API签名规则》",
        ));
    };
    let field = |name: &str| auth.get(name).copied().filter(|v| !v.is_empty());
    let (Some(mch_id), Some(nonce), Some(timestamp), Some(serial), Some(signature)) = (
        field("mchid"),
        field("nonce_str"),
        field("timestamp"),
        field("serial_no"),
        field("signature"),
    ) else {
        return Err(sign_error(
            "Http头Authorization值格式错误，请参考《微信支付商户REST API签名规则》",
        ));
    };
    let Some(merchant) = state.merchants.get(mch_id) else {
        return Err(sign_error("商户号不存在或未开通API v3"));
    };
    let Some(credentials) = merchant.v3_credentials().cloned() else {
        return Err(sign_error("商户号不存在或未开通API v3"));
    };
    if !serial.eq_ignore_ascii_case(&credentials.cert_serial_no) {
        return Err(sign_error("商户证书序列号有误"));
    }
    let Ok(ts) = timestamp.parse::<i64>() else {
        return Err(sign_error("Http头Authorization中的timestamp格式错误"));
    };
    if (Utc::now().timestamp() - ts).abs() > MAX_SKEW_SECONDS {
        return Err(sign_error("请求的时间戳已过期"));
    }
    let Ok(body) = std::str::from_utf8(body) else {
        return Err(error(
            state,
            &signing,
            StatusCode::BAD_REQUEST,
            "PARAM_ERROR",
            "请求体不是UTF-8",
        ));
    };
    let path_and_query = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let message = request_message(method.as_str(), path_and_query, ts, nonce, body);
    if credentials
        .private_key
        .public_key()
        .verify(message.as_bytes(), signature)
        .is_err()
    {
        return Err(sign_error("错误的签名，验签失败"));
    }
    Ok(Authed {
        merchant: merchant.clone(),
        credentials,
        signing,
    })
}

/// The query parameter `name` (WeChat's ids need no percent-decoding).
fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Sleeps for the injected latency, then answers the faults that replace an answer entirely.
async fn faults_before(state: &SimState, authed: &Authed) -> Result<(), Response> {
    let faults = authed.signing.faults;
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if roll(faults.timeout_rate) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(120)) => {}
            _ = state.shutdown.cancelled() => {}
        }
        return Err(StatusCode::GATEWAY_TIMEOUT.into_response());
    }
    if roll(faults.http_500_rate) {
        return Err((StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error").into_response());
    }
    if roll(faults.system_error_rate) {
        return Err(error(
            state,
            &authed.signing,
            StatusCode::INTERNAL_SERVER_ERROR,
            "SYSTEM_ERROR",
            "系统错误",
        ));
    }
    if roll(faults.rate_limit_rate) {
        return Err(error(
            state,
            &authed.signing,
            StatusCode::TOO_MANY_REQUESTS,
            "RATELIMIT_EXCEEDED",
            "请求超过频率限制",
        ));
    }
    Ok(())
}

fn order_not_exist(state: &SimState, authed: &Authed) -> Response {
    error(
        state,
        &authed.signing,
        StatusCode::NOT_FOUND,
        "ORDER_NOT_EXIST",
        "订单不存在",
    )
}

fn param_error(state: &SimState, authed: &Authed, message: &str) -> Response {
    error(
        state,
        &authed.signing,
        StatusCode::BAD_REQUEST,
        "PARAM_ERROR",
        message,
    )
}

/// A transaction as v3's orderquery and `TRANSACTION.*` notifications show it: a paid order
/// with amount.currency, payer, success_time and transaction_id; an unpaid one without.
pub(crate) fn transaction_json(mch_id: &str, out_trade_no: &str, order: &SimOrder) -> Value {
    let mut t = json!({
        "appid": order.appid,
        "mchid": mch_id,
        "out_trade_no": out_trade_no,
        "promotion_detail": [],
        "trade_state": order.state.as_str(),
        "trade_state_desc": trade_state_desc(&order.state),
    });
    let paid = matches!(order.state, TradeState::Success | TradeState::Refund);
    match (&order.transaction_id, order.time_end) {
        (Some(tx), Some(time_end)) if paid => {
            // What the customer paid: a test provokes a mismatch by paying another amount.
            let fee = order.paid_fee.unwrap_or(order.total_fee);
            t["amount"] = json!({
                "currency": "CNY",
                "payer_currency": "CNY",
                "payer_total": fee,
                "total": fee,
            });
            t["attach"] = json!(order.attach.clone().unwrap_or_default());
            t["bank_type"] = json!("OTHERS");
            t["payer"] = json!({ "openid": order.openid });
            t["success_time"] = json!(format_v3_time(time_end));
            t["trade_type"] = json!(order.trade_type);
            t["transaction_id"] = json!(tx);
        }
        _ => {
            t["amount"] = json!({ "payer_currency": "CNY", "total": order.total_fee });
            t["scene_info"] = json!({ "device_id": "" });
        }
    }
    t
}

/// The partner (service provider) view of a transaction.
fn partner_json(
    merchant: &Merchant,
    sub_mch_id: &str,
    out_trade_no: &str,
    order: &SimOrder,
) -> Value {
    let mut t = transaction_json(merchant.mch_id.as_str(), out_trade_no, order);
    if let Some(obj) = t.as_object_mut() {
        obj.remove("mchid");
        if let Some(appid) = obj.remove("appid") {
            obj.insert("sp_appid".into(), appid);
        }
        obj.insert("sp_mchid".into(), json!(merchant.mch_id.as_str()));
        obj.insert("sub_mchid".into(), json!(sub_mch_id));
        if let Some(payer) = obj.get_mut("payer").and_then(Value::as_object_mut)
            && let Some(openid) = payer.remove("openid")
        {
            payer.insert("sp_openid".into(), openid);
        }
    }
    t
}

/// The order's JSON, after the query faults (`mismatch_rate`).
fn query_answer(
    state: &SimState,
    authed: &Authed,
    out_trade_no: &str,
    view: impl FnOnce(&SimOrder) -> Value,
) -> Response {
    let body = {
        let orders = lock(&state.orders);
        match orders.get(&(
            authed.merchant.mch_id.as_str().to_owned(),
            out_trade_no.to_owned(),
        )) {
            Some(order) => view(order),
            None => return order_not_exist(state, authed),
        }
    };
    let mut body = body;
    if roll(authed.signing.faults.mismatch_rate) {
        body["out_trade_no"] = json!("SIMMISMATCH");
    }
    answer(state, &authed.signing, StatusCode::OK, Some(&body))
}

/// `GET /v3/pay/transactions/out-trade-no/{out_trade_no}?mchid=`.
pub async fn order_query(
    State(state): State<Arc<SimState>>,
    Path(out_trade_no): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let authed = match authenticate(
        &state,
        SimEndpoint::OrderQuery,
        &method,
        &uri,
        &headers,
        b"",
    ) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    match query_param(&uri, "mchid") {
        Some(m) if m == authed.merchant.mch_id.as_str() => {}
        Some(_) => {
            return param_error(
                &state,
                &authed,
                "mchid与请求头Authorization中的商户号不一致",
            );
        }
        None => return param_error(&state, &authed, "缺少参数mchid"),
    }
    let _inflight = state.track_query(&out_trade_no);
    if let Err(resp) = faults_before(&state, &authed).await {
        return resp;
    }
    let mch_id = authed.merchant.mch_id.as_str().to_owned();
    query_answer(&state, &authed, &out_trade_no, |o| {
        transaction_json(&mch_id, &out_trade_no, o)
    })
}

/// `GET /v3/pay/partner/transactions/out-trade-no/{out_trade_no}?sp_mchid=&sub_mchid=`.
pub async fn partner_order_query(
    State(state): State<Arc<SimState>>,
    Path(out_trade_no): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let authed = match authenticate(
        &state,
        SimEndpoint::OrderQuery,
        &method,
        &uri,
        &headers,
        b"",
    ) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    if query_param(&uri, "sp_mchid") != Some(authed.merchant.mch_id.as_str()) {
        return param_error(
            &state,
            &authed,
            "sp_mchid与请求头Authorization中的商户号不一致",
        );
    }
    let sub = match (&authed.merchant.sub_mch_id, query_param(&uri, "sub_mchid")) {
        (Some(mine), Some(asked)) if mine.as_str() == asked => asked.to_owned(),
        (_, None) => return param_error(&state, &authed, "缺少参数sub_mchid"),
        _ => return param_error(&state, &authed, "sub_mchid与sp_mchid没有受理关系"),
    };
    let _inflight = state.track_query(&out_trade_no);
    if let Err(resp) = faults_before(&state, &authed).await {
        return resp;
    }
    let merchant = authed.merchant.clone();
    query_answer(&state, &authed, &out_trade_no, |o| {
        partner_json(&merchant, &sub, &out_trade_no, o)
    })
}

/// `GET /v3/refund/domestic/refunds/{out_refund_no}[?sub_mchid=]`.
pub async fn refund_query(
    State(state): State<Arc<SimState>>,
    Path(out_refund_no): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let authed = match authenticate(
        &state,
        SimEndpoint::RefundQuery,
        &method,
        &uri,
        &headers,
        b"",
    ) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    match (&authed.merchant.sub_mch_id, query_param(&uri, "sub_mchid")) {
        (None, None) => {}
        (Some(mine), Some(asked)) if mine.as_str() == asked => {}
        (Some(_), None) => return param_error(&state, &authed, "缺少参数sub_mchid"),
        _ => return param_error(&state, &authed, "sub_mchid与sp_mchid没有受理关系"),
    }
    if let Err(resp) = faults_before(&state, &authed).await {
        return resp;
    }
    let mch_id = authed.merchant.mch_id.as_str();
    let found = state
        .refund(mch_id, &out_refund_no)
        .and_then(|r| state.order(mch_id, &r.out_trade_no).map(|o| (r, o)));
    let Some((refund, order)) = found else {
        return error(
            &state,
            &authed.signing,
            StatusCode::NOT_FOUND,
            "RESOURCE_NOT_EXISTS",
            "退款单不存在",
        );
    };
    let mut body = refund_json(&out_refund_no, &refund, &order);
    if roll(authed.signing.faults.mismatch_rate) {
        body["out_refund_no"] = json!("SIMMISMATCH");
    }
    answer(&state, &authed.signing, StatusCode::OK, Some(&body))
}

/// A refund as v3's refund query shows it.
fn refund_json(out_refund_no: &str, refund: &SimRefund, order: &SimOrder) -> Value {
    let paid = order.paid_fee.unwrap_or(order.total_fee);
    let mut r = json!({
        "refund_id": refund.refund_id,
        "out_refund_no": out_refund_no,
        "transaction_id": order.transaction_id,
        "out_trade_no": refund.out_trade_no,
        "channel": "ORIGINAL",
        "user_received_account": refund.recv_account,
        "create_time": format_v3_time(refund.created_at),
        "status": refund.status.label(),
        "funds_account": "AVAILABLE",
        "amount": {
            "total": paid,
            "refund": refund.refund_fee,
            "from": [],
            "payer_total": paid,
            "payer_refund": refund.refund_fee,
            "settlement_refund": refund.refund_fee,
            "settlement_total": paid,
            "discount_refund": 0,
            "currency": "CNY",
        },
        "promotion_detail": [],
    });
    if let Some(t) = refund.success_time {
        r["success_time"] = json!(format_v3_time(t));
    }
    r
}

#[derive(Deserialize)]
struct CloseBody {
    mchid: String,
}

/// `POST /v3/pay/transactions/out-trade-no/{out_trade_no}/close` `{"mchid":…}`.
pub async fn close_order(
    State(state): State<Arc<SimState>>,
    Path(out_trade_no): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authed = match authenticate(
        &state,
        SimEndpoint::CloseOrder,
        &method,
        &uri,
        &headers,
        &body,
    ) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    match serde_json::from_slice::<CloseBody>(&body) {
        Ok(b) if b.mchid == authed.merchant.mch_id.as_str() => {}
        Ok(_) => {
            return param_error(
                &state,
                &authed,
                "mchid与请求头Authorization中的商户号不一致",
            );
        }
        Err(_) => return param_error(&state, &authed, "请求体不是合法的JSON或缺少参数mchid"),
    }
    state.count_close(&out_trade_no);
    if let Err(resp) = faults_before(&state, &authed).await {
        return resp;
    }
    match state.close_at_wechat(authed.merchant.mch_id.as_str(), &out_trade_no) {
        CloseOutcome::NotFound => order_not_exist(&state, &authed),
        CloseOutcome::TooEarly => error(
            &state,
            &authed.signing,
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "订单生成后不能马上调用关单接口，最短调用时间间隔为5分钟",
        ),
        CloseOutcome::Paid => error(
            &state,
            &authed.signing,
            StatusCode::BAD_REQUEST,
            "ORDERPAID",
            "订单已支付",
        ),
        CloseOutcome::AlreadyClosed | CloseOutcome::Closed => {
            answer(&state, &authed.signing, StatusCode::NO_CONTENT, None)
        }
    }
}

/// `GET /v3/certificates`.
pub async fn certificates(
    State(state): State<Arc<SimState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let authed = match authenticate(
        &state,
        SimEndpoint::Certificates,
        &method,
        &uri,
        &headers,
        b"",
    ) {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    if let Err(resp) = faults_before(&state, &authed).await {
        return resp;
    }
    let setup = lock(&state.v3_keys)
        .get(authed.merchant.mch_id.as_str())
        .cloned()
        .unwrap_or_else(|| state.wechat.initial_setup());
    if setup.mode == KeyMode::PublicKey {
        return error(
            &state,
            &authed.signing,
            StatusCode::NOT_FOUND,
            "RESOURCE_NOT_EXISTS",
            "无可用的平台证书，请在商户平台-API安全申请使用微信支付公钥。可查看指引https://pay.weixin.qq.com/docs/merchant/products/platform-certificate/wxp-pub-key-guide.html",
        );
    }
    let mut data = Vec::new();
    for serial in &setup.certificates {
        let Some(c) = state.wechat.certificate(serial) else {
            continue;
        };
        let nonce: String = nonce().chars().take(12).collect();
        let Ok(ciphertext) =
            authed
                .credentials
                .apiv3_key
                .encrypt(&nonce, "certificate", c.pem.as_bytes())
        else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        data.push(json!({
            "serial_no": c.cert.serial,
            "effective_time": format_v3_time(c.cert.not_before),
            "expire_time": format_v3_time(c.cert.not_after),
            "encrypt_certificate": {
                "algorithm": "AEAD_AES_256_GCM",
                "nonce": nonce,
                "associated_data": "certificate",
                "ciphertext": ciphertext,
            },
        }));
    }
    answer(
        &state,
        &authed.signing,
        StatusCode::OK,
        Some(&json!({ "data": data })),
    )
}

/// The authority a download URL names: the request's `Host` when it is a plain host[:port]
/// (it is echoed into an answer), else the loopback address.
fn download_authority(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("127.0.0.1")
        .to_owned()
}

/// `GET /v3/bill/tradebill?bill_date=YYYY-MM-DD[&bill_type=ALL][&tar_type=GZIP]`: the bill's
/// SHA-1 (of the text) and a `download_url` on the simulator's own host (`Host`; `https` behind
/// a proxy that says `X-Forwarded-Proto: https`) valid for [`BILL_URL_LIFETIME`]. No lines
/// that day: 400 `NO_STATEMENT_EXIST`; the `creating` fault: 400 `STATEMENT_CREATING`;
/// `wrong_hash`: the SHA-1 of other bytes; `expired_url`: a URL already expired.
pub async fn trade_bill(
    State(state): State<Arc<SimState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let authed = match authenticate(&state, SimEndpoint::Bills, &method, &uri, &headers, b"") {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let Some(date) = query_param(&uri, "bill_date")
        .filter(|d| d.len() == 10)
        .and_then(parse_bill_date)
    else {
        return param_error(&state, &authed, "bill_date参数格式错误，应为YYYY-MM-DD");
    };
    if !matches!(query_param(&uri, "bill_type"), None | Some("ALL")) {
        return param_error(&state, &authed, "bill_type参数错误，模拟器只提供ALL");
    }
    let gzip = match query_param(&uri, "tar_type") {
        None => false,
        Some("GZIP") => true,
        Some(_) => return param_error(&state, &authed, "tar_type参数错误"),
    };
    let mch_id = authed.merchant.mch_id.as_str().to_owned();
    state.count_bill_request(&mch_id, date);
    if let Err(resp) = faults_before(&state, &authed).await {
        return resp;
    }
    let (bill, faults) = match state.bill(&mch_id, date, gzip) {
        Ok(BillOutcome::NoBill) => {
            return error(
                &state,
                &authed.signing,
                StatusCode::BAD_REQUEST,
                "NO_STATEMENT_EXIST",
                "请求的账单文件不存在",
            );
        }
        Ok(BillOutcome::Creating) => {
            return error(
                &state,
                &authed.signing,
                StatusCode::BAD_REQUEST,
                "STATEMENT_CREATING",
                "账单生成中",
            );
        }
        Ok(BillOutcome::File(bill, faults)) => (bill, faults),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let hash_value = if faults.wrong_hash {
        wrong_sha1(&bill.sha1)
    } else {
        bill.sha1.clone()
    };
    let token = format!("{}{}", nonce(), nonce());
    let now = std::time::Instant::now();
    let expires_at = if faults.expired_url {
        now.checked_sub(Duration::from_secs(1)).unwrap_or(now)
    } else {
        now + BILL_URL_LIFETIME
    };
    {
        let mut downloads = lock(&state.bill_downloads);
        downloads.retain(|_, d| d.expires_at > now);
        downloads.insert(
            token.clone(),
            BillDownload {
                mch_id: mch_id.clone(),
                bill_date: date,
                bytes: bill.bytes,
                gzip: bill.gzip,
                expires_at,
            },
        );
    }
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    let body = json!({
        "hash_type": "SHA1",
        "hash_value": hash_value,
        "download_url": format!(
            "{scheme}://{}/v3/billdownload/file?token={token}",
            download_authority(&headers)
        ),
    });
    answer(&state, &authed.signing, StatusCode::OK, Some(&body))
}

/// `GET /v3/billdownload/file?token=…`: the file, to the merchant it was made for, while its
/// token lives; the request must be signed like any other, the answer is not (as WeChat's). An
/// unknown or expired token: 400 `INVALID_REQUEST`; another merchant's: 403 `NO_AUTH`.
pub async fn bill_download(
    State(state): State<Arc<SimState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let authed = match authenticate(&state, SimEndpoint::Bills, &method, &uri, &headers, b"") {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    if let Err(resp) = faults_before(&state, &authed).await {
        return resp;
    }
    let found = query_param(&uri, "token")
        .and_then(|t| lock(&state.bill_downloads).get(t).cloned())
        .filter(|d| d.expires_at > std::time::Instant::now());
    let Some(download) = found else {
        return error(
            &state,
            &authed.signing,
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "账单下载链接不存在或已过期，请重新申请账单",
        );
    };
    if download.mch_id != authed.merchant.mch_id.as_str() {
        return error(
            &state,
            &authed.signing,
            StatusCode::FORBIDDEN,
            "NO_AUTH",
            "无权下载此账单",
        );
    }
    state.count_bill_download(&download.mch_id, download.bill_date);
    let content_type = if download.gzip {
        "application/x-gzip"
    } else {
        "text/plain;charset=utf-8"
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("Request-ID", request_id())
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(download.bytes))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A v3 `TRANSACTION.SUCCESS` notification of an order: its URL, body and signature.
pub(crate) struct Notification {
    pub url: String,
    pub body: Vec<u8>,
    pub signature: Signature,
}

/// Builds the notification of a paid order (`None`: nowhere to send it, or no v3 merchant).
pub(crate) fn notification(
    state: &SimState,
    merchant: &Merchant,
    out_trade_no: &str,
    order: &SimOrder,
) -> Option<Notification> {
    let resource = transaction_json(merchant.mch_id.as_str(), out_trade_no, order);
    let event = Event {
        event_type: "TRANSACTION.SUCCESS",
        summary: "支付成功",
        original_type: "transaction",
    };
    signed_notification(
        state,
        merchant,
        v3_notify_url(state, order)?,
        event,
        &resource,
    )
}

/// Where an order's v3 notifications go: its `notify_url`, else `{notify_base_url}/wxpay/v3/notify`.
fn v3_notify_url(state: &SimState, order: &SimOrder) -> Option<String> {
    match &order.notify_url {
        Some(u) => Some(u.clone()),
        None => {
            let base = lock(&state.notify_base_url).clone()?;
            Some(format!("{}{V3_NOTIFY_PATH}", base.trim_end_matches('/')))
        }
    }
}

/// What kind of notification an event is.
struct Event {
    event_type: &'static str,
    summary: &'static str,
    original_type: &'static str,
}

/// The decrypted resource of a refund notification (WeChat's documented shape: `refund_status`,
/// `success_time` only when SUCCESS, `amount` {total, refund, payer_total, payer_refund}).
pub(crate) fn refund_resource_json(
    mch_id: &str,
    out_refund_no: &str,
    refund: &SimRefund,
    order: &SimOrder,
) -> Value {
    let total = order.paid_fee.unwrap_or(order.total_fee);
    let mut r = json!({
        "mchid": mch_id,
        "out_trade_no": refund.out_trade_no,
        "transaction_id": order.transaction_id.clone().unwrap_or_default(),
        "out_refund_no": out_refund_no,
        "refund_id": refund.refund_id,
        "refund_status": refund.status.label(),
        "user_received_account": refund.recv_account,
        "amount": {
            "total": total,
            "refund": refund.refund_fee,
            "payer_total": total,
            "payer_refund": refund.refund_fee,
        },
    });
    if let (RefundStatus::Success, Some(t)) = (&refund.status, refund.success_time) {
        r["success_time"] = json!(format_v3_time(t));
    }
    r
}

/// Builds the notification of a finished refund: `REFUND.SUCCESS` / `REFUND.ABNORMAL` /
/// `REFUND.CLOSED`, to where the order's payment notification goes (`None`: not final, nowhere
/// to send it, or no v3 merchant).
pub(crate) fn refund_notification(
    state: &SimState,
    merchant: &Merchant,
    out_refund_no: &str,
    refund: &SimRefund,
    order: &SimOrder,
) -> Option<Notification> {
    let (event_type, summary) = match refund.status {
        RefundStatus::Success => ("REFUND.SUCCESS", "退款成功"),
        RefundStatus::Abnormal => ("REFUND.ABNORMAL", "退款异常"),
        RefundStatus::Closed => ("REFUND.CLOSED", "退款关闭"),
        RefundStatus::Processing | RefundStatus::Unknown(_) => return None,
    };
    let resource = refund_resource_json(merchant.mch_id.as_str(), out_refund_no, refund, order);
    let event = Event {
        event_type,
        summary,
        original_type: "refund",
    };
    signed_notification(
        state,
        merchant,
        v3_notify_url(state, order)?,
        event,
        &resource,
    )
}

/// The resource encrypted with the merchant's APIv3 key, the event signed with WeChat's key.
fn signed_notification(
    state: &SimState,
    merchant: &Merchant,
    url: String,
    event: Event,
    resource: &Value,
) -> Option<Notification> {
    let credentials = merchant.v3_credentials()?;
    let faults = state.faults(SimEndpoint::Notify);
    let plaintext = serde_json::to_vec(resource).ok()?;
    let nonce: String = nonce().chars().take(12).collect();
    let ciphertext = credentials
        .apiv3_key
        .encrypt(&nonce, event.original_type, &plaintext)
        .ok()?;
    let event = json!({
        "id": format!("EV-{}{:010}", Utc::now().format("%Y%m%d%H%M%S"), state.next_sequence()),
        "create_time": format_v3_time(Utc::now()),
        "resource_type": "encrypt-resource",
        "event_type": event.event_type,
        "summary": event.summary,
        "resource": {
            "original_type": event.original_type,
            "algorithm": "AEAD_AES_256_GCM",
            "ciphertext": ciphertext,
            "associated_data": event.original_type,
            "nonce": nonce,
        },
    });
    let body = if roll(faults.malformed_rate) {
        b"{\"id\":\"EV-".to_vec()
    } else {
        serde_json::to_vec(&event).ok()?
    };
    let setup = lock(&state.v3_keys)
        .get(merchant.mch_id.as_str())
        .cloned()
        .unwrap_or_else(|| state.wechat.initial_setup());
    let serial = setup.serial(None, state.wechat.public_key_id());
    let signature = sign_body(&state.wechat, serial, &faults, &body).ok()?;
    Some(Notification {
        url,
        body,
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_keys_load_and_match() {
        let w = WechatSide::test_keys().unwrap();
        let serials: Vec<&str> = w
            .certificates()
            .iter()
            .map(|c| c.cert.serial.as_str())
            .collect();
        assert_eq!(serials, ["F5765756002FDD77", "D7CE59D1F522D701"]);
        assert!(test_v3_merchant().is_ok());
        assert!(!format!("{w:?}").contains("PRIVATE"));
    }

    #[test]
    fn key_setup_changes_are_checked() {
        let w = WechatSide::test_keys().unwrap();
        let initial = w.initial_setup();
        assert_eq!(initial.mode, KeyMode::Both);
        assert_eq!(initial.sign_with, "F5765756002FDD77");
        assert_eq!(initial.serial(None, TEST_PUBLIC_KEY_ID), "F5765756002FDD77");
        assert_eq!(
            initial.serial(Some(TEST_PUBLIC_KEY_ID), TEST_PUBLIC_KEY_ID),
            TEST_PUBLIC_KEY_ID
        );
        let rotated = KeysBody {
            mode: None,
            certificates: Some(vec!["F5765756002FDD77".into(), "d7ce59d1f522d701".into()]),
            sign_with: Some("D7CE59D1F522D701".into()),
        }
        .apply(&initial, &w)
        .unwrap();
        assert_eq!(
            rotated.certificates,
            ["F5765756002FDD77", "D7CE59D1F522D701"]
        );
        assert_eq!(rotated.sign_with, "D7CE59D1F522D701");
        let pk_only = KeysBody {
            mode: Some(KeyMode::PublicKey),
            certificates: None,
            sign_with: None,
        }
        .apply(&rotated, &w)
        .unwrap();
        assert_eq!(pk_only.sign_with, TEST_PUBLIC_KEY_ID);
        assert_eq!(pk_only.serial(None, TEST_PUBLIC_KEY_ID), TEST_PUBLIC_KEY_ID);
        let bad = KeysBody {
            mode: Some(KeyMode::Certificates),
            certificates: Some(vec![]),
            sign_with: None,
        };
        assert!(bad.apply(&initial, &w).is_err());
        let unknown = KeysBody {
            mode: None,
            certificates: Some(vec!["ABCDEF".into()]),
            sign_with: None,
        };
        assert!(unknown.apply(&initial, &w).is_err());
    }

    fn fixture_key(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/wxpay-v3/keys")
            .join(name)
    }

    #[test]
    fn simulator_settings_fall_back_to_the_test_keys_and_are_checked() {
        let all_default = WechatSide::from_settings(&SimulatorSettings::default()).unwrap();
        assert_eq!(all_default.certificates().len(), 2);
        assert_eq!(all_default.public_key_id(), TEST_PUBLIC_KEY_ID);

        // A key without certificates: public-key mode only.
        let key_only = WechatSide::from_settings(&SimulatorSettings {
            wechatpay_private_key_file: Some(fixture_key("go_sdk_test_private_key.pem")),
            wechatpay_public_key_id: Some("PUB_KEY_ID_0000000000000000000000000000000001".into()),
            platform_certificate_files: vec![],
        })
        .unwrap();
        assert!(key_only.certificates().is_empty());
        assert_eq!(key_only.initial_setup().mode, KeyMode::PublicKey);
        assert_eq!(
            key_only.initial_setup().sign_with,
            "PUB_KEY_ID_0000000000000000000000000000000001"
        );

        // A certificate over another key than WeChat's is refused, naming it.
        let mismatch = WechatSide::from_settings(&SimulatorSettings {
            wechatpay_private_key_file: Some(fixture_key("java_sdk_wechat_pay_private_key.pem")),
            wechatpay_public_key_id: None,
            platform_certificate_files: vec![fixture_key("go_sdk_test_cert_F5765756002FDD77.pem")],
        })
        .unwrap_err();
        assert!(
            mismatch.to_string().contains("F5765756002FDD77"),
            "{mismatch}"
        );

        // A missing file names its path.
        let missing = WechatSide::from_settings(&SimulatorSettings {
            wechatpay_private_key_file: Some("/nonexistent/wechat.pem".into()),
            ..SimulatorSettings::default()
        })
        .unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/wechat.pem"),
            "{missing}"
        );
    }

    #[test]
    fn times_are_china_standard_time() {
        let t = DateTime::parse_from_rfc3339("2023-05-06T07:17:31Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_v3_time(t), "2023-05-06T15:17:31+08:00");
    }
}

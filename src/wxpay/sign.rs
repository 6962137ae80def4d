//! The v2 signature: every non-empty field except `sign`, ASCII-sorted by name, joined as
//! `k=v&…`, then `&key=API_KEY`; MD5 (uppercase hex) or HMAC-SHA256 keyed with the API key
//! (uppercase hex). Unknown fields are signed like known ones, and `sign_type` when present.

use std::fmt;
use std::str::FromStr;

use hmac::{KeyInit, Mac};
use md5::{Digest, Md5};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::xml::Fields;
use crate::domain::ParseError;
use crate::text::quote;

/// How WeChat Pay v2 messages are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
pub enum SignType {
    #[serde(rename = "MD5")]
    Md5,
    #[serde(rename = "HMAC-SHA256")]
    HmacSha256,
}

impl SignType {
    /// The value of the `sign_type` field.
    pub fn as_str(self) -> &'static str {
        match self {
            SignType::Md5 => "MD5",
            SignType::HmacSha256 => "HMAC-SHA256",
        }
    }
}

impl FromStr for SignType {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "MD5" => Ok(SignType::Md5),
            "HMAC-SHA256" => Ok(SignType::HmacSha256),
            other => Err(ParseError::new(
                "sign_type",
                format!("{} is neither \"MD5\" nor \"HMAC-SHA256\"", quote(other)),
            )),
        }
    }
}

impl fmt::Display for SignType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A merchant's v2 API key. It never prints: `Debug` is redacted, there is no `Display`, and the
/// only way to use it is to sign with it.
#[derive(Clone)]
pub struct ApiKey(SecretString);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([REDACTED])")
    }
}

/// Why a key was refused. Never contains the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("an API key must be 32 ASCII letters and digits; this one has {0} characters")]
    Length(usize),
    #[error("an API key must be 32 ASCII letters and digits; this one has other characters")]
    Charset,
}

impl ApiKey {
    /// Parses a key as found in a file or variable: surrounding white space (a trailing newline)
    /// is ignored; what remains must be WeChat's 32 letters and digits.
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        let key = raw.trim();
        if key.chars().count() != 32 {
            return Err(KeyError::Length(key.chars().count()));
        }
        if !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(KeyError::Charset);
        }
        Ok(ApiKey(SecretString::from(key)))
    }

    fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The key of a refund notification's `req_info` (AES-256-ECB): the lowercase hex MD5 of
    /// this key, its 32 ASCII bytes. Zeroed when dropped; never printed.
    pub(crate) fn refund_notify_key(&self) -> zeroize::Zeroizing<[u8; 32]> {
        let digest: Zeroizing<[u8; 16]> =
            Zeroizing::new(Md5::digest(self.expose().as_bytes()).into());
        let mut out = Zeroizing::new([0u8; 32]);
        // 16 bytes into 32 hex digits: cannot fail.
        let _ = hex::encode_to_slice(&digest[..], &mut out[..]);
        out
    }

    /// Whether two keys are equal (a key rotation on reload), in constant time.
    pub fn same_as(&self, other: &ApiKey) -> bool {
        use subtle::ConstantTimeEq;
        self.expose()
            .as_bytes()
            .ct_eq(other.expose().as_bytes())
            .into()
    }
}

/// Why a message's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the message has no sign field")]
    Missing,
    #[error("the message's signature does not match")]
    Invalid,
    #[error(
        "the message is signed with {}, expected {expected}",
        crate::text::quote(got)
    )]
    WrongType { expected: SignType, got: String },
}

/// The sign type a message declares in `sign_type` (MD5 when absent, as WeChat does).
pub fn declared_sign_type(fields: &Fields) -> Result<SignType, SignError> {
    match fields.get_nonempty("sign_type") {
        None => Ok(SignType::Md5),
        Some(s) => s.parse().map_err(|_| SignError::WrongType {
            expected: SignType::Md5,
            got: s.to_owned(),
        }),
    }
}

/// The signature of `fields` (its `sign` field, if any, is ignored).
pub fn sign(fields: &Fields, key: &ApiKey, sign_type: SignType) -> String {
    let mut names: Vec<(&str, &str)> = fields
        .iter()
        .filter(|(k, v)| *k != "sign" && !v.is_empty())
        .collect();
    names.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut plain = Zeroizing::new(String::with_capacity(
        names
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>()
            + 40,
    ));
    for (k, v) in names {
        plain.push_str(k);
        plain.push('=');
        plain.push_str(v);
        plain.push('&');
    }
    plain.push_str("key=");
    plain.push_str(key.expose());
    match sign_type {
        SignType::Md5 => hex::encode_upper(Md5::digest(plain.as_bytes())),
        SignType::HmacSha256 => {
            // HMAC accepts keys of any length.
            let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key.expose().as_bytes())
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            mac.update(plain.as_bytes());
            hex::encode_upper(mac.finalize().into_bytes())
        }
    }
}

/// Adds `sign` (and `sign_type` for HMAC-SHA256, so that the peer knows) to an outgoing message.
pub fn sign_in_place(fields: &mut Fields, key: &ApiKey, sign_type: SignType) {
    fields.remove("sign");
    if sign_type != SignType::Md5 {
        fields.insert("sign_type", sign_type.as_str());
    }
    let sign = sign(fields, key, sign_type);
    fields.insert("sign", sign);
}

/// Checks a message's signature in constant time. A message that declares a `sign_type` other
/// than the expected one is refused (no downgrade from HMAC-SHA256 to MD5).
pub fn verify(fields: &Fields, key: &ApiKey, sign_type: SignType) -> Result<(), SignError> {
    if let Some(declared) = fields.get_nonempty("sign_type")
        && declared != sign_type.as_str()
    {
        return Err(SignError::WrongType {
            expected: sign_type,
            got: declared.chars().take(16).collect(),
        });
    }
    let given = fields.get_nonempty("sign").ok_or(SignError::Missing)?;
    let expected = sign(fields, key, sign_type);
    let given = given.to_ascii_uppercase();
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(SignError::Invalid)
    }
}

/// The sign types a merchant accepts on a *notification*. WeChat signs a notification with the
/// sign type of its order (the `sign_type` of `unifiedorder`), which need not be the merchant's
/// setting, and often does not say which one it used. A merchant set to MD5 also accepts
/// HMAC-SHA256 (the stronger one); one set to HMAC-SHA256 never accepts MD5 (no downgrade).
pub fn notification_sign_types(configured: SignType) -> &'static [SignType] {
    match configured {
        SignType::Md5 => &[SignType::Md5, SignType::HmacSha256],
        SignType::HmacSha256 => &[SignType::HmacSha256],
    }
}

/// Checks a message signed with one of `accepted`: the one it declares in `sign_type`, or, when
/// it declares none, whichever of them matches. Every comparison is in constant time.
pub fn verify_any(
    fields: &Fields,
    key: &ApiKey,
    accepted: &[SignType],
) -> Result<SignType, SignError> {
    let first = *accepted.first().ok_or(SignError::Invalid)?;
    if let Some(declared) = fields.get_nonempty("sign_type") {
        let Some(st) = accepted.iter().find(|st| st.as_str() == declared) else {
            return Err(SignError::WrongType {
                expected: first,
                got: declared.chars().take(16).collect(),
            });
        };
        return verify(fields, key, *st).map(|()| *st);
    }
    let mut last = SignError::Invalid;
    for st in accepted {
        match verify(fields, key, *st) {
            Ok(()) => return Ok(*st),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_sign_type_is_quoted_short_and_escaped() {
        let huge = format!("\"\n{}", "\"".repeat(40_000));
        let shown = huge.parse::<SignType>().unwrap_err().to_string();
        assert!(shown.len() < 300 && !shown.contains('\n'), "{shown}");
        assert_eq!("HMAC-SHA256".parse(), Ok(SignType::HmacSha256));
    }

    #[test]
    fn notifications_accept_the_stronger_sign_type_never_the_weaker() {
        use SignType::{HmacSha256, Md5};
        let key = doc_key();
        let mut hmac = doc_fields();
        sign_in_place(&mut hmac, &key, SignType::HmacSha256);
        // Signed with HMAC-SHA256 without saying so, as a notification may be.
        let mut hmac_undeclared = doc_fields();
        let signature = sign(&hmac_undeclared, &key, SignType::HmacSha256);
        hmac_undeclared.insert("sign", signature);
        let mut md5 = doc_fields();
        sign_in_place(&mut md5, &key, SignType::Md5);
        let md5_merchant = notification_sign_types(SignType::Md5);
        let hmac_merchant = notification_sign_types(SignType::HmacSha256);
        for (case, (fields, accepted, expected)) in [
            (&hmac, md5_merchant, Ok(HmacSha256)),
            (&hmac_undeclared, md5_merchant, Ok(HmacSha256)),
            (&md5, md5_merchant, Ok(Md5)),
            (&hmac, hmac_merchant, Ok(HmacSha256)),
            (&md5, hmac_merchant, Err(SignError::Invalid)),
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(verify_any(fields, &key, accepted), expected, "case {case}");
        }
        let mut declared_md5 = md5.clone();
        declared_md5.insert("sign_type", "MD5");
        assert!(matches!(
            verify_any(&declared_md5, &key, hmac_merchant),
            Err(SignError::WrongType { .. })
        ));
        // Either way, another key is refused.
        let other = ApiKey::parse("8934e7d15453e97507ef794cf7b0519d").unwrap();
        assert!(verify_any(&hmac, &other, md5_merchant).is_err());
        assert!(verify_any(&md5, &other, md5_merchant).is_err());
    }

    fn doc_key() -> ApiKey {
        ApiKey::parse("192006250b4c09247ec02edce69f6a2d").unwrap()
    }

    fn doc_fields() -> Fields {
        Fields::new()
            .with("appid", "wxd930ea5d5a258f4f")
            .with("mch_id", "10000100")
            .with("device_info", "1000")
            .with("body", "test")
            .with("nonce_str", "ibuaiVcKdpRxkhJA")
    }

    #[test]
    fn published_vector_md5() {
        assert_eq!(
            sign(&doc_fields(), &doc_key(), SignType::Md5),
            "9A0A8659F005D6984697E2CA0A9CF3B7"
        );
    }

    #[test]
    fn published_vector_hmac_sha256() {
        assert_eq!(
            sign(&doc_fields(), &doc_key(), SignType::HmacSha256),
            "6A9AE1657590FD6257D693A078E1C3E4BB6BA4DC30B23E0EE2496E54170DACD6"
        );
    }

    #[test]
    fn order_empty_values_and_sign_do_not_matter() {
        let shuffled = Fields::new()
            .with("nonce_str", "ibuaiVcKdpRxkhJA")
            .with("sign", "ANYTHING")
            .with("body", "test")
            .with("empty", "")
            .with("device_info", "1000")
            .with("mch_id", "10000100")
            .with("appid", "wxd930ea5d5a258f4f");
        assert_eq!(
            sign(&shuffled, &doc_key(), SignType::Md5),
            "9A0A8659F005D6984697E2CA0A9CF3B7"
        );
    }

    #[test]
    fn unknown_fields_are_signed() {
        let with_extra = doc_fields().with("new_field_from_wechat", "x");
        assert_ne!(
            sign(&with_extra, &doc_key(), SignType::Md5),
            "9A0A8659F005D6984697E2CA0A9CF3B7"
        );
    }

    #[test]
    fn verify_round_trip_and_tampering() {
        for st in [SignType::Md5, SignType::HmacSha256] {
            let mut f = doc_fields();
            sign_in_place(&mut f, &doc_key(), st);
            assert_eq!(verify(&f, &doc_key(), st), Ok(()));
            let mut tampered = f.clone();
            tampered.insert("body", "tset");
            assert_eq!(verify(&tampered, &doc_key(), st), Err(SignError::Invalid));
            let other = ApiKey::parse("8934e7d15453e97507ef794cf7b0519d").unwrap();
            assert_eq!(verify(&f, &other, st), Err(SignError::Invalid));
            let mut unsigned = f.clone();
            unsigned.remove("sign");
            assert_eq!(verify(&unsigned, &doc_key(), st), Err(SignError::Missing));
        }
    }

    #[test]
    fn declared_sign_type_must_match() {
        let mut f = doc_fields();
        sign_in_place(&mut f, &doc_key(), SignType::HmacSha256);
        assert!(matches!(
            verify(&f, &doc_key(), SignType::Md5),
            Err(SignError::WrongType { .. })
        ));
    }

    #[test]
    fn key_never_prints_and_is_validated() {
        let key = doc_key();
        assert_eq!(format!("{key:?}"), "ApiKey([REDACTED])");
        assert!(ApiKey::parse("192006250b4c09247ec02edce69f6a2d\n").is_ok());
        let err = ApiKey::parse("short").unwrap_err().to_string();
        assert!(!err.contains("short"), "{err}");
        assert!(ApiKey::parse("192006250b4c09247ec02edce69f6a2!").is_err());
    }
}

//! A configured merchant: who it is (the same for every protocol), and the credentials its
//! protocol signs and verifies with.

use std::sync::Arc;

use crate::domain::{AppId, MchId};
use crate::wxpay::sign::{ApiKey, SignType};
use crate::wxpay::v3::{ApiV3Key, PrivateKey, WechatKeys};

/// One merchant, as the config, the clients and the simulator know it.
#[derive(Debug, Clone)]
pub struct Merchant {
    pub mch_id: MchId,
    pub appid: AppId,
    /// Service-provider mode: the sub-merchant the orders belong to.
    pub sub_mch_id: Option<MchId>,
    pub credentials: Credentials,
}

/// How a merchant's messages are signed. `Debug` of every key is redacted.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// WeChat Pay API v2: one API key, MD5 or HMAC-SHA256.
    V2 { sign_type: SignType, key: ApiKey },
    /// WeChat Pay API v3: RSA both ways, AES-GCM for what WeChat encrypts.
    V3(V3Credentials),
}

/// A v3 merchant's keys.
#[derive(Debug, Clone)]
pub struct V3Credentials {
    /// The merchant API private key: signs every request.
    pub private_key: PrivateKey,
    /// The serial of the merchant API certificate (the `serial_no` of `Authorization`).
    pub cert_serial_no: String,
    /// Decrypts notifications and downloaded platform certificates.
    pub apiv3_key: ApiV3Key,
    /// WeChat's keys: the public key and/or the platform certificates (shared, refreshed).
    pub wechat: Arc<WechatKeys>,
}

/// Which API a merchant speaks (the `api` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    V2,
    V3,
}

impl Api {
    pub const ALL: [Api; 2] = [Api::V2, Api::V3];

    pub fn as_str(self) -> &'static str {
        match self {
            Api::V2 => "v2",
            Api::V3 => "v3",
        }
    }
}

impl std::fmt::Display for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Merchant {
    /// A v2 merchant of its own (no sub-merchant).
    pub fn v2(mch_id: MchId, appid: AppId, sign_type: SignType, key: ApiKey) -> Merchant {
        Merchant {
            mch_id,
            appid,
            sub_mch_id: None,
            credentials: Credentials::V2 { sign_type, key },
        }
    }

    /// A v3 merchant of its own (no sub-merchant).
    pub fn v3(mch_id: MchId, appid: AppId, credentials: V3Credentials) -> Merchant {
        Merchant {
            mch_id,
            appid,
            sub_mch_id: None,
            credentials: Credentials::V3(credentials),
        }
    }

    pub fn api(&self) -> Api {
        match &self.credentials {
            Credentials::V2 { .. } => Api::V2,
            Credentials::V3(_) => Api::V3,
        }
    }

    /// The v2 key and sign type; `None` for a v3 merchant.
    pub fn v2_credentials(&self) -> Option<(&ApiKey, SignType)> {
        match &self.credentials {
            Credentials::V2 { sign_type, key } => Some((key, *sign_type)),
            Credentials::V3(_) => None,
        }
    }

    /// The v3 keys; `None` for a v2 merchant.
    pub fn v3_credentials(&self) -> Option<&V3Credentials> {
        match &self.credentials {
            Credentials::V3(c) => Some(c),
            Credentials::V2 { .. } => None,
        }
    }

    /// The v2 API key, for tests and tools that know the merchant is a v2 one.
    ///
    /// # Panics
    /// For a v3 merchant.
    #[doc(hidden)]
    pub fn v2_key(&self) -> &ApiKey {
        match self.v2_credentials() {
            Some((key, _)) => key,
            None => panic!("merchant {} is not a v2 merchant", self.mch_id),
        }
    }

    /// The v2 sign type, for tests and tools that know the merchant is a v2 one.
    ///
    /// # Panics
    /// For a v3 merchant.
    #[doc(hidden)]
    pub fn v2_sign_type(&self) -> SignType {
        match self.v2_credentials() {
            Some((_, sign_type)) => sign_type,
            None => panic!("merchant {} is not a v2 merchant", self.mch_id),
        }
    }

    /// Whether two merchants are the same (a reload that changes neither identity nor key),
    /// keys compared in constant time.
    pub fn same_as(&self, other: &Merchant) -> bool {
        let same_credentials = match (&self.credentials, &other.credentials) {
            (
                Credentials::V2 { sign_type, key },
                Credentials::V2 {
                    sign_type: other_type,
                    key: other_key,
                },
            ) => sign_type == other_type && key.same_as(other_key),
            (Credentials::V3(a), Credentials::V3(b)) => {
                a.private_key.same_as(&b.private_key)
                    && a.cert_serial_no == b.cert_serial_no
                    && a.apiv3_key.same_as(&b.apiv3_key)
                    && a.wechat.public_key() == b.wechat.public_key()
                    && a.wechat.certificate_mode() == b.wechat.certificate_mode()
            }
            _ => false,
        };
        self.mch_id == other.mch_id
            && self.appid == other.appid
            && self.sub_mch_id == other.sub_mch_id
            && same_credentials
    }

    /// How it signs, for a log line (never the key): `MD5`, `HMAC-SHA256` or
    /// `WECHATPAY2-SHA256-RSA2048`.
    pub fn signing(&self) -> &'static str {
        match &self.credentials {
            Credentials::V2 { sign_type, .. } => sign_type.as_str(),
            Credentials::V3(_) => crate::wxpay::v3::crypto::SCHEME,
        }
    }
}

//! A configured merchant: who it is (the same for every protocol), and the credentials its
//! protocol signs and verifies with.

use crate::domain::{AppId, MchId};
use crate::wxpay::sign::{ApiKey, SignType};

/// One merchant, as the config, the clients and the simulator know it.
#[derive(Debug, Clone)]
pub struct Merchant {
    pub mch_id: MchId,
    pub appid: AppId,
    /// Service-provider mode: the sub-merchant the orders belong to.
    pub sub_mch_id: Option<MchId>,
    pub credentials: Credentials,
}

/// How a merchant's messages are signed. `Debug` of the key is redacted ([`ApiKey`]).
#[derive(Debug, Clone)]
pub enum Credentials {
    /// WeChat Pay API v2: one API key, MD5 or HMAC-SHA256.
    V2 { sign_type: SignType, key: ApiKey },
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

    /// The v2 API key (every merchant is a v2 one so far).
    pub fn v2_key(&self) -> &ApiKey {
        let Credentials::V2 { key, .. } = &self.credentials;
        key
    }

    /// The v2 sign type.
    pub fn v2_sign_type(&self) -> SignType {
        let Credentials::V2 { sign_type, .. } = &self.credentials;
        *sign_type
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
        };
        self.mch_id == other.mch_id
            && self.appid == other.appid
            && self.sub_mch_id == other.sub_mch_id
            && same_credentials
    }

    /// How it signs, for a log line (never the key): `MD5` or `HMAC-SHA256`.
    pub fn signing(&self) -> &'static str {
        match &self.credentials {
            Credentials::V2 { sign_type, .. } => sign_type.as_str(),
        }
    }
}

//! WeChat Pay API v3: JSON over HTTPS, SHA256withRSA signatures both ways, AES-256-GCM for
//! notifications and downloaded certificates. Nothing outside `wxpay` signs, verifies or
//! decrypts v3 messages.

pub mod auth;
pub mod bill;
pub mod client;
pub mod crypto;
pub mod error;
pub mod keys;
pub mod model;
pub mod notify;

pub use client::V3Client;
pub use crypto::{ApiV3Key, Certificate, CryptoError, PrivateKey, PublicKey};
pub use error::V3Error;
pub use keys::{CertificateMode, WechatKeys, WechatPublicKey};

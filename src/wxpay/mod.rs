//! Everything WeChat Pay v2: the strict XML codec, signing, the orderquery/closeorder client,
//! and reading payment notifications. Nothing outside this module knows XML, signs, or speaks HTTP to WeChat.

pub mod client;
pub mod error;
pub mod notify;
pub mod sign;
pub mod xml;

pub use client::{
    ClientConfig, CloseAnswer, Merchant, OrderRef, QueryAnswer, TradeReport, WxPayClient,
};
pub use error::{ErrCode, RetryHint, WxPayError};
pub use sign::{ApiKey, SignError};
pub use xml::{Fields, XmlError};

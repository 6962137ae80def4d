//! Everything WeChat Pay v2: the strict XML codec, signing, the orderquery/closeorder client,
//! the bill download, and reading payment notifications. Nothing outside this module knows XML, signs, or speaks HTTP to WeChat.

pub mod bill;
pub mod client;
pub mod error;
pub mod notify;
pub mod refund_notify;
pub mod sign;
pub mod time;
pub mod v3;
pub mod xml;

pub use client::{ClientConfig, WxPayClient};
pub use error::{ErrCode, WxPayError};
// The neutral types this client answers in, where its callers have always found them.
pub use crate::gateway::merchant::{Credentials, Merchant};
pub use crate::gateway::report::{CloseAnswer, OrderRef, QueryAnswer, RetryHint, TradeReport};
pub use sign::{ApiKey, SignError, SignType};
pub use xml::{Fields, XmlError};

//! The protocol-neutral gateway to WeChat Pay: the core (`reconcile`, `telemetry`, `notify`)
//! speaks about payments through these types only. [`Gateway`] dispatches each call to the
//! merchant's protocol client (v2 today); the clients convert their wire results into the
//! neutral [`QueryAnswer`], [`CloseAnswer`], [`TradeReport`] and [`GatewayError`].

pub mod merchant;
pub mod report;

pub use merchant::{Api, Credentials, Merchant, V3Credentials};
pub use report::{
    CloseAnswer, Failure, GatewayError, OrderRef, QueryAnswer, RetryHint, TradeReport,
};

use crate::domain::OutTradeNo;
use crate::wxpay::client::WxPayClient;

/// The protocol clients, one per API version. Cheap to share (`Arc`) across tasks; each keeps
/// its connection pool and failover state for as long as it lives.
#[derive(Debug)]
pub enum Gateway {
    V2(WxPayClient),
}

impl Gateway {
    /// Asks WeChat about one order; a verified answer, or why there is none.
    pub async fn order_query(
        &self,
        merchant: &Merchant,
        order: &OrderRef,
    ) -> Result<QueryAnswer, GatewayError> {
        match self {
            Gateway::V2(client) => Ok(client.order_query(merchant, order).await?),
        }
    }

    /// Asks WeChat to close one order; a verified answer, or why there is none.
    pub async fn close_order(
        &self,
        merchant: &Merchant,
        out_trade_no: &OutTradeNo,
    ) -> Result<CloseAnswer, GatewayError> {
        match self {
            Gateway::V2(client) => Ok(client.close_order(merchant, out_trade_no).await?),
        }
    }
}

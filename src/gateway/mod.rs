//! The protocol-neutral gateway to WeChat Pay: the core (`reconcile`, `telemetry`, `notify`)
//! speaks about payments through these types only. [`Gateway`] dispatches each call to the
//! merchant's protocol client (v2 or v3); the clients convert their wire results into the
//! neutral [`QueryAnswer`], [`CloseAnswer`], [`TradeReport`], [`BillAnswer`] and
//! [`GatewayError`].

pub mod merchant;
pub mod report;

pub use merchant::{Api, Credentials, Merchant, V3Credentials};
pub use report::{
    BillAnswer, BillFile, CertificateRefresh, CloseAnswer, Failure, GatewayError, OrderRef,
    QueryAnswer, RefundAnswer, RefundReport, RetryHint, TradeReport,
};

use crate::domain::{OutRefundNo, OutTradeNo};
use crate::wxpay::client::{ClientConfig, WxPayClient};
use crate::wxpay::v3::V3Client;

/// The protocol clients, one per API version; each call goes to the merchant's. Cheap to share
/// (`Arc`) across tasks; each client keeps its connection pool and failover state for as long
/// as it lives.
#[derive(Debug)]
pub struct Gateway {
    v2: WxPayClient,
    v3: V3Client,
}

impl Gateway {
    /// Both clients, for one WeChat endpoint (and its backup).
    pub fn new(config: ClientConfig) -> Result<Gateway, GatewayError> {
        Ok(Gateway {
            v2: WxPayClient::new(config.clone())?,
            v3: V3Client::new(config)?,
        })
    }

    /// The v3 client (certificate downloads).
    pub fn v3(&self) -> &V3Client {
        &self.v3
    }

    /// Asks WeChat about one order; a verified answer, or why there is none.
    pub async fn order_query(
        &self,
        merchant: &Merchant,
        order: &OrderRef,
    ) -> Result<QueryAnswer, GatewayError> {
        match merchant.api() {
            Api::V2 => Ok(self.v2.order_query(merchant, order).await?),
            Api::V3 => Ok(self.v3.order_query(merchant, order).await?),
        }
    }

    /// Asks WeChat about one refund by its `out_refund_no`; a verified answer, or why there is
    /// none.
    pub async fn refund_query(
        &self,
        merchant: &Merchant,
        out_refund_no: &OutRefundNo,
    ) -> Result<RefundAnswer, GatewayError> {
        match merchant.api() {
            Api::V2 => Ok(self.v2.refund_query(merchant, out_refund_no).await?),
            Api::V3 => Ok(self.v3.refund_query(merchant, out_refund_no).await?),
        }
    }

    /// Asks WeChat to close one order; a verified answer, or why there is none.
    pub async fn close_order(
        &self,
        merchant: &Merchant,
        out_trade_no: &OutTradeNo,
    ) -> Result<CloseAnswer, GatewayError> {
        match merchant.api() {
            Api::V2 => Ok(self.v2.close_order(merchant, out_trade_no).await?),
            Api::V3 => Ok(self.v3.close_order(merchant, out_trade_no).await?),
        }
    }

    /// Downloads the merchant's trade bill (`ALL`) of the Beijing day `bill_date`: v2
    /// `pay/downloadbill`, v3 `tradebill` then its signed download (only from the configured
    /// WeChat host). The file's v3 SHA-1 is passed on, not checked: the caller checks it before
    /// reading a row. An error made permanent (v2 `invalid bill_date`, …) is not worth asking
    /// again ([`GatewayError::is_transient`]).
    pub async fn download_bill(
        &self,
        merchant: &Merchant,
        bill_date: chrono::NaiveDate,
    ) -> Result<BillAnswer, GatewayError> {
        match merchant.api() {
            Api::V2 => Ok(self.v2.download_bill(merchant, bill_date).await?),
            Api::V3 => Ok(self.v3.download_bill(merchant, bill_date).await?),
        }
    }

    /// Downloads a v3 merchant's platform certificates and keeps every valid one.
    pub async fn download_certificates(
        &self,
        merchant: &Merchant,
    ) -> Result<CertificateRefresh, GatewayError> {
        Ok(self.v3.download_certificates(merchant).await?)
    }
}

//! The task `certificates`: keeps each v3 merchant's WeChat Pay platform certificates fresh
//! (`platform_certificates = "download"`). It downloads at start-up, then every
//! [`REFRESH_EVERY`], and sooner when a message named a serial nobody knows (at most once per
//! [`MIN_INTERVAL`]); a failed download is retried with a growing pause. `RESOURCE_NOT_EXISTS`
//! (a merchant with only the public key) is said once and never asked again. It also
//! publishes the clock skew each v3 merchant's last signed message showed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::gateway::{CertificateRefresh, Gateway, Merchant};
use crate::telemetry::Telemetry;
use crate::wxpay::v3::CertificateMode;

/// How often the certificates are downloaded again (WeChat's SDKs: 12 hours or less).
pub const REFRESH_EVERY: Duration = Duration::from_secs(12 * 3600);
/// The least time between two downloads for one merchant.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);
/// The longest pause after failed downloads.
const MAX_RETRY: Duration = Duration::from_secs(600);
/// How often the clock skew gauge is published.
const SKEW_EVERY: Duration = Duration::from_secs(5);

/// Runs until `stop`: one loop per v3 merchant in download mode, and the skew gauges.
pub(super) async fn keep_fresh(
    gateway: Arc<Gateway>,
    merchants: Vec<Merchant>,
    telemetry: Telemetry,
    stop: CancellationToken,
) {
    let v3: Vec<Merchant> = merchants
        .into_iter()
        .filter(|m| m.v3_credentials().is_some())
        .collect();
    let loops = v3
        .iter()
        .map(|m| merchant_loop(&gateway, m, &telemetry, &stop));
    tokio::join!(join_all(loops), publish_skew(&v3, &telemetry, &stop));
}

async fn publish_skew(merchants: &[Merchant], telemetry: &Telemetry, stop: &CancellationToken) {
    if merchants.is_empty() {
        return stop.cancelled().await;
    }
    let mut every = tokio::time::interval(SKEW_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => return,
        }
        for m in merchants {
            if let Some(skew) = m
                .v3_credentials()
                .and_then(|c| c.wechat.last_skew_seconds())
            {
                telemetry.clock_skew(m.mch_id.as_str(), skew);
            }
        }
    }
}

/// Downloads one merchant's certificates, on schedule and on demand, until `stop`.
async fn merchant_loop(
    gateway: &Gateway,
    merchant: &Merchant,
    telemetry: &Telemetry,
    stop: &CancellationToken,
) {
    let Some(creds) = merchant.v3_credentials() else {
        return;
    };
    let keys = &creds.wechat;
    if keys.certificate_mode() == CertificateMode::Off {
        return;
    }
    let mch_id = merchant.mch_id.as_str();
    let mut next = Instant::now();
    let mut retry = Duration::from_secs(15);
    let mut last: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = keys.refresh_wanted() => {
                // An unknown serial: soon, but not more often than MIN_INTERVAL.
                if let Some(at) = last.map(|l| l + MIN_INTERVAL) && at > Instant::now() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
            _ = stop.cancelled() => return,
        }
        last = Some(Instant::now());
        let result = tokio::select! {
            r = gateway.download_certificates(merchant) => r,
            _ = stop.cancelled() => return,
        };
        match result {
            Ok(CertificateRefresh::Updated(held)) => {
                telemetry.certificates_downloaded(mch_id, &held);
                retry = Duration::from_secs(15);
                next = Instant::now() + REFRESH_EVERY;
            }
            Ok(CertificateRefresh::PublicKeyOnly) => {
                telemetry.certificates_public_key_only(mch_id, keys.public_key().is_some());
                return;
            }
            Err(error) => {
                telemetry.certificates_failed(mch_id, &error);
                next = Instant::now() + retry;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

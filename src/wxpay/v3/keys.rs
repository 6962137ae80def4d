//! WeChat's keys of one v3 merchant: the "WeChat Pay public key" (public-key mode, under its
//! `PUB_KEY_ID_…`) and/or the platform certificates, each by serial. During a rotation WeChat
//! signs with the old and the new certificate, so every certificate still valid is kept.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};

use super::crypto::{Certificate, PublicKey};

/// The public key of public-key mode, under its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WechatPublicKey {
    /// `PUB_KEY_ID_…`: what `Wechatpay-Serial` names, and what we send as `Wechatpay-Serial`.
    pub id: String,
    pub key: PublicKey,
}

/// Whether the platform certificates are downloaded (`GET /v3/certificates`) and kept fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertificateMode {
    Download,
    Off,
}

/// WeChat's keys of one merchant. Shared (`Arc`) by the client, which refreshes the
/// certificates, and the notification endpoint, which reads them.
#[derive(Debug)]
pub struct WechatKeys {
    public_key: Option<WechatPublicKey>,
    certificates: CertificateMode,
    by_serial: RwLock<BTreeMap<String, Certificate>>,
    /// The skew of the last verified message (seconds, positive: WeChat's clock ahead).
    skew_seconds: AtomicI64,
    skew_seen: AtomicBool,
    /// Set when a message named a serial we do not know: the certificates job refreshes.
    refresh_wanted: tokio::sync::Notify,
    /// How many refreshes were asked for (the waiter takes the wake-up; this stays).
    refresh_requests: AtomicU64,
}

impl WechatKeys {
    pub fn new(public_key: Option<WechatPublicKey>, certificates: CertificateMode) -> Arc<Self> {
        Arc::new(WechatKeys {
            public_key,
            certificates,
            by_serial: RwLock::new(BTreeMap::new()),
            skew_seconds: AtomicI64::new(0),
            skew_seen: AtomicBool::new(false),
            refresh_wanted: tokio::sync::Notify::new(),
            refresh_requests: AtomicU64::new(0),
        })
    }

    pub fn public_key(&self) -> Option<&WechatPublicKey> {
        self.public_key.as_ref()
    }

    pub fn certificate_mode(&self) -> CertificateMode {
        self.certificates
    }

    /// The key that `serial` names: the public key under its id, or a platform certificate
    /// valid at `now`.
    pub fn key_for(&self, serial: &str, now: DateTime<Utc>) -> Option<PublicKey> {
        if let Some(pk) = &self.public_key
            && pk.id == serial
        {
            return Some(pk.key.clone());
        }
        let certs = self.by_serial.read().unwrap_or_else(|e| e.into_inner());
        certs
            .get(serial)
            .filter(|c| c.is_valid_at(now))
            .map(|c| c.key.clone())
    }

    /// Whether a key of this serial is known (valid or not).
    pub fn knows(&self, serial: &str) -> bool {
        self.public_key.as_ref().is_some_and(|pk| pk.id == serial)
            || self
                .by_serial
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(serial)
    }

    /// Keeps the certificates of `fresh` that are valid at `now` (by serial), and drops the
    /// ones that expired. A certificate no longer listed but still valid is kept: WeChat
    /// may still sign with it until it expires.
    pub fn add_certificates(&self, fresh: Vec<Certificate>, now: DateTime<Utc>) {
        let mut certs = self.by_serial.write().unwrap_or_else(|e| e.into_inner());
        for c in fresh {
            if c.is_valid_at(now) {
                certs.insert(c.serial.clone(), c);
            }
        }
        certs.retain(|_, c| c.not_after >= now);
    }

    /// The certificates held now, by serial.
    pub fn certificates(&self) -> Vec<Certificate> {
        self.by_serial
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Whether any platform certificate is held.
    pub fn has_certificates(&self) -> bool {
        !self
            .by_serial
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Whether any key can verify anything yet.
    pub fn has_any(&self) -> bool {
        self.public_key.is_some()
            || !self
                .by_serial
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
    }

    /// Records the clock skew a correctly signed message showed.
    pub fn observe_skew(&self, skew_seconds: i64) {
        self.skew_seconds.store(skew_seconds, Ordering::Relaxed);
        self.skew_seen.store(true, Ordering::Relaxed);
    }

    /// The skew of the last correctly signed message, if any came.
    pub fn last_skew_seconds(&self) -> Option<i64> {
        self.skew_seen
            .load(Ordering::Relaxed)
            .then(|| self.skew_seconds.load(Ordering::Relaxed))
    }

    /// Asks the certificates job for a refresh (a message named an unknown serial). Only in
    /// download mode; the job rate-limits.
    pub fn want_refresh(&self) {
        if self.certificates == CertificateMode::Download {
            self.refresh_requests.fetch_add(1, Ordering::Relaxed);
            self.refresh_wanted.notify_one();
        }
    }

    /// How many refreshes were asked for so far.
    pub fn refresh_requests(&self) -> u64 {
        self.refresh_requests.load(Ordering::Relaxed)
    }

    /// Resolves when a refresh was asked for.
    pub async fn refresh_wanted(&self) {
        self.refresh_wanted.notified().await;
    }
}

//! SIGHUP: the configuration read again and applied to the running daemon, as far as it can be.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;

use super::DaemonError;
use super::jobs::Jobs;
use crate::config::{self, Settings};
use crate::gateway::Merchant;
use crate::telemetry::Telemetry;

/// Applies a new configuration to a running daemon (SIGHUP). What can change safely changes at
/// once: `[log] level`, every `[schedule]` and `[refunds]` key, `[bills] cron`, `wechat.max_qps` and `wechat.concurrency` (a new
/// scanner on the same WeChat Pay client, whose failover state stays). The rest (database,
/// merchants and keys, listen addresses, other `[wechat]` and `[metrics]` keys) needs a
/// restart: it is kept as it was, and the sections are named in a warning.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<ReloadState>,
}

struct ReloadState {
    running: tokio::sync::Mutex<Running>,
    telemetry: Telemetry,
}

/// The settings in force and the jobs they configure.
struct Running {
    settings: Settings,
    jobs: Jobs,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    pub(super) fn new(settings: Settings, jobs: Jobs, telemetry: Telemetry) -> Reloader {
        Reloader {
            inner: Arc::new(ReloadState {
                running: tokio::sync::Mutex::new(Running { settings, jobs }),
                telemetry,
            }),
        }
    }

    /// Reloads `path` at each SIGHUP (`systemctl reload`) until `stop` fires. The binary spawns
    /// it; `hangups` is installed before the daemon starts, so an early SIGHUP is not fatal.
    pub async fn watch_hangups(self, mut hangups: Signal, path: PathBuf, stop: CancellationToken) {
        loop {
            tokio::select! {
                hup = hangups.recv() => if hup.is_none() { break },
                _ = stop.cancelled() => break,
            }
            tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
            self.reload_file(&path).await;
        }
    }

    /// Reads `path` again and applies it; a file that does not load, or settings that cannot
    /// be applied, are a rejected reload (counted and logged; the running settings stay).
    pub async fn reload_file(&self, path: &Path) {
        let reloaded = match config::load(path) {
            Ok(new) => self.reload(&new).await.map(drop).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(error) = reloaded {
            self.rejected(&error);
        }
    }

    /// Applies `new` (already loaded and validated). Returns the sections that changed but need
    /// a restart; counts a success in `config_reloads_total` (a failure is the caller's to
    /// report with [`Reloader::rejected`]).
    pub async fn reload(&self, new: &Settings) -> Result<Vec<&'static str>, DaemonError> {
        let result = self.apply(new).await;
        if result.is_ok() {
            self.inner.telemetry.config_reload(Ok(()));
        }
        result
    }

    /// A reload that could not even be attempted (the file is invalid): counted, logged, and
    /// the running settings stay.
    pub fn rejected(&self, error: &str) {
        self.inner.telemetry.config_reload(Err(error));
    }

    async fn apply(&self, new: &Settings) -> Result<Vec<&'static str>, DaemonError> {
        let mut running = self.inner.running.lock().await;
        let restart = needs_restart(&running.settings, new);
        let next = reloaded(&running.settings, new);
        crate::telemetry::set_log_level(&next.log.level).map_err(DaemonError::Scheduler)?;
        running.jobs.reconfigure(&next).await?;
        if !restart.is_empty() {
            tracing::warn!(
                sections = %restart.join(", "),
                "changed settings need a restart to take effect; keeping the running ones"
            );
        }
        tracing::info!(
            scan_cron = %next.schedule.scan_cron,
            max_qps = next.wechat.max_qps,
            concurrency = next.wechat.concurrency,
            log_level = %next.log.level,
            "configuration reloaded"
        );
        running.settings = next;
        Ok(restart)
    }
}

/// The running settings `old` with the parts of `new` a reload applies.
fn reloaded(old: &Settings, new: &Settings) -> Settings {
    let mut next = old.clone();
    next.schedule = new.schedule.clone();
    next.refunds = new.refunds.clone();
    // The bills' cron is rescheduled; their other keys are the bill runner's, built at start.
    next.bills.cron = new.bills.cron.clone();
    next.wechat.max_qps = new.wechat.max_qps;
    next.wechat.concurrency = new.wechat.concurrency;
    next.log = new.log.clone();
    next
}

/// The sections of `new` that differ from `old` in keys a reload does not apply: those in which
/// the settings after the reload still differ from `new`.
fn needs_restart(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let next = reloaded(old, new);
    let mut changed = Vec::new();
    if !next.database.url.same_as(&new.database.url)
        || next.database.max_connections != new.database.max_connections
    {
        changed.push("database");
    }
    if next.wechat != new.wechat {
        changed.push("wechat");
    }
    if !same_merchants(&next.merchants, &new.merchants) {
        changed.push("merchants");
    }
    if next.bills != new.bills {
        changed.push("bills");
    }
    if next.metrics != new.metrics {
        changed.push("metrics");
    }
    if next.notify != new.notify {
        changed.push("notify");
    }
    changed
}

/// The same merchants in the same order, keys compared in constant time.
fn same_merchants(old: &[Merchant], new: &[Merchant]) -> bool {
    old.len() == new.len() && old.iter().zip(new).all(|(a, b)| a.same_as(b))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use super::needs_restart;
    use crate::config::Settings;
    use crate::daemon::{Daemon, open_store};
    use crate::gateway::Merchant;
    use crate::wxpay::ApiKey;

    fn settings(dir: &std::path::Path) -> Settings {
        let mut s = crate::demo::demo_settings(
            dir.join("reload.db"),
            // Nothing listens there; the scans do not run in these tests anyway.
            "http://127.0.0.1:9".into(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        );
        s.schedule.scan_cron = "0 0 0 1 1 *".into();
        s
    }

    #[test]
    fn reloadable_keys_need_no_restart_and_the_rest_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let old = settings(dir.path());
        let mut new = old.clone();
        new.wechat.max_qps += 1;
        new.wechat.concurrency += 1;
        new.schedule.scan_cron = "*/2 * * * * *".into();
        new.schedule.lease_seconds += 1;
        new.refunds.horizon_days += 1;
        new.bills.cron = "0 0 11 * * *".into();
        new.log.level = "debug".into();
        assert!(needs_restart(&old, &new).is_empty());
        assert_eq!(super::reloaded(&old, &new).bills.cron, "0 0 11 * * *");

        new.wechat.timeout_ms += 1;
        new.metrics.refresh_seconds += 1;
        new.notify.max_connections += 1;
        new.database.max_connections += 1;
        new.bills.catch_up_days += 1;
        let m = &new.merchants[0];
        new.merchants[0] = Merchant::v2(
            m.mch_id.clone(),
            m.appid.clone(),
            m.v2_sign_type(),
            ApiKey::parse("0123456789abcdefghijABCDEFGHIJ01").unwrap(),
        );
        assert_eq!(
            needs_restart(&old, &new),
            [
                "database",
                "wechat",
                "merchants",
                "bills",
                "metrics",
                "notify"
            ]
        );
    }

    #[tokio::test]
    async fn a_reload_keeps_the_wechat_client_and_replaces_the_scanner() {
        let dir = tempfile::tempdir().unwrap();
        let old = settings(dir.path());
        open_store(&old, true)
            .await
            .unwrap()
            .migrate()
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let daemon = Daemon::start(&old, stop.clone()).await.unwrap();
        let (client, scanner) = {
            let running = daemon.reloader.inner.running.lock().await;
            (running.jobs.client().clone(), running.jobs.scanner())
        };
        assert!(
            format!("{scanner:?}").contains("max_qps: 5000"),
            "{scanner:?}"
        );

        let mut new = old.clone();
        new.wechat.max_qps = 7;
        new.wechat.concurrency = 3;
        new.schedule.scan_cron = "0 0 0 2 1 *".into();
        assert!(daemon.reloader.reload(&new).await.unwrap().is_empty());
        {
            let running = daemon.reloader.inner.running.lock().await;
            assert!(Arc::ptr_eq(running.jobs.client(), &client));
            let scanner = running.jobs.scanner();
            let shown = format!("{scanner:?}");
            assert!(
                shown.contains("max_qps: 7") && shown.contains("concurrency: 3"),
                "{shown}"
            );
        }
        stop.cancel();
        daemon.wait().await.unwrap();
    }

    /// A v3 merchant from the published test keys, with `apiv3_key` and WeChat's public key
    /// under `public_key_id`.
    fn v3_merchant(apiv3_key: &[u8], public_key_id: &str) -> Merchant {
        use crate::wxpay::v3::{
            ApiV3Key, CertificateMode, PrivateKey, PublicKey, WechatKeys, WechatPublicKey,
        };
        let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wxpay-v3/keys/");
        let read = |f: &str| std::fs::read(format!("{keys}{f}")).unwrap();
        let public_key = WechatPublicKey {
            id: public_key_id.into(),
            key: PublicKey::from_pem(&read("go_sdk_test_public_key.pem")).unwrap(),
        };
        Merchant::v3(
            "1900000100".parse().unwrap(),
            "wxd678efh567hg6787".parse().unwrap(),
            crate::gateway::V3Credentials {
                private_key: PrivateKey::from_pem(&read("java_sdk_merchant_private_key.pem"))
                    .unwrap(),
                cert_serial_no: "5F1C72E2A8931B72A2E13AF8DEE92471EB397115".into(),
                apiv3_key: ApiV3Key::new(apiv3_key).unwrap(),
                wechat: WechatKeys::new(Some(public_key), CertificateMode::Off),
            },
        )
    }

    #[tokio::test]
    async fn a_changed_v3_key_is_a_merchants_change() {
        const ID: &str = "PUB_KEY_ID_0000000000000024101100397200000006";
        let dir = tempfile::tempdir().unwrap();
        let mut old = settings(dir.path());
        old.merchants
            .push(v3_merchant(b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb", ID));
        open_store(&old, true)
            .await
            .unwrap()
            .migrate()
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let daemon = Daemon::start(&old, stop.clone()).await.unwrap();

        // The same keys (read again: other Arcs) are no change.
        let mut same = old.clone();
        *same.merchants.last_mut().unwrap() = v3_merchant(b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb", ID);
        same.schedule.scan_cron = "0 0 0 2 1 *".into();
        assert!(daemon.reloader.reload(&same).await.unwrap().is_empty());

        let mut new = old.clone();
        *new.merchants.last_mut().unwrap() = v3_merchant(b"0123456789abcdefghijABCDEFGHIJ01", ID);
        assert_eq!(daemon.reloader.reload(&new).await.unwrap(), ["merchants"]);
        let mut new = old.clone();
        *new.merchants.last_mut().unwrap() =
            v3_merchant(b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb", "PUB_KEY_ID_0001");
        assert_eq!(needs_restart(&old, &new), ["merchants"]);
        stop.cancel();
        daemon.wait().await.unwrap();
    }
}

//! Configuration: a TOML file, then `WXPAY_RECONCILER__SECTION__KEY` environment overrides,
//! parsed into typed settings and validated before anything starts. Every error names where the
//! bad value came from (the file or the variable) and the key.
//!
//! Secrets are never in the file: each merchant's API key is read from `api_key_file` (relative
//! paths are relative to the config file), from the systemd credential named by
//! `api_key_credential` (`$CREDENTIALS_DIRECTORY/NAME`, see `LoadCredential=`), or from the
//! variable named by `api_key_env`. A v3 merchant (`api = "v3"`) has two secrets read the same
//! way: `private_key_*` (the merchant API private key, PEM) and `apiv3_key_*` (32 bytes), and
//! WeChat's keys: the public key (`wechatpay_public_key_file` + `_id`) and/or downloaded
//! platform certificates (`platform_certificates`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use zeroize::Zeroizing;

use crate::domain::{AppId, MchId};
use crate::gateway::{Api, Credentials, Merchant, V3Credentials};
use crate::store::DatabaseUrl;
use crate::wxpay::v3::{
    ApiV3Key, CertificateMode, PrivateKey, PublicKey, WechatKeys, WechatPublicKey,
};
use crate::wxpay::{ApiKey, ClientConfig, SignType};

/// Where the config file is looked for when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/wxpay-reconciler/config.toml";
/// Names the config file, when `--config` is not given.
pub const PATH_ENV: &str = "WXPAY_RECONCILER_CONFIG";
/// Prefix of the per-key overrides (`WXPAY_RECONCILER__WECHAT__TIMEOUT_MS=3000`).
pub const ENV_PREFIX: &str = "WXPAY_RECONCILER__";

/// A configuration error, naming the origin (file or variable) and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0}: not found")]
    NotFound(PathBuf),
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{origin}: key `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file the settings came from.
    pub path: PathBuf,
    pub database: DatabaseSettings,
    pub wechat: WechatSettings,
    pub merchants: Vec<Merchant>,
    pub schedule: ScheduleSettings,
    pub refunds: RefundSettings,
    pub bills: BillSettings,
    pub metrics: MetricsSettings,
    pub notify: NotifySettings,
    pub log: LogSettings,
    /// `[simulator]`: read by `simulate --config` only.
    pub simulator: SimulatorSettings,
}

/// `[simulator]`: WeChat's side of the v3 merchants, for `simulate --config` (the daemon never
/// reads it). Paths are relative to the config file. Without it the simulator signs with the
/// published wechatpay-go test key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorSettings {
    /// WeChat's private key (PEM, RSA-2048): signs answers, notifications and certificates.
    pub wechatpay_private_key_file: Option<PathBuf>,
    /// The id the public-key mode names that key by (`PUB_KEY_ID_…`).
    pub wechatpay_public_key_id: Option<String>,
    /// Platform certificates over WeChat's key (PEM), served by `GET /v3/certificates`.
    pub platform_certificate_files: Vec<PathBuf>,
}

/// `[notify]`: WeChat's payment notifications, received directly (off unless `listen` is set).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifySettings {
    /// Serves `POST /wxpay/v2/notify` and `/wxpay/v3/notify[/{mch_id}]` (behind the merchant's HTTPS reverse proxy).
    pub listen: Option<SocketAddr>,
    /// Connections open at once; beyond it the oldest not in a request is closed.
    pub max_connections: u32,
    /// A request's headers (and a keep-alive connection's next request) must arrive within it.
    pub header_timeout_seconds: u64,
}

impl Default for NotifySettings {
    fn default() -> Self {
        NotifySettings {
            listen: None,
            max_connections: 256,
            header_timeout_seconds: 10,
        }
    }
}

impl NotifySettings {
    pub fn limits(&self) -> crate::listener::Limits {
        listener_limits(self.max_connections, self.header_timeout_seconds)
    }
}

impl MetricsSettings {
    pub fn limits(&self) -> crate::listener::Limits {
        listener_limits(self.max_connections, self.header_timeout_seconds)
    }
}

fn listener_limits(max_connections: u32, header_timeout_seconds: u64) -> crate::listener::Limits {
    crate::listener::Limits {
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        header_timeout: Duration::from_secs(header_timeout_seconds),
    }
}

/// The range of `max_connections` of a listener (well below systemd's `LimitNOFILE=65536`).
const MAX_CONNECTIONS: std::ops::RangeInclusive<u32> = 1..=10_000;
/// The range of `header_timeout_seconds` of a listener.
const HEADER_TIMEOUT_SECONDS: std::ops::RangeInclusive<u64> = 1..=300;

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A tracing filter (`info`, `warn,wxpay_reconciler=debug`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
        }
    }
}

/// `[database]`.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    /// `sqlite:///path`, `postgres://…` or `mysql://…`; its password never prints.
    pub url: DatabaseUrl,
    pub max_connections: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDatabase {
    url: String,
    max_connections: u32,
}

impl Default for RawDatabase {
    fn default() -> Self {
        RawDatabase {
            url: DEFAULT_DATABASE_URL.into(),
            max_connections: 8,
        }
    }
}

/// The database of a systemd service with `StateDirectory=wxpay-reconciler`.
pub const DEFAULT_DATABASE_URL: &str = "sqlite:///var/lib/wxpay-reconciler/orders.db";

/// `[schedule]`: when to scan and how orders are leased and polled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSettings {
    /// Six fields, seconds first (`*/5 * * * * *`).
    pub scan_cron: String,
    /// First query this long after the order's creation.
    pub grace_seconds: u64,
    /// Orders claimed per database round trip.
    pub batch_size: u32,
    /// How long a claim is exclusive; a crashed instance's claims return after it.
    pub lease_seconds: u64,
    /// Stop polling an order this long after its creation.
    pub give_up_after_hours: u64,
    /// Close expired open orders at WeChat (closeorder), then mark them CLOSED.
    pub close_expired: bool,
    /// When an order without `expires_at` expires, after its creation (the prepay lifetime).
    pub default_expiry_minutes: u64,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        ScheduleSettings {
            scan_cron: "*/5 * * * * *".into(),
            grace_seconds: 15,
            batch_size: 200,
            lease_seconds: 60,
            give_up_after_hours: 24,
            close_expired: true,
            default_expiry_minutes: 120,
        }
    }
}

/// `[refunds]`: how refunds in `PROCESSING` are polled (in the same scan as orders, under the
/// same QPS budget and leases).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefundSettings {
    /// Poll refunds at all (the merchant registers them in `wxpay_refunds`).
    pub enabled: bool,
    /// The first query this long after the refund's registration.
    pub first_query_seconds: u64,
    /// Stop polling a refund this long after its registration (then it is alerted on).
    pub horizon_days: u64,
    /// WeChat not knowing a refund makes it `NOT_FOUND` only this long after its registration
    /// (the merchant may register a refund before it calls WeChat).
    pub not_found_after_minutes: u64,
}

impl Default for RefundSettings {
    fn default() -> Self {
        RefundSettings {
            enabled: true,
            first_query_seconds: 60,
            horizon_days: 15,
            not_found_after_minutes: 60,
        }
    }
}

/// `[bills]`: the T+1 daily trade bill, fetched and compared with the shop's tables.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillSettings {
    /// Fetch and reconcile each merchant's daily bill (off unless turned on).
    pub enabled: bool,
    /// When the daily run starts: six fields, seconds first, in Beijing time (Asia/Shanghai;
    /// China keeps no daylight saving time). WeChat makes the bill of day D from about 10:00 on
    /// D+1. The daemon also runs once at start, to catch up after downtime.
    pub cron: String,
    /// How many days back a run looks for bills not yet reconciled (WeChat keeps bills three
    /// months).
    pub catch_up_days: u32,
    /// A bill WeChat is still making (`Bill Creating`), or a fetch that failed, is asked again
    /// after this long.
    pub retry_minutes: u64,
    /// One instance holds a bill day this long, renewed while it works.
    pub lease_seconds: u64,
}

impl Default for BillSettings {
    fn default() -> Self {
        BillSettings {
            enabled: false,
            cron: "0 30 10 * * *".into(),
            catch_up_days: 3,
            retry_minutes: 30,
            lease_seconds: 300,
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Serves `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// An open order older than this counts as stuck.
    pub stuck_after_seconds: u64,
    /// How often the stuck-order gauges are refreshed.
    pub refresh_seconds: u64,
    /// `/readyz` fails when no scan completed for this long.
    pub ready_max_scan_age_seconds: u64,
    /// Connections open at once; beyond it the oldest not in a request is closed.
    pub max_connections: u32,
    /// A request's headers (and a keep-alive connection's next request) must arrive within it.
    pub header_timeout_seconds: u64,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 9187)),
            stuck_after_seconds: 300,
            refresh_seconds: 15,
            ready_max_scan_age_seconds: 120,
            max_connections: 64,
            header_timeout_seconds: 10,
        }
    }
}

/// `[wechat]`: how to reach WeChat Pay.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WechatSettings {
    pub base_url: String,
    pub backup_base_url: Option<String>,
    pub timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Query rate across all merchants of this instance.
    pub max_qps: u32,
    /// Queries in flight at once.
    pub concurrency: u32,
    /// Consecutive connect failures on `base_url` that switch to `backup_base_url`.
    pub failover_after_failures: u32,
    /// How long to stay on the backup before trying `base_url` again.
    pub failback_after_seconds: u64,
}

impl Default for WechatSettings {
    fn default() -> Self {
        WechatSettings {
            base_url: "https://api.mch.weixin.qq.com".into(),
            backup_base_url: Some("https://api2.mch.weixin.qq.com".into()),
            timeout_ms: 5000,
            connect_timeout_ms: 2000,
            max_qps: 50,
            concurrency: 16,
            failover_after_failures: 3,
            failback_after_seconds: 180,
        }
    }
}

impl WechatSettings {
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            base_url: self.base_url.clone(),
            backup_base_url: self.backup_base_url.clone(),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            timeout: Duration::from_millis(self.timeout_ms),
            failover_after: self.failover_after_failures,
            failback_after: Duration::from_secs(self.failback_after_seconds),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    wechat: WechatSettings,
    #[serde(default)]
    merchants: Vec<RawMerchant>,
    #[serde(default)]
    schedule: ScheduleSettings,
    #[serde(default)]
    refunds: RefundSettings,
    #[serde(default)]
    bills: BillSettings,
    #[serde(default)]
    metrics: MetricsSettings,
    #[serde(default)]
    notify: NotifySettings,
    #[serde(default)]
    log: LogSettings,
    #[serde(default)]
    simulator: SimulatorSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMerchant {
    mch_id: MchId,
    appid: AppId,
    #[serde(default)]
    sub_mch_id: Option<MchId>,
    /// `"v2"` (the default) or `"v3"`.
    #[serde(default)]
    api: Option<Api>,
    // v2: the sign type (default MD5) and the API key.
    #[serde(default)]
    sign_type: Option<SignType>,
    #[serde(default)]
    api_key_file: Option<PathBuf>,
    #[serde(default)]
    api_key_env: Option<String>,
    #[serde(default)]
    api_key_credential: Option<String>,
    // v3: the merchant API private key and its certificate's serial, the APIv3 key, and
    // WeChat's keys.
    #[serde(default)]
    private_key_file: Option<PathBuf>,
    #[serde(default)]
    private_key_env: Option<String>,
    #[serde(default)]
    private_key_credential: Option<String>,
    #[serde(default)]
    cert_serial_no: Option<String>,
    #[serde(default)]
    apiv3_key_file: Option<PathBuf>,
    #[serde(default)]
    apiv3_key_env: Option<String>,
    #[serde(default)]
    apiv3_key_credential: Option<String>,
    #[serde(default)]
    wechatpay_public_key_file: Option<PathBuf>,
    #[serde(default)]
    wechatpay_public_key_id: Option<String>,
    #[serde(default)]
    platform_certificates: Option<CertificateMode>,
}

impl RawMerchant {
    /// Where the v2 API key is read from.
    fn api_key(&self) -> SecretSource<'_> {
        SecretSource {
            prefix: "api_key",
            file: self.api_key_file.as_deref(),
            env: self.api_key_env.as_deref(),
            credential: self.api_key_credential.as_deref(),
        }
    }

    /// Where the v3 merchant API private key is read from.
    fn private_key(&self) -> SecretSource<'_> {
        SecretSource {
            prefix: "private_key",
            file: self.private_key_file.as_deref(),
            env: self.private_key_env.as_deref(),
            credential: self.private_key_credential.as_deref(),
        }
    }

    /// Where the APIv3 key is read from.
    fn apiv3_key(&self) -> SecretSource<'_> {
        SecretSource {
            prefix: "apiv3_key",
            file: self.apiv3_key_file.as_deref(),
            env: self.apiv3_key_env.as_deref(),
            credential: self.apiv3_key_credential.as_deref(),
        }
    }

    /// The v2-only keys that are set.
    fn v2_keys_set(&self) -> Vec<&'static str> {
        [
            ("sign_type", self.sign_type.is_some()),
            ("api_key_file", self.api_key_file.is_some()),
            ("api_key_env", self.api_key_env.is_some()),
            ("api_key_credential", self.api_key_credential.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }

    /// The v3-only keys that are set.
    fn v3_keys_set(&self) -> Vec<&'static str> {
        [
            ("private_key_file", self.private_key_file.is_some()),
            ("private_key_env", self.private_key_env.is_some()),
            (
                "private_key_credential",
                self.private_key_credential.is_some(),
            ),
            ("cert_serial_no", self.cert_serial_no.is_some()),
            ("apiv3_key_file", self.apiv3_key_file.is_some()),
            ("apiv3_key_env", self.apiv3_key_env.is_some()),
            ("apiv3_key_credential", self.apiv3_key_credential.is_some()),
            (
                "wechatpay_public_key_file",
                self.wechatpay_public_key_file.is_some(),
            ),
            (
                "wechatpay_public_key_id",
                self.wechatpay_public_key_id.is_some(),
            ),
            (
                "platform_certificates",
                self.platform_certificates.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }
}

/// Which file to read: `--config`, else `$WXPAY_RECONCILER_CONFIG`, else [`DEFAULT_PATH`].
pub fn resolve_path(cli: Option<&Path>) -> PathBuf {
    match cli {
        Some(p) => p.to_owned(),
        None => std::env::var_os(PATH_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH)),
    }
}

/// Loads and validates the settings from `path` and the environment.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    load_with(path, &|name| std::env::var_os(name))
}

/// [`load`], with the merchants' secrets' variables (`*_env`, `$CREDENTIALS_DIRECTORY`) read
/// through `var` (the tests' environment, without touching the process's).
fn load_with(path: &Path, var: &EnvLookup<'_>) -> Result<Settings, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::NotFound(path.to_owned()));
    }
    check_syntax(path)?;
    let figment =
        Figment::from(Toml::file_exact(path)).merge(Env::prefixed(ENV_PREFIX).split("__"));
    let raw: RawSettings = figment.extract().map_err(|e| from_figment(path, e))?;
    let origins = Origins {
        figment: &figment,
        path,
    };
    check_wechat(&raw.wechat, &origins)?;
    let url = check_database(&raw.database, &origins)?;
    check_schedule(&raw.schedule, &raw.wechat, &origins)?;
    check_refunds(&raw.refunds, &origins)?;
    check_bills(&raw.bills, &origins)?;
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
        return Err(origins.invalid("log.level", format!("{:?}: {e}", raw.log.level)));
    }
    check_listeners(&raw.metrics, &raw.notify, &origins)?;
    let merchants = load_merchants(raw.merchants, &origins, var)?;
    Ok(Settings {
        path: path.to_owned(),
        database: DatabaseSettings {
            url,
            max_connections: raw.database.max_connections,
        },
        wechat: raw.wechat,
        merchants,
        schedule: raw.schedule,
        refunds: raw.refunds,
        bills: raw.bills,
        metrics: raw.metrics,
        notify: raw.notify,
        log: raw.log,
        simulator: resolve_simulator(raw.simulator, path),
    })
}

/// The simulator's paths, relative to the config file's folder.
fn resolve_simulator(mut s: SimulatorSettings, path: &Path) -> SimulatorSettings {
    let base = path.parent().unwrap_or(Path::new("."));
    if let Some(p) = &mut s.wechatpay_private_key_file {
        *p = base.join(&*p);
    }
    for p in &mut s.platform_certificate_files {
        *p = base.join(&*p);
    }
    s
}

/// Where the values of one load came from: the errors name the file or the variable.
struct Origins<'a> {
    figment: &'a Figment,
    path: &'a Path,
}

impl Origins<'_> {
    /// The error for a bad value of `key`, naming where it was set.
    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: origin_of(self.figment, self.path, key),
            key: key.to_owned(),
            message,
        }
    }

    /// `Ok` when `value` of `key` is within `range`, else "must be START to END".
    fn within<T: PartialOrd + std::fmt::Display>(
        &self,
        key: &str,
        value: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<(), ConfigError> {
        if range.contains(&value) {
            return Ok(());
        }
        let message = format!("must be {} to {}", range.start(), range.end());
        Err(self.invalid(key, message))
    }

    /// `Ok` when `value` of `key` is not zero, else "must be at least 1".
    fn at_least_one(&self, key: &str, value: impl Into<u64>) -> Result<(), ConfigError> {
        if value.into() == 0 {
            return Err(self.invalid(key, "must be at least 1".into()));
        }
        Ok(())
    }
}

/// `[wechat]`: URLs, timeouts, rate and concurrency.
fn check_wechat(w: &WechatSettings, o: &Origins<'_>) -> Result<(), ConfigError> {
    check_url(&w.base_url).map_err(|m| o.invalid("wechat.base_url", m))?;
    if let Some(b) = &w.backup_base_url {
        check_url(b).map_err(|m| o.invalid("wechat.backup_base_url", m))?;
    }
    o.within("wechat.timeout_ms", w.timeout_ms, 1..=120_000)?;
    if w.connect_timeout_ms == 0 || w.connect_timeout_ms > w.timeout_ms {
        return Err(o.invalid(
            "wechat.connect_timeout_ms",
            format!("must be 1 to timeout_ms ({})", w.timeout_ms),
        ));
    }
    o.at_least_one("wechat.max_qps", w.max_qps)?;
    o.within("wechat.concurrency", w.concurrency, 1..=1024)?;
    o.at_least_one("wechat.failover_after_failures", w.failover_after_failures)?;
    Ok(())
}

/// `[database]`: the URL, checked by its driver's parser, and the pool size.
fn check_database(db: &RawDatabase, o: &Origins<'_>) -> Result<DatabaseUrl, ConfigError> {
    let url = DatabaseUrl::new(&db.url);
    url.check()
        .map_err(|e| o.invalid("database.url", e.to_string()))?;
    o.within("database.max_connections", db.max_connections, 1..=1000)?;
    Ok(url)
}

/// `[schedule]`: the cron expression, the batch against the lease, and the horizons.
fn check_schedule(
    s: &ScheduleSettings,
    w: &WechatSettings,
    o: &Origins<'_>,
) -> Result<(), ConfigError> {
    validate_cron(&s.scan_cron).map_err(|m| o.invalid("schedule.scan_cron", m))?;
    o.within("schedule.batch_size", s.batch_size, 1..=10_000)?;
    check_lease(s, w, o)?;
    o.within(
        "schedule.give_up_after_hours",
        s.give_up_after_hours,
        1..=24 * 30,
    )?;
    if !(5..=60 * 24 * 30).contains(&s.default_expiry_minutes) {
        return Err(o.invalid(
            "schedule.default_expiry_minutes",
            "must be 5 to 43200 (WeChat refuses to close an order younger than 5 minutes)".into(),
        ));
    }
    if s.grace_seconds > 3600 {
        return Err(o.invalid("schedule.grace_seconds", "must be at most 3600".into()));
    }
    Ok(())
}

/// `[refunds]`: the first query, the horizon and the NOT_FOUND grace within sensible bounds.
fn check_refunds(r: &RefundSettings, o: &Origins<'_>) -> Result<(), ConfigError> {
    o.within(
        "refunds.first_query_seconds",
        r.first_query_seconds,
        1..=3600,
    )?;
    // WeChat accepts refunds up to a year after the payment; a refund answer lives as long.
    o.within("refunds.horizon_days", r.horizon_days, 1..=365)?;
    o.within(
        "refunds.not_found_after_minutes",
        r.not_found_after_minutes,
        1..=60 * 24 * 7,
    )?;
    Ok(())
}

/// `[bills]`: the cron expression, a catch-up window within WeChat's three months, sensible
/// retry and lease periods.
fn check_bills(b: &BillSettings, o: &Origins<'_>) -> Result<(), ConfigError> {
    validate_cron(&b.cron).map_err(|m| o.invalid("bills.cron", m))?;
    o.within("bills.catch_up_days", b.catch_up_days, 1..=90)?;
    o.within("bills.retry_minutes", b.retry_minutes, 1..=24 * 60)?;
    o.within("bills.lease_seconds", b.lease_seconds, 30..=3600)?;
    Ok(())
}

/// A lease outlives a query, and a claimed batch is queried well within its lease.
fn check_lease(
    s: &ScheduleSettings,
    w: &WechatSettings,
    o: &Origins<'_>,
) -> Result<(), ConfigError> {
    let timeout_s = w.timeout_ms.div_ceil(1000);
    if s.lease_seconds < 2 * timeout_s + 5 {
        return Err(o.invalid(
            "schedule.lease_seconds",
            format!(
                "must be at least twice wechat.timeout_ms plus 5 seconds ({}), so that a lease outlives a query",
                2 * timeout_s + 5
            ),
        ));
    }
    // A claimed batch must be queried well within its lease, or its tail could be claimed
    // again by another instance while still waiting for its turn under the QPS cap.
    let batch_budget = u64::from(w.max_qps) * s.lease_seconds / 2;
    if u64::from(s.batch_size) > batch_budget.max(1) {
        return Err(o.invalid(
            "schedule.batch_size",
            format!(
                "at wechat.max_qps = {} a batch of {} takes longer than half of lease_seconds ({}); \
                 lower batch_size to {batch_budget} or less, or raise lease_seconds",
                w.max_qps, s.batch_size, s.lease_seconds
            ),
        ));
    }
    Ok(())
}

/// `[metrics]` and `[notify]`: their addresses apart, the refresh, and both listeners' limits.
fn check_listeners(
    m: &MetricsSettings,
    notify: &NotifySettings,
    o: &Origins<'_>,
) -> Result<(), ConfigError> {
    // The same port on the same address, or on any address where one side listens on all.
    let clash = |a: std::net::SocketAddr, b: std::net::SocketAddr| {
        a.port() == b.port()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    if notify
        .listen
        .is_some_and(|n| m.listen.port() != 0 && clash(n, m.listen))
    {
        return Err(o.invalid(
            "notify.listen",
            format!(
                "{} overlaps metrics.listen ({}); the notify endpoint needs a port of its own",
                notify.listen.map(|n| n.to_string()).unwrap_or_default(),
                m.listen
            ),
        ));
    }
    o.at_least_one("metrics.refresh_seconds", m.refresh_seconds)?;
    o.at_least_one(
        "metrics.ready_max_scan_age_seconds",
        m.ready_max_scan_age_seconds,
    )?;
    check_limits("metrics", m.max_connections, m.header_timeout_seconds, o)?;
    check_limits(
        "notify",
        notify.max_connections,
        notify.header_timeout_seconds,
        o,
    )
}

/// One listener's `max_connections` and `header_timeout_seconds`.
fn check_limits(
    section: &str,
    max_connections: u32,
    header_timeout_seconds: u64,
    o: &Origins<'_>,
) -> Result<(), ConfigError> {
    o.within(
        &format!("{section}.max_connections"),
        max_connections,
        MAX_CONNECTIONS,
    )?;
    o.within(
        &format!("{section}.header_timeout_seconds"),
        header_timeout_seconds,
        HEADER_TIMEOUT_SECONDS,
    )
}

/// `[[merchants]]`: each once, each with its keys read from where the config says.
fn load_merchants(
    raw: Vec<RawMerchant>,
    o: &Origins<'_>,
    var: &EnvLookup<'_>,
) -> Result<Vec<Merchant>, ConfigError> {
    let path = o.path;
    let at = Where {
        base_dir: path.parent().unwrap_or(Path::new(".")),
        var,
    };
    let mut merchants: Vec<Merchant> = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        let key_name = |k: &str| format!("merchants[{i}].{k}");
        if merchants.iter().any(|other| other.mch_id == m.mch_id) {
            return Err(o.invalid(
                &key_name("mch_id"),
                format!("merchant {} is configured twice", m.mch_id),
            ));
        }
        let credentials = match m.api.unwrap_or(Api::V2) {
            Api::V2 => v2_credentials(&at, &m),
            Api::V3 => v3_credentials(&at, &m).map(Credentials::V3),
        }
        .map_err(|(k, message)| ConfigError::Invalid {
            origin: format!("config file {}", path.display()),
            key: key_name(&k),
            message,
        })?;
        merchants.push(Merchant {
            mch_id: m.mch_id,
            appid: m.appid,
            sub_mch_id: m.sub_mch_id,
            credentials,
        });
    }
    Ok(merchants)
}

/// A bad merchant setting: the key (within its `[[merchants]]` entry) and what is wrong.
type MerchantError = (String, String);

/// A v2 merchant: its sign type and API key; no v3 key.
fn v2_credentials(at: &Where<'_>, m: &RawMerchant) -> Result<Credentials, MerchantError> {
    if let Some(k) = m.v3_keys_set().first() {
        return Err((
            (*k).to_owned(),
            "is a v3 key, and this merchant speaks API v2 (`api` is \"v2\" or not set); \
             set api = \"v3\" for a v3 merchant, or remove the key"
                .into(),
        ));
    }
    let secret = m.api_key().read(at, true)?;
    let text = std::str::from_utf8(&secret.bytes).unwrap_or_default();
    let key = ApiKey::parse(text).map_err(|e| (secret.key.clone(), secret.about(e)))?;
    Ok(Credentials::V2 {
        sign_type: m.sign_type.unwrap_or(SignType::Md5),
        key,
    })
}

/// A v3 merchant: its private key and certificate serial, its APIv3 key, and WeChat's keys
/// (the public key, the platform certificates or both); no v2 key.
fn v3_credentials(at: &Where<'_>, m: &RawMerchant) -> Result<V3Credentials, MerchantError> {
    if let Some(k) = m.v2_keys_set().first() {
        return Err((
            (*k).to_owned(),
            "is a v2 key, and this merchant has api = \"v3\": a v3 merchant signs with \
             private_key_* and decrypts with apiv3_key_*; remove the key"
                .into(),
        ));
    }
    let cert_serial_no = cert_serial_no(m.cert_serial_no.as_deref())?;
    let public_key_files = (&m.wechatpay_public_key_file, &m.wechatpay_public_key_id);
    let public_key = match public_key_files {
        (Some(file), Some(id)) => Some((file, public_key_id(id)?)),
        (None, None) => None,
        (Some(_), None) => {
            return Err((
                "wechatpay_public_key_id".into(),
                "missing: wechatpay_public_key_file is set, and WeChat names its public key by \
                 its id (PUB_KEY_ID_…, shown next to the key in the merchant platform)"
                    .into(),
            ));
        }
        (None, Some(_)) => {
            return Err((
                "wechatpay_public_key_file".into(),
                "missing: wechatpay_public_key_id is set; set wechatpay_public_key_file to the \
                 WeChat Pay public key (PEM) downloaded from the merchant platform"
                    .into(),
            ));
        }
    };
    // A merchant with the public key needs no certificates (new merchants have none); one
    // without it can only verify with downloaded certificates.
    let certificates = m.platform_certificates.unwrap_or(if public_key.is_some() {
        CertificateMode::Off
    } else {
        CertificateMode::Download
    });
    if public_key.is_none() && certificates == CertificateMode::Off {
        return Err((
            "platform_certificates".into(),
            "is \"off\" and no WeChat Pay public key is configured: WeChat's answers could not \
             be verified; set wechatpay_public_key_file and wechatpay_public_key_id, or \
             platform_certificates = \"download\""
                .into(),
        ));
    }

    let secret = m.private_key().read(at, false)?;
    let private_key =
        PrivateKey::from_pem(&secret.bytes).map_err(|e| (secret.key.clone(), secret.about(e)))?;

    let secret = m.apiv3_key().read(at, false)?;
    let trimmed = secret.bytes.trim_ascii_end();
    let apiv3_key = ApiV3Key::new(trimmed).map_err(|e| (secret.key.clone(), secret.about(e)))?;

    let public_key = match public_key {
        Some((file, id)) => {
            let k = "wechatpay_public_key_file";
            let shown = shown_path(at.base_dir, file);
            let pem = std::fs::read(at.base_dir.join(file))
                .map_err(|e| (k.to_owned(), format!("cannot read {shown}: {e}")))?;
            let key =
                PublicKey::from_pem(&pem).map_err(|e| (k.to_owned(), format!("{shown}: {e}")))?;
            Some(WechatPublicKey { id, key })
        }
        None => None,
    };
    Ok(V3Credentials {
        private_key,
        cert_serial_no,
        apiv3_key,
        wechat: WechatKeys::new(public_key, certificates),
    })
}

/// The serial of the merchant API certificate: hex, at most 40 digits, uppercased.
fn cert_serial_no(serial: Option<&str>) -> Result<String, MerchantError> {
    let k = "cert_serial_no";
    let serial = serial.ok_or_else(|| {
        (
            k.to_owned(),
            "missing: a v3 merchant names its API certificate by its serial (hex, shown in \
             the merchant platform under API security)"
                .to_owned(),
        )
    })?;
    if serial.is_empty() || serial.len() > 40 || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err((
            k.to_owned(),
            format!("must be the certificate's serial: 1 to 40 hex digits; {NOT_SHOWN}"),
        ));
    }
    Ok(serial.to_ascii_uppercase())
}

/// WeChat's public key id: `PUB_KEY_ID_` and letters or digits.
fn public_key_id(id: &str) -> Result<String, MerchantError> {
    let rest = id.strip_prefix(PUBLIC_KEY_ID_PREFIX).unwrap_or_default();
    if rest.is_empty() || id.len() > 64 || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err((
            "wechatpay_public_key_id".into(),
            format!(
                "must be WeChat's public key id: {PUBLIC_KEY_ID_PREFIX} and letters or digits, \
                 at most 64 characters; {NOT_SHOWN}"
            ),
        ));
    }
    Ok(id.to_owned())
}

/// How the ids of WeChat Pay public keys begin.
const PUBLIC_KEY_ID_PREFIX: &str = "PUB_KEY_ID_";

/// Checks a six-field cron expression (seconds first) with the scheduler's own parser.
pub fn validate_cron(expr: &str) -> Result<(), String> {
    if expr.split_whitespace().count() != 6 {
        return Err(format!(
            "{expr:?} must have six fields, seconds first (e.g. \"*/5 * * * * *\")"
        ));
    }
    tokio_cron_scheduler::Job::new_async(expr, |_, _| Box::pin(async {}))
        .map(|_| ())
        .map_err(|e| format!("{expr:?} is not a valid cron expression: {e}"))
}

/// The variable systemd sets for a service with `LoadCredential=`.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// Reads an environment variable (the process's, or a test's).
type EnvLookup<'a> = dyn Fn(&str) -> Option<std::ffi::OsString> + 'a;

/// What the merchants' secrets are found through: the config file's folder (relative paths)
/// and the environment.
struct Where<'a> {
    base_dir: &'a Path,
    var: &'a EnvLookup<'a>,
}

/// Where one secret of a merchant is kept: exactly one of `PREFIX_file` (relative to the
/// config file), `PREFIX_credential` (`$CREDENTIALS_DIRECTORY/NAME`) and `PREFIX_env`.
struct SecretSource<'a> {
    prefix: &'static str,
    file: Option<&'a Path>,
    env: Option<&'a str>,
    credential: Option<&'a str>,
}

/// A secret as read, with the key it was read through and how to name where it came from.
struct Secret {
    /// `api_key_file`, `private_key_credential`, …
    key: String,
    /// `/etc/…/key`, `credential NAME` or `environment variable NAME` (never the value).
    origin: String,
    bytes: Zeroizing<Vec<u8>>,
}

impl Secret {
    /// The message for a secret that was read but refused: its origin and why.
    fn about(&self, why: impl std::fmt::Display) -> String {
        format!("{}: {why}", self.origin)
    }
}

impl SecretSource<'_> {
    /// Reads the secret: as UTF-8 text when `text` (the errors tell invalid UTF-8), else as
    /// bytes.
    fn read(&self, at: &Where<'_>, text: bool) -> Result<Secret, MerchantError> {
        let p = self.prefix;
        let (file_key, env_key, credential_key) = (
            format!("{p}_file"),
            format!("{p}_env"),
            format!("{p}_credential"),
        );
        let sources = [
            self.file.is_some(),
            self.env.is_some(),
            self.credential.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => {
                return Err((
                    file_key.clone(),
                    format!(
                        "missing: set {file_key} (a file holding the key), {credential_key} (a systemd credential) or {env_key} (a variable)"
                    ),
                ));
            }
            1 => {}
            _ => {
                return Err((
                    file_key.clone(),
                    format!("set only one of {file_key}, {credential_key} and {env_key}"),
                ));
            }
        }
        let read_file = |file: &Path| -> std::io::Result<Vec<u8>> {
            if text {
                std::fs::read_to_string(file).map(String::into_bytes)
            } else {
                std::fs::read(file)
            }
        };
        if let Some(name) = self.credential {
            let k = credential_key;
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err((
                    k,
                    format!("not a credential name (no '/', no leading '.'); {NOT_SHOWN}"),
                ));
            }
            let shown = shown_name(name);
            let Some(dir) = (at.var)(CREDENTIALS_DIRECTORY) else {
                let message = format!(
                    "${CREDENTIALS_DIRECTORY} is not set: run under systemd with LoadCredential={}:/path/to/key, or use {file_key}",
                    if may_be_secret(name) { "NAME" } else { name }
                );
                return Err((k, message));
            };
            let file = Path::new(&dir).join(name);
            let bytes = read_file(&file)
                .map_err(|e| (k.clone(), format!("cannot read credential {shown}: {e}")))?;
            return Ok(Secret {
                key: k,
                origin: format!("credential {shown}"),
                bytes: Zeroizing::new(bytes),
            });
        }
        if let Some(file) = self.file {
            let k = file_key;
            let shown = shown_path(at.base_dir, file);
            let bytes = read_file(&at.base_dir.join(file))
                .map_err(|e| (k.clone(), format!("cannot read {shown}: {e}")))?;
            return Ok(Secret {
                key: k,
                origin: shown,
                bytes: Zeroizing::new(bytes),
            });
        }
        let var = self.env.unwrap_or_default();
        let k = env_key;
        let valid = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err((
                k,
                format!("not a valid environment variable name; {NOT_SHOWN}"),
            ));
        }
        let shown = shown_name(var);
        let bytes = match (at.var)(var) {
            None => Err("is not set"),
            // Never the value's text: it would be the key.
            Some(v) if text => v
                .into_string()
                .map(String::into_bytes)
                .map_err(|_| "is not valid UTF-8"),
            Some(v) => Ok(std::os::unix::ffi::OsStringExt::into_vec(v)),
        }
        .map_err(|why| (k.clone(), format!("environment variable {shown} {why}")))?;
        Ok(Secret {
            key: k,
            origin: format!("environment variable {shown}"),
            bytes: Zeroizing::new(bytes),
        })
    }
}

/// A file named in the config, relative to its folder, for a message; not shown when the name
/// looks like a key put in its place.
fn shown_path(base_dir: &Path, file: &Path) -> String {
    match file.to_str() {
        Some(f) if may_be_secret(f) => NAME_NOT_SHOWN.to_owned(),
        _ => base_dir.join(file).display().to_string(),
    }
}

/// Said instead of a value that is not a valid path or name and may be a key put in its place.
const NOT_SHOWN: &str = "the value is not shown: it may be a key";
/// Said instead of a file, variable or credential name that looks like a key itself.
const NAME_NOT_SHOWN: &str =
    "(the value is not shown: it looks like a key, and this setting names where the key is kept)";

/// Whether a value given where a file, variable or credential name belongs could hold the
/// API key itself (`KEY`, ` KEY `, `NAME=KEY`, `/path/KEY`): any run of letters and digits in it
/// that is a valid key, or 16 or more of both. No message shows such a value.
fn may_be_secret(s: &str) -> bool {
    s.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| {
        ApiKey::parse(w).is_ok()
            || (w.len() >= 16
                && w.bytes().any(|b| b.is_ascii_digit())
                && w.bytes().any(|b| b.is_ascii_alphabetic()))
    })
}

/// A variable or credential name for a message, unless it may be a key.
fn shown_name(name: &str) -> String {
    if may_be_secret(name) {
        NAME_NOT_SHOWN.to_owned()
    } else {
        name.to_owned()
    }
}

fn check_url(s: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{s:?} must be an http:// or https:// URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{s:?} must not have a query or fragment"));
    }
    Ok(())
}

/// The variable that overrides `key` (`wechat.timeout_ms` → `WXPAY_RECONCILER__WECHAT__TIMEOUT_MS`).
fn env_name<S: AsRef<str>>(parts: &[S]) -> String {
    let parts: Vec<String> = parts.iter().map(|p| p.as_ref().to_uppercase()).collect();
    format!("{ENV_PREFIX}{}", parts.join("__"))
}

fn from_env(md: &figment::Metadata) -> bool {
    md.source.as_ref().and_then(|s| s.file_path()).is_none() && md.name.contains("environment")
}

/// "config file PATH" or "environment variable NAME", for the value at `key`.
fn origin_of(figment: &Figment, path: &Path, key: &str) -> String {
    match figment.find_metadata(key) {
        Some(md) if from_env(md) => {
            let parts: Vec<&str> = key.split('.').collect();
            format!("environment variable {}", env_name(&parts))
        }
        _ => format!("config file {}", path.display()),
    }
}

/// `merchants.0.mch_id` → `merchants[0].mch_id`.
fn display_key(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if part.bytes().all(|b| b.is_ascii_digit()) && !out.is_empty() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// Parses the file as TOML before figment does, so that a syntax error is told by its position
/// and key alone: figment (through toml) quotes the offending line, and that line may be
/// `url = "postgres://app:PASSWORD@…` with a quote missing.
fn check_syntax(path: &Path) -> Result<(), ConfigError> {
    let syntax = |message: String| ConfigError::Syntax {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| syntax(format!("cannot read: {e}")))?;
    let Err(e) = toml::from_str::<toml::Table>(&text) else {
        return Ok(());
    };
    let mut message = "TOML syntax error".to_owned();
    if let Some(span) = e.span() {
        let at = span.start.min(text.len());
        let before = text.get(..at).unwrap_or_default();
        let line = before.matches('\n').count() + 1;
        let column = before
            .rsplit('\n')
            .next()
            .unwrap_or_default()
            .chars()
            .count()
            + 1;
        message.push_str(&format!(" at line {line}, column {column}"));
        if let Some(key) = key_at(&text, line) {
            message.push_str(&format!(" (key `{key}`)"));
        }
    }
    // toml's description ("invalid basic string", "expected `\"`"), never the line itself.
    let what: Vec<&str> = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if !what.is_empty() {
        message.push_str(": ");
        message.push_str(&what.join("; "));
    }
    message.push_str(" (the line is not shown: it may hold a secret)");
    Err(syntax(message))
}

/// The key set on line `line` (1-based) of a TOML text, with its table (`database.url`,
/// `merchants[1].api_key_file`), when the line starts with a bare key and `=`.
fn key_at(text: &str, line: usize) -> Option<String> {
    let bare = |s: &str| {
        let parts: Vec<&str> = s.split('.').map(str::trim).collect();
        parts
            .iter()
            .all(|p| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
            .then(|| parts.join("."))
    };
    let lines: Vec<&str> = text.lines().collect();
    let key = bare(lines.get(line.checked_sub(1)?)?.split_once('=')?.0)?;
    let mut table = None;
    for (i, l) in lines[..line - 1].iter().enumerate().rev() {
        let l = l.split('#').next().unwrap_or_default().trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            let name = bare(name)?;
            let index = lines[..i]
                .iter()
                .filter(|o| o.split('#').next().unwrap_or_default().trim() == l)
                .count();
            table = Some(format!("{name}[{index}]"));
            break;
        }
        if let Some(name) = l.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = Some(bare(name)?);
            break;
        }
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key,
    })
}

fn from_figment(path: &Path, e: figment::Error) -> ConfigError {
    // Report the first error; fixing it reveals the next.
    let e = e
        .into_iter()
        .next()
        .unwrap_or_else(|| figment::Error::from("unknown error".to_string()));
    if e.path.is_empty() {
        return ConfigError::Syntax {
            path: path.to_owned(),
            message: e.kind.to_string(),
        };
    }
    let origin = match &e.metadata {
        Some(md) if from_env(md) => format!("environment variable {}", env_name(&e.path)),
        _ => format!("config file {}", path.display()),
    };
    ConfigError::Invalid {
        origin,
        key: display_key(&e.path),
        message: kind_message(&e.kind),
    }
}

/// figment's message, without the string it found where another type was expected: that
/// string may be a secret in the wrong place (`WXPAY_RECONCILER__DATABASE=postgres://…`).
fn kind_message(kind: &figment::error::Kind) -> String {
    use figment::error::{Actual, Kind};
    match kind {
        Kind::InvalidType(Actual::Str(_), expected) => {
            format!("invalid type: found a string (not shown), expected {expected}")
        }
        Kind::InvalidValue(Actual::Str(_), expected) => {
            format!("invalid value: a string (not shown), expected {expected}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn loads_merchants_with_keys_from_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "key", "192006250b4c09247ec02edce69f6a2d\n");
        let cfg = write(
            dir.path(),
            "c.toml",
            "[database]\nurl = \"postgres://app:db-s3cret@db/shop\"\n[wechat]\nbase_url = \"http://127.0.0.1:9300\"\n\n[[merchants]]\nmch_id = \"10000100\"\nappid = \"wxd930ea5d5a258f4f\"\nsign_type = \"HMAC-SHA256\"\napi_key_file = \"key\"\n",
        );
        let s = load(&cfg).unwrap();
        assert_eq!(s.merchants.len(), 1);
        assert_eq!(s.merchants[0].v2_sign_type(), SignType::HmacSha256);
        assert_eq!(s.wechat.timeout_ms, 5000);
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("192006250b4c09247ec02edce69f6a2d") && !debug.contains("db-s3cret"),
            "{debug}"
        );
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("[wechat]\ntimeout_ms = \"soon\"\n", "wechat.timeout_ms"),
            ("[wechat]\ntimeout_ms = 0\n", "wechat.timeout_ms"),
            ("[wechat]\nbase_url = \"ftp://x\"\n", "wechat.base_url"),
            ("[wechat]\ntypo = 1\n", "typo"),
            (
                "[[merchants]]\nmch_id = \"1 2\"\nappid = \"wx1\"\napi_key_env = \"X\"\n",
                "merchants",
            ),
            (
                "[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\n",
                "merchants[0].api_key_file",
            ),
            (
                "[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\napi_key_file = \"nope\"\n",
                "merchants[0].api_key_file",
            ),
            (
                "[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\nsign_type = \"SHA1\"\napi_key_env = \"X\"\n",
                "sign_type",
            ),
            (
                "[wechat]\nmax_qps = 1\n[schedule]\nbatch_size = 200\n",
                "schedule.batch_size",
            ),
            (
                "[schedule]\nscan_cron = \"*/5 * * * *\"\n",
                "schedule.scan_cron",
            ),
            (
                "[schedule]\nscan_cron = \"x * * * * *\"\n",
                "schedule.scan_cron",
            ),
            ("[schedule]\nlease_seconds = 5\n", "schedule.lease_seconds"),
            ("[refunds]\nhorizon_days = 0\n", "refunds.horizon_days"),
            ("[bills]\ncron = \"30 10 * * *\"\n", "bills.cron"),
            ("[bills]\ncatch_up_days = 91\n", "bills.catch_up_days"),
            ("[bills]\nretry_minutes = 0\n", "bills.retry_minutes"),
            (
                "[refunds]\nfirst_query_seconds = 86400\n",
                "refunds.first_query_seconds",
            ),
            ("[database]\nurl = \"oracle://x\"\n", "database.url"),
            ("[metrics]\nlisten = \"not an address\"\n", "metrics.listen"),
            (
                "[metrics]\nmax_connections = 0\n",
                "metrics.max_connections",
            ),
            (
                "[notify]\nheader_timeout_seconds = 0\n",
                "notify.header_timeout_seconds",
            ),
            (
                "[notify]\nmax_connections = 20000\n",
                "notify.max_connections",
            ),
            (
                "[metrics]\nlisten = \"127.0.0.1:9187\"\n[notify]\nlisten = \"127.0.0.1:9187\"\n",
                "notify.listen",
            ),
            (
                "[metrics]\nlisten = \"127.0.0.1:9187\"\n[notify]\nlisten = \"0.0.0.0:9187\"\n",
                "notify.listen",
            ),
        ];
        for (text, key) in cases {
            let cfg = write(dir.path(), "c.toml", text);
            let err = load(&cfg).unwrap_err().to_string();
            assert!(err.contains(&cfg.display().to_string()), "{text:?}: {err}");
            assert!(err.contains(key), "{text:?}: {err}");
        }
        let missing = dir.path().join("absent.toml");
        assert_eq!(load(&missing).unwrap_err(), ConfigError::NotFound(missing));
    }

    #[test]
    fn bad_key_file_error_does_not_print_the_key() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "key", "topsecretbutnot32chars");
        let cfg = write(
            dir.path(),
            "c.toml",
            "[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\napi_key_file = \"key\"\n",
        );
        let err = load(&cfg).unwrap_err().to_string();
        assert!(err.contains("merchants[0].api_key_file"), "{err}");
        assert!(!err.contains("topsecret"), "{err}");
    }

    /// A published test key of the fixtures (not a secret).
    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel)
    }

    const MERCHANT_KEY: &str = "wxpay-v3/keys/java_sdk_merchant_private_key.pem";
    const WECHAT_PUBLIC_KEY: &str = "wxpay-v3/keys/go_sdk_test_public_key.pem";
    const PUBLIC_KEY_ID: &str = "PUB_KEY_ID_0000000000000024101100397200000006";
    const APIV3_KEY: &str = "a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";

    /// A v3 merchant entry with its keys in files (`apiv3` in the config's folder), with
    /// `extra` lines added.
    fn v3_merchant(extra: &str) -> String {
        format!(
            "[[merchants]]\nmch_id = \"1900000100\"\nappid = \"wxd678efh567hg6787\"\napi = \"v3\"\n\
             cert_serial_no = \"5f1c72e2a8931b72a2e13af8dee92471eb397115\"\n{extra}"
        )
    }

    fn key_files() -> String {
        format!(
            "private_key_file = {:?}\napiv3_key_file = \"apiv3\"\n",
            fixture(MERCHANT_KEY)
        )
    }

    fn public_key_lines() -> String {
        format!(
            "wechatpay_public_key_file = {:?}\nwechatpay_public_key_id = \"{PUBLIC_KEY_ID}\"\n",
            fixture(WECHAT_PUBLIC_KEY)
        )
    }

    /// The lines of the merchant's private key a message must never contain.
    fn private_key_lines() -> Vec<String> {
        std::fs::read_to_string(fixture(MERCHANT_KEY))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::to_owned)
            .collect()
    }

    fn assert_no_secret(err: &str) {
        assert!(!err.contains(APIV3_KEY), "{err}");
        assert!(!err.contains(&APIV3_KEY[..16]), "{err}");
        for line in private_key_lines() {
            assert!(!err.contains(&line), "{err}");
        }
    }

    #[test]
    fn loads_v3_merchants_from_files_beside_v2_ones() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "apiv3", &format!("{APIV3_KEY}\n\n"));
        write(dir.path(), "key", "192006250b4c09247ec02edce69f6a2d\n");
        let text = format!(
            "[[merchants]]\nmch_id = \"10000100\"\nappid = \"wxd930ea5d5a258f4f\"\napi_key_file = \"key\"\n\n{}\n{}",
            v3_merchant(&(key_files() + &public_key_lines())),
            "[[merchants]]\nmch_id = \"1900000101\"\nappid = \"wxd678efh567hg6787\"\napi = \"v3\"\n\
             cert_serial_no = \"5F1C72E2A8931B72A2E13AF8DEE92471EB397115\"\n"
                .to_owned() + &key_files(),
        );
        let cfg = write(dir.path(), "c.toml", &text);
        let s = load(&cfg).unwrap();
        assert_eq!(
            s.merchants.iter().map(Merchant::api).collect::<Vec<_>>(),
            [Api::V2, Api::V3, Api::V3]
        );
        assert_eq!(s.merchants[0].v2_sign_type(), SignType::Md5);

        let v3 = s.merchants[1].v3_credentials().unwrap();
        assert_eq!(
            v3.cert_serial_no,
            "5F1C72E2A8931B72A2E13AF8DEE92471EB397115"
        );
        assert!(
            v3.apiv3_key
                .same_as(&ApiV3Key::new(APIV3_KEY.as_bytes()).unwrap())
        );
        let pem = std::fs::read(fixture(MERCHANT_KEY)).unwrap();
        assert!(v3.private_key.same_as(&PrivateKey::from_pem(&pem).unwrap()));
        let public = v3.wechat.public_key().unwrap();
        assert_eq!(public.id, PUBLIC_KEY_ID);
        let pem = std::fs::read(fixture(WECHAT_PUBLIC_KEY)).unwrap();
        assert_eq!(public.key, PublicKey::from_pem(&pem).unwrap());
        // With the public key, the certificates are off unless asked for.
        assert_eq!(v3.wechat.certificate_mode(), CertificateMode::Off);

        // Without it, they are downloaded.
        let other = s.merchants[2].v3_credentials().unwrap();
        assert!(other.wechat.public_key().is_none());
        assert_eq!(other.wechat.certificate_mode(), CertificateMode::Download);

        let debug = format!("{s:?}");
        assert_no_secret(&debug);
        assert!(
            !debug.contains("192006250b4c09247ec02edce69f6a2d"),
            "{debug}"
        );

        // Both, during a switch from certificates to the public key.
        let cfg = write(
            dir.path(),
            "c.toml",
            &v3_merchant(
                &(key_files() + &public_key_lines() + "platform_certificates = \"download\"\n"),
            ),
        );
        let s = load(&cfg).unwrap();
        let v3 = s.merchants[0].v3_credentials().unwrap();
        assert!(v3.wechat.public_key().is_some());
        assert_eq!(v3.wechat.certificate_mode(), CertificateMode::Download);
    }

    #[test]
    fn v3_errors_name_the_file_and_the_key_never_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret_pem = std::fs::read_to_string(fixture(MERCHANT_KEY)).unwrap();
        write(dir.path(), "apiv3", &format!("{APIV3_KEY}\n"));
        write(dir.path(), "apiv3_short", &APIV3_KEY[..31]);
        write(dir.path(), "apiv3_long", &format!("{APIV3_KEY}x\n"));
        // A private key that is not PEM (a key pasted without its armour).
        write(
            dir.path(),
            "garbage.pem",
            &secret_pem
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let key =
            |file: &Path| format!("private_key_file = {file:?}\napiv3_key_file = \"apiv3\"\n");
        let merchant_key = fixture(MERCHANT_KEY);
        let public_key = public_key_lines();
        let cases: Vec<(String, &str, &str)> = vec![
            (
                v3_merchant(&(public_key.clone() + "apiv3_key_file = \"apiv3\"\n")),
                "merchants[0].private_key_file",
                "missing",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &public_key + "private_key_env = \"K\"\n")),
                "merchants[0].private_key_file",
                "only one of",
            ),
            (
                v3_merchant(&(key(&dir.path().join("garbage.pem")) + &public_key)),
                "merchants[0].private_key_file",
                "not a PEM private key",
            ),
            (
                v3_merchant(&(key(&fixture("local/rsa1024_test_key.pem")) + &public_key)),
                "merchants[0].private_key_file",
                "RSA-1024",
            ),
            (
                v3_merchant(&(key(&fixture("local/ec_p256_test_key.pem")) + &public_key)),
                "merchants[0].private_key_file",
                "not an RSA private key",
            ),
            (
                v3_merchant(&(key(&dir.path().join("absent.pem")) + &public_key)),
                "merchants[0].private_key_file",
                "cannot read",
            ),
            (
                format!(
                    "[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\napi = \"v3\"\n{}{public_key}",
                    key(&merchant_key)
                ),
                "merchants[0].cert_serial_no",
                "missing",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &public_key))
                    .replace("5f1c72e2a8931b72a2e13af8dee92471eb397115", APIV3_KEY),
                "merchants[0].cert_serial_no",
                "hex digits",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &public_key))
                    .replace("5f1c72e2a8931b72a2e13af8dee92471eb397115", &"A".repeat(41)),
                "merchants[0].cert_serial_no",
                "hex digits",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &public_key))
                    .replace("\"apiv3\"", "\"apiv3_short\""),
                "merchants[0].apiv3_key_file",
                "31 bytes",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &public_key))
                    .replace("\"apiv3\"", "\"apiv3_long\""),
                "merchants[0].apiv3_key_file",
                "33 bytes",
            ),
            (
                v3_merchant(&(format!("private_key_file = {merchant_key:?}\n") + &public_key)),
                "merchants[0].apiv3_key_file",
                "missing",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &format!("wechatpay_public_key_file = {:?}\n", fixture(WECHAT_PUBLIC_KEY)))),
                "merchants[0].wechatpay_public_key_id",
                "missing",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &format!("wechatpay_public_key_id = \"{PUBLIC_KEY_ID}\"\n"))),
                "merchants[0].wechatpay_public_key_file",
                "missing",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &public_key)).replace(PUBLIC_KEY_ID, "F5765756002FDD77"),
                "merchants[0].wechatpay_public_key_id",
                "PUB_KEY_ID_",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &public_key))
                    .replace(WECHAT_PUBLIC_KEY, MERCHANT_KEY),
                "merchants[0].wechatpay_public_key_file",
                "not a PEM public key",
            ),
            (
                v3_merchant(&(key(&merchant_key) + "platform_certificates = \"off\"\n")),
                "merchants[0].platform_certificates",
                "WeChat's answers could not be verified",
            ),
            (
                v3_merchant(&(key(&merchant_key) + "platform_certificates = \"sometimes\"\n")),
                "merchants[0].platform_certificates",
                "",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &public_key)).replace("\"v3\"", "\"v4\""),
                "merchants[0].api",
                "",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &public_key + "sign_type = \"MD5\"\n")),
                "merchants[0].sign_type",
                "is a v2 key",
            ),
            (
                v3_merchant(&(key(&merchant_key) + &public_key + "api_key_file = \"apiv3\"\n")),
                "merchants[0].api_key_file",
                "is a v2 key",
            ),
            (
                format!(
                    "[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\napi_key_file = \"apiv3\"\nprivate_key_file = {merchant_key:?}\n"
                ),
                "merchants[0].private_key_file",
                "is a v3 key",
            ),
            (
                "[[merchants]]\nmch_id = \"1\"\nappid = \"wx1\"\napi = \"v2\"\napi_key_file = \"apiv3\"\napiv3_key_env = \"K\"\n".to_owned(),
                "merchants[0].apiv3_key_env",
                "is a v3 key",
            ),
        ];
        for (text, key, what) in cases {
            let cfg = write(dir.path(), "c.toml", &text);
            let err = load(&cfg).unwrap_err().to_string();
            assert!(err.contains(&cfg.display().to_string()), "{text}: {err}");
            assert!(err.contains(key), "{text}: {err}");
            assert!(err.contains(what), "{text}: {err}");
            assert_no_secret(&err);
        }
    }

    #[test]
    fn v3_secrets_from_variables_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        let pem = std::fs::read_to_string(fixture(MERCHANT_KEY)).unwrap();
        write(&creds, "apiclient_key.pem", &pem);
        write(&creds, "apiv3_key", &format!("{APIV3_KEY}\r\n"));
        let vars: std::collections::HashMap<&str, String> = [
            ("MCH_PRIVATE_KEY", pem.clone()),
            ("MCH_APIV3_KEY", APIV3_KEY.to_owned()),
            ("MCH_SHORT_KEY", APIV3_KEY[..20].to_owned()),
            (CREDENTIALS_DIRECTORY, creds.display().to_string()),
        ]
        .into_iter()
        .collect();
        let env = |name: &str| vars.get(name).map(std::ffi::OsString::from);
        let no_credentials = |name: &str| {
            (name != CREDENTIALS_DIRECTORY)
                .then(|| vars.get(name).map(std::ffi::OsString::from))
                .flatten()
        };
        let public_key = public_key_lines();
        let expected = PrivateKey::from_pem(pem.as_bytes()).unwrap();
        let apiv3 = ApiV3Key::new(APIV3_KEY.as_bytes()).unwrap();
        for lines in [
            "private_key_env = \"MCH_PRIVATE_KEY\"\napiv3_key_credential = \"apiv3_key\"\n",
            "private_key_credential = \"apiclient_key.pem\"\napiv3_key_env = \"MCH_APIV3_KEY\"\n",
        ] {
            let cfg = write(
                dir.path(),
                "c.toml",
                &v3_merchant(&(lines.to_owned() + &public_key)),
            );
            let s = load_with(&cfg, &env).unwrap();
            let v3 = s.merchants[0].v3_credentials().unwrap();
            assert!(v3.private_key.same_as(&expected), "{lines}");
            assert!(v3.apiv3_key.same_as(&apiv3), "{lines}");
        }

        let cases = [
            (
                "private_key_credential = \"apiclient_key.pem\"\napiv3_key_env = \"MCH_APIV3_KEY\"\n",
                &no_credentials as &EnvLookup<'_>,
                "merchants[0].private_key_credential",
                "LoadCredential=apiclient_key.pem:",
            ),
            (
                "private_key_env = \"MCH_PRIVATE_KEY\"\napiv3_key_credential = \"absent\"\n",
                &env,
                "merchants[0].apiv3_key_credential",
                "cannot read credential absent",
            ),
            (
                "private_key_env = \"MCH_PRIVATE_KEY\"\napiv3_key_credential = \"../apiv3_key\"\n",
                &env,
                "merchants[0].apiv3_key_credential",
                "not a credential name",
            ),
            (
                "private_key_env = \"UNSET_VARIABLE\"\napiv3_key_env = \"MCH_APIV3_KEY\"\n",
                &env,
                "merchants[0].private_key_env",
                "environment variable UNSET_VARIABLE is not set",
            ),
            (
                "private_key_env = \"MCH_PRIVATE_KEY\"\napiv3_key_env = \"MCH_SHORT_KEY\"\n",
                &env,
                "merchants[0].apiv3_key_env",
                "environment variable MCH_SHORT_KEY: the APIv3 key is 20 bytes",
            ),
            (
                "private_key_env = \"MCH_APIV3_KEY\"\napiv3_key_env = \"MCH_APIV3_KEY\"\n",
                &env,
                "merchants[0].private_key_env",
                "environment variable MCH_APIV3_KEY: not a PEM private key",
            ),
        ];
        for (lines, var, key, what) in cases {
            let cfg = write(
                dir.path(),
                "c.toml",
                &v3_merchant(&(lines.to_owned() + &public_key)),
            );
            let err = load_with(&cfg, var).unwrap_err().to_string();
            assert!(err.contains(&cfg.display().to_string()), "{lines}: {err}");
            assert!(err.contains(key), "{lines}: {err}");
            assert!(err.contains(what), "{lines}: {err}");
            assert_no_secret(&err);
        }
    }
}

//! The database: every SQL statement of the program lives below this module. Callers see
//! typed rows and typed changes, never SQL. The statements the backends share are written once
//! in `sql.rs` (with `?` placeholders, numbered for PostgreSQL), the row mapping once in
//! `rows.rs`; a backend's file keeps what its dialect needs: its claim, how it decodes and binds
//! a time, PostgreSQL's `UNNEST` batches, MySQL's read-back where it has no `RETURNING`.
//!
//! - **Claim**: due open orders, most overdue first, at most `limit`, leased by moving
//!   `next_query_at` to `lease_until` and bumping the `lease` fencing token in the same
//!   statement or transaction (PostgreSQL, MySQL/MariaDB: `FOR UPDATE SKIP LOCKED`; SQLite: one
//!   atomic `UPDATE … RETURNING`).
//! - **Apply**: one transaction with a guarded `UPDATE … WHERE state = from AND lease = n` and,
//!   for a state change, the event `INSERT`. Zero rows means someone else got there first:
//!   nothing is recorded, and the caller counts a no-op.
//! - **Anomaly**: an event without a state change (`PAID_AFTER_CLOSE`), inserted only while the
//!   order is still in `from`, at most once per order (the events' unique key).

mod mysql;
mod postgres;
mod rows;
mod sql;
mod sqlite;

pub use postgres::PgTime;
pub use sqlite::{InstanceLock, parse_sqlite_time};

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rows::Cols;
use sql::{Arg, Statement, reads};

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

use crate::domain::Settlement;
use crate::domain::{
    Anomaly, AppId, Currency, EventTo, Fen, MchId, OrderState, OutTradeNo, Source,
};

/// A database URL. Its password never prints: `Display` and `Debug` show `***` instead.
#[derive(Clone)]
pub struct DatabaseUrl(SecretString);

impl DatabaseUrl {
    pub fn new(url: &str) -> Self {
        DatabaseUrl(SecretString::from(url))
    }

    fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Whether two URLs are the same (for a reload; the password included, never printed).
    pub fn same_as(&self, other: &DatabaseUrl) -> bool {
        self.expose() == other.expose()
    }

    pub fn backend(&self) -> Result<Backend, StoreError> {
        let url = self.expose();
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Ok(Backend::Mysql)
        } else {
            Err(StoreError::Config(format!(
                "{self} is not a sqlite:, postgres:// or mysql:// URL"
            )))
        }
    }

    /// The backend, once its driver has parsed the URL (without connecting): a port out of
    /// range or a bad host is refused here, with the password redacted.
    pub fn check(&self) -> Result<Backend, StoreError> {
        let backend = self.backend()?;
        match backend {
            Backend::Sqlite => sqlite::options(self).map(|_| ()),
            Backend::Postgres => {
                for p in postgres::unknown_parameters(self) {
                    tracing::warn!(
                        parameter = %crate::text::quote(&p),
                        "database.url: ignoring an unknown connection parameter (its value is not shown)"
                    );
                }
                postgres::options(self).map(|_| ())
            }
            Backend::Mysql => mysql::options(self).map(|_| ()),
        }?;
        Ok(backend)
    }

    /// A driver's error about this URL, as a configuration error that never shows the
    /// password: the URL redacted, and the password scrubbed from the driver's own text.
    fn config_error(&self, e: impl fmt::Display) -> StoreError {
        StoreError::Config(format!("{self}: {}", self.scrub(&e.to_string())))
    }

    /// `message` with every secret of this URL replaced by `***`.
    pub fn scrub(&self, message: &str) -> String {
        let url = self.expose();
        let mut out = message.to_owned();
        for span in secret_spans(url) {
            let secret = &url[span];
            if !secret.is_empty() {
                out = out.replace(secret, "***");
            }
        }
        out
    }

    /// The URL with any password replaced by `***`, whether or not it parses.
    pub fn redacted(&self) -> String {
        let url = self.expose();
        let mut out = String::with_capacity(url.len());
        let mut at = 0;
        for span in secret_spans(url) {
            out.push_str(&url[at..span.start]);
            out.push_str("***");
            at = span.end;
        }
        out.push_str(&url[at..]);
        out
    }
}

/// Connection parameters of the three drivers whose values are shown in a redacted URL; the
/// first [`POSTGRES_PLAIN`] of them are those the PostgreSQL driver knows.
const PLAIN_PARAMETERS: [&str; 27] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "application_name",
    "options",
    "sslca",
    "socket",
    "timezone",
    "charset",
    "collation",
    "mode",
    "cache",
    "immutable",
    "vfs",
    "connect_timeout",
];

/// How many of [`PLAIN_PARAMETERS`] the PostgreSQL driver knows (it knows `password` too).
const POSTGRES_PLAIN: usize = 17;

/// The byte ranges of `url` that are secret, in order and disjoint: the password of the
/// userinfo (`scheme://user:PASSWORD@host`) and the values of parameters that may hold one
/// (any but [`PLAIN_PARAMETERS`]). Found by
/// hand, so that a URL no parser accepts (a port out of range, a bad IPv6 literal or host
/// character, an unencoded `/` in the password) is redacted too; on doubt more is hidden.
fn secret_spans(url: &str) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let start = match url.find("://") {
        Some(i) => i + 3,
        None => url.find(':').map_or(0, |i| i + 1),
    };
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let userinfo_end = rest[..authority_end].rfind('@').or_else(|| {
        // No `@` before the first `/`, `?` or `#`: in a URL that does not parse, the password
        // itself may hold one of those.
        if reqwest::Url::parse(url).is_ok() {
            None
        } else {
            rest.rfind('@')
        }
    });
    if let Some(end) = userinfo_end
        && let Some(colon) = rest[..end].find(':')
        && colon + 1 < end
    {
        spans.push(start + colon + 1..start + end);
    }
    // Parameters: the value of any but those known to hold no secret (`password=`, and a
    // mistyped `pasword=` the driver would ignore) is hidden.
    if let Some(q) = url.find('?') {
        let query_end = url[q..].find('#').map_or(url.len(), |i| q + i);
        let mut at = q + 1;
        for pair in url[q + 1..query_end].split('&') {
            if let Some((name, value)) = pair.split_once('=')
                && !value.is_empty()
                && !PLAIN_PARAMETERS.contains(&name.to_ascii_lowercase().as_str())
            {
                let value_start = at + name.len() + 1;
                spans.push(value_start..value_start + value.len());
            }
            at += pair.len() + 1;
        }
    }
    spans.sort_by_key(|s| s.start);
    // Overlapping spans (a `?password=` inside a password) become one.
    let mut merged: Vec<std::ops::Range<usize>> = Vec::with_capacity(spans.len());
    for s in spans {
        match merged.last_mut() {
            Some(last) if s.start <= last.end => last.end = last.end.max(s.end),
            _ => merged.push(s),
        }
    }
    merged
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    Mysql,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
        }
    }
}

/// Database failures, and the states of a write that are none (`NoResult`, `WriterStopped`,
/// `OrderGone`, `KeptMoving`). `is_retryable` separates an outage or a race (keep running,
/// retry) from a problem a retry does not solve.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database configuration: {0}")]
    Config(String),
    #[error(
        "database schema is behind this binary (missing migration {missing}): run `wxpay-reconciler migrate`"
    )]
    SchemaBehind { missing: i64 },
    #[error(
        "database schema has migration {0}, which this binary does not know: upgrade wxpay-reconciler"
    )]
    SchemaAhead(i64),
    #[error("database file {0} does not exist: run `wxpay-reconciler migrate` to create it")]
    NoDatabaseFile(String),
    #[error("migration failed: {0}")]
    Migrate(String),
    #[error("{0}")]
    InstanceRunning(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A statement the database refused or failed (a deadlock, a constraint, a lost
    /// connection mid-query).
    #[error("database error: {0}")]
    Query(String),
    #[error("unexpected row in {table}: {reason}")]
    BadRow { table: &'static str, reason: String },
    /// A backend answered a batch of writes with fewer results than writes: a bug.
    #[error("the database answered no result for a write")]
    NoResult,
    /// The scan's writer stopped before it answered a write (the scan is ending, or its task
    /// failed); the next scan starts a new writer.
    #[error("the scan's writer stopped before the write was answered")]
    WriterStopped,
    /// The order was deleted while it was being written.
    #[error("order {0} disappeared")]
    OrderGone(i64),
    /// Other writers kept moving the order; a later attempt may get through.
    #[error("order {id} kept moving; gave up after {attempts} attempts")]
    KeptMoving { id: i64, attempts: usize },
    /// A request the store refuses before asking the database (a caller's bug).
    #[error("invalid request to the database: {0}")]
    Invalid(String),
}

impl StoreError {
    /// The same error for another caller (a failed batch fails each of its writes).
    pub fn same(&self) -> StoreError {
        self.clone()
    }

    /// An outage or a transient failure: the daemon keeps running and tries again.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unavailable(_)
            | StoreError::Query(_)
            | StoreError::WriterStopped
            | StoreError::KeptMoving { .. } => true,
            StoreError::Config(_)
            | StoreError::SchemaBehind { .. }
            | StoreError::SchemaAhead(_)
            | StoreError::NoDatabaseFile(_)
            | StoreError::Migrate(_)
            | StoreError::InstanceRunning(_)
            | StoreError::BadRow { .. }
            | StoreError::NoResult
            | StoreError::OrderGone(_)
            | StoreError::Invalid(_) => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Configuration(c) => StoreError::Config(c.to_string()),
            other => StoreError::Query(other.to_string()),
        }
    }
}

/// An order claimed by one scan, with the lease that fences its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedOrder {
    pub row: OrderRow,
    pub lease: i64,
}

/// One claimed row: an order, or a row holding a value this program cannot read (which the
/// scan sets aside; its batch-mates go on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    Order(ClaimedOrder),
    Unreadable(UnreadableOrder),
}

impl Claimed {
    /// The order, when the row could be read.
    pub fn into_order(self) -> Option<ClaimedOrder> {
        match self {
            Claimed::Order(o) => Some(o),
            Claimed::Unreadable(_) => None,
        }
    }
}

/// A row of `wxpay_orders` that could not be decoded: what is known of it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableOrder {
    pub id: i64,
    /// The claim's lease, for a claimed row.
    pub lease: Option<i64>,
    pub mch_id: Option<String>,
    pub out_trade_no: Option<String>,
    /// Bounded ([`crate::text::note`]).
    pub reason: String,
}

/// A row read by a listing (`status`): an order, or what can be read of an unreadable one.
pub type OrderRead = Result<OrderRow, UnreadableOrder>;

/// An order set aside, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAsideRow {
    pub id: i64,
    pub mch_id: String,
    pub out_trade_no: String,
    pub state: String,
    pub set_aside_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

impl Applied {
    /// A guarded statement's result: zero rows means someone else got there first.
    pub(crate) fn of(rows_affected: u64) -> Applied {
        if rows_affected == 0 {
            Applied::NoOp
        } else {
            Applied::Done
        }
    }
}

/// Orders needing a person, per merchant: quarantined (`AMOUNT_MISMATCH`) and set aside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attention {
    pub mch_id: String,
    pub amount_mismatch: i64,
    pub set_aside: i64,
}

/// One row of `wxpay_orders`, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRow {
    pub id: i64,
    pub mch_id: MchId,
    pub appid: AppId,
    pub out_trade_no: OutTradeNo,
    pub total_fee: Fen,
    pub state: OrderState,
    pub transaction_id: Option<String>,
    pub paid_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub query_count: i64,
    pub next_query_at: Option<DateTime<Utc>>,
    pub last_queried_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub gave_up_at: Option<DateTime<Utc>>,
    /// The order's currency (`CNY` unless the application set another).
    pub fee_type: Currency,
    /// Set when the daemon set the order aside (a value in its row it cannot use).
    pub set_aside_at: Option<DateTime<Utc>>,
    pub set_aside_reason: Option<String>,
}

/// One row of `wxpay_order_events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub id: i64,
    pub order_id: i64,
    pub mch_id: String,
    pub out_trade_no: String,
    pub from_state: OrderState,
    pub to_state: EventTo,
    pub source: Source,
    pub transaction_id: Option<String>,
    pub total_fee: Option<i64>,
    pub detail: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// What a write may assume: the order is still in `from`, and (for a scan's write) still under
/// the lease it was claimed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    pub order_id: i64,
    pub from: OrderState,
    pub lease: Option<i64>,
}

impl ClaimedOrder {
    pub fn guard(&self) -> Guard {
        Guard {
            order_id: self.row.id,
            from: self.row.state,
            lease: Some(self.lease),
        }
    }
}

/// A write to one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Move to `settlement.to`, and record the event.
    Settle {
        settlement: Settlement,
        /// Who decided; a write of the scan's own (`Source::is_scan`) follows a query of
        /// WeChat and counts in `query_count`.
        source: Source,
    },
    /// Still open: ask again at `at`.
    Reschedule {
        at: DateTime<Utc>,
        note: Option<String>,
    },
    /// Still open, but stop polling.
    GiveUp { reason: String },
    /// Record an event that changes no state (`report.to` is the order's state); once per order.
    Anomaly {
        anomaly: Anomaly,
        report: Settlement,
        source: Source,
    },
}

/// One guarded write of [`Store::apply_many`].
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    pub order: &'a OrderRow,
    pub guard: Guard,
    pub change: &'a Change,
}

/// How a guarded write went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// Zero rows: the order had moved (another writer) or the lease was lost.
    NoOp,
}

/// Open orders of one merchant, for the stuck-order gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSummary {
    pub mch_id: String,
    pub open: i64,
    pub stuck: i64,
    /// Open orders past their expiry (`expires_at`, else creation + the default lifetime).
    pub expired: i64,
    pub oldest_created_at: Option<DateTime<Utc>>,
}

/// The parameters of [`Store::open_summary`].
#[derive(Debug, Clone, Copy)]
pub struct SummaryRequest {
    pub now: DateTime<Utc>,
    /// Open orders created before this are stuck.
    pub stuck_before: DateTime<Utc>,
    /// Orders without `expires_at` created before this have expired.
    pub expired_if_created_before: DateTime<Utc>,
}

/// The parameters of one claim.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest {
    pub now: DateTime<Utc>,
    /// Orders never queried are due at `created_at + grace`.
    pub grace: chrono::TimeDelta,
    pub lease_until: DateTime<Utc>,
    pub limit: u32,
}

/// The database behind the daemon.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
    Mysql(mysql::MySqlStore),
}

/// How to open the database.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub url: DatabaseUrl,
    pub max_connections: u32,
    /// Create a missing SQLite file (only `migrate` does).
    pub create_if_missing: bool,
    pub acquire_timeout: Duration,
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Sqlite($s) => $e,
            Store::Postgres($s) => $e,
            Store::Mysql($s) => $e,
        }
    };
}

/// `$e` with `$pool` the backend's pool and `$d` its [`sql::Dialect`], once per backend.
macro_rules! on_pool {
    ($self:ident, |$pool:ident, $d:ident| $e:expr) => {
        match $self {
            Store::Sqlite(s) => {
                type $d = sqlx::Sqlite;
                let $pool = &s.pool;
                $e
            }
            Store::Postgres(s) => {
                type $d = sqlx::Postgres;
                let $pool = &s.pool;
                $e
            }
            Store::Mysql(s) => {
                type $d = sqlx::MySql;
                let $pool = &s.pool;
                $e
            }
        }
    };
}

/// Runs a shared read and maps every row with `$map`.
macro_rules! fetch_all {
    ($self:ident, $stmt:expr, $map:expr) => {{
        let stmt = $stmt;
        on_pool!($self, |pool, D| rows::all(
            &stmt.query::<D>().fetch_all(pool).await?,
            $map
        ))
    }};
}

mod refunds;

pub use refunds::{
    ClaimedRefund, ClaimedRefundRow, RefundApplied, RefundChange, RefundClaim, RefundGuard,
    RefundOutcome, RefundRead, RefundRow, RefundSummary, UnreadableRefund,
};

mod bills;

pub use bills::{
    BillClaim, BillClaimRequest, BillEnd, BillOrigin, BillRecord, BillState, BillTotals,
    FindingAction, FindingKind, FindingObject, FindingRow, IdSpan, NewFinding,
};

impl Store {
    /// Opens a pool. Connections are made lazily, so an outage at start-up is reported by the
    /// first query, not here (except a missing SQLite file).
    pub async fn connect(options: &ConnectOptions) -> Result<Store, StoreError> {
        match options.url.backend()? {
            Backend::Sqlite => Ok(Store::Sqlite(sqlite::SqliteStore::connect(options).await?)),
            Backend::Postgres => Ok(Store::Postgres(postgres::PgStore::connect(options)?)),
            Backend::Mysql => Ok(Store::Mysql(mysql::MySqlStore::connect(options)?)),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Store::Sqlite(_) => Backend::Sqlite,
            Store::Postgres(_) => Backend::Postgres,
            Store::Mysql(_) => Backend::Mysql,
        }
    }

    /// For SQLite, the lock that makes the daemon the database's only instance (a second one
    /// fails with [`StoreError::InstanceRunning`]); server databases coordinate instances with
    /// row locks and need none.
    pub fn lock_instance(&self) -> Result<Option<InstanceLock>, StoreError> {
        match self {
            Store::Sqlite(s) => s.lock_instance().map(Some),
            Store::Postgres(_) | Store::Mysql(_) => Ok(None),
        }
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self {
            Store::Sqlite(_) => &sqlite::MIGRATOR,
            Store::Postgres(_) => &postgres::MIGRATOR,
            Store::Mysql(_) => &mysql::MIGRATOR,
        }
    }

    /// Refuses a MySQL/MariaDB server too old for this program (the others pass).
    async fn check_server(&self) -> Result<(), StoreError> {
        match self {
            Store::Mysql(s) => s.check_server().await,
            Store::Sqlite(_) | Store::Postgres(_) => Ok(()),
        }
    }

    /// Applies the migrations this binary carries.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.check_server().await?;
        let migrator = self.migrator();
        dispatch!(self, s => migrator.run(&s.pool).await)
            .map_err(|e| StoreError::Migrate(e.to_string()))
    }

    async fn applied_migrations(&self) -> Result<Vec<i64>, StoreError> {
        self.check_server().await?;
        let table = match self {
            Store::Sqlite(_) => sqlite::MIGRATIONS_TABLE,
            Store::Postgres(_) => postgres::MIGRATIONS_TABLE,
            Store::Mysql(_) => mysql::MIGRATIONS_TABLE,
        };
        let exists = fetch_all!(self, Statement::new(table, Vec::new()), |r| r.int("n"))?;
        if exists.iter().sum::<i64>() == 0 {
            return Ok(Vec::new());
        }
        fetch_all!(self, Statement::new(reads::MIGRATIONS, Vec::new()), |r| r
            .int("version"))
    }

    /// Fails unless every migration this binary carries is applied (and no unknown one is).
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let applied = self.applied_migrations().await?;
        let known: Vec<i64> = self.migrator().iter().map(|m| m.version).collect();
        if let Some(missing) = known.iter().find(|v| !applied.contains(v)) {
            return Err(StoreError::SchemaBehind { missing: *missing });
        }
        if let Some(ahead) = applied.iter().find(|v| !known.contains(v)) {
            return Err(StoreError::SchemaAhead(*ahead));
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, |pool, D| sqlx::query::<D>("SELECT 1")
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Claims due orders (see the module documentation). Each row is decoded on its own: an
    /// unreadable one comes back as [`Claimed::Unreadable`], leased like the others.
    pub async fn claim_due(&self, req: &ClaimRequest) -> Result<Vec<Claimed>, StoreError> {
        dispatch!(self, s => s.claim_due(req).await)
    }

    /// Sets an open order aside: it keeps its state and is no longer queried (`gave_up_at`
    /// too, so the scan's indexes leave it out) until a person clears `set_aside_at`. Guarded
    /// by the claim's lease when there is one; `reason` is bounded here.
    pub async fn set_aside(
        &self,
        id: i64,
        lease: Option<i64>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        let reason = crate::text::note(reason);
        let stmt = sql::set_aside(id, lease, &reason, now);
        on_pool!(self, |pool, D| Ok(Applied::of(
            <D as sql::Dialect>::affected(&stmt.query::<D>().execute(pool).await?)
        )))
    }

    /// Quarantined and set-aside orders per merchant (the gauges of orders needing a person).
    pub async fn attention(&self) -> Result<Vec<Attention>, StoreError> {
        let sql = match self {
            Store::Mysql(_) => mysql::ATTENTION,
            Store::Sqlite(_) | Store::Postgres(_) => reads::ATTENTION,
        };
        fetch_all!(self, Statement::new(sql, Vec::new()), Attention::of)
    }

    /// The orders set aside, latest first.
    pub async fn set_aside_orders(&self, limit: u32) -> Result<Vec<SetAsideRow>, StoreError> {
        let args = vec![Arg::Int(i64::from(limit))];
        fetch_all!(
            self,
            Statement::new(reads::SET_ASIDE, args),
            SetAsideRow::of
        )
    }

    /// Applies one guarded change; `now` stamps it.
    pub async fn apply(
        &self,
        order: &OrderRow,
        guard: Guard,
        change: &Change,
        now: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        let write = Write {
            order,
            guard,
            change,
        };
        let mut applied = self.apply_many(std::slice::from_ref(&write), now).await?;
        applied.pop().ok_or(StoreError::NoResult)
    }

    /// Applies several guarded changes in one transaction: one commit for all (the scanner's
    /// writer batches what its queries produce), each with its own guard and result.
    /// PostgreSQL writes a batch's settlements and its reschedules as one statement each;
    /// SQLite and MySQL write them one after the other.
    pub async fn apply_many(
        &self,
        writes: &[Write<'_>],
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>, StoreError> {
        if let Store::Postgres(s) = self {
            return s.apply_many(writes, now).await;
        }
        on_pool!(self, |pool, D| {
            let mut tx = pool.begin().await?;
            let applied = sql::apply_in_order::<D>(&mut tx, writes, now).await?;
            tx.commit().await?;
            Ok(applied)
        })
    }

    /// Open orders per merchant: how many, how many stuck, how many expired, the oldest.
    pub async fn open_summary(&self, req: &SummaryRequest) -> Result<Vec<OpenSummary>, StoreError> {
        fetch_all!(
            self,
            reads::open_summary(self.backend(), req),
            rows::open_summary
        )
    }

    /// Orders per state.
    pub async fn count_by_state(&self) -> Result<Vec<(OrderState, i64)>, StoreError> {
        let stmt = Statement::new(reads::COUNT_BY_STATE, Vec::new());
        fetch_all!(self, stmt, rows::state_count)
    }

    /// The order rows of a shared read; an unreadable one is listed as such.
    async fn orders(&self, sql: String, args: Vec<Arg<'_>>) -> Result<Vec<OrderRead>, StoreError> {
        fetch_all!(self, Statement::new(sql, args), rows::order_read)
    }

    /// The event rows of a shared read.
    async fn event_rows(
        &self,
        sql: String,
        args: Vec<Arg<'_>>,
    ) -> Result<Vec<EventRow>, StoreError> {
        fetch_all!(self, Statement::new(sql, args), rows::event_row)
    }

    /// The oldest open orders; an unreadable one is listed as such.
    pub async fn oldest_open(&self, limit: u32) -> Result<Vec<OrderRead>, StoreError> {
        self.orders(reads::oldest_open(), vec![Arg::Int(i64::from(limit))])
            .await
    }

    /// The order of this merchant with this out_trade_no.
    pub async fn find_order(
        &self,
        mch_id: &str,
        out_trade_no: &str,
    ) -> Result<Option<OrderRow>, StoreError> {
        let args = vec![Arg::Text(mch_id), Arg::Text(out_trade_no)];
        let rows = self.orders(reads::find_of_merchant(), args).await?;
        Ok(readable(rows)?.pop())
    }

    /// One order by id.
    pub async fn order(&self, id: i64) -> Result<Option<OrderRow>, StoreError> {
        let rows = self.orders(reads::by_id(), vec![Arg::Int(id)]).await?;
        Ok(readable(rows)?.pop())
    }

    /// The latest `PAID_AFTER_CLOSE` events, newest first: payments the merchant must refund
    /// or fulfil.
    pub async fn paid_after_close(&self, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let args = vec![Arg::Int(i64::from(limit))];
        self.event_rows(reads::paid_after_close(), args).await
    }

    /// Orders with this out_trade_no (one per merchant at most).
    pub async fn find(&self, out_trade_no: &str) -> Result<Vec<OrderRow>, StoreError> {
        readable(
            self.orders(reads::find(), vec![Arg::Text(out_trade_no)])
                .await?,
        )
    }

    /// At most `limit` orders in `state`, oldest id first (the demo; an operator's tools).
    pub async fn find_by_state(
        &self,
        state: OrderState,
        limit: u32,
    ) -> Result<Vec<OrderRow>, StoreError> {
        let args = vec![Arg::Text(state.as_str()), Arg::Int(i64::from(limit))];
        readable(self.orders(reads::in_state(), args).await?)
    }

    /// The events of one order, oldest first.
    pub async fn events(&self, order_id: i64) -> Result<Vec<EventRow>, StoreError> {
        self.event_rows(reads::events_of_order(), vec![Arg::Int(order_id)])
            .await
    }

    /// The outbox: events with `id > after`, in order, at most `limit`.
    pub async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<EventRow>, StoreError> {
        let args = vec![Arg::Int(after), Arg::Int(i64::from(limit))];
        self.event_rows(reads::events_after(), args).await
    }

    /// Registers an order exactly as the merchant's application does (the contract's INSERT,
    /// with every other column left to its default). Used by `demo` and benchmarks.
    pub async fn insert_order(&self, order: &NewOrder<'_>) -> Result<i64, StoreError> {
        if let Store::Mysql(s) = self {
            return s.insert_order(order).await;
        }
        let ids = fetch_all!(self, sql::insert_order(order, true), |r| r.int("id"))?;
        ids.first().copied().ok_or(StoreError::NoResult)
    }
}

/// The four columns a merchant's application sets.
#[derive(Debug, Clone, Copy)]
pub struct NewOrder<'a> {
    pub mch_id: &'a str,
    pub appid: &'a str,
    pub out_trade_no: &'a str,
    pub total_fee: i64,
}

/// The rows, or the error of the first one that cannot be read.
fn readable(rows: Vec<OrderRead>) -> Result<Vec<OrderRow>, StoreError> {
    rows.into_iter()
        .map(|r| {
            r.map_err(|u| StoreError::BadRow {
                table: "wxpay_orders",
                reason: format!("order {}: {}", u.id, u.reason),
            })
        })
        .collect()
}

pub(crate) fn parse_state(table: &'static str, s: &str) -> Result<OrderState, StoreError> {
    OrderState::from_str(s).map_err(|e| StoreError::BadRow {
        table,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_states_of_a_write_are_no_database_errors() {
        assert!(StoreError::WriterStopped.is_retryable());
        assert!(StoreError::KeptMoving { id: 7, attempts: 4 }.is_retryable());
        assert!(!StoreError::OrderGone(7).is_retryable());
        assert!(!StoreError::NoResult.is_retryable());
        assert_eq!(StoreError::OrderGone(7).to_string(), "order 7 disappeared");
        for e in [
            StoreError::WriterStopped,
            StoreError::OrderGone(7),
            StoreError::NoResult,
        ] {
            assert!(!e.to_string().starts_with("database error"), "{e}");
            assert_eq!(e.same().to_string(), e.to_string());
        }
    }

    #[test]
    fn a_database_password_never_prints() {
        let url = DatabaseUrl::new("postgres://app:s3cret-pw@db.internal:5432/shop");
        for shown in [url.to_string(), format!("{url:?}"), url.redacted()] {
            assert!(!shown.contains("s3cret-pw"), "{shown}");
            assert!(shown.contains("app:***@db.internal"), "{shown}");
        }
        assert_eq!(url.backend().unwrap(), Backend::Postgres);
        assert_eq!(
            DatabaseUrl::new("sqlite:///var/lib/x.db")
                .backend()
                .unwrap(),
            Backend::Sqlite
        );
        let err = DatabaseUrl::new("oracle://u:pw123@h/db")
            .backend()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("pw123"), "{err}");
    }

    #[test]
    fn a_url_that_does_not_parse_is_redacted_too() {
        for (url, shown) in [
            (
                "postgres://app:pw123@db:99999/x",
                "postgres://app:***@db:99999/x",
            ),
            ("postgres://app:pw123@[::1/x", "postgres://app:***@[::1/x"),
            ("mysql://app:pw123@d b/x", "mysql://app:***@d b/x"),
            ("mysql://app:pw/12@3@db/x", "mysql://app:***@db/x"),
            (
                "postgres://db/x?sslmode=require&password=pw123",
                "postgres://db/x?sslmode=require&password=***",
            ),
            ("postgres://app@db/x", "postgres://app@db/x"),
            (
                "postgres://app@db/x?application_name=a&pasword=pw123#f",
                "postgres://app@db/x?application_name=a&pasword=***#f",
            ),
            (
                "sqlite:///var/lib/x.db?mode=rwc",
                "sqlite:///var/lib/x.db?mode=rwc",
            ),
        ] {
            let u = DatabaseUrl::new(url);
            assert_eq!(u.redacted(), shown);
            assert_eq!(format!("{u:?}"), format!("DatabaseUrl({shown})"));
            let secret = if url.contains("pw/12@3") {
                "pw/12@3"
            } else {
                "pw123"
            };
            assert!(
                !shown.contains("***") || !u.scrub(&format!("at {secret}")).contains(secret),
                "{url}"
            );
        }
        let err = DatabaseUrl::new("postgres://app:pw123@db:99999/x")
            .check()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("app:***@db") && !err.contains("pw123"),
            "{err}"
        );
        assert!(
            DatabaseUrl::new("postgres://app:pw123@db/x")
                .check()
                .is_ok()
        );
    }
}

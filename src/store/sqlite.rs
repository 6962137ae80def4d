//! SQLite: one daemon per database file; a claim is one atomic `UPDATE … RETURNING`.
//! Timestamps are UTC text in SQLite's own `YYYY-MM-DD HH:MM:SS[.SSS]` form.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteQueryResult, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, migrate::Migrator};

// Every dynamic statement below is built from this module's constants only; values are always
// bound parameters.

use super::rows::{self, Cols, DialectRow};
use super::sql::{Arg, Dialect, OPEN_STATES_SQL, ORDER_COLUMNS, Statement};
use super::{ClaimRequest, Claimed, ConnectOptions, StoreError};

pub(super) static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// SQLite's text form of a UTC time, with milliseconds.
pub fn ts(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// Parses a stored timestamp: SQLite's own form `YYYY-MM-DD HH:MM:SS[.fff]` (UTC), also
/// with `T` for the space, and with a time zone its date functions read (`Z`, `+HH:MM`,
/// `-HH:MM`, what Python's sqlite3 writes for an aware datetime), converted to UTC. Anything
/// else, or a time that does not exist (February 31st), is an error, never a panic.
pub fn parse_ts(s: &str) -> Result<DateTime<Utc>, StoreError> {
    parse_sqlite_time(s).map_err(|why| StoreError::BadRow {
        table: "wxpay_orders",
        reason: format!(
            "timestamp {} is not a UTC time 'YYYY-MM-DD HH:MM:SS[.SSS]' (Z or ±HH:MM allowed): {why}",
            crate::text::quote(s)
        ),
    })
}

/// [`parse_ts`] without the error type (for the fuzz target and the property tests).
pub fn parse_sqlite_time(s: &str) -> Result<DateTime<Utc>, &'static str> {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    if b.len() < 19
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || !matches!(b[10], b' ' | b'T')
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return Err("not YYYY-MM-DD HH:MM:SS");
    }
    let num = |range: std::ops::Range<usize>| {
        b[range]
            .iter()
            .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
    };
    let date = chrono::NaiveDate::from_ymd_opt(num(0..4) as i32, num(5..7), num(8..10))
        .ok_or("no such date")?;
    let mut rest = &b[19..];
    let mut nanos = 0u32;
    if let Some((b'.', frac)) = rest.split_first() {
        let n = frac.iter().take_while(|d| d.is_ascii_digit()).count();
        if n == 0 {
            return Err("a '.' without digits");
        }
        // Nanoseconds from the first nine digits; further digits are below what is kept.
        for i in 0..9 {
            nanos = nanos * 10
                + frac
                    .get(i)
                    .filter(|_| i < n)
                    .map_or(0, |d| u32::from(d - b'0'));
        }
        rest = &frac[n..];
    }
    let time = chrono::NaiveTime::from_hms_nano_opt(num(11..13), num(14..16), num(17..19), nanos)
        .ok_or("no such time of day")?;
    while let Some((b' ', tail)) = rest.split_first() {
        rest = tail;
    }
    let offset_seconds: i32 = match rest {
        [] | [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()) =>
        {
            let hours = i32::from(h1 - b'0') * 10 + i32::from(h2 - b'0');
            let minutes = i32::from(m1 - b'0') * 10 + i32::from(m2 - b'0');
            if hours > 23 || minutes > 59 {
                return Err("time zone offset out of range");
            }
            let seconds = hours * 3600 + minutes * 60;
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return Err("unexpected text after the time"),
    };
    let local = date.and_time(time);
    local
        .checked_sub_signed(chrono::TimeDelta::seconds(i64::from(offset_seconds)))
        .map(|utc| utc.and_utc())
        .ok_or("out of range")
}

/// A day as SQLite's `date()` writes it, `YYYY-MM-DD` exactly.
fn parse_date(s: &str) -> Option<chrono::NaiveDate> {
    let b = s.as_bytes();
    let form = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !form {
        return None;
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()
}

impl DialectRow for SqliteRow {
    fn ts(&self, column: &str) -> Result<DateTime<Utc>, StoreError> {
        parse_ts(&self.try_get::<String, _>(column)?)
    }

    fn opt_ts(&self, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.try_get::<Option<String>, _>(column)?
            .as_deref()
            .map(parse_ts)
            .transpose()
    }

    fn date(&self, column: &str) -> Result<chrono::NaiveDate, StoreError> {
        let s = self.try_get::<String, _>(column)?;
        parse_date(&s).ok_or_else(|| StoreError::BadRow {
            table: "wxpay_bills",
            reason: format!(
                "{column} {} is not a day 'YYYY-MM-DD'",
                crate::text::quote(&s)
            ),
        })
    }

    /// `INTEGER` is 64 bits.
    fn query_count(&self) -> Result<i64, StoreError> {
        self.int("query_count")
    }
}

impl Dialect for Sqlite {
    type Time = String;

    fn time(t: DateTime<Utc>) -> String {
        ts(t)
    }

    type Date = String;

    fn date(d: chrono::NaiveDate) -> String {
        d.format("%Y-%m-%d").to_string()
    }

    fn affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    const ON_CONFLICT: bool = true;
    /// SQLite has no `UPDATE` inside `WITH`.
    const WRITABLE_CTE: bool = false;
}

/// Whether the migrations' own table exists (`n` is 0 or 1).
pub(super) const MIGRATIONS_TABLE: &str =
    "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'";

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    path: std::path::PathBuf,
}

/// Held by the one daemon running on a SQLite database; released when dropped (or when the
/// process dies, however it dies).
#[derive(Debug)]
pub struct InstanceLock {
    _file: std::fs::File,
}

/// The driver's options for `url`; its errors never show a password.
pub(super) fn options(url: &super::DatabaseUrl) -> Result<SqliteConnectOptions, StoreError> {
    SqliteConnectOptions::from_str(url.expose()).map_err(|e| url.config_error(e))
}

impl SqliteStore {
    pub async fn connect(options: &ConnectOptions) -> Result<SqliteStore, StoreError> {
        let url = options.url.expose();
        let connect = self::options(&options.url)?;
        let path = connect.get_filename().to_owned();
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        if !options.create_if_missing && !in_memory && !path.exists() {
            return Err(StoreError::NoDatabaseFile(path.display().to_string()));
        }
        let connect = connect
            .create_if_missing(options.create_if_missing)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: an application crash loses nothing; a power loss may lose the last
            // transactions, which the next scan re-queries and settles again.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        // One writer at a time is SQLite's nature; a few readers suffice, and each connection
        // carries its own page cache.
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.clamp(1, 4))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        Ok(SqliteStore { pool, path })
    }

    /// Takes the database's instance lock (`<file>.lock` beside it), or fails when another
    /// daemon holds it: SQLite has one writer, so it is for one instance.
    pub fn lock_instance(&self) -> Result<InstanceLock, StoreError> {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".lock");
        let lock_path = std::path::PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::Config(format!("cannot open {}: {e}", lock_path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(InstanceLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InstanceRunning(format!(
                "another wxpay-reconciler is running on SQLite database {} (it holds {}); \
                 SQLite serves one instance: stop the other, or use PostgreSQL or MySQL to run several",
                self.path.display(),
                lock_path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Config(format!(
                "cannot lock {}: {e}",
                lock_path.display()
            ))),
        }
    }

    pub async fn claim_due(&self, req: &ClaimRequest) -> Result<Vec<Claimed>, StoreError> {
        let grace_modifier = format!(
            "+{:.3} seconds",
            req.grace.num_milliseconds() as f64 / 1000.0
        );
        let sql = format!(
            "UPDATE wxpay_orders SET next_query_at = ?4, lease = lease + 1, updated_at = ?2
             WHERE id IN (
                SELECT id FROM (
                    SELECT id, due FROM (
                        SELECT id, strftime('%Y-%m-%d %H:%M:%f', created_at, ?5) AS due FROM wxpay_orders
                        WHERE state IN ({OPEN_STATES_SQL}) AND gave_up_at IS NULL
                          AND next_query_at IS NULL AND created_at <= ?1
                        ORDER BY created_at LIMIT ?3)
                    UNION ALL
                    SELECT id, due FROM (
                        SELECT id, next_query_at AS due FROM wxpay_orders
                        WHERE state IN ({OPEN_STATES_SQL}) AND gave_up_at IS NULL
                          AND next_query_at IS NOT NULL AND next_query_at <= ?2
                        ORDER BY next_query_at LIMIT ?3)
                ) ORDER BY due LIMIT ?3)
             RETURNING lease, {ORDER_COLUMNS}"
        );
        let args = vec![
            Arg::Time(req.now - req.grace),
            Arg::Time(req.now),
            Arg::Int(i64::from(req.limit)),
            Arg::Time(req.lease_until),
            Arg::Text(&grace_modifier),
        ];
        let rows = Statement::new(sql, args)
            .query::<Sqlite>()
            .fetch_all(&self.pool)
            .await?;
        rows::all(&rows, rows::claimed)
    }
}

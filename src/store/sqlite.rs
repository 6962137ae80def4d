//! SQLite: one daemon per database file; a claim is one atomic `UPDATE … RETURNING`.
//! Timestamps are UTC text in SQLite's own `YYYY-MM-DD HH:MM:SS[.SSS]` form.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, migrate::Migrator};

// Every dynamic statement below is built from this module's constants only; values are always
// bound parameters.

use super::{
    Applied, Arg, Attention, Change, ClaimRequest, Claimed, ClaimedOrder, ConnectOptions, EventRow,
    Guard, NewOrder, OPEN_STATES_SQL, ORDER_COLUMNS, OpenSummary, OrderRead, OrderRow, SetAsideRow,
    StoreError, SummaryRequest, UnreadableOrder, Write, change_note, parse_state, reads,
};
use crate::domain::OrderState;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

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

fn opt_ts(r: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    r.try_get::<Option<String>, _>(column)?
        .as_deref()
        .map(parse_ts)
        .transpose()
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
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

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migrate(e.to_string()))
    }

    pub fn known_migrations(&self) -> Vec<i64> {
        MIGRATOR.iter().map(|m| m.version).collect()
    }

    pub async fn applied_migrations(&self) -> Result<Vec<i64>, StoreError> {
        let exists: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&self.pool)
        .await?;
        if exists == 0 {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
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
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(ts(req.now - req.grace))
            .bind(ts(req.now))
            .bind(i64::from(req.limit))
            .bind(ts(req.lease_until))
            .bind(grace_modifier)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(claimed).collect()
    }

    pub async fn set_aside(
        &self,
        id: i64,
        lease: Option<i64>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        let done = sqlx::query(AssertSqlSafe(format!(
            "UPDATE wxpay_orders SET set_aside_at = ?1, set_aside_reason = ?2, gave_up_at = ?1,
                last_error = ?2, updated_at = ?1
             WHERE id = ?3 AND (?4 IS NULL OR lease = ?4) AND state IN ({OPEN_STATES_SQL})
               AND set_aside_at IS NULL"
        )))
        .bind(ts(now))
        .bind(reason)
        .bind(id)
        .bind(lease)
        .execute(&self.pool)
        .await?;
        Ok(Applied::of(done.rows_affected()))
    }

    pub async fn attention(&self) -> Result<Vec<Attention>, StoreError> {
        let rows = sqlx::query(reads::ATTENTION).fetch_all(&self.pool).await?;
        rows.iter().map(Attention::of).collect()
    }

    pub async fn set_aside_orders(&self, limit: u32) -> Result<Vec<SetAsideRow>, StoreError> {
        let rows = sqlx::query(reads::SET_ASIDE)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        // Written by the daemon; shown as missing rather than failing `status`.
        rows.iter()
            .map(|r| SetAsideRow::of(r, opt_ts(r, "set_aside_at").unwrap_or(None)))
            .collect()
    }

    /// Applies several guarded writes in one transaction (one commit, one fsync); each keeps
    /// its own guard and its own result.
    pub async fn apply_many(
        &self,
        writes: &[Write<'_>],
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut applied = Vec::with_capacity(writes.len());
        for w in writes {
            applied.push(apply_one(&mut tx, w.order, w.guard, w.change, now).await?);
        }
        tx.commit().await?;
        Ok(applied)
    }
}

async fn apply_one(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    order: &OrderRow,
    guard: Guard,
    change: &Change,
    now: DateTime<Utc>,
) -> Result<Applied, StoreError> {
    let note = change_note(change);
    let note = note.as_deref();
    let now_s = ts(now);
    let updated = match change {
        Change::Settle {
            settlement,
            queried,
            ..
        } => {
            sqlx::query(
                "UPDATE wxpay_orders SET state = ?1,
                    transaction_id = COALESCE(?2, transaction_id),
                    paid_at = COALESCE(?3, paid_at),
                    query_count = query_count + ?4,
                    last_queried_at = CASE WHEN ?4 = 1 THEN ?5 ELSE last_queried_at END,
                    last_error = ?6, updated_at = ?5
                 WHERE id = ?7 AND state = ?8 AND (?9 IS NULL OR lease = ?9)",
            )
            .bind(settlement.to.as_str())
            .bind(settlement.transaction_id.as_ref().map(|t| t.as_str()))
            .bind(settlement.paid_at.map(ts))
            .bind(i64::from(*queried))
            .bind(&now_s)
            .bind(note)
            .bind(guard.order_id)
            .bind(guard.from.as_str())
            .bind(guard.lease)
            .execute(&mut **tx)
            .await?
        }
        Change::Reschedule { at, .. } => {
            sqlx::query(
                "UPDATE wxpay_orders SET next_query_at = ?1, query_count = query_count + 1,
                    last_queried_at = ?2, last_error = ?3, updated_at = ?2
                 WHERE id = ?4 AND state = ?5 AND (?6 IS NULL OR lease = ?6)",
            )
            .bind(ts(*at))
            .bind(&now_s)
            .bind(note)
            .bind(guard.order_id)
            .bind(guard.from.as_str())
            .bind(guard.lease)
            .execute(&mut **tx)
            .await?
        }
        Change::GiveUp { .. } => {
            sqlx::query(
                "UPDATE wxpay_orders SET gave_up_at = ?1, query_count = query_count + 1,
                    last_queried_at = ?1, last_error = ?2, updated_at = ?1
                 WHERE id = ?3 AND state = ?4 AND (?5 IS NULL OR lease = ?5)",
            )
            .bind(&now_s)
            .bind(note)
            .bind(guard.order_id)
            .bind(guard.from.as_str())
            .bind(guard.lease)
            .execute(&mut **tx)
            .await?
        }
        // The event only while the order is still in `from`; a second one is no error.
        Change::Anomaly {
            anomaly,
            report,
            source,
        } => {
            let inserted = sqlx::query(
                "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state,
                    to_state, source, transaction_id, total_fee, detail, created_at)
                 SELECT id, mch_id, out_trade_no, state, ?1, ?2, ?3, ?4, ?5, ?6 FROM wxpay_orders
                 WHERE id = ?7 AND state = ?8
                 ON CONFLICT (order_id, to_state) DO NOTHING",
            )
            .bind(anomaly.as_str())
            .bind(source.as_str())
            .bind(report.transaction_id.as_ref().map(|t| t.as_str()))
            .bind(report.reported_fee.map(|f| f.get()))
            .bind(note)
            .bind(&now_s)
            .bind(guard.order_id)
            .bind(guard.from.as_str())
            .execute(&mut **tx)
            .await?;
            return Ok(if inserted.rows_affected() == 0 {
                Applied::NoOp
            } else {
                Applied::Done
            });
        }
    };
    if updated.rows_affected() == 0 {
        return Ok(Applied::NoOp);
    }
    if let Change::Settle {
        settlement, source, ..
    } = change
    {
        sqlx::query(
            "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state,
                to_state, source, transaction_id, total_fee, detail, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .bind(order.id)
        .bind(&order.mch_id)
        .bind(&order.out_trade_no)
        .bind(guard.from.as_str())
        .bind(settlement.to.as_str())
        .bind(source.as_str())
        .bind(settlement.transaction_id.as_ref().map(|t| t.as_str()))
        .bind(settlement.reported_fee.map(|f| f.get()))
        .bind(note)
        .bind(&now_s)
        .execute(&mut **tx)
        .await?;
    }
    Ok(Applied::Done)
}

impl SqliteStore {
    pub async fn open_summary(&self, req: &SummaryRequest) -> Result<Vec<OpenSummary>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT mch_id, COUNT(*) AS open,
                    SUM(CASE WHEN created_at < ?1 THEN 1 ELSE 0 END) AS stuck,
                    SUM(CASE WHEN expires_at <= ?2 OR (expires_at IS NULL AND created_at <= ?3)
                        THEN 1 ELSE 0 END) AS expired,
                    MIN(created_at) AS oldest
             FROM wxpay_orders WHERE state IN ({OPEN_STATES_SQL}) GROUP BY mch_id"
        )))
        .bind(ts(req.stuck_before))
        .bind(ts(req.now))
        .bind(ts(req.expired_if_created_before))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OpenSummary {
                    mch_id: r.try_get("mch_id")?,
                    open: r.try_get("open")?,
                    stuck: r.try_get("stuck")?,
                    expired: r.try_get("expired")?,
                    // A creation time that is no time is no age to show.
                    oldest_created_at: opt_ts(r, "oldest").unwrap_or(None),
                })
            })
            .collect()
    }

    pub async fn count_by_state(&self) -> Result<Vec<(OrderState, i64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM wxpay_orders GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok((parse_state("wxpay_orders", &state)?, r.try_get("n")?))
            })
            .collect()
    }

    /// Runs one of the shared read queries (`store::reads`) and maps its order rows.
    pub(crate) async fn orders(
        &self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<OrderRead>, StoreError> {
        let mut q = sqlx::query(AssertSqlSafe(sql.to_owned()));
        for a in args {
            q = match a {
                Arg::Int(i) => q.bind(*i),
                Arg::Text(t) => q.bind(*t),
            };
        }
        let rows = q.fetch_all(&self.pool).await?;
        Ok(rows
            .iter()
            .map(|r| order_row(r).map_err(|e| UnreadableOrder::of(r, None, &e)))
            .collect())
    }

    /// Runs one of the shared read queries (`store::reads`) and maps its event rows.
    pub(crate) async fn events(
        &self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<EventRow>, StoreError> {
        let mut q = sqlx::query(AssertSqlSafe(sql.to_owned()));
        for a in args {
            q = match a {
                Arg::Int(i) => q.bind(*i),
                Arg::Text(t) => q.bind(*t),
            };
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(event_row).collect()
    }

    pub async fn insert_order(&self, order: &NewOrder<'_>) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee)
             VALUES (?1, ?2, ?3, ?4) RETURNING id",
        )
        .bind(order.mch_id)
        .bind(order.appid)
        .bind(order.out_trade_no)
        .bind(order.total_fee)
        .fetch_one(&self.pool)
        .await?)
    }
}

fn event_row(r: &SqliteRow) -> Result<EventRow, StoreError> {
    Ok(EventRow {
        id: r.try_get("id")?,
        order_id: r.try_get("order_id")?,
        mch_id: r.try_get("mch_id")?,
        out_trade_no: r.try_get("out_trade_no")?,
        from_state: r.try_get("from_state")?,
        to_state: r.try_get("to_state")?,
        source: r.try_get("source")?,
        transaction_id: r.try_get("transaction_id")?,
        total_fee: r.try_get("total_fee")?,
        detail: r.try_get("detail")?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
    })
}

/// A claimed row, decoded on its own: an unreadable one is still leased and comes back as such.
fn claimed(r: &SqliteRow) -> Result<Claimed, StoreError> {
    let lease: i64 = r.try_get("lease")?;
    Ok(match order_row(r) {
        Ok(row) => Claimed::Order(ClaimedOrder { row, lease }),
        Err(e) => Claimed::Unreadable(UnreadableOrder::of(r, Some(lease), &e)),
    })
}

fn order_row(r: &SqliteRow) -> Result<OrderRow, StoreError> {
    let state: String = r.try_get("state")?;
    Ok(OrderRow {
        id: r.try_get("id")?,
        mch_id: r.try_get("mch_id")?,
        appid: r.try_get("appid")?,
        out_trade_no: r.try_get("out_trade_no")?,
        total_fee: r.try_get("total_fee")?,
        state: parse_state("wxpay_orders", &state)?,
        transaction_id: r.try_get("transaction_id")?,
        paid_at: opt_ts(r, "paid_at")?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
        expires_at: opt_ts(r, "expires_at")?,
        query_count: r.try_get("query_count")?,
        next_query_at: opt_ts(r, "next_query_at")?,
        last_queried_at: opt_ts(r, "last_queried_at")?,
        last_error: r.try_get("last_error")?,
        gave_up_at: opt_ts(r, "gave_up_at")?,
        fee_type: r.try_get("fee_type")?,
        set_aside_at: opt_ts(r, "set_aside_at")?,
        set_aside_reason: r.try_get("set_aside_reason")?,
    })
}

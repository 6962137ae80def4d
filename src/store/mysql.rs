//! MySQL 8.0.19+ / MariaDB 10.6+: `FOR UPDATE SKIP LOCKED` claims, so several daemons share one
//! database. Neither has `UPDATE … RETURNING`, so a claim is a short transaction: lock the due
//! rows (skipping rows other instances hold), lease them, read them back.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::mysql::{
    MySql, MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlQueryResult, MySqlRow,
};
use sqlx::{Executor, Row, migrate::Migrator};

// Every dynamic statement below is built from this module's constants and `?` placeholders
// only; values are always bound parameters.

use super::rows::{self, DialectRow};
use super::sql::{self, Arg, Dialect, ORDER_COLUMNS, Statement};
use super::{ClaimRequest, Claimed, ConnectOptions, NewOrder, StoreError};
use crate::domain::OrderState;

pub(super) static MIGRATOR: Migrator = sqlx::migrate!("migrations/mysql");

/// Whether the migrations' own table exists (`n` is 0 or 1).
pub(super) const MIGRATIONS_TABLE: &str = "SELECT COUNT(*) AS n FROM information_schema.tables
     WHERE table_schema = DATABASE() AND table_name = '_sqlx_migrations'";

/// Quarantined and set-aside orders per merchant: two ranges of two indexes (MySQL has no
/// partial ones), the AMOUNT_MISMATCH range of `wxpay_orders_open` and the non-NULL range of
/// `wxpay_orders_set_aside`.
pub(super) const ATTENTION: &str = concat!(
    "SELECT mch_id, CAST(SUM(mismatched) AS SIGNED) AS mismatched,
        CAST(SUM(set_aside) AS SIGNED) AS set_aside FROM (
        SELECT mch_id, COUNT(*) AS mismatched, 0 AS set_aside FROM wxpay_orders
        WHERE state = 'AMOUNT_MISMATCH' GROUP BY mch_id
        UNION ALL
        SELECT mch_id, 0, COUNT(*) FROM wxpay_orders
        WHERE set_aside_at IS NOT NULL AND state IN (",
    sql::open_states!(),
    ")
        GROUP BY mch_id
     ) a GROUP BY mch_id"
);

#[derive(Debug, Clone)]
pub struct MySqlStore {
    pub(super) pool: MySqlPool,
}

impl DialectRow for MySqlRow {
    /// A zero date (which a lax `sql_mode` lets in) is an error here, and NULL where the
    /// column may be NULL (sqlx reads it so, and MySQL uses it so).
    fn ts(&self, column: &str) -> Result<DateTime<Utc>, StoreError> {
        Ok(self.try_get(column)?)
    }

    fn opt_ts(&self, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self.try_get(column)?)
    }

    /// A zero date is an error (the driver's decoding never panics).
    fn date(&self, column: &str) -> Result<chrono::NaiveDate, StoreError> {
        Ok(self.try_get(column)?)
    }
}

impl Dialect for MySql {
    type Time = DateTime<Utc>;

    fn time(t: DateTime<Utc>) -> DateTime<Utc> {
        t
    }

    type Date = chrono::NaiveDate;

    fn date(d: chrono::NaiveDate) -> chrono::NaiveDate {
        d
    }

    fn affected(result: &MySqlQueryResult) -> u64 {
        result.rows_affected()
    }

    /// No `ON CONFLICT` (and `INSERT IGNORE` would ignore more than the duplicate): the
    /// anomaly locks the order and looks for its event instead.
    const ON_CONFLICT: bool = false;
    const WRITABLE_CTE: bool = false;
}

/// The driver's options for `url` (`mariadb://` read as `mysql://`); its errors never show
/// the password.
pub(super) fn options(url: &super::DatabaseUrl) -> Result<MySqlConnectOptions, StoreError> {
    let raw = url.expose().replacen("mariadb://", "mysql://", 1);
    MySqlConnectOptions::from_str(&raw).map_err(|e| url.config_error(e))
}

/// `?, ?, …` for `n` values.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

impl MySqlStore {
    pub fn connect(options: &ConnectOptions) -> Result<MySqlStore, StoreError> {
        let connect = self::options(&options.url)?
            // Timestamps are UTC on the wire and in the table, whatever the server's zone.
            .timezone(Some("+00:00".into()));
        let pool = MySqlPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // READ COMMITTED: no gap locks, so instances claiming and settling neighbouring rows
            // of the scan's index do not deadlock each other.
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .await?;
                    Ok(())
                })
            })
            .connect_lazy_with(connect);
        Ok(MySqlStore { pool })
    }

    /// Refuses servers without `FOR UPDATE SKIP LOCKED` or enforced `CHECK` constraints.
    pub(super) async fn check_server(&self) -> Result<(), StoreError> {
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&self.pool)
            .await?;
        supported_version(&version).map_err(StoreError::Config)
    }

    pub async fn claim_due(&self, req: &ClaimRequest) -> Result<Vec<Claimed>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let limit = Arg::Int(i64::from(req.limit));
        // One range per open state, each read in index order: InnoDB then locks only the rows it
        // returns, and another instance's claim skips just those.
        let mut due: Vec<(DateTime<Utc>, i64)> = Vec::new();
        for state in OrderState::OPEN {
            let state = Arg::Text(state.as_str());
            let first = Statement::new(
                "SELECT id, created_at AS due FROM wxpay_orders
                 WHERE state = ? AND gave_up_at IS NULL AND next_query_at IS NULL
                   AND created_at <= ?
                 ORDER BY created_at LIMIT ? FOR UPDATE SKIP LOCKED",
                vec![state, Arg::Time(req.now - req.grace), limit],
            );
            for r in first.query::<MySql>().fetch_all(&mut *tx).await? {
                let (id, created) = due_of(&r)?;
                due.push((created + req.grace, id));
            }
            let next = Statement::new(
                "SELECT id, next_query_at AS due FROM wxpay_orders
                 WHERE state = ? AND gave_up_at IS NULL
                   AND next_query_at IS NOT NULL AND next_query_at <= ?
                 ORDER BY next_query_at LIMIT ? FOR UPDATE SKIP LOCKED",
                vec![state, Arg::Time(req.now), limit],
            );
            for r in next.query::<MySql>().fetch_all(&mut *tx).await? {
                let (id, at) = due_of(&r)?;
                due.push((at, id));
            }
        }
        // Most overdue first, as on the other backends.
        due.sort();
        due.truncate(req.limit as usize);
        if due.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let ids: Vec<Arg<'_>> = due.iter().map(|(_, id)| Arg::Int(*id)).collect();
        let mut lease = vec![Arg::Time(req.lease_until), Arg::Time(req.now)];
        lease.extend(&ids);
        let update = format!(
            "UPDATE wxpay_orders SET next_query_at = ?, lease = lease + 1, updated_at = ?
             WHERE id IN ({})",
            placeholders(ids.len())
        );
        Statement::new(update, lease)
            .query::<MySql>()
            .execute(&mut *tx)
            .await?;
        let select = format!(
            "SELECT lease, {ORDER_COLUMNS} FROM wxpay_orders WHERE id IN ({})",
            placeholders(ids.len())
        );
        let rows = Statement::new(select, ids)
            .query::<MySql>()
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        rows::all(&rows, rows::claimed)
    }

    /// The merchant's `INSERT`, and the id MySQL gives it (no `RETURNING`).
    pub(super) async fn insert_order(&self, order: &NewOrder<'_>) -> Result<i64, StoreError> {
        let done = sql::insert_order(order, false)
            .query::<MySql>()
            .execute(&self.pool)
            .await?;
        i64::try_from(done.last_insert_id()).map_err(|e| StoreError::BadRow {
            table: "wxpay_orders",
            reason: format!("id {}: {e}", done.last_insert_id()),
        })
    }
}

/// MySQL 8.0.19+ or MariaDB 10.6+.
fn supported_version(version: &str) -> Result<(), String> {
    let numbers: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(3)
        .filter_map(|s| s.parse().ok())
        .collect();
    let v = (
        numbers.first().copied().unwrap_or(0),
        numbers.get(1).copied().unwrap_or(0),
        numbers.get(2).copied().unwrap_or(0),
    );
    let (name, ok, need) = if version.to_ascii_lowercase().contains("mariadb") {
        ("MariaDB", v >= (10, 6, 0), "10.6")
    } else {
        ("MySQL", v >= (8, 0, 19), "8.0.19")
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name} {version} is too old: wxpay-reconciler needs {name} {need} or newer \
             (FOR UPDATE SKIP LOCKED, enforced CHECK constraints, DROP CONSTRAINT)"
        ))
    }
}

/// The id and due time of a due row. A due time that does not decode (a zero date, which a
/// lax `sql_mode` lets in) sorts first: the row is claimed, then set aside, and never blocks
/// the claim of the others.
fn due_of(r: &MySqlRow) -> Result<(i64, DateTime<Utc>), StoreError> {
    Ok((
        r.try_get("id")?,
        r.try_get("due").unwrap_or(DateTime::<Utc>::MIN_UTC),
    ))
}

#[cfg(test)]
mod tests {
    use super::supported_version;

    #[test]
    fn old_servers_are_refused_with_a_clear_message() {
        assert!(supported_version("10.11.19-MariaDB-0+deb12u1").is_ok());
        assert!(supported_version("10.6.0-MariaDB").is_ok());
        assert!(supported_version("8.0.36").is_ok());
        assert!(supported_version("8.4.0").is_ok());
        let e = supported_version("10.5.24-MariaDB").unwrap_err();
        assert!(e.contains("MariaDB 10.6"), "{e}");
        let e = supported_version("5.7.44-log").unwrap_err();
        assert!(e.contains("MySQL 8.0.19"), "{e}");
        assert!(
            supported_version("8.0.18").is_err(),
            "DROP CONSTRAINT is 8.0.19"
        );
    }
}

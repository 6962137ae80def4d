//! MySQL 8.0.16+ / MariaDB 10.6+: `FOR UPDATE SKIP LOCKED` claims, so several daemons share one
//! database. Neither has `UPDATE … RETURNING`, so a claim is a short transaction: lock the due
//! rows (skipping rows other instances hold), lease them, read them back.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::{AssertSqlSafe, Executor, Row, migrate::Migrator};

// Every dynamic statement below is built from this module's constants and `?` placeholders
// only; values are always bound parameters.

use super::{
    Applied, Arg, Attention, Change, ClaimRequest, Claimed, ClaimedOrder, ConnectOptions, EventRow,
    Guard, NewOrder, OPEN_STATES_SQL, ORDER_COLUMNS, OpenSummary, OrderRead, OrderRow, SetAsideRow,
    StoreError, SummaryRequest, UnreadableOrder, Write, change_note, parse_state, reads,
};
use crate::domain::OrderState;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/mysql");

#[derive(Debug, Clone)]
pub struct MySqlStore {
    pool: MySqlPool,
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
    pub async fn check_server(&self) -> Result<(), StoreError> {
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&self.pool)
            .await?;
        supported_version(&version).map_err(StoreError::Config)
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.check_server().await?;
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migrate(e.to_string()))
    }

    pub fn known_migrations(&self) -> Vec<i64> {
        MIGRATOR.iter().map(|m| m.version).collect()
    }

    pub async fn applied_migrations(&self) -> Result<Vec<i64>, StoreError> {
        self.check_server().await?;
        let exists: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables
             WHERE table_schema = DATABASE() AND table_name = '_sqlx_migrations'",
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
        let mut tx = self.pool.begin().await?;
        let limit = i64::from(req.limit);
        // One range per open state, each read in index order: InnoDB then locks only the rows it
        // returns, and another instance's claim skips just those.
        let mut first: Vec<(i64, DateTime<Utc>)> = Vec::new();
        let mut next: Vec<(i64, DateTime<Utc>)> = Vec::new();
        for state in OrderState::OPEN {
            let rows = sqlx::query(
                "SELECT id, created_at AS due FROM wxpay_orders
                 WHERE state = ? AND gave_up_at IS NULL AND next_query_at IS NULL
                   AND created_at <= ?
                 ORDER BY created_at LIMIT ? FOR UPDATE SKIP LOCKED",
            )
            .bind(state.as_str())
            .bind(req.now - req.grace)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            first.extend(rows.iter().map(due_of).collect::<Result<Vec<_>, _>>()?);
            let rows = sqlx::query(
                "SELECT id, next_query_at AS due FROM wxpay_orders
                 WHERE state = ? AND gave_up_at IS NULL
                   AND next_query_at IS NOT NULL AND next_query_at <= ?
                 ORDER BY next_query_at LIMIT ? FOR UPDATE SKIP LOCKED",
            )
            .bind(state.as_str())
            .bind(req.now)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            next.extend(rows.iter().map(due_of).collect::<Result<Vec<_>, _>>()?);
        }
        // Most overdue first, as on the other backends.
        let mut due: Vec<(DateTime<Utc>, i64)> = first
            .into_iter()
            .map(|(id, created)| (created + req.grace, id))
            .chain(next.into_iter().map(|(id, at)| (at, id)))
            .collect();
        due.sort();
        due.truncate(req.limit as usize);
        if due.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = due.iter().map(|(_, id)| *id).collect();
        let mut update = sqlx::query(AssertSqlSafe(format!(
            "UPDATE wxpay_orders SET next_query_at = ?, lease = lease + 1, updated_at = ?
             WHERE id IN ({})",
            placeholders(ids.len())
        )))
        .bind(req.lease_until)
        .bind(req.now);
        for id in &ids {
            update = update.bind(id);
        }
        update.execute(&mut *tx).await?;
        let mut select = sqlx::query(AssertSqlSafe(format!(
            "SELECT lease, {ORDER_COLUMNS} FROM wxpay_orders WHERE id IN ({})",
            placeholders(ids.len())
        )));
        for id in &ids {
            select = select.bind(id);
        }
        let rows = select.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.iter().map(claimed).collect()
    }

    pub async fn set_aside(
        &self,
        id: i64,
        lease: Option<i64>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        let done = sqlx::query(
            "UPDATE wxpay_orders SET set_aside_at = ?, set_aside_reason = ?, gave_up_at = ?,
                last_error = ?, updated_at = ?
             WHERE id = ? AND (? IS NULL OR lease = ?) AND state IN ('NOTPAY', 'USERPAYING')
               AND set_aside_at IS NULL",
        )
        .bind(now)
        .bind(reason)
        .bind(now)
        .bind(reason)
        .bind(now)
        .bind(id)
        .bind(lease)
        .bind(lease)
        .execute(&self.pool)
        .await?;
        Ok(Applied::of(done.rows_affected()))
    }

    /// Two ranges of two indexes (MySQL has no partial ones): the AMOUNT_MISMATCH range of
    /// `wxpay_orders_open` and the non-NULL range of `wxpay_orders_set_aside`.
    pub async fn attention(&self) -> Result<Vec<Attention>, StoreError> {
        let rows = sqlx::query(
            "SELECT mch_id, CAST(SUM(mismatched) AS SIGNED) AS mismatched,
                    CAST(SUM(set_aside) AS SIGNED) AS set_aside FROM (
                SELECT mch_id, COUNT(*) AS mismatched, 0 AS set_aside FROM wxpay_orders
                WHERE state = 'AMOUNT_MISMATCH' GROUP BY mch_id
                UNION ALL
                SELECT mch_id, 0, COUNT(*) FROM wxpay_orders
                WHERE set_aside_at IS NOT NULL AND state IN ('NOTPAY', 'USERPAYING')
                GROUP BY mch_id
             ) a GROUP BY mch_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Attention::of).collect()
    }

    pub async fn set_aside_orders(&self, limit: u32) -> Result<Vec<SetAsideRow>, StoreError> {
        let rows = sqlx::query(reads::SET_ASIDE)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        // Written by the daemon; shown as missing rather than failing `status`.
        rows.iter()
            .map(|r| SetAsideRow::of(r, r.try_get("set_aside_at").unwrap_or(None)))
            .collect()
    }

    /// Applies several guarded writes in one transaction (one commit); each keeps its own guard
    /// and its own result.
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

    pub async fn open_summary(&self, req: &SummaryRequest) -> Result<Vec<OpenSummary>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT mch_id, COUNT(*) AS open,
                    CAST(SUM(CASE WHEN created_at < ? THEN 1 ELSE 0 END) AS SIGNED) AS stuck,
                    CAST(SUM(CASE WHEN expires_at <= ? OR (expires_at IS NULL AND created_at <= ?)
                        THEN 1 ELSE 0 END) AS SIGNED) AS expired,
                    MIN(created_at) AS oldest
             FROM wxpay_orders WHERE state IN ({OPEN_STATES_SQL}) GROUP BY mch_id"
        )))
        .bind(req.stuck_before)
        .bind(req.now)
        .bind(req.expired_if_created_before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OpenSummary {
                    mch_id: r.try_get("mch_id")?,
                    open: r.try_get("open")?,
                    stuck: r.try_get("stuck")?,
                    expired: r.try_get("expired")?,
                    // A zero date is no age to show.
                    oldest_created_at: r.try_get("oldest").unwrap_or(None),
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
        let done = sqlx::query(
            "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) VALUES (?, ?, ?, ?)",
        )
        .bind(order.mch_id)
        .bind(order.appid)
        .bind(order.out_trade_no)
        .bind(order.total_fee)
        .execute(&self.pool)
        .await?;
        i64::try_from(done.last_insert_id()).map_err(|e| StoreError::Query(e.to_string()))
    }
}

async fn apply_one(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    order: &OrderRow,
    guard: Guard,
    change: &Change,
    now: DateTime<Utc>,
) -> Result<Applied, StoreError> {
    let note = change_note(change);
    let note = note.as_deref();
    // `lease <=> ?` is NULL-safe: a write without a lease (manual, notify) passes NULL and the
    // `? IS NULL` arm admits it.
    let updated = match change {
        Change::Settle {
            settlement,
            queried,
            ..
        } => {
            sqlx::query(
                "UPDATE wxpay_orders SET state = ?,
                    transaction_id = COALESCE(?, transaction_id),
                    paid_at = COALESCE(?, paid_at),
                    query_count = query_count + ?,
                    last_queried_at = CASE WHEN ? THEN ? ELSE last_queried_at END,
                    last_error = ?, updated_at = ?
                 WHERE id = ? AND state = ? AND (? IS NULL OR lease = ?)",
            )
            .bind(settlement.to.as_str())
            .bind(settlement.transaction_id.as_ref().map(|t| t.as_str()))
            .bind(settlement.paid_at)
            .bind(i32::from(*queried))
            .bind(*queried)
            .bind(now)
            .bind(note)
            .bind(now)
            .bind(guard.order_id)
            .bind(guard.from.as_str())
            .bind(guard.lease)
            .bind(guard.lease)
            .execute(&mut **tx)
            .await?
        }
        Change::Reschedule { at, .. } => {
            sqlx::query(
                "UPDATE wxpay_orders SET next_query_at = ?, query_count = query_count + 1,
                    last_queried_at = ?, last_error = ?, updated_at = ?
                 WHERE id = ? AND state = ? AND (? IS NULL OR lease = ?)",
            )
            .bind(at)
            .bind(now)
            .bind(note)
            .bind(now)
            .bind(guard.order_id)
            .bind(guard.from.as_str())
            .bind(guard.lease)
            .bind(guard.lease)
            .execute(&mut **tx)
            .await?
        }
        Change::GiveUp { .. } => {
            sqlx::query(
                "UPDATE wxpay_orders SET gave_up_at = ?, query_count = query_count + 1,
                    last_queried_at = ?, last_error = ?, updated_at = ?
                 WHERE id = ? AND state = ? AND (? IS NULL OR lease = ?)",
            )
            .bind(now)
            .bind(now)
            .bind(note)
            .bind(now)
            .bind(guard.order_id)
            .bind(guard.from.as_str())
            .bind(guard.lease)
            .bind(guard.lease)
            .execute(&mut **tx)
            .await?
        }
        Change::Anomaly {
            anomaly,
            report,
            source,
        } => {
            // The order row's lock serializes writers of the same anomaly; the event only while
            // the order is still in `from`, once.
            let state: Option<String> =
                sqlx::query_scalar("SELECT state FROM wxpay_orders WHERE id = ? FOR UPDATE")
                    .bind(guard.order_id)
                    .fetch_optional(&mut **tx)
                    .await?;
            if state.as_deref() != Some(guard.from.as_str()) {
                return Ok(Applied::NoOp);
            }
            let seen: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM wxpay_order_events WHERE order_id = ? AND to_state = ?",
            )
            .bind(guard.order_id)
            .bind(anomaly.as_str())
            .fetch_one(&mut **tx)
            .await?;
            if seen > 0 {
                return Ok(Applied::NoOp);
            }
            let event = Event {
                to: anomaly.as_str(),
                source: *source,
                report,
                note,
            };
            insert_event(tx, order, guard, &event, now).await?;
            return Ok(Applied::Done);
        }
    };
    if updated.rows_affected() == 0 {
        return Ok(Applied::NoOp);
    }
    if let Change::Settle {
        settlement, source, ..
    } = change
    {
        let event = Event {
            to: settlement.to.as_str(),
            source: *source,
            report: settlement,
            note,
        };
        insert_event(tx, order, guard, &event, now).await?;
    }
    Ok(Applied::Done)
}

/// One row of `wxpay_order_events` to write.
struct Event<'a> {
    /// A state, or an anomaly's name.
    to: &'a str,
    source: crate::domain::Source,
    /// What WeChat reported.
    report: &'a crate::reconcile::policy::Settlement,
    note: Option<&'a str>,
}

async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    order: &OrderRow,
    guard: Guard,
    event: &Event<'_>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state,
            to_state, source, transaction_id, total_fee, detail, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(order.id)
    .bind(&order.mch_id)
    .bind(&order.out_trade_no)
    .bind(guard.from.as_str())
    .bind(event.to)
    .bind(event.source.as_str())
    .bind(event.report.transaction_id.as_ref().map(|t| t.as_str()))
    .bind(event.report.reported_fee.map(|f| f.get()))
    .bind(event.note)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// MySQL 8.0.16+ or MariaDB 10.6+.
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
        ("MySQL", v >= (8, 0, 16), "8.0.16")
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name} {version} is too old: wxpay-reconciler needs {name} {need} or newer \
             (FOR UPDATE SKIP LOCKED, enforced CHECK constraints)"
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

/// A claimed row, decoded on its own: an unreadable one is still leased and comes back as such.
fn claimed(r: &MySqlRow) -> Result<Claimed, StoreError> {
    let lease: i64 = r.try_get("lease")?;
    Ok(match order_row(r) {
        Ok(row) => Claimed::Order(ClaimedOrder { row, lease }),
        Err(e) => Claimed::Unreadable(UnreadableOrder::of(r, Some(lease), &e)),
    })
}

fn order_row(r: &MySqlRow) -> Result<OrderRow, StoreError> {
    let state: String = r.try_get("state")?;
    Ok(OrderRow {
        id: r.try_get("id")?,
        mch_id: r.try_get("mch_id")?,
        appid: r.try_get("appid")?,
        out_trade_no: r.try_get("out_trade_no")?,
        total_fee: r.try_get("total_fee")?,
        state: parse_state("wxpay_orders", &state)?,
        transaction_id: r.try_get("transaction_id")?,
        paid_at: r.try_get("paid_at")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        query_count: i64::from(r.try_get::<i32, _>("query_count")?),
        next_query_at: r.try_get("next_query_at")?,
        last_queried_at: r.try_get("last_queried_at")?,
        last_error: r.try_get("last_error")?,
        gave_up_at: r.try_get("gave_up_at")?,
        fee_type: r.try_get("fee_type")?,
        set_aside_at: r.try_get("set_aside_at")?,
        set_aside_reason: r.try_get("set_aside_reason")?,
    })
}

fn event_row(r: &MySqlRow) -> Result<EventRow, StoreError> {
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
        created_at: r.try_get("created_at")?,
    })
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
        assert!(e.contains("MySQL 8.0.16"), "{e}");
    }
}

//! PostgreSQL: `FOR UPDATE SKIP LOCKED` claims, so several daemons share one database.

use std::collections::HashSet;
use std::str::FromStr;

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::{
    PgConnectOptions, PgPool, PgPoolOptions, PgRow, PgTypeInfo, PgValueFormat, PgValueRef, Postgres,
};
use sqlx::{AssertSqlSafe, Decode, Row, migrate::Migrator};

// Every dynamic statement below is built from this module's constants only; values are always
// bound parameters.

use super::{
    Applied, Arg, Attention, Change, ClaimRequest, Claimed, ClaimedOrder, ConnectOptions, EventRow,
    Guard, NewOrder, OPEN_STATES_SQL, ORDER_COLUMNS, OpenSummary, OrderRead, OrderRow, SetAsideRow,
    StoreError, SummaryRequest, UnreadableOrder, Write, change_note, numbered, parse_state, reads,
};
use crate::domain::OrderState;

/// The driver's options for `url`; its errors never show the password.
pub(super) fn options(url: &super::DatabaseUrl) -> Result<PgConnectOptions, StoreError> {
    PgConnectOptions::from_str(url.expose()).map_err(|e| url.config_error(e))
}

/// The query parameters of `url` the driver ignores. The driver's own warning about them
/// prints their value (a mistyped `pasword=`), and its `.pgpass` warnings a whole line: its
/// `options` module is silenced in the log filter, and this names the parameter alone.
pub(super) fn unknown_parameters(url: &super::DatabaseUrl) -> Vec<String> {
    const KNOWN: [&str; 19] = [
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
        "password",
        "application_name",
        "options",
        "",
    ];
    let Ok(u) = reqwest::Url::parse(url.expose()) else {
        return Vec::new();
    };
    u.query_pairs()
        .map(|(k, _)| k.into_owned())
        .filter(|k| !KNOWN.contains(&k.as_str()) && !k.starts_with("options["))
        .collect()
}

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// A `TIMESTAMPTZ` as stored. sqlx's own chrono conversion panics on `infinity`, `-infinity`
/// and years chrono cannot hold, all of which the merchant's application may write; this one
/// never does: every value is decoded into one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgTime {
    At(DateTime<Utc>),
    Infinity,
    MinusInfinity,
    /// A finite time outside chrono's range (PostgreSQL goes to the year 294276).
    OutOfRange,
}

impl PgTime {
    /// From PostgreSQL's binary form: microseconds since 2000-01-01 UTC, `i64::MAX` and
    /// `i64::MIN` for the infinities.
    pub fn from_micros(us: i64) -> PgTime {
        const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;
        match us {
            i64::MAX => PgTime::Infinity,
            i64::MIN => PgTime::MinusInfinity,
            us => DateTime::from_timestamp(PG_EPOCH_UNIX_SECONDS, 0)
                .and_then(|epoch| epoch.checked_add_signed(TimeDelta::microseconds(us)))
                .map_or(PgTime::OutOfRange, PgTime::At),
        }
    }

    /// From PostgreSQL's binary form as bytes (the fuzz target feeds arbitrary ones).
    pub fn from_binary(bytes: &[u8]) -> Result<PgTime, String> {
        let raw: [u8; 8] = bytes
            .try_into()
            .map_err(|_| format!("a timestamp is 8 bytes, not {}", bytes.len()))?;
        Ok(PgTime::from_micros(i64::from_be_bytes(raw)))
    }

    fn from_text(s: &str) -> PgTime {
        match s {
            "infinity" => PgTime::Infinity,
            "-infinity" => PgTime::MinusInfinity,
            _ => DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z")
                .map_or(PgTime::OutOfRange, |t| PgTime::At(t.to_utc())),
        }
    }

    /// A time every column needs; the infinities and out-of-range years are errors.
    fn finite(self, column: &str) -> Result<DateTime<Utc>, StoreError> {
        match self {
            PgTime::At(t) => Ok(t),
            other => Err(StoreError::BadRow {
                table: "wxpay_orders",
                reason: format!("{column} is {}", other.describe()),
            }),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            PgTime::At(_) => "a time",
            PgTime::Infinity => "'infinity'",
            PgTime::MinusInfinity => "'-infinity'",
            PgTime::OutOfRange => "a time outside the years this program can hold",
        }
    }
}

impl sqlx::Type<Postgres> for PgTime {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for PgTime {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(match value.format() {
            PgValueFormat::Binary => PgTime::from_binary(value.as_bytes()?)?,
            PgValueFormat::Text => PgTime::from_text(value.as_str()?),
        })
    }
}

fn ts(r: &PgRow, column: &str) -> Result<DateTime<Utc>, StoreError> {
    r.try_get::<PgTime, _>(column)?.finite(column)
}

fn opt_ts(r: &PgRow, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    r.try_get::<Option<PgTime>, _>(column)?
        .map(|t| t.finite(column))
        .transpose()
}

/// `expires_at`: `infinity` is PostgreSQL's "never", so no expiry; `-infinity` means nothing.
fn expiry(r: &PgRow) -> Result<Option<DateTime<Utc>>, StoreError> {
    match r.try_get::<Option<PgTime>, _>("expires_at")? {
        None | Some(PgTime::Infinity) => Ok(None),
        Some(t) => t.finite("expires_at").map(Some),
    }
}

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub fn connect(options: &ConnectOptions) -> Result<PgStore, StoreError> {
        let connect = self::options(&options.url)?.application_name("wxpay-reconciler");
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(PgStore { pool })
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
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        if !exists {
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
        let sql = format!(
            "WITH first_due AS (
                SELECT id, created_at + $5 * INTERVAL '1 millisecond' AS due FROM wxpay_orders
                WHERE state IN ({OPEN_STATES_SQL}) AND gave_up_at IS NULL AND next_query_at IS NULL
                  AND created_at <= $1
                ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED
            ), next_due AS (
                SELECT id, next_query_at AS due FROM wxpay_orders
                WHERE state IN ({OPEN_STATES_SQL}) AND gave_up_at IS NULL AND next_query_at IS NOT NULL
                  AND next_query_at <= $2
                ORDER BY next_query_at LIMIT $3 FOR UPDATE SKIP LOCKED
            ), pick AS (
                SELECT id FROM (SELECT id, due FROM first_due UNION ALL SELECT id, due FROM next_due) d
                ORDER BY due LIMIT $3
            )
            UPDATE wxpay_orders o SET next_query_at = $4, lease = o.lease + 1, updated_at = $2
            FROM pick WHERE o.id = pick.id
            RETURNING o.lease, {}",
            ORDER_COLUMNS
                .split(", ")
                .map(|c| format!("o.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(req.now - req.grace)
            .bind(req.now)
            .bind(i64::from(req.limit))
            .bind(req.lease_until)
            .bind(req.grace.num_milliseconds() as f64)
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
            "UPDATE wxpay_orders SET set_aside_at = $1, set_aside_reason = $2, gave_up_at = $1,
                last_error = $2, updated_at = $1
             WHERE id = $3 AND ($4::BIGINT IS NULL OR lease = $4) AND state IN ({OPEN_STATES_SQL})
               AND set_aside_at IS NULL"
        )))
        .bind(now)
        .bind(reason)
        .bind(id)
        .bind(lease)
        .execute(&self.pool)
        .await?;
        Ok(Applied::of(done.rows_affected()))
    }

    pub async fn attention(&self) -> Result<Vec<Attention>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(numbered(reads::ATTENTION)))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Attention::of).collect()
    }

    pub async fn set_aside_orders(&self, limit: u32) -> Result<Vec<SetAsideRow>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(numbered(reads::SET_ASIDE)))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        // Written by the daemon; shown as missing rather than failing `status`.
        rows.iter()
            .map(|r| SetAsideRow::of(r, opt_ts(r, "set_aside_at").unwrap_or(None)))
            .collect()
    }

    /// Applies several guarded writes in one transaction (one commit, one fsync); each keeps
    /// its own guard and its own result. The settlements of a batch are one statement, and so
    /// are its reschedules (arrays in, the ids that passed their guard out): a batch costs a
    /// few round trips, not one per order.
    pub async fn apply_many(
        &self,
        writes: &[Write<'_>],
        now: DateTime<Utc>,
    ) -> Result<Vec<Applied>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut applied = vec![Applied::NoOp; writes.len()];
        let (mut settles, mut reschedules, mut single) = (Vec::new(), Vec::new(), Vec::new());
        for (i, w) in writes.iter().enumerate() {
            match w.change {
                Change::Settle { .. } => settles.push(i),
                Change::Reschedule { .. } => reschedules.push(i),
                Change::GiveUp { .. } | Change::Anomaly { .. } => single.push(i),
            }
        }
        // A group of one goes statement by statement; so does every write of a batch that
        // names an order twice (an `UPDATE … FROM` would apply only one of the two, and the
        // writes must apply in their order, as on the other backends).
        let distinct = distinct_orders(writes);
        let bulk = |group: &[usize]| distinct && group.len() > 1;
        let mut mark = |group: &[usize], done: Vec<i64>| {
            for &i in group {
                if done.contains(&writes[i].guard.order_id) {
                    applied[i] = Applied::Done;
                }
            }
        };
        if bulk(&settles) {
            mark(&settles, settle_many(&mut tx, writes, &settles, now).await?);
        } else {
            single.extend(&settles);
        }
        if bulk(&reschedules) {
            mark(
                &reschedules,
                reschedule_many(&mut tx, writes, &reschedules, now).await?,
            );
        } else {
            single.extend(&reschedules);
        }
        single.sort_unstable();
        for i in single {
            applied[i] = apply_one(&mut tx, writes[i].guard, writes[i].change, now).await?;
        }
        tx.commit().await?;
        Ok(applied)
    }
}

/// Whether no order appears twice among `writes`.
fn distinct_orders(writes: &[Write<'_>]) -> bool {
    let mut seen = HashSet::with_capacity(writes.len());
    writes.iter().all(|w| seen.insert(w.guard.order_id))
}

/// Every guarded settlement of `group` and its event, in one statement.
async fn settle_many(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    writes: &[Write<'_>],
    group: &[usize],
    now: DateTime<Utc>,
) -> Result<Vec<i64>, StoreError> {
    let n = group.len();
    let mut ids = Vec::with_capacity(n);
    let mut from = Vec::with_capacity(n);
    let mut lease = Vec::with_capacity(n);
    let mut to = Vec::with_capacity(n);
    let mut transaction_id = Vec::with_capacity(n);
    let mut paid_at = Vec::with_capacity(n);
    let mut queried = Vec::with_capacity(n);
    let mut note = Vec::with_capacity(n);
    let mut source = Vec::with_capacity(n);
    let mut fee = Vec::with_capacity(n);
    for &i in group {
        let w = &writes[i];
        let Change::Settle {
            settlement,
            queried: q,
            source: src,
        } = w.change
        else {
            continue;
        };
        ids.push(w.guard.order_id);
        from.push(w.guard.from.as_str());
        lease.push(w.guard.lease);
        to.push(settlement.to.as_str());
        transaction_id.push(settlement.transaction_id.as_ref().map(|t| t.as_str()));
        paid_at.push(settlement.paid_at);
        queried.push(i32::from(*q));
        note.push(change_note(w.change));
        source.push(src.as_str());
        fee.push(settlement.reported_fee.map(|f| f.get()));
    }
    let rows: Vec<i64> = sqlx::query_scalar(
            "WITH input AS (
                SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[],
                    $5::TEXT[], $6::TIMESTAMPTZ[], $7::INT[], $8::TEXT[], $9::TEXT[], $10::BIGINT[])
                AS t(id, from_state, lease, to_state, transaction_id, paid_at, queried, note,
                    source, reported_fee)
            ), moved AS (
                UPDATE wxpay_orders o SET state = i.to_state,
                    transaction_id = COALESCE(i.transaction_id, o.transaction_id),
                    paid_at = COALESCE(i.paid_at, o.paid_at),
                    query_count = o.query_count + i.queried,
                    last_queried_at = CASE WHEN i.queried = 1 THEN $11 ELSE o.last_queried_at END,
                    last_error = i.note, updated_at = $11
                FROM input i
                WHERE o.id = i.id AND o.state = i.from_state AND (i.lease IS NULL OR o.lease = i.lease)
                RETURNING o.id, o.mch_id, o.out_trade_no, i.from_state, i.to_state, i.source,
                    i.transaction_id, i.reported_fee, i.note
            )
            INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state,
                to_state, source, transaction_id, total_fee, detail, created_at)
            SELECT id, mch_id, out_trade_no, from_state, to_state, source, transaction_id,
                reported_fee, note, $11 FROM moved
            RETURNING order_id",
        )
        .bind(&ids)
        .bind(&from)
        .bind(&lease)
        .bind(&to)
        .bind(&transaction_id)
        .bind(&paid_at)
        .bind(&queried)
        .bind(&note)
        .bind(&source)
        .bind(&fee)
        .bind(now)
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows)
}

/// Every guarded reschedule of `group`, in one statement.
async fn reschedule_many(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    writes: &[Write<'_>],
    group: &[usize],
    now: DateTime<Utc>,
) -> Result<Vec<i64>, StoreError> {
    let n = group.len();
    let mut ids = Vec::with_capacity(n);
    let mut from = Vec::with_capacity(n);
    let mut lease = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    let mut note = Vec::with_capacity(n);
    for &i in group {
        let w = &writes[i];
        let Change::Reschedule { at: next, .. } = w.change else {
            continue;
        };
        ids.push(w.guard.order_id);
        from.push(w.guard.from.as_str());
        lease.push(w.guard.lease);
        at.push(*next);
        note.push(change_note(w.change));
    }
    let rows: Vec<i64> = sqlx::query_scalar(
        "UPDATE wxpay_orders o SET next_query_at = i.at, query_count = o.query_count + 1,
                last_queried_at = $6, last_error = i.note, updated_at = $6
             FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::TIMESTAMPTZ[], $5::TEXT[])
                AS i(id, from_state, lease, at, note)
             WHERE o.id = i.id AND o.state = i.from_state AND (i.lease IS NULL OR o.lease = i.lease)
             RETURNING o.id",
    )
    .bind(&ids)
    .bind(&from)
    .bind(&lease)
    .bind(&at)
    .bind(&note)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows)
}

async fn apply_one(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    guard: Guard,
    change: &Change,
    now: DateTime<Utc>,
) -> Result<Applied, StoreError> {
    let note = change_note(change);
    let note = note.as_deref();
    let affected = match change {
        // The guarded UPDATE and its event in one statement: one round trip, and the event
        // exists exactly when the UPDATE matched.
        Change::Settle {
            settlement,
            queried,
            source,
        } => sqlx::query(
            "WITH moved AS (
                UPDATE wxpay_orders SET state = $1,
                    transaction_id = COALESCE($2, transaction_id),
                    paid_at = COALESCE($3, paid_at),
                    query_count = query_count + $4,
                    last_queried_at = CASE WHEN $4 = 1 THEN $5 ELSE last_queried_at END,
                    last_error = $6, updated_at = $5
                WHERE id = $7 AND state = $8 AND ($9::BIGINT IS NULL OR lease = $9)
                RETURNING id, mch_id, out_trade_no
            )
            INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state,
                to_state, source, transaction_id, total_fee, detail, created_at)
            SELECT id, mch_id, out_trade_no, $8, $1, $10, $2, $11, $6, $5 FROM moved",
        )
        .bind(settlement.to.as_str())
        .bind(settlement.transaction_id.as_ref().map(|t| t.as_str()))
        .bind(settlement.paid_at)
        .bind(i32::from(*queried))
        .bind(now)
        .bind(note)
        .bind(guard.order_id)
        .bind(guard.from.as_str())
        .bind(guard.lease)
        .bind(source.as_str())
        .bind(settlement.reported_fee.map(|f| f.get()))
        .execute(&mut **tx)
        .await?
        .rows_affected(),
        Change::Reschedule { at, .. } => sqlx::query(
            "UPDATE wxpay_orders SET next_query_at = $1, query_count = query_count + 1,
                last_queried_at = $2, last_error = $3, updated_at = $2
             WHERE id = $4 AND state = $5 AND ($6::BIGINT IS NULL OR lease = $6)",
        )
        .bind(at)
        .bind(now)
        .bind(note)
        .bind(guard.order_id)
        .bind(guard.from.as_str())
        .bind(guard.lease)
        .execute(&mut **tx)
        .await?
        .rows_affected(),
        Change::GiveUp { .. } => sqlx::query(
            "UPDATE wxpay_orders SET gave_up_at = $1, query_count = query_count + 1,
                last_queried_at = $1, last_error = $2, updated_at = $1
             WHERE id = $3 AND state = $4 AND ($5::BIGINT IS NULL OR lease = $5)",
        )
        .bind(now)
        .bind(note)
        .bind(guard.order_id)
        .bind(guard.from.as_str())
        .bind(guard.lease)
        .execute(&mut **tx)
        .await?
        .rows_affected(),
        // The event only while the order is still in `from`; a second one is no error.
        Change::Anomaly {
            anomaly,
            report,
            source,
        } => sqlx::query(
            "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state,
                to_state, source, transaction_id, total_fee, detail, created_at)
             SELECT id, mch_id, out_trade_no, state, $1, $2, $3, $4, $5, $6 FROM wxpay_orders
             WHERE id = $7 AND state = $8
             ON CONFLICT (order_id, to_state) DO NOTHING",
        )
        .bind(anomaly.as_str())
        .bind(source.as_str())
        .bind(report.transaction_id.as_ref().map(|t| t.as_str()))
        .bind(report.reported_fee.map(|f| f.get()))
        .bind(note)
        .bind(now)
        .bind(guard.order_id)
        .bind(guard.from.as_str())
        .execute(&mut **tx)
        .await?
        .rows_affected(),
    };
    Ok(if affected == 0 {
        Applied::NoOp
    } else {
        Applied::Done
    })
}

impl PgStore {
    pub async fn open_summary(&self, req: &SummaryRequest) -> Result<Vec<OpenSummary>, StoreError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT mch_id, COUNT(*) AS open,
                    COUNT(*) FILTER (WHERE created_at < $1) AS stuck,
                    COUNT(*) FILTER (WHERE expires_at <= $2
                        OR (expires_at IS NULL AND created_at <= $3)) AS expired,
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
                    // An infinite or out-of-range creation time is no age to show.
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
        let mut q = sqlx::query(AssertSqlSafe(numbered(sql)));
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
        let mut q = sqlx::query(AssertSqlSafe(numbered(sql)));
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
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(order.mch_id)
        .bind(order.appid)
        .bind(order.out_trade_no)
        .bind(order.total_fee)
        .fetch_one(&self.pool)
        .await?)
    }
}

fn event_row(r: &PgRow) -> Result<EventRow, StoreError> {
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
        created_at: ts(r, "created_at")?,
    })
}

/// A claimed row, decoded on its own: an unreadable one is still leased and comes back as such.
fn claimed(r: &PgRow) -> Result<Claimed, StoreError> {
    let lease: i64 = r.try_get("lease")?;
    Ok(match order_row(r) {
        Ok(row) => Claimed::Order(ClaimedOrder { row, lease }),
        Err(e) => Claimed::Unreadable(UnreadableOrder::of(r, Some(lease), &e)),
    })
}

fn order_row(r: &PgRow) -> Result<OrderRow, StoreError> {
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
        created_at: ts(r, "created_at")?,
        expires_at: expiry(r)?,
        query_count: i64::from(r.try_get::<i32, _>("query_count")?),
        next_query_at: opt_ts(r, "next_query_at")?,
        last_queried_at: opt_ts(r, "last_queried_at")?,
        last_error: r.try_get("last_error")?,
        gave_up_at: opt_ts(r, "gave_up_at")?,
        fee_type: r.try_get("fee_type")?,
        set_aside_at: opt_ts(r, "set_aside_at")?,
        set_aside_reason: r.try_get("set_aside_reason")?,
    })
}

#[cfg(test)]
mod tests {
    use super::PgTime;

    #[test]
    fn every_stored_timestamp_decodes_without_panicking() {
        assert_eq!(PgTime::from_micros(i64::MAX), PgTime::Infinity);
        assert_eq!(PgTime::from_micros(i64::MIN), PgTime::MinusInfinity);
        // About the year 287,000: PostgreSQL holds it (up to 294276), chrono does not.
        assert_eq!(
            PgTime::from_micros(9_000_000_000_000_000_000),
            PgTime::OutOfRange
        );
        assert_eq!(PgTime::from_micros(i64::MAX - 1), PgTime::OutOfRange);
        assert_eq!(PgTime::from_micros(i64::MIN + 1), PgTime::OutOfRange);
        match PgTime::from_micros(0) {
            PgTime::At(t) => assert_eq!(t.to_rfc3339(), "2000-01-01T00:00:00+00:00"),
            other => panic!("{other:?}"),
        }
        assert!(PgTime::from_binary(&[1, 2, 3]).is_err());
        assert_eq!(PgTime::from_text("infinity"), PgTime::Infinity);
        assert_eq!(PgTime::from_text("-infinity"), PgTime::MinusInfinity);
        assert!(matches!(
            PgTime::from_text("2026-12-01 10:30:00.5+08"),
            PgTime::At(_)
        ));
    }

    proptest::proptest! {
        #[test]
        fn any_eight_bytes_decode(bytes in proptest::array::uniform8(proptest::prelude::any::<u8>())) {
            let _decoded = PgTime::from_binary(&bytes);
        }
    }
}

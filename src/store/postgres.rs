//! PostgreSQL: `FOR UPDATE SKIP LOCKED` claims, so several daemons share one database.

use std::collections::HashSet;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgQueryResult, PgRow, PgTypeInfo,
    PgValueFormat, PgValueRef, Postgres,
};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Decode, Row, migrate::Migrator};

// Every dynamic statement below is built from this module's constants only; values are always
// bound parameters.

use super::rows::{self, Cols, DialectRow};
use super::sql::{self, Dialect, OPEN_STATES_SQL, ORDER_COLUMNS, change_note, numbered};
use super::{
    Applied, Change, ClaimRequest, Claimed, ConnectOptions, Settlement, StoreError, Write,
};

/// The driver's options for `url`; its errors never show the password.
pub(super) fn options(url: &super::DatabaseUrl) -> Result<PgConnectOptions, StoreError> {
    PgConnectOptions::from_str(url.expose()).map_err(|e| url.config_error(e))
}

/// The query parameters of `url` the driver ignores. The driver's own warning about them
/// prints their value (a mistyped `pasword=`), and its `.pgpass` warnings a whole line: its
/// `options` module is silenced in the log filter, and this names the parameter alone.
pub(super) fn unknown_parameters(url: &super::DatabaseUrl) -> Vec<String> {
    let known = |k: &str| {
        super::PLAIN_PARAMETERS[..super::POSTGRES_PLAIN].contains(&k)
            || k == "password"
            || k.is_empty()
    };
    let Ok(u) = reqwest::Url::parse(url.expose()) else {
        return Vec::new();
    };
    u.query_pairs()
        .map(|(k, _)| k.into_owned())
        .filter(|k| !known(k) && !k.starts_with("options["))
        .collect()
}

pub(super) static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Whether the migrations' own table exists (`n` is 0 or 1).
pub(super) const MIGRATIONS_TABLE: &str = "SELECT COUNT(to_regclass('_sqlx_migrations')) AS n";

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

/// A `DATE` as stored: sqlx's own chrono conversion panics on `infinity` and on days chrono
/// cannot hold; this one is `None` for those.
struct PgDate(Option<NaiveDate>);

impl PgDate {
    /// From PostgreSQL's binary form: days since 2000-01-01 (`i32::MAX` / `MIN`: infinities).
    fn from_binary(bytes: &[u8]) -> Result<PgDate, String> {
        let raw: [u8; 4] = bytes
            .try_into()
            .map_err(|_| format!("a date is 4 bytes, not {}", bytes.len()))?;
        let days = i32::from_be_bytes(raw);
        Ok(PgDate(NaiveDate::from_ymd_opt(2000, 1, 1).and_then(
            |epoch| TimeDelta::try_days(i64::from(days)).and_then(|d| epoch.checked_add_signed(d)),
        )))
    }
}

impl sqlx::Type<Postgres> for PgDate {
    fn type_info() -> PgTypeInfo {
        <NaiveDate as sqlx::Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <NaiveDate as sqlx::Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for PgDate {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(match value.format() {
            PgValueFormat::Binary => PgDate::from_binary(value.as_bytes()?)?,
            PgValueFormat::Text => {
                PgDate(NaiveDate::parse_from_str(value.as_str()?, "%Y-%m-%d").ok())
            }
        })
    }
}

impl DialectRow for PgRow {
    fn date(&self, column: &str) -> Result<NaiveDate, StoreError> {
        self.try_get::<PgDate, _>(column)?
            .0
            .ok_or_else(|| StoreError::BadRow {
                table: "wxpay_bills",
                reason: format!("{column} is not a day this program can hold"),
            })
    }

    fn ts(&self, column: &str) -> Result<DateTime<Utc>, StoreError> {
        self.try_get::<PgTime, _>(column)?.finite(column)
    }

    fn opt_ts(&self, column: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.try_get::<Option<PgTime>, _>(column)?
            .map(|t| t.finite(column))
            .transpose()
    }

    /// `infinity` is PostgreSQL's "never", so no expiry; `-infinity` means nothing.
    fn expiry(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self.try_get::<Option<PgTime>, _>("expires_at")? {
            None | Some(PgTime::Infinity) => Ok(None),
            Some(t) => t.finite("expires_at").map(Some),
        }
    }
}

impl Dialect for Postgres {
    type Time = DateTime<Utc>;

    fn time(t: DateTime<Utc>) -> DateTime<Utc> {
        t
    }

    type Date = NaiveDate;

    fn date(d: NaiveDate) -> NaiveDate {
        d
    }

    fn sql(text: &str) -> String {
        numbered(text)
    }

    fn affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }

    const ON_CONFLICT: bool = true;
    const WRITABLE_CTE: bool = true;
}

#[derive(Debug, Clone)]
pub struct PgStore {
    pub(super) pool: PgPool,
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
        rows::all(&rows, rows::claimed)
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
        let groups = [
            (
                &settles,
                bulk(&settles).then(|| settle_many(&picked(writes, &settles, settling), now)),
            ),
            (
                &reschedules,
                bulk(&reschedules)
                    .then(|| reschedule_many(&picked(writes, &reschedules, rescheduling), now)),
            ),
        ];
        for (group, statement) in groups {
            match statement {
                Some(statement) => {
                    let done = statement.fetch_all(&mut *tx).await?;
                    mark(group, rows::all(&done, |r| r.int("id"))?);
                }
                None => single.extend(group),
            }
        }
        single.sort_unstable();
        for i in single {
            applied[i] = sql::apply_one::<Postgres>(&mut tx, writes[i], now).await?;
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

/// The writes of `group` with what `pick` takes of their change (all of them: a group holds
/// one kind of change).
fn picked<'a, 'w, T>(
    writes: &'a [Write<'w>],
    group: &[usize],
    pick: impl Fn(&'w Change) -> Option<T>,
) -> Vec<(&'a Write<'w>, T)> {
    group
        .iter()
        .filter_map(|&i| pick(writes[i].change).map(|t| (&writes[i], t)))
        .collect()
}

/// A statement that returns the ids of the orders whose guard held.
type Ids = Query<'static, Postgres, PgArguments>;

type Time = DateTime<Utc>;

/// The guard and the note of each write of a group, as the first four `UNNEST` arrays.
struct GuardColumns {
    ids: Vec<i64>,
    from: Vec<&'static str>,
    lease: Vec<Option<i64>>,
    note: Vec<Option<String>>,
}

impl GuardColumns {
    fn of<T>(writes: &[(&Write<'_>, T)]) -> GuardColumns {
        GuardColumns {
            ids: writes.iter().map(|(w, _)| w.guard.order_id).collect(),
            from: writes.iter().map(|(w, _)| w.guard.from.as_str()).collect(),
            lease: writes.iter().map(|(w, _)| w.guard.lease).collect(),
            note: writes.iter().map(|(w, _)| change_note(w.change)).collect(),
        }
    }

    /// `sql`, its `$1` to `$4` bound; it returns the ids of the orders whose guard held.
    fn query(&self, sql: &'static str) -> Ids {
        sqlx::query(sql)
            .bind(&self.ids)
            .bind(&self.from)
            .bind(&self.lease)
            .bind(&self.note)
    }
}

/// A settlement's own `UNNEST` values: what WeChat reported, `queried` as 0 or 1, the source.
type Settling<'a> = (&'a Settlement, i32, &'static str);

fn settling(change: &Change) -> Option<Settling<'_>> {
    match change {
        Change::Settle { settlement, source } => {
            Some((settlement, i32::from(source.is_scan()), source.as_str()))
        }
        _ => None,
    }
}

fn rescheduling(change: &Change) -> Option<Time> {
    match change {
        Change::Reschedule { at, .. } => Some(*at),
        _ => None,
    }
}

/// Every guarded settlement of a group and its event, in one statement.
fn settle_many(s: &[(&Write, Settling)], now: Time) -> Ids {
    GuardColumns::of(s)
        .query(
            "WITH input AS (
            SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[],
                $5::TEXT[], $6::TEXT[], $7::TIMESTAMPTZ[], $8::INT[], $9::TEXT[], $10::BIGINT[])
            AS t(id, from_state, lease, note, to_state, transaction_id, paid_at, queried,
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
        RETURNING order_id AS id",
        )
        .bind(column(s, |t| t.0.to.as_str()))
        .bind(column(s, |t| {
            t.0.transaction_id.as_ref().map(|x| x.as_str())
        }))
        .bind(column(s, |t| t.0.paid_at))
        .bind(column(s, |t| t.1))
        .bind(column(s, |t| t.2))
        .bind(column(s, |t| t.0.reported_fee.map(|f| f.get())))
        .bind(now)
}

/// One `UNNEST` array: what `f` takes of each write's values.
fn column<'a, T, V>(group: &'a [(&Write, T)], f: impl Fn(&'a T) -> V) -> Vec<V> {
    group.iter().map(|(_, t)| f(t)).collect()
}

/// Every guarded reschedule of a group, in one statement.
fn reschedule_many(group: &[(&Write, Time)], now: Time) -> Ids {
    GuardColumns::of(group)
        .query(
            "UPDATE wxpay_orders o SET next_query_at = i.at, query_count = o.query_count + 1,
                last_queried_at = $6, last_error = i.note, updated_at = $6
             FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::TIMESTAMPTZ[])
                AS i(id, from_state, lease, note, at)
             WHERE o.id = i.id AND o.state = i.from_state AND (i.lease IS NULL OR o.lease = i.lease)
             RETURNING o.id AS id",
        )
        .bind(column(group, |at| *at))
        .bind(now)
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

    #[test]
    fn every_stored_date_decodes_without_panicking() {
        use super::PgDate;
        let day = |days: i32| PgDate::from_binary(&days.to_be_bytes()).unwrap().0;
        assert_eq!(day(0), chrono::NaiveDate::from_ymd_opt(2000, 1, 1));
        assert_eq!(day(-1), chrono::NaiveDate::from_ymd_opt(1999, 12, 31));
        assert_eq!(day(i32::MAX), None, "infinity");
        assert_eq!(day(i32::MIN), None, "-infinity");
        assert_eq!(day(200_000_000), None, "beyond chrono's years");
        assert!(PgDate::from_binary(&[1, 2]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_eight_bytes_decode(bytes in proptest::array::uniform8(proptest::prelude::any::<u8>())) {
            let _decoded = PgTime::from_binary(&bytes);
        }
    }
}

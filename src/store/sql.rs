//! The SQL every backend shares, written once with `?` placeholders (SQLite and MySQL take
//! them as they are; PostgreSQL gets them [`numbered`]), the values bound to it ([`Arg`],
//! bound by one generic [`BindArgs::bind_args`]), and the guarded writes of SQLite and MySQL.
//! What is left in a backend's file is what its dialect needs.
//!
//! Every statement here is built from this module's constants only; values are always bound
//! parameters.

use std::borrow::Cow;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Database, Encode, Executor, IntoArguments, Type};

use super::rows::{Cols, DialectRow};
use super::{Applied, Backend, Change, NewOrder, Settlement, StoreError, Write};
use crate::domain::Source;

/// The SQL list of open states, a literal (so that it goes into `concat!`, and the partial
/// indexes of the migrations match); a test checks it against [`OrderState::OPEN`].
macro_rules! open_states {
    () => {
        "'NOTPAY', 'USERPAYING'"
    };
}

pub(crate) use open_states;

/// The SQL list of open states, for statements (`'NOTPAY', 'USERPAYING'`).
pub(crate) const OPEN_STATES_SQL: &str = open_states!();

/// The columns every order read returns, in `OrderRow`'s order.
pub(crate) const ORDER_COLUMNS: &str = "id, mch_id, appid, out_trade_no, total_fee, state, \
    transaction_id, paid_at, created_at, expires_at, query_count, next_query_at, last_queried_at, \
    last_error, gave_up_at, fee_type, set_aside_at, set_aside_reason";

/// The columns every event read returns, in `EventRow`'s order.
pub(crate) const EVENT_COLUMNS: &str = "id, order_id, mch_id, out_trade_no, from_state, to_state, \
    source, transaction_id, total_fee, detail, created_at";

/// A value bound to a shared statement.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Text(&'a str),
    OptText(Option<&'a str>),
    /// Bound in the backend's own form ([`Dialect::Time`]).
    Time(DateTime<Utc>),
    OptTime(Option<DateTime<Utc>>),
    /// A calendar day, bound in the backend's own form ([`Dialect::Date`]).
    Date(NaiveDate),
}

/// What a backend's driver needs to run the shared statements.
pub(crate) trait Dialect: Database<Row: DialectRow, Arguments: IntoArguments<Self>> {
    /// A time as this backend binds it (SQLite: its text form; the others: the time).
    type Time: for<'t> Encode<'t, Self> + Type<Self> + Send;

    fn time(t: DateTime<Utc>) -> Self::Time;

    /// A calendar day as this backend binds it (SQLite: `YYYY-MM-DD` text; the others: a
    /// `DATE`).
    type Date: for<'t> Encode<'t, Self> + Type<Self> + Send;

    fn date(d: NaiveDate) -> Self::Date;

    /// The shared text in this backend's placeholders.
    fn sql(text: &str) -> String {
        text.to_owned()
    }

    fn affected(result: &Self::QueryResult) -> u64;

    /// `INSERT … ON CONFLICT DO NOTHING` (SQLite, PostgreSQL); MySQL locks and looks.
    const ON_CONFLICT: bool;
    /// A data-modifying `WITH` (PostgreSQL): a settlement and its event are one statement.
    const WRITABLE_CTE: bool;
}

/// Binds [`Arg`]s; one implementation for every [`Dialect`].
pub(crate) trait BindArgs: Dialect {
    fn bind_args(
        q: Query<'static, Self, Self::Arguments>,
        args: &[Arg<'_>],
    ) -> Query<'static, Self, Self::Arguments>;
}

impl<D: Dialect> BindArgs for D
where
    i64: for<'t> Encode<'t, D> + Type<D>,
    Option<i64>: for<'t> Encode<'t, D> + Type<D>,
    for<'a> &'a str: Encode<'a, D> + Type<D>,
    for<'a> Option<&'a str>: Encode<'a, D> + Type<D>,
    Option<D::Time>: for<'t> Encode<'t, D> + Type<D>,
{
    fn bind_args(
        mut q: Query<'static, D, D::Arguments>,
        args: &[Arg<'_>],
    ) -> Query<'static, D, D::Arguments> {
        for a in args {
            q = match *a {
                Arg::Int(i) => q.bind(i),
                Arg::OptInt(i) => q.bind(i),
                Arg::Text(t) => q.bind(t),
                Arg::OptText(t) => q.bind(t),
                Arg::Time(t) => q.bind(D::time(t)),
                Arg::OptTime(t) => q.bind(t.map(D::time)),
                Arg::Date(d) => q.bind(D::date(d)),
            };
        }
        q
    }
}

/// A shared statement and its values.
#[derive(Debug, Clone)]
pub(crate) struct Statement<'a> {
    pub sql: Cow<'static, str>,
    pub args: Vec<Arg<'a>>,
}

impl<'a> Statement<'a> {
    pub fn new(sql: impl Into<Cow<'static, str>>, args: Vec<Arg<'a>>) -> Statement<'a> {
        Statement {
            sql: sql.into(),
            args,
        }
    }

    /// The statement for backend `D`, its values bound.
    pub fn query<D: BindArgs>(&self) -> Query<'static, D, D::Arguments> {
        D::bind_args(sqlx::query(AssertSqlSafe(D::sql(&self.sql))), &self.args)
    }
}

/// `?` placeholders → PostgreSQL's `$1`, `$2`, … (the shared statements hold no `?` in
/// literals).
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// The read queries every backend shares.
pub(crate) mod reads {
    use super::{Arg, Backend, EVENT_COLUMNS, OPEN_STATES_SQL, ORDER_COLUMNS, Statement};
    use crate::domain::Anomaly;
    use crate::store::SummaryRequest;

    pub fn oldest_open() -> String {
        format!(
            "SELECT {ORDER_COLUMNS} FROM wxpay_orders WHERE state IN ({OPEN_STATES_SQL}) \
             ORDER BY created_at LIMIT ?"
        )
    }

    pub fn find() -> String {
        format!("SELECT {ORDER_COLUMNS} FROM wxpay_orders WHERE out_trade_no = ? ORDER BY mch_id")
    }

    pub fn in_state() -> String {
        format!("SELECT {ORDER_COLUMNS} FROM wxpay_orders WHERE state = ? ORDER BY id LIMIT ?")
    }

    pub fn find_of_merchant() -> String {
        format!("SELECT {ORDER_COLUMNS} FROM wxpay_orders WHERE mch_id = ? AND out_trade_no = ?")
    }

    pub fn by_id() -> String {
        format!("SELECT {ORDER_COLUMNS} FROM wxpay_orders WHERE id = ?")
    }

    /// The anomaly is a literal (from [`Anomaly`], never input), so that the partial index of
    /// migration 0002 matches on SQLite and PostgreSQL.
    pub fn paid_after_close() -> String {
        let anomaly = Anomaly::PaidAfterClose.as_str();
        format!(
            "SELECT {EVENT_COLUMNS} FROM wxpay_order_events WHERE to_state = '{anomaly}' \
             ORDER BY id DESC LIMIT ?"
        )
    }

    pub fn events_of_order() -> String {
        format!("SELECT {EVENT_COLUMNS} FROM wxpay_order_events WHERE order_id = ? ORDER BY id")
    }

    pub fn events_after() -> String {
        format!("SELECT {EVENT_COLUMNS} FROM wxpay_order_events WHERE id > ? ORDER BY id LIMIT ?")
    }

    /// Quarantined and set-aside open orders per merchant, through the partial index of
    /// migration 0003 (SQLite) / 0004 (PostgreSQL); MySQL has its own
    /// (`mysql::ATTENTION`).
    pub const ATTENTION: &str = concat!(
        "SELECT mch_id,
            SUM(CASE WHEN state = 'AMOUNT_MISMATCH' THEN 1 ELSE 0 END) AS mismatched,
            SUM(CASE WHEN set_aside_at IS NOT NULL AND state IN (",
        open_states!(),
        ")
                THEN 1 ELSE 0 END) AS set_aside
        FROM wxpay_orders WHERE state = 'AMOUNT_MISMATCH' OR set_aside_at IS NOT NULL
        GROUP BY mch_id"
    );

    /// The open orders set aside, latest first.
    pub const SET_ASIDE: &str = concat!(
        "SELECT id, mch_id, out_trade_no, state, set_aside_at,
            set_aside_reason
        FROM wxpay_orders WHERE set_aside_at IS NOT NULL AND state IN (",
        open_states!(),
        ")
        ORDER BY set_aside_at DESC LIMIT ?"
    );

    pub const COUNT_BY_STATE: &str = "SELECT state, COUNT(*) AS n FROM wxpay_orders GROUP BY state";

    pub const MIGRATIONS: &str =
        "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version";

    /// Open orders per merchant: how many, how many stuck, how many expired, the oldest.
    pub fn open_summary(backend: Backend, req: &SummaryRequest) -> Statement<'static> {
        // How each backend counts the rows of a group that match (MySQL's SUM is a DECIMAL).
        let count = |condition: &str| match backend {
            Backend::Postgres => format!("COUNT(*) FILTER (WHERE {condition})"),
            Backend::Sqlite => format!("SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)"),
            Backend::Mysql => {
                format!("CAST(SUM(CASE WHEN {condition} THEN 1 ELSE 0 END) AS SIGNED)")
            }
        };
        let sql = format!(
            "SELECT mch_id, COUNT(*) AS open, {} AS stuck, {} AS expired,
                    MIN(created_at) AS oldest
             FROM wxpay_orders WHERE state IN ({OPEN_STATES_SQL}) GROUP BY mch_id",
            count("created_at < ?"),
            count("expires_at <= ? OR (expires_at IS NULL AND created_at <= ?)"),
        );
        Statement::new(
            sql,
            vec![
                Arg::Time(req.stuck_before),
                Arg::Time(req.now),
                Arg::Time(req.expired_if_created_before),
            ],
        )
    }
}

/// The columns of an event `INSERT`.
const INSERT_EVENT: &str = "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, \
    from_state, to_state, source, transaction_id, total_fee, detail, created_at)";

const SETTLE: &str = "UPDATE wxpay_orders SET state = ?,
        transaction_id = COALESCE(?, transaction_id),
        paid_at = COALESCE(?, paid_at),
        query_count = query_count + ?,
        last_queried_at = CASE WHEN ? = 1 THEN ? ELSE last_queried_at END,
        last_error = ?, updated_at = ?
     WHERE id = ? AND state = ? AND (? IS NULL OR lease = ?)";

const RESCHEDULE: &str = "UPDATE wxpay_orders SET next_query_at = ?, query_count = query_count + 1,
        last_queried_at = ?, last_error = ?, updated_at = ?
     WHERE id = ? AND state = ? AND (? IS NULL OR lease = ?)";

const GIVE_UP: &str = "UPDATE wxpay_orders SET gave_up_at = ?, query_count = query_count + 1,
        last_queried_at = ?, last_error = ?, updated_at = ?
     WHERE id = ? AND state = ? AND (? IS NULL OR lease = ?)";

const SET_ASIDE: &str = concat!(
    "UPDATE wxpay_orders SET set_aside_at = ?, set_aside_reason = ?, gave_up_at = ?,
        last_error = ?, updated_at = ?
     WHERE id = ? AND (? IS NULL OR lease = ?) AND state IN (",
    open_states!(),
    ")
       AND set_aside_at IS NULL"
);

/// Sets an open order aside (see `Store::set_aside`).
pub(crate) fn set_aside<'a>(
    id: i64,
    lease: Option<i64>,
    reason: &'a str,
    now: DateTime<Utc>,
) -> Statement<'a> {
    let (now, reason, lease) = (Arg::Time(now), Arg::Text(reason), Arg::OptInt(lease));
    Statement::new(
        SET_ASIDE,
        vec![now, reason, now, reason, now, Arg::Int(id), lease, lease],
    )
}

/// The merchant's own `INSERT` of an order; `RETURNING id` where the backend has it.
pub(crate) fn insert_order<'a>(order: &NewOrder<'a>, returning: bool) -> Statement<'a> {
    let sql = "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) \
               VALUES (?, ?, ?, ?)";
    Statement::new(
        if returning {
            Cow::Owned(format!("{sql} RETURNING id"))
        } else {
            Cow::Borrowed(sql)
        },
        vec![
            Arg::Text(order.mch_id),
            Arg::Text(order.appid),
            Arg::Text(order.out_trade_no),
            Arg::Int(order.total_fee),
        ],
    )
}

/// The detail recorded with the event and in `last_error`, bounded to what every backend's
/// column holds ([`crate::text::note`]): WeChat's descriptions and error texts are outside
/// input of any length.
pub(crate) fn change_note(change: &Change) -> Option<String> {
    let note = match change {
        Change::Settle { settlement, .. } => settlement.detail.as_deref(),
        Change::Reschedule { note, .. } => note.as_deref(),
        Change::GiveUp { reason } => Some(reason.as_str()),
        Change::Anomaly { report, .. } => report.detail.as_deref(),
    };
    note.map(crate::text::note)
}

/// The event a write records: a settlement's, or an anomaly's.
struct Event<'a> {
    /// A state, or an anomaly's name.
    to: &'static str,
    source: Source,
    /// What WeChat reported.
    report: &'a Settlement,
}

/// The statements of one guarded write.
pub(crate) struct WriteSql<'a> {
    write: Write<'a>,
    note: Option<&'a str>,
    now: DateTime<Utc>,
}

/// How a backend applies one write.
pub(crate) enum Plan<'a> {
    /// One statement; a row affected means it applied.
    One(Statement<'a>),
    /// The guarded `UPDATE`, then (when it matched) the event's `INSERT`.
    UpdateThenEvent(Statement<'a>, Statement<'a>),
    /// MySQL's anomaly: lock the order, look for the event, insert it (the three statements).
    LockedAnomaly([Statement<'a>; 3]),
}

impl<'a> WriteSql<'a> {
    /// `note` is [`change_note`] of the write's change.
    pub fn new(write: Write<'a>, note: Option<&'a str>, now: DateTime<Utc>) -> WriteSql<'a> {
        WriteSql { write, note, now }
    }

    fn guard(&self) -> [Arg<'a>; 4] {
        let g = self.write.guard;
        let lease = Arg::OptInt(g.lease);
        [
            Arg::Int(g.order_id),
            Arg::Text(g.from.as_str()),
            lease,
            lease,
        ]
    }

    /// An event's values from `from_state` on.
    fn event_values(&self, e: &Event<'a>) -> [Arg<'a>; 7] {
        [
            Arg::Text(self.write.guard.from.as_str()),
            Arg::Text(e.to),
            Arg::Text(e.source.as_str()),
            Arg::OptText(e.report.transaction_id.as_ref().map(|t| t.as_str())),
            Arg::OptInt(e.report.reported_fee.map(|f| f.get())),
            Arg::OptText(self.note),
            Arg::Time(self.now),
        ]
    }

    /// A guarded `UPDATE`: `sql` with the values of its `SET`, then of its guard.
    fn guarded(&self, sql: &'static str, mut set: Vec<Arg<'a>>) -> Statement<'a> {
        set.extend(self.guard());
        Statement::new(sql, set)
    }

    /// The event as `INSERT … VALUES`, from what the order was read with.
    fn insert_event(&self, e: &Event<'a>) -> Statement<'a> {
        let order = self.write.order;
        let mut args = vec![
            Arg::Int(order.id),
            Arg::Text(order.mch_id.as_str()),
            Arg::Text(order.out_trade_no.as_str()),
        ];
        args.extend(self.event_values(e));
        Statement::new(
            format!("{INSERT_EVENT} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
            args,
        )
    }

    /// The statements for a backend with `D`'s abilities.
    pub fn plan<D: Dialect>(&self) -> Plan<'a> {
        let (now, note) = (Arg::Time(self.now), Arg::OptText(self.note));
        match self.write.change {
            Change::Settle { settlement, source } => {
                let queried = Arg::Int(i64::from(source.is_scan()));
                let tx = settlement.transaction_id.as_ref().map(|t| t.as_str());
                let (to, paid) = (settlement.to.as_str(), Arg::OptTime(settlement.paid_at));
                let set = [
                    Arg::Text(to),
                    Arg::OptText(tx),
                    paid,
                    queried,
                    queried,
                    now,
                    note,
                    now,
                ];
                let event = Event {
                    to,
                    source: *source,
                    report: settlement,
                };
                self.settle::<D>(self.guarded(SETTLE, set.to_vec()), &event)
            }
            Change::Reschedule { at, .. } => {
                Plan::One(self.guarded(RESCHEDULE, vec![Arg::Time(*at), now, note, now]))
            }
            Change::GiveUp { .. } => Plan::One(self.guarded(GIVE_UP, vec![now, now, note, now])),
            Change::Anomaly {
                anomaly,
                report,
                source,
            } => self.anomaly::<D>(&Event {
                to: anomaly.as_str(),
                source: *source,
                report,
            }),
        }
    }

    fn settle<D: Dialect>(&self, update: Statement<'a>, event: &Event<'a>) -> Plan<'a> {
        if !D::WRITABLE_CTE {
            return Plan::UpdateThenEvent(update, self.insert_event(event));
        }
        // The guarded UPDATE and its event in one statement: one round trip, and the event
        // exists exactly when the UPDATE matched.
        let sql = format!(
            "WITH moved AS ({} RETURNING id, mch_id, out_trade_no)
             {INSERT_EVENT} SELECT id, mch_id, out_trade_no, ?, ?, ?, ?, ?, ?, ? FROM moved",
            update.sql
        );
        let mut args = update.args;
        args.extend(self.event_values(event));
        Plan::One(Statement::new(sql, args))
    }

    /// An event that changes no state, only while the order is still in `from`, once.
    fn anomaly<D: Dialect>(&self, event: &Event<'a>) -> Plan<'a> {
        let [id, from, ..] = self.guard();
        if !D::ON_CONFLICT {
            return Plan::LockedAnomaly([
                Statement::new(
                    "SELECT state FROM wxpay_orders WHERE id = ? FOR UPDATE",
                    vec![id],
                ),
                Statement::new(
                    "SELECT COUNT(*) AS n FROM wxpay_order_events \
                     WHERE order_id = ? AND to_state = ?",
                    vec![id, Arg::Text(event.to)],
                ),
                self.insert_event(event),
            ]);
        }
        // A second one is no error.
        let sql = format!(
            "{INSERT_EVENT} SELECT id, mch_id, out_trade_no, ?, ?, ?, ?, ?, ?, ?
             FROM wxpay_orders WHERE id = ? AND state = ?
             ON CONFLICT (order_id, to_state) DO NOTHING"
        );
        let mut args = self.event_values(event).to_vec();
        args.extend([id, from]);
        Plan::One(Statement::new(sql, args))
    }
}

/// Applies one guarded write on `conn` (inside the caller's transaction).
pub(crate) async fn apply_one<D: BindArgs>(
    conn: &mut D::Connection,
    write: Write<'_>,
    now: DateTime<Utc>,
) -> Result<Applied, StoreError>
where
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
{
    let note = change_note(write.change);
    let plan = WriteSql::new(write, note.as_deref(), now).plan::<D>();
    let applied = match plan {
        Plan::One(s) => Applied::of(D::affected(&s.query::<D>().execute(&mut *conn).await?)),
        Plan::UpdateThenEvent(update, event) => {
            let applied = Applied::of(D::affected(&update.query::<D>().execute(&mut *conn).await?));
            if applied == Applied::Done {
                event.query::<D>().execute(&mut *conn).await?;
            }
            applied
        }
        // The order row's lock serializes writers of the same anomaly; the event only while
        // the order is still in `from`, once.
        Plan::LockedAnomaly([lock, seen, insert]) => {
            let state = lock.query::<D>().fetch_optional(&mut *conn).await?;
            let state = state.map(|r| r.text("state")).transpose()?;
            if state.as_deref() != Some(write.guard.from.as_str()) {
                return Ok(Applied::NoOp);
            }
            let seen = seen.query::<D>().fetch_one(&mut *conn).await?;
            if seen.int("n")? > 0 {
                return Ok(Applied::NoOp);
            }
            insert.query::<D>().execute(&mut *conn).await?;
            Applied::Done
        }
    };
    Ok(applied)
}

/// Applies `writes` one after the other on `conn` (inside the caller's transaction), each
/// with its own guard and result.
pub(crate) async fn apply_in_order<D: BindArgs>(
    conn: &mut D::Connection,
    writes: &[Write<'_>],
    now: DateTime<Utc>,
) -> Result<Vec<Applied>, StoreError>
where
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
{
    let mut applied = Vec::with_capacity(writes.len());
    for w in writes {
        applied.push(apply_one::<D>(&mut *conn, *w, now).await?);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::OrderState;

    #[test]
    fn shared_reads_are_numbered_for_postgres() {
        assert_eq!(
            numbered("a = ? AND b > ? LIMIT ?"),
            "a = $1 AND b > $2 LIMIT $3"
        );
        assert!(numbered(&reads::events_after()).ends_with("id > $1 ORDER BY id LIMIT $2"));
    }

    #[test]
    fn the_open_states_of_the_sql_are_the_open_states() {
        let open: Vec<String> = OrderState::OPEN
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect();
        assert_eq!(OPEN_STATES_SQL, open.join(", "));
    }

    #[test]
    fn every_write_binds_one_value_per_placeholder() {
        for sql in [SETTLE, RESCHEDULE, GIVE_UP, SET_ASIDE] {
            assert!(!sql.contains('$'), "{sql}");
        }
        assert_eq!(SETTLE.matches('?').count(), 12);
        assert_eq!(RESCHEDULE.matches('?').count(), 8);
        assert_eq!(GIVE_UP.matches('?').count(), 8);
        assert_eq!(SET_ASIDE.matches('?').count(), 8);
    }
}

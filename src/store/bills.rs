//! Bills (`wxpay_bills`, `wxpay_bill_findings`) and the local side of a bill day, written once
//! for the three backends as the refunds are (shared `?` statements, [`Dialect`]s).
//!
//! - **Claim**: one transaction upserts the row of the merchant's bill day, locks it
//!   (PostgreSQL, MySQL: `FOR UPDATE`; SQLite: the upsert took the database's write lock),
//!   decides from what it holds, and for a claim moves it to `RUNNING` with `lease + 1` and
//!   deletes the day's previous findings. Two instances claiming one day: one gets it, the
//!   other sees `RUNNING` under an unexpired lease.
//! - **A run's writes** carry its lease: findings are inserted, and the day finished, only while
//!   the row still holds it (a guarded `UPDATE` first, which also locks the row, so that a
//!   newer claim's `DELETE` of the findings comes after, never between).
//! - **The local side** of a day: lookups by number (`IN (…)`, at most [`LOOKUP_BATCH`] values
//!   a statement; an unreadable row comes back as such, its batch-mates go on), and the orders
//!   paid / refunds succeeded in `[from, to)` as an id span and keyset pages (of rows, or of
//!   their ids alone), through the partial indexes `wxpay_orders_paid` and
//!   `wxpay_refunds_succeeded` (MySQL: plain ones).
//!
//! Sums are not asked of the database (`SUM`'s type differs on every backend); counts are.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use sqlx::Executor;

use super::refunds::{REFUND_COLUMNS, RefundRead, refund_read};
use super::rows::{self, Cols, DialectRow};
use super::sql::{Arg, BindArgs, ORDER_COLUMNS, Statement};
use super::{Backend, OrderRead, Store, StoreError};
use crate::domain::ParseError;

/// An enum of names stored in a column: `as_str`, `ALL`, `FromStr`, `Display`.
macro_rules! names {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v),+
        }

        impl $name {
            pub const ALL: [$name; [$($s),+].len()] = [$($name::$v),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s),+
                }
            }
        }

        impl FromStr for $name {
            type Err = ParseError;

            fn from_str(s: &str) -> Result<Self, ParseError> {
                $name::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| {
                    ParseError::new(
                        $what,
                        format!("{} is no {}", crate::text::quote(s), $what),
                    )
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names! {
    /// Where a merchant's bill day stands.
    BillState, "bill state" {
        /// An instance runs it, under `lease` until `lease_until`.
        Running => "RUNNING",
        /// Compared, findings recorded.
        Reconciled => "RECONCILED",
        /// WeChat has not made the bill yet (`Bill Creating`); due again at `next_attempt_at`.
        NotReady => "NOT_READY",
        /// The bill was refused (its hash, or a summary that does not add up).
        Refused => "REFUSED",
        /// The run failed (WeChat or the database unavailable, a bill that cannot be read).
        Failed => "FAILED",
    }
}

names! {
    /// Where a bill came from.
    BillOrigin, "bill origin" {
        /// Downloaded from WeChat.
        Download => "download",
        /// A file a person gave (`bills reconcile --file`).
        File => "file",
    }
}

names! {
    /// What the comparison found (DESIGN.md, "Bills").
    FindingKind, "finding kind" {
        /// In the bill, unknown locally.
        RemoteOnly => "remote_only",
        /// Paid (or refunded) locally, absent from the bill.
        LocalOnly => "local_only",
        AmountDiff => "amount_diff",
        StateDiff => "state_diff",
        /// Paid in the bill and open locally: settled from the bill.
        SettledByBill => "settled_by_bill",
        /// Paid in the bill, closed locally.
        PaidAfterClose => "paid_after_close",
    }
}

names! {
    /// What a finding is about.
    FindingObject, "finding object" {
        Payment => "payment",
        Refund => "refund",
    }
}

names! {
    /// What the daemon did about a finding.
    FindingAction, "finding action" {
        /// Reported (and alerted) only.
        Reported => "reported",
        /// Settled through the one Settler (or the refund rules).
        Settled => "settled",
        /// Quarantined (`AMOUNT_MISMATCH`).
        Quarantined => "quarantined",
        /// Recorded as an event that changes no state (`PAID_AFTER_CLOSE`).
        Recorded => "recorded",
    }
}

/// The parameters of [`Store::claim_bill`].
#[derive(Debug, Clone, Copy)]
pub struct BillClaimRequest<'a> {
    pub mch_id: &'a str,
    pub bill_date: NaiveDate,
    pub now: DateTime<Utc>,
    /// The lease runs until `now + lease_for`.
    pub lease_for: TimeDelta,
    /// Run the day even when it is reconciled or not due (never while another instance holds
    /// an unexpired lease on it).
    pub force: bool,
}

/// What [`Store::claim_bill`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillClaim {
    /// This instance runs the day; its writes carry `lease`. The day's previous findings were
    /// deleted in the same transaction as the claim.
    Claimed { bill_id: i64, lease: i64 },
    /// Another instance holds an unexpired lease on this day.
    Busy,
    /// Already `RECONCILED`, or `NOT_READY` / `FAILED` / `REFUSED` with `next_attempt_at` in
    /// the future, and not forced.
    NotDue { state: BillState },
}

/// One finding of a run ([`Store::insert_findings`]). Texts are bounded when stored
/// ([`crate::text::note_with`] to their column's width; `detail` through
/// [`crate::text::note`]).
#[derive(Debug, Clone, Copy)]
pub struct NewFinding<'a> {
    pub kind: FindingKind,
    pub object: FindingObject,
    pub mch_id: &'a str,
    pub bill_date: NaiveDate,
    pub out_trade_no: &'a str,
    pub out_refund_no: Option<&'a str>,
    pub transaction_id: Option<&'a str>,
    /// Integer fen: the shop's amount, the bill's.
    pub local_fee: Option<i64>,
    pub remote_fee: Option<i64>,
    pub local_state: Option<&'a str>,
    pub remote_state: Option<&'a str>,
    pub action: FindingAction,
    /// The bill's line (1 = the header).
    pub line: Option<u64>,
    pub detail: Option<&'a str>,
}

/// A bill's counts and totals, as the run computed them from its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillTotals {
    /// Data lines, refunds included.
    pub row_count: i64,
    pub payment_count: i64,
    pub refund_count: i64,
    /// Integer fen: the payments' order amounts.
    pub total_fee: i64,
    /// Integer fen: the refunds' amounts.
    pub refund_fee: i64,
    /// The day's fees, exact: thousandths of a fen (may be negative).
    pub fee_milli_fen: i64,
}

/// How a run ends ([`Store::finish_bill`]). Every column it names is written as given (`None`
/// clears it); `reconciled_at` becomes `now` for [`BillState::Reconciled`] and is kept
/// otherwise (the last time the day was reconciled).
#[derive(Debug, Clone, Copy)]
pub struct BillEnd<'a> {
    /// Not [`BillState::Running`].
    pub state: BillState,
    pub origin: Option<BillOrigin>,
    /// Hex SHA-1 of the decompressed bill text (40 hexadecimal digits, else
    /// [`StoreError::Invalid`]).
    pub sha1: Option<&'a str>,
    pub totals: Option<BillTotals>,
    /// `adds_up`, `differs` or `missing`.
    pub summary_check: Option<&'a str>,
    /// Bounded ([`crate::text::note`]).
    pub last_error: Option<&'a str>,
    /// When the day is due again (`None`: at once, for a day not reconciled).
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
}

/// The ids of a set of rows: the smallest, the largest (`None` when there is none), how many.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdSpan {
    pub min_id: Option<i64>,
    pub max_id: Option<i64>,
    pub count: i64,
}

/// One row of `wxpay_bills`, with its findings counted by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillRecord {
    pub id: i64,
    pub mch_id: String,
    pub bill_date: NaiveDate,
    pub state: BillState,
    pub lease: i64,
    /// Until when a `RUNNING` day's lease holds (a past one: its instance is gone).
    pub lease_until: Option<DateTime<Utc>>,
    pub attempts: i64,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub origin: Option<BillOrigin>,
    pub sha1: Option<String>,
    pub totals: Option<BillTotals>,
    pub summary_check: Option<String>,
    pub last_error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub reconciled_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// Every kind, in [`FindingKind::ALL`]'s order, with its count (0 included).
    pub findings: Vec<(FindingKind, i64)>,
}

/// One row of `wxpay_bill_findings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FindingRow {
    pub id: i64,
    pub bill_id: i64,
    pub kind: FindingKind,
    pub object: FindingObject,
    pub out_trade_no: String,
    pub out_refund_no: Option<String>,
    pub transaction_id: Option<String>,
    pub local_fee: Option<i64>,
    pub remote_fee: Option<i64>,
    pub local_state: Option<String>,
    pub remote_state: Option<String>,
    pub action: FindingAction,
    pub line: Option<u64>,
    pub detail: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The most numbers one lookup statement binds.
pub const LOOKUP_BATCH: usize = 1000;

/// The columns every bill read returns.
const BILL_COLUMNS: &str = "id, mch_id, bill_date, state, lease, lease_until, attempts, \
    next_attempt_at, origin, sha1, row_count, payment_count, refund_count, total_fee, \
    refund_fee, fee_milli_fen, summary_check, last_error, started_at, reconciled_at, updated_at";

/// The columns every finding read returns.
const FINDING_COLUMNS: &str = "id, bill_id, kind, object, out_trade_no, out_refund_no, \
    transaction_id, local_fee, remote_fee, local_state, remote_state, action, line, detail, \
    created_at";

/// The columns of a finding's `INSERT` (`created_at` is the database's).
const INSERT_FINDINGS: &str = "INSERT INTO wxpay_bill_findings (bill_id, mch_id, bill_date, \
    kind, object, out_trade_no, out_refund_no, transaction_id, local_fee, remote_fee, \
    local_state, remote_state, action, line, detail) VALUES ";

/// The values of one finding.
const FINDING_VALUES: usize = 15;

/// What a multi-row `INSERT` of findings holds at most, in bytes of text (well under MySQL's
/// `max_allowed_packet`, whose default is 16 MiB on MariaDB).
const INSERT_BYTES: usize = 4 << 20;

/// The orders a bill day compares: paid (a literal, so that the partial index
/// `wxpay_orders_paid` matches on PostgreSQL and SQLite).
const PAID: &str = "state IN ('SUCCESS', 'REFUND')";

/// The guard of a run's writes: its lease, still running.
const HELD: &str = "WHERE id = ? AND lease = ? AND state = 'RUNNING'";

fn bad(reason: impl fmt::Display) -> StoreError {
    StoreError::BadRow {
        table: "wxpay_bills",
        reason: reason.to_string(),
    }
}

fn parsed<T: FromStr<Err = ParseError>>(r: &impl Cols, column: &str) -> Result<T, StoreError> {
    r.text(column)?.parse().map_err(bad)
}

fn opt_parsed<T: FromStr<Err = ParseError>>(
    r: &impl Cols,
    column: &str,
) -> Result<Option<T>, StoreError> {
    r.opt_text(column)?
        .map(|t| t.parse().map_err(bad))
        .transpose()
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// The largest number of bound values one statement may hold on `backend`.
fn max_binds(backend: Backend) -> usize {
    match backend {
        Backend::Sqlite => 32_766,
        Backend::Postgres | Backend::Mysql => 65_535,
    }
}

/// A row of [`BILL_COLUMNS`], without its findings.
fn bill_record<R: DialectRow>(r: &R) -> Result<BillRecord, StoreError> {
    let totals = match r.opt_int("row_count")? {
        None => None,
        Some(row_count) => {
            let need = |column: &str| {
                r.opt_int(column)?
                    .ok_or_else(|| bad(format!("row_count is set but {column} is NULL")))
            };
            Some(BillTotals {
                row_count,
                payment_count: need("payment_count")?,
                refund_count: need("refund_count")?,
                total_fee: need("total_fee")?,
                refund_fee: need("refund_fee")?,
                fee_milli_fen: need("fee_milli_fen")?,
            })
        }
    };
    Ok(BillRecord {
        id: r.int("id")?,
        mch_id: r.text("mch_id")?,
        bill_date: r.date("bill_date")?,
        state: parsed(r, "state")?,
        lease: r.int("lease")?,
        lease_until: r.opt_ts("lease_until")?,
        attempts: i64::from(r.int32("attempts")?),
        next_attempt_at: r.opt_ts("next_attempt_at")?,
        origin: opt_parsed(r, "origin")?,
        sha1: r.opt_text("sha1")?,
        totals,
        summary_check: r.opt_text("summary_check")?,
        last_error: r.opt_text("last_error")?,
        started_at: r.opt_ts("started_at")?,
        reconciled_at: r.opt_ts("reconciled_at")?,
        updated_at: r.ts("updated_at")?,
        findings: FindingKind::ALL.iter().map(|k| (*k, 0)).collect(),
    })
}

fn finding_row<R: DialectRow>(r: &R) -> Result<FindingRow, StoreError> {
    let line = r
        .opt_int("line")?
        .map(|l| u64::try_from(l).map_err(|_| bad(format!("finding line {l} is negative"))))
        .transpose()?;
    Ok(FindingRow {
        id: r.int("id")?,
        bill_id: r.int("bill_id")?,
        kind: parsed(r, "kind")?,
        object: parsed(r, "object")?,
        out_trade_no: r.text("out_trade_no")?,
        out_refund_no: r.opt_text("out_refund_no")?,
        transaction_id: r.opt_text("transaction_id")?,
        local_fee: r.opt_int("local_fee")?,
        remote_fee: r.opt_int("remote_fee")?,
        local_state: r.opt_text("local_state")?,
        remote_state: r.opt_text("remote_state")?,
        action: parsed(r, "action")?,
        line,
        detail: r.opt_text("detail")?,
        created_at: r.ts("created_at")?,
    })
}

/// Whether a day that is not running under an unexpired lease is due: `None` to claim it, or
/// why not.
fn not_claimable(
    state: BillState,
    lease_until: Option<DateTime<Utc>>,
    next_attempt_at: Option<DateTime<Utc>>,
    req: &BillClaimRequest<'_>,
) -> Option<BillClaim> {
    if state == BillState::Running && lease_until.is_some_and(|u| u > req.now) {
        return Some(BillClaim::Busy);
    }
    if req.force {
        return None;
    }
    match state {
        // An expired lease: its instance is gone.
        BillState::Running => None,
        BillState::Reconciled => Some(BillClaim::NotDue { state }),
        BillState::NotReady | BillState::Failed | BillState::Refused => next_attempt_at
            .filter(|at| *at > req.now)
            .map(|_| BillClaim::NotDue { state }),
    }
}

/// The claim, inside the caller's transaction; `lock` is the row-lock clause of the backend.
async fn claim<D: BindArgs>(
    conn: &mut D::Connection,
    req: &BillClaimRequest<'_>,
    lock: &str,
) -> Result<BillClaim, StoreError>
where
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
{
    let (mch, day) = (Arg::Text(req.mch_id), Arg::Date(req.bill_date));
    // A new day is due at once. On SQLite this first statement takes the write lock, so the
    // reads below see the last commit (no read snapshot to upgrade: no SQLITE_BUSY_SNAPSHOT).
    let insert = "INSERT INTO wxpay_bills (mch_id, bill_date, state) VALUES (?, ?, 'NOT_READY')";
    let upsert = if D::ON_CONFLICT {
        format!("{insert} ON CONFLICT (mch_id, bill_date) DO NOTHING")
    } else {
        format!("{insert} ON DUPLICATE KEY UPDATE id = id")
    };
    Statement::new(upsert, vec![mch, day])
        .query::<D>()
        .execute(&mut *conn)
        .await?;
    let row = Statement::new(
        format!(
            "SELECT id, state, lease, lease_until, next_attempt_at FROM wxpay_bills \
             WHERE mch_id = ? AND bill_date = ? {lock}"
        ),
        vec![mch, day],
    )
    .query::<D>()
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(StoreError::NoResult)?;
    let (id, lease) = (row.int("id")?, row.int("lease")?);
    let state: BillState = parsed(&row, "state")?;
    let (until, next) = (row.opt_ts("lease_until")?, row.opt_ts("next_attempt_at")?);
    if let Some(answer) = not_claimable(state, until, next, req) {
        return Ok(answer);
    }
    let now = Arg::Time(req.now);
    let claimed = Statement::new(
        "UPDATE wxpay_bills SET state = 'RUNNING', lease = lease + 1, lease_until = ?, \
         attempts = attempts + 1, next_attempt_at = NULL, started_at = ?, updated_at = ? \
         WHERE id = ? AND lease = ?",
        vec![
            Arg::Time(req.now + req.lease_for),
            now,
            now,
            Arg::Int(id),
            Arg::Int(lease),
        ],
    )
    .query::<D>()
    .execute(&mut *conn)
    .await?;
    if D::affected(&claimed) != 1 {
        return Ok(BillClaim::Busy);
    }
    Statement::new(
        "DELETE FROM wxpay_bill_findings WHERE bill_id = ?",
        vec![Arg::Int(id)],
    )
    .query::<D>()
    .execute(&mut *conn)
    .await?;
    Ok(BillClaim::Claimed {
        bill_id: id,
        lease: lease + 1,
    })
}

/// A finding's texts, bounded to their columns.
struct Bounded {
    out_trade_no: String,
    out_refund_no: Option<String>,
    transaction_id: Option<String>,
    local_state: Option<String>,
    remote_state: Option<String>,
    detail: Option<String>,
}

/// `s` for a column of `n` characters: as it is when it fits ([`crate::text::note_with`]
/// escapes included), else cut to `n` with its mark.
fn fit(s: &str, n: usize) -> String {
    let whole = crate::text::note_with(s, n + 1);
    if whole.chars().count() <= n {
        whole
    } else {
        crate::text::note_with(s, n)
    }
}

impl Bounded {
    fn of(f: &NewFinding<'_>) -> Bounded {
        let width = fit;
        Bounded {
            out_trade_no: width(f.out_trade_no, 64),
            out_refund_no: f.out_refund_no.map(|s| width(s, 64)),
            transaction_id: f.transaction_id.map(|s| width(s, 64)),
            local_state: f.local_state.map(|s| width(s, 32)),
            remote_state: f.remote_state.map(|s| width(s, 32)),
            detail: f.detail.map(crate::text::note),
        }
    }

    /// About what the row's values take in a statement.
    fn bytes(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        160 + self.out_trade_no.len()
            + opt(&self.out_refund_no)
            + opt(&self.transaction_id)
            + opt(&self.local_state)
            + opt(&self.remote_state)
            + opt(&self.detail)
    }
}

/// Inserts `findings` (with their bounded texts) in multi-row statements of at most `per`
/// rows and [`INSERT_BYTES`], inside the caller's transaction.
async fn insert_all<D: BindArgs>(
    conn: &mut D::Connection,
    bill_id: i64,
    findings: &[(NewFinding<'_>, Bounded)],
    per: usize,
) -> Result<(), StoreError>
where
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
{
    let row = format!("({})", placeholders(FINDING_VALUES));
    let mut at = 0;
    while at < findings.len() {
        let mut end = at;
        let mut bytes = 0;
        while end < findings.len() && end - at < per && (end == at || bytes < INSERT_BYTES) {
            bytes += findings[end].1.bytes();
            end += 1;
        }
        let chunk = &findings[at..end];
        let mut args = Vec::with_capacity(chunk.len() * FINDING_VALUES);
        for (f, b) in chunk {
            let line = f.line.map(|l| i64::try_from(l).unwrap_or(i64::MAX));
            args.extend([
                Arg::Int(bill_id),
                Arg::Text(f.mch_id),
                Arg::Date(f.bill_date),
                Arg::Text(f.kind.as_str()),
                Arg::Text(f.object.as_str()),
                Arg::Text(&b.out_trade_no),
                Arg::OptText(b.out_refund_no.as_deref()),
                Arg::OptText(b.transaction_id.as_deref()),
                Arg::OptInt(f.local_fee),
                Arg::OptInt(f.remote_fee),
                Arg::OptText(b.local_state.as_deref()),
                Arg::OptText(b.remote_state.as_deref()),
                Arg::Text(f.action.as_str()),
                Arg::OptInt(line),
                Arg::OptText(b.detail.as_deref()),
            ]);
        }
        let sql = format!(
            "{INSERT_FINDINGS}{}",
            vec![row.as_str(); chunk.len()].join(", ")
        );
        Statement::new(sql, args)
            .query::<D>()
            .execute(&mut *conn)
            .await?;
        at = end;
    }
    Ok(())
}

/// A bound of a `[from, to)` range of stored times. SQLite compares its text: a whole second
/// is bound without `.000`, so that a time written without a fraction (`… 16:00:00`, what
/// `datetime('now')` writes) and the same time with one (`… 16:00:00.000`, the daemon's form)
/// fall on the same side of it.
fn sqlite_bound(backend: Backend, t: DateTime<Utc>) -> Option<String> {
    (backend == Backend::Sqlite && t.timestamp_subsec_nanos() == 0)
        .then(|| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn bound(text: &Option<String>, t: DateTime<Utc>) -> Arg<'_> {
    match text {
        Some(s) => Arg::Text(s),
        None => Arg::Time(t),
    }
}

impl Store {
    /// What makes a keyset page read the table in id order from `after_id` (SQLite: a `+`
    /// before a column keeps its condition off every index). Without it, SQLite (with no
    /// statistics) reads the whole day's range of the partial index and sorts it for every
    /// page: a day of 1,000,000 orders in pages of 1,000 would cost 1,000 such reads. In id
    /// order a page costs the rows between its matches, and the day's pages together about
    /// the ids from the span's `min_id` to its `max_id`. PostgreSQL and MariaDB choose by
    /// their statistics: the partial index and a sort for a day that is a small part of the
    /// table, the primary key for a large one.
    fn by_id_only(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "+",
            Backend::Postgres | Backend::Mysql => "",
        }
    }

    fn bill_lock(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres | Backend::Mysql => "FOR UPDATE",
        }
    }

    /// Claims a merchant's bill day (see the module documentation): the row is made when
    /// missing, and claimed unless another instance holds an unexpired lease on it, or (not
    /// forced) it is `RECONCILED` or not due yet (`next_attempt_at` in the future; `NULL` is
    /// due). A claim moves it to `RUNNING`, bumps `lease` and `attempts`, sets `lease_until =
    /// now + lease_for`, `started_at = now`, clears `next_attempt_at`, and deletes the day's
    /// findings, in one transaction.
    pub async fn claim_bill(&self, req: &BillClaimRequest<'_>) -> Result<BillClaim, StoreError> {
        let lock = self.bill_lock();
        on_pool!(self, |pool, D| {
            let mut tx = pool.begin().await?;
            let claimed = claim::<D>(&mut tx, req, lock).await?;
            tx.commit().await?;
            Ok(claimed)
        })
    }

    /// Moves a running day's `lease_until` to `until`; `false`: the lease was lost.
    pub async fn extend_bill_lease(
        &self,
        bill_id: i64,
        lease: i64,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let stmt = Statement::new(
            format!("UPDATE wxpay_bills SET lease_until = ? {HELD}"),
            vec![Arg::Time(until), Arg::Int(bill_id), Arg::Int(lease)],
        );
        on_pool!(self, |pool, D| Ok(<D as super::sql::Dialect>::affected(
            &stmt.query::<D>().execute(pool).await?
        ) == 1))
    }

    /// Inserts a run's findings in one transaction, only while the day still holds `lease`
    /// (`false`: the lease was lost, nothing inserted). Multi-row `INSERT`s, each under the
    /// backend's limit of bound values.
    pub async fn insert_findings(
        &self,
        bill_id: i64,
        lease: i64,
        findings: &[NewFinding<'_>],
    ) -> Result<bool, StoreError> {
        let per = max_binds(self.backend()) / FINDING_VALUES;
        let bounded: Vec<(NewFinding<'_>, Bounded)> =
            findings.iter().map(|f| (*f, Bounded::of(f))).collect();
        // A no-op write that checks the lease and locks the row (PostgreSQL, MySQL) or takes
        // the write lock (SQLite) before anything else.
        let held = Statement::new(
            format!("UPDATE wxpay_bills SET lease = lease {HELD}"),
            vec![Arg::Int(bill_id), Arg::Int(lease)],
        );
        on_pool!(self, |pool, D| {
            let mut tx = pool.begin().await?;
            let done = held.query::<D>().execute(&mut *tx).await?;
            if <D as super::sql::Dialect>::affected(&done) != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
            insert_all::<D>(&mut tx, bill_id, &bounded, per).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Ends a run: writes `end` while the day still holds `lease` and is `RUNNING` (`false`:
    /// the lease was lost, nothing written).
    pub async fn finish_bill(
        &self,
        bill_id: i64,
        lease: i64,
        end: &BillEnd<'_>,
    ) -> Result<bool, StoreError> {
        if end.state == BillState::Running {
            return Err(StoreError::Invalid(
                "a bill run cannot finish in state RUNNING".into(),
            ));
        }
        if let Some(sha1) = end.sha1
            && !(sha1.len() == 40 && sha1.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(StoreError::Invalid(format!(
                "sha1 {} is not 40 hexadecimal digits",
                crate::text::quote(sha1)
            )));
        }
        let check = end.summary_check.map(|s| fit(s, 16));
        let error = end.last_error.map(crate::text::note);
        let total = |f: fn(&BillTotals) -> i64| Arg::OptInt(end.totals.as_ref().map(f));
        let now = Arg::Time(end.now);
        let stmt = Statement::new(
            format!(
                "UPDATE wxpay_bills SET state = ?, origin = ?, sha1 = ?, row_count = ?, \
                 payment_count = ?, refund_count = ?, total_fee = ?, refund_fee = ?, \
                 fee_milli_fen = ?, summary_check = ?, last_error = ?, next_attempt_at = ?, \
                 lease_until = NULL, \
                 reconciled_at = CASE WHEN ? = 1 THEN ? ELSE reconciled_at END, updated_at = ? \
                 {HELD}"
            ),
            vec![
                Arg::Text(end.state.as_str()),
                Arg::OptText(end.origin.map(BillOrigin::as_str)),
                Arg::OptText(end.sha1),
                total(|t| t.row_count),
                total(|t| t.payment_count),
                total(|t| t.refund_count),
                total(|t| t.total_fee),
                total(|t| t.refund_fee),
                total(|t| t.fee_milli_fen),
                Arg::OptText(check.as_deref()),
                Arg::OptText(error.as_deref()),
                Arg::OptTime(end.next_attempt_at),
                Arg::Int(i64::from(end.state == BillState::Reconciled)),
                now,
                now,
                Arg::Int(bill_id),
                Arg::Int(lease),
            ],
        );
        on_pool!(self, |pool, D| Ok(<D as super::sql::Dialect>::affected(
            &stmt.query::<D>().execute(pool).await?
        ) == 1))
    }

    /// The orders of a merchant with these numbers (unknown numbers have none), in no
    /// particular order; one statement per [`LOOKUP_BATCH`] numbers. An unreadable row comes
    /// back as `Err(UnreadableOrder)`, never as the batch's error.
    pub async fn orders_by_out_trade_no(
        &self,
        mch_id: &str,
        out_trade_nos: &[&str],
    ) -> Result<Vec<OrderRead>, StoreError> {
        let mut out = Vec::with_capacity(out_trade_nos.len());
        for chunk in out_trade_nos.chunks(LOOKUP_BATCH) {
            let mut args = vec![Arg::Text(mch_id)];
            args.extend(chunk.iter().map(|n| Arg::Text(n)));
            let sql = format!(
                "SELECT {ORDER_COLUMNS} FROM wxpay_orders WHERE mch_id = ? AND out_trade_no IN ({})",
                placeholders(chunk.len())
            );
            out.extend(fetch_all!(
                self,
                Statement::new(sql, args),
                rows::order_read
            )?);
        }
        Ok(out)
    }

    /// The refunds of a merchant with these numbers, as [`Store::orders_by_out_trade_no`].
    pub async fn refunds_by_out_refund_no(
        &self,
        mch_id: &str,
        out_refund_nos: &[&str],
    ) -> Result<Vec<RefundRead>, StoreError> {
        let mut out = Vec::with_capacity(out_refund_nos.len());
        for chunk in out_refund_nos.chunks(LOOKUP_BATCH) {
            let mut args = vec![Arg::Text(mch_id)];
            args.extend(chunk.iter().map(|n| Arg::Text(n)));
            let sql = format!(
                "SELECT lease, {REFUND_COLUMNS} FROM wxpay_refunds \
                 WHERE mch_id = ? AND out_refund_no IN ({})",
                placeholders(chunk.len())
            );
            out.extend(fetch_all!(self, Statement::new(sql, args), refund_read)?);
        }
        Ok(out)
    }

    /// The span of ids of `where_` (a condition on `mch_id`, then the `[from, to)` range).
    async fn span(
        &self,
        table: &str,
        where_: &str,
        mch_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<IdSpan, StoreError> {
        let (f, t) = (
            sqlite_bound(self.backend(), from),
            sqlite_bound(self.backend(), to),
        );
        let stmt = Statement::new(
            format!(
                "SELECT MIN(id) AS min_id, MAX(id) AS max_id, COUNT(*) AS n FROM {table} \
                 WHERE {where_}"
            ),
            vec![Arg::Text(mch_id), bound(&f, from), bound(&t, to)],
        );
        let spans = fetch_all!(self, stmt, |r| Ok(IdSpan {
            min_id: r.opt_int("min_id")?,
            max_id: r.opt_int("max_id")?,
            count: r.int("n")?,
        }))?;
        Ok(spans.into_iter().next().unwrap_or_default())
    }

    /// The orders of a merchant paid (`SUCCESS` or `REFUND`) with `paid_at` in `[from, to)`:
    /// their ids' span and count.
    pub async fn paid_span(
        &self,
        mch_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<IdSpan, StoreError> {
        let where_ = format!("mch_id = ? AND {PAID} AND paid_at >= ? AND paid_at < ?");
        self.span("wxpay_orders", &where_, mch_id, from, to).await
    }

    /// The orders of [`Store::paid_span`] with `id > after_id`, by id, at most `limit`. Start
    /// at the span's `min_id - 1` and stop after its `max_id` (or `count` rows): on SQLite a
    /// page reads the table in id order from `after_id` until it has `limit` rows or the
    /// table ends, so a first page from 0 reads the ids before the day, and a page after the
    /// day's last order reads every later id.
    pub async fn paid_between(
        &self,
        mch_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<OrderRead>, StoreError> {
        let (f, t) = (
            sqlite_bound(self.backend(), from),
            sqlite_bound(self.backend(), to),
        );
        let stmt = self.paid_page(ORDER_COLUMNS, mch_id, (&f, from), (&t, to), after_id, limit);
        fetch_all!(self, stmt, rows::order_read)
    }

    /// The ids alone of the page [`Store::paid_between`] would read (same bounds, same
    /// order): what a bill run's local side reads to find the orders its bill did not list,
    /// without decoding the rows of the orders it did.
    pub async fn paid_ids_between(
        &self,
        mch_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<i64>, StoreError> {
        let (f, t) = (
            sqlite_bound(self.backend(), from),
            sqlite_bound(self.backend(), to),
        );
        let stmt = self.paid_page("id", mch_id, (&f, from), (&t, to), after_id, limit);
        fetch_all!(self, stmt, |r| r.int("id"))
    }

    /// The keyset page of [`Store::paid_between`], selecting `columns`.
    fn paid_page<'a>(
        &self,
        columns: &str,
        mch_id: &'a str,
        from: (&'a Option<String>, DateTime<Utc>),
        to: (&'a Option<String>, DateTime<Utc>),
        after_id: i64,
        limit: u32,
    ) -> Statement<'a> {
        let p = self.by_id_only();
        let paid = PAID.replace("state", &format!("{p}state"));
        Statement::new(
            format!(
                "SELECT {columns} FROM wxpay_orders \
                 WHERE {p}mch_id = ? AND {paid} AND {p}paid_at >= ? AND {p}paid_at < ? \
                   AND id > ? \
                 ORDER BY id LIMIT ?"
            ),
            vec![
                Arg::Text(mch_id),
                bound(from.0, from.1),
                bound(to.0, to.1),
                Arg::Int(after_id),
                Arg::Int(i64::from(limit)),
            ],
        )
    }

    /// The refunds of a merchant that succeeded with `success_time` in `[from, to)`: their
    /// ids' span and count.
    pub async fn refund_span(
        &self,
        mch_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<IdSpan, StoreError> {
        let where_ = "mch_id = ? AND state = 'SUCCESS' AND success_time >= ? AND success_time < ?";
        self.span("wxpay_refunds", where_, mch_id, from, to).await
    }

    /// The refunds of [`Store::refund_span`] with `id > after_id`, by id, at most `limit`
    /// (start and stop as for [`Store::paid_between`]).
    pub async fn refunds_succeeded_between(
        &self,
        mch_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<RefundRead>, StoreError> {
        let (f, t) = (
            sqlite_bound(self.backend(), from),
            sqlite_bound(self.backend(), to),
        );
        let columns = format!("lease, {REFUND_COLUMNS}");
        let stmt = self.succeeded_page(&columns, mch_id, (&f, from), (&t, to), after_id, limit);
        fetch_all!(self, stmt, refund_read)
    }

    /// The ids alone of the page [`Store::refunds_succeeded_between`] would read, as
    /// [`Store::paid_ids_between`].
    pub async fn refund_ids_succeeded_between(
        &self,
        mch_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<i64>, StoreError> {
        let (f, t) = (
            sqlite_bound(self.backend(), from),
            sqlite_bound(self.backend(), to),
        );
        let stmt = self.succeeded_page("id", mch_id, (&f, from), (&t, to), after_id, limit);
        fetch_all!(self, stmt, |r| r.int("id"))
    }

    /// The keyset page of [`Store::refunds_succeeded_between`], selecting `columns`.
    fn succeeded_page<'a>(
        &self,
        columns: &str,
        mch_id: &'a str,
        from: (&'a Option<String>, DateTime<Utc>),
        to: (&'a Option<String>, DateTime<Utc>),
        after_id: i64,
        limit: u32,
    ) -> Statement<'a> {
        let p = self.by_id_only();
        Statement::new(
            format!(
                "SELECT {columns} FROM wxpay_refunds \
                 WHERE {p}mch_id = ? AND {p}state = 'SUCCESS' AND {p}success_time >= ? \
                   AND {p}success_time < ? AND id > ? \
                 ORDER BY id LIMIT ?"
            ),
            vec![
                Arg::Text(mch_id),
                bound(from.0, from.1),
                bound(to.0, to.1),
                Arg::Int(after_id),
                Arg::Int(i64::from(limit)),
            ],
        )
    }

    /// Fills in the findings of `bills` counted by kind.
    async fn count_findings(&self, bills: &mut [BillRecord]) -> Result<(), StoreError> {
        let ids: Vec<i64> = bills.iter().map(|b| b.id).collect();
        for chunk in ids.chunks(LOOKUP_BATCH) {
            let sql = format!(
                "SELECT bill_id, kind, COUNT(*) AS n FROM wxpay_bill_findings \
                 WHERE bill_id IN ({}) GROUP BY bill_id, kind",
                placeholders(chunk.len())
            );
            let args = chunk.iter().map(|id| Arg::Int(*id)).collect();
            let counts = fetch_all!(self, Statement::new(sql, args), |r| Ok((
                r.int("bill_id")?,
                parsed::<FindingKind>(r, "kind")?,
                r.int("n")?
            )))?;
            for (bill_id, kind, n) in counts {
                let by_kind = bills
                    .iter_mut()
                    .filter(|b| b.id == bill_id)
                    .flat_map(|b| b.findings.iter_mut())
                    .filter(|(k, _)| *k == kind);
                for (_, count) in by_kind {
                    *count = n;
                }
            }
        }
        Ok(())
    }

    /// A merchant's bill day, with its findings counted by kind.
    pub async fn bill(
        &self,
        mch_id: &str,
        bill_date: NaiveDate,
    ) -> Result<Option<BillRecord>, StoreError> {
        let stmt = Statement::new(
            format!("SELECT {BILL_COLUMNS} FROM wxpay_bills WHERE mch_id = ? AND bill_date = ?"),
            vec![Arg::Text(mch_id), Arg::Date(bill_date)],
        );
        let mut bills = fetch_all!(self, stmt, bill_record)?;
        self.count_findings(&mut bills).await?;
        Ok(bills.pop())
    }

    /// The latest `per_merchant` bill days of every merchant (by merchant, newest day first),
    /// with their findings counted by kind.
    pub async fn latest_bills(&self, per_merchant: u32) -> Result<Vec<BillRecord>, StoreError> {
        let stmt = Statement::new(
            format!(
                "SELECT {BILL_COLUMNS} FROM (
                    SELECT {BILL_COLUMNS}, ROW_NUMBER() OVER
                        (PARTITION BY mch_id ORDER BY bill_date DESC) AS newest
                    FROM wxpay_bills) b
                 WHERE newest <= ? ORDER BY mch_id, bill_date DESC"
            ),
            vec![Arg::Int(i64::from(per_merchant))],
        );
        let mut bills = fetch_all!(self, stmt, bill_record)?;
        self.count_findings(&mut bills).await?;
        Ok(bills)
    }

    /// The latest `RECONCILED` bill day of every merchant that has one: the merchant, the day,
    /// when it was reconciled.
    pub async fn last_reconciled(
        &self,
    ) -> Result<Vec<(String, NaiveDate, DateTime<Utc>)>, StoreError> {
        let stmt = Statement::new(
            "SELECT mch_id, bill_date, reconciled_at FROM (
                SELECT mch_id, bill_date, reconciled_at, ROW_NUMBER() OVER
                    (PARTITION BY mch_id ORDER BY bill_date DESC) AS newest
                FROM wxpay_bills WHERE state = 'RECONCILED') b
             WHERE newest = 1 ORDER BY mch_id",
            Vec::new(),
        );
        fetch_all!(self, stmt, |r| Ok((
            r.text("mch_id")?,
            r.date("bill_date")?,
            r.ts("reconciled_at")?
        )))
    }

    /// The findings of a bill, in the order they were recorded, at most `limit`.
    pub async fn bill_findings(
        &self,
        bill_id: i64,
        limit: u32,
    ) -> Result<Vec<FindingRow>, StoreError> {
        let stmt = Statement::new(
            format!(
                "SELECT {FINDING_COLUMNS} FROM wxpay_bill_findings WHERE bill_id = ? \
                 ORDER BY id LIMIT ?"
            ),
            vec![Arg::Int(bill_id), Arg::Int(i64::from(limit))],
        );
        fetch_all!(self, stmt, finding_row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_read_back_and_nothing_else_does() {
        for s in BillState::ALL {
            assert_eq!(s.as_str().parse::<BillState>().unwrap(), s);
            assert_eq!(s.as_str(), s.as_str().to_ascii_uppercase());
        }
        for k in FindingKind::ALL {
            assert_eq!(k.as_str().parse::<FindingKind>().unwrap(), k);
        }
        assert_eq!(FindingKind::ALL.len(), 6);
        assert_eq!(FindingKind::PaidAfterClose.as_str(), "paid_after_close");
        assert_eq!(BillOrigin::File.to_string(), "file");
        assert!("reconciled".parse::<BillState>().is_err());
        let e = "x\ny".parse::<FindingAction>().unwrap_err();
        assert!(!format!("{}: {}", e.what, e.reason).contains('\n'));
    }

    #[test]
    fn a_day_is_claimed_when_due_or_forced_never_under_a_live_lease() {
        let now = Utc::now();
        let req = |force| BillClaimRequest {
            mch_id: "1",
            bill_date: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            now,
            lease_for: TimeDelta::minutes(5),
            force,
        };
        let later = Some(now + TimeDelta::minutes(1));
        let earlier = Some(now - TimeDelta::minutes(1));
        use BillState::*;
        for force in [false, true] {
            assert_eq!(
                not_claimable(Running, later, None, &req(force)),
                Some(BillClaim::Busy)
            );
            assert_eq!(not_claimable(Running, earlier, None, &req(force)), None);
            assert_eq!(not_claimable(Running, Some(now), None, &req(force)), None);
        }
        assert_eq!(
            not_claimable(Reconciled, None, None, &req(false)),
            Some(BillClaim::NotDue { state: Reconciled })
        );
        assert_eq!(not_claimable(Reconciled, None, None, &req(true)), None);
        for state in [NotReady, Failed, Refused] {
            assert_eq!(not_claimable(state, None, None, &req(false)), None);
            assert_eq!(not_claimable(state, None, earlier, &req(false)), None);
            assert_eq!(not_claimable(state, None, Some(now), &req(false)), None);
            assert_eq!(
                not_claimable(state, None, later, &req(false)),
                Some(BillClaim::NotDue { state })
            );
            assert_eq!(not_claimable(state, None, later, &req(true)), None);
        }
    }

    #[test]
    fn the_paid_condition_is_the_partial_index_s_own() {
        // SQLite and PostgreSQL use a partial index only for a query that states its WHERE.
        for migration in [
            include_str!("../../migrations/sqlite/0006_bills.sql"),
            include_str!("../../migrations/postgres/0007_bill_paid_index.sql"),
        ] {
            assert!(
                migration.contains(&format!("(mch_id, paid_at)\n    WHERE {PAID};")),
                "{migration}"
            );
        }
        for migration in [
            include_str!("../../migrations/sqlite/0006_bills.sql"),
            include_str!("../../migrations/postgres/0006_bills.sql"),
        ] {
            assert!(
                migration.contains("(mch_id, success_time)\n    WHERE state = 'SUCCESS';"),
                "{migration}"
            );
        }
    }

    #[test]
    fn a_text_that_fits_its_column_is_kept_whole() {
        let exactly = "x".repeat(64);
        assert_eq!(fit(&exactly, 64), exactly);
        let longer = "y".repeat(65);
        let cut = fit(&longer, 64);
        assert_eq!(cut.chars().count(), 64);
        assert!(cut.ends_with('…'));
        assert_eq!(fit("a\nb", 4), "a\\nb");
        assert!(fit("a\nb", 3).chars().count() <= 3);
    }

    #[test]
    fn whole_seconds_are_bound_without_a_fraction_on_sqlite_only() {
        let t = DateTime::parse_from_rfc3339("2026-01-01T16:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            sqlite_bound(Backend::Sqlite, t).as_deref(),
            Some("2026-01-01 16:00:00")
        );
        assert_eq!(sqlite_bound(Backend::Postgres, t), None);
        assert_eq!(
            sqlite_bound(Backend::Sqlite, t + TimeDelta::milliseconds(5)),
            None
        );
    }
}

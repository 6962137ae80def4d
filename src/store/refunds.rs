//! Refunds (`wxpay_refunds`, `wxpay_refund_events`): the claim and the guarded writes, written
//! once for the three backends as the orders' are (shared `?` statements, [`Dialect`]s).
//!
//! - **Claim**: refunds in `PROCESSING`, due, most overdue first, leased by moving
//!   `next_query_at` to `lease_until` and bumping `lease` in one transaction (PostgreSQL and
//!   MySQL/MariaDB lock the rows they pick with `FOR UPDATE SKIP LOCKED`; SQLite has one writer).
//! - **Finish**: one transaction that locks the refund's order, checks that the refunds of the
//!   order that succeeded never add up to more than its `total_fee` (else the refund goes to
//!   `AMOUNT_MISMATCH` instead), moves the refund with a guarded `UPDATE … WHERE state =
//!   'PROCESSING' AND lease = n`, records its event, and moves a `SUCCESS` order to `REFUND`
//!   with the order's own guarded `UPDATE` and event. Zero rows: someone else got there first,
//!   nothing is recorded.

use chrono::{DateTime, TimeDelta, Utc};
use sqlx::Executor;

use super::rows::{Cols, DialectRow};
use super::sql::{Arg, BindArgs, Statement};
use super::{Backend, Store, StoreError};
use crate::domain::{
    Fen, MchId, OrderState, OutRefundNo, OutTradeNo, ParseError, RefundId, RefundState, Source,
};

/// The columns every refund read returns, in [`RefundRow`]'s order.
pub(super) const REFUND_COLUMNS: &str = "id, mch_id, out_trade_no, out_refund_no, refund_fee, state, \
    refund_id, success_time, refund_recv_accout, created_at, query_count, next_query_at, \
    last_queried_at, last_error, gave_up_at";

const INSERT_REFUND_EVENT: &str = "INSERT INTO wxpay_refund_events (refund_row_id, mch_id, \
    out_trade_no, out_refund_no, from_state, to_state, source, refund_id, refund_fee, detail, \
    created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

const INSERT_ORDER_EVENT: &str = "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, \
    from_state, to_state, source, transaction_id, total_fee, detail, created_at) \
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

/// The guard every refund write carries: still `PROCESSING`, and (for the scan) still ours.
const GUARD: &str = "WHERE id = ? AND state = 'PROCESSING' AND (? IS NULL OR lease = ?)";

/// A refund as the merchant registered it and the daemon keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRow {
    pub id: i64,
    pub mch_id: MchId,
    pub out_trade_no: OutTradeNo,
    pub out_refund_no: OutRefundNo,
    pub refund_fee: Fen,
    pub state: RefundState,
    pub refund_id: Option<String>,
    pub success_time: Option<DateTime<Utc>>,
    pub refund_recv_accout: Option<String>,
    pub created_at: DateTime<Utc>,
    pub query_count: i64,
    pub next_query_at: Option<DateTime<Utc>>,
    pub last_queried_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub gave_up_at: Option<DateTime<Utc>>,
}

/// A claimed refund and the lease its writes must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedRefund {
    pub row: RefundRow,
    pub lease: i64,
}

impl ClaimedRefund {
    pub fn guard(&self) -> RefundGuard {
        RefundGuard {
            refund_id: self.row.id,
            lease: Some(self.lease),
        }
    }
}

/// A row that cannot be read (a value the merchant wrote that no refund has). A claimed one is
/// leased like the others, so that the scan sets it aside instead of claiming it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableRefund {
    pub id: i64,
    /// The claim's lease (for a row read by a listing: the row's lease as it stands).
    pub lease: i64,
    /// What can be read of the row's names, bounded ([`crate::text::note`]): a listing by
    /// `out_refund_no` matches an unreadable row by them.
    pub mch_id: Option<String>,
    pub out_trade_no: Option<String>,
    pub out_refund_no: Option<String>,
    /// Bounded ([`crate::text::note`]).
    pub reason: String,
}

impl UnreadableRefund {
    /// What can be read of a row whose full decode failed with `error`.
    fn of<R: Cols>(r: &R, id: i64, lease: i64, error: &StoreError) -> UnreadableRefund {
        let name = |column: &str| r.text(column).map(|t| crate::text::note(&t)).ok();
        UnreadableRefund {
            id,
            lease,
            mch_id: name("mch_id"),
            out_trade_no: name("out_trade_no"),
            out_refund_no: name("out_refund_no"),
            reason: crate::text::note(&error.to_string()),
        }
    }
}

/// A row read by a listing: a refund, or what can be read of an unreadable one.
pub type RefundRead = Result<RefundRow, UnreadableRefund>;

/// One row of a refund claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimedRefundRow {
    Refund(ClaimedRefund),
    Unreadable(UnreadableRefund),
}

/// Which refunds a claim takes.
#[derive(Debug, Clone, Copy)]
pub struct RefundClaim {
    pub now: DateTime<Utc>,
    /// A refund never queried is due this long after its registration.
    pub first_delay: TimeDelta,
    pub lease_until: DateTime<Utc>,
    pub limit: u32,
}

/// What a refund write is guarded by: the row, and the lease when the scan writes (a
/// notification or a manual query writes without one, guarded by the state only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundGuard {
    pub refund_id: i64,
    pub lease: Option<i64>,
}

/// What WeChat said about a refund that is final, as the row records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundOutcome {
    /// `SUCCESS`, `CLOSED`, `ABNORMAL`, `NOT_FOUND` or `AMOUNT_MISMATCH`.
    pub to: RefundState,
    pub refund_id: Option<RefundId>,
    pub success_time: Option<DateTime<Utc>>,
    pub recv_account: Option<String>,
    /// What WeChat reported the refund's amount to be.
    pub reported_fee: Option<Fen>,
    pub detail: Option<String>,
}

/// A guarded change of one refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundChange {
    /// A final state, with its event (and the order's move to `REFUND` for a `SUCCESS`).
    Finish {
        outcome: RefundOutcome,
        source: Source,
    },
    /// Still open: the next query, and why (WeChat's error, or still `PROCESSING`).
    Reschedule {
        at: DateTime<Utc>,
        note: Option<String>,
    },
    /// Polling stops (the horizon passed, or the row is unreadable); the state stays.
    GiveUp { reason: String },
}

/// What a refund write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundApplied {
    /// Written; for a finish, the state written (`AMOUNT_MISMATCH` when the refunds of the
    /// order would add up to more than its total) and whether the order moved to `REFUND`.
    Done {
        state: RefundState,
        order_refunded: bool,
    },
    /// Someone else got there first (another source, or a newer lease): nothing recorded.
    NoOp,
}

fn bad(reason: impl std::fmt::Display) -> StoreError {
    StoreError::BadRow {
        table: "wxpay_refunds",
        reason: reason.to_string(),
    }
}

fn parsed<R: DialectRow, T>(
    r: &R,
    column: &str,
    parse: impl Fn(&str) -> Result<T, ParseError>,
) -> Result<T, StoreError> {
    parse(&r.text(column)?).map_err(bad)
}

pub(super) fn refund_row<R: DialectRow>(r: &R) -> Result<RefundRow, StoreError> {
    let fee = r.int("refund_fee")?;
    Ok(RefundRow {
        id: r.int("id")?,
        mch_id: parsed(r, "mch_id", MchId::parse)?,
        out_trade_no: parsed(r, "out_trade_no", OutTradeNo::parse)?,
        out_refund_no: parsed(r, "out_refund_no", OutRefundNo::parse)?,
        refund_fee: Fen::new(fee)
            .ok()
            .filter(|f| f.get() > 0)
            .ok_or_else(|| bad(format!("refund_fee {fee} is not a refundable amount")))?,
        state: parsed(r, "state", str::parse::<RefundState>)?,
        refund_id: r.opt_text("refund_id")?,
        success_time: r.opt_ts("success_time")?,
        refund_recv_accout: r.opt_text("refund_recv_accout")?,
        created_at: r.ts("created_at")?,
        query_count: r.query_count()?,
        next_query_at: r.opt_ts("next_query_at")?,
        last_queried_at: r.opt_ts("last_queried_at")?,
        last_error: r.opt_text("last_error")?,
        gave_up_at: r.opt_ts("gave_up_at")?,
    })
}

fn claimed_row<R: DialectRow>(r: &R) -> Result<ClaimedRefundRow, StoreError> {
    let (id, lease) = (r.int("id")?, r.int("lease")?);
    Ok(match refund_row(r) {
        Ok(row) => ClaimedRefundRow::Refund(ClaimedRefund { row, lease }),
        Err(e) => ClaimedRefundRow::Unreadable(UnreadableRefund::of(r, id, lease, &e)),
    })
}

/// A row of a listing that selects `lease, {REFUND_COLUMNS}`: the refund, or what can be read
/// of it.
pub(super) fn refund_read<R: DialectRow>(r: &R) -> Result<RefundRead, StoreError> {
    let (id, lease) = (r.int("id")?, r.int("lease")?);
    Ok(refund_row(r).map_err(|e| UnreadableRefund::of(r, id, lease, &e)))
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// The claim, inside the caller's transaction; `lock` is the row-lock clause of the backend.
async fn claim<D: BindArgs>(
    conn: &mut D::Connection,
    req: &RefundClaim,
    lock: &str,
) -> Result<Vec<ClaimedRefundRow>, StoreError>
where
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
{
    let limit = Arg::Int(i64::from(req.limit));
    if lock.is_empty() {
        // SQLite: take the write lock before the reads (see `apply`).
        Statement::new(
            "UPDATE wxpay_refunds SET lease = lease WHERE 0 = 1",
            Vec::new(),
        )
        .query::<D>()
        .execute(&mut *conn)
        .await?;
    }
    let mut due: Vec<(DateTime<Utc>, i64)> = Vec::new();
    let first = Statement::new(
        format!(
            "SELECT id, created_at AS due FROM wxpay_refunds
             WHERE state = 'PROCESSING' AND gave_up_at IS NULL AND next_query_at IS NULL
               AND created_at <= ?
             ORDER BY created_at LIMIT ? {lock}"
        ),
        vec![Arg::Time(req.now - req.first_delay), limit],
    );
    for r in first.query::<D>().fetch_all(&mut *conn).await? {
        due.push((r.ts("due")? + req.first_delay, r.int("id")?));
    }
    let next = Statement::new(
        format!(
            "SELECT id, next_query_at AS due FROM wxpay_refunds
             WHERE state = 'PROCESSING' AND gave_up_at IS NULL AND next_query_at IS NOT NULL
               AND next_query_at <= ?
             ORDER BY next_query_at LIMIT ? {lock}"
        ),
        vec![Arg::Time(req.now), limit],
    );
    for r in next.query::<D>().fetch_all(&mut *conn).await? {
        due.push((r.ts("due")?, r.int("id")?));
    }
    due.sort();
    due.truncate(req.limit as usize);
    if due.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Arg<'_>> = due.iter().map(|(_, id)| Arg::Int(*id)).collect();
    let mut args = vec![Arg::Time(req.lease_until), Arg::Time(req.now)];
    args.extend(&ids);
    Statement::new(
        format!(
            "UPDATE wxpay_refunds SET next_query_at = ?, lease = lease + 1, updated_at = ?
             WHERE id IN ({})",
            placeholders(ids.len())
        ),
        args,
    )
    .query::<D>()
    .execute(&mut *conn)
    .await?;
    let rows = Statement::new(
        format!(
            "SELECT lease, {REFUND_COLUMNS} FROM wxpay_refunds WHERE id IN ({})",
            placeholders(ids.len())
        ),
        ids,
    )
    .query::<D>()
    .fetch_all(&mut *conn)
    .await?;
    let mut claimed = rows
        .iter()
        .map(claimed_row)
        .collect::<Result<Vec<_>, _>>()?;
    // Most overdue first, as claimed.
    let rank = |c: &ClaimedRefundRow| {
        let id = match c {
            ClaimedRefundRow::Refund(r) => r.row.id,
            ClaimedRefundRow::Unreadable(u) => u.id,
        };
        due.iter().position(|(_, d)| *d == id)
    };
    claimed.sort_by_key(rank);
    Ok(claimed)
}

/// `UPDATE wxpay_refunds SET {set}` with the values of `set`, then of the guard.
fn guarded<'a>(set: &str, mut args: Vec<Arg<'a>>, guard: RefundGuard) -> Statement<'a> {
    let lease = Arg::OptInt(guard.lease);
    args.extend([Arg::Int(guard.refund_id), lease, lease]);
    Statement::new(format!("UPDATE wxpay_refunds SET {set} {GUARD}"), args)
}

/// One guarded write, inside the caller's transaction.
async fn apply<D: BindArgs>(
    conn: &mut D::Connection,
    guard: RefundGuard,
    change: &RefundChange,
    now: DateTime<Utc>,
    lock: &str,
) -> Result<RefundApplied, StoreError>
where
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
{
    let id = Arg::Int(guard.refund_id);
    let affected = |n: u64| {
        if n == 1 {
            RefundApplied::Done {
                state: RefundState::Processing,
                order_refunded: false,
            }
        } else {
            RefundApplied::NoOp
        }
    };
    let (outcome, source) = match change {
        RefundChange::Reschedule { at, note } => {
            let note = note.as_deref().map(crate::text::note);
            let s = guarded(
                "next_query_at = ?, query_count = query_count + 1, last_queried_at = ?, \
                 last_error = ?, updated_at = ?",
                vec![
                    Arg::Time(*at),
                    Arg::Time(now),
                    Arg::OptText(note.as_deref()),
                    Arg::Time(now),
                ],
                guard,
            );
            let done = s.query::<D>().execute(&mut *conn).await?;
            return Ok(affected(D::affected(&done)));
        }
        RefundChange::GiveUp { reason } => {
            let reason = crate::text::note(reason);
            let s = guarded(
                "gave_up_at = ?, last_error = ?, updated_at = ?",
                vec![Arg::Time(now), Arg::Text(&reason), Arg::Time(now)],
                guard,
            );
            let done = s.query::<D>().execute(&mut *conn).await?;
            return Ok(affected(D::affected(&done)));
        }
        RefundChange::Finish { outcome, source } => (outcome, *source),
    };

    // Write first: the refund's row is locked (PostgreSQL, MySQL), and SQLite's transaction
    // takes the write lock now, not after its reads (a read snapshot cannot become a write
    // once another writer committed: SQLITE_BUSY_SNAPSHOT).
    Statement::new(
        "UPDATE wxpay_refunds SET updated_at = updated_at WHERE id = ?",
        vec![id],
    )
    .query::<D>()
    .execute(&mut *conn)
    .await?;
    // The refund as it is now, and its order, locked: two refunds of one order finish one
    // after the other, so the sum below is the truth.
    let Some(refund) = Statement::new(
        format!("SELECT {REFUND_COLUMNS} FROM wxpay_refunds WHERE id = ?"),
        vec![id],
    )
    .query::<D>()
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(RefundApplied::NoOp);
    };
    let refund = refund_row(&refund)?;
    let order = Statement::new(
        format!(
            "SELECT id, total_fee, state, transaction_id FROM wxpay_orders \
             WHERE mch_id = ? AND out_trade_no = ? {lock}"
        ),
        vec![
            Arg::Text(refund.mch_id.as_str()),
            Arg::Text(refund.out_trade_no.as_str()),
        ],
    )
    .query::<D>()
    .fetch_optional(&mut *conn)
    .await?;
    let order = match order {
        Some(r) => Some((
            r.int("id")?,
            r.int("total_fee")?,
            r.text("state")?,
            r.opt_text("transaction_id")?,
        )),
        None => None,
    };
    let mut to = outcome.to;
    let mut detail = outcome.detail.clone();
    if to == RefundState::Success {
        let total = order.as_ref().map_or(0, |o| o.1);
        // Summed here, not with SUM(): its type differs on every backend.
        let others = Statement::new(
            "SELECT refund_fee FROM wxpay_refunds \
             WHERE mch_id = ? AND out_trade_no = ? AND state = 'SUCCESS' AND id <> ?",
            vec![
                Arg::Text(refund.mch_id.as_str()),
                Arg::Text(refund.out_trade_no.as_str()),
                id,
            ],
        )
        .query::<D>()
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .try_fold(0i64, |sum, r| {
            r.int("refund_fee").map(|fee| sum.saturating_add(fee))
        })?;
        let sum = others.saturating_add(refund.refund_fee.get());
        if sum > total {
            to = RefundState::AmountMismatch;
            detail = Some(format!(
                "the refunds of order {} would add up to {sum} fen, more than its total_fee of {total} fen",
                refund.out_trade_no
            ));
        }
    }
    let detail = detail.as_deref().map(crate::text::note);
    let account = outcome
        .recv_account
        .as_deref()
        .map(|a| crate::text::note_with(a, 64));
    let refund_id = outcome.refund_id.as_ref().map(|r| r.as_str());
    let queried = i64::from(source.is_scan());
    let update = guarded(
        "state = ?, refund_id = COALESCE(?, refund_id), success_time = COALESCE(?, success_time), \
         refund_recv_accout = COALESCE(?, refund_recv_accout), query_count = query_count + ?, \
         last_queried_at = CASE WHEN ? = 1 THEN ? ELSE last_queried_at END, last_error = ?, \
         updated_at = ?",
        vec![
            Arg::Text(to.as_str()),
            Arg::OptText(refund_id),
            Arg::OptTime(outcome.success_time.filter(|_| to == RefundState::Success)),
            Arg::OptText(account.as_deref()),
            Arg::Int(queried),
            Arg::Int(queried),
            Arg::Time(now),
            Arg::OptText(detail.as_deref()),
            Arg::Time(now),
        ],
        guard,
    );
    let done = update.query::<D>().execute(&mut *conn).await?;
    if D::affected(&done) != 1 {
        return Ok(RefundApplied::NoOp);
    }
    Statement::new(
        INSERT_REFUND_EVENT,
        vec![
            id,
            Arg::Text(refund.mch_id.as_str()),
            Arg::Text(refund.out_trade_no.as_str()),
            Arg::Text(refund.out_refund_no.as_str()),
            Arg::Text(RefundState::Processing.as_str()),
            Arg::Text(to.as_str()),
            Arg::Text(source.as_str()),
            Arg::OptText(refund_id),
            Arg::OptInt(outcome.reported_fee.map(Fen::get)),
            Arg::OptText(detail.as_deref()),
            Arg::Time(now),
        ],
    )
    .query::<D>()
    .execute(&mut *conn)
    .await?;
    // WeChat's own trade_state turns REFUND on any refund: the order follows, once.
    let mut order_refunded = false;
    if let (RefundState::Success, Some((order_id, _, state, tx))) = (to, &order)
        && state == OrderState::Success.as_str()
    {
        let moved = Statement::new(
            "UPDATE wxpay_orders SET state = 'REFUND', updated_at = ? WHERE id = ? AND state = 'SUCCESS'",
            vec![Arg::Time(now), Arg::Int(*order_id)],
        )
        .query::<D>()
        .execute(&mut *conn)
        .await?;
        if D::affected(&moved) == 1 {
            let note = format!(
                "refund {} of {} fen",
                refund.out_refund_no,
                refund.refund_fee.get()
            );
            Statement::new(
                INSERT_ORDER_EVENT,
                vec![
                    Arg::Int(*order_id),
                    Arg::Text(refund.mch_id.as_str()),
                    Arg::Text(refund.out_trade_no.as_str()),
                    Arg::Text(OrderState::Success.as_str()),
                    Arg::Text(OrderState::Refund.as_str()),
                    Arg::Text(source.as_str()),
                    Arg::OptText(tx.as_deref()),
                    Arg::OptInt(None),
                    Arg::Text(&note),
                    Arg::Time(now),
                ],
            )
            .query::<D>()
            .execute(&mut *conn)
            .await?;
            order_refunded = true;
        }
    }
    Ok(RefundApplied::Done {
        state: to,
        order_refunded,
    })
}

/// One row of the refund summary: merchant, state, count, stopped, oldest.
type SummaryRow = (String, String, i64, i64, Option<DateTime<Utc>>);

/// The refunds of one merchant that need watching: open ones (and the oldest), those whose
/// polling stopped, `ABNORMAL` and quarantined ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefundSummary {
    pub mch_id: String,
    pub open: i64,
    /// Still `PROCESSING` after the horizon: polling stopped.
    pub stuck: i64,
    pub oldest_open: Option<DateTime<Utc>>,
    pub abnormal: i64,
    pub amount_mismatch: i64,
}

impl Store {
    /// [`RefundSummary`] per merchant that has any such refund.
    pub async fn refund_summary(&self) -> Result<Vec<RefundSummary>, StoreError> {
        let stmt = Statement::new(
            "SELECT mch_id, state, COUNT(*) AS n, COUNT(gave_up_at) AS stopped, \
             MIN(created_at) AS oldest FROM wxpay_refunds \
             WHERE state IN ('PROCESSING', 'ABNORMAL', 'AMOUNT_MISMATCH') GROUP BY mch_id, state",
            Vec::new(),
        );
        let rows: Vec<SummaryRow> = on_pool!(self, |pool, D| {
            stmt.query::<D>()
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok((
                        r.text("mch_id")?,
                        r.text("state")?,
                        r.int("n")?,
                        r.int("stopped")?,
                        r.opt_ts("oldest")?,
                    ))
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })?;
        let mut out: Vec<RefundSummary> = Vec::new();
        for (mch_id, state, n, stopped, oldest) in rows {
            let i = match out.iter().position(|s| s.mch_id == mch_id) {
                Some(i) => i,
                None => {
                    out.push(RefundSummary {
                        mch_id,
                        ..RefundSummary::default()
                    });
                    out.len() - 1
                }
            };
            let s = &mut out[i];
            match state.as_str() {
                "PROCESSING" => {
                    s.open = n;
                    s.stuck = stopped;
                    s.oldest_open = oldest;
                }
                "ABNORMAL" => s.abnormal = n,
                _ => s.amount_mismatch = n,
            }
        }
        Ok(out)
    }

    fn row_lock(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres | Backend::Mysql => "FOR UPDATE SKIP LOCKED",
        }
    }

    fn order_lock(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "",
            Backend::Postgres | Backend::Mysql => "FOR UPDATE",
        }
    }

    /// Claims due refunds in `PROCESSING`, most overdue first.
    pub async fn claim_due_refunds(
        &self,
        req: &RefundClaim,
    ) -> Result<Vec<ClaimedRefundRow>, StoreError> {
        let lock = self.row_lock();
        on_pool!(self, |pool, D| {
            let mut tx = pool.begin().await?;
            let claimed = claim::<D>(&mut tx, req, lock).await?;
            tx.commit().await?;
            Ok(claimed)
        })
    }

    /// Applies one guarded change of a refund in one transaction; `now` stamps it.
    pub async fn apply_refund(
        &self,
        guard: RefundGuard,
        change: &RefundChange,
        now: DateTime<Utc>,
    ) -> Result<RefundApplied, StoreError> {
        let lock = self.order_lock();
        on_pool!(self, |pool, D| {
            let mut tx = pool.begin().await?;
            let applied = apply::<D>(&mut tx, guard, change, now, lock).await?;
            tx.commit().await?;
            Ok(applied)
        })
    }

    /// A refund by merchant and `out_refund_no`.
    pub async fn find_refund(
        &self,
        mch_id: &str,
        out_refund_no: &str,
    ) -> Result<Option<RefundRow>, StoreError> {
        let stmt = Statement::new(
            format!(
                "SELECT {REFUND_COLUMNS} FROM wxpay_refunds WHERE mch_id = ? AND out_refund_no = ?"
            ),
            vec![Arg::Text(mch_id), Arg::Text(out_refund_no)],
        );
        on_pool!(self, |pool, D| {
            match stmt.query::<D>().fetch_optional(pool).await? {
                Some(r) => Ok(Some(refund_row(&r)?)),
                None => Ok(None),
            }
        })
    }

    /// The merchant's registration of a refund (the contract's four-column `INSERT`; the
    /// demo and tests play the shop with it).
    pub async fn insert_refund(
        &self,
        mch_id: &str,
        out_trade_no: &str,
        out_refund_no: &str,
        refund_fee: i64,
    ) -> Result<(), StoreError> {
        let stmt = Statement::new(
            "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) \
             VALUES (?, ?, ?, ?)",
            vec![
                Arg::Text(mch_id),
                Arg::Text(out_trade_no),
                Arg::Text(out_refund_no),
                Arg::Int(refund_fee),
            ],
        );
        on_pool!(self, |pool, D| {
            stmt.query::<D>().execute(pool).await?;
            Ok(())
        })
    }

    /// Refunds by state (states without refunds left out).
    pub async fn count_refunds_by_state(&self) -> Result<Vec<(RefundState, i64)>, StoreError> {
        let stmt = Statement::new(
            "SELECT state, COUNT(*) AS n FROM wxpay_refunds GROUP BY state",
            Vec::new(),
        );
        on_pool!(self, |pool, D| {
            stmt.query::<D>()
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok((parsed(r, "state", str::parse::<RefundState>)?, r.int("n")?)))
                .collect()
        })
    }

    /// The oldest refunds in `PROCESSING` (the open index, oldest first); a row that cannot
    /// be read is left out (the scan sets it aside).
    pub async fn oldest_open_refunds(&self, limit: u32) -> Result<Vec<RefundRow>, StoreError> {
        let stmt = Statement::new(
            format!(
                "SELECT {REFUND_COLUMNS} FROM wxpay_refunds WHERE state = 'PROCESSING' \
                 ORDER BY created_at LIMIT ?"
            ),
            vec![Arg::Int(i64::from(limit))],
        );
        on_pool!(self, |pool, D| {
            Ok(stmt
                .query::<D>()
                .fetch_all(pool)
                .await?
                .iter()
                .filter_map(|r| refund_row(r).ok())
                .collect())
        })
    }

    /// The refunds of this `out_refund_no`, of every merchant.
    pub async fn find_refunds(&self, out_refund_no: &str) -> Result<Vec<RefundRow>, StoreError> {
        let stmt = Statement::new(
            format!(
                "SELECT {REFUND_COLUMNS} FROM wxpay_refunds WHERE out_refund_no = ? ORDER BY id"
            ),
            vec![Arg::Text(out_refund_no)],
        );
        on_pool!(self, |pool, D| {
            stmt.query::<D>()
                .fetch_all(pool)
                .await?
                .iter()
                .map(refund_row)
                .collect()
        })
    }

    /// The events of one refund, oldest first: `(from, to, source)`.
    pub async fn refund_events(
        &self,
        refund_row_id: i64,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let stmt = Statement::new(
            "SELECT from_state, to_state, source FROM wxpay_refund_events \
             WHERE refund_row_id = ? ORDER BY id",
            vec![Arg::Int(refund_row_id)],
        );
        on_pool!(self, |pool, D| {
            stmt.query::<D>()
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    Ok((
                        r.text("from_state")?,
                        r.text("to_state")?,
                        r.text("source")?,
                    ))
                })
                .collect()
        })
    }
}

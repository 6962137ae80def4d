//! Row mapping, written once for the three backends: plain columns through [`Cols`] (one
//! generic implementation over `sqlx::Row`), timestamps through each backend's
//! [`DialectRow`] (PostgreSQL via `PgTime`, SQLite via `parse_sqlite_time`, MySQL via chrono).

use chrono::{DateTime, NaiveDate, Utc};

use super::{
    Attention, Claimed, ClaimedOrder, EventRow, OpenSummary, OrderRead, OrderRow, SetAsideRow,
    StoreError, UnreadableOrder, parse_state,
};
use crate::domain::{AppId, Currency, EventTo, Fen, MchId, OrderState, OutTradeNo, Source};

/// The plain columns of a row: integers and texts, as every backend decodes them.
pub(crate) trait Cols {
    fn int(&self, column: &str) -> Result<i64, StoreError>;
    /// A 32-bit integer column (`INT` on PostgreSQL and MySQL).
    fn int32(&self, column: &str) -> Result<i32, StoreError>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError>;
    fn text(&self, column: &str) -> Result<String, StoreError>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError>;
}

impl<R: sqlx::Row> Cols for R
where
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    i64: for<'x> sqlx::Decode<'x, R::Database> + sqlx::Type<R::Database>,
    i32: for<'x> sqlx::Decode<'x, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: for<'x> sqlx::Decode<'x, R::Database> + sqlx::Type<R::Database>,
    String: for<'x> sqlx::Decode<'x, R::Database> + sqlx::Type<R::Database>,
    Option<String>: for<'x> sqlx::Decode<'x, R::Database> + sqlx::Type<R::Database>,
{
    fn int(&self, column: &str) -> Result<i64, StoreError> {
        Ok(self.try_get(column)?)
    }

    fn int32(&self, column: &str) -> Result<i32, StoreError> {
        Ok(self.try_get(column)?)
    }

    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.try_get(column)?)
    }

    fn text(&self, column: &str) -> Result<String, StoreError> {
        Ok(self.try_get(column)?)
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(column)?)
    }
}

/// What a backend's row decodes its own way: timestamps, and the `INT` of `query_count`.
pub(crate) trait DialectRow: Cols {
    /// A time every row has; a value that is no time is an error.
    fn ts(&self, column: &str) -> Result<DateTime<Utc>, StoreError>;
    fn opt_ts(&self, column: &str) -> Result<Option<DateTime<Utc>>, StoreError>;
    /// A calendar day (`DATE`; SQLite: `YYYY-MM-DD` text); a value that is no day is an error.
    fn date(&self, column: &str) -> Result<NaiveDate, StoreError>;

    /// `expires_at`: no expiry of the order's own when NULL.
    fn expiry(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.opt_ts("expires_at")
    }

    fn query_count(&self) -> Result<i64, StoreError> {
        Ok(i64::from(self.int32("query_count")?))
    }
}

/// A text column parsed into its domain type; a value the type refuses makes the row unreadable.
fn parsed<R: DialectRow, T>(
    r: &R,
    column: &'static str,
    parse: impl Fn(&str) -> Result<T, crate::domain::ParseError>,
) -> Result<T, StoreError> {
    parse(&r.text(column)?).map_err(|e| StoreError::BadRow {
        table: "wxpay_orders",
        reason: e.to_string(),
    })
}

/// A row of the shared order reads ([`super::ORDER_COLUMNS`]), parsed into domain types.
pub(crate) fn order_row<R: DialectRow>(r: &R) -> Result<OrderRow, StoreError> {
    let total_fee = r.int("total_fee")?;
    Ok(OrderRow {
        id: r.int("id")?,
        mch_id: parsed(r, "mch_id", MchId::parse)?,
        appid: parsed(r, "appid", AppId::parse)?,
        out_trade_no: parsed(r, "out_trade_no", OutTradeNo::parse)?,
        total_fee: Fen::new(total_fee).map_err(|_| StoreError::BadRow {
            table: "wxpay_orders",
            reason: format!("total_fee {total_fee} is not a payable amount"),
        })?,
        state: parse_state("wxpay_orders", &r.text("state")?)?,
        transaction_id: r.opt_text("transaction_id")?,
        paid_at: r.opt_ts("paid_at")?,
        created_at: r.ts("created_at")?,
        expires_at: r.expiry()?,
        query_count: r.query_count()?,
        next_query_at: r.opt_ts("next_query_at")?,
        last_queried_at: r.opt_ts("last_queried_at")?,
        last_error: r.opt_text("last_error")?,
        gave_up_at: r.opt_ts("gave_up_at")?,
        fee_type: parsed(r, "fee_type", Currency::parse)?,
        set_aside_at: r.opt_ts("set_aside_at")?,
        set_aside_reason: r.opt_text("set_aside_reason")?,
    })
}

/// An order row of a listing: the order, or what can be read of it.
pub(crate) fn order_read<R: DialectRow>(r: &R) -> Result<OrderRead, StoreError> {
    Ok(order_row(r).map_err(|e| UnreadableOrder::of(r, None, &e)))
}

/// A claimed row, decoded on its own: an unreadable one is still leased and comes back as such.
pub(crate) fn claimed<R: DialectRow>(r: &R) -> Result<Claimed, StoreError> {
    let lease = r.int("lease")?;
    Ok(match order_row(r) {
        Ok(row) => Claimed::Order(ClaimedOrder { row, lease }),
        Err(e) => Claimed::Unreadable(UnreadableOrder::of(r, Some(lease), &e)),
    })
}

fn bad_event(e: &crate::domain::ParseError) -> StoreError {
    StoreError::BadRow {
        table: "wxpay_order_events",
        reason: e.to_string(),
    }
}

/// A row of the shared event reads ([`super::EVENT_COLUMNS`]).
pub(crate) fn event_row<R: DialectRow>(r: &R) -> Result<EventRow, StoreError> {
    Ok(EventRow {
        id: r.int("id")?,
        order_id: r.int("order_id")?,
        mch_id: r.text("mch_id")?,
        out_trade_no: r.text("out_trade_no")?,
        from_state: parse_state("wxpay_order_events", &r.text("from_state")?)?,
        to_state: EventTo::parse(&r.text("to_state")?).map_err(|e| bad_event(&e))?,
        source: Source::parse(&r.text("source")?).map_err(|e| bad_event(&e))?,
        transaction_id: r.opt_text("transaction_id")?,
        total_fee: r.opt_int("total_fee")?,
        detail: r.opt_text("detail")?,
        created_at: r.ts("created_at")?,
    })
}

/// A row of the open summary.
pub(crate) fn open_summary<R: DialectRow>(r: &R) -> Result<OpenSummary, StoreError> {
    Ok(OpenSummary {
        mch_id: r.text("mch_id")?,
        open: r.int("open")?,
        stuck: r.int("stuck")?,
        expired: r.int("expired")?,
        // A creation time that is no time (infinite, out of range, a zero date) is no age to
        // show.
        oldest_created_at: r.opt_ts("oldest").unwrap_or(None),
    })
}

/// A row of the count per state.
pub(crate) fn state_count<R: Cols>(r: &R) -> Result<(OrderState, i64), StoreError> {
    Ok((parse_state("wxpay_orders", &r.text("state")?)?, r.int("n")?))
}

/// Every row through `map`; the first that fails fails all.
pub(crate) fn all<R, T>(
    rows: &[R],
    map: impl Fn(&R) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(map).collect()
}

impl UnreadableOrder {
    /// What can be read of a row whose full decode failed with `error`.
    pub(crate) fn of<R: Cols>(r: &R, lease: Option<i64>, error: &StoreError) -> UnreadableOrder {
        // The id decodes whenever the query ran (an integer primary key); the two names are
        // only for the log and `status`, so a row that lacks them is still set aside.
        UnreadableOrder {
            id: r.int("id").unwrap_or(-1),
            lease,
            mch_id: r.text("mch_id").map(|m| crate::text::note(&m)).ok(),
            out_trade_no: r.text("out_trade_no").map(|m| crate::text::note(&m)).ok(),
            reason: crate::text::note(&error.to_string()),
        }
    }
}

impl SetAsideRow {
    /// A row of [`super::reads::SET_ASIDE`].
    pub(crate) fn of<R: DialectRow>(r: &R) -> Result<SetAsideRow, StoreError> {
        Ok(SetAsideRow {
            id: r.int("id")?,
            mch_id: r.text("mch_id")?,
            out_trade_no: r.text("out_trade_no")?,
            state: r.text("state")?,
            // Written by the daemon; shown as missing rather than failing `status`.
            set_aside_at: r.opt_ts("set_aside_at").unwrap_or(None),
            reason: r.opt_text("set_aside_reason")?,
        })
    }
}

impl Attention {
    /// A row of the attention read.
    pub(crate) fn of<R: Cols>(r: &R) -> Result<Attention, StoreError> {
        Ok(Attention {
            mch_id: r.text("mch_id")?,
            amount_mismatch: r.int("mismatched")?,
            set_aside: r.int("set_aside")?,
        })
    }
}

//! The operator's commands besides `run`: `migrate`, `check-config`, `status`, `query`.
//! Each returns what it prints, so tests can read it. `bills` is in [`bills`].

pub mod bills;

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::config::Settings;
use crate::daemon::{DaemonError, open_store, policy, refund_policy};
use crate::domain::{OrderState, OutRefundNo, OutTradeNo, RefundState, Source};
use crate::gateway::{Gateway, GatewayError, Merchant, OrderRef, QueryAnswer, RefundAnswer};
use crate::reconcile::refund_policy::{RefundView, decide_refund};
use crate::reconcile::settle::{Report, Reported, Settler, Verdict};
use crate::store::{
    EventRow, OpenSummary, OrderRead, OrderRow, RefundApplied, RefundChange, RefundGuard,
    RefundRow, SetAsideRow, Store, StoreError, SummaryRequest, UnreadableOrder,
};
use crate::telemetry::Telemetry;
use crate::wxpay::v3::CertificateMode;

/// `status` lists at most this many PAID_AFTER_CLOSE events.
const PAID_AFTER_CLOSE_SHOWN: u32 = 50;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error("{0}")]
    Usage(String),
}

/// `migrate`: creates the SQLite file if needed, applies the migrations.
pub async fn migrate(settings: &Settings) -> Result<String, CommandError> {
    let store = open_store(settings, true).await?;
    store.migrate().await?;
    store.check_schema().await?;
    Ok(format!(
        "database {} ({}) is up to date\n",
        settings.database.url,
        store.backend().as_str()
    ))
}

/// `check-config`: the config is valid (it was loaded) and the database answers with the
/// schema this binary expects.
pub async fn check_config(settings: &Settings) -> Result<String, CommandError> {
    let store = open_store(settings, false).await?;
    store.ping().await?;
    store.check_schema().await?;
    let merchants: Vec<String> = settings.merchants.iter().map(merchant_line).collect();
    Ok(format!(
        "config {} is valid\ndatabase {} answers, schema up to date\nWeChat Pay {}\nmerchants: {}\n",
        settings.path.display(),
        settings.database.url,
        settings.wechat.base_url,
        if merchants.is_empty() {
            "none configured".into()
        } else {
            merchants.join(", ")
        }
    ))
}

/// One merchant for `check-config`: `ID (APPID, MD5)` for v2; for v3 the API and WeChat's
/// keys it verifies with (never a key).
fn merchant_line(m: &Merchant) -> String {
    match m.v3_credentials() {
        None => format!("{} ({}, {})", m.mch_id, m.appid, m.signing()),
        Some(v3) => {
            let mut wechat = Vec::new();
            if let Some(pk) = v3.wechat.public_key() {
                wechat.push(format!("public key {}", pk.id));
            }
            if v3.wechat.certificate_mode() == CertificateMode::Download {
                wechat.push("platform certificates downloaded".to_owned());
            }
            format!(
                "{} ({}, {} {}, certificate {}, WeChat's keys: {})",
                m.mch_id,
                m.appid,
                m.api(),
                m.signing(),
                v3.cert_serial_no,
                wechat.join(" + ")
            )
        }
    }
}

/// How many set-aside orders `status` lists.
const SET_ASIDE_SHOWN: u32 = 20;

/// Text from the database for a terminal: control characters escaped, at most `max` characters.
fn cell(s: &str, max: usize) -> String {
    crate::text::note(s).chars().take(max).collect()
}

fn age(now: DateTime<Utc>, t: DateTime<Utc>) -> String {
    span((now - t).num_seconds())
}

/// A duration for people: `42s`, `3m05s`, `2h10m`, `1d03h`.
fn span(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `status`: counts by state, open orders per merchant, and the oldest open orders.
pub async fn status(
    settings: &Settings,
    as_json: bool,
    oldest: u32,
) -> Result<String, CommandError> {
    let reads = StatusReads::read(settings, oldest).await?;
    if as_json {
        return Ok(status_json(&reads));
    }
    let mut out = String::new();
    write_states_and_merchants(&mut out, &reads);
    write_paid_after_close(&mut out, &reads);
    write_set_aside(&mut out, &reads);
    write_oldest_open(&mut out, &reads);
    write_refunds(&mut out, &reads);
    Ok(out)
}

/// What `status` shows, read once.
struct StatusReads {
    now: DateTime<Utc>,
    /// The API of each configured merchant, by mch_id.
    apis: std::collections::HashMap<String, crate::gateway::Api>,
    stuck_after_seconds: u64,
    counts: Vec<(OrderState, i64)>,
    open: Vec<OpenSummary>,
    paid_after_close: Vec<EventRow>,
    oldest_read: Vec<OrderRead>,
    set_aside: Vec<SetAsideRow>,
    refund_counts: Vec<(RefundState, i64)>,
    oldest_refunds: Vec<RefundRow>,
}

impl StatusReads {
    /// `v2`, `v3`, or `-` for a merchant the config does not have.
    fn api_of(&self, mch_id: &str) -> &'static str {
        self.apis.get(mch_id).map_or("-", |a| a.as_str())
    }

    async fn read(settings: &Settings, oldest: u32) -> Result<StatusReads, CommandError> {
        let store = open_store(settings, false).await?;
        store.check_schema().await?;
        let now = Utc::now();
        let request = SummaryRequest {
            now,
            stuck_before: now
                - chrono::TimeDelta::seconds(settings.metrics.stuck_after_seconds as i64),
            expired_if_created_before: now - policy(settings).default_expiry,
        };
        Ok(StatusReads {
            now,
            stuck_after_seconds: settings.metrics.stuck_after_seconds,
            apis: settings
                .merchants
                .iter()
                .map(|m| (m.mch_id.to_string(), m.api()))
                .collect(),
            counts: store.count_by_state().await?,
            open: store.open_summary(&request).await?,
            paid_after_close: store.paid_after_close(PAID_AFTER_CLOSE_SHOWN).await?,
            oldest_read: store.oldest_open(oldest).await?,
            set_aside: store.set_aside_orders(SET_ASIDE_SHOWN).await?,
            refund_counts: store.count_refunds_by_state().await?,
            oldest_refunds: store.oldest_open_refunds(oldest).await?,
        })
    }

    fn refunds_of(&self, s: RefundState) -> i64 {
        self.refund_counts
            .iter()
            .find(|(st, _)| *st == s)
            .map_or(0, |(_, n)| *n)
    }

    fn count_of(&self, s: OrderState) -> i64 {
        self.counts
            .iter()
            .find(|(st, _)| *st == s)
            .map_or(0, |(_, n)| *n)
    }

    fn oldest_rows(&self) -> Vec<&OrderRow> {
        self.oldest_read
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .collect()
    }

    fn unreadable(&self) -> Vec<&UnreadableOrder> {
        self.oldest_read
            .iter()
            .filter_map(|r| r.as_ref().err())
            .collect()
    }
}

/// `status --json`.
fn status_json(reads: &StatusReads) -> String {
    let now = reads.now;
    let v = json!({
        "states": OrderState::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), json!(reads.count_of(*s))))
            .collect::<serde_json::Map<_, _>>(),
        "open_by_merchant": reads.open.iter().map(|o| json!({
            "mch_id": o.mch_id,
            "api": reads.api_of(&o.mch_id),
            "open": o.open,
            "stuck": o.stuck,
            "expired": o.expired,
            "oldest_age_seconds": o.oldest_created_at.map(|t| (now - t).num_seconds()),
        })).collect::<Vec<_>>(),
        "oldest_open": reads.oldest_rows().iter().map(|r| json!({
            "mch_id": r.mch_id.as_str(),
            "out_trade_no": r.out_trade_no.as_str(),
            "state": r.state.as_str(),
            "total_fee": r.total_fee.get(),
            "created_at": r.created_at.to_rfc3339(),
            "age_seconds": (now - r.created_at).num_seconds(),
            "query_count": r.query_count,
            "next_query_at": r.next_query_at.map(|t| t.to_rfc3339()),
            "gave_up_at": r.gave_up_at.map(|t| t.to_rfc3339()),
            "last_error": r.last_error,
        })).collect::<Vec<_>>(),
        "unreadable_open": reads.unreadable().iter().map(|u| json!({
            "id": u.id,
            "mch_id": u.mch_id,
            "out_trade_no": u.out_trade_no,
            "reason": u.reason,
        })).collect::<Vec<_>>(),
        "set_aside": reads.set_aside.iter().map(|a| json!({
            "id": a.id,
            "mch_id": a.mch_id,
            "out_trade_no": a.out_trade_no,
            "state": a.state,
            "set_aside_at": a.set_aside_at.map(|t| t.to_rfc3339()),
            "reason": a.reason,
        })).collect::<Vec<_>>(),
        "refund_states": RefundState::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), json!(reads.refunds_of(*s))))
            .collect::<serde_json::Map<_, _>>(),
        "oldest_open_refunds": reads.oldest_refunds.iter().map(|r| json!({
            "mch_id": r.mch_id.as_str(),
            "out_trade_no": r.out_trade_no.as_str(),
            "out_refund_no": r.out_refund_no.as_str(),
            "refund_fee": r.refund_fee.get(),
            "created_at": r.created_at.to_rfc3339(),
            "age_seconds": (now - r.created_at).num_seconds(),
            "query_count": r.query_count,
            "next_query_at": r.next_query_at.map(|t| t.to_rfc3339()),
            "gave_up_at": r.gave_up_at.map(|t| t.to_rfc3339()),
            "last_error": r.last_error,
        })).collect::<Vec<_>>(),
        "paid_after_close": reads.paid_after_close.iter().map(|e| json!({
            "mch_id": e.mch_id,
            "out_trade_no": e.out_trade_no,
            "state": e.from_state.as_str(),
            "transaction_id": e.transaction_id,
            "total_fee": e.total_fee,
            "source": e.source.as_str(),
            "recorded_at": e.created_at.to_rfc3339(),
        })).collect::<Vec<_>>(),
    });
    format!("{v:#}\n")
}

// Writing to a String cannot fail: the `write_*` below ignore `writeln!`'s result.

/// Orders by state, then the open orders of each merchant.
fn write_states_and_merchants(out: &mut String, reads: &StatusReads) {
    let _ = writeln!(out, "Orders by state");
    for s in OrderState::ALL {
        let _ = writeln!(out, "  {:<16} {:>10}", s.as_str(), reads.count_of(s));
    }
    let _ = writeln!(
        out,
        "\nOpen orders by merchant (stuck: open longer than {}s)",
        reads.stuck_after_seconds
    );
    let _ = writeln!(
        out,
        "  {:<12} {:<4} {:>8} {:>8} {:>8}  {:<10}",
        "MCH_ID", "API", "OPEN", "STUCK", "EXPIRED", "OLDEST"
    );
    if reads.open.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for o in &reads.open {
        let _ = writeln!(
            out,
            "  {:<12} {:<4} {:>8} {:>8} {:>8}  {:<10}",
            o.mch_id,
            reads.api_of(&o.mch_id),
            o.open,
            o.stuck,
            o.expired,
            o.oldest_created_at
                .map(|t| age(reads.now, t))
                .unwrap_or_default()
        );
    }
}

/// A list of the latest few of something, left out when there are none: its title with their
/// number, the column heads, then a line a row.
struct Latest<'a, T> {
    title: &'a str,
    columns: String,
    rows: &'a [T],
}

impl<T> Latest<'_, T> {
    fn write(&self, out: &mut String, line: impl Fn(&T) -> String) {
        if self.rows.is_empty() {
            return;
        }
        let _ = writeln!(out, "\n{} (latest {})", self.title, self.rows.len());
        let _ = writeln!(out, "  {}", self.columns);
        for row in self.rows {
            let _ = writeln!(out, "  {}", line(row));
        }
    }
}

/// The latest PAID_AFTER_CLOSE payments, if any.
fn write_paid_after_close(out: &mut String, reads: &StatusReads) {
    Latest {
        title: "PAID_AFTER_CLOSE: paid at WeChat but closed here; refund or fulfil each",
        columns: format!(
            "{:<12} {:<32} {:<8} {:>10}  {:<32} {:<7} RECORDED",
            "MCH_ID", "OUT_TRADE_NO", "STATE", "FEE", "TRANSACTION_ID", "SOURCE"
        ),
        rows: &reads.paid_after_close,
    }
    .write(out, |e| {
        format!(
            "{:<12} {:<32} {:<8} {:>10}  {:<32} {:<7} {} ago",
            e.mch_id,
            e.out_trade_no,
            e.from_state,
            e.total_fee.map(|f| f.to_string()).unwrap_or_default(),
            e.transaction_id.as_deref().unwrap_or("-"),
            e.source,
            age(reads.now, e.created_at)
        )
    });
}

/// The latest orders set aside, if any.
fn write_set_aside(out: &mut String, reads: &StatusReads) {
    Latest {
        title: "SET ASIDE: a value in the row cannot be used; fix it, then clear set_aside_at",
        columns: format!(
            "{:>10} {:<12} {:<32} {:<10} {:<10}  REASON",
            "ID", "MCH_ID", "OUT_TRADE_NO", "STATE", "SINCE"
        ),
        rows: &reads.set_aside,
    }
    .write(out, |a| {
        format!(
            "{:>10} {:<12} {:<32} {:<10} {:<10}  {}",
            a.id,
            cell(&a.mch_id, 12),
            cell(&a.out_trade_no, 32),
            cell(&a.state, 10),
            a.set_aside_at
                .map(|t| age(reads.now, t))
                .unwrap_or_default(),
            cell(a.reason.as_deref().unwrap_or(""), 120)
        )
    });
}

/// The oldest open orders: the unreadable rows first, then the readable ones.
fn write_oldest_open(out: &mut String, reads: &StatusReads) {
    let now = reads.now;
    let _ = writeln!(out, "\nOldest open orders");
    let _ = writeln!(
        out,
        "  {:<12} {:<32} {:<10} {:>10} {:>8} {:>7}  {:<10}  LAST ERROR",
        "MCH_ID", "OUT_TRADE_NO", "STATE", "FEE", "AGE", "QUERIES", "NEXT"
    );
    if reads.oldest_read.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for u in reads.unreadable() {
        let _ = writeln!(
            out,
            "  {:<12} {:<32} unreadable row (id {}): {}",
            cell(u.mch_id.as_deref().unwrap_or("?"), 12),
            cell(u.out_trade_no.as_deref().unwrap_or("?"), 32),
            u.id,
            cell(&u.reason, 120)
        );
    }
    for r in reads.oldest_rows() {
        let next = match (r.set_aside_at, r.gave_up_at, r.next_query_at) {
            (Some(_), _, _) => "set aside".to_owned(),
            (None, Some(_), _) => "gave up".to_owned(),
            (None, None, Some(t)) if t > now => format!("in {}", span((t - now).num_seconds())),
            _ => "due".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {:<12} {:<32} {:<10} {:>10} {:>8} {:>7}  {:<10}  {}",
            cell(r.mch_id.as_str(), 12),
            cell(r.out_trade_no.as_str(), 32),
            r.state.as_str(),
            r.total_fee,
            age(now, r.created_at),
            r.query_count,
            next,
            cell(r.last_error.as_deref().unwrap_or(""), 60)
        );
    }
}

/// Refunds by state, then the oldest open ones.
fn write_refunds(out: &mut String, reads: &StatusReads) {
    let now = reads.now;
    let _ = writeln!(out, "\nRefunds by state");
    for s in RefundState::ALL {
        let _ = writeln!(out, "  {:<16} {:>10}", s.as_str(), reads.refunds_of(s));
    }
    let _ = writeln!(out, "\nOldest open refunds");
    let _ = writeln!(
        out,
        "  {:<12} {:<32} {:<32} {:>10} {:>8} {:>7}  {:<10}  LAST ERROR",
        "MCH_ID", "OUT_REFUND_NO", "OUT_TRADE_NO", "FEE", "AGE", "QUERIES", "NEXT"
    );
    if reads.oldest_refunds.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for r in &reads.oldest_refunds {
        let next = match (r.gave_up_at, r.next_query_at) {
            (Some(_), _) => "gave up".to_owned(),
            (None, Some(t)) if t > now => format!("in {}", span((t - now).num_seconds())),
            _ => "due".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {:<12} {:<32} {:<32} {:>10} {:>8} {:>7}  {:<10}  {}",
            cell(r.mch_id.as_str(), 12),
            cell(r.out_refund_no.as_str(), 32),
            cell(r.out_trade_no.as_str(), 32),
            r.refund_fee,
            age(now, r.created_at),
            r.query_count,
            next,
            cell(r.last_error.as_deref().unwrap_or(""), 60)
        );
    }
}

/// `query OUT_TRADE_NO [--mch-id M] [--apply]`: one live, verified orderquery; with `apply`,
/// the transition the scanner would make, recorded with source `manual`.
pub async fn query(
    settings: &Settings,
    out_trade_no: &str,
    mch_id: Option<&str>,
    apply: bool,
) -> Result<String, CommandError> {
    let otn = OutTradeNo::parse(out_trade_no).map_err(|e| CommandError::Usage(e.to_string()))?;
    let store = open_store(settings, false).await?;
    store.check_schema().await?;
    let rows = store.find(out_trade_no).await?;
    let (row, merchant) = resolve(
        settings,
        rows,
        |r: &OrderRow| r.mch_id.as_str(),
        mch_id,
        apply,
        &format!("order {out_trade_no}"),
    )?;

    let (gateway, mut out) = gateway_for(settings, merchant).await?;
    let answer = gateway
        .order_query(merchant, &OrderRef::OutTradeNo(otn))
        .await;
    if let Some(r) = &row {
        let _ = writeln!(
            out,
            "database: {} {} state {} total_fee {} created {} queries {}",
            r.mch_id,
            r.out_trade_no,
            r.state,
            r.total_fee,
            r.created_at.to_rfc3339(),
            r.query_count
        );
    }
    match &answer {
        Ok(QueryAnswer::NotExist) => {
            let _ = writeln!(out, "wechat: ORDERNOTEXIST (verified reply)");
        }
        Ok(QueryAnswer::Order(rep)) => {
            let _ = writeln!(
                out,
                "wechat: trade_state {} ({}) total_fee {} cash_fee {} transaction_id {} time_end {} (verified reply)",
                rep.trade_state,
                rep.state_desc.as_deref().unwrap_or("-"),
                rep.amount
                    .map(|f| f.to_string())
                    .unwrap_or_else(|| "-".into()),
                rep.payer_amount
                    .map(|f| f.to_string())
                    .unwrap_or_else(|| "-".into()),
                rep.transaction_id
                    .as_ref()
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "-".into()),
                rep.paid_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into()),
            );
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "wechat: no usable answer: {e} (outcome {})",
                e.outcome()
            );
        }
    }
    if let (true, Some(r)) = (apply, &row) {
        let _ = writeln!(out, "{}", apply_manual(&store, settings, r, &answer).await?);
    }
    Ok(out)
}

/// Which row a `query` is about (the one of `--mch-id`, or the only one) and which configured
/// merchant asks: the row's, else `--mch-id`, else the only configured one. `what` names the
/// order or refund in the errors; `--apply` needs the row.
fn resolve<'s, R>(
    settings: &'s Settings,
    rows: Vec<R>,
    mch_of: impl Fn(&R) -> &str,
    mch_id: Option<&str>,
    apply: bool,
    what: &str,
) -> Result<(Option<R>, &'s Merchant), CommandError> {
    let mut rows: Vec<R> = rows
        .into_iter()
        .filter(|r| mch_id.is_none_or(|m| mch_of(r) == m))
        .collect();
    if rows.len() > 1 {
        return Err(CommandError::Usage(format!(
            "{what} exists for several merchants; pass --mch-id"
        )));
    }
    let row = rows.pop();
    let merchant_id = match (&row, mch_id) {
        (Some(r), _) => mch_of(r).to_owned(),
        (None, Some(m)) => m.to_owned(),
        (None, None) if settings.merchants.len() == 1 => settings.merchants[0].mch_id.to_string(),
        (None, None) => {
            return Err(CommandError::Usage(format!(
                "{what} is not in the database; pass --mch-id to query WeChat anyway"
            )));
        }
    };
    let merchant = settings
        .merchants
        .iter()
        .find(|m| m.mch_id.as_str() == merchant_id)
        .ok_or_else(|| CommandError::Usage(format!("merchant {merchant_id} is not configured")))?;
    if apply && row.is_none() {
        return Err(CommandError::Usage(format!(
            "--apply needs the {what} in the database; it is not there"
        )));
    }
    Ok((row, merchant))
}

/// The gateway of a one-off command and the lines that say which merchant it asks as; a v3
/// merchant's platform certificates are downloaded first (a one-off command holds none yet).
async fn gateway_for(
    settings: &Settings,
    merchant: &Merchant,
) -> Result<(Gateway, String), CommandError> {
    let gateway = Gateway::new(settings.wechat.client_config())?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "merchant: {} API {} ({})",
        merchant.mch_id,
        merchant.api(),
        merchant.signing()
    );
    if let Some(creds) = merchant.v3_credentials()
        && creds.wechat.certificate_mode() == CertificateMode::Download
    {
        match gateway.download_certificates(merchant).await {
            Ok(crate::gateway::CertificateRefresh::Updated(held)) => {
                let serials: Vec<&str> = held.iter().map(|(s, _)| s.as_str()).collect();
                let _ = writeln!(out, "platform certificates: {}", serials.join(", "));
            }
            Ok(crate::gateway::CertificateRefresh::PublicKeyOnly) => {
                let _ = writeln!(
                    out,
                    "platform certificates: none (RESOURCE_NOT_EXISTS: public-key mode only)"
                );
            }
            Err(e) => {
                let _ = writeln!(out, "platform certificates: download failed: {e}");
            }
        }
    }
    Ok((gateway, out))
}

/// `query --refund OUT_REFUND_NO [--mch-id M] [--apply]`: one live, verified refund query,
/// printed next to the row; with `apply`, a final answer is applied as a scan would apply it
/// (source `manual`): the refund's state, its event, the order's `REFUND`.
pub async fn query_refund(
    settings: &Settings,
    out_refund_no: &str,
    mch_id: Option<&str>,
    apply: bool,
) -> Result<String, CommandError> {
    let orn = OutRefundNo::parse(out_refund_no).map_err(|e| CommandError::Usage(e.to_string()))?;
    let store = open_store(settings, false).await?;
    store.check_schema().await?;
    let rows = store.find_refunds(out_refund_no).await?;
    let (row, merchant) = resolve(
        settings,
        rows,
        |r: &RefundRow| r.mch_id.as_str(),
        mch_id,
        apply,
        &format!("refund {out_refund_no}"),
    )?;
    let (gateway, mut out) = gateway_for(settings, merchant).await?;
    let answer = gateway.refund_query(merchant, &orn).await;
    if let Some(r) = &row {
        let _ = writeln!(
            out,
            "database: {} refund {} of order {} state {} refund_fee {} registered {} queries {}",
            r.mch_id,
            r.out_refund_no,
            r.out_trade_no,
            r.state,
            r.refund_fee,
            r.created_at.to_rfc3339(),
            r.query_count
        );
    }
    match &answer {
        Ok(RefundAnswer::NotExist) => {
            let _ = writeln!(out, "wechat: no such refund (verified reply)");
        }
        Ok(RefundAnswer::Refund(rep)) => {
            let dash = || "-".to_owned();
            let _ = writeln!(
                out,
                "wechat: refund status {} of order {} refund_fee {} total_fee {} refund_id {} success_time {} account {} (verified reply)",
                rep.status.label(),
                rep.out_trade_no,
                rep.refund_fee,
                rep.total_fee.map_or_else(dash, |f| f.to_string()),
                rep.refund_id.as_ref().map_or_else(dash, |r| r.to_string()),
                rep.success_time.map_or_else(dash, |t| t.to_rfc3339()),
                rep.recv_account
                    .as_deref()
                    .map_or_else(dash, |a| cell(a, 64)),
            );
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "wechat: no usable answer: {e} (outcome {})",
                e.outcome()
            );
        }
    }
    if let (true, Some(r)) = (apply, &row) {
        let _ = writeln!(
            out,
            "{}",
            apply_refund_manual(&store, settings, r, &answer).await?
        );
    }
    Ok(out)
}

/// `query --refund --apply`: a final answer applied with source `manual`; anything else
/// changes nothing (the refund keeps its schedule).
async fn apply_refund_manual(
    store: &Store,
    settings: &Settings,
    row: &RefundRow,
    answer: &Result<RefundAnswer, GatewayError>,
) -> Result<String, CommandError> {
    if !row.state.is_open() {
        return Ok(format!(
            "apply: no change (the refund is already {})",
            row.state
        ));
    }
    let order = store
        .find_order(row.mch_id.as_str(), row.out_trade_no.as_str())
        .await?;
    let currency = order
        .as_ref()
        .map_or_else(crate::domain::Currency::cny, |o| o.fee_type.clone());
    let view = RefundView {
        row,
        order_total: order.as_ref().map(|o| o.total_fee),
        order_currency: &currency,
    };
    let policy = refund_policy(settings).unwrap_or_default();
    let change = decide_refund(&view, answer, Utc::now(), 0.0, &policy);
    let RefundChange::Finish { outcome, .. } = change else {
        return Ok(
            "apply: no transition (the refund stays PROCESSING; its schedule is unchanged)".into(),
        );
    };
    let to = outcome.to;
    let change = RefundChange::Finish {
        outcome,
        source: Source::Manual,
    };
    let guard = RefundGuard {
        refund_id: row.id,
        lease: None,
    };
    Ok(
        match store.apply_refund(guard, &change, Utc::now()).await? {
            RefundApplied::Done {
                state,
                order_refunded,
            } => format!(
                "apply: PROCESSING -> {state} recorded (source manual){}",
                if order_refunded {
                    format!("; order {} -> REFUND", row.out_trade_no)
                } else {
                    String::new()
                }
            ),
            RefundApplied::NoOp => format!(
                "apply: no change (another writer moved the refund first; WeChat says {to})"
            ),
        },
    )
}

/// `query --apply`: the same decision as a scan or a notification, recorded with source
/// `manual`. An open order that stays open keeps its schedule.
async fn apply_manual(
    store: &Store,
    settings: &Settings,
    row: &OrderRow,
    answer: &Result<QueryAnswer, GatewayError>,
) -> Result<String, CommandError> {
    let telemetry = Telemetry::new(std::iter::empty());
    let policy = policy(settings);
    let settler = Settler {
        store,
        telemetry: &telemetry,
        policy: &policy,
    };
    let report = Report {
        reported: Reported::Query(answer),
        source: Source::Manual,
    };
    Ok(
        match settler.apply_report(row.clone(), None, report).await? {
            Verdict::Moved { from, to } => {
                format!("apply: {from} -> {to} recorded (source manual)")
            }
            Verdict::Anomaly(anomaly) => format!(
                "apply: {anomaly} recorded (source manual); the order stays {}: refund or fulfil the payment",
                row.state
            ),
            Verdict::Unchanged { reason } if row.state.is_open() => {
                format!(
                    "apply: no transition (the order stays open; its schedule is unchanged): {reason}"
                )
            }
            Verdict::Unchanged { reason } => format!("apply: no change ({reason})"),
            Verdict::StillOpen | Verdict::LeaseLost => {
                "apply: no transition (the order stays open)".into()
            }
        },
    )
}

//! `bills reconcile` and `bills status`: the daily bill at a terminal.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use chrono::NaiveDate;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{CommandError, cell};
use crate::config::Settings;
use crate::daemon::{bill_runner, open_store};
use crate::gateway::{Gateway, Merchant};
use crate::reconcile::bills::{BillInput, DayOutcome, DayRequest};
use crate::store::{BillRecord, FindingKind, Store};
use crate::telemetry::Telemetry;

/// Findings listed per bill by `bills reconcile`.
const FINDINGS_SHOWN: u32 = 50;
/// Bills listed per merchant by `bills status`.
const BILLS_SHOWN: u32 = 7;

/// What `bills reconcile` printed, and whether every day was reconciled.
pub struct Reconciled {
    pub output: String,
    pub all_reconciled: bool,
}

/// `bills reconcile --date D [--mch-id M] [--file PATH] [--json]`: runs the day now for the
/// merchant (or every configured merchant), replacing the day's findings; a file is read
/// instead of downloading (one merchant: `--mch-id`, or the only one configured).
pub async fn reconcile(
    settings: &Settings,
    bill_date: NaiveDate,
    mch_id: Option<&str>,
    file: Option<&Path>,
    json_out: bool,
) -> Result<Reconciled, CommandError> {
    let merchants = chosen(settings, mch_id, file.is_some())?;
    let store = open_store(settings, false).await?;
    store.check_schema().await?;
    let telemetry = Telemetry::new(settings.merchants.iter().map(|m| m.mch_id.as_str()));
    let gateway = match file {
        Some(_) => None,
        None => Some(Arc::new(Gateway::new(settings.wechat.client_config())?)),
    };
    if let Some(g) = &gateway {
        for m in &merchants {
            // A v3 merchant's answers are verified with WeChat's certificates: fetch them first.
            if m.v3_credentials().is_some_and(|c| {
                c.wechat.certificate_mode() == crate::wxpay::v3::CertificateMode::Download
            }) && let Err(e) = g.download_certificates(m).await
            {
                tracing::warn!(%e, mch_id = m.mch_id.as_str(), "platform certificates not downloaded");
            }
        }
    }
    let runner = bill_runner(settings, store.clone(), gateway, telemetry);
    let stop = CancellationToken::new();
    let mut out = String::new();
    let mut days = Vec::new();
    let mut all_reconciled = true;
    for merchant in merchants {
        let input = match file {
            Some(p) => BillInput::File(p.to_owned()),
            None => BillInput::Download,
        };
        let req = DayRequest {
            merchant,
            bill_date,
            input,
            force: true,
        };
        let outcome = runner
            .run_day(&req, &stop)
            .await
            .map_err(|e| CommandError::Usage(e.to_string()))?;
        all_reconciled &= matches!(outcome, DayOutcome::Reconciled(_));
        let record = store.bill(merchant.mch_id.as_str(), bill_date).await?;
        let findings = match &record {
            Some(r) => store.bill_findings(r.id, FINDINGS_SHOWN).await?,
            None => Vec::new(),
        };
        if json_out {
            days.push(json!({
                "mch_id": merchant.mch_id.as_str(),
                "bill_date": bill_date.to_string(),
                "outcome": outcome_label(&outcome),
                "reason": outcome_reason(&outcome),
                "bill": record.as_ref().map(record_json),
                "findings": findings.iter().map(|f| json!({
                    "kind": f.kind.as_str(),
                    "object": f.object.as_str(),
                    "out_trade_no": f.out_trade_no,
                    "out_refund_no": f.out_refund_no,
                    "transaction_id": f.transaction_id,
                    "local_fee": f.local_fee,
                    "remote_fee": f.remote_fee,
                    "local_state": f.local_state,
                    "remote_state": f.remote_state,
                    "action": f.action.as_str(),
                    "line": f.line,
                    "detail": f.detail,
                })).collect::<Vec<Value>>(),
            }));
            continue;
        }
        let _ = writeln!(
            out,
            "merchant {} bill {}: {}{}",
            merchant.mch_id,
            bill_date,
            outcome_label(&outcome),
            outcome_reason(&outcome)
                .map(|r| format!(" ({})", cell(&r, 200)))
                .unwrap_or_default()
        );
        if let Some(r) = &record {
            write_totals(&mut out, r);
            let counts: Vec<String> = r
                .findings
                .iter()
                .map(|(k, n)| format!("{} {n}", k.as_str()))
                .collect();
            let _ = writeln!(out, "  findings: {}", counts.join(", "));
        }
        if !findings.is_empty() {
            let _ = writeln!(
                out,
                "  {:<16} {:<7} {:<32} {:<32} {:>10} {:>10} {:<14} {:<14} {:<11} detail",
                "kind",
                "object",
                "out_trade_no",
                "out_refund_no",
                "local",
                "remote",
                "local state",
                "remote state",
                "action"
            );
            for f in &findings {
                let money = |v: Option<i64>| v.map_or("-".to_owned(), |v| v.to_string());
                let _ = writeln!(
                    out,
                    "  {:<16} {:<7} {:<32} {:<32} {:>10} {:>10} {:<14} {:<14} {:<11} {}",
                    f.kind.as_str(),
                    f.object.as_str(),
                    cell(&f.out_trade_no, 32),
                    cell(f.out_refund_no.as_deref().unwrap_or("-"), 32),
                    money(f.local_fee),
                    money(f.remote_fee),
                    cell(f.local_state.as_deref().unwrap_or("-"), 14),
                    cell(f.remote_state.as_deref().unwrap_or("-"), 14),
                    f.action.as_str(),
                    cell(f.detail.as_deref().unwrap_or(""), 120)
                );
            }
        }
    }
    if json_out {
        out = json!({ "bills": days }).to_string();
        out.push('\n');
    }
    Ok(Reconciled {
        output: out,
        all_reconciled,
    })
}

/// `bills status [--json]`: each merchant's latest bills and their findings by kind.
pub async fn status(settings: &Settings, json_out: bool) -> Result<String, CommandError> {
    let store = open_store(settings, false).await?;
    store.check_schema().await?;
    let records = store.latest_bills(BILLS_SHOWN).await?;
    Ok(render_status(&store, &records, json_out))
}

fn render_status(_store: &Store, records: &[BillRecord], json_out: bool) -> String {
    if json_out {
        let mut s =
            json!({ "bills": records.iter().map(record_json).collect::<Vec<Value>>() }).to_string();
        s.push('\n');
        return s;
    }
    let mut out = String::new();
    if records.is_empty() {
        let _ = writeln!(out, "no bills yet");
        return out;
    }
    let kinds = FindingKind::ALL;
    let mut header = format!(
        "{:<12} {:<10} {:<10} {:>8} {:>12} {:>12}",
        "mch_id", "bill_date", "state", "rows", "paid fen", "fee fen"
    );
    for k in kinds {
        let _ = write!(header, " {:>w$}", k.as_str(), w = k.as_str().len().max(5));
    }
    let _ = writeln!(out, "{header}  note");
    for r in records {
        let mut line = format!(
            "{:<12} {:<10} {:<10} {:>8} {:>12} {:>12}",
            cell(&r.mch_id, 12),
            r.bill_date,
            r.state.as_str(),
            r.totals.map_or("-".into(), |t| t.row_count.to_string()),
            r.totals.map_or("-".into(), |t| t.total_fee.to_string()),
            r.totals.map_or("-".into(), |t| milli_fen(t.fee_milli_fen)),
        );
        for k in kinds {
            let n = r
                .findings
                .iter()
                .find(|(kind, _)| *kind == k)
                .map_or(0, |(_, n)| *n);
            let _ = write!(line, " {:>w$}", n, w = k.as_str().len().max(5));
        }
        let note = match (&r.last_error, r.next_attempt_at) {
            (Some(e), Some(at)) => format!("{} (next attempt {})", cell(e, 80), at.to_rfc3339()),
            (Some(e), None) => cell(e, 80),
            (None, _) => r
                .reconciled_at
                .map(|t| format!("reconciled {}", t.to_rfc3339()))
                .unwrap_or_default(),
        };
        let _ = writeln!(out, "{line}  {note}");
    }
    out
}

fn write_totals(out: &mut String, r: &BillRecord) {
    if let Some(t) = r.totals {
        let _ = writeln!(
            out,
            "  rows {} (payments {}, refunds {}), paid {} fen, refunded {} fen, fee {} fen, sha1 {}",
            t.row_count,
            t.payment_count,
            t.refund_count,
            t.total_fee,
            t.refund_fee,
            milli_fen(t.fee_milli_fen),
            r.sha1.as_deref().unwrap_or("-")
        );
    }
}

/// Thousandths of a fen as fen with 3 decimals, exactly.
fn milli_fen(v: i64) -> String {
    let sign = if v < 0 { "-" } else { "" };
    let a = v.unsigned_abs();
    format!("{sign}{}.{:03}", a / 1000, a % 1000)
}

fn record_json(r: &BillRecord) -> Value {
    json!({
        "mch_id": r.mch_id,
        "bill_date": r.bill_date.to_string(),
        "state": r.state.as_str(),
        "origin": r.origin.map(|o| o.as_str()),
        "sha1": r.sha1,
        "rows": r.totals.map(|t| t.row_count),
        "payments": r.totals.map(|t| t.payment_count),
        "refunds": r.totals.map(|t| t.refund_count),
        "total_fee": r.totals.map(|t| t.total_fee),
        "refund_fee": r.totals.map(|t| t.refund_fee),
        "fee_milli_fen": r.totals.map(|t| t.fee_milli_fen),
        "summary_check": r.summary_check,
        "attempts": r.attempts,
        "last_error": r.last_error,
        "next_attempt_at": r.next_attempt_at.map(|t| t.to_rfc3339()),
        "reconciled_at": r.reconciled_at.map(|t| t.to_rfc3339()),
        "findings": r.findings.iter().map(|(k, n)| (k.as_str().to_owned(), json!(n))).collect::<serde_json::Map<String, Value>>(),
    })
}

fn outcome_label(o: &DayOutcome) -> &'static str {
    match o {
        DayOutcome::Reconciled(s) if s.empty => "reconciled (no bill: a quiet day at WeChat)",
        DayOutcome::Reconciled(_) => "reconciled",
        DayOutcome::Retry { failure: None, .. } => "not ready (WeChat is still making it)",
        DayOutcome::Retry { .. } => "failed",
        DayOutcome::Refused { .. } => "refused",
        DayOutcome::Busy => "busy (another instance runs this day)",
        DayOutcome::NotDue(_) => "not due",
        DayOutcome::LeaseLost => "lease lost (another instance took the day over)",
        DayOutcome::Stopped => "stopped (it runs again once its lease ends)",
    }
}

fn outcome_reason(o: &DayOutcome) -> Option<String> {
    match o {
        DayOutcome::Retry { reason, at, .. } => {
            Some(format!("{reason}; next attempt {}", at.to_rfc3339()))
        }
        DayOutcome::Refused { failure, reason } => Some(format!("{}: {reason}", failure.as_str())),
        _ => None,
    }
}

/// The merchants a run is for: `--mch-id`'s, else every configured one (a file: the only one).
fn chosen<'s>(
    settings: &'s Settings,
    mch_id: Option<&str>,
    one: bool,
) -> Result<Vec<&'s Merchant>, CommandError> {
    match mch_id {
        Some(id) => settings
            .merchants
            .iter()
            .find(|m| m.mch_id.as_str() == id)
            .map(|m| vec![m])
            .ok_or_else(|| {
                CommandError::Usage(format!(
                    "merchant {} is not configured in {}",
                    crate::text::quote(id),
                    settings.path.display()
                ))
            }),
        None if one && settings.merchants.len() != 1 => Err(CommandError::Usage(format!(
            "--file needs --mch-id: {} merchants are configured",
            settings.merchants.len()
        ))),
        None if settings.merchants.is_empty() => Err(CommandError::Usage(format!(
            "config file {}: no [[merchants]] configured",
            settings.path.display()
        ))),
        None => Ok(settings.merchants.iter().collect()),
    }
}

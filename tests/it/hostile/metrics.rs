//! See `hostile/mod.rs`. Metrics that are there before anything happens: a fresh daemon with
//! no orders at all exports every metric of the README's table on its first scrape, with the
//! series a dashboard panel or a `rate()` / `absent()` rule looks for at zero.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;
use wxpay_reconciler::daemon::Daemon;

use crate::engine::Engine;

/// `name -> (type, labels)` of the README's "Metrics" table (names without the prefix).
fn readme_metrics() -> BTreeMap<String, (String, Vec<String>)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n### Metrics\n")
        .nth(1)
        .expect("a Metrics section in README.md");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut metrics = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_owned();
        let labels = cells[3]
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        metrics.insert(name, (cells[2].to_owned(), labels));
    }
    metrics
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, text) = crate::daemon::get(addr, "/metrics").await;
    assert_eq!(status, 200);
    text
}

/// The sample lines of `text` (no comments, no blank lines).
fn samples(text: &str) -> Vec<(&str, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series, value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn a_fresh_daemon_without_orders_exports_every_contract_metric_on_its_first_scrape() {
    // Bills on: their series exist only where bills are reconciled.
    let e = Engine::with(crate::db::sqlite().await, |s| s.bills.enabled = true).await;
    let merchants: Vec<String> = e
        .settings
        .merchants
        .iter()
        .map(|m| m.mch_id.as_str().to_owned())
        .collect();
    assert!(merchants.len() >= 2, "{merchants:?}");
    let stop = CancellationToken::new();
    let daemon = Daemon::start(&e.settings, stop.clone()).await.unwrap();
    let addr = daemon.metrics_addr;
    let running = tokio::spawn(daemon.wait());
    let text = scrape(addr).await;
    let samples = samples(&text);

    let table = readme_metrics();
    assert!(table.len() >= 24, "README metrics table: {table:?}");
    for gauge in ["amount_mismatch_orders", "set_aside_orders"] {
        assert!(table.contains_key(gauge), "README lacks {gauge}");
    }
    let mut missing = Vec::new();
    for (name, (kind, labels)) in &table {
        let full = format!("wxpay_reconciler_{name}");
        if !text.contains(&format!("# TYPE {full} {kind}\n")) {
            missing.push(format!("{full}: no `# TYPE {full} {kind}`"));
            continue;
        }
        // A histogram's _count, else the metric itself.
        let sampled = if kind == "histogram" {
            format!("{full}_count")
        } else {
            full.clone()
        };
        let series: Vec<&str> = samples
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| *s == sampled || s.starts_with(&format!("{sampled}{{")))
            .collect();
        if series.is_empty() {
            missing.push(format!("{full}: no series"));
            continue;
        }
        // Every series carries exactly the documented labels.
        for s in &series {
            let mut got: Vec<&str> = s
                .split_once('{')
                .map(|(_, l)| l.trim_end_matches('}'))
                .unwrap_or("")
                .split(',')
                .filter(|l| !l.is_empty())
                .filter_map(|l| l.split_once('=').map(|(k, _)| k))
                .collect();
            got.sort_unstable();
            let mut want: Vec<&str> = labels.iter().map(String::as_str).collect();
            want.sort_unstable();
            assert_eq!(got, want, "{s}: labels differ from the README's table");
        }
        // Per merchant: a series for each configured one.
        if labels.iter().any(|l| l == "mch_id") {
            for m in &merchants {
                let label = format!("mch_id=\"{m}\"");
                if !series.iter().any(|s| s.contains(&label)) {
                    missing.push(format!("{full}: no series for {label}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "missing on the first scrape:\n  {}\n{text}",
        missing.join("\n  ")
    );

    // The series panels and rules look for, at zero before anything happened.
    let value = |series: &str| samples.iter().find(|(s, _)| *s == series).map(|(_, v)| *v);
    let p = "wxpay_reconciler_";
    let mut zero = vec![
        format!(r#"{p}transitions_total{{from="NOTPAY",to="SUCCESS",source="poll"}}"#),
        format!(r#"{p}transitions_total{{from="NOTPAY",to="SUCCESS",source="notify"}}"#),
        format!(r#"{p}transitions_total{{from="USERPAYING",to="AMOUNT_MISMATCH",source="poll"}}"#),
        format!(r#"{p}transitions_total{{from="NOTPAY",to="CLOSED",source="expire"}}"#),
        format!(r#"{p}transitions_total{{from="SUCCESS",to="REFUND",source="poll"}}"#),
        format!(r#"{p}noop_total{{source="poll"}}"#),
        format!(r#"{p}db_errors_total{{op="claim"}}"#),
        format!(r#"{p}notify_requests_total{{mch_id="unknown",outcome="unknown_merchant"}}"#),
    ];
    for m in &merchants {
        zero.extend([
            format!(r#"{p}trade_state_total{{mch_id="{m}",trade_state="SUCCESS"}}"#),
            format!(r#"{p}trade_state_total{{mch_id="{m}",trade_state="NOTPAY"}}"#),
            format!(r#"{p}orderquery_duration_seconds_count{{mch_id="{m}"}}"#),
            format!(r#"{p}orderquery_duration_seconds_bucket{{mch_id="{m}",le="+Inf"}}"#),
            format!(r#"{p}notify_duration_seconds_count{{mch_id="{m}"}}"#),
            format!(r#"{p}amount_mismatch_orders{{mch_id="{m}"}}"#),
            format!(r#"{p}set_aside_orders{{mch_id="{m}"}}"#),
            format!(r#"{p}orderquery_requests_total{{mch_id="{m}",outcome="ok"}}"#),
        ]);
    }
    for series in &zero {
        assert_eq!(
            value(series),
            Some(0.0),
            "{series} on the first scrape:\n{text}"
        );
    }
    // A transition no writer of a daemon can make is not exported (a zero series would be
    // noise): nothing leaves CLOSED, and `query --apply` counts in its own process.
    let transitions: Vec<&str> = samples
        .iter()
        .map(|(s, _)| *s)
        .filter(|s| s.starts_with("wxpay_reconciler_transitions_total{"))
        .collect();
    assert!(!transitions.is_empty());
    for s in transitions {
        assert!(
            !s.contains(r#"from="CLOSED""#) && !s.contains(r#"source="manual""#),
            "{s}"
        );
    }

    stop.cancel();
    running.await.unwrap().unwrap();
    e.finish().await;
}

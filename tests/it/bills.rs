//! The T+1 bill run on every backend, against the simulator's bills (v2 `downloadbill`, v3
//! `tradebill` + its download): each kind of finding and what was done about it, an empty day,
//! a bill still being made, a hash mismatch refused whole, a re-run of a day, a refund of an
//! older order, two instances on one day; and bills a person downloaded, from the fixtures.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use wxpay_reconciler::daemon;
use wxpay_reconciler::domain::{OrderState, RefundState, Settlement, Source};
use wxpay_reconciler::gateway::{Gateway, Merchant};
use wxpay_reconciler::reconcile::bills::{
    BillInput, BillRunner, DayOutcome, DayRequest, DaySummary, beijing_today, day_bounds,
};
use wxpay_reconciler::store::{
    Applied, BillState, Change, FindingKind, Guard, RefundChange, RefundGuard, RefundOutcome,
};
use wxpay_reconciler::telemetry::{BillFailure, Telemetry};

use crate::db::Kind;
use crate::engine::{Engine, metric_value};
use crate::frame::for_each_backend;
use crate::helpers::{md5_merchant, unique_otn};

fn v3_merchant() -> Merchant {
    wxpay_reconciler::sim::v3::test_v3_merchant().unwrap()
}

/// A bill runner of the engine's settings, with a client of its own (another instance).
fn runner(e: &Engine) -> (BillRunner, Telemetry) {
    let telemetry = Telemetry::new(e.settings.merchants.iter().map(|m| m.mch_id.as_str()));
    let gateway = Arc::new(Gateway::new(e.settings.wechat.client_config()).unwrap());
    let r = daemon::bill_runner(
        &e.settings,
        e.db.store.clone(),
        Some(gateway),
        telemetry.clone(),
    );
    (r, telemetry)
}

/// A bill day safely in the past: three Beijing days ago.
fn day() -> NaiveDate {
    beijing_today(Utc::now()) - TimeDelta::days(3)
}

/// Noon (Beijing) of `d`, as UTC, plus `minutes`.
fn at(d: NaiveDate, minutes: i64) -> DateTime<Utc> {
    day_bounds(d).0 + TimeDelta::hours(12) + TimeDelta::minutes(minutes)
}

async fn run(r: &BillRunner, m: &Merchant, d: NaiveDate, force: bool) -> DayOutcome {
    r.run_day(
        &DayRequest {
            merchant: m,
            bill_date: d,
            input: BillInput::Download,
            force,
        },
        &CancellationToken::new(),
    )
    .await
    .unwrap()
}

fn reconciled(o: DayOutcome) -> DaySummary {
    match o {
        DayOutcome::Reconciled(s) => s,
        other => panic!("expected a reconciled day, got {other:?}"),
    }
}

/// The customer pays at WeChat at `paid_at` (notification lost), optionally another amount.
async fn pay_at(e: &Engine, m: &Merchant, otn: &str, paid_at: DateTime<Utc>, fee: Option<i64>) {
    let mut body = json!({"notify": "drop", "paid_at": paid_at.to_rfc3339()});
    if let Some(f) = fee {
        body["total_fee"] = json!(f);
    }
    e.pay(m, otn, body).await;
}

/// The shop's own handler moves an order (`to`, paid at `paid_at`), as a merchant's app would.
async fn shop_moves(e: &Engine, otn: &str, to: OrderState, paid_at: Option<DateTime<Utc>>) {
    let row = e.row(otn).await;
    let change = Change::Settle {
        settlement: Settlement {
            to,
            transaction_id: None,
            paid_at,
            reported_fee: None,
            detail: Some("the shop's handler".into()),
        },
        source: Source::Manual,
    };
    let guard = Guard {
        order_id: row.id,
        from: row.state,
        lease: None,
    };
    assert_eq!(
        e.db.store
            .apply(&row, guard, &change, Utc::now())
            .await
            .unwrap(),
        Applied::Done
    );
}

/// A refund at WeChat of `otn`, succeeded at `success_time`, its notification lost; and the
/// shop's row of it.
async fn refund(
    e: &Engine,
    m: &Merchant,
    otn: &str,
    fee: i64,
    success_time: DateTime<Utc>,
) -> String {
    let orn = unique_otn("rb").to_string();
    let (status, body) = e
        .sim
        .control(
            "POST",
            &format!("/_sim/orders/{}/{otn}/refunds", m.mch_id),
            json!({"out_refund_no": orn, "refund_fee": fee, "outcome": "SUCCESS",
                   "notify": "drop", "success_time": success_time.to_rfc3339()}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    e.db.store
        .insert_refund(m.mch_id.as_str(), otn, &orn, fee)
        .await
        .unwrap();
    orn
}

/// The shop's refund `orn` closed by its own handler.
async fn shop_closes_refund(e: &Engine, m: &Merchant, orn: &str) {
    shop_finishes_refund(e, m, orn, RefundState::Closed, None).await;
}

/// The shop's own handler finishes its refund `orn` as `to` (at `success_time`).
async fn shop_finishes_refund(
    e: &Engine,
    m: &Merchant,
    orn: &str,
    to: RefundState,
    success_time: Option<DateTime<Utc>>,
) {
    let row =
        e.db.store
            .find_refund(m.mch_id.as_str(), orn)
            .await
            .unwrap()
            .unwrap();
    let change = RefundChange::Finish {
        outcome: RefundOutcome {
            to,
            refund_id: None,
            success_time,
            recv_account: None,
            reported_fee: None,
            detail: Some("the shop's handler".into()),
        },
        source: Source::Manual,
    };
    let guard = RefundGuard {
        refund_id: row.id,
        lease: None,
    };
    e.db.store
        .apply_refund(guard, &change, Utc::now())
        .await
        .unwrap();
}

/// The orders and refunds of [`plant`], by what the bill should find about them.
struct Planted {
    lost: String,
    wrong: String,
    foreign: String,
    phantom: String,
    late: String,
    fine: String,
    older: String,
    older_refund: String,
    closed_refund: String,
}

/// One of each kind of finding on day `d` for merchant `m` (nothing here polls: the engine's
/// scanner is never run).
async fn plant(e: &Engine, m: &Merchant, d: NaiveDate) -> Planted {
    // Paid at WeChat, open here: settled by the bill.
    let lost = e.order(m, 1200).await;
    pay_at(e, m, &lost, at(d, 1), None).await;
    // Paid another amount: quarantined.
    let wrong = e.order(m, 1500).await;
    pay_at(e, m, &wrong, at(d, 2), Some(1499)).await;
    // Paid at WeChat, unknown here.
    let foreign = unique_otn("rem");
    e.sim.create_order(m, &foreign, 800).await;
    pay_at(e, m, foreign.as_str(), at(d, 3), None).await;
    // SUCCESS here, never paid at WeChat.
    let phantom = e.order(m, 990).await;
    shop_moves(e, &phantom, OrderState::Success, Some(at(d, 4))).await;
    // Closed here, paid at WeChat.
    let late = e.order(m, 700).await;
    shop_moves(e, &late, OrderState::Closed, None).await;
    pay_at(e, m, &late, at(d, 5), None).await;
    // Paid, and paid here: agrees.
    let fine = e.order(m, 300).await;
    pay_at(e, m, &fine, at(d, 6), None).await;
    shop_moves(e, &fine, OrderState::Success, Some(at(d, 6))).await;
    // Paid five days before, refunded on the day; the refund is open here: settled.
    let older = e.order(m, 5000).await;
    pay_at(e, m, &older, at(d, -5 * 24 * 60), None).await;
    shop_moves(e, &older, OrderState::Success, Some(at(d, -5 * 24 * 60))).await;
    let older_refund = refund(e, m, &older, 2000, at(d, 7)).await;
    // A refund CLOSED here that succeeded at WeChat.
    let closed_refund = refund(e, m, &fine, 100, at(d, 8)).await;
    shop_closes_refund(e, m, &closed_refund).await;
    Planted {
        lost,
        wrong,
        foreign: foreign.to_string(),
        phantom,
        late,
        fine,
        older,
        older_refund,
        closed_refund,
    }
}

/// The findings of the day, as (kind, object, number) triples, sorted.
async fn findings(e: &Engine, m: &Merchant, d: NaiveDate) -> Vec<(String, String, String, String)> {
    let bill =
        e.db.store
            .bill(m.mch_id.as_str(), d)
            .await
            .unwrap()
            .expect("the day's bill row");
    let mut f: Vec<_> =
        e.db.store
            .bill_findings(bill.id, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|f| {
                (
                    f.kind.as_str().to_owned(),
                    f.object.as_str().to_owned(),
                    f.out_refund_no.clone().unwrap_or(f.out_trade_no.clone()),
                    f.action.as_str().to_owned(),
                )
            })
            .collect();
    f.sort();
    f
}

fn finding(
    kind: &str,
    object: &str,
    number: &str,
    action: &str,
) -> (String, String, String, String) {
    (kind.into(), object.into(), number.into(), action.into())
}

/// Every kind of finding for one merchant, what was done, and a re-run of the day.
async fn every_kind(kind: Kind, e: &Engine, m: &Merchant) {
    let d = day();
    let (r, telemetry) = runner(e);
    let p = plant(e, m, d).await;

    let s = reconciled(run(&r, m, d, false).await);
    assert!(!s.empty, "{kind:?}");
    // Payments on the day: lost, wrong, foreign, late, fine; refunds: older's and fine's.
    assert_eq!(
        (s.totals.payments, s.totals.refunds),
        (5, 2),
        "{kind:?} {s:?}"
    );
    assert_eq!(
        s.totals.total_fee,
        1200 + 1499 + 800 + 700 + 300,
        "{kind:?}"
    );
    assert_eq!(s.totals.refund_fee, 2000 + 100, "{kind:?}");
    assert!(s.sha1.as_deref().is_some_and(|h| h.len() == 40), "{kind:?}");
    let mut expected = vec![
        finding("amount_diff", "payment", &p.wrong, "quarantined"),
        finding("local_only", "payment", &p.phantom, "reported"),
        finding("paid_after_close", "payment", &p.late, "recorded"),
        finding("remote_only", "payment", &p.foreign, "reported"),
        finding("settled_by_bill", "payment", &p.lost, "settled"),
        finding("settled_by_bill", "refund", &p.older_refund, "settled"),
        finding("state_diff", "refund", &p.closed_refund, "reported"),
    ];
    expected.sort();
    assert_eq!(findings(e, m, d).await, expected, "{kind:?}");

    // What was done: through the same rules as every other source, recorded as `bill`.
    let lost = e.row(&p.lost).await;
    assert_eq!(lost.state, OrderState::Success, "{kind:?}");
    assert_eq!(lost.paid_at, Some(at(d, 1)), "{kind:?}");
    let ev = e.events(&p.lost).await;
    assert_eq!(ev.len(), 1, "{kind:?}");
    assert_eq!(
        (ev[0].to_state.as_str(), ev[0].source.as_str()),
        ("SUCCESS", "bill")
    );
    assert_eq!(
        e.row(&p.wrong).await.state,
        OrderState::AmountMismatch,
        "{kind:?}"
    );
    assert_eq!(e.row(&p.late).await.state, OrderState::Closed, "{kind:?}");
    assert!(
        e.events(&p.late)
            .await
            .iter()
            .any(|ev| ev.to_state.as_str() == "PAID_AFTER_CLOSE" && ev.source.as_str() == "bill"),
        "{kind:?}"
    );
    assert!(
        e.db.store.find(&p.foreign).await.unwrap().is_empty(),
        "never invented"
    );
    assert_eq!(
        e.row(&p.phantom).await.state,
        OrderState::Success,
        "reported, not undone"
    );
    let refunded =
        e.db.store
            .find_refund(m.mch_id.as_str(), &p.older_refund)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(refunded.state, RefundState::Success, "{kind:?}");
    assert_eq!(
        e.row(&p.older).await.state,
        OrderState::Refund,
        "the older order"
    );
    // The closed refund did not refund the order; the bill's refund row changes nothing here.
    assert_eq!(e.row(&p.fine).await.state, OrderState::Success, "{kind:?}");
    let text = telemetry.render();
    let mch = m.mch_id.as_str();
    for (k, n) in [
        ("local_only", 1.0),
        ("amount_diff", 1.0),
        ("settled_by_bill", 2.0),
    ] {
        assert_eq!(
            metric_value(
                &text,
                &format!("wxpay_reconciler_bill_findings{{mch_id=\"{mch}\",kind=\"{k}\"}}")
            ),
            n,
            "{kind:?} {k}\n{text}"
        );
    }
    assert_eq!(
        metric_value(
            &text,
            &format!(
                "wxpay_reconciler_last_reconciled_bill_day_timestamp_seconds{{mch_id=\"{mch}\"}}"
            )
        ),
        day_bounds(d).0.timestamp() as f64
    );

    // Not due again (reconciled); a forced re-run replaces the findings, applies nothing twice.
    assert!(matches!(
        run(&r, m, d, false).await,
        DayOutcome::NotDue(BillState::Reconciled)
    ));
    let again = reconciled(run(&r, m, d, true).await);
    assert_eq!(
        again.count(FindingKind::SettledByBill),
        0,
        "{kind:?} {again:?}"
    );
    let mut expected = vec![
        finding("amount_diff", "payment", &p.wrong, "reported"),
        finding("local_only", "payment", &p.phantom, "reported"),
        finding("paid_after_close", "payment", &p.late, "reported"),
        finding("remote_only", "payment", &p.foreign, "reported"),
        finding("state_diff", "refund", &p.closed_refund, "reported"),
    ];
    expected.sort();
    assert_eq!(findings(e, m, d).await, expected, "{kind:?}");
    assert_eq!(e.events(&p.lost).await.len(), 1, "applied once");
    assert_eq!(
        e.events(&p.late)
            .await
            .iter()
            .filter(|ev| ev.to_state.as_str() == "PAID_AFTER_CLOSE")
            .count(),
        1
    );
}

#[tokio::test]
async fn every_kind_of_finding_v2_and_v3_and_a_rerun() {
    for_each_backend(async |kind, e| {
        every_kind(kind, e, &md5_merchant()).await;
        every_kind(kind, e, &v3_merchant()).await;
    })
    .await;
}

#[tokio::test]
async fn a_quiet_day_is_an_empty_bill_and_the_shops_payments_are_local_only() {
    for_each_backend(async |kind, e| {
        for m in [md5_merchant(), v3_merchant()] {
            let d = day() - TimeDelta::days(1);
            let (r, _) = runner(e);
            let s = reconciled(run(&r, &m, d, false).await);
            assert!(
                s.empty && s.findings.iter().all(|(_, n)| *n == 0),
                "{kind:?} {s:?}"
            );
            let phantom = e.order(&m, 100).await;
            shop_moves(e, &phantom, OrderState::Success, Some(at(d, 0))).await;
            // Paid on the next day: not this day's.
            let next = e.order(&m, 100).await;
            shop_moves(e, &next, OrderState::Success, Some(day_bounds(d).1)).await;
            // A refund the shop's handler marked SUCCESS on the day, unknown to WeChat.
            let orn = unique_otn("lr").to_string();
            e.db.store
                .insert_refund(m.mch_id.as_str(), &phantom, &orn, 50)
                .await
                .unwrap();
            shop_finishes_refund(e, &m, &orn, RefundState::Success, Some(at(d, 1))).await;
            let s = reconciled(run(&r, &m, d, true).await);
            assert!(s.empty, "{kind:?}");
            let mut want = vec![
                finding("local_only", "payment", &phantom, "reported"),
                finding("local_only", "refund", &orn, "reported"),
            ];
            want.sort();
            assert_eq!(findings(e, &m, d).await, want, "{kind:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_bill_still_being_made_is_asked_again_then_reconciled() {
    for_each_backend(async |kind, e| {
        for m in [md5_merchant(), v3_merchant()] {
            let d = day();
            let lost = e.order(&m, 4200).await;
            pay_at(e, &m, &lost, at(d, 0), None).await;
            let (status, body) = e
                .sim
                .control(
                    "PUT",
                    &format!("/_sim/bills/{}/{d}", m.mch_id),
                    json!({"creating": 2}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let (r, _) = runner(e);
            let DayOutcome::Retry {
                at: next,
                failure: None,
                ..
            } = run(&r, &m, d, false).await
            else {
                panic!("{kind:?}: expected not ready");
            };
            let minutes = (next - Utc::now()).num_minutes();
            assert!(
                (28..=30).contains(&minutes),
                "retried in 30 minutes, not {minutes}"
            );
            let bill =
                e.db.store
                    .bill(m.mch_id.as_str(), d)
                    .await
                    .unwrap()
                    .unwrap();
            assert_eq!(bill.state, BillState::NotReady);
            // Not due before its next attempt.
            assert!(matches!(
                run(&r, &m, d, false).await,
                DayOutcome::NotDue(BillState::NotReady)
            ));
            assert_eq!(
                e.row(&lost).await.state,
                OrderState::NotPay,
                "nothing applied yet"
            );
            assert!(matches!(
                run(&r, &m, d, true).await,
                DayOutcome::Retry { failure: None, .. }
            ));
            let s = reconciled(run(&r, &m, d, true).await);
            assert_eq!(s.count(FindingKind::SettledByBill), 1, "{kind:?}");
            assert_eq!(e.row(&lost).await.state, OrderState::Success);
        }
    })
    .await;
}

#[tokio::test]
async fn a_bill_whose_hash_differs_is_refused_whole_and_counted() {
    for_each_backend(async |kind, e| {
        let m = v3_merchant();
        let d = day();
        let lost = e.order(&m, 4200).await;
        pay_at(e, &m, &lost, at(d, 0), None).await;
        let (status, _) = e
            .sim
            .control("PUT", &format!("/_sim/bills/{}/{d}", m.mch_id), json!({"wrong_hash": true}))
            .await;
        assert_eq!(status, 200);
        let (r, telemetry) = runner(e);
        let DayOutcome::Refused { failure, reason } = run(&r, &m, d, false).await else {
            panic!("{kind:?}: expected a refusal");
        };
        assert_eq!(failure, BillFailure::HashMismatch, "{reason}");
        assert!(reason.contains("SHA-1"), "{reason}");
        assert_eq!(e.row(&lost).await.state, OrderState::NotPay, "nothing of it applied");
        let bill = e.db.store.bill(m.mch_id.as_str(), d).await.unwrap().unwrap();
        assert_eq!(bill.state, BillState::Refused);
        assert!(bill.findings.iter().all(|(_, n)| *n == 0));
        let text = telemetry.render();
        assert_eq!(
            metric_value(&text, &format!("wxpay_reconciler_bill_fetch_errors_total{{mch_id=\"{}\",reason=\"hash_mismatch\"}}", m.mch_id)),
            1.0,
            "{text}"
        );
        // A good copy later: reconciled.
        e.sim
            .control("PUT", &format!("/_sim/bills/{}/{d}", m.mch_id), json!({"wrong_hash": false}))
            .await;
        let s = reconciled(run(&r, &m, d, true).await);
        assert_eq!(s.count(FindingKind::SettledByBill), 1);
        // An expired download URL is retried, as a transport failure.
        let d2 = d - TimeDelta::days(1);
        e.sim
            .control("PUT", &format!("/_sim/bills/{}/{d2}", m.mch_id), json!({"expired_url": true}))
            .await;
        let other = e.order(&m, 10).await;
        pay_at(e, &m, &other, at(d2, 0), None).await;
        assert!(
            matches!(run(&r, &m, d2, false).await, DayOutcome::Retry { failure: Some(BillFailure::Transport), .. }),
            "{kind:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn two_instances_run_one_day_once() {
    for_each_backend(async |kind, e| {
        let m = md5_merchant();
        let d = day();
        let lost = e.order(&m, 1200).await;
        pay_at(e, &m, &lost, at(d, 0), None).await;
        let phantom = e.order(&m, 990).await;
        shop_moves(e, &phantom, OrderState::Success, Some(at(d, 4))).await;
        let (a, _) = runner(e);
        let (b, _) = runner(e);
        let (x, y) = tokio::join!(run(&a, &m, d, false), run(&b, &m, d, false));
        let outcomes = [x, y];
        let done = outcomes
            .iter()
            .filter(|o| matches!(o, DayOutcome::Reconciled(_)))
            .count();
        assert_eq!(done, 1, "{kind:?} {outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, DayOutcome::Busy | DayOutcome::NotDue(_))),
            "{kind:?} {outcomes:?}"
        );
        assert_eq!(e.events(&lost).await.len(), 1);
        assert_eq!(
            findings(e, &m, d).await,
            {
                let mut v = vec![
                    finding("local_only", "payment", &phantom, "reported"),
                    finding("settled_by_bill", "payment", &lost, "settled"),
                ];
                v.sort();
                v
            },
            "{kind:?}"
        );
    })
    .await;
}

/// The real daemon with `[bills] enabled`: at start it catches up the due days (a payment
/// whose notification and queries were lost is settled from its bill, source `bill`), and
/// `/metrics` shows the newest day reconciled; without bills there is no bill series (so the
/// missing-bill alert cannot fire where bills are off).
#[tokio::test]
async fn the_daemon_catches_up_at_start_and_exports_the_newest_bill_day() {
    let tweak = |s: &mut wxpay_reconciler::config::Settings| {
        s.bills.enabled = true;
        // The scan leaves the order alone: only the bill can settle it.
        s.schedule.grace_seconds = 3600;
    };
    crate::frame::for_each_backend_with(tweak, async |kind, e| {
        let m = md5_merchant();
        let d = day();
        let lost = e.order(&m, 1200).await;
        pay_at(e, &m, &lost, at(d, 0), None).await;
        let stop = CancellationToken::new();
        let daemon = daemon::Daemon::start(&e.settings, stop.clone())
            .await
            .unwrap();
        let addr = daemon.metrics_addr;
        let running = tokio::spawn(daemon.wait());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while e.row(&lost).await.state != OrderState::Success {
            assert!(
                std::time::Instant::now() < deadline,
                "{kind:?}: not settled by the bill"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let ev = e.events(&lost).await;
        assert_eq!(ev[0].source.as_str(), "bill", "{kind:?}");
        let newest = *wxpay_reconciler::reconcile::bills::due_days(Utc::now(), 3)
            .last()
            .unwrap();
        let series = format!(
            "wxpay_reconciler_last_reconciled_bill_day_timestamp_seconds{{mch_id=\"{}\"}}",
            m.mch_id
        );
        let want = day_bounds(newest).0.timestamp() as f64;
        let mut text = String::new();
        while metric_value(&text, &series) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "{kind:?}: {series}\n{text}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            text = e
                .sim
                .http
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
        }
        let bill =
            e.db.store
                .bill(m.mch_id.as_str(), d)
                .await
                .unwrap()
                .unwrap();
        assert_eq!(bill.state, BillState::Reconciled);
        stop.cancel();
        running.await.unwrap().unwrap();
    })
    .await;

    let e = Engine::new(crate::db::sqlite().await).await;
    let stop = CancellationToken::new();
    let daemon = daemon::Daemon::start(&e.settings, stop.clone())
        .await
        .unwrap();
    let addr = daemon.metrics_addr;
    let running = tokio::spawn(daemon.wait());
    let text = e
        .sim
        .http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("wxpay_reconciler_open_orders{"), "{text}");
    assert!(!text.contains("wxpay_reconciler_bill_findings{"), "{text}");
    assert!(
        !text.contains("wxpay_reconciler_last_reconciled_bill_day_timestamp_seconds{"),
        "{text}"
    );
    stop.cancel();
    running.await.unwrap().unwrap();
    e.finish().await;
}

//! Refunds (issue 15): the schema contract the merchant's application relies on, on every
//! backend.

use crate::db::{Kind, backends};
use crate::helpers::unique_otn;

const MCH: &str = "10000100";
const APPID: &str = "wxd930ea5d5a258f4f";

/// As text on every backend (PostgreSQL and MySQL need an explicit cast of an integer).
fn as_text(kind: Kind, column: &str) -> String {
    match kind {
        Kind::Mysql => format!("CAST({column} AS CHAR)"),
        _ => format!("CAST({column} AS TEXT)"),
    }
}

#[tokio::test]
async fn the_merchant_registers_a_refund_with_four_columns_and_the_schema_keeps_it_sound() {
    for db in backends().await {
        let kind = db.kind;
        let otn = unique_otn("rf").to_string();
        let order = format!(
            "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) VALUES ('{MCH}', '{APPID}', $1, 1000)"
        );
        assert_eq!(db.exec(&order, &[&otn]).await, 1);
        let refund = "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) \
                      VALUES ($1, $2, $3, 300)";
        let orn = format!("R{otn}");
        // The contract: these four columns, nothing else.
        assert_eq!(db.exec(refund, &[MCH, &otn, &orn]).await, 1, "{kind:?}");
        let row = format!(
            "SELECT {} FROM wxpay_refunds WHERE out_refund_no = '{orn}'",
            [
                "state".to_owned(),
                as_text(kind, "query_count"),
                as_text(kind, "lease"),
                as_text(kind, "refund_fee"),
            ]
            .join(" || '/' || ")
        );
        let row = match kind {
            // MySQL's || is OR: CONCAT_WS instead.
            Kind::Mysql => format!(
                "SELECT CONCAT_WS('/', state, query_count, lease, refund_fee) FROM wxpay_refunds WHERE out_refund_no = '{orn}'"
            ),
            _ => row,
        };
        assert_eq!(
            db.text(&row).await.as_deref(),
            Some("PROCESSING/0/0/300"),
            "{kind:?}"
        );
        for column in [
            "next_query_at",
            "refund_id",
            "success_time",
            "refund_recv_accout",
            "gave_up_at",
        ] {
            assert_eq!(
                db.text(&format!(
                    "SELECT {} FROM wxpay_refunds WHERE out_refund_no = '{orn}'",
                    as_text(kind, column)
                ))
                .await,
                None,
                "{kind:?}: {column} is the daemon's and starts empty"
            );
        }

        // Unique per merchant and out_refund_no.
        assert!(
            db.try_exec(refund, &[MCH, &otn, &orn]).await.is_err(),
            "{kind:?}: duplicate"
        );
        // The order must exist (the same out_trade_no at another merchant is another order).
        let stray = format!("S{otn}");
        assert!(
            db.try_exec(refund, &[MCH, &format!("x{otn}"), &stray])
                .await
                .is_err(),
            "{kind:?}: a refund of an unknown order"
        );
        assert!(
            db.try_exec(refund, &["1900000109", &otn, &stray])
                .await
                .is_err(),
            "{kind:?}: a refund of another merchant's order"
        );
        // Integer fen, positive; a known state only.
        for fee in ["0", "-1"] {
            let bad = format!(
                "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES ($1, $2, $3, {fee})"
            );
            assert!(
                db.try_exec(&bad, &[MCH, &otn, &stray]).await.is_err(),
                "{kind:?}: fee {fee}"
            );
        }
        assert!(
            db.try_exec(
                "UPDATE wxpay_refunds SET state = 'REFUNDED' WHERE out_refund_no = $1",
                &[&orn]
            )
            .await
            .is_err(),
            "{kind:?}: an unknown state"
        );

        // The outbox: one event per refund and state, a known source.
        let id = db
            .text(&format!(
                "SELECT {} FROM wxpay_refunds WHERE out_refund_no = '{orn}'",
                as_text(kind, "id")
            ))
            .await
            .unwrap();
        let event = |to: &str, source: &str| {
            format!(
                "INSERT INTO wxpay_refund_events (refund_row_id, mch_id, out_trade_no, out_refund_no, from_state, to_state, source) \
                 VALUES ({id}, '{MCH}', '{otn}', '{orn}', 'PROCESSING', '{to}', '{source}')"
            )
        };
        assert_eq!(db.exec(&event("SUCCESS", "poll"), &[]).await, 1);
        assert!(
            db.try_exec(&event("SUCCESS", "notify"), &[]).await.is_err(),
            "{kind:?}: twice"
        );
        assert_eq!(db.exec(&event("CLOSED", "bill"), &[]).await, 1);
        assert!(
            db.try_exec(&event("ABNORMAL", "guess"), &[]).await.is_err(),
            "{kind:?}: source"
        );
        db.cleanup().await;
    }
}

use chrono::{TimeDelta, Utc};
use wxpay_reconciler::domain::{Fen, RefundId, RefundState, Source};
use wxpay_reconciler::store::{
    ClaimedRefund, ClaimedRefundRow, RefundApplied, RefundChange, RefundClaim, RefundGuard,
    RefundOutcome, Store,
};

use crate::db::TestDb;

/// A paid order of `total` fen, and refunds of it (`(out_refund_no, fee)`), as the merchant's
/// application writes them.
async fn paid_order_with_refunds(db: &TestDb, total: i64, refunds: &[(&str, i64)]) -> String {
    let otn = unique_otn("rs").to_string();
    db.exec(
        &format!(
            "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) VALUES ('{MCH}', '{APPID}', $1, {total})"
        ),
        &[&otn],
    )
    .await;
    db.exec(
        "UPDATE wxpay_orders SET state = 'SUCCESS', transaction_id = '4200000001' WHERE out_trade_no = $1",
        &[&otn],
    )
    .await;
    for (orn, fee) in refunds {
        db.exec(
            &format!(
                "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES ($1, $2, $3, {fee})"
            ),
            &[MCH, &otn, &format!("{orn}{otn}")],
        )
        .await;
    }
    otn
}

/// Claims every due refund as of `minutes` from now (a first query a minute after
/// registration, leases of five minutes).
async fn claim_at(store: &Store, minutes: i64) -> Vec<ClaimedRefund> {
    let now = Utc::now() + TimeDelta::minutes(minutes);
    store
        .claim_due_refunds(&RefundClaim {
            now,
            first_delay: TimeDelta::minutes(1),
            lease_until: now + TimeDelta::minutes(5),
            limit: 100,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|c| match c {
            ClaimedRefundRow::Refund(r) => r,
            ClaimedRefundRow::Unreadable(u) => panic!("unreadable {u:?}"),
        })
        .collect()
}

fn finish(to: RefundState, fee: i64, source: Source) -> RefundChange {
    RefundChange::Finish {
        outcome: RefundOutcome {
            to,
            refund_id: Some(RefundId::parse("50000000382019052709732678859").unwrap()),
            success_time: (to == RefundState::Success).then(Utc::now),
            recv_account: Some("支付用户的零钱".into()),
            reported_fee: Some(Fen::new(fee).unwrap()),
            detail: None,
        },
        source,
    }
}

async fn order_state(db: &TestDb, otn: &str) -> String {
    db.text(&format!(
        "SELECT state FROM wxpay_orders WHERE out_trade_no = '{otn}'"
    ))
    .await
    .unwrap()
}

#[tokio::test]
async fn a_refund_is_claimed_when_due_and_finishes_once_moving_its_order_to_refund() {
    for db in backends().await {
        let kind = db.kind;
        let otn = paid_order_with_refunds(&db, 1000, &[("A", 300)]).await;
        let orn = format!("A{otn}");
        assert!(
            claim_at(&db.store, 0).await.is_empty(),
            "{kind:?}: due a minute after registration"
        );
        let claimed = claim_at(&db.store, 2).await;
        assert_eq!(claimed.len(), 1, "{kind:?}");
        let first = claimed[0].clone();
        assert_eq!(first.row.out_refund_no.as_str(), orn);
        assert_eq!(first.row.refund_fee.get(), 300);
        assert!(claim_at(&db.store, 2).await.is_empty(), "{kind:?}: leased");

        // The lease ran out and another worker claimed it: the first worker's write is refused.
        let second = claim_at(&db.store, 10).await;
        assert_eq!(second.len(), 1, "{kind:?}");
        assert!(second[0].lease > first.lease);
        let done = finish(RefundState::Success, 300, Source::Poll);
        assert_eq!(
            db.store
                .apply_refund(first.guard(), &done, Utc::now())
                .await
                .unwrap(),
            RefundApplied::NoOp,
            "{kind:?}: a stale lease"
        );
        assert_eq!(
            db.store
                .apply_refund(second[0].guard(), &done, Utc::now())
                .await
                .unwrap(),
            RefundApplied::Done {
                state: RefundState::Success,
                order_refunded: true
            },
            "{kind:?}"
        );
        // A notification of the same refund afterwards changes nothing.
        let by_notify = RefundGuard {
            refund_id: first.row.id,
            lease: None,
        };
        assert_eq!(
            db.store
                .apply_refund(
                    by_notify,
                    &finish(RefundState::Success, 300, Source::Notify),
                    Utc::now()
                )
                .await
                .unwrap(),
            RefundApplied::NoOp
        );
        let row = db.store.find_refund(MCH, &orn).await.unwrap().unwrap();
        assert_eq!(row.state, RefundState::Success);
        assert_eq!(
            row.refund_id.as_deref(),
            Some("50000000382019052709732678859")
        );
        assert_eq!(row.refund_recv_accout.as_deref(), Some("支付用户的零钱"));
        assert!(row.success_time.is_some());
        assert_eq!(row.query_count, 1, "{kind:?}: the poll's query");
        assert_eq!(
            db.store.refund_events(row.id).await.unwrap(),
            vec![("PROCESSING".into(), "SUCCESS".into(), "poll".into())]
        );
        assert_eq!(order_state(&db, &otn).await, "REFUND", "{kind:?}");
        let order_events = db
            .text(&format!(
                "SELECT from_state || '>' || to_state || '>' || source FROM wxpay_order_events WHERE out_trade_no = '{otn}'"
            ))
            .await;
        let order_events = match kind {
            Kind::Mysql => db
                .text(&format!(
                    "SELECT CONCAT_WS('>', from_state, to_state, source) FROM wxpay_order_events WHERE out_trade_no = '{otn}'"
                ))
                .await,
            _ => order_events,
        };
        assert_eq!(
            order_events.as_deref(),
            Some("SUCCESS>REFUND>poll"),
            "{kind:?}"
        );
        assert!(
            claim_at(&db.store, 60).await.is_empty(),
            "{kind:?}: a final refund is not polled"
        );
        db.cleanup().await;
    }
}

#[tokio::test]
async fn refunds_that_would_add_up_to_more_than_the_order_are_quarantined() {
    for db in backends().await {
        let kind = db.kind;
        let otn = paid_order_with_refunds(&db, 1000, &[("A", 700), ("B", 400), ("C", 300)]).await;
        let claimed = claim_at(&db.store, 2).await;
        assert_eq!(claimed.len(), 3, "{kind:?}");
        let of = |p: &str| {
            claimed
                .iter()
                .find(|c| c.row.out_refund_no.as_str() == format!("{p}{otn}"))
                .unwrap()
                .clone()
        };
        let (a, b, c) = (of("A"), of("B"), of("C"));
        let apply = |c: ClaimedRefund, to, fee| {
            let store = db.store.clone();
            async move {
                store
                    .apply_refund(c.guard(), &finish(to, fee, Source::Poll), Utc::now())
                    .await
                    .unwrap()
            }
        };
        assert_eq!(
            apply(a, RefundState::Success, 700).await,
            RefundApplied::Done {
                state: RefundState::Success,
                order_refunded: true
            }
        );
        // 700 + 400 > 1000: set aside, never applied.
        assert_eq!(
            apply(b.clone(), RefundState::Success, 400).await,
            RefundApplied::Done {
                state: RefundState::AmountMismatch,
                order_refunded: false
            },
            "{kind:?}"
        );
        let row = db
            .store
            .find_refund(MCH, b.row.out_refund_no.as_str())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.state, RefundState::AmountMismatch);
        assert!(row.last_error.unwrap().contains("1100 fen"), "{kind:?}");
        // 700 + 300 = 1000: exactly the order.
        assert_eq!(
            apply(c, RefundState::Success, 300).await,
            RefundApplied::Done {
                state: RefundState::Success,
                order_refunded: false
            },
            "{kind:?}: the order is already REFUND"
        );
        assert_eq!(order_state(&db, &otn).await, "REFUND");
        db.cleanup().await;
    }
}

#[tokio::test]
async fn closed_abnormal_and_reschedules_leave_the_order_alone_and_a_race_has_one_winner() {
    for db in backends().await {
        let kind = db.kind;
        let otn = paid_order_with_refunds(&db, 1000, &[("A", 100), ("B", 100), ("C", 100)]).await;
        let claimed = claim_at(&db.store, 2).await;
        assert_eq!(claimed.len(), 3, "{kind:?}");
        let by = |p: &str| {
            claimed
                .iter()
                .find(|c| c.row.out_refund_no.as_str() == format!("{p}{otn}"))
                .unwrap()
                .clone()
        };
        let a = by("A");
        let closed = db
            .store
            .apply_refund(
                a.guard(),
                &finish(RefundState::Closed, 100, Source::Poll),
                Utc::now(),
            )
            .await
            .unwrap();
        assert_eq!(
            closed,
            RefundApplied::Done {
                state: RefundState::Closed,
                order_refunded: false
            }
        );
        assert_eq!(order_state(&db, &otn).await, "SUCCESS", "{kind:?}");

        // A notification and a poll finish C at once: one event, one winner.
        let c = by("C");
        let notify = RefundGuard {
            refund_id: c.row.id,
            lease: None,
        };
        let (s1, s2) = (db.store.clone(), db.store.clone());
        let (by_poll, by_notify) = (
            finish(RefundState::Abnormal, 100, Source::Poll),
            finish(RefundState::Abnormal, 100, Source::Notify),
        );
        let (p, n) = tokio::join!(
            s1.apply_refund(c.guard(), &by_poll, Utc::now()),
            s2.apply_refund(notify, &by_notify, Utc::now()),
        );
        let wins = [p.unwrap(), n.unwrap()]
            .iter()
            .filter(|a| matches!(a, RefundApplied::Done { .. }))
            .count();
        assert_eq!(wins, 1, "{kind:?}");
        assert_eq!(db.store.refund_events(c.row.id).await.unwrap().len(), 1);
        // Still PROCESSING at WeChat: the next query is scheduled, with the note.
        let b = by("B");
        let later = Utc::now() + TimeDelta::hours(1);
        let rescheduled = db
            .store
            .apply_refund(
                b.guard(),
                &RefundChange::Reschedule {
                    at: later,
                    note: Some("still PROCESSING".into()),
                },
                Utc::now(),
            )
            .await
            .unwrap();
        assert!(
            matches!(rescheduled, RefundApplied::Done { .. }),
            "{kind:?}"
        );
        let row = db
            .store
            .find_refund(MCH, b.row.out_refund_no.as_str())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((row.state, row.query_count), (RefundState::Processing, 1));
        assert_eq!(row.last_error.as_deref(), Some("still PROCESSING"));
        assert!(
            claim_at(&db.store, 30).await.is_empty(),
            "{kind:?}: not due before its next query"
        );
        assert_eq!(
            claim_at(&db.store, 70).await.len(),
            1,
            "{kind:?}: due after it"
        );

        db.cleanup().await;
    }
}

/// The shop registers a refund (the contract's INSERT), due at once.
async fn register(e: &crate::engine::Engine, mch_id: &str, otn: &str, orn: &str, fee: i64) {
    e.db
        .exec(
            &format!(
                "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES ($1, $2, $3, {fee})"
            ),
            &[mch_id, otn, orn],
        )
        .await;
    // Two hours ago: due, past the NOT_FOUND grace (an hour), well within the horizon.
    let past = match e.db.kind {
        Kind::Sqlite => "strftime('%Y-%m-%d %H:%M:%f', 'now', '-2 hours')",
        Kind::Postgres => "now() - interval '2 hours'",
        Kind::Mysql => "UTC_TIMESTAMP(6) - INTERVAL 2 HOUR",
    };
    e.db.exec(
        &format!("UPDATE wxpay_refunds SET created_at = {past} WHERE out_refund_no = $1"),
        &[orn],
    )
    .await;
}

async fn due_again(e: &crate::engine::Engine, orn: &str) {
    let past = match e.db.kind {
        Kind::Sqlite => "'2000-01-01 00:00:00.000'",
        Kind::Postgres => "'2000-01-01 00:00:00+00'",
        Kind::Mysql => "'2000-01-01 00:00:00'",
    };
    e.db.exec(
        &format!("UPDATE wxpay_refunds SET next_query_at = {past} WHERE out_refund_no = $1"),
        &[orn],
    )
    .await;
}

/// The simulator refunds at WeChat (`outcome`), its notification lost.
async fn wechat_refunds(
    e: &crate::engine::Engine,
    mch_id: &str,
    otn: &str,
    orn: &str,
    fee: i64,
    outcome: &str,
) {
    let (status, body) = e
        .sim
        .control(
            "POST",
            &format!("/_sim/orders/{mch_id}/{otn}/refunds"),
            serde_json::json!({"out_refund_no": orn, "refund_fee": fee, "outcome": outcome, "notify": "drop"}),
        )
        .await;
    assert!((200..300).contains(&status), "{status} {body}");
}

#[tokio::test]
async fn the_scan_polls_lost_refunds_of_v2_and_v3_merchants_to_their_final_state() {
    crate::frame::for_each_backend(async |kind, e| {
        let v3 = wxpay_reconciler::sim::v3::test_v3_merchant().unwrap();
        for m in [crate::helpers::md5_merchant(), v3] {
            let mch = m.mch_id.as_str().to_owned();
            let (otn, _) = e.paid_order(&m, 1000).await;
            e.scan().await;
            assert_eq!(e.row(&otn).await.state, wxpay_reconciler::domain::OrderState::Success);
            let [ok, slow, stuck, never] = ["S", "P", "A", "N"].map(|p| format!("{p}{otn}"));
            wechat_refunds(e, &mch, &otn, &ok, 300, "SUCCESS").await;
            wechat_refunds(e, &mch, &otn, &slow, 200, "PROCESSING").await;
            wechat_refunds(e, &mch, &otn, &stuck, 100, "ABNORMAL").await;
            for (orn, fee) in [(&ok, 300), (&slow, 200), (&stuck, 100), (&never, 50)] {
                register(e, &mch, &otn, orn, fee).await;
            }
            let report = e
                .scanner
                .scan_refunds(&tokio_util::sync::CancellationToken::new(), &|| {})
                .await
                .unwrap();
            assert_eq!((report.claimed, report.finished), (4, 3), "{kind:?} {mch}: {report:?}");
            let state = |orn: String| {
                let store = e.db.store.clone();
                let mch = mch.clone();
                async move { store.find_refund(&mch, &orn).await.unwrap().unwrap() }
            };
            let done = state(ok.clone()).await;
            assert_eq!(done.state, RefundState::Success, "{kind:?} {mch}");
            assert!(done.refund_id.is_some() && done.success_time.is_some());
            assert_eq!(state(stuck.clone()).await.state, RefundState::Abnormal);
            // Registered long ago and unknown at WeChat: past the grace, NOT_FOUND.
            assert_eq!(state(never.clone()).await.state, RefundState::NotFound, "{kind:?} {mch}");
            let open = state(slow.clone()).await;
            assert_eq!((open.state, open.query_count), (RefundState::Processing, 1), "{kind:?} {mch}: {report:?} {open:?}");
            assert_eq!(e.row(&otn).await.state, wxpay_reconciler::domain::OrderState::Refund);
            // What the refund gauges read: one open (registered two hours ago), one ABNORMAL.
            let summary = e.db.store.refund_summary().await.unwrap();
            let mine = summary.iter().find(|s| s.mch_id == mch).unwrap();
            assert_eq!(
                (mine.open, mine.stuck, mine.abnormal, mine.amount_mismatch),
                (1, 0, 1, 0),
                "{kind:?} {mch}: {mine:?}"
            );
            // `status` shows them: by state, and the open one among the oldest.
            let text = wxpay_reconciler::commands::status(&e.settings, false, 10)
                .await
                .unwrap();
            assert!(text.contains("Refunds by state"), "{text}");
            let line = text
                .lines()
                .find(|l| l.contains(slow.as_str()))
                .unwrap_or_else(|| panic!("{kind:?}: {slow} not listed: {text}"));
            assert!(line.contains(" 200 ") && line.contains(otn.as_str()), "{line}");
            let json: serde_json::Value = serde_json::from_str(
                &wxpay_reconciler::commands::status(&e.settings, true, 10)
                    .await
                    .unwrap(),
            )
            .unwrap();
            assert!(json["refund_states"]["ABNORMAL"].as_i64().unwrap() >= 1, "{json}");
            assert!(
                json["oldest_open_refunds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["out_refund_no"] == slow.as_str() && r["refund_fee"] == 200),
                "{json}"
            );
            let age = chrono::Utc::now() - mine.oldest_open.unwrap();
            assert!(
                (TimeDelta::minutes(119)..TimeDelta::minutes(125)).contains(&age),
                "{kind:?}: {age}"
            );

            // WeChat finishes the slow one later; its next query finds it closed.
            let (status, body) = e
                .sim
                .control(
                    "POST",
                    &format!("/_sim/refunds/{mch}/{slow}/finish"),
                    serde_json::json!({"outcome": "CLOSED"}),
                )
                .await;
            assert!((200..300).contains(&status), "{status} {body}");
            due_again(e, &slow).await;
            let report = e
                .scanner
                .scan_refunds(&tokio_util::sync::CancellationToken::new(), &|| {})
                .await
                .unwrap();
            assert_eq!((report.claimed, report.finished), (1, 1), "{kind:?} {mch}");
            assert_eq!(state(slow.clone()).await.state, RefundState::Closed);
            assert_eq!(
                e.metric(&format!(
                    "wxpay_reconciler_refund_transitions_total{{mch_id=\"{mch}\",to=\"SUCCESS\",source=\"poll\"}}"
                )),
                1.0,
                "{kind:?} {mch}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn query_refund_prints_the_verified_answer_and_applies_it_with_source_manual() {
    use wxpay_reconciler::commands::query_refund;
    crate::frame::for_each_backend(async |kind, e| {
        let m = crate::helpers::md5_merchant();
        let mch = m.mch_id.as_str().to_owned();
        let (otn, _) = e.paid_order(&m, 1000).await;
        e.scan().await;
        let orn = format!("Q{otn}");
        wechat_refunds(e, &mch, &otn, &orn, 400, "SUCCESS").await;
        register(e, &mch, &otn, &orn, 400).await;

        let out = query_refund(&e.settings, &orn, None, false).await.unwrap();
        assert!(
            out.contains("state PROCESSING refund_fee 400"),
            "{kind:?}: {out}"
        );
        assert!(
            out.contains("wechat: refund status SUCCESS"),
            "{kind:?}: {out}"
        );
        assert!(out.contains("(verified reply)"), "{out}");
        let row = e.db.store.find_refund(&mch, &orn).await.unwrap().unwrap();
        assert_eq!(
            row.state,
            RefundState::Processing,
            "{kind:?}: without --apply nothing changes"
        );

        let out = query_refund(&e.settings, &orn, None, true).await.unwrap();
        assert!(
            out.contains(&format!(
                "apply: PROCESSING -> SUCCESS recorded (source manual); order {otn} -> REFUND"
            )),
            "{kind:?}: {out}"
        );
        assert_eq!(
            e.db.store.refund_events(row.id).await.unwrap(),
            vec![("PROCESSING".into(), "SUCCESS".into(), "manual".into())]
        );
        let again = query_refund(&e.settings, &orn, None, true).await.unwrap();
        assert!(
            again.contains("apply: no change (the refund is already SUCCESS)"),
            "{again}"
        );

        // A refund WeChat does not know and the table does not hold: said plainly.
        let out = query_refund(&e.settings, &format!("Z{otn}"), Some(&mch), false)
            .await
            .unwrap();
        assert!(
            out.contains("wechat: no such refund (verified reply)"),
            "{kind:?}: {out}"
        );
        let err = query_refund(&e.settings, &format!("Z{otn}"), None, true)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not in the database"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn the_merchants_own_handler_winning_a_race_and_an_unusable_row_are_both_handled() {
    for db in backends().await {
        let kind = db.kind;
        let otn = paid_order_with_refunds(&db, 1000, &[("A", 100)]).await;
        let orn = format!("A{otn}");
        let claimed = claim_at(&db.store, 2).await;
        assert_eq!(claimed.len(), 1, "{kind:?}");
        // The shop's own refund-notification handler settles it first, with its guarded UPDATE.
        assert_eq!(
            db.exec(
                "UPDATE wxpay_refunds SET state = 'SUCCESS' WHERE out_refund_no = $1 AND state = 'PROCESSING'",
                &[&orn],
            )
            .await,
            1
        );
        let late = db
            .store
            .apply_refund(
                claimed[0].guard(),
                &finish(RefundState::Success, 100, Source::Poll),
                Utc::now(),
            )
            .await
            .unwrap();
        assert_eq!(late, RefundApplied::NoOp, "{kind:?}");
        assert!(
            db.store
                .refund_events(claimed[0].row.id)
                .await
                .unwrap()
                .is_empty()
        );

        // A row whose out_refund_no no refund can have (a space): claimed as unreadable, so
        // the scan sets it aside instead of stopping on it.
        let bad = format!("B {otn}");
        db.exec(
            "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES ($1, $2, $3, 5)",
            &[MCH, &otn, &bad],
        )
        .await;
        let now = Utc::now() + TimeDelta::minutes(2);
        let rows = db
            .store
            .claim_due_refunds(&RefundClaim {
                now,
                first_delay: TimeDelta::minutes(1),
                lease_until: now + TimeDelta::minutes(5),
                limit: 10,
            })
            .await
            .unwrap();
        let [ClaimedRefundRow::Unreadable(u)] = rows.as_slice() else {
            panic!("{kind:?}: {rows:?}");
        };
        assert!(u.reason.contains("out_refund_no"), "{kind:?}: {}", u.reason);
        db.cleanup().await;
    }
}

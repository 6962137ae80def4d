//! The bill tables (issue 16) and their store, on every backend: the migration, the claim of a
//! merchant's bill day under a lease (two instances: one runs it), the run's fenced writes,
//! the batched lookups and the local side of a day at its bounds, the listings.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, SubsecRound, TimeDelta, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Connection, SqliteConnection};
use wxpay_reconciler::domain::{OrderState, RefundState, Source};
use wxpay_reconciler::store::{
    BillClaim, BillClaimRequest, BillEnd, BillOrigin, BillRecord, BillState, BillTotals,
    ConnectOptions, DatabaseUrl, FindingAction, FindingKind, FindingObject, IdSpan, NewFinding,
    Store, StoreError,
};

use crate::db::{Kind, TestDb};
use crate::frame::for_each_backend;
use crate::helpers::unique_otn;

const MCH: &str = "10000100";
const OTHER: &str = "1900000109";
const APPID: &str = "wxd930ea5d5a258f4f";

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339).unwrap().to_utc()
}

/// A time as a literal of the backend, for the merchant's own SQL (`fraction`: with
/// milliseconds, as the daemon writes it on SQLite; without, as `datetime('now')` does).
fn lit(kind: Kind, t: DateTime<Utc>, fraction: bool) -> String {
    let f = if fraction {
        "%Y-%m-%d %H:%M:%S%.3f"
    } else {
        "%Y-%m-%d %H:%M:%S"
    };
    let zone = if kind == Kind::Postgres { "+00" } else { "" };
    format!("'{}{zone}'", t.format(f))
}

/// An order as the merchant registers it; its id.
async fn order(db: &TestDb, mch_id: &str, otn: &str, fee: i64) -> i64 {
    db.exec(
        &format!(
            "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) \
             VALUES ('{mch_id}', '{APPID}', $1, {fee})"
        ),
        &[otn],
    )
    .await;
    id_of(db, mch_id, otn).await
}

async fn id_of(db: &TestDb, mch_id: &str, otn: &str) -> i64 {
    let as_text = match db.kind {
        Kind::Mysql => "CAST(id AS CHAR)",
        _ => "CAST(id AS TEXT)",
    };
    db.text(&format!(
        "SELECT {as_text} FROM wxpay_orders WHERE mch_id = '{mch_id}' AND out_trade_no = '{otn}'"
    ))
    .await
    .unwrap()
    .parse()
    .unwrap()
}

/// An order of `mch_id` in `state`, paid at `paid_at` (a literal of [`lit`]); its id.
async fn paid(db: &TestDb, mch_id: &str, state: &str, paid_at: &str) -> i64 {
    let otn = unique_otn("bp").to_string();
    let id = order(db, mch_id, &otn, 100).await;
    db.exec(
        &format!(
            "UPDATE wxpay_orders SET state = '{state}', transaction_id = '4200{id}', \
             paid_at = {paid_at} WHERE id = {id}"
        ),
        &[],
    )
    .await;
    id
}

fn claim_req(
    mch_id: &str,
    bill_date: NaiveDate,
    now: DateTime<Utc>,
    force: bool,
) -> BillClaimRequest<'_> {
    BillClaimRequest {
        mch_id,
        bill_date,
        now,
        lease_for: TimeDelta::minutes(5),
        force,
    }
}

async fn claim(store: &Store, bill_date: NaiveDate, now: DateTime<Utc>, force: bool) -> BillClaim {
    store
        .claim_bill(&claim_req(MCH, bill_date, now, force))
        .await
        .unwrap()
}

fn claimed(c: BillClaim) -> (i64, i64) {
    match c {
        BillClaim::Claimed { bill_id, lease } => (bill_id, lease),
        other => panic!("not claimed: {other:?}"),
    }
}

fn end(state: BillState, now: DateTime<Utc>) -> BillEnd<'static> {
    BillEnd {
        state,
        origin: None,
        sha1: None,
        totals: None,
        summary_check: None,
        last_error: None,
        next_attempt_at: None,
        now,
    }
}

fn finding<'a>(kind: FindingKind, out_trade_no: &'a str, bill_date: NaiveDate) -> NewFinding<'a> {
    NewFinding {
        kind,
        object: FindingObject::Payment,
        mch_id: MCH,
        bill_date,
        out_trade_no,
        out_refund_no: None,
        transaction_id: None,
        local_fee: None,
        remote_fee: None,
        local_state: None,
        remote_state: None,
        action: FindingAction::Reported,
        line: None,
        detail: None,
    }
}

fn counts(b: &BillRecord) -> Vec<(FindingKind, i64)> {
    b.findings.clone()
}

fn zero_counts() -> Vec<(FindingKind, i64)> {
    FindingKind::ALL.iter().map(|k| (*k, 0)).collect()
}

/// A refund of `otn` in `state`, succeeded at `at` (a literal of [`lit`]); its id.
async fn refund_at(db: &TestDb, otn: String, orn: String, state: &str, at: String) -> i64 {
    db.exec(
        "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) VALUES ($1, $2, $3, 10)",
        &[MCH, &otn, &orn],
    )
    .await;
    db.exec(
        &format!("UPDATE wxpay_refunds SET state = '{state}', success_time = {at} WHERE out_refund_no = $1"),
        &[&orn],
    )
    .await;
    db.store
        .refunds_by_out_refund_no(MCH, &[&orn])
        .await
        .unwrap()[0]
        .as_ref()
        .unwrap()
        .id
}

#[tokio::test]
async fn the_migration_adds_the_bill_tables_and_admits_bill_as_an_event_source() {
    for_each_backend(async |kind, e| {
        let db = &e.db;
        db.store.check_schema().await.unwrap();
        let otn = unique_otn("bm").to_string();
        let id = order(db, MCH, &otn, 100).await;
        let event = |to: &str, source: &str| {
            format!(
                "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state, to_state, source) \
                 VALUES ({id}, '{MCH}', '{otn}', 'NOTPAY', '{to}', '{source}')"
            )
        };
        assert_eq!(db.exec(&event("SUCCESS", "bill"), &[]).await, 1, "{kind:?}");
        assert!(
            db.try_exec(&event("CLOSED", "guess"), &[]).await.is_err(),
            "{kind:?}: an unknown source"
        );
        let events = db.store.events(id).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].source, Source::Bill);
        assert_eq!(events[0].to_state.to_string(), "SUCCESS");

        // The bill tables keep their values sound.
        let bill = |date: &str, state: &str| {
            format!("INSERT INTO wxpay_bills (mch_id, bill_date, state) VALUES ('{MCH}', '{date}', '{state}')")
        };
        assert_eq!(db.exec(&bill("2026-02-28", "NOT_READY"), &[]).await, 1);
        for (date, state, why) in [
            ("2026-02-28", "FAILED", "a second row of a merchant's day"),
            ("2026-02-30", "NOT_READY", "a day that does not exist"),
            ("2026-03-01", "DONE", "an unknown state"),
        ] {
            assert!(db.try_exec(&bill(date, state), &[]).await.is_err(), "{kind:?}: {why}");
        }
        if kind == Kind::Sqlite {
            assert!(db.try_exec(&bill("2026-3-01", "NOT_READY"), &[]).await.is_err());
        }
        let record = db.store.bill(MCH, day(2026, 2, 28)).await.unwrap().unwrap();
        assert_eq!(record.state, BillState::NotReady);
        assert_eq!(record.bill_date, day(2026, 2, 28));
        assert_eq!(record.attempts, 0);
        let finding = |kind: &str, object: &str, action: &str| {
            format!(
                "INSERT INTO wxpay_bill_findings (bill_id, mch_id, bill_date, kind, object, out_trade_no, action) \
                 VALUES ({}, '{MCH}', '2026-02-28', '{kind}', '{object}', 'x', '{action}')",
                record.id
            )
        };
        assert_eq!(db.exec(&finding("local_only", "payment", "reported"), &[]).await, 1);
        for (k, o, a) in [
            ("lost", "payment", "reported"),
            ("local_only", "order", "reported"),
            ("local_only", "refund", "ignored"),
        ] {
            assert!(db.try_exec(&finding(k, o, a), &[]).await.is_err(), "{kind:?}: {k} {o} {a}");
        }
        // A bill's findings go with it.
        db.exec(&format!("DELETE FROM wxpay_bills WHERE id = {}", record.id), &[]).await;
        let count = match kind {
            Kind::Mysql => "SELECT CAST(COUNT(*) AS CHAR) FROM wxpay_bill_findings",
            _ => "SELECT CAST(COUNT(*) AS TEXT) FROM wxpay_bill_findings",
        };
        assert_eq!(db.text(count).await.as_deref(), Some("0"), "{kind:?}");
    })
    .await;
}

/// SQLite cannot alter a CHECK: 0006 rebuilds `wxpay_order_events`. A database migrated to
/// 0005 and holding events (one of an order deleted while foreign keys were off, the last one
/// deleted) keeps them all with their ids, never gives an id twice, and its rules still hold.
#[tokio::test]
async fn sqlite_s_rebuilt_events_table_keeps_its_rows_ids_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("old.db").display());
    let old = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::from_str(&url)
                .unwrap()
                .create_if_missing(true),
        )
        .await
        .unwrap();
    sqlx::migrate!("migrations/sqlite")
        .run_to(5, &old)
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) VALUES
            ('10000100', 'wxd930ea5d5a258f4f', 'a1', 100),
            ('10000100', 'wxd930ea5d5a258f4f', 'a2', 200),
            ('10000100', 'wxd930ea5d5a258f4f', 'a3', 300);
         INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state, to_state, source,
             transaction_id, total_fee, detail, created_at) VALUES
            (1, '10000100', 'a1', 'NOTPAY', 'SUCCESS', 'poll', '4200000001', 100, 'paid', '2026-01-01 10:00:00.123'),
            (2, '10000100', 'a2', 'NOTPAY', 'CLOSED', 'expire', NULL, NULL, NULL, '2026-01-01 11:00:00'),
            (2, '10000100', 'a2', 'CLOSED', 'PAID_AFTER_CLOSE', 'notify', '4200000002', 200, NULL, '2026-01-01 12:00:00'),
            (3, '10000100', 'a3', 'NOTPAY', 'SUCCESS', 'manual', NULL, NULL, NULL, '2026-01-01 13:00:00');
         PRAGMA foreign_keys = OFF;
         DELETE FROM wxpay_order_events WHERE order_id = 3;
         DELETE FROM wxpay_orders WHERE id = 3;
         INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state, to_state, source)
             VALUES (3, '10000100', 'a3', 'NOTPAY', 'CLOSED', 'poll');
         INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state, to_state, source)
             VALUES (1, '10000100', 'a1', 'SUCCESS', 'REFUND', 'manual');
         DELETE FROM wxpay_order_events WHERE id = 6;
         PRAGMA foreign_keys = ON;",
    )
    .execute(&old)
    .await
    .unwrap();
    let dump = "SELECT group_concat(id || '|' || order_id || '|' || to_state || '|' || source || '|' || \
                ifnull(transaction_id, '-') || '|' || ifnull(total_fee, '-') || '|' || ifnull(detail, '-') || '|' || created_at, ';') \
                FROM (SELECT * FROM wxpay_order_events ORDER BY id)";
    let before: String = sqlx::query_scalar(dump).fetch_one(&old).await.unwrap();
    assert!(
        before.starts_with("1|1|SUCCESS|poll|4200000001|100|paid|2026-01-01 10:00:00.123;"),
        "{before}"
    );
    old.close().await;

    let store = Store::connect(&ConnectOptions {
        url: DatabaseUrl::new(&url),
        max_connections: 2,
        create_if_missing: false,
        acquire_timeout: Duration::from_secs(5),
    })
    .await
    .unwrap();
    assert!(matches!(
        store.check_schema().await,
        Err(StoreError::SchemaBehind { missing: 6 })
    ));
    store.migrate().await.unwrap();
    store.check_schema().await.unwrap();

    let mut raw = SqliteConnection::connect(&url).await.unwrap();
    let after: String = sqlx::query_scalar(dump).fetch_one(&mut raw).await.unwrap();
    assert_eq!(after, before, "every event, as it was");
    // The outbox's ids: the deleted last one (6) is never given again.
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM wxpay_order_events ORDER BY id")
        .fetch_all(&mut raw)
        .await
        .unwrap();
    assert_eq!(ids, [1, 2, 3, 5]);
    sqlx::query(
        "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state, to_state, source) \
         VALUES (1, '10000100', 'a1', 'SUCCESS', 'REFUND', 'bill')",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    let newest: i64 = sqlx::query_scalar("SELECT MAX(id) FROM wxpay_order_events")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert_eq!(newest, 7);
    let events = store.events(1).await.unwrap();
    assert_eq!(
        events.last().map(|e| (e.id, e.source)),
        Some((7, Source::Bill))
    );
    // Its rules: one event per order and state, known sources, existing orders only.
    for (sql, why) in [
        (
            "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state, to_state, source) \
             VALUES (1, '10000100', 'a1', 'NOTPAY', 'SUCCESS', 'poll')",
            "twice",
        ),
        (
            "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state, to_state, source) \
             VALUES (1, '10000100', 'a1', 'NOTPAY', 'CLOSED', 'guess')",
            "an unknown source",
        ),
        (
            "INSERT INTO wxpay_order_events (order_id, mch_id, out_trade_no, from_state, to_state, source) \
             VALUES (99, '10000100', 'a9', 'NOTPAY', 'CLOSED', 'poll')",
            "an order that does not exist",
        ),
    ] {
        sqlx::query("PRAGMA foreign_keys = ON")
            .execute(&mut raw)
            .await
            .unwrap();
        assert!(
            sqlx::query(AssertSqlSafe(sql))
                .execute(&mut raw)
                .await
                .is_err(),
            "{why}"
        );
    }
    // The partial index of 0002 is there again, and the `status` read uses it.
    let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(
        "EXPLAIN QUERY PLAN SELECT id FROM wxpay_order_events WHERE to_state = 'PAID_AFTER_CLOSE' ORDER BY id DESC LIMIT 5",
    )
    .fetch_all(&mut raw)
    .await
    .unwrap();
    assert!(
        plan.iter()
            .any(|p| p.3.contains("wxpay_order_events_paid_after_close")),
        "{plan:?}"
    );
    let paid_after_close = store.paid_after_close(10).await.unwrap();
    assert_eq!(paid_after_close.len(), 1);
    assert_eq!(paid_after_close[0].id, 3);
    // The triggers of 0003 (on the orders) still hold.
    assert!(
        sqlx::query(
            "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee, expires_at) \
             VALUES ('10000100', 'wxd930ea5d5a258f4f', 'a4', 100, '2026-02-31 00:00:00')"
        )
        .execute(&mut raw)
        .await
        .is_err()
    );
    sqlx::query(
        "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee, expires_at) \
         VALUES ('10000100', 'wxd930ea5d5a258f4f', 'a5', 100, '2099-12-01 10:30:00+08:00')",
    )
    .execute(&mut raw)
    .await
    .unwrap();
    let a5 = store.find_order(MCH, "a5").await.unwrap().unwrap();
    assert_eq!(a5.expires_at, Some(at("2099-12-01T02:30:00Z")));
    let fk: Vec<(String, i64, String, i64)> =
        sqlx::query_as("PRAGMA foreign_key_check(wxpay_order_events)")
            .fetch_all(&mut raw)
            .await
            .unwrap();
    assert_eq!(
        fk.len(),
        1,
        "the event of the deleted order, as before: {fk:?}"
    );
}

#[tokio::test]
async fn a_bill_day_is_claimed_when_due_busy_under_a_live_lease_and_fenced_by_it() {
    for_each_backend(async |kind, e| {
        let store = &e.db.store;
        let now = Utc::now().trunc_subsecs(0);
        let d = day(2026, 3, 1);
        let (bill_id, lease) = claimed(claim(store, d, now, false).await);
        assert_eq!(lease, 1, "{kind:?}");
        let b = store.bill(MCH, d).await.unwrap().unwrap();
        assert_eq!(
            (b.id, b.state, b.lease, b.attempts),
            (bill_id, BillState::Running, 1, 1),
            "{kind:?}"
        );
        assert_eq!(b.mch_id, MCH);
        assert_eq!(b.bill_date, d);
        assert_eq!(b.lease_until, Some(now + TimeDelta::minutes(5)));
        assert_eq!(b.started_at, Some(now));
        assert_eq!((b.totals, b.origin, b.reconciled_at), (None, None, None));
        assert_eq!(counts(&b), zero_counts());

        // Another instance, even forced, waits for the lease.
        let soon = now + TimeDelta::minutes(4);
        assert_eq!(
            claim(store, d, soon, false).await,
            BillClaim::Busy,
            "{kind:?}"
        );
        assert_eq!(
            claim(store, d, soon, true).await,
            BillClaim::Busy,
            "{kind:?}"
        );
        // Another merchant's day, and the next day, are their own.
        let other = store
            .claim_bill(&claim_req(OTHER, d, soon, false))
            .await
            .unwrap();
        assert_ne!(claimed(other).0, bill_id);
        assert_ne!(
            claimed(claim(store, d.succ_opt().unwrap(), soon, false).await).0,
            bill_id
        );
        // The holder extends its lease.
        assert!(
            store
                .extend_bill_lease(bill_id, 1, now + TimeDelta::minutes(10))
                .await
                .unwrap()
        );
        let later = now + TimeDelta::minutes(6);
        assert_eq!(
            claim(store, d, later, false).await,
            BillClaim::Busy,
            "{kind:?}"
        );

        // The lease expired (its instance is gone): the day is claimed again, with a new lease.
        let t1 = now + TimeDelta::minutes(11);
        assert_eq!(
            claimed(claim(store, d, t1, false).await),
            (bill_id, 2),
            "{kind:?}"
        );
        assert_eq!(store.bill(MCH, d).await.unwrap().unwrap().attempts, 2);
        // The old holder's writes are refused, and write nothing.
        assert!(
            !store
                .extend_bill_lease(bill_id, 1, t1 + TimeDelta::hours(1))
                .await
                .unwrap()
        );
        let f = [finding(FindingKind::LocalOnly, "stale", d)];
        assert!(
            !store.insert_findings(bill_id, 1, &f).await.unwrap(),
            "{kind:?}"
        );
        assert!(
            !store
                .finish_bill(bill_id, 1, &end(BillState::Reconciled, t1))
                .await
                .unwrap()
        );
        assert!(
            store.bill_findings(bill_id, 10).await.unwrap().is_empty(),
            "{kind:?}"
        );
        assert_eq!(
            store.bill(MCH, d).await.unwrap().unwrap().state,
            BillState::Running
        );

        // The holder finishes; a finished day takes no more writes of that run.
        let t2 = now + TimeDelta::minutes(12);
        let totals = BillTotals {
            row_count: 45,
            payment_count: 31,
            refund_count: 14,
            total_fee: 1_234_567,
            refund_fee: 8_900,
            fee_milli_fen: -27_000,
        };
        let sha1 = "9bb6cd819be348f17a9cbcedddc8eb62fefbd790";
        let done = BillEnd {
            origin: Some(BillOrigin::Download),
            sha1: Some(sha1),
            totals: Some(totals),
            summary_check: Some("adds_up"),
            ..end(BillState::Reconciled, t2)
        };
        assert!(
            store.finish_bill(bill_id, 2, &done).await.unwrap(),
            "{kind:?}"
        );
        assert!(
            !store.finish_bill(bill_id, 2, &done).await.unwrap(),
            "{kind:?}: twice"
        );
        assert!(
            !store.insert_findings(bill_id, 2, &f).await.unwrap(),
            "{kind:?}"
        );
        assert!(!store.extend_bill_lease(bill_id, 2, t2).await.unwrap());
        let b = store.bill(MCH, d).await.unwrap().unwrap();
        assert_eq!(b.state, BillState::Reconciled);
        assert_eq!(b.totals, Some(totals));
        assert_eq!(b.sha1.as_deref(), Some(sha1));
        assert_eq!(b.origin, Some(BillOrigin::Download));
        assert_eq!(b.summary_check.as_deref(), Some("adds_up"));
        assert_eq!((b.reconciled_at, b.lease_until), (Some(t2), None));
        assert_eq!(b.updated_at, t2);
        assert_eq!((b.last_error, b.next_attempt_at), (None, None));

        // Reconciled: not due, unless forced.
        let t3 = now + TimeDelta::days(1);
        assert_eq!(
            claim(store, d, t3, false).await,
            BillClaim::NotDue {
                state: BillState::Reconciled
            }
        );
        assert_eq!(
            claimed(claim(store, d, t3, true).await),
            (bill_id, 3),
            "{kind:?}"
        );
        // Not ready: due again at next_attempt_at, not before; the last reconciliation's time
        // is kept.
        let retry = t3 + TimeDelta::minutes(30);
        let not_ready = BillEnd {
            next_attempt_at: Some(retry),
            ..end(BillState::NotReady, t3)
        };
        assert!(store.finish_bill(bill_id, 3, &not_ready).await.unwrap());
        let b = store.bill(MCH, d).await.unwrap().unwrap();
        assert_eq!(
            (b.state, b.next_attempt_at),
            (BillState::NotReady, Some(retry))
        );
        assert_eq!((b.reconciled_at, b.totals, b.sha1), (Some(t2), None, None));
        assert_eq!(
            claim(store, d, retry - TimeDelta::seconds(1), false).await,
            BillClaim::NotDue {
                state: BillState::NotReady
            }
        );
        assert_eq!(claimed(claim(store, d, retry, false).await), (bill_id, 4));
        assert_eq!(
            store.bill(MCH, d).await.unwrap().unwrap().next_attempt_at,
            None
        );
        // Failed without a retry time: due at once; its error is bounded.
        let error = "WeChat said\n".repeat(500);
        let failed = BillEnd {
            last_error: Some(&error),
            ..end(BillState::Failed, retry)
        };
        assert!(store.finish_bill(bill_id, 4, &failed).await.unwrap());
        let b = store.bill(MCH, d).await.unwrap().unwrap();
        let stored = b.last_error.unwrap();
        assert!(
            stored.chars().count() <= 1024 && !stored.contains('\n'),
            "{stored}"
        );
        assert!(stored.starts_with("WeChat said\\nWeChat said"), "{stored}");
        assert_eq!(claimed(claim(store, d, retry, false).await), (bill_id, 5));
        // Refused, to be retried tomorrow: not due today.
        let refused = BillEnd {
            next_attempt_at: Some(retry + TimeDelta::days(1)),
            ..end(BillState::Refused, retry)
        };
        assert!(store.finish_bill(bill_id, 5, &refused).await.unwrap());
        assert_eq!(
            claim(store, d, retry + TimeDelta::hours(1), false).await,
            BillClaim::NotDue {
                state: BillState::Refused
            }
        );
        assert_eq!(store.bill(MCH, d).await.unwrap().unwrap().attempts, 5);
        // A run cannot end as RUNNING, nor with a hash that is none.
        let odd = BillEnd {
            sha1: Some("9bb6cd81 not a hash"),
            ..end(BillState::Reconciled, retry)
        };
        assert!(matches!(
            store.finish_bill(bill_id, 5, &odd).await,
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store
                .finish_bill(bill_id, 5, &end(BillState::Running, retry))
                .await,
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(store.bill(MCH, day(2020, 1, 1)).await.unwrap(), None);
    })
    .await;
}

#[tokio::test]
async fn two_instances_claiming_one_day_at_once_one_gets_it() {
    for_each_backend(async |kind, e| {
        let now = Utc::now().trunc_subsecs(0);
        for i in 0..20 {
            let d = day(2025, 1, 1) + TimeDelta::days(i);
            // A new day (both insert its row), then the same day once the lease expired (both
            // find it due).
            for (at, lease) in [(now, 1), (now + TimeDelta::minutes(10), 2)] {
                let (a, b) = (e.db.store.clone(), e.db.store.clone());
                let (one, two) = tokio::join!(
                    tokio::spawn(async move { a.claim_bill(&claim_req(MCH, d, at, false)).await }),
                    tokio::spawn(async move { b.claim_bill(&claim_req(MCH, d, at, false)).await }),
                );
                let mut answers = [one.unwrap().unwrap(), two.unwrap().unwrap()];
                answers.sort_by_key(|c| matches!(c, BillClaim::Busy));
                let [won, lost] = answers;
                assert!(
                    matches!(won, BillClaim::Claimed { lease: l, .. } if l == lease),
                    "{kind:?} day {d} lease {lease}: {won:?} {lost:?}"
                );
                assert_eq!(lost, BillClaim::Busy, "{kind:?} day {d}: {won:?}");
            }
            let b = e.db.store.bill(MCH, d).await.unwrap().unwrap();
            assert_eq!((b.lease, b.attempts), (2, 2), "{kind:?} day {d}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_run_s_findings_are_stored_in_chunks_and_replaced_by_the_next_run() {
    for_each_backend(async |kind, e| {
        let store = &e.db.store;
        let now = Utc::now().trunc_subsecs(0);
        let d = day(2026, 4, 2);
        let (bill_id, lease) = claimed(claim(store, d, now, false).await);
        let numbers: Vec<String> = (0..5_003).map(|i| format!("bill{i:06}")).collect();
        let long_otn = "X".repeat(100);
        let detail = "line one\nline two ".repeat(200);
        let mut findings: Vec<NewFinding<'_>> = numbers
            .iter()
            .enumerate()
            .map(|(i, n)| NewFinding {
                object: if i % 2 == 0 {
                    FindingObject::Payment
                } else {
                    FindingObject::Refund
                },
                line: Some(i as u64 + 2),
                ..finding(FindingKind::ALL[i % 6], n, d)
            })
            .collect();
        findings[0] = NewFinding {
            kind: FindingKind::AmountDiff,
            object: FindingObject::Refund,
            mch_id: MCH,
            bill_date: d,
            out_trade_no: &long_otn,
            out_refund_no: Some("R123"),
            transaction_id: Some("4200000001202601010000000001"),
            local_fee: Some(100),
            remote_fee: Some(99),
            local_state: Some("SUCCESS"),
            remote_state: Some("REFUND"),
            action: FindingAction::Quarantined,
            line: Some(7),
            detail: Some(&detail),
        };
        assert!(
            store
                .insert_findings(bill_id, lease, &findings)
                .await
                .unwrap(),
            "{kind:?}"
        );
        let rows = store.bill_findings(bill_id, 10_000).await.unwrap();
        assert_eq!(rows.len(), 5_003, "{kind:?}");
        assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
        let first = &rows[0];
        assert_eq!(first.bill_id, bill_id);
        assert_eq!(
            (first.kind, first.object, first.action),
            (
                FindingKind::AmountDiff,
                FindingObject::Refund,
                FindingAction::Quarantined
            )
        );
        assert_eq!(
            first.out_trade_no.chars().count(),
            64,
            "bounded to its column"
        );
        assert!(first.out_trade_no.starts_with("XXXX"));
        assert_eq!(first.out_refund_no.as_deref(), Some("R123"));
        assert_eq!(
            first.transaction_id.as_deref(),
            Some("4200000001202601010000000001")
        );
        assert_eq!((first.local_fee, first.remote_fee), (Some(100), Some(99)));
        assert_eq!(
            (first.local_state.as_deref(), first.remote_state.as_deref()),
            (Some("SUCCESS"), Some("REFUND"))
        );
        assert_eq!(first.line, Some(7));
        let stored = first.detail.as_deref().unwrap();
        assert!(
            stored.chars().count() <= 1024 && !stored.contains('\n'),
            "{stored}"
        );
        assert!((first.created_at - Utc::now()).num_minutes().abs() < 5);
        let last = rows.last().unwrap();
        assert_eq!(last.out_trade_no, "bill005002");
        assert_eq!(last.line, Some(5_004));
        assert_eq!(
            (
                last.out_refund_no.clone(),
                last.detail.clone(),
                last.local_fee
            ),
            (None, None, None)
        );
        let mut expected = zero_counts();
        for f in &findings {
            expected.iter_mut().find(|(k, _)| *k == f.kind).unwrap().1 += 1;
        }
        let b = store.bill(MCH, d).await.unwrap().unwrap();
        assert_eq!(counts(&b), expected, "{kind:?}");
        assert_eq!(store.bill_findings(bill_id, 3).await.unwrap().len(), 3);

        // The next run of the day (another instance, after the lease expired) starts from no
        // findings; the old holder adds none to it.
        let (_, next) = claimed(claim(store, d, now + TimeDelta::minutes(6), false).await);
        assert!(
            store.bill_findings(bill_id, 10).await.unwrap().is_empty(),
            "{kind:?}"
        );
        assert!(
            !store
                .insert_findings(bill_id, lease, &findings[..10])
                .await
                .unwrap()
        );
        assert!(
            store
                .insert_findings(bill_id, next, &findings[..10])
                .await
                .unwrap()
        );
        assert!(store.insert_findings(bill_id, next, &[]).await.unwrap());
        let b = store.bill(MCH, d).await.unwrap().unwrap();
        assert_eq!(
            b.findings.iter().map(|(_, n)| n).sum::<i64>(),
            10,
            "{kind:?}"
        );
        // A forced re-run of a reconciled day too.
        assert!(
            store
                .finish_bill(bill_id, next, &end(BillState::Reconciled, now))
                .await
                .unwrap()
        );
        claimed(claim(store, d, now + TimeDelta::minutes(7), true).await);
        assert_eq!(
            counts(&store.bill(MCH, d).await.unwrap().unwrap()),
            zero_counts()
        );
    })
    .await;
}

#[tokio::test]
async fn batched_lookups_find_this_merchant_s_rows_and_set_an_unreadable_one_apart() {
    for_each_backend(async |kind, e| {
        let db = &e.db;
        let store = &db.store;
        let (o1, o2) = (unique_otn("lk").to_string(), unique_otn("lk").to_string());
        let id1 = order(db, MCH, &o1, 100).await;
        let id2 = order(db, MCH, &o2, 200).await;
        // The same number at another merchant is another order.
        let elsewhere = unique_otn("lk").to_string();
        order(db, OTHER, &elsewhere, 300).await;
        order(db, OTHER, &o1, 300).await;
        let bad = format!("bad no {id1}!");
        let bad_id = order(db, MCH, &bad, 100).await;
        let unknown: Vec<String> = (0..1_500).map(|i| format!("unknown{i}")).collect();
        let mut asked: Vec<&str> = unknown.iter().map(String::as_str).collect();
        for (i, n) in [o1.as_str(), bad.as_str(), elsewhere.as_str()]
            .into_iter()
            .enumerate()
        {
            asked.insert(700 + i, n);
        }
        asked.push(&o2);
        let mut found = store.orders_by_out_trade_no(MCH, &asked).await.unwrap();
        found.sort_by_key(|r| match r {
            Ok(o) => o.id,
            Err(u) => u.id,
        });
        assert_eq!(found.len(), 3, "{kind:?}: {found:?}");
        let o = found[0].as_ref().unwrap();
        assert_eq!(
            (o.id, o.out_trade_no.as_str(), o.total_fee.get()),
            (id1, o1.as_str(), 100)
        );
        assert_eq!(o.mch_id.as_str(), MCH);
        assert_eq!(found[1].as_ref().unwrap().id, id2);
        let u = found[2].as_ref().unwrap_err();
        assert_eq!(u.id, bad_id);
        assert_eq!(u.out_trade_no.as_deref(), Some(bad.as_str()));
        assert_eq!(u.mch_id.as_deref(), Some(MCH));
        assert!(u.reason.contains("out_trade_no"), "{}", u.reason);
        assert!(
            store
                .orders_by_out_trade_no(MCH, &[])
                .await
                .unwrap()
                .is_empty()
        );

        let refund = "INSERT INTO wxpay_refunds (mch_id, out_trade_no, out_refund_no, refund_fee) \
                      VALUES ($1, $2, $3, 50)";
        let (r1, r2, rb) = (format!("R{o1}"), format!("R{o2}"), format!("B {o1}"));
        db.exec(refund, &[MCH, &o1, &r1]).await;
        db.exec(refund, &[MCH, &o2, &r2]).await;
        db.exec(refund, &[MCH, &o1, &rb]).await;
        db.exec(refund, &[OTHER, &o1, &r1]).await;
        let mut asked: Vec<&str> = unknown.iter().map(String::as_str).collect();
        asked.extend([r1.as_str(), r2.as_str(), rb.as_str()]);
        let found = store.refunds_by_out_refund_no(MCH, &asked).await.unwrap();
        assert_eq!(found.len(), 3, "{kind:?}: {found:?}");
        let ok: Vec<(&str, &str, i64)> = found
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| {
                (
                    r.mch_id.as_str(),
                    r.out_refund_no.as_str(),
                    r.refund_fee.get(),
                )
            })
            .collect();
        assert!(
            ok.contains(&(MCH, r1.as_str(), 50)) && ok.contains(&(MCH, r2.as_str(), 50)),
            "{ok:?}"
        );
        let u = found.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(u.out_refund_no.as_deref(), Some(rb.as_str()));
        assert_eq!(u.out_trade_no.as_deref(), Some(o1.as_str()));
        assert_eq!((u.mch_id.as_deref(), u.lease), (Some(MCH), 0));
        assert!(u.reason.contains("out_refund_no"), "{}", u.reason);
        assert!(
            store
                .refunds_by_out_refund_no(MCH, &[])
                .await
                .unwrap()
                .is_empty()
        );
    })
    .await;
}

#[tokio::test]
async fn the_local_side_of_a_day_is_read_in_pages_within_its_bounds() {
    for_each_backend(async |kind, e| {
        let db = &e.db;
        let store = &db.store;
        let from = at("2026-03-01T16:00:00Z");
        let to = from + TimeDelta::days(1);
        let ms = TimeDelta::milliseconds(1);
        let l = |t: DateTime<Utc>| lit(kind, t, true);
        paid(db, MCH, "SUCCESS", &l(from - ms)).await;
        let first = paid(db, MCH, "SUCCESS", &l(from)).await;
        let refunded = paid(db, MCH, "REFUND", &l(from + TimeDelta::hours(3))).await;
        paid(db, MCH, "NOTPAY", &l(from + TimeDelta::hours(4))).await;
        paid(db, MCH, "CLOSED", &l(from + TimeDelta::hours(5))).await;
        paid(db, OTHER, "SUCCESS", &l(from + TimeDelta::hours(6))).await;
        let unfractioned = paid(db, MCH, "SUCCESS", &lit(kind, from, false)).await;
        let last = paid(db, MCH, "SUCCESS", &l(to - ms)).await;
        paid(db, MCH, "SUCCESS", &l(to)).await;
        paid(db, MCH, "SUCCESS", &lit(kind, to, false)).await;
        let expected = vec![first, refunded, unfractioned, last];

        let span = store.paid_span(MCH, from, to).await.unwrap();
        assert_eq!(
            span,
            IdSpan {
                min_id: Some(first),
                max_id: Some(last),
                count: 4
            },
            "{kind:?}"
        );
        for start in [span.min_id.unwrap() - 1, 0] {
            let mut ids = Vec::new();
            let mut after = start;
            loop {
                let page = store.paid_between(MCH, from, to, after, 3).await.unwrap();
                assert!(page.len() <= 3);
                let page: Vec<i64> = page.iter().map(|r| r.as_ref().unwrap().id).collect();
                let Some(&end) = page.last() else { break };
                ids.extend(page);
                after = end;
            }
            assert_eq!(ids, expected, "{kind:?} from {start}");
        }
        let rows = store.paid_between(MCH, from, to, first, 1).await.unwrap();
        let row = rows[0].as_ref().unwrap();
        assert_eq!((row.id, row.state), (refunded, OrderState::Refund));
        assert_eq!(row.paid_at, Some(from + TimeDelta::hours(3)));
        assert_eq!(
            store
                .paid_span(MCH, to, to + TimeDelta::days(1))
                .await
                .unwrap()
                .count,
            2,
            "{kind:?}: the next day starts at `to`"
        );
        assert_eq!(
            store
                .paid_span(MCH, from - TimeDelta::days(30), from - TimeDelta::days(29))
                .await
                .unwrap(),
            IdSpan::default()
        );
        // A paid order whose row cannot be read is listed as such.
        let bad = format!("bad no {first}!");
        let bad_id = order(db, MCH, &bad, 100).await;
        db.exec(
            &format!(
                "UPDATE wxpay_orders SET state = 'SUCCESS', paid_at = {} WHERE id = {bad_id}",
                l(from)
            ),
            &[],
        )
        .await;
        let page = store.paid_between(MCH, from, to, last, 10).await.unwrap();
        assert_eq!(page.len(), 1, "{kind:?}");
        assert_eq!(page[0].as_ref().unwrap_err().id, bad_id);

        // Refunds by their own success time.
        let otn = unique_otn("bs").to_string();
        order(db, MCH, &otn, 10_000).await;
        let refund = |orn: &str, state: &'static str, at: String| {
            refund_at(db, otn.clone(), format!("{orn}{otn}"), state, at)
        };
        refund("A", "SUCCESS", l(from - ms)).await;
        let r1 = refund("B", "SUCCESS", l(from)).await;
        refund("C", "PROCESSING", l(from + TimeDelta::hours(1))).await;
        let r2 = refund("D", "SUCCESS", lit(kind, from + TimeDelta::hours(2), false)).await;
        let r3 = refund("E", "SUCCESS", l(to - ms)).await;
        refund("F", "SUCCESS", l(to)).await;
        let span = store.refund_span(MCH, from, to).await.unwrap();
        assert_eq!(
            span,
            IdSpan {
                min_id: Some(r1),
                max_id: Some(r3),
                count: 3
            },
            "{kind:?}"
        );
        let page = store
            .refunds_succeeded_between(MCH, from, to, r1 - 1, 2)
            .await
            .unwrap();
        let ids: Vec<i64> = page.iter().map(|r| r.as_ref().unwrap().id).collect();
        assert_eq!(ids, [r1, r2], "{kind:?}");
        let page = store
            .refunds_succeeded_between(MCH, from, to, r2, 2)
            .await
            .unwrap();
        let row = page[0].as_ref().unwrap();
        assert_eq!(
            (page.len(), row.id, row.state),
            (1, r3, RefundState::Success)
        );
        assert_eq!(row.success_time, Some(to - ms));
        assert!(
            store
                .refunds_succeeded_between(MCH, from, to, r3, 2)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.refund_span(OTHER, from, to).await.unwrap(),
            IdSpan::default()
        );
    })
    .await;
}

#[tokio::test]
async fn the_latest_bills_and_the_last_reconciled_day_of_every_merchant() {
    for_each_backend(async |kind, e| {
        let store = &e.db.store;
        let now = Utc::now().trunc_subsecs(0);
        assert!(store.latest_bills(3).await.unwrap().is_empty());
        assert!(store.last_reconciled().await.unwrap().is_empty());
        let run = async |mch_id: &str,
                         d: NaiveDate,
                         state: BillState,
                         t: DateTime<Utc>,
                         found: &[FindingKind]| {
            let (bill_id, lease) = claimed(
                store
                    .claim_bill(&claim_req(mch_id, d, t, false))
                    .await
                    .unwrap(),
            );
            let findings: Vec<NewFinding<'_>> = found
                .iter()
                .map(|k| NewFinding {
                    mch_id,
                    ..finding(*k, "o", d)
                })
                .collect();
            assert!(
                store
                    .insert_findings(bill_id, lease, &findings)
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .finish_bill(bill_id, lease, &end(state, t))
                    .await
                    .unwrap()
            );
            bill_id
        };
        use FindingKind::*;
        run(
            MCH,
            day(2026, 5, 1),
            BillState::Reconciled,
            now,
            &[RemoteOnly],
        )
        .await;
        let second = run(
            MCH,
            day(2026, 5, 2),
            BillState::Reconciled,
            now + TimeDelta::hours(1),
            &[LocalOnly, AmountDiff, LocalOnly],
        )
        .await;
        run(
            MCH,
            day(2026, 5, 3),
            BillState::Failed,
            now + TimeDelta::hours(2),
            &[],
        )
        .await;
        run(
            OTHER,
            day(2026, 4, 30),
            BillState::Reconciled,
            now,
            &[SettledByBill],
        )
        .await;

        let latest = store.latest_bills(2).await.unwrap();
        let listed: Vec<(&str, NaiveDate, BillState)> = latest
            .iter()
            .map(|b| (b.mch_id.as_str(), b.bill_date, b.state))
            .collect();
        assert_eq!(
            listed,
            [
                (MCH, day(2026, 5, 3), BillState::Failed),
                (MCH, day(2026, 5, 2), BillState::Reconciled),
                (OTHER, day(2026, 4, 30), BillState::Reconciled),
            ],
            "{kind:?}"
        );
        assert_eq!(
            latest[1].findings,
            [
                (RemoteOnly, 0),
                (LocalOnly, 2),
                (AmountDiff, 1),
                (StateDiff, 0),
                (SettledByBill, 0),
                (PaidAfterClose, 0)
            ],
            "{kind:?}"
        );
        assert_eq!(
            latest[2].findings.iter().find(|(k, _)| *k == SettledByBill),
            Some(&(SettledByBill, 1))
        );
        assert_eq!(latest[0].findings, zero_counts());
        assert_eq!(store.latest_bills(1).await.unwrap().len(), 2);
        assert_eq!(store.latest_bills(10).await.unwrap().len(), 4);
        assert_eq!(
            store.last_reconciled().await.unwrap(),
            [
                (MCH.to_owned(), day(2026, 5, 2), now + TimeDelta::hours(1)),
                (OTHER.to_owned(), day(2026, 4, 30), now),
            ],
            "{kind:?}: the newest reconciled day, not the newest day"
        );
        let rows = store.bill_findings(second, 10).await.unwrap();
        let kinds: Vec<FindingKind> = rows.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [LocalOnly, AmountDiff, LocalOnly]);
        assert_eq!(store.bill_findings(second, 2).await.unwrap().len(), 2);
    })
    .await;
}

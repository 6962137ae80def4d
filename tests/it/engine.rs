//! The reconciliation engine on every backend the run covers: scan, query, settle, measure.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use wxpay_reconciler::config::Settings;
use wxpay_reconciler::daemon;
use wxpay_reconciler::domain::OrderState;
use wxpay_reconciler::reconcile::scanner::{ScanReport, Scanner};
use wxpay_reconciler::store::{Claimed, EventRow, NewOrder, OrderRow};
use wxpay_reconciler::telemetry::Telemetry;
use wxpay_reconciler::wxpay::Merchant;

use crate::db::{Kind, TestDb, backends};
use crate::frame::{for_each_backend, for_each_backend_with};
use crate::helpers::{TestSim, hmac_merchant, md5_merchant, unique_otn};

pub fn settings(db_url: &str, sim_url: &str) -> Settings {
    let mut settings = wxpay_reconciler::sim::daemon_settings(db_url, sim_url);
    settings.path = "(test)".into();
    settings.wechat.timeout_ms = 2000;
    settings.wechat.connect_timeout_ms = 1000;
    settings.wechat.max_qps = 10_000;
    settings.wechat.concurrency = 16;
    settings.schedule.batch_size = 50;
    settings
}

/// A database, a simulator and a scanner wired together.
pub struct Engine {
    pub db: TestDb,
    pub sim: TestSim,
    pub settings: Settings,
    pub telemetry: Telemetry,
    pub scanner: Scanner,
}

impl Engine {
    pub async fn new(db: TestDb) -> Engine {
        Engine::with(db, |_| {}).await
    }

    pub async fn with(db: TestDb, tweak: impl FnOnce(&mut Settings)) -> Engine {
        let sim = TestSim::start().await;
        let mut settings = settings(&db.url, &sim.url());
        tweak(&mut settings);
        let telemetry = Telemetry::new(settings.merchants.iter().map(|m| m.mch_id.as_str()));
        let scanner = daemon::scanner(&settings, db.store.clone(), telemetry.clone()).unwrap();
        Engine {
            db,
            sim,
            settings,
            telemetry,
            scanner,
        }
    }

    /// Another scanner (another instance) on the same database and simulator.
    pub fn second_scanner(&self) -> Scanner {
        let telemetry = Telemetry::new(self.settings.merchants.iter().map(|m| m.mch_id.as_str()));
        daemon::scanner(&self.settings, self.db.store.clone(), telemetry).unwrap()
    }

    /// The shop registers an order (the contract's INSERT) and WeChat knows it.
    pub async fn order(&self, m: &Merchant, fee: i64) -> String {
        let otn = unique_otn("e").to_string();
        self.db
            .store
            .insert_order(&NewOrder {
                mch_id: m.mch_id.as_str(),
                appid: m.appid.as_str(),
                out_trade_no: &otn,
                total_fee: fee,
            })
            .await
            .unwrap();
        self.sim.create_order(m, &otn.parse().unwrap(), fee).await;
        otn
    }

    /// An order the customer paid at WeChat whose notification was lost: its out_trade_no and
    /// transaction_id.
    pub async fn paid_order(&self, m: &Merchant, fee: i64) -> (String, String) {
        let otn = self.order(m, fee).await;
        let txid = self
            .sim
            .pay(m, &otn.parse().unwrap(), json!({"notify": "drop"}))
            .await;
        (otn, txid)
    }

    pub async fn pay(&self, m: &Merchant, otn: &str, body: serde_json::Value) {
        self.sim.pay(m, &otn.parse().unwrap(), body).await;
    }

    pub async fn scan(&self) -> ScanReport {
        self.scanner
            .scan(&CancellationToken::new(), &|| {})
            .await
            .unwrap()
    }

    pub async fn row(&self, otn: &str) -> OrderRow {
        let mut rows = self.db.store.find(otn).await.unwrap();
        assert_eq!(rows.len(), 1);
        rows.remove(0)
    }

    pub async fn events(&self, otn: &str) -> Vec<EventRow> {
        let row = self.row(otn).await;
        self.db.store.events(row.id).await.unwrap()
    }

    pub fn queries(&self, otn: &str) -> u64 {
        self.sim.sim.state.order_stats(otn).queries
    }

    pub fn metric(&self, needle: &str) -> f64 {
        metric_value(&self.telemetry.render(), needle)
    }

    pub async fn finish(self) {
        self.sim.stop().await;
        self.db.cleanup().await;
    }
}

/// The value of the first sample line starting with `needle` (0 when absent).
pub fn metric_value(text: &str, needle: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_lost_notification_is_settled_once_as_success() {
    for_each_backend(async |kind, e| {
        for m in [md5_merchant(), hmac_merchant()] {
            let otn = e.order(&m, 2590).await;
            e.pay(&m, &otn, json!({"notify": "drop"})).await;
            let report = e.scan().await;
            assert_eq!((report.claimed, report.settled), (1, 1), "{kind:?}");
            let row = e.row(&otn).await;
            assert_eq!(row.state, OrderState::Success, "{kind:?}");
            assert!(row.transaction_id.is_some());
            let paid_at = row.paid_at.expect("paid_at from time_end");
            assert!(
                (Utc::now() - paid_at).num_seconds().abs() < 10,
                "{kind:?} paid_at {paid_at}"
            );
            assert_eq!(row.query_count, 1);
            let events = e.events(&otn).await;
            assert_eq!(events.len(), 1, "{kind:?}");
            let ev = &events[0];
            assert_eq!(
                (
                    ev.from_state.as_str(),
                    ev.to_state.as_str(),
                    ev.source.as_str()
                ),
                ("NOTPAY", "SUCCESS", "poll")
            );
            assert_eq!(ev.total_fee, Some(2590));
            assert_eq!(ev.transaction_id, row.transaction_id);
            // Nothing more to do: a second scan claims nothing and asks WeChat nothing.
            assert_eq!(e.scan().await.claimed, 0);
            assert_eq!(e.queries(&otn), 1);
        }
        let text = e.telemetry.render();
        assert_eq!(
            metric_value(
                &text,
                "wxpay_reconciler_transitions_total{from=\"NOTPAY\",to=\"SUCCESS\",source=\"poll\"}"
            ),
            2.0,
            "{text}"
        );
        assert_eq!(
            metric_value(
                &text,
                "wxpay_reconciler_orderquery_requests_total{mch_id=\"10000100\",outcome=\"ok\"}"
            ),
            1.0
        );
    })
    .await;
}

#[tokio::test]
async fn an_unpaid_order_stays_open_and_is_queried_on_the_backoff_schedule() {
    for_each_backend(async |kind, e| {
        let m = md5_merchant();
        let otn = e.order(&m, 100).await;
        let mut previous = Utc::now();
        for (i, interval) in [15i64, 15, 30, 180].into_iter().enumerate() {
            let report = e.scan().await;
            assert_eq!(report.claimed, 1, "{kind:?} query {}", i + 1);
            let row = e.row(&otn).await;
            assert_eq!(row.state, OrderState::NotPay);
            assert_eq!(row.query_count, i as i64 + 1);
            assert_eq!(row.last_error.as_deref(), Some("NOTPAY"));
            let next = row.next_query_at.unwrap() - row.last_queried_at.unwrap();
            assert!(
                next >= TimeDelta::seconds(interval)
                    && next <= TimeDelta::milliseconds(interval * 1100 + 50),
                "{kind:?}: query {} rescheduled {next} later, schedule says {interval}s (+10% jitter)",
                i + 1
            );
            assert!(row.last_queried_at.unwrap() >= previous - TimeDelta::seconds(1));
            previous = row.last_queried_at.unwrap();
            // Not due yet: a scan right now asks nothing.
            assert_eq!(e.scan().await.claimed, 0);
            assert_eq!(e.queries(&otn), i as u64 + 1);
            e.db.make_due(&otn).await;
        }
        assert!(e.events(&otn).await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_different_amount_is_quarantined_and_counted() {
    for_each_backend(async |_, e| {
        let m = hmac_merchant();
        let otn = e.order(&m, 1000).await;
        e.pay(&m, &otn, json!({"notify": "drop", "total_fee": 1}))
            .await;
        e.scan().await;
        let row = e.row(&otn).await;
        assert_eq!(row.state, OrderState::AmountMismatch);
        assert!(row.last_error.unwrap().contains("total_fee 1"));
        let events = e.events(&otn).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].to_state.as_str(), "AMOUNT_MISMATCH");
        assert_eq!(events[0].total_fee, Some(1), "what WeChat reported");
        assert_eq!(
            e.metric("wxpay_reconciler_amount_mismatch_total{mch_id=\"1900000109\"}"),
            1.0
        );
    })
    .await;
}

#[tokio::test]
async fn forged_and_malformed_replies_change_nothing() {
    for_each_backend(async |_, e| {
        let m = md5_merchant();
        let otn = e.order(&m, 700).await;
        e.pay(&m, &otn, json!({"notify": "drop"})).await;
        for (fault, outcome) in [
            ("bad_sign_rate", "sign_invalid"),
            ("unsigned_rate", "sign_invalid"),
            ("malformed_rate", "malformed"),
            ("mismatch_rate", "mismatch"),
            ("http_500_rate", "http_status"),
        ] {
            e.sim
                .faults(json!({"endpoint": "orderquery", fault: 1.0}))
                .await;
            assert_eq!(e.scan().await.claimed, 1, "{fault}");
            let row = e.row(&otn).await;
            assert_eq!(row.state, OrderState::NotPay, "{fault} must not settle");
            assert!(row.last_error.is_some());
            assert!(e.events(&otn).await.is_empty());
            assert!(
                e.metric(&format!("wxpay_reconciler_orderquery_requests_total{{mch_id=\"10000100\",outcome=\"{outcome}\"}}")) >= 1.0,
                "{fault} counted as {outcome}"
            );
            e.db.make_due(&otn).await;
        }
        // WeChat answers honestly again: the payment is found.
        e.sim.faults(json!({"endpoint": "orderquery"})).await;
        e.scan().await;
        assert_eq!(e.row(&otn).await.state, OrderState::Success);
        assert_eq!(e.events(&otn).await.len(), 1);
    })
    .await;
}

#[tokio::test]
async fn the_merchants_own_handler_racing_the_scanner_records_one_transition() {
    for_each_backend(async |kind, e| {
        let m = md5_merchant();
        e.sim
            .faults(json!({"endpoint": "orderquery", "latency_ms": 150}))
            .await;
        let mut orders = Vec::new();
        for _ in 0..12 {
            let otn = e.order(&m, 50).await;
            e.pay(&m, &otn, json!({"notify": "drop"})).await;
            orders.push(otn);
        }
        // The merchant's notification handler marks orders paid while the scan's queries are in
        // flight, with the guarded UPDATE a well-behaved handler uses.
        let scan = {
            let scanner = e.scanner.clone();
            tokio::spawn(async move { scanner.scan(&CancellationToken::new(), &|| {}).await })
        };
        // Every order is claimed and being queried before the handler starts racing.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while e.sim.sim.state.total_inflight() < orders.len() as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "{kind:?}: queries never started"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut handler_won = 0;
        for (i, otn) in orders.iter().enumerate() {
            tokio::time::sleep(Duration::from_millis(if i % 2 == 0 { 1 } else { 25 })).await;
            handler_won += e
                .db
                .exec("UPDATE wxpay_orders SET state = 'SUCCESS' WHERE out_trade_no = $1 AND state = 'NOTPAY'", &[otn])
                .await;
        }
        let report = scan.await.unwrap().unwrap();
        let mut daemon_won = 0;
        for otn in &orders {
            assert_eq!(e.row(otn).await.state, OrderState::Success, "{kind:?}");
            let events = e.events(otn).await.len();
            assert!(events <= 1, "{kind:?}: {otn} has {events} events");
            daemon_won += events as u64;
        }
        assert_eq!(
            daemon_won + handler_won,
            orders.len() as u64,
            "{kind:?}: exactly one writer per order"
        );
        assert!(
            handler_won > 0,
            "{kind:?}: the race must have been exercised"
        );
        assert_eq!(
            report.noop as u64, handler_won,
            "{kind:?}: each lost race is a counted no-op"
        );
        assert_eq!(
            e.metric("wxpay_reconciler_noop_total{source=\"poll\"}"),
            handler_won as f64
        );
    })
    .await;
}

#[tokio::test]
async fn two_scanners_on_one_database_never_query_the_same_order() {
    // SQLite is single-instance; this is the server databases' promise (FOR UPDATE SKIP LOCKED).
    for db in crate::db::server_backends().await {
        let kind = db.kind;
        let e = Engine::with(db, |s| s.schedule.batch_size = 20).await;
        e.sim
            .faults(json!({"endpoint": "orderquery", "latency_ms": 20}))
            .await;
        let m = hmac_merchant();
        let mut orders = Vec::new();
        for i in 0..120 {
            let otn = e.order(&m, 10).await;
            if i % 2 == 0 {
                e.pay(&m, &otn, json!({"notify": "drop"})).await;
            }
            orders.push(otn);
        }
        let a = e.scanner.clone();
        let b = e.second_scanner();
        let (ra, rb) = tokio::join!(
            async move { a.scan(&CancellationToken::new(), &|| {}).await.unwrap() },
            async move { b.scan(&CancellationToken::new(), &|| {}).await.unwrap() },
        );
        assert_eq!(
            ra.claimed + rb.claimed,
            orders.len(),
            "{kind:?}: every due order claimed once: {ra:?} {rb:?}"
        );
        assert!(
            ra.claimed > 0 && rb.claimed > 0,
            "{kind:?}: both instances worked: {ra:?} {rb:?}"
        );
        for otn in &orders {
            let s = e.sim.sim.state.order_stats(otn);
            assert_eq!((s.queries, s.max_inflight), (1, 1), "{kind:?} {otn}");
        }
        assert_eq!(ra.settled + rb.settled, orders.len() / 2, "{kind:?}");
        e.finish().await;
    }
}

/// The same orders, settled on every backend against one simulator, leave the same rows:
/// amounts, states, transaction ids, payment times and events agree to the microsecond.
#[tokio::test]
async fn every_backend_settles_the_same_orders_into_the_same_rows() {
    let sim = TestSim::start().await;
    let m = md5_merchant();
    // (order number, ordered fee, paid fee or unpaid)
    let cases: Vec<(String, i64, Option<i64>)> = (0..8)
        .map(|i| {
            let otn = unique_otn("same").to_string();
            let fee = 1 + i * 9_999_999_999;
            let paid = match i % 4 {
                0 | 1 => Some(fee),
                2 => Some(fee + 1),
                _ => None,
            };
            (otn, fee, paid)
        })
        .collect();
    for (otn, fee, paid) in &cases {
        sim.create_order(&m, &otn.parse().unwrap(), *fee).await;
        if let Some(p) = paid {
            sim.pay(
                &m,
                &otn.parse().unwrap(),
                json!({"notify": "drop", "total_fee": p}),
            )
            .await;
        }
    }
    let mut seen: Vec<(Kind, Vec<String>)> = Vec::new();
    for db in backends().await {
        let kind = db.kind;
        let cfg = settings(&db.url, &sim.url());
        let scanner =
            daemon::scanner(&cfg, db.store.clone(), Telemetry::new(["10000100"])).unwrap();
        for (otn, fee, _) in &cases {
            db.store
                .insert_order(&NewOrder {
                    mch_id: m.mch_id.as_str(),
                    appid: m.appid.as_str(),
                    out_trade_no: otn,
                    total_fee: *fee,
                })
                .await
                .unwrap();
        }
        scanner
            .scan(&CancellationToken::new(), &|| {})
            .await
            .unwrap();
        let mut rows = Vec::new();
        for (otn, _, _) in &cases {
            let r = db.store.find(otn).await.unwrap().remove(0);
            let events: Vec<String> = db
                .store
                .events(r.id)
                .await
                .unwrap()
                .into_iter()
                .map(|e| {
                    format!(
                        "{}>{} {} {:?} {:?} {:?}",
                        e.from_state, e.to_state, e.source, e.transaction_id, e.total_fee, e.detail
                    )
                })
                .collect();
            rows.push(format!(
                "{} {} {} {:?} {:?} q{} {:?} {:?}",
                r.out_trade_no,
                r.state,
                r.total_fee,
                r.transaction_id,
                r.paid_at.map(|t| t.timestamp_micros()),
                r.query_count,
                r.last_error,
                events
            ));
        }
        seen.push((kind, rows));
        db.cleanup().await;
    }
    let (first_kind, first) = &seen[0];
    assert!(
        first.iter().any(|r| r.contains("AMOUNT_MISMATCH"))
            && first.iter().any(|r| r.contains(" SUCCESS "))
    );
    for (kind, rows) in &seen[1..] {
        for (a, b) in first.iter().zip(rows) {
            assert_eq!(a, b, "{first_kind:?} and {kind:?} disagree");
        }
    }
    sim.stop().await;
}

#[tokio::test]
async fn a_scanner_killed_mid_batch_loses_nothing_its_orders_come_back_after_the_lease() {
    let tweak = |s: &mut Settings| s.schedule.lease_seconds = 2;
    for_each_backend_with(tweak, async |kind, e| {
        let m = md5_merchant();
        let mut orders = Vec::new();
        for _ in 0..6 {
            let otn = e.order(&m, 30).await;
            e.pay(&m, &otn, json!({"notify": "drop"})).await;
            orders.push(otn);
        }
        // The first instance claims, sends its queries, and dies before writing anything.
        e.sim
            .faults(json!({"endpoint": "orderquery", "latency_ms": 1000}))
            .await;
        let doomed = {
            let scanner = e.scanner.clone();
            tokio::spawn(async move { scanner.scan(&CancellationToken::new(), &|| {}).await })
        };
        // Wait until every order's query is in flight (so all are claimed), then kill it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while e.sim.sim.state.total_inflight() < orders.len() as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "{kind:?}: queries never started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        doomed.abort();
        let _ = doomed.await;
        e.sim.faults(json!({"endpoint": "orderquery"})).await;
        for otn in &orders {
            assert_eq!(e.row(otn).await.state, OrderState::NotPay, "{kind:?}");
        }
        let survivor = e.second_scanner();
        let early = survivor
            .scan(&CancellationToken::new(), &|| {})
            .await
            .unwrap();
        assert_eq!(
            early.claimed, 0,
            "{kind:?}: leased orders are not claimed before the lease passes"
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let late = survivor
            .scan(&CancellationToken::new(), &|| {})
            .await
            .unwrap();
        assert_eq!(late.settled, orders.len(), "{kind:?}: {late:?}");
        for otn in &orders {
            assert_eq!(e.events(otn).await.len(), 1, "{kind:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_stale_workers_late_write_is_refused_by_the_lease() {
    use wxpay_reconciler::store::{Applied, Change, ClaimRequest};
    for_each_backend(async |kind, e| {
        let m = md5_merchant();
        let otn = e.order(&m, 30).await;
        let claim = |lease_until| ClaimRequest {
            now: Utc::now(),
            grace: TimeDelta::zero(),
            lease_until,
            limit: 10,
        };
        let stale =
            e.db.store
                .claim_due(&claim(Utc::now() - TimeDelta::seconds(1)))
                .await
                .unwrap()
                .into_iter()
                .filter_map(Claimed::into_order)
                .collect::<Vec<_>>();
        assert_eq!(stale.len(), 1);
        // Its lease is already over: another worker claims the order again.
        let fresh =
            e.db.store
                .claim_due(&claim(Utc::now() + TimeDelta::seconds(60)))
                .await
                .unwrap()
                .into_iter()
                .filter_map(Claimed::into_order)
                .collect::<Vec<_>>();
        assert_eq!(fresh.len(), 1);
        assert!(fresh[0].lease > stale[0].lease);
        let change = Change::Reschedule {
            at: Utc::now(),
            note: Some("stale".into()),
        };
        let applied =
            e.db.store
                .apply(&stale[0].row, stale[0].guard(), &change, Utc::now())
                .await
                .unwrap();
        assert_eq!(
            applied,
            Applied::NoOp,
            "{kind:?}: the stale lease must not write"
        );
        let applied =
            e.db.store
                .apply(&fresh[0].row, fresh[0].guard(), &change, Utc::now())
                .await
                .unwrap();
        assert_eq!(applied, Applied::Done, "{kind:?}");
        let _ = otn;
    })
    .await;
}

/// One batch of writes (as the scan's writer commits them) where some guards hold and some do
/// not: each write gets its own result, and only the held ones change rows and record events.
#[tokio::test]
async fn a_batch_of_writes_keeps_each_writes_own_guard_and_result() {
    use wxpay_reconciler::domain::{Fen, Source, TransactionId};
    use wxpay_reconciler::reconcile::policy::Settlement;
    use wxpay_reconciler::store::{Applied, Change, ClaimRequest, Write};
    for_each_backend(async |kind, e| {
        let m = md5_merchant();
        let mut otns = Vec::new();
        for _ in 0..6 {
            otns.push(e.order(&m, 500).await);
        }
        let claimed =
            e.db.store
                .claim_due(&ClaimRequest {
                    now: Utc::now(),
                    grace: TimeDelta::zero(),
                    lease_until: Utc::now() + TimeDelta::seconds(60),
                    limit: 10,
                })
                .await
                .unwrap()
                .into_iter()
                .filter_map(Claimed::into_order)
                .collect::<Vec<_>>();
        assert_eq!(claimed.len(), 6);
        let by_otn = |otn: &str| {
            claimed
                .iter()
                .find(|c| c.row.out_trade_no.as_str() == otn)
                .unwrap()
        };
        let paid = |n: u64| Change::Settle {
            settlement: Settlement {
                to: OrderState::Success,
                transaction_id: Some(
                    TransactionId::parse(&format!("42000000000000000000000000{n:02}")).unwrap(),
                ),
                paid_at: Some(Utc::now()),
                reported_fee: Some(Fen::new(500).unwrap()),
                detail: None,
            },
            source: Source::Poll,
        };
        let later = Change::Reschedule {
            at: Utc::now() + TimeDelta::minutes(5),
            note: Some("NOTPAY".into()),
        };
        // Orders 1 and 4 lose their guard: the merchant's handler settles 1, a second claim
        // takes 4 over (its lease moves on).
        assert_eq!(
            e.db.exec(
                "UPDATE wxpay_orders SET state = 'SUCCESS' WHERE out_trade_no = $1",
                &[&otns[1]]
            )
            .await,
            1
        );
        let mut stale4 = by_otn(&otns[4]).guard();
        stale4.lease = stale4.lease.map(|l| l - 1);
        let changes = [
            paid(0),
            paid(1),
            paid(2),
            later.clone(),
            later.clone(),
            later,
        ];
        let guards = [
            by_otn(&otns[0]).guard(),
            by_otn(&otns[1]).guard(),
            by_otn(&otns[2]).guard(),
            by_otn(&otns[3]).guard(),
            stale4,
            by_otn(&otns[5]).guard(),
        ];
        let writes: Vec<Write<'_>> = (0..6)
            .map(|i| Write {
                order: &by_otn(&otns[i]).row,
                guard: guards[i],
                change: &changes[i],
            })
            .collect();
        let applied = e.db.store.apply_many(&writes, Utc::now()).await.unwrap();
        use Applied::{Done, NoOp};
        assert_eq!(applied, [Done, NoOp, Done, Done, NoOp, Done], "{kind:?}");
        for (i, state) in [
            (0, "SUCCESS"),
            (1, "SUCCESS"),
            (2, "SUCCESS"),
            (3, "NOTPAY"),
        ] {
            assert_eq!(e.row(&otns[i]).await.state.as_str(), state, "{kind:?} {i}");
        }
        assert_eq!(e.events(&otns[0]).await.len(), 1);
        assert!(
            e.events(&otns[1]).await.is_empty(),
            "{kind:?}: the handler's win records nothing"
        );
        assert_eq!(e.row(&otns[3]).await.query_count, 1);
        assert_eq!(
            e.row(&otns[4]).await.query_count,
            0,
            "{kind:?}: stale lease"
        );
        // The same order twice in one batch: the first write wins, the second finds it moved.
        let otn = e.order(&m, 500).await;
        let c =
            e.db.store
                .claim_due(&ClaimRequest {
                    now: Utc::now(),
                    grace: TimeDelta::zero(),
                    lease_until: Utc::now() + TimeDelta::seconds(60),
                    limit: 10,
                })
                .await
                .unwrap()
                .into_iter()
                .filter_map(Claimed::into_order)
                .collect::<Vec<_>>()
                .into_iter()
                .find(|c| c.row.out_trade_no.as_str() == otn)
                .unwrap();
        let twice = [paid(7), paid(8)];
        let writes: Vec<Write<'_>> = twice
            .iter()
            .map(|change| Write {
                order: &c.row,
                guard: c.guard(),
                change,
            })
            .collect();
        let applied = e.db.store.apply_many(&writes, Utc::now()).await.unwrap();
        assert_eq!(applied, [Done, NoOp], "{kind:?}");
        let events = e.events(&otn).await;
        assert_eq!(events.len(), 1);
        assert_eq!(
            events[0].transaction_id.as_deref(),
            Some("4200000000000000000000000007")
        );
    })
    .await;
}

#[tokio::test]
async fn queries_respect_the_concurrency_bound() {
    let tweak = |s: &mut Settings| s.wechat.concurrency = 3;
    for_each_backend_with(tweak, async |_, e| {
        e.sim
            .faults(json!({"endpoint": "orderquery", "latency_ms": 100}))
            .await;
        let m = md5_merchant();
        for _ in 0..12 {
            e.order(&m, 1).await;
        }
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let watcher = {
            let state = e.sim.sim.state.clone();
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    let inflight: u64 = state.total_inflight();
                    peak.fetch_max(inflight, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let report = e.scan().await;
        watcher.abort();
        assert_eq!(report.claimed, 12);
        let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
        assert!((2..=3).contains(&peak), "in flight at once: {peak}");
    })
    .await;
}

#[tokio::test]
async fn order_not_exist_is_closed_locally_after_expiry() {
    for_each_backend(async |kind, e| {
        let m = md5_merchant();
        // An order WeChat never accepted (unifiedorder failed), expiring now.
        let otn = unique_otn("gone").to_string();
        e.db.store
            .insert_order(&NewOrder {
                mch_id: m.mch_id.as_str(),
                appid: m.appid.as_str(),
                out_trade_no: &otn,
                total_fee: 5,
            })
            .await
            .unwrap();
        e.scan().await;
        assert_eq!(
            e.row(&otn).await.state,
            OrderState::NotPay,
            "{kind:?}: not before expiry"
        );
        let past = match kind {
            Kind::Sqlite => {
                "UPDATE wxpay_orders SET expires_at = datetime('now', '-1 minute') WHERE out_trade_no = $1"
            }
            Kind::Postgres => {
                "UPDATE wxpay_orders SET expires_at = now() - interval '1 minute' WHERE out_trade_no = $1"
            }
            Kind::Mysql => {
                "UPDATE wxpay_orders SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 MINUTE WHERE out_trade_no = $1"
            }
        };
        e.db.exec(past, &[&otn]).await;
        e.db.make_due(&otn).await;
        e.scan().await;
        let row = e.row(&otn).await;
        assert_eq!(row.state, OrderState::Closed, "{kind:?}");
        let events = e.events(&otn).await;
        assert_eq!(events.len(), 1);
        assert!(
            events[0]
                .detail
                .as_deref()
                .unwrap_or_default()
                .contains("ORDERNOTEXIST")
        );
    })
    .await;
}

#[tokio::test]
async fn timestamps_are_utc_whatever_the_merchants_session_time_zone() {
    for db in backends().await {
        let kind = db.kind;
        let otn = unique_otn("tz").to_string();
        // The merchant's application inserts from a session in China Standard Time.
        let zone = match kind {
            Kind::Sqlite => "",
            Kind::Postgres => "SET TIME ZONE 'Asia/Shanghai';",
            Kind::Mysql => "SET time_zone = '+08:00';",
        };
        db.exec_script(&format!(
            "{zone} INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) \
             VALUES ('10000100', 'wxd930ea5d5a258f4f', '{otn}', 9007199254740993)"
        ))
        .await;
        let row = db.store.find(&otn).await.unwrap().remove(0);
        let skew = (Utc::now() - row.created_at).num_seconds().abs();
        assert!(
            skew < 60,
            "{kind:?}: created_at {} is {skew}s away from now (UTC)",
            row.created_at
        );
        assert_eq!(
            row.total_fee.get(),
            9_007_199_254_740_993,
            "{kind:?}: amounts are exact integers"
        );
        db.cleanup().await;
    }
}

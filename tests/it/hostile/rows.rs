//! Values the merchant's application may legally write into `wxpay_orders` never stop the
//! daemon: each is either used, or sets that one order aside while its batch-mates settle.
//! "Written before migration 0003" rows are made by switching its triggers off for the insert,
//! as a table filled by an older release would hold them.

use chrono::{TimeZone, Utc};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use serde_json::json;
use wxpay_reconciler::commands;
use wxpay_reconciler::domain::OrderState;
use wxpay_reconciler::store::Attention;

use crate::db::{Kind, TestDb, backends};
use crate::engine::Engine;
use crate::frame::for_each_backend;
use crate::helpers::{md5_merchant, unique_otn};

const MCH: &str = "10000100";
const APPID: &str = "wxd930ea5d5a258f4f";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The order is queried and settles as paid.
    Used,
    /// The order is set aside, never queried, its state untouched.
    SetAside,
}

/// One row the application writes: which column holds what, and whether it is written as an
/// older schema (without migration 0003's checks) would have let it in.
struct Case {
    label: &'static str,
    column: &'static str,
    value: String,
    legacy: bool,
    expect: Expect,
}

fn case(
    label: &'static str,
    column: &'static str,
    value: &str,
    legacy: bool,
    expect: Expect,
) -> Case {
    Case {
        label,
        column,
        value: value.to_owned(),
        legacy,
        expect,
    }
}

fn cases(kind: Kind) -> Vec<Case> {
    use Expect::*;
    let mut c = vec![
        case("plain", "total_fee", "100", false, Used),
        case(
            "other appid",
            "appid",
            "wxotherapp0000000001",
            false,
            SetAside,
        ),
    ];
    match kind {
        Kind::Sqlite => c.extend([
            // What Python's sqlite3 writes for an aware datetime: stored as UTC by 0003.
            case(
                "offset",
                "expires_at",
                "2099-12-01 10:30:00+08:00",
                false,
                Used,
            ),
            case("Z", "expires_at", "2099-12-01 10:30:00Z", false, Used),
            case(
                "legacy offset",
                "expires_at",
                "2099-12-01 10:30:00+08:00",
                true,
                Used,
            ),
            case(
                "legacy Z created",
                "created_at",
                "2026-01-01 10:30:00.123456Z",
                true,
                Used,
            ),
            case(
                "legacy Feb 31",
                "expires_at",
                "2099-02-31 00:00:00",
                true,
                SetAside,
            ),
            case(
                "legacy 24h",
                "expires_at",
                "2099-12-01 24:00:00",
                true,
                SetAside,
            ),
            case(
                "legacy garbage",
                "expires_at",
                "2099-12-01 10:30:00 tomorrow",
                true,
                SetAside,
            ),
            case(
                "legacy garbage created",
                "created_at",
                "2026-01-01 10:30:00 ??",
                true,
                SetAside,
            ),
        ]),
        Kind::Postgres => c.extend([
            // PostgreSQL's ordinary "never": no expiry.
            case("infinity", "expires_at", "infinity", false, Used),
            case(
                "offset",
                "expires_at",
                "2099-12-01 10:30:00+08:00",
                false,
                Used,
            ),
            case(
                "legacy -infinity",
                "expires_at",
                "-infinity",
                true,
                SetAside,
            ),
            case(
                "legacy far future",
                "expires_at",
                "290000-01-01 00:00:00+00",
                true,
                SetAside,
            ),
            case(
                "legacy -infinity created",
                "created_at",
                "-infinity",
                true,
                SetAside,
            ),
            case(
                "legacy infinite paid_at",
                "paid_at",
                "infinity",
                true,
                SetAside,
            ),
        ]),
        Kind::Mysql => c.extend([
            // MySQL's own "no date": read as no expires_at (the default expiry applies).
            case(
                "legacy zero date",
                "expires_at",
                "0000-00-00 00:00:00",
                true,
                Used,
            ),
            case(
                "legacy zero month",
                "expires_at",
                "2099-00-10 00:00:00",
                true,
                SetAside,
            ),
            case(
                "legacy zero created",
                "created_at",
                "0000-00-00 00:00:00",
                true,
                SetAside,
            ),
        ]),
    }
    c
}

/// Inserts a row the way the application does, with one column of `case` set literally.
async fn write(db: &TestDb, otn: &str, c: &Case) {
    let value = if c.column == "total_fee" {
        c.value.clone()
    } else {
        format!("'{}'", c.value)
    };
    let (appid, extra_col, extra_val) = match c.column {
        "appid" => (value.clone(), String::new(), String::new()),
        "total_fee" => (format!("'{APPID}'"), String::new(), String::new()),
        column => (
            format!("'{APPID}'"),
            format!(", {column}"),
            format!(", {value}"),
        ),
    };
    let insert = format!(
        "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee{extra_col}) \
         VALUES ('{MCH}', {appid}, '{otn}', 100{extra_val})"
    );
    if !c.legacy {
        db.exec(&insert, &[]).await;
        return;
    }
    // Without the checks of migration 0003, as an older schema would have taken the row.
    let script = match db.kind {
        Kind::Sqlite => format!(
            "DROP TRIGGER IF EXISTS wxpay_orders_times_valid_insert; \
             DROP TRIGGER IF EXISTS wxpay_orders_times_utc_insert; {insert}"
        ),
        Kind::Postgres => format!(
            "ALTER TABLE wxpay_orders DISABLE TRIGGER wxpay_orders_times_valid; {insert}; \
             ALTER TABLE wxpay_orders ENABLE TRIGGER wxpay_orders_times_valid"
        ),
        Kind::Mysql => format!(
            "DROP TRIGGER IF EXISTS wxpay_orders_times_valid_insert; SET SESSION sql_mode = ''; {insert}"
        ),
    };
    db.exec_script(&script).await;
}

#[tokio::test]
async fn one_bad_row_is_that_rows_problem() {
    for_each_backend(async |kind, e| {
        let m = md5_merchant();
        let mut written = Vec::new();
        for c in cases(kind) {
            let otn = unique_otn("h").to_string();
            write(&e.db, &otn, &c).await;
            // Paid at WeChat with the notification lost: only a query can settle it.
            e.sim.create_order(&m, &otn.parse().unwrap(), 100).await;
            e.pay(&m, &otn, json!({"notify": "drop"})).await;
            written.push((otn, c));
        }
        // An order number WeChat would never accept, in the same batch.
        let bad_otn = format!("bad no {}!", written.len());
        e.db.exec(
            &format!(
                "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee) \
                 VALUES ('{MCH}', '{APPID}', '{bad_otn}', 100)"
            ),
            &[],
        )
        .await;

        let report = e.scan().await;
        let set_aside_expected = written
            .iter()
            .filter(|(_, c)| c.expect == Expect::SetAside)
            .count()
            + 1;
        assert_eq!(report.claimed, written.len() + 1, "{kind:?} {report:?}");
        let aside = e.db.store.set_aside_orders(100).await.unwrap();
        assert_eq!(
            report.set_aside, set_aside_expected,
            "{kind:?} {report:?} {aside:#?}"
        );

        for (otn, c) in &written {
            match c.expect {
                Expect::Used => {
                    let row = e.row(otn).await;
                    assert_eq!(row.state, OrderState::Success, "{kind:?} {}", c.label);
                    assert!(row.set_aside_at.is_none(), "{kind:?} {}", c.label);
                }
                Expect::SetAside => {
                    let a = aside
                        .iter()
                        .find(|a| &a.out_trade_no == otn)
                        .unwrap_or_else(|| panic!("{kind:?} {} not set aside: {aside:?}", c.label));
                    assert_eq!(a.state, "NOTPAY", "{kind:?} {}", c.label);
                    assert!(
                        a.reason
                            .as_deref()
                            .is_some_and(|r| !r.is_empty() && r.len() < 2000),
                        "{kind:?} {}: {:?}",
                        c.label,
                        a.reason
                    );
                    assert_eq!(e.queries(otn), 0, "{kind:?} {}: queried", c.label);
                }
            }
        }
        let bad = aside
            .iter()
            .find(|a| a.out_trade_no == bad_otn)
            .expect("bad out_trade_no");
        assert!(
            bad.reason.as_deref().unwrap().contains("out_trade_no"),
            "{bad:?}"
        );
        let other = written
            .iter()
            .find(|(_, c)| c.label == "other appid")
            .unwrap();
        let other = aside.iter().find(|a| a.out_trade_no == other.0).unwrap();
        assert!(
            other.reason.as_deref().unwrap().contains("appid"),
            "{other:?}"
        );

        // Nothing set aside comes back; nothing else is left to do.
        let again = e.scan().await;
        assert_eq!(again.claimed, 0, "{kind:?} {again:?}");
        assert_eq!(
            e.db.store.attention().await.unwrap(),
            vec![Attention {
                mch_id: MCH.into(),
                amount_mismatch: 0,
                set_aside: set_aside_expected as i64,
            }],
            "{kind:?}"
        );
        // `status` reads the table as it is, and says what is set aside and why.
        let text = commands::status(&e.settings, false, 50).await.unwrap();
        assert!(text.contains("SET ASIDE"), "{kind:?}\n{text}");
        assert!(text.contains(&bad_otn), "{kind:?}\n{text}");
        let as_json = commands::status(&e.settings, true, 50).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&as_json).unwrap();
        assert_eq!(
            v["set_aside"].as_array().unwrap().len(),
            set_aside_expected,
            "{kind:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn times_the_application_writes_are_read_as_the_instants_they_name() {
    for db in backends().await {
        let kind = db.kind;
        if kind == Kind::Mysql {
            // DATETIME holds no offset: nothing to interpret.
            db.cleanup().await;
            continue;
        }
        let otn = unique_otn("tz").to_string();
        write(
            &db,
            &otn,
            &case(
                "offset",
                "expires_at",
                "2099-12-01 10:30:00+08:00",
                false,
                Expect::Used,
            ),
        )
        .await;
        let legacy = unique_otn("tz").to_string();
        if kind == Kind::Sqlite {
            write(
                &db,
                &legacy,
                &case(
                    "legacy",
                    "expires_at",
                    "2099-12-01 10:30:00.5-01:30",
                    true,
                    Expect::Used,
                ),
            )
            .await;
        }
        let expected = Utc.with_ymd_and_hms(2099, 12, 1, 2, 30, 0).unwrap();
        let row = db.store.find(&otn).await.unwrap().remove(0);
        assert_eq!(row.expires_at, Some(expected), "{kind:?}");
        if kind == Kind::Sqlite {
            let row = db.store.find(&legacy).await.unwrap().remove(0);
            let expected = Utc.with_ymd_and_hms(2099, 12, 1, 12, 0, 0).unwrap()
                + chrono::TimeDelta::milliseconds(500);
            assert_eq!(row.expires_at, Some(expected), "{kind:?}");
        }
        if kind == Kind::Postgres {
            let never = unique_otn("inf").to_string();
            write(
                &db,
                &never,
                &case("inf", "expires_at", "infinity", false, Expect::Used),
            )
            .await;
            let row = db.store.find(&never).await.unwrap().remove(0);
            assert_eq!(row.expires_at, None, "infinity is no expiry");
        }
        db.cleanup().await;
    }
}

#[tokio::test]
async fn the_schema_refuses_from_now_on_what_cannot_be_meant() {
    for db in backends().await {
        let kind = db.kind;
        let refused: &[(&str, &str)] = match kind {
            Kind::Sqlite => &[
                ("expires_at", "'2026-12-01 10:30:00 tomorrow'"),
                ("expires_at", "'2026-02-31 00:00:00'"),
                ("created_at", "'2026-12-01 24:00:00'"),
                ("fee_type", "'usd'"),
            ],
            Kind::Postgres => &[
                ("expires_at", "'-infinity'"),
                ("expires_at", "'290000-01-01 00:00:00+00'"),
                ("created_at", "'infinity'"),
                ("fee_type", "'usd'"),
            ],
            Kind::Mysql => &[
                ("expires_at", "'0000-00-00 00:00:00'"),
                ("created_at", "'2026-00-10 00:00:00'"),
                ("fee_type", "'usd'"),
            ],
        };
        for (column, value) in refused {
            let otn = unique_otn("r");
            let sql = format!(
                "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee, {column}) \
                 VALUES ('{MCH}', '{APPID}', '{otn}', 100, {value})"
            );
            assert!(
                db.try_exec(&sql, &[]).await.is_err(),
                "{kind:?}: {column} = {value} was accepted"
            );
        }
        // The application's ordinary INSERT still works, and an explicit currency too.
        let otn = unique_otn("r");
        db.exec(
            &format!(
                "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee, fee_type) \
                 VALUES ('{MCH}', '{APPID}', '{otn}', 100, 'USD')"
            ),
            &[],
        )
        .await;
        assert_eq!(
            db.store.find(otn.as_ref()).await.unwrap()[0]
                .fee_type
                .as_str(),
            "USD"
        );
        db.cleanup().await;
    }
}

/// Generated values: whatever the old SQLite CHECK let into a timestamp column, and any short
/// text as an out_trade_no or appid, each in its own order of one batch. Every row is used or
/// set aside on its own; none stops the scan, none is left claimed but untouched.
#[tokio::test]
async fn generated_rows_are_used_or_set_aside_one_by_one() {
    let mut runner = TestRunner::deterministic();
    let timestamp = "[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}[ .0-9zZ:+\\-a-z]{0,10}";
    let text = "[ -~\u{80}-\u{10ffff}]{1,32}";
    let mut values = Vec::new();
    for _ in 0..24 {
        let column = ["expires_at", "created_at", "out_trade_no", "appid"][values.len() % 4];
        let pattern = if column.ends_with("_at") {
            timestamp
        } else {
            text
        };
        let v = pattern.new_tree(&mut runner).unwrap().current();
        // Quotes doubled for the SQL literal; no backslash (an escape on MySQL) and no `$`
        // (the test's placeholder rewriting).
        let v = v.replace('\\', "/").replace('$', "S");
        values.push((column, v.replace('\'', "''")));
    }
    for_each_backend(async |kind, e| {
        let mut otns = Vec::new();
        for (column, value) in &values {
            let otn = unique_otn("g").to_string();
            let (otn_sql, appid_sql, col, val) = match *column {
                "out_trade_no" => (
                    value.clone(),
                    APPID.to_owned(),
                    String::new(),
                    String::new(),
                ),
                "appid" => (otn.clone(), value.clone(), String::new(), String::new()),
                c => (
                    otn.clone(),
                    APPID.to_owned(),
                    format!(", {c}"),
                    format!(", '{value}'"),
                ),
            };
            let insert = format!(
                "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee{col}) \
                 VALUES ('{MCH}', '{appid_sql}', '{otn_sql}', 100{val})"
            );
            // The schema decides what gets in (on PostgreSQL and MySQL the value must also be
            // a time of the column's type); what it refuses is not the daemon's to read.
            if e.db.try_exec(&insert, &[]).await.is_ok() {
                otns.push(otn_sql.replace("''", "'"));
            }
        }
        let report = e.scan().await;
        assert_eq!(
            report.claimed,
            report.settled + report.rescheduled + report.set_aside + report.noop,
            "{kind:?} {report:?}"
        );
        assert_eq!(report.abandoned, 0, "{kind:?} {report:?}");
        // Every row is now either set aside or was worked on (queried, rescheduled, closed).
        let aside = e.db.store.set_aside_orders(1000).await.unwrap();
        for otn in &otns {
            let set_aside = aside.iter().any(|a| &a.out_trade_no == otn);
            if !set_aside {
                let rows = e.db.store.find(otn).await.unwrap();
                assert_eq!(rows.len(), 1, "{kind:?} {otn:?}");
                let r = &rows[0];
                // Used: asked about (or closed), or simply not due yet (created in the future).
                assert!(
                    r.query_count > 0 || !r.state.is_open() || r.created_at > Utc::now(),
                    "{kind:?} {otn:?} neither used nor set aside: {r:?}"
                );
            }
        }
        // The daemon's own reads of the table still work.
        commands::status(&e.settings, true, 100).await.unwrap();
    })
    .await;
}

/// The gauges of orders needing a person come from the database: they hold while the orders
/// stay as they are (and survive a restart), unlike a counter's increase.
#[tokio::test]
async fn quarantined_and_set_aside_orders_are_gauged_from_the_table() {
    for db in backends().await {
        let kind = db.kind;
        let e = Engine::new(db).await;
        let quarantined = unique_otn("q").to_string();
        write(
            &e.db,
            &quarantined,
            &case("q", "total_fee", "100", false, Expect::Used),
        )
        .await;
        e.db.exec(
            "UPDATE wxpay_orders SET state = 'AMOUNT_MISMATCH' WHERE out_trade_no = $1",
            &[&quarantined],
        )
        .await;
        let aside = unique_otn("a").to_string();
        write(
            &e.db,
            &aside,
            &case(
                "a",
                "appid",
                "wxotherapp0000000001",
                false,
                Expect::SetAside,
            ),
        )
        .await;
        e.scan().await;
        let stop = tokio_util::sync::CancellationToken::new();
        let daemon = wxpay_reconciler::daemon::Daemon::start(&e.settings, stop.clone())
            .await
            .unwrap();
        let url = format!("http://{}/metrics", daemon.metrics_addr);
        let running = tokio::spawn(daemon.wait());
        let client = reqwest::Client::new();
        let want = [
            format!("wxpay_reconciler_amount_mismatch_orders{{mch_id=\"{MCH}\"}} 1"),
            format!("wxpay_reconciler_set_aside_orders{{mch_id=\"{MCH}\"}} 1"),
        ];
        let mut text = String::new();
        for _ in 0..50 {
            text = client.get(&url).send().await.unwrap().text().await.unwrap();
            if want.iter().all(|w| text.lines().any(|l| l == w)) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        for w in &want {
            assert!(
                text.lines().any(|l| l == w),
                "{kind:?}: no `{w}` in\n{text}"
            );
        }
        stop.cancel();
        running.await.unwrap().unwrap();
        e.finish().await;
    }
}

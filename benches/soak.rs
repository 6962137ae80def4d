//! Soak: several daemons, a merchant handler racing them, random SIGKILLs and database restarts;
//! scored like Jepsen's queue checker (lost, duplicated, unexpected). Not part of the test run.
//!
//! ```sh
//! cargo bench --bench soak -- postgres postgres://postgres@127.0.0.1:5432/test
//! cargo bench --bench soak -- mysql mysql://root@127.0.0.1:3306/test
//! cargo bench --bench soak -- postgres URL orders=2000 kills=20 restarts=1   # a short run
//! ```
//!
//! Scenario (defaults): 3 instances of the release binary; 10,000 orders, of which a third are
//! paid at WeChat before the run and half of those are also settled by a racing "merchant
//! handler" writing the table directly (its guarded UPDATE); a random instance SIGKILLed and
//! restarted every 1–3 s, 200 times; the database server restarted 5 times. Then the survivors
//! run until every paid order is settled (or a deadline), and the checker scores:
//! - lost: paid at WeChat, not SUCCESS at the end;
//! - duplicated: more than one writer for an order (an event and a handler win, or two events);
//! - unexpected: any other outcome (SUCCESS for an unpaid order, an event to another state, a
//!   paid order queried by two instances at once).

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Executor};
use wxpay_reconciler::sim::{self, RunningSimulator};
use wxpay_reconciler::store::{ConnectOptions, DatabaseUrl, NewOrder, Store};

const MCH: &str = "10000100";
const APPID: &str = "wxd930ea5d5a258f4f";
const KEY: &str = "192006250b4c09247ec02edce69f6a2d";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Server {
    Postgres,
    Mysql,
}

struct Args {
    server: Server,
    base: String,
    orders: u64,
    kills: u32,
    restarts: u32,
    instances: usize,
}

fn args() -> Args {
    let all: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let server = match all.first().map(String::as_str) {
        Some("mysql") => Server::Mysql,
        _ => Server::Postgres,
    };
    let base = all.get(1).cloned().unwrap_or_else(|| match server {
        Server::Postgres => "postgres://postgres@127.0.0.1:5432/test".into(),
        Server::Mysql => "mysql://root@127.0.0.1:3306/test".into(),
    });
    let opt = |name: &str, default: u64| {
        all.iter()
            .find_map(|a| {
                a.strip_prefix(&format!("{name}="))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(default)
    };
    Args {
        server,
        base,
        orders: opt("orders", 10_000),
        kills: opt("kills", 200) as u32,
        restarts: opt("restarts", 5) as u32,
        instances: opt("instances", 3) as usize,
    }
}

/// A fresh schema (PostgreSQL) or database (MySQL) on the server; returns its URL.
async fn fresh(server: Server, base: &str) -> String {
    let name = format!("wxsoak_{}", std::process::id());
    match server {
        Server::Postgres => {
            let admin = sqlx::PgPool::connect(base).await.unwrap();
            admin
                .execute(AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {name} CASCADE"
                )))
                .await
                .unwrap();
            admin
                .execute(AssertSqlSafe(format!("CREATE SCHEMA {name}")))
                .await
                .unwrap();
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}options[search_path]={name}")
        }
        Server::Mysql => {
            let admin = sqlx::MySqlPool::connect(base).await.unwrap();
            admin
                .execute(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
                .await
                .unwrap();
            admin
                .execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .await
                .unwrap();
            let server_part = &base[..base.rfind('/').unwrap()];
            format!("{server_part}/{name}")
        }
    }
}

/// Restarts the database server (this machine's services, started as in `.ci/run`).
fn restart_database(server: Server) {
    let script = match server {
        Server::Postgres => {
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -n1) main restart -m fast"
        }
        Server::Mysql => {
            "pkill -x mariadbd; while pgrep -x mariadbd >/dev/null; do sleep 0.1; done; \
             start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd; \
             for i in $(seq 1 100); do mariadb-admin -h 127.0.0.1 -uroot ping >/dev/null 2>&1 && break; sleep 0.1; done"
        }
    };
    let status = Command::new("bash").args(["-c", script]).status().unwrap();
    assert!(status.success(), "database restart failed");
}

fn start_daemon(bin: &str, config: &std::path::Path) -> Child {
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("run")
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap()
}

/// The merchant's own handler: a guarded UPDATE, as README asks of it.
async fn handler_settle(url: &str, server: Server, otn: &str) -> bool {
    let sql = match server {
        Server::Postgres => {
            "UPDATE wxpay_orders SET state = 'SUCCESS' WHERE out_trade_no = $1 AND state IN ('NOTPAY', 'USERPAYING')"
        }
        Server::Mysql => {
            "UPDATE wxpay_orders SET state = 'SUCCESS' WHERE out_trade_no = ? AND state IN ('NOTPAY', 'USERPAYING')"
        }
    };
    // A database restart makes some attempts fail; the handler (like WeChat's retries) tries again.
    for _ in 0..50 {
        let done = match server {
            Server::Postgres => match sqlx::PgPool::connect(url).await {
                Ok(p) => sqlx::query(sql)
                    .bind(otn)
                    .execute(&p)
                    .await
                    .map(|r| r.rows_affected()),
                Err(e) => Err(e),
            },
            Server::Mysql => match sqlx::MySqlPool::connect(url).await {
                Ok(p) => sqlx::query(sql)
                    .bind(otn)
                    .execute(&p)
                    .await
                    .map(|r| r.rows_affected()),
                Err(e) => Err(e),
            },
        };
        match done {
            Ok(n) => return n == 1,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    panic!("the merchant handler could not reach the database");
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    let started = Instant::now();
    let bin = env!("CARGO_BIN_EXE_wxpay-reconciler");
    let url = fresh(a.server, &a.base).await;
    let store = Store::connect(&ConnectOptions {
        url: DatabaseUrl::new(&url),
        max_connections: 4,
        create_if_missing: false,
        acquire_timeout: Duration::from_secs(30),
    })
    .await
    .unwrap();
    store.migrate().await.unwrap();

    let sim = RunningSimulator::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        sim::default_merchants(),
    )
    .unwrap();
    sim.state.set_faults_all(sim::Faults {
        latency_ms: 5,
        ..sim::Faults::default()
    });

    // The orders; a third paid at WeChat, half of those also for the merchant's handler.
    let mut paid: HashSet<String> = HashSet::new();
    let mut for_handler: Vec<String> = Vec::new();
    for i in 0..a.orders {
        let otn = format!("soak{i:06}");
        store
            .insert_order(&NewOrder {
                mch_id: MCH,
                appid: APPID,
                out_trade_no: &otn,
                total_fee: 100,
            })
            .await
            .unwrap();
        sim.state.create_order(MCH, &otn, 100, None, None).unwrap();
        if i % 3 == 0 {
            sim.state.pay(MCH, &otn, None, false).unwrap();
            paid.insert(otn.clone());
            if i % 6 == 0 {
                for_handler.push(otn);
            }
        }
    }
    println!(
        "{:?}: {} orders, {} paid, {} also for the merchant handler",
        a.server,
        a.orders,
        paid.len(),
        for_handler.len()
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), KEY).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\nmax_connections = 4\n\
             [wechat]\nbase_url = \"{}\"\ntimeout_ms = 1000\nconnect_timeout_ms = 500\nmax_qps = 2000\nconcurrency = 16\n\
             [[merchants]]\nmch_id = \"{MCH}\"\nappid = \"{APPID}\"\napi_key_file = \"key\"\n\
             [schedule]\nscan_cron = \"* * * * * *\"\ngrace_seconds = 0\nbatch_size = 50\nlease_seconds = 7\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n",
            sim.base_url()
        ),
    )
    .unwrap();

    // The merchant handler races the daemons over the first part of the run.
    let handler = {
        let url = url.clone();
        let server = a.server;
        tokio::spawn(async move {
            let mut won = HashSet::new();
            for otn in for_handler {
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..20))).await;
                if handler_settle(&url, server, &otn).await {
                    won.insert(otn);
                }
            }
            won
        })
    };

    let mut daemons: Vec<Child> = (0..a.instances)
        .map(|_| start_daemon(bin, &config))
        .collect();
    let restart_every = if a.restarts > 0 {
        (a.kills / (a.restarts + 1)).max(1)
    } else {
        u32::MAX
    };
    let mut restarts = 0;
    for kill in 1..=a.kills {
        tokio::time::sleep(Duration::from_millis(rand::random_range(1000..3000))).await;
        let i = rand::random_range(0..daemons.len());
        let _ = daemons[i].kill();
        let _ = daemons[i].wait();
        daemons[i] = start_daemon(bin, &config);
        if kill % restart_every == 0 && restarts < a.restarts {
            restart_database(a.server);
            restarts += 1;
        }
        if kill % 20 == 0 {
            println!(
                "  {kill} kills, {restarts} database restarts, {:.0}s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let handler_won = handler.await.unwrap();

    // Let the survivors finish: every paid order settled, or a deadline.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let counts = store.count_by_state().await.unwrap();
        let success: i64 = counts
            .iter()
            .filter(|(s, _)| s.as_str() == "SUCCESS")
            .map(|(_, n)| n)
            .sum();
        if success as usize >= paid.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for d in &mut daemons {
        let _ = Command::new("kill")
            .args(["-TERM", &d.id().to_string()])
            .status();
        let _ = d.wait();
    }

    // The checker.
    let mut events_per_order: HashMap<String, Vec<String>> = HashMap::new();
    let mut after = 0;
    loop {
        let batch = store.events_after(after, 10_000).await.unwrap();
        let Some(last) = batch.last() else { break };
        after = last.id;
        for e in batch {
            events_per_order
                .entry(e.out_trade_no)
                .or_default()
                .push(e.to_state.to_string());
        }
    }
    let (mut lost, mut duplicated, mut unexpected) = (0, 0, 0);
    for i in 0..a.orders {
        let otn = format!("soak{i:06}");
        let row = store.find(&otn).await.unwrap().remove(0);
        let events = events_per_order.get(&otn).cloned().unwrap_or_default();
        let writers = events.len() + usize::from(handler_won.contains(&otn));
        let stats = sim.state.order_stats(&otn);
        if paid.contains(&otn) {
            if row.state.as_str() != "SUCCESS" {
                lost += 1;
            }
            if writers > 1 {
                duplicated += 1;
            }
            if events.iter().any(|s| s != "SUCCESS") || stats.max_inflight > 1 {
                unexpected += 1;
            }
        } else if row.state.as_str() != "NOTPAY" || !events.is_empty() || stats.max_inflight > 1 {
            unexpected += 1;
        }
    }
    println!(
        "{:?}: {} orders, {} paid ({} settled by the handler), {} instances, {} kills, {} database restarts, {:.0}s: \
         lost {lost}, duplicated {duplicated}, unexpected {unexpected}",
        a.server,
        a.orders,
        paid.len(),
        handler_won.len(),
        a.instances,
        a.kills,
        restarts,
        started.elapsed().as_secs_f64()
    );
    sim.shutdown(Duration::from_secs(1)).await.unwrap();
    drop(store);
    let name = format!("wxsoak_{}", std::process::id());
    match a.server {
        Server::Postgres => {
            let admin = sqlx::PgPool::connect(&a.base).await.unwrap();
            admin
                .execute(AssertSqlSafe(format!("DROP SCHEMA {name} CASCADE")))
                .await
                .unwrap();
        }
        Server::Mysql => {
            let admin = sqlx::MySqlPool::connect(&a.base).await.unwrap();
            admin
                .execute(AssertSqlSafe(format!("DROP DATABASE {name}")))
                .await
                .unwrap();
        }
    }
    if lost + duplicated + unexpected > 0 {
        std::process::exit(1);
    }
}

//! Engine benchmarks: every target of BENCHMARKS.md, each measured next to its reference in the
//! same run (the machine is shared and noisy; ratios hold where absolute numbers drift).
//!
//! ```sh
//! cargo bench --bench engine                       # SQLite only
//! WXPAY_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench engine
//! cargo bench --bench engine -- quick              # smaller sizes, for a smoke run
//! ```

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use sqlx::{AssertSqlSafe, Executor};
use tokio_util::sync::CancellationToken;
use wxpay_reconciler::config::{MetricsSettings, Settings};
use wxpay_reconciler::daemon;
use wxpay_reconciler::domain::{OrderState, Source, TransactionId};
use wxpay_reconciler::reconcile::policy::Settlement;
use wxpay_reconciler::sim::{self, RunningSimulator};
use wxpay_reconciler::store::{Change, ClaimRequest, Claimed, ConnectOptions, DatabaseUrl, Store};
use wxpay_reconciler::telemetry::Telemetry;
use wxpay_reconciler::wxpay::v3::PrivateKey;
use wxpay_reconciler::wxpay::{Fields, sign, xml};

const MD5_MCH: &str = "10000100";
const MD5_APPID: &str = "wxd930ea5d5a258f4f";

/// A merchant of the simulator's defaults: the v2 MD5 one or the v3 one (public-key mode).
#[derive(Clone, Copy)]
struct Mch {
    mch_id: &'static str,
    appid: &'static str,
}

const V2: Mch = Mch {
    mch_id: MD5_MCH,
    appid: MD5_APPID,
};
const V3: Mch = Mch {
    mch_id: sim::v3::TEST_V3_MCH_ID,
    appid: sim::v3::TEST_V3_APPID,
};

/// The published test keys (`tests/fixtures/wxpay-v3/keys/`) the simulator's v3 merchant uses.
const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wxpay-v3/keys");

struct Sizes {
    settle_orders: u64,
    raw_orders: u64,
    big_table: u64,
    small_table: u64,
    load_seconds: u64,
    memory_orders: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Db {
    Sqlite,
    Postgres,
}

struct Bench {
    db: Db,
    url: String,
    store: Store,
    _dir: Option<tempfile::TempDir>,
}

fn settings(url: &str, sim_url: &str) -> Settings {
    let mut settings = sim::daemon_settings(url, sim_url);
    settings.path = "(bench)".into();
    settings.database.max_connections = 16;
    settings.wechat.max_qps = 1_000_000;
    settings.wechat.concurrency = std::env::var("WXPAY_BENCH_CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64);
    settings.schedule.batch_size = 500;
    settings.schedule.lease_seconds = 60;
    settings.metrics = MetricsSettings::default();
    settings
}

async fn fresh(db: Db, pg_base: Option<&str>) -> Bench {
    let (url, dir) = match db {
        Db::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (
                format!("sqlite://{}", dir.path().join("bench.db").display()),
                Some(dir),
            )
        }
        Db::Postgres => {
            let base = pg_base.unwrap();
            let schema = format!(
                "wxbench_{}_{}",
                std::process::id(),
                rand::random_range(0..1_000_000u32)
            );
            let pool = sqlx::PgPool::connect(base).await.unwrap();
            pool.execute(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .await
                .unwrap();
            let sep = if base.contains('?') { '&' } else { '?' };
            (format!("{base}{sep}options[search_path]={schema}"), None)
        }
    };
    let store = Store::connect(&ConnectOptions {
        url: DatabaseUrl::new(&url),
        max_connections: 16,
        create_if_missing: true,
        acquire_timeout: Duration::from_secs(30),
    })
    .await
    .unwrap();
    store.migrate().await.unwrap();
    Bench {
        db,
        url,
        store,
        _dir: dir,
    }
}

/// Bulk-inserts `n` orders of `m` named `{prefix}{i}` in state `state`, due now.
async fn bulk_orders_of(b: &Bench, m: Mch, prefix: &str, n: u64, state: &str) {
    let Mch { mch_id, appid } = m;
    let sql = match b.db {
        Db::Sqlite => format!(
            "WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < {n})
             INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee, state, created_at)
             SELECT '{mch_id}', '{appid}', '{prefix}' || i, 100, '{state}', strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 minute') FROM seq"
        ),
        Db::Postgres => format!(
            "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee, state, created_at)
             SELECT '{mch_id}', '{appid}', '{prefix}' || i, 100, '{state}', now() - interval '1 minute'
             FROM generate_series(0, {n} - 1) AS i"
        ),
    };
    match b.db {
        Db::Sqlite => {
            let pool = sqlx::SqlitePool::connect_with(
                sqlx::sqlite::SqliteConnectOptions::from_str(&b.url).unwrap(),
            )
            .await
            .unwrap();
            pool.execute(AssertSqlSafe(sql)).await.unwrap();
            pool.execute("ANALYZE").await.unwrap();
            pool.close().await;
        }
        Db::Postgres => {
            let pool = sqlx::PgPool::connect(&b.url).await.unwrap();
            pool.execute(AssertSqlSafe(sql)).await.unwrap();
            pool.execute("ANALYZE wxpay_orders").await.unwrap();
            pool.close().await;
        }
    }
}

/// [`bulk_orders_of`] the v2 MD5 merchant.
async fn bulk_orders(b: &Bench, prefix: &str, n: u64, state: &str) {
    bulk_orders_of(b, V2, prefix, n, state).await;
}

async fn simulator() -> RunningSimulator {
    RunningSimulator::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        sim::default_merchants(),
    )
    .unwrap()
}

/// The simulator's raw orderquery rate under an in-process load generator: `conns` keep-alive
/// connections sending signed queries for one paid order as fast as they can.
async fn sim_raw_rate(seconds: u64, conns: usize) -> f64 {
    let s = simulator().await;
    let otn = "rawrate1";
    s.state.pay(MD5_MCH, otn, Some(100), false).unwrap();
    let m = sim::default_merchants().into_iter().next().unwrap();
    let mut f = Fields::new()
        .with("appid", MD5_APPID)
        .with("mch_id", MD5_MCH)
        .with("nonce_str", "5K8264ILTKCH16CQ2502SI8ZNMTM67VS")
        .with("out_trade_no", otn);
    sign::sign_in_place(&mut f, m.v2_key(), m.v2_sign_type());
    let body = xml::encode(&f).unwrap();
    let url = format!("{}/pay/orderquery", s.base_url());
    let ok = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (ok, url, body) = (ok.clone(), url.clone(), body.clone());
        tasks.spawn(async move {
            let client = wxpay_reconciler::wxpay::client::http_client_builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            while Instant::now() < deadline {
                let r = client.post(&url).body(body.clone()).send().await.unwrap();
                let text = r.text().await.unwrap();
                if text.contains("<trade_state>SUCCESS</trade_state>") {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let start = Instant::now();
    while tasks.join_next().await.is_some() {}
    let rate = ok.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    s.shutdown(Duration::from_secs(1)).await.unwrap();
    rate
}

/// The database's raw rate of what settling costs: a guarded UPDATE + event INSERT
/// transaction per order, `conc` at a time.
async fn db_raw_rate(b: &Bench, n: u64, conc: usize) -> f64 {
    bulk_orders(b, "raw", n, "NOTPAY").await;
    let now = Utc::now();
    let mut claimed = Vec::new();
    loop {
        let batch = b
            .store
            .claim_due(&ClaimRequest {
                now,
                grace: TimeDelta::zero(),
                lease_until: now + TimeDelta::hours(1),
                limit: 1000,
            })
            .await
            .unwrap()
            .into_iter()
            .filter_map(Claimed::into_order)
            .collect::<Vec<_>>();
        if batch.is_empty() {
            break;
        }
        claimed.extend(batch);
    }
    let queue = Arc::new(std::sync::Mutex::new(claimed));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conc {
        let (queue, store) = (queue.clone(), b.store.clone());
        tasks.spawn(async move {
            loop {
                let Some(order) = queue.lock().unwrap().pop() else {
                    break;
                };
                let change = Change::Settle {
                    settlement: Settlement {
                        to: OrderState::Success,
                        transaction_id: Some(
                            TransactionId::parse("4200000000000000000000000001").unwrap(),
                        ),
                        paid_at: Some(Utc::now()),
                        reported_fee: Some(wxpay_reconciler::domain::Fen::new(100).unwrap()),
                        detail: None,
                    },
                    source: Source::Poll,
                };
                store
                    .apply(&order.row, order.guard(), &change, Utc::now())
                    .await
                    .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    n as f64 / start.elapsed().as_secs_f64()
}

/// The rate at which this machine makes the RSA operations one settled v3 order needs: the
/// daemon's request signature (the merchant's key) plus the simulator's answer signature
/// (WeChat's key), on every core. Verifications (public-key operations) are left out: they
/// cost a few percent of a signature.
fn rsa_limit(seconds: u64) -> f64 {
    let key = |file: &str| {
        PrivateKey::from_pem(&std::fs::read(format!("{KEYS}/{file}")).unwrap()).unwrap()
    };
    let merchant = key("java_sdk_merchant_private_key.pem");
    let wechat = key("go_sdk_test_private_key.pem");
    let request = b"GET\n/v3/pay/transactions/out-trade-no/v3set1?mchid=1900000100\n1700000000\n\
                    593BEC0C930BF1AFEB40B4A08C8FB242\n\n";
    let answer = format!(
        "1700000000\n5K8264ILTKCH16CQ2502SI8ZNMTM67VS\n{}\n",
        "{\"amount\":{\"total\":100}}".repeat(20)
    );
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let pairs: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        merchant.sign(request).unwrap();
                        wechat.sign(answer.as_bytes()).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    pairs as f64 / start.elapsed().as_secs_f64()
}

/// Orders settled per second: `n` paid orders, the simulator at zero latency, no QPS cap.
async fn settle_rate(b: &Bench, n: u64) -> f64 {
    settle_rate_of(b, V2, n).await
}

/// [`settle_rate`] for the orders of merchant `m`.
async fn settle_rate_of(b: &Bench, m: Mch, n: u64) -> f64 {
    let s = simulator().await;
    bulk_orders_of(b, m, "set", n, "NOTPAY").await;
    for i in 0..n {
        s.state
            .pay(m.mch_id, &format!("set{i}"), Some(100), false)
            .unwrap();
    }
    let cfg = settings(&b.url, &s.base_url());
    let scanner = daemon::scanner(&cfg, b.store.clone(), Telemetry::new([m.mch_id])).unwrap();
    let start = Instant::now();
    let report = scanner
        .scan(&CancellationToken::new(), &|| {})
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(report.settled as u64, n, "{report:?}");
    s.shutdown(Duration::from_secs(1)).await.unwrap();
    n as f64 / elapsed.as_secs_f64()
}

/// The achieved query rate for `n` unpaid orders with a given cap and simulated latency.
async fn query_rate(b: &Bench, n: u64, max_qps: u32, concurrency: u32, latency_ms: u64) -> f64 {
    let s = simulator().await;
    let prefix = format!("q{max_qps}x{latency_ms}x");
    bulk_orders(b, &prefix, n, "NOTPAY").await;
    for i in 0..n {
        s.state
            .create_order(MD5_MCH, &format!("{prefix}{i}"), 100, None, None)
            .unwrap();
    }
    s.state.set_faults_all(sim::Faults {
        latency_ms,
        ..sim::Faults::default()
    });
    let mut cfg = settings(&b.url, &s.base_url());
    cfg.wechat.max_qps = max_qps;
    cfg.wechat.concurrency = concurrency;
    let scanner = daemon::scanner(&cfg, b.store.clone(), Telemetry::new([MD5_MCH])).unwrap();
    let start = Instant::now();
    let report = scanner
        .scan(&CancellationToken::new(), &|| {})
        .await
        .unwrap();
    let elapsed = start.elapsed();
    assert_eq!(report.claimed as u64, n);
    s.shutdown(Duration::from_secs(1)).await.unwrap();
    n as f64 / elapsed.as_secs_f64()
}

/// Median time to claim 200 due orders in a table of `total` orders (all but 200 settled).
async fn claim_time(db: Db, pg: Option<&str>, total: u64) -> Duration {
    let b = fresh(db, pg).await;
    bulk_orders(&b, "done", total - 200, "SUCCESS").await;
    bulk_orders(&b, "due", 200, "NOTPAY").await;
    let mut times = Vec::new();
    for _ in 0..7 {
        let now = Utc::now();
        let start = Instant::now();
        let claimed = b
            .store
            .claim_due(&ClaimRequest {
                now,
                grace: TimeDelta::zero(),
                lease_until: now + TimeDelta::hours(1),
                limit: 200,
            })
            .await
            .unwrap()
            .into_iter()
            .filter_map(Claimed::into_order)
            .collect::<Vec<_>>();
        times.push(start.elapsed());
        assert_eq!(claimed.len(), 200);
        // Due again for the next round.
        let reset = "UPDATE wxpay_orders SET next_query_at = NULL WHERE out_trade_no LIKE 'due%'";
        match db {
            Db::Sqlite => {
                let p = sqlx::SqlitePool::connect(&b.url).await.unwrap();
                p.execute(reset).await.unwrap();
                p.close().await;
            }
            Db::Postgres => {
                let p = sqlx::PgPool::connect(&b.url).await.unwrap();
                p.execute(reset).await.unwrap();
                p.close().await;
            }
        }
    }
    times.sort();
    times[times.len() / 2]
}

/// Peak RSS of the real daemon (`run`, release build) draining `n` due paid orders of merchant
/// `m` on SQLite.
async fn daemon_rss(m: Mch, n: u64) -> (Rss, f64) {
    let s = simulator().await;
    let b = fresh(Db::Sqlite, None).await;
    bulk_orders_of(&b, m, "mem", n, "NOTPAY").await;
    for i in 0..n {
        s.state
            .pay(m.mch_id, &format!("mem{i}"), Some(100), false)
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let Mch { mch_id, appid } = m;
    let merchant = if mch_id == V3.mch_id {
        std::fs::write(dir.path().join("k"), sim::v3::TEST_V3_APIV3_KEY).unwrap();
        format!(
            "[[merchants]]\nmch_id = \"{mch_id}\"\nappid = \"{appid}\"\napi = \"v3\"\n\
             private_key_file = \"{KEYS}/java_sdk_merchant_private_key.pem\"\n\
             cert_serial_no = \"{}\"\napiv3_key_file = \"k\"\n\
             wechatpay_public_key_file = \"{KEYS}/go_sdk_test_public_key.pem\"\n\
             wechatpay_public_key_id = \"{}\"\n",
            sim::v3::TEST_V3_MERCHANT_SERIAL,
            sim::v3::TEST_PUBLIC_KEY_ID
        )
    } else {
        std::fs::write(dir.path().join("k"), "192006250b4c09247ec02edce69f6a2d").unwrap();
        format!("[[merchants]]\nmch_id = \"{mch_id}\"\nappid = \"{appid}\"\napi_key_file = \"k\"\n")
    };
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{}\"\n[wechat]\nbase_url = \"{}\"\nmax_qps = 100000\nconcurrency = 64\n\
             {merchant}\
             [schedule]\nscan_cron = \"* * * * * *\"\ngrace_seconds = 0\nbatch_size = 500\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n",
            b.url,
            s.base_url()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wxpay-reconciler"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let counts = b.store.count_by_state().await.unwrap();
        let done = counts
            .iter()
            .find(|(s, _)| *s == OrderState::Success)
            .map_or(0, |(_, n)| *n);
        if done as u64 >= n || start.elapsed() > Duration::from_secs(300) {
            break;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |field: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let rss = Rss {
        peak_kb: kb("VmHWM:"),
        anon_kb: kb("RssAnon:"),
        file_kb: kb("RssFile:"),
    };
    let _ = child.kill().await;
    s.shutdown(Duration::from_secs(1)).await.unwrap();
    (rss, n as f64 / elapsed)
}

/// The daemon's memory: the peak, and what the end of the drain holds in heap and stacks
/// (anonymous) and in mapped files (mostly the binary's own code).
struct Rss {
    peak_kb: u64,
    anon_kb: u64,
    file_kb: u64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let sizes = if quick {
        Sizes {
            settle_orders: 2_000,
            raw_orders: 2_000,
            big_table: 100_000,
            small_table: 10_000,
            load_seconds: 3,
            memory_orders: 5_000,
        }
    } else {
        Sizes {
            settle_orders: 20_000,
            raw_orders: 20_000,
            big_table: 1_000_000,
            small_table: 10_000,
            load_seconds: 10,
            memory_orders: 100_000,
        }
    };
    // `only=NAME,NAME` runs some parts: sim, settle, v3, cap, little, claim, memory, v3memory.
    let only: Option<Vec<String>> = std::env::args().find_map(|a| {
        a.strip_prefix("only=")
            .map(|v| v.split(',').map(str::to_owned).collect())
    });
    let part = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let pg = std::env::var("WXPAY_BENCH_POSTGRES_URL").ok();
    let mut dbs = vec![Db::Sqlite];
    if pg.is_some() {
        dbs.push(Db::Postgres);
    }
    // `db=sqlite` or `db=postgres` runs the database parts on one backend only.
    if let Some(only_db) = std::env::args().find_map(|a| a.strip_prefix("db=").map(str::to_owned)) {
        dbs.retain(|d| format!("{d:?}").eq_ignore_ascii_case(&only_db));
    }

    let sim_rate = if part("sim") || part("settle") {
        let r = sim_raw_rate(sizes.load_seconds, 64).await;
        println!("simulator raw orderquery rate (64 connections): {r:.0} req/s");
        r
    } else {
        f64::NAN
    };
    for db in dbs.iter().filter(|_| part("settle")) {
        let b = fresh(*db, pg.as_deref()).await;
        let raw = db_raw_rate(&b, sizes.raw_orders, 16).await;
        let b = fresh(*db, pg.as_deref()).await;
        let settled = settle_rate(&b, sizes.settle_orders).await;
        let limit = raw.min(sim_rate);
        println!(
            "{db:?}: settled {settled:.0}/s; limits: simulator {sim_rate:.0}/s, database {raw:.0} tx/s; settled/lower limit = {:.0}%",
            100.0 * settled / limit
        );
    }
    if part("v3") {
        // The limit right before and right after the settle run: the machine drifts.
        let before = rsa_limit(sizes.load_seconds);
        let mut results = Vec::new();
        for db in &dbs {
            let b = fresh(*db, pg.as_deref()).await;
            results.push((*db, settle_rate_of(&b, V3, sizes.settle_orders).await));
        }
        let after = rsa_limit(sizes.load_seconds);
        let limit = before.max(after);
        println!(
            "RSA limit (merchant request signature + WeChat answer signature, every core): \
             {before:.0}/s before, {after:.0}/s after"
        );
        for (db, settled) in results {
            println!(
                "{db:?} v3: settled {settled:.0}/s; RSA limit {limit:.0}/s; settled/limit = {:.0}%",
                100.0 * settled / limit
            );
        }
    }
    if part("cap") {
        let b = fresh(Db::Sqlite, None).await;
        let capped = query_rate(&b, 3000, 500, 64, 0).await;
        println!(
            "QPS cap 500: achieved {capped:.1}/s ({:+.1}% of the cap)",
            100.0 * (capped / 500.0 - 1.0)
        );
    }
    if part("little") {
        let b = fresh(Db::Sqlite, None).await;
        let little = query_rate(&b, 2000, 1_000_000, 16, 50).await;
        let expected = 16.0 / 0.050;
        println!(
            "latency 50 ms, concurrency 16: achieved {little:.1}/s, Little's law {expected:.0}/s ({:+.1}%)",
            100.0 * (little / expected - 1.0)
        );
    }
    for db in dbs.iter().filter(|_| part("claim")) {
        let small = claim_time(*db, pg.as_deref(), sizes.small_table).await;
        let big = claim_time(*db, pg.as_deref(), sizes.big_table).await;
        println!(
            "{db:?}: claim of 200 due orders: {:.2} ms in {} orders, {:.2} ms in {} orders (ratio {:.2})",
            small.as_secs_f64() * 1000.0,
            sizes.small_table,
            big.as_secs_f64() * 1000.0,
            sizes.big_table,
            big.as_secs_f64() / small.as_secs_f64()
        );
    }
    // The PostgreSQL schemas this run made (one holds a million rows) go away with it.
    if let Some(base) = pg.as_deref() {
        let pool = sqlx::PgPool::connect(base).await.unwrap();
        let schemas: Vec<String> =
            sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE $1")
                .bind(format!("wxbench_{}_%", std::process::id()))
                .fetch_all(&pool)
                .await
                .unwrap();
        for schema in schemas {
            pool.execute(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .await
                .unwrap();
        }
    }
    for (name, m) in [("memory", V2), ("v3memory", V3)] {
        if !part(name) {
            continue;
        }
        let (rss, rate) = daemon_rss(m, sizes.memory_orders).await;
        let mb = |kb: u64| kb as f64 / 1024.0;
        println!(
            "daemon peak RSS draining {} due orders of {} (SQLite): {:.1} MB at {rate:.0} settled/s \
             (at the end: {:.1} MB anonymous, {:.1} MB file-backed)",
            sizes.memory_orders,
            m.mch_id,
            mb(rss.peak_kb),
            mb(rss.anon_kb),
            mb(rss.file_kb)
        );
    }
}

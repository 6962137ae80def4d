//! Daily-bill benchmarks (issue 16; numbers in BENCHMARKS.md): an `ALL` bill (gzip) of N rows
//! against a table of N paid orders, on SQLite and PostgreSQL. For each backend and size, in
//! one run:
//!
//! - the database's **raw rate** of the lookups the run makes: every number of the bill, in
//!   batches of 1000, through `Store::orders_by_out_trade_no`;
//! - the **reconcile rate**: `BillRunner::run_day` on the file, in process (claim, pass 1,
//!   pass 2, the local side, the end), rows per second; three rounds of (raw, reconcile), then
//!   raw once more after the binary's run, the best of each compared;
//! - the **real binary** (`bills reconcile --file`, release build): its peak RSS (`VmHWM`),
//!   and what its heap and its mapped files held when its RSS was highest.
//!
//! Each bill plants 10 `remote_only`, 10 `local_only` and 10 `amount_diff` rows, and every run
//! must find exactly those: the benchmark cannot measure a comparison that did not happen.
//!
//! ```sh
//! WXPAY_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench bills
//! cargo bench --bench bills -- quick               # 10,000 and 100,000 rows
//! cargo bench --bench bills -- only=sqlite         # or only=postgres; rows=N: one size;
//!                                                  # trace: the binary's RSS over its run
//! ```
//!
//! PostgreSQL is `WXPAY_BENCH_POSTGRES_URL`, else `WXPAY_TEST_POSTGRES_URL`; each size gets a
//! schema of its own, dropped at its end.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{NaiveDate, TimeDelta, Utc};
use sqlx::{AssertSqlSafe, Executor};
use tokio_util::sync::CancellationToken;
use wxpay_reconciler::daemon;
use wxpay_reconciler::reconcile::bills::{
    BATCH_ROWS, BillInput, DayOutcome, DayRequest, DaySummary, beijing_today, day_bounds, verify,
};
use wxpay_reconciler::sim::bill::{Row, RowKind, write_bill};
use wxpay_reconciler::store::{ConnectOptions, DatabaseUrl, FindingKind, Store};
use wxpay_reconciler::telemetry::Telemetry;

const MCH: &str = "10000100";
const APPID: &str = "wxd930ea5d5a258f4f";
/// The MD5 merchant's key (the simulator's default; not used by a run from a file).
const KEY: &str = "192006250b4c09247ec02edce69f6a2d";
/// Planted findings of each kind per bill.
const PLANTED: u64 = 10;
/// Rounds of (raw lookups, reconcile) per backend and size.
const ROUNDS: usize = 3;
/// Runs of the real binary per backend and size.
const BINARY_RUNS: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Db {
    Sqlite,
    Postgres,
}

/// What row `i` of a bill of `n` rows is (the table holds order `bl{i}` for every `i`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plant {
    Matches,
    /// The bill lists `bx{i}` instead of `bl{i}`: one `remote_only` and one `local_only`.
    Swapped,
    /// The bill's amount is the order's plus one fen.
    Amount,
}

fn plant(i: u64, n: u64) -> Plant {
    let step = n / PLANTED;
    match i % step {
        3 => Plant::Swapped,
        5 => Plant::Amount,
        _ => Plant::Matches,
    }
}

fn fee_of(i: u64) -> i64 {
    100 + (i % 9900) as i64
}

/// Seconds after the day's start at which order `i` of `n` was paid.
fn second_of(i: u64, n: u64) -> u64 {
    i * 86_400 / n
}

fn out_trade_no(i: u64, n: u64) -> String {
    match plant(i, n) {
        Plant::Swapped => format!("bx{i}"),
        _ => format!("bl{i}"),
    }
}

/// The bill of `day` matching the table of [`bulk_orders`], planted rows included, gzipped
/// as it is written (rows come from an iterator: nothing of the bill is held).
fn write_gz_bill(path: &Path, day: NaiveDate, n: u64) {
    let (start, _) = day_bounds(day);
    let rows = (0..n).map(move |i| Row {
        time: start + TimeDelta::seconds(second_of(i, n) as i64),
        appid: APPID.into(),
        mch_id: MCH.into(),
        sub_mch_id: None,
        transaction_id: format!("4200000000{i:018}"),
        out_trade_no: out_trade_no(i, n),
        openid: "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o".into(),
        trade_type: "JSAPI".into(),
        body: "bench goods".into(),
        attach: String::new(),
        kind: RowKind::Payment {
            total_fee: fee_of(i) + i64::from(plant(i, n) == Plant::Amount),
        },
    });
    let file = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let totals = write_bill(&mut gz, rows).unwrap();
    gz.finish().unwrap().sync_all().unwrap();
    assert_eq!(totals.rows, n);
}

struct Bench {
    db: Db,
    url: String,
    store: Store,
    /// The PostgreSQL schema (dropped at the end) and its server's URL.
    schema: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

async fn fresh(db: Db, pg_base: Option<&str>) -> Bench {
    let (url, dir, schema) = match db {
        Db::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (
                format!("sqlite://{}", dir.path().join("bills.db").display()),
                Some(dir),
                None,
            )
        }
        Db::Postgres => {
            let base = pg_base.unwrap();
            let schema = format!(
                "wxbills_{}_{}",
                std::process::id(),
                rand::random_range(0..1_000_000u32)
            );
            let pool = sqlx::PgPool::connect(base).await.unwrap();
            pool.execute(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .await
                .unwrap();
            pool.close().await;
            let sep = if base.contains('?') { '&' } else { '?' };
            (
                format!("{base}{sep}options[search_path]={schema}"),
                None,
                Some((schema, base.to_owned())),
            )
        }
    };
    let store = Store::connect(&ConnectOptions {
        url: DatabaseUrl::new(&url),
        max_connections: 8,
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
        schema,
        _dir: dir,
    }
}

impl Bench {
    async fn drop_schema(self) {
        drop(self.store);
        if let Some((schema, base)) = &self.schema {
            let pool = sqlx::PgPool::connect(base).await.unwrap();
            pool.execute(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .await
                .unwrap();
            pool.close().await;
        }
    }
}

/// `n` orders `bl{i}` of the merchant, all `SUCCESS` and paid within Beijing day `day` (as
/// the bill says), in one statement; then the statistics.
async fn bulk_orders(b: &Bench, day: NaiveDate, n: u64) {
    let start = day_bounds(day).0.timestamp();
    match b.db {
        Db::Sqlite => {
            let sql = format!(
                "WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i + 1 < {n})
                 INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee, state,
                                           transaction_id, paid_at, created_at)
                 SELECT '{MCH}', '{APPID}', 'bl' || i, 100 + i % 9900, 'SUCCESS',
                        '4200000000' || printf('%018d', i),
                        datetime({start} + i * 86400 / {n}, 'unixepoch'),
                        datetime({start} + i * 86400 / {n} - 60, 'unixepoch')
                 FROM seq"
            );
            let pool = sqlx::SqlitePool::connect_with(
                sqlx::sqlite::SqliteConnectOptions::from_str(&b.url).unwrap(),
            )
            .await
            .unwrap();
            pool.execute(AssertSqlSafe(sql)).await.unwrap();
            pool.execute("ANALYZE").await.unwrap();
            pool.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                .await
                .unwrap();
            pool.close().await;
        }
        Db::Postgres => {
            let sql = format!(
                "INSERT INTO wxpay_orders (mch_id, appid, out_trade_no, total_fee, state,
                                           transaction_id, paid_at, created_at)
                 SELECT '{MCH}', '{APPID}', 'bl' || i, 100 + i % 9900, 'SUCCESS',
                        '4200000000' || lpad(i::text, 18, '0'),
                        to_timestamp({start} + i * 86400 / {n}),
                        to_timestamp({start} + i * 86400 / {n} - 60)
                 FROM generate_series(0::bigint, {n} - 1) AS i"
            );
            let pool = sqlx::PgPool::connect(&b.url).await.unwrap();
            pool.execute(AssertSqlSafe(sql)).await.unwrap();
            pool.execute("VACUUM ANALYZE wxpay_orders").await.unwrap();
            pool.close().await;
        }
    }
}

/// The database's raw rate of the run's lookups: every number of the bill, in its order, in
/// batches of [`BATCH_ROWS`], through `Store::orders_by_out_trade_no`. Rows per second.
async fn raw_lookup_rate(store: &Store, n: u64) -> f64 {
    let start = Instant::now();
    let mut found = 0u64;
    let mut i = 0;
    while i < n {
        let end = (i + BATCH_ROWS as u64).min(n);
        let numbers: Vec<String> = (i..end).map(|j| out_trade_no(j, n)).collect();
        let refs: Vec<&str> = numbers.iter().map(String::as_str).collect();
        let rows = store.orders_by_out_trade_no(MCH, &refs).await.unwrap();
        found += rows.iter().filter(|r| r.is_ok()).count() as u64;
        i = end;
    }
    let elapsed = start.elapsed();
    assert_eq!(
        found,
        n - PLANTED,
        "the lookups found every order but the swapped ones"
    );
    n as f64 / elapsed.as_secs_f64()
}

/// The local side's reads alone: every order paid on the day, by keyset pages of 1000 from
/// the day's first id (what `paid_between` costs the run). Rows per second.
async fn raw_paging_rate(store: &Store, day: NaiveDate, n: u64) -> f64 {
    let (from, to) = day_bounds(day);
    let start = Instant::now();
    let span = store.paid_span(MCH, from, to).await.unwrap();
    let mut after = 0;
    let mut seen = 0u64;
    loop {
        let page = store
            .paid_between(MCH, from, to, after, 1000)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = match last {
            Ok(o) => o.id,
            Err(u) => u.id,
        };
        seen += page.len() as u64;
        if page.len() < 1000 {
            break;
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(seen, n);
    assert_eq!(span.count as u64, n);
    n as f64 / elapsed.as_secs_f64()
}

/// Pass 1 alone, no database: gunzip, SHA-1 and every row parsed and added up. Rows per second.
fn parse_rate(path: &Path, n: u64) -> f64 {
    let file = std::fs::File::open(path).unwrap();
    let start = Instant::now();
    let (totals, _) = verify(&file, None, &[MCH.to_owned()]).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(totals.rows as u64, n);
    n as f64 / elapsed.as_secs_f64()
}

/// The findings every run of a bill of `n` rows must end with.
fn check_findings(findings: &[(FindingKind, i64)], what: &str) {
    for kind in FindingKind::ALL {
        let got = findings
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, c)| *c);
        let want = match kind {
            FindingKind::RemoteOnly | FindingKind::LocalOnly | FindingKind::AmountDiff => {
                PLANTED as i64
            }
            _ => 0,
        };
        assert_eq!(got, want, "{what}: {} findings", kind.as_str());
    }
}

/// `BillRunner::run_day` on the file, in this process. Rows per second of the whole run.
async fn reconcile_in_process(b: &Bench, day: NaiveDate, path: &Path, n: u64) -> f64 {
    let settings = wxpay_reconciler::sim::daemon_settings(&b.url, "http://127.0.0.1:9");
    let merchant = settings
        .merchants
        .iter()
        .find(|m| m.mch_id.as_str() == MCH)
        .unwrap()
        .clone();
    let telemetry = Telemetry::new([MCH]);
    let runner = daemon::bill_runner(&settings, b.store.clone(), None, telemetry);
    let req = DayRequest {
        merchant: &merchant,
        bill_date: day,
        input: BillInput::File(path.to_owned()),
        force: true,
    };
    let start = Instant::now();
    let outcome = runner
        .run_day(&req, &CancellationToken::new())
        .await
        .unwrap();
    let elapsed = start.elapsed();
    let summary: DaySummary = match outcome {
        DayOutcome::Reconciled(s) => s,
        other => panic!("the day was not reconciled: {other:?}"),
    };
    assert_eq!(summary.totals.rows as u64, n);
    check_findings(&summary.findings, "in process");
    n as f64 / elapsed.as_secs_f64()
}

/// The real binary's memory: its peak (`VmHWM`), and what its heap and stacks (anonymous) and
/// mapped files held when its RSS was highest.
#[derive(Default, Clone)]
struct Rss {
    peak_kb: u64,
    sampled_rss_kb: u64,
    anon_kb: u64,
    file_kb: u64,
    /// (seconds since the start, anonymous KiB, file-backed KiB), every sample.
    timeline: Vec<(f64, u64, u64)>,
}

fn status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// `bills reconcile --date D --mch-id M --file PATH` of the release binary with a config file
/// pointing at the database: its memory and its wall time (process start included).
///
/// The peak is the child's `VmHWM`, read every 5 ms until it exits (it only grows; the last
/// read is the peak but for the exit's last milliseconds). Not `ru_maxrss`: Linux carries the
/// high-water mark of the address space an `exec` replaces into it, and `std::process` spawns
/// with `CLONE_VM` (vfork), so a child's `ru_maxrss` is at least this benchmark's own peak.
fn reconcile_binary(url: &str, day: NaiveDate, path: &Path) -> (Rss, Duration) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k"), KEY).unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[database]\nurl = \"{url}\"\n\
             [[merchants]]\nmch_id = \"{MCH}\"\nappid = \"{APPID}\"\napi_key_file = \"k\"\n"
        ),
    )
    .unwrap();
    let out_path = dir.path().join("out.txt");
    let out = std::fs::File::create(&out_path).unwrap();
    let start = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wxpay-reconciler"))
        .arg("--config")
        .arg(&cfg)
        .args(["bills", "reconcile", "--date", &day.to_string()])
        .args(["--mch-id", MCH, "--file"])
        .arg(path)
        .env("RUST_LOG", "warn")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut best = Rss::default();
            let t0 = Instant::now();
            while !done.load(Ordering::Relaxed) {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    // A zombie's status has no Vm lines: skipped.
                    if let Some(hwm) = status_kb(&s, "VmHWM:") {
                        best.peak_kb = best.peak_kb.max(hwm);
                    }
                    if let (Some(rss), Some(anon), Some(file)) = (
                        status_kb(&s, "VmRSS:"),
                        status_kb(&s, "RssAnon:"),
                        status_kb(&s, "RssFile:"),
                    ) {
                        best.timeline.push((t0.elapsed().as_secs_f64(), anon, file));
                        if rss > best.sampled_rss_kb {
                            best.sampled_rss_kb = rss;
                            best.anon_kb = anon;
                            best.file_kb = file;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            best
        })
    };
    let status = child.wait().unwrap();
    let elapsed = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let rss = sampler.join().unwrap();
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        status.success(),
        "bills reconcile failed ({status}):\n{output}"
    );
    assert!(rss.peak_kb > 0, "no VmHWM read of the child");
    (rss, elapsed)
}

struct Measured {
    db: Db,
    rows: u64,
    /// The binary's runs, by peak RSS (lowest first), each with its rows per second
    /// (process start included).
    binary: Vec<(Rss, f64)>,
    /// Each round's rows reconciled per second.
    reconcile: Vec<f64>,
    /// Each round's raw lookup rate, and one after the binary's run.
    raw: Vec<f64>,
    paging: f64,
    parse: f64,
}

async fn measure(
    db: Db,
    pg: Option<&str>,
    day: NaiveDate,
    bill: &Path,
    n: u64,
    parse: f64,
) -> Measured {
    let b = fresh(db, pg).await;
    let t = Instant::now();
    bulk_orders(&b, day, n).await;
    eprintln!(
        "{db:?} {n}: {n} orders inserted in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // A first pass of the lookups warms the caches for everything after it. Then three
    // rounds of (raw lookups, reconcile): the best of each (the machine is shared).
    let _ = raw_lookup_rate(&b.store, n).await;
    let paging = raw_paging_rate(&b.store, day, n).await;
    let mut raw = Vec::new();
    let mut reconcile = Vec::new();
    for _ in 0..ROUNDS {
        raw.push(raw_lookup_rate(&b.store, n).await);
        reconcile.push(reconcile_in_process(&b, day, bill, n).await);
    }
    // The binary, three times: its peak varies by a few MB from run to run (which of glibc's
    // two arenas a thread allocates from, how many SQLite connections fill their cache).
    let mut binary = Vec::new();
    for _ in 0..BINARY_RUNS {
        let url = b.url.clone();
        let bill_path = bill.to_owned();
        let (rss, elapsed) =
            tokio::task::spawn_blocking(move || reconcile_binary(&url, day, &bill_path))
                .await
                .unwrap();
        let record = b.store.bill(MCH, day).await.unwrap().unwrap();
        check_findings(&record.findings, "the binary");
        assert_eq!(record.totals.unwrap().row_count as u64, n);
        binary.push((rss, n as f64 / elapsed.as_secs_f64()));
    }
    binary.sort_by_key(|(rss, _)| rss.peak_kb);
    raw.push(raw_lookup_rate(&b.store, n).await);
    b.drop_schema().await;
    Measured {
        db,
        rows: n,
        binary,
        reconcile,
        raw,
        paging,
        parse,
    }
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

impl Measured {
    /// The binary's run of median peak.
    fn median(&self) -> &(Rss, f64) {
        &self.binary[self.binary.len() / 2]
    }
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn report(r: &Measured, trace: bool) {
    let (rss, _) = r.median();
    if trace {
        // About 20 points of the median run.
        let step = (rss.timeline.len() / 20).max(1);
        let points: Vec<String> = rss
            .timeline
            .iter()
            .step_by(step)
            .map(|(t, a, f)| format!("{t:.1}s {:.1}+{:.1}", mb(*a), mb(*f)))
            .collect();
        println!(
            "{:?} {} rows: the binary's RSS, anonymous + file-backed MB: {}",
            r.db,
            r.rows,
            points.join(", ")
        );
    }
    let peaks: Vec<String> = r
        .binary
        .iter()
        .map(|(x, _)| format!("{:.1}", mb(x.peak_kb)))
        .collect();
    let rates: Vec<f64> = r.binary.iter().map(|(_, rate)| *rate).collect();
    println!(
        "{:?} {} rows: binary peak RSS {} MB (median run at its highest RSS: {:.1} MB anonymous, \
         {:.1} MB file-backed), {} rows/s with process start; in process {} rows/s \
         reconciled; raw lookups {} rows/s; best reconciled / best raw = {:.0}%; local-side \
         paging alone (full rows) {:.0} rows/s; pass 1 alone {:.0} rows/s",
        r.db,
        r.rows,
        peaks.join(" / "),
        mb(rss.anon_kb),
        mb(rss.file_kb),
        list(&rates),
        list(&r.reconcile),
        list(&r.raw),
        100.0 * best(&r.reconcile) / best(&r.raw),
        r.paging,
        r.parse,
    );
    let _ = std::io::stdout().flush();
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    // `trace`: the binary's RSS over its run, too.
    let trace = std::env::args().any(|a| a == "trace");
    let mut sizes: Vec<u64> = if quick {
        vec![10_000, 100_000]
    } else {
        vec![100_000, 1_000_000]
    };
    // `rows=N`: one size only (for profiling).
    if let Some(n) = std::env::args().find_map(|a| a.strip_prefix("rows=")?.parse().ok()) {
        sizes = vec![n];
    }
    let pg = std::env::var("WXPAY_BENCH_POSTGRES_URL")
        .or_else(|_| std::env::var("WXPAY_TEST_POSTGRES_URL"))
        .ok();
    let mut dbs = vec![Db::Sqlite];
    if pg.is_some() {
        dbs.push(Db::Postgres);
    }
    // `only=sqlite` or `only=postgres`.
    if let Some(only) = std::env::args().find_map(|a| a.strip_prefix("only=").map(str::to_owned)) {
        dbs.retain(|d| format!("{d:?}").eq_ignore_ascii_case(&only));
    }
    let day = beijing_today(Utc::now()) - TimeDelta::days(3);
    let dir = tempfile::tempdir().unwrap();
    let mut bills: Vec<(u64, PathBuf, f64)> = Vec::new();
    for n in sizes {
        let path = dir.path().join(format!("bill-{n}.csv.gz"));
        let t = Instant::now();
        write_gz_bill(&path, day, n);
        let bytes = std::fs::metadata(&path).unwrap().len();
        // Pass 1 alone, twice (the first reads the file from disk).
        let _ = parse_rate(&path, n);
        let parse = parse_rate(&path, n);
        eprintln!(
            "bill of {n} rows: {:.1} MB gzip, written in {:.1} s",
            bytes as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        bills.push((n, path, parse));
    }
    let mut results = Vec::new();
    for db in &dbs {
        for (n, path, parse) in &bills {
            let r = measure(*db, pg.as_deref(), day, path, *n, *parse).await;
            report(&r, trace);
            results.push(r);
        }
    }
    println!(
        "\nsummary (targets: peak RSS <= 64 MB, the larger bill's peak within 1.25x of the smaller's, reconciled >= 50% of raw lookups):"
    );
    for db in &dbs {
        let of: Vec<&Measured> = results.iter().filter(|r| r.db == *db).collect();
        for r in &of {
            let raw = best(&r.raw);
            println!(
                "  {:?} {:>9} rows  median peak {:>5.1} MB  reconciled {:>7.0} rows/s  raw {:>7.0} rows/s  ratio {:>4.0}%",
                r.db,
                r.rows,
                mb(r.median().0.peak_kb),
                best(&r.reconcile),
                raw,
                100.0 * best(&r.reconcile) / raw
            );
        }
        if let [small, big] = of.as_slice() {
            let peak = |r: &Measured, i: usize| r.binary[i].0.peak_kb as f64;
            let last = BINARY_RUNS - 1;
            println!(
                "  {db:?}: median peak at {} rows / median peak at {} rows = {:.2} \
                 (highest / lowest {:.2}, lowest / highest {:.2})",
                big.rows,
                small.rows,
                big.median().0.peak_kb as f64 / small.median().0.peak_kb as f64,
                peak(big, last) / peak(small, 0),
                peak(big, 0) / peak(small, last),
            );
        }
    }
    // The bill files go with `dir`.
    let _ = std::io::stdout().flush();
}

//! The backends a test runs on (DESIGN.md, "Tests and their databases"): SQLite always, in a
//! fresh file; PostgreSQL when `WXPAY_TEST_POSTGRES_URL` is set, in a fresh schema; MySQL or
//! MariaDB when `WXPAY_TEST_MYSQL_URL` is set, in a fresh database.
//! `WXPAY_TEST_REQUIRE_BACKENDS=postgres,…` makes an unset or unreachable backend a failure
//! instead of a skip.

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::MySqlPoolOptions;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AssertSqlSafe, MySqlPool, PgPool, SqlitePool};
use wxpay_reconciler::store::{ConnectOptions, DatabaseUrl, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
    Mysql,
}

/// A fresh database for one test, with a raw connection playing the merchant's application.
pub struct TestDb {
    pub kind: Kind,
    pub url: String,
    pub store: Store,
    raw: Raw,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

enum Raw {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    Mysql(MySqlPool),
}

fn required(name: &str) -> bool {
    std::env::var("WXPAY_TEST_REQUIRE_BACKENDS")
        .unwrap_or_default()
        .split(',')
        .any(|b| b.trim() == name)
}

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Every backend this run covers, each fresh and migrated.
pub async fn backends() -> Vec<TestDb> {
    let mut dbs = vec![sqlite().await];
    match std::env::var("WXPAY_TEST_POSTGRES_URL") {
        Ok(base) => match postgres(&base).await {
            Ok(db) => dbs.push(db),
            Err(e) if required("postgres") => panic!("PostgreSQL is required but unreachable: {e}"),
            Err(e) => eprintln!("skipping PostgreSQL: {e}"),
        },
        Err(_) if required("postgres") => {
            panic!(
                "WXPAY_TEST_REQUIRE_BACKENDS names postgres but WXPAY_TEST_POSTGRES_URL is not set"
            )
        }
        Err(_) => {}
    }
    match std::env::var("WXPAY_TEST_MYSQL_URL") {
        Ok(base) => match mysql(&base).await {
            Ok(db) => dbs.push(db),
            Err(e) if required("mysql") => panic!("MySQL/MariaDB is required but unreachable: {e}"),
            Err(e) => eprintln!("skipping MySQL/MariaDB: {e}"),
        },
        Err(_) if required("mysql") => {
            panic!("WXPAY_TEST_REQUIRE_BACKENDS names mysql but WXPAY_TEST_MYSQL_URL is not set")
        }
        Err(_) => {}
    }
    dbs
}

/// The server backends (several instances on one database), each fresh.
pub async fn server_backends() -> Vec<TestDb> {
    let mut dbs = backends().await;
    dbs.retain(|d| d.kind != Kind::Sqlite);
    dbs
}

/// Only PostgreSQL (for tests of several instances on one database), if configured.
pub async fn postgres_only() -> Option<TestDb> {
    let mut dbs = backends().await;
    dbs.retain(|d| d.kind == Kind::Postgres);
    dbs.pop()
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let store = Store::connect(&ConnectOptions {
        url: DatabaseUrl::new(&url),
        max_connections: 4,
        create_if_missing: true,
        acquire_timeout: Duration::from_secs(5),
    })
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let raw = SqlitePool::connect_with(
        SqliteConnectOptions::from_str(&url)
            .unwrap()
            .busy_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    TestDb {
        kind: Kind::Sqlite,
        url,
        store,
        raw: Raw::Sqlite(raw),
        schema: None,
        _dir: Some(dir),
    }
}

/// A fresh migrated schema. A migration's CREATE INDEX CONCURRENTLY waits for every older
/// transaction of the database, so migrations of concurrent test processes (or a benchmark) on
/// the same server can deadlock; one that lost is tried again on a schema of its own.
async fn postgres(base: &str) -> Result<TestDb, sqlx::Error> {
    let mut attempt = 0;
    loop {
        match postgres_once(base).await {
            Err(e) if attempt < 4 && e.to_string().contains("deadlock detected") => {
                attempt += 1;
                eprintln!("PostgreSQL migration deadlocked with another process; trying again");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            other => return other,
        }
    }
}

async fn postgres_once(base: &str) -> Result<TestDb, sqlx::Error> {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(base)
        .await?;
    let schema = unique("wxt");
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options[search_path]={schema}");
    let store = Store::connect(&ConnectOptions {
        url: DatabaseUrl::new(&url),
        max_connections: 8,
        create_if_missing: false,
        acquire_timeout: Duration::from_secs(5),
    })
    .await
    .map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
    {
        // One migration at a time in this process: a migration's CREATE INDEX CONCURRENTLY
        // waits for every older transaction of the database, including another test's wait
        // for sqlx's migration lock, which is a deadlock. (One `migrate` at a time is also how
        // the daemon is deployed.)
        static MIGRATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one_at_a_time = MIGRATING.lock().await;
        // And one at a time across processes: a lock taken by polling (short statements hold
        // no snapshot a concurrent index build waits for), released after the migration.
        let lock = PgPoolOptions::new()
            .max_connections(1)
            .connect(base)
            .await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock(7342016)")
            .fetch_one(&lock)
            .await?
        {
            if std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let migrated = store.migrate().await;
        lock.close().await;
        migrated.map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
    }
    let raw = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    Ok(TestDb {
        kind: Kind::Postgres,
        url,
        store,
        raw: Raw::Postgres(raw),
        schema: Some(schema),
        _dir: None,
    })
}

async fn mysql(base: &str) -> Result<TestDb, sqlx::Error> {
    let admin = MySqlPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(base)
        .await?;
    let name = unique("wxt");
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    // The same server, the fresh database.
    let (server, query) = match base.split_once('?') {
        Some((s, q)) => (s, format!("?{q}")),
        None => (base, String::new()),
    };
    let server = match server.rfind('/') {
        Some(i) if i > "mysql://".len() => &server[..i],
        _ => server,
    };
    let url = format!("{server}/{name}{query}");
    let store = Store::connect(&ConnectOptions {
        url: DatabaseUrl::new(&url),
        max_connections: 8,
        create_if_missing: false,
        acquire_timeout: Duration::from_secs(5),
    })
    .await
    .map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
    store
        .migrate()
        .await
        .map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
    let raw = MySqlPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    Ok(TestDb {
        kind: Kind::Mysql,
        url,
        store,
        raw: Raw::Mysql(raw),
        schema: Some(name),
        _dir: None,
    })
}

/// `$1`, `$2`, … → `?` (the tests' statements bind in order).
fn question_marks(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            while chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                chars.next();
            }
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

impl TestDb {
    /// Runs a statement as the merchant's application would; returns the rows affected.
    /// Placeholders are `$1` style; they are rewritten to `?1` for SQLite.
    pub async fn exec(&self, sql: &str, binds: &[&str]) -> u64 {
        match &self.raw {
            Raw::Sqlite(p) => {
                let sql = sql.replace('$', "?");
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for b in binds {
                    q = q.bind(*b);
                }
                q.execute(p).await.unwrap().rows_affected()
            }
            Raw::Postgres(p) => {
                let mut q = sqlx::query(AssertSqlSafe(sql.to_owned()));
                for b in binds {
                    q = q.bind(*b);
                }
                q.execute(p).await.unwrap().rows_affected()
            }
            Raw::Mysql(p) => {
                let mut q = sqlx::query(AssertSqlSafe(question_marks(sql)));
                for b in binds {
                    q = q.bind(*b);
                }
                q.execute(p).await.unwrap().rows_affected()
            }
        }
    }

    /// [`TestDb::exec`], with the database's refusal as an error instead of a panic.
    pub async fn try_exec(&self, sql: &str, binds: &[&str]) -> Result<u64, String> {
        let done = match &self.raw {
            Raw::Sqlite(p) => {
                let mut q = sqlx::query(AssertSqlSafe(sql.replace('$', "?")));
                for b in binds {
                    q = q.bind(*b);
                }
                q.execute(p).await.map(|r| r.rows_affected())
            }
            Raw::Postgres(p) => {
                let mut q = sqlx::query(AssertSqlSafe(sql.to_owned()));
                for b in binds {
                    q = q.bind(*b);
                }
                q.execute(p).await.map(|r| r.rows_affected())
            }
            Raw::Mysql(p) => {
                let mut q = sqlx::query(AssertSqlSafe(question_marks(sql)));
                for b in binds {
                    q = q.bind(*b);
                }
                q.execute(p).await.map(|r| r.rows_affected())
            }
        };
        done.map_err(|e| e.to_string())
    }

    /// The first column of the first row of `sql` (no parameters) as text (`None` for SQL
    /// NULL or no row); the query casts non-text columns itself.
    pub async fn text(&self, sql: &str) -> Option<String> {
        let sql = AssertSqlSafe(sql.to_owned());
        match &self.raw {
            Raw::Sqlite(p) => sqlx::query_scalar(sql).fetch_optional(p).await.unwrap(),
            Raw::Postgres(p) => sqlx::query_scalar(sql).fetch_optional(p).await.unwrap(),
            Raw::Mysql(p) => sqlx::query_scalar(sql).fetch_optional(p).await.unwrap(),
        }
        .flatten()
    }

    /// Runs several `;`-separated statements on one connection (a session of the merchant's
    /// application), with no parameters.
    pub async fn exec_script(&self, sql: &str) {
        let sql = AssertSqlSafe(sql.to_owned());
        match &self.raw {
            Raw::Sqlite(p) => {
                sqlx::raw_sql(sql).execute(p).await.unwrap();
            }
            Raw::Postgres(p) => {
                sqlx::raw_sql(sql).execute(p).await.unwrap();
            }
            Raw::Mysql(p) => {
                sqlx::raw_sql(sql).execute(p).await.unwrap();
            }
        }
    }

    /// Moves an order's next query into the past (time passing, without waiting for it).
    pub async fn make_due(&self, out_trade_no: &str) {
        let sql = match self.kind {
            Kind::Sqlite => {
                "UPDATE wxpay_orders SET next_query_at = '2000-01-01 00:00:00.000' WHERE out_trade_no = $1"
            }
            Kind::Postgres => {
                "UPDATE wxpay_orders SET next_query_at = '2000-01-01 00:00:00+00' WHERE out_trade_no = $1"
            }
            Kind::Mysql => {
                "UPDATE wxpay_orders SET next_query_at = '2000-01-01 00:00:00' WHERE out_trade_no = $1"
            }
        };
        assert_eq!(self.exec(sql, &[out_trade_no]).await, 1);
    }

    /// Makes an order `minutes` older (its `created_at` moves into the past).
    pub async fn backdate(&self, out_trade_no: &str, minutes: u32) {
        let sql = match self.kind {
            Kind::Sqlite => format!(
                "UPDATE wxpay_orders SET created_at = strftime('%Y-%m-%d %H:%M:%f', created_at, '-{minutes} minutes') WHERE out_trade_no = $1"
            ),
            Kind::Postgres => format!(
                "UPDATE wxpay_orders SET created_at = created_at - interval '{minutes} minutes' WHERE out_trade_no = $1"
            ),
            Kind::Mysql => format!(
                "UPDATE wxpay_orders SET created_at = created_at - INTERVAL {minutes} MINUTE WHERE out_trade_no = $1"
            ),
        };
        assert_eq!(self.exec(&sql, &[out_trade_no]).await, 1);
    }

    /// Drops the PostgreSQL schema or the MySQL database (SQLite's directory goes with the
    /// value).
    pub async fn cleanup(self) {
        match (&self.schema, &self.raw) {
            (Some(schema), Raw::Postgres(p)) => {
                let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                    .execute(p)
                    .await;
            }
            (Some(db), Raw::Mysql(p)) => {
                let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE {db}")))
                    .execute(p)
                    .await;
            }
            _ => {}
        }
    }
}

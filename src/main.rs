//! The `wxpay-reconciler` binary: parses the command line, loads the config, sets up logging,
//! and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use wxpay_reconciler::{commands, config, daemon, demo, shutdown, sim, telemetry};

/// Reconciles WeChat Pay v2 orders whose payment notification never arrived.
#[derive(Debug, Parser)]
#[command(name = "wxpay-reconciler", version, about)]
struct Cli {
    /// Config file [default: $WXPAY_RECONCILER_CONFIG, else /etc/wxpay-reconciler/config.toml].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: scan, query, settle; metrics on [metrics] listen. SIGTERM drains and exits 0.
    Run,
    /// A self-contained showcase: temporary SQLite, the built-in simulator, lost notifications
    /// reconciled. Needs no config and no service.
    Demo {
        /// Orders to create.
        #[arg(long, default_value_t = 3000)]
        orders: u32,
        /// Keep running after the summary with /metrics on ADDR (default 127.0.0.1:9187), until Ctrl-C.
        #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9187")]
        serve: Option<SocketAddr>,
    },
    /// Serve the WeChat Pay simulator, v2 and v3 (for tests, benchmarks and staging).
    ///
    /// Without --config it serves the test merchants of the shared fixtures
    /// (10000100 with MD5, 1900000109 with HMAC-SHA256, 1900000100 with API v3); with --config,
    /// the config's [[merchants]], WeChat's v3 keys from [simulator].
    Simulate {
        /// Address to listen on, e.g. 127.0.0.1:9300 (port 0 picks a free port).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9300")]
        listen: SocketAddr,
    },
    /// Apply the database migrations (creates a missing SQLite file) and exit.
    Migrate,
    /// Validate the config file and reach the database.
    CheckConfig,
    /// Orders by state, stuck orders per merchant, and the oldest open orders.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// How many of the oldest open orders to list.
        #[arg(long, default_value_t = 10)]
        oldest: u32,
    },
    /// One live, verified orderquery for an order (or refund query, with --refund), printed.
    Query {
        #[arg(required_unless_present = "refund")]
        out_trade_no: Option<String>,
        /// Ask about this refund (out_refund_no) instead of an order.
        #[arg(long, value_name = "OUT_REFUND_NO", conflicts_with = "out_trade_no")]
        refund: Option<String>,
        /// The merchant, when the order is not in the database or exists for several.
        #[arg(long)]
        mch_id: Option<String>,
        /// Apply the transition the scanner would make (recorded with source `manual`).
        #[arg(long)]
        apply: bool,
    },
    /// WeChat's T+1 daily trade bill against the shop's tables.
    Bills {
        #[command(subcommand)]
        command: BillsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BillsCommand {
    /// Reconcile one Beijing day's bill now (replacing that day's findings): downloaded, or a
    /// file downloaded from the merchant platform (plain or gzip; works offline). Exits 1 when
    /// a bill was not reconciled.
    Reconcile {
        /// The bill day (Beijing time), YYYY-MM-DD.
        #[arg(long, value_name = "YYYY-MM-DD")]
        date: chrono::NaiveDate,
        /// The merchant (default: every configured merchant; with --file, the only one).
        #[arg(long)]
        mch_id: Option<String>,
        /// Read this bill file instead of downloading it.
        #[arg(long, value_name = "PATH")]
        file: Option<std::path::PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The latest bills per merchant, with their findings by kind.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // The demo prints a summary; its per-order log lines would bury it.
    telemetry::init_logging(match cli.command {
        Command::Demo { .. } => "warn",
        _ => "info",
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates an arena of its own, and a daemon whose tasks move
/// between threads leaves memory stranded in all of them. Two arenas keep its memory flat
/// (BENCHMARKS.md, "Memory") at no measurable cost in speed. `MALLOC_ARENA_MAX` in the
/// environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a parameter of the allocator, and runs before any other
        // thread of this process exists. Its result (0 on a refused value) needs no handling:
        // the default is then kept.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// A test hook of debug builds only: with `WXPAY_RECONCILER_TEST_FAIL_TASK=TASK:end|panic`,
/// SIGUSR1 makes that task of the daemon end or panic (tests/it/hostile/tasks.rs watches what
/// the supervision does then). Release builds do not read the variable.
#[cfg(debug_assertions)]
fn fail_task_on_sigusr1(daemon: &daemon::Daemon) -> anyhow::Result<()> {
    let Ok(spec) = std::env::var("WXPAY_RECONCILER_TEST_FAIL_TASK") else {
        return Ok(());
    };
    let (task, how) = match spec.split_once(':') {
        Some((task, "end")) => (task.to_owned(), daemon::TaskFailure::End),
        Some((task, "panic")) => (task.to_owned(), daemon::TaskFailure::Panic),
        _ => anyhow::bail!(
            "WXPAY_RECONCILER_TEST_FAIL_TASK={spec:?}: expected TASK:end or TASK:panic"
        ),
    };
    let hooks = daemon.task_hooks();
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("cannot install the SIGUSR1 handler")?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            tracing::warn!(task, ?how, "SIGUSR1: test hook fails a task");
            hooks.fail(&task, how);
        }
    });
    Ok(())
}

fn load(cli: &Cli) -> anyhow::Result<config::Settings> {
    let path = config::resolve_path(cli.config.as_deref());
    Ok(config::load(&path)?)
}

/// `run`: the daemon until SIGTERM/SIGINT, reloading its configuration at each SIGHUP.
async fn run_daemon(cli: &Cli) -> anyhow::Result<()> {
    let path = config::resolve_path(cli.config.as_deref());
    let settings = config::load(&path)?;
    anyhow::ensure!(
        !settings.merchants.is_empty(),
        "config file {}: no [[merchants]] configured",
        settings.path.display()
    );
    telemetry::set_log_level(&settings.log.level).map_err(anyhow::Error::msg)?;
    let stop = shutdown::on_signals().context("cannot install signal handlers")?;
    let hangups = shutdown::hangups().context("cannot install signal handlers")?;
    let daemon = daemon::Daemon::start(&settings, stop.clone()).await?;
    #[cfg(debug_assertions)]
    fail_task_on_sigusr1(&daemon)?;
    // SIGHUP (`systemctl reload`): read the file again and apply what can be applied.
    tokio::spawn(daemon.reloader.clone().watch_hangups(hangups, path, stop));
    Ok(daemon.wait().await?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Run => run_daemon(&cli).await?,
        Command::Demo { orders, serve } => {
            let stop = shutdown::on_signals().context("cannot install signal handlers")?;
            let summary = demo::run(
                &demo::DemoOptions {
                    orders: *orders,
                    serve: *serve,
                },
                stop,
            )
            .await?;
            if serve.is_none() {
                println!("{summary}");
            }
        }
        Command::Simulate { listen } => {
            let (merchants, wechat) = match &cli.config {
                Some(path) => {
                    let settings = config::load(path)?;
                    anyhow::ensure!(
                        !settings.merchants.is_empty(),
                        "config file {}: no [[merchants]] to simulate",
                        path.display()
                    );
                    // WeChat's side of the v3 merchants: `[simulator]`, else the test keys.
                    let wechat = sim::WechatSide::from_settings(&settings.simulator)
                        .with_context(|| format!("config file {}: [simulator]", path.display()))?;
                    (settings.merchants, wechat)
                }
                None => (
                    sim::default_merchants(),
                    sim::WechatSide::test_keys().context("the embedded v3 test keys")?,
                ),
            };
            let stop = shutdown::on_signals().context("cannot install signal handlers")?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let running = sim::RunningSimulator::start_with(listener, merchants.clone(), wechat)
                .context("cannot start the simulator")?;
            let ids: Vec<String> = merchants
                .iter()
                .map(|m| format!("{} ({})", m.mch_id, m.signing()))
                .collect();
            tracing::info!(addr = %running.addr, merchants = %ids.join(", "), "simulator listening");
            // Print the address on stdout for scripts that started us on port 0.
            println!("listening on http://{}", running.addr);
            running
                .serve_until(stop, shutdown::DRAIN_DEADLINE)
                .await
                .context("simulator failed")?;
            tracing::info!("simulator stopped");
        }
        Command::Migrate => print!("{}", commands::migrate(&load(&cli)?).await?),
        Command::CheckConfig => print!("{}", commands::check_config(&load(&cli)?).await?),
        Command::Status { json, oldest } => {
            print!("{}", commands::status(&load(&cli)?, *json, *oldest).await?)
        }
        Command::Query {
            out_trade_no,
            refund,
            mch_id,
            apply,
        } => {
            let settings = load(&cli)?;
            let out = match (refund, out_trade_no) {
                (Some(orn), _) => {
                    commands::query_refund(&settings, orn, mch_id.as_deref(), *apply).await?
                }
                (None, Some(otn)) => {
                    commands::query(&settings, otn, mch_id.as_deref(), *apply).await?
                }
                // clap requires one of them.
                (None, None) => String::new(),
            };
            print!("{out}");
        }
        Command::Bills {
            command:
                BillsCommand::Reconcile {
                    date,
                    mch_id,
                    file,
                    json,
                },
        } => {
            let settings = load(&cli)?;
            let done = commands::bills::reconcile(
                &settings,
                *date,
                mch_id.as_deref(),
                file.as_deref(),
                *json,
            )
            .await?;
            print!("{}", done.output);
            anyhow::ensure!(done.all_reconciled, "a bill was not reconciled (see above)");
        }
        Command::Bills {
            command: BillsCommand::Status { json },
        } => print!("{}", commands::bills::status(&load(&cli)?, *json).await?),
    }
    Ok(())
}

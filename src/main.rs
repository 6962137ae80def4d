//! The `wxpay-reconciler` binary: parses the command line, loads the config, sets up logging,
//! and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use wxpay_reconciler::{config, shutdown, sim, telemetry};

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
    /// Serve the WeChat Pay v2 simulator (for tests, benchmarks and staging).
    ///
    /// Without --config it serves the two test merchants of the shared fixtures
    /// (10000100 with MD5, 1900000109 with HMAC-SHA256); with --config, the config's
    /// [[merchants]].
    Simulate {
        /// Address to listen on, e.g. 127.0.0.1:9300 (port 0 picks a free port).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9300")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging();
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Simulate { listen } => {
            let merchants = match &cli.config {
                Some(path) => {
                    let settings = config::load(path)?;
                    anyhow::ensure!(
                        !settings.merchants.is_empty(),
                        "config file {}: no [[merchants]] to simulate",
                        path.display()
                    );
                    settings.merchants
                }
                None => sim::default_merchants(),
            };
            let stop = shutdown::on_signals().context("cannot install signal handlers")?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let running = sim::RunningSimulator::start(listener, merchants.clone())
                .context("cannot start the simulator")?;
            let ids: Vec<String> = merchants
                .iter()
                .map(|m| format!("{} ({})", m.mch_id, m.sign_type))
                .collect();
            tracing::info!(addr = %running.addr, merchants = %ids.join(", "), "simulator listening");
            // Print the address on stdout for scripts that started us on port 0.
            println!("listening on http://{}", running.addr);
            running
                .serve_until(stop, shutdown::DRAIN_DEADLINE)
                .await
                .context("simulator failed")?;
            tracing::info!("simulator stopped");
            Ok(())
        }
    }
}

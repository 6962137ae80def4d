//! `wxpay-reconciler demo`: the whole story on embedded defaults, no config, no service. A
//! temporary SQLite database and the built-in simulator; orders registered as a shop would;
//! customers pay most of them; a fifth of the payment notifications reach the daemon's notify
//! endpoint and the rest are lost; the daemon (the real one, `run`'s code) reconciles them; a
//! summary says what happened and how fast.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::daemon::{Daemon, bill_runner, open_store};
use crate::domain::{OrderState, RefundState, RefundStatus, Settlement, Source};
use crate::gateway::{Api, Gateway};
use crate::reconcile::bills::{BillInput, DayOutcome, DayRequest, beijing_today};
use crate::sim::{self, RunningSimulator, SimState};
use crate::store::{
    Change, FindingKind, Guard, NewOrder, RefundChange, RefundGuard, RefundOutcome, Store,
};
use crate::telemetry::Telemetry;

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub orders: u32,
    /// Keep running with `/metrics` on this address after the summary, until stopped.
    pub serve: Option<SocketAddr>,
}

/// The demo's result.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoSummary {
    pub orders: u32,
    pub paid: u32,
    /// Paid orders whose notification reached the notify endpoint.
    pub notified: u32,
    pub mismatched_payments: u32,
    pub settled_success: i64,
    /// Orders settled from a notification (the rest by orderquery).
    pub settled_by_notify: i64,
    pub quarantined: i64,
    pub still_open: i64,
    pub wechat_queries: u64,
    pub settle_p50: Duration,
    pub settle_p99: Duration,
    pub elapsed: Duration,
    /// The same story per API: v2 and v3 merchants side by side.
    pub by_api: Vec<ApiSummary>,
    /// Refunds of some settled orders, their answers and notifications lost: found by polling.
    pub refunds: RefundSummary,
    /// The day's bills, reconciled after the daemon stopped, with one planted discrepancy of
    /// each kind.
    pub bills: BillSummary,
}

/// The demo's daily bills: every merchant's bill of the day against the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BillSummary {
    /// Rows in the bills.
    pub rows: i64,
    /// Findings by kind, over every merchant.
    pub findings: Vec<(FindingKind, i64)>,
}

/// The demo's refunds: requested (the shop registered them), and what polling found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefundSummary {
    pub requested: u32,
    pub succeeded: i64,
    pub abnormal: i64,
    /// Orders moved SUCCESS -> REFUND by a refund.
    pub orders_refunded: i64,
}

/// The demo's orders of one API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSummary {
    pub api: Api,
    pub orders: u32,
    pub paid: u32,
    pub settled_success: i64,
    pub settled_by_notify: i64,
}

impl std::fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "orders                      {:>8}", self.orders)?;
        writeln!(f, "paid                        {:>8}", self.paid)?;
        writeln!(f, "  notification delivered    {:>8}", self.notified)?;
        writeln!(
            f,
            "  notification lost         {:>8}",
            self.paid - self.notified
        )?;
        writeln!(
            f,
            "  of which a wrong amount   {:>8}",
            self.mismatched_payments
        )?;
        writeln!(f, "settled as SUCCESS          {:>8}", self.settled_success)?;
        writeln!(
            f,
            "  settled by notification   {:>8}",
            self.settled_by_notify
        )?;
        writeln!(f, "quarantined AMOUNT_MISMATCH {:>8}", self.quarantined)?;
        writeln!(f, "still open (never paid)     {:>8}", self.still_open)?;
        writeln!(f, "WeChat queries spent        {:>8}", self.wechat_queries)?;
        writeln!(
            f,
            "payment -> settlement       p50 {:.2}s  p99 {:.2}s",
            self.settle_p50.as_secs_f64(),
            self.settle_p99.as_secs_f64()
        )?;
        writeln!(
            f,
            "took                        {:.1}s",
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "refunds requested           {:>8}",
            self.refunds.requested
        )?;
        writeln!(
            f,
            "  refunded (by polling)     {:>8}",
            self.refunds.succeeded
        )?;
        writeln!(
            f,
            "  ABNORMAL (person acts)    {:>8}",
            self.refunds.abnormal
        )?;
        writeln!(
            f,
            "  orders now REFUND         {:>8}",
            self.refunds.orders_refunded
        )?;
        writeln!(f, "daily bills (rows)          {:>8}", self.bills.rows)?;
        for (kind, n) in &self.bills.findings {
            writeln!(f, "  {:<25} {:>8}", kind.as_str(), n)?;
        }
        write!(f, "by API       orders     paid  settled  by notification")?;
        for a in &self.by_api {
            write!(
                f,
                "\n  {:<6} {:>10} {:>8} {:>8} {:>16}",
                a.api, a.orders, a.paid, a.settled_success, a.settled_by_notify
            )?;
        }
        Ok(())
    }
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo: {0}")]
    Io(#[from] std::io::Error),
    #[error("demo: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("demo: {0}")]
    Daemon(#[from] crate::daemon::DaemonError),
    #[error("demo: {0}")]
    Sim(#[from] crate::sim::SimError),
    #[error("demo: not every paid order settled within {0:?}")]
    Timeout(Duration),
    #[error("demo: {0}")]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error("demo: the bill run: {0}")]
    Bill(String),
}

/// The settings the demo runs the daemon with: fast ticks, a short grace.
pub fn demo_settings(db: PathBuf, sim_url: String, metrics: SocketAddr) -> Settings {
    let mut settings = sim::daemon_settings(&format!("sqlite://{}", db.display()), &sim_url);
    settings.path = PathBuf::from("(demo defaults)");
    settings.database.max_connections = 4;
    settings.wechat.max_qps = 5000;
    settings.wechat.concurrency = 32;
    settings.schedule.grace_seconds = 2;
    settings.schedule.batch_size = 200;
    settings.metrics.listen = metrics;
    settings.notify.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    // Bills on: at start the daemon catches up the (quiet) past days; the demo's own day is
    // reconciled at its end.
    settings.bills.enabled = true;
    settings
}

/// Runs the demo; `stop` ends `--serve` (and cuts the demo short).
pub async fn run(options: &DemoOptions, stop: CancellationToken) -> Result<DemoSummary, DemoError> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let simulator = RunningSimulator::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        sim::default_merchants(),
    )?;
    let ephemeral = SocketAddr::from(([127, 0, 0, 1], 0));
    let settings = demo_settings(dir.path().join("demo.db"), simulator.base_url(), ephemeral);
    open_store(&settings, true).await?.migrate().await?;
    let store = open_store(&settings, false).await?;
    let daemon_stop = stop.child_token();
    let daemon = Daemon::start(&settings, daemon_stop.clone()).await?;
    let notify_base = daemon.notify_addr.map(|a| format!("http://{a}"));
    let daemon_task = tokio::spawn(daemon.wait());

    let plan = register_orders(&store, &simulator.state, options.orders, notify_base).await?;
    let tally = Tally::of(&plan);
    let payer = spawn_payer(simulator.state.clone(), plan);
    wait_until_settled(&store, tally.paid, started, &stop).await?;
    let paid_at = payer.await.map_err(std::io::Error::other)?;
    let mut summary = summarize(&store, options, &tally, &paid_at, &simulator, started).await?;
    summary.refunds = refund_some(&store, &simulator.state, &stop).await?;
    // The bills after the daemon stopped: what it would have found by polling is the bill's.
    daemon_stop.cancel();
    match daemon_task.await {
        Ok(result) => result?,
        Err(e) => return Err(std::io::Error::other(e).into()),
    }
    if !stop.is_cancelled() {
        summary.bills = reconcile_bills(&settings, &store, &simulator.state).await?;
    }
    if let Some(addr) = options.serve
        && !stop.is_cancelled()
    {
        // A daemon on the same database, serving the metrics of all of it (the bill gauges
        // too) on ADDR until stopped.
        let mut serving = settings.clone();
        serving.metrics.listen = addr;
        let daemon = Daemon::start(&serving, stop.child_token()).await?;
        println!("{summary}");
        println!(
            "\nserving http://{}/metrics until Ctrl-C",
            daemon.metrics_addr
        );
        daemon.wait().await?;
    }
    simulator.shutdown(Duration::from_secs(2)).await?;
    Ok(summary)
}

/// The day's bill of every merchant, after one discrepancy of each kind was planted for the
/// first one (nothing polls any more: the daemon stopped): a payment whose notification and
/// queries were lost (`settled_by_bill`), one of another amount (`amount_diff`), one the
/// shop's table lacks (`remote_only`), an order the shop marked paid that WeChat never saw
/// (`local_only`), a payment of an order closed here (`paid_after_close`), and a refund closed
/// here that succeeded at WeChat (`state_diff`).
async fn reconcile_bills(
    settings: &Settings,
    store: &Store,
    state: &Arc<SimState>,
) -> Result<BillSummary, DemoError> {
    let merchants = sim::default_merchants();
    let Some(m) = merchants.first() else {
        return Ok(BillSummary::default());
    };
    let (mch, appid) = (m.mch_id.as_str(), m.appid.as_str());
    let now = Utc::now();
    let register = async |otn: &str, fee: i64| -> Result<(), DemoError> {
        store
            .insert_order(&NewOrder {
                mch_id: mch,
                appid,
                out_trade_no: otn,
                total_fee: fee,
            })
            .await?;
        state.create_order(mch, otn, fee, None, None)?;
        Ok(())
    };
    register("bill-lost", 1200).await?;
    state.pay_at(mch, "bill-lost", None, Some(now), false)?;
    register("bill-wrong-amount", 1500).await?;
    state.pay_at(mch, "bill-wrong-amount", Some(1499), Some(now), false)?;
    state.create_order(mch, "bill-unknown-here", 800, None, None)?;
    state.pay_at(mch, "bill-unknown-here", None, Some(now), false)?;
    // The shop's own handler marks an order paid that nobody paid.
    register("bill-phantom", 990).await?;
    shop_moves(store, mch, "bill-phantom", OrderState::Success, Some(now)).await?;
    // Closed here, then paid at WeChat.
    register("bill-paid-after-close", 700).await?;
    shop_moves(
        store,
        mch,
        "bill-paid-after-close",
        OrderState::Closed,
        None,
    )
    .await?;
    state.pay_at(mch, "bill-paid-after-close", None, Some(now), false)?;
    // A refund that succeeded at WeChat, closed here by the shop.
    if let Some(order) = store
        .find_by_state(OrderState::Success, 100_000)
        .await?
        .into_iter()
        .find(|o| o.mch_id.as_str() == mch)
    {
        let otn = order.out_trade_no.as_str();
        state.create_refund(
            mch,
            otn,
            "bill-refund-closed-here",
            1,
            RefundStatus::Success,
            false,
        )?;
        store
            .insert_refund(mch, otn, "bill-refund-closed-here", 1)
            .await?;
        if let Some(row) = store.find_refund(mch, "bill-refund-closed-here").await? {
            let change = RefundChange::Finish {
                outcome: RefundOutcome {
                    to: RefundState::Closed,
                    refund_id: None,
                    success_time: None,
                    recv_account: None,
                    reported_fee: None,
                    detail: Some("closed by the shop".into()),
                },
                source: Source::Manual,
            };
            let guard = RefundGuard {
                refund_id: row.id,
                lease: None,
            };
            store.apply_refund(guard, &change, Utc::now()).await?;
        }
    }
    let telemetry = Telemetry::new(merchants.iter().map(|m| m.mch_id.as_str()));
    let gateway = Arc::new(Gateway::new(settings.wechat.client_config())?);
    for m in &merchants {
        if m.v3_credentials().is_some()
            && let Err(error) = gateway.download_certificates(m).await
        {
            // Public-key mode needs none; the public key still verifies the bill's answer.
            tracing::warn!(%error, mch_id = m.mch_id.as_str(), "platform certificates not downloaded");
        }
    }
    let runner = bill_runner(settings, store.clone(), Some(gateway), telemetry);
    let mut summary = BillSummary {
        rows: 0,
        findings: FindingKind::ALL.iter().map(|k| (*k, 0)).collect(),
    };
    let today = beijing_today(Utc::now());
    for m in &merchants {
        let req = DayRequest {
            merchant: m,
            bill_date: today,
            input: BillInput::Download,
            force: true,
        };
        let outcome = runner
            .run_day(&req, &CancellationToken::new())
            .await
            .map_err(|e| DemoError::Bill(e.to_string()))?;
        match outcome {
            DayOutcome::Reconciled(day) => {
                summary.rows += day.totals.rows;
                for (kind, n) in &mut summary.findings {
                    *n += day.count(*kind);
                }
            }
            other => return Err(DemoError::Bill(format!("{}: {other:?}", m.mch_id))),
        }
    }
    Ok(summary)
}

/// What the shop's own handler does: moves an order itself.
async fn shop_moves(
    store: &Store,
    mch_id: &str,
    out_trade_no: &str,
    to: OrderState,
    paid_at: Option<DateTime<Utc>>,
) -> Result<(), DemoError> {
    let Some(row) = store.find_order(mch_id, out_trade_no).await? else {
        return Ok(());
    };
    let change = Change::Settle {
        settlement: Settlement {
            to,
            transaction_id: None,
            paid_at,
            reported_fee: None,
            detail: Some("the shop's handler".into()),
        },
        source: Source::Manual,
    };
    let guard = Guard {
        order_id: row.id,
        from: row.state,
        lease: None,
    };
    store.apply(&row, guard, &change, Utc::now()).await?;
    Ok(())
}

/// One settled order in ten is refunded at WeChat (one refund in ten of them cannot reach the
/// payer: ABNORMAL); the refund's answer and notification are lost, the shop registers it, and
/// the scan finds out what became of it.
async fn refund_some(
    store: &Store,
    state: &SimState,
    stop: &CancellationToken,
) -> Result<RefundSummary, DemoError> {
    let mut summary = RefundSummary::default();
    for row in store.find_by_state(OrderState::Success, 100_000).await? {
        if rand::random_range(0..10) != 0 {
            continue;
        }
        let fee = row.total_fee.get();
        let partial = (fee / 2).max(1);
        let orn = format!("R{}", row.out_trade_no);
        let status = if rand::random_range(0..10) == 0 {
            crate::domain::RefundStatus::Abnormal
        } else {
            crate::domain::RefundStatus::Success
        };
        state.create_refund(
            row.mch_id.as_str(),
            row.out_trade_no.as_str(),
            &orn,
            partial,
            status,
            false,
        )?;
        store
            .insert_refund(
                row.mch_id.as_str(),
                row.out_trade_no.as_str(),
                &orn,
                partial,
            )
            .await?;
        summary.requested += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts = store.count_refunds_by_state().await?;
        let of = |s: crate::domain::RefundState| {
            counts
                .iter()
                .find(|(st, _)| *st == s)
                .map_or(0, |(_, n)| *n)
        };
        summary.succeeded = of(crate::domain::RefundState::Success);
        summary.abnormal = of(crate::domain::RefundState::Abnormal);
        if summary.succeeded + summary.abnormal >= i64::from(summary.requested)
            || stop.is_cancelled()
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(DemoError::Timeout(Duration::from_secs(60)));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    summary.orders_refunded = store
        .count_by_state()
        .await?
        .iter()
        .find(|(s, _)| *s == OrderState::Refund)
        .map_or(0, |(_, n)| *n);
    Ok(summary)
}

/// The shop registers its orders (and WeChat knows them through unifiedorder); each gets its
/// customer's plan.
async fn register_orders(
    store: &Store,
    state: &SimState,
    orders: u32,
    notify_base: Option<String>,
) -> Result<Vec<Planned>, DemoError> {
    // Every test merchant: two v2 ones and a v3 one, side by side.
    let merchants = sim::default_merchants();
    let mut plan: Vec<Planned> = Vec::new();
    for i in 0..orders {
        let m = &merchants[i as usize % merchants.len()];
        let otn = format!("demo{i:07}");
        let fee = rand::random_range(1..=50_000i64);
        store
            .insert_order(&NewOrder {
                mch_id: m.mch_id.as_str(),
                appid: m.appid.as_str(),
                out_trade_no: &otn,
                total_fee: fee,
            })
            .await?;
        let path = match m.api() {
            Api::V2 => crate::notify::NOTIFY_PATH,
            Api::V3 => crate::notify::V3_NOTIFY_PATH,
        };
        let notify_url = notify_base.as_ref().map(|b| format!("{b}{path}"));
        state.create_order(m.mch_id.as_str(), &otn, fee, notify_url, None)?;
        plan.push(Planned::draw(m.mch_id.to_string(), m.api(), otn, fee));
    }
    Ok(plan)
}

/// What the plan holds: paid orders, their notifications that get through, wrong amounts.
struct Tally {
    paid: u32,
    notified: u32,
    mismatched: u32,
    /// Orders and paid orders of each API.
    by_api: Vec<(Api, u32, u32)>,
}

impl Tally {
    fn of(plan: &[Planned]) -> Tally {
        let paid = plan.iter().filter(|p| p.pay_after.is_some()).count() as u32;
        let notified = plan
            .iter()
            .filter(|p| p.pay_after.is_some() && p.notify)
            .count() as u32;
        let mismatched = plan
            .iter()
            .filter(|p| p.pay_after.is_some() && p.wrong_amount)
            .count() as u32;
        let by_api = Api::ALL
            .iter()
            .map(|api| {
                let of = plan.iter().filter(|p| p.api == *api);
                let orders = of.clone().count() as u32;
                let paid = of.filter(|p| p.pay_after.is_some()).count() as u32;
                (*api, orders, paid)
            })
            .collect();
        Tally {
            paid,
            notified,
            mismatched,
            by_api,
        }
    }
}

/// The customers pay, each at their time; most notifications are lost. Answers when each
/// order was paid.
fn spawn_payer(
    state: Arc<SimState>,
    mut payments: Vec<Planned>,
) -> tokio::task::JoinHandle<HashMap<String, DateTime<Utc>>> {
    let pay_started = Instant::now();
    payments.sort_by_key(|p| p.pay_after);
    tokio::spawn(async move {
        let mut paid_at: HashMap<String, DateTime<Utc>> = HashMap::new();
        for p in payments {
            let Some(after) = p.pay_after else { continue };
            tokio::time::sleep_until((pay_started + after).into()).await;
            let amount = p.wrong_amount.then_some(p.fee + 1);
            if let Ok(paid) = state.pay(&p.mch_id, &p.out_trade_no, amount, p.notify) {
                paid_at.insert(p.out_trade_no, paid.time_end);
            }
        }
        paid_at
    })
}

/// Shows the progress until every paid order is settled (or `stop`), at most 120 s after the
/// demo started.
async fn wait_until_settled(
    store: &Store,
    paid: u32,
    started: Instant,
    stop: &CancellationToken,
) -> Result<(), DemoError> {
    let progress = Progress::new(u64::from(paid));
    let deadline = Duration::from_secs(120);
    let settled_states = [OrderState::Success, OrderState::AmountMismatch];
    loop {
        let counts = store.count_by_state().await?;
        let settled: i64 = counts
            .iter()
            .filter(|(s, _)| settled_states.contains(s))
            .map(|(_, n)| n)
            .sum();
        progress.set(settled as u64);
        if settled >= i64::from(paid) || stop.is_cancelled() {
            break;
        }
        if started.elapsed() > deadline {
            return Err(DemoError::Timeout(deadline));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    progress.finish();
    Ok(())
}

/// The summary, from the store's counts and events and the simulator's request count.
async fn summarize(
    store: &Store,
    options: &DemoOptions,
    tally: &Tally,
    paid_at: &HashMap<String, DateTime<Utc>>,
    simulator: &RunningSimulator,
    started: Instant,
) -> Result<DemoSummary, DemoError> {
    let (mut delays, by_notify, by_api) = settle_delays(store, paid_at).await?;
    delays.sort();
    let pct = |q: f64| {
        delays
            .get(((delays.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    let counts = store.count_by_state().await?;
    let count = |s: OrderState| {
        counts
            .iter()
            .find(|(st, _)| *st == s)
            .map_or(0, |(_, n)| *n)
    };
    Ok(DemoSummary {
        orders: options.orders,
        paid: tally.paid,
        notified: tally.notified,
        mismatched_payments: tally.mismatched,
        settled_success: count(OrderState::Success),
        settled_by_notify: by_notify,
        quarantined: count(OrderState::AmountMismatch),
        still_open: count(OrderState::NotPay) + count(OrderState::UserPaying),
        wechat_queries: simulator.state.requests(),
        settle_p50: pct(0.50),
        settle_p99: pct(0.99),
        elapsed: started.elapsed(),
        by_api: tally
            .by_api
            .iter()
            .map(|&(api, orders, paid)| {
                let (settled_success, settled_by_notify) =
                    by_api.get(&api).copied().unwrap_or_default();
                ApiSummary {
                    api,
                    orders,
                    paid,
                    settled_success,
                    settled_by_notify,
                }
            })
            .collect(),
        refunds: RefundSummary::default(),
        bills: BillSummary::default(),
    })
}

/// Per API: orders settled SUCCESS, and of them by a notification.
type SettledByApi = HashMap<Api, (i64, i64)>;

/// From the events: each paid order's time from payment to settlement (unsorted), how many
/// settled from a notification, and both per API.
async fn settle_delays(
    store: &Store,
    paid_at: &HashMap<String, DateTime<Utc>>,
) -> Result<(Vec<Duration>, i64, SettledByApi), DemoError> {
    let apis: HashMap<String, Api> = sim::default_merchants()
        .iter()
        .map(|m| (m.mch_id.to_string(), m.api()))
        .collect();
    let mut by_api = SettledByApi::new();
    let mut delays: Vec<Duration> = Vec::new();
    let mut by_notify = 0;
    let mut after = 0;
    loop {
        let events = store.events_after(after, 10_000).await?;
        let Some(last) = events.last() else { break };
        after = last.id;
        for e in &events {
            let success = e.to_state == crate::domain::EventTo::State(OrderState::Success);
            let notified = success && e.source == crate::domain::Source::Notify;
            if notified {
                by_notify += 1;
            }
            if success && let Some(api) = apis.get(e.mch_id.as_str()) {
                let counts = by_api.entry(*api).or_default();
                counts.0 += 1;
                counts.1 += i64::from(notified);
            }
            if let Some(p) = paid_at.get(&e.out_trade_no) {
                delays.push((e.created_at - *p).to_std().unwrap_or_default());
            }
        }
    }
    Ok((delays, by_notify, by_api))
}

/// One order of the demo and what its customer does.
#[derive(Debug, Clone)]
struct Planned {
    mch_id: String,
    api: Api,
    out_trade_no: String,
    fee: i64,
    /// When the customer pays, if ever.
    pay_after: Option<Duration>,
    /// Pays another amount than the order's.
    wrong_amount: bool,
    /// The notification reaches the daemon.
    notify: bool,
}

impl Planned {
    /// 70% are paid: most within the grace period, some later (after a NOTPAY answer); a few
    /// pay another amount. 30% are never paid.
    fn draw(mch_id: String, api: Api, out_trade_no: String, fee: i64) -> Planned {
        let roll = rand::random_range(0..1000);
        let pay_after = match roll {
            0..630 => Some(Duration::from_millis(rand::random_range(0..1500))),
            630..700 => Some(Duration::from_millis(rand::random_range(3000..8000))),
            _ => None,
        };
        let wrong_amount = pay_after.is_some() && roll % 250 == 0;
        Planned {
            mch_id,
            api,
            out_trade_no,
            fee,
            pay_after,
            wrong_amount,
            // One notification in five gets through; the rest are lost.
            notify: roll % 5 == 1,
        }
    }
}

/// A progress bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    last_line: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} reconciling [{bar:40}] {pos}/{len} paid orders settled ({elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            total,
            last_line: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn set(&self, settled: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(settled),
            None => {
                let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() >= Duration::from_secs(1) {
                    *last = Instant::now();
                    eprintln!("reconciling: {settled}/{} paid orders settled", self.total);
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

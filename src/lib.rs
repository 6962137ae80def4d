//! wxpay-reconciler: finds WeChat Pay v2 orders whose payment notification never came, asks
//! WeChat with `orderquery`, and settles them exactly once.
//!
//! Codemap (see ARCHITECTURE.md for the invariants):
//! - [`domain`]: parsed values (`Fen`, `OutTradeNo`, `MchId`, `TradeState`, `OrderState`, …).
//! - [`reconcile`]: the pure policy (`decide`, backoff, expiry), the scanner that applies it, and
//!   the one loop (`settle`) that applies a verified report from any source. It speaks only
//!   [`gateway`]'s types, never a protocol's.
//! - [`store`]: the only module with SQL (SQLite, PostgreSQL, MySQL/MariaDB).
//! - [`daemon`]: what `run` runs: named jobs (scan, gauges), the listeners, supervision of its
//!   tasks and reload, drained through one token.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`listener`]: the accept loop of both listeners: timeouts and a connection cap.
//! - [`notify`]: WeChat's notifications on their own listener: the transport, a
//!   protocol-neutral ingest of a verified payment, v2's `POST /wxpay/v2/notify` and v3's
//!   `POST /wxpay/v3/notify[/{mch_id}]`.
//! - [`gateway`]: the protocol-neutral answers, reports and errors, and `Gateway`, which
//!   dispatches each call to the merchant's protocol client.
//! - [`wxpay`]: the only module that knows XML, signing and WeChat's HTTP API.
//! - [`sim`]: a WeChat Pay server (v2 and v3) for tests, the demo, benchmarks and staging.
//! - [`config`]: the TOML file + environment overrides, validated up front.
//! - [`shutdown`]: one cancellation token for SIGTERM/SIGINT, with a drain deadline.
//! - [`telemetry`]: logging, and metrics counted where they are logged.
//! - [`text`]: how much of an outside value a message, a log line or a stored note quotes.

pub mod bill;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod domain;
pub mod gateway;
pub mod http;
pub mod listener;
pub mod notify;
pub mod reconcile;
pub mod shutdown;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod wxpay;

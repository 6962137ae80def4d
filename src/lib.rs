//! wxpay-reconciler: finds WeChat Pay v2 orders whose payment notification never came, asks
//! WeChat with `orderquery`, and settles them exactly once.
//!
//! Codemap (see ARCHITECTURE.md for the invariants):
//! - [`domain`]: parsed values (`Fen`, `OutTradeNo`, `MchId`, `TradeState`, …).
//! - [`wxpay`]: the only module that knows XML, signing and WeChat's HTTP API.
//! - [`sim`]: a WeChat Pay v2 server for tests, the demo, benchmarks and staging.
//! - [`config`]: the TOML file + environment overrides, validated up front.
//! - [`shutdown`]: one cancellation token for SIGTERM/SIGINT, with a drain deadline.
//! - [`telemetry`]: logging setup.

pub mod config;
pub mod domain;
pub mod shutdown;
pub mod sim;
pub mod telemetry;
pub mod wxpay;

//! The one integration test binary (one link step on a 2-core machine).

mod billfetch;
mod billparse;
mod bills;
mod billstore;
mod cli;
mod client;
mod daemon;
mod db;
mod engine;
mod fixtures;
mod frame;
mod helpers;
mod hostile;
mod interop;
mod lifecycle;
mod process;
mod refundnotify;
mod refunds;
mod refundsim;
mod simulator;
mod v3client;
mod v3notify;
mod v3sim;
mod v3vectors;

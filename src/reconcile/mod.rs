//! Reconciliation: the pure policy, the scanner that applies it, and the one loop that applies
//! a verified report from any source (notification, manual query, a poll that lost a race).

pub mod bill_compare;
pub mod bills;
pub mod policy;
pub mod refund_policy;
pub mod refund_scan;
pub mod scanner;
pub mod settle;

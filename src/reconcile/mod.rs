//! Reconciliation: the pure policy, the scanner that applies it, and the scheduler that drives
//! the scanner.

pub mod policy;
pub mod scanner;

//! The bill text as a stream of [`BillRow`]s (stub: the parser lands with issue 16).

use std::io::BufRead;

use super::{BillError, BillRow, BillType, Family, Summary};

/// Reads a bill line by line: [`BillReader::new`] reads the header, [`BillReader::next_row`]
/// each data line, and after the last row [`BillReader::summary`] / [`BillReader::check`]
/// tell the summary and whether the rows add up to it.
pub struct BillReader<R> {
    #[allow(dead_code)]
    reader: R,
}

/// The summary against the rows read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SummaryCheck {
    /// Every summary value equals the value recomputed from the rows.
    AddsUp,
    /// These summary values differ from the rows (e.g. `总交易单数 says 48, the rows are 1`).
    Differs(Vec<String>),
    /// The file ended without a summary.
    Missing,
}

impl<R: BufRead> BillReader<R> {
    pub fn new(reader: R) -> Result<Self, BillError> {
        Ok(BillReader { reader })
    }

    pub fn bill_type(&self) -> BillType {
        BillType::All
    }

    pub fn family(&self) -> Family {
        Family::Current
    }

    /// The next data line; `None` after the last (the summary is then read).
    pub fn next_row(&mut self) -> Result<Option<BillRow>, BillError> {
        Err(BillError::Format {
            line: 1,
            reason: "not implemented".into(),
        })
    }

    /// The summary, once [`Self::next_row`] returned `None`.
    pub fn summary(&self) -> Option<&Summary> {
        None
    }

    /// The summary against the rows, once [`Self::next_row`] returned `None`.
    pub fn check(&self) -> SummaryCheck {
        SummaryCheck::Missing
    }
}

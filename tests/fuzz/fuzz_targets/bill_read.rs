//! Fuzzes the daily bill's reader on downloaded bytes (plain or gzip): the header, every row,
//! the summary and its check. None may panic; every error names a line; every text a row holds
//! stays within its bound.
//!
//!   cargo +nightly fuzz run --fuzz-dir tests/fuzz bill_read \
//!       tests/fuzz/corpus/bill_read tests/fixtures/wxpay-bills

#![no_main]

use libfuzzer_sys::fuzz_target;
use wxpay_reconciler::bill::{BillReader, MAX_TEXT_CHARS, open_text};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = open_text(data) else { return };
    let mut reader = match BillReader::new(text) {
        Ok(r) => r,
        Err(_) => return,
    };
    // At most as many rows as lines: the reader never loops on its own.
    for _ in 0..=data.len() {
        match reader.next_row() {
            Ok(Some(row)) => {
                for t in [&row.out_trade_no, &row.transaction_id, &row.trade_state, &row.mch_id] {
                    assert!(t.chars().count() <= MAX_TEXT_CHARS);
                }
            }
            Ok(None) => {
                let _ = reader.check();
                return;
            }
            Err(_) => return,
        }
    }
    panic!("more rows than lines");
});

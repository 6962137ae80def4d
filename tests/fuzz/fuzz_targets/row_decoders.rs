//! Fuzzes the decoders of values the merchant's application writes into `wxpay_orders`:
//! SQLite's timestamp text (`parse_sqlite_time`) and PostgreSQL's binary `TIMESTAMPTZ`
//! (`PgTime::from_binary`), and the bounded note every stored text goes through. None may
//! panic; a SQLite time that parses must read back the same from the daemon's own form.
//!
//!   cargo +nightly fuzz run --fuzz-dir tests/fuzz row_decoders tests/fuzz/corpus/row_decoders

#![no_main]

use libfuzzer_sys::fuzz_target;
use wxpay_reconciler::store::{PgTime, parse_sqlite_time};
use wxpay_reconciler::text::{MAX_NOTE_CHARS, note};

fuzz_target!(|data: &[u8]| {
    let _ = PgTime::from_binary(data);
    if data.len() >= 8 {
        let _ = PgTime::from_binary(&data[..8]);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = parse_sqlite_time(text) {
        // The daemon writes milliseconds; what it writes it reads back.
        let written = t.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
        if let Ok(again) = parse_sqlite_time(&written) {
            assert_eq!(again.timestamp_millis(), t.timestamp_millis(), "{text:?} -> {written:?}");
        }
    }
    let n = note(text);
    assert!(n.chars().count() <= MAX_NOTE_CHARS);
});

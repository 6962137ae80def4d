//! Fuzzes the strict WeChat Pay v2 XML decoder and everything that reads its output: the
//! signature check (both sign types), the envelope check and the trade-report parser. Decoded
//! fields must also survive `encode` → `decode` unchanged, in the same order.
//!
//! Run from the repository root (needs cargo-fuzz and a nightly toolchain):
//!   cargo +nightly fuzz run --fuzz-dir tests/fuzz decode_verify \
//!       tests/fuzz/corpus/decode_verify tests/fuzz/seeds/decode_verify

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use wxpay_reconciler::domain::{AppId, MchId};
use wxpay_reconciler::wxpay::SignType;
use wxpay_reconciler::wxpay::client::{parse_trade_report, verify_envelope};
use wxpay_reconciler::wxpay::sign::verify;
use wxpay_reconciler::wxpay::xml::{decode, encode};
use wxpay_reconciler::wxpay::{ApiKey, Merchant};

/// The key of WeChat's published signing example (the one the VALID fixtures are signed with).
const TEST_KEY: &str = "192006250b4c09247ec02edce69f6a2d";

static MERCHANT: LazyLock<Merchant> = LazyLock::new(|| Merchant::v2(
    MchId::parse("10000100").expect("test mch_id"),
    AppId::parse("wx2421b1c4370ec43b").expect("test appid"),
    SignType::Md5,
    ApiKey::parse(TEST_KEY).expect("test key"),
));

fuzz_target!(|data: &[u8]| {
    let Ok(fields) = decode(data) else {
        return;
    };
    let merchant = &*MERCHANT;

    let _ = verify(&fields, merchant.v2_key(), SignType::Md5);
    let _ = verify(&fields, merchant.v2_key(), SignType::HmacSha256);
    let _ = verify_envelope(merchant, &fields);
    let _ = parse_trade_report(&fields);

    // Whatever the decoder accepts, the encoder can write, and reading it back gives the same
    // fields. `Fields` equality ignores order, so the order is checked separately.
    let encoded = match encode(&fields) {
        Ok(encoded) => encoded,
        Err(e) => panic!("decoded fields {fields:?} do not encode: {e}"),
    };
    let again = decode(encoded.as_bytes());
    assert_eq!(again, Ok(fields.clone()), "round trip through {encoded:?}");
    let again = again.unwrap();
    assert!(
        again.iter().eq(fields.iter()),
        "round trip through {encoded:?} reordered the fields"
    );
});

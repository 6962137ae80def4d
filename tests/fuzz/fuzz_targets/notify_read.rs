//! Fuzzes what the notify endpoint does with a body before any database is involved:
//! `read_notification` (strict decode, return_code, the merchant's key under each accepted
//! sign type, appid / mch_id / sub_mch_id, the payment fields) for an MD5 and an HMAC-SHA256
//! merchant, the FAIL answer built from its error, and the bounded quote a refusal logs. None
//! may panic; the answer must decode as WeChat's XML; the quote must stay bounded.
//!
//!   cargo +nightly fuzz run --fuzz-dir tests/fuzz notify_read \
//!       tests/fuzz/corpus/notify_read tests/fuzz/seeds/decode_verify

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use wxpay_reconciler::domain::{AppId, MchId};
use wxpay_reconciler::wxpay::SignType;
use wxpay_reconciler::text::{MAX_QUOTE_CHARS, quote_bytes};
use wxpay_reconciler::wxpay::notify::{answer_fail, read_notification};
use wxpay_reconciler::wxpay::xml::decode;
use wxpay_reconciler::wxpay::{ApiKey, Merchant};

static MERCHANTS: LazyLock<[Merchant; 2]> = LazyLock::new(|| {
    [
        Merchant::v2(
            MchId::parse("10000100").expect("test mch_id"),
            AppId::parse("wxd930ea5d5a258f4f").expect("test appid"),
            SignType::Md5,
            ApiKey::parse("192006250b4c09247ec02edce69f6a2d").expect("test key"),
        ),
        Merchant::v2(
            MchId::parse("1900000109").expect("test mch_id"),
            AppId::parse("wx2421b1c4370ec43b").expect("test appid"),
            SignType::HmacSha256,
            ApiKey::parse("8934e7d15453e97507ef794cf7b0519d").expect("test key"),
        ),
    ]
});

fuzz_target!(|data: &[u8]| {
    let merchants = &*MERCHANTS;
    let result = read_notification(data, |m| merchants.iter().find(|x| &x.mch_id == m));
    if let Err(e) = result {
        let answer = answer_fail(&e.to_string());
        let fields = decode(answer.as_bytes()).expect("a FAIL answer is WeChat's XML");
        assert_eq!(fields.get("return_code"), Some("FAIL"));
    }
    let quoted = quote_bytes(data);
    assert!(quoted.chars().count() <= MAX_QUOTE_CHARS * 12 + 40, "{quoted}");
    assert!(!quoted.contains('\n') && !quoted.contains('\r'));
});

//! Every XML body of ../shared/fixtures/wxpay-v2 (copied verbatim into tests/fixtures), used the
//! way its README says: VALID ones decode and verify, INVALID ones decode but fail verification,
//! `neg_*` ones are rejected by the decoder, the FAIL body is a return_code FAIL without a sign.

use std::collections::BTreeSet;
use std::path::Path;

use wxpay_reconciler::domain::TradeState;
use wxpay_reconciler::wxpay::SignType;
use wxpay_reconciler::wxpay::client::verify_envelope;
use wxpay_reconciler::wxpay::notify::parse_payment;
use wxpay_reconciler::wxpay::sign::verify;
use wxpay_reconciler::wxpay::{
    ApiKey, OrderRef, QueryAnswer, SignError, WxPayError, XmlError, xml::decode,
};

use crate::helpers::{MD5_KEY, client_for, fixture, fixtures_dir, merchant, otn, replay_server};

#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Decodes and verifies (MD5, the README's key).
    Valid,
    /// Decodes, but the signature must be rejected.
    Invalid,
    /// Decodes; signed with a key nobody published, so it cannot verify with ours.
    Unverifiable,
    /// Decodes, carries no signature.
    Unsigned,
    /// The decoder must refuse it.
    Rejected(fn(&XmlError) -> bool),
}

const FIXTURES: &[(&str, Expect)] = &[
    ("orderquery_request_elixir_wechat_pay.xml", Expect::Valid),
    (
        "orderquery_response_success_elixir_wechat_pay.xml",
        Expect::Valid,
    ),
    ("closeorder_request_elixir_wechat_pay.xml", Expect::Valid),
    (
        "closeorder_response_success_elixir_wechat_pay.xml",
        Expect::Valid,
    ),
    ("notify_success_elixir_wechat_pay.xml", Expect::Valid),
    ("notify_doc_vector_skit.xml", Expect::Valid),
    ("notify_return_fail_elixir_wechat_pay.xml", Expect::Unsigned),
    (
        "notify_success_official_doc_sample_wechatpay_php.xml",
        Expect::Unverifiable,
    ),
    (
        "orderquery_response_success_official_doc_sample_wxjava.xml",
        Expect::Unverifiable,
    ),
    (
        "orderquery_response_success_coupons_wxjava.xml",
        Expect::Invalid,
    ),
    ("notify_success_coupons_wxjava.xml", Expect::Invalid),
    (
        "orderquery_request_official_doc_sample.xml",
        Expect::Unverifiable,
    ),
    (
        "sandbox_getsignkey_request_elixir_wechat_pay.xml",
        Expect::Unverifiable,
    ),
    (
        "sandbox_getsignkey_response_elixir_wechat_pay.xml",
        Expect::Unsigned,
    ),
    (
        "neg_xxe_injection_wechatpay_php.xml",
        Expect::Rejected(|e| matches!(e, XmlError::Doctype)),
    ),
    (
        "neg_xxe_doctype_wxjava.xml",
        Expect::Rejected(|e| matches!(e, XmlError::Doctype)),
    ),
    (
        "neg_malformed_bad_entity_wechatpay_php.xml",
        Expect::Rejected(|e| matches!(e, XmlError::WrongRoot(_) | XmlError::Malformed { .. })),
    ),
    (
        "neg_root_not_xml_fragment_injection_wechatpay_php.xml",
        Expect::Rejected(|e| matches!(e, XmlError::WrongRoot(_))),
    ),
];

fn doc_key() -> ApiKey {
    ApiKey::parse(MD5_KEY).unwrap()
}

#[test]
fn every_fixture_file_is_covered() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".xml"))
        .collect();
    let listed: BTreeSet<String> = FIXTURES.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        on_disk, listed,
        "a fixture was added or removed: classify it here"
    );
}

#[test]
fn fixtures_are_a_verbatim_copy_of_the_shared_ones() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/wxpay-v2");
    if !shared.is_dir() {
        eprintln!("../shared is not beside this clone; comparing nothing");
        return;
    }
    for (name, _) in FIXTURES {
        let theirs = std::fs::read(shared.join(name)).unwrap();
        assert_eq!(fixture(name), theirs, "{name} differs from ../shared");
    }
}

#[test]
fn each_fixture_decodes_verifies_or_is_rejected_as_its_readme_says() {
    for (name, expect) in FIXTURES {
        let body = fixture(name);
        let decoded = decode(&body);
        match expect {
            Expect::Rejected(is_expected) => match decoded {
                Err(e) => assert!(is_expected(&e), "{name}: rejected, but as {e:?}"),
                Ok(f) => panic!("{name}: must be rejected, decoded {f:?}"),
            },
            Expect::Valid => {
                let f = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(verify(&f, &doc_key(), SignType::Md5), Ok(()), "{name}");
            }
            Expect::Invalid => {
                let f = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(
                    verify(&f, &doc_key(), SignType::Md5),
                    Err(SignError::Invalid),
                    "{name}"
                );
            }
            Expect::Unverifiable => {
                let f = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(f.get_nonempty("sign").is_some(), "{name} carries a sign");
                assert_eq!(
                    verify(&f, &doc_key(), SignType::Md5),
                    Err(SignError::Invalid),
                    "{name}"
                );
            }
            Expect::Unsigned => {
                let f = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(f.get("sign"), None, "{name}");
                assert_eq!(
                    verify(&f, &doc_key(), SignType::Md5),
                    Err(SignError::Missing),
                    "{name}"
                );
            }
        }
    }
}

#[test]
fn decoding_keeps_every_field_including_unknown_ones() {
    let f = decode(&fixture("orderquery_response_success_coupons_wxjava.xml")).unwrap();
    assert_eq!(f.len(), 26);
    assert_eq!(f.get("coupon_fee_1"), Some("200"));
    assert_eq!(f.get("attach"), Some("订单额外描述"));
    let notify = decode(&fixture("notify_success_elixir_wechat_pay.xml")).unwrap();
    assert_eq!(notify.get("sub_mch_id"), Some("10000100"));
}

#[test]
fn the_fail_notification_is_a_return_code_fail_without_signature() {
    let f = decode(&fixture("notify_return_fail_elixir_wechat_pay.xml")).unwrap();
    let m = merchant("10000100", "wx2421b1c4370ec43b", SignType::Md5, MD5_KEY);
    assert_eq!(
        verify_envelope(&m, &f),
        Err(WxPayError::ReturnFail("签名失败".into()))
    );
}

#[test]
fn the_valid_notification_is_a_verified_payment_report() {
    let f = decode(&fixture("notify_success_elixir_wechat_pay.xml")).unwrap();
    let mut m = merchant("10000100", "wx2421b1c4370ec43b", SignType::Md5, MD5_KEY);
    m.sub_mch_id = Some("10000100".parse().unwrap());
    verify_envelope(&m, &f).unwrap();
    let report = parse_payment(&f).unwrap();
    assert_eq!(report.trade_state, TradeState::Success);
    assert_eq!(report.out_trade_no.as_str(), "1409811653");
    assert_eq!(report.amount.map(|f| f.get()), Some(1));
    assert_eq!(
        report.paid_at.map(|t| t.to_rfc3339()).as_deref(),
        Some("2014-09-03T05:15:40+00:00")
    );
    // The same body with a wrong appid in the merchant's config is refused.
    let other = merchant("10000100", "wxd930ea5d5a258f4f", SignType::Md5, MD5_KEY);
    assert!(matches!(
        verify_envelope(&other, &f),
        Err(WxPayError::Mismatch { field: "appid", .. })
    ));
}

/// The real client, fed WeChat's own reply bytes over HTTP.
#[tokio::test]
async fn the_client_accepts_a_real_orderquery_reply_and_refuses_the_tampered_one() {
    let m = merchant("10000100", "wx2421b1c4370ec43b", SignType::Md5, MD5_KEY);
    let order = OrderRef::OutTradeNo(otn("1415757673"));

    let (url, server) = replay_server(
        200,
        fixture("orderquery_response_success_elixir_wechat_pay.xml"),
    )
    .await;
    let answer = client_for(&url).order_query(&m, &order).await.unwrap();
    let QueryAnswer::Order(report) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(report.trade_state, TradeState::Success);
    assert_eq!(report.amount.map(|f| f.get()), Some(1));
    assert_eq!(
        report.transaction_id.as_ref().map(|t| t.as_str()),
        Some("1008450740201411110005820873")
    );
    assert_eq!(
        report.paid_at.map(|t| t.to_rfc3339()).as_deref(),
        Some("2014-11-11T09:00:43+00:00")
    );
    server.abort();

    let (url, server) = replay_server(
        200,
        fixture("orderquery_response_success_coupons_wxjava.xml"),
    )
    .await;
    let err = client_for(&url).order_query(&m, &order).await.unwrap_err();
    assert_eq!(err, WxPayError::Sign(SignError::Invalid));
    assert_eq!(err.outcome(), "sign_invalid");
    server.abort();

    // A query for another order must not accept this reply, though it is genuine.
    let (url, server) = replay_server(
        200,
        fixture("orderquery_response_success_elixir_wechat_pay.xml"),
    )
    .await;
    let err = client_for(&url)
        .order_query(&m, &OrderRef::OutTradeNo(otn("1415757674")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            WxPayError::Mismatch {
                field: "out_trade_no",
                ..
            }
        ),
        "{err:?}"
    );
    server.abort();

    for neg in [
        "neg_xxe_injection_wechatpay_php.xml",
        "neg_root_not_xml_fragment_injection_wechatpay_php.xml",
    ] {
        let (url, server) = replay_server(200, fixture(neg)).await;
        let err = client_for(&url).order_query(&m, &order).await.unwrap_err();
        assert_eq!(err.outcome(), "malformed", "{neg}: {err:?}");
        server.abort();
    }
}

/// A genuine, correctly signed reply that lacks `trade_state` says nothing about payment: it is
/// refused as malformed, never read as paid.
#[tokio::test]
async fn a_signed_reply_without_trade_state_is_never_taken_as_paid() {
    let m = merchant("10000100", "wx2421b1c4370ec43b", SignType::Md5, MD5_KEY);
    let mut f = decode(&fixture(
        "orderquery_response_success_elixir_wechat_pay.xml",
    ))
    .unwrap();
    assert!(f.remove("trade_state").is_some());
    f.remove("sign");
    wxpay_reconciler::wxpay::sign::sign_in_place(&mut f, &doc_key(), SignType::Md5);
    verify_envelope(&m, &f).unwrap();
    let (url, server) = replay_server(
        200,
        wxpay_reconciler::wxpay::xml::encode(&f)
            .unwrap()
            .into_bytes(),
    )
    .await;
    let err = client_for(&url)
        .order_query(&m, &OrderRef::OutTradeNo(otn("1415757673")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            WxPayError::BadField {
                field: "trade_state",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.outcome(), "malformed");
    server.abort();
}

#[tokio::test]
async fn the_client_accepts_the_real_closeorder_reply() {
    let m = merchant("10000100", "wx2421b1c4370ec43b", SignType::Md5, MD5_KEY);
    let (url, server) = replay_server(
        200,
        fixture("closeorder_response_success_elixir_wechat_pay.xml"),
    )
    .await;
    let answer = client_for(&url).close_order(&m, &otn("xxx")).await.unwrap();
    assert_eq!(answer, wxpay_reconciler::wxpay::CloseAnswer::Closed);
    server.abort();
}

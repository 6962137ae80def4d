//! The WeChat Pay API v3 vectors of tests/fixtures/wxpay-v3 (see its README: what every file is
//! and proves), checked with the crate's own signing, verification, AES-GCM and certificate
//! code. The clock is always passed in: the vectors' timestamps are fixed in the past.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use wxpay_reconciler::wxpay::v3::auth::{
    MAX_SKEW_SECONDS, Request, RequestSigner, SignedHeaders, Unverified, Verified, request_message,
    response_message,
};
use wxpay_reconciler::wxpay::v3::crypto::{
    ApiV3Key, Certificate, CryptoError, PrivateKey, PublicKey, SCHEME,
};
use wxpay_reconciler::wxpay::v3::keys::{CertificateMode, WechatKeys, WechatPublicKey};

/// The public-key id the derived vectors use for public-key mode.
const PUBLIC_KEY_ID: &str = "PUB_KEY_ID_0000000000000024101100397200000006";
/// The headers a signed message cannot do without.
const REQUIRED_HEADERS: [&str; 4] = [
    "Wechatpay-Timestamp",
    "Wechatpay-Nonce",
    "Wechatpay-Signature",
    "Wechatpay-Serial",
];

fn v3_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wxpay-v3")
        .join(rel)
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(v3_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn vector(name: &str) -> Value {
    serde_json::from_slice(&read(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

fn private_key(rel: &str) -> PrivateKey {
    PrivateKey::from_pem(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn public_key(rel: &str) -> PublicKey {
    PublicKey::from_pem(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn certificate(rel: &str) -> Certificate {
    Certificate::from_pem(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn at(epoch: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(epoch, 0).unwrap()
}

fn rfc3339(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

const GO_CERT: &str = "keys/go_sdk_test_cert_F5765756002FDD77.pem";
const GO_CERT_D7CE: &str = "keys/go_sdk_test_cert_D7CE59D1F522D701.pem";
const GO_PRIVATE_KEY: &str = "keys/go_sdk_test_private_key.pem";
const GO_PUBLIC_KEY: &str = "keys/go_sdk_test_public_key.pem";
const JAVA_MERCHANT_KEY: &str = "keys/java_sdk_merchant_private_key.pem";
const JAVA_MERCHANT_CERT: &str = "keys/java_sdk_merchant_certificate.pem";
const JAVA_WECHAT_KEY: &str = "keys/java_sdk_wechat_pay_private_key.pem";
const JAVA_WECHAT_CERT: &str = "keys/java_sdk_wechat_pay_certificate.pem";
const JAVA_WECHAT_PUBLIC_KEY: &str = "keys/java_sdk_wechat_pay_public_key.pem";

/// WeChat's keys as a merchant with downloaded certificates has them: the certificate
/// `cert`, added at `now`.
fn certificate_keys(cert: &str, now: DateTime<Utc>) -> Arc<WechatKeys> {
    let keys = WechatKeys::new(None, CertificateMode::Download);
    keys.add_certificates(vec![certificate(cert)], now);
    assert!(keys.has_any(), "{cert} is valid at {now}");
    keys
}

/// WeChat's keys in public-key mode: `key` under [`PUBLIC_KEY_ID`].
fn public_key_keys(key: PublicKey) -> Arc<WechatKeys> {
    WechatKeys::new(
        Some(WechatPublicKey {
            id: PUBLIC_KEY_ID.into(),
            key,
        }),
        CertificateMode::Off,
    )
}

/// The JSON headers of a vector as an HTTP header map.
fn header_map(headers: &Value) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers.as_object().unwrap() {
        map.insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value.as_str().unwrap()).unwrap(),
        );
    }
    map
}

fn set_header(map: &mut HeaderMap, name: &'static str, value: &str) {
    map.insert(name, HeaderValue::from_str(value).unwrap());
}

fn signed(map: &HeaderMap) -> Result<SignedHeaders, Unverified> {
    SignedHeaders::from_headers(map)
}

#[test]
fn go_sdk_signature_of_source() {
    let v = vector("go_sdk_sign_source.json");
    assert_eq!(text(&v, "private_key"), GO_PRIVATE_KEY);
    let message = text(&v, "message").as_bytes();
    let signature = text(&v, "signature");
    assert_eq!(
        private_key(GO_PRIVATE_KEY).sign(message).unwrap(),
        signature,
        "PKCS#1 v1.5 is deterministic: the same signature, byte for byte"
    );
    let cert = certificate(GO_CERT);
    assert_eq!(cert.serial, text(&v, "serial"));
    for key in [cert.key, public_key(GO_PUBLIC_KEY)] {
        assert_eq!(key.verify(message, signature), Ok(()));
        assert_eq!(
            key.verify(text(&v, "must_fail_for_message").as_bytes(), signature),
            Err(CryptoError::BadSignature)
        );
    }
}

#[test]
fn java_sdk_merchant_signature() {
    let v = vector("java_sdk_merchant_sign_message.json");
    let message = text(&v, "message").as_bytes();
    let signature = text(&v, "signature");
    let key = private_key(text(&v, "private_key"));
    assert_eq!(key.sign(message).unwrap(), signature);
    let cert = certificate(text(&v, "verifies_with"));
    assert_eq!(cert.serial, text(&v, "serial"));
    assert_eq!(cert.key.verify(message, signature), Ok(()));
    assert_eq!(
        public_key(text(&v, "must_not_verify_with")).verify(message, signature),
        Err(CryptoError::BadSignature),
        "a merchant's signature does not verify with WeChat's key"
    );
}

#[test]
fn derived_request_authorizations_are_reproduced_exactly() {
    let v = vector("derived_request_authorization.json");
    let key = private_key(text(&v, "private_key"));
    let merchant_cert = certificate(JAVA_MERCHANT_CERT);
    let signer = RequestSigner {
        mch_id: text(&v, "mchid"),
        serial_no: text(&v, "serial_no"),
        key: &key,
    };
    let requests = v["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 4);
    for r in requests {
        let request = Request {
            method: text(r, "method"),
            path_and_query: text(r, "canonical_url"),
            timestamp: text(r, "timestamp").parse().unwrap(),
            nonce: text(r, "nonce_str"),
            body: text(r, "body"),
        };
        let message = request_message(
            request.method,
            request.path_and_query,
            request.timestamp,
            request.nonce,
            request.body,
        );
        assert_eq!(message, text(r, "message"));
        assert_eq!(key.sign(message.as_bytes()).unwrap(), text(r, "signature"));
        assert_eq!(
            signer.authorization(&request).unwrap(),
            text(r, "authorization"),
            "{}",
            request.path_and_query
        );
        assert_eq!(
            merchant_cert
                .key
                .verify(message.as_bytes(), text(r, "signature")),
            Ok(())
        );
    }
}

#[test]
fn derived_responses_verify_with_either_key_and_fail_as_they_should() {
    let v = vector("derived_responses_signed.json");
    assert_eq!(text(&v, "public_key_id_for_pubkey_mode"), PUBLIC_KEY_ID);
    let responses = v["responses"].as_object().unwrap();
    assert_eq!(responses.len(), 4);
    let merchant_cert = certificate(JAVA_MERCHANT_CERT);
    let wechat_key = public_key(GO_PUBLIC_KEY);
    for (name, r) in responses {
        let body = text(r, "body").as_bytes();
        let map = header_map(&r["headers"]);
        let headers = signed(&map).unwrap();
        let ts: i64 = headers.timestamp.parse().unwrap();
        let now = at(ts + 10);
        let certs = certificate_keys(GO_CERT, now);

        // The message as signed: TS\nNONCE\nBODY\n.
        let message = response_message(&headers.timestamp, &headers.nonce, body);
        assert_eq!(message, text(r, "message").as_bytes(), "{name}");
        assert_eq!(
            headers.verify(body, now, &certs),
            Ok(Verified { skew_seconds: -10 }),
            "{name}"
        );

        // Public-key mode: the same signature, the serial naming the public key.
        let mut by_id = map.clone();
        set_header(&mut by_id, "Wechatpay-Serial", PUBLIC_KEY_ID);
        let pk_keys = public_key_keys(wechat_key.clone());
        assert_eq!(
            signed(&by_id).unwrap().verify(body, now, &pk_keys),
            Ok(Verified { skew_seconds: -10 }),
            "{name}"
        );
        // The certificate's serial is unknown to a public-key-only merchant, and the other
        // way round.
        assert!(matches!(
            headers.verify(body, now, &pk_keys),
            Err(Unverified::UnknownSerial(_))
        ));
        assert!(matches!(
            signed(&by_id).unwrap().verify(body, now, &certs),
            Err(Unverified::UnknownSerial(_))
        ));

        // The trailing newline is part of what is signed.
        assert_eq!(
            wechat_key.verify(&message[..message.len() - 1], &headers.signature),
            Err(CryptoError::BadSignature),
            "{name}"
        );
        // A changed body does not verify.
        let mut changed = body.to_vec();
        changed.push(b' ');
        assert!(matches!(
            headers.verify(&changed, now, &certs),
            Err(Unverified::BadSignature(_))
        ));
        // The merchant's key in WeChat's place does not verify.
        let wrong = WechatKeys::new(
            Some(WechatPublicKey {
                id: headers.serial.clone(),
                key: merchant_cert.key.clone(),
            }),
            CertificateMode::Off,
        );
        assert!(
            matches!(
                headers.verify(body, now, &wrong),
                Err(Unverified::BadSignature(_))
            ),
            "{name}"
        );

        // The clock: at most 300 s either way.
        let certs_at = |t| certificate_keys(GO_CERT, t);
        for skew in [-MAX_SKEW_SECONDS, MAX_SKEW_SECONDS] {
            let now = at(ts - skew);
            assert_eq!(
                headers.verify(body, now, &certs_at(now)),
                Ok(Verified { skew_seconds: skew })
            );
        }
        let late = at(ts + 301);
        assert_eq!(
            headers.verify(body, late, &certs_at(late)),
            Err(Unverified::Stale { skew_seconds: -301 })
        );
        let early = at(ts - 301);
        assert_eq!(
            headers.verify(body, early, &certs_at(early)),
            Err(Unverified::Stale { skew_seconds: 301 })
        );

        // An unknown serial.
        let mut unknown = map.clone();
        set_header(&mut unknown, "Wechatpay-Serial", "0123456789ABCDEF");
        assert!(matches!(
            signed(&unknown).unwrap().verify(body, now, &certs),
            Err(Unverified::UnknownSerial(s)) if s.contains("0123456789ABCDEF")
        ));

        // The signature type: absent is fine, anything but SCHEME is refused.
        let mut no_type = map.clone();
        no_type.remove("Wechatpay-Signature-Type");
        assert_eq!(
            signed(&no_type).unwrap().verify(body, now, &certs),
            Ok(Verified { skew_seconds: -10 })
        );
        assert_eq!(
            signed(&map).unwrap().signature_type.as_deref(),
            Some(SCHEME)
        );
        for other in ["WECHATPAY2-SM2-WITH-SM3", "wechatpay2-sha256-rsa2048"] {
            let mut typed = map.clone();
            set_header(&mut typed, "Wechatpay-Signature-Type", other);
            assert_eq!(
                signed(&typed).unwrap().verify(body, now, &certs),
                Err(Unverified::SignatureType),
                "{other}"
            );
        }

        // Each required header missing.
        for header in REQUIRED_HEADERS {
            let mut missing = map.clone();
            missing.remove(header);
            assert_eq!(
                signed(&missing),
                Err(Unverified::MissingHeader(header)),
                "{name}"
            );
        }
    }
}

#[test]
fn derived_notification_verifies_and_decrypts() {
    let v = vector("derived_notify_transaction_success.json");
    let n = &v["notification"];
    assert_eq!(text(n, "method"), "POST");
    let body = text(n, "body").as_bytes();
    let map = header_map(&n["headers"]);
    let headers = signed(&map).unwrap();
    assert_eq!(
        response_message(&headers.timestamp, &headers.nonce, body),
        text(n, "message").as_bytes()
    );
    let ts: i64 = headers.timestamp.parse().unwrap();
    let now = at(ts + 10);
    let certs = certificate_keys(GO_CERT, now);
    assert_eq!(
        headers.verify(body, now, &certs),
        Ok(Verified { skew_seconds: -10 })
    );
    let mut by_id = map.clone();
    set_header(&mut by_id, "Wechatpay-Serial", PUBLIC_KEY_ID);
    let pk_keys = public_key_keys(public_key(GO_PUBLIC_KEY));
    assert_eq!(
        signed(&by_id).unwrap().verify(body, now, &pk_keys),
        Ok(Verified { skew_seconds: -10 })
    );

    // The resource decrypts to the plaintext, byte for byte.
    let envelope: Value = serde_json::from_slice(body).unwrap();
    let resource = &envelope["resource"];
    assert_eq!(text(resource, "algorithm"), "AEAD_AES_256_GCM");
    let key = ApiV3Key::new(text(n, "api_v3_key").as_bytes()).unwrap();
    let plain = key
        .decrypt(
            text(resource, "nonce"),
            text(resource, "associated_data"),
            text(resource, "ciphertext"),
        )
        .unwrap();
    assert_eq!(&plain[..], text(n, "resource_plaintext").as_bytes());
    let transaction: Value = serde_json::from_slice(&plain).unwrap();
    let expected = &n["expected"];
    for field in [
        "out_trade_no",
        "mchid",
        "appid",
        "trade_state",
        "transaction_id",
    ] {
        assert_eq!(transaction[field], expected[field], "{field}");
    }
    assert_eq!(transaction["amount"]["total"], expected["amount_total_fen"]);

    // Another APIv3 key: the tag does not match.
    let wrong = ApiV3Key::new(b"0123456789abcdefghijABCDEFGHIJ01").unwrap();
    assert_eq!(
        wrong
            .decrypt(
                text(resource, "nonce"),
                text(resource, "associated_data"),
                text(resource, "ciphertext"),
            )
            .err(),
        Some(CryptoError::Tag)
    );

    // The SIGNTEST probe: refused as a probe (not a signature failure), with either key.
    let probe_map = header_map(&v["signtest_probe_headers"]["headers"]);
    let probe = signed(&probe_map).unwrap();
    assert!(probe.signature.starts_with("WECHATPAY/SIGNTEST/"));
    assert_eq!(probe.verify(body, now, &certs), Err(Unverified::Probe));
    let mut probe_by_id = probe_map.clone();
    set_header(&mut probe_by_id, "Wechatpay-Serial", PUBLIC_KEY_ID);
    assert_eq!(
        signed(&probe_by_id).unwrap().verify(body, now, &pk_keys),
        Err(Unverified::Probe)
    );
}

#[test]
fn java_sdk_aes256gcm_vector() {
    let v = vector("java_sdk_aes256gcm_message.json");
    let key = ApiV3Key::new(text(&v, "api_v3_key").as_bytes()).unwrap();
    let (nonce, aad, ciphertext) = (
        text(&v, "nonce"),
        text(&v, "associated_data"),
        text(&v, "ciphertext"),
    );
    assert_eq!(
        &key.decrypt(nonce, aad, ciphertext).unwrap()[..],
        text(&v, "plaintext").as_bytes()
    );
    assert_eq!(
        key.encrypt(nonce, aad, text(&v, "plaintext").as_bytes())
            .unwrap(),
        ciphertext
    );
    let variants = v["must_fail"].as_array().unwrap();
    assert_eq!(variants.len(), 2);
    for variant in variants {
        let nonce = variant["nonce"].as_str().unwrap_or(nonce);
        let aad = variant["associated_data"].as_str().unwrap_or(aad);
        assert_eq!(
            key.decrypt(nonce, aad, ciphertext).err(),
            Some(CryptoError::Tag),
            "{variant}"
        );
    }
}

#[test]
fn skit_encrypted_certificate() {
    let v = vector("skit_aes256gcm_certificate.json");
    let key = ApiV3Key::new(text(&v, "api_v3_key").as_bytes()).unwrap();
    let plain = key
        .decrypt(
            text(&v, "nonce"),
            text(&v, "associated_data"),
            text(&v, "ciphertext"),
        )
        .unwrap();
    assert_eq!(&plain[..], text(&v, "plaintext").as_bytes());
    let cert = Certificate::from_pem(&plain).unwrap();
    assert_eq!(cert.serial, text(&v, "certificate_serial"));
    assert_eq!(cert.not_before, rfc3339(text(&v, "not_before")));
    assert_eq!(cert.not_after, rfc3339(text(&v, "not_after")));
}

#[test]
fn go_sdk_16_byte_keys_are_refused_and_the_payscore_signature_verifies() {
    let v = vector("go_sdk_aesgcm_16byte_key_hello_world.json");
    for k in ["key", "wrong_key_must_fail"] {
        assert_eq!(
            ApiV3Key::new(text(&v, k).as_bytes()).err(),
            Some(CryptoError::ApiV3KeyLength(16))
        );
    }

    let v = vector("go_sdk_notify_payscore_aes128.json");
    assert_eq!(
        ApiV3Key::new(text(&v, "api_v3_key").as_bytes()).err(),
        Some(CryptoError::ApiV3KeyLength(16))
    );
    let body = text(&v, "body").as_bytes();
    let map = header_map(&v["headers"]);
    let headers = signed(&map).unwrap();
    assert_eq!(headers.signature_type, None);
    let now = at(v["now_epoch_for_window_check"].as_i64().unwrap());
    let keys = certificate_keys(GO_CERT_D7CE, now);
    assert_eq!(keys.certificates()[0].serial, headers.serial);
    assert_eq!(
        headers.verify(body, now, &keys),
        Ok(Verified { skew_seconds: 0 })
    );
    let message = format!(
        "{}\n{}\n{}\n",
        headers.timestamp,
        headers.nonce,
        text(&v, "body")
    );
    assert_eq!(
        response_message(&headers.timestamp, &headers.nonce, body),
        message.as_bytes()
    );
    let key = certificate(GO_CERT_D7CE).key;
    assert_eq!(key.verify(message.as_bytes(), &headers.signature), Ok(()));
    assert_eq!(
        key.verify(&message.as_bytes()[..message.len() - 1], &headers.signature),
        Err(CryptoError::BadSignature)
    );
}

#[test]
fn java_sdk_downloaded_certificates_decrypt_to_the_expected_pem() {
    let v = vector("java_sdk_certificates_vector.json");
    let key = ApiV3Key::new(text(&v, "api_v3_key").as_bytes()).unwrap();
    let body: Value = serde_json::from_slice(&read(text(&v, "body_file"))).unwrap();
    let expected = read(text(&v, "expected_plaintext_file"));
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    for entry in data {
        let e = &entry["encrypt_certificate"];
        assert_eq!(text(e, "algorithm"), "AEAD_AES_256_GCM");
        let pem = key
            .decrypt(
                text(e, "nonce"),
                text(e, "associated_data"),
                text(e, "ciphertext"),
            )
            .unwrap();
        assert_eq!(&pem[..], &expected[..]);
        let cert = Certificate::from_pem(&pem).unwrap();
        assert_eq!(cert.serial, text(entry, "serial_no"));
        assert_eq!(cert.serial, text(&v, "serial_no"));
        assert_eq!(cert.not_before, rfc3339(text(&v, "not_before")));
        assert_eq!(cert.not_after, rfc3339(text(&v, "not_after")));
        assert_eq!(cert.not_before, rfc3339(text(entry, "effective_time")));
        assert_eq!(cert.not_after, rfc3339(text(entry, "expire_time")));
    }
}

#[test]
fn key_files_have_their_documented_serials_and_pairs() {
    for (cert, serial, private, public) in [
        (
            GO_CERT,
            "F5765756002FDD77",
            GO_PRIVATE_KEY,
            Some(GO_PUBLIC_KEY),
        ),
        (GO_CERT_D7CE, "D7CE59D1F522D701", GO_PRIVATE_KEY, None),
        (
            JAVA_MERCHANT_CERT,
            "5F1C72E2A8931B72A2E13AF8DEE92471EB397115",
            JAVA_MERCHANT_KEY,
            None,
        ),
        (
            JAVA_WECHAT_CERT,
            "440024045C4A427599D09BB4E3DE0279F2E813FD",
            JAVA_WECHAT_KEY,
            Some(JAVA_WECHAT_PUBLIC_KEY),
        ),
    ] {
        let c = certificate(cert);
        assert_eq!(c.serial, serial, "{cert}");
        assert_eq!(c.key, private_key(private).public_key(), "{cert}");
        if let Some(public) = public {
            assert_eq!(c.key, public_key(public), "{cert}");
        }
    }
    // Two different pairs: WeChat's and the merchant's keys are not the same.
    assert_ne!(
        certificate(GO_CERT).key,
        certificate(JAVA_MERCHANT_CERT).key
    );
    let go = certificate(GO_CERT);
    assert_eq!(go.not_before.date_naive().to_string(), "2021-04-27");
    assert_eq!(go.not_after.date_naive().to_string(), "2031-04-25");
}

#[test]
fn expired_certificates_are_not_used() {
    let java = certificate(JAVA_WECHAT_CERT);
    let merchant = certificate(JAVA_MERCHANT_CERT);
    assert!(
        java.not_after < rfc3339("2025-05-10T00:00:00Z"),
        "{}",
        java.not_after
    );
    assert!(merchant.not_after < rfc3339("2025-05-10T00:00:00Z"));
    let now = Utc::now();
    let keys = WechatKeys::new(None, CertificateMode::Download);
    keys.add_certificates(
        vec![java.clone(), merchant.clone(), certificate(GO_CERT)],
        now,
    );
    let held: Vec<String> = keys.certificates().into_iter().map(|c| c.serial).collect();
    assert_eq!(held, ["F5765756002FDD77"], "the expired ones are dropped");
    assert!(keys.key_for(&java.serial, now).is_none());
    assert!(!keys.knows(&java.serial));
    assert!(keys.key_for("F5765756002FDD77", now).is_some());

    // Added while valid, then expired: no longer used, and dropped at the next refresh.
    let before = java.not_after - chrono::Duration::days(1);
    let keys = WechatKeys::new(None, CertificateMode::Download);
    keys.add_certificates(vec![java.clone()], before);
    assert!(keys.key_for(&java.serial, before).is_some());
    assert!(keys.key_for(&java.serial, now).is_none());
    keys.add_certificates(vec![], now);
    assert!(keys.certificates().is_empty());
}

#[test]
fn private_keys_other_than_rsa_2048_are_refused() {
    let local = |f: &str| {
        std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/local")
                .join(f),
        )
        .unwrap()
    };
    assert_eq!(
        PrivateKey::from_pem(&local("rsa1024_test_key.pem")).err(),
        Some(CryptoError::PrivateKeySize(1024))
    );
    assert_eq!(
        PrivateKey::from_pem(&local("ec_p256_test_key.pem")).err(),
        Some(CryptoError::PrivateKeyRsa)
    );
    for garbage in [
        &b"not a key"[..],
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        &read(GO_PUBLIC_KEY),
    ] {
        assert!(
            matches!(
                PrivateKey::from_pem(garbage).err(),
                Some(CryptoError::PrivateKeyPem | CryptoError::PrivateKeyRsa)
            ),
            "{}",
            String::from_utf8_lossy(garbage)
        );
    }
    assert_eq!(
        PrivateKey::from_pem(b"not a key").err(),
        Some(CryptoError::PrivateKeyPem)
    );
    // A public key is no private key.
    assert_eq!(
        PrivateKey::from_pem(&read(GO_PUBLIC_KEY)).err(),
        Some(CryptoError::PrivateKeyPem)
    );
}

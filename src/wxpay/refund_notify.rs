//! WeChat's v2 refund notification (the body POSTed to the refund's `notify_url`): an envelope
//! (`return_code`, `appid`, `mch_id`, `nonce_str`, `req_info`) with no `sign`. `req_info` is the
//! base64 of AES-256-ECB (PKCS#7) of a `<root>` XML document, the key being the lowercase hex
//! MD5 of the merchant's API key. Its authenticity is the decryption (a wrong key leaves bad
//! padding or a document that does not parse) and the checks of the report that follow, as for
//! a refundquery answer. And the encryption, for the simulator.

use super::notify::Envelope;
use aes::Aes256;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

use super::sign::ApiKey;
use super::time::parse_wechat_datetime;
use super::xml::{self, Fields};
use crate::domain::{Currency, Fen, MchId, OutRefundNo, OutTradeNo, RefundId, RefundStatus};
use crate::gateway::merchant::Merchant;
use crate::gateway::report::RefundReport;
use crate::telemetry::NotifyOutcome;
use crate::text::quote;

const BLOCK: usize = 16;

/// The most characters kept of `refund_recv_accout` (WeChat: String(64)).
const MAX_RECV_ACCOUNT_CHARS: usize = 64;
/// The most characters kept of a refund status this version does not know.
const MAX_UNKNOWN_STATUS_CHARS: usize = 32;

/// Why a refund notification cannot be used; each maps to one `outcome` label and one generic
/// FAIL answer. The message is for the log: values from the body only through [`quote`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefundNotifyError {
    #[error("malformed refund notification: {0}")]
    Malformed(String),
    #[error("return_code FAIL: {}", quote(.0))]
    ReturnFail(String),
    #[error("merchant {} is not a configured v2 merchant", quote(.0))]
    UnknownMerchant(String),
    #[error("merchant {0}: {1}")]
    Mismatch(MchId, String),
    /// `req_info` does not decrypt with the merchant's key (or is not base64 of whole blocks).
    #[error("merchant {0}: req_info: {1}")]
    Decrypt(MchId, DecryptError),
    /// Decrypted, but not a refund report.
    #[error("merchant {0}: req_info: {1}")]
    Report(MchId, String),
}

impl RefundNotifyError {
    /// The `outcome` of `notify_requests_total`.
    pub fn outcome(&self) -> NotifyOutcome {
        match self {
            RefundNotifyError::Malformed(_) | RefundNotifyError::Report(..) => {
                NotifyOutcome::Malformed
            }
            RefundNotifyError::ReturnFail(_) => NotifyOutcome::ReturnFail,
            RefundNotifyError::UnknownMerchant(_) => NotifyOutcome::UnknownMerchant,
            RefundNotifyError::Mismatch(..) => NotifyOutcome::Mismatch,
            RefundNotifyError::Decrypt(..) => NotifyOutcome::DecryptFailed,
        }
    }

    /// What WeChat is answered: generic, the same for an unknown merchant and a wrong key.
    pub fn answer(&self) -> &'static str {
        match self {
            RefundNotifyError::Malformed(_)
            | RefundNotifyError::ReturnFail(_)
            | RefundNotifyError::Report(..) => super::notify::INVALID_NOTIFICATION,
            RefundNotifyError::UnknownMerchant(_)
            | RefundNotifyError::Mismatch(..)
            | RefundNotifyError::Decrypt(..) => super::notify::INVALID_SIGNATURE,
        }
    }

    /// The configured merchant the notification named, when it got that far.
    pub fn merchant(&self) -> Option<&MchId> {
        match self {
            RefundNotifyError::Mismatch(m, _)
            | RefundNotifyError::Decrypt(m, _)
            | RefundNotifyError::Report(m, _) => Some(m),
            _ => None,
        }
    }
}

/// Why `req_info` did not decrypt. Says nothing of the key or the plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("not base64")]
    Base64,
    #[error("not a whole number of AES blocks")]
    Length,
    #[error("bad PKCS#7 padding (a wrong key, or not WeChat's)")]
    Padding,
}

/// A decrypted, parsed refund notification and the merchant it is for.
#[derive(Debug, Clone)]
pub struct RefundNotification<'m> {
    pub merchant: &'m Merchant,
    pub report: RefundReport,
}

fn cipher(key: &ApiKey) -> Aes256 {
    let k = key.refund_notify_key();
    Aes256::new(&(*k).into())
}

/// Decrypts `req_info` with the merchant's key: base64, whole blocks, strict PKCS#7.
pub fn decrypt_req_info(req_info: &str, key: &ApiKey) -> Result<Vec<u8>, DecryptError> {
    let mut data = STANDARD
        .decode(req_info.trim().as_bytes())
        .map_err(|_| DecryptError::Base64)?;
    if data.is_empty() || data.len() % BLOCK != 0 {
        return Err(DecryptError::Length);
    }
    let aes = cipher(key);
    for chunk in data.chunks_exact_mut(BLOCK) {
        let mut block = aes::Block::default();
        block.copy_from_slice(chunk);
        aes.decrypt_block(&mut block);
        chunk.copy_from_slice(&block);
    }
    let pad = usize::from(data.last().copied().unwrap_or(0));
    if pad == 0 || pad > BLOCK || pad > data.len() {
        return Err(DecryptError::Padding);
    }
    let (plain, padding) = data.split_at(data.len() - pad);
    if !padding.iter().all(|&b| usize::from(b) == pad) {
        return Err(DecryptError::Padding);
    }
    let len = plain.len();
    data.truncate(len);
    Ok(data)
}

/// Encrypts a `req_info` document as WeChat does (the simulator, tests).
pub fn encrypt_req_info(plain: &[u8], key: &ApiKey) -> String {
    let pad = BLOCK - plain.len() % BLOCK;
    let mut data = Zeroizing::new(plain.to_vec());
    data.extend(std::iter::repeat_n(pad as u8, pad));
    let aes = cipher(key);
    for chunk in data.chunks_exact_mut(BLOCK) {
        let mut block = aes::Block::default();
        block.copy_from_slice(chunk);
        aes.encrypt_block(&mut block);
        chunk.copy_from_slice(&block);
    }
    STANDARD.encode(&data[..])
}

/// Reads a refund notification body: the envelope, the merchant by its `mch_id` (a configured
/// v2 merchant whose `appid` it echoes), `req_info` decrypted with its key, then the report.
pub fn read_refund_notification<'m>(
    body: &[u8],
    merchant_of: impl Fn(&MchId) -> Option<&'m Merchant>,
) -> Result<RefundNotification<'m>, RefundNotifyError> {
    let fields = xml::decode(body).map_err(|e| RefundNotifyError::Malformed(e.to_string()))?;
    let merchant = super::notify::envelope(&fields, merchant_of).map_err(|e| match e {
        Envelope::Malformed(m) => RefundNotifyError::Malformed(m),
        Envelope::ReturnFail(m) => RefundNotifyError::ReturnFail(m),
        Envelope::UnknownMerchant(m) => RefundNotifyError::UnknownMerchant(m),
    })?;
    let mch_id = merchant.mch_id.clone();
    let appid = fields.get("appid").unwrap_or_default();
    if appid != merchant.appid.as_str() {
        return Err(RefundNotifyError::Mismatch(
            mch_id,
            format!(
                "appid is {}, expected {}",
                quote(appid),
                merchant.appid.as_str()
            ),
        ));
    }
    let Some((key, _)) = merchant.v2_credentials() else {
        return Err(RefundNotifyError::UnknownMerchant(mch_id.to_string()));
    };
    let req_info = fields
        .get_nonempty("req_info")
        .ok_or_else(|| RefundNotifyError::Report(mch_id.clone(), "req_info is missing".into()))?;
    let plain = decrypt_req_info(req_info, key)
        .map_err(|e| RefundNotifyError::Decrypt(mch_id.clone(), e))?;
    let report = parse_req_info(&plain).map_err(|e| RefundNotifyError::Report(mch_id, e))?;
    Ok(RefundNotification { merchant, report })
}

/// Reads a decrypted `req_info` (`<root>` with `out_refund_no`, `out_trade_no`, `refund_id`,
/// `transaction_id`, `total_fee`, `refund_fee`, `refund_status`, `success_time`,
/// `refund_recv_accout`, …) into a report. A SUCCESS needs its `refund_id` and success time.
/// The error is for the log, its values quoted.
pub fn parse_req_info(plain: &[u8]) -> Result<RefundReport, String> {
    let fields = xml::decode_rooted(plain, "root").map_err(|e| e.to_string())?;
    report_of(&fields)
}

fn report_of(f: &Fields) -> Result<RefundReport, String> {
    let bad = |name: &str, e: &dyn std::fmt::Display| format!("{name}: {e}");
    let required = |name: &'static str| {
        f.get_nonempty(name)
            .ok_or_else(|| format!("{name} is missing"))
    };
    let out_refund_no =
        OutRefundNo::parse(required("out_refund_no")?).map_err(|e| bad("out_refund_no", &e))?;
    let out_trade_no =
        OutTradeNo::parse(required("out_trade_no")?).map_err(|e| bad("out_trade_no", &e))?;
    let status = match RefundStatus::parse_v2(required("refund_status")?) {
        RefundStatus::Unknown(u) => {
            RefundStatus::Unknown(u.chars().take(MAX_UNKNOWN_STATUS_CHARS).collect())
        }
        known => known,
    };
    let refund_fee = required("refund_fee")?
        .parse::<Fen>()
        .map_err(|e| bad("refund_fee", &e))?;
    let total_fee = f
        .get_nonempty("total_fee")
        .map(str::parse::<Fen>)
        .transpose()
        .map_err(|e| bad("total_fee", &e))?;
    let refund_id = f
        .get_nonempty("refund_id")
        .map(RefundId::parse)
        .transpose()
        .map_err(|e| bad("refund_id", &e))?;
    let success_time = f
        .get_nonempty("success_time")
        .map(parse_wechat_datetime)
        .transpose()
        .map_err(|e| bad("success_time", &e))?;
    let recv_account = f
        .get_nonempty("refund_recv_accout")
        .map(|a| a.chars().take(MAX_RECV_ACCOUNT_CHARS).collect::<String>());
    if status == RefundStatus::Success {
        if refund_id.is_none() {
            return Err("refund_id is missing in a successful refund".into());
        }
        if success_time.is_none() {
            return Err("success_time is missing in a successful refund".into());
        }
    }
    Ok(RefundReport {
        out_refund_no,
        out_trade_no,
        status,
        refund_id,
        refund_fee,
        total_fee,
        currency: Currency::cny(),
        success_time,
        recv_account,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AppId;
    use crate::wxpay::SignType;

    /// `tests/fixtures/wxpay-v2-refunds/gopay_refund_notify_req_info.b64` and the key its
    /// source publishes (see the README there).
    const FIXTURE: &str =
        include_str!("../../tests/fixtures/wxpay-v2-refunds/gopay_refund_notify_req_info.b64");
    const FIXTURE_KEY: &str = "ziR0QKsTUfMOuochC9RfCdmfHECorQAP";
    const OTHER_KEY: &str = "192006250b4c09247ec02edce69f6a2d";

    fn key(k: &str) -> ApiKey {
        ApiKey::parse(k).unwrap()
    }

    #[test]
    fn the_derived_key_is_the_lowercase_hex_md5() {
        let k = key(FIXTURE_KEY).refund_notify_key();
        // `md5sum` of the key, as text.
        assert_eq!(&k[..], b"a1fdc4d1da9fb443b1091d34bcee9493");
        assert!(!format!("{:?}", key(FIXTURE_KEY)).contains(FIXTURE_KEY));
    }

    #[test]
    fn the_published_notification_decrypts_and_parses() {
        let plain = decrypt_req_info(FIXTURE, &key(FIXTURE_KEY)).unwrap();
        assert!(plain.starts_with(b"<root>"), "{:?}", &plain[..16]);
        let r = parse_req_info(&plain).unwrap();
        assert_eq!(r.out_refund_no.as_str(), "50fd012ed1b311e7af7800163e32c503");
        assert_eq!(r.out_trade_no.as_str(), "4893e76d8c8b434cb64e9cd536338e33");
        assert_eq!(r.status, RefundStatus::Success);
        assert_eq!(
            r.refund_id.as_ref().map(|i| i.as_str()),
            Some("50000404922017112502468056157")
        );
        assert_eq!(r.refund_fee, "6".parse::<Fen>().unwrap());
        assert_eq!(r.total_fee, Some("6".parse::<Fen>().unwrap()));
        assert_eq!(r.recv_account.as_deref(), Some("支付用户零钱"));
        // 2017-11-25 15:36:17 Beijing time.
        assert_eq!(
            r.success_time.unwrap().to_rfc3339(),
            "2017-11-25T07:36:17+00:00"
        );
    }

    #[test]
    fn encryption_round_trips_and_matches_the_fixture() {
        let k = key(FIXTURE_KEY);
        let plain = decrypt_req_info(FIXTURE, &k).unwrap();
        assert_eq!(encrypt_req_info(&plain, &k), FIXTURE.trim());
        for n in [0usize, 1, 15, 16, 17] {
            let p = vec![b'x'; n];
            let c = encrypt_req_info(&p, &k);
            if n == 0 {
                assert_eq!(STANDARD.decode(&c).unwrap().len(), 16);
            }
            assert_eq!(decrypt_req_info(&c, &k).unwrap(), p);
        }
    }

    #[test]
    fn a_wrong_key_is_refused() {
        // A wrong key almost always leaves bad padding; when it happens to end in a valid
        // padding, the garbage does not parse.
        let r = decrypt_req_info(FIXTURE, &key(OTHER_KEY));
        match r {
            Err(e) => assert_eq!(e, DecryptError::Padding),
            Ok(garbage) => assert!(parse_req_info(&garbage).is_err()),
        }
    }

    #[test]
    fn truncated_garbage_and_bad_padding_are_refused() {
        let k = key(FIXTURE_KEY);
        assert_eq!(
            decrypt_req_info("not base64 !!", &k),
            Err(DecryptError::Base64)
        );
        assert_eq!(decrypt_req_info("", &k), Err(DecryptError::Length));
        // Cut at a base64 quantum that is not a whole block.
        assert_eq!(
            decrypt_req_info(&FIXTURE.trim()[..40], &k),
            Err(DecryptError::Length)
        );
        // Cut at a whole number of blocks: the last block is no padding.
        let raw = STANDARD.decode(FIXTURE.trim()).unwrap();
        let cut = STANDARD.encode(&raw[..raw.len() - 16]);
        assert_eq!(decrypt_req_info(&cut, &k), Err(DecryptError::Padding));
        // Paddings that are not PKCS#7: 0, over 16, and unequal bytes.
        for bad in [
            vec![b'a'; 16],
            [vec![b'a'; 15], vec![0]].concat(),
            [vec![b'a'; 15], vec![17]].concat(),
            [vec![b'a'; 13], vec![3, 2, 3]].concat(),
        ] {
            let aes = cipher(&k);
            let mut block = aes::Block::default();
            block.copy_from_slice(&bad);
            aes.encrypt_block(&mut block);
            assert_eq!(
                decrypt_req_info(&STANDARD.encode(block.as_slice()), &k),
                Err(DecryptError::Padding),
                "{bad:?}"
            );
        }
    }

    fn merchant() -> Merchant {
        Merchant::v2(
            MchId::parse("1900000109").unwrap(),
            AppId::parse("wx2421b1c4370ec43b").unwrap(),
            SignType::Md5,
            key(FIXTURE_KEY),
        )
    }

    fn body(mch_id: &str, appid: &str, req_info: &str) -> String {
        format!(
            "<xml><return_code>SUCCESS</return_code><appid><![CDATA[{appid}]]></appid><mch_id><![CDATA[{mch_id}]]></mch_id><nonce_str><![CDATA[TeqClE3i0mvn3DrK]]></nonce_str><req_info><![CDATA[{req_info}]]></req_info></xml>"
        )
    }

    #[test]
    fn a_body_is_read_for_its_merchant_and_refused_otherwise() {
        let m = merchant();
        let of = |id: &MchId| (id == &m.mch_id).then_some(&m);
        let ok = body("1900000109", "wx2421b1c4370ec43b", FIXTURE.trim());
        let n = read_refund_notification(ok.as_bytes(), of).unwrap();
        assert_eq!(n.report.refund_fee, "6".parse::<Fen>().unwrap());

        let unknown = body("1900000110", "wx2421b1c4370ec43b", FIXTURE.trim());
        let e = read_refund_notification(unknown.as_bytes(), of).unwrap_err();
        assert_eq!(e.outcome(), NotifyOutcome::UnknownMerchant);

        let other_app = body("1900000109", "wxffffffffffffffff", FIXTURE.trim());
        let e = read_refund_notification(other_app.as_bytes(), of).unwrap_err();
        assert_eq!(e.outcome(), NotifyOutcome::Mismatch);

        let forged = encrypt_req_info(
            b"<root><out_refund_no>R1</out_refund_no></root>",
            &key(OTHER_KEY),
        );
        let forged = body("1900000109", "wx2421b1c4370ec43b", &forged);
        let e = read_refund_notification(forged.as_bytes(), of).unwrap_err();
        assert!(matches!(
            e.outcome(),
            NotifyOutcome::DecryptFailed | NotifyOutcome::Malformed
        ));

        let garbage = body("1900000109", "wx2421b1c4370ec43b", "%%%%");
        let e = read_refund_notification(garbage.as_bytes(), of).unwrap_err();
        assert_eq!(e.outcome(), NotifyOutcome::DecryptFailed);
        let msg = e.to_string();
        assert!(!msg.contains(FIXTURE_KEY), "{msg}");

        let fail = "<xml><return_code>FAIL</return_code><return_msg>x\ny</return_msg></xml>";
        let e = read_refund_notification(fail.as_bytes(), of).unwrap_err();
        assert_eq!(e.outcome(), NotifyOutcome::ReturnFail);
        assert!(!e.to_string().contains('\n'));
    }

    fn doc(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut f = Fields::new();
        for (k, v) in fields {
            f.insert(*k, *v);
        }
        xml::encode_rooted(&f, "root").unwrap().into_bytes()
    }

    #[test]
    fn states_parse_and_a_success_needs_its_id_and_time() {
        let base = [
            ("out_refund_no", "R1"),
            ("out_trade_no", "T1"),
            ("refund_fee", "100"),
            ("total_fee", "300"),
        ];
        for (word, status) in [
            ("CHANGE", RefundStatus::Abnormal),
            ("REFUNDCLOSE", RefundStatus::Closed),
        ] {
            let d = doc(&[&base[..], &[("refund_status", word)]].concat());
            assert_eq!(parse_req_info(&d).unwrap().status, status);
        }
        let bare_success = doc(&[&base[..], &[("refund_status", "SUCCESS")]].concat());
        assert!(parse_req_info(&bare_success).is_err());
        // Not the <root> document, or an <xml> one: refused.
        let mut f = Fields::new();
        f.insert("out_refund_no", "R1");
        assert!(parse_req_info(xml::encode(&f).unwrap().as_bytes()).is_err());
        // A hostile value is quoted and bounded in the message.
        let hostile = format!("1\nERROR forged{}", "9".repeat(50_000));
        let d = doc(&[
            ("out_refund_no", "R1"),
            ("out_trade_no", "T1"),
            ("refund_status", "SUCCESS"),
            ("refund_fee", hostile.as_str()),
        ]);
        let e = parse_req_info(&d).unwrap_err();
        assert!(e.len() < 400 && !e.contains('\n'), "{e}");
        let unknown = doc(&[&base[..], &[("refund_status", "X".repeat(500).as_str())]].concat());
        match parse_req_info(&unknown).unwrap().status {
            RefundStatus::Unknown(u) => assert_eq!(u.len(), MAX_UNKNOWN_STATUS_CHARS),
            other => panic!("{other:?}"),
        }
    }
}

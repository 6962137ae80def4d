//! WeChat's v2 payment notification (the body POSTed to `notify_url`), read exactly as an
//! orderquery reply is: strict decode, `return_code`, the merchant's signature and sign type,
//! `appid` / `mch_id` / `sub_mch_id`, then the order fields. And the XML answer WeChat expects.

use super::client::{order_fields, verify_notification_envelope};
use super::error::WxPayError;
use super::xml::{self, Fields};
use crate::domain::{MchId, TradeState};
use crate::gateway::merchant::Merchant;
use crate::gateway::report::TradeReport;
use crate::telemetry::NotifyOutcome;
use crate::text::quote;

/// The FAIL answer to a body that is not a usable notification.
pub const INVALID_NOTIFICATION: &str = "invalid notification";
/// The FAIL answer to a notification that is not verified (unknown merchant included).
pub const INVALID_SIGNATURE: &str = "invalid signature";
/// The FAIL answer when the daemon cannot record a verified notification now.
pub const UNAVAILABLE: &str = "temporarily unavailable";

/// Why a notification cannot be used; each maps to one `outcome` label and one generic FAIL
/// answer ([`NotifyError::answer`]). The message is for the log: it names the merchant and
/// what failed, and quotes the body's values through [`quote`] (bounded, escaped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyError {
    #[error("malformed notification: {0}")]
    Malformed(String),
    #[error("return_code FAIL: {}", quote(.0))]
    ReturnFail(String),
    #[error("merchant {} is not configured", quote(.0))]
    UnknownMerchant(String),
    #[error("merchant {0}: signature: {1}")]
    Sign(MchId, String),
    #[error("merchant {0}: {1}")]
    Mismatch(MchId, String),
}

impl NotifyError {
    /// The `outcome` of `notify_requests_total`.
    pub fn outcome(&self) -> NotifyOutcome {
        match self {
            NotifyError::Malformed(_) => NotifyOutcome::Malformed,
            NotifyError::ReturnFail(_) => NotifyOutcome::ReturnFail,
            NotifyError::UnknownMerchant(_) => NotifyOutcome::UnknownMerchant,
            NotifyError::Sign(..) => NotifyOutcome::SignInvalid,
            NotifyError::Mismatch(..) => NotifyOutcome::Mismatch,
        }
    }

    /// What WeChat is answered: a short, stable reason per class that tells an unauthenticated
    /// caller nothing it did not send (no merchant, no sign type, no echo). An unknown merchant
    /// and a bad signature get the same answer; the precise reason is logged.
    pub fn answer(&self) -> &'static str {
        match self {
            NotifyError::Malformed(_) | NotifyError::ReturnFail(_) => INVALID_NOTIFICATION,
            NotifyError::UnknownMerchant(_) | NotifyError::Sign(..) | NotifyError::Mismatch(..) => {
                INVALID_SIGNATURE
            }
        }
    }

    /// The configured merchant the notification named, when it got that far.
    pub fn merchant(&self) -> Option<&MchId> {
        match self {
            NotifyError::Sign(m, _) | NotifyError::Mismatch(m, _) => Some(m),
            _ => None,
        }
    }
}

/// What a verified notification says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notified {
    /// `result_code` SUCCESS: the customer paid (a [`TradeReport`] with trade_state SUCCESS).
    Paid(TradeReport),
    /// `result_code` FAIL: a failed payment attempt, which settles nothing.
    Failed { err_code: String },
}

/// A verified notification and the merchant it is for.
#[derive(Debug, Clone)]
pub struct Notification<'m> {
    pub merchant: &'m Merchant,
    pub notified: Notified,
}

/// Why a v2 notification's envelope (payment or refund) was refused before any key was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Envelope {
    Malformed(String),
    ReturnFail(String),
    UnknownMerchant(String),
}

/// A v2 notification's envelope, payment or refund: `return_code` SUCCESS (FAIL's
/// `return_msg` bounded), and the configured v2 merchant its `mch_id` names. A v3 merchant's
/// notifications come signed with RSA on /wxpay/v3/notify, never here.
pub(crate) fn envelope<'m>(
    fields: &Fields,
    merchant_of: impl Fn(&MchId) -> Option<&'m Merchant>,
) -> Result<&'m Merchant, Envelope> {
    match fields.get("return_code") {
        Some("SUCCESS") => {}
        Some("FAIL") => {
            return Err(Envelope::ReturnFail(
                fields
                    .get("return_msg")
                    .unwrap_or_default()
                    .chars()
                    .take(128)
                    .collect(),
            ));
        }
        _ => {
            return Err(Envelope::Malformed(
                "return_code is neither SUCCESS nor FAIL".into(),
            ));
        }
    }
    let raw = fields
        .get_nonempty("mch_id")
        .ok_or_else(|| Envelope::Malformed("mch_id is missing".into()))?;
    let mch_id =
        MchId::parse(raw).map_err(|_| Envelope::UnknownMerchant(raw.chars().take(32).collect()))?;
    merchant_of(&mch_id)
        .filter(|m| m.api() == crate::gateway::Api::V2)
        .ok_or_else(|| Envelope::UnknownMerchant(mch_id.to_string()))
}

/// Decodes and verifies a notification body with the key of the merchant it names.
pub fn read_notification<'m>(
    body: &[u8],
    merchant_of: impl Fn(&MchId) -> Option<&'m Merchant>,
) -> Result<Notification<'m>, NotifyError> {
    let fields = xml::decode(body).map_err(|e| NotifyError::Malformed(e.to_string()))?;
    let merchant = envelope(&fields, merchant_of).map_err(|e| match e {
        Envelope::Malformed(m) => NotifyError::Malformed(m),
        Envelope::ReturnFail(m) => NotifyError::ReturnFail(m),
        Envelope::UnknownMerchant(m) => NotifyError::UnknownMerchant(m),
    })?;
    let mch_id = merchant.mch_id.clone();
    verify_notification_envelope(merchant, &fields).map_err(|e| match e {
        WxPayError::Sign(s) => NotifyError::Sign(mch_id.clone(), s.to_string()),
        WxPayError::Mismatch { .. } => NotifyError::Mismatch(mch_id.clone(), e.to_string()),
        other => NotifyError::Malformed(other.to_string()),
    })?;
    let notified = match fields.get("result_code") {
        Some("SUCCESS") => Notified::Paid(
            parse_payment(&fields).map_err(|e| NotifyError::Malformed(e.to_string()))?,
        ),
        Some("FAIL") => Notified::Failed {
            err_code: fields
                .get("err_code")
                .unwrap_or_default()
                .chars()
                .take(32)
                .collect(),
        },
        _ => {
            return Err(NotifyError::Malformed(
                "result_code is neither SUCCESS nor FAIL".into(),
            ));
        }
    };
    Ok(Notification { merchant, notified })
}

/// The order fields of a verified payment notification (`result_code` SUCCESS): a report of
/// a payment, so of trade state SUCCESS whatever else it says (WeChat's carries no
/// `trade_state`), with its transaction, amount and time required.
pub fn parse_payment(fields: &Fields) -> Result<TradeReport, WxPayError> {
    order_fields(fields, TradeState::Success)
}

/// The answer WeChat stops retrying on (DESIGN.md, "Notify endpoint").
pub const ANSWER_SUCCESS: &str = "<xml><return_code><![CDATA[SUCCESS]]></return_code><return_msg><![CDATA[OK]]></return_msg></xml>";

/// A FAIL answer; WeChat retries the notification later.
pub fn answer_fail(reason: &str) -> String {
    // The reason goes into CDATA: no "]]>" and only plain characters.
    let reason: String = reason
        .chars()
        .filter(|c| xml::is_xml_char(*c) && *c != ']' && *c != '<' && *c != '>')
        .take(128)
        .collect();
    format!(
        "<xml><return_code><![CDATA[FAIL]]></return_code><return_msg><![CDATA[{reason}]]></return_msg></xml>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_wechat_xml() {
        let ok = xml::decode(ANSWER_SUCCESS.as_bytes()).unwrap();
        assert_eq!(ok.get("return_code"), Some("SUCCESS"));
        let fail = answer_fail("bad ]]> sign <x>");
        let f = xml::decode(fail.as_bytes()).unwrap();
        assert_eq!(f.get("return_code"), Some("FAIL"));
        assert_eq!(f.get("return_msg"), Some("bad  sign x"));
    }

    #[test]
    fn answers_name_a_class_and_messages_quote_the_body_bounded() {
        let errors = [
            NotifyError::UnknownMerchant("1\nERROR forged".into()),
            NotifyError::Sign(
                MchId::parse("10000100").unwrap(),
                "the message is signed with HMAC-SHA256, expected MD5".into(),
            ),
            NotifyError::ReturnFail(format!("x\nERROR forged{}", "\"".repeat(40_000))),
        ];
        assert_eq!(errors[0].answer(), errors[1].answer());
        for e in &errors {
            let (answer, message) = (e.answer(), e.to_string());
            assert!(
                !answer.contains("10000100") && !answer.contains("MD5"),
                "{answer}"
            );
            assert!(message.len() < 300 && !message.contains('\n'), "{message}");
        }
    }
}

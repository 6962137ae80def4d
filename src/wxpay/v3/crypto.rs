//! API v3's cryptography: SHA256withRSA (PKCS#1 v1.5, base64) with the merchant's private key
//! and WeChat's public keys, and `AEAD_AES_256_GCM` with the 32-byte APIv3 key. All of it is
//! *ring* (already in the tree through rustls); PEM through pki-types, certificate fields
//! through x509-cert. No key material ever prints: every key type's `Debug` is redacted.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::SystemRandom;
use ring::signature::{self, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer};
use x509_cert::der::{Decode, Encode};
use x509_cert::spki::SubjectPublicKeyInfoRef;
use zeroize::Zeroizing;

/// The one signature scheme of API v3 (`Wechatpay-Signature-Type` and the `Authorization`
/// scheme).
pub const SCHEME: &str = "WECHATPAY2-SHA256-RSA2048";
/// The APIv3 key's length in bytes (AES-256).
pub const APIV3_KEY_BYTES: usize = 32;
/// The `rsaEncryption` algorithm of a SubjectPublicKeyInfo.
const RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
/// RSA-2048: the only merchant key size WeChat issues.
const RSA_2048_MODULUS_BYTES: usize = 256;

/// Why a key, a certificate, a signature or a ciphertext was refused. The messages name what
/// is wrong, never a key's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("not a PEM private key (PKCS#8 \"PRIVATE KEY\" or PKCS#1 \"RSA PRIVATE KEY\")")]
    PrivateKeyPem,
    #[error("not an RSA private key *ring* accepts")]
    PrivateKeyRsa,
    #[error("the private key is RSA-{0}, WeChat Pay API v3 keys are RSA-2048")]
    PrivateKeySize(usize),
    #[error("not a PEM public key (\"PUBLIC KEY\", SubjectPublicKeyInfo) of RSA")]
    PublicKey,
    #[error("not a PEM X.509 certificate with an RSA key: {0}")]
    Certificate(String),
    #[error("the APIv3 key is {0} bytes, it must be exactly {APIV3_KEY_BYTES}")]
    ApiV3KeyLength(usize),
    #[error("the signature is not base64")]
    SignatureEncoding,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("signing failed")]
    SigningFailed,
    #[error("the AES-GCM nonce is {0} bytes, it must be 12")]
    NonceLength(usize),
    #[error("the ciphertext is not base64")]
    CiphertextEncoding,
    /// The tag does not match: the APIv3 key is wrong (or was reset), or the data was changed.
    #[error("AES-GCM authentication failed (wrong APIv3 key, or changed data)")]
    Tag,
}

/// An RSA-2048 private key: the merchant's API key (signs requests), or WeChat's in the
/// simulator (signs answers). Cheap to clone.
#[derive(Clone)]
pub struct PrivateKey {
    pair: Arc<signature::RsaKeyPair>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(RSA-2048, redacted)")
    }
}

impl PrivateKey {
    /// Reads a PEM private key, PKCS#8 or PKCS#1; anything but RSA-2048 is refused.
    pub fn from_pem(pem: &[u8]) -> Result<PrivateKey, CryptoError> {
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|_| CryptoError::PrivateKeyPem)?;
        let pair = match &der {
            PrivateKeyDer::Pkcs8(k) => signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => signature::RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err(CryptoError::PrivateKeyRsa),
        }
        // *ring* refuses RSA keys under 2048 bits as it refuses keys that are not RSA: tell
        // an RSA key of the wrong size by its modulus.
        .map_err(|_| match rsa_modulus_bits(&der) {
            Some(bits) if bits != RSA_2048_MODULUS_BYTES * 8 => CryptoError::PrivateKeySize(bits),
            _ => CryptoError::PrivateKeyRsa,
        })?;
        let modulus = pair.public().modulus_len();
        if modulus != RSA_2048_MODULUS_BYTES {
            return Err(CryptoError::PrivateKeySize(modulus * 8));
        }
        Ok(PrivateKey {
            pair: Arc::new(pair),
        })
    }

    /// SHA256withRSA of `message`, base64 (deterministic: PKCS#1 v1.5).
    pub fn sign(&self, message: &[u8]) -> Result<String, CryptoError> {
        let mut signature = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                message,
                &mut signature,
            )
            .map_err(|_| CryptoError::SigningFailed)?;
        Ok(B64.encode(signature))
    }

    /// The matching public key (the simulator verifies the merchant's requests with it).
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            pkcs1: Arc::from(self.pair.public().as_ref()),
        }
    }

    /// Whether both are the same key (a reload that changes nothing).
    pub fn same_as(&self, other: &PrivateKey) -> bool {
        self.pair.public().as_ref() == other.pair.public().as_ref()
    }
}

/// The size in bits of the modulus of an RSA private key (PKCS#8 of `rsaEncryption`, or
/// PKCS#1); `None` for any other key or a malformed one.
fn rsa_modulus_bits(der: &PrivateKeyDer<'_>) -> Option<usize> {
    use x509_cert::der::asn1::{OctetStringRef, UintRef};
    use x509_cert::der::{Reader, SliceReader};
    use x509_cert::spki::AlgorithmIdentifierRef;

    // The rest of a SEQUENCE, skipped.
    fn skip_rest<'a, R: Reader<'a>>(r: &mut R) -> x509_cert::der::Result<()> {
        r.read_slice(r.remaining_len()).map(drop)
    }
    // RSAPrivateKey ::= SEQUENCE { version INTEGER, modulus INTEGER, … }
    let modulus = |pkcs1: &[u8]| -> Option<usize> {
        let mut reader = SliceReader::new(pkcs1).ok()?;
        let modulus = reader
            .sequence(|r| {
                UintRef::decode(r)?;
                let modulus = UintRef::decode(r)?.as_bytes().to_vec();
                skip_rest(r)?;
                Ok(modulus)
            })
            .ok()?;
        let first = *modulus.first()?;
        Some((modulus.len() - 1) * 8 + (8 - first.leading_zeros() as usize))
    };
    match der {
        PrivateKeyDer::Pkcs1(k) => modulus(k.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(k) => {
            // PrivateKeyInfo ::= SEQUENCE { version, AlgorithmIdentifier, privateKey OCTET
            // STRING, … }
            let mut reader = SliceReader::new(k.secret_pkcs8_der()).ok()?;
            let inner = reader
                .sequence(|r| {
                    UintRef::decode(r)?;
                    let algorithm = AlgorithmIdentifierRef::decode(r)?;
                    let key = OctetStringRef::decode(r)?.as_bytes().to_vec();
                    skip_rest(r)?;
                    Ok((algorithm.oid.to_string(), Zeroizing::new(key)))
                })
                .ok()?;
            match inner {
                (oid, key) if oid == RSA_ENCRYPTION => modulus(&key),
                _ => None,
            }
        }
        _ => None,
    }
}

/// An RSA public key (WeChat's, or the merchant's in the simulator): verifies signatures.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// PKCS#1 `RSAPublicKey` DER, what *ring* verifies with.
    pkcs1: Arc<[u8]>,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PublicKey(RSA)")
    }
}

impl PublicKey {
    /// Reads a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) of RSA, as WeChat's public-key mode
    /// hands it out.
    pub fn from_pem(pem: &[u8]) -> Result<PublicKey, CryptoError> {
        let der =
            SubjectPublicKeyInfoDer::from_pem_slice(pem).map_err(|_| CryptoError::PublicKey)?;
        PublicKey::from_spki_der(der.as_ref()).ok_or(CryptoError::PublicKey)
    }

    fn from_spki_der(der: &[u8]) -> Option<PublicKey> {
        let spki = SubjectPublicKeyInfoRef::from_der(der).ok()?;
        if spki.algorithm.oid.to_string() != RSA_ENCRYPTION {
            return None;
        }
        Some(PublicKey {
            pkcs1: Arc::from(spki.subject_public_key.as_bytes()?),
        })
    }

    /// Checks a base64 SHA256withRSA signature of `message`.
    pub fn verify(&self, message: &[u8], signature_b64: &str) -> Result<(), CryptoError> {
        let signature = B64
            .decode(signature_b64.trim())
            .map_err(|_| CryptoError::SignatureEncoding)?;
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &*self.pkcs1)
            .verify(message, &signature)
            .map_err(|_| CryptoError::BadSignature)
    }
}

/// A platform certificate (or any X.509 certificate with an RSA key): its serial, validity and
/// public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// Uppercase hex without leading zero bytes, as WeChat writes `serial_no`.
    pub serial: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub key: PublicKey,
}

impl Certificate {
    /// Reads the first certificate of a PEM text.
    pub fn from_pem(pem: &[u8]) -> Result<Certificate, CryptoError> {
        let der = CertificateDer::from_pem_slice(pem)
            .map_err(|e| CryptoError::Certificate(format!("PEM: {e}")))?;
        Certificate::from_der(der.as_ref())
    }

    pub fn from_der(der: &[u8]) -> Result<Certificate, CryptoError> {
        let bad = |what: &str| CryptoError::Certificate(what.to_owned());
        let cert = x509_cert::Certificate::from_der(der).map_err(|e| bad(&format!("DER: {e}")))?;
        let tbs = &cert.tbs_certificate;
        let serial_bytes = tbs.serial_number.as_bytes();
        let first = serial_bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(serial_bytes.len());
        let serial = hex::encode_upper(&serial_bytes[first..]);
        let time = |t: x509_cert::time::Time| {
            DateTime::<Utc>::from_timestamp(
                i64::try_from(t.to_unix_duration().as_secs()).unwrap_or(i64::MAX),
                0,
            )
        };
        let not_before = time(tbs.validity.not_before).ok_or_else(|| bad("notBefore"))?;
        let not_after = time(tbs.validity.not_after).ok_or_else(|| bad("notAfter"))?;
        let spki = tbs
            .subject_public_key_info
            .to_der()
            .map_err(|e| bad(&format!("key: {e}")))?;
        let key = PublicKey::from_spki_der(&spki).ok_or_else(|| bad("not an RSA key"))?;
        Ok(Certificate {
            serial,
            not_before,
            not_after,
            key,
        })
    }

    /// Whether `now` is within the certificate's validity.
    pub fn is_valid_at(&self, now: DateTime<Utc>) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// The APIv3 key: exactly 32 bytes, the AES-256-GCM key of notifications and downloaded
/// certificates. Never prints.
#[derive(Clone)]
pub struct ApiV3Key(Arc<Zeroizing<[u8; APIV3_KEY_BYTES]>>);

impl fmt::Debug for ApiV3Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiV3Key(redacted)")
    }
}

impl ApiV3Key {
    /// The key as WeChat's merchant platform shows it: 32 ASCII characters, used as raw bytes.
    pub fn new(bytes: &[u8]) -> Result<ApiV3Key, CryptoError> {
        let key: [u8; APIV3_KEY_BYTES] = bytes
            .try_into()
            .map_err(|_| CryptoError::ApiV3KeyLength(bytes.len()))?;
        Ok(ApiV3Key(Arc::new(Zeroizing::new(key))))
    }

    fn aead(&self) -> LessSafeKey {
        // Infallible: the key has AES-256's length by construction.
        let key = UnboundKey::new(&AES_256_GCM, &self.0[..])
            .unwrap_or_else(|_| unreachable!("a {APIV3_KEY_BYTES}-byte key is an AES-256 key"));
        LessSafeKey::new(key)
    }

    /// Opens `base64(ciphertext || tag)` with `nonce` (12 ASCII bytes) and `associated_data`.
    pub fn decrypt(
        &self,
        nonce: &str,
        associated_data: &str,
        ciphertext_b64: &str,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let nonce = Nonce::try_assume_unique_for_key(nonce.as_bytes())
            .map_err(|_| CryptoError::NonceLength(nonce.len()))?;
        let mut data = Zeroizing::new(
            B64.decode(ciphertext_b64.trim())
                .map_err(|_| CryptoError::CiphertextEncoding)?,
        );
        let plain_len = self
            .aead()
            .open_in_place(nonce, Aad::from(associated_data.as_bytes()), &mut data)
            .map_err(|_| CryptoError::Tag)?
            .len();
        data.truncate(plain_len);
        Ok(data)
    }

    /// Seals `plaintext` as `base64(ciphertext || tag)` (the simulator's side).
    pub fn encrypt(
        &self,
        nonce: &str,
        associated_data: &str,
        plaintext: &[u8],
    ) -> Result<String, CryptoError> {
        let nonce_value = Nonce::try_assume_unique_for_key(nonce.as_bytes())
            .map_err(|_| CryptoError::NonceLength(nonce.len()))?;
        let mut data = plaintext.to_vec();
        self.aead()
            .seal_in_place_append_tag(
                nonce_value,
                Aad::from(associated_data.as_bytes()),
                &mut data,
            )
            .map_err(|_| CryptoError::Tag)?;
        Ok(B64.encode(data))
    }

    /// Whether both are the same key, compared in constant time.
    pub fn same_as(&self, other: &ApiV3Key) -> bool {
        use subtle::ConstantTimeEq;
        self.0[..].ct_eq(&other.0[..]).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_print() {
        let key = ApiV3Key::new(b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb").expect("32 bytes");
        assert_eq!(format!("{key:?}"), "ApiV3Key(redacted)");
    }

    #[test]
    fn private_keys_other_than_rsa_2048_are_refused_by_what_they_are() {
        let rsa1024 = include_bytes!("../../../tests/fixtures/local/rsa1024_test_key.pem");
        let ec = include_bytes!("../../../tests/fixtures/local/ec_p256_test_key.pem");
        let rsa2048 = include_bytes!(
            "../../../tests/fixtures/wxpay-v3/keys/java_sdk_merchant_private_key.pem"
        );
        assert_eq!(
            PrivateKey::from_pem(rsa1024).err(),
            Some(CryptoError::PrivateKeySize(1024))
        );
        assert_eq!(
            PrivateKey::from_pem(ec).err(),
            Some(CryptoError::PrivateKeyRsa)
        );
        assert_eq!(
            PrivateKey::from_pem(b"not a key").err(),
            Some(CryptoError::PrivateKeyPem)
        );
        assert!(PrivateKey::from_pem(rsa2048).is_ok());
    }

    #[test]
    fn apiv3_key_must_be_32_bytes() {
        assert_eq!(
            ApiV3Key::new(b"0123456789abcdef").err(),
            Some(CryptoError::ApiV3KeyLength(16))
        );
    }

    #[test]
    fn aes_roundtrip_and_tag() {
        let key = ApiV3Key::new(b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb").expect("32 bytes");
        let sealed = key
            .encrypt("0123456789ab", "transaction", b"hello")
            .expect("seal");
        let opened = key
            .decrypt("0123456789ab", "transaction", &sealed)
            .expect("open");
        assert_eq!(&opened[..], b"hello");
        assert_eq!(
            key.decrypt("0123456789ab", "certificate", &sealed).err(),
            Some(CryptoError::Tag)
        );
        assert_eq!(
            key.decrypt("short", "transaction", &sealed).err(),
            Some(CryptoError::NonceLength(5))
        );
    }
}

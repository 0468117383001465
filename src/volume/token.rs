//! The KMS binding stored as a LUKS2 token of type `nbdcrypt-kms`.
//!
//! cryptsetup reserves token types starting with `luks2-`; it lists other types in
//! `luksDump` and returns them verbatim from `cryptsetup token export`.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::metadata::{base64_field, string_field};
use super::VolumeError;

/// Current version of the token layout.
pub const TOKEN_VERSION: u64 = 1;

/// Maximum length of a wrapped volume key accepted from a header.
const MAX_WRAPPED_KEY_LEN: usize = 512;

/// How the volume key was wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrapAlgorithm {
    /// AES-256 key wrap (RFC 3394) with the KEK, done by nbdcrypt.
    AesKw,
    /// AES-256-CBC with PKCS#5 padding, done by the KMIP server (Encrypt); the wrapped key
    /// is the 16-byte IV followed by the ciphertext.
    KmipAesCbc,
}

impl WrapAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            WrapAlgorithm::AesKw => "aes-kw",
            WrapAlgorithm::KmipAesCbc => "kmip-aes-cbc",
        }
    }

    fn parse(text: &str) -> Result<Self, VolumeError> {
        match text {
            "aes-kw" => Ok(WrapAlgorithm::AesKw),
            "kmip-aes-cbc" => Ok(WrapAlgorithm::KmipAesCbc),
            other => Err(VolumeError::Metadata(format!("token wrap_alg {other:?} is not supported"))),
        }
    }
}

/// The KMS binding of a volume: which provider and key wrap the volume key, and the
/// wrapped key itself. The wrapped key is treated as a secret: it is zeroized on drop and
/// redacted in `Debug`.
#[derive(Clone)]
pub struct KmsToken {
    pub key_provider: String,
    pub key_id: String,
    pub wrap_alg: WrapAlgorithm,
    pub wrapped_key: Zeroizing<Vec<u8>>,
}

impl KmsToken {
    /// The LUKS2 token type.
    pub const TYPE: &'static str = "nbdcrypt-kms";

    pub fn to_json(&self) -> Value {
        json!({
            "type": Self::TYPE,
            "keyslots": [],
            "version": TOKEN_VERSION,
            "key_provider": self.key_provider,
            "key_id": self.key_id,
            "wrap_alg": self.wrap_alg.as_str(),
            "wrapped_key": BASE64.encode(self.wrapped_key.as_slice()),
        })
    }

    /// Parses and validates a token object from an untrusted header.
    pub fn from_json(value: &Value) -> Result<Self, VolumeError> {
        let version = value.get("version").and_then(Value::as_u64);
        if version != Some(TOKEN_VERSION) {
            return Err(VolumeError::Metadata(format!(
                "{} token version {version:?} is not supported (expected {TOKEN_VERSION})",
                Self::TYPE
            )));
        }

        let key_provider = string_field(value, "key_provider", "token")?.to_string();
        if !is_valid_provider_name(&key_provider) {
            return Err(VolumeError::Metadata(format!("token key_provider {key_provider:?} is invalid")));
        }
        let key_id = string_field(value, "key_id", "token")?.to_string();
        if key_id.is_empty() || key_id.len() > 256 || key_id.chars().any(|c| c.is_control()) {
            return Err(VolumeError::Metadata(
                "token key_id is empty, too long or has control characters".into(),
            ));
        }
        let wrap_alg = WrapAlgorithm::parse(string_field(value, "wrap_alg", "token")?)?;
        let wrapped_key = Zeroizing::new(base64_field(value, "wrapped_key", "token")?);
        if wrapped_key.is_empty() || wrapped_key.len() > MAX_WRAPPED_KEY_LEN {
            return Err(VolumeError::Metadata("token wrapped_key has an invalid length".into()));
        }
        Ok(KmsToken { key_provider, key_id, wrap_alg, wrapped_key })
    }
}

impl fmt::Debug for KmsToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsToken")
            .field("key_provider", &self.key_provider)
            .field("key_id", &self.key_id)
            .field("wrap_alg", &self.wrap_alg)
            .field("wrapped_key", &"[REDACTED]")
            .finish()
    }
}

/// Provider names are short identifiers: they name a configuration table.
pub fn is_valid_provider_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KmsToken {
        KmsToken {
            key_provider: "local".into(),
            key_id: "0f0e".into(),
            wrap_alg: WrapAlgorithm::AesKw,
            wrapped_key: Zeroizing::new(vec![9u8; 72]),
        }
    }

    #[test]
    fn token_json_round_trip() {
        let token = sample();
        let back = KmsToken::from_json(&token.to_json()).unwrap();
        assert_eq!(back.key_id, "0f0e");
        assert_eq!(back.wrapped_key.as_slice(), &[9u8; 72]);
    }

    #[test]
    fn token_debug_hides_wrapped_key() {
        let printed = format!("{:?}", sample());
        assert!(printed.contains("[REDACTED]"));
        assert!(!printed.contains("CQkJ"), "base64 of the wrapped key leaked: {printed}");
    }

    #[test]
    fn token_rejects_unknown_version_and_bad_provider() {
        let mut value = sample().to_json();
        value["version"] = json!(2);
        assert!(KmsToken::from_json(&value).is_err());

        let mut value = sample().to_json();
        value["key_provider"] = json!("../etc");
        assert!(KmsToken::from_json(&value).is_err());
    }
}

//! The LUKS2 JSON metadata (LUKS2 on-disk format specification, section 3): parsed from
//! untrusted bytes into validated values, and written back with unknown objects preserved.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::token::KmsToken;
use super::VolumeError;
use crate::crypto::SectorSize;

/// The only cipher nbdcrypt serves.
pub const CIPHER: &str = "aes-xts-plain64";

/// Upper bound on pbkdf2 iterations accepted from a header, so a hostile header cannot make an
/// open spin for minutes. Volume keys are random 512-bit values, so the digest needs no
/// stretching to resist guessing; cryptsetup's own minimum is 1000.
pub const MAX_DIGEST_ITERATIONS: u32 = 10_000_000;

/// The data segment: where the ciphertext lives and how it is encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptSegment {
    /// Byte offset of the data area from the start of the device.
    pub offset: u64,
    /// Fixed size in bytes, or `None` for `"dynamic"` (up to the end of the device).
    pub size: Option<u64>,
    pub sector_size: SectorSize,
}

/// The pbkdf2 digest that lets a volume key be checked without decrypting data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeKeyDigest {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub digest: Vec<u8>,
}

/// Validated view of the JSON metadata, plus the parsed document for rewriting.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub segment: CryptSegment,
    pub digest: VolumeKeyDigest,
    /// Size in bytes of the keyslots area that follows the two header areas.
    pub keyslots_size: u64,
    /// The KMS binding, or `None` for a volume made by cryptsetup without one.
    pub token: Option<KmsToken>,
    /// The identifier of the token object holding `token` in the `tokens` map.
    pub token_id: Option<String>,
    document: Value,
}

impl Metadata {
    /// Builds the metadata of a new volume.
    pub fn new(
        segment: CryptSegment,
        digest: VolumeKeyDigest,
        header_area_size: u64,
        token: KmsToken,
    ) -> Self {
        let keyslots_size = segment.offset - 2 * header_area_size;
        let size = match segment.size {
            Some(bytes) => bytes.to_string(),
            None => "dynamic".to_string(),
        };
        let document = json!({
            "keyslots": {},
            "tokens": { "0": token.to_json() },
            "segments": {
                "0": {
                    "type": "crypt",
                    "offset": segment.offset.to_string(),
                    "size": size,
                    "iv_tweak": "0",
                    "encryption": CIPHER,
                    "sector_size": segment.sector_size.bytes(),
                }
            },
            "digests": {
                "0": {
                    "type": "pbkdf2",
                    "keyslots": [],
                    "segments": ["0"],
                    "hash": "sha256",
                    "iterations": digest.iterations,
                    "salt": BASE64.encode(&digest.salt),
                    "digest": BASE64.encode(&digest.digest),
                }
            },
            "config": {
                "json_size": (header_area_size - super::binary::BINARY_HEADER_LEN as u64).to_string(),
                "keyslots_size": keyslots_size.to_string(),
            }
        });
        Metadata {
            segment,
            digest,
            keyslots_size,
            token: Some(token),
            token_id: Some("0".to_string()),
            document,
        }
    }

    /// Parses and validates the JSON text of a header area of `header_area_size` bytes.
    pub fn parse(json_text: &[u8], header_area_size: u64) -> Result<Self, VolumeError> {
        let document: Value = serde_json::from_slice(json_text)
            .map_err(|e| VolumeError::Metadata(format!("JSON is invalid: {e}")))?;
        let root = document.as_object().ok_or_else(|| meta_err("top level is not a JSON object"))?;
        for section in ["keyslots", "tokens", "segments", "digests", "config"] {
            if !root.get(section).is_some_and(Value::is_object) {
                return Err(meta_err(&format!("section {section:?} is missing or not an object")));
            }
        }

        let keyslots_size = parse_config(&root["config"], header_area_size)?;
        let segment = parse_segment(&root["segments"], header_area_size, keyslots_size)?;
        let digest = parse_digest(&root["digests"])?;
        let (token_id, token) = parse_tokens(&root["tokens"])?;

        Ok(Metadata { segment, digest, keyslots_size, token, token_id, document })
    }

    /// Serializes the metadata, replacing the KMS token with `self.token` and keeping every
    /// other object (cryptsetup keyslots, other tokens) as it was read.
    pub fn to_json(&self) -> Result<Vec<u8>, VolumeError> {
        let mut document = self.document.clone();
        if let (Some(id), Some(token)) = (&self.token_id, &self.token) {
            document["tokens"][id.as_str()] = token.to_json();
        }
        serde_json::to_vec(&document).map_err(|e| VolumeError::Metadata(format!("JSON encoding failed: {e}")))
    }

    /// Replaces the KMS token (or adds one) and returns the metadata to write.
    pub fn set_token(&mut self, token: KmsToken) {
        if self.token_id.is_none() {
            let used: Vec<u32> = self.document["tokens"]
                .as_object()
                .map(|tokens| tokens.keys().filter_map(|k| k.parse().ok()).collect())
                .unwrap_or_default();
            let free = (0..32u32).find(|id| !used.contains(id)).unwrap_or(31);
            self.token_id = Some(free.to_string());
        }
        self.token = Some(token);
    }
}

fn meta_err(reason: &str) -> VolumeError {
    VolumeError::Metadata(reason.to_string())
}

fn parse_config(config: &Value, header_area_size: u64) -> Result<u64, VolumeError> {
    let json_size = string_u64(config, "json_size", "config")?;
    let expected_json_size = header_area_size - super::binary::BINARY_HEADER_LEN as u64;
    if json_size != expected_json_size {
        return Err(meta_err(&format!(
            "config.json_size is {json_size}, but the header area holds {expected_json_size}"
        )));
    }

    let keyslots_size = string_u64(config, "keyslots_size", "config")?;
    if keyslots_size % 4096 != 0 {
        return Err(meta_err("config.keyslots_size is not a multiple of 4096"));
    }

    // Mandatory requirements mark features that a reader must understand to use the volume
    // safely (for example an unfinished online reencryption). nbdcrypt understands none.
    if let Some(requirements) = config.get("requirements") {
        let mandatory = requirements.get("mandatory").and_then(Value::as_array);
        if let Some(list) = mandatory {
            if !list.is_empty() {
                let names: Vec<String> =
                    list.iter().map(|v| v.as_str().unwrap_or("<non-string>").to_string()).collect();
                return Err(VolumeError::UnsupportedRequirement(names.join(", ")));
            }
        }
    }
    Ok(keyslots_size)
}

fn parse_segment(
    segments: &Value,
    header_area_size: u64,
    keyslots_size: u64,
) -> Result<CryptSegment, VolumeError> {
    let segments = segments.as_object().ok_or_else(|| meta_err("segments is not an object"))?;
    if segments.len() != 1 {
        return Err(meta_err(&format!(
            "volume has {} segments; only a single crypt segment is supported \
             (finish any cryptsetup reencryption first)",
            segments.len()
        )));
    }
    let segment = segments.get("0").ok_or_else(|| meta_err("segment \"0\" is missing"))?;

    let kind = string_field(segment, "type", "segment 0")?;
    if kind != "crypt" {
        return Err(meta_err(&format!("segment 0 has type {kind:?}, expected \"crypt\"")));
    }
    let encryption = string_field(segment, "encryption", "segment 0")?;
    if encryption != CIPHER {
        return Err(VolumeError::UnsupportedCipher(encryption.to_string()));
    }
    if segment.get("integrity").is_some() {
        return Err(meta_err("segment 0 uses dm-integrity, which nbdcrypt does not support"));
    }
    if string_u64(segment, "iv_tweak", "segment 0")? != 0 {
        return Err(meta_err("segment 0 has a nonzero iv_tweak, which nbdcrypt does not support"));
    }

    let sector_bytes = segment
        .get("sector_size")
        .and_then(Value::as_u64)
        .ok_or_else(|| meta_err("segment 0 sector_size is missing or not a number"))?;
    let sector_size =
        u32::try_from(sector_bytes)
            .ok()
            .and_then(|bytes| SectorSize::from_bytes(bytes).ok())
            .ok_or_else(|| meta_err(&format!("segment 0 sector_size {sector_bytes} is not 512 or 4096")))?;

    let offset = string_u64(segment, "offset", "segment 0")?;
    let header_end = 2 * header_area_size + keyslots_size;
    if offset < header_end || offset % sector_size.len_u64() != 0 {
        return Err(meta_err(&format!(
            "segment 0 offset {offset} overlaps the headers (which end at {header_end}) or is not sector-aligned"
        )));
    }

    let size = match segment.get("size").and_then(Value::as_str) {
        Some("dynamic") => None,
        Some(_) => {
            let bytes = string_u64(segment, "size", "segment 0")?;
            if bytes % sector_size.len_u64() != 0 {
                return Err(meta_err("segment 0 size is not a multiple of its sector size"));
            }
            Some(bytes)
        }
        None => return Err(meta_err("segment 0 size is missing")),
    };

    Ok(CryptSegment { offset, size, sector_size })
}

fn parse_digest(digests: &Value) -> Result<VolumeKeyDigest, VolumeError> {
    let digests = digests.as_object().ok_or_else(|| meta_err("digests is not an object"))?;
    let digest = digests
        .values()
        .find(|d| {
            d.get("segments")
                .and_then(Value::as_array)
                .is_some_and(|segments| segments.iter().any(|s| s.as_str() == Some("0")))
        })
        .ok_or_else(|| meta_err("no digest covers segment 0"))?;

    let kind = string_field(digest, "type", "digest")?;
    if kind != "pbkdf2" {
        return Err(meta_err(&format!("digest type {kind:?} is not supported, expected \"pbkdf2\"")));
    }
    let hash = string_field(digest, "hash", "digest")?;
    if hash != "sha256" {
        return Err(meta_err(&format!("digest hash {hash:?} is not supported, expected \"sha256\"")));
    }
    let iterations = digest
        .get("iterations")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (1..=MAX_DIGEST_ITERATIONS).contains(n))
        .ok_or_else(|| {
            meta_err(&format!("digest iterations missing or outside 1..={MAX_DIGEST_ITERATIONS}"))
        })?;
    let salt = base64_field(digest, "salt", "digest")?;
    let value = base64_field(digest, "digest", "digest")?;
    if salt.is_empty() || salt.len() > 64 || value.len() != 32 {
        return Err(meta_err("digest salt or value has an invalid length"));
    }
    Ok(VolumeKeyDigest { iterations, salt, digest: value })
}

fn parse_tokens(tokens: &Value) -> Result<(Option<String>, Option<KmsToken>), VolumeError> {
    let tokens = tokens.as_object().ok_or_else(|| meta_err("tokens is not an object"))?;
    let ours: BTreeMap<&String, &Value> = tokens
        .iter()
        .filter(|(_, token)| token.get("type").and_then(Value::as_str) == Some(KmsToken::TYPE))
        .collect();
    match ours.len() {
        0 => Ok((None, None)),
        1 => {
            let (id, value) = ours.into_iter().next().expect("length checked above");
            Ok((Some(id.clone()), Some(KmsToken::from_json(value)?)))
        }
        n => Err(meta_err(&format!("volume has {n} {} tokens, expected one", KmsToken::TYPE))),
    }
}

pub(super) fn string_field<'a>(object: &'a Value, key: &str, context: &str) -> Result<&'a str, VolumeError> {
    object
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| meta_err(&format!("{context} field {key:?} is missing or not a string")))
}

fn string_u64(object: &Value, key: &str, context: &str) -> Result<u64, VolumeError> {
    let text = string_field(object, key, context)?;
    text.parse::<u64>()
        .map_err(|_| meta_err(&format!("{context} field {key:?} is not a decimal number: {text:?}")))
}

pub(super) fn base64_field(object: &Value, key: &str, context: &str) -> Result<Vec<u8>, VolumeError> {
    let text = string_field(object, key, context)?;
    BASE64.decode(text).map_err(|_| meta_err(&format!("{context} field {key:?} is not valid base64")))
}

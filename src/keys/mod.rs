//! Key providers: where key-encryption keys (KEKs) live and how volume keys are wrapped.
//!
//! The trait is shaped for a KMS that never releases its KEK: the provider wraps and unwraps
//! volume keys itself, so a provider that fetches the KEK and one that asks the KMS to
//! encrypt look the same to callers.

pub mod kmip;
mod local;

use std::fmt;

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, VolumeKey};
use crate::volume::WrapAlgorithm;
pub use kmip::{KmipConfig, KmipProvider};
pub use local::LocalKeystore;

/// Errors from key providers.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key id {0:?} is invalid: use 1 to 128 characters from A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.'")]
    InvalidKeyId(String),
    #[error("key {key_id:?} not found in key provider {provider:?}")]
    KeyNotFound { provider: String, key_id: String },
    #[error("keystore {path}: {reason}")]
    Keystore { path: String, reason: String },
    #[error("key provider {provider:?} does not support wrap algorithm {alg}")]
    UnsupportedWrap { provider: String, alg: &'static str },
    #[error("key provider {0:?} is not configured")]
    UnknownProvider(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Kmip(#[from] kmip::KmipError),
}

/// Reachability of a key provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Available,
    Unavailable(String),
}

/// A volume key wrapped by a provider, with the algorithm that wrapped it. It is a secret:
/// zeroized on drop and redacted in `Debug`.
pub struct WrappedKey {
    pub alg: WrapAlgorithm,
    pub bytes: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey").field("alg", &self.alg).field("bytes", &"[REDACTED]").finish()
    }
}

/// A source of key-encryption keys.
#[async_trait]
pub trait KeyProvider: Send + Sync {
    /// The configured provider name recorded in volume tokens.
    fn name(&self) -> &str;

    /// Creates a new KEK for the volume with UUID `volume_uuid` and returns its key id.
    async fn create_key(&self, volume_uuid: &str) -> Result<String, KeyError>;

    /// Wraps a volume key under the KEK `key_id`.
    async fn wrap_volume_key(&self, key_id: &str, key: &VolumeKey) -> Result<WrappedKey, KeyError>;

    /// Unwraps a volume key with the KEK `key_id`. The caller still checks the result
    /// against the LUKS2 digest.
    async fn unwrap_volume_key(&self, key_id: &str, wrapped: &WrappedKey) -> Result<VolumeKey, KeyError>;

    /// Reports whether the provider can serve requests now.
    async fn health(&self) -> Health;
}

//! Secret key types: the volume key (the LUKS2 "volume key", the DEK) and key-encryption keys.
//!
//! Every type here zeroizes its bytes on drop, has no `Clone`, and prints as `[REDACTED]` in
//! `Debug`, so a key cannot reach a log line through formatting.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::CryptoError;

/// Length in bytes of an AES-256-XTS volume key: a 256-bit data key then a 256-bit tweak key.
pub const VOLUME_KEY_LEN: usize = 64;

/// Length in bytes of a key-encryption key (AES-256).
pub const KEK_LEN: usize = 32;

/// The 512-bit AES-256-XTS volume key that encrypts the data area.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct VolumeKey(Box<[u8; VOLUME_KEY_LEN]>);

impl VolumeKey {
    /// Generates a fresh volume key from the operating system's random source.
    pub fn generate() -> Result<Self, CryptoError> {
        loop {
            let mut bytes = Box::new([0u8; VOLUME_KEY_LEN]);
            getrandom::getrandom(bytes.as_mut_slice()).map_err(CryptoError::Random)?;
            // Equal halves are rejected by `from_bytes`; with a working random source the
            // retry never runs, but it keeps `generate` from failing on a 2^-256 event.
            match Self::from_boxed(bytes) {
                Ok(key) => return Ok(key),
                Err(CryptoError::EqualXtsKeyHalves) => continue,
                Err(other) => return Err(other),
            }
        }
    }

    /// Builds a volume key from raw bytes, rejecting keys whose two XTS halves are equal
    /// (IEEE 1619-2007 and NIST SP 800-38E forbid Key1 = Key2).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != VOLUME_KEY_LEN {
            return Err(CryptoError::KeyLength { expected: VOLUME_KEY_LEN, actual: bytes.len() });
        }
        let mut boxed = Box::new([0u8; VOLUME_KEY_LEN]);
        boxed.copy_from_slice(bytes);
        Self::from_boxed(boxed)
    }

    fn from_boxed(bytes: Box<[u8; VOLUME_KEY_LEN]>) -> Result<Self, CryptoError> {
        let key = VolumeKey(bytes);
        let (data_key, tweak_key) = key.0.split_at(VOLUME_KEY_LEN / 2);
        if data_key == tweak_key {
            return Err(CryptoError::EqualXtsKeyHalves);
        }
        Ok(key)
    }

    /// The raw key bytes. Callers must not copy them into memory that outlives the call.
    pub fn as_bytes(&self) -> &[u8; VOLUME_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey([REDACTED])")
    }
}

/// A 256-bit AES key-encryption key (KEK) that wraps volume keys.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Kek(Box<[u8; KEK_LEN]>);

impl Kek {
    /// Generates a fresh KEK from the operating system's random source.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut bytes = Box::new([0u8; KEK_LEN]);
        getrandom::getrandom(bytes.as_mut_slice()).map_err(CryptoError::Random)?;
        Ok(Kek(bytes))
    }

    /// Builds a KEK from exactly 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != KEK_LEN {
            return Err(CryptoError::KeyLength { expected: KEK_LEN, actual: bytes.len() });
        }
        let mut boxed = Box::new([0u8; KEK_LEN]);
        boxed.copy_from_slice(bytes);
        Ok(Kek(boxed))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEK_LEN] {
        &self.0
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_key_rejects_equal_halves() {
        let bytes = [7u8; VOLUME_KEY_LEN];
        assert!(matches!(VolumeKey::from_bytes(&bytes), Err(CryptoError::EqualXtsKeyHalves)));
    }

    #[test]
    fn volume_key_rejects_wrong_length() {
        assert!(matches!(
            VolumeKey::from_bytes(&[1u8; 32]),
            Err(CryptoError::KeyLength { expected: 64, actual: 32 })
        ));
    }

    #[test]
    fn debug_output_is_redacted() {
        let key = VolumeKey::generate().unwrap();
        let printed = format!("{key:?}");
        assert_eq!(printed, "VolumeKey([REDACTED])");
        let kek = Kek::generate().unwrap();
        assert_eq!(format!("{kek:?}"), "Kek([REDACTED])");
    }

    #[test]
    fn generated_keys_differ() {
        let a = VolumeKey::generate().unwrap();
        let b = VolumeKey::generate().unwrap();
        assert_ne!(a.as_bytes(), b.as_bytes());
    }
}

//! Cryptography: AES-256-XTS over whole sectors, AES key wrap, and the key types.
//!
//! The tweak rule matches dm-crypt's `aes-xts-plain64` for LUKS2 volumes made without
//! `iv_large_sectors`: the tweak of a sector is its offset from the start of the data segment
//! counted in 512-byte units, as a 64-bit little-endian number padded with zeros to 16 bytes.
//! A 4096-byte sector n therefore uses tweak 8·n.

mod aws_lc;
mod keys;
mod locked;
mod wrap;
mod xts;

pub use keys::{Kek, VolumeKey, KEK_LEN, VOLUME_KEY_LEN};
pub use locked::LockedBox;
pub use wrap::{unwrap_volume_key, wrap_volume_key, WRAPPED_VOLUME_KEY_LEN};
pub use xts::{SectorCipher, SectorSize, XtsImplementation};

/// Errors from key handling and cipher setup.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key has {actual} bytes, expected {expected}")]
    KeyLength { expected: usize, actual: usize },
    #[error("AES-XTS key is invalid: its data half equals its tweak half")]
    EqualXtsKeyHalves,
    #[error("operating system random source failed: {0}")]
    Random(getrandom::Error),
    #[error("unwrapping the volume key failed: wrong key-encryption key or corrupt wrapped key")]
    UnwrapFailed,
    #[error("wrapped volume key has {actual} bytes, expected {expected}")]
    WrappedKeyLength { expected: usize, actual: usize },
    #[error("unsupported sector size {0}: expected 512 or 4096")]
    SectorSize(u32),
}

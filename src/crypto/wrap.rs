//! AES key wrap (RFC 3394) of a volume key under a KEK.

use aes_kw::KekAes256;

use super::{CryptoError, Kek, VolumeKey, VOLUME_KEY_LEN};

/// Length of a wrapped volume key: RFC 3394 adds one 8-byte integrity block.
pub const WRAPPED_VOLUME_KEY_LEN: usize = VOLUME_KEY_LEN + 8;

/// Wraps `key` under `kek` with AES-256 key wrap (RFC 3394, default IV).
pub fn wrap_volume_key(kek: &Kek, key: &VolumeKey) -> Result<Vec<u8>, CryptoError> {
    let wrapper = KekAes256::from(*kek.as_bytes());
    let mut out = vec![0u8; WRAPPED_VOLUME_KEY_LEN];
    wrapper
        .wrap(key.as_bytes(), &mut out)
        .map_err(|_| CryptoError::WrappedKeyLength { expected: WRAPPED_VOLUME_KEY_LEN, actual: 0 })?;
    Ok(out)
}

/// Unwraps a volume key. The RFC 3394 integrity check rejects a wrong KEK or a tampered blob.
pub fn unwrap_volume_key(kek: &Kek, wrapped: &[u8]) -> Result<VolumeKey, CryptoError> {
    if wrapped.len() != WRAPPED_VOLUME_KEY_LEN {
        return Err(CryptoError::WrappedKeyLength {
            expected: WRAPPED_VOLUME_KEY_LEN,
            actual: wrapped.len(),
        });
    }
    let wrapper = KekAes256::from(*kek.as_bytes());
    let mut plain = zeroize::Zeroizing::new([0u8; VOLUME_KEY_LEN]);
    wrapper.unwrap(wrapped, plain.as_mut_slice()).map_err(|_| CryptoError::UnwrapFailed)?;
    VolumeKey::from_bytes(plain.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trip() {
        let kek = Kek::generate().unwrap();
        let key = VolumeKey::generate().unwrap();
        let wrapped = wrap_volume_key(&kek, &key).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_VOLUME_KEY_LEN);
        let back = unwrap_volume_key(&kek, &wrapped).unwrap();
        assert_eq!(back.as_bytes(), key.as_bytes());
    }

    #[test]
    fn unwrap_with_wrong_kek_fails() {
        let key = VolumeKey::generate().unwrap();
        let wrapped = wrap_volume_key(&Kek::generate().unwrap(), &key).unwrap();
        let result = unwrap_volume_key(&Kek::generate().unwrap(), &wrapped);
        assert!(matches!(result, Err(CryptoError::UnwrapFailed)));
    }

    #[test]
    fn unwrap_detects_tampering() {
        let kek = Kek::generate().unwrap();
        let key = VolumeKey::generate().unwrap();
        let mut wrapped = wrap_volume_key(&kek, &key).unwrap();
        wrapped[20] ^= 1;
        assert!(matches!(unwrap_volume_key(&kek, &wrapped), Err(CryptoError::UnwrapFailed)));
    }

    #[test]
    fn rfc3394_vector_256_bit_kek() {
        // RFC 3394 section 4.6: 256 bits of key data wrapped with a 256-bit KEK.
        let kek = hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F");
        let data = hex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F");
        let expected =
            hex("28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21");
        let wrapper = KekAes256::from(<[u8; 32]>::try_from(kek.as_slice()).unwrap());
        let mut out = vec![0u8; 40];
        wrapper.wrap(&data, &mut out).unwrap();
        assert_eq!(out, expected);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }
}

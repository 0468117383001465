//! AES-256-XTS (IEEE 1619) over whole sectors, with two implementations chosen at run time:
//! aws-lc's assembly routines (AVX-512 with VAES, else AES-NI) on x86-64 CPUs with AES-NI,
//! and a portable batched one everywhere else. The portable path computes the tweaks of a run of blocks first, then
//! runs the AES rounds over the whole run in one call, which lets the `aes` crate use its
//! parallel AES-NI path instead of one block at a time.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::inout::InOutBuf;
use aes::cipher::typenum::U16;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Aes256Enc};

use super::aws_lc::{self, AwsLcXts};
use super::locked::LockedBox;
use super::{CryptoError, VolumeKey};

/// AES block length in bytes.
const BLOCK_LEN: usize = 16;

/// Blocks per batch: 32 blocks (512 bytes) keep the tweak table on the stack and in L1.
const BATCH_BLOCKS: usize = 32;

/// Unit in which the plain64 tweak counts sectors, as dm-crypt does without `iv_large_sectors`.
const TWEAK_UNIT: u64 = 512;

/// GF(2^128) reduction constant of the XTS polynomial x^128 + x^7 + x^2 + x + 1.
const GF_128_FEEDBACK: u128 = 0x87;

/// An encryption sector size supported by LUKS2 `aes-xts-plain64` here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorSize {
    S512,
    S4096,
}

impl SectorSize {
    /// Parses a sector size in bytes.
    pub fn from_bytes(bytes: u32) -> Result<Self, CryptoError> {
        match bytes {
            512 => Ok(SectorSize::S512),
            4096 => Ok(SectorSize::S4096),
            other => Err(CryptoError::SectorSize(other)),
        }
    }

    /// The sector size in bytes.
    pub const fn bytes(self) -> u32 {
        match self {
            SectorSize::S512 => 512,
            SectorSize::S4096 => 4096,
        }
    }

    /// The sector size in bytes as `usize`.
    #[allow(clippy::len_without_is_empty)] // a sector size is never zero
    pub const fn len(self) -> usize {
        self.bytes() as usize
    }

    /// The sector size in bytes as `u64`.
    pub const fn len_u64(self) -> u64 {
        self.bytes() as u64
    }
}

/// An AES-256-XTS implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XtsImplementation {
    /// aws-lc's `EVP_aes_256_xts`, chosen on x86-64 CPUs with AES-NI.
    AwsLc,
    /// Batched XTS over the `aes` crate: AES-NI where present, constant-time software
    /// elsewhere.
    Portable,
}

impl XtsImplementation {
    /// The fastest implementation for this CPU.
    pub fn best_available() -> Self {
        if aws_lc::has_hardware_xts() {
            XtsImplementation::AwsLc
        } else {
            XtsImplementation::Portable
        }
    }

    /// A short name for logs and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            XtsImplementation::AwsLc => "aws-lc",
            XtsImplementation::Portable => "portable",
        }
    }
}

/// Encrypts and decrypts whole sectors of one volume. The key material lives in locked,
/// non-dumpable memory and is zeroized when the cipher drops (see the aws-lc module for
/// the key schedules inside aws-lc's contexts).
pub struct SectorCipher {
    engine: Engine,
    sector_size: SectorSize,
}

enum Engine {
    AwsLc(AwsLcXts),
    Portable(LockedBox<XtsKeys>),
}

/// The two AES-256 key schedules of XTS: data (Key1) and tweak (Key2).
struct XtsKeys {
    data: Aes256,
    tweak: Aes256Enc,
}

impl SectorCipher {
    /// Prepares the cipher for `key` with the fastest implementation for this CPU. The
    /// volume key already rejects equal halves.
    pub fn new(key: &VolumeKey, sector_size: SectorSize) -> Self {
        Self::with_implementation(key, sector_size, XtsImplementation::best_available())
    }

    /// Prepares the cipher for `key` with a chosen implementation. Both implementations run
    /// on every CPU; aws-lc falls back to constant-time software AES without AES-NI.
    pub fn with_implementation(
        key: &VolumeKey,
        sector_size: SectorSize,
        implementation: XtsImplementation,
    ) -> Self {
        let engine = match implementation {
            XtsImplementation::AwsLc => Engine::AwsLc(AwsLcXts::new(key.as_bytes())),
            XtsImplementation::Portable => {
                let (data_key, tweak_key) = key.as_bytes().split_at(32);
                Engine::Portable(LockedBox::new(XtsKeys {
                    data: Aes256::new(GenericArray::from_slice(data_key)),
                    tweak: Aes256Enc::new(GenericArray::from_slice(tweak_key)),
                }))
            }
        };
        SectorCipher { engine, sector_size }
    }

    /// The sector size this cipher was built for.
    pub fn sector_size(&self) -> SectorSize {
        self.sector_size
    }

    /// The implementation this cipher runs.
    pub fn implementation(&self) -> XtsImplementation {
        match self.engine {
            Engine::AwsLc(_) => XtsImplementation::AwsLc,
            Engine::Portable(_) => XtsImplementation::Portable,
        }
    }

    /// Encrypts `buf` in place; it holds whole sectors, the first being data sector
    /// `first_sector` (counted in this volume's sector size from the data segment start).
    ///
    /// # Panics
    /// If `buf.len()` is not a multiple of the sector size: callers align every buffer.
    pub fn encrypt_sectors(&self, first_sector: u64, buf: &mut [u8]) {
        self.apply(first_sector, buf, Direction::Encrypt);
    }

    /// Decrypts `buf` in place; the layout rules of [`Self::encrypt_sectors`] apply.
    pub fn decrypt_sectors(&self, first_sector: u64, buf: &mut [u8]) {
        self.apply(first_sector, buf, Direction::Decrypt);
    }

    fn apply(&self, first_sector: u64, buf: &mut [u8], direction: Direction) {
        let sector_len = self.sector_size.len();
        assert!(buf.len() % sector_len == 0, "buffer is not a whole number of sectors");
        let units_per_sector = self.sector_size.len_u64() / TWEAK_UNIT;
        let first_tweak = first_sector.wrapping_mul(units_per_sector);

        match &self.engine {
            Engine::AwsLc(xts) => {
                let encrypt = matches!(direction, Direction::Encrypt);
                xts.apply(buf, sector_len, first_tweak, units_per_sector, encrypt);
            }
            Engine::Portable(keys) => {
                let mut tweak_value = first_tweak;
                for sector in buf.chunks_exact_mut(sector_len) {
                    apply_data_unit(keys, tweak_value, sector, direction);
                    tweak_value = tweak_value.wrapping_add(units_per_sector);
                }
            }
        }
    }
}

/// Processes one XTS data unit (one sector) with the 64-bit plain64 tweak `tweak_value`.
fn apply_data_unit(keys: &XtsKeys, tweak_value: u64, unit: &mut [u8], direction: Direction) {
    let mut tweak_block = GenericArray::<u8, U16>::default();
    tweak_block[..8].copy_from_slice(&tweak_value.to_le_bytes());
    keys.tweak.encrypt_block(&mut tweak_block);
    let mut tweak = u128::from_le_bytes(tweak_block.into());

    let mut tweaks = [0u128; BATCH_BLOCKS];
    for batch in unit.chunks_mut(BATCH_BLOCKS * BLOCK_LEN) {
        let blocks = batch.len() / BLOCK_LEN;
        for slot in tweaks.iter_mut().take(blocks) {
            *slot = tweak;
            tweak = multiply_by_alpha(tweak);
        }

        xor_tweaks(batch, &tweaks[..blocks]);
        let (block_buf, _tail) = InOutBuf::from(&mut *batch).into_chunks::<U16>();
        match direction {
            Direction::Encrypt => keys.data.encrypt_blocks_inout(block_buf),
            Direction::Decrypt => keys.data.decrypt_blocks_inout(block_buf),
        }
        xor_tweaks(batch, &tweaks[..blocks]);
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// Multiplies a tweak by the primitive element α of GF(2^128), in the little-endian
/// convention of IEEE 1619.
fn multiply_by_alpha(tweak: u128) -> u128 {
    let carry = tweak >> 127;
    (tweak << 1) ^ (carry * GF_128_FEEDBACK)
}

fn xor_tweaks(batch: &mut [u8], tweaks: &[u128]) {
    for (block, tweak) in batch.chunks_exact_mut(BLOCK_LEN).zip(tweaks) {
        let mut bytes = [0u8; BLOCK_LEN];
        bytes.copy_from_slice(block);
        let mixed = u128::from_le_bytes(bytes) ^ tweak;
        block.copy_from_slice(&mixed.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    const IMPLEMENTATIONS: [XtsImplementation; 2] = [XtsImplementation::AwsLc, XtsImplementation::Portable];

    /// Runs one 512-byte data unit whose tweak is `tweak_value`: with 512-byte sectors the
    /// tweak of sector n is n.
    fn encrypt_unit(implementation: XtsImplementation, key: &[u8], tweak_value: u64, data: &mut [u8]) {
        let key = VolumeKey::from_bytes(key).unwrap();
        SectorCipher::with_implementation(&key, SectorSize::S512, implementation)
            .encrypt_sectors(tweak_value, data);
    }

    fn decrypt_unit(implementation: XtsImplementation, key: &[u8], tweak_value: u64, data: &mut [u8]) {
        let key = VolumeKey::from_bytes(key).unwrap();
        SectorCipher::with_implementation(&key, SectorSize::S512, implementation)
            .decrypt_sectors(tweak_value, data);
    }

    /// IEEE 1619-2007 annex B, vector 10: XTS-AES-256, data unit sequence number 0xff,
    /// 512-byte data unit holding bytes 00..ff twice.
    #[test]
    fn ieee1619_vector_10() {
        let key = hex(concat!(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592"
        ));
        let plaintext: Vec<u8> = (0..512).map(|i| (i % 256) as u8).collect();
        let expected = hex(concat!(
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
            "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd",
            "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
            "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca",
            "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0",
            "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
            "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec",
            "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a",
            "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
            "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae",
            "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29",
            "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
            "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f",
            "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385",
            "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
            "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"
        ));

        for implementation in IMPLEMENTATIONS {
            let mut buf = plaintext.clone();
            encrypt_unit(implementation, &key, 0xff, &mut buf);
            assert_eq!(buf, expected, "{} encryption", implementation.name());

            decrypt_unit(implementation, &key, 0xff, &mut buf);
            assert_eq!(buf, plaintext, "{} decryption", implementation.name());
        }
    }

    #[test]
    fn sector_4096_uses_tweak_in_512_byte_units() {
        let key = VolumeKey::generate().unwrap();
        let (data_key, tweak_key) = key.as_bytes().split_at(32);
        let keys = XtsKeys {
            data: Aes256::new(GenericArray::from_slice(data_key)),
            tweak: Aes256Enc::new(GenericArray::from_slice(tweak_key)),
        };
        let mut expected = vec![0x5a_u8; 2 * 4096];
        apply_data_unit(&keys, 24, &mut expected[..4096], Direction::Encrypt);
        apply_data_unit(&keys, 32, &mut expected[4096..], Direction::Encrypt);

        for implementation in IMPLEMENTATIONS {
            let mut sectors = vec![0x5a_u8; 2 * 4096];
            SectorCipher::with_implementation(&key, SectorSize::S4096, implementation)
                .encrypt_sectors(3, &mut sectors);
            assert_eq!(sectors, expected, "{}", implementation.name());
        }
    }

    #[test]
    fn best_available_is_aws_lc_with_aes_ni() {
        let expected =
            if aws_lc::has_hardware_xts() { XtsImplementation::AwsLc } else { XtsImplementation::Portable };
        assert_eq!(XtsImplementation::best_available(), expected);
    }

    #[test]
    fn multiply_by_alpha_carries_into_feedback() {
        assert_eq!(multiply_by_alpha(1), 2);
        assert_eq!(multiply_by_alpha(1u128 << 127), GF_128_FEEDBACK);
    }

    fn reference_encrypt(key: &[u8], sector_size: usize, first_sector: u64, data: &mut [u8]) {
        use xts_mode::Xts128;
        let cipher_1 = Aes256::new(GenericArray::from_slice(&key[..32]));
        let cipher_2 = Aes256::new(GenericArray::from_slice(&key[32..]));
        let xts = Xts128::new(cipher_1, cipher_2);
        let units = (sector_size / 512) as u128;
        xts.encrypt_area(data, sector_size, first_sector as u128, |n| (n * units).to_le_bytes());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn matches_reference_implementation(
            key in proptest::collection::vec(any::<u8>(), 64),
            sectors in 1usize..4,
            first_sector in any::<u32>(),
            large in any::<bool>(),
            seed in any::<u8>(),
        ) {
            prop_assume!(key[..32] != key[32..]);
            let sector_size = if large { SectorSize::S4096 } else { SectorSize::S512 };
            let len = sectors * sector_size.len();
            let plaintext: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();

            let mut reference = plaintext.clone();
            reference_encrypt(&key, sector_size.len(), u64::from(first_sector), &mut reference);

            let volume_key = VolumeKey::from_bytes(&key).unwrap();
            for implementation in IMPLEMENTATIONS {
                let cipher = SectorCipher::with_implementation(&volume_key, sector_size, implementation);
                let mut ours = plaintext.clone();
                cipher.encrypt_sectors(u64::from(first_sector), &mut ours);
                prop_assert_eq!(&ours, &reference, "{} encryption", implementation.name());

                cipher.decrypt_sectors(u64::from(first_sector), &mut ours);
                prop_assert_eq!(&ours, &plaintext, "{} decryption", implementation.name());
            }
        }
    }
}

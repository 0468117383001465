//! The LUKS2 volume header: two binary headers with JSON metadata, a pbkdf2 digest of the
//! volume key, and the nbdcrypt KMS token.
//!
//! Layout written by nbdcrypt (the same as `cryptsetup luksFormat --type luks2` defaults):
//!
//! | bytes                | contents                                       |
//! |----------------------|------------------------------------------------|
//! | 0 .. 16 KiB          | primary header area (binary header + JSON)     |
//! | 16 KiB .. 32 KiB     | secondary header area                          |
//! | 32 KiB .. 16 MiB     | keyslots area (unused by nbdcrypt, zeros)      |
//! | 16 MiB .. end        | data segment: AES-256-XTS ciphertext           |
//!
//! Every header read from disk is untrusted: each field is validated before use, a damaged
//! primary falls back to the secondary, and updates write one copy at a time with a higher
//! sequence id so a crash between the two writes leaves one valid, openable copy.

mod binary;
mod metadata;
mod token;

use std::fs::File;
use std::os::unix::fs::FileExt;

use hmac::Hmac;
use sha2::Sha256;

use crate::crypto::{SectorSize, VolumeKey};
pub use binary::{BinaryHeader, HeaderCopy, MAGIC_PRIMARY, SALT_LEN};
pub use metadata::{CryptSegment, Metadata, VolumeKeyDigest, CIPHER};
pub use token::{is_valid_provider_name, KmsToken, WrapAlgorithm, TOKEN_VERSION};

/// Size of each header area written by nbdcrypt.
pub const HEADER_AREA_SIZE: u64 = 0x4000;

/// Offset of the data segment written by nbdcrypt: 16 MiB, as cryptsetup does by default.
pub const DATA_OFFSET: u64 = 16 * 1024 * 1024;

/// pbkdf2 iterations for the volume key digest. The volume key is 512 random bits, so the
/// digest only has to identify the key, not slow down guessing; 1000 is cryptsetup's minimum
/// and keeps `cryptsetup open --volume-key-file` fast.
pub const DIGEST_ITERATIONS: u32 = 1000;

/// Largest header area any LUKS2 volume may have; reads never allocate more than this.
const MAX_HEADER_AREA_SIZE: u64 = 0x400000;

/// Errors from reading, validating or writing a volume header.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("no LUKS2 header at byte offset {offset}")]
    NotLuks2 { offset: u64 },
    #[error("LUKS version {0} is not supported (nbdcrypt reads LUKS2 only)")]
    UnsupportedVersion(u16),
    #[error("LUKS2 header at byte offset {offset} is corrupt: {reason}")]
    CorruptHeader { offset: u64, reason: String },
    #[error("LUKS2 metadata is invalid: {0}")]
    Metadata(String),
    #[error("volume needs features nbdcrypt does not support (mandatory requirements: {0})")]
    UnsupportedRequirement(String),
    #[error("cipher {0:?} is not supported (nbdcrypt serves aes-xts-plain64 only)")]
    UnsupportedCipher(String),
    #[error("both LUKS2 headers are unusable: primary: {primary}; secondary: {secondary}")]
    NoValidHeader { primary: Box<VolumeError>, secondary: Box<VolumeError> },
    #[error("{0}")]
    Header(String),
    #[error("the volume key does not match the volume's digest")]
    WrongVolumeKey,
    #[error("volume has no {} token, so no key provider can unlock it", KmsToken::TYPE)]
    NoKmsToken,
    #[error("I/O on the volume header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A parsed, validated LUKS2 header.
#[derive(Debug, Clone)]
pub struct VolumeHeader {
    pub uuid: String,
    pub label: String,
    /// The LUKS2 subsystem field: empty on volumes nbdcrypt creates, kept as found otherwise.
    pub subsystem: String,
    pub seqid: u64,
    pub header_area_size: u64,
    pub metadata: Metadata,
    /// Set when one of the two copies was damaged or stale, so the next write repairs it.
    pub needs_repair: bool,
}

impl VolumeHeader {
    /// Builds the header of a new volume whose data area starts at [`DATA_OFFSET`] and holds
    /// `segment_size` bytes, or runs to the end of the device when that is `None`.
    pub fn new(
        uuid: String,
        volume_key: &VolumeKey,
        segment_size: Option<u64>,
        sector_size: SectorSize,
        token: KmsToken,
    ) -> Result<Self, VolumeError> {
        let mut salt = vec![0u8; 32];
        getrandom::getrandom(&mut salt)
            .map_err(|e| VolumeError::Header(format!("random source failed: {e}")))?;
        let digest = VolumeKeyDigest {
            iterations: DIGEST_ITERATIONS,
            digest: compute_digest(volume_key, &salt, DIGEST_ITERATIONS),
            salt,
        };
        let segment = CryptSegment { offset: DATA_OFFSET, size: segment_size, sector_size };
        Ok(VolumeHeader {
            uuid,
            label: String::new(),
            subsystem: String::new(),
            seqid: 1,
            header_area_size: HEADER_AREA_SIZE,
            metadata: Metadata::new(segment, digest, HEADER_AREA_SIZE, token),
            needs_repair: false,
        })
    }

    /// Reads the header from `file`, using the secondary copy when the primary is damaged and
    /// the newer copy when both are valid.
    pub fn read(file: &File) -> Result<Self, VolumeError> {
        Self::read_from(file)
    }

    /// Reads the header from any positional byte source, such as a file or an in-memory
    /// image; the rules of [`Self::read`] apply.
    pub fn read_from<S: HeaderSource + ?Sized>(file: &S) -> Result<Self, VolumeError> {
        let primary = read_copy(file, 0);
        let secondary_offsets: Vec<u64> = match &primary {
            Ok(header) => vec![header.header_area_size],
            Err(_) => binary::ALLOWED_HEADER_AREA_SIZES.to_vec(),
        };
        // Without a primary, every offset the format allows is tried. When none contains a
        // valid copy, the error reported is the one at the smallest offset, where the
        // secondary copy of an nbdcrypt volume sits, unless a larger offset at least has a
        // header magic.
        let mut secondary = Err(VolumeError::NotLuks2 { offset: secondary_offsets[0] });
        for (index, offset) in secondary_offsets.into_iter().enumerate() {
            let copy = read_copy(file, offset);
            let found_magic = !matches!(copy, Err(VolumeError::NotLuks2 { .. }));
            if index == 0
                || copy.is_ok()
                || (found_magic && matches!(secondary, Err(VolumeError::NotLuks2 { .. })))
            {
                secondary = copy;
            }
            if secondary.is_ok() {
                break;
            }
        }

        match (primary, secondary) {
            (Ok(p), Ok(s)) if p.uuid != s.uuid => Err(VolumeError::Header(format!(
                "the two header copies belong to different volumes (primary UUID {}, secondary \
                 UUID {}); neither is chosen",
                p.uuid, s.uuid
            ))),
            (Ok(p), Ok(s)) => {
                let stale = p.seqid != s.seqid;
                let mut chosen = if s.seqid > p.seqid { s } else { p };
                chosen.needs_repair = stale;
                Ok(chosen)
            }
            (Ok(mut p), Err(e)) => {
                tracing::warn!(error = %e, "secondary LUKS2 header is unusable; using the primary");
                p.needs_repair = true;
                Ok(p)
            }
            (Err(e), Ok(mut s)) => {
                tracing::warn!(error = %e, "primary LUKS2 header is unusable; using the secondary");
                s.needs_repair = true;
                Ok(s)
            }
            (Err(primary), Err(secondary)) => {
                if matches!(primary, VolumeError::NotLuks2 { .. })
                    && matches!(secondary, VolumeError::NotLuks2 { .. })
                {
                    return Err(primary);
                }
                Err(VolumeError::NoValidHeader { primary: Box::new(primary), secondary: Box::new(secondary) })
            }
        }
    }

    /// Writes both header copies with the next sequence id: the secondary first, synced, then
    /// the primary, synced. A crash after the first write leaves the newer secondary valid; a
    /// crash during it leaves the older primary valid.
    pub fn write(&mut self, file: &File) -> Result<(), VolumeError> {
        let json = self.metadata.to_json()?;
        self.seqid += 1;

        for (copy, offset) in [(HeaderCopy::Secondary, self.header_area_size), (HeaderCopy::Primary, 0)] {
            let binary = BinaryHeader {
                copy,
                header_area_size: self.header_area_size,
                seqid: self.seqid,
                label: self.label.clone(),
                salt: random_salt()?,
                uuid: self.uuid.clone(),
                subsystem: self.subsystem.clone(),
                header_offset: offset,
            };
            let area = binary.encode_area(&json)?;
            file.write_all_at(&area, offset)?;
            file.sync_data()?;
        }
        self.needs_repair = false;
        Ok(())
    }

    /// Checks `key` against the pbkdf2 digest in constant time.
    pub fn verify_volume_key(&self, key: &VolumeKey) -> Result<(), VolumeError> {
        let digest = &self.metadata.digest;
        let computed = compute_digest(key, &digest.salt, digest.iterations);
        let matches = computed.len() == digest.digest.len()
            && computed.iter().zip(&digest.digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if matches {
            Ok(())
        } else {
            Err(VolumeError::WrongVolumeKey)
        }
    }

    /// The KMS token, or an error naming what is missing.
    pub fn kms_token(&self) -> Result<&KmsToken, VolumeError> {
        self.metadata.token.as_ref().ok_or(VolumeError::NoKmsToken)
    }

    /// The data area for a backing store of `device_len` bytes: its byte offset and its
    /// length floored to whole sectors. Fails when the device is too small to hold any.
    pub fn data_area(&self, device_len: u64) -> Result<(u64, u64), VolumeError> {
        let segment = &self.metadata.segment;
        let available = device_len.checked_sub(segment.offset).ok_or_else(|| {
            VolumeError::Header(format!(
                "device is {device_len} bytes, smaller than the data offset {}",
                segment.offset
            ))
        })?;
        let len = match segment.size {
            Some(size) if size > available => {
                return Err(VolumeError::Header(format!(
                    "data segment needs {size} bytes but the device has {available} after the header"
                )))
            }
            Some(size) => size,
            None => available,
        };
        let sector = segment.sector_size.len_u64();
        Ok((segment.offset, len / sector * sector))
    }
}

fn read_copy<S: HeaderSource + ?Sized>(file: &S, offset: u64) -> Result<VolumeHeader, VolumeError> {
    let mut first = vec![0u8; binary::BINARY_HEADER_LEN];
    read_exact_at(file, &mut first, offset)?;
    let binary = BinaryHeader::decode(&first, offset)?;
    let expected_copy = if offset == 0 { HeaderCopy::Primary } else { HeaderCopy::Secondary };
    if binary.copy != expected_copy {
        return Err(VolumeError::CorruptHeader {
            offset,
            reason: "header has the other copy's magic".into(),
        });
    }
    if binary.header_area_size > MAX_HEADER_AREA_SIZE {
        return Err(VolumeError::CorruptHeader { offset, reason: "header area too large".into() });
    }

    let mut area = vec![0u8; binary.header_area_size as usize];
    read_exact_at(file, &mut area, offset)?;
    let json = binary::verify_area(&area, offset)?;
    let metadata = Metadata::parse(json, binary.header_area_size)?;
    Ok(VolumeHeader {
        uuid: binary.uuid,
        label: binary.label,
        subsystem: binary.subsystem,
        seqid: binary.seqid,
        header_area_size: binary.header_area_size,
        metadata,
        needs_repair: false,
    })
}

/// A positional byte source a header can be read from.
pub trait HeaderSource {
    /// Fills `buf` from `offset`, failing with `UnexpectedEof` when the source is shorter.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl HeaderSource for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl HeaderSource for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        buf.copy_from_slice(self.get(start..end).ok_or_else(eof)?);
        Ok(())
    }
}

/// Reads exactly `buf.len()` bytes, reporting a short device as a missing header.
fn read_exact_at<S: HeaderSource + ?Sized>(file: &S, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(VolumeError::NotLuks2 { offset }),
        Err(e) => Err(VolumeError::Io(e)),
    }
}

fn random_salt() -> Result<[u8; SALT_LEN], VolumeError> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::getrandom(&mut salt).map_err(|e| VolumeError::Header(format!("random source failed: {e}")))?;
    Ok(salt)
}

fn compute_digest(key: &VolumeKey, salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    pbkdf2::pbkdf2::<Hmac<Sha256>>(key.as_bytes(), salt, iterations, &mut out)
        .expect("HMAC accepts keys of any length");
    out
}

#[cfg(test)]
mod tests;

//! The LUKS2 binary header: the 4096-byte structure at the start of each of the two header
//! areas (LUKS2 on-disk format specification, section 2 "Binary header"). All integers are
//! big-endian. Offsets below are byte offsets inside the binary header.

use sha2::{Digest, Sha256};

use super::VolumeError;

pub const MAGIC_PRIMARY: [u8; 6] = *b"LUKS\xba\xbe";
pub const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";
pub const LUKS2_VERSION: u16 = 2;

/// Size of the binary header; the JSON area follows it inside the header area.
pub const BINARY_HEADER_LEN: usize = 4096;

/// Header area sizes (binary header plus JSON area) the specification allows.
pub const ALLOWED_HEADER_AREA_SIZES: [u64; 9] =
    [0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000];

const OFFSET_MAGIC: usize = 0;
const OFFSET_VERSION: usize = 6;
const OFFSET_HDR_SIZE: usize = 8;
const OFFSET_SEQID: usize = 16;
const OFFSET_LABEL: usize = 24;
const OFFSET_CHECKSUM_ALG: usize = 72;
const OFFSET_SALT: usize = 104;
const OFFSET_UUID: usize = 168;
const OFFSET_SUBSYSTEM: usize = 208;
const OFFSET_HDR_OFFSET: usize = 256;
const OFFSET_CHECKSUM: usize = 448;

const LABEL_LEN: usize = 48;
const CHECKSUM_ALG_LEN: usize = 32;
pub const SALT_LEN: usize = 64;
const UUID_LEN: usize = 40;
const SUBSYSTEM_LEN: usize = 48;
const CHECKSUM_LEN: usize = 64;
const SHA256_LEN: usize = 32;

/// Which of the two header copies a binary header claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderCopy {
    Primary,
    Secondary,
}

/// The fields of a LUKS2 binary header that nbdcrypt reads or writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryHeader {
    pub copy: HeaderCopy,
    /// Size in bytes of the header area: this binary header plus its JSON area.
    pub header_area_size: u64,
    pub seqid: u64,
    pub label: String,
    pub salt: [u8; SALT_LEN],
    pub uuid: String,
    pub subsystem: String,
    /// Byte offset of this header from the start of the device.
    pub header_offset: u64,
}

impl BinaryHeader {
    /// Serializes the binary header followed by `json` into one header area with a valid
    /// SHA-256 checksum. `json` must fit in the JSON area with room for a NUL terminator.
    pub fn encode_area(&self, json: &[u8]) -> Result<Vec<u8>, VolumeError> {
        let area_len = usize::try_from(self.header_area_size)
            .map_err(|_| VolumeError::Header("header area size does not fit in memory".into()))?;
        let json_area_len = area_len - BINARY_HEADER_LEN;
        if json.len() >= json_area_len {
            return Err(VolumeError::Header(format!(
                "JSON metadata is {} bytes, but the JSON area holds at most {} bytes",
                json.len(),
                json_area_len - 1
            )));
        }

        let mut area = vec![0u8; area_len];
        let magic = match self.copy {
            HeaderCopy::Primary => MAGIC_PRIMARY,
            HeaderCopy::Secondary => MAGIC_SECONDARY,
        };
        area[OFFSET_MAGIC..OFFSET_MAGIC + 6].copy_from_slice(&magic);
        area[OFFSET_VERSION..OFFSET_VERSION + 2].copy_from_slice(&LUKS2_VERSION.to_be_bytes());
        area[OFFSET_HDR_SIZE..OFFSET_HDR_SIZE + 8].copy_from_slice(&self.header_area_size.to_be_bytes());
        area[OFFSET_SEQID..OFFSET_SEQID + 8].copy_from_slice(&self.seqid.to_be_bytes());
        put_str(&mut area[OFFSET_LABEL..OFFSET_LABEL + LABEL_LEN], &self.label)?;
        put_str(&mut area[OFFSET_CHECKSUM_ALG..OFFSET_CHECKSUM_ALG + CHECKSUM_ALG_LEN], "sha256")?;
        area[OFFSET_SALT..OFFSET_SALT + SALT_LEN].copy_from_slice(&self.salt);
        put_str(&mut area[OFFSET_UUID..OFFSET_UUID + UUID_LEN], &self.uuid)?;
        put_str(&mut area[OFFSET_SUBSYSTEM..OFFSET_SUBSYSTEM + SUBSYSTEM_LEN], &self.subsystem)?;
        area[OFFSET_HDR_OFFSET..OFFSET_HDR_OFFSET + 8].copy_from_slice(&self.header_offset.to_be_bytes());
        area[BINARY_HEADER_LEN..BINARY_HEADER_LEN + json.len()].copy_from_slice(json);

        // The checksum covers the whole area with the checksum field itself zeroed.
        let checksum = Sha256::digest(&area);
        area[OFFSET_CHECKSUM..OFFSET_CHECKSUM + SHA256_LEN].copy_from_slice(&checksum);
        Ok(area)
    }

    /// Parses the first `BINARY_HEADER_LEN` bytes of a header area. This checks the fixed
    /// fields only; [`verify_area`] checks the checksum once the whole area is read.
    pub fn decode(bytes: &[u8], expected_offset: u64) -> Result<Self, VolumeError> {
        if bytes.len() < BINARY_HEADER_LEN {
            return Err(corrupt(expected_offset, "binary header is truncated"));
        }

        let magic = &bytes[OFFSET_MAGIC..OFFSET_MAGIC + 6];
        let copy = if magic == MAGIC_PRIMARY {
            HeaderCopy::Primary
        } else if magic == MAGIC_SECONDARY {
            HeaderCopy::Secondary
        } else {
            return Err(VolumeError::NotLuks2 { offset: expected_offset });
        };

        let version = u16::from_be_bytes([bytes[OFFSET_VERSION], bytes[OFFSET_VERSION + 1]]);
        if version != LUKS2_VERSION {
            return Err(VolumeError::UnsupportedVersion(version));
        }

        let header_area_size = read_u64(bytes, OFFSET_HDR_SIZE);
        if !ALLOWED_HEADER_AREA_SIZES.contains(&header_area_size) {
            return Err(corrupt(expected_offset, &format!("invalid header size {header_area_size}")));
        }

        let header_offset = read_u64(bytes, OFFSET_HDR_OFFSET);
        if header_offset != expected_offset {
            return Err(corrupt(
                expected_offset,
                &format!("header claims offset {header_offset}, found at {expected_offset}"),
            ));
        }

        let checksum_alg = get_str(&bytes[OFFSET_CHECKSUM_ALG..OFFSET_CHECKSUM_ALG + CHECKSUM_ALG_LEN]);
        if checksum_alg != "sha256" {
            return Err(corrupt(
                expected_offset,
                &format!("unsupported header checksum algorithm {checksum_alg:?}"),
            ));
        }

        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&bytes[OFFSET_SALT..OFFSET_SALT + SALT_LEN]);
        Ok(BinaryHeader {
            copy,
            header_area_size,
            seqid: read_u64(bytes, OFFSET_SEQID),
            label: get_str(&bytes[OFFSET_LABEL..OFFSET_LABEL + LABEL_LEN]),
            salt,
            uuid: get_str(&bytes[OFFSET_UUID..OFFSET_UUID + UUID_LEN]),
            subsystem: get_str(&bytes[OFFSET_SUBSYSTEM..OFFSET_SUBSYSTEM + SUBSYSTEM_LEN]),
            header_offset,
        })
    }
}

/// Checks the SHA-256 checksum of a whole header area and returns its JSON text (the bytes
/// of the JSON area up to the first NUL).
pub fn verify_area(area: &[u8], offset: u64) -> Result<&[u8], VolumeError> {
    let stored = &area[OFFSET_CHECKSUM..OFFSET_CHECKSUM + CHECKSUM_LEN];
    let mut hasher = Sha256::new();
    hasher.update(&area[..OFFSET_CHECKSUM]);
    hasher.update([0u8; CHECKSUM_LEN]);
    hasher.update(&area[OFFSET_CHECKSUM + CHECKSUM_LEN..]);
    let computed = hasher.finalize();
    if stored[..SHA256_LEN] != computed[..] {
        return Err(corrupt(offset, "header checksum mismatch"));
    }

    let json_area = &area[BINARY_HEADER_LEN..];
    let json_len = json_area
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| corrupt(offset, "JSON area is not NUL-terminated"))?;
    Ok(&json_area[..json_len])
}

fn corrupt(offset: u64, reason: &str) -> VolumeError {
    VolumeError::CorruptHeader { offset, reason: reason.to_string() }
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(raw)
}

/// Reads a NUL-padded string field, replacing invalid UTF-8 rather than failing: labels are
/// informational and never used as paths or keys.
fn get_str(field: &[u8]) -> String {
    let len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..len]).into_owned()
}

fn put_str(field: &mut [u8], value: &str) -> Result<(), VolumeError> {
    // One byte stays NUL so readers that expect a terminated C string find one.
    if value.len() >= field.len() {
        return Err(VolumeError::Header(format!(
            "header string {value:?} is longer than its {}-byte field",
            field.len() - 1
        )));
    }
    field[..value.len()].copy_from_slice(value.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(copy: HeaderCopy, offset: u64) -> BinaryHeader {
        BinaryHeader {
            copy,
            header_area_size: 0x4000,
            seqid: 7,
            label: "data".into(),
            salt: [3u8; SALT_LEN],
            uuid: "6b3d0c35-1f0e-4a55-9c59-2a1f4a0f7c11".into(),
            subsystem: String::new(),
            header_offset: offset,
        }
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let header = sample(HeaderCopy::Secondary, 0x4000);
        let area = header.encode_area(b"{\"a\":1}").unwrap();
        assert_eq!(area.len(), 0x4000);
        assert_eq!(&area[..6], &MAGIC_SECONDARY);
        assert_eq!(verify_area(&area, 0x4000).unwrap(), b"{\"a\":1}");
        assert_eq!(BinaryHeader::decode(&area, 0x4000).unwrap(), header);
    }

    #[test]
    fn checksum_detects_a_flipped_json_byte() {
        let mut area = sample(HeaderCopy::Primary, 0).encode_area(b"{}").unwrap();
        area[BINARY_HEADER_LEN] ^= 0x20;
        assert!(matches!(verify_area(&area, 0), Err(VolumeError::CorruptHeader { .. })));
    }

    #[test]
    fn decode_rejects_wrong_offset_and_size() {
        let area = sample(HeaderCopy::Primary, 0).encode_area(b"{}").unwrap();
        assert!(BinaryHeader::decode(&area, 0x4000).is_err());

        let mut bad_size = area.clone();
        bad_size[OFFSET_HDR_SIZE..OFFSET_HDR_SIZE + 8].copy_from_slice(&12345u64.to_be_bytes());
        assert!(BinaryHeader::decode(&bad_size, 0).is_err());
    }

    #[test]
    fn decode_rejects_other_magic() {
        let area = vec![0u8; 4096];
        assert!(matches!(BinaryHeader::decode(&area, 0), Err(VolumeError::NotLuks2 { .. })));
    }
}

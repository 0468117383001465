use std::io::Write;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;
use zeroize::Zeroizing;

use super::*;

fn token() -> KmsToken {
    KmsToken {
        key_provider: "local".into(),
        key_id: "k1".into(),
        wrap_alg: WrapAlgorithm::AesKw,
        wrapped_key: Zeroizing::new(vec![1u8; 72]),
    }
}

fn new_volume() -> (tempfile::NamedTempFile, VolumeKey, VolumeHeader) {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(DATA_OFFSET + 1024 * 1024).unwrap();
    let key = VolumeKey::generate().unwrap();
    let mut header =
        VolumeHeader::new(uuid::Uuid::new_v4().to_string(), &key, None, SectorSize::S4096, token()).unwrap();
    header.write(file.as_file()).unwrap();
    (file, key, header)
}

#[test]
fn header_round_trip() {
    let (file, key, written) = new_volume();
    let read = VolumeHeader::read(file.as_file()).unwrap();
    assert_eq!(read.uuid, written.uuid);
    assert_eq!(read.seqid, written.seqid);
    assert!(!read.needs_repair);
    assert_eq!(read.metadata.segment.sector_size, SectorSize::S4096);
    assert_eq!(read.kms_token().unwrap().key_id, "k1");
    read.verify_volume_key(&key).unwrap();
    assert_eq!(read.data_area(DATA_OFFSET + 1024 * 1024).unwrap(), (DATA_OFFSET, 1024 * 1024));
}

#[test]
fn wrong_volume_key_is_rejected() {
    let (file, _key, _) = new_volume();
    let read = VolumeHeader::read(file.as_file()).unwrap();
    let other = VolumeKey::generate().unwrap();
    assert!(matches!(read.verify_volume_key(&other), Err(VolumeError::WrongVolumeKey)));
}

#[test]
fn damaged_primary_falls_back_to_secondary() {
    let (file, key, written) = new_volume();
    file.as_file().write_all_at(&[0xff; 64], 4200).unwrap();
    let read = VolumeHeader::read(file.as_file()).unwrap();
    assert_eq!(read.uuid, written.uuid);
    assert!(read.needs_repair);
    read.verify_volume_key(&key).unwrap();
}

#[test]
fn damaged_secondary_still_opens() {
    let (file, _key, written) = new_volume();
    file.as_file().write_all_at(&[0u8; 16], HEADER_AREA_SIZE).unwrap();
    let read = VolumeHeader::read(file.as_file()).unwrap();
    assert_eq!(read.uuid, written.uuid);
    assert!(read.needs_repair);
}

#[test]
fn both_damaged_is_an_error() {
    let (file, _key, _) = new_volume();
    file.as_file().write_all_at(&[0xff; 64], 4200).unwrap();
    file.as_file().write_all_at(&[0xff; 64], HEADER_AREA_SIZE + 4200).unwrap();
    let error = VolumeHeader::read(file.as_file()).unwrap_err();
    assert!(matches!(error, VolumeError::NoValidHeader { .. }));
    // The secondary copy's own error is reported, not that of a larger offset without one.
    let message = error.to_string();
    assert!(message.contains(&format!("offset {HEADER_AREA_SIZE} is corrupt")), "{message}");
}

#[test]
fn copies_of_different_volumes_are_an_error() {
    let (file, _key, _) = new_volume();
    let (other, _other_key, _) = new_volume();
    let mut secondary = vec![0u8; HEADER_AREA_SIZE as usize];
    FileExt::read_exact_at(other.as_file(), &mut secondary, HEADER_AREA_SIZE).unwrap();
    file.as_file().write_all_at(&secondary, HEADER_AREA_SIZE).unwrap();
    let message = VolumeHeader::read(file.as_file()).unwrap_err().to_string();
    assert!(message.contains("belong to different volumes"), "{message}");
}

#[test]
fn crash_between_copies_opens_newer_secondary() {
    let (file, _key, mut header) = new_volume();
    let before = header.seqid;

    // Simulate a crash after the secondary was rewritten but before the primary was: copy
    // the current primary aside, update both, then restore the old primary.
    let mut old_primary = vec![0u8; HEADER_AREA_SIZE as usize];
    FileExt::read_exact_at(file.as_file(), &mut old_primary, 0).unwrap();
    let mut new_token = token();
    new_token.key_id = "k2".into();
    header.metadata.set_token(new_token);
    header.write(file.as_file()).unwrap();
    file.as_file().write_all_at(&old_primary, 0).unwrap();

    let read = VolumeHeader::read(file.as_file()).unwrap();
    assert_eq!(read.seqid, before + 1);
    assert_eq!(read.kms_token().unwrap().key_id, "k2");
    assert!(read.needs_repair);
}

#[test]
fn plain_file_is_not_luks2() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&vec![0u8; 65536]).unwrap();
    assert!(matches!(VolumeHeader::read(file.as_file()), Err(VolumeError::NotLuks2 { .. })));
}

#[test]
fn unknown_mandatory_requirement_is_rejected() {
    let key = VolumeKey::generate().unwrap();
    let header = VolumeHeader::new("u".into(), &key, None, SectorSize::S512, token()).unwrap();
    let mut doc: serde_json::Value = serde_json::from_slice(&header.metadata.to_json().unwrap()).unwrap();
    doc["config"]["requirements"] = serde_json::json!({ "mandatory": ["online-reencrypt-v2"] });
    let text = serde_json::to_vec(&doc).unwrap();
    let result = Metadata::parse(&text, HEADER_AREA_SIZE);
    assert!(
        matches!(result, Err(VolumeError::UnsupportedRequirement(ref r)) if r.contains("online-reencrypt"))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Arbitrary corruption of the header areas never panics; it opens or fails cleanly.
    #[test]
    fn corrupted_headers_never_panic(
        flips in proptest::collection::vec((0u64..2 * HEADER_AREA_SIZE, any::<u8>()), 1..16)
    ) {
        let (file, key, _) = new_volume();
        for (offset, value) in flips {
            file.as_file().write_all_at(&[value], offset).unwrap();
        }
        if let Ok(header) = VolumeHeader::read(file.as_file()) {
            // Whatever opened must still be this volume's key and layout.
            prop_assert!(header.verify_volume_key(&key).is_ok());
            prop_assert_eq!(header.metadata.segment.offset, DATA_OFFSET);
        }
    }

    /// Arbitrary bytes as a whole image never panic the header reader.
    #[test]
    fn arbitrary_images_never_panic(image in proptest::collection::vec(any::<u8>(), 0..40000)) {
        let _ = VolumeHeader::read_from(image.as_slice());
    }

    /// Arbitrary JSON text in a correctly checksummed header never panics the parser.
    #[test]
    fn arbitrary_json_never_panics(text in "\\PC{0,300}") {
        let _ = Metadata::parse(text.as_bytes(), HEADER_AREA_SIZE);
    }
}

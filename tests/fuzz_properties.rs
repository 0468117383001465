//! The three fuzz targets run as ordinary tests: each replays its committed corpus under
//! fuzz/corpus/TARGET, then feeds random mutations of those inputs through the same harness
//! that `cargo fuzz` uses. A panic, or a connection that hangs after the client leaves,
//! fails the test.

use std::path::PathBuf;

use proptest::prelude::*;

#[path = "../fuzz/src/harness.rs"]
mod harness;

use harness::ConnectionHarness;

/// Reads every committed corpus file of `target`, sorted by name.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading the corpus {} failed: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "the corpus {} is empty", dir.display());
    paths.iter().map(|path| std::fs::read(path).unwrap()).collect()
}

/// One edit of a corpus input, with positions taken modulo the input's length.
#[derive(Debug, Clone)]
enum Edit {
    Overwrite {
        position: usize,
        byte: u8,
    },
    Insert {
        position: usize,
        bytes: Vec<u8>,
    },
    Remove {
        position: usize,
        len: usize,
    },
    Truncate {
        len: usize,
    },
    /// Sets a big-endian u32 anywhere, where length and magic fields live.
    PutU32 {
        position: usize,
        value: u32,
    },
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(position, byte)| Edit::Overwrite { position, byte }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(position, bytes)| Edit::Insert { position, bytes }),
        (any::<usize>(), 1usize..64).prop_map(|(position, len)| Edit::Remove { position, len }),
        any::<usize>().prop_map(|len| Edit::Truncate { len }),
        (any::<usize>(), prop_oneof![any::<u32>(), Just(0), Just(u32::MAX), Just(0x0200_0001), Just(4097)])
            .prop_map(|(position, value)| Edit::PutU32 { position, value }),
    ]
}

fn apply(mut input: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let len = input.len().max(1);
        match edit {
            Edit::Overwrite { position, byte } => {
                if let Some(slot) = input.get_mut(position % len) {
                    *slot = *byte;
                }
            }
            Edit::Insert { position, bytes } => {
                let at = position % (input.len() + 1);
                input.splice(at..at, bytes.iter().copied());
            }
            Edit::Remove { position, len: count } => {
                let start = position % len;
                let end = (start + count).min(input.len());
                if start < end {
                    input.drain(start..end);
                }
            }
            Edit::Truncate { len: keep } => input.truncate(keep % len),
            Edit::PutU32 { position, value } => {
                if input.len() >= 4 {
                    let at = position % (input.len() - 3);
                    input[at..at + 4].copy_from_slice(&value.to_be_bytes());
                }
            }
        }
    }
    input
}

/// A corpus input with up to eight edits, or plain random bytes.
fn mutated_corpus(target: &str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(target);
    let count = seeds.len();
    prop_oneof![
        4 => (0..count, prop::collection::vec(edit_strategy(), 0..8))
            .prop_map(move |(index, edits)| apply(seeds[index].clone(), &edits)),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}

#[test]
fn handshake_corpus_replays() {
    let harness = ConnectionHarness::new();
    for input in corpus("handshake") {
        harness.run_handshake(&input);
    }
}

#[test]
fn handshake_survives_mutations() {
    let harness = ConnectionHarness::new();
    proptest!(ProptestConfig::with_cases(512), |(input in mutated_corpus("handshake"))| {
        harness.run_handshake(&input);
    });
}

#[test]
fn transmission_corpus_replays() {
    let harness = ConnectionHarness::new();
    for input in corpus("transmission") {
        harness.run_transmission(&input);
    }
}

#[test]
fn transmission_survives_mutations() {
    let harness = ConnectionHarness::new();
    proptest!(ProptestConfig::with_cases(512), |(input in mutated_corpus("transmission"))| {
        harness.run_transmission(&input);
    });
}

#[test]
fn luks2_header_corpus_replays() {
    for input in corpus("luks2_header") {
        harness::parse_luks2_header(&input);
    }
}

#[test]
fn luks2_header_survives_mutations() {
    proptest!(ProptestConfig::with_cases(512), |(input in mutated_corpus("luks2_header"))| {
        harness::parse_luks2_header(&input);
    });
}

/// The corpus must reach past the parsers' first checks, or the mutations above only test
/// the rejection of garbage.
#[test]
fn luks2_header_corpus_holds_valid_headers() {
    let inputs = corpus("luks2_header");
    let valid_devices = inputs
        .iter()
        .filter(|input| input.first() == Some(&0))
        .filter(|input| nbdcrypt::volume::VolumeHeader::read_from(&input[1..]).is_ok())
        .count();
    assert!(
        valid_devices >= 2,
        "expected at least 2 valid device images in the corpus, found {valid_devices}"
    );
    let wrapped_json = inputs
        .iter()
        .filter(|input| input.first() == Some(&2))
        .filter_map(|input| harness::wrap_in_header_areas(&input[1..]))
        .filter(|device| nbdcrypt::volume::VolumeHeader::read_from(device.as_slice()).is_ok())
        .count();
    assert!(
        wrapped_json >= 1,
        "expected at least 1 wrapped JSON seed that reads as a header, found {wrapped_json}"
    );
}

use proptest::prelude::*;

use super::*;
use crate::backend::MemoryBackend;
use crate::crypto::VolumeKey;

const DATA_OFFSET: u64 = 8192;

fn export_with(sector_size: SectorSize, sectors: u64, discard: bool) -> (Arc<Export>, Arc<MemoryBackend>) {
    let size = sectors * sector_size.len_u64();
    let backend = Arc::new(MemoryBackend::new((DATA_OFFSET + size) as usize));
    let key = VolumeKey::generate().unwrap();
    let options = ExportOptions { name: "t".into(), description: String::new(), discard, read_only: false };
    let export =
        Export::new(options, backend.clone(), SectorCipher::new(&key, sector_size), DATA_OFFSET, size);
    (Arc::new(export), backend)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1).collect()
}

#[tokio::test]
async fn unwritten_volume_reads_zeros() {
    let (export, _) = export_with(SectorSize::S4096, 8, false);
    let data = export.read(100, 10000).await.unwrap();
    assert!(data.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn write_read_round_trip_stores_ciphertext() {
    let (export, backend) = export_with(SectorSize::S4096, 8, false);
    let data = pattern(8192, 1);
    export.write(4096, data.clone(), false).await.unwrap();
    assert_eq!(export.read(4096, 8192).await.unwrap(), data);

    let stored = backend.snapshot((DATA_OFFSET + 4096) as usize, 8192);
    assert_ne!(stored, data);
    assert!(!stored.windows(16).any(|w| data.windows(16).next() == Some(w)));
}

#[tokio::test]
async fn unaligned_write_preserves_neighbours() {
    for sector_size in [SectorSize::S512, SectorSize::S4096] {
        let (export, _) = export_with(sector_size, 16, false);
        let base = pattern(16 * sector_size.len(), 7);
        export.write(0, base.clone(), false).await.unwrap();

        let patch = pattern(1000, 99);
        export.write(4000, patch.clone(), false).await.unwrap();
        let mut expected = base.clone();
        expected[4000..5000].copy_from_slice(&patch);
        assert_eq!(export.read(0, expected.len() as u32).await.unwrap(), expected);

        export.write(4097, vec![0xee; 3], true).await.unwrap();
        expected[4097..4100].fill(0xee);
        assert_eq!(export.read(0, expected.len() as u32).await.unwrap(), expected);
    }
}

#[tokio::test]
async fn write_zeroes_reads_back_zeros() {
    let (export, backend) = export_with(SectorSize::S4096, 8, false);
    let base = pattern(8 * 4096, 3);
    export.write(0, base.clone(), false).await.unwrap();
    export.write_zeroes(1000, 10000, ZeroOptions::default()).await.unwrap();
    let mut expected = base;
    expected[1000..11000].fill(0);
    assert_eq!(export.read(0, expected.len() as u32).await.unwrap(), expected);

    // The whole sectors inside the range are zero ciphertext; the edges stay encrypted.
    let sector_1 = backend.snapshot((DATA_OFFSET + 4096) as usize, 4096);
    assert!(sector_1.iter().all(|&b| b == 0));
    let sector_0 = backend.snapshot(DATA_OFFSET as usize, 4096);
    assert!(!sector_0.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn block_status_reports_zero_sectors() {
    let (export, _) = export_with(SectorSize::S4096, 8, true);
    assert_eq!(
        export.block_status(0, 8 * 4096).await.unwrap(),
        vec![StatusExtent { len: 8 * 4096, flags: STATE_ZERO }]
    );

    export.write(4096, pattern(8192, 1), false).await.unwrap();
    let extents = export.block_status(100, 8 * 4096 - 100).await.unwrap();
    assert_eq!(
        extents,
        vec![
            StatusExtent { len: 3996, flags: STATE_ZERO },
            StatusExtent { len: 8192, flags: 0 },
            StatusExtent { len: 5 * 4096, flags: STATE_ZERO },
        ]
    );

    export.write_zeroes(4096, 4096, ZeroOptions::default()).await.unwrap();
    let extents = export.block_status(4096, 8192).await.unwrap();
    assert_eq!(
        extents,
        vec![StatusExtent { len: 4096, flags: STATE_ZERO }, StatusExtent { len: 4096, flags: 0 }]
    );
    assert!(export.block_status(8 * 4096, 1).await.is_err());
}

#[tokio::test]
async fn trim_requires_discard_and_keeps_partial_sectors() {
    let (export, _) = export_with(SectorSize::S4096, 8, false);
    assert!(matches!(export.trim(0, 4096, false).await, Err(EngineError::DiscardDisabled)));

    let (export, _) = export_with(SectorSize::S4096, 8, true);
    let base = pattern(8 * 4096, 5);
    export.write(0, base.clone(), false).await.unwrap();
    export.trim(100, 3 * 4096, false).await.unwrap();
    let after = export.read(0, base.len() as u32).await.unwrap();
    assert_eq!(after[..4096], base[..4096]);
    assert!(after[4096..3 * 4096].iter().all(|&b| b == 0));
    assert_eq!(after[3 * 4096..], base[3 * 4096..]);
}

#[tokio::test]
async fn out_of_range_requests_fail() {
    let (export, _) = export_with(SectorSize::S512, 4, false);
    assert!(matches!(export.read(2048, 1).await, Err(EngineError::OutOfRange { .. })));
    assert!(matches!(export.read(u64::MAX, 2).await, Err(EngineError::OutOfRange { .. })));
    assert!(matches!(export.write(2047, vec![1, 2], false).await, Err(EngineError::OutOfRange { .. })));
    assert!(export.read(2047, 1).await.is_ok());
    assert!(export.read(2048, 0).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_concurrent_writes_serialise() {
    for round in 0..50u8 {
        let (export, _) = export_with(SectorSize::S4096, 4, false);
        let a = vec![0xaa_u8; 6000];
        let b = vec![0xbb_u8; 6000];
        let (ra, rb) =
            tokio::join!(export.write(100, a.clone(), false), export.write(3000, b.clone(), false));
        ra.unwrap();
        rb.unwrap();

        let got = export.read(0, 4 * 4096).await.unwrap();
        let mut a_then_b = vec![0u8; 4 * 4096];
        a_then_b[100..6100].copy_from_slice(&a);
        a_then_b[3000..9000].copy_from_slice(&b);
        let mut b_then_a = vec![0u8; 4 * 4096];
        b_then_a[3000..9000].copy_from_slice(&b);
        b_then_a[100..6100].copy_from_slice(&a);
        assert!(got == a_then_b || got == b_then_a, "round {round}: result is not a serial order");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random writes, zeroing and reads agree with a plain byte array model.
    #[test]
    fn operations_match_model(
        ops in proptest::collection::vec((0u8..3, 0u64..20000, 1u32..9000, any::<u8>()), 1..20),
        large in any::<bool>(),
    ) {
        let sector_size = if large { SectorSize::S4096 } else { SectorSize::S512 };
        let sectors = 20480 / sector_size.len_u64() + 4;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
        runtime.block_on(async {
            let (export, _) = export_with(sector_size, sectors, true);
            let mut model = vec![0u8; export.size() as usize];
            for (kind, offset, len, seed) in ops {
                let len = len.min((export.size() - offset) as u32);
                let range = offset as usize..offset as usize + len as usize;
                match kind {
                    0 => {
                        let data = pattern(len as usize, seed);
                        export.write(offset, data.clone(), false).await.unwrap();
                        model[range].copy_from_slice(&data);
                    }
                    1 => {
                        export.write_zeroes(offset, len, ZeroOptions { no_hole: seed % 2 == 0, ..ZeroOptions::default() }).await.unwrap();
                        model[range].fill(0);
                    }
                    _ => {
                        let got = export.read_detailed(offset, len).await.unwrap();
                        assert_eq!(got.data(), &model[range.clone()]);
                        for run in got.zero_runs.clone() {
                            assert!(got.data()[run].iter().all(|&b| b == 0), "a zero run holds data");
                        }
                        let extents = export.block_status(offset, len).await.unwrap();
                        assert!(!extents.is_empty());
                        let mut at = offset as usize;
                        for extent in extents {
                            if extent.flags & STATE_ZERO != 0 {
                                assert!(model[at..at + extent.len as usize].iter().all(|&b| b == 0),
                                    "block status reports zeros over data at {at}");
                            }
                            at += extent.len as usize;
                        }
                        assert!(at <= range.end);
                    }
                }
            }
            let all = export.read(0, export.size() as u32).await.unwrap();
            assert_eq!(all, model);
        });
    }
}

#[test]
fn is_all_zero_finds_any_set_byte() {
    for len in [0usize, 1, 7, 8, 63, 64, 65, 512, 4096, 4100] {
        let zeros = vec![0u8; len];
        assert!(super::is_all_zero(&zeros), "{len} zero bytes");
        for position in 0..len {
            let mut bytes = zeros.clone();
            bytes[position] = 0x80;
            assert!(!super::is_all_zero(&bytes), "byte {position} of {len} is set");
        }
    }
}

//! AES-256-XTS throughput of each implementation on 4096-byte sectors: one sector per call,
//! and a 1 MiB request (256 sectors) per call. Criterion prints GB/s (10^9 bytes per second).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nbdcrypt::crypto::{SectorCipher, SectorSize, VolumeKey, XtsImplementation};

fn bench_xts(c: &mut Criterion) {
    let key = VolumeKey::generate().expect("the OS random source works");
    let mut group = c.benchmark_group("xts");
    for implementation in [XtsImplementation::AwsLc, XtsImplementation::Portable] {
        let cipher = SectorCipher::with_implementation(&key, SectorSize::S4096, implementation);
        for len in [4096usize, 1 << 20] {
            let mut buf = vec![0x5au8; len];
            group.throughput(Throughput::BytesDecimal(len as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("encrypt/{}", implementation.name()), len),
                &len,
                |b, _| b.iter(|| cipher.encrypt_sectors(1000, std::hint::black_box(&mut buf))),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("decrypt/{}", implementation.name()), len),
                &len,
                |b, _| b.iter(|| cipher.decrypt_sectors(1000, std::hint::black_box(&mut buf))),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, bench_xts);
criterion_main!(benches);

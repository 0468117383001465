//! One request through the engine over the in-memory backend: sector locks, buffer pool,
//! encryption or decryption, and the backend copy, without the network. Reads decrypt in
//! the buffer the reply would be sent from; writes encrypt the payload buffer in place.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nbdcrypt::backend::MemoryBackend;
use nbdcrypt::crypto::{SectorCipher, SectorSize, VolumeKey};
use nbdcrypt::engine::{Export, ExportOptions};

const DATA_OFFSET: u64 = 1 << 20;
const EXPORT_SIZE: u64 = 64 << 20;

fn bench_request_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime builds");
    let backend = Arc::new(MemoryBackend::new((DATA_OFFSET + EXPORT_SIZE) as usize));
    let key = VolumeKey::generate().expect("the OS random source works");
    let options =
        ExportOptions { name: "bench".into(), description: String::new(), discard: false, read_only: false };
    let cipher = SectorCipher::new(&key, SectorSize::S4096);
    let export = Arc::new(Export::new(options, backend, cipher, DATA_OFFSET, EXPORT_SIZE));

    // Fill the export, so reads decrypt instead of taking the zero-sector shortcut.
    runtime.block_on(async {
        for offset in (0..EXPORT_SIZE).step_by(1 << 20) {
            export.write(offset, vec![0xa5u8; 1 << 20], false).await.expect("fill write");
        }
    });

    let mut group = c.benchmark_group("request_path");
    for len in [4096usize, 1 << 20] {
        group.throughput(Throughput::BytesDecimal(len as u64));
        let offset = std::cell::Cell::new(0u64);
        let next_offset = || {
            offset.set((offset.get() + len as u64) % EXPORT_SIZE);
            offset.get()
        };
        group.bench_with_input(BenchmarkId::new("read", len), &len, |b, &len| {
            b.iter(|| runtime.block_on(export.read_detailed(next_offset(), len as u32)).expect("read"))
        });
        group.bench_with_input(BenchmarkId::new("write", len), &len, |b, &len| {
            b.iter(|| {
                let payload = export.buffer_pool().take(len);
                runtime.block_on(export.write(next_offset(), payload, false)).expect("write")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_request_path);
criterion_main!(benches);

//! One conformance suite for every backing store: the in-memory backend, the thread-pool
//! file backend (buffered and O_DIRECT) and the io_uring backend (buffered and O_DIRECT,
//! through both its synchronous and its awaitable calls). Random operation sequences are
//! checked against a byte model, then the error paths each store must handle.

use std::future::Future;
use std::sync::Arc;

use nbdcrypt::backend::{
    Backend, BufferPool, CacheMode, FileBackend, IoBuffer, MemoryBackend, UringBackend, ZeroMode,
};
use nbdcrypt::crypto::{SectorCipher, SectorSize, VolumeKey};
use nbdcrypt::engine::{Export, ExportOptions};

/// Store size: 4 MiB of 4096-byte blocks.
const STORE_LEN: usize = 4 << 20;
const BLOCK: usize = 4096;
const OPERATIONS: usize = 400;

/// A small deterministic generator, so a failing sequence repeats with its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// The stores under test, each built over a fresh zeroed file or buffer.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Memory,
    Threads(CacheMode),
    Uring(CacheMode),
}

const KINDS: [Kind; 5] = [
    Kind::Memory,
    Kind::Threads(CacheMode::Writeback),
    Kind::Threads(CacheMode::None),
    Kind::Uring(CacheMode::Writeback),
    Kind::Uring(CacheMode::None),
];

struct Store {
    backend: Arc<dyn Backend>,
    _file: Option<tempfile::NamedTempFile>,
}

fn open_file(cache: CacheMode) -> (FileBackend, tempfile::NamedTempFile) {
    // The target directory is on a disk file system with O_DIRECT, unlike some /tmp mounts.
    let file = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    file.as_file().set_len(STORE_LEN as u64).unwrap();
    let mut backend = FileBackend::open_exclusive(file.path()).unwrap();
    backend.set_cache_mode(cache, BLOCK).expect("the target directory supports O_DIRECT");
    (backend, file)
}

fn open(kind: Kind) -> Store {
    match kind {
        Kind::Memory => Store { backend: Arc::new(MemoryBackend::new(STORE_LEN)), _file: None },
        Kind::Threads(cache) => {
            let (backend, file) = open_file(cache);
            Store { backend: Arc::new(backend), _file: Some(file) }
        }
        Kind::Uring(cache) => {
            let (backend, file) = open_file(cache);
            let uring = UringBackend::new(backend, 16, 1 << 20).unwrap();
            Store { backend: Arc::new(uring), _file: Some(file) }
        }
    }
}

/// Expected contents: bytes, plus a mask of discarded bytes whose contents are unspecified.
struct Model {
    bytes: Vec<u8>,
    unspecified: Vec<bool>,
}

impl Model {
    fn new() -> Self {
        Model { bytes: vec![0; STORE_LEN], unspecified: vec![false; STORE_LEN] }
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
        self.unspecified[offset..offset + data.len()].fill(false);
    }

    fn check(&self, offset: usize, got: &[u8], context: &str) {
        for (index, &byte) in got.iter().enumerate() {
            let at = offset + index;
            if !self.unspecified[at] {
                assert_eq!(byte, self.bytes[at], "{context}: byte {at} differs");
            }
        }
    }
}

/// A random block-aligned range of 1 to 64 blocks.
fn random_range(rng: &mut Rng) -> (usize, usize) {
    let blocks = STORE_LEN / BLOCK;
    let count = 1 + rng.below(64);
    let first = rng.below(blocks - count + 1);
    (first * BLOCK, count * BLOCK)
}

fn random_data(rng: &mut Rng, pool: &BufferPool, len: usize) -> IoBuffer {
    let mut buffer = pool.take(len);
    let seed = rng.next();
    for (index, byte) in buffer.iter_mut().enumerate() {
        *byte = (seed.rotate_left(index as u32 % 64) as u8) ^ index as u8;
    }
    buffer
}

/// Runs one random sequence on `kind`, through the awaitable calls too when it has them.
async fn run_sequence(kind: Kind, seed: u64) {
    let store = open(kind);
    let backend = &store.backend;
    let pool = backend.buffer_pool().unwrap_or_default();
    let mut model = Model::new();
    let mut rng = Rng(seed);
    let context = |step: usize, what: &str| format!("{kind:?} seed {seed} step {step}: {what}");

    for step in 0..OPERATIONS {
        let (offset, len) = random_range(&mut rng);
        match rng.below(8) {
            0 | 1 => {
                let data = random_data(&mut rng, &pool, len);
                match (backend.uring(), rng.below(2)) {
                    (Some(uring), 0) => {
                        let (returned, result) = uring.write(data, offset as u64, rng.below(4) == 0).await;
                        result.unwrap_or_else(|e| panic!("{}: {e}", context(step, "ring write")));
                        model.write(offset, &returned);
                    }
                    _ => {
                        backend.write_at(&data, offset as u64).unwrap();
                        model.write(offset, &data);
                    }
                }
            }
            2 => {
                let data = random_data(&mut rng, &pool, len);
                backend.write_at_durable(&data, offset as u64).unwrap();
                model.write(offset, &data);
            }
            3 | 4 => {
                let buffer = pool.take(len);
                match (backend.uring(), rng.below(2)) {
                    (Some(uring), 0) => {
                        let (buffer, result) = uring.read(buffer, offset as u64).await;
                        result.unwrap_or_else(|e| panic!("{}: {e}", context(step, "ring read")));
                        model.check(offset, &buffer, &context(step, "ring read"));
                    }
                    _ => {
                        let mut buffer = buffer;
                        backend.read_at(&mut buffer, offset as u64).unwrap();
                        model.check(offset, &buffer, &context(step, "read"));
                    }
                }
            }
            5 => {
                let mode = ZeroMode { may_unmap: rng.below(2) == 0, fast_only: false };
                backend.write_zeroes(offset as u64, len as u64, mode).unwrap();
                model.write(offset, &vec![0; len]);
            }
            6 => {
                backend.discard(offset as u64, len as u64).unwrap();
                model.unspecified[offset..offset + len].fill(true);
            }
            _ => match backend.uring() {
                Some(uring) if rng.below(2) == 0 => uring.flush().await.unwrap(),
                _ => backend.flush().unwrap(),
            },
        }
    }

    // Extents cover the store and never call written data a hole.
    let extents = backend.extents(0, STORE_LEN as u64).unwrap();
    assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), STORE_LEN as u64, "{kind:?}: extents");
    let mut position = 0usize;
    for extent in extents {
        if extent.is_hole {
            let range = position..position + extent.len as usize;
            let holds_data = range.clone().any(|at| !model.unspecified[at] && model.bytes[at] != 0);
            assert!(!holds_data, "{kind:?} seed {seed}: hole at {range:?} over written data");
        }
        position += extent.len as usize;
    }

    let mut whole = pool.take(STORE_LEN);
    backend.read_at(&mut whole, 0).unwrap();
    model.check(0, &whole, &format!("{kind:?} seed {seed}: final read"));
}

#[tokio::test]
async fn random_sequences_match_the_model() {
    for kind in KINDS {
        for seed in [1, 0x9e37_79b9_7f4a_7c15, 42] {
            run_sequence(kind, seed).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_completes_more_requests_than_slots() {
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let (file, _guard) = open_file(cache);
        let uring = Arc::new(UringBackend::new(file, 4, 64 * 1024).unwrap());
        let pool = uring.buffer_pool().unwrap();

        let mut tasks = Vec::new();
        for block in 0..128u64 {
            let uring = Arc::clone(&uring);
            let mut buffer = pool.take(BLOCK);
            buffer.fill(block as u8);
            tasks.push(tokio::spawn(async move {
                let (_, result) = uring.write(buffer, block * BLOCK as u64, false).await;
                result.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }

        for block in 0..128u64 {
            let (buffer, result) = uring.read(pool.take(BLOCK), block * BLOCK as u64).await;
            result.unwrap();
            assert!(buffer.iter().all(|&b| b == block as u8), "{cache:?}: block {block}");
        }
    }
}

#[tokio::test]
async fn reads_past_the_end_fail() {
    for kind in KINDS {
        let store = open(kind);
        let mut buffer = IoBuffer::zeroed(2 * BLOCK);
        let result = store.backend.read_at(&mut buffer, (STORE_LEN - BLOCK) as u64);
        assert!(result.is_err(), "{kind:?}: read across the end succeeded");
        if let Some(uring) = store.backend.uring() {
            let (returned, result) =
                uring.read(IoBuffer::zeroed(2 * BLOCK), (STORE_LEN - BLOCK) as u64).await;
            assert_eq!(result.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof, "{kind:?}");
            assert_eq!(returned.len(), 2 * BLOCK, "{kind:?}: the buffer came back whole");
        }
    }
}

#[tokio::test]
async fn misaligned_direct_io_is_handled() {
    let (file, _guard) = open_file(CacheMode::None);
    let mut pattern = IoBuffer::zeroed(2 * BLOCK);
    pattern.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    file.write_at(&pattern, 0).unwrap();
    let uring = UringBackend::new(file, 4, 64 * 1024).unwrap();

    // Depending on the file system, a misaligned O_DIRECT read fails with EINVAL or is
    // served through the page cache; either way the buffer comes back.
    let (returned, result) = uring.read(IoBuffer::zeroed(BLOCK), 100).await;
    match result {
        Ok(()) => assert_eq!(&returned[..], &pattern[100..100 + BLOCK]),
        Err(error) => assert_eq!(error.raw_os_error(), Some(libc::EINVAL)),
    }
    assert_eq!(returned.len(), BLOCK);

    // The synchronous path copies a misaligned buffer through an aligned one.
    let mut unaligned = vec![0u8; BLOCK + 1];
    uring.read_at(&mut unaligned[1..], 0).unwrap();
}

#[tokio::test]
async fn dropped_request_keeps_its_buffer_until_completion() {
    let (file, _guard) = open_file(CacheMode::None);
    let uring = UringBackend::new(file, 4, 1 << 20).unwrap();
    let pool = uring.buffer_pool().unwrap();
    for _ in 0..64 {
        // Polled once, so the operation is queued, then dropped before it completes.
        let future = uring.read(pool.take(256 * 1024), 0);
        let mut future = Box::pin(future);
        let waker = std::task::Waker::noop();
        let _ = future.as_mut().poll(&mut std::task::Context::from_waker(waker));
        drop(future);
    }
    // The ring keeps working, and dropping it waits for the abandoned reads.
    let (buffer, result) = uring.read(pool.take(BLOCK), 0).await;
    result.unwrap();
    assert_eq!(buffer.len(), BLOCK);
    drop(uring);
}

/// The engine over the io_uring backend: aligned writes take the ring path, partial ones
/// the read-modify-write path, and both read back through the ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_over_uring_round_trips() {
    for cache in [CacheMode::None, CacheMode::Writeback] {
        let (file, _guard) = open_file(cache);
        let uring = UringBackend::new(file, 32, 4 << 20).unwrap();
        let key = VolumeKey::generate().unwrap();
        let options =
            ExportOptions { name: "t".into(), description: String::new(), discard: true, read_only: false };
        let data_offset = 1 << 20;
        let size = (STORE_LEN - data_offset) as u64;
        let export = Arc::new(Export::new(
            options,
            Arc::new(uring),
            SectorCipher::new(&key, SectorSize::S4096),
            data_offset as u64,
            size,
        ));
        assert_eq!(export.backend_kind(), "uring");

        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(7);
        for step in 0..200 {
            let len = 1 + rng.below(64 * 1024);
            let offset = rng.below(size as usize - len);
            match rng.below(4) {
                0 | 1 => {
                    let aligned_offset = offset / BLOCK * BLOCK;
                    let aligned_len = len.div_ceil(BLOCK) * BLOCK;
                    let (offset, len) = if rng.below(2) == 0 && aligned_offset + aligned_len <= size as usize
                    {
                        (aligned_offset, aligned_len)
                    } else {
                        (offset, len)
                    };
                    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(step as u8) | 1).collect();
                    export.write(offset as u64, data.clone(), rng.below(4) == 0).await.unwrap();
                    model[offset..offset + len].copy_from_slice(&data);
                }
                2 => {
                    let got = export.read(offset as u64, len as u32).await.unwrap();
                    assert_eq!(got, &model[offset..offset + len], "{cache:?} step {step}");
                }
                _ => export.flush().await.unwrap(),
            }
        }
        let got = export.read(0, size as u32).await.unwrap();
        assert!(got == model, "{cache:?}: final contents differ");
    }
}

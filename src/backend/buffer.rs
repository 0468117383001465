//! Page-aligned I/O buffers recycled through a per-export pool.
//!
//! O_DIRECT needs buffers aligned to the device's logical block size, and the request path
//! should not allocate per request, so request payloads, read replies and read-modify-write
//! scratch space all come from a [`BufferPool`]. A pool keeps freed buffers in power-of-two
//! size classes from 4 KiB to 32 MiB. It may also own one memory region that an io_uring
//! backend registers with its ring (fixed buffers): buffers carved from it skip the kernel's
//! per-I/O page pinning.
//!
//! Buffers are handed out with their old contents, never uninitialized memory. Fresh heap
//! buffers and the region start zeroed, and a recycled buffer contains earlier request data,
//! which every user overwrites (a backend read or a payload read fills it) before sending it.

#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Alignment of every buffer: the page size, which covers every logical block size up to
/// 4096 bytes.
pub const BUFFER_ALIGN: usize = 4096;

/// log2 of the smallest size class (4 KiB).
const MIN_CLASS_SHIFT: u32 = 12;

/// Size classes 4 KiB, 8 KiB, ..., 32 MiB (the largest NBD payload accepted).
const CLASS_COUNT: usize = 14;

/// Default bound on the bytes of heap buffers kept for reuse by one pool. Region buffers
/// are always kept; they are part of the region.
pub const DEFAULT_MAX_CACHED_BYTES: usize = 64 * 1024 * 1024;

/// A pool of aligned buffers shared by the requests of one export.
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    classes: [Mutex<Vec<RawBuffer>>; CLASS_COUNT],
    /// Bytes of heap buffers in the free lists now.
    cached_bytes: AtomicUsize,
    max_cached_bytes: usize,
    region: Option<Region>,
}

/// One anonymous mapping from which buffers are carved once and then recycled forever.
struct Region {
    base: NonNull<u8>,
    len: usize,
    /// Bytes of the region handed out so far.
    carved: Mutex<usize>,
}

// SAFETY: the region is plain memory owned by the pool; every carved part is owned by at
// most one `IoBuffer` or free list entry at a time.
unsafe impl Send for Region {}
// SAFETY: as above; shared access only reads `base` and `len` and locks `carved`.
unsafe impl Sync for Region {}

/// The allocation behind an [`IoBuffer`].
struct RawBuffer {
    ptr: NonNull<u8>,
    capacity: usize,
    in_region: bool,
}

// SAFETY: a RawBuffer owns its memory exclusively, like a Box<[u8]>.
unsafe impl Send for RawBuffer {}
// SAFETY: as for Box<[u8]>: shared references only read the bytes.
unsafe impl Sync for RawBuffer {}

impl BufferPool {
    /// A pool of heap buffers only.
    pub fn new() -> Self {
        Self::build(None, DEFAULT_MAX_CACHED_BYTES)
    }

    /// A pool that carves buffers from a `region_len`-byte mapping first (for io_uring fixed
    /// buffers), then from the heap. `region_len` is rounded up to whole pages; when the
    /// mapping fails the pool uses the heap only.
    pub fn with_region(region_len: usize) -> Self {
        Self::build(Region::map(region_len), DEFAULT_MAX_CACHED_BYTES)
    }

    fn build(region: Option<Region>, max_cached_bytes: usize) -> Self {
        BufferPool {
            inner: Arc::new(PoolInner {
                classes: std::array::from_fn(|_| Mutex::new(Vec::new())),
                cached_bytes: AtomicUsize::new(0),
                max_cached_bytes,
                region,
            }),
        }
    }

    /// Takes a buffer of `len` bytes, aligned to [`BUFFER_ALIGN`]. Its contents are
    /// unspecified (zeros or earlier data).
    pub fn take(&self, len: usize) -> IoBuffer {
        let Some(class) = class_of(len) else {
            return IoBuffer { raw: Some(RawBuffer::allocate(len)), len, pool: None };
        };
        let capacity = class_capacity(class);
        let raw = match lock(&self.inner.classes[class]).pop() {
            Some(raw) => {
                if !raw.in_region {
                    self.inner.cached_bytes.fetch_sub(raw.capacity, Ordering::Relaxed);
                }
                raw
            }
            None => self.carve(capacity).unwrap_or_else(|| RawBuffer::allocate(capacity)),
        };
        IoBuffer { raw: Some(raw), len, pool: Some(Arc::clone(&self.inner)) }
    }

    /// Takes a buffer holding a copy of `data`.
    pub fn copy_of(&self, data: &[u8]) -> IoBuffer {
        let mut buffer = self.take(data.len());
        buffer.copy_from_slice(data);
        buffer
    }

    /// The registered-memory region as (address, length), if the pool has one.
    pub fn region(&self) -> Option<(*mut u8, usize)> {
        self.inner.region.as_ref().map(|region| (region.base.as_ptr(), region.len))
    }

    /// Cuts a `capacity`-byte buffer from the unused end of the region.
    ///
    /// NOTE: carved pieces keep their size class forever and are never merged, so a region
    /// used up by small requests leaves later large requests on unregistered heap buffers
    /// (correct, but each I/O pins its pages).
    fn carve(&self, capacity: usize) -> Option<RawBuffer> {
        let region = self.inner.region.as_ref()?;
        let mut carved = lock(&region.carved);
        if region.len - *carved < capacity {
            return None;
        }
        // SAFETY: `*carved + capacity <= region.len`, so the pointer stays inside the mapping.
        let ptr = unsafe { region.base.as_ptr().add(*carved) };
        *carved += capacity;
        Some(RawBuffer {
            ptr: NonNull::new(ptr).expect("region pointers are not null"),
            capacity,
            in_region: true,
        })
    }
}

impl Default for BufferPool {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("region_len", &self.inner.region.as_ref().map_or(0, |region| region.len))
            .field("cached_bytes", &self.inner.cached_bytes.load(Ordering::Relaxed))
            .finish()
    }
}

/// An aligned byte buffer from a [`BufferPool`]; it returns to its pool when dropped. It
/// dereferences to its first `len` bytes.
pub struct IoBuffer {
    /// Always `Some` until drop.
    raw: Option<RawBuffer>,
    len: usize,
    pool: Option<Arc<PoolInner>>,
}

impl IoBuffer {
    /// A zero-filled buffer outside any pool, for callers without a pool.
    pub fn zeroed(len: usize) -> Self {
        IoBuffer { raw: Some(RawBuffer::allocate(len)), len, pool: None }
    }

    /// A buffer outside any pool holding a copy of `data`, for callers without a pool.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buffer = Self::zeroed(data.len());
        buffer.copy_from_slice(data);
        buffer
    }

    /// Number of bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can hold without reallocation.
    pub fn capacity(&self) -> usize {
        self.raw().capacity
    }

    /// Whether the buffer lies in its pool's registered region.
    pub fn is_in_region(&self) -> bool {
        self.raw().in_region
    }

    /// Start address, for I/O submission.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.raw().ptr.as_ptr()
    }

    fn raw(&self) -> &RawBuffer {
        self.raw.as_ref().expect("the allocation is present until drop")
    }
}

impl Deref for IoBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation holds `capacity >= len` initialized bytes (fresh memory is
        // zeroed) and is owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.raw().ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.raw().ptr.as_ptr(), self.len) }
    }
}

impl From<Vec<u8>> for IoBuffer {
    fn from(data: Vec<u8>) -> Self {
        IoBuffer::from_slice(&data)
    }
}

impl std::fmt::Debug for IoBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The contents may be plaintext: print only the shape.
        f.debug_struct("IoBuffer").field("len", &self.len).field("capacity", &self.capacity()).finish()
    }
}

impl Drop for IoBuffer {
    fn drop(&mut self) {
        let Some(raw) = self.raw.take() else {
            return;
        };
        let Some(pool) = self.pool.take() else {
            raw.free();
            return;
        };
        if !raw.in_region {
            let cached = pool.cached_bytes.fetch_add(raw.capacity, Ordering::Relaxed);
            if cached + raw.capacity > pool.max_cached_bytes {
                pool.cached_bytes.fetch_sub(raw.capacity, Ordering::Relaxed);
                raw.free();
                return;
            }
        }
        let class = class_of(raw.capacity).expect("pooled buffers have a class capacity");
        lock(&pool.classes[class]).push(raw);
    }
}

impl RawBuffer {
    /// Allocates `len` zeroed bytes (at least one page) on the heap.
    fn allocate(len: usize) -> Self {
        let capacity = len.max(1).div_ceil(BUFFER_ALIGN) * BUFFER_ALIGN;
        let layout = Layout::from_size_align(capacity, BUFFER_ALIGN).expect("page-rounded layout is valid");
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            alloc::handle_alloc_error(layout);
        };
        RawBuffer { ptr, capacity, in_region: false }
    }

    fn free(self) {
        if self.in_region {
            return;
        }
        let layout =
            Layout::from_size_align(self.capacity, BUFFER_ALIGN).expect("layout was valid at allocation");
        // SAFETY: heap buffers come from `allocate` with this layout and are freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl Region {
    fn map(len: usize) -> Option<Region> {
        let len = len.div_ceil(BUFFER_ALIGN) * BUFFER_ALIGN;
        if len == 0 {
            return None;
        }
        // SAFETY: an anonymous private mapping at an address the kernel chooses touches no
        // existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            tracing::warn!(error = %std::io::Error::last_os_error(), len, "mapping the I/O buffer region failed");
            return None;
        }
        let base = NonNull::new(ptr.cast::<u8>())?;
        Some(Region { base, len, carved: Mutex::new(0) })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the region is unmapped once, after every buffer carved from it was dropped:
        // each holds an Arc of the pool that owns the region.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        for class in &self.classes {
            for raw in lock(class).drain(..) {
                raw.free();
            }
        }
    }
}

/// The smallest size class that holds `len` bytes, or `None` above the largest class.
fn class_of(len: usize) -> Option<usize> {
    let shift = len.max(1).next_power_of_two().trailing_zeros().max(MIN_CLASS_SHIFT);
    let class = (shift - MIN_CLASS_SHIFT) as usize;
    (class < CLASS_COUNT).then_some(class)
}

fn class_capacity(class: usize) -> usize {
    1 << (class as u32 + MIN_CLASS_SHIFT)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Free lists and the carve offset stay consistent across a panic elsewhere.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        let pool = BufferPool::new();
        for len in [0, 1, 512, 4096, 4097, 1 << 20, 3 << 20] {
            let mut buffer = pool.take(len);
            assert_eq!(buffer.len(), len);
            assert!(buffer.capacity() >= len);
            assert_eq!(buffer.as_mut_ptr() as usize % BUFFER_ALIGN, 0, "len {len}");
        }
    }

    #[test]
    fn dropped_buffer_is_reused() {
        let pool = BufferPool::new();
        let mut first = pool.take(5000);
        let address = first.as_mut_ptr();
        drop(first);
        let mut second = pool.take(8000);
        assert_eq!(second.as_mut_ptr(), address);
    }

    #[test]
    fn region_serves_first_then_heap() {
        let pool = BufferPool::with_region(16 * 1024);
        let (base, len) = pool.region().unwrap();
        let a = pool.take(8192);
        let b = pool.take(8192);
        let c = pool.take(4096);
        assert!(a.is_in_region());
        assert!(b.is_in_region());
        assert!(!c.is_in_region());
        let mut a = a;
        let address = a.as_mut_ptr() as usize;
        assert!(address >= base as usize);
        assert!(address < base as usize + len);
    }

    #[test]
    fn oversized_buffer_comes_from_the_heap() {
        let pool = BufferPool::new();
        let buffer = pool.take(33 * 1024 * 1024);
        assert_eq!(buffer.len(), 33 * 1024 * 1024);
        assert!(buffer.iter().all(|&b| b == 0));
    }

    #[test]
    fn cache_bound_frees_excess_buffers() {
        let pool = BufferPool::build(None, 8192);
        let buffers: Vec<IoBuffer> = (0..4).map(|_| pool.take(4096)).collect();
        drop(buffers);
        assert_eq!(pool.inner.cached_bytes.load(Ordering::Relaxed), 8192);
        assert_eq!(lock(&pool.inner.classes[0]).len(), 2);
    }
}

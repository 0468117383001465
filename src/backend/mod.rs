//! Backing stores: where the ciphertext lives. A backend is a small synchronous trait; the
//! engine calls it from tokio's blocking thread pool, so one blocking call never stalls the
//! network tasks. A store with an io_uring path ([`UringBackend`]) also offers awaitable
//! reads, writes and flushes, which the engine prefers.

mod buffer;
mod file;
mod memory;
pub mod uring;

use std::io;
use std::str::FromStr;

pub use buffer::{BufferPool, IoBuffer, BUFFER_ALIGN};
pub use file::FileBackend;
pub use memory::MemoryBackend;
pub use uring::UringBackend;

/// Whether data reads and writes go through the kernel's page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT: no page cache; a write is on the device (or its volatile cache) when it
    /// completes.
    #[default]
    None,
    /// Buffered: writes land in the page cache and reach the device on FLUSH or writeback.
    Writeback,
}

impl FromStr for CacheMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(CacheMode::None),
            "writeback" => Ok(CacheMode::Writeback),
            other => Err(format!("cache mode {other:?} is invalid: expected none or writeback")),
        }
    }
}

impl CacheMode {
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
        }
    }
}

/// A byte-addressed backing store.
pub trait Backend: Send + Sync + 'static {
    /// Size of the store in bytes.
    fn len_bytes(&self) -> u64;

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`. On return the store has the data (a later read sees
    /// it) but it may not be durable until [`Backend::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset` and makes those bytes durable before returning (NBD's
    /// FUA). The default writes, then flushes everything.
    fn write_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.flush()
    }

    /// Makes every completed write durable (fdatasync for files and block devices).
    fn flush(&self) -> io::Result<()>;

    /// Makes `len` bytes at `offset` read as zeros. With `mode.may_unmap` the store may
    /// deallocate the range (punch a hole); without it the range stays allocated. With
    /// `mode.fast_only` the store fails with [`io::ErrorKind::Unsupported`], changing
    /// nothing, when it would have to write the zeros itself.
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()>;

    /// Describes the allocation of `len` bytes at `offset` as consecutive extents covering
    /// the range. A hole reads as zeros; data may hold anything, zeros included. Stores
    /// that cannot tell report one data extent.
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent { len, is_hole: false }])
    }

    /// Tells the store the range is unused. Afterwards its content is unspecified: zeros
    /// (a file hole) or, on some block devices, the old bytes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// The pool request buffers should come from, when the store has one of its own (the
    /// io_uring backend registers its pool's memory with its ring).
    fn buffer_pool(&self) -> Option<BufferPool> {
        None
    }

    /// The io_uring path of this store, when it has one: the engine then awaits reads,
    /// writes and flushes instead of blocking a pool thread on them.
    fn uring(&self) -> Option<&UringBackend> {
        None
    }

    /// Returns true when every call returns without waiting for I/O, so the engine may make
    /// it on the runtime thread instead of tokio's blocking pool.
    fn never_blocks(&self) -> bool {
        false
    }
}

/// How [`Backend::write_zeroes`] may zero a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroMode {
    /// The range may be deallocated.
    pub may_unmap: bool,
    /// Fail rather than write zeros byte by byte.
    pub fast_only: bool,
}

/// A run of bytes with one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub is_hole: bool,
}

/// The error returned when a fast zeroing was requested and the store cannot do it.
pub(crate) fn fast_zero_unsupported() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "the backing store cannot zero this range quickly")
}

/// Zero buffer size used when a store has to write zeros itself.
pub(crate) const ZERO_CHUNK: usize = 1024 * 1024;

/// Writes literal zeros, for stores or file systems without a faster way.
pub(crate) fn write_zeroes_by_writing<B: Backend + ?Sized>(
    backend: &B,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    // Aligned, so an O_DIRECT store takes it without a copy.
    let zeros = IoBuffer::zeroed(ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK)));
    let mut done = 0u64;
    while done < len {
        let step = (len - done).min(zeros.len() as u64) as usize;
        backend.write_at(&zeros[..step], offset + done)?;
        done += step as u64;
    }
    Ok(())
}

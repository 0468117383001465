//! Backing stores: where the ciphertext lives. A backend is a small synchronous trait; the
//! engine calls it from tokio's blocking thread pool, so one blocking call never stalls the
//! network tasks.

mod file;
mod memory;

use std::io;

pub use file::FileBackend;
pub use memory::MemoryBackend;

/// A byte-addressed backing store.
pub trait Backend: Send + Sync + 'static {
    /// Size of the store in bytes.
    fn len_bytes(&self) -> u64;

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`. On return the store has the data (a later read sees
    /// it) but it may not be durable until [`Backend::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

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
    let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let mut done = 0u64;
    while done < len {
        let step = (len - done).min(zeros.len() as u64) as usize;
        backend.write_at(&zeros[..step], offset + done)?;
        done += step as u64;
    }
    Ok(())
}

//! An in-memory backend for tests and benchmarks.

use std::io;
use std::sync::{Mutex, MutexGuard};

use super::{Backend, ZeroMode};

/// A backing store held in a `Vec<u8>`.
#[derive(Debug)]
pub struct MemoryBackend {
    bytes: Mutex<Vec<u8>>,
    inline: bool,
}

impl MemoryBackend {
    /// Creates a zero-filled store of `len` bytes whose calls the engine runs on tokio's
    /// blocking pool, like a file's.
    pub fn new(len: usize) -> Self {
        MemoryBackend { bytes: Mutex::new(vec![0u8; len]), inline: false }
    }

    /// Creates a zero-filled store of `len` bytes whose calls the engine makes on the
    /// runtime thread. The fuzz harness uses it so that a connection runs on one thread.
    pub fn new_inline(len: usize) -> Self {
        MemoryBackend { bytes: Mutex::new(vec![0u8; len]), inline: true }
    }

    /// Returns a copy of the stored bytes in `range`, for tests that inspect ciphertext.
    pub fn snapshot(&self, offset: usize, len: usize) -> Vec<u8> {
        self.lock()[offset..offset + len].to_vec()
    }

    /// Overwrites stored bytes directly, for tests that build or damage a volume.
    pub fn poke(&self, offset: usize, data: &[u8]) {
        self.lock()[offset..offset + data.len()].copy_from_slice(data);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while the lock was held leaves plain bytes, which are still consistent.
        self.bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let end = start.checked_add(len).ok_or_else(out_of_range)?;
        if end > self.lock().len() {
            return Err(out_of_range());
        }
        Ok(start..end)
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "access beyond the end of the memory backend")
}

impl Backend for MemoryBackend {
    fn len_bytes(&self) -> u64 {
        self.lock().len() as u64
    }

    fn never_blocks(&self) -> bool {
        self.inline
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.lock()[range]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let range = self.range(offset, buf.len())?;
        self.lock()[range].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _mode: ZeroMode) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| out_of_range())?;
        let range = self.range(offset, len)?;
        self.lock()[range].fill(0);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, ZeroMode { may_unmap: true, fast_only: false })
    }
}

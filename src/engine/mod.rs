//! One request's life on an export: bounds check, sector locks, read-modify-write of
//! partial sectors, encryption, and the backend call on tokio's blocking thread pool.
//!
//! Plaintext zeros rule: a sector whose ciphertext is all zero bytes reads as plaintext
//! zeros. A new sparse volume reads as zeros without being written, and WRITE_ZEROES and
//! TRIM become a hole punch or a zeroed range on the backing store. The cost is that the
//! backing store shows which sectors were zeroed or never written; a real ciphertext sector
//! is all zeros with probability 2^-4096 or less. dm-crypt, which has no such rule, reads
//! those sectors as pseudo-random bytes (the decryption of zeros).

mod locks;

use std::io;
use std::sync::Arc;

use crate::backend::Backend;
use crate::crypto::{SectorCipher, SectorSize};
pub use locks::{LockMode, RangeGuard, RangeLocks};

/// Largest READ or WRITE payload accepted: 32 MiB, what nbd-client and qemu may send.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Errors of one request; [`crate::nbd::error_code`] maps each to an NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("range {offset}+{len} ends beyond the export size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("export is read-only")]
    ReadOnly,
    #[error("discard is disabled on this export")]
    DiscardDisabled,
    #[error("backing store I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("request worker failed: {0}")]
    Worker(String),
}

/// Options of one export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub name: String,
    pub description: String,
    pub discard: bool,
    pub read_only: bool,
}

/// A volume being served: its backing store, cipher and locks, shared by all connections.
pub struct Export {
    options: ExportOptions,
    backend: Arc<dyn Backend>,
    cipher: SectorCipher,
    /// Byte offset of the data area in the backing store.
    data_offset: u64,
    /// Export size in bytes: the data area floored to whole sectors.
    size: u64,
    locks: RangeLocks,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.options.name)
            .field("size", &self.size)
            .field("data_offset", &self.data_offset)
            .finish_non_exhaustive()
    }
}

/// A byte range of the export expanded to whole sectors.
#[derive(Debug, Clone, Copy)]
struct SectorSpan {
    first: u64,
    count: u64,
    /// Offset of the request inside the first sector.
    head: usize,
    sector_len: usize,
}

impl SectorSpan {
    fn len_bytes(&self) -> usize {
        self.count as usize * self.sector_len
    }
}

impl Export {
    /// Builds an export over `backend`, whose data area starts at `data_offset` and holds
    /// `size` bytes (a multiple of the cipher's sector size).
    pub fn new(
        options: ExportOptions,
        backend: Arc<dyn Backend>,
        cipher: SectorCipher,
        data_offset: u64,
        size: u64,
    ) -> Self {
        debug_assert_eq!(size % cipher.sector_size().len_u64(), 0);
        Export { options, backend, cipher, data_offset, size, locks: RangeLocks::new() }
    }

    pub fn name(&self) -> &str {
        &self.options.name
    }

    pub fn description(&self) -> &str {
        &self.options.description
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn sector_size(&self) -> SectorSize {
        self.cipher.sector_size()
    }

    pub fn is_discard_enabled(&self) -> bool {
        self.options.discard
    }

    pub fn is_read_only(&self) -> bool {
        self.options.read_only
    }

    /// Checks that `offset..offset+len` lies inside the export, without overflow.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(EngineError::OutOfRange { offset, len, size: self.size }),
        }
    }

    fn span(&self, offset: u64, len: u64) -> SectorSpan {
        let sector = self.sector_size().len_u64();
        let first = offset / sector;
        let end = (offset + len).div_ceil(sector);
        SectorSpan {
            first,
            count: end - first,
            head: (offset % sector) as usize,
            sector_len: sector as usize,
        }
    }

    /// Reads and decrypts `len` bytes at `offset`.
    pub async fn read(self: &Arc<Self>, offset: u64, len: u32) -> Result<Vec<u8>, EngineError> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let span = self.span(offset, u64::from(len));
        let guard = self.locks.lock(span.first, span.first + span.count, LockMode::Shared).await;

        self.run_blocking(move |export| {
            let _guard = guard;
            let mut buf = vec![0u8; span.len_bytes()];
            export.read_sectors(span.first, &mut buf)?;
            if span.head != 0 || buf.len() != len as usize {
                buf.drain(..span.head);
                buf.truncate(len as usize);
            }
            Ok(buf)
        })
        .await
    }

    /// Encrypts and writes `data` at `offset`; with `fua` the data is durable on return.
    pub async fn write(self: &Arc<Self>, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), EngineError> {
        if self.is_read_only() {
            return Err(EngineError::ReadOnly);
        }
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let span = self.span(offset, data.len() as u64);
        let guard = self.locks.lock(span.first, span.first + span.count, LockMode::Exclusive).await;

        self.run_blocking(move |export| {
            let _guard = guard;
            export.write_span(span, data)?;
            if fua {
                export.backend.flush()?;
            }
            Ok(())
        })
        .await
    }

    /// Makes `len` bytes at `offset` read as zeros. Whole sectors become zeroed ciphertext
    /// (a punched hole unless `no_hole`); partial sectors are rewritten with zeros merged in.
    pub async fn write_zeroes(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), EngineError> {
        if self.is_read_only() {
            return Err(EngineError::ReadOnly);
        }
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(());
        }
        let span = self.span(offset, u64::from(len));
        let guard = self.locks.lock(span.first, span.first + span.count, LockMode::Exclusive).await;

        self.run_blocking(move |export| {
            let _guard = guard;
            export.zero_range(offset, u64::from(len), !no_hole)?;
            if fua {
                export.backend.flush()?;
            }
            Ok(())
        })
        .await
    }

    /// Discards the whole sectors inside `offset..offset+len`; partial sectors at the edges
    /// keep their data, which TRIM allows.
    pub async fn trim(self: &Arc<Self>, offset: u64, len: u32, fua: bool) -> Result<(), EngineError> {
        if self.is_read_only() {
            return Err(EngineError::ReadOnly);
        }
        if !self.is_discard_enabled() {
            return Err(EngineError::DiscardDisabled);
        }
        self.check_range(offset, u64::from(len))?;
        let sector = self.sector_size().len_u64();
        let start = offset.div_ceil(sector);
        let end = (offset + u64::from(len)) / sector;
        if start >= end {
            return Ok(());
        }
        let guard = self.locks.lock(start, end, LockMode::Exclusive).await;

        self.run_blocking(move |export| {
            let _guard = guard;
            export.backend.discard(export.data_offset + start * sector, (end - start) * sector)?;
            if fua {
                export.backend.flush()?;
            }
            Ok(())
        })
        .await
    }

    /// Makes every completed write durable.
    pub async fn flush(self: &Arc<Self>) -> Result<(), EngineError> {
        self.run_blocking(|export| Ok(export.backend.flush()?)).await
    }

    /// Writes encrypted zeros over the whole data area, reporting progress in bytes. Used by
    /// `create --wipe`; blocking.
    pub fn wipe_blocking(&self, mut progress: impl FnMut(u64)) -> Result<(), EngineError> {
        const CHUNK: u64 = 4 * 1024 * 1024;
        let sector = self.sector_size().len_u64();
        let mut offset = 0u64;
        while offset < self.size {
            let len = CHUNK.min(self.size - offset);
            let mut buf = vec![0u8; len as usize];
            self.cipher.encrypt_sectors(offset / sector, &mut buf);
            self.backend.write_at(&buf, self.data_offset + offset)?;
            offset += len;
            progress(offset);
        }
        self.backend.flush()?;
        Ok(())
    }

    async fn run_blocking<T, F>(self: &Arc<Self>, work: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&Export) -> Result<T, EngineError> + Send + 'static,
    {
        let export = Arc::clone(self);
        tokio::task::spawn_blocking(move || work(&export))
            .await
            .map_err(|e| EngineError::Worker(e.to_string()))?
    }

    /// Reads whole sectors starting at data sector `first` and decrypts them in place,
    /// applying the plaintext zeros rule.
    fn read_sectors(&self, first: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        let sector_len = self.sector_size().len();
        self.backend.read_at(buf, self.data_offset + first * sector_len as u64)?;
        for (index, sector) in buf.chunks_exact_mut(sector_len).enumerate() {
            if !is_all_zero(sector) {
                self.cipher.decrypt_sectors(first + index as u64, sector);
            }
        }
        Ok(())
    }

    /// Writes `data` over `span`, reading back the partial edge sectors first.
    fn write_span(&self, span: SectorSpan, data: Vec<u8>) -> Result<(), EngineError> {
        let sector_len = span.sector_len;
        let mut buf = if span.head == 0 && data.len() == span.len_bytes() {
            data
        } else {
            let mut merged = vec![0u8; span.len_bytes()];
            let tail_partial = (span.head + data.len()) % sector_len != 0;
            if span.head != 0 {
                self.read_sectors(span.first, &mut merged[..sector_len])?;
            }
            let last = span.count as usize - 1;
            if tail_partial && (last != 0 || span.head == 0) {
                self.read_sectors(span.first + last as u64, &mut merged[last * sector_len..])?;
            }
            merged[span.head..span.head + data.len()].copy_from_slice(&data);
            merged
        };

        self.cipher.encrypt_sectors(span.first, &mut buf);
        self.backend.write_at(&buf, self.data_offset + span.first * sector_len as u64)?;
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), EngineError> {
        let sector = self.sector_size().len_u64();
        let end = offset + len;
        let whole_start = offset.div_ceil(sector) * sector;
        let whole_end = end / sector * sector;

        if whole_start < whole_end {
            self.backend.write_zeroes(self.data_offset + whole_start, whole_end - whole_start, may_unmap)?;
        }
        // Partial sectors: the head, and the tail when it lies in a different sector.
        let mut partial = Vec::new();
        if offset < whole_start.min(end) {
            partial.push((offset, whole_start.min(end)));
        }
        if whole_end.max(offset) < end && whole_end >= whole_start {
            partial.push((whole_end.max(offset), end));
        }
        for (start, stop) in partial {
            let span = self.span(start, stop - start);
            self.write_span(span, vec![0u8; (stop - start) as usize])?;
        }
        Ok(())
    }
}

fn is_all_zero(bytes: &[u8]) -> bool {
    let (chunks, rest) = bytes.split_at(bytes.len() / 8 * 8);
    chunks.chunks_exact(8).all(|c| u64::from_ne_bytes(c.try_into().expect("chunk of 8")) == 0)
        && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests;

//! One request's life on an export: bounds check, sector locks, read-modify-write of
//! partial sectors, encryption, and the backend call: awaited on the backend's io_uring when
//! it has one, else on tokio's blocking thread pool.
//!
//! Buffers come from the export's [`BufferPool`]: a write's payload is encrypted in place
//! and written from the buffer it was received into, and a read is decrypted in place in
//! the buffer the reply is sent from. Encryption of up to [`INLINE_CRYPTO_MAX`] bytes runs
//! on the runtime thread, because at several GB/s that takes a few hundred microseconds at
//! most. Larger requests move it to the blocking pool.
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

use crate::backend::{Backend, BufferPool, IoBuffer, ZeroMode};
use crate::crypto::{SectorCipher, SectorSize};
pub use locks::{LockMode, RangeGuard, RangeLocks};

/// Largest READ or WRITE payload accepted: 32 MiB, what nbd-client and qemu may send.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Largest request encrypted or decrypted on the runtime thread that received it.
pub const INLINE_CRYPTO_MAX: usize = 1024 * 1024;

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
    #[error("the backing store cannot zero this range quickly")]
    FastZeroUnsupported,
}

/// Status flags of a block status extent, as NBD's `base:allocation` context defines them.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// Bytes of ciphertext one block status query reads to find zero sectors inside allocated
/// extents. Holes cost nothing; past this budget the reply covers less than was asked,
/// which the protocol allows.
pub const BLOCK_STATUS_SCAN_BUDGET: u64 = 8 * 1024 * 1024;

/// The result of a read: the plaintext, and where it came from zero ciphertext.
#[derive(Debug, Default)]
pub struct ReadOutput {
    /// Whole decrypted sectors; `None` for an empty read.
    buffer: Option<IoBuffer>,
    /// The requested bytes within `buffer`.
    range: std::ops::Range<usize>,
    /// Byte ranges, relative to the read's offset, of sectors whose ciphertext was all
    /// zeros, so their plaintext is zeros by the plaintext zeros rule. Sorted, disjoint.
    pub zero_runs: Vec<std::ops::Range<usize>>,
}

impl ReadOutput {
    /// Returns the plaintext of the requested range.
    pub fn data(&self) -> &[u8] {
        match &self.buffer {
            Some(buffer) => &buffer[self.range.clone()],
            None => &[],
        }
    }
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub len: u32,
    pub flags: u32,
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
    pool: BufferPool,
    /// Connections in the transmission phase on this export.
    attached: std::sync::atomic::AtomicUsize,
}

/// A connection's claim on an export; dropping it releases the slot.
#[derive(Debug)]
pub struct AttachGuard {
    export: Arc<Export>,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        self.export.attached.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
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

/// Flags of a WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroOptions {
    /// Keep the range allocated (NBD_CMD_FLAG_NO_HOLE).
    pub no_hole: bool,
    /// Fail with [`EngineError::FastZeroUnsupported`] rather than write zeros slowly
    /// (NBD_CMD_FLAG_FAST_ZERO).
    pub fast_only: bool,
    /// Make the result durable before returning (NBD_CMD_FLAG_FUA).
    pub fua: bool,
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
        let pool = backend.buffer_pool().unwrap_or_default();
        Export {
            options,
            pool,
            backend,
            cipher,
            data_offset,
            size,
            locks: RangeLocks::new(),
            attached: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Claims one of `max` connection slots, or returns `None` when all are taken.
    pub fn try_attach(self: &Arc<Self>, max: usize) -> Option<AttachGuard> {
        use std::sync::atomic::Ordering;
        let claimed = self
            .attached
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| if n < max { Some(n + 1) } else { None })
            .is_ok();
        claimed.then(|| AttachGuard { export: Arc::clone(self) })
    }

    /// Number of connections attached now.
    pub fn attached_connections(&self) -> usize {
        self.attached.load(std::sync::atomic::Ordering::Acquire)
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

    /// Returns the pool that request payloads and replies take their buffers from.
    pub fn buffer_pool(&self) -> &BufferPool {
        &self.pool
    }

    /// Short name of the backend path: "uring" or "threads".
    pub fn backend_kind(&self) -> &'static str {
        if self.backend.uring().is_some() {
            "uring"
        } else {
            "threads"
        }
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
        Ok(self.read_detailed(offset, len).await?.data().to_vec())
    }

    /// Reads and decrypts `len` bytes at `offset`, also reporting which parts came from zero
    /// ciphertext (holes), for structured replies.
    pub async fn read_detailed(self: &Arc<Self>, offset: u64, len: u32) -> Result<ReadOutput, EngineError> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(ReadOutput::default());
        }
        let span = self.span(offset, u64::from(len));
        let guard = self.locks.lock(span.first, span.first + span.count, LockMode::Shared).await;

        let buffer = self.pool.take(span.len_bytes());
        let position = self.data_offset + span.first * span.sector_len as u64;
        let (buffer, zero_sectors) = match self.backend.uring() {
            Some(uring) => {
                let (buffer, result) = uring.read(buffer, position).await;
                result?;
                self.crypt(buffer, move |export, buffer| export.decrypt_sectors(span.first, buffer)).await?
            }
            None => {
                self.run_blocking(move |export| {
                    let mut buffer = buffer;
                    export.backend.read_at(&mut buffer, position)?;
                    let zero_sectors = export.decrypt_sectors(span.first, &mut buffer);
                    Ok((buffer, zero_sectors))
                })
                .await?
            }
        };
        drop(guard);

        let mut zero_runs: Vec<std::ops::Range<usize>> = Vec::new();
        for index in zero_sectors {
            let start = (index * span.sector_len).saturating_sub(span.head);
            let end = ((index + 1) * span.sector_len - span.head).min(len as usize);
            match zero_runs.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => zero_runs.push(start..end),
            }
        }
        Ok(ReadOutput { buffer: Some(buffer), range: span.head..span.head + len as usize, zero_runs })
    }

    /// Reports the allocation status of `offset..offset+len` as consecutive extents: HOLE
    /// and ZERO for sectors that are holes in the backing store, ZERO for allocated sectors
    /// whose ciphertext is all zeros, 0 for data. Every sector reported ZERO reads as zeros.
    /// The extents may cover less than `len` (see [`BLOCK_STATUS_SCAN_BUDGET`]), but never
    /// nothing.
    pub async fn block_status(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
    ) -> Result<Vec<StatusExtent>, EngineError> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Err(EngineError::OutOfRange { offset, len: 0, size: self.size });
        }
        let span = self.span(offset, u64::from(len));
        let guard = self.locks.lock(span.first, span.first + span.count, LockMode::Shared).await;

        self.run_blocking(move |export| {
            let _guard = guard;
            let runs = export.sector_status(span.first, span.count)?;

            // Convert sector runs to byte extents clipped to the request.
            let sector = span.sector_len as u64;
            let end = offset + u64::from(len);
            let mut extents: Vec<StatusExtent> = Vec::with_capacity(runs.len());
            for (first, count, flags) in runs {
                let start = (first * sector).max(offset);
                let stop = ((first + count) * sector).min(end);
                if stop <= start {
                    continue;
                }
                extents.push(StatusExtent { len: (stop - start) as u32, flags });
            }
            Ok(extents)
        })
        .await
    }

    /// Checks a CACHE request. Reads go to the backing store's page cache anyway, so the
    /// hint needs no work beyond validation.
    pub fn cache(&self, offset: u64, len: u32) -> Result<(), EngineError> {
        self.check_range(offset, u64::from(len))
    }

    /// Encrypts and writes `data` at `offset`; with `fua` the data is durable on return. A
    /// write of whole sectors is encrypted in place in `data`'s buffer.
    pub async fn write(
        self: &Arc<Self>,
        offset: u64,
        data: impl Into<IoBuffer>,
        fua: bool,
    ) -> Result<(), EngineError> {
        let data: IoBuffer = data.into();
        if self.is_read_only() {
            return Err(EngineError::ReadOnly);
        }
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let span = self.span(offset, data.len() as u64);
        let guard = self.locks.lock(span.first, span.first + span.count, LockMode::Exclusive).await;

        // Partial sectors need a read-modify-write, done on the blocking pool.
        let is_whole_sectors = span.head == 0 && data.len() == span.len_bytes();
        if !is_whole_sectors {
            return self
                .run_blocking(move |export| {
                    let _guard = guard;
                    export.write_span(span, &data)?;
                    if fua {
                        export.backend.flush()?;
                    }
                    Ok(())
                })
                .await;
        }

        let position = self.data_offset + span.first * span.sector_len as u64;
        let (buffer, ()) =
            self.crypt(data, move |export, buffer| export.cipher.encrypt_sectors(span.first, buffer)).await?;
        match self.backend.uring() {
            Some(uring) => {
                let (_buffer, result) = uring.write(buffer, position, fua).await;
                drop(guard);
                Ok(result?)
            }
            None => {
                self.run_blocking(move |export| {
                    let _guard = guard;
                    if fua {
                        export.backend.write_at_durable(&buffer, position)?;
                    } else {
                        export.backend.write_at(&buffer, position)?;
                    }
                    Ok(())
                })
                .await
            }
        }
    }

    /// Makes `len` bytes at `offset` read as zeros. Whole sectors become zeroed ciphertext
    /// (a punched hole unless `no_hole`); partial sectors are rewritten with zeros merged in.
    pub async fn write_zeroes(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
        options: ZeroOptions,
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
            let mode = ZeroMode { may_unmap: !options.no_hole, fast_only: options.fast_only };
            export.zero_range(offset, u64::from(len), mode)?;
            if options.fua {
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
        match self.backend.uring() {
            Some(uring) => Ok(uring.flush().await?),
            None => self.run_blocking(|export| Ok(export.backend.flush()?)).await,
        }
    }

    /// Writes encrypted zeros over the whole data area, reporting progress in bytes. Used by
    /// `create --wipe`; blocking.
    pub fn wipe_blocking(&self, mut progress: impl FnMut(u64)) -> Result<(), EngineError> {
        const CHUNK: u64 = 4 * 1024 * 1024;
        let sector = self.sector_size().len_u64();
        let mut offset = 0u64;
        while offset < self.size {
            let len = CHUNK.min(self.size - offset);
            let mut buf = self.pool.take(len as usize);
            buf.fill(0);
            self.cipher.encrypt_sectors(offset / sector, &mut buf);
            self.backend.write_at(&buf, self.data_offset + offset)?;
            offset += len;
            progress(offset);
        }
        self.backend.flush()?;
        Ok(())
    }

    /// Runs the CPU-bound `work` on `buffer`: inline when the buffer is at most
    /// [`INLINE_CRYPTO_MAX`] bytes, else on the blocking pool.
    async fn crypt<T, F>(
        self: &Arc<Self>,
        mut buffer: IoBuffer,
        work: F,
    ) -> Result<(IoBuffer, T), EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&Export, &mut IoBuffer) -> T + Send + 'static,
    {
        if buffer.len() <= INLINE_CRYPTO_MAX {
            let output = work(self, &mut buffer);
            return Ok((buffer, output));
        }
        self.run_blocking(move |export| {
            let output = work(export, &mut buffer);
            Ok((buffer, output))
        })
        .await
    }

    /// Runs `work` on tokio's blocking pool, or on this thread when the backend never blocks.
    async fn run_blocking<T, F>(self: &Arc<Self>, work: F) -> Result<T, EngineError>
    where
        T: Send + 'static,
        F: FnOnce(&Export) -> Result<T, EngineError> + Send + 'static,
    {
        if self.backend.never_blocks() {
            return work(self);
        }
        let export = Arc::clone(self);
        tokio::task::spawn_blocking(move || work(&export))
            .await
            .map_err(|e| EngineError::Worker(e.to_string()))?
    }

    /// Reads whole sectors starting at data sector `first` and decrypts them in place,
    /// applying the plaintext zeros rule. Returns the indexes (within `buf`) of the sectors
    /// that were zero ciphertext.
    fn read_sectors(&self, first: u64, buf: &mut [u8]) -> Result<Vec<usize>, EngineError> {
        let sector_len = self.sector_size().len();
        self.backend.read_at(buf, self.data_offset + first * sector_len as u64)?;
        Ok(self.decrypt_sectors(first, buf))
    }

    /// Decrypts the ciphertext sectors of `buf` in place, starting at data sector `first`.
    /// Sectors of zero ciphertext stay zeros (the plaintext zeros rule); their indexes
    /// within `buf` are returned. Runs of non-zero sectors are decrypted in one call.
    fn decrypt_sectors(&self, first: u64, buf: &mut [u8]) -> Vec<usize> {
        let sector_len = self.sector_size().len();
        let mut zero_sectors = Vec::new();
        let mut run_start = 0usize;
        let sectors = buf.len() / sector_len;
        for index in 0..=sectors {
            let is_zero = index < sectors && is_all_zero(&buf[index * sector_len..(index + 1) * sector_len]);
            if index == sectors || is_zero {
                if run_start < index {
                    let run = &mut buf[run_start * sector_len..index * sector_len];
                    self.cipher.decrypt_sectors(first + run_start as u64, run);
                }
                if is_zero {
                    zero_sectors.push(index);
                }
                run_start = index + 1;
            }
        }
        zero_sectors
    }

    /// Classifies `count` sectors from data sector `first` into runs of
    /// `(first sector, sector count, status flags)`, stopping early once the scan budget
    /// is spent.
    fn sector_status(&self, first: u64, count: u64) -> Result<Vec<(u64, u64, u32)>, EngineError> {
        let sector = self.sector_size().len_u64();
        let mut runs: Vec<(u64, u64, u32)> = Vec::new();
        let push = |runs: &mut Vec<(u64, u64, u32)>, start: u64, len: u64, flags: u32| match runs.last_mut() {
            Some(last) if last.2 == flags && last.0 + last.1 == start => last.1 += len,
            _ => runs.push((start, len, flags)),
        };

        let extents = self.backend.extents(self.data_offset + first * sector, count * sector)?;
        let mut position = first * sector;
        let mut next = first;
        let mut budget = BLOCK_STATUS_SCAN_BUDGET;
        let mut scratch = self.pool.take(sector as usize);
        let mut scan = |runs: &mut Vec<(u64, u64, u32)>, index: u64| -> Result<(), EngineError> {
            self.backend.read_at(&mut scratch, self.data_offset + index * sector)?;
            let flags = if is_all_zero(&scratch) { STATE_ZERO } else { 0 };
            push(runs, index, 1, flags);
            Ok(())
        };

        for extent in extents {
            let extent_end = position + extent.len;
            // A sector is classified in the extent where it ends. Sectors wholly inside a
            // hole read as zeros without being read; all others are scanned.
            let hole_first = position.div_ceil(sector);
            let hole_end = extent_end / sector;
            loop {
                if extent.is_hole && next == hole_first && hole_first < hole_end {
                    push(&mut runs, next, hole_end - next, STATE_HOLE | STATE_ZERO);
                    next = hole_end;
                    continue;
                }
                if (next + 1) * sector > extent_end {
                    break;
                }
                if budget < sector && !runs.is_empty() {
                    return Ok(runs);
                }
                scan(&mut runs, next)?;
                budget = budget.saturating_sub(sector);
                next += 1;
            }
            position = extent_end;
        }
        Ok(runs)
    }

    /// Writes `data` over `span`, reading back the partial edge sectors first.
    fn write_span(&self, span: SectorSpan, data: &[u8]) -> Result<(), EngineError> {
        let sector_len = span.sector_len;
        let mut buf = self.pool.take(span.len_bytes());
        let tail_partial = (span.head + data.len()) % sector_len != 0;
        if span.head != 0 {
            self.read_sectors(span.first, &mut buf[..sector_len])?;
        }
        let last = span.count as usize - 1;
        if tail_partial && (last != 0 || span.head == 0) {
            self.read_sectors(span.first + last as u64, &mut buf[last * sector_len..])?;
        }
        buf[span.head..span.head + data.len()].copy_from_slice(data);

        self.cipher.encrypt_sectors(span.first, &mut buf);
        self.backend.write_at(&buf, self.data_offset + span.first * sector_len as u64)?;
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), EngineError> {
        let sector = self.sector_size().len_u64();
        let end = offset + len;
        let whole_start = offset.div_ceil(sector) * sector;
        let whole_end = end / sector * sector;

        if whole_start < whole_end {
            let result =
                self.backend.write_zeroes(self.data_offset + whole_start, whole_end - whole_start, mode);
            if let Err(e) = result {
                if e.kind() == io::ErrorKind::Unsupported && mode.fast_only {
                    return Err(EngineError::FastZeroUnsupported);
                }
                return Err(e.into());
            }
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
            let zeros = [0u8; 4096];
            self.write_span(span, &zeros[..(stop - start) as usize])?;
        }
        Ok(())
    }
}

/// Returns true when every byte is zero. Each 64-byte block is tested with one branch,
/// the OR of its eight words, which the compiler can turn into vector instructions.
fn is_all_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    for block in &mut blocks {
        let mut bits = 0u64;
        for word in block.chunks_exact(8) {
            bits |= u64::from_ne_bytes(word.try_into().expect("chunks of 8 bytes"));
        }
        if bits != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests;

//! A file or block device served through io_uring: reads, writes and flushes are submitted to
//! a ring owned by one thread per export, and the requesting tokio task sleeps until the
//! completion wakes it, so no thread blocks per request. Hole punching, zeroing, discard and
//! SEEK_DATA stay synchronous calls on the [`FileBackend`] the ring was built over.
//!
//! # Buffer ownership
//!
//! Every buffer the kernel reads or writes belongs to a *slot* of the ring from the moment its
//! submission entry is queued until the ring thread has reaped that entry's completion. The
//! submitting future only takes the buffer back out of a slot whose completion has arrived.
//! If the future is dropped first (the runtime shut down, or a caller stopped waiting), the slot
//! is marked abandoned, and the ring thread drops the buffer after the completion, which
//! returns it to its pool. A client that disconnects cancels nothing: each of its requests
//! runs in its own task to completion. The ring thread does not exit, and so the ring is not torn down, while
//! any slot is in flight. Buffers are heap or region memory that does not move when an
//! [`IoBuffer`] value moves, and the region stays mapped while any buffer of its pool lives.
//! Each `SAFETY` comment in this module and in `ring` relies on this rule.

mod ring;

use std::io;
use std::os::unix::io::AsRawFd;

use io_uring::{opcode, IoUring, Probe};

use super::buffer::{BufferPool, IoBuffer};
use super::{Backend, CacheMode, Extent, FileBackend, ZeroMode};
use ring::{Operation, Ring};

/// Operations a ring must support; the probe rejects kernels without them.
const REQUIRED_OPCODES: [u8; 5] = [
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::ReadFixed::CODE,
    opcode::WriteFixed::CODE,
    opcode::Fsync::CODE,
];

/// Operations in flight per ring: enough for several connections at queue depth 32.
pub const DEFAULT_RING_SLOTS: u32 = 256;

/// Bytes of registered buffer memory per export: sixteen 1 MiB requests in flight. The
/// kernel pins the region, so it counts in RSS and against RLIMIT_MEMLOCK for processes
/// without CAP_IPC_LOCK; above that limit registration fails and every buffer is an
/// unregistered one, which works the same but costs a page pin per I/O.
pub const DEFAULT_REGION_BYTES: usize = 16 * 1024 * 1024;

/// Checks that this process may create io_uring rings with the operations the backend uses.
/// Fails with the setup error (EPERM under a seccomp filter or with the `io_uring_disabled`
/// sysctl set, ENOSYS on kernels without io_uring) or with `Unsupported` for missing opcodes.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(4)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in REQUIRED_OPCODES {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel's io_uring lacks opcode {code}"),
            ));
        }
    }
    Ok(())
}

/// A [`FileBackend`] whose reads, writes and flushes go through io_uring.
pub struct UringBackend {
    file: FileBackend,
    pool: BufferPool,
    ring: Ring,
}

impl std::fmt::Debug for UringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringBackend")
            .field("file", &self.file)
            .field("fixed_buffers", &self.ring.has_fixed_buffers())
            .finish_non_exhaustive()
    }
}

impl UringBackend {
    /// Builds a ring with `slots` operations in flight over the data descriptor of `file`,
    /// registering a `region_bytes` buffer region when the memory lock limit allows.
    pub fn new(file: FileBackend, slots: u32, region_bytes: usize) -> io::Result<Self> {
        let pool = BufferPool::with_region(region_bytes);
        let ring = Ring::new(file.data_file().as_raw_fd(), &pool, slots)?;
        Ok(UringBackend { file, pool, ring })
    }

    /// Builds a ring with the default slot count and region size.
    pub fn with_defaults(file: FileBackend) -> io::Result<Self> {
        Self::new(file, DEFAULT_RING_SLOTS, DEFAULT_REGION_BYTES)
    }

    /// Whether the buffer region is registered with the ring (fixed buffers).
    pub fn has_fixed_buffers(&self) -> bool {
        self.ring.has_fixed_buffers()
    }

    /// The cache mode of the data descriptor.
    pub fn cache_mode(&self) -> CacheMode {
        self.file.cache_mode()
    }

    /// Reads `buffer.len()` bytes at `offset` into `buffer`, returning the buffer in every case.
    pub async fn read(&self, buffer: IoBuffer, offset: u64) -> (IoBuffer, io::Result<()>) {
        self.transfer(buffer, offset, |start| Operation::Read { offset: offset + start as u64, start }).await
    }

    /// Writes all of `buffer` at `offset`; with `durable` the data is on stable storage when
    /// the call returns (RWF_DSYNC). The buffer is returned in every case.
    pub async fn write(&self, buffer: IoBuffer, offset: u64, durable: bool) -> (IoBuffer, io::Result<()>) {
        self.transfer(buffer, offset, |start| Operation::Write {
            offset: offset + start as u64,
            start,
            durable,
        })
        .await
    }

    /// Makes every completed write durable (fdatasync).
    pub async fn flush(&self) -> io::Result<()> {
        let (_, result) = self.ring.submit(Operation::Fsync, None).await;
        result.map(|_| ())
    }

    /// Runs a read or write until all bytes moved, resubmitting the rest after a short
    /// transfer. A transfer of zero bytes before the end is an unexpected end of file.
    async fn transfer(
        &self,
        mut buffer: IoBuffer,
        offset: u64,
        operation: impl Fn(usize) -> Operation,
    ) -> (IoBuffer, io::Result<()>) {
        let len = buffer.len();
        let mut done = 0usize;
        while done < len {
            let (returned, result) = self.ring.submit(operation(done), Some(buffer)).await;
            buffer = returned.expect("transfers always carry a buffer");
            match result {
                Ok(0) => {
                    let error = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("I/O at byte {} of the backing store moved no bytes", offset + done as u64),
                    );
                    return (buffer, Err(error));
                }
                Ok(moved) => done += moved as usize,
                Err(error) => return (buffer, Err(error)),
            }
        }
        (buffer, Ok(()))
    }
}

impl Backend for UringBackend {
    fn len_bytes(&self) -> u64 {
        self.file.len_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_at(buf, offset)
    }

    fn write_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_at_durable(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.flush()
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        self.file.write_zeroes(offset, len, mode)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.file.extents(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.discard(offset, len)
    }

    fn buffer_pool(&self) -> Option<BufferPool> {
        Some(self.pool.clone())
    }

    fn uring(&self) -> Option<&UringBackend> {
        Some(self)
    }
}

//! A regular file or block device accessed with positional reads and writes
//! (pread/pwrite), called from tokio's blocking thread pool.
//!
//! The data area can bypass the page cache ([`CacheMode::None`]): reads and writes then go
//! through a second descriptor opened with O_DIRECT, while header I/O, hole punching and
//! SEEK_DATA keep using the buffered one. O_DIRECT needs aligned buffers, offsets and
//! lengths; the engine sends whole sectors at sector offsets, and a misaligned buffer is
//! copied through an aligned one.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::buffer::{IoBuffer, BUFFER_ALIGN};
use super::{fast_zero_unsupported, write_zeroes_by_writing, Backend, CacheMode, Extent, ZeroMode};

// Linux ioctl numbers from <linux/fs.h>: _IO(0x12, 119), _IO(0x12, 127), _IOR(0x12, 114, size_t).
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// A file or block device opened for exclusive use by this process.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// The descriptor for data reads and writes: `file` itself, or an O_DIRECT reopen.
    data: File,
    cache: CacheMode,
    len: u64,
    is_block_device: bool,
    writable: bool,
}

impl FileBackend {
    /// Opens `path` read-write and locks it against other users: an exclusive open
    /// (`O_EXCL`) for a block device, an exclusive OFD lock for a regular file. Another
    /// nbdcrypt (or anything else taking the same locks) then fails to open it.
    pub fn open_exclusive(path: &Path) -> io::Result<Self> {
        Self::open_locked(path, true)
    }

    /// Opens `path` read-only, for a read-only export. A block device is still opened with
    /// `O_EXCL`; a regular file gets a shared OFD lock, so other read-only opens succeed and
    /// read-write opens fail. Every write through the backend then fails with EBADF.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        Self::open_locked(path, false)
    }

    fn open_locked(path: &Path, writable: bool) -> io::Result<Self> {
        let metadata = std::fs::metadata(path)?;
        let is_block_device = metadata.file_type().is_block_device();
        let mut options = OpenOptions::new();
        options.read(true).write(writable);
        if is_block_device {
            options.custom_flags(libc::O_EXCL);
        }
        let file = options.open(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                io::Error::new(
                    e.kind(),
                    format!("{} is in use by another process (O_EXCL open failed)", path.display()),
                )
            } else {
                e
            }
        })?;
        if !is_block_device {
            lock_file(&file, writable).map_err(|e| {
                io::Error::new(e.kind(), format!("{} is locked by another process: {e}", path.display()))
            })?;
        }
        let mut backend = Self::from_file(file)?;
        backend.writable = writable;
        Ok(backend)
    }

    /// Wraps an already opened file or block device without locking it.
    pub fn from_file(file: File) -> io::Result<Self> {
        let is_block_device = file.metadata()?.file_type().is_block_device();
        let len = if is_block_device { block_device_len(&file)? } else { file.metadata()?.len() };
        let data = file.try_clone()?;
        let writable = file_is_writable(&file)?;
        Ok(FileBackend { file, data, cache: CacheMode::Writeback, len, is_block_device, writable })
    }

    /// Sends data reads and writes past the page cache (O_DIRECT) or back through it. The
    /// switch to O_DIRECT reads `probe_len` bytes at offset 0 first and fails, changing
    /// nothing, when the store rejects direct I/O of that size (a file system without
    /// O_DIRECT, or a logical block size larger than `probe_len`).
    pub fn set_cache_mode(&mut self, cache: CacheMode, probe_len: usize) -> io::Result<()> {
        if cache == self.cache {
            return Ok(());
        }
        let data = match cache {
            CacheMode::Writeback => self.file.try_clone()?,
            CacheMode::None => {
                // Reopening through /proc names the same inode even if the path was replaced.
                let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                let data = OpenOptions::new()
                    .read(true)
                    .write(self.writable)
                    .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
                    .open(path)?;
                let mut probe = IoBuffer::zeroed(probe_len);
                data.read_exact_at(&mut probe, 0)?;
                data
            }
        };
        self.data = data;
        self.cache = cache;
        Ok(())
    }

    /// Whether data I/O bypasses the page cache.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    /// The descriptor for data reads and writes (O_DIRECT with [`CacheMode::None`]).
    pub fn data_file(&self) -> &File {
        &self.data
    }

    /// The open file, for header reads and writes.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the store is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid("offset too large"))?;
        let len = libc::off_t::try_from(len).map_err(|_| invalid("length too large"))?;
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by
        // `self.file` and stays open for the duration of the call.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// lseek with SEEK_DATA or SEEK_HOLE. The descriptor's file position is never used for
    /// I/O (all I/O is positional), so moving it is harmless.
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<u64> {
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid("offset too large"))?;
        // SAFETY: lseek only reads its integer arguments; the descriptor is open.
        let found = unsafe { libc::lseek(self.file.as_raw_fd(), offset, whence) };
        if found < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(found as u64)
        }
    }

    fn block_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD and BLKZEROOUT read two u64 values (start, length) from the
        // pointer, which points at `range` and lives until the call returns.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, range.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Backend for FileBackend {
    fn len_bytes(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.needs_bounce(buf) {
            let mut bounce = IoBuffer::from_slice(buf);
            self.data.read_exact_at(&mut bounce, offset)?;
            buf.copy_from_slice(&bounce);
            return Ok(());
        }
        self.data.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.needs_bounce(buf) {
            return self.data.write_all_at(&IoBuffer::from_slice(buf), offset);
        }
        self.data.write_all_at(buf, offset)
    }

    fn write_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.needs_bounce(buf) {
            return self.write_at_durable(&IoBuffer::from_slice(buf), offset);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let iov = libc::iovec {
                iov_base: buf[done..].as_ptr() as *mut libc::c_void,
                iov_len: buf.len() - done,
            };
            let position =
                libc::off_t::try_from(offset + done as u64).map_err(|_| invalid("offset too large"))?;
            // SAFETY: `iov` describes `buf[done..]`, which stays borrowed for the call; the
            // descriptor is open. RWF_DSYNC makes this one write durable, like O_DSYNC.
            let written =
                unsafe { libc::pwritev2(self.data.as_raw_fd(), &iov, 1, position, libc::RWF_DSYNC) };
            match written {
                n if n > 0 => done += n as usize,
                0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                _ => {
                    let error = io::Error::last_os_error();
                    if error.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // Kernels or file systems without RWF_DSYNC: write, then fdatasync.
                    if error.raw_os_error() == Some(libc::EOPNOTSUPP) && done == 0 {
                        self.write_at(buf, offset)?;
                        return self.flush();
                    }
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.data.sync_data()
    }

    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        // On a block device, PUNCH_HOLE becomes a write-zeroes or discard request without the
        // kernel's fallback of writing zero pages, so it fails where zeroing would be slow;
        // ZERO_RANGE keeps the blocks provisioned but may fall back to writing zeros.
        let fast = match (self.is_block_device, mode.may_unmap) {
            (_, true) => self.fallocate(PUNCH_HOLE, offset, len),
            (true, false) if mode.fast_only => return Err(fast_zero_unsupported()),
            (_, false) => self.fallocate(ZERO_RANGE, offset, len),
        };
        match fast {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) && mode.fast_only => Err(fast_zero_unsupported()),
            Err(e) if is_unsupported(&e) && self.is_block_device => {
                match self.block_ioctl(BLKZEROOUT, offset, len) {
                    Ok(()) => Ok(()),
                    Err(_) => write_zeroes_by_writing(self, offset, len),
                }
            }
            Err(e) if is_unsupported(&e) => write_zeroes_by_writing(self, offset, len),
            Err(e) => Err(e),
        }
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        if self.is_block_device {
            return Ok(vec![Extent { len, is_hole: false }]);
        }
        let end = offset + len;
        let mut extents = Vec::new();
        let mut position = offset;
        while position < end {
            let data_start = match self.seek(position, libc::SEEK_DATA) {
                Ok(found) => found.min(end),
                // ENXIO: no data at or after `position`, so the rest is a hole.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) if is_unsupported(&e) => return Ok(vec![Extent { len, is_hole: false }]),
                Err(e) => return Err(e),
            };
            if data_start > position {
                extents.push(Extent { len: data_start - position, is_hole: true });
                position = data_start;
                continue;
            }
            let hole_start = match self.seek(position, libc::SEEK_HOLE) {
                Ok(found) => found.min(end),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(e) => return Err(e),
            };
            // A racing write can make SEEK_HOLE return `position`; count one byte as data so
            // the loop always advances.
            let data_end = hole_start.max(position + 1).min(end);
            extents.push(Extent { len: data_end - position, is_hole: false });
            position = data_end;
        }
        Ok(extents)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let result = if self.is_block_device {
            self.block_ioctl(BLKDISCARD, offset, len)
        } else {
            self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
        };
        match result {
            // Discard is a hint: a store that cannot discard keeps the old bytes.
            Err(e) if is_unsupported(&e) => Ok(()),
            other => other,
        }
    }
}

impl FileBackend {
    /// Whether `buf` must be copied through an aligned buffer for O_DIRECT.
    fn needs_bounce(&self, buf: &[u8]) -> bool {
        self.cache == CacheMode::None && buf.as_ptr() as usize % BUFFER_ALIGN != 0
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTTY)
    )
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_string())
}

/// Takes an exclusive open file description lock on the whole file. OFD locks belong to the
/// open file, not the process, so they also exclude other opens inside this process.
/// Takes an OFD lock on the whole file: exclusive (a write lock) when `exclusive`, else
/// shared (a read lock).
fn lock_file(file: &File, exclusive: bool) -> io::Result<()> {
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = (if exclusive { libc::F_WRLCK } else { libc::F_RDLCK }) as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 0;
    // SAFETY: F_OFD_SETLK reads the `flock` struct behind the pointer, which is valid for
    // the duration of the call; the descriptor is open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Returns whether `file` was opened with write access.
fn file_is_writable(file: &File) -> io::Result<bool> {
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & libc::O_ACCMODE != libc::O_RDONLY)
}

/// Returns the size in bytes of a block device.
pub fn block_device_len(file: &File) -> io::Result<u64> {
    let mut len: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `len`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut len as *mut u64) };
    if rc == 0 {
        Ok(len)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_of_a_locked_file_fails() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(8192).unwrap();
        let first = FileBackend::open_exclusive(file.path()).unwrap();
        let second = FileBackend::open_exclusive(file.path());
        assert!(second.is_err());
        drop(first);
        FileBackend::open_exclusive(file.path()).unwrap();
    }

    #[test]
    fn write_zeroes_and_discard_read_back_zeros() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let backend = FileBackend::open_exclusive(file.path()).unwrap();
        backend.write_at(&[0xaa; 65536], 0).unwrap();
        backend.write_zeroes(4096, 8192, ZeroMode { may_unmap: true, fast_only: false }).unwrap();
        backend.write_zeroes(16384, 4096, ZeroMode { may_unmap: false, fast_only: true }).unwrap();
        backend.discard(32768, 4096).unwrap();
        let mut buf = vec![0u8; 65536];
        backend.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xaa));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[16384..20480].iter().all(|&b| b == 0));
        assert!(buf[32768..36864].iter().all(|&b| b == 0));
        assert!(buf[36864..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn extents_find_holes_in_a_sparse_file() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let backend = FileBackend::open_exclusive(file.path()).unwrap();
        backend.write_at(&[1u8; 8192], 65536).unwrap();
        let extents = backend.extents(0, 1 << 20).unwrap();
        assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
        assert_eq!(extents[0], Extent { len: 65536, is_hole: true });
        assert!(!extents[1].is_hole);
        assert!(extents[1].len >= 8192);
        assert!(extents.last().unwrap().is_hole);
    }
}

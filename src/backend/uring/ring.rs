//! The ring thread and its slot table. Tasks queue submission entries under a mutex and wake
//! the thread through an eventfd whose read is always pending in the ring. The thread pushes
//! the entries, waits for completions, stores each result in its slot and wakes the task.
//! The buffer ownership rule is stated in the parent module.

#![allow(unsafe_code)]

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tokio::sync::Semaphore;

use super::super::buffer::{BufferPool, IoBuffer};

/// `user_data` of the eventfd read; slot indexes are far below it.
const WAKE_TOKEN: u64 = u64::MAX;

/// Index of the data descriptor in the ring's registered file table.
const DATA_FILE: types::Fixed = types::Fixed(0);

/// Index of the buffer region in the ring's registered buffer table.
const REGION_INDEX: u16 = 0;

/// One operation on the data descriptor. `start` is the first byte of the slot's buffer
/// that the operation moves; the rest of the buffer after it is moved too.
#[derive(Debug, Clone, Copy)]
pub(super) enum Operation {
    Read { offset: u64, start: usize },
    Write { offset: u64, start: usize, durable: bool },
    Fsync,
}

/// The handle the backend holds: shared state plus the thread, joined on drop.
pub(super) struct Ring {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    /// Entries built by tasks and not yet pushed by the ring thread. Its capacity is the slot
    /// count, which bounds its length, so pushing never reallocates.
    queue: Mutex<Vec<squeue::Entry>>,
    /// Written to wake the ring thread.
    wake: OwnedFd,
    slots: Box<[Mutex<Slot>]>,
    free_slots: Mutex<Vec<u32>>,
    /// One permit per free slot, so tasks wait without spinning when all are in flight.
    permits: Semaphore,
    stopping: AtomicBool,
    /// Base and length of the registered region, when registration succeeded.
    region: Option<(usize, usize)>,
}

enum Slot {
    Free,
    InFlight { buffer: Option<IoBuffer>, waker: Option<Waker>, abandoned: bool },
    Done { buffer: Option<IoBuffer>, result: i32 },
}

impl Ring {
    /// Sets up a ring for `slots` operations over descriptor `fd`, which must stay open for
    /// the life of the ring, and starts its thread.
    pub(super) fn new(fd: RawFd, pool: &BufferPool, slots: u32) -> io::Result<Self> {
        // One entry per slot plus the eventfd read, rounded up to a power of two by the kernel.
        let ring = IoUring::new(slots + 1)?;
        ring.submitter().register_files(&[fd])?;
        let region = pool.region().and_then(|(base, len)| {
            let iovec = libc::iovec { iov_base: base.cast(), iov_len: len };
            // SAFETY: the region is mapped for the life of the pool, and every buffer carved
            // from it holds the pool (see the buffer ownership rule), so the registered
            // memory outlives each fixed operation on it.
            match unsafe { ring.submitter().register_buffers(&[iovec]) } {
                Ok(()) => Some((base as usize, len)),
                Err(error) => {
                    tracing::info!(%error, len, "registering I/O buffers failed; using unregistered buffers");
                    None
                }
            }
        });

        // SAFETY: eventfd has no memory preconditions; the result is checked below.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `wake` is a fresh descriptor owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };

        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::with_capacity(slots as usize)),
            wake,
            slots: (0..slots).map(|_| Mutex::new(Slot::Free)).collect(),
            free_slots: Mutex::new((0..slots).rev().collect()),
            permits: Semaphore::new(slots as usize),
            stopping: AtomicBool::new(false),
            region,
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("nbdcrypt-uring".into())
            .spawn(move || run_ring(ring, &thread_shared))?;
        Ok(Ring { shared, thread: Some(thread) })
    }

    pub(super) fn has_fixed_buffers(&self) -> bool {
        self.shared.region.is_some()
    }

    /// Submits `operation` on `buffer` and waits for its completion. Returns the buffer and
    /// the operation's result: bytes moved, or the error.
    pub(super) async fn submit(
        &self,
        operation: Operation,
        mut buffer: Option<IoBuffer>,
    ) -> (Option<IoBuffer>, io::Result<u32>) {
        let shared = &self.shared;
        let Ok(permit) = shared.permits.acquire().await else {
            return (buffer, Err(io::Error::other("the io_uring thread has stopped")));
        };
        permit.forget();
        let index = lock(&shared.free_slots).pop().expect("a permit guarantees a free slot");

        let entry = match build_entry(operation, buffer.as_mut(), shared.region) {
            Ok(entry) => entry.user_data(u64::from(index)),
            Err(error) => {
                shared.release_slot(index);
                return (buffer, Err(error));
            }
        };
        *lock(&shared.slots[index as usize]) = Slot::InFlight { buffer, waker: None, abandoned: false };

        let was_empty = {
            let mut queue = lock(&shared.queue);
            queue.push(entry);
            queue.len() == 1
        };
        // The thread drains the whole queue after each wake-up, so only the push that finds
        // the queue empty needs to wake it.
        if was_empty {
            shared.wake_thread();
        }

        let completion = Completion { shared, index, finished: false };
        completion.await
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.wake_thread();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the io_uring thread panicked");
            }
        }
        self.shared.permits.close();
    }
}

impl Shared {
    fn wake_thread(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one`, which lives across the call, to our eventfd.
        let written = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        // A full counter (EAGAIN) still wakes the thread; nothing else can fail here.
        debug_assert!(written == 8 || io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock);
    }

    fn release_slot(&self, index: u32) {
        *lock(&self.slots[index as usize]) = Slot::Free;
        lock(&self.free_slots).push(index);
        self.permits.add_permits(1);
    }
}

/// Builds the submission entry for `operation`; fixed-buffer opcodes when the buffer lies in
/// the registered region.
fn build_entry(
    operation: Operation,
    buffer: Option<&mut IoBuffer>,
    region: Option<(usize, usize)>,
) -> io::Result<squeue::Entry> {
    let (start, buffer) = match (operation, buffer) {
        (Operation::Fsync, _) => {
            return Ok(opcode::Fsync::new(DATA_FILE).flags(types::FsyncFlags::DATASYNC).build());
        }
        (Operation::Read { start, .. } | Operation::Write { start, .. }, Some(buffer)) => (start, buffer),
        (_, None) => return Err(io::Error::new(io::ErrorKind::InvalidInput, "a transfer needs a buffer")),
    };
    let len = u32::try_from(buffer.len() - start)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a transfer is limited to 4 GiB"))?;
    // SAFETY: `start <= buffer.len()`, so the pointer stays inside the buffer.
    let pointer = unsafe { buffer.as_mut_ptr().add(start) };
    let in_region = region.is_some_and(|(base, region_len)| {
        let address = pointer as usize;
        address >= base && address + len as usize <= base + region_len
    });

    let entry = match operation {
        Operation::Read { offset, .. } if in_region => {
            opcode::ReadFixed::new(DATA_FILE, pointer, len, REGION_INDEX).offset(offset).build()
        }
        Operation::Read { offset, .. } => opcode::Read::new(DATA_FILE, pointer, len).offset(offset).build(),
        Operation::Write { offset, durable, .. } => {
            let flags = if durable { libc::RWF_DSYNC } else { 0 };
            if in_region {
                opcode::WriteFixed::new(DATA_FILE, pointer, len, REGION_INDEX)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            } else {
                opcode::Write::new(DATA_FILE, pointer, len).offset(offset).rw_flags(flags).build()
            }
        }
        Operation::Fsync => unreachable!("handled above"),
    };
    Ok(entry)
}

/// Resolves when the ring thread has completed slot `index`.
struct Completion<'a> {
    shared: &'a Shared,
    index: u32,
    finished: bool,
}

impl Future for Completion<'_> {
    type Output = (Option<IoBuffer>, io::Result<u32>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = lock(&self.shared.slots[self.index as usize]);
        match &mut *slot {
            Slot::InFlight { waker, .. } => {
                match waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Done { buffer, result } => {
                let buffer = buffer.take();
                let result = if *result < 0 {
                    Err(io::Error::from_raw_os_error(-*result))
                } else {
                    Ok(*result as u32)
                };
                *slot = Slot::Free;
                drop(slot);
                self.finished = true;
                lock(&self.shared.free_slots).push(self.index);
                self.shared.permits.add_permits(1);
                Poll::Ready((buffer, result))
            }
            Slot::Free => {
                unreachable!("a slot is only freed by its completion future or an abandoned completion")
            }
        }
    }
}

impl Drop for Completion<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut slot = lock(&self.shared.slots[self.index as usize]);
        match &mut *slot {
            // The kernel still owns the buffer: leave it to the ring thread.
            Slot::InFlight { abandoned, .. } => *abandoned = true,
            Slot::Done { .. } => {
                *slot = Slot::Free;
                drop(slot);
                lock(&self.shared.free_slots).push(self.index);
                self.shared.permits.add_permits(1);
            }
            Slot::Free => {}
        }
    }
}

/// The ring thread: pushes queued entries, waits, and completes slots until the ring is
/// stopping and nothing is in flight.
fn run_ring(mut ring: IoUring, shared: &Shared) {
    // The eventfd read's target: heap memory that outlives the ring (dropped after it below).
    let mut wake_buffer = Box::new([0u8; 8]);
    let mut wake_armed = false;
    let mut in_flight = 0usize;
    let mut batch: Vec<squeue::Entry> = Vec::with_capacity(shared.slots.len());

    loop {
        let stopping = shared.stopping.load(Ordering::Acquire);
        if !wake_armed && !stopping {
            let entry = opcode::Read::new(types::Fd(shared.wake.as_raw_fd()), wake_buffer.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE_TOKEN);
            // SAFETY: `wake_buffer` lives until after the ring is dropped at the end of this
            // function, so the kernel's 8-byte write always lands in it.
            unsafe { push(&mut ring, &entry) };
            wake_armed = true;
        }

        std::mem::swap(&mut *lock(&shared.queue), &mut batch);
        for entry in batch.drain(..) {
            // SAFETY: the entry's buffer sits in its slot until this thread reaps the
            // completion (buffer ownership rule), and the data descriptor outlives the ring.
            unsafe { push(&mut ring, &entry) };
            in_flight += 1;
        }

        if stopping && in_flight == 0 && !wake_armed {
            break;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(error) if matches!(error.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
            Err(error) => {
                // Without a working ring no completion can arrive; nothing else is safe to do
                // with buffers the kernel may still own.
                tracing::error!(%error, "io_uring_enter failed; stopping the process");
                std::process::abort();
            }
        }

        for cqe in ring.completion() {
            if cqe.user_data() == WAKE_TOKEN {
                wake_armed = false;
                continue;
            }
            in_flight -= 1;
            complete(shared, &cqe);
        }
    }
    drop(ring);
    drop(wake_buffer);
}

/// Pushes one entry; the submission queue has room for every slot plus the wake read, so
/// it is never full.
///
/// # Safety
/// The memory and descriptors the entry names must stay valid until its completion is
/// reaped (the buffer ownership rule in the parent module).
unsafe fn push(ring: &mut IoUring, entry: &squeue::Entry) {
    // SAFETY: the caller upholds the validity rule above.
    let pushed = unsafe { ring.submission().push(entry) };
    if pushed.is_err() {
        // Only reachable if the slot accounting is wrong; flush the queue and retry once.
        let _ = ring.submit();
        // SAFETY: as above.
        unsafe { ring.submission().push(entry) }.expect("the submission queue has room after submit");
    }
}

fn complete(shared: &Shared, cqe: &cqueue::Entry) {
    let index = cqe.user_data() as usize;
    let mut slot = lock(&shared.slots[index]);
    let Slot::InFlight { buffer, waker, abandoned } = &mut *slot else {
        unreachable!("a completion arrives only for an in-flight slot");
    };
    if *abandoned {
        let buffer = buffer.take();
        *slot = Slot::Free;
        drop(slot);
        drop(buffer);
        lock(&shared.free_slots).push(index as u32);
        shared.permits.add_permits(1);
        return;
    }
    let waker = waker.take();
    *slot = Slot::Done { buffer: buffer.take(), result: cqe.result() };
    drop(slot);
    if let Some(waker) = waker {
        waker.wake();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Slot and queue state is written in single assignments, consistent across a panic.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

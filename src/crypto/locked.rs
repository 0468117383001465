//! Heap memory for expanded keys that stays out of swap and core dumps.
//!
//! A [`LockedBox`] owns a page-aligned allocation that is `mlock`ed (never swapped) and
//! marked `MADV_DONTDUMP` (left out of core dumps even if the process is dumpable). On drop
//! the value's own destructor runs, then every byte is overwritten with zeros before the
//! pages are unlocked and freed.

#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a failed mlock has been logged, so a low RLIMIT_MEMLOCK warns only once.
static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// A heap value in locked, non-dumpable memory.
pub struct LockedBox<T> {
    ptr: NonNull<T>,
    layout: Layout,
    locked: bool,
}

// SAFETY: LockedBox owns its T exclusively, like Box<T>, so it is Send/Sync when T is.
unsafe impl<T: Send> Send for LockedBox<T> {}
// SAFETY: as above; shared access only hands out &T.
unsafe impl<T: Sync> Sync for LockedBox<T> {}

impl<T> LockedBox<T> {
    /// Moves `value` into a fresh locked allocation.
    pub fn new(value: T) -> Self {
        let page = page_size();
        let size = std::mem::size_of::<T>().max(1).div_ceil(page) * page;
        let align = std::mem::align_of::<T>().max(page);
        let layout = Layout::from_size_align(size, align).expect("page-rounded layout is valid");

        // SAFETY: the layout has a nonzero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw.cast::<T>()) else {
            alloc::handle_alloc_error(layout);
        };
        // SAFETY: `ptr` is valid for writes of a T: freshly allocated with T's size and at
        // least T's alignment.
        unsafe { ptr.as_ptr().write(value) };

        // SAFETY: mlock and madvise only change page attributes of the range we own.
        let locked = unsafe { libc::mlock(raw.cast(), size) } == 0;
        if !locked && !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "mlock of key memory failed; keys may be swapped out (raise LimitMEMLOCK / ulimit -l)"
            );
        }
        // SAFETY: as above.
        unsafe { libc::madvise(raw.cast(), size, libc::MADV_DONTDUMP) };

        LockedBox { ptr, layout, locked }
    }
}

impl<T> Deref for LockedBox<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialized T for the whole life of the box.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Drop for LockedBox<T> {
    fn drop(&mut self) {
        let raw = self.ptr.as_ptr().cast::<u8>();
        // SAFETY: the T is initialized and dropped exactly once, here; then the allocation,
        // which we own, is zeroed with volatile writes (so they are not optimized away),
        // unlocked and freed with the layout it was allocated with.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            for offset in 0..self.layout.size() {
                std::ptr::write_volatile(raw.add(offset), 0);
            }
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
            if self.locked {
                libc::munlock(raw.cast(), self.layout.size());
            }
            alloc::dealloc(raw, self.layout);
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_is_readable_and_page_aligned() {
        let boxed = LockedBox::new([7u8; 100]);
        assert_eq!(boxed[99], 7);
        assert_eq!(&*boxed as *const _ as usize % page_size(), 0);
    }

    #[test]
    fn drop_runs_the_value_destructor() {
        use std::rc::Rc;
        let shared = Rc::new(());
        let boxed = LockedBox::new(Rc::clone(&shared));
        assert_eq!(Rc::strong_count(&shared), 2);
        drop(boxed);
        assert_eq!(Rc::strong_count(&shared), 1);
    }
}

//! AES-256-XTS through aws-lc's `EVP_aes_256_xts`. On x86-64 CPUs with VAES, VPCLMULQDQ,
//! AVX512F and AVX512VBMI2 it runs an AVX-512 routine (`aes_hw_xts_encrypt_avx512`), on
//! other CPUs with AES-NI an interleaved AES-NI routine (`aes_hw_xts_encrypt`). Both ran
//! about twice as fast as the portable path in `benches/xts.rs` (see docs/benchmarks.md).
//!
//! An EVP context holds the expanded keys and serves one thread at a time, so contexts are
//! pooled: a call takes one, changes only its IV for each sector, and puts it back. A
//! context's key schedule lives in aws-lc's heap: its pages are locked and left out of core
//! dumps here, and `EVP_CIPHER_CTX_free` overwrites it with zeros before freeing it.

#![allow(unsafe_code)]

use std::os::raw::c_int;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use aws_lc_sys::{
    EVP_CIPHER_CTX_free, EVP_CIPHER_CTX_new, EVP_CipherInit_ex, EVP_CipherUpdate, EVP_aes_256_xts,
    EVP_CIPHER_CTX,
};

use super::locked::LockedBox;
use super::VOLUME_KEY_LEN;

/// Bytes locked around a context's `cipher_data`: the XTS context holds two AES-256 key
/// schedules of 244 bytes each and a few pointers.
const KEY_SCHEDULE_SPAN: usize = 1024;

/// Whether aws-lc runs a hardware XTS routine on this CPU: x86-64 with AES-NI, which aws-lc
/// checks before its assembly paths (`hwaes_xts_available` in its `e_aes.c`).
pub fn has_hardware_xts() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AES-256-XTS over a pool of aws-lc EVP contexts that share one key.
pub(super) struct AwsLcXts {
    /// The raw 512-bit key, kept to set up contexts when more threads need one at once.
    key: LockedBox<[u8; VOLUME_KEY_LEN]>,
    encrypt_pool: Mutex<Vec<Context>>,
    decrypt_pool: Mutex<Vec<Context>>,
}

impl AwsLcXts {
    pub(super) fn new(key: &[u8; VOLUME_KEY_LEN]) -> Self {
        AwsLcXts {
            key: LockedBox::new(*key),
            encrypt_pool: Mutex::new(Vec::new()),
            decrypt_pool: Mutex::new(Vec::new()),
        }
    }

    /// Encrypts or decrypts each `unit_len`-byte data unit of `buf` in place; unit `i` uses
    /// the 64-bit little-endian tweak `first_tweak + i * tweak_step`.
    pub(super) fn apply(
        &self,
        buf: &mut [u8],
        unit_len: usize,
        first_tweak: u64,
        tweak_step: u64,
        encrypt: bool,
    ) {
        let pool = if encrypt { &self.encrypt_pool } else { &self.decrypt_pool };
        let context = match lock(pool).pop() {
            Some(context) => context,
            None => Context::new(&self.key, encrypt),
        };

        let mut tweak = first_tweak;
        for unit in buf.chunks_exact_mut(unit_len) {
            context.apply_unit(tweak, unit);
            tweak = tweak.wrapping_add(tweak_step);
        }

        lock(pool).push(context);
    }
}

fn lock(pool: &Mutex<Vec<Context>>) -> MutexGuard<'_, Vec<Context>> {
    // A panic while the lock was held leaves a list of valid contexts.
    pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One EVP context with the XTS key set for one direction.
struct Context {
    ctx: NonNull<EVP_CIPHER_CTX>,
}

// SAFETY: an EVP_CIPHER_CTX has no thread affinity; the pool hands each context to one
// thread at a time, and `apply_unit` takes `&self` only while the context is out of the pool.
unsafe impl Send for Context {}

impl Context {
    fn new(key: &[u8; VOLUME_KEY_LEN], encrypt: bool) -> Self {
        // SAFETY: EVP_CIPHER_CTX_new has no preconditions; it returns null only when out of
        // memory.
        let raw = unsafe { EVP_CIPHER_CTX_new() };
        let Some(ctx) = NonNull::new(raw) else {
            panic!("aws-lc could not allocate a cipher context: out of memory");
        };
        let context = Context { ctx };

        // SAFETY: `ctx` is a fresh context, the cipher is a static object, `key` points at 64
        // readable bytes (the key length of AES-256-XTS), and a null IV is allowed.
        let ok = unsafe {
            EVP_CipherInit_ex(
                ctx.as_ptr(),
                EVP_aes_256_xts(),
                std::ptr::null_mut(),
                key.as_ptr(),
                std::ptr::null(),
                c_int::from(encrypt),
            )
        };
        // The key was checked by `VolumeKey` (64 bytes, different halves), the only inputs
        // aws-lc validates here.
        assert_eq!(ok, 1, "aws-lc rejected a valid AES-256-XTS key");
        context.protect_key_schedule();
        context
    }

    /// Locks the pages holding the expanded keys and excludes them from core dumps. The
    /// pages are never unlocked: other heap objects may share them, and the lock only keeps
    /// a few pages resident.
    fn protect_key_schedule(&self) {
        // SAFETY: `ctx` is a valid context; reading its `cipher_data` field is a plain load.
        let cipher_data = unsafe { (*self.ctx.as_ptr()).cipher_data } as usize;
        if cipher_data == 0 {
            return;
        }
        let page = page_size();
        let start = cipher_data & !(page - 1);
        let end = (cipher_data + KEY_SCHEDULE_SPAN).div_ceil(page) * page;
        // SAFETY: mlock and madvise(MADV_DONTDUMP) change only residency and dump attributes
        // of mapped heap pages; they neither read nor write the memory.
        unsafe {
            libc::mlock(start as *const libc::c_void, end - start);
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTDUMP);
        }
    }

    /// Runs one XTS data unit in place with the 128-bit tweak `tweak` (zero-extended).
    fn apply_unit(&self, tweak: u64, unit: &mut [u8]) {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&tweak.to_le_bytes());
        let mut written: c_int = 0;
        let len = c_int::try_from(unit.len()).expect("a sector is at most 4096 bytes");

        // SAFETY: `ctx` holds a key set by `new`; a null cipher, engine and key with an IV
        // only start a new data unit, and -1 keeps the direction. `unit` is valid for reads
        // and writes of `len` bytes, and aws-lc allows the output to alias the input exactly.
        let ok = unsafe {
            EVP_CipherInit_ex(
                self.ctx.as_ptr(),
                std::ptr::null(),
                std::ptr::null_mut(),
                std::ptr::null(),
                iv.as_ptr(),
                -1,
            ) == 1
                && EVP_CipherUpdate(self.ctx.as_ptr(), unit.as_mut_ptr(), &mut written, unit.as_ptr(), len)
                    == 1
        };
        // Sectors are 512 or 4096 bytes, within XTS's 16-byte minimum and 2^20-block maximum.
        assert!(ok && written == len, "aws-lc AES-XTS failed on a {len}-byte data unit");
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from EVP_CIPHER_CTX_new and is freed exactly once; the free
        // cleanses the key schedule first.
        unsafe { EVP_CIPHER_CTX_free(self.ctx.as_ptr()) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

//! Allocation tuning for large CPU tensors.
//!
//! glibc's `malloc` serves every block above its mmap threshold (which grows to at most
//! 32 MiB) with a fresh `mmap` and hands it back to the OS on `free`. Every candle op returns
//! a new output buffer, so at training sizes each op then page-faults on every 4 KiB page it
//! writes and the kernel zeroes each page first: on the development machine a 32 MiB copy into
//! a fresh buffer took 3-4x as long as one into a recycled buffer. [`reuse_freed_memory`] raises
//! the thresholds so freed buffers are kept and reused. The `metal-candle` CLI and the CPU
//! benchmarks call it at start; a library never changes the process's allocator by itself.
//!
//! ```
//! // At the start of a program that runs large tensors on the CPU:
//! let applied = metal_candle::alloc::reuse_freed_memory();
//! # let _ = applied;
//! ```

/// Keeps freed large blocks in the heap for reuse instead of returning them to the OS.
/// Returns whether the setting was applied: `true` with glibc on Linux, `false` elsewhere
/// (other allocators have their own policies; nothing is changed).
pub fn reuse_freed_memory() -> bool {
    imp::apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    /// 1 GiB: blocks up to this size come from the heap, and the heap is trimmed only when
    /// this much is free at its top.
    const LIMIT: libc::c_int = 1 << 30;

    pub(super) fn apply() -> bool {
        // SAFETY: mallopt only changes malloc's tuning parameters; it is safe to call at any
        // time from any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, LIMIT) == 1
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn apply() -> bool {
        false
    }
}

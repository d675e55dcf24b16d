//! Allocation tuning: large CPU tensors, and freed GPU memory.
//!
//! glibc's `malloc` serves every block above its mmap threshold (which grows to at most
//! 32 MiB) with a fresh `mmap` and hands it back to the OS on `free`. Every candle op returns
//! a new output buffer, so at training sizes each op then page-faults on every 4 KiB page it
//! writes and the kernel zeroes each page first (the `copy` and `copy_fresh` rows of
//! `cargo bench -p metal-candle --bench ops_cpu` measure the difference). [`reuse_freed_memory`] raises
//! the thresholds so freed buffers are kept and reused. The `metal-candle` CLI and the CPU
//! benchmarks call it at start; a library never changes the process's allocator by itself.
//!
//! ```
//! // At the start of a program that runs large tensors on the CPU:
//! let applied = metal_candle::alloc::reuse_freed_memory();
//! # let _ = applied;
//! ```

/// Keeps device memory that dropped tensors free in CUDA's stream-ordered pool instead of
/// handing it back to the driver at every synchronisation (the pool's default), so a loop that
/// waits for a result every step (training, generation) does not map its buffers afresh each
/// time: what PyTorch's caching allocator does. Returns whether anything was changed: `false`
/// for devices other than CUDA. The CLI calls it when it opens a CUDA device.
///
/// ```
/// let applied = metal_candle::alloc::retain_freed_gpu_memory(&candle_core::Device::Cpu)?;
/// assert!(!applied);
/// # Ok::<(), metal_candle::Error>(())
/// ```
pub fn retain_freed_gpu_memory(device: &candle_core::Device) -> crate::Result<bool> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda_pool::retain(dev).map(|()| true),
        _ => Ok(false),
    }
}

#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::sys;

    pub(super) fn retain(dev: &candle_core::CudaDevice) -> crate::Result<()> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let fail = |what: &str, e: &dyn std::fmt::Debug| {
            crate::Error::Msg(format!(
                "cannot keep freed GPU memory pooled: {what}: {e:?}"
            ))
        };
        ctx.bind_to_thread().map_err(|e| fail("bind context", &e))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold: u64 = u64::MAX;
        // SAFETY: plain driver calls on the context bound above, with pointers to live locals.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
                .result()
                .map_err(|e| fail("default pool", &e))?;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()
            .map_err(|e| fail("release threshold", &e))?;
        }
        Ok(())
    }
}

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

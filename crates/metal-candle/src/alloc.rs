//! Allocation tuning: large CPU tensors, freed GPU memory, and the events of GPU buffers.
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

/// Stops cudarc from creating two CUDA events for every GPU buffer it allocates (and
/// destroying them when the buffer is freed) while the device runs a single stream, which is
/// how candle uses it: those events only synchronise buffers shared between streams, so with
/// one stream they are created and destroyed unused. Every candle op allocates its output, so
/// at batch-1 decoding, where each op is a few microseconds of GPU work, the four driver calls
/// per buffer are a visible part of the host time per token. Returns whether tracking was
/// switched off: `false` for devices other than CUDA and for a context already running several
/// streams. Call it right after opening the device; the CLI does.
///
/// A program that later creates more streams on the same device and shares tensors between
/// them must synchronise those itself (see cudarc's `CudaContext::disable_event_tracking`).
///
/// ```
/// let applied = metal_candle::alloc::skip_single_stream_events(&candle_core::Device::Cpu);
/// assert!(!applied);
/// ```
pub fn skip_single_stream_events(device: &candle_core::Device) -> bool {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => {
            let ctx = dev.cuda_stream().context().clone();
            if ctx.is_in_multi_stream_mode() {
                return false;
            }
            // SAFETY: with one stream nothing reads the events (cudarc only records and waits
            // on them in multi-stream mode), so no synchronisation is lost.
            unsafe { dev.disable_event_tracking() };
            true
        }
        _ => false,
    }
}

/// The most device memory held by live tensors at once since the last
/// [`reset_peak_gpu_memory`] (or since the device was opened), in bytes: the high-water mark
/// of CUDA's stream-ordered pool, which every candle allocation comes from. It counts memory
/// in use, not memory the pool keeps for reuse: what PyTorch's `max_memory_allocated` reports.
/// `None` for devices other than CUDA.
///
/// ```
/// let peak = metal_candle::alloc::peak_gpu_memory(&candle_core::Device::Cpu)?;
/// assert_eq!(peak, None);
/// # Ok::<(), metal_candle::Error>(())
/// ```
pub fn peak_gpu_memory(device: &candle_core::Device) -> crate::Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda_pool::used_high(dev, false).map(Some),
        _ => Ok(None),
    }
}

/// Starts a new measurement for [`peak_gpu_memory`] (the mark drops to what is in use now).
/// Does nothing for devices other than CUDA.
pub fn reset_peak_gpu_memory(device: &candle_core::Device) -> crate::Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => cuda_pool::used_high(dev, true).map(|_| ()),
        _ => Ok(()),
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

    /// The default pool's used-memory high-water mark, reset to the current use first when
    /// `reset` is set.
    pub(super) fn used_high(dev: &candle_core::CudaDevice, reset: bool) -> crate::Result<u64> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let fail = |what: &str, e: &dyn std::fmt::Debug| {
            crate::Error::Msg(format!("cannot read GPU memory use: {what}: {e:?}"))
        };
        ctx.bind_to_thread().map_err(|e| fail("bind context", &e))?;
        stream.synchronize().map_err(|e| fail("synchronize", &e))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        let mut value: u64 = 0;
        // SAFETY: plain driver calls on the context bound above, with pointers to live locals
        // (the attribute is a cuuint64_t; setting it accepts only 0, which resets the mark).
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
                .result()
                .map_err(|e| fail("default pool", &e))?;
            if reset {
                sys::cuMemPoolSetAttribute(pool, attr, (&mut value as *mut u64).cast())
                    .result()
                    .map_err(|e| fail("reset the high-water mark", &e))?;
            }
            sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast())
                .result()
                .map_err(|e| fail("high-water mark", &e))?;
        }
        Ok(value)
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

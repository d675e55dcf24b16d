//! A second CUDA stream per device, with a cuBLAS handle of its own, for the LoRA linear
//! layer's memory-bound passes that its big GEMM does not wait for.
//!
//! The backward through the merged weight runs four pieces: the pass over dy that gives G and
//! dB, dA = scale·xᵀ·G (cuBLAS, reading x), the merge W' = W + scale·Bᵀ·Aᵀ, and the dX GEMM on
//! W'. Only the GEMM needs the merge. On one stream the three memory passes run one after the
//! other before the GEMM; with G, dB and dA on this stream they run beside the merge and the
//! GEMM, which leaves memory bandwidth idle while it computes. Measured on an H100
//! (`bench/kernel-lab/sidelab.cu`, bf16, m 16384, in = out = 4096, r = 16): the backward over
//! its bare dX GEMM went from 1.205–1.216× to 1.151–1.157×; in the library, 1.135–1.139×
//! against 1.168–1.198× (`bench ops`, bf16 and f16, three alternated runs).
//!
//! The forward through the merged weight likewise computes T = scale·x·A, which only the
//! backward reads, on this stream beside the merge and the y GEMM.
//!
//! Ordering is by events, not by cudarc's per-buffer tracking (which candle's single-stream
//! use, and [`crate::alloc::skip_single_stream_events`], switch off): [`Fork::new`] makes the
//! side stream wait for everything queued on candle's stream so far, and [`Fork::join`] makes
//! candle's stream wait for everything queued on the side stream. Every buffer the side
//! stream touches must therefore be allocated before the fork (allocations are ordered on
//! candle's stream) and freed after the join.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::cublas::CudaBlas;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaStream};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::Result;

/// The side stream of one device and the cuBLAS handle that queues work on it.
pub(super) struct Side {
    pub(super) stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
}

/// The side stream of `dev`, created on first use and kept for the life of the process.
fn side(dev: &CudaDevice) -> Result<Arc<Side>> {
    static SIDES: OnceLock<Mutex<HashMap<DeviceId, Arc<Side>>>> = OnceLock::new();
    let mut sides = SIDES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        // The map holds only finished entries: a panic elsewhere cannot leave it half-written.
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(side) = sides.get(&dev.id()) {
        return Ok(side.clone());
    }
    let stream = dev.cuda_stream().context().new_stream().w()?;
    let blas = CudaBlas::new(stream.clone()).w()?;
    let side = Arc::new(Side { stream, blas });
    sides.insert(dev.id(), side.clone());
    Ok(side)
}

/// Work forked from candle's stream onto the device's side stream: queued there after
/// everything queued on candle's stream before [`Fork::new`], and waited for by candle's
/// stream from [`Fork::join`] on.
pub(super) struct Fork {
    main: Arc<CudaStream>,
    side: Arc<Side>,
}

impl Fork {
    pub(super) fn new(dev: &CudaDevice) -> Result<Self> {
        let main = dev.cuda_stream();
        let side = side(dev)?;
        let forked = main
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .w()?;
        side.stream.wait(&forked).w()?;
        Ok(Self { main, side })
    }

    /// The side stream and its cuBLAS handle.
    pub(super) fn side(&self) -> &Side {
        &self.side
    }

    /// Candle's stream waits, from here on, for all the work queued on the side stream.
    pub(super) fn join(self) -> Result<()> {
        let done = self
            .side
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .w()?;
        self.main.wait(&done).w()
    }
}

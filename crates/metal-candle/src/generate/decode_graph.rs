//! Decoding steps replayed from a CUDA graph: the whole step (every kernel and cuBLAS call of
//! every layer) is captured once and then launched with one driver call per token.
//!
//! At batch 1 a step of a 1B-parameter model is about 0.6 ms of GPU work but more than 200
//! kernel launches, each with candle's host-side cost (layout checks, an output allocation,
//! the launch itself): the host, not the GPU, set the pace. A graph removes that cost. What
//! makes the step capturable is [`Llama::forward_fixed_step`]: its token ids and positions
//! are read from device buffers ([`FixedStep`]) and its shapes never change, so the captured
//! step stays valid for every token until the cache must grow.

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::{DType, Device, Tensor};

use crate::model::{FixedStep, KvCache, Llama};
use crate::{Error, Result};

/// A captured decoding step for `batch` rows over a cache of fixed capacity.
pub(crate) struct DecodeGraph {
    graph: CudaGraph,
    step: FixedStep,
    /// (batch, vocab) f32: every replay writes the step's logits here.
    logits: Tensor,
    /// The cache buffers the graph writes into (see [`KvCache::buffer_ids`]).
    buffers: Vec<Option<(candle_core::TensorId, candle_core::TensorId)>>,
}

fn driver(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("CUDA graph {what}: {e}"))
}

impl DecodeGraph {
    /// Runs the step for `ids` (one per row) at `positions` eagerly, returning its logits
    /// (batch, vocab) f32, and captures the same step as a graph for the following tokens.
    /// `cache` must hold the earlier positions (a prefill) in buffers of the capacity the
    /// graph will keep; its length is not advanced.
    pub(crate) fn capture(
        model: &Llama,
        cache: &mut KvCache,
        ids: &[u32],
        positions: &[u32],
    ) -> Result<(Self, Tensor)> {
        let Device::Cuda(dev) = model.device() else {
            return Err(Error::Msg(
                "CUDA graphs need a model on a CUDA device".into(),
            ));
        };
        let vocab = model.config().vocab_size;
        let step = FixedStep::new(ids.len(), cache.capacity(), model.device())?;
        step.set(ids, positions, vocab)?;
        let logits = Tensor::zeros((ids.len(), vocab), DType::F32, model.device())?;
        // Candle uploads small kernel parameters (shapes and strides of strided operands)
        // from the host; capture cannot, so the warm-up step stores each upload on the device
        // and the captured step reuses it. The warm-up also loads every kernel module and
        // gives this token's logits.
        let _uploads = dev.enable_cuda_graph_htod_cache();
        let warm = model.forward_fixed_step(&step, cache)?;
        logits.slice_set(&warm, 0, 0)?;
        let stream = dev.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| driver("capture could not begin", e))?;
        // Every tensor the step makes is dropped inside the capture, so the graph frees what
        // it allocates; only `logits`, made before, outlives a replay.
        let captured = model
            .forward_fixed_step(&step, cache)
            .and_then(|out| Ok(logits.slice_set(&out, 0, 0)?));
        // Capture must end even when the step failed, or the stream stays unusable.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        captured?;
        let graph = graph
            .map_err(|e| driver("capture failed", e))?
            .ok_or_else(|| driver("capture", "the captured graph is empty"))?;
        graph.upload().map_err(|e| driver("upload failed", e))?;
        let buffers = cache.buffer_ids();
        Ok((
            Self {
                graph,
                step,
                logits,
                buffers,
            },
            warm,
        ))
    }

    /// Whether this graph can run the next step of `batch` rows at `position` against
    /// `cache` as it is now.
    pub(crate) fn fits(&self, cache: &KvCache, batch: usize, position: usize) -> bool {
        self.step.batch() == batch
            && position < self.step.capacity()
            && cache.buffer_ids() == self.buffers
    }

    /// Logits (batch, vocab) f32 of the step feeding `ids` at `positions`.
    pub(crate) fn replay(&self, ids: &[u32], positions: &[u32], vocab: usize) -> Result<Tensor> {
        self.step.set(ids, positions, vocab)?;
        self.graph
            .launch()
            .map_err(|e| driver("launch failed", e))?;
        // A copy: the next replay overwrites the graph's own buffer.
        Ok(self.logits.copy()?)
    }
}

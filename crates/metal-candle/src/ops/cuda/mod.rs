//! CUDA kernels for the fused ops (feature `cuda`), picked automatically by the functions of
//! [`crate::ops`] on a CUDA device for f32, bf16 and f16 ([`supports`]); f64 takes candle's
//! composed path.
//!
//! - softmax (and the cross-entropy, a softmax against a target), RMSNorm, LayerNorm (`kernels/*.cu`, compiled to PTX by `build.rs`): a block per
//!   row, 16-byte vector loads where the row length and pointers allow, f32 arithmetic, one
//!   read and one write of the data. The backward passes recompute the row statistics from x
//!   (except LayerNorm's for 16-bit rows, which the forward saves when gradients are tracked:
//!   two sums per row instead of four) and reduce the weight gradients through per-block
//!   partial rows and a second small kernel (no atomics).
//! - LoRA: small problems (the seed's shapes) take one launch for the whole low-rank term
//!   (`lora_vec` for 16-byte-pack layouts, else `lora_small`). Otherwise GEMMs through candle's
//!   cuBLAS handle, and for bf16 and f16 on sm_80 and later the thin products on tensor-core
//!   kernels of our own (`kernels/lora_tc.cu`: `T·B` and `G·Aᵀ` written at the memory's write
//!   rate, `G = dy·Bᵀ` and `dB` from one read of dy). `lora_linear` writes the low-rank term
//!   `(scale·x·A)·B` plus the bias into the output and then
//!   runs the base GEMM `x·Wᵀ` with `beta = 1` into that same output: no extra (tokens × out)
//!   tensor and no separate add or scale pass. The backward pass takes `scale·x·A` from the
//!   forward pass where it computed one (else computes it again) and never computes a gradient
//!   for W. Where its dx GEMM runs on the merged weight `W + scale·Bᵀ·Aᵀ`, the passes that
//!   give dA and dB run beside the merge and that GEMM on a second stream (`side`).
//! - SwiGLU and the rotary embedding (`kernels/elementwise.cu`): one grid-stride loop over
//!   16-byte packs (single elements where a length or pointer is not aligned), f32 arithmetic.
//!   The SwiGLU backward pass writes both gradients in one kernel; the rope backward pass is the
//!   forward kernel rotating the other way (a sign flag, no negated copy of sin).
//! - frozen linear `x·Wᵀ + bias` (the output head, projections without an adapter): one cuBLAS
//!   GEMM into an output that already holds the bias (beta = 1); its backward is `dy·W` only.
//! - Causal attention (training, prefill): batched cuBLAS GEMMs (scores in f32) around a
//!   masked-softmax kernel (`kernels/attention.cu`), with grouped K/V heads read in place; the
//!   scores and probabilities live only inside one call, and the backward pass recomputes them.
//! - Decoding attention (`kernels/attention.cu`): one query per head against the cached keys
//!   and values in one launch (scores, softmax and the weighted sum in shared memory), reading
//!   K and V through their strides.
//! - AdamW (`kernels/optim.cu`): the moments and the parameter updated in place, one pass each
//!   per parameter.
//!
//! Non-contiguous inputs are copied into a contiguous buffer once before the kernel runs.
//!
//! These functions are called by the ops' `CustomOp` implementations; users call
//! [`crate::ops::softmax_last_dim`] and friends, not these.

mod attention;
mod causal_attention;
pub mod check;
mod common;
mod gemm;
mod linear;
mod lora;
mod lora_one_launch;
mod lora_tc;
mod norm;
mod optim;
mod rope;
mod side;
mod softmax;
mod swiglu;

pub use attention::decode_attention;
pub use causal_attention::{causal_attention_backward, causal_attention_forward};
pub use common::set_poison_outputs;
pub use linear::frozen_linear_forward;
pub use lora::{
    lora_backward, lora_delta_forward, lora_linear_backward, lora_linear_forward, lora_projections,
    LoraProjections,
};
pub use norm::{
    add_rms_norm_forward, layer_norm_backward, layer_norm_forward, layer_norm_forward_with_stats,
    rms_norm_backward, rms_norm_forward, LayerNormStats,
};
pub use optim::{adamw_moments, adamw_param};
pub use rope::rope_forward;
pub use softmax::{
    cross_entropy_backward, cross_entropy_forward, softmax_backward, softmax_forward,
};
pub use swiglu::{swiglu_backward, swiglu_forward};

use candle_core::DType;

/// Whether the CUDA kernels handle `dtype` (f32, bf16, f16).
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

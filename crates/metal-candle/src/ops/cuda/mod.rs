//! CUDA kernels for the fused ops (feature `cuda`), picked automatically by the functions of
//! [`crate::ops`] on a CUDA device for f32, bf16 and f16 ([`supports`]); f64 takes candle's
//! composed path.
//!
//! - softmax (and the cross-entropy, a softmax against a target), RMSNorm, LayerNorm (`kernels/*.cu`, compiled to PTX by `build.rs`): a block per
//!   row, 16-byte vector loads where the row length and pointers allow, f32 arithmetic, one
//!   read and one write of the data. The backward passes recompute the row statistics from x
//!   and reduce the weight gradients through per-block partial rows and a second small
//!   kernel (no atomics).
//! - LoRA: GEMMs through candle's cuBLAS handle. `lora_linear` writes the low-rank term
//!   `(scale·x·A)·B` (plus the bias, carried as an extra row of B) into the output and then
//!   runs the base GEMM `x·Wᵀ` with `beta = 1` into that same output: no extra (tokens × out)
//!   tensor and no separate add or scale pass. The backward pass recomputes `x·A` (nothing is
//!   saved by the forward pass) and never computes a gradient for W.
//!
//! Non-contiguous inputs are copied into a contiguous buffer once before the kernel runs.
//!
//! These functions are called by the ops' `CustomOp` implementations; users call
//! [`crate::ops::softmax_last_dim`] and friends, not these.

pub mod check;
mod common;
mod gemm;
mod lora;
mod norm;
mod softmax;

pub use common::set_poison_outputs;
pub use lora::{lora_backward, lora_delta_forward, lora_linear_backward, lora_linear_forward};
pub use norm::{layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward};
pub use softmax::{
    cross_entropy_backward, cross_entropy_forward, softmax_backward, softmax_forward,
};

use candle_core::DType;

/// Whether the CUDA kernels handle `dtype` (f32, bf16, f16).
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

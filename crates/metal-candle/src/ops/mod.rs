//! Fused ops with forward and backward kernels, wired into candle's autograd.
//!
//! | op | function | differentiable inputs |
//! |---|---|---|
//! | softmax over the last dim | [`softmax_last_dim`] | x |
//! | causal attention `softmax(scale·q·kᵀ + mask)·v` (grouped kv heads, packed rows) | [`causal_attention`] | q, k, v |
//! | attention of one query per head (decoding) | [`single_query_attention`] | q, k, v (fused on CUDA for inference; composed ops when a gradient is needed) |
//! | cross-entropy against class indices | [`cross_entropy`] | logits |
//! | RMSNorm | [`rms_norm`] | x, weight |
//! | residual add + RMSNorm `(x + r, rms_norm(x + r))` | [`add_rms_norm`] | x, r, weight (fused on CUDA for inference; two ops when a gradient is needed) |
//! | LayerNorm | [`layer_norm`] | x, weight, bias |
//! | LoRA term `scale·(x·A)·B` | [`lora_delta`] | x, A, B |
//! | LoRA linear `x·Wᵀ + bias + scale·(x·A)·B` | [`lora_linear`] | x, A, B (W, bias: see the fn) |
//! | frozen linear `x·Wᵀ + bias` | [`frozen_linear`] | x (W and bias are constants) |
//! | rotary embedding ("rotate half") | [`rope`] | x (cos and sin are constants) |
//! | SwiGLU `silu(gate)·up` | [`swiglu`] | gate, up |
//!
//! Every function accepts any number of leading batch dims and works on the last one, except
//! [`rope`], which takes (batch, heads, seq, head_dim), the attention ops, which take
//! (batch, heads, seq, head_dim) queries and keys, and the element-wise [`swiglu`], which
//! takes any shape. Which implementation runs is decided up front from the device and dtype
//! ([`kernel_path`]): the fused kernels on the CPU (f32, f64, bf16, f16) and, with the `cuda`
//! feature, on NVIDIA GPUs; candle's composed ops ([`reference`]) everywhere else (Metal). A
//! kernel that fails is an error, never a silent fallback.
//!
//! Non-contiguous inputs are accepted: a kernel copies a strided input into a contiguous
//! buffer once before its single pass.

mod add_norm;
mod attention;
mod causal_attention;
pub mod cpu;
mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
mod linear;
mod lora;
mod norm;
pub mod reference;
mod rope;
mod softmax;
mod swiglu;

use candle_core::{DType, Device};

pub use add_norm::add_rms_norm;
pub use attention::single_query_attention;
pub use causal_attention::causal_attention;
pub use cross_entropy::cross_entropy;
pub use linear::frozen_linear;
pub use lora::{lora_delta, lora_linear, FusedLoRAOp};
pub use norm::{layer_norm, rms_norm};
pub use rope::rope;
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;

/// Which implementation an op runs on a given device and dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// This crate's fused kernels (forward and backward).
    Fused,
    /// candle's composed ops ([`reference`]); autograd through candle.
    Reference,
}

/// The implementation the ops pick for `device` and `dtype`.
///
/// ```
/// use candle_core::{DType, Device};
/// use metal_candle::ops::{kernel_path, KernelPath};
/// assert_eq!(kernel_path(&Device::Cpu, DType::BF16), KernelPath::Fused);
/// ```
pub fn kernel_path(device: &Device, dtype: DType) -> KernelPath {
    let float = matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16);
    match device {
        Device::Cpu if float => KernelPath::Fused,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if cuda::supports(dtype) => KernelPath::Fused,
        _ => KernelPath::Reference,
    }
}

pub(crate) fn unsupported_dtype(op: &'static str, dtype: DType) -> candle_core::Error {
    crate::Error::dtype(
        op,
        format!("{dtype:?} is not supported; use f32, f64, bf16 or f16"),
    )
    .into_candle()
}

/// Checks that every tensor shares the dtype and device of the first, and that the dtype is a
/// float type the ops support.
pub(crate) fn check_same(
    op: &'static str,
    tensors: &[(&str, &candle_core::Tensor)],
) -> crate::Result<()> {
    let (first_name, first) = tensors[0];
    if !matches!(
        first.dtype(),
        DType::F32 | DType::F64 | DType::BF16 | DType::F16
    ) {
        return Err(crate::Error::dtype(
            op,
            format!(
                "{first_name} is {:?}; the op supports f32, f64, bf16 and f16",
                first.dtype()
            ),
        ));
    }
    for &(name, t) in &tensors[1..] {
        if t.dtype() != first.dtype() {
            return Err(crate::Error::dtype(
                op,
                format!(
                    "{name} is {:?} but {first_name} is {:?}; convert with .to_dtype()",
                    t.dtype(),
                    first.dtype()
                ),
            ));
        }
        if !t.device().same_device(first.device()) {
            return Err(crate::Error::Msg(format!(
                "{op}: {name} is on {:?} but {first_name} is on {:?}",
                t.device().location(),
                first.device().location()
            )));
        }
    }
    Ok(())
}

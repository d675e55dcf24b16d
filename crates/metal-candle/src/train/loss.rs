//! Masked next-token cross-entropy.

use candle_core::{DType, Tensor, D};

use crate::Result;

/// The summed (not averaged) cross-entropy of `logits` (batch, seq, vocab) against `targets`
/// (batch, seq) u32, weighted by `mask` (batch, seq) f32. Computed in f32 for f32/bf16/f16
/// logits (f64 logits stay f64, for gradient checks). Summing lets gradient accumulation divide by the token count of the whole step, so a
/// step of several micro-batches equals one large batch.
pub fn masked_cross_entropy_sum(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let dtype = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logits = logits.to_dtype(dtype)?.reshape((b * t, v))?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs
        .gather(&targets.reshape((b * t, 1))?, 1)?
        .squeeze(1)?;
    Ok((picked * mask.reshape(b * t)?.to_dtype(dtype)?)?
        .sum_all()?
        .neg()?)
}

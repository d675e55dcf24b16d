//! Masked next-token cross-entropy.

use candle_core::Tensor;

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
    let (b, t, _) = logits.dims3()?;
    // Fused (ops::cross_entropy): the logits are read once each way and no (tokens × vocab)
    // f32 copy of them is made, which for a language model's vocabulary is the largest tensor
    // of the step.
    let per_token = crate::ops::cross_entropy(logits, &targets.reshape((b, t))?)?;
    let mask = mask.to_dtype(per_token.dtype())?;
    Ok((per_token * mask)?.sum_all()?)
}

//! Turning per-token hidden states into one vector per sentence.

use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

/// How token vectors become a sentence vector (sentence-transformers' `1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean of the unmasked token vectors.
    Mean,
    /// The first token's vector (`[CLS]`).
    Cls,
}

impl Pooling {
    /// Pools `hidden` (batch, seq, dim) under `mask` (batch, seq; 1 = token, 0 = padding) into
    /// (batch, dim), in f32.
    pub fn apply(self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, _) = hidden.dims3()?;
        if mask.dims() != [b, t] {
            return Err(Error::shape(
                "Pooling::apply",
                format!(
                    "mask is {:?} but hidden states are {:?}; expected [{b}, {t}]",
                    mask.dims(),
                    hidden.dims()
                ),
            ));
        }
        let hidden = hidden.to_dtype(DType::F32)?;
        match self {
            Pooling::Cls => Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?),
            Pooling::Mean => mean_pool(&hidden, mask),
        }
    }
}

/// Mean over the sequence of the tokens where `mask` is 1 (sentence-transformers' formula:
/// the count is clamped at 1e-9, so an all-padding row gives zeros, not NaN).
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(hidden.dtype())?;
    let summed = hidden.broadcast_mul(&mask.unsqueeze(D::Minus1)?)?.sum(1)?;
    let counts = mask.sum_keepdim(1)?.clamp(1e-9, f64::INFINITY)?;
    Ok(summed.broadcast_div(&counts)?)
}

/// Divides each row by its L2 norm (at least 1e-12, as `torch.nn.functional.normalize`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}

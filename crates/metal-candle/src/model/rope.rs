//! Rotary position embeddings (the "rotate half" layout of Hugging Face checkpoints).

use std::f64::consts::PI;

use candle_core::{DType, Device, Tensor, D};

use super::config::{LlamaConfig, RopeScaling};
use crate::Result;

/// The RoPE inverse frequencies of a model; cos/sin tables are computed per batch from the
/// position ids, so padded, packed and cached batches all get the right angles.
#[derive(Debug, Clone)]
pub struct Rope {
    /// (head_dim / 2,) f32.
    inv_freq: Tensor,
}

/// The cos and sin of every (row, position, frequency) of a batch, each (batch, seq, head_dim/2).
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The frequencies of `config` (theta, head dim and scaling) on `device`.
    pub fn new(config: &LlamaConfig, device: &Device) -> Result<Self> {
        let inv_freq = inverse_frequencies(config);
        let inv_freq: Vec<f32> = inv_freq.into_iter().map(|f| f as f32).collect();
        Ok(Self {
            inv_freq: Tensor::new(inv_freq, device)?,
        })
    }

    /// Tables for `positions` (batch, seq) of integer positions, in `dtype`.
    pub fn tables(&self, positions: &Tensor, dtype: DType) -> Result<RopeTables> {
        let (b, s) = positions.dims2()?;
        let half = self.inv_freq.dim(0)?;
        // Angles in f32 as Hugging Face computes them, then cast.
        let pos = positions.to_dtype(DType::F32)?.reshape((b, s, 1))?;
        let angles = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, half))?)?;
        Ok(RopeTables {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }
}

impl RopeTables {
    /// Rotates `x` (batch, heads, seq, head_dim).
    ///
    /// candle's fused rope kernel has no backward, so when `x` takes part in a gradient
    /// computation the same maths runs as differentiable candle ops instead.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            self.apply_composed(x)
        } else {
            Ok(candle_nn::rotary_emb::rope(
                &x.contiguous()?,
                &self.cos,
                &self.sin,
            )?)
        }
    }

    /// `x·cos + rotate_half(x)·sin`, built from differentiable ops.
    pub fn apply_composed(&self, x: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let cos = Tensor::cat(&[&self.cos, &self.cos], D::Minus1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[&self.sin, &self.sin], D::Minus1)?.unsqueeze(1)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
    }
}

/// `1 / theta^(2i/d)`, rescaled as the config asks.
fn inverse_frequencies(config: &LlamaConfig) -> Vec<f64> {
    let d = config.head_dim;
    let base = (0..d)
        .step_by(2)
        .map(|i| 1.0 / config.rope_theta.powf(i as f64 / d as f64));
    match &config.rope_scaling {
        RopeScaling::None => base.collect(),
        RopeScaling::Linear { factor } => base.map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let original = *original_max_position_embeddings as f64;
            let low_freq_wavelen = original / low_freq_factor;
            let high_freq_wavelen = original / high_freq_factor;
            base.map(|freq| {
                let wavelen = 2.0 * PI / freq;
                if wavelen < high_freq_wavelen {
                    freq
                } else if wavelen > low_freq_wavelen {
                    freq / factor
                } else {
                    let smooth = (original / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * freq / factor + smooth * freq
                }
            })
            .collect()
        }
    }
}

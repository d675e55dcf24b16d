//! Rotary position embeddings (the "rotate half" layout of Hugging Face checkpoints).

use std::f64::consts::PI;

use candle_core::{DType, Device, Tensor};

use super::config::{LlamaConfig, RopeScaling};
use crate::ops::{self, KernelPath};
use crate::Result;

/// The RoPE inverse frequencies of a model; cos/sin tables are computed per batch from the
/// position ids, so padded, packed and cached batches all get the right angles.
#[derive(Debug, Clone)]
pub struct Rope {
    /// (head_dim / 2,) f32.
    inv_freq: Tensor,
    /// Attention's `1/√head_dim`, folded into the tables that rotate the queries.
    query_scale: f64,
}

/// The cos and sin of every (row, position, frequency) of a batch, each (batch, seq, head_dim/2);
/// the queries' tables are also multiplied by `1/√head_dim`, so that rotating the queries
/// applies attention's scale too: no pass of its own over the (queries × keys) scores.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    query_cos: Tensor,
    query_sin: Tensor,
}

impl Rope {
    /// The frequencies of `config` (theta, head dim and scaling) on `device`.
    pub fn new(config: &LlamaConfig, device: &Device) -> Result<Self> {
        let inv_freq = inverse_frequencies(config);
        let inv_freq: Vec<f32> = inv_freq.into_iter().map(|f| f as f32).collect();
        Ok(Self {
            inv_freq: Tensor::new(inv_freq, device)?,
            query_scale: 1.0 / (config.head_dim as f64).sqrt(),
        })
    }

    /// Tables for `positions` (batch, seq) of integer positions, in `dtype`.
    pub fn tables(&self, positions: &Tensor, dtype: DType) -> Result<RopeTables> {
        let (b, s) = positions.dims2()?;
        let half = self.inv_freq.dim(0)?;
        // Angles in f32 as Hugging Face computes them, then cast.
        let pos = positions.to_dtype(DType::F32)?.reshape((b, s, 1))?;
        let angles = pos.broadcast_mul(&self.inv_freq.reshape((1, 1, half))?)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        Ok(RopeTables {
            query_cos: (&cos * self.query_scale)?.to_dtype(dtype)?,
            query_sin: (&sin * self.query_scale)?.to_dtype(dtype)?,
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
        })
    }
}

impl RopeTables {
    /// Rotates `x` (batch, heads, seq, head_dim), which may be a strided view.
    ///
    /// The fused kernel ([`ops::rope`]) serves training and inference alike. Where this crate
    /// has no fused kernel for the device and dtype, inference takes candle-nn's rope kernel and
    /// training the differentiable composition (candle-nn's kernel has no backward pass).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        rotate(x, &self.cos, &self.sin)
    }

    /// Rotates the queries `x` (batch, heads, seq, head_dim) and multiplies them by
    /// `1/√head_dim`, attention's scale (the tables carry it: no extra pass).
    pub fn apply_query(&self, x: &Tensor) -> Result<Tensor> {
        rotate(x, &self.query_cos, &self.query_sin)
    }

    /// `x·cos + rotate_half(x)·sin` composed from differentiable candle ops
    /// ([`ops::reference::rope`]), the oracle for [`RopeTables::apply`].
    pub fn apply_composed(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::reference::rope(x, &self.cos, &self.sin)?)
    }
}

/// `x` rotated by the angles whose cos and sin (possibly scaled) are given.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if ops::kernel_path(x.device(), x.dtype()) == KernelPath::Reference && !x.track_op() {
        return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
    }
    ops::rope(x, cos, sin)
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

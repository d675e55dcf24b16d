//! Grouped-query causal self-attention with RoPE and an optional KV cache.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::fused::FusedProjection;
use super::layout::AttentionMask;
use super::linear::load_linear;
use super::rope::RopeTables;
use super::{KvCache, LlamaConfig};
use crate::lora::LoraLinear;
use crate::{ops, Result};

/// Self-attention of one layer; q, k, v and o are [`LoraLinear`]s.
#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) q_proj: LoraLinear,
    pub(crate) k_proj: LoraLinear,
    pub(crate) v_proj: LoraLinear,
    pub(crate) o_proj: LoraLinear,
    /// q, k and v stacked, while none of them has an adapter.
    qkv: Option<FusedProjection>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub(crate) fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        let (h, d) = (config.hidden_size, config.head_dim);
        let (nh, nkv) = (config.num_attention_heads, config.num_key_value_heads);
        let mut attention = Self {
            q_proj: load_linear(&vb.pp("q_proj"), h, nh * d, config.qkv_bias)?,
            k_proj: load_linear(&vb.pp("k_proj"), h, nkv * d, config.qkv_bias)?,
            v_proj: load_linear(&vb.pp("v_proj"), h, nkv * d, config.qkv_bias)?,
            o_proj: load_linear(&vb.pp("o_proj"), nh * d, h, config.o_bias)?,
            qkv: None,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        };
        attention.fuse_projections()?;
        Ok(attention)
    }

    /// Stacks q, k and v into one GEMM (see [`FusedProjection`]) when none has an adapter.
    pub(crate) fn fuse_projections(&mut self) -> Result<()> {
        self.qkv =
            FusedProjection::fuse(&mut [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj])?;
        Ok(())
    }

    /// q, k and v of `x`: one GEMM while they are fused, else one each.
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        if let Some(fused) = &self.qkv {
            if let Some(mut out) = fused.forward(x, &parts)? {
                let v = out.pop().expect("three parts");
                let k = out.pop().expect("three parts");
                let q = out.pop().expect("three parts");
                return Ok((q, k, v));
            }
        }
        Ok((
            self.q_proj.forward(x)?,
            self.k_proj.forward(x)?,
            self.v_proj.forward(x)?,
        ))
    }

    /// `x` (batch, seq, hidden) → (batch, seq, hidden).
    ///
    /// `mask` says which keys each query sees; `cache` (with this layer's index) receives the
    /// new keys and values.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &AttentionMask,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // (batch, heads, seq, head_dim) views; the rope kernel reads them strided and writes
        // contiguous rotations, so only v is copied.
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, s, n, d))?.transpose(1, 2)?)
        };
        let (q, k, v) = self.project(x)?;
        // The query tables carry attention's 1/√d (see RopeTables): the scores need no scaling.
        let q = rope.apply_query(&heads(q, nh)?)?;
        let k = rope.apply(&heads(k, nkv)?)?;
        let v = heads(v, nkv)?.contiguous()?;
        let (k, v) = match (cache, mask) {
            (Some((cache, layer)), AttentionMask::DeviceSlots { index, .. }) => {
                cache.write_at(layer, index, &k, &v)?
            }
            (Some((cache, layer)), _) => cache.append(layer, k, v)?,
            (None, AttentionMask::DeviceSlots { .. }) => {
                return Err(crate::Error::shape(
                    "Attention::forward",
                    "a step into device-held cache slots needs a KV cache",
                ))
            }
            (None, _) => (k, v),
        };
        let y = match mask {
            // Decoding: one query per head sees every cached key.
            AttentionMask::Causal { first_key: None } if s == 1 => {
                ops::single_query_attention(&q, &k, &v)?
            }
            AttentionMask::Causal { first_key } => {
                ops::causal_attention(&q, &k, &v, 1.0, first_key.as_ref())?
            }
            AttentionMask::Bias(bias) | AttentionMask::DeviceSlots { bias, .. } => {
                biased_attention(&q, &k, &v, bias)?
            }
        };
        let y = y.transpose(1, 2)?.reshape((b, s, nh * d))?;
        Ok(self.o_proj.forward(&y)?)
    }
}

/// `softmax(q·kᵀ + bias)·v` composed from candle ops, for masks the fused op does not
/// express (padded rows): `q` (b, heads, s, d), `k` and `v` (b, kv_heads, t, d), `bias`
/// (b or 1, 1, s, t). Returns (b, heads, s, d).
fn biased_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, nh, s, d) = q.dims4()?;
    let (_, nkv, t, _) = k.dims4()?;
    // Grouped-query attention without copying K/V: the `rep` query heads that share a KV
    // head are stacked along the sequence axis of that head.
    let rep = nh / nkv;
    let q = q.reshape((b, nkv, rep * s, d))?;
    let bias = bias.unsqueeze(2)?; // (b|1, 1, 1, s, t) broadcasts over kv heads and rep
    let scores = q
        .matmul(&k.t()?)?
        .reshape((b, nkv, rep, s, t))?
        .broadcast_add(&bias)?
        .reshape((b, nkv, rep * s, t))?;
    let probs = ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(v)?.reshape((b, nh, s, d))?)
}

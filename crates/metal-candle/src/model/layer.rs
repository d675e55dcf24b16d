//! One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention::Attention;
use super::layout::AttentionMask;
use super::mlp::Mlp;
use super::rope::RopeTables;
use super::{KvCache, LlamaConfig};
use crate::{ops, Result};

/// `x + attn(norm(x))`, then `x + mlp(norm(x))` (the last add fused into the next norm).
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub(crate) self_attn: Attention,
    pub(crate) mlp: Mlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    eps: f64,
}

impl DecoderLayer {
    pub(crate) fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), config)?,
            mlp: Mlp::load(vb.pp("mlp"), config)?,
            input_layernorm: vb.pp("input_layernorm").get(h, "weight")?,
            post_attention_layernorm: vb.pp("post_attention_layernorm").get(h, "weight")?,
            eps: config.rms_norm_eps,
        })
    }

    /// Stacks the projections that share an input (see `FusedProjection`) where no adapter
    /// is attached.
    pub(crate) fn fuse_projections(&mut self) -> Result<()> {
        self.self_attn.fuse_projections()?;
        self.mlp.fuse_projections()
    }

    pub(crate) fn input_layernorm(&self) -> &Tensor {
        &self.input_layernorm
    }

    pub(crate) fn post_attention_layernorm(&self) -> &Tensor {
        &self.post_attention_layernorm
    }

    /// One layer on the residual stream `x` plus `pending`, the previous layer's MLP output
    /// not yet added to it (`None` for the first layer). Returns the stream after attention
    /// and this layer's MLP output: each residual add runs fused with the norm that reads its
    /// result ([`ops::add_rms_norm`]), so the last add is left to the next layer or the final
    /// norm.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
        rope: &RopeTables,
        mask: &AttentionMask,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<(Tensor, Tensor)> {
        let (x, normed) = match pending {
            Some(delta) => ops::add_rms_norm(x, delta, &self.input_layernorm, self.eps)?,
            None => (
                x.clone(),
                ops::rms_norm(x, &self.input_layernorm, self.eps)?,
            ),
        };
        let attn = self.self_attn.forward(&normed, rope, mask, cache)?;
        let (x, normed) = ops::add_rms_norm(&x, &attn, &self.post_attention_layernorm, self.eps)?;
        let mlp = self.mlp.forward(&normed)?;
        Ok((x, mlp))
    }
}

//! One decoder layer: pre-norm attention and pre-norm MLP, each with a residual.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention::Attention;
use super::mlp::Mlp;
use super::rope::RopeTables;
use super::{KvCache, LlamaConfig};
use crate::{ops, Result};

/// `x + attn(norm(x))`, then `x + mlp(norm(x))`.
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

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        bias: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let attn = self.self_attn.forward(
            &ops::rms_norm(x, &self.input_layernorm, self.eps)?,
            rope,
            bias,
            cache,
        )?;
        let x = (x + attn)?;
        let mlp = self.mlp.forward(&ops::rms_norm(
            &x,
            &self.post_attention_layernorm,
            self.eps,
        )?)?;
        Ok((x + mlp)?)
    }
}

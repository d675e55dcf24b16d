//! The gated MLP of a llama layer: `down(silu(gate(x)) · up(x))`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::linear::load_linear;
use super::LlamaConfig;
use crate::lora::LoraLinear;
use crate::Result;

/// SwiGLU feed-forward block; each projection is a [`LoraLinear`].
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate_proj: LoraLinear,
    pub(crate) up_proj: LoraLinear,
    pub(crate) down_proj: LoraLinear,
}

impl Mlp {
    pub(crate) fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        let (h, i, bias) = (
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
        );
        Ok(Self {
            gate_proj: load_linear(&vb.pp("gate_proj"), h, i, bias)?,
            up_proj: load_linear(&vb.pp("up_proj"), h, i, bias)?,
            down_proj: load_linear(&vb.pp("down_proj"), i, h, bias)?,
        })
    }

    /// `x` (..., hidden) → (..., hidden).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = (self.gate_proj.forward(x)?.silu()? * self.up_proj.forward(x)?)?;
        Ok(self.down_proj.forward(&gated)?)
    }
}

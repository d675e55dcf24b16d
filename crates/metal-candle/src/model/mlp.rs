//! The gated MLP of a llama layer: `down(silu(gate(x)) · up(x))`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::fused::FusedProjection;
use super::linear::load_linear;
use super::LlamaConfig;
use crate::lora::LoraLinear;
use crate::{ops, Result};

/// SwiGLU feed-forward block; each projection is a [`LoraLinear`].
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate_proj: LoraLinear,
    pub(crate) up_proj: LoraLinear,
    pub(crate) down_proj: LoraLinear,
    /// gate and up stacked, while neither has an adapter.
    gate_up: Option<FusedProjection>,
}

impl Mlp {
    pub(crate) fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        let (h, i, bias) = (
            config.hidden_size,
            config.intermediate_size,
            config.mlp_bias,
        );
        let mut mlp = Self {
            gate_proj: load_linear(&vb.pp("gate_proj"), h, i, bias)?,
            up_proj: load_linear(&vb.pp("up_proj"), h, i, bias)?,
            down_proj: load_linear(&vb.pp("down_proj"), i, h, bias)?,
            gate_up: None,
        };
        mlp.fuse_projections()?;
        Ok(mlp)
    }

    /// Stacks gate and up into one GEMM (see [`FusedProjection`]) when neither has an adapter.
    pub(crate) fn fuse_projections(&mut self) -> Result<()> {
        self.gate_up = FusedProjection::fuse(&mut [&mut self.gate_proj, &mut self.up_proj])?;
        Ok(())
    }

    /// `x` (..., hidden) → (..., hidden).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Fused: one pass forward and one backward instead of silu, mul and their gradients.
        let parts = [&self.gate_proj, &self.up_proj];
        let (gate, up) = match &self.gate_up {
            Some(fused) => match fused.forward(x, &parts)? {
                Some(mut out) => {
                    let up = out.pop().expect("two parts");
                    (out.pop().expect("two parts"), up)
                }
                None => (self.gate_proj.forward(x)?, self.up_proj.forward(x)?),
            },
            None => (self.gate_proj.forward(x)?, self.up_proj.forward(x)?),
        };
        let gated = ops::swiglu(&gate, &up)?;
        Ok(self.down_proj.forward(&gated)?)
    }
}

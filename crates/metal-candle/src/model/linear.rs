//! Loading a projection of a checkpoint as a [`LoraLinear`].

use candle_nn::VarBuilder;

use crate::lora::LoraLinear;
use crate::Result;

/// The projection `vb` points at: `weight` (out, in) and, when `bias` is set, `bias` (out).
pub(crate) fn load_linear(
    vb: &VarBuilder,
    in_features: usize,
    out_features: usize,
    bias: bool,
) -> Result<LoraLinear> {
    let weight = vb.get((out_features, in_features), "weight")?;
    let bias = if bias {
        Some(vb.get(out_features, "bias")?)
    } else {
        None
    };
    LoraLinear::new(weight, bias)
}

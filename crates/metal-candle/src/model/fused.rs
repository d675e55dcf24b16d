//! Projections that read the same input (q, k and v; gate and up) run as one GEMM.
//!
//! Decoding one token is bound by the host's cost per kernel launch, not by the GPU, so three
//! GEMMs of one row each cost about three times one GEMM of the three stacked weights. The
//! stacked weight is built once; each projection's [`LoraLinear`] then holds a row range of it
//! (a view, no copy), so nothing is duplicated. The fused product is used only while every
//! part is exactly that view with no adapter: attaching an adapter or replacing a weight
//! (merging) makes the layer run its projections one by one until it is fused again.

use candle_core::{Tensor, TensorId};

use crate::lora::LoraLinear;
use crate::{ops, Result};

/// The stacked weight (Σ out, in), the stacked bias, and the views its parts were given.
#[derive(Debug, Clone)]
pub(crate) struct FusedProjection {
    weight: Tensor,
    bias: Option<Tensor>,
    /// For each part: the id of the weight view it was given, and its output width.
    parts: Vec<(TensorId, usize)>,
}

impl FusedProjection {
    /// Stacks the weights of `parts` (which share their input size) and rebuilds each part
    /// on a view of the stack. `None` when a part has an adapter or only some have a bias.
    pub(crate) fn fuse(parts: &mut [&mut LoraLinear]) -> Result<Option<Self>> {
        if parts.iter().any(|p| p.adapter().is_some()) {
            return Ok(None);
        }
        let with_bias = parts.iter().filter(|p| p.bias().is_some()).count();
        if with_bias != 0 && with_bias != parts.len() {
            return Ok(None);
        }
        let weights: Vec<&Tensor> = parts.iter().map(|p| p.weight()).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if with_bias == 0 {
            None
        } else {
            let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias()).collect();
            Some(Tensor::cat(&biases, 0)?)
        };
        let mut ids = Vec::with_capacity(parts.len());
        let mut start = 0;
        for part in parts.iter_mut() {
            let width = part.out_features();
            let w = weight.narrow(0, start, width)?;
            let b = bias
                .as_ref()
                .map(|b| b.narrow(0, start, width))
                .transpose()?;
            ids.push((w.id(), width));
            **part = LoraLinear::new(w, b)?;
            start += width;
        }
        Ok(Some(Self {
            weight,
            bias,
            parts: ids,
        }))
    }

    /// The outputs of `parts` from one GEMM, split along the last dim; `None` when a part is no
    /// longer the plain view it was given (the caller then runs them one by one).
    pub(crate) fn forward(&self, x: &Tensor, parts: &[&LoraLinear]) -> Result<Option<Vec<Tensor>>> {
        let intact = parts.len() == self.parts.len()
            && parts
                .iter()
                .zip(&self.parts)
                .all(|(p, (id, _))| p.adapter().is_none() && p.weight().id() == *id);
        if !intact {
            return Ok(None);
        }
        let y = ops::frozen_linear(x, &self.weight, self.bias.as_ref())?;
        let last = y.rank() - 1;
        let mut out = Vec::with_capacity(self.parts.len());
        let mut start = 0;
        for &(_, width) in &self.parts {
            out.push(y.narrow(last, start, width)?);
            start += width;
        }
        Ok(Some(out))
    }
}

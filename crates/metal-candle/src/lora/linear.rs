//! The linear layer a model runs: a frozen base weight with an optional LoRA adapter.

use candle_core::{Module, Tensor};

use super::LoRALayer;
use crate::{ops, Error, Result};

/// `x·Wᵀ + bias (+ scale·(x·A)·B)`: a frozen base linear layer (`weight` (out, in), as in
/// Hugging Face checkpoints) with an optional LoRA adapter, unmerged or merged.
///
/// Unmerged with an adapter it runs [`ops::lora_linear`] (fully fused, no extra output-sized
/// tensor). In training mode with LoRA dropout the adapter's input differs from the base
/// layer's, so the base product and the fused LoRA term run separately and are added.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use metal_candle::training::{LoRAConfig, LoRALayer, LoraLinear};
/// # fn main() -> metal_candle::Result<()> {
/// let dev = Device::Cpu;
/// let w = Tensor::randn(0f32, 0.1, (32, 64), &dev)?;
/// let cfg = LoRAConfig::new(64, 32, 4, 8.0);
/// let adapter = LoRALayer::new(64, 32, &cfg, &dev)?;
/// let layer = LoraLinear::new(w, None)?.with_adapter(adapter)?;
/// let x = Tensor::randn(0f32, 1., (2, 5, 64), &dev)?;
/// let unmerged = layer.forward(&x)?;
/// let merged = layer.merged()?.forward(&x)?;
/// assert!((unmerged - merged)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-4);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapter: Option<LoRALayer>,
}

impl LoraLinear {
    /// A base layer with `weight` (out, in) and an optional `bias` (out), no adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let dims = weight.dims();
        if dims.len() != 2 {
            return Err(Error::shape(
                "LoraLinear::new",
                format!("weight must be (out, in), got {dims:?}"),
            ));
        }
        if let Some(b) = &bias {
            if b.dims() != [dims[0]] {
                return Err(Error::shape(
                    "LoraLinear::new",
                    format!(
                        "bias has shape {:?} but weight {dims:?} needs [{}]",
                        b.dims(),
                        dims[0]
                    ),
                ));
            }
        }
        Ok(Self {
            weight,
            bias,
            adapter: None,
        })
    }

    /// Attaches (or replaces) the adapter; its shape must match the base layer.
    pub fn with_adapter(mut self, adapter: LoRALayer) -> Result<Self> {
        self.set_adapter(Some(adapter))?;
        Ok(self)
    }

    /// Swaps the adapter at run time (`None` removes it); the base weight is untouched.
    pub fn set_adapter(&mut self, adapter: Option<LoRALayer>) -> Result<()> {
        if let Some(a) = &adapter {
            let c = a.config();
            if [c.out_features, c.in_features] != [self.out_features(), self.in_features()] {
                return Err(Error::shape(
                    "LoraLinear::set_adapter",
                    format!(
                        "adapter is {}x{} (in x out) but the layer is {}x{}",
                        c.in_features,
                        c.out_features,
                        self.in_features(),
                        self.out_features()
                    ),
                ));
            }
        }
        self.adapter = adapter;
        Ok(())
    }

    /// The adapter, if any.
    pub fn adapter(&self) -> Option<&LoRALayer> {
        self.adapter.as_ref()
    }

    /// The base weight (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The base bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The same layer with the adapter folded into the weight (`W + scale·(A·B)ᵀ`) and no
    /// adapter left. A layer without an adapter is returned as it is.
    pub fn merged(&self) -> Result<Self> {
        let Some(adapter) = &self.adapter else {
            return Ok(self.clone());
        };
        let delta = adapter.delta_weight(candle_core::DType::F32)?;
        let w = (self.weight.to_dtype(candle_core::DType::F32)? + delta)?
            .to_dtype(self.weight.dtype())?;
        Ok(Self {
            weight: w.detach(),
            bias: self.bias.clone(),
            adapter: None,
        })
    }

    /// The base product; [`ops::frozen_linear`] keeps candle from computing a gradient for a
    /// frozen weight (it falls back to candle's composition when the weight is trainable).
    fn base(&self, x: &Tensor) -> Result<Tensor> {
        ops::frozen_linear(x, &self.weight, self.bias.as_ref())
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let forward = || -> Result<Tensor> {
            let Some(adapter) = &self.adapter else {
                return self.base(x);
            };
            if adapter.dropout_active() {
                return Ok((self.base(x)? + adapter.forward(x)?)?);
            }
            let (a, b) = adapter.factors(x.dtype())?;
            ops::lora_linear(
                x,
                &self.weight,
                self.bias.as_ref(),
                &a,
                &b,
                adapter.config().scaling(),
            )
        };
        forward().map_err(|e| match e {
            Error::Candle(c) => c,
            other => other.into_candle(),
        })
    }
}

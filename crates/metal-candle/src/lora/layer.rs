//! The LoRA adapter layer: the trainable factors A and B and the forward of their term.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, Var};

use super::LoRAConfig;
use crate::{ops, Error, Result};

/// A LoRA adapter: `scale · (dropout(x)·A)·B` with trainable `A` (in, r) and `B` (r, out).
///
/// Initialised as PEFT does: A Kaiming-uniform (bound `1/√in`), B zeros, so a fresh adapter
/// leaves its base layer unchanged. The factors are f32 variables; inputs of another dtype are
/// served by casting the factors to it (gradients still reach the f32 variables).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use metal_candle::training::{LoRAConfig, LoRALayer};
/// # fn main() -> metal_candle::Result<()> {
/// let device = Device::Cpu;
/// let config = LoRAConfig::new(512, 512, 8, 16.0);
/// let lora = LoRALayer::new(512, 512, &config, &device)?;
/// let input = Tensor::randn(0f32, 1f32, (1, 128, 512), &device)?;
/// let output = lora.forward(&input)?; // B starts at zero: the term starts at zero
/// assert_eq!(output.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LoRALayer {
    a: Var,
    b: Var,
    config: LoRAConfig,
    training: AtomicBool,
    /// Seed of the next dropout mask; advanced after each use, so masks are reproducible.
    dropout_seed: AtomicU64,
}

impl Clone for LoRALayer {
    fn clone(&self) -> Self {
        Self {
            a: self.a.clone(),
            b: self.b.clone(),
            config: self.config.clone(),
            training: AtomicBool::new(self.is_training()),
            dropout_seed: AtomicU64::new(self.dropout_seed.load(Ordering::Relaxed)),
        }
    }
}

impl LoRALayer {
    /// A new adapter for a layer with `in_features` inputs and `out_features` outputs.
    pub fn new(
        in_features: usize,
        out_features: usize,
        config: &LoRAConfig,
        device: &Device,
    ) -> Result<Self> {
        if (config.in_features, config.out_features) != (in_features, out_features) {
            return Err(Error::shape(
                "LoRALayer::new",
                format!(
                    "layer is {in_features}x{out_features} but the config says {}x{}",
                    config.in_features, config.out_features
                ),
            ));
        }
        config.validate()?;
        let bound = 1.0 / (in_features as f64).sqrt();
        let a = Tensor::rand(
            -bound as f32,
            bound as f32,
            (in_features, config.rank),
            device,
        )?;
        let b = Tensor::zeros((config.rank, out_features), DType::F32, device)?;
        Self::from_tensors(a, b, config)
    }

    /// An adapter from existing factors `a` (in, r) and `b` (r, out) (converted to f32
    /// variables).
    pub fn from_tensors(a: Tensor, b: Tensor, config: &LoRAConfig) -> Result<Self> {
        config.validate()?;
        let (want_a, want_b) = (
            [config.in_features, config.rank],
            [config.rank, config.out_features],
        );
        if a.dims() != want_a || b.dims() != want_b {
            return Err(Error::shape(
                "LoRALayer::from_tensors",
                format!(
                    "expected A {want_a:?} and B {want_b:?}, got A {:?} and B {:?}",
                    a.dims(),
                    b.dims()
                ),
            ));
        }
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            config: config.clone(),
            training: AtomicBool::new(false),
            dropout_seed: AtomicU64::new(0x00D2_0B0A),
        })
    }

    /// The configuration this adapter was built with.
    pub fn config(&self) -> &LoRAConfig {
        &self.config
    }

    /// A, (in, r).
    pub fn a(&self) -> &Var {
        &self.a
    }

    /// B, (r, out).
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// The trainable variables, A then B.
    pub fn vars(&self) -> [&Var; 2] {
        [&self.a, &self.b]
    }

    /// Switches dropout on (training) or off (inference). Adapters start in inference mode.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// Whether dropout is active.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Whether this forward pass applies dropout to the LoRA input.
    pub(crate) fn dropout_active(&self) -> bool {
        self.is_training() && self.config.dropout > 0.0
    }

    /// A and B in `dtype` (differentiable casts of the f32 variables).
    pub(crate) fn factors(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok((
            self.a.as_tensor().to_dtype(dtype)?,
            self.b.as_tensor().to_dtype(dtype)?,
        ))
    }

    /// Sets the seed of the next dropout mask. Each forward pass in training mode uses the
    /// current seed and moves to a new one derived from it, so a run seeded the same way
    /// draws the same masks.
    pub fn set_dropout_seed(&self, seed: u64) {
        self.dropout_seed.store(seed, Ordering::Relaxed);
    }

    /// The input the LoRA term sees: `x`, or `dropout(x)` in training mode.
    pub(crate) fn lora_input(&self, x: &Tensor) -> Result<Tensor> {
        if !self.dropout_active() {
            return Ok(x.clone());
        }
        let seed = self.dropout_seed.load(Ordering::Relaxed);
        self.dropout_seed
            .store(crate::train::rng::mix64(seed ^ 0xD40F), Ordering::Relaxed);
        let mask = dropout_mask(x, self.config.dropout, seed)?;
        Ok(x.mul(&mask)?)
    }

    /// `scale · (dropout(x)·A)·B` for `x` of shape (..., in); fused where the device has a
    /// kernel.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (a, b) = self.factors(x.dtype())?;
        ops::lora_delta(&self.lora_input(x)?, &a, &b, self.config.scaling())
    }

    /// The dense update `scale · (A·B)ᵀ`, shaped (out, in) like a base weight, in `dtype`.
    pub fn delta_weight(&self, dtype: DType) -> Result<Tensor> {
        let ab = self.a.as_tensor().matmul(self.b.as_tensor())?;
        Ok((ab.t()? * self.config.scaling())?.to_dtype(dtype)?)
    }
}

/// A dropout mask shaped like `x`: `1/(1-p)` with probability `1-p`, else 0, drawn from `seed`.
/// On the CPU each element is a counter-based hash of (seed, index), drawn in parallel; other
/// devices seed their own generator, since candle's CPU generator cannot be seeded.
fn dropout_mask(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    let keep = 1.0 - p;
    let n = x.elem_count();
    if x.device().is_cpu() {
        use rayon::prelude::*;
        let threshold = (keep * (1u64 << 53) as f64) as u64;
        let scale = (1.0 / keep) as f32;
        let base = crate::train::rng::mix64(seed);
        let mask: Vec<f32> = (0..n as u64)
            .into_par_iter()
            .map(|i| {
                if crate::train::rng::mix64(base ^ i) >> 11 < threshold {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        return Ok(Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?);
    }
    x.device().set_seed(seed)?;
    let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
    Ok((u.ge(p)?.to_dtype(DType::F32)? / keep)?.to_dtype(x.dtype())?)
}

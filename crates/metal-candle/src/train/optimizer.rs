//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), as PyTorch's `torch.optim.AdamW`
//! computes it, with state that a checkpoint can save and restore exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};

use super::adamw_update::{Moments, ParamStep};
use crate::{fs, Error, Result};

/// AdamW hyper-parameters (PyTorch's defaults except weight decay, which is 0 as in the
/// Hugging Face trainer).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay β₁.
    pub beta1: f64,
    /// Second-moment decay β₂.
    pub beta2: f64,
    /// Added to `√v̂` for stability.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the weights by `1 − lr·weight_decay`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over a fixed list of named f32 variables.
///
/// One [`AdamW::step`] is one optimiser step: `t += 1`, then for each parameter
/// `p ← p − lr·wd·p`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)`. Bias correction counts optimiser steps, not
/// micro-batches, so gradient accumulation does not change it.
///
/// On the CPU and CUDA each parameter's update is two fused in-place passes (the moments, then
/// the parameter; see `adamw_update.rs`); elsewhere it runs as candle ops.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Var)>,
    /// Per parameter, its first and second moments as one (2, numel) f32 tensor.
    moments: Vec<Tensor>,
    step: usize,
}

impl AdamW {
    /// An optimiser for `params` (names must be unique; they key the saved state).
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for (name, _) in &params {
            if !seen.insert(name) {
                return Err(Error::Msg(format!(
                    "AdamW: parameter name {name:?} appears twice"
                )));
            }
        }
        let moments = params
            .iter()
            .map(|(_, p)| Tensor::zeros((2, p.elem_count()), DType::F32, p.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            params,
            moments,
            step: 0,
        })
    }

    /// The first and second moments of parameter `i`, shaped like it.
    fn m_v(&self, i: usize) -> Result<(Tensor, Tensor)> {
        let dims = self.params[i].1.dims();
        let state = &self.moments[i];
        Ok((state.get(0)?.reshape(dims)?, state.get(1)?.reshape(dims)?))
    }

    /// The parameters, in order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Optimiser steps taken so far.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// One update with learning rate `lr`, given one gradient per parameter (in order; `None`
    /// for a parameter that received no gradient, which is then left untouched but still decays).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` first: gradient clipping
    /// ([`clip_factor`]) folded into the update instead of a pass of its own over each gradient.
    pub fn step_scaled(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::Msg(format!(
                "AdamW: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        for ((name, p), g) in self.params.iter().zip(grads) {
            if let Some(g) = g {
                if g.dims() != p.dims() {
                    return Err(Error::shape(
                        "AdamW::step",
                        format!(
                            "gradient of {name} is {:?}, parameter is {:?}",
                            g.dims(),
                            p.dims()
                        ),
                    ));
                }
            }
        }
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let p = &self.params[i].1;
            let fused = p.dtype() == DType::F32
                && p.is_contiguous()
                && matches!(
                    crate::ops::kernel_path(p.device(), DType::F32),
                    crate::ops::KernelPath::Fused
                );
            if fused {
                let g = g.to_dtype(DType::F32)?.contiguous()?;
                self.moments[i].inplace_op2(
                    &g,
                    &Moments {
                        beta1: c.beta1 as f32,
                        beta2: c.beta2 as f32,
                        grad_scale: grad_scale as f32,
                    },
                )?;
                p.as_tensor().inplace_op2(
                    &self.moments[i],
                    &ParamStep {
                        lr: lr as f32,
                        bc1: bc1 as f32,
                        bc2: bc2 as f32,
                        eps: c.eps as f32,
                        decay: (1.0 - lr * c.weight_decay) as f32,
                    },
                )?;
                continue;
            }
            // Devices without the fused passes (Metal): the same maths as candle ops.
            let g = (g.to_dtype(p.dtype())? * grad_scale)?;
            let (m, v) = self.m_v(i)?;
            let m = ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = if c.weight_decay != 0.0 {
                (p.as_tensor() * (1.0 - lr * c.weight_decay))?
            } else {
                p.as_tensor().clone()
            };
            p.set(&(decayed - (update * lr)?)?)?;
            self.moments[i] = Tensor::stack(&[m.flatten_all()?, v.flatten_all()?], 0)?;
        }
        Ok(())
    }

    /// Writes the moments (`m.NAME`, `v.NAME`) and step count to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            let (m, v) = self.m_v(i)?;
            tensors.push((format!("m.{name}"), m));
            tensors.push((format!("v.{name}"), v));
        }
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert(
            "config".to_string(),
            serde_json::to_string(&self.config).map_err(|e| Error::Msg(e.to_string()))?,
        );
        fs::write_safetensors_atomic(path, &tensors, Some(meta))
    }

    /// Restores state written by [`AdamW::save`] for the same parameter names and shapes.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = fs::read(path)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            Error::Msg(format!(
                "{}: not a valid optimiser state file ({e})",
                path.display()
            ))
        })?;
        let step = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Msg(format!(
                    "{}: optimiser state has no step count",
                    path.display()
                ))
            })?;
        let device = self
            .params
            .first()
            .map(|(_, p)| p.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let tensors = candle_core::safetensors::load_buffer(&bytes, &device)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
        let mut loaded = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            let mut pair = Vec::with_capacity(2);
            for prefix in ["m", "v"] {
                let key = format!("{prefix}.{name}");
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::Msg(format!(
                        "{}: optimiser state lacks {key}: it was saved for other adapters",
                        path.display()
                    ))
                })?;
                if t.dims() != p.dims() {
                    return Err(Error::shape(
                        "AdamW::load",
                        format!(
                            "{}: {key} is {:?} but the parameter is {:?}",
                            path.display(),
                            t.dims(),
                            p.dims()
                        ),
                    ));
                }
                pair.push(t.to_dtype(DType::F32)?.flatten_all()?);
            }
            loaded.push(Tensor::stack(&pair, 0)?.contiguous()?);
        }
        self.moments = loaded;
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of all gradients (as `torch.nn.utils.clip_grad_norm_` computes it).
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    // The per-gradient sums stay on the device and are read back once: a read per gradient
    // would wait for the device hundreds of times per step (one per LoRA factor).
    let sums = grads
        .iter()
        .flatten()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&sums, 0)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(total.sqrt())
}

/// Scales the gradients so their global norm is at most `max_norm` and returns the norm before
/// clipping. Like PyTorch, the factor is `max_norm / (norm + 1e-6)`, applied only when < 1.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads)?;
    let factor = clip_factor(norm, max_norm);
    if factor != 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}

/// The factor [`clip_grad_norm`] scales the gradients by for a global norm `norm`:
/// `max_norm / (norm + 1e-6)` when that is below 1 (and the norm finite), else 1. Hand it to
/// [`AdamW::step_scaled`] to clip without a pass over the gradients.
///
/// ```
/// use metal_candle::train::clip_factor;
/// assert_eq!(clip_factor(0.5, 1.0), 1.0);
/// assert!((clip_factor(4.0, 1.0) - 0.25).abs() < 1e-6);
/// ```
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    let factor = max_norm / (norm + 1e-6);
    if norm.is_finite() && factor < 1.0 {
        factor
    } else {
        1.0
    }
}

//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019), as PyTorch's `torch.optim.AdamW`
//! computes it, with state that a checkpoint can save and restore exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};

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
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
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
        let m = params
            .iter()
            .map(|(_, p)| p.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(|(_, p)| p.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config,
            params,
            m,
            v,
            step: 0,
        })
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
        if grads.len() != self.params.len() {
            return Err(Error::Msg(format!(
                "AdamW: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, (name, p)) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
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
            let g = g.to_dtype(p.dtype())?;
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = if c.weight_decay != 0.0 {
                (p.as_tensor() * (1.0 - lr * c.weight_decay))?
            } else {
                p.as_tensor().clone()
            };
            p.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes the moments (`m.NAME`, `v.NAME`) and step count to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            tensors.push((format!("m.{name}"), self.m[i].clone()));
            tensors.push((format!("v.{name}"), self.v[i].clone()));
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
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
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
                *slot = t.to_dtype(DType::F32)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of all gradients (as `torch.nn.utils.clip_grad_norm_` computes it).
pub fn global_grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Scales the gradients so their global norm is at most `max_norm` and returns the norm before
/// clipping. Like PyTorch, the factor is `max_norm / (norm + 1e-6)`, applied only when < 1.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads)?;
    let factor = max_norm / (norm + 1e-6);
    if norm.is_finite() && factor < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * factor)?;
        }
    }
    Ok(norm)
}

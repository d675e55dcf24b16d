//! Which linear layers of a model get adapters, and attaching them.

use candle_core::{DType, Tensor, Var};

use super::{LoRAConfig, LoRALayer};
use crate::train::rng::{derive_seed, TrainRng};
use crate::train::CausalLm;
use crate::{Error, Result};

/// The module names of the llama family that LoRA can target, with their short aliases.
pub const LLAMA_TARGETS: [(&str, &str); 7] = [
    ("q", "q_proj"),
    ("k", "k_proj"),
    ("v", "v_proj"),
    ("o", "o_proj"),
    ("gate", "gate_proj"),
    ("up", "up_proj"),
    ("down", "down_proj"),
];

/// Expands `q,k,v,o,gate,up,down` (or full names such as `q_proj`, or `all`) into module names.
///
/// ```
/// use metal_candle::lora::parse_targets;
/// assert_eq!(parse_targets("q,v").unwrap(), vec!["q_proj", "v_proj"]);
/// assert_eq!(parse_targets("all").unwrap().len(), 7);
/// assert!(parse_targets("q,attn").is_err());
/// ```
pub fn parse_targets(list: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item == "all" || item == "all-linear" {
            return Ok(LLAMA_TARGETS.iter().map(|(_, n)| n.to_string()).collect());
        }
        let name = LLAMA_TARGETS
            .iter()
            .find(|(short, long)| item == *short || item == *long)
            .map(|(_, long)| long.to_string())
            .ok_or_else(|| Error::InvalidConfig {
                name: "targets",
                value: item.to_string(),
                expected: "a list of q, k, v, o, gate, up, down (or q_proj, ..., or all)",
            })?;
        if !out.contains(&name) {
            out.push(name);
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidConfig {
            name: "targets",
            value: list.into(),
            expected: "at least one module",
        });
    }
    Ok(out)
}

/// The hyper-parameters shared by every adapter of a model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterSpec {
    /// Rank r.
    pub rank: usize,
    /// Scale numerator α.
    pub alpha: f64,
    /// Dropout on the LoRA input during training.
    pub dropout: f64,
    /// rsLoRA scaling α/√r.
    pub use_rslora: bool,
    /// Module names (last path component) to adapt, e.g. `q_proj`.
    pub targets: Vec<String>,
}

impl AdapterSpec {
    /// The per-layer configuration for a layer of `in_features` × `out_features`.
    pub fn layer_config(&self, in_features: usize, out_features: usize) -> LoRAConfig {
        LoRAConfig::new(in_features, out_features, self.rank, self.alpha)
            .with_dropout(self.dropout)
            .with_rslora(self.use_rslora)
    }
}

fn module_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// Attaches a fresh adapter (A Kaiming-uniform as PEFT draws it, B zero) to every targeted
/// linear layer and returns how many were attached. A is drawn from `seed`, so runs with the
/// same seed start from the same adapters. Fails if a target matches no layer of the model.
pub fn attach_adapters(model: &mut dyn CausalLm, spec: &AdapterSpec, seed: u64) -> Result<usize> {
    let device = model.device().clone();
    let mut attached = 0;
    let mut seen = std::collections::HashSet::new();
    let paths: Vec<String> = model.lora_linears().into_iter().map(|(p, _)| p).collect();
    for path in paths {
        let name = module_name(&path);
        if !spec.targets.iter().any(|t| t == name) {
            continue;
        }
        seen.insert(name.to_string());
        let Some(linear) = model.lora_linear_mut(&path) else {
            continue;
        };
        let (fan_in, fan_out) = (linear.in_features(), linear.out_features());
        let cfg = spec.layer_config(fan_in, fan_out);
        cfg.validate()?;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let mut rng = TrainRng::new(derive_seed(seed, &[0xA1A1, attached as u64]));
        let a: Vec<f32> = (0..fan_in * spec.rank)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        let a = Tensor::from_vec(a, (fan_in, spec.rank), &device)?;
        let b = Tensor::zeros((spec.rank, fan_out), DType::F32, &device)?;
        linear.set_adapter(Some(LoRALayer::from_tensors(a, b, &cfg)?))?;
        attached += 1;
    }
    if let Some(missing) = spec.targets.iter().find(|t| !seen.contains(*t)) {
        return Err(Error::Msg(format!(
            "LoRA target {missing:?} matches no linear layer of this model"
        )));
    }
    Ok(attached)
}

/// The trainable variables of every attached adapter, named `{path}.lora_a` / `{path}.lora_b`,
/// in the model's layer order.
pub fn adapter_vars(model: &dyn CausalLm) -> Vec<(String, Var)> {
    let mut vars = Vec::new();
    for (path, linear) in model.lora_linears() {
        if let Some(a) = linear.adapter() {
            vars.push((format!("{path}.lora_a"), a.a().clone()));
            vars.push((format!("{path}.lora_b"), a.b().clone()));
        }
    }
    vars
}

/// Switches every adapter's dropout on (training) or off.
pub fn set_adapters_training(model: &dyn CausalLm, on: bool) {
    for (_, linear) in model.lora_linears() {
        if let Some(a) = linear.adapter() {
            a.set_training(on);
        }
    }
}

/// Gives every adapter its own dropout seed derived from `seed` and its index, so each forward
/// pass draws masks that depend only on (seed, layer).
pub fn seed_adapter_dropout(model: &dyn CausalLm, seed: u64) {
    for (i, (_, linear)) in model.lora_linears().into_iter().enumerate() {
        if let Some(a) = linear.adapter() {
            a.set_dropout_seed(crate::train::rng::derive_seed(seed, &[i as u64]));
        }
    }
}

/// Folds every adapter into its base weight and removes it.
pub fn merge_adapters(model: &mut dyn CausalLm) -> Result<usize> {
    let adapted: Vec<String> = model
        .lora_linears()
        .into_iter()
        .filter(|(_, l)| l.adapter().is_some())
        .map(|(p, _)| p)
        .collect();
    for path in &adapted {
        if let Some(linear) = model.lora_linear_mut(path) {
            *linear = linear.merged()?;
        }
    }
    Ok(adapted.len())
}

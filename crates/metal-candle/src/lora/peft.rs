//! Adapters in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Keys are `base_model.model.{module path}.lora_A.weight` with shape (r, in) and
//! `...lora_B.weight` with shape (out, r); PEFT's in-memory form
//! `...lora_A.default.weight` is accepted when loading. Our factors are the transposes:
//! `A = lora_Aᵀ` (in, r), `B = lora_Bᵀ` (r, out).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{AdapterSpec, LoRALayer};
use crate::train::CausalLm;
use crate::{fs, Error, Result};

/// The adapter weights file name.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapter config file name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
const KEY_PREFIX: &str = "base_model.model.";

/// PEFT's `LoraConfig` as written to `adapter_config.json` (the fields PEFT needs to load it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PeftConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// `CAUSAL_LM` for language models.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scale numerator.
    pub lora_alpha: f64,
    /// Dropout used in training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Adapted module names.
    #[serde(default)]
    pub target_modules: serde_json::Value,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// Only `none` is supported (no trained biases).
    #[serde(default = "bias_none")]
    pub bias: String,
    /// The base model the adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Always false for llama-family layers.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// True once saved.
    #[serde(default = "yes")]
    pub inference_mode: bool,
    /// Weight-decomposed LoRA: not supported.
    #[serde(default)]
    pub use_dora: bool,
    /// Per-module ranks (PEFT); ranks are read from the tensor shapes here.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alphas, keyed by a module path suffix.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Modules trained in full beside the adapter: not supported.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// How PEFT initialised the adapter.
    #[serde(default = "yes")]
    pub init_lora_weights: bool,
}

fn bias_none() -> String {
    "none".into()
}
fn yes() -> bool {
    true
}

impl PeftConfig {
    /// The config PEFT would write for `spec` on `base_model`.
    pub fn from_spec(spec: &AdapterSpec, base_model: Option<&str>) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: spec.rank,
            lora_alpha: spec.alpha,
            lora_dropout: spec.dropout,
            target_modules: serde_json::json!(spec.targets),
            use_rslora: spec.use_rslora,
            bias: "none".into(),
            base_model_name_or_path: base_model.map(str::to_string),
            fan_in_fan_out: false,
            inference_mode: true,
            use_dora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            init_lora_weights: true,
        }
    }

    fn check_supported(&self, path: &Path) -> Result<()> {
        let unsupported = |what: &str| {
            Err(Error::Msg(format!(
                "{}: {what} is not supported",
                path.display()
            )))
        };
        if self.peft_type != "LORA" {
            return unsupported(&format!("peft_type {:?} (only LORA)", self.peft_type));
        }
        if self.bias != "none" {
            return unsupported(&format!("bias {:?} (only \"none\")", self.bias));
        }
        if self.use_dora {
            return unsupported("use_dora = true");
        }
        if self.fan_in_fan_out {
            return unsupported("fan_in_fan_out = true (GPT-2 style Conv1D layers)");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return unsupported("modules_to_save (fully trained extra modules)");
        }
        Ok(())
    }

    /// The scale numerator of module `module_path` (alpha_pattern entries match a path suffix).
    pub fn alpha_for(&self, module_path: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| module_path == k.as_str() || module_path.ends_with(&format!(".{k}")))
            .map_or(self.lora_alpha, |(_, a)| *a)
    }
}

/// The tensors PEFT stores for the adapters attached to `model`, with PEFT's names and shapes.
pub fn peft_tensors(model: &dyn CausalLm) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (path, linear) in model.lora_linears() {
        if let Some(a) = linear.adapter() {
            out.push((
                format!("{KEY_PREFIX}{path}.lora_A.weight"),
                a.a().as_tensor().t()?.contiguous()?.detach(),
            ));
            out.push((
                format!("{KEY_PREFIX}{path}.lora_B.weight"),
                a.b().as_tensor().t()?.contiguous()?.detach(),
            ));
        }
    }
    if out.is_empty() {
        return Err(Error::Msg("the model has no adapters to save".into()));
    }
    Ok(out)
}

/// Writes the model's adapters to `dir` as a PEFT adapter (both files atomically).
pub fn save_peft_adapter(
    model: &dyn CausalLm,
    spec: &AdapterSpec,
    base_model: Option<&str>,
    dir: &Path,
) -> Result<()> {
    let tensors = peft_tensors(model)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    fs::write_safetensors_atomic(&dir.join(ADAPTER_WEIGHTS), &tensors, Some(meta))?;
    fs::write_json_atomic(
        &dir.join(ADAPTER_CONFIG),
        &PeftConfig::from_spec(spec, base_model),
    )
}

/// A PEFT adapter read from disk: its config and, per module path, (lora_A (r, in), lora_B (out, r)).
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    /// `adapter_config.json`.
    pub config: PeftConfig,
    /// Module path → (lora_A, lora_B) in PEFT's layout, f32.
    pub modules: BTreeMap<String, (Tensor, Tensor)>,
}

impl PeftAdapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let config: PeftConfig = fs::read_json(&config_path)?;
        config.check_supported(&config_path)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let tensors = fs::read_safetensors(&weights_path, device)?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, t) in tensors {
            let (path, which) = parse_key(&key).ok_or_else(|| {
                Error::Msg(format!(
                    "{}: unexpected tensor {key:?}: expected base_model.model.<module>.lora_A[.default].weight or lora_B",
                    weights_path.display()
                ))
            })?;
            let entry = halves.entry(path).or_default();
            let t = t.to_dtype(DType::F32)?;
            if which == 'A' {
                entry.0 = Some(t);
            } else {
                entry.1 = Some(t);
            }
        }
        let mut modules = BTreeMap::new();
        for (path, pair) in halves {
            let (Some(a), Some(b)) = pair else {
                return Err(Error::Msg(format!(
                    "{}: module {path} has only one of lora_A / lora_B",
                    weights_path.display()
                )));
            };
            let (r_a, _) = a
                .dims2()
                .map_err(|_| bad_rank(&weights_path, &path, "lora_A", a.dims()))?;
            let (_, r_b) = b
                .dims2()
                .map_err(|_| bad_rank(&weights_path, &path, "lora_B", b.dims()))?;
            if r_a != r_b {
                return Err(Error::shape(
                    "PeftAdapter::load",
                    format!(
                        "{path}: lora_A is {:?} and lora_B is {:?}: their ranks differ",
                        a.dims(),
                        b.dims()
                    ),
                ));
            }
            modules.insert(path, (a, b));
        }
        if modules.is_empty() {
            return Err(Error::Msg(format!(
                "{}: holds no LoRA tensors",
                weights_path.display()
            )));
        }
        Ok(Self { config, modules })
    }

    /// Attaches these adapters to `model`, checking every module exists and every shape fits.
    pub fn apply(&self, model: &mut dyn CausalLm) -> Result<()> {
        for (path, (a, b)) in &self.modules {
            let linear = model.lora_linear_mut(path).ok_or_else(|| {
                Error::Msg(format!(
                    "the adapter has weights for {path}, which this model does not have: it was made for another model"
                ))
            })?;
            let (r, a_in) = a.dims2()?;
            let (b_out, _) = b.dims2()?;
            if a_in != linear.in_features() || b_out != linear.out_features() {
                return Err(Error::shape(
                    "PeftAdapter::apply",
                    format!(
                        "{path}: the adapter has lora_A {:?} and lora_B {:?} (in {a_in}, out {b_out}) but the model's layer is \
                         in {} x out {}: the adapter was made for another model",
                        a.dims(),
                        b.dims(),
                        linear.in_features(),
                        linear.out_features()
                    ),
                ));
            }
            let cfg = crate::lora::LoRAConfig::new(a_in, b_out, r, self.config.alpha_for(path))
                .with_dropout(self.config.lora_dropout)
                .with_rslora(self.config.use_rslora);
            let layer = LoRALayer::from_tensors(a.t()?.contiguous()?, b.t()?.contiguous()?, &cfg)?;
            linear.set_adapter(Some(layer))?;
        }
        Ok(())
    }

    /// The dense update `scale · lora_B · lora_A` (out, in) of each module, f32.
    pub fn delta_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (path, (a, b)) in &self.modules {
            let r = a.dims()[0] as f64;
            let alpha = self.config.alpha_for(path);
            let scale = if self.config.use_rslora {
                alpha / r.sqrt()
            } else {
                alpha / r
            };
            out.push((path.clone(), (b.matmul(a)? * scale)?));
        }
        Ok(out)
    }
}

fn bad_rank(file: &Path, path: &str, which: &str, dims: &[usize]) -> Error {
    Error::shape(
        "PeftAdapter::load",
        format!(
            "{}: {path}.{which} must be 2-D, got {dims:?}",
            file.display()
        ),
    )
}

/// `base_model.model.X.lora_A.weight` or `...lora_A.default.weight` → (X, 'A').
fn parse_key(key: &str) -> Option<(String, char)> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    if let Some(p) = rest.strip_suffix(".lora_A") {
        return Some((p.to_string(), 'A'));
    }
    rest.strip_suffix(".lora_B").map(|p| (p.to_string(), 'B'))
}

/// Folds an adapter into a base model's weights given by name (`{module path}.weight`, as in a
/// Hugging Face checkpoint), keeping each weight's dtype. Fails if a module has no weight.
pub fn merge_into_weights(
    weights: &mut HashMap<String, Tensor>,
    adapter: &PeftAdapter,
) -> Result<usize> {
    let mut merged = 0;
    for (path, delta) in adapter.delta_weights()? {
        let key = format!("{path}.weight");
        let w = weights.get(&key).ok_or_else(|| {
            Error::Msg(format!(
                "the base model has no weight {key}: the adapter was made for another model"
            ))
        })?;
        if w.dims() != delta.dims() {
            return Err(Error::shape(
                "merge",
                format!("{key} is {:?} but the adapter's update is {:?}: the adapter was made for another model", w.dims(), delta.dims()),
            ));
        }
        let new = (w.to_dtype(DType::F32)? + delta.to_device(w.device())?)?.to_dtype(w.dtype())?;
        weights.insert(key, new);
        merged += 1;
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::parse_key;

    #[test]
    fn keys_with_and_without_default() {
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj".into(), 'A'))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"),
            Some(("model.layers.1.mlp.down_proj".into(), 'B'))
        );
        assert_eq!(parse_key("base_model.model.lm_head.weight"), None);
    }
}

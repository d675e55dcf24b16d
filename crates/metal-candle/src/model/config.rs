//! The llama-family configuration, read from a Hugging Face `config.json`.
//!
//! One struct covers Llama 2/3, SmolLM2 (a llama) and Qwen2 (a llama with biases on q/k/v).
//! Both the older layout (`rope_theta`, `rope_scaling`) and the newer one (`rope_parameters`)
//! are understood.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::{Error, Result};

/// Which member of the llama family a checkpoint is; it decides the bias layout and the
/// `model_type` written back to `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `model_type: "llama"` (Llama 2/3, SmolLM2, TinyLlama, ...): no biases unless
    /// `attention_bias` / `mlp_bias` say so.
    Llama,
    /// `model_type: "qwen2"`: biases on the q, k and v projections.
    Qwen2,
}

impl Architecture {
    /// The Hugging Face `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// The Hugging Face class name written to `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length the model was trained with.
        original_max_position_embeddings: usize,
    },
}

/// A llama-family model's shape and hyper-parameters.
///
/// ```
/// use metal_candle::model::{Architecture, LlamaConfig};
/// let json = r#"{"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
///   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
///   "vocab_size": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
///   "tie_word_embeddings": true}"#;
/// let config = LlamaConfig::from_json_str(json, "config.json")?;
/// assert_eq!(config.architecture, Architecture::Qwen2);
/// assert!(config.qkv_bias && !config.o_bias);
/// assert_eq!(config.head_dim, 16);
/// # Ok::<(), metal_candle::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Llama or Qwen2.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (usually `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RoPE rescaling, if any.
    pub rope_scaling: RopeScaling,
    /// Longest context the model was trained for (informational; RoPE is computed per position).
    pub max_position_embeddings: usize,
    /// Whether the output head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Biases on gate, up and down.
    pub mlp_bias: bool,
    /// Beginning-of-sequence token, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (a config may name several).
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Reads and checks a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses and checks the text of a `config.json`; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::file(origin, format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::file(origin, "expected a JSON object"))?;
        let field = Fields { obj, origin };

        let model_type = field
            .string("model_type")?
            .unwrap_or_else(|| "llama".into());
        let architecture = match model_type.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(Error::file(
                    origin,
                    format!("model_type {other:?} is not supported; this loader handles \"llama\" and \"qwen2\""),
                ))
            }
        };
        if let Some(act) = field.string("hidden_act")? {
            if act != "silu" {
                return Err(Error::file(
                    origin,
                    format!(
                        "hidden_act {act:?} is not supported; llama-family models use \"silu\""
                    ),
                ));
            }
        }
        if field.bool("use_sliding_window")? == Some(true) {
            return Err(Error::file(
                origin,
                "use_sliding_window = true is not supported (full attention only)",
            ));
        }

        let hidden_size = field.usize_required("hidden_size")?;
        let num_attention_heads = field.usize_required("num_attention_heads")?;
        let num_key_value_heads = field
            .usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match field.usize("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };

        // Newer configs group RoPE settings under `rope_parameters`; older ones spread them out.
        let rope_params = obj.get("rope_parameters").filter(|v| !v.is_null());
        let rope_theta = match rope_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
        {
            Some(t) => t,
            None => field.f64("rope_theta")?.unwrap_or(10_000.0),
        };
        let scaling_value = rope_params
            .or(obj.get("rope_scaling"))
            .filter(|v| !v.is_null());
        let rope_scaling = match scaling_value {
            Some(v) => parse_rope_scaling(v, origin)?,
            None => RopeScaling::None,
        };

        let attention_bias = field.bool("attention_bias")?;
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Llama => (
                attention_bias.unwrap_or(false),
                attention_bias.unwrap_or(false),
            ),
            Architecture::Qwen2 => (true, false),
        };
        let config = Self {
            architecture,
            hidden_size,
            intermediate_size: field.usize_required("intermediate_size")?,
            num_hidden_layers: field.usize_required("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: field.usize_required("vocab_size")?,
            rms_norm_eps: field.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: field.usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: field.bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: field.bool("mlp_bias")?.unwrap_or(false),
            bos_token_id: field.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: field.token_ids("eos_token_id")?,
        };
        config
            .validate()
            .map_err(|e| Error::file(origin, e.to_string()))?;
        Ok(config)
    }

    /// Checks that the sizes fit together (heads divide, nothing zero).
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (name, v) in sizes {
            if v == 0 {
                return Err(Error::InvalidConfig {
                    name,
                    value: "0".into(),
                    expected: "a size >= 1",
                });
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::InvalidConfig {
                name: "num_key_value_heads",
                value: format!(
                    "{} (with {} attention heads)",
                    self.num_key_value_heads, self.num_attention_heads
                ),
                expected: "a divisor of num_attention_heads",
            });
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::InvalidConfig {
                name: "head_dim",
                value: self.head_dim.to_string(),
                expected: "an even number (RoPE rotates pairs)",
            });
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::InvalidConfig {
                name: "rope_theta",
                value: self.rope_theta.to_string(),
                expected: "a finite number > 0",
            });
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::InvalidConfig {
                name: "rms_norm_eps",
                value: self.rms_norm_eps.to_string(),
                expected: "a finite number > 0",
            });
        }
        Ok(())
    }

    /// The configuration as a Hugging Face `config.json` value (what `convert` writes).
    pub fn to_hf_json(&self) -> Value {
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => {
                json!({"rope_type": "linear", "type": "linear", "factor": factor})
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        let mut obj = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "mlp_bias": self.mlp_bias,
            "torch_dtype": "float32",
        });
        if self.architecture == Architecture::Llama {
            obj["attention_bias"] = json!(self.qkv_bias);
        }
        if let Some(bos) = self.bos_token_id {
            obj["bos_token_id"] = json!(bos);
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => obj["eos_token_id"] = json!(one),
            many => obj["eos_token_id"] = json!(many),
        }
        obj
    }
}

fn parse_rope_scaling(v: &Value, origin: &str) -> Result<RopeScaling> {
    let get = |k: &str| v.get(k).and_then(Value::as_f64);
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |k: &'static str| {
        get(k).ok_or_else(|| {
            Error::file(
                origin,
                format!("rope scaling of type {kind:?} needs a numeric {k:?}"),
            )
        })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: need("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")? as usize,
        }),
        other => Err(Error::file(
            origin,
            format!("rope scaling type {other:?} is not supported; supported: \"default\", \"linear\", \"llama3\""),
        )),
    }
}

/// Typed access to the fields of a config object with errors that name the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a str,
}

impl Fields<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, want: &str, got: &Value) -> Error {
        Error::file(
            self.origin,
            format!("field {key:?} should be {want}, got {got}"),
        )
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.present(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| self.wrong(key, "a non-negative integer", v))
            })
            .transpose()
    }

    fn usize_required(&self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| Error::file(self.origin, format!("missing required field {key:?}")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.present(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong(key, "a number", v)))
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.present(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.wrong(key, "true or false", v))
            })
            .transpose()
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        self.present(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.wrong(key, "a string", v))
            })
            .transpose()
    }

    /// A token id or a list of them.
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let Some(v) = self.present(key) else {
            return Ok(Vec::new());
        };
        let one = |v: &Value| {
            v.as_u64()
                .map(|n| n as u32)
                .ok_or_else(|| self.wrong(key, "a token id or a list of them", v))
        };
        match v {
            Value::Array(items) => items.iter().map(one).collect(),
            _ => Ok(vec![one(v)?]),
        }
    }
}

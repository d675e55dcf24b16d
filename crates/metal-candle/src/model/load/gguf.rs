//! GGUF files (llama.cpp): the config from the metadata, every tensor dequantised and renamed
//! to the Hugging Face layout, with llama.cpp's Q/K row permutation undone.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::gguf_names::hf_name;
use crate::model::{Architecture, Llama, LlamaConfig, RopeScaling};
use crate::{Error, Result};

/// An opened GGUF file: its metadata and tensor index (tensor data is read on demand).
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    file: File,
    content: Content,
}

impl GgufFile {
    /// Opens `path` and reads its header, metadata and tensor index.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut file)
            .map_err(|e| Error::file(path.display(), format!("not a readable GGUF file: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            content,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header (metadata and tensor infos).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A metadata string, if present and a string.
    pub fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.as_str()))
                .map_err(|_| self.bad_meta(key, "a string", v)),
        }
    }

    /// A non-negative integer metadata value of any integer width.
    pub fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(|n| Some(n as usize))
            .ok_or_else(|| self.bad_meta(key, "a non-negative integer", v))
    }

    /// A floating-point (or integer) metadata value.
    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        match v {
            Value::F32(x) => Ok(Some(*x as f64)),
            Value::F64(x) => Ok(Some(*x)),
            _ => self
                .meta_usize(key)
                .map(|n| n.map(|n| n as f64))
                .map_err(|_| self.bad_meta(key, "a number", v)),
        }
    }

    fn bad_meta(&self, key: &str, want: &str, got: &Value) -> Error {
        Error::file(
            self.path.display(),
            format!("metadata {key:?} should be {want}, got {got:?}"),
        )
    }

    fn require_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)?
            .ok_or_else(|| Error::file(self.path.display(), format!("missing metadata {key:?}")))
    }

    /// The model configuration described by the metadata.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch_name = self
            .meta_str("general.architecture")?
            .unwrap_or("llama")
            .to_string();
        let architecture = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(Error::file(
                    self.path.display(),
                    format!("general.architecture {other:?} is not supported; this loader handles \"llama\" and \"qwen2\""),
                ))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = self.require_usize(&key("embedding_length"))?;
        let num_attention_heads = self.require_usize(&key("attention.head_count"))?;
        let num_key_value_heads = self
            .meta_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        let head_dim = match self.meta_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => self
                .meta_usize(&key("rope.dimension_count"))?
                .unwrap_or(hidden_size / num_attention_heads.max(1)),
        };
        let embed_rows = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0]);
        let vocab_size = match self.meta_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => embed_rows
                .ok_or_else(|| Error::file(self.path.display(), "no token_embd.weight tensor"))?,
        };
        let rope_theta = self.meta_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let rope_scaling = match self.meta_str(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: self.meta_f64(&key("rope.scaling.factor"))?.ok_or_else(|| {
                    Error::file(
                        self.path.display(),
                        "linear rope scaling without rope.scaling.factor",
                    )
                })?,
            },
            Some(other) => {
                return Err(Error::file(
                    self.path.display(),
                    format!("rope scaling type {other:?} is not supported"),
                ))
            }
        };
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(Error::file(
                self.path.display(),
                "has per-frequency RoPE factors (rope_freqs.weight, Llama 3.1-style scaling), which the GGUF loader does not support; load the Hugging Face checkpoint instead",
            ));
        }
        let has = |name: &str| self.content.tensor_infos.contains_key(name);
        let qkv_bias = match architecture {
            Architecture::Qwen2 => true,
            Architecture::Llama => has("blk.0.attn_q.bias"),
        };
        let token_id =
            |k: &str| -> Result<Option<u32>> { Ok(self.meta_usize(k)?.map(|v| v as u32)) };
        let config = LlamaConfig {
            architecture,
            hidden_size,
            intermediate_size: self.require_usize(&key("feed_forward_length"))?,
            num_hidden_layers: self.require_usize(&key("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: self
                .meta_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.meta_usize(&key("context_length"))?.unwrap_or(4096),
            tie_word_embeddings: !has("output.weight"),
            qkv_bias,
            o_bias: has("blk.0.attn_output.bias"),
            mlp_bias: has("blk.0.ffn_up.bias"),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
        };
        config.validate().map_err(|e| {
            Error::file(
                self.path.display(),
                format!("metadata describes an invalid model: {e}"),
            )
        })?;
        Ok(config)
    }

    /// Every tensor dequantised to `dtype` under its Hugging Face name, with the Q/K rows of
    /// llama models un-permuted.
    pub fn hf_tensors(
        &mut self,
        config: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        let mut out = HashMap::with_capacity(names.len());
        for name in names {
            let hf = hf_name(&name).ok_or_else(|| {
                Error::file(self.path.display(), format!("tensor {name:?} has no llama/qwen2 counterpart; is this a llama-family GGUF?"))
            })?;
            let q = self
                .content
                .tensor(&mut self.file, &name, device)
                .map_err(|e| {
                    Error::file(
                        self.path.display(),
                        format!("tensor {name:?}: {e} (truncated or corrupt file?)"),
                    )
                })?;
            let mut t = q.dequantize(device)?;
            // llama.cpp's converter permutes the Q and K rows of llama models (not Qwen2) for
            // its interleaved RoPE; the Hugging Face layout rotates halves.
            if config.architecture == Architecture::Llama {
                if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
                    t = unpermute_rows(&t, config.num_attention_heads)?;
                } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
                    t = unpermute_rows(&t, config.num_key_value_heads)?;
                }
            }
            out.insert(hf, t.to_dtype(dtype)?);
        }
        Ok(out)
    }

    /// Loads the model in `dtype` on `device`.
    pub fn load_model(&mut self, dtype: DType, device: &Device) -> Result<Llama> {
        let config = self.config()?;
        let tensors = self.hf_tensors(&config, dtype, device)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Llama::load(vb, &config).map_err(|e| {
            Error::file(
                self.path.display(),
                format!("tensors do not fit the metadata: {e}"),
            )
        })
    }
}

/// Undoes llama.cpp's permutation of Q/K rows: each head's rows, stored as (head_dim/2, 2)
/// interleaved pairs, go back to (2, head_dim/2) halves. Works on weights (rows, in) and
/// biases (rows,).
pub fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    regroup_rows(t, heads, true)
}

/// llama.cpp's permutation of Q/K rows (the inverse of [`unpermute_rows`]), as its converter
/// applies it; used to write GGUF files in tests.
pub fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    regroup_rows(t, heads, false)
}

fn regroup_rows(t: &Tensor, heads: usize, undo: bool) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::shape(
            "unpermute_rows",
            format!("{rows} rows cannot be split into {heads} heads of pairs"),
        ));
    }
    let half = rows / heads / 2;
    let cols: usize = dims[1..].iter().product();
    let grouped = if undo {
        (heads, half, 2, cols)
    } else {
        (heads, 2, half, cols)
    };
    Ok(t.reshape(grouped)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

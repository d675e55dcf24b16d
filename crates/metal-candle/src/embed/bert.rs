//! A BERT encoder (the family of all-MiniLM-L6-v2) on this crate's fused ops: LayerNorm through
//! [`ops::layer_norm`], attention probabilities through [`ops::softmax_last_dim`].
//!
//! Weights use the Hugging Face names (`embeddings.word_embeddings.weight`,
//! `encoder.layer.{i}.attention.self.query.weight`, ...), with or without a `bert.` prefix.
//! Loading folds two things into the weights once: the query, key and value projections become
//! one (3·hidden, hidden) matrix, so each layer runs one projection GEMM instead of three; and
//! the attention scale 1/√head_dim is folded into the query rows.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use super::config::{BertConfig, HiddenAct};
use crate::{ops, Error, Result};

/// `x·Wᵀ + b` for x of any rank (flattened to 2-D for one GEMM).
#[derive(Debug, Clone)]
struct Dense {
    weight_t: Tensor,
    bias: Tensor,
}

impl Dense {
    fn load(vb: &VarBuilder, out_dim: usize, in_dim: usize) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = vb.get(out_dim, "bias")?;
        Self::new(weight, bias)
    }

    fn new(weight: Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?,
            bias,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let y = x
            .reshape((rows, in_dim))?
            .matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?;
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = self.bias.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        // Old checkpoints call the parameters gamma and beta.
        let (w, b) = if vb.contains_tensor("gamma") {
            ("gamma", "beta")
        } else {
            ("weight", "bias")
        };
        Ok(Self {
            weight: vb.get(dim, w)?,
            bias: vb.get(dim, b)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    qkv: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    out_norm: LayerNorm,
}

impl Layer {
    fn load(vb: &VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        let sa = att.pp("self");
        let scale = 1.0 / (cfg.head_dim() as f64).sqrt();
        let q = Dense::load(&sa.pp("query"), h, h)?;
        let k = Dense::load(&sa.pp("key"), h, h)?;
        let v = Dense::load(&sa.pp("value"), h, h)?;
        let weight = Tensor::cat(
            &[(q.weight_t.t()? * scale)?, k.weight_t.t()?, v.weight_t.t()?],
            0,
        )?;
        let bias = Tensor::cat(&[(q.bias * scale)?, k.bias, v.bias], 0)?;
        // Contiguous (in, 3h) so the GEMM reads the transposed weight without a copy per call.
        let qkv = Dense {
            weight_t: weight.t()?.contiguous()?,
            bias,
        };
        Ok(Self {
            qkv,
            attn_out: Dense::load(&att.pp("output").pp("dense"), h, h)?,
            attn_norm: LayerNorm::load(&att.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            intermediate: Dense::load(
                &vb.pp("intermediate").pp("dense"),
                cfg.intermediate_size,
                h,
            )?,
            output: Dense::load(&vb.pp("output").pp("dense"), h, cfg.intermediate_size)?,
            out_norm: LayerNorm::load(&vb.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
        })
    }

    /// `mask_bias`: (batch, 1, 1, seq), 0 for tokens and a large negative number for padding.
    fn forward(&self, x: &Tensor, mask_bias: &Tensor, cfg: &BertConfig) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let (nh, hd) = (cfg.num_attention_heads, cfg.head_dim());
        // (b, t, 3h) -> (3, b, nh, t, hd)
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, t, 3, nh, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask_bias)?;
        let probs = ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        let x = self
            .attn_norm
            .forward(&(self.attn_out.forward(&context)? + x)?)?;
        let inner = self.intermediate.forward(&x)?;
        let inner = match cfg.hidden_act {
            HiddenAct::Gelu => inner.gelu_erf()?,
            HiddenAct::GeluNew => inner.gelu()?,
            HiddenAct::Relu => inner.relu()?,
        };
        self.out_norm.forward(&(self.output.forward(&inner)? + x)?)
    }
}

/// The BERT encoder: embeddings then `num_hidden_layers` transformer layers; returns the last
/// hidden states.
#[derive(Debug, Clone)]
pub struct BertModel {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    config: BertConfig,
}

impl BertModel {
    /// Loads the weights from `vb` (its dtype and device are the model's).
    ///
    /// ```no_run
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarBuilder;
    /// use metal_candle::embed::{BertConfig, BertModel};
    /// # fn main() -> metal_candle::Result<()> {
    /// let dir = std::path::Path::new("all-MiniLM-L6-v2");
    /// let config = BertConfig::from_file(&dir.join("config.json"))?;
    /// let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)? };
    /// let model = BertModel::load(vb, &config)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn load(vb: VarBuilder, config: &BertConfig) -> Result<Self> {
        config.validate()?;
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            return Err(Error::Msg(
                "BERT weights: found neither embeddings.word_embeddings.weight nor bert.embeddings.word_embeddings.weight; \
                 is this a BERT checkpoint?"
                    .into(),
            ));
        };
        let h = config.hidden_size;
        let emb = vb.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(&vb.pp(format!("encoder.layer.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings: emb.get((config.vocab_size, h), "word_embeddings.weight")?,
            position_embeddings: emb.get(
                (config.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            token_type_embeddings: emb
                .get((config.type_vocab_size, h), "token_type_embeddings.weight")?,
            embed_norm: LayerNorm::load(&emb.pp("LayerNorm"), h, config.layer_norm_eps)?,
            layers,
            config: config.clone(),
        })
    }

    /// Random weights (normal, std 0.02; LayerNorm weight 1, bias 0) under the Hugging Face
    /// names for `config`: speed does not depend on the weights, so benchmarks use these.
    pub fn random_weights(
        config: &BertConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![config.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![config.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![config.type_vocab_size, h],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for l in 0..config.num_hidden_layers {
            for (name, out, inp) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
            ] {
                shapes.push((format!("encoder.layer.{l}.{name}.weight"), vec![out, inp]));
                shapes.push((format!("encoder.layer.{l}.{name}.bias"), vec![out]));
            }
            for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
                shapes.push((format!("encoder.layer.{l}.{norm}.weight"), vec![h]));
                shapes.push((format!("encoder.layer.{l}.{norm}.bias"), vec![h]));
            }
        }
        shapes
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.ends_with("LayerNorm.weight") {
                    Tensor::ones(shape, dtype, device)?
                } else if name.ends_with("LayerNorm.bias") {
                    Tensor::zeros(shape, dtype, device)?
                } else {
                    Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
                };
                Ok((name, t))
            })
            .collect()
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.word_embeddings.device()
    }

    /// The dtype of the weights (and of the hidden states).
    pub fn dtype(&self) -> DType {
        self.word_embeddings.dtype()
    }

    /// Last hidden states (batch, seq, hidden) for `input_ids` (batch, seq) under
    /// `attention_mask` (batch, seq; 1 = token, 0 = padding); token types default to 0.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if attention_mask.dims() != [b, t] {
            return Err(Error::shape(
                "BertModel::forward",
                format!(
                    "attention_mask is {:?} but input_ids are [{b}, {t}]",
                    attention_mask.dims()
                ),
            ));
        }
        if t > self.config.max_position_embeddings {
            return Err(Error::shape(
                "BertModel::forward",
                format!(
                    "{t} tokens exceed the model's {} positions; truncate the input",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let words = self
            .word_embeddings
            .embedding_rows(input_ids, self.config.vocab_size)?;
        let positions = self.position_embeddings.narrow(0, 0, t)?;
        let types = match token_type_ids {
            Some(tt) => self
                .token_type_embeddings
                .embedding_rows(tt, self.config.type_vocab_size)?,
            None => self.token_type_embeddings.narrow(0, 0, 1)?.unsqueeze(0)?,
        };
        let x = words.broadcast_add(&positions)?.broadcast_add(&types)?;
        let mut x = self.embed_norm.forward(&x)?;
        let mask_bias = mask_bias(attention_mask, x.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask_bias, &self.config)?;
        }
        Ok(x)
    }
}

/// (batch, seq) mask of 1/0 -> (batch, 1, 1, seq) additive bias: 0 for tokens, the dtype's
/// lowest finite value for padding (what transformers adds).
fn mask_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let lowest = match dtype {
        DType::F16 => f64::from(half::f16::MIN),
        DType::BF16 => f64::from(half::bf16::MIN),
        DType::F64 => f64::MIN,
        _ => f64::from(f32::MIN),
    };
    // (1 - m)·lowest, written so that m = 1 gives exactly 0.
    let bias = mask.to_dtype(DType::F32)?.affine(-lowest, lowest)?;
    Ok(bias.to_dtype(dtype)?.unsqueeze(1)?.unsqueeze(1)?)
}

/// Rows of an embedding table for ids of any shape, with the ids checked against the table.
trait EmbeddingRows {
    fn embedding_rows(&self, ids: &Tensor, rows: usize) -> Result<Tensor>;
}

impl EmbeddingRows for Tensor {
    fn embedding_rows(&self, ids: &Tensor, rows: usize) -> Result<Tensor> {
        let ids = ids.to_dtype(DType::U32)?;
        let max = ids.flatten_all()?.max(D::Minus1)?.to_scalar::<u32>()?;
        if max as usize >= rows {
            return Err(Error::shape(
                "BertModel::forward",
                format!("token id {max} is outside the table of {rows} rows"),
            ));
        }
        let emb = candle_nn::Embedding::new(self.clone(), self.dim(1)?);
        Ok(emb.forward(&ids)?)
    }
}

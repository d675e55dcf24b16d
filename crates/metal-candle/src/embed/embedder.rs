//! Sentences in, vectors out: tokenize, pad each batch to its longest sentence with an
//! attention mask, run the encoder, pool, normalise.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tokenizers::{Tokenizer, TruncationParams};

use super::{l2_normalize, BertConfig, BertModel, Pooling};
use crate::{Error, Result};

/// How sentences are turned into vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmbedOptions {
    /// Inputs longer than this many tokens are cut (sentence-transformers' `max_seq_length`).
    pub max_seq_len: usize,
    /// Pooling of the token vectors.
    pub pooling: Pooling,
    /// L2-normalise each vector.
    pub normalize: bool,
    /// Sentences per forward pass.
    pub batch_size: usize,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            max_seq_len: 256,
            pooling: Pooling::Mean,
            normalize: true,
            batch_size: 32,
        }
    }
}

/// A sentence-embedding model: tokenizer + BERT encoder + pooling (+ normalisation).
///
/// ```no_run
/// use candle_core::{DType, Device};
/// use metal_candle::embed::SentenceEmbedder;
/// # fn main() -> metal_candle::Result<()> {
/// let embedder = SentenceEmbedder::from_dir("all-MiniLM-L6-v2".as_ref(), &Device::Cpu, DType::F32)?;
/// let v = embedder.embed(&["A man is eating food.", "A man is eating bread."])?;
/// let cosine: f32 = v[0].iter().zip(&v[1]).map(|(a, b)| a * b).sum();
/// assert!(cosine > 0.5);
/// # Ok(())
/// # }
/// ```
pub struct SentenceEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    options: EmbedOptions,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Msg(format!("{}: not JSON: {e}", path.display())))
}

/// Reads a tokenizer.json with a message that names the file.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(Error::Msg(format!(
            "{}: tokenizer file not found",
            path.display()
        )));
    }
    Tokenizer::from_file(path).map_err(|e| {
        Error::Msg(format!(
            "{}: not a tokenizers JSON file: {e}",
            path.display()
        ))
    })
}

/// The options a sentence-transformers folder describes: `sentence_bert_config.json`
/// (`max_seq_length`), `1_Pooling/config.json` (mean or CLS) and `modules.json` (normalise when
/// it lists a Normalize module). A plain BERT folder without them gets mean pooling, L2
/// normalisation and the model's own position limit.
pub fn options_from_dir(dir: &Path, config: &BertConfig) -> Result<EmbedOptions> {
    let mut options = EmbedOptions {
        max_seq_len: config.max_position_embeddings.min(512),
        ..Default::default()
    };
    let st_config = dir.join("sentence_bert_config.json");
    if st_config.is_file() {
        if let Some(n) = read_json(&st_config)?["max_seq_length"].as_u64() {
            options.max_seq_len = (n as usize).min(config.max_position_embeddings);
        }
    }
    let pooling = dir.join("1_Pooling").join("config.json");
    if pooling.is_file() {
        let p = read_json(&pooling)?;
        let flag = |k: &str| p[k].as_bool().unwrap_or(false);
        options.pooling = match (
            flag("pooling_mode_mean_tokens"),
            flag("pooling_mode_cls_token"),
        ) {
            (true, false) => Pooling::Mean,
            (false, true) => Pooling::Cls,
            _ => {
                return Err(Error::Msg(format!(
                    "{}: only mean or CLS pooling (one of them) is supported, found {p}",
                    pooling.display()
                )))
            }
        };
    }
    let modules = dir.join("modules.json");
    if modules.is_file() {
        let m = read_json(&modules)?;
        options.normalize = m.as_array().is_some_and(|mods| {
            mods.iter()
                .any(|x| x["type"].as_str().is_some_and(|t| t.ends_with("Normalize")))
        });
    }
    Ok(options)
}

impl SentenceEmbedder {
    /// Puts the pieces together; the tokenizer is set to truncate at `options.max_seq_len` and
    /// not to pad (batches are padded here, to their longest sentence).
    pub fn new(model: BertModel, mut tokenizer: Tokenizer, options: EmbedOptions) -> Result<Self> {
        if options.batch_size == 0 {
            return Err(Error::InvalidConfig {
                name: "batch_size",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        if options.max_seq_len == 0 || options.max_seq_len > model.config().max_position_embeddings
        {
            return Err(Error::InvalidConfig {
                name: "max_seq_len",
                value: options.max_seq_len.to_string(),
                expected: "between 1 and the model's max_position_embeddings",
            });
        }
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: options.max_seq_len,
                ..Default::default()
            }))
            .map_err(|e| Error::Msg(format!("setting truncation on the tokenizer: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            options,
        })
    }

    /// Loads a local sentence-transformers (or plain BERT) folder: `config.json`,
    /// `tokenizer.json`, `model.safetensors`, and the optional files of [`options_from_dir`].
    pub fn from_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let file = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::Msg(format!(
                    "{}: missing; a sentence-embedding model folder needs config.json, tokenizer.json and model.safetensors",
                    p.display()
                )))
            }
        };
        let config = BertConfig::from_file(&file("config.json")?)?;
        let tokenizer = load_tokenizer(&file("tokenizer.json")?)?;
        let weights = file("model.safetensors")?;
        // SAFETY: the file is mapped read-only and not modified while the model lives; candle
        // copies the tensors out of the mapping while loading.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device)? };
        let model = BertModel::load(vb, &config)?;
        let options = options_from_dir(dir, &config)?;
        Self::new(model, tokenizer, options)
    }

    /// The options in use.
    pub fn options(&self) -> &EmbedOptions {
        &self.options
    }

    /// Changes the batch size (sentences per forward pass).
    pub fn set_batch_size(&mut self, batch_size: usize) -> Result<()> {
        if batch_size == 0 {
            return Err(Error::InvalidConfig {
                name: "batch_size",
                value: "0".into(),
                expected: "at least 1",
            });
        }
        self.options.batch_size = batch_size;
        Ok(())
    }

    /// The length of every vector.
    pub fn dim(&self) -> usize {
        self.model.config().hidden_size
    }

    /// The encoder.
    pub fn model(&self) -> &BertModel {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Token ids of each text (with `[CLS]`/`[SEP]`, truncated).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Msg(format!("tokenizing: {e}")))?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// One vector per text, in order. Texts are grouped by length before batching (less
    /// padding), as sentence-transformers does.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = self.tokenize(texts)?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(self.options.batch_size) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            let vectors = self.embed_ids(&batch)?.to_vec2::<f32>()?;
            for (&i, v) in chunk.iter().zip(vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Embeds already-tokenized sentences as one batch: (batch, dim) f32 on the model's device.
    pub fn embed_ids(&self, ids: &[&[u32]]) -> Result<Tensor> {
        let (input, mask) = pad_batch(ids, self.model.config().pad_token_id, self.model.device())?;
        let hidden = self.model.forward(&input, None, &mask)?;
        let pooled = self.options.pooling.apply(&hidden, &mask)?;
        if self.options.normalize {
            l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }
}

/// Right-pads `ids` to the longest row: (input ids, attention mask), both (batch, longest) u32.
pub fn pad_batch(ids: &[&[u32]], pad_id: u32, device: &Device) -> Result<(Tensor, Tensor)> {
    let longest = ids.iter().map(|r| r.len()).max().unwrap_or(0);
    if longest == 0 {
        return Err(Error::shape(
            "pad_batch",
            "no tokens to embed (empty batch or empty rows only)",
        ));
    }
    let mut flat = Vec::with_capacity(ids.len() * longest);
    let mut mask = Vec::with_capacity(ids.len() * longest);
    for row in ids {
        flat.extend_from_slice(row);
        flat.extend(std::iter::repeat_n(pad_id, longest - row.len()));
        mask.extend(std::iter::repeat_n(1u32, row.len()));
        mask.extend(std::iter::repeat_n(0u32, longest - row.len()));
    }
    let shape = (ids.len(), longest);
    Ok((
        Tensor::from_vec(flat, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

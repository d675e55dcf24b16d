//! The BERT configuration, read straight from a Hugging Face `config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// Exact GELU (erf), what `"gelu"` means in transformers.
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    /// ReLU.
    Relu,
}

/// The fields of a BERT `config.json` that the encoder needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Word-piece vocabulary size.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (must divide `hidden_size`).
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Feed-forward activation.
    pub hidden_act: HiddenAct,
    /// Longest input (learned absolute position embeddings).
    pub max_position_embeddings: usize,
    /// Segment (token type) vocabulary size.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Epsilon of every LayerNorm.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Only `"absolute"` is supported.
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position_type() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| Error::Msg(format!("{}: not a BERT config.json: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values the encoder relies on.
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::InvalidConfig {
                name: "num_attention_heads",
                value: format!(
                    "{} (hidden_size {})",
                    self.num_attention_heads, self.hidden_size
                ),
                expected: "a positive divisor of hidden_size",
            });
        }
        if self.position_embedding_type != "absolute" {
            return Err(Error::InvalidConfig {
                name: "position_embedding_type",
                value: self.position_embedding_type.clone(),
                expected: "\"absolute\" (relative position embeddings are not supported)",
            });
        }
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

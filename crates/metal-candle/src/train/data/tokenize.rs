//! The little the data pipeline needs from a tokenizer.

use crate::{Error, Result};

/// Text to token ids. Implemented for `tokenizers::Tokenizer`; tests use a byte tokenizer.
pub trait EncodeText {
    /// The ids of `text`, with no special tokens added around it (special tokens written in
    /// the text itself, such as a chat template's `<|im_start|>`, are still recognised).
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The end-of-sequence id appended after each document or completion, if the model has one.
    fn eos_id(&self) -> Option<u32>;
}

impl EncodeText for tokenizers::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = std::ops::Deref::deref(self)
            .encode(text, false)
            .map_err(|e| {
                Error::Msg(format!(
                    "tokenizer failed on {:?}...: {e}",
                    text.chars().take(40).collect::<String>()
                ))
            })?;
        Ok(enc.get_ids().to_vec())
    }

    fn eos_id(&self) -> Option<u32> {
        [
            "<|im_end|>",
            "<|endoftext|>",
            "</s>",
            "<|end_of_text|>",
            "<|eot_id|>",
            "<eos>",
        ]
        .iter()
        .find_map(|t| self.token_to_id(t))
    }
}

impl EncodeText for crate::model::load::TextTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        crate::model::load::TextTokenizer::encode(self, text, false)
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos_token_ids().first().copied()
    }
}

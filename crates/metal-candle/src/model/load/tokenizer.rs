//! A tokenizer with what generation and chat need beside it: the chat template and the
//! beginning/end-of-sequence tokens.

use std::path::Path;

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::gguf::GgufFile;
use super::gguf_tokenizer::tokenizer_from_gguf;
use crate::fs::{write_atomic, write_json_atomic};
use crate::model::LlamaConfig;
use crate::{Error, Result};

/// A `tokenizers` tokenizer plus the chat template and special tokens of its model.
///
/// Made from a Hugging Face folder ([`TextTokenizer::from_hf_dir`]: `tokenizer.json`,
/// `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`) or rebuilt from
/// GGUF metadata ([`TextTokenizer::from_gguf`]).
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
}

impl TextTokenizer {
    /// Wraps a tokenizer with its chat template and special tokens.
    pub fn new(
        tokenizer: Tokenizer,
        chat_template: Option<String>,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        let bos_token = bos_token_id.and_then(|id| tokenizer.id_to_token(id));
        let eos_token = eos_token_ids
            .first()
            .and_then(|&id| tokenizer.id_to_token(id));
        Self {
            tokenizer,
            chat_template,
            bos_token,
            eos_token,
            bos_token_id,
            eos_token_ids,
        }
    }

    /// Reads the tokenizer of a Hugging Face folder. `config` supplies the special token ids
    /// when the tokenizer files do not.
    pub fn from_hf_dir(dir: &Path, config: Option<&LlamaConfig>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::file(
                dir.display(),
                "no tokenizer.json in this folder",
            ));
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| {
            Error::file(
                path.display(),
                format!("not a readable tokenizer.json: {e}"),
            )
        })?;

        let tok_config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let gen_config = read_json_if_present(&dir.join("generation_config.json"))?;
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else {
            tok_config
                .as_ref()
                .and_then(|c| chat_template_of(c.get("chat_template")?))
        };
        let special = |key: &str| tok_config.as_ref().and_then(|c| token_content(c.get(key)?));
        let id_of = |tok: Option<String>| tok.and_then(|t| tokenizer.token_to_id(&t));

        let bos_token_id = gen_config
            .as_ref()
            .and_then(|g| token_ids(g.get("bos_token_id")?).first().copied())
            .or_else(|| config.and_then(|c| c.bos_token_id))
            .or_else(|| id_of(special("bos_token")));
        let mut eos_token_ids = gen_config
            .as_ref()
            .and_then(|g| g.get("eos_token_id"))
            .map(token_ids)
            .unwrap_or_default();
        if eos_token_ids.is_empty() {
            eos_token_ids = config.map(|c| c.eos_token_ids.clone()).unwrap_or_default();
        }
        if let Some(id) = id_of(special("eos_token")) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.insert(0, id);
            }
        }
        Ok(Self::new(
            tokenizer,
            chat_template,
            bos_token_id,
            eos_token_ids,
        ))
    }

    /// Rebuilds the tokenizer a GGUF file describes (byte-level BPE: Llama 3, SmolLM2, Qwen2),
    /// with the chat template and special tokens of its metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let tokenizer = tokenizer_from_gguf(gguf)?;
        let chat_template = gguf.meta_str("tokenizer.chat_template")?.map(str::to_owned);
        let bos = gguf
            .meta_usize("tokenizer.ggml.bos_token_id")?
            .map(|v| v as u32);
        let eos = gguf
            .meta_usize("tokenizer.ggml.eos_token_id")?
            .map(|v| v as u32);
        Ok(Self::new(
            tokenizer,
            chat_template,
            bos,
            eos.into_iter().collect(),
        ))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The Jinja chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The beginning-of-sequence token id.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The tokens that end generation (first = the tokenizer's `eos_token`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The beginning-of-sequence token text.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The end-of-sequence token text.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Token ids of `text`; `add_special_tokens` adds what the tokenizer's post-processor adds
    /// (e.g. a BOS token).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Msg(format!("tokenizing text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; `skip_special_tokens` drops special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Msg(format!("decoding tokens: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (with the chat template and special
    /// tokens) into `dir`, each atomically, so Hugging Face `AutoTokenizer` can read them.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let text = self
            .tokenizer
            .to_string(false)
            .map_err(|e| Error::Msg(format!("serialising the tokenizer: {e}")))?;
        write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
        let mut config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
            "add_bos_token": false,
        });
        if let Some(t) = &self.bos_token {
            config["bos_token"] = json!(t);
        }
        if let Some(t) = &self.eos_token {
            config["eos_token"] = json!(t);
        }
        if let Some(t) = &self.chat_template {
            config["chat_template"] = json!(t);
        }
        write_json_atomic(&dir.join("tokenizer_config.json"), &config)
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::file(path.display(), format!("not valid JSON: {e}")))
}

/// A special token given as `"<s>"` or `{"content": "<s>", ...}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// A chat template given as a string or as a list of named templates (the "default" one).
fn chat_template_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let named = |name: &str| {
                items
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            };
            named("default")
                .or(items.first())?
                .get("template")?
                .as_str()
                .map(str::to_owned)
        }
        _ => None,
    }
}

fn token_ids(v: &Value) -> Vec<u32> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        other => other.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
    }
}

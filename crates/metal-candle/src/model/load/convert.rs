//! Writing a model out as a Hugging Face folder (what `metal-candle convert` does).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use serde_json::json;

use super::gguf::GgufFile;
use super::tokenizer::TextTokenizer;
use crate::fs::{write_atomic_with, write_json_atomic};
use crate::model::Llama;
use crate::{Error, Result};

/// Writes `model` (adapters not included: merge them first) and, if given, its tokenizer into
/// `dir` as a Hugging Face folder: `config.json`, `generation_config.json`,
/// `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`. Each file is written
/// atomically; `dir` is created if needed.
pub fn save_hf_dir(model: &Llama, tokenizer: Option<&TextTokenizer>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut config = model.config().to_hf_json();
    config["torch_dtype"] = json!(torch_dtype_name(model.dtype()));
    let mut generation = json!({});
    if let Some(t) = tokenizer {
        if let Some(bos) = t.bos_token_id() {
            config["bos_token_id"] = json!(bos);
            generation["bos_token_id"] = json!(bos);
        }
        match t.eos_token_ids() {
            [] => {}
            [one] => {
                config["eos_token_id"] = json!(one);
                generation["eos_token_id"] = json!(one);
            }
            many => {
                config["eos_token_id"] = json!(many);
                generation["eos_token_id"] = json!(many);
            }
        }
    }
    let weights: HashMap<String, candle_core::Tensor> = model
        .named_weights()?
        .into_iter()
        .map(|(name, t)| t.contiguous().map(|t| (name, t)))
        .collect::<candle_core::Result<_>>()?;
    let weights_path = dir.join("model.safetensors");
    write_atomic_with(&weights_path, |tmp| {
        candle_core::safetensors::save(&weights, tmp)
            .map_err(|e| Error::file(weights_path.display(), format!("cannot write: {e}")))
    })?;
    write_json_atomic(&dir.join("config.json"), &config)?;
    write_json_atomic(&dir.join("generation_config.json"), &generation)?;
    if let Some(t) = tokenizer {
        t.save_hf(dir)?;
    }
    Ok(())
}

/// Converts a GGUF model (dequantised to `dtype`) and its tokenizer to a Hugging Face folder.
pub fn convert_gguf_to_hf(gguf_path: &Path, out_dir: &Path, dtype: DType) -> Result<()> {
    let mut gguf = GgufFile::open(gguf_path)?;
    let tokenizer = TextTokenizer::from_gguf(&gguf)?;
    let model = gguf.load_model(dtype, &Device::Cpu)?;
    save_hf_dir(&model, Some(&tokenizer), out_dir)
}

fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

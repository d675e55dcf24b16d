//! Hugging Face folders: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::model::{Llama, LlamaConfig};
use crate::{Error, Result};

/// The weight files of a Hugging Face folder: `model.safetensors`, or every shard named by
/// `model.safetensors.index.json` (each checked to exist).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if !index.is_file() {
        return Err(Error::file(
            dir.display(),
            "no model.safetensors or model.safetensors.index.json in this folder; is it a Hugging Face model folder?",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(index.display(), format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(index.display(), "no \"weight_map\" object"))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::file(
                index.display(),
                format!("weight_map[{tensor:?}] is not a file name"),
            )
        })?;
        shards.insert(file.to_string());
    }
    let mut files = Vec::new();
    for shard in shards {
        let path = dir.join(&shard);
        if !path.is_file() {
            return Err(Error::file(
                index.display(),
                format!("lists shard {shard:?}, which is not in {}", dir.display()),
            ));
        }
        files.push(path);
    }
    if files.is_empty() {
        return Err(Error::file(index.display(), "weight_map is empty"));
    }
    Ok(files)
}

/// Memory-maps safetensors files, checking each (a truncated or corrupt file is reported by
/// name).
pub fn mmap_safetensors(files: &[PathBuf]) -> Result<MmapedSafetensors> {
    for f in files {
        // SAFETY: the file is only read; a file changed on disk while mapped is the usual
        // caveat of mmap, accepted by every safetensors loader.
        unsafe { MmapedSafetensors::new(f) }.map_err(|e| {
            Error::file(f.display(), format!("not a readable safetensors file: {e}"))
        })?;
    }
    // SAFETY: as above.
    unsafe { MmapedSafetensors::multi(files) }
        .map_err(|e| Error::Msg(format!("reading safetensors files: {e}")))
}

/// Loads a llama-family model from a Hugging Face folder in `dtype` on `device`.
///
/// ```no_run
/// use candle_core::{DType, Device};
/// # fn main() -> metal_candle::Result<()> {
/// let model = metal_candle::model::load::load_hf_dir("SmolLM2-135M-Instruct".as_ref(), DType::BF16, &Device::Cpu)?;
/// # Ok(())
/// # }
/// ```
pub fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Llama> {
    let config = LlamaConfig::from_file(dir.join("config.json"))?;
    let files = safetensors_files(dir)?;
    let weights = mmap_safetensors(&files)?;
    let vb = VarBuilder::from_backend(Box::new(weights), dtype, device.clone());
    Llama::load(vb, &config).map_err(|e| {
        Error::file(
            dir.display(),
            format!("weights do not fit config.json: {e}"),
        )
    })
}

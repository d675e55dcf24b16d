//! Loading llama-family models and their tokenizers.
//!
//! | source | function |
//! |---|---|
//! | anything a user may type (folder, `.gguf`, Hub id) | [`load`] |
//! | Hugging Face folder (config.json + safetensors, sharded or not) | [`load_hf_dir`] |
//! | GGUF file (dequantised, Q/K un-permuted) | [`GgufFile::load_model`] |
//! | tokenizer.json / GGUF metadata | [`TextTokenizer`] |
//! | writing a Hugging Face folder | [`save_hf_dir`], [`convert_gguf_to_hf`] |
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use metal_candle::model::load::{load, ModelSource};
//! # fn main() -> metal_candle::Result<()> {
//! let loaded = load(&ModelSource::parse("SmolLM2-135M-Instruct.Q4_1.gguf")?, DType::F32, &Device::Cpu)?;
//! let ids = loaded.tokenizer.encode("The capital of France is", false)?;
//! # Ok(())
//! # }
//! ```

mod convert;
mod gguf;
mod gguf_names;
mod gguf_tokenizer;
mod hf;
mod random;
mod source;
mod tokenizer;

use std::path::PathBuf;

use candle_core::{DType, Device};

pub use convert::{convert_gguf_to_hf, save_hf_dir};
pub use gguf::{permute_rows, unpermute_rows, GgufFile};
pub use gguf_names::{gguf_name, hf_name};
pub use hf::{load_hf_dir, mmap_safetensors, safetensors_files};
pub use random::RandomWeights;
pub use source::ModelSource;
pub use tokenizer::TextTokenizer;

use crate::model::Llama;
use crate::Result;

/// A model with its tokenizer, and the local path it came from.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The model.
    pub model: Llama,
    /// Its tokenizer (from tokenizer.json or the GGUF metadata).
    pub tokenizer: TextTokenizer,
    /// The folder or GGUF file the model was read from.
    pub path: PathBuf,
}

/// Loads a model and its tokenizer from a folder, a GGUF file or a Hub id (see
/// [`ModelSource::resolve`]), in `dtype` on `device`.
pub fn load(source: &ModelSource, dtype: DType, device: &Device) -> Result<LoadedModel> {
    match source.resolve()? {
        ModelSource::HfDir(dir) => {
            let model = load_hf_dir(&dir, dtype, device)?;
            let tokenizer = TextTokenizer::from_hf_dir(&dir, Some(model.config()))?;
            Ok(LoadedModel {
                model,
                tokenizer,
                path: dir,
            })
        }
        ModelSource::Gguf(path) => {
            let mut gguf = GgufFile::open(&path)?;
            let tokenizer = TextTokenizer::from_gguf(&gguf)?;
            let model = gguf.load_model(dtype, device)?;
            Ok(LoadedModel {
                model,
                tokenizer,
                path,
            })
        }
        ModelSource::Hub { .. } => unreachable_hub(),
    }
}

/// `resolve` always returns a local source; this keeps the match exhaustive without a panic.
fn unreachable_hub() -> Result<LoadedModel> {
    Err(crate::Error::Msg(
        "internal: a Hub id was not resolved to a local folder".into(),
    ))
}

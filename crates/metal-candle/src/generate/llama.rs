//! The llama-family model of [`crate::model`] as a [`DecoderLm`]: the model with its KV cache,
//! and run-time control of its LoRA adapters (unmerged, merged, swapped, removed) without
//! reloading the base weights.

use candle_core::{Device, Tensor};

use super::DecoderLm;
use crate::lora::LoRALayer;
use crate::model::{KvCache, Llama, SequenceLayout};
use crate::Result;

/// A [`Llama`] with its KV cache, ready for [`super::generate_text`].
///
/// Adapters: [`CachedLlama::set_adapters`] attaches a set (unmerged: the base weights stay as
/// loaded and the fused LoRA path runs), [`CachedLlama::clear_adapters`] removes it,
/// [`CachedLlama::merge_adapters`] folds the attached set into the weights for decoding speed.
/// Swapping is `set_adapters` with another set; only the adapter tensors move.
pub struct CachedLlama {
    model: Llama,
    cache: KvCache,
}

impl CachedLlama {
    /// Wraps `model` with an empty cache.
    pub fn new(model: Llama) -> Self {
        let cache = model.new_cache();
        Self { model, cache }
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The model, for changes the methods here do not cover (the cache is cleared on the next
    /// generation anyway).
    pub fn model_mut(&mut self) -> &mut Llama {
        &mut self.model
    }

    /// Unwraps the model.
    pub fn into_inner(self) -> Llama {
        self.model
    }

    /// Attaches `adapters` (projection path as [`Llama::lora_adapters`] names them, layer),
    /// unmerged, after removing any adapter attached before.
    pub fn set_adapters(&mut self, adapters: Vec<(String, LoRALayer)>) -> Result<()> {
        self.model.clear_lora()?;
        for (path, layer) in adapters {
            self.model
                .projection_by_path_mut(&path)?
                .set_adapter(Some(layer))?;
        }
        self.cache.reset();
        Ok(())
    }

    /// Removes every adapter: the base model again.
    pub fn clear_adapters(&mut self) -> Result<()> {
        self.model.clear_lora()?;
        self.cache.reset();
        Ok(())
    }

    /// Folds the attached adapters into the weights (`W + scale·(A·B)ᵀ`): the same outputs as
    /// unmerged, with no LoRA work per token. The base weights are replaced; keep the adapters
    /// (and load the base again) to undo it.
    pub fn merge_adapters(&mut self) -> Result<()> {
        self.model = self.model.merged()?;
        self.cache.reset();
        Ok(())
    }
}

impl DecoderLm for CachedLlama {
    fn forward(&mut self, input_ids: &Tensor, offset: usize) -> Result<Tensor> {
        if offset != self.cache.len() {
            return Err(crate::Error::Msg(format!(
                "CachedLlama: step at position {offset} but the cache holds {} positions",
                self.cache.len()
            )));
        }
        self.model.forward_last(
            input_ids,
            &SequenceLayout::Contiguous { offset },
            Some(&mut self.cache),
        )
    }

    fn clear_cache(&mut self) {
        self.cache.reset();
    }

    fn device(&self) -> &Device {
        self.model.device()
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.model.config().max_position_embeddings)
    }
}

//! What the trainer needs from a model: logits for a batch, and its LoRA-capable linear layers.

use candle_core::{Device, Tensor};

use super::data::Batch;
use crate::lora::LoraLinear;
use crate::Result;

/// A causal language model whose linear layers can carry LoRA adapters.
///
/// Module paths are those of the Hugging Face checkpoint (`model.layers.3.self_attn.q_proj`),
/// which is also what PEFT's adapter keys are built from.
pub trait CausalLm {
    /// Logits (batch, seq, vocab) for `batch`, attending only within each packed example
    /// (`batch.segment_ids`) with positions `batch.position_ids`.
    fn forward_batch(&self, batch: &Batch) -> Result<Tensor>;

    /// Every linear layer LoRA may adapt, with its module path.
    fn lora_linears(&self) -> Vec<(String, &LoraLinear)>;

    /// The linear layer at a module path from [`CausalLm::lora_linears`], mutable (to attach,
    /// replace or merge its adapter); `None` if the model has no such layer.
    fn lora_linear_mut(&mut self, path: &str) -> Option<&mut LoraLinear>;

    /// The device the weights live on.
    fn device(&self) -> &Device;
}

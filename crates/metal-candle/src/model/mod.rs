//! The llama family (Llama 2/3, SmolLM2, Qwen2) in this crate's own code, so LoRA can target
//! any of the seven projections of a layer, and its loaders.
//!
//! - [`LlamaConfig`]: the model's shape, read from `config.json` or GGUF metadata.
//! - [`Llama`]: the model; [`Llama::forward`] with a [`KvCache`] for generation,
//!   [`Llama::forward_fixed_step`] with a [`FixedStep`] for decoding steps a CUDA graph replays,
//!   [`Llama::forward_with_layout`] for padded or packed batches ([`SequenceLayout`]).
//! - LoRA: [`Llama::add_lora`] with a [`LoraSpec`], [`Llama::lora_adapters`] (PEFT names),
//!   [`Llama::trainable_vars`], [`Llama::set_training`], [`Llama::merged`].
//! - [`load`]: Hugging Face folders, GGUF files, Hub ids, tokenizers.

mod attention;
mod cache;
mod config;
mod fixed_step;
mod fused;
mod layer;
mod layout;
mod linear;
mod llama;
pub mod load;
mod mlp;
mod rope;
mod targets;

pub use attention::Attention;
pub use cache::KvCache;
pub use config::{Architecture, LlamaConfig, RopeScaling};
pub use fixed_step::FixedStep;
pub use layer::DecoderLayer;
pub use layout::SequenceLayout;
pub use llama::{Llama, LoraSpec};
pub use mlp::Mlp;
pub use rope::{Rope, RopeTables};
pub use targets::{TargetModule, PEFT_PREFIX};

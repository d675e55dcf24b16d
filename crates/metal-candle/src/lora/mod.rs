//! LoRA adapters: configuration, the adapter layer, the linear layer a model runs, choosing
//! target layers, and PEFT-format files.

mod config;
mod layer;
mod linear;
pub mod peft;
mod targets;

pub use config::LoRAConfig;
pub use layer::LoRALayer;
pub use linear::LoraLinear;
pub use peft::{merge_into_weights, save_peft_adapter, PeftAdapter, PeftConfig};
pub use targets::{
    adapter_vars, attach_adapters, merge_adapters, parse_targets, seed_adapter_dropout,
    set_adapters_training, AdapterSpec, LLAMA_TARGETS,
};

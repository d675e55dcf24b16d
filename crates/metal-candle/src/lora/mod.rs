//! LoRA adapters: configuration, the adapter layer, and the linear layer a model runs.

mod config;
mod layer;
mod linear;

pub use config::LoRAConfig;
pub use layer::LoRALayer;
pub use linear::LoraLinear;

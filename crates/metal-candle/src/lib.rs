//! # metal-candle
//!
//! LoRA fine-tuning and inference for transformer language models on
//! [Candle](https://github.com/huggingface/candle), with fused kernels — LoRA, softmax, RMSNorm
//! and LayerNorm, forward **and** backward — wired into candle's autograd.
//!
//! Backends: the CPU kernels are always built and tested; CUDA kernels come with the `cuda`
//! feature; on Metal (`metal` feature) every op takes candle's own composed path, and Metal is
//! untested by this project.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use metal_candle::training::{LoRAConfig, LoRALayer};
//!
//! # fn main() -> metal_candle::Result<()> {
//! let device = Device::Cpu;
//! let config = LoRAConfig::new(512, 512, 8, 16.0); // in, out, rank, alpha
//! let lora = LoRALayer::new(512, 512, &config, &device)?;
//! let input = Tensor::randn(0f32, 1f32, (1, 128, 512), &device)?;
//! let output = lora.forward(&input)?; // fused where the device has a kernel
//! assert_eq!(output.dims(), &[1, 128, 512]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod alloc;
pub mod assets;
pub mod autograd;
pub mod backend;
pub mod embed;
mod error;
pub mod fs;
pub mod generate;
pub mod lora;
pub mod model;
pub mod ops;
pub mod train;

pub use error::{Error, Result};

/// The seed documents' path to the LoRA layer: `metal_candle::training::{LoRALayer, LoRAConfig}`.
pub mod training {
    pub use crate::lora::{LoRAConfig, LoRALayer, LoraLinear};
}

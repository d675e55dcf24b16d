//! Text generation: a KV-cached decoding loop, a composable seeded sampling chain, streaming of
//! valid UTF-8 text, stop strings and chat templates.
//!
//! The loop works with any model that implements [`DecoderLm`]; see [`generate_text`] for the
//! usual entry point and [`SamplingConfig`] for the knobs.

mod chat;
#[cfg(feature = "cuda")]
mod decode_graph;
mod generator;
#[cfg(feature = "cuda")]
pub(crate) mod graph_check;
mod llama;
mod sampling;
mod stream;

pub use chat::{ChatTemplate, Message};
pub use generator::{
    generate_batch, generate_text, generate_tokens, DecoderLm, FinishReason, GeneratedText,
    GeneratedTokens, GenerationConfig, GenerationStats,
};
pub use llama::CachedLlama;
pub use sampling::{Sampler, SamplingConfig, Step};
pub use stream::{StopStrings, TextStreamer};

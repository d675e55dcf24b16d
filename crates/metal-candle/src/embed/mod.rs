//! Sentence embeddings with the BERT family (all-MiniLM-L6-v2 and its kin): batched with
//! padding and an attention mask, mean pooling, L2 normalisation — the pipeline of
//! sentence-transformers, on this crate's fused LayerNorm and softmax.
//!
//! Start with [`SentenceEmbedder::from_dir`].

mod bert;
mod config;
mod embedder;
mod pooling;

pub use bert::BertModel;
pub use config::{BertConfig, HiddenAct};
pub use embedder::{load_tokenizer, options_from_dir, pad_batch, EmbedOptions, SentenceEmbedder};
pub use pooling::{l2_normalize, mean_pool, Pooling};

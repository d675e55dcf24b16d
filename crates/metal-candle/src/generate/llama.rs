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
///
/// On a CUDA device, single-token decoding steps run as a CUDA graph (see
/// [`CachedLlama::set_cuda_graphs`]): the first step after a prefill runs eagerly and is
/// captured, later ones replay the capture, with the same logits as the eager step.
pub struct CachedLlama {
    model: Llama,
    cache: KvCache,
    cuda_graphs: bool,
    /// Decoding steps captured as graphs so far.
    captures: usize,
    #[cfg(feature = "cuda")]
    graph: Option<super::decode_graph::DecodeGraph>,
}

/// Positions a captured decoding step's cache holds at least: a capture costs about one
/// eager step, so the cache is grown in large strides rather than per token.
#[cfg(feature = "cuda")]
const GRAPH_MIN_CAPACITY: usize = 512;

impl CachedLlama {
    /// Wraps `model` with an empty cache.
    pub fn new(model: Llama) -> Self {
        let cache = model.new_cache();
        let cuda_graphs = model.device().is_cuda();
        Self {
            model,
            cache,
            cuda_graphs,
            captures: 0,
            #[cfg(feature = "cuda")]
            graph: None,
        }
    }

    /// Chooses whether single-token decoding steps on a CUDA device replay a CUDA graph (on
    /// by default there) or launch every kernel from the host (what other devices do). The
    /// two give the same logits; graphs remove the host's per-kernel cost, which otherwise
    /// bounds small-batch decoding speed.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarBuilder;
    /// use metal_candle::generate::CachedLlama;
    /// use metal_candle::model::{Llama, LlamaConfig};
    /// # fn main() -> metal_candle::Result<()> {
    /// let json = r#"{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    ///   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50}"#;
    /// let config = LlamaConfig::from_json_str(json, "config.json")?;
    /// let model = Llama::load(VarBuilder::zeros(DType::F32, &Device::Cpu), &config)?;
    /// let mut lm = CachedLlama::new(model);
    /// assert!(!lm.cuda_graphs()); // a CPU model launches its kernels itself
    /// lm.set_cuda_graphs(true); // asks for graphs, used only on a CUDA device
    /// assert!(!lm.cuda_graphs());
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.cuda_graphs = on;
        self.drop_graph();
    }

    /// Whether decoding steps replay CUDA graphs (asked for, and the model is on CUDA with
    /// the `cuda` feature).
    pub fn cuda_graphs(&self) -> bool {
        cfg!(feature = "cuda") && self.cuda_graphs && self.model.device().is_cuda()
    }

    /// How many decoding steps have been captured as CUDA graphs: one at the first decoding
    /// step, then one whenever the batch size changes or the cache outgrows the captured
    /// capacity (later prompts of the same batch size replay the same capture).
    pub fn graph_captures(&self) -> usize {
        self.captures
    }

    /// Forgets the captured step (its weights or cache buffers are about to change).
    fn drop_graph(&mut self) {
        #[cfg(feature = "cuda")]
        {
            self.graph = None;
        }
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The model, for changes the methods here do not cover (the cache is cleared on the next
    /// generation anyway).
    pub fn model_mut(&mut self) -> &mut Llama {
        self.drop_graph();
        &mut self.model
    }

    /// Unwraps the model.
    pub fn into_inner(self) -> Llama {
        self.model
    }

    /// Attaches `adapters` (projection path as [`Llama::lora_adapters`] names them, layer),
    /// unmerged, after removing any adapter attached before.
    pub fn set_adapters(&mut self, adapters: Vec<(String, LoRALayer)>) -> Result<()> {
        self.drop_graph();
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
        self.drop_graph();
        self.model.clear_lora()?;
        self.cache.reset();
        Ok(())
    }

    /// Folds the attached adapters into the weights (`W + scale·(A·B)ᵀ`): the same outputs as
    /// unmerged, with no LoRA work per token. The base weights are replaced; keep the adapters
    /// (and load the base again) to undo it.
    pub fn merge_adapters(&mut self) -> Result<()> {
        self.drop_graph();
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
        #[cfg(feature = "cuda")]
        if offset > 0 && input_ids.dim(1)? == 1 && self.cuda_graphs() {
            return self.graph_step(input_ids, offset);
        }
        self.model.forward_last(
            input_ids,
            &SequenceLayout::Contiguous { offset },
            Some(&mut self.cache),
        )
    }

    /// Empties the cache but keeps its buffers (and so a captured decoding step, which
    /// writes into them): the next prompt of the same batch size replays it without a new
    /// capture.
    fn clear_cache(&mut self) {
        self.cache
            .truncate(0)
            .expect("truncating to 0 positions cannot fail");
    }

    fn device(&self) -> &Device {
        self.model.device()
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.model.config().max_position_embeddings)
    }
}

#[cfg(feature = "cuda")]
impl CachedLlama {
    /// One decoding step through the CUDA graph, capturing it first when there is none that
    /// fits (first step, another batch size, or a cache that must grow).
    fn graph_step(&mut self, input_ids: &Tensor, offset: usize) -> Result<Tensor> {
        use super::decode_graph::DecodeGraph;
        let ids: Vec<u32> = input_ids
            .to_dtype(candle_core::DType::U32)?
            .flatten_all()?
            .to_vec1()?;
        let positions = vec![offset as u32; ids.len()];
        let vocab = self.model.config().vocab_size;
        let fits = self
            .graph
            .as_ref()
            .is_some_and(|g| g.fits(&self.cache, ids.len(), offset));
        let logits = if fits {
            let graph = self.graph.as_ref().expect("checked above");
            graph.replay(&ids, &positions, vocab)?
        } else {
            self.graph = None;
            let limit = self.model.config().max_position_embeddings.max(offset + 1);
            let capacity = (offset + 1)
                .next_power_of_two()
                .max(GRAPH_MIN_CAPACITY)
                .max(self.cache.capacity())
                .min(limit);
            self.cache.reserve(capacity)?;
            let (graph, logits) =
                DecodeGraph::capture(&self.model, &mut self.cache, &ids, &positions)?;
            self.graph = Some(graph);
            self.captures += 1;
            logits
        };
        self.cache.advance(1)?;
        Ok(logits)
    }
}

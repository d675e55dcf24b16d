//! The llama-family causal language model.

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarBuilder;

use super::fixed_step::FixedStep;
use super::layer::DecoderLayer;
use super::layout::{AttentionMask, SequenceLayout};
use super::rope::{Rope, RopeTables};
use super::targets::TargetModule;
use super::{KvCache, LlamaConfig};
use crate::lora::{LoRAConfig, LoRALayer, LoraLinear};
use crate::{ops, Error, Result};

/// Which projections get a fresh LoRA adapter, and its hyper-parameters.
///
/// ```
/// use metal_candle::model::{LoraSpec, TargetModule};
/// let spec = LoraSpec::new(16, 32.0).with_targets(&TargetModule::ALL).with_dropout(0.05);
/// assert_eq!(spec.targets.len(), 7);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank r.
    pub rank: usize,
    /// Alpha (the update is scaled by alpha / r, or alpha / √r with rsLoRA).
    pub alpha: f64,
    /// Dropout on the LoRA input in training mode.
    pub dropout: f64,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// The projections to adapt (default: q and v, as PEFT's default for llama).
    pub targets: Vec<TargetModule>,
    /// The layers to adapt (`None`: all).
    pub layers: Option<Vec<usize>>,
}

impl LoraSpec {
    /// Rank and alpha on q_proj and v_proj of every layer, no dropout.
    pub fn new(rank: usize, alpha: f64) -> Self {
        Self {
            rank,
            alpha,
            dropout: 0.0,
            use_rslora: false,
            targets: vec![TargetModule::Q, TargetModule::V],
            layers: None,
        }
    }

    /// Chooses the target projections.
    pub fn with_targets(mut self, targets: &[TargetModule]) -> Self {
        self.targets = targets.to_vec();
        self
    }

    /// Sets LoRA dropout.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }

    /// Chooses rsLoRA scaling.
    pub fn with_rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// Restricts the adapters to some layers.
    pub fn with_layers(mut self, layers: &[usize]) -> Self {
        self.layers = Some(layers.to_vec());
        self
    }
}

/// A llama-family causal LM (Llama 2/3, SmolLM2, Qwen2) whose seven projections per layer are
/// [`LoraLinear`]s.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::VarBuilder;
/// use metal_candle::model::{KvCache, Llama, LlamaConfig};
/// # fn main() -> metal_candle::Result<()> {
/// let json = r#"{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
///   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50}"#;
/// let config = LlamaConfig::from_json_str(json, "config.json")?;
/// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu); // real code: metal_candle::model::load
/// let model = Llama::load(vb, &config)?;
/// let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
/// let mut cache = model.new_cache();
/// let logits = model.forward(&ids, 0, Some(&mut cache))?; // prefill: (1, 3, 50)
/// let next = Tensor::new(&[[4u32]], &Device::Cpu)?;
/// let step = model.forward(&next, cache.len(), Some(&mut cache))?; // decode: (1, 1, 50)
/// assert_eq!((logits.dims(), step.dims()), (&[1, 3, 50][..], &[1, 1, 50][..]));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// The output head (vocab, hidden); the embedding itself when tied.
    lm_head: Tensor,
    rope: Rope,
}

impl Llama {
    /// Builds the model from weights under Hugging Face names (`model.embed_tokens.weight`,
    /// `model.layers.{i}.self_attn.q_proj.weight`, ...). The dtype and device are the
    /// VarBuilder's.
    pub fn load(vb: VarBuilder, config: &LlamaConfig) -> Result<Self> {
        config.validate()?;
        let (h, vocab) = (config.hidden_size, config.vocab_size);
        let embed_tokens = vb.pp("model.embed_tokens").get((vocab, h), "weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb.pp(format!("model.layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        let norm = vb.pp("model.norm").get(h, "weight")?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            vb.pp("lm_head").get((vocab, h), "weight")?
        };
        let rope = Rope::new(config, vb.device())?;
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The dtype of the base weights (and of activations).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// An empty KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Logits (batch, seq, vocab) in f32 for `input_ids` (batch, seq) of unpadded rows.
    ///
    /// `seqlen_offset` is the number of tokens already in `cache` (0 for a prefill or without
    /// a cache); the new keys and values are appended to `cache`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        seqlen_offset: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_with_layout(
            input_ids,
            &SequenceLayout::Contiguous {
                offset: seqlen_offset,
            },
            cache,
        )
    }

    /// Logits (batch, seq, vocab) in f32 for any [`SequenceLayout`]: padded rows (with an
    /// attention mask) or packed rows (with segment ids).
    pub fn forward_with_layout(
        &self,
        input_ids: &Tensor,
        layout: &SequenceLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, layout, cache)?;
        self.logits(&hidden)
    }

    /// Training forward: logits (batch, seq, vocab) with no cache, in the model's dtype.
    ///
    /// Not widened to f32 as [`Llama::forward`]'s are: the loss ([`crate::ops::cross_entropy`])
    /// reads half-precision logits in f32 itself, and for a large vocabulary an f32 copy (and
    /// its gradient) would be the largest tensors of a training step.
    pub fn forward_train(&self, input_ids: &Tensor, layout: &SequenceLayout) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, layout, None)?;
        self.head(&hidden)
    }

    /// Logits (batch, vocab) in f32 of the last position only (what decoding needs; skips the
    /// output head for the other positions).
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        layout: &SequenceLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, layout, cache)?;
        let s = hidden.dim(1)?;
        self.logits(&hidden.i((.., s - 1..s, ..))?)?
            .squeeze(1)
            .map_err(Error::from)
    }

    /// The final hidden states (batch, seq, hidden) after the last norm, in the model dtype.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        layout: &SequenceLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2().map_err(|_| {
            Error::shape(
                "Llama::forward",
                format!("input_ids must be (batch, seq), got {:?}", input_ids.dims()),
            )
        })?;
        if s == 0 {
            return Err(Error::shape(
                "Llama::forward",
                "input_ids has no tokens (seq = 0)",
            ));
        }
        if let Some(c) = cache.as_deref() {
            if c.num_layers() != self.layers.len() {
                return Err(Error::shape(
                    "Llama::forward",
                    format!("the KV cache has {} layers but the model {}; make it with Llama::new_cache", c.num_layers(), self.layers.len()),
                ));
            }
        }
        let cached = cache.as_deref().map_or(0, KvCache::len);
        let prepared = layout.prepare(b, s, cached, self.dtype(), self.device())?;
        let rope = self.rope.tables(&prepared.positions, self.dtype())?;
        let x = self.embed(input_ids)?;
        self.run_layers(x, &rope, &prepared.mask, cache)
    }

    /// Logits (batch, vocab) in f32 of one decoding step whose inputs all live on the device
    /// ([`FixedStep`]): the token ids and positions are read from its buffers, the keys and
    /// values are written into `cache` at those positions, and attention covers the cache's
    /// whole capacity with the slots after each row's position masked. Nothing here reads a
    /// value back to the host or depends on one, and every shape is the same at every step:
    /// the step can be captured once as a CUDA graph and replayed (`CachedLlama` does).
    ///
    /// The token ids are not range-checked here ([`FixedStep::set`] checks them on the host);
    /// the cache must hold the positions before each row's (a prefill) and have exactly
    /// [`FixedStep::capacity`] slots. `cache`'s length is not advanced (the host cannot see
    /// the positions it was given on the device): call [`KvCache::advance`] after the step.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::VarBuilder;
    /// use metal_candle::model::{FixedStep, Llama, LlamaConfig, SequenceLayout};
    /// # fn main() -> metal_candle::Result<()> {
    /// let json = r#"{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    ///   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50}"#;
    /// let config = LlamaConfig::from_json_str(json, "config.json")?;
    /// let model = Llama::load(VarBuilder::zeros(DType::F32, &Device::Cpu), &config)?;
    /// let mut cache = model.new_cache();
    /// let prompt = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
    /// model.forward(&prompt, 0, Some(&mut cache))?; // prefill: allocates the cache
    /// let step = FixedStep::new(1, cache.capacity(), &Device::Cpu)?;
    /// step.set(&[4], &[3], config.vocab_size)?; // token 4 at position 3
    /// let logits = model.forward_fixed_step(&step, &mut cache)?;
    /// assert_eq!(logits.dims(), &[1, 50]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn forward_fixed_step(&self, step: &FixedStep, cache: &mut KvCache) -> Result<Tensor> {
        const OP: &str = "Llama::forward_fixed_step";
        let (b, capacity) = (step.batch(), step.capacity());
        if cache.num_layers() != self.layers.len() || cache.capacity() != capacity {
            return Err(Error::shape(
                OP,
                format!(
                    "the step has {capacity} slots but the cache has {} layers of {} slots \
                     (the model {} layers); prefill the cache, then size the step to it",
                    cache.num_layers(),
                    cache.capacity(),
                    self.layers.len()
                ),
            ));
        }
        let dtype = self.dtype();
        let rope = self.rope.tables(step.positions(), dtype)?;
        let (kv_heads, head_dim) = (self.config.num_key_value_heads, self.config.head_dim);
        let mask = step.device_slots(kv_heads, head_dim, dtype)?;
        let x = self
            .embed_tokens
            .index_select(&step.ids().flatten_all()?, 0)?
            .reshape((b, 1, self.config.hidden_size))?;
        let hidden = self.run_layers(x, &rope, &mask, Some(cache))?;
        self.logits(&hidden.squeeze(1)?)
    }

    /// The decoder layers and the final norm over the embedded tokens `x` (batch, seq,
    /// hidden).
    fn run_layers(
        &self,
        mut x: Tensor,
        rope: &RopeTables,
        mask: &AttentionMask,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        // Each layer leaves its MLP output to be added by the next norm (ops::add_rms_norm).
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            let (stream, delta) = layer.forward(&x, pending.as_ref(), rope, mask, layer_cache)?;
            x = stream;
            pending = Some(delta);
        }
        let eps = self.config.rms_norm_eps;
        match pending {
            Some(delta) => Ok(ops::add_rms_norm(&x, &delta, &self.norm, eps)?.1),
            None => ops::rms_norm(&x, &self.norm, eps),
        }
    }

    /// Token embeddings (batch, seq, hidden).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        let max = flat.to_dtype(DType::U32)?.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.config.vocab_size {
            return Err(Error::shape(
                "Llama::embed",
                format!(
                    "token id {max} is outside the vocabulary of {} tokens",
                    self.config.vocab_size
                ),
            ));
        }
        Ok(self
            .embed_tokens
            .index_select(&flat, 0)?
            .reshape((b, s, self.config.hidden_size))?)
    }

    /// The output head: `hidden` (..., hidden) → logits (..., vocab) in f32 (f64 for an f64
    /// model, so that gradient checks keep their precision).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.head(hidden)?;
        let dtype = match logits.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        Ok(logits.to_dtype(dtype)?)
    }

    /// The output head in the model's dtype. The head's weight is frozen: candle's matmul
    /// backward would also compute a (hidden × vocab) gradient for it and throw it away.
    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        ops::frozen_linear(hidden, &self.lm_head, None)
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The projection `target` of layer `layer`.
    pub fn projection(&self, layer: usize, target: TargetModule) -> Result<&LoraLinear> {
        let l = self.layer(layer)?;
        Ok(match target {
            TargetModule::Q => &l.self_attn.q_proj,
            TargetModule::K => &l.self_attn.k_proj,
            TargetModule::V => &l.self_attn.v_proj,
            TargetModule::O => &l.self_attn.o_proj,
            TargetModule::Gate => &l.mlp.gate_proj,
            TargetModule::Up => &l.mlp.up_proj,
            TargetModule::Down => &l.mlp.down_proj,
        })
    }

    /// The projection `target` of layer `layer`, mutably (to set or swap its adapter).
    pub fn projection_mut(
        &mut self,
        layer: usize,
        target: TargetModule,
    ) -> Result<&mut LoraLinear> {
        let n = self.layers.len();
        let l = self.layers.get_mut(layer).ok_or_else(|| {
            Error::shape(
                "Llama::projection",
                format!("layer {layer} but the model has {n} layers"),
            )
        })?;
        Ok(match target {
            TargetModule::Q => &mut l.self_attn.q_proj,
            TargetModule::K => &mut l.self_attn.k_proj,
            TargetModule::V => &mut l.self_attn.v_proj,
            TargetModule::O => &mut l.self_attn.o_proj,
            TargetModule::Gate => &mut l.mlp.gate_proj,
            TargetModule::Up => &mut l.mlp.up_proj,
            TargetModule::Down => &mut l.mlp.down_proj,
        })
    }

    /// The projection at a module path, HF (`model.layers.0.self_attn.q_proj`) or PEFT
    /// (`base_model.model.model.layers.0.self_attn.q_proj`) form.
    pub fn projection_by_path_mut(&mut self, path: &str) -> Result<&mut LoraLinear> {
        let (layer, target) = TargetModule::parse_path(path)?;
        self.projection_mut(layer, target)
    }

    /// Attaches a fresh adapter (A random, B zero: the model's output is unchanged) to every
    /// projection `spec` names. Existing adapters elsewhere are kept.
    pub fn add_lora(&mut self, spec: &LoraSpec) -> Result<()> {
        if spec.targets.is_empty() {
            return Err(Error::InvalidConfig {
                name: "targets",
                value: "[]".into(),
                expected: "at least one of q_proj ... down_proj",
            });
        }
        let n = self.layers.len();
        let layers: Vec<usize> = spec.layers.clone().unwrap_or_else(|| (0..n).collect());
        if let Some(&bad) = layers.iter().find(|&&l| l >= n) {
            return Err(Error::InvalidConfig {
                name: "layers",
                value: bad.to_string(),
                expected: "layer indices below the model's layer count",
            });
        }
        let device = self.device().clone();
        for layer in layers {
            for &target in &spec.targets {
                let proj = self.projection_mut(layer, target)?;
                let cfg = LoRAConfig::new(
                    proj.in_features(),
                    proj.out_features(),
                    spec.rank,
                    spec.alpha,
                )
                .with_dropout(spec.dropout)
                .with_rslora(spec.use_rslora);
                let adapter =
                    LoRALayer::new(proj.in_features(), proj.out_features(), &cfg, &device)?;
                proj.set_adapter(Some(adapter))?;
            }
        }
        Ok(())
    }

    /// Every attached adapter with its PEFT module path
    /// (`base_model.model.model.layers.{i}.self_attn.q_proj`), in layer then projection order.
    pub fn lora_adapters(&self) -> Vec<(String, &LoRALayer)> {
        let mut out = Vec::new();
        for layer in 0..self.layers.len() {
            for target in TargetModule::ALL {
                if let Some(adapter) = self
                    .projection(layer, target)
                    .ok()
                    .and_then(LoraLinear::adapter)
                {
                    out.push((target.peft_path(layer), adapter));
                }
            }
        }
        out
    }

    /// The trainable variables (A then B of each adapter, in [`Llama::lora_adapters`] order).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.lora_adapters()
            .into_iter()
            .flat_map(|(_, a)| a.vars().map(Var::clone))
            .collect()
    }

    /// Switches every adapter's dropout on (training) or off (inference).
    pub fn set_training(&self, on: bool) {
        for (_, adapter) in self.lora_adapters() {
            adapter.set_training(on);
        }
    }

    /// Removes every adapter.
    pub fn clear_lora(&mut self) -> Result<()> {
        for layer in 0..self.layers.len() {
            for target in TargetModule::ALL {
                self.projection_mut(layer, target)?.set_adapter(None)?;
            }
        }
        Ok(())
    }

    /// A copy with every adapter folded into its base weight (no adapters left).
    pub fn merged(&self) -> Result<Self> {
        let mut out = self.clone();
        for layer in 0..out.layers.len() {
            for target in TargetModule::ALL {
                let proj = out.projection_mut(layer, target)?;
                *proj = proj.merged()?;
            }
        }
        // The merged weights are new tensors: stack them again for the one-GEMM projections.
        for layer in &mut out.layers {
            layer.fuse_projections()?;
        }
        Ok(out)
    }

    /// The base weights under their Hugging Face names (what a `model.safetensors` holds);
    /// adapters are not included (merge first to bake them in). A tied head is not repeated.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            for target in TargetModule::ALL {
                let proj = self.projection(i, target)?;
                let path = target.hf_path(i);
                out.push((format!("{path}.weight"), proj.weight().clone()));
                if let Some(b) = proj.bias() {
                    out.push((format!("{path}.bias"), b.clone()));
                }
            }
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                layer.input_layernorm().clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm().clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        Ok(out)
    }

    fn layer(&self, layer: usize) -> Result<&DecoderLayer> {
        let n = self.layers.len();
        self.layers.get(layer).ok_or_else(|| {
            Error::shape(
                "Llama::projection",
                format!("layer {layer} but the model has {n} layers"),
            )
        })
    }
}

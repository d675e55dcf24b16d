//! Helpers shared by the training tests: a byte tokenizer and a tiny model.
#![allow(dead_code)]

use candle_core::{DType, Device, Module, Tensor};
use metal_candle::lora::LoraLinear;
use metal_candle::train::data::{Batch, EncodeText};
use metal_candle::train::CausalLm;

/// Bytes as tokens (id = byte + 2), end of sequence = 1.
pub struct ByteTokenizer;

impl EncodeText for ByteTokenizer {
    fn encode(&self, text: &str) -> metal_candle::Result<Vec<u32>> {
        Ok(text.bytes().map(|b| b as u32 + 2).collect())
    }
    fn eos_id(&self) -> Option<u32> {
        Some(1)
    }
}

pub const VOCAB: usize = 258;

/// A tiny causal model with no attention: embedding → q_proj → tanh → down_proj (+ residual)
/// → head. Enough to exercise the trainer's mechanics; its linear layers carry LoRA.
pub struct ToyLm {
    embed: Tensor,
    q: LoraLinear,
    down: LoraLinear,
    head: Tensor,
    device: Device,
}

impl ToyLm {
    pub fn new(dim: usize, seed: u64, dtype: DType) -> Self {
        let device = Device::Cpu;
        let mut s = seed;
        let mut rand = |shape: (usize, usize), scale: f32| {
            let n = shape.0 * shape.1;
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    s = metal_candle::train::rng::mix64(s.wrapping_add(0x9E37_79B9_7F4A_7C15));
                    ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
                })
                .collect();
            Tensor::from_vec(v, shape, &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let embed = rand((VOCAB, dim), 1.0);
        let q = LoraLinear::new(rand((dim, dim), 0.3), None).unwrap();
        let down = LoraLinear::new(rand((dim, dim), 0.3), None).unwrap();
        let head = rand((VOCAB, dim), 0.3);
        Self {
            embed,
            q,
            down,
            head,
            device,
        }
    }
}

impl CausalLm for ToyLm {
    fn forward_batch(&self, batch: &Batch) -> metal_candle::Result<Tensor> {
        let (b, t) = batch.dims();
        let x = self
            .embed
            .index_select(&batch.input_ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        let h = self.q.forward(&x)?.tanh()?;
        let h = (self.down.forward(&h)? + x)?;
        Ok(h.broadcast_matmul(&self.head.t()?)?)
    }

    fn lora_linears(&self) -> Vec<(String, &LoraLinear)> {
        vec![
            ("model.layers.0.self_attn.q_proj".into(), &self.q),
            ("model.layers.0.mlp.down_proj".into(), &self.down),
        ]
    }

    fn lora_linear_mut(&mut self, path: &str) -> Option<&mut LoraLinear> {
        match path {
            "model.layers.0.self_attn.q_proj" => Some(&mut self.q),
            "model.layers.0.mlp.down_proj" => Some(&mut self.down),
            _ => None,
        }
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mc-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Checks the gradients of every LoRA factor against central finite differences of the masked
/// loss, with the model running in f64. The adapters' B factors are first set to random values
/// (a fresh B is zero, which would hide errors in A's gradient). Returns the worst relative error.
pub fn lora_grad_fd_error(
    model: &mut dyn CausalLm,
    batch: &Batch,
    spec: &metal_candle::lora::AdapterSpec,
) -> f64 {
    use metal_candle::train::masked_cross_entropy_sum;
    metal_candle::lora::attach_adapters(model, spec, 0).unwrap();
    let vars = metal_candle::lora::adapter_vars(model);
    for (i, (_, v)) in vars.iter().enumerate() {
        let t = Tensor::randn(0f32, 0.3, v.dims(), &Device::Cpu).unwrap();
        let t = if i % 2 == 0 {
            (v.as_tensor() + t).unwrap()
        } else {
            t
        };
        v.set(&t).unwrap();
    }
    let loss_of = |m: &dyn CausalLm| -> f64 {
        let logits = m.forward_batch(batch).unwrap();
        masked_cross_entropy_sum(&logits, &batch.targets, &batch.loss_mask)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let logits = model.forward_batch(batch).unwrap();
    let loss = masked_cross_entropy_sum(&logits, &batch.targets, &batch.loss_mask).unwrap();
    let grads = loss.backward().unwrap();
    let mut worst = 0f64;
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // A few entries of each factor.
        for &idx in &[0usize, base.len() / 3, base.len() - 1] {
            let fd_at = |h: f32| -> f64 {
                let mut plus = base.clone();
                plus[idx] += h;
                let mut minus = base.clone();
                minus[idx] -= h;
                let actual = (plus[idx] as f64) - (minus[idx] as f64);
                var.set(&Tensor::from_vec(plus, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                let lp = loss_of(model);
                var.set(&Tensor::from_vec(minus, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                let lm = loss_of(model);
                var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                (lp - lm) / actual
            };
            // The random B makes the loss strongly curved (gradients of 30+), so the step is
            // small: the loss is f64, and the f32 rounding of the step is measured, not assumed.
            let fd = fd_at(1e-4);
            let err = (fd - g[idx]).abs() / (fd.abs().max(g[idx].abs()).max(1e-3));
            assert!(
                err < 1e-3,
                "{name}[{idx}]: analytic {} vs finite difference {fd}",
                g[idx]
            );
            worst = worst.max(err);
        }
    }
    worst
}

/// A tiny random llama (2 layers, hidden 32, GQA 4 heads / 2 KV heads, byte vocabulary) in
/// `dtype`, seeded.
pub fn tiny_llama(seed: u64, dtype: DType) -> metal_candle::model::Llama {
    use metal_candle::model::{Llama, LlamaConfig};
    let json = format!(
        r#"{{"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": {VOCAB}, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true}}"#
    );
    let config = LlamaConfig::from_json_str(&json, "tiny").unwrap();
    let shapes = Llama::load(
        candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu),
        &config,
    )
    .unwrap()
    .named_weights()
    .unwrap();
    let mut s = seed;
    let mut tensors = std::collections::HashMap::new();
    for (name, t) in shapes {
        let n = t.elem_count();
        // The embedding is also the (tied) output head: large enough that a frozen head can
        // express confident predictions (at ±0.15 the best logit margin is ~3 nats).
        let scale = if name.contains("embed_tokens") {
            1.0
        } else {
            0.15
        };
        let w = if name.ends_with("norm.weight") {
            Tensor::ones(t.dims(), DType::F32, &Device::Cpu).unwrap()
        } else {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    s = metal_candle::train::rng::mix64(s.wrapping_add(0x9E37_79B9_7F4A_7C15));
                    ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
                })
                .collect();
            Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
        };
        tensors.insert(name, w.to_dtype(dtype).unwrap());
    }
    Llama::load(
        candle_nn::VarBuilder::from_tensors(tensors, dtype, &Device::Cpu),
        &config,
    )
    .unwrap()
}

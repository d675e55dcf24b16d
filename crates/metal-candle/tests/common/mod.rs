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
            Tensor::from_vec(v, shape, &device).unwrap().to_dtype(dtype).unwrap()
        };
        let embed = rand((VOCAB, dim), 1.0);
        let q = LoraLinear::new(rand((dim, dim), 0.3), None).unwrap();
        let down = LoraLinear::new(rand((dim, dim), 0.3), None).unwrap();
        let head = rand((VOCAB, dim), 0.3);
        Self { embed, q, down, head, device }
    }
}

impl CausalLm for ToyLm {
    fn forward_batch(&self, batch: &Batch) -> metal_candle::Result<Tensor> {
        let (b, t) = batch.dims();
        let x = self.embed.index_select(&batch.input_ids.flatten_all()?, 0)?.reshape((b, t, ()))?;
        let h = self.q.forward(&x)?.tanh()?;
        let h = (self.down.forward(&h)? + x)?;
        Ok(h.broadcast_matmul(&self.head.t()?)?)
    }

    fn lora_linears(&self) -> Vec<(String, &LoraLinear)> {
        vec![("model.layers.0.self_attn.q_proj".into(), &self.q), ("model.layers.0.mlp.down_proj".into(), &self.down)]
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

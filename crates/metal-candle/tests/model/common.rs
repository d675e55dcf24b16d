//! Tiny random llama-family models written to temporary Hugging Face folders.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use metal_candle::model::{Architecture, Llama, LlamaConfig, RopeScaling};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A llama (or qwen2) config small enough for CI: hidden 32, 2 layers, 4 heads.
pub fn tiny_config(architecture: Architecture, kv_heads: usize, tied: bool) -> LlamaConfig {
    LlamaConfig {
        architecture,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: kv_heads,
        head_dim: 8,
        vocab_size: 61,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: 128,
        tie_word_embeddings: tied,
        qkv_bias: architecture == Architecture::Qwen2,
        o_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Uniform random values in ±scale, reproducible from `seed`.
pub fn random_tensor(rng: &mut StdRng, shape: &[usize], scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Random weights under Hugging Face names for `config` (large enough that attention is far
/// from uniform).
pub fn random_weights(config: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (h, i, v, d) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        config.head_dim,
    );
    let (q, kv) = (
        config.num_attention_heads * d,
        config.num_key_value_heads * d,
    );
    let mut w = HashMap::new();
    let put = |w: &mut HashMap<String, Tensor>, rng: &mut StdRng, name: String, shape: &[usize]| {
        let scale = 1.5 * (3.0f32 / *shape.last().unwrap() as f32).sqrt();
        w.insert(name, random_tensor(rng, shape, scale));
    };
    put(
        &mut w,
        &mut rng,
        "model.embed_tokens.weight".into(),
        &[v, h],
    );
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, rows, cols, bias) in [
            ("self_attn.q_proj", q, h, config.qkv_bias),
            ("self_attn.k_proj", kv, h, config.qkv_bias),
            ("self_attn.v_proj", kv, h, config.qkv_bias),
            ("self_attn.o_proj", h, q, config.o_bias),
            ("mlp.gate_proj", i, h, config.mlp_bias),
            ("mlp.up_proj", i, h, config.mlp_bias),
            ("mlp.down_proj", h, i, config.mlp_bias),
        ] {
            put(
                &mut w,
                &mut rng,
                format!("{p}.{name}.weight"),
                &[rows, cols],
            );
            if bias {
                put(&mut w, &mut rng, format!("{p}.{name}.bias"), &[rows]);
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let t = (random_tensor(&mut rng, &[h], 0.2) + 1.0).unwrap();
            w.insert(format!("{p}.{norm}.weight"), t);
        }
    }
    let t = (random_tensor(&mut rng, &[h], 0.2) + 1.0).unwrap();
    w.insert("model.norm.weight".into(), t);
    if !config.tie_word_embeddings {
        put(&mut w, &mut rng, "lm_head.weight".into(), &[v, h]);
    }
    w
}

/// Writes `config.json` and `model.safetensors` into `dir`.
pub fn write_hf_dir(dir: &Path, config: &LlamaConfig, weights: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config.to_hf_json()).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
}

/// A temporary HF folder with a random model; returns the folder guard and the weights.
pub fn random_hf_dir(
    config: &LlamaConfig,
    seed: u64,
) -> (tempfile::TempDir, HashMap<String, Tensor>) {
    let dir = tempfile::tempdir().unwrap();
    let weights = random_weights(config, seed);
    write_hf_dir(dir.path(), config, &weights);
    (dir, weights)
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Token ids (1, n) from a slice.
pub fn ids(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// A (rows, len) u32 tensor from equal-length rows.
pub fn batch(rows: &[Vec<u32>]) -> Tensor {
    let len = rows[0].len();
    assert!(rows.iter().all(|r| r.len() == len), "rows differ in length");
    Tensor::from_vec(rows.concat(), (rows.len(), len), &Device::Cpu).unwrap()
}

/// `config` with random f32 weights from `seed`, on the CPU.
#[allow(dead_code)] // not every test binary that includes this file uses it
pub fn tiny_model(config: &LlamaConfig, seed: u64) -> Llama {
    Llama::load(
        VarBuilder::from_tensors(random_weights(config, seed), DType::F32, &Device::Cpu),
        config,
    )
    .unwrap()
}

/// `n` token ids below `vocab`, a different sequence for each `salt`.
#[allow(dead_code)] // not every test binary that includes this file uses it
pub fn tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 31 + salt * 7 + 5) % vocab) as u32)
        .collect()
}

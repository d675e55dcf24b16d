//! Our llama against candle-transformers' llama on the same random weights.

use candle_core::{DType, Device, IndexOp};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as ct;
use metal_candle::model::load::load_hf_dir;
use metal_candle::model::{Architecture, RopeScaling};

use crate::common::{ids, max_diff, random_hf_dir, tiny_config};

/// Logits of every position from candle-transformers, fed one token at a time through its KV
/// cache (its forward returns only the last position).
fn candle_transformers_logits(dir: &std::path::Path, tokens: &[u32]) -> Vec<candle_core::Tensor> {
    let json = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: ct::LlamaConfig = serde_json::from_str(&json).unwrap();
    let cfg = cfg.into_config(false);
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let model = ct::Llama::load(vb, &cfg).unwrap();
    let mut cache = ct::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    tokens
        .iter()
        .enumerate()
        .map(|(pos, &t)| {
            model
                .forward(&ids(&[t]), pos, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
        })
        .collect()
}

fn check_against_candle_transformers(kv_heads: usize, tied: bool, scaling: RopeScaling, seed: u64) {
    let mut config = tiny_config(Architecture::Llama, kv_heads, tied);
    config.rope_scaling = scaling;
    let (dir, _) = random_hf_dir(&config, seed);
    let model = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let tokens = [5u32, 17, 3, 44, 9, 60, 1, 28, 33];
    let ours = model
        .forward(&ids(&tokens), 0, None)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let theirs = candle_transformers_logits(dir.path(), &tokens);
    for (pos, t) in theirs.iter().enumerate() {
        let d = max_diff(&ours.i(pos).unwrap(), t);
        assert!(
            d < 1e-4,
            "position {pos}: max |ours - candle-transformers| = {d}"
        );
    }
    // The logits must be informative, or the comparison proves little.
    let spread = ours.max_all().unwrap().to_scalar::<f32>().unwrap()
        - ours.min_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        spread > 1.0,
        "logits nearly constant ({spread}); the test weights are too small"
    );
}

#[test]
fn gqa_untied_matches_candle_transformers() {
    check_against_candle_transformers(2, false, RopeScaling::None, 1);
}

#[test]
fn mha_tied_matches_candle_transformers() {
    check_against_candle_transformers(4, true, RopeScaling::None, 2);
}

#[test]
fn multi_query_with_llama3_rope_scaling_matches_candle_transformers() {
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 16,
    };
    check_against_candle_transformers(1, false, scaling, 3);
}

#[test]
fn bf16_model_stays_close_to_f32() {
    let config = tiny_config(Architecture::Llama, 2, true);
    let (dir, _) = random_hf_dir(&config, 4);
    let f32_model = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let bf16_model = load_hf_dir(dir.path(), DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(bf16_model.dtype(), DType::BF16);
    let x = ids(&[4, 8, 15, 16, 23, 42]);
    let a = f32_model.forward(&x, 0, None).unwrap();
    let b = bf16_model.forward(&x, 0, None).unwrap();
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_diff(&a, &b);
    assert!(d < 0.05 * scale, "bf16 drifted {d} (logit scale {scale})");
}

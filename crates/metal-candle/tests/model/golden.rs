//! Our model against Hugging Face transformers on golden fixtures (tiny random-weight models
//! made by `tests/fixtures/make_llama_fixtures.py`; see that script for what each one covers).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use metal_candle::model::load::load_hf_dir;
use metal_candle::model::{Llama, SequenceLayout};

use crate::common::max_diff;

const FIXTURES: [&str; 4] = [
    "llama_gqa_tied",
    "qwen2_gqa",
    "llama3_rope_scaling",
    "llama_linear_bias_headdim",
];
const TOL: f32 = 1e-4;

fn fixture(name: &str) -> (Llama, HashMap<String, Tensor>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let model = load_hf_dir(&dir, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    let reference =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    (model, reference)
}

fn u32_ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

#[test]
fn logits_match_transformers() {
    for name in FIXTURES {
        let (model, r) = fixture(name);
        let logits = model.forward(&u32_ids(&r["input_ids"]), 0, None).unwrap();
        let d = max_diff(&logits, &r["logits"]);
        assert!(d < TOL, "{name}: max |ours - transformers| = {d}");
    }
}

#[test]
fn left_padded_logits_match_transformers() {
    for name in FIXTURES {
        let (model, r) = fixture(name);
        let mask = &r["padded_attention_mask"];
        let layout = SequenceLayout::Padded {
            attention_mask: mask.clone(),
        };
        let logits = model
            .forward_with_layout(&u32_ids(&r["padded_input_ids"]), &layout, None)
            .unwrap();
        let mask = mask.to_vec2::<i64>().unwrap();
        for (row, m) in mask.iter().enumerate() {
            for (pos, &real) in m.iter().enumerate() {
                if real == 1 {
                    let d = max_diff(
                        &logits.i((row, pos)).unwrap(),
                        &r["padded_logits"].i((row, pos)).unwrap(),
                    );
                    assert!(d < TOL, "{name} row {row} position {pos}: {d}");
                }
            }
        }
    }
}

#[test]
fn greedy_tokens_with_kv_cache_match_transformers() {
    for name in FIXTURES {
        let (model, r) = fixture(name);
        let expected: Vec<u32> = r["generated_ids"]
            .squeeze(0)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let mut tokens: Vec<u32> = r["prompt_ids"]
            .squeeze(0)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let mut cache = model.new_cache();
        let mut input = tokens.clone();
        while tokens.len() < expected.len() {
            let x = Tensor::new(input.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model
                .forward_last(
                    &x,
                    &SequenceLayout::Contiguous {
                        offset: cache.len(),
                    },
                    Some(&mut cache),
                )
                .unwrap();
            let next = logits
                .squeeze(0)
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            tokens.push(next);
            input = vec![next];
        }
        assert_eq!(
            tokens, expected,
            "{name}: greedy tokens differ from transformers"
        );
    }
}

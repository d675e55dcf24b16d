//! Generation on tiny random llama-family models: cached decoding gives the logits of a full
//! forward, batches equal single rows, adapters run unmerged / merged / swapped / removed without
//! reloading the base, and greedy tokens equal transformers' on the golden fixtures (when the
//! fixture folder is present).

#[allow(dead_code)]
#[path = "model/common.rs"]
mod model_common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use metal_candle::generate::{
    generate_batch, generate_tokens, CachedLlama, DecoderLm, GenerationConfig, SamplingConfig,
};
use metal_candle::lora::{LoRAConfig, LoRALayer};
use metal_candle::model::{Architecture, Llama, LlamaConfig, TargetModule};
use model_common::{ids, max_diff, random_weights, tiny_config};

fn tiny_model(config: &LlamaConfig, seed: u64) -> Llama {
    let weights = random_weights(config, seed);
    Llama::load(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        config,
    )
    .unwrap()
}

fn greedy(max: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: max,
        ..Default::default()
    }
}

#[test]
fn cached_decoding_gives_the_logits_of_a_full_forward() {
    for (arch, kv_heads, tied) in [
        (Architecture::Llama, 2, true),
        (Architecture::Llama, 4, false),
        (Architecture::Qwen2, 1, true),
    ] {
        let config = tiny_config(arch, kv_heads, tied);
        let model = tiny_model(&config, 7);
        let tokens: Vec<u32> = (0..14)
            .map(|i| (i * 17 + 3) % config.vocab_size as u32)
            .collect();
        let full = model.forward(&ids(&tokens), 0, None).unwrap(); // (1, 14, vocab)
        let mut cached = CachedLlama::new(model);
        let prefill = 5;
        let first = cached.forward(&ids(&tokens[..prefill]), 0).unwrap();
        let d = max_diff(&first, &full.i((.., prefill - 1, ..)).unwrap());
        assert!(d < 1e-4, "{arch:?}: prefill logits differ by {d}");
        for t in prefill..tokens.len() {
            let step = cached.forward(&ids(&tokens[t..t + 1]), t).unwrap();
            let d = max_diff(&step, &full.i((.., t, ..)).unwrap());
            assert!(
                d < 1e-4,
                "{arch:?} kv {kv_heads}: position {t} differs from the full forward by {d}"
            );
        }
        // A step at the wrong offset is an error, not silent garbage.
        assert!(cached.forward(&ids(&[1]), 3).is_err());
    }
}

#[test]
fn greedy_generation_equals_argmax_of_full_forwards() {
    let config = tiny_config(Architecture::Llama, 2, true);
    let model = tiny_model(&config, 11);
    let prompt = vec![1u32, 5, 9, 22];
    // Reference: a full forward over everything so far, arg-max of the last position.
    let mut reference = prompt.clone();
    for _ in 0..12 {
        let logits = model.forward(&ids(&reference), 0, None).unwrap();
        let last = logits.i((0, reference.len() - 1, ..)).unwrap();
        reference.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    let mut cached = CachedLlama::new(model);
    let out = generate_tokens(&mut cached, &prompt, &greedy(12), |_| Ok(true)).unwrap();
    assert_eq!(out.tokens, reference[prompt.len()..].to_vec());
}

#[test]
fn a_batch_equals_its_rows_generated_alone() {
    let config = tiny_config(Architecture::Llama, 2, false);
    let mut cached = CachedLlama::new(tiny_model(&config, 3));
    let prompts = vec![
        vec![1u32, 2, 3, 4, 5],
        vec![9, 8, 7, 6, 5],
        vec![30, 31, 32, 33, 34],
    ];
    let (rows, stats) = generate_batch(&mut cached, &prompts, &greedy(10)).unwrap();
    assert_eq!((stats.batch, stats.new_tokens), (3, 10));
    for (prompt, row) in prompts.iter().zip(&rows) {
        let alone = generate_tokens(&mut cached, prompt, &greedy(10), |_| Ok(true)).unwrap();
        assert_eq!(row.tokens, alone.tokens, "prompt {prompt:?}");
    }
    // Sampled batches repeat with a seed.
    let sampled = GenerationConfig {
        sampling: SamplingConfig {
            temperature: 1.0,
            top_p: Some(0.9),
            seed: 5,
            ..Default::default()
        },
        ..greedy(8)
    };
    let a = generate_batch(&mut cached, &prompts, &sampled).unwrap().0;
    let b = generate_batch(&mut cached, &prompts, &sampled).unwrap().0;
    assert_eq!(
        a.iter().map(|r| &r.tokens).collect::<Vec<_>>(),
        b.iter().map(|r| &r.tokens).collect::<Vec<_>>()
    );
}

/// An adapter on q and v of every layer with non-zero B (so it changes the output).
fn adapter_set(config: &LlamaConfig, seed: u64) -> Vec<(String, LoRALayer)> {
    let mut out = Vec::new();
    let h = config.hidden_size;
    for layer in 0..config.num_hidden_layers {
        for (target, out_dim) in [
            (
                TargetModule::Q,
                config.num_attention_heads * config.head_dim,
            ),
            (
                TargetModule::V,
                config.num_key_value_heads * config.head_dim,
            ),
        ] {
            let cfg = LoRAConfig::new(h, out_dim, 4, 8.0);
            let s = seed as f32 + layer as f32;
            let a = (Tensor::randn(0f32, 0.3, (h, 4), &Device::Cpu).unwrap()
                * (1.0 + 0.01 * s as f64))
                .unwrap();
            let b = Tensor::randn(0f32, 0.3, (4, out_dim), &Device::Cpu).unwrap();
            out.push((
                target.peft_path(layer),
                LoRALayer::from_tensors(a, b, &cfg).unwrap(),
            ));
        }
    }
    out
}

fn last_logits(model: &mut CachedLlama, tokens: &[u32]) -> Tensor {
    model.clear_cache();
    model.forward(&ids(tokens), 0).unwrap()
}

#[test]
fn adapters_unmerged_merged_swapped_and_removed_at_run_time() {
    let config = tiny_config(Architecture::Llama, 2, true);
    let mut model = CachedLlama::new(tiny_model(&config, 21));
    let prompt = [3u32, 14, 15, 9, 2, 6];
    let base = last_logits(&mut model, &prompt);
    let set_a = adapter_set(&config, 1);
    let set_b = adapter_set(&config, 2);

    model.set_adapters(set_a.clone()).unwrap();
    let with_a = last_logits(&mut model, &prompt);
    assert!(max_diff(&with_a, &base) > 1e-2, "adapter A changes nothing");
    let tokens_a = generate_tokens(&mut model, &prompt, &greedy(10), |_| Ok(true))
        .unwrap()
        .tokens;

    model.set_adapters(set_b).unwrap();
    let with_b = last_logits(&mut model, &prompt);
    assert!(
        max_diff(&with_b, &with_a) > 1e-2,
        "swapping to B changed nothing"
    );

    // Back to A: exactly the logits of A (the base weights were never touched).
    model.set_adapters(set_a.clone()).unwrap();
    assert!(max_diff(&last_logits(&mut model, &prompt), &with_a) < 1e-6);
    model.clear_adapters().unwrap();
    assert!(
        max_diff(&last_logits(&mut model, &prompt), &base) < 1e-6,
        "removing the adapter did not restore the base"
    );

    // Merged: the same model as unmerged A, within rounding, and the same greedy tokens.
    model.set_adapters(set_a).unwrap();
    model.merge_adapters().unwrap();
    let merged = last_logits(&mut model, &prompt);
    assert!(
        max_diff(&merged, &with_a) < 1e-4,
        "merged differs from unmerged by {}",
        max_diff(&merged, &with_a)
    );
    assert!(model.model().lora_adapters().is_empty());
    assert_eq!(
        generate_tokens(&mut model, &prompt, &greedy(10), |_| Ok(true))
            .unwrap()
            .tokens,
        tokens_a
    );

    // An adapter for another shape is refused with the paths in the message.
    let wrong = vec![(
        "base_model.model.model.layers.0.self_attn.q_proj".to_string(),
        LoRALayer::new(7, 7, &LoRAConfig::new(7, 7, 2, 4.0), &Device::Cpu).unwrap(),
    )];
    assert!(model.set_adapters(wrong).is_err());
}

/// Golden greedy tokens from transformers (fixtures/<name>/, made by make_llama_fixtures.py):
/// each folder holds a Hugging Face model and `reference.safetensors` with `prompt_ids` and
/// `generated_ids` (greedy, no EOS stop).
#[test]
fn greedy_tokens_equal_transformers_on_the_golden_fixtures() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("config.json").is_file() && p.join("reference.safetensors").is_file())
        .collect();
    assert!(
        !dirs.is_empty(),
        "no golden fixtures under {}: run tests/fixtures/make_llama_fixtures.sh",
        root.display()
    );
    for dir in dirs {
        let model = metal_candle::model::load::load_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        let expected =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        let to_u32 = |name: &str| -> Vec<u32> {
            expected[name]
                .to_dtype(DType::U32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
        };
        let prompt = to_u32("prompt_ids");
        let generated = to_u32("generated_ids");
        let mut cached = CachedLlama::new(model);
        let new = generated.len() - prompt.len();
        let out = generate_tokens(&mut cached, &prompt, &greedy(new), |_| Ok(true)).unwrap();
        assert_eq!(
            out.tokens,
            generated[prompt.len()..].to_vec(),
            "{}",
            dir.display()
        );
    }
}

//! The KV cache's in-place buffers (growth past the first capacity, truncation, deep clones)
//! and the one-GEMM q/k/v and gate/up projections (bypassed while an adapter is attached,
//! rebuilt on merge)
//! against full forwards on tiny random models.

#[allow(dead_code)]
#[path = "model/common.rs"]
mod model_common;

use candle_core::{Device, IndexOp, Tensor};
use metal_candle::lora::{LoRAConfig, LoRALayer};
use metal_candle::model::{Architecture, KvCache, Llama, TargetModule};
use model_common::{ids, max_diff, tiny_config, tiny_model, tokens};

/// Decodes `toks[start..]` one at a time into `cache`, checking each step against `full`.
fn decode_and_check(
    model: &Llama,
    cache: &mut KvCache,
    toks: &[u32],
    start: usize,
    full: &Tensor,
    what: &str,
) {
    for t in start..toks.len() {
        let step = model
            .forward(&ids(&toks[t..t + 1]), t, Some(cache))
            .unwrap();
        let d = max_diff(&step.i((.., 0, ..)).unwrap(), &full.i((.., t, ..)).unwrap());
        assert!(
            d < 2e-4,
            "{what}: position {t} differs from the full forward by {d}"
        );
    }
}

#[test]
fn decoding_past_the_first_capacity_gives_the_full_forward() {
    let mut config = tiny_config(Architecture::Qwen2, 2, false);
    config.max_position_embeddings = 512;
    let model = tiny_model(&config, 5);
    // The cache reserves 256 positions at first; 300 tokens make it grow once mid-decode.
    let toks = tokens(300, config.vocab_size, 1);
    let full = model.forward(&ids(&toks), 0, None).unwrap();
    let mut cache = model.new_cache();
    model
        .forward(&ids(&toks[..200]), 0, Some(&mut cache))
        .unwrap();
    decode_and_check(&model, &mut cache, &toks, 200, &full, "growth");
    assert_eq!(cache.len(), 300);
}

#[test]
fn a_cloned_cache_is_independent_and_truncation_rewinds() {
    let config = tiny_config(Architecture::Llama, 2, true);
    let model = tiny_model(&config, 9);
    let (a, b) = (
        tokens(12, config.vocab_size, 2),
        tokens(12, config.vocab_size, 3),
    );
    let mut shared: Vec<u32> = a[..6].to_vec();
    let mut b_seq = shared.clone();
    b_seq.extend_from_slice(&b[6..]);
    shared.extend_from_slice(&a[6..]);
    let (full_a, full_b) = (
        model.forward(&ids(&shared), 0, None).unwrap(),
        model.forward(&ids(&b_seq), 0, None).unwrap(),
    );
    let mut cache_a = model.new_cache();
    model
        .forward(&ids(&shared[..6]), 0, Some(&mut cache_a))
        .unwrap();
    let mut cache_b = cache_a.clone();
    // Interleaved, so that a shared buffer would be overwritten by the other branch.
    for t in 6..12 {
        let sa = model
            .forward(&ids(&shared[t..t + 1]), t, Some(&mut cache_a))
            .unwrap();
        let sb = model
            .forward(&ids(&b_seq[t..t + 1]), t, Some(&mut cache_b))
            .unwrap();
        assert!(
            max_diff(&sa.i((.., 0, ..)).unwrap(), &full_a.i((.., t, ..)).unwrap()) < 2e-4,
            "branch a at {t}"
        );
        assert!(
            max_diff(&sb.i((.., 0, ..)).unwrap(), &full_b.i((.., t, ..)).unwrap()) < 2e-4,
            "branch b at {t}"
        );
    }
    // Rewind branch a to the shared prefix and continue it as branch b.
    cache_a.truncate(6).unwrap();
    assert_eq!(cache_a.len(), 6);
    decode_and_check(&model, &mut cache_a, &b_seq, 6, &full_b, "after truncate");
}

#[test]
fn fused_projections_equal_separate_ones_and_adapters_bypass_them() {
    for (arch, kv) in [(Architecture::Llama, 2), (Architecture::Qwen2, 1)] {
        let config = tiny_config(arch, kv, false);
        let mut model = tiny_model(&config, 13);
        let toks = tokens(9, config.vocab_size, 4);
        let fused = model.forward(&ids(&toks), 0, None).unwrap();

        // Separate projections by hand from the same weights.
        let x = Tensor::randn(0f32, 1., (1, 9, config.hidden_size), &Device::Cpu).unwrap();
        let attn_parts = [TargetModule::Q, TargetModule::K, TargetModule::V];
        for target in attn_parts {
            let p = model.projection(0, target).unwrap();
            let mut want = x.broadcast_matmul(&p.weight().t().unwrap()).unwrap();
            if let Some(b) = p.bias() {
                want = want.broadcast_add(b).unwrap();
            }
            let got = candle_core::Module::forward(p, &x).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "{arch:?} {target:?}");
        }

        // An adapter whose B is zero changes nothing but forces the separate path.
        let h = config.hidden_size;
        let out = config.num_attention_heads * config.head_dim;
        let adapter =
            LoRALayer::new(h, out, &LoRAConfig::new(h, out, 2, 4.0), &Device::Cpu).unwrap();
        model
            .projection_mut(0, TargetModule::Q)
            .unwrap()
            .set_adapter(Some(adapter))
            .unwrap();
        let i = config.intermediate_size;
        let adapter = LoRALayer::new(h, i, &LoRAConfig::new(h, i, 2, 4.0), &Device::Cpu).unwrap();
        model
            .projection_mut(1, TargetModule::Gate)
            .unwrap()
            .set_adapter(Some(adapter))
            .unwrap();
        let separate = model.forward(&ids(&toks), 0, None).unwrap();
        let d = max_diff(&fused, &separate);
        assert!(
            d < 1e-4,
            "{arch:?}: fused and separate projections differ by {d}"
        );

        // Merging folds the adapter in and stacks the projections again: same logits.
        let merged = model.merged().unwrap();
        let d = max_diff(&fused, &merged.forward(&ids(&toks), 0, None).unwrap());
        assert!(d < 1e-4, "{arch:?}: merged model differs by {d}");
    }
}

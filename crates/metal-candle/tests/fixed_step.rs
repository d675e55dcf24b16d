//! Decoding steps with device-held inputs ([`Llama::forward_fixed_step`], what the CUDA graph
//! replays) against full forwards on tiny random models: the keys and values land in the
//! right cache slots, the slots after each row's position are masked, and the host-side
//! bookkeeping ([`KvCache::advance`]) lets ordinary steps continue from there.

#[allow(dead_code)]
#[path = "model/common.rs"]
mod model_common;

use candle_core::{Device, IndexOp};
use metal_candle::model::{Architecture, FixedStep};
use model_common::{batch, ids, max_diff, tiny_config, tiny_model, tokens};

#[test]
fn fixed_steps_give_the_full_forward_for_every_row() {
    // Grouped heads (4 query heads on 2 KV heads) and two rows with different tokens.
    let config = tiny_config(Architecture::Llama, 2, false);
    let model = tiny_model(&config, 21);
    let rows = [
        tokens(14, config.vocab_size, 1),
        tokens(14, config.vocab_size, 2),
    ];
    let full = model.forward(&batch(&rows), 0, None).unwrap();
    let prompt: Vec<Vec<u32>> = rows.iter().map(|r| r[..5].to_vec()).collect();
    let mut cache = model.new_cache();
    model.forward(&batch(&prompt), 0, Some(&mut cache)).unwrap();
    let step = FixedStep::new(2, cache.capacity(), &Device::Cpu).unwrap();
    for (t, (&a, &b)) in rows[0].iter().zip(&rows[1]).enumerate().skip(5) {
        step.set(&[a, b], &[t as u32; 2], config.vocab_size)
            .unwrap();
        let logits = model.forward_fixed_step(&step, &mut cache).unwrap();
        cache.advance(1).unwrap();
        assert_eq!(logits.dims(), &[2, config.vocab_size]);
        let d = max_diff(&logits, &full.i((.., t, ..)).unwrap());
        assert!(d < 2e-4, "position {t}: {d} from the full forward");
    }
    assert_eq!(cache.len(), 14);
}

#[test]
fn ordinary_steps_continue_after_fixed_ones_and_stale_slots_are_masked() {
    let config = tiny_config(Architecture::Qwen2, 1, true);
    let model = tiny_model(&config, 4);
    let toks = tokens(12, config.vocab_size, 3);
    let full = model.forward(&ids(&toks), 0, None).unwrap();
    let mut cache = model.new_cache();
    // A longer prompt first, then a rewind: slots 4..9 keep stale keys that the fixed step
    // must not see (its mask, not the cache length, hides them).
    let other = tokens(9, config.vocab_size, 8);
    model.forward(&ids(&other), 0, Some(&mut cache)).unwrap();
    cache.truncate(0).unwrap();
    model
        .forward(&ids(&toks[..4]), 0, Some(&mut cache))
        .unwrap();
    let step = FixedStep::new(1, cache.capacity(), &Device::Cpu).unwrap();
    for (t, &tok) in toks.iter().enumerate().take(8).skip(4) {
        step.set(&[tok], &[t as u32], config.vocab_size).unwrap();
        let logits = model.forward_fixed_step(&step, &mut cache).unwrap();
        cache.advance(1).unwrap();
        let d = max_diff(&logits, &full.i((.., t, ..)).unwrap());
        assert!(d < 2e-4, "fixed step at {t}: {d}");
    }
    // Two tokens at once through the ordinary path, then one fixed step again.
    let chunk = model
        .forward(&ids(&toks[8..10]), 8, Some(&mut cache))
        .unwrap();
    let d = max_diff(&chunk, &full.i((.., 8..10, ..)).unwrap());
    assert!(d < 2e-4, "ordinary chunk after fixed steps: {d}");
    step.set(&[toks[10]], &[10], config.vocab_size).unwrap();
    let logits = model.forward_fixed_step(&step, &mut cache).unwrap();
    let d = max_diff(&logits, &full.i((.., 10, ..)).unwrap());
    assert!(d < 2e-4, "fixed step after the chunk: {d}");
}

#[test]
fn a_grown_cache_needs_a_step_of_its_size() {
    let config = tiny_config(Architecture::Llama, 2, false);
    let model = tiny_model(&config, 2);
    let mut cache = model.new_cache();
    let step = FixedStep::new(1, 256, &Device::Cpu).unwrap();
    step.set(&[1], &[0], config.vocab_size).unwrap();
    let err = model.forward_fixed_step(&step, &mut cache).unwrap_err();
    assert!(err.to_string().contains("slots"), "{err}");
    model
        .forward(&ids(&[1, 2, 3]), 0, Some(&mut cache))
        .unwrap();
    assert_eq!(cache.capacity(), 256);
    assert!(!cache.reserve(100).unwrap(), "no growth needed");
    assert!(cache.reserve(300).unwrap(), "the buffers move");
    assert_eq!(cache.capacity(), 300);
    let err = cache.advance(298).unwrap_err();
    assert!(err.to_string().contains("capacity of 300"), "{err}");
    let err = model.forward_fixed_step(&step, &mut cache).unwrap_err();
    assert!(err.to_string().contains("300"), "{err}");
    // The grown cache kept its three positions: a fixed step of its size continues them.
    let full = model.forward(&ids(&[1, 2, 3, 4]), 0, None).unwrap();
    let step = FixedStep::new(1, 300, &Device::Cpu).unwrap();
    step.set(&[4], &[3], config.vocab_size).unwrap();
    let logits = model.forward_fixed_step(&step, &mut cache).unwrap();
    let d = max_diff(&logits, &full.i((.., 3, ..)).unwrap());
    assert!(d < 2e-4, "after growth: {d}");
}

#[test]
fn bad_step_inputs_are_named() {
    let step = FixedStep::new(2, 8, &Device::Cpu).unwrap();
    let msg = |r: metal_candle::Result<()>| r.unwrap_err().to_string();
    assert!(msg(step.set(&[1], &[0, 0], 10)).contains("1 ids"));
    assert!(msg(step.set(&[1, 10], &[0, 0], 10)).contains("token id 10"));
    assert!(msg(step.set(&[1, 2], &[0, 8], 10)).contains("position 8"));
    assert!(FixedStep::new(0, 8, &Device::Cpu).is_err());
}

#[test]
fn an_emptied_cache_keeps_its_buffers_and_takes_a_new_batch_size() {
    let config = tiny_config(Architecture::Llama, 2, false);
    let model = tiny_model(&config, 6);
    let rows = [
        tokens(6, config.vocab_size, 4),
        tokens(6, config.vocab_size, 5),
    ];
    let mut cache = model.new_cache();
    model.forward(&batch(&rows), 0, Some(&mut cache)).unwrap();
    let before = cache.capacity();
    cache.truncate(0).unwrap();
    assert_eq!(cache.capacity(), before, "emptying keeps the buffers");
    // One row now: the emptied buffers of two rows give way to new ones.
    let full = model.forward(&ids(&rows[1]), 0, None).unwrap();
    let got = model.forward(&ids(&rows[1]), 0, Some(&mut cache)).unwrap();
    assert!(max_diff(&got, &full) < 2e-4);
    // A cache that still holds positions refuses another batch size.
    let err = model
        .forward(&batch(&rows), 6, Some(&mut cache))
        .unwrap_err();
    assert!(err.to_string().contains("new batch"), "{err}");
}

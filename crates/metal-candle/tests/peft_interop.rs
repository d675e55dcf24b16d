//! Interoperability with real PEFT, proven on fixtures made by `fixtures/make_peft_fixtures.py`
//! (transformers + PEFT on the GPU machine) from the tiny `llama_gqa_tied` golden model:
//! - PEFT loads an adapter that metal-candle saved and gives metal-candle's logits;
//! - metal-candle loads an adapter that PEFT made (rsLoRA, all seven projections, B non-zero)
//!   and gives PEFT's logits.
//!
//! `cargo run -p metal-candle --example peft_fixture_inputs` regenerates the adapter and token ids
//! the script reads.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use metal_candle::lora::PeftAdapter;
use metal_candle::model::load::load_hf_dir;
use metal_candle::model::Llama;
use metal_candle::train::data::pack_rows;
use metal_candle::train::data::{Batch, Example};
use metal_candle::train::CausalLm;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn base() -> Llama {
    load_hf_dir(&fixtures().join("llama_gqa_tied"), DType::F32, &Device::Cpu).unwrap()
}

fn input_ids() -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(fixtures().join("peft/input_ids.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The rows as one unpadded batch (every row the same length).
fn batch(ids: &[Vec<u32>]) -> Batch {
    let examples: Vec<Example> = ids
        .iter()
        .map(|row| Example {
            tokens: row.clone(),
            trainable: vec![true; row.len()],
        })
        .collect();
    let rows = pack_rows(&examples, ids[0].len(), false).unwrap();
    Batch::from_rows(&rows.iter().collect::<Vec<_>>(), &Device::Cpu).unwrap()
}

fn reference(name: &str) -> Tensor {
    let path = fixtures().join("peft/logits.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .remove(name)
        .unwrap_or_else(|| panic!("{}: no {name}", path.display()))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Checks `model`'s logits against PEFT's `name` logits; the tolerance is relative to the
/// adapter's effect (the difference from the base), so the check could not pass with the
/// adapter ignored.
fn assert_matches(model: &Llama, name: &str) {
    let ids = input_ids();
    let got = model.forward_batch(&batch(&ids)).unwrap();
    let want = reference(name);
    let effect = max_abs_diff(&want, &reference("base"));
    let err = max_abs_diff(&got, &want);
    assert!(
        effect > 1e-2,
        "{name}: the adapter barely changes the logits ({effect})"
    );
    assert!(
        err < 1e-4 * (1.0 + effect),
        "{name}: logits differ from PEFT's by {err} (adapter effect {effect})"
    );
}

#[test]
fn our_base_matches_transformers() {
    let got = base().forward_batch(&batch(&input_ids())).unwrap();
    let err = max_abs_diff(&got, &reference("base"));
    assert!(err < 1e-4, "base logits differ from transformers' by {err}");
}

#[test]
fn peft_runs_our_adapter_with_our_logits() {
    let mut model = base();
    PeftAdapter::load(&fixtures().join("peft/ours"), &Device::Cpu)
        .unwrap()
        .apply(&mut model)
        .unwrap();
    assert_matches(&model, "ours");
}

#[test]
fn we_run_a_peft_made_adapter_with_its_logits() {
    let dir = fixtures().join("peft/peft_made");
    let adapter = PeftAdapter::load(&dir, &Device::Cpu).unwrap();
    assert!(
        adapter.config.use_rslora,
        "the fixture is meant to exercise rsLoRA"
    );
    assert_eq!(adapter.modules.len(), 14, "seven projections in two layers");
    let mut model = base();
    adapter.apply(&mut model).unwrap();
    assert_matches(&model, "peft_made");
}

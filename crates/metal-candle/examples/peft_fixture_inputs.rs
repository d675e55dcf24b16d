//! Writes the inputs of `tests/fixtures/make_peft_fixtures.py`: `tests/fixtures/peft/ours` (an
//! adapter on all seven projections of the `llama_gqa_tied` fixture, r = 8, alpha = 16, with B
//! made non-zero so that it changes the logits) and `tests/fixtures/peft/input_ids.json`.
//! Deterministic: running it again rewrites the same bytes.
//!
//! ```text
//! cargo run -p metal-candle --example peft_fixture_inputs
//! ```

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use metal_candle::lora::{self, AdapterSpec};
use metal_candle::model::load::load_hf_dir;

fn main() -> metal_candle::Result<()> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut model = load_hf_dir(&fixtures.join("llama_gqa_tied"), DType::F32, &Device::Cpu)?;
    let spec = AdapterSpec {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        use_rslora: false,
        targets: lora::parse_targets("all")?,
    };
    lora::attach_adapters(&mut model, &spec, 7)?;
    let mut state = 0x5EED_u64;
    for (name, var) in lora::adapter_vars(&model) {
        if name.ends_with("lora_b") {
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| {
                    state =
                        metal_candle::train::rng::mix64(state.wrapping_add(0x9E37_79B9_7F4A_7C15));
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                })
                .collect();
            var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu)?)?;
        }
    }
    let dir = fixtures.join("peft");
    lora::save_peft_adapter(&model, &spec, Some("llama_gqa_tied"), &dir.join("ours"))?;
    let ids: Vec<Vec<u32>> = (0..2)
        .map(|r| {
            (0..12)
                .map(|i| ((r * 37 + i * 11 + 3) % 120) as u32)
                .collect()
        })
        .collect();
    let json = serde_json::to_string(&ids)
        .map_err(|e| metal_candle::Error::Msg(format!("input ids: {e}")))?;
    metal_candle::fs::write_atomic(&dir.join("input_ids.json"), json.as_bytes())?;
    println!("wrote {}", dir.display());
    Ok(())
}

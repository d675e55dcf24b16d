//! The training loop on a tiny model: learning, exact resume, divergence, PEFT files, merge.

mod train_common;

use candle_core::DType;
use metal_candle::lora::{self, AdapterSpec, PeftAdapter};
use metal_candle::train::data::{pack_rows, Batch, DataLoader, Example};
use metal_candle::train::{self, CausalLm, LrSchedule, ScheduleKind, TrainConfig};
use train_common::{temp_dir, ToyLm};

fn spec() -> AdapterSpec {
    AdapterSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        targets: vec!["q_proj".into(), "down_proj".into()],
    }
}

fn loader(seed: u64) -> DataLoader {
    let text =
        b"the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.";
    let examples: Vec<Example> = text
        .chunks(12)
        .map(|c| Example {
            tokens: c.iter().map(|&b| b as u32 + 2).collect(),
            trainable: vec![true; c.len()],
        })
        .collect();
    DataLoader::new(pack_rows(&examples, 24, true).unwrap(), 2, seed, true).unwrap()
}

fn config(dir: &std::path::Path, steps: usize, lr: f64) -> TrainConfig {
    let mut cfg = TrainConfig::new(
        LrSchedule::new(ScheduleKind::Cosine, lr, 2, steps).unwrap(),
        dir,
    );
    cfg.seed = 9;
    cfg
}

#[test]
fn training_on_a_memorisable_set_drives_the_loss_down() {
    let dir = temp_dir("learn");
    let mut model = ToyLm::new(32, 1, DType::F32);
    let mut data = loader(1);
    let report = train::train(
        &mut model,
        &spec(),
        &mut data,
        None,
        &config(&dir, 60, 3e-2),
        None,
    )
    .unwrap();
    let first = report.history[0].loss;
    let last = report.history.last().unwrap().loss;
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    assert!(dir.join("adapter/adapter_model.safetensors").is_file());
    assert!(dir.join("loss.png").is_file());
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 60);
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_losses_exactly() {
    let mut s = spec();
    s.dropout = 0.1; // dropout draws must resume too
    let run = |dir: &std::path::Path, stop: Option<usize>, resume: bool| {
        let mut model = ToyLm::new(16, 3, DType::F32);
        let mut data = loader(5);
        let mut cfg = config(dir, 12, 1e-2);
        cfg.grad_accum = 2;
        cfg.save_every = 5;
        cfg.stop_after = stop;
        let from = resume.then(|| dir.to_path_buf());
        train::train(&mut model, &s, &mut data, None, &cfg, from.as_deref()).unwrap()
    };
    let full = run(&temp_dir("full"), None, false);
    let dir = temp_dir("part");
    let part = run(&dir, Some(7), false); // checkpoints at 5 and 7 (the last step of this call)
    assert_eq!(part.steps, 7);
    std::fs::remove_dir_all(dir.join("checkpoints/step-000007")).unwrap();
    std::fs::write(dir.join("checkpoints/latest"), "step-000005").unwrap();
    let resumed = run(&dir, None, true);
    let a: Vec<f64> = full.history.iter().map(|r| r.loss).collect();
    let b: Vec<f64> = resumed.history.iter().map(|r| r.loss).collect();
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "resumed losses differ");
}

/// A model whose logits become NaN once a flag is set.
struct Poisoned {
    inner: ToyLm,
    after: std::cell::Cell<usize>,
}

impl CausalLm for Poisoned {
    fn forward_batch(&self, batch: &Batch) -> metal_candle::Result<candle_core::Tensor> {
        let n = self.after.get();
        self.after.set(n.saturating_sub(1));
        let out = self.inner.forward_batch(batch)?;
        if n == 0 {
            return Ok((out * f64::NAN)?);
        }
        Ok(out)
    }
    fn lora_linears(&self) -> Vec<(String, &lora::LoraLinear)> {
        self.inner.lora_linears()
    }
    fn lora_linear_mut(&mut self, path: &str) -> Option<&mut lora::LoraLinear> {
        self.inner.lora_linear_mut(path)
    }
    fn device(&self) -> &candle_core::Device {
        self.inner.device()
    }
}

#[test]
fn a_nan_loss_stops_with_an_error_and_keeps_the_last_checkpoint() {
    let dir = temp_dir("nan");
    let mut model = Poisoned {
        inner: ToyLm::new(16, 2, DType::F32),
        after: std::cell::Cell::new(6),
    };
    let mut data = loader(2);
    let mut cfg = config(&dir, 10, 1e-2);
    cfg.save_every = 3;
    let err = train::train(&mut model, &spec(), &mut data, None, &cfg, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("NaN") && err.contains("step 7") && err.contains("step-000006"),
        "{err}"
    );
    let ckpt = train::resolve_checkpoint(&dir).unwrap();
    assert!(ckpt.ends_with("step-000006"));
    assert_eq!(train::read_state(&ckpt).unwrap().step, 6);
    PeftAdapter::load(&ckpt, &candle_core::Device::Cpu).unwrap();
}

#[test]
fn peft_files_have_peft_names_shapes_and_config() {
    let dir = temp_dir("peft");
    let mut model = ToyLm::new(16, 4, DType::F32);
    let mut data = loader(3);
    train::train(
        &mut model,
        &spec(),
        &mut data,
        None,
        &config(&dir, 3, 1e-2),
        None,
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(
        dir.join("adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut keys: Vec<_> = tensors.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight",
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        ]
    );
    assert_eq!(
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dims(),
        &[4, 16]
    ); // (r, in)
    assert_eq!(
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].dims(),
        &[16, 4]
    ); // (out, r)
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8.0);
    assert_eq!(config["bias"], "none");
    assert_eq!(config["use_rslora"], false);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "down_proj"])
    );
}

#[test]
fn saved_adapters_load_back_to_the_same_outputs_and_merge_equals_unmerged() {
    let dir = temp_dir("roundtrip");
    let mut model = ToyLm::new(16, 5, DType::F32);
    let mut data = loader(4);
    train::train(
        &mut model,
        &spec(),
        &mut data,
        None,
        &config(&dir, 5, 5e-2),
        None,
    )
    .unwrap();
    let batch = loader(4).next_batch(model.device()).unwrap();
    let trained = model.forward_batch(&batch).unwrap();

    let mut fresh = ToyLm::new(16, 5, DType::F32);
    let base = fresh.forward_batch(&batch).unwrap();
    let adapter = PeftAdapter::load(&dir.join("adapter"), fresh.device()).unwrap();
    adapter.apply(&mut fresh).unwrap();
    let loaded = fresh.forward_batch(&batch).unwrap();
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(diff(&trained, &base) > 1e-3, "training changed nothing");
    assert_eq!(diff(&trained, &loaded), 0.0);
    lora::merge_adapters(&mut fresh).unwrap();
    assert!(fresh
        .lora_linears()
        .iter()
        .all(|(_, l)| l.adapter().is_none()));
    let merged = fresh.forward_batch(&batch).unwrap();
    assert!(
        diff(&merged, &loaded) < 1e-4,
        "merged differs by {}",
        diff(&merged, &loaded)
    );
}

#[test]
fn adapters_for_another_model_are_refused_with_the_shape() {
    let dir = temp_dir("wrong");
    let mut small = ToyLm::new(16, 6, DType::F32);
    lora::attach_adapters(&mut small, &spec(), 0).unwrap();
    lora::save_peft_adapter(&small, &spec(), None, &dir).unwrap();
    let mut big = ToyLm::new(24, 6, DType::F32);
    let err = PeftAdapter::load(&dir, big.device())
        .unwrap()
        .apply(&mut big)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0") && err.contains("[4, 16]") && err.contains("another model"),
        "{err}"
    );
}

#[test]
fn peft_keys_with_default_load() {
    let dir = temp_dir("default");
    let dev = candle_core::Device::Cpu;
    let a = candle_core::Tensor::randn(0f32, 1., (4, 16), &dev).unwrap();
    let b = candle_core::Tensor::randn(0f32, 1., (16, 4), &dev).unwrap();
    let p = "base_model.model.model.layers.0.self_attn.q_proj";
    candle_core::safetensors::save(
        &[
            (format!("{p}.lora_A.default.weight"), a.clone()),
            (format!("{p}.lora_B.default.weight"), b.clone()),
        ]
        .into_iter()
        .collect(),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"]}"#,
    )
    .unwrap();
    let adapter = PeftAdapter::load(&dir, &dev).unwrap();
    let mut model = ToyLm::new(16, 7, DType::F32);
    adapter.apply(&mut model).unwrap();
    let (_, q) = &model.lora_linears()[0];
    let got = q.adapter().unwrap().delta_weight(DType::F32).unwrap();
    let want = (b.matmul(&a).unwrap() * 2.0).unwrap();
    assert!(
        (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            < 1e-5
    );
}

#[test]
fn lora_gradients_match_finite_differences_in_f64() {
    let mut model = ToyLm::new(12, 8, DType::F64);
    let batch = loader(8).next_batch(&candle_core::Device::Cpu).unwrap();
    let worst = train_common::lora_grad_fd_error(&mut model, &batch, &spec());
    assert!(worst < 1e-3, "{worst}");
}

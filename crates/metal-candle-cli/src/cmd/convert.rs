//! `metal-candle convert`: a GGUF model to a Hugging Face folder.

use std::path::PathBuf;

use candle_core::DType;
use metal_candle::model::load::convert_gguf_to_hf;

/// Writes a llama-family GGUF model (dequantised) and its tokenizer as a Hugging Face folder:
/// config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat
/// template), generation_config.json.
#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The GGUF file to read.
    #[arg(long)]
    pub gguf: PathBuf,
    /// The folder to write (created if missing; files in it are replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype of the written model.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    pub dtype: String,
}

/// Runs the conversion.
pub fn run(args: ConvertArgs) -> Result<(), Box<dyn std::error::Error>> {
    let dtype = match args.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    convert_gguf_to_hf(&args.gguf, &args.out, dtype)?;
    println!(
        "wrote {} ({:?}) from {}",
        args.out.display(),
        dtype,
        args.gguf.display()
    );
    Ok(())
}

//! `metal-candle`: fine-tune transformer language models with LoRA and run them.
//!
//! Each subcommand lives in its own module; this file only parses and dispatches.

mod cmd;
mod greedy;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "metal-candle",
    version,
    about = "LoRA fine-tuning and inference on Candle, with fused kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show which kernels each backend runs on this build.
    Info,
    /// Fine-tune with LoRA (no arguments: SmolLM2-135M on Shakespeare's sonnets, a few minutes on CPU).
    Train(cmd::train::TrainArgs),
    /// Fold a LoRA adapter into its base model and write a Hugging Face folder.
    Merge(cmd::merge::MergeArgs),
    /// Measure LoRA training tokens/s and peak memory on a random-weight model.
    BenchTrain(cmd::bench_train::BenchTrainArgs),
    /// Generate text from a prompt (streamed to stdout).
    Generate(cmd::generate::GenerateArgs),
    /// Chat with an instruct model (interactive or piped).
    Chat(cmd::chat::ChatArgs),
    /// Embed sentences (lines or JSONL in, JSONL vectors out).
    Embed(cmd::embed::EmbedArgs),
    /// Convert a GGUF model to a Hugging Face folder (safetensors, config, tokenizer).
    Convert(cmd::convert::ConvertArgs),
    /// Benchmarks: `bench ops`, `bench generate`, `bench embed`.
    Bench(cmd::bench::BenchArgs),
    /// Check every CUDA kernel against the CPU reference (needs a GPU; fails without one).
    GpuTest(cmd::gpu_test::GpuTestArgs),
}

fn main() {
    let cli = Cli::parse();
    // Large CPU tensors: reuse freed buffers instead of page-faulting fresh ones (alloc.rs).
    metal_candle::alloc::reuse_freed_memory();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Info => info(),
        Command::Train(args) => cmd::train::run(args),
        Command::Merge(args) => cmd::merge::run(args),
        Command::BenchTrain(args) => cmd::bench_train::run(args),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Embed(a) => cmd::embed::run(a),
        Command::Convert(args) => cmd::convert::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::GpuTest(args) => cmd::gpu_test::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn info() -> Result<(), Box<dyn std::error::Error>> {
    use candle_core::{DType, Device};
    use metal_candle::ops::kernel_path;
    println!("cuda feature: {}", cfg!(feature = "cuda"));
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        println!("cpu {dtype:?}: {:?}", kernel_path(&Device::Cpu, dtype));
    }
    Ok(())
}

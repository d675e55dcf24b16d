//! `metal-candle bench <what>`: end-to-end speed measurements, printed as text or JSON.

use super::{bench_embed, bench_generate, bench_ops};

/// Measure end-to-end speed (tokens/s, sentences/s).
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

/// What to measure.
#[derive(clap::Subcommand, Debug)]
pub enum BenchWhat {
    /// The fused ops against candle's unfused and candle-nn's paths (`--device cuda --json FILE`).
    Ops(bench_ops::OpsArgs),
    /// Prefill and decode tokens/s of greedy generation with the KV cache.
    Generate(bench_generate::BenchGenerateArgs),
    /// Sentences/s of sentence embedding.
    Embed(bench_embed::BenchEmbedArgs),
}

pub fn run(args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    match args.what {
        BenchWhat::Ops(a) => bench_ops::run(a),
        BenchWhat::Generate(a) => bench_generate::run(a),
        BenchWhat::Embed(a) => bench_embed::run(a),
    }
}

/// Median of the samples (they need not be sorted).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

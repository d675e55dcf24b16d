//! `metal-candle bench embed`: sentences/s of the BERT embedding pipeline (tokenize, pad, encode,
//! pool, normalise, copy to the host) over bench/data/sentences.txt, the input of the
//! sentence-transformers peer (bench/peers/embed_st.py).

use std::path::PathBuf;
use std::time::Instant;

use candle_nn::VarBuilder;
use metal_candle::embed::{
    load_tokenizer, options_from_dir, BertConfig, BertModel, SentenceEmbedder,
};

use super::bench::median;
use super::device::DeviceArgs;
use super::models;

#[derive(clap::Args, Debug)]
pub struct BenchEmbedArgs {
    /// Model folder; default all-MiniLM-L6-v2 from the fetched assets.
    #[arg(long)]
    pub model: Option<String>,
    /// Random weights from the folder's config.json (needs only config.json and tokenizer.json).
    #[arg(long)]
    pub random_weights: bool,
    /// One sentence per line.
    #[arg(long, default_value = "bench/data/sentences.txt")]
    pub sentences: PathBuf,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Timed runs over all sentences (the median is reported), after one warm-up run.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: BenchEmbedArgs) -> Result<(), Box<dyn std::error::Error>> {
    let device = args.device.device()?;
    let dtype = args.device.dtype(&device)?;
    let dir = models::embedding_model_dir(args.model.as_deref())?;
    let mut embedder = if args.random_weights {
        let config = BertConfig::from_file(&dir.join("config.json"))?;
        let weights = BertModel::random_weights(&config, dtype, &device)?;
        let model = BertModel::load(VarBuilder::from_tensors(weights, dtype, &device), &config)?;
        let options = options_from_dir(&dir, &config)?;
        SentenceEmbedder::new(model, load_tokenizer(&dir.join("tokenizer.json"))?, options)?
    } else {
        SentenceEmbedder::from_dir(&dir, &device, dtype)?
    };
    embedder.set_batch_size(args.batch_size)?;
    let text = std::fs::read_to_string(&args.sentences)
        .map_err(|e| format!("{}: {e}", args.sentences.display()))?;
    let sentences: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if sentences.is_empty() {
        return Err(format!("{}: no sentences", args.sentences.display()).into());
    }
    let run = || -> Result<f64, Box<dyn std::error::Error>> {
        let t = Instant::now();
        // The vectors end on the host, so the device's work is done when the clock stops.
        let v = embedder.embed(&sentences)?;
        let dt = t.elapsed().as_secs_f64();
        if v.len() != sentences.len() {
            return Err(format!("{} vectors for {} sentences", v.len(), sentences.len()).into());
        }
        Ok(dt)
    };
    run()?;
    let times = (0..args.repeats.max(1))
        .map(|_| run())
        .collect::<Result<Vec<_>, _>>()?;
    let seconds = median(times);
    let per_s = sentences.len() as f64 / seconds;
    if args.json {
        let out = serde_json::json!({
            "impl": "metal-candle", "device": args.device.device, "dtype": format!("{dtype:?}").to_lowercase(),
            "batch_size": args.batch_size, "sentences": sentences.len(), "sentences_per_s": per_s,
            "random_weights": args.random_weights,
        });
        println!("{out}");
    } else {
        println!(
            "{} sentences in {seconds:.3} s: {per_s:.0} sentences/s ({dtype:?}, batch {})",
            sentences.len(),
            args.batch_size
        );
    }
    Ok(())
}

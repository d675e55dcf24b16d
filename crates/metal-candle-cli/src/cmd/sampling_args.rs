//! The sampling and stopping flags shared by `generate` and `chat`.

use metal_candle::generate::{GenerationConfig, SamplingConfig};

/// How tokens are chosen and when generation stops.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most new tokens per reply.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 = greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample only from the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample only from the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Drop tokens less likely than min-p × the most likely one.
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Penalise tokens already seen (1 = off; HF's rule, right for negative logits too).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Subtract this × count from the logit of each seen token.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Subtract this from the logit of every seen token.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this (repeatable); the stop string is not printed.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The generation settings, with the model's end-of-sequence ids.
    pub fn config(&self, eos_token_ids: Vec<u32>) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.max_tokens,
            sampling: SamplingConfig {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                frequency_penalty: self.frequency_penalty,
                presence_penalty: self.presence_penalty,
                penalty_last_n: None,
                seed: self.seed,
            },
            eos_token_ids,
            stop_strings: self.stop.clone(),
        }
    }
}

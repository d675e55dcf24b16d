//! The generation loop: prefill the prompt into the model's KV cache, then decode one token at
//! a time, sampling each from the last position's logits, until an end-of-sequence token, a
//! stop string or the token limit.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, D};
use tokenizers::Tokenizer;

use super::{Sampler, SamplingConfig, StopStrings, TextStreamer};
use crate::{Error, Result};

/// A causal language model that keeps its own key/value cache.
///
/// `forward` feeds `input_ids` (batch, seq) whose first token sits at position `offset` (the
/// number of tokens already in the cache), appends their keys and values to the cache, and
/// returns the logits of the **last** position, (batch, vocab). Prefill is one call with the
/// whole prompt at offset 0; each decode step is a call with one token per row.
pub trait DecoderLm {
    /// See the trait docs.
    fn forward(&mut self, input_ids: &Tensor, offset: usize) -> Result<Tensor>;
    /// Empties the cache so the next call can start at offset 0.
    fn clear_cache(&mut self);
    /// The device the model runs on (input ids are made there).
    fn device(&self) -> &Device;
    /// The longest sequence the model supports, when it has a limit.
    fn max_positions(&self) -> Option<usize> {
        None
    }
}

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampling: SamplingConfig,
    /// Generation ends when one of these is produced (it is not part of the output).
    pub eos_token_ids: Vec<u32>,
    /// Generation ends when the text contains one of these (cut before it).
    pub stop_strings: Vec<String>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingConfig::default(),
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token was produced.
    Eos,
    /// A stop string appeared in the text.
    StopString,
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// The caller's callback asked to stop.
    Cancelled,
}

/// Counts and timings of one generation (the prefill time runs until the first sampled token is
/// on the host, so it includes the device's work).
#[derive(Debug, Clone, Copy, Default)]
pub struct GenerationStats {
    /// Prompt tokens per row.
    pub prompt_tokens: usize,
    /// New tokens per row (the longest row for a batch).
    pub new_tokens: usize,
    /// Rows in the batch.
    pub batch: usize,
    /// Time to process the prompt and pick the first token.
    pub prefill: Duration,
    /// Time for every later token.
    pub decode: Duration,
}

impl GenerationStats {
    /// Prompt tokens per second over all rows.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        (self.prompt_tokens * self.batch) as f64 / self.prefill.as_secs_f64()
    }

    /// Generated tokens per second over all rows, after the first token.
    pub fn decode_tokens_per_s(&self) -> f64 {
        (self.new_tokens.saturating_sub(1) * self.batch) as f64 / self.decode.as_secs_f64()
    }
}

/// New tokens of one generation and why it stopped.
#[derive(Debug, Clone)]
pub struct GeneratedTokens {
    /// New tokens, without the end-of-sequence token.
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub finish: FinishReason,
    /// Counts and timings.
    pub stats: GenerationStats,
}

/// New text of one generation.
#[derive(Debug, Clone)]
pub struct GeneratedText {
    /// The new text (cut before a stop string).
    pub text: String,
    /// New tokens, without the end-of-sequence token (up to and including the one that
    /// completed a stop string).
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub finish: FinishReason,
    /// Counts and timings.
    pub stats: GenerationStats,
}

/// Picks one token per row of `logits` (batch, vocab), each row with its own history.
fn next_tokens(sampler: &mut Sampler, logits: &Tensor, histories: &[&[u32]]) -> Result<Vec<u32>> {
    if sampler.is_plain_greedy() {
        // Arg-max on the device: only `batch` ids cross to the host.
        return Ok(logits
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?);
    }
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    rows.iter()
        .zip(histories)
        .map(|(row, h)| sampler.sample(row, h))
        .collect()
}

fn check_prompt(model: &dyn DecoderLm, prompt_len: usize, cfg: &GenerationConfig) -> Result<()> {
    if prompt_len == 0 {
        return Err(Error::InvalidConfig {
            name: "prompt",
            value: "0 tokens".into(),
            expected: "at least one token",
        });
    }
    if let Some(max) = model.max_positions() {
        if prompt_len + cfg.max_new_tokens > max {
            return Err(Error::InvalidConfig {
                name: "prompt + max_new_tokens",
                value: format!("{prompt_len} + {}", cfg.max_new_tokens),
                expected:
                    "at most the model's context length; shorten the prompt or lower max_new_tokens",
            });
        }
    }
    Ok(())
}

/// Generates from one prompt; `on_token` sees each new token (not EOS) and returns `false` to
/// stop early.
pub fn generate_tokens(
    model: &mut dyn DecoderLm,
    prompt: &[u32],
    cfg: &GenerationConfig,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<GeneratedTokens> {
    check_prompt(model, prompt.len(), cfg)?;
    let mut sampler = cfg.sampling.sampler()?;
    model.clear_cache();
    let mut history = prompt.to_vec();
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        batch: 1,
        ..Default::default()
    };
    let mut finish = FinishReason::MaxTokens;
    let start = Instant::now();
    let mut input = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    let mut decode_start = None;
    for step in 0..cfg.max_new_tokens {
        let logits = model.forward(&input, history.len() - input.dim(1)?)?;
        let token = next_tokens(&mut sampler, &logits, &[&history])?[0];
        if step == 0 {
            stats.prefill = start.elapsed();
            decode_start = Some(Instant::now());
        }
        if cfg.eos_token_ids.contains(&token) {
            finish = FinishReason::Eos;
            break;
        }
        history.push(token);
        stats.new_tokens += 1;
        if !on_token(token)? {
            finish = FinishReason::Cancelled;
            break;
        }
        input = Tensor::new(&[token], model.device())?.unsqueeze(0)?;
    }
    stats.decode = decode_start.map(|t| t.elapsed()).unwrap_or_default();
    Ok(GeneratedTokens {
        tokens: history[prompt.len()..].to_vec(),
        finish,
        stats,
    })
}

/// Generates text from one prompt, streaming valid UTF-8 pieces to `on_text` as they complete
/// and stopping at a stop string (whose text is not emitted).
pub fn generate_text(
    model: &mut dyn DecoderLm,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    cfg: &GenerationConfig,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<GeneratedText> {
    let mut streamer = TextStreamer::new(tokenizer);
    let mut stops = StopStrings::new(cfg.stop_strings.clone());
    let mut text = String::new();
    let mut emit = |piece: &str, text: &mut String| -> Result<()> {
        if !piece.is_empty() {
            text.push_str(piece);
            on_text(piece)?;
        }
        Ok(())
    };
    let out = generate_tokens(model, prompt, cfg, |token| {
        if let Some(piece) = streamer.push(token)? {
            let (safe, stopped) = stops.push(&piece);
            emit(&safe, &mut text)?;
            return Ok(!stopped);
        }
        Ok(true)
    })?;
    let mut finish = out.finish;
    if stops.stopped() {
        finish = FinishReason::StopString;
    } else {
        if let Some(rest) = streamer.finish()? {
            let (safe, stopped) = stops.push(&rest);
            emit(&safe, &mut text)?;
            if stopped {
                finish = FinishReason::StopString;
            }
        }
        let tail = stops.finish();
        emit(&tail, &mut text)?;
    }
    Ok(GeneratedText {
        text,
        tokens: out.tokens,
        finish,
        stats: out.stats,
    })
}

/// Generates from a batch of prompts of equal length (no padding), each row sampled with its
/// own history from one seeded sampler. A row stops at its EOS; the batch runs until every row
/// has stopped or `max_new_tokens` is reached.
pub fn generate_batch(
    model: &mut dyn DecoderLm,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
) -> Result<(Vec<GeneratedTokens>, GenerationStats)> {
    let Some(first) = prompts.first() else {
        return Err(Error::InvalidConfig {
            name: "prompts",
            value: "none".into(),
            expected: "at least one prompt",
        });
    };
    let len = first.len();
    if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len() != len) {
        return Err(Error::shape(
            "generate_batch",
            format!("prompt {i} has {} tokens but prompt 0 has {len}; batched prompts must have equal length", p.len()),
        ));
    }
    check_prompt(model, len, cfg)?;
    let batch = prompts.len();
    let mut sampler = cfg.sampling.sampler()?;
    model.clear_cache();
    let mut histories: Vec<Vec<u32>> = prompts.to_vec();
    let mut finished: Vec<Option<FinishReason>> = vec![None; batch];
    let mut stats = GenerationStats {
        prompt_tokens: len,
        batch,
        ..Default::default()
    };
    let start = Instant::now();
    let mut input = Tensor::new(histories.clone(), model.device())?;
    let mut offset = 0;
    let mut decode_start = None;
    for step in 0..cfg.max_new_tokens {
        let logits = model.forward(&input, offset)?;
        offset += input.dim(1)?;
        let views: Vec<&[u32]> = histories.iter().map(|h| h.as_slice()).collect();
        let tokens = next_tokens(&mut sampler, &logits, &views)?;
        if step == 0 {
            stats.prefill = start.elapsed();
            decode_start = Some(Instant::now());
        }
        for (row, &t) in tokens.iter().enumerate() {
            if finished[row].is_none() {
                if cfg.eos_token_ids.contains(&t) {
                    finished[row] = Some(FinishReason::Eos);
                } else {
                    histories[row].push(t);
                }
            }
        }
        stats.new_tokens = step + 1;
        if finished.iter().all(Option::is_some) {
            break;
        }
        // Finished rows keep being fed (their last token) so the batch stays rectangular.
        let next: Vec<u32> = tokens.to_vec();
        input = Tensor::new(next.as_slice(), model.device())?.unsqueeze(1)?;
    }
    stats.decode = decode_start.map(|t| t.elapsed()).unwrap_or_default();
    let rows = histories
        .into_iter()
        .zip(finished)
        .map(|(h, f)| {
            let tokens = h[len..].to_vec();
            let row_stats = GenerationStats {
                new_tokens: tokens.len(),
                batch: 1,
                ..stats
            };
            GeneratedTokens {
                tokens,
                finish: f.unwrap_or(FinishReason::MaxTokens),
                stats: row_stats,
            }
        })
        .collect();
    Ok((rows, stats))
}

//! Choosing the next token from a row of logits: a chain of logits processors, then a draw.
//!
//! The chain runs in the order its steps were added. [`SamplingConfig::sampler`] builds the
//! usual order (the one Hugging Face transformers applies): penalties on the full vocabulary,
//! then temperature, top-k, top-p and min-p, then a seeded draw. Temperature 0 is greedy
//! (arg-max after the penalties). Every draw comes from the sampler's own RNG seeded once, so
//! the same seed, logits and history give the same tokens on every run and machine.
//!
//! ```
//! use metal_candle::generate::{Sampler, SamplingConfig};
//! # fn main() -> metal_candle::Result<()> {
//! let config = SamplingConfig { temperature: 0.8, top_k: Some(2), seed: 7, ..Default::default() };
//! let mut sampler = config.sampler()?;
//! let token = sampler.sample(&[0.1, 2.0, -1.0, 1.5], &[])?;
//! assert!(token == 1 || token == 3); // top-k 2 keeps only the two largest logits
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Error, Result};

/// The user-facing sampling settings (what the CLI flags set). `Default` is greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 means greedy (arg-max).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (nucleus).
    pub top_p: Option<f64>,
    /// Drop tokens whose probability is below `min_p` times the top token's.
    pub min_p: Option<f64>,
    /// Hugging Face's repetition penalty (1 = off): a seen token's logit is divided by it when
    /// positive and multiplied by it when negative, so it always becomes less likely.
    pub repetition_penalty: f32,
    /// OpenAI's frequency penalty: subtracts `count × value` from a seen token's logit.
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty: subtracts `value` from every seen token's logit.
    pub presence_penalty: f32,
    /// Only the last this many tokens of the history count for the penalties (all when `None`).
    pub penalty_last_n: Option<usize>,
    /// Seed of the sampler's RNG.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: None,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Checks every value and builds the sampler in the usual order: penalties, temperature,
    /// top-k, top-p, min-p.
    pub fn sampler(&self) -> Result<Sampler> {
        let mut s = Sampler::new(self.seed);
        if self.repetition_penalty != 1.0 {
            s = s.then(Step::RepetitionPenalty(self.repetition_penalty))?;
        }
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            s = s.then(Step::FrequencyPresencePenalty {
                frequency: self.frequency_penalty,
                presence: self.presence_penalty,
            })?;
        }
        s.penalty_last_n = self.penalty_last_n;
        if self.temperature == 0.0 {
            return s.then(Step::Greedy);
        }
        s = s.then(Step::Temperature(self.temperature))?;
        if let Some(k) = self.top_k {
            s = s.then(Step::TopK(k))?;
        }
        if let Some(p) = self.top_p {
            s = s.then(Step::TopP(p))?;
        }
        if let Some(p) = self.min_p {
            s = s.then(Step::MinP(p))?;
        }
        Ok(s)
    }
}

/// One logits processor of the chain.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// See [`SamplingConfig::repetition_penalty`]; must be > 0.
    RepetitionPenalty(f32),
    /// See [`SamplingConfig::frequency_penalty`] and [`SamplingConfig::presence_penalty`].
    FrequencyPresencePenalty {
        /// Subtracted once per occurrence.
        frequency: f32,
        /// Subtracted once for any occurrence.
        presence: f32,
    },
    /// Divide the logits by this (> 0).
    Temperature(f64),
    /// Keep the `k` (≥ 1) largest logits.
    TopK(usize),
    /// Nucleus filtering, `0 < p ≤ 1`.
    TopP(f64),
    /// Min-p filtering, `0 ≤ p ≤ 1`.
    MinP(f64),
    /// Keep only the largest logit (the first one on ties): greedy decoding.
    Greedy,
}

impl Step {
    fn validate(&self) -> Result<()> {
        let bad = |name, value: String, expected| {
            Err(Error::InvalidConfig {
                name,
                value,
                expected,
            })
        };
        match *self {
            Step::RepetitionPenalty(p) if !(p > 0.0 && p.is_finite()) => bad(
                "repetition_penalty",
                p.to_string(),
                "a finite number > 0 (1 = off)",
            ),
            Step::FrequencyPresencePenalty {
                frequency,
                presence,
            } if !(frequency.is_finite() && presence.is_finite()) => bad(
                "frequency/presence penalty",
                format!("{frequency}/{presence}"),
                "finite numbers",
            ),
            Step::Temperature(t) if !(t > 0.0 && t.is_finite()) => bad(
                "temperature",
                t.to_string(),
                "a finite number > 0 (use 0 in SamplingConfig for greedy)",
            ),
            Step::TopK(0) => bad("top_k", "0".into(), "at least 1"),
            Step::TopP(p) if !(p > 0.0 && p <= 1.0) => bad("top_p", p.to_string(), "in (0, 1]"),
            Step::MinP(p) if !(0.0..=1.0).contains(&p) => bad("min_p", p.to_string(), "in [0, 1]"),
            _ => Ok(()),
        }
    }
}

/// A seeded chain of [`Step`]s that picks one token from a row of logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    steps: Vec<Step>,
    penalty_last_n: Option<usize>,
    rng: StdRng,
}

/// A token id with its (processed) logit.
type Candidate = (u32, f32);

impl Sampler {
    /// An empty chain (plain sampling from the softmax of the logits) seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            steps: Vec::new(),
            penalty_last_n: None,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Appends a step to the chain after checking its value.
    pub fn then(mut self, step: Step) -> Result<Self> {
        step.validate()?;
        self.steps.push(step);
        Ok(self)
    }

    /// Restricts the penalties to the last `n` tokens of the history.
    pub fn with_penalty_last_n(mut self, n: Option<usize>) -> Self {
        self.penalty_last_n = n;
        self
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// True when the chain is plain arg-max with nothing that depends on the history: the
    /// caller may then take the arg-max on the device and skip copying the logits.
    pub fn is_plain_greedy(&self) -> bool {
        self.steps == [Step::Greedy]
    }

    /// Picks the next token from `logits` (one row, the vocabulary) given the tokens seen so
    /// far (`history`: prompt and generated, for the penalties).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::shape("Sampler::sample", "logits row is empty"));
        }
        let history = match self.penalty_last_n {
            Some(n) => &history[history.len().saturating_sub(n)..],
            None => history,
        };
        let mut logits = logits.to_vec();
        let mut candidates: Option<Vec<Candidate>> = None;
        for step in &self.steps {
            match *step {
                Step::RepetitionPenalty(p) => repetition_penalty(&mut logits, history, p)?,
                Step::FrequencyPresencePenalty {
                    frequency,
                    presence,
                } => frequency_presence_penalty(&mut logits, history, frequency, presence)?,
                _ => {
                    let c = candidates.get_or_insert_with(|| finite_candidates(&logits));
                    apply_filter(*step, c);
                }
            }
        }
        let candidates = candidates.unwrap_or_else(|| finite_candidates(&logits));
        draw(&candidates, &mut self.rng)
    }
}

fn check_token(op: &'static str, token: u32, vocab: usize) -> Result<usize> {
    let i = token as usize;
    if i >= vocab {
        return Err(Error::shape(
            op,
            format!("history holds token {token} but the vocabulary has {vocab} entries"),
        ));
    }
    Ok(i)
}

/// Hugging Face's rule: divide positive logits, multiply negative ones, once per distinct token.
fn repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) -> Result<()> {
    let mut seen = vec![false; logits.len()];
    for &t in history {
        let i = check_token("repetition_penalty", t, logits.len())?;
        if !std::mem::replace(&mut seen[i], true) {
            let l = &mut logits[i];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
    Ok(())
}

fn frequency_presence_penalty(
    logits: &mut [f32],
    history: &[u32],
    frequency: f32,
    presence: f32,
) -> Result<()> {
    let mut counts: HashMap<usize, u32> = HashMap::new();
    for &t in history {
        *counts
            .entry(check_token("frequency_penalty", t, logits.len())?)
            .or_default() += 1;
    }
    for (i, n) in counts {
        logits[i] -= n as f32 * frequency + presence;
    }
    Ok(())
}

/// Every token whose logit is not -inf (masked) nor NaN.
fn finite_candidates(logits: &[f32]) -> Vec<Candidate> {
    logits
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_nan() && **l != f32::NEG_INFINITY)
        .map(|(i, &l)| (i as u32, l))
        .collect()
}

/// Largest logit first; ties by the lower token id, so results never depend on sort stability.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Softmax probabilities of the candidates (in their order), computed in f64.
fn probabilities(c: &[Candidate]) -> Vec<f64> {
    let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = c.iter().map(|x| (x.1 as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

fn apply_filter(step: Step, c: &mut Vec<Candidate>) {
    if c.is_empty() {
        return;
    }
    match step {
        Step::Temperature(t) => c.iter_mut().for_each(|x| x.1 = (x.1 as f64 / t) as f32),
        Step::Greedy => {
            let best = c.iter().copied().min_by(by_logit_desc);
            c.clear();
            c.extend(best);
        }
        Step::TopK(k) if k < c.len() => {
            c.select_nth_unstable_by(k - 1, by_logit_desc);
            c.truncate(k);
        }
        Step::TopP(p) => {
            c.sort_unstable_by(by_logit_desc);
            let probs = probabilities(c);
            // Keep tokens until the mass *before* a token reaches p (HF keeps the token that
            // crosses p), and always at least one.
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    mass += q;
                    mass >= p
                })
                .map_or(c.len(), |i| i + 1);
            c.truncate(keep.max(1));
        }
        Step::MinP(p) => {
            let probs = probabilities(c);
            let top = probs.iter().copied().fold(0.0, f64::max);
            let mut i = 0;
            c.retain(|_| {
                let keep = probs[i] >= p * top;
                i += 1;
                keep
            });
        }
        _ => {}
    }
}

fn draw(c: &[Candidate], rng: &mut StdRng) -> Result<u32> {
    match c {
        [] => Err(Error::Msg(
            "sampling: every logit is -inf or NaN; the model produced no usable distribution"
                .into(),
        )),
        [only] => Ok(only.0),
        _ => {
            let probs = probabilities(c);
            let u: f64 = rng.random();
            let mut acc = 0.0;
            for (p, cand) in probs.iter().zip(c) {
                acc += p;
                if u < acc {
                    return Ok(cand.0);
                }
            }
            // Rounding left `acc` a hair below 1 and `u` above it: the last candidate.
            Ok(c[c.len() - 1].0)
        }
    }
}

//! Training data: plain text or JSONL records → token examples with loss masks → packed rows →
//! batches.
//!
//! Formats, chosen by file extension (`.jsonl`/`.json` are JSONL, anything else plain text; a
//! folder means all its `.txt` files, in name order):
//! - plain text: tokenised whole, an end-of-sequence token after each file, cut into
//!   `seq_len`-token examples, every token trained;
//! - `{"text": ...}`: one example, every token trained;
//! - `{"prompt": ..., "completion": ...}`: the loss covers the completion (and its end token) only;
//! - `{"messages": [{"role", "content"}, ...]}`: rendered with the model's chat template, the
//!   loss covering the assistant replies only.

mod chat;
mod pack;
mod tokenize;

use std::path::{Path, PathBuf};

pub use chat::{ChatTemplate, Message, CHATML_TEMPLATE};
pub use pack::{pack_rows, Batch, DataLoader, DataPosition, Row};
pub use tokenize::EncodeText;

use crate::train::rng::{derive_seed, TrainRng};
use crate::{Error, Result};

/// One training example: tokens and, per token, whether it is a training target.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// `true` where the token is predicted in the loss.
    pub trainable: Vec<bool>,
}

/// How to turn files into examples.
#[derive(Debug, Clone, Copy)]
pub struct DataOptions {
    /// Tokens per row.
    pub seq_len: usize,
    /// Pack several short examples into one row.
    pub pack: bool,
}

/// What loading a data file found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataStats {
    /// Examples read.
    pub examples: usize,
    /// Examples longer than `seq_len`, cut to it.
    pub truncated: usize,
    /// Tokens in all examples.
    pub tokens: usize,
    /// Tokens that are training targets.
    pub trainable_tokens: usize,
}

/// Reads examples from a text file, a folder of `.txt` files or a JSONL file.
pub fn load_examples(
    path: &Path,
    tok: &dyn EncodeText,
    template: &ChatTemplate,
    seq_len: usize,
) -> Result<(Vec<Example>, DataStats)> {
    if seq_len < 2 {
        return Err(Error::InvalidConfig {
            name: "seq_len",
            value: seq_len.to_string(),
            expected: "at least 2 tokens",
        });
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let mut stats = DataStats::default();
    let mut examples = Vec::new();
    if meta.is_dir() {
        for file in text_files_in(path)? {
            examples.extend(text_examples(&file, tok, seq_len)?);
        }
    } else if is_jsonl(path) {
        for (ex, truncated) in jsonl_examples(path, tok, template, seq_len)? {
            stats.truncated += truncated as usize;
            examples.push(ex);
        }
    } else {
        examples = text_examples(path, tok, seq_len)?;
    }
    if examples.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no training examples found (is it empty?)",
            path.display()
        )));
    }
    stats.examples = examples.len();
    stats.tokens = examples.iter().map(|e| e.tokens.len()).sum();
    stats.trainable_tokens = examples
        .iter()
        .map(|e| e.trainable.iter().filter(|&&t| t).count())
        .sum();
    Ok((examples, stats))
}

fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json" | "JSONL")
    )
}

fn text_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Msg(format!(
            "{}: folder holds no .txt files",
            dir.display()
        )));
    }
    Ok(files)
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = crate::fs::read(path)?;
    String::from_utf8(bytes).map_err(|e| {
        Error::Msg(format!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// A plain text file cut into `seq_len`-token examples, all trained.
fn text_examples(path: &Path, tok: &dyn EncodeText, seq_len: usize) -> Result<Vec<Example>> {
    let text = read_text(path)?;
    let mut ids = tok.encode(&text)?;
    ids.extend(tok.eos_id());
    Ok(ids
        .chunks(seq_len)
        .filter(|c| c.len() >= 2)
        .map(|c| Example {
            tokens: c.to_vec(),
            trainable: vec![true; c.len()],
        })
        .collect())
}

/// Parses one JSONL line into an example (not yet truncated).
pub fn parse_record(
    value: &serde_json::Value,
    tok: &dyn EncodeText,
    template: &ChatTemplate,
) -> std::result::Result<Example, String> {
    let obj = value.as_object().ok_or("expected a JSON object")?;
    let field = |k: &str| -> std::result::Result<Option<&str>, String> {
        match obj.get(k) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(format!("\"{k}\" must be a string, got {other}")),
        }
    };
    let enc = |s: &str| tok.encode(s).map_err(|e| e.to_string());
    let eos: Vec<u32> = tok.eos_id().into_iter().collect();
    if let Some(messages) = obj.get("messages") {
        let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
            format!("\"messages\" must be a list of {{\"role\", \"content\"}} strings: {e}")
        })?;
        let (tokens, trainable) = template.encode(&messages, tok).map_err(|e| e.to_string())?;
        return Ok(Example { tokens, trainable });
    }
    if let (Some(prompt), Some(completion)) = (field("prompt")?, field("completion")?) {
        let p = enc(prompt)?;
        let mut c = enc(completion)?;
        c.extend(&eos);
        let trainable = [vec![false; p.len()], vec![true; c.len()]].concat();
        return Ok(Example {
            tokens: [p, c].concat(),
            trainable,
        });
    }
    if let Some(text) = field("text")? {
        let mut t = enc(text)?;
        t.extend(&eos);
        let n = t.len();
        return Ok(Example {
            tokens: t,
            trainable: vec![true; n],
        });
    }
    let keys: Vec<&String> = obj.keys().collect();
    Err(format!(
        "expected \"text\", \"prompt\" + \"completion\", or \"messages\"; found keys {keys:?}"
    ))
}

/// Examples of a JSONL file; each with whether it was cut to `seq_len`. A bad line fails the
/// whole load with its line number.
fn jsonl_examples(
    path: &Path,
    tok: &dyn EncodeText,
    template: &ChatTemplate,
    seq_len: usize,
) -> Result<Vec<(Example, bool)>> {
    let text = read_text(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |msg: String| Error::Msg(format!("{}:{}: {msg}", path.display(), i + 1));
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let mut ex = parse_record(&value, tok, template).map_err(bad)?;
        if !ex.trainable.iter().any(|&t| t) {
            return Err(bad(
                "the record has no tokens to train on (empty completion?)".into(),
            ));
        }
        let truncated = ex.tokens.len() > seq_len;
        ex.tokens.truncate(seq_len);
        ex.trainable.truncate(seq_len);
        out.push((ex, truncated));
    }
    Ok(out)
}

/// Splits off a validation share of the examples, chosen by a seeded shuffle (at least one
/// example on each side). Returns (train, validation).
pub fn split_validation(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::InvalidConfig {
            name: "valid_fraction",
            value: fraction.to_string(),
            expected: "a fraction in [0, 1)",
        });
    }
    if fraction == 0.0 {
        return Ok((examples, Vec::new()));
    }
    if examples.len() < 2 {
        return Err(Error::Msg(format!(
            "cannot split {} example(s) into train and validation",
            examples.len()
        )));
    }
    let n_valid =
        ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    TrainRng::new(derive_seed(seed, &[0x5717])).shuffle(&mut order);
    let valid_set: std::collections::HashSet<usize> = order[..n_valid].iter().copied().collect();
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for (i, ex) in examples.into_iter().enumerate() {
        if valid_set.contains(&i) {
            valid.push(ex);
        } else {
            train.push(ex);
        }
    }
    Ok((train, valid))
}

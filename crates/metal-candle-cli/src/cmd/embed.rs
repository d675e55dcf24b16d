//! `metal-candle embed`: sentences in (plain lines or JSONL with a "text" field), one JSON line
//! out per sentence with its vector under "embedding".

use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

use metal_candle::embed::SentenceEmbedder;

use super::device::DeviceArgs;
use super::models;

/// Embed sentences with a BERT sentence-embedding model (default all-MiniLM-L6-v2).
#[derive(clap::Args, Debug)]
pub struct EmbedArgs {
    /// Model folder (config.json, tokenizer.json, model.safetensors) or Hub id; default:
    /// all-MiniLM-L6-v2 from the fetched assets ($METAL_CANDLE_ASSETS).
    #[arg(long)]
    pub model: Option<String>,
    /// Read from this file instead of stdin.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Lines read at a time: bounded memory on long inputs, still enough to batch by length.
const CHUNK: usize = 4096;

/// One input record: the text to embed and the JSON object it came in (kept in the output).
struct Record {
    text: String,
    object: serde_json::Map<String, serde_json::Value>,
}

fn parse_line(line: &str, number: usize) -> Result<Option<Record>, Box<dyn std::error::Error>> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    if trimmed.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(trimmed)
            .map_err(|e| format!("input line {number}: looks like JSON but does not parse: {e}"))?;
        let serde_json::Value::Object(object) = value else {
            return Err(format!(
                "input line {number}: expected a JSON object with a \"text\" field"
            )
            .into());
        };
        let text = match object.get("text") {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => {
                return Err(format!(
                    "input line {number}: a JSON line needs a string field \"text\""
                )
                .into())
            }
        };
        return Ok(Some(Record { text, object }));
    }
    let mut object = serde_json::Map::new();
    object.insert("text".into(), line.into());
    Ok(Some(Record {
        text: line.to_string(),
        object,
    }))
}

pub fn run(args: EmbedArgs) -> Result<(), Box<dyn std::error::Error>> {
    let device = args.device.device()?;
    let dtype = args.device.dtype(&device)?;
    let dir = models::embedding_model_dir(args.model.as_deref())?;
    let mut embedder = SentenceEmbedder::from_dir(&dir, &device, dtype)?;
    embedder.set_batch_size(args.batch_size)?;
    let reader: Box<dyn BufRead> = match &args.input {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut chunk: Vec<Record> = Vec::new();
    let flush = |chunk: &mut Vec<Record>,
                 out: &mut BufWriter<_>|
     -> Result<(), Box<dyn std::error::Error>> {
        let texts: Vec<&str> = chunk.iter().map(|r| r.text.as_str()).collect();
        let vectors = embedder.embed(&texts)?;
        for (record, v) in chunk.drain(..).zip(vectors) {
            let mut object = record.object;
            object.insert("embedding".into(), v.into());
            serde_json::to_writer(&mut *out, &object)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    };
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| format!("reading input line {}: {e}", i + 1))?;
        if let Some(record) = parse_line(&line, i + 1)? {
            chunk.push(record);
        }
        if chunk.len() == CHUNK {
            flush(&mut chunk, &mut out)?;
        }
    }
    if !chunk.is_empty() {
        flush(&mut chunk, &mut out)?;
    }
    out.flush()?;
    Ok(())
}

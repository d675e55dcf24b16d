//! Rebuilding a Hugging Face `tokenizers` BPE tokenizer from GGUF metadata (vocabulary,
//! merges, token types and the pre-tokenizer name llama.cpp records).

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::byte_level::ByteLevel as ByteLevelProcessor;
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::GgufFile;
use crate::{Error, Result};

/// The split pattern of Llama 3's tokenizer (digits in groups of up to three).
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The split pattern of Qwen2's tokenizer (single digits).
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp token types that are special (control, user-defined, unused).
const SPECIAL_TOKEN_TYPES: [u64; 3] = [3, 4, 5];

/// The byte-level BPE tokenizer a GGUF file describes.
pub(crate) fn tokenizer_from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    let path = gguf.path().display().to_string();
    let err = |msg: String| Error::file(&path, msg);
    let kind = gguf
        .meta_str("tokenizer.ggml.model")?
        .ok_or_else(|| err("no tokenizer in the metadata (tokenizer.ggml.model)".into()))?;
    if kind != "gpt2" {
        return Err(err(format!(
            "tokenizer.ggml.model is {kind:?}; only byte-level BPE (\"gpt2\": Llama 3, SmolLM2, Qwen2) can be rebuilt, use the model's tokenizer.json"
        )));
    }
    let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
    let merges = string_array(gguf, "tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(err(format!(
                "tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let pre = gguf
        .meta_str("tokenizer.ggml.pre")?
        .unwrap_or("default")
        .to_string();

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(matches!(pre.as_str(), "llama-bpe" | "llama3"))
        .build()
        .map_err(|e| err(format!("cannot build the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Msg(format!("split pattern: {e}")))?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into())
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        // SmolLM2: every digit on its own, then GPT-2's byte-level split.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        "llama-bpe" | "llama3" | "smaug-bpe" => split(LLAMA3_PATTERN)?,
        "qwen2" => {
            tokenizer.with_normalizer(Some(NFC)).map_err(|e| err(format!("normalizer: {e}")))?;
            split(QWEN2_PATTERN)?
        }
        "default" | "gpt2" | "gpt-2" => ByteLevel::new(false, true, true).into(),
        other => {
            return Err(err(format!(
                "tokenizer.ggml.pre {other:?} is not supported; supported: smollm, llama-bpe, qwen2, gpt2; use the model's tokenizer.json"
            )))
        }
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let mut processors: Vec<PostProcessorWrapper> =
        vec![ByteLevelProcessor::new(false, true, false).into()];
    if gguf
        .meta("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        == Some(true)
    {
        if let Some(bos_id) = gguf.meta_usize("tokenizer.ggml.bos_token_id")? {
            let bos = tokens
                .get(bos_id)
                .ok_or_else(|| err(format!("bos_token_id {bos_id} is outside the vocabulary")))?
                .clone();
            let template = TemplateProcessing::builder()
                .try_single(vec![bos.clone(), "$0".into()])
                .and_then(|b| b.try_pair(vec![bos.clone(), "$A".into(), bos.clone(), "$B".into()]))
                .map_err(|e| err(format!("bos template: {e}")))?
                .special_tokens(vec![(bos, bos_id as u32)])
                .build()
                .map_err(|e| err(format!("bos template: {e}")))?;
            processors.push(template.into());
        }
    }
    let processor: PostProcessorWrapper = if processors.len() == 1 {
        processors.remove(0)
    } else {
        ProcessorSequence::new(processors).into()
    };
    tokenizer.with_post_processor(Some(processor));

    // Special tokens are matched whole before BPE runs, and skipped by decode(skip = true).
    let mut specials: Vec<AddedToken> = Vec::new();
    if let Some(types) = gguf.meta("tokenizer.ggml.token_type") {
        let types = types
            .to_vec()
            .map_err(|_| err("tokenizer.ggml.token_type is not an array".into()))?;
        for (i, t) in types.iter().enumerate() {
            let t = match t {
                candle_core::quantized::gguf_file::Value::I32(v) => *v as u64,
                candle_core::quantized::gguf_file::Value::U32(v) => *v as u64,
                other => {
                    return Err(err(format!(
                        "tokenizer.ggml.token_type[{i}] = {other:?} is not an integer"
                    )))
                }
            };
            if SPECIAL_TOKEN_TYPES.contains(&t) {
                if let Some(tok) = tokens.get(i) {
                    specials.push(AddedToken::from(tok.clone(), true));
                }
            }
        }
    }
    for key in [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
    ] {
        if let Some(id) = gguf.meta_usize(key)? {
            if let Some(tok) = tokens.get(id) {
                specials.push(AddedToken::from(tok.clone(), true));
            }
        }
    }
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| err(format!("special tokens: {e}")))?;
    Ok(tokenizer)
}

fn string_array(gguf: &GgufFile, key: &str) -> Result<Vec<String>> {
    let path = gguf.path().display().to_string();
    let v = gguf
        .meta(key)
        .ok_or_else(|| Error::file(&path, format!("missing metadata {key:?}")))?;
    let items = v
        .to_vec()
        .map_err(|_| Error::file(&path, format!("metadata {key:?} is not an array")))?;
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.to_string()
                .cloned()
                .map_err(|_| Error::file(&path, format!("{key}[{i}] is not a string")))
        })
        .collect()
}

//! A minimal greedy decoder (KV cache, argmax) to show a model's output before and after
//! training.

use candle_core::{Tensor, D};
use metal_candle::model::load::TextTokenizer;
use metal_candle::model::Llama;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Continues `prompt` by up to `max_new` tokens, stopping at an end-of-sequence token.
pub fn generate(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompt: &str,
    max_new: usize,
) -> Res<String> {
    let prompt_ids = tokenizer.encode(prompt, true)?;
    if prompt_ids.is_empty() {
        return Err("the prompt has no tokens".into());
    }
    let device = model.device();
    let mut cache = model.new_cache();
    let mut input = Tensor::new(prompt_ids.as_slice(), device)?.unsqueeze(0)?;
    let mut out: Vec<u32> = Vec::new();
    for _ in 0..max_new {
        let offset = cache.len();
        let logits = model.forward(&input, offset, Some(&mut cache))?;
        let last = logits.get(0)?.get(logits.dim(1)? - 1)?;
        let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
        if tokenizer.eos_token_ids().contains(&next) {
            break;
        }
        out.push(next);
        input = Tensor::new(&[next], device)?.unsqueeze(0)?;
    }
    Ok(tokenizer.decode(&out, true)?)
}

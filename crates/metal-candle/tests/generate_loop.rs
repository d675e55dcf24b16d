//! The generation loop, streaming and stop handling on scripted models: a model that plays a
//! fixed byte sequence and checks that every call comes at the right cache offset.

mod gen_common;

use candle_core::{Device, Tensor};
use gen_common::{byte_tokenizer, EOS, IM_END};
use metal_candle::generate::{
    generate_batch, generate_text, generate_tokens, DecoderLm, FinishReason, GenerationConfig,
    SamplingConfig, StopStrings, TextStreamer,
};
use metal_candle::{Error, Result};

const VOCAB: usize = 258;

/// Emits `script` one token per call after the prompt, then EOS; fails on a wrong offset.
struct Scripted {
    script: Vec<u32>,
    cached: usize,
    prompt_len: Option<usize>,
    calls: Vec<(usize, usize)>,
    device: Device,
}

impl Scripted {
    fn new(text: &str) -> Self {
        Self {
            script: text.bytes().map(u32::from).collect(),
            cached: 0,
            prompt_len: None,
            calls: vec![],
            device: Device::Cpu,
        }
    }
}

fn one_hot_rows(tokens: &[u32]) -> Result<Tensor> {
    let mut data = vec![0f32; tokens.len() * VOCAB];
    for (row, &t) in tokens.iter().enumerate() {
        data[row * VOCAB + t as usize] = 10.0;
    }
    Ok(Tensor::from_vec(data, (tokens.len(), VOCAB), &Device::Cpu)?)
}

impl DecoderLm for Scripted {
    fn forward(&mut self, input_ids: &Tensor, offset: usize) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if b != 1 || offset != self.cached {
            return Err(Error::Msg(format!(
                "call at offset {offset} but the cache holds {}",
                self.cached
            )));
        }
        self.calls.push((offset, t));
        self.cached += t;
        let prompt = *self.prompt_len.get_or_insert(t);
        let i = self.cached - prompt;
        one_hot_rows(&[self.script.get(i).copied().unwrap_or(EOS)])
    }
    fn clear_cache(&mut self) {
        self.cached = 0;
        self.prompt_len = None;
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn max_positions(&self) -> Option<usize> {
        Some(64)
    }
}

fn cfg(max: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: max,
        eos_token_ids: vec![EOS],
        ..Default::default()
    }
}

#[test]
fn streams_valid_utf8_and_stops_at_eos() {
    let text = "Héllo 🦀 wörld!";
    let tok = byte_tokenizer();
    let mut model = Scripted::new(text);
    let mut pieces = Vec::new();
    let out = generate_text(&mut model, &tok, &[1, 2, 3], &cfg(40), |p| {
        pieces.push(p.to_string());
        Ok(())
    })
    .unwrap();
    assert_eq!(out.text, text);
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(
        pieces.contains(&"🦀".to_string()),
        "the crab's four bytes arrive as one piece: {pieces:?}"
    );
    assert_eq!(out.finish, FinishReason::Eos);
    assert_eq!(out.tokens, text.bytes().map(u32::from).collect::<Vec<_>>());
    // Prefill once with the prompt, then one token per call at growing offsets.
    assert_eq!(model.calls[0], (0, 3));
    for (i, call) in model.calls[1..].iter().enumerate() {
        assert_eq!(*call, (3 + i, 1));
    }
    assert_eq!(out.stats.prompt_tokens, 3);
    assert_eq!(out.stats.new_tokens, text.len());
}

#[test]
fn stops_at_max_tokens() {
    let mut model = Scripted::new("abcdefgh");
    let out = generate_tokens(&mut model, &[5], &cfg(3), |_| Ok(true)).unwrap();
    assert_eq!(out.tokens, vec![b'a' as u32, b'b' as u32, b'c' as u32]);
    assert_eq!(out.finish, FinishReason::MaxTokens);
}

#[test]
fn a_callback_can_cancel() {
    let mut model = Scripted::new("abcdefgh");
    let mut n = 0;
    let out = generate_tokens(&mut model, &[5], &cfg(8), |_| {
        n += 1;
        Ok(n < 2)
    })
    .unwrap();
    assert_eq!(out.tokens.len(), 2);
    assert_eq!(out.finish, FinishReason::Cancelled);
}

#[test]
fn stop_strings_cut_the_text_and_hold_back_partial_matches() {
    let tok = byte_tokenizer();
    let mut model = Scripted::new("Answer: 42\nUser: and more");
    let mut pieces = String::new();
    let config = GenerationConfig {
        stop_strings: vec!["\nUser:".into()],
        ..cfg(40)
    };
    let out = generate_text(&mut model, &tok, &[1], &config, |p| {
        pieces.push_str(p);
        Ok(())
    })
    .unwrap();
    assert_eq!(out.text, "Answer: 42");
    assert_eq!(
        pieces, "Answer: 42",
        "nothing of the stop string is ever emitted"
    );
    assert_eq!(out.finish, FinishReason::StopString);
    // Generation stopped right after the token that completed the stop string.
    assert_eq!(out.tokens.len(), "Answer: 42\nUser:".len());
}

#[test]
fn a_partial_stop_string_at_the_end_is_released() {
    let tok = byte_tokenizer();
    let mut model = Scripted::new("done\nUs");
    let config = GenerationConfig {
        stop_strings: vec!["\nUser:".into()],
        ..cfg(40)
    };
    let out = generate_text(&mut model, &tok, &[1], &config, |_| Ok(())).unwrap();
    assert_eq!(out.text, "done\nUs");
    assert_eq!(out.finish, FinishReason::Eos);
}

#[test]
fn prompt_too_long_for_the_context_is_an_error() {
    let mut model = Scripted::new("x");
    let err = generate_tokens(&mut model, &[1; 60], &cfg(10), |_| Ok(true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("60 + 10"), "{err}");
    let err = generate_tokens(&mut model, &[], &cfg(10), |_| Ok(true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt"), "{err}");
}

#[test]
fn streamer_holds_back_incomplete_characters() {
    let tok = byte_tokenizer();
    let mut s = TextStreamer::new(&tok);
    let crab: Vec<u32> = "🦀".bytes().map(u32::from).collect();
    assert_eq!(s.push(b'a' as u32).unwrap().as_deref(), Some("a"));
    for &b in &crab[..3] {
        assert_eq!(s.push(b).unwrap(), None);
    }
    assert_eq!(s.push(crab[3]).unwrap().as_deref(), Some("🦀"));
    // Special tokens are left out of the text by default.
    assert_eq!(s.push(IM_END).unwrap(), None);
    assert_eq!(s.push(b'!' as u32).unwrap().as_deref(), Some("!"));
    // An incomplete character at the very end comes out as the tokenizer decodes it.
    s.push(crab[0]).unwrap();
    assert_eq!(s.finish().unwrap().as_deref(), Some("\u{FFFD}"));
}

#[test]
fn stop_strings_across_many_small_pieces() {
    let mut stops = StopStrings::new(vec!["STOP".into(), "END!".into()]);
    let mut out = String::new();
    let mut stopped = false;
    for piece in ["ab", "S", "T", "x", "E", "N", "D", "!", "tail"] {
        let (safe, done) = stops.push(piece);
        out.push_str(&safe);
        if done {
            stopped = true;
            break;
        }
    }
    assert!(stopped);
    assert_eq!(out, "abSTx");
}

/// A batch model: each row's next token is its last token + 1; rows at `stop_at` emit EOS.
struct Counter {
    cached: usize,
    last: Vec<u32>,
    stop_at: u32,
    device: Device,
}

impl DecoderLm for Counter {
    fn forward(&mut self, input_ids: &Tensor, offset: usize) -> Result<Tensor> {
        assert_eq!(offset, self.cached);
        let (_, t) = input_ids.dims2()?;
        self.cached += t;
        let rows = input_ids.to_vec2::<u32>()?;
        self.last = rows.iter().map(|r| r[t - 1]).collect();
        let next: Vec<u32> = self
            .last
            .iter()
            .map(|&l| if l + 1 >= self.stop_at { EOS } else { l + 1 })
            .collect();
        one_hot_rows(&next)
    }
    fn clear_cache(&mut self) {
        self.cached = 0;
    }
    fn device(&self) -> &Device {
        &self.device
    }
}

#[test]
fn batch_rows_stop_independently() {
    let mut model = Counter {
        cached: 0,
        last: vec![],
        stop_at: 20,
        device: Device::Cpu,
    };
    let prompts = vec![vec![1, 10], vec![1, 15], vec![1, 2]];
    let (rows, stats) = generate_batch(&mut model, &prompts, &cfg(6)).unwrap();
    assert_eq!(rows[0].tokens, vec![11, 12, 13, 14, 15, 16]);
    assert_eq!(rows[0].finish, FinishReason::MaxTokens);
    assert_eq!(rows[1].tokens, vec![16, 17, 18, 19]);
    assert_eq!(rows[1].finish, FinishReason::Eos);
    assert_eq!(rows[2].tokens, vec![3, 4, 5, 6, 7, 8]);
    assert_eq!(
        (stats.batch, stats.prompt_tokens, stats.new_tokens),
        (3, 2, 6)
    );
    let err = generate_batch(&mut model, &[vec![1], vec![1, 2]], &cfg(2))
        .unwrap_err()
        .to_string();
    assert!(err.contains("equal length"), "{err}");
}

#[test]
fn sampled_generation_with_a_seed_repeats() {
    // Random-ish logits from a tiny linear "model": same seed, same tokens.
    struct Noisy {
        cached: usize,
        device: Device,
    }
    impl DecoderLm for Noisy {
        fn forward(&mut self, input_ids: &Tensor, _offset: usize) -> Result<Tensor> {
            self.cached += input_ids.dim(1)?;
            let v: Vec<f32> = (0..VOCAB)
                .map(|i| ((i * 7919 + self.cached * 104_729) % 1000) as f32 / 300.0)
                .collect();
            Ok(Tensor::from_vec(v, (1, VOCAB), &self.device)?)
        }
        fn clear_cache(&mut self) {
            self.cached = 0;
        }
        fn device(&self) -> &Device {
            &self.device
        }
    }
    let sampling = SamplingConfig {
        temperature: 1.0,
        top_k: Some(50),
        seed: 77,
        ..Default::default()
    };
    let config = GenerationConfig {
        sampling,
        max_new_tokens: 30,
        ..Default::default()
    };
    let run = || {
        let mut m = Noisy {
            cached: 0,
            device: Device::Cpu,
        };
        generate_tokens(&mut m, &[1, 2], &config, |_| Ok(true))
            .unwrap()
            .tokens
    };
    let a = run();
    assert_eq!(a, run());
    assert!(
        a.iter().collect::<std::collections::HashSet<_>>().len() > 5,
        "sampling is not greedy: {a:?}"
    );
}

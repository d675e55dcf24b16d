//! Helpers shared by the generation tests.
#![allow(dead_code)]

use tokenizers::Tokenizer;

/// Id of the end-of-sequence token of [`byte_tokenizer`].
pub const EOS: u32 = 256;
/// Id of the `<|im_end|>` special token of [`byte_tokenizer`].
pub const IM_END: u32 = 257;

/// GPT-2's byte -> printable char map (the ByteLevel alphabet).
fn byte_char(b: u8) -> char {
    let printable =
        |c: u32| (33..=126).contains(&c) || (161..=172).contains(&c) || (174..=255).contains(&c);
    let b = b as u32;
    if printable(b) {
        return char::from_u32(b).unwrap();
    }
    let n = (0..b).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// A byte-level BPE tokenizer with no merges: token id = byte value, plus `<eos>` (256) and
/// `<|im_end|>` (257) as special tokens. Multi-byte characters span several tokens, which is
/// what the UTF-8 streaming must handle.
pub fn byte_tokenizer() -> Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
        .map(|b| (byte_char(b).to_string(), serde_json::json!(b as u32)))
        .collect();
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(EOS, "<eos>"), special(IM_END, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    json.to_string().parse().unwrap()
}

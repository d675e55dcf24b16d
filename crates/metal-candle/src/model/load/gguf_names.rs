//! llama.cpp tensor names ↔ Hugging Face tensor names for the llama family.

/// Per-layer pieces: (llama.cpp suffix, Hugging Face suffix).
const LAYER_PARTS: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Whole-model pieces: (llama.cpp name, Hugging Face name) without the `.weight` suffix.
const MODEL_PARTS: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// The Hugging Face name of a llama.cpp tensor (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`), or `None` for a name outside the llama family.
///
/// ```
/// use metal_candle::model::load::{gguf_name, hf_name};
/// assert_eq!(hf_name("blk.3.attn_q.weight").as_deref(), Some("model.layers.3.self_attn.q_proj.weight"));
/// assert_eq!(gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
/// ```
pub fn hf_name(gguf: &str) -> Option<String> {
    let (stem, kind) = gguf.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    if let Some(rest) = stem.strip_prefix("blk.") {
        let (layer, part) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (_, hf) = LAYER_PARTS.iter().find(|(g, _)| *g == part)?;
        return Some(format!("model.layers.{layer}.{hf}.{kind}"));
    }
    let (_, hf) = MODEL_PARTS.iter().find(|(g, _)| *g == stem)?;
    Some(format!("{hf}.{kind}"))
}

/// The llama.cpp name of a Hugging Face tensor (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    let (stem, kind) = hf.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (layer, part) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (g, _) = LAYER_PARTS.iter().find(|(_, h)| *h == part)?;
        return Some(format!("blk.{layer}.{g}.{kind}"));
    }
    let (g, _) = MODEL_PARTS.iter().find(|(_, h)| *h == stem)?;
    Some(format!("{g}.{kind}"))
}

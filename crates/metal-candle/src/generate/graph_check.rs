//! GPU check of the CUDA-graph decoding path (run with the kernel checks of
//! [`crate::ops::cuda::check`]): logits of graph replays against eager steps of the same
//! random model, through recaptures (a cache that grows past its capacity, a new prompt, a
//! new batch size) and for unmerged LoRA adapters.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::{CachedLlama, DecoderLm};
use crate::model::load::RandomWeights;
use crate::model::{Llama, LlamaConfig, LoraSpec, TargetModule};

fn mc<T>(r: crate::Result<T>) -> Result<T> {
    r.map_err(crate::Error::into_candle)
}

fn tiny_model(dev: &Device, dtype: DType) -> Result<Llama> {
    let json = r#"{"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
      "max_position_embeddings": 4096, "tie_word_embeddings": false}"#;
    let config = mc(LlamaConfig::from_json_str(json, "graph check"))?;
    // std 0.1: logits that differ clearly from token to token.
    let vb = VarBuilder::from_backend(Box::new(RandomWeights::new(0.1)), dtype, dev.clone());
    mc(Llama::load(vb, &config))
}

fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    let diff = (got - want)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let norm = want.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((diff / norm.max(1e-30)).sqrt())
}

/// Feeds the same tokens to `graphed` (graphs on) and `eager` (off): `prompt_len` tokens of
/// prefill, then `steps` single-token steps; every step's logits must agree.
fn compare_steps(
    graphed: &mut CachedLlama,
    eager: &mut CachedLlama,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    tol: f64,
    what: &str,
) -> Result<()> {
    let dev = graphed.device().clone();
    let vocab = graphed.model().config().vocab_size as u32;
    let token = |row: usize, pos: usize| ((pos * 7 + row * 13 + 1) as u32) % vocab;
    let prompt: Vec<Vec<u32>> = (0..batch)
        .map(|r| (0..prompt_len).map(|p| token(r, p)).collect())
        .collect();
    graphed.clear_cache();
    eager.clear_cache();
    let ids = Tensor::new(prompt, &dev)?;
    mc(graphed.forward(&ids, 0))?;
    mc(eager.forward(&ids, 0))?;
    for pos in prompt_len..prompt_len + steps {
        let row: Vec<u32> = (0..batch).map(|r| token(r, pos)).collect();
        let ids = Tensor::new(row, &dev)?.unsqueeze(1)?;
        let g = mc(graphed.forward(&ids, pos))?;
        let e = mc(eager.forward(&ids, pos))?;
        let err = rel_err(&g, &e)?;
        if err.is_nan() || err > tol {
            candle_core::bail!(
                "{what}: batch {batch}, position {pos}: graph logits differ from eager ones by {err:.2e} (tolerance {tol:.0e})"
            );
        }
    }
    Ok(())
}

/// Graph replays give the eager step's logits (f32 and bf16), including across recaptures.
pub fn graph_decode_matches_eager(dev: &Device) -> Result<()> {
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 3e-2)] {
        let model = tiny_model(dev, dtype)?;
        let mut graphed = CachedLlama::new(model.clone());
        let mut eager = CachedLlama::new(model);
        eager.set_cuda_graphs(false);
        if !graphed.cuda_graphs() || eager.cuda_graphs() {
            candle_core::bail!("graphs must be on by default on CUDA and off when asked");
        }
        let name = format!("{dtype:?}");
        compare_steps(&mut graphed, &mut eager, 1, 9, 24, tol, &name)?;
        // A new prompt replays the same capture (its cache buffers are kept, the slots of
        // the old prompt past each position stay masked) until 500 + 20 positions cross the
        // 512 captured slots: the cache grows and the step is captured again.
        compare_steps(&mut graphed, &mut eager, 1, 500, 20, tol, &name)?;
        compare_steps(&mut graphed, &mut eager, 3, 17, 12, tol, &name)?;
        let captures = graphed.graph_captures();
        if captures != 3 {
            candle_core::bail!(
                "{name}: expected 3 captures (first step, growth, new batch size), got {captures}"
            );
        }
        // Unmerged adapters (with non-zero B) run inside the graph too.
        let spec = LoraSpec::new(8, 16.0).with_targets(&TargetModule::ALL);
        let mut adapted = graphed.model().clone();
        mc(adapted.add_lora(&spec))?;
        for (_, adapter) in adapted.lora_adapters() {
            let b = adapter.b();
            b.set(&Tensor::randn(0f32, 0.1, b.shape(), dev)?.to_dtype(b.dtype())?)?;
        }
        let mut graphed = CachedLlama::new(adapted.clone());
        let mut eager = CachedLlama::new(adapted);
        eager.set_cuda_graphs(false);
        compare_steps(
            &mut graphed,
            &mut eager,
            2,
            6,
            10,
            tol,
            &format!("{name} LoRA"),
        )?;
    }
    Ok(())
}

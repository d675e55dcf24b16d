//! Loading: sharded folders, GGUF (with Q/K permutation and a tokenizer in the metadata),
//! conversion to a Hugging Face folder, Hub ids, and the errors for bad files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use metal_candle::model::load::{
    convert_gguf_to_hf, gguf_name, load, load_hf_dir, permute_rows, GgufFile, ModelSource,
    TextTokenizer,
};
use metal_candle::model::{Architecture, LlamaConfig};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::common::{ids, max_diff, random_hf_dir, random_weights, tiny_config, write_hf_dir};

const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}";

/// A byte-level BPE vocabulary: the 256 byte symbols, a few merges, two special tokens.
fn tiny_vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = ByteLevel::alphabet()
        .into_iter()
        .map(String::from)
        .collect();
    tokens.sort();
    let merges = ["H e", "l l", "He ll", "Ġ w", "o r"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![1i32; tokens.len()];
    for special in ["<|im_start|>", "<|im_end|>"] {
        tokens.push(special.into());
        types.push(3);
    }
    (
        tokens,
        merges.iter().map(|m| m.to_string()).collect(),
        types,
    )
}

/// Writes `weights` (HF names) as a llama.cpp-style GGUF: llama.cpp names, Q/K rows permuted,
/// config and tokenizer in the metadata.
fn write_gguf(path: &Path, config: &LlamaConfig, weights: &HashMap<String, Tensor>) {
    let arch = config.architecture.model_type();
    let (tokens, merges, types) = tiny_vocab();
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            format!("{arch}.embedding_length"),
            Value::U32(config.hidden_size as u32),
        ),
        (
            format!("{arch}.block_count"),
            Value::U32(config.num_hidden_layers as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(config.intermediate_size as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(config.num_attention_heads as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(config.num_key_value_heads as u32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(config.rope_theta as f32),
        ),
        (
            format!("{arch}.rope.dimension_count"),
            Value::U32(config.head_dim as u32),
        ),
        (
            format!("{arch}.context_length"),
            Value::U32(config.max_position_embeddings as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(tokens.len() as u32 - 2),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(tokens.len() as u32 - 1),
        ),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHAT_TEMPLATE.into()),
        ),
    ];
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let tensors: Vec<(String, QTensor)> = names
        .into_iter()
        .map(|hf| {
            let mut t = weights[hf].clone();
            if config.architecture == Architecture::Llama {
                if hf.contains("q_proj") {
                    t = permute_rows(&t, config.num_attention_heads).unwrap();
                } else if hf.contains("k_proj") {
                    t = permute_rows(&t, config.num_key_value_heads).unwrap();
                }
            }
            (
                gguf_name(hf).unwrap(),
                QTensor::quantize(&t, GgmlDType::F32).unwrap(),
            )
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

/// A config whose vocabulary is the tiny tokenizer's.
fn gguf_config(arch: Architecture, tied: bool) -> LlamaConfig {
    let mut c = tiny_config(arch, 2, tied);
    c.vocab_size = tiny_vocab().0.len();
    c
}

#[test]
fn gguf_round_trip_undoes_the_qk_permutation() {
    for (arch, tied) in [
        (Architecture::Llama, true),
        (Architecture::Llama, false),
        (Architecture::Qwen2, false),
    ] {
        let config = gguf_config(arch, tied);
        let (dir, weights) = random_hf_dir(&config, 30);
        let original = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let path = dir.path().join("model.gguf");
        write_gguf(&path, &config, &weights);

        let mut gguf = GgufFile::open(&path).unwrap();
        let read = gguf.config().unwrap();
        assert_eq!(read.tie_word_embeddings, tied);
        assert_eq!(
            (read.architecture, read.qkv_bias),
            (arch, arch == Architecture::Qwen2)
        );
        assert_eq!(
            (read.num_key_value_heads, read.head_dim, read.vocab_size),
            (2, 8, config.vocab_size)
        );
        let loaded = gguf.load_model(DType::F32, &Device::Cpu).unwrap();
        let x = ids(&[5, 70, 3, 200, 9, 257]);
        let d = max_diff(
            &original.forward(&x, 0, None).unwrap(),
            &loaded.forward(&x, 0, None).unwrap(),
        );
        assert!(d < 1e-5, "{arch:?} tied={tied}: GGUF model differs by {d}");
    }
}

#[test]
fn skipping_the_unpermute_would_be_detected() {
    // The permutation is not the identity for these shapes, so the round trip above is a real check.
    let t = Tensor::arange(0f32, 32.0, &Device::Cpu)
        .unwrap()
        .reshape((16, 2))
        .unwrap();
    let p = permute_rows(&t, 2).unwrap();
    assert!(max_diff(&t, &p) > 0.5);
    assert!(
        max_diff(
            &metal_candle::model::load::unpermute_rows(&p, 2).unwrap(),
            &t
        ) == 0.0
    );
}

#[test]
fn tokenizer_rebuilt_from_gguf_metadata() {
    let config = gguf_config(Architecture::Llama, true);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_gguf(&path, &config, &random_weights(&config, 31));
    let tok = TextTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let text = "Hello world 42<|im_end|>";
    let ids = tok.encode(text, false).unwrap();
    let pieces: Vec<String> = ids
        .iter()
        .map(|&i| tok.inner().id_to_token(i).unwrap())
        .collect();
    assert_eq!(
        pieces,
        [
            "Hell",
            "o",
            "Ġw",
            "or",
            "l",
            "d",
            "Ġ",
            "4",
            "2",
            "<|im_end|>"
        ],
        "digits split one by one"
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.decode(&ids, true).unwrap(), "Hello world 42");
    assert_eq!(tok.chat_template(), Some(CHAT_TEMPLATE));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
}

#[test]
fn convert_writes_a_loadable_hf_folder() {
    let config = gguf_config(Architecture::Llama, true);
    let dir = tempfile::tempdir().unwrap();
    let gguf_path = dir.path().join("m.gguf");
    let weights = random_weights(&config, 32);
    write_gguf(&gguf_path, &config, &weights);
    let out = dir.path().join("hf");
    convert_gguf_to_hf(&gguf_path, &out, DType::F32).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let tok_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tok_config["chat_template"], CHAT_TEMPLATE);
    assert_eq!(tok_config["eos_token"], "<|im_end|>");

    let from_hf = load(
        &ModelSource::parse(out.to_str().unwrap()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let from_gguf = load(
        &ModelSource::parse(gguf_path.to_str().unwrap()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let x = ids(&[5, 70, 3, 200, 9]);
    let d = max_diff(
        &from_hf.model.forward(&x, 0, None).unwrap(),
        &from_gguf.model.forward(&x, 0, None).unwrap(),
    );
    assert!(d < 1e-6, "converted model differs by {d}");
    let text = "Hello world 2024<|im_start|>";
    assert_eq!(
        from_hf.tokenizer.encode(text, true).unwrap(),
        from_gguf.tokenizer.encode(text, true).unwrap()
    );
    assert_eq!(
        from_hf.tokenizer.eos_token_ids(),
        from_gguf.tokenizer.eos_token_ids()
    );
    assert_eq!(from_hf.tokenizer.chat_template(), Some(CHAT_TEMPLATE));
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn sharded_folder_loads_like_a_single_file() {
    let config = tiny_config(Architecture::Llama, 2, false);
    let (dir, weights) = random_hf_dir(&config, 33);
    let single = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let sharded = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        sharded.path().join("config.json"),
    )
    .unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (name, t) in &weights {
        let file = if name.contains("layers.1") || name.starts_with("lm_head") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        if file.contains("00001-") {
            a.insert(name.clone(), t.clone())
        } else {
            b.insert(name.clone(), t.clone())
        };
        map.insert(name.clone(), file.into());
    }
    candle_core::safetensors::save(&a, sharded.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&b, sharded.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let m = load_hf_dir(sharded.path(), DType::F32, &Device::Cpu).unwrap();
    let x = ids(&[1, 2, 3, 4]);
    assert!(
        max_diff(
            &single.forward(&x, 0, None).unwrap(),
            &m.forward(&x, 0, None).unwrap()
        ) == 0.0
    );

    std::fs::remove_file(sharded.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_hf_dir(sharded.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors.index.json")
            && err.contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn bad_files_give_errors_naming_file_and_problem() {
    let config = tiny_config(Architecture::Llama, 2, true);
    let (dir, weights) = random_hf_dir(&config, 34);
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();

    // Truncated safetensors.
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_hf_dir(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("safetensors file"),
        "{err}"
    );

    // Weights for another shape.
    let mut bigger = config.clone();
    bigger.intermediate_size = 64;
    write_hf_dir(dir.path(), &bigger, &weights);
    let err = load_hf_dir(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("gate_proj") && err.contains("64"), "{err}");

    // A config without a required field, and one with an unsupported model type.
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"num_hidden_layers": 2}"#,
    )
    .unwrap();
    let err = load_hf_dir(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("hidden_size"),
        "{err}"
    );
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let err = load_hf_dir(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json") && err.contains("gpt2"), "{err}");

    // Truncated GGUF: header intact, tensor data cut.
    let config = gguf_config(Architecture::Llama, true);
    let gguf = dir.path().join("cut.gguf");
    write_gguf(&gguf, &config, &random_weights(&config, 35));
    let g = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &g[..g.len() - 4096]).unwrap();
    let err = GgufFile::open(&gguf)
        .unwrap()
        .load_model(DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    // Cut inside the header, and not a GGUF at all.
    std::fs::write(&gguf, &g[..100]).unwrap();
    let err = GgufFile::open(&gguf).unwrap_err().to_string();
    assert!(err.contains("cut.gguf") && err.contains("GGUF"), "{err}");
    std::fs::write(&gguf, "hello, not a model").unwrap();
    let err = GgufFile::open(&gguf).unwrap_err().to_string();
    assert!(err.contains("cut.gguf") && err.contains("GGUF"), "{err}");
    // A folder that is not a model.
    let empty = tempfile::tempdir().unwrap();
    assert!(load_hf_dir(empty.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("config.json"));
}

#[test]
fn hub_ids_resolve_through_the_local_cache() {
    let cache_dir = tempfile::tempdir().unwrap();
    let repo = cache_dir.path().join("models--SomeOrg--tiny-llama");
    let snapshot = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    let config = tiny_config(Architecture::Llama, 2, true);
    write_hf_dir(&snapshot, &config, &random_weights(&config, 36));

    let cache = hf_hub::Cache::new(cache_dir.path().to_path_buf());
    let source = ModelSource::parse("SomeOrg/tiny-llama").unwrap();
    assert_eq!(
        source,
        ModelSource::Hub {
            repo: "SomeOrg/tiny-llama".into(),
            revision: "main".into()
        }
    );
    assert_eq!(
        source.resolve_in(&cache).unwrap(),
        ModelSource::HfDir(snapshot.clone())
    );
    load_hf_dir(&snapshot, DType::F32, &Device::Cpu).unwrap();

    // Not cached: without the `hub` feature this must say how to get it (with it, a download
    // would be attempted, which this machine cannot reach).
    let other = ModelSource::parse("SomeOrg/tiny-llama@v2").unwrap();
    #[cfg(not(feature = "hub"))]
    {
        let err = other.resolve_in(&cache).unwrap_err().to_string();
        assert!(
            err.contains("SomeOrg/tiny-llama@v2") && err.contains("--features hub"),
            "{err}"
        );
    }
    #[cfg(feature = "hub")]
    let _ = other;
    assert!(ModelSource::parse("not a/model id").is_err());
    assert!(ModelSource::parse("a/b/c").is_err());
    assert!(ModelSource::parse("x@").is_err());
}

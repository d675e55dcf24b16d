//! Attaching LoRA adapters across layers, their PEFT names, trainable variables and merging.

use candle_core::{DType, Device, Var};
use metal_candle::model::load::load_hf_dir;
use metal_candle::model::{Architecture, LoraSpec, TargetModule};

use crate::common::{ids, max_diff, random_hf_dir, random_tensor, tiny_config};

#[test]
fn adapters_get_peft_names_and_start_as_identity() {
    let config = tiny_config(Architecture::Llama, 2, true);
    let (dir, _) = random_hf_dir(&config, 20);
    let mut m = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let x = ids(&[3, 1, 4, 1, 5, 9]);
    let before = m.forward(&x, 0, None).unwrap();

    m.add_lora(&LoraSpec::new(4, 8.0).with_targets(&TargetModule::ALL))
        .unwrap();
    let names: Vec<String> = m.lora_adapters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 7 * config.num_hidden_layers);
    assert_eq!(names[0], "base_model.model.model.layers.0.self_attn.q_proj");
    assert_eq!(names[6], "base_model.model.model.layers.0.mlp.down_proj");
    assert_eq!(names[13], "base_model.model.model.layers.1.mlp.down_proj");
    assert_eq!(m.trainable_vars().len(), 2 * names.len());
    // k_proj maps 32 -> 2 KV heads x 8 = 16 outputs.
    let (_, k) = &m.lora_adapters()[1];
    assert_eq!((k.a().dims(), k.b().dims()), (&[32, 4][..], &[4, 16][..]));

    let after = m.forward(&x, 0, None).unwrap();
    assert!(
        max_diff(&before, &after) < 1e-5,
        "a fresh adapter (B = 0) must not change the output"
    );
}

#[test]
fn chosen_layers_and_targets_only() {
    let config = tiny_config(Architecture::Qwen2, 2, false);
    let (dir, _) = random_hf_dir(&config, 21);
    let mut m = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let targets: Vec<TargetModule> = ["q", "v_proj"].iter().map(|s| s.parse().unwrap()).collect();
    m.add_lora(
        &LoraSpec::new(2, 4.0)
            .with_targets(&targets)
            .with_layers(&[1]),
    )
    .unwrap();
    let names: Vec<String> = m.lora_adapters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "base_model.model.model.layers.1.self_attn.q_proj",
            "base_model.model.model.layers.1.self_attn.v_proj"
        ]
    );
    assert!(
        m.add_lora(&LoraSpec::new(2, 4.0).with_layers(&[2]))
            .is_err(),
        "layer 2 of 2 must be rejected"
    );
    assert!("qkv".parse::<TargetModule>().is_err());
    m.clear_lora().unwrap();
    assert!(m.lora_adapters().is_empty());
}

#[test]
fn gradients_reach_every_adapter_and_merge_matches() {
    let config = tiny_config(Architecture::Llama, 2, false);
    let (dir, _) = random_hf_dir(&config, 22);
    let mut m = load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    m.add_lora(&LoraSpec::new(4, 8.0).with_targets(&TargetModule::ALL))
        .unwrap();
    // Give B non-zero values so the adapters matter.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(5);
    for (_, adapter) in m.lora_adapters() {
        let b = adapter.b();
        b.set(&random_tensor(&mut rng, b.dims(), 0.1)).unwrap();
    }
    m.set_training(true);
    let x = ids(&[3, 1, 4, 1, 5, 9, 2, 6]);
    let logits = m.forward(&x, 0, None).unwrap();
    let loss = candle_nn::loss::cross_entropy(
        &logits.squeeze(0).unwrap().narrow(0, 0, 7).unwrap(),
        &x.squeeze(0).unwrap().narrow(0, 1, 7).unwrap(),
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    for (i, var) in m.trainable_vars().iter().enumerate() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for trainable var {i}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "zero gradient for trainable var {i}");
    }
    m.set_training(false);
    let unmerged = m.forward(&x, 0, None).unwrap();
    let merged = m.merged().unwrap();
    assert!(merged.lora_adapters().is_empty());
    let d = max_diff(&unmerged, &merged.forward(&x, 0, None).unwrap());
    assert!(d < 1e-4, "merged differs by {d}");
    let _: Vec<Var> = merged.trainable_vars();
}

#[test]
fn projection_paths_parse_in_hf_and_peft_form() {
    let (l, t) = TargetModule::parse_path("model.layers.3.self_attn.k_proj.weight").unwrap();
    assert_eq!((l, t), (3, TargetModule::K));
    assert!(
        TargetModule::parse_path("model.layers.3.mlp.q_proj").is_err(),
        "q_proj is not in mlp"
    );
    assert_eq!(
        TargetModule::Gate.peft_path(0),
        "base_model.model.model.layers.0.mlp.gate_proj"
    );
}

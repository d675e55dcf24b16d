//! The API the seed documents show, and the LoRA layer's behaviour.

use candle_core::{DType, Device, Module, Tensor};
use metal_candle::backend::custom_ops::FusedLoRAOp;
use metal_candle::training::{LoRAConfig, LoRALayer, LoraLinear};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn seed_example_runs_as_documented() -> metal_candle::Result<()> {
    let device = Device::Cpu;
    let config = LoRAConfig::new(512, 512, 8, 16.0);
    let lora = LoRALayer::new(512, 512, &config, &device)?;
    let input = Tensor::randn(0f32, 1f32, (1, 128, 512), &device)?;
    let output = lora.forward(&input)?;
    assert_eq!(output.dims(), &[1, 128, 512]);
    assert_eq!(config.scaling(), 2.0);
    Ok(())
}

#[test]
fn fused_lora_op_equals_the_composed_product() -> metal_candle::Result<()> {
    let dev = Device::Cpu;
    for (k, r, n) in [(512, 8, 512), (1024, 8, 1024), (33, 3, 7)] {
        let lora_a = Tensor::randn(0f32, 0.1, (k, r), &dev)?;
        let lora_b = Tensor::randn(0f32, 0.1, (r, n), &dev)?;
        let input = Tensor::randn(0f32, 1., (1, 128, k), &dev)?;
        let op = FusedLoRAOp::new(lora_a.clone(), lora_b.clone(), 2.5)?;
        let out = input.apply_op1(op)?;
        let expected = (input.broadcast_matmul(&lora_a)?.broadcast_matmul(&lora_b)? * 2.5)?;
        assert!(max_abs_diff(&out, &expected) < 1e-4);
    }
    Ok(())
}

#[test]
fn fused_lora_op_gives_the_input_gradient() -> metal_candle::Result<()> {
    let dev = Device::Cpu;
    let a = Tensor::randn(0f64, 0.3, (6, 2), &dev)?;
    let b = Tensor::randn(0f64, 0.3, (2, 5), &dev)?;
    let x = candle_core::Var::randn(0f64, 1., (3, 6), &dev)?;
    let y = x.apply_op1(FusedLoRAOp::new(a.clone(), b.clone(), 2.0)?)?;
    let g = y.sum_all()?.backward()?;
    let gx = g.get(&x).expect("input gradient");
    // d/dx Σ (x·A·B·s) = s · 1·(A·B)ᵀ
    let expected = (Tensor::ones((3, 5), DType::F64, &dev)?.matmul(&a.matmul(&b)?.t()?)? * 2.0)?;
    assert!((gx - expected)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-12);
    Ok(())
}

#[test]
fn training_path_gives_gradients_to_a_and_b() -> metal_candle::Result<()> {
    let dev = Device::Cpu;
    let cfg = LoRAConfig::new(16, 12, 4, 8.0);
    let lora = LoRALayer::new(16, 12, &cfg, &dev)?;
    let x = Tensor::randn(0f32, 1., (2, 3, 16), &dev)?;
    let target = Tensor::randn(0f32, 1., (2, 3, 12), &dev)?;
    // B starts at zero, so dA is zero at the first step; dB is not.
    let loss = (lora.forward(&x)? - &target)?.sqr()?.sum_all()?;
    let grads = loss.backward()?;
    let gb = grads.get(lora.b().as_tensor()).expect("gradient for B");
    let ga = grads.get(lora.a().as_tensor()).expect("gradient for A");
    assert!(gb.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    assert_eq!(ga.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
    // After B moves, A gets a gradient too.
    lora.b().set(&Tensor::randn(0f32, 0.1, (4, 12), &dev)?)?;
    let loss = (lora.forward(&x)? - &target)?.sqr()?.sum_all()?;
    let grads = loss.backward()?;
    let ga = grads.get(lora.a().as_tensor()).expect("gradient for A");
    assert!(ga.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    Ok(())
}

#[test]
fn initialisation_follows_peft() -> metal_candle::Result<()> {
    let dev = Device::Cpu;
    let cfg = LoRAConfig::new(256, 64, 8, 16.0);
    let lora = LoRALayer::new(256, 64, &cfg, &dev)?;
    let a: Vec<f32> = lora.a().as_tensor().flatten_all()?.to_vec1()?;
    let bound = 1.0 / 16.0; // 1/√256: kaiming_uniform with a = √5
    assert!(a.iter().all(|v| v.abs() <= bound));
    let spread = a.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(
        spread > 0.9 * bound,
        "A should fill its range, max |a| = {spread}"
    );
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    assert!(mean.abs() < 0.01);
    assert_eq!(
        lora.b().as_tensor().abs()?.sum_all()?.to_scalar::<f32>()?,
        0.0
    );
    assert_eq!(lora.a().dims(), &[256, 8]);
    assert_eq!(lora.b().dims(), &[8, 64]);
    Ok(())
}

#[test]
fn scaling_standard_and_rslora() {
    let c = LoRAConfig::new(8, 8, 16, 32.0);
    assert_eq!(c.scaling(), 2.0);
    assert_eq!(c.with_rslora(true).scaling(), 8.0);
}

#[test]
fn dropout_applies_in_training_mode_only() -> metal_candle::Result<()> {
    let dev = Device::Cpu;
    let cfg = LoRAConfig::new(32, 32, 4, 4.0).with_dropout(0.5);
    let lora = LoRALayer::new(32, 32, &cfg, &dev)?;
    lora.b().set(&Tensor::randn(0f32, 0.5, (4, 32), &dev)?)?;
    let x = Tensor::randn(0f32, 1., (8, 32), &dev)?;
    let eval1 = lora.forward(&x)?;
    let eval2 = lora.forward(&x)?;
    assert_eq!(
        max_abs_diff(&eval1, &eval2),
        0.0,
        "inference must be deterministic"
    );
    lora.set_training(true);
    let train = lora.forward(&x)?;
    assert!(
        max_abs_diff(&train, &eval1) > 1e-3,
        "training mode must drop inputs"
    );
    lora.set_training(false);
    assert_eq!(max_abs_diff(&lora.forward(&x)?, &eval1), 0.0);
    Ok(())
}

#[test]
fn merged_and_unmerged_agree_in_every_dtype() -> metal_candle::Result<()> {
    let dev = Device::Cpu;
    for (dtype, tol) in [
        (DType::F32, 1e-4f32),
        (DType::BF16, 0.1),
        (DType::F16, 2e-2),
    ] {
        let w = Tensor::randn(0f32, 0.1, (24, 40), &dev)?.to_dtype(dtype)?;
        let bias = Tensor::randn(0f32, 0.1, 24, &dev)?.to_dtype(dtype)?;
        let cfg = LoRAConfig::new(40, 24, 4, 8.0);
        let adapter = LoRALayer::new(40, 24, &cfg, &dev)?;
        adapter.b().set(&Tensor::randn(0f32, 0.1, (4, 24), &dev)?)?;
        let layer = LoraLinear::new(w, Some(bias))?.with_adapter(adapter)?;
        let x = Tensor::randn(0f32, 1., (3, 7, 40), &dev)?.to_dtype(dtype)?;
        let unmerged = layer.forward(&x)?.to_dtype(DType::F32)?;
        let merged = layer.merged()?.forward(&x)?.to_dtype(DType::F32)?;
        let d = max_abs_diff(&unmerged, &merged);
        assert!(d < tol, "{dtype:?}: {d}");
    }
    Ok(())
}

#[test]
fn swapping_the_adapter_changes_the_output_and_removing_it_restores_the_base(
) -> metal_candle::Result<()> {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.1, (8, 8), &dev)?;
    let mut layer = LoraLinear::new(w.clone(), None)?;
    let x = Tensor::randn(0f32, 1., (2, 8), &dev)?;
    let base = layer.forward(&x)?;
    let cfg = LoRAConfig::new(8, 8, 2, 2.0);
    let adapter = LoRALayer::new(8, 8, &cfg, &dev)?;
    adapter.b().set(&Tensor::randn(0f32, 0.5, (2, 8), &dev)?)?;
    layer.set_adapter(Some(adapter))?;
    assert!(max_abs_diff(&layer.forward(&x)?, &base) > 1e-3);
    layer.set_adapter(None)?;
    assert_eq!(max_abs_diff(&layer.forward(&x)?, &base), 0.0);
    Ok(())
}

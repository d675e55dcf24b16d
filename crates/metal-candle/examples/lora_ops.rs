//! A tour of the fused ops and the LoRA layer on the CPU: each op against candle's composed
//! reference, a LoRA layer trained for a few steps on a toy regression (the loss falls), and
//! the merged layer agreeing with the unmerged one.
//!
//! Run: `cargo run --release -p metal-candle --example lora_ops`

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Optimizer;
use metal_candle::ops::{self, reference};
use metal_candle::training::{LoRAConfig, LoRALayer, LoraLinear};

fn max_diff(a: &Tensor, b: &Tensor) -> metal_candle::Result<f32> {
    Ok((a - b)?
        .abs()?
        .max_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?)
}

fn main() -> metal_candle::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (4, 128, 512), &dev)?;
    let w = Tensor::randn(1f32, 0.1, 512, &dev)?;
    let b = Tensor::randn(0f32, 0.1, 512, &dev)?;
    println!("fused vs reference, max |difference| (f32, 4x128x512):");
    println!(
        "  softmax    {:.2e}",
        max_diff(
            &ops::softmax_last_dim(&x)?,
            &reference::softmax_last_dim(&x)?
        )?
    );
    println!(
        "  rms_norm   {:.2e}",
        max_diff(
            &ops::rms_norm(&x, &w, 1e-5)?,
            &reference::rms_norm(&x, &w, 1e-5)?
        )?
    );
    println!(
        "  layer_norm {:.2e}",
        max_diff(
            &ops::layer_norm(&x, &w, &b, 1e-5)?,
            &reference::layer_norm(&x, &w, &b, 1e-5)?
        )?
    );

    // A frozen base layer plus an adapter, trained to imitate a rank-2 change of the base.
    let base_w = (Tensor::randn(0f32, 1., (64, 128), &dev)? / 128f64.sqrt())?;
    let target_w = (&base_w
        + Tensor::randn(0f32, 0.3, (64, 2), &dev)?.matmul(&Tensor::randn(
            0f32,
            0.3,
            (2, 128),
            &dev,
        )?)?)?;
    let cfg = LoRAConfig::new(128, 64, 4, 8.0);
    let adapter = LoRALayer::new(128, 64, &cfg, &dev)?;
    let vars: Vec<_> = adapter.vars().into_iter().cloned().collect();
    let layer = LoraLinear::new(base_w, None)?.with_adapter(adapter)?;
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    println!("training a rank-4 adapter toward a rank-2 change of its base layer:");
    for step in 0..=200 {
        let inp = Tensor::randn(0f32, 1., (32, 128), &dev)?;
        let target = inp.matmul(&target_w.t()?)?;
        let loss = (layer.forward(&inp)? - target)?.sqr()?.mean_all()?;
        if step % 40 == 0 {
            println!("  step {step:>3}  loss {:.5}", loss.to_scalar::<f32>()?);
        }
        opt.backward_step(&loss)?;
    }
    let probe = Tensor::randn(0f32, 1., (8, 128), &dev)?;
    let d = max_diff(&layer.forward(&probe)?, &layer.merged()?.forward(&probe)?)?;
    println!("merged vs unmerged, max |difference|: {d:.2e}");
    Ok(())
}

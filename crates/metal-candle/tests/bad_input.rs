//! Bad input gets a clear error that names what is wrong.

use candle_core::{DType, Device, Tensor};
use metal_candle::backend::custom_ops::FusedLoRAOp;
use metal_candle::ops;
use metal_candle::training::{LoRAConfig, LoRALayer, LoraLinear};

fn t(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(dims, dtype, &Device::Cpu).unwrap()
}

fn err_text<T: std::fmt::Debug>(r: metal_candle::Result<T>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn norm_weight_length_must_match_last_dim() {
    let e = err_text(ops::rms_norm(
        &t(&[2, 8], DType::F32),
        &t(&[7], DType::F32),
        1e-5,
    ));
    assert!(
        e.contains("[7]") && e.contains("[2, 8]") && e.contains("rms_norm"),
        "{e}"
    );
    let e = err_text(ops::layer_norm(
        &t(&[2, 8], DType::F32),
        &t(&[8], DType::F32),
        &t(&[9], DType::F32),
        1e-5,
    ));
    assert!(e.contains("bias") && e.contains("[9]"), "{e}");
    let e = err_text(ops::rms_norm(
        &t(&[2, 8], DType::F32),
        &t(&[8], DType::F32),
        -1.0,
    ));
    assert!(e.contains("eps"), "{e}");
}

#[test]
fn lora_factors_must_chain() {
    let x = t(&[4, 16], DType::F32);
    let e = err_text(ops::lora_delta(
        &x,
        &t(&[15, 4], DType::F32),
        &t(&[4, 8], DType::F32),
        1.0,
    ));
    assert!(e.contains("[15, 4]") && e.contains("[4, 16]"), "{e}");
    let e = err_text(ops::lora_delta(
        &x,
        &t(&[16, 4], DType::F32),
        &t(&[3, 8], DType::F32),
        1.0,
    ));
    assert!(e.contains("do not chain") && e.contains("[3, 8]"), "{e}");
    let e = err_text(ops::lora_linear(
        &x,
        &t(&[9, 16], DType::F32),
        None,
        &t(&[16, 4], DType::F32),
        &t(&[4, 8], DType::F32),
        1.0,
    ));
    assert!(
        e.contains("W has shape [9, 16]") && e.contains("(8, 16)"),
        "{e}"
    );
    let e = err_text(FusedLoRAOp::new(
        t(&[16, 4], DType::F32),
        t(&[5, 8], DType::F32),
        1.0,
    ));
    assert!(e.contains("do not chain"), "{e}");
}

#[test]
fn dtypes_must_match() {
    let e = err_text(ops::rms_norm(
        &t(&[2, 8], DType::F32),
        &t(&[8], DType::BF16),
        1e-5,
    ));
    assert!(
        e.contains("dtype") && e.contains("BF16") && e.contains("F32"),
        "{e}"
    );
    let e = err_text(ops::lora_delta(
        &t(&[2, 8], DType::F16),
        &t(&[8, 2], DType::F16),
        &t(&[2, 8], DType::F32),
        1.0,
    ));
    assert!(e.contains("B is F32"), "{e}");
}

#[test]
fn integer_inputs_are_rejected_by_name() {
    let x = Tensor::zeros((2, 8), DType::U32, &Device::Cpu).unwrap();
    let e = err_text(ops::softmax_last_dim(&x));
    assert!(e.contains("U32"), "{e}");
}

#[test]
fn config_values_are_checked() {
    let dev = Device::Cpu;
    let e = err_text(LoRALayer::new(8, 8, &LoRAConfig::new(8, 8, 0, 16.0), &dev));
    assert!(e.contains("rank"), "{e}");
    let e = err_text(LoRALayer::new(8, 8, &LoRAConfig::new(8, 8, 4, 0.0), &dev));
    assert!(e.contains("alpha = 0"), "{e}");
    let e = err_text(LoRALayer::new(8, 8, &LoRAConfig::new(8, 8, 4, -2.0), &dev));
    assert!(e.contains("alpha = -2"), "{e}");
    for p in [1.0, -0.1, 1.5] {
        let e = err_text(LoRALayer::new(
            8,
            8,
            &LoRAConfig::new(8, 8, 4, 8.0).with_dropout(p),
            &dev,
        ));
        assert!(e.contains("dropout"), "{e}");
    }
    let e = err_text(LoRALayer::new(8, 9, &LoRAConfig::new(8, 8, 4, 8.0), &dev));
    assert!(e.contains("8x9") && e.contains("8x8"), "{e}");
    let e = err_text(ops::lora_delta(
        &t(&[2, 8], DType::F32),
        &t(&[8, 0], DType::F32),
        &t(&[0, 8], DType::F32),
        1.0,
    ));
    assert!(e.contains("rank 0"), "{e}");
}

#[test]
fn adapter_must_fit_its_layer() {
    let dev = Device::Cpu;
    let layer = LoraLinear::new(t(&[8, 16], DType::F32), None).unwrap();
    let adapter = LoRALayer::new(8, 16, &LoRAConfig::new(8, 16, 2, 4.0), &dev).unwrap();
    let e = err_text(layer.with_adapter(adapter));
    assert!(
        e.contains("adapter is 8x16") && e.contains("layer is 16x8"),
        "{e}"
    );
}

#[test]
fn cross_entropy_targets_are_checked() {
    let logits = t(&[2, 3, 5], DType::F32);
    let targets = Tensor::new(&[[0u32, 4, 5], [1, 1, 1]], &Device::Cpu).unwrap();
    let e = err_text(ops::cross_entropy(&logits, &targets));
    assert!(
        e.contains("target 5") && e.contains("vocabulary of 5"),
        "{e}"
    );
    let e = err_text(ops::cross_entropy(&logits, &t(&[2, 3], DType::F32)));
    assert!(e.contains("u32") && e.contains("F32"), "{e}");
    let targets = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
    let e = err_text(ops::cross_entropy(&logits, &targets));
    assert!(e.contains("[3]") && e.contains("[2, 3]"), "{e}");
}

#[test]
fn rope_inputs_are_checked() {
    let f = DType::F32;
    let x = t(&[2, 3, 5, 8], f);
    let table = t(&[2, 5, 4], f);
    let e = err_text(ops::rope(
        &t(&[2, 3, 5, 7], f),
        &t(&[2, 5, 3], f),
        &t(&[2, 5, 3], f),
    ));
    assert!(e.contains("head_dim 7 is odd"), "{e}");
    let e = err_text(ops::rope(&t(&[15, 8], f), &table, &table));
    assert!(
        e.contains("[15, 8]") && e.contains("(batch, heads, seq, head_dim)"),
        "{e}"
    );
    let e = err_text(ops::rope(&x, &t(&[2, 5, 8], f), &table));
    assert!(
        e.contains("cos has shape [2, 5, 8]")
            && e.contains("[2, 3, 5, 8]")
            && e.contains("(2 or 1, 5, 4)"),
        "{e}"
    );
    let e = err_text(ops::rope(&x, &table, &t(&[3, 5, 4], f)));
    assert!(e.contains("sin has shape [3, 5, 4]"), "{e}");
    let e = err_text(ops::rope(&x, &table, &t(&[1, 5, 4], f)));
    assert!(
        e.contains("cos has shape [2, 5, 4] but sin has shape [1, 5, 4]"),
        "{e}"
    );
    let half = t(&[2, 5, 4], DType::BF16);
    let e = err_text(ops::rope(&x, &half, &half));
    assert!(e.contains("cos is BF16") && e.contains("x is F32"), "{e}");
    let ints = Tensor::zeros((2, 3, 5, 8), DType::U32, &Device::Cpu).unwrap();
    let e = err_text(ops::rope(&ints, &table, &table));
    assert!(e.contains("U32"), "{e}");
}

#[test]
fn swiglu_inputs_are_checked() {
    let e = err_text(ops::swiglu(
        &t(&[2, 8], DType::F32),
        &t(&[2, 9], DType::F32),
    ));
    assert!(
        e.contains("gate has shape [2, 8]") && e.contains("up has shape [2, 9]"),
        "{e}"
    );
    let e = err_text(ops::swiglu(
        &t(&[2, 8], DType::F32),
        &t(&[2, 8], DType::F16),
    ));
    assert!(e.contains("up is F16") && e.contains("gate is F32"), "{e}");
    let ints = Tensor::zeros((2, 8), DType::U32, &Device::Cpu).unwrap();
    let e = err_text(ops::swiglu(&ints, &ints));
    assert!(e.contains("U32"), "{e}");
}

//! The fused backward maths against central finite differences in f64.

mod common;

use candle_core::{DType, Tensor};
use common::{finite_difference, forward_backward, randn, OpFn};
use metal_candle::ops;

/// Checks every input's fused gradient against finite differences (up to 64 elements each).
fn check(name: &str, op: OpFn, inputs: &[Tensor]) {
    let out_dims = op(inputs).unwrap().dims().to_vec();
    let upstream = randn(&out_dims, 0.0, 1.0, DType::F64).unwrap();
    let (_, grads) = forward_backward(op, inputs, &upstream).unwrap();
    for (which, g) in grads.iter().enumerate() {
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let fd = finite_difference(op, inputs, &upstream, which, 64).unwrap();
        assert!(!fd.is_empty());
        for (idx, num) in fd {
            let err = (g[idx] - num).abs() / num.abs().max(1.0);
            assert!(
                err < 1e-6,
                "{name}: d/d(input {which})[{idx}]: fused {} vs finite difference {num}",
                g[idx]
            );
        }
    }
}

#[test]
fn softmax_gradient() {
    let x = randn(&[3, 17], 0.0, 2.0, DType::F64).unwrap();
    check(
        "softmax",
        &|t: &[Tensor]| ops::softmax_last_dim(&t[0]),
        &[x],
    );
}

#[test]
fn cross_entropy_gradient() {
    let x = randn(&[2, 3, 11], 0.0, 2.0, DType::F64).unwrap();
    let targets = Tensor::new(&[[0u32, 10, 4], [7, 7, 1]], &candle_core::Device::Cpu).unwrap();
    check(
        "cross_entropy",
        &|t: &[Tensor]| ops::cross_entropy(&t[0], &targets),
        &[x],
    );
}

#[test]
fn rms_norm_gradients() {
    let x = randn(&[2, 3, 17], 0.3, 1.0, DType::F64).unwrap();
    let w = randn(&[17], 1.0, 0.5, DType::F64).unwrap();
    check(
        "rms_norm",
        &|t: &[Tensor]| ops::rms_norm(&t[0], &t[1], 1e-5),
        &[x, w],
    );
}

#[test]
fn layer_norm_gradients() {
    let x = randn(&[3, 17], 1.0, 2.0, DType::F64).unwrap();
    let w = randn(&[17], 1.0, 0.5, DType::F64).unwrap();
    let b = randn(&[17], 0.0, 0.5, DType::F64).unwrap();
    check(
        "layer_norm",
        &|t: &[Tensor]| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        &[x, w, b],
    );
}

#[test]
fn lora_delta_gradients() {
    let x = randn(&[2, 3, 9], 0.0, 1.0, DType::F64).unwrap();
    let a = randn(&[9, 3], 0.0, 0.5, DType::F64).unwrap();
    let b = randn(&[3, 7], 0.0, 0.5, DType::F64).unwrap();
    check(
        "lora_delta",
        &|t: &[Tensor]| ops::lora_delta(&t[0], &t[1], &t[2], 1.5),
        &[x, a, b],
    );
}

#[test]
fn lora_linear_gradients() {
    let x = randn(&[4, 9], 0.0, 1.0, DType::F64).unwrap();
    let a = randn(&[9, 2], 0.0, 0.5, DType::F64).unwrap();
    let b = randn(&[2, 6], 0.0, 0.5, DType::F64).unwrap();
    let w = randn(&[6, 9], 0.0, 0.5, DType::F64).unwrap();
    let bias = randn(&[6], 0.0, 0.5, DType::F64).unwrap();
    let op = |t: &[Tensor]| ops::lora_linear(&t[0], &w, Some(&bias), &t[1], &t[2], 0.75);
    check("lora_linear", &op, &[x, a, b]);
}

#[test]
fn rope_gradient() {
    let x = randn(&[2, 3, 5, 8], 0.0, 1.0, DType::F64).unwrap();
    for tables_batch in [2, 1] {
        let angles = randn(&[tables_batch, 5, 4], 0.0, 2.0, DType::F64).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        check(
            "rope",
            &|t: &[Tensor]| ops::rope(&t[0], &cos, &sin),
            std::slice::from_ref(&x),
        );
    }
}

#[test]
fn swiglu_gradients() {
    let gate = randn(&[2, 3, 17], 0.0, 3.0, DType::F64).unwrap();
    let up = randn(&[2, 3, 17], 0.0, 1.0, DType::F64).unwrap();
    check(
        "swiglu",
        &|t: &[Tensor]| ops::swiglu(&t[0], &t[1]),
        &[gate, up],
    );
}

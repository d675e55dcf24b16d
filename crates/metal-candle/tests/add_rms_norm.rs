//! `ops::add_rms_norm`: the sum and the norm against candle's add and the reference RMSNorm in
//! every dtype, gradients through it when training, and errors for bad input. (Its one-kernel
//! CUDA path is checked by the GPU self-test.)

mod common;

use candle_core::{DType, Tensor, Var};
use common::{randn, rel_err, tol};
use metal_candle::ops::{self, reference};

#[test]
fn matches_add_then_the_reference_norm() {
    for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
        for shape in [&[1usize, 1][..], &[3, 17], &[2, 3, 576], &[1, 4099]] {
            let n = *shape.last().unwrap();
            let x = randn(shape, 0.0, 1.0, dtype).unwrap();
            let r = randn(shape, 0.0, 1.0, dtype).unwrap();
            let w = randn(&[n], 1.0, 0.3, dtype).unwrap();
            let (s, y) = ops::add_rms_norm(&x, &r, &w, 1e-5).unwrap();
            let s_want = (&x + &r).unwrap();
            assert!(
                rel_err(&s, &s_want).unwrap() == 0.0,
                "{dtype:?} {shape:?}: the sum"
            );
            let y_want = reference::rms_norm(
                &s_want.to_dtype(DType::F64).unwrap(),
                &w.to_dtype(DType::F64).unwrap(),
                1e-5,
            )
            .unwrap();
            let e = rel_err(&y, &y_want).unwrap();
            assert!(
                e <= tol(dtype),
                "{dtype:?} {shape:?}: the norm, rel err {e:e}"
            );
        }
    }
}

#[test]
fn gradients_flow_to_both_inputs_and_the_weight() {
    let x = Var::from_tensor(&randn(&[2, 5, 9], 0.0, 1.0, DType::F64).unwrap()).unwrap();
    let r = Var::from_tensor(&randn(&[2, 5, 9], 0.0, 1.0, DType::F64).unwrap()).unwrap();
    let w = Var::from_tensor(&randn(&[9], 1.0, 0.3, DType::F64).unwrap()).unwrap();
    let (s, y) = ops::add_rms_norm(x.as_tensor(), r.as_tensor(), w.as_tensor(), 1e-5).unwrap();
    let loss = (s.sum_all().unwrap() + y.sqr().unwrap().sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    // The same loss through the separate ops.
    let s2 = (x.as_tensor() + r.as_tensor()).unwrap();
    let y2 = ops::rms_norm(&s2, w.as_tensor(), 1e-5).unwrap();
    let loss2 = (s2.sum_all().unwrap() + y2.sqr().unwrap().sum_all().unwrap()).unwrap();
    let grads2 = loss2.backward().unwrap();
    for v in [&x, &r, &w] {
        let (a, b) = (
            grads.get(v.as_tensor()).unwrap(),
            grads2.get(v.as_tensor()).unwrap(),
        );
        assert!(rel_err(a, b).unwrap() < 1e-12);
    }
}

#[test]
fn bad_input_is_named() {
    let x = randn(&[2, 6], 0.0, 1.0, DType::F32).unwrap();
    let w = randn(&[6], 1.0, 0.1, DType::F32).unwrap();
    let err = |r: metal_candle::Result<(Tensor, Tensor)>| r.unwrap_err().to_string();
    let e = err(ops::add_rms_norm(
        &x,
        &randn(&[2, 5], 0.0, 1.0, DType::F32).unwrap(),
        &w,
        1e-5,
    ));
    assert!(e.contains("[2, 6]") && e.contains("[2, 5]"), "{e}");
    let e = err(ops::add_rms_norm(
        &x,
        &x.to_dtype(DType::F16).unwrap(),
        &w,
        1e-5,
    ));
    assert!(e.contains("F16") && e.contains("F32"), "{e}");
    let e = err(ops::add_rms_norm(
        &x,
        &x,
        &randn(&[5], 1.0, 0.1, DType::F32).unwrap(),
        1e-5,
    ));
    assert!(e.contains("weight"), "{e}");
}

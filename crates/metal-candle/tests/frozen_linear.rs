//! `ops::frozen_linear` against candle's `x·Wᵀ + bias`: random shapes, every dtype, strided
//! inputs, the gradient of x (and only of x) against the f64 truth and finite differences, the
//! fallback that gives a trainable W its gradient, and the errors for bad input.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{as_view, finite_difference, forward_backward, randn, rel_err, tol, View};
use metal_candle::ops;

fn reference(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `‖got − truth‖ / ‖scale‖`, where `scale` is the op computed on the magnitudes of its
/// terms: what rounding each term can disturb. A plain relative error is ill-conditioned when
/// the terms cancel (the inputs are random; a 1 × 1 bf16 output x·w + b close to zero failed
/// once in CI with a relative error of 1).
fn error_against_terms(got: &Tensor, truth: &Tensor, scale: &Tensor) -> f64 {
    let diff = (got.to_dtype(DType::F64).unwrap() - truth).unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    let e = norm(&diff) / norm(scale).max(f64::MIN_POSITIVE);
    assert!(!e.is_nan(), "NaN in comparison");
    e
}

#[test]
fn matches_the_f64_truth_in_every_dtype_shape_and_view() {
    let shapes: [(&[usize], usize, usize); 6] = [
        (&[1], 1, 1),
        (&[1], 17, 3),
        (&[7], 33, 20),
        (&[2, 3], 64, 130),
        (&[3, 5], 1000, 9),
        (&[1, 1], 4099, 2),
    ];
    for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
        for &(lead, k, n) in &shapes {
            for view in [View::Contiguous, View::Transposed, View::Narrowed] {
                for with_bias in [false, true] {
                    let mut dims = lead.to_vec();
                    dims.push(k);
                    let x = randn(&dims, 0.0, 1.0, dtype).unwrap();
                    let w = randn(&[n, k], 0.0, (1.0 / k as f64).sqrt(), dtype).unwrap();
                    let bias = randn(&[n], 0.0, 1.0, dtype).unwrap();
                    let b = with_bias.then_some(&bias);
                    let ctx =
                        format!("{dtype:?} x {dims:?} W ({n}, {k}) {view:?} bias {with_bias}");
                    let xv = as_view(&x, view).unwrap();
                    let mut out_dims = dims.clone();
                    *out_dims.last_mut().unwrap() = n;
                    let upstream = randn(&out_dims, 0.0, 1.0, DType::F64).unwrap();
                    let (y, g) = forward_backward(
                        &|t: &[Tensor]| ops::frozen_linear(&t[0], &w, b),
                        &[xv],
                        &upstream,
                    )
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    let (w64, bias64) = (
                        w.to_dtype(DType::F64).unwrap(),
                        bias.to_dtype(DType::F64).unwrap(),
                    );
                    let b64 = with_bias.then_some(&bias64);
                    let (y_t, g_t) = forward_backward(
                        &|t: &[Tensor]| Ok(reference(&t[0], &w64, b64)?),
                        &[x.to_dtype(DType::F64).unwrap()],
                        &upstream,
                    )
                    .unwrap();
                    assert_eq!(y.dtype(), dtype, "{ctx}: output dtype");
                    assert_eq!(y.dims(), &out_dims[..], "{ctx}: output shape");
                    let abs = |t: &Tensor| t.to_dtype(DType::F64).unwrap().abs().unwrap();
                    let y_scale = reference(&abs(&x), &abs(&w), b64.map(abs).as_ref()).unwrap();
                    let g_scale = abs(&upstream).broadcast_matmul(&abs(&w)).unwrap();
                    let ey = error_against_terms(&y, &y_t, &y_scale);
                    let eg = error_against_terms(&g[0], &g_t[0], &g_scale);
                    assert!(ey <= tol(dtype), "{ctx}: forward rel err {ey:e}");
                    assert!(eg <= 2.0 * tol(dtype), "{ctx}: dx rel err {eg:e}");
                }
            }
        }
    }
}

#[test]
fn gradient_of_x_matches_finite_differences() {
    let x = randn(&[2, 3, 9], 0.0, 1.0, DType::F64).unwrap();
    let w = randn(&[5, 9], 0.0, 0.5, DType::F64).unwrap();
    let bias = randn(&[5], 0.0, 0.5, DType::F64).unwrap();
    let op = |t: &[Tensor]| ops::frozen_linear(&t[0], &w, Some(&bias));
    let upstream = randn(&[2, 3, 5], 0.0, 1.0, DType::F64).unwrap();
    let (_, grads) = forward_backward(&op, std::slice::from_ref(&x), &upstream).unwrap();
    let g: Vec<f64> = grads[0].flatten_all().unwrap().to_vec1().unwrap();
    let fd = finite_difference(&op, &[x], &upstream, 0, 54).unwrap();
    assert!(!fd.is_empty());
    for (idx, num) in fd {
        let err = (g[idx] - num).abs() / num.abs().max(1.0);
        assert!(
            err < 1e-6,
            "dx[{idx}]: {} vs finite difference {num}",
            g[idx]
        );
    }
}

#[test]
fn a_frozen_weight_gets_no_gradient_and_a_trainable_one_does() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&randn(&[4, 6], 0.0, 1.0, DType::F32).unwrap()).unwrap();
    let w = randn(&[3, 6], 0.0, 1.0, DType::F32).unwrap();
    let grads = ops::frozen_linear(x.as_tensor(), &w, None)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(
        grads.get(&w).is_none(),
        "a frozen W must not get a gradient"
    );

    // A trainable W (and bias) takes candle's composition and gets the usual gradients.
    let wv = Var::from_tensor(&w).unwrap();
    let bv = Var::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
    let y = ops::frozen_linear(x.as_tensor(), wv.as_tensor(), Some(bv.as_tensor())).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let dw = grads.get(wv.as_tensor()).expect("W's gradient");
    let want = x
        .as_tensor()
        .sum(0)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((3, 1))
        .unwrap();
    assert!(rel_err(dw, &want).unwrap() < 1e-6);
    let db: Vec<f32> = grads
        .get(bv.as_tensor())
        .expect("bias gradient")
        .to_vec1()
        .unwrap();
    assert_eq!(db, [4.0, 4.0, 4.0]);
}

#[test]
fn bad_input_is_named() {
    let x = randn(&[2, 6], 0.0, 1.0, DType::F32).unwrap();
    let err = |r: metal_candle::Result<Tensor>| r.unwrap_err().to_string();
    let w = randn(&[3, 5], 0.0, 1.0, DType::F32).unwrap();
    let e = err(ops::frozen_linear(&x, &w, None));
    assert!(e.contains("[3, 5]") && e.contains("(out, 6)"), "{e}");
    let w = randn(&[3, 6], 0.0, 1.0, DType::F32).unwrap();
    let e = err(ops::frozen_linear(
        &x,
        &w,
        Some(&randn(&[4], 0.0, 1.0, DType::F32).unwrap()),
    ));
    assert!(e.contains("bias") && e.contains("[3]"), "{e}");
    let e = err(ops::frozen_linear(
        &x,
        &w.to_dtype(DType::F16).unwrap(),
        None,
    ));
    assert!(e.contains("W is F16") && e.contains("x is F32"), "{e}");
    let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
    let e = err(ops::frozen_linear(&scalar, &w, None));
    assert!(e.contains("scalar"), "{e}");
}

//! The vendored candle-core's gradient store (vendor/README.md): a first gradient is stored as
//! it arrives, which can be a strided view (a transpose's or a broadcast's). These graphs send
//! such views into the ops that need contiguous sources (gather, index_select's index_add) and
//! into a custom op's backward, and check the gradients against ones worked out by hand.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::max_abs_diff;
use metal_candle::ops;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator keeps the test independent of candle's RNG.
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

#[test]
fn cross_entropy_gather_receives_a_broadcast_gradient() {
    // mean(-log softmax(x)[t]): the gradient reaching the gather is the broadcast of the mean's.
    let x = Var::from_tensor(&randn(&[4, 5], 1)).unwrap();
    let targets = Tensor::new(&[3u32, 0, 4, 1], &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(x.as_tensor(), &targets).unwrap();
    let grads = loss.backward().unwrap();
    let got = grads.get(x.as_tensor()).expect("gradient of x");
    let one_hot = Tensor::new(
        &[
            [0f64, 0., 0., 1., 0.],
            [1., 0., 0., 0., 0.],
            [0., 0., 0., 0., 1.],
            [0., 1., 0., 0., 0.],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let softmax = candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap();
    let want = ((softmax - one_hot).unwrap() / 4.0).unwrap();
    assert!(max_abs_diff(got, &want) < 1e-12, "{got}\nvs\n{want}");
}

#[test]
fn index_select_receives_a_transposed_gradient() {
    // An embedding lookup whose output is used transposed (as a tied LM head's weight is).
    let table = Var::from_tensor(&randn(&[6, 3], 2)).unwrap();
    let ids = Tensor::new(&[2u32, 5, 2, 0, 4], &Device::Cpu).unwrap();
    let c = randn(&[3, 5], 3);
    let rows = table.as_tensor().index_select(&ids, 0).unwrap();
    let loss = (rows.t().unwrap() * &c).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let got = grads.get(table.as_tensor()).expect("gradient of the table");
    // Row r of the table gets the sum of cᵀ's rows at the positions where ids == r.
    let ct = c.t().unwrap();
    let mut want = vec![vec![0f64; 3]; 6];
    for (pos, &id) in [2usize, 5, 2, 0, 4].iter().enumerate() {
        let row = ct.i(pos).unwrap().to_vec1::<f64>().unwrap();
        for (w, r) in want[id].iter_mut().zip(row) {
            *w += r;
        }
    }
    let want = Tensor::new(want, &Device::Cpu).unwrap();
    assert!(max_abs_diff(got, &want) < 1e-12, "{got}\nvs\n{want}");
}

#[test]
fn gradients_reaching_a_tensor_twice_are_summed() {
    // The first contribution is stored as is (a transposed view), the second added to it.
    let x = Var::from_tensor(&randn(&[3, 4], 4)).unwrap();
    let a = randn(&[3, 4], 5);
    let b = randn(&[4, 3], 6);
    let first = (x.as_tensor() * &a).unwrap().sum_all().unwrap();
    let second = (x.as_tensor().t().unwrap() * &b)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = (first + second).unwrap().backward().unwrap();
    let got = grads.get(x.as_tensor()).expect("gradient of x");
    let want = (&a + b.t().unwrap()).unwrap();
    assert!(max_abs_diff(got, &want) < 1e-12, "{got}\nvs\n{want}");
}

#[test]
fn fused_op_backward_receives_a_strided_gradient() {
    // rms_norm's output used transposed: its custom backward gets the transpose's gradient.
    let x0 = randn(&[5, 7], 7);
    let w0 = (randn(&[7], 8) + 1.5).unwrap();
    let c = randn(&[7, 5], 9);
    let run = |fused: bool| {
        let x = Var::from_tensor(&x0).unwrap();
        let w = Var::from_tensor(&w0).unwrap();
        let y = if fused {
            ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap()
        } else {
            ops::reference::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap()
        };
        let loss = (y.t().unwrap() * &c).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        (
            grads.get(x.as_tensor()).unwrap().clone(),
            grads.get(w.as_tensor()).unwrap().clone(),
        )
    };
    let (dx, dw) = run(true);
    let (dx_ref, dw_ref) = run(false);
    assert_eq!(dx.dtype(), DType::F64);
    assert!(max_abs_diff(&dx, &dx_ref) < 1e-10, "dx {dx}\nvs\n{dx_ref}");
    assert!(max_abs_diff(&dw, &dw_ref) < 1e-10, "dw {dw}\nvs\n{dw_ref}");
}

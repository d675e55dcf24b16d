//! `ops::causal_attention` against the composed reference (forward and gradients, every
//! dtype, grouped heads, prefill after cached keys, packed rows, strided views), against
//! finite differences in f64, and its errors for bad input. (Its CUDA path is checked by the
//! GPU self-test.)

mod common;

use candle_core::{DType, Device, Tensor};
use common::{finite_difference, forward_backward, randn, rel_err, tol};
use metal_candle::ops::{self, reference};

/// (batch, heads, kv_heads, queries, keys, head_dim)
const SHAPES: [(usize, usize, usize, usize, usize, usize); 6] = [
    (1, 1, 1, 1, 1, 1),
    (2, 4, 2, 7, 7, 8),
    (1, 9, 3, 33, 33, 64),
    (2, 6, 6, 5, 12, 16), // 5 new queries after 7 cached keys
    (1, 2, 1, 17, 17, 3),
    (3, 2, 1, 1, 9, 4), // one query over a cache
];

/// Example starts of packed rows: each row split into random runs; `first_key[b][i]` is the
/// start of query i's run.
fn packed_starts(batch: usize, s: usize, seed: u64) -> Tensor {
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut starts = Vec::with_capacity(batch * s);
    for _ in 0..batch {
        let mut start = 0;
        for i in 0..s {
            if i > 0 && next() % 4 == 0 {
                start = i;
            }
            starts.push(start as u32);
        }
    }
    Tensor::from_vec(starts, (batch, s), &Device::Cpu).unwrap()
}

fn inputs(shape: (usize, usize, usize, usize, usize, usize), dtype: DType) -> [Tensor; 3] {
    let (b, h, kvh, s, t, d) = shape;
    // q as the model makes it: (batch, seq, heads, d) transposed to put heads first.
    let q = randn(&[b, s, h, d], 0.0, 1.0, dtype)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let k = randn(&[b, kvh, t, d], 0.0, 1.0, dtype).unwrap();
    let v = randn(&[b, kvh, t, d], 0.0, 1.0, dtype).unwrap();
    [q, k, v]
}

#[test]
fn forward_matches_reference() {
    for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
        for shape in SHAPES {
            let [q, k, v] = inputs(shape, dtype);
            let scale = 1.0 / (shape.5 as f64).sqrt();
            for first_key in [None, Some(packed_starts(shape.0, shape.3, 7))] {
                // Packed rows only make sense without cached keys.
                if first_key.is_some() && shape.3 != shape.4 {
                    continue;
                }
                let y = ops::causal_attention(&q, &k, &v, scale, first_key.as_ref()).unwrap();
                let r = reference::causal_attention(&q, &k, &v, scale, first_key.as_ref()).unwrap();
                assert_eq!(y.dims(), q.dims());
                assert_eq!(y.dtype(), dtype);
                let e = rel_err(&y, &r).unwrap();
                assert!(
                    e <= 2.0 * tol(dtype),
                    "{dtype:?} {shape:?} packed {}: rel err {e:e}",
                    first_key.is_some()
                );
            }
        }
    }
}

/// The reference itself against a direct per-query loop, so that the two implementations
/// cannot agree on a wrong mask.
#[test]
fn reference_matches_a_per_query_loop() {
    let (b, h, kvh, s, t, d) = (2, 4, 2, 5, 8, 3);
    let [q, k, v] = inputs((b, h, kvh, s, t, d), DType::F64);
    let starts = packed_starts(b, s, 3);
    let fk: Vec<Vec<u32>> = starts.to_vec2().unwrap();
    let y = reference::causal_attention(&q, &k, &v, 0.7, Some(&starts)).unwrap();
    let y: Vec<Vec<Vec<Vec<f64>>>> = (0..b)
        .map(|bi| y.get(bi).unwrap().to_vec3().unwrap())
        .collect();
    let (q4, k4, v4) = (
        (0..b)
            .map(|bi| q.get(bi).unwrap().to_vec3::<f64>().unwrap())
            .collect::<Vec<_>>(),
        (0..b)
            .map(|bi| k.get(bi).unwrap().to_vec3::<f64>().unwrap())
            .collect::<Vec<_>>(),
        (0..b)
            .map(|bi| v.get(bi).unwrap().to_vec3::<f64>().unwrap())
            .collect::<Vec<_>>(),
    );
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / (h / kvh);
            for i in 0..s {
                let keys: Vec<usize> = (fk[bi][i] as usize..=i + t - s).collect();
                let scores: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        0.7 * (0..d)
                            .map(|c| q4[bi][hi][i][c] * k4[bi][g][j][c])
                            .sum::<f64>()
                    })
                    .collect();
                let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..d {
                    let want: f64 = keys
                        .iter()
                        .zip(&e)
                        .map(|(&j, w)| w / sum * v4[bi][g][j][c])
                        .sum();
                    let got = y[bi][hi][i][c];
                    assert!(
                        (got - want).abs() < 1e-12,
                        "b {bi} h {hi} i {i} c {c}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn gradients_match_reference_autograd() {
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        for shape in SHAPES {
            let [q, k, v] = inputs(shape, dtype);
            let scale = 1.0 / (shape.5 as f64).sqrt();
            let first_key =
                (shape.3 == shape.4 && shape.3 > 1).then(|| packed_starts(shape.0, shape.3, 11));
            let upstream = randn(q.dims(), 0.0, 1.0, DType::F64).unwrap();
            let fused = |t: &[Tensor]| {
                ops::causal_attention(&t[0], &t[1], &t[2], scale, first_key.as_ref())
            };
            let composed = |t: &[Tensor]| {
                Ok(reference::causal_attention(
                    &t[0],
                    &t[1],
                    &t[2],
                    scale,
                    first_key.as_ref(),
                )?)
            };
            let ins = [q.clone(), k.clone(), v.clone()];
            let (_, gf) = forward_backward(&fused, &ins, &upstream).unwrap();
            let (_, gr) = forward_backward(&composed, &ins, &upstream).unwrap();
            for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(gf.iter().zip(&gr)) {
                assert_eq!(a.dims(), b.dims());
                let e = rel_err(a, b).unwrap();
                // The gradient is a sum over keys of products of rounded terms: allow a few
                // roundings of the dtype.
                assert!(
                    e <= 4.0 * tol(dtype),
                    "{dtype:?} {shape:?} {name}: rel err {e:e}"
                );
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    for (shape, packed) in [((2, 4, 2, 6, 6, 5), true), ((1, 2, 2, 3, 7, 4), false)] {
        let [q, k, v] = inputs(shape, DType::F64);
        let first_key = packed.then(|| packed_starts(shape.0, shape.3, 5));
        let op = |t: &[Tensor]| ops::causal_attention(&t[0], &t[1], &t[2], 0.6, first_key.as_ref());
        let ins = [q.contiguous().unwrap(), k, v];
        let upstream = randn(ins[0].dims(), 0.0, 1.0, DType::F64).unwrap();
        let (_, grads) = forward_backward(&op, &ins, &upstream).unwrap();
        for (which, g) in grads.iter().enumerate() {
            let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            let fd = finite_difference(&op, &ins, &upstream, which, 48).unwrap();
            assert!(!fd.is_empty());
            for (idx, num) in fd {
                let err = (g[idx] - num).abs() / num.abs().max(1.0);
                assert!(
                    err < 1e-6,
                    "{shape:?} input {which}[{idx}]: fused {} vs finite difference {num}",
                    g[idx]
                );
            }
        }
    }
}

#[test]
fn a_query_that_sees_no_key_gets_zeros() {
    let [q, k, v] = inputs((1, 2, 1, 3, 3, 4), DType::F32);
    // Query 1 may only see keys from 2 on, which are in its future: no key at all.
    let first_key = Tensor::new(&[[0u32, 2, 0]], &Device::Cpu).unwrap();
    let y = ops::causal_attention(&q, &k, &v, 0.5, Some(&first_key)).unwrap();
    let r = reference::causal_attention(&q, &k, &v, 0.5, Some(&first_key)).unwrap();
    let row: Vec<f32> = y
        .get(0)
        .unwrap()
        .get(1)
        .unwrap()
        .get(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(row, [0.0; 4]);
    assert!(rel_err(&y, &r).unwrap() < 1e-5);
    let others: Vec<f32> = y
        .get(0)
        .unwrap()
        .get(1)
        .unwrap()
        .get(2)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(others.iter().any(|&x| x != 0.0));
}

#[test]
fn bad_input_is_named() {
    let t = |dims: &[usize]| randn(dims, 0.0, 1.0, DType::F32).unwrap();
    let err = |r: metal_candle::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(ops::causal_attention(
        &t(&[1, 4, 8]),
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 5, 8]),
        1.0,
        None,
    ));
    assert!(e.contains("(batch, heads, s, head_dim)"), "{e}");
    let e = err(ops::causal_attention(
        &t(&[1, 4, 5, 8]),
        &t(&[1, 3, 5, 8]),
        &t(&[1, 3, 5, 8]),
        1.0,
        None,
    ));
    assert!(
        e.contains("4 query heads") && e.contains("3 key/value heads"),
        "{e}"
    );
    let e = err(ops::causal_attention(
        &t(&[1, 4, 5, 8]),
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 6, 8]),
        1.0,
        None,
    ));
    assert!(e.contains("same shape"), "{e}");
    let e = err(ops::causal_attention(
        &t(&[1, 4, 5, 8]),
        &t(&[1, 2, 3, 8]),
        &t(&[1, 2, 3, 8]),
        1.0,
        None,
    ));
    assert!(e.contains("5 queries but only 3 keys"), "{e}");
    let e = err(ops::causal_attention(
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 5, 7]),
        &t(&[1, 2, 5, 7]),
        1.0,
        None,
    ));
    assert!(e.contains("head_dim"), "{e}");
    let e = err(ops::causal_attention(
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 5, 8]),
        f64::NAN,
        None,
    ));
    assert!(e.contains("scale"), "{e}");
    let half = t(&[1, 2, 5, 8]).to_dtype(DType::F16).unwrap();
    let e = err(ops::causal_attention(
        &t(&[1, 2, 5, 8]),
        &half,
        &t(&[1, 2, 5, 8]),
        1.0,
        None,
    ));
    assert!(e.contains("F16") && e.contains("F32"), "{e}");
    let wrong = Tensor::zeros((1, 4), DType::U32, &Device::Cpu).unwrap();
    let e = err(ops::causal_attention(
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 5, 8]),
        1.0,
        Some(&wrong),
    ));
    assert!(e.contains("first_key") && e.contains("[1, 5]"), "{e}");
    let wrong = Tensor::zeros((1, 5), DType::F32, &Device::Cpu).unwrap();
    let e = err(ops::causal_attention(
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 5, 8]),
        1.0,
        Some(&wrong),
    ));
    assert!(e.contains("u32"), "{e}");
}

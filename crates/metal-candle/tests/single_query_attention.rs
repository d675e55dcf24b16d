//! `ops::single_query_attention` (the decoding step's attention) against a per-head loop, with
//! grouped key/value heads and K/V as views of larger cache buffers; errors for bad shapes.
//! (Its one-kernel CUDA path is checked by the GPU self-test.)

mod common;

use candle_core::{DType, IndexOp, Tensor, D};
use common::{randn, rel_err, tol};
use metal_candle::ops;

/// Head by head: softmax(q_h · K_gᵀ) · V_g with g = h / rep, in f64.
fn per_head(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let (b, heads, _, _) = q.dims4().unwrap();
    let rep = heads / k.dim(1).unwrap();
    let (q, k, v) = (
        q.to_dtype(DType::F64).unwrap(),
        k.to_dtype(DType::F64).unwrap(),
        v.to_dtype(DType::F64).unwrap(),
    );
    let mut rows = Vec::new();
    for bi in 0..b {
        for h in 0..heads {
            let qh = q.i((bi, h)).unwrap(); // (1, d)
            let (kg, vg) = (k.i((bi, h / rep)).unwrap(), v.i((bi, h / rep)).unwrap());
            let s = qh.matmul(&kg.t().unwrap()).unwrap();
            let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
            rows.push(p.matmul(&vg).unwrap());
        }
    }
    Tensor::stack(&rows, 0).unwrap().reshape(q.dims()).unwrap()
}

#[test]
fn matches_a_per_head_loop_with_grouped_heads_and_cache_views() {
    for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
        for (b, heads, kv_heads, keys, d) in [
            (1, 1, 1, 1, 2),
            (2, 4, 2, 7, 8),
            (1, 9, 3, 300, 64),
            (3, 6, 6, 5, 16),
        ] {
            let q = randn(&[b, heads, 1, d], 0.0, 0.5, dtype).unwrap();
            // K and V as the used part of buffers with room for more keys (strided heads).
            let kbuf = randn(&[b, kv_heads, keys + 5, d], 0.0, 1.0, dtype).unwrap();
            let vbuf = randn(&[b, kv_heads, keys + 5, d], 0.0, 1.0, dtype).unwrap();
            let (k, v) = (
                kbuf.narrow(2, 0, keys).unwrap(),
                vbuf.narrow(2, 0, keys).unwrap(),
            );
            let y = ops::single_query_attention(&q, &k, &v).unwrap();
            assert_eq!(y.dims(), &[b, heads, 1, d]);
            assert_eq!(y.dtype(), dtype);
            let e = rel_err(&y, &per_head(&q, &k, &v)).unwrap();
            assert!(
                e <= 2.0 * tol(dtype),
                "{dtype:?} b {b} heads {heads}/{kv_heads} keys {keys} d {d}: rel err {e:e}"
            );
        }
    }
}

#[test]
fn bad_shapes_are_named() {
    let t = |dims: &[usize]| randn(dims, 0.0, 1.0, DType::F32).unwrap();
    let err = |r: metal_candle::Result<Tensor>| r.unwrap_err().to_string();
    let e = err(ops::single_query_attention(
        &t(&[1, 4, 2, 8]),
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 5, 8]),
    ));
    assert!(e.contains("one query per head"), "{e}");
    let e = err(ops::single_query_attention(
        &t(&[1, 4, 1, 8]),
        &t(&[1, 3, 5, 8]),
        &t(&[1, 3, 5, 8]),
    ));
    assert!(
        e.contains("4 query heads") && e.contains("3 key/value heads"),
        "{e}"
    );
    let e = err(ops::single_query_attention(
        &t(&[1, 4, 1, 8]),
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 6, 8]),
    ));
    assert!(e.contains("[1, 2, 6, 8]"), "{e}");
    let e = err(ops::single_query_attention(
        &t(&[4, 1, 8]),
        &t(&[1, 2, 5, 8]),
        &t(&[1, 2, 5, 8]),
    ));
    assert!(e.contains("[4, 1, 8]"), "{e}");
}

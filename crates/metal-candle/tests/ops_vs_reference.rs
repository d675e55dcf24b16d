//! Every fused op against the plain-candle reference: random inputs of many shapes, every
//! dtype, contiguous and strided views, forward and gradients.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{as_view, forward_backward, randn, rel_err, tol, OpFn, View};
use metal_candle::ops::{self, reference};

const DTYPES: [DType; 4] = [DType::F64, DType::F32, DType::BF16, DType::F16];
const HIDDEN: [usize; 5] = [1, 3, 17, 1000, 4099];
/// Leading dims: one row, a few, two batch dims, and 45 rows (past the CPU LoRA backward's
/// 32-row chunks, ending in a short chunk whose last group of four has one row).
const LEADING: [&[usize]; 4] = [&[1], &[7], &[2, 3], &[5, 9]];
const VIEWS: [View; 3] = [View::Contiguous, View::Transposed, View::Narrowed];

/// Compares fused and reference on `inputs` (x is input 0 and gets `view`): the output and
/// the gradient of every input, each against the truth (the reference evaluated in f64 on the
/// same values). The fused result must be within the dtype's tolerance of the truth, or within
/// 10x of the reference's own error where the maths cancels so badly that the reference in the
/// same dtype comes near that tolerance too (the gradient of a 1-wide norm is `eps/(x²+eps)`
/// times its input, computed as a difference of near-equal terms).
fn compare(
    name: &str,
    fused: OpFn,
    refr: OpFn,
    inputs: &[Tensor],
    view: View,
    grad_tol_factor: f64,
) {
    let dtype = inputs[0].dtype();
    let ctx = format!("{name} {dtype:?} x{:?} {view:?}", inputs[0].dims());
    let mut viewed = inputs.to_vec();
    viewed[0] = as_view(&inputs[0], view).unwrap();
    let inputs64: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F64).unwrap())
        .collect();
    let out_dims = refr(inputs).unwrap().dims().to_vec();
    let upstream = randn(&out_dims, 0.0, 1.0, DType::F64).unwrap();
    let (y_f, g_f) =
        forward_backward(fused, &viewed, &upstream).unwrap_or_else(|e| panic!("{ctx}: fused: {e}"));
    let (y_r, g_r) = forward_backward(refr, inputs, &upstream)
        .unwrap_or_else(|e| panic!("{ctx}: reference: {e}"));
    let (y_t, g_t) = forward_backward(refr, &inputs64, &upstream)
        .unwrap_or_else(|e| panic!("{ctx}: truth: {e}"));
    assert_eq!(y_f.dtype(), dtype, "{ctx}: output dtype");
    let check = |what: String, f: &Tensor, r: &Tensor, t: &Tensor, tolerance: f64| {
        let (ef, er) = (rel_err(f, t).unwrap(), rel_err(r, t).unwrap());
        // Where the reference's own error approaches the tolerance the case is ill-conditioned
        // in this dtype (e.g. the weight gradient of a 1-wide norm sums terms of ±|g| that can
        // cancel to near zero, so any rounding is a large relative error): the fused result
        // must then be within 10x of the reference's error, never a fixed bound it could miss
        // by the same chance cancellation.
        let bound = tolerance.max(10.0 * er);
        assert!(
            ef <= bound,
            "{ctx}: {what}: fused rel err {ef:e} vs truth; tolerance {tolerance:e}, reference's own error {er:e}"
        );
    };
    check("forward".into(), &y_f, &y_r, &y_t, tol(dtype));
    // The x-gradient of a norm over a 1-wide row is eps/(x²+eps) times its input: a difference
    // of near-equal terms that no f32/bf16 implementation (the reference included) gets to
    // tolerance, so it is checked in f64 only (here and by finite differences).
    let one_wide_norm =
        name.ends_with("norm") && inputs[0].dims().last() == Some(&1) && dtype != DType::F64;
    for (i, ((gf, gr), gt)) in g_f.iter().zip(&g_r).zip(&g_t).enumerate() {
        if one_wide_norm && i == 0 {
            continue;
        }
        check(
            format!("gradient of input {i}"),
            gf,
            gr,
            gt,
            tol(dtype) * grad_tol_factor,
        );
    }
}

fn shape(lead: &[usize], last: usize) -> Vec<usize> {
    let mut s = lead.to_vec();
    s.push(last);
    s
}

#[test]
fn softmax_matches_reference() {
    let fused = |t: &[Tensor]| ops::softmax_last_dim(&t[0]);
    let refr = |t: &[Tensor]| Ok(reference::softmax_last_dim(&t[0])?);
    for dtype in DTYPES {
        for n in HIDDEN {
            for lead in LEADING {
                for view in VIEWS {
                    let x = randn(&shape(lead, n), 0.0, 3.0, dtype).unwrap();
                    compare("softmax", &fused, &refr, &[x], view, 2.0);
                }
            }
        }
    }
}

#[test]
fn cross_entropy_matches_reference() {
    for dtype in DTYPES {
        for n in HIDDEN {
            for lead in LEADING {
                for view in VIEWS {
                    // Targets over the whole range, the last class included.
                    let x = randn(&shape(lead, n), 0.0, 4.0, dtype).unwrap();
                    let rows: usize = lead.iter().product();
                    let t: Vec<u32> = (0..rows)
                        .map(|r| ((r * 7919 + 13 + n - 1) % n) as u32)
                        .collect();
                    let targets = Tensor::from_vec(t, lead, &Device::Cpu).unwrap();
                    // In the logits' dtype, so that the output-dtype bookkeeping of `compare`
                    // applies (the op returns f32 for half-precision logits).
                    let fused = |t: &[Tensor]| {
                        Ok(ops::cross_entropy(&t[0], &targets)?.to_dtype(t[0].dtype())?)
                    };
                    let refr = |t: &[Tensor]| {
                        Ok(reference::cross_entropy(&t[0], &targets)?.to_dtype(t[0].dtype())?)
                    };
                    compare("cross_entropy", &fused, &refr, &[x], view, 2.0);
                }
            }
        }
    }
}

#[test]
fn rms_norm_matches_reference() {
    let fused = |t: &[Tensor]| ops::rms_norm(&t[0], &t[1], 1e-5);
    let refr = |t: &[Tensor]| Ok(reference::rms_norm(&t[0], &t[1], 1e-5)?);
    for dtype in DTYPES {
        for n in HIDDEN {
            for lead in LEADING {
                for view in VIEWS {
                    let x = randn(&shape(lead, n), 0.5, 2.0, dtype).unwrap();
                    let w = randn(&[n], 1.0, 0.5, dtype).unwrap();
                    compare("rms_norm", &fused, &refr, &[x, w], view, 2.0);
                }
            }
        }
    }
}

#[test]
fn layer_norm_matches_reference() {
    let fused = |t: &[Tensor]| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5);
    let refr = |t: &[Tensor]| Ok(reference::layer_norm(&t[0], &t[1], &t[2], 1e-5)?);
    for dtype in DTYPES {
        for n in HIDDEN {
            for lead in LEADING {
                for view in VIEWS {
                    // A large mean checks that the variance is computed stably.
                    let x = randn(&shape(lead, n), 3.0, 2.0, dtype).unwrap();
                    let w = randn(&[n], 1.0, 0.5, dtype).unwrap();
                    let b = randn(&[n], 0.0, 0.5, dtype).unwrap();
                    compare("layer_norm", &fused, &refr, &[x, w, b], view, 4.0);
                }
            }
        }
    }
}

/// (in, out, rank) triples: degenerate, odd, wide and tall.
const LORA_SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    // One full 32-column block plus one column, and a rank of 7 (a pass of four ranks, then
    // three single ones) for the CPU kernels' blocked loops.
    (33, 40, 7),
    (3, 17, 2),
    (17, 3, 4),
    (1000, 64, 8),
    (64, 4099, 16),
    (4099, 17, 3),
];

#[test]
fn lora_delta_matches_reference() {
    let fused = |t: &[Tensor]| ops::lora_delta(&t[0], &t[1], &t[2], 1.7);
    let refr = |t: &[Tensor]| Ok(reference::lora_delta(&t[0], &t[1], &t[2], 1.7)?);
    for dtype in DTYPES {
        for (k, n, r) in LORA_SHAPES {
            for lead in LEADING {
                for view in VIEWS {
                    let x = randn(&shape(lead, k), 0.0, 1.0, dtype).unwrap();
                    let a = randn(&[k, r], 0.0, 1.0 / (k as f64).sqrt(), dtype).unwrap();
                    let b = randn(&[r, n], 0.0, 0.5, dtype).unwrap();
                    compare("lora_delta", &fused, &refr, &[x, a, b], view, 2.0);
                }
            }
        }
    }
}

/// The factors as strided views (transposed storage, narrowed rows), every combination: the CPU
/// kernels pack A and B straight from their strides, so each layout must give the same
/// output and gradients as contiguous factors.
#[test]
fn lora_delta_accepts_strided_factors() {
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        for (k, n, r) in [(33, 70, 5), (64, 17, 16)] {
            for a_view in VIEWS {
                for b_view in VIEWS {
                    let fused = move |t: &[Tensor]| {
                        let a = as_view(&t[1], a_view)?;
                        let b = as_view(&t[2], b_view)?;
                        ops::lora_delta(&t[0], &a, &b, 0.9)
                    };
                    let refr = |t: &[Tensor]| Ok(reference::lora_delta(&t[0], &t[1], &t[2], 0.9)?);
                    let x = randn(&[3, 6, k], 0.0, 1.0, dtype).unwrap();
                    let a = randn(&[k, r], 0.0, 1.0 / (k as f64).sqrt(), dtype).unwrap();
                    let b = randn(&[r, n], 0.0, 0.5, dtype).unwrap();
                    let name = format!("lora_delta A {a_view:?} B {b_view:?}");
                    compare(&name, &fused, &refr, &[x, a, b], View::Contiguous, 2.0);
                }
            }
        }
    }
}

#[test]
fn lora_linear_matches_reference_with_and_without_bias() {
    for with_bias in [false, true] {
        for dtype in DTYPES {
            for (k, n, r) in LORA_SHAPES {
                for lead in LEADING {
                    for view in [View::Contiguous, View::Transposed] {
                        let x = randn(&shape(lead, k), 0.0, 1.0, dtype).unwrap();
                        let a = randn(&[k, r], 0.0, 1.0 / (k as f64).sqrt(), dtype).unwrap();
                        let b = randn(&[r, n], 0.0, 0.5, dtype).unwrap();
                        // The base layer is frozen: W and bias are captured, not inputs.
                        let w = randn(&[n, k], 0.0, 1.0 / (k as f64).sqrt(), dtype).unwrap();
                        let bias = with_bias.then(|| randn(&[n], 0.0, 1.0, dtype).unwrap());
                        // Cast to the inputs' dtype so that the f64 truth uses the same values.
                        let base = |t: &[Tensor]| {
                            let d = t[0].dtype();
                            (
                                w.to_dtype(d).unwrap(),
                                bias.as_ref().map(|b| b.to_dtype(d).unwrap()),
                            )
                        };
                        let fused = |t: &[Tensor]| {
                            let (w, bias) = base(t);
                            ops::lora_linear(&t[0], &w, bias.as_ref(), &t[1], &t[2], 0.9)
                        };
                        let refr = |t: &[Tensor]| {
                            let (w, bias) = base(t);
                            Ok(reference::lora_linear(
                                &t[0],
                                &w,
                                bias.as_ref(),
                                &t[1],
                                &t[2],
                                0.9,
                            )?)
                        };
                        compare("lora_linear", &fused, &refr, &[x, a, b], view, 2.0);
                    }
                }
            }
        }
    }
}

#[test]
fn lora_linear_with_trainable_base_gives_gradients_to_w_and_bias() {
    for dtype in [DType::F64, DType::F32] {
        let (k, n, r) = (33, 20, 4);
        let x = randn(&[2, 5, k], 0.0, 1.0, dtype).unwrap();
        let a = randn(&[k, r], 0.0, 0.2, dtype).unwrap();
        let b = randn(&[r, n], 0.0, 0.2, dtype).unwrap();
        let w = randn(&[n, k], 0.0, 0.2, dtype).unwrap();
        let bias = randn(&[n], 0.0, 1.0, dtype).unwrap();
        let fused = |t: &[Tensor]| ops::lora_linear(&t[0], &t[3], Some(&t[4]), &t[1], &t[2], 2.0);
        let refr = |t: &[Tensor]| {
            Ok(reference::lora_linear(
                &t[0],
                &t[3],
                Some(&t[4]),
                &t[1],
                &t[2],
                2.0,
            )?)
        };
        compare(
            "lora_linear(trainable W)",
            &fused,
            &refr,
            &[x, a, b, w, bias],
            View::Contiguous,
            2.0,
        );
    }
}

#[test]
fn fused_half_precision_is_closer_to_f64_truth_than_a_tolerance_allows() {
    // Guards against a kernel that accumulates in the storage type: the fused bf16/f16
    // results must be within rounding of the exact (f64) answer on a wide row.
    let n = 4099;
    let x64 = randn(&[4, n], 0.0, 1.0, DType::F64).unwrap();
    let w64 = randn(&[n], 1.0, 0.1, DType::F64).unwrap();
    let truth = reference::rms_norm(&x64, &w64, 1e-5).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let y = ops::rms_norm(
            &x64.to_dtype(dtype).unwrap(),
            &w64.to_dtype(dtype).unwrap(),
            1e-5,
        )
        .unwrap();
        let e = rel_err(&y, &truth).unwrap();
        assert!(e < tol(dtype) / 2.0, "{dtype:?}: {e:e}");
    }
}

/// cos and sin of random angles, (batch, seq, half), in `dtype`.
fn rope_tables(batch: usize, seq: usize, half: usize, dtype: DType) -> (Tensor, Tensor) {
    let angles = randn(&[batch, seq, half], 0.0, 3.0, DType::F64).unwrap();
    (
        angles.cos().unwrap().to_dtype(dtype).unwrap(),
        angles.sin().unwrap().to_dtype(dtype).unwrap(),
    )
}

#[test]
fn rope_matches_reference() {
    for dtype in DTYPES {
        for d in [2, 8, 64, 130] {
            for (seq, heads) in [(1, 1), (17, 3), (1, 3), (17, 1)] {
                for (batch, tables_batch) in [(1, 1), (2, 2), (2, 1)] {
                    let (cos, sin) = rope_tables(tables_batch, seq, d / 2, dtype);
                    // The tables are constants, cast to the inputs' dtype so that the f64 truth
                    // uses the same values.
                    let tables = |t: &[Tensor]| {
                        let dt = t[0].dtype();
                        (cos.to_dtype(dt).unwrap(), sin.to_dtype(dt).unwrap())
                    };
                    let fused = |t: &[Tensor]| {
                        let (c, s) = tables(t);
                        ops::rope(&t[0], &c, &s)
                    };
                    let refr = |t: &[Tensor]| {
                        let (c, s) = tables(t);
                        Ok(reference::rope(&t[0], &c, &s)?)
                    };
                    let x = randn(&[batch, heads, seq, d], 0.0, 1.0, dtype).unwrap();
                    for view in VIEWS {
                        compare("rope", &fused, &refr, std::slice::from_ref(&x), view, 2.0);
                    }
                    // As attention feeds it: the (batch, seq, heads, head_dim) projection viewed
                    // with heads first, a transpose of the middle dims.
                    let fused_heads = |t: &[Tensor]| fused(&[t[0].transpose(1, 2)?]);
                    let refr_heads = |t: &[Tensor]| refr(&[t[0].transpose(1, 2)?]);
                    let x = randn(&[batch, seq, heads, d], 0.0, 1.0, dtype).unwrap();
                    compare(
                        "rope(heads transposed)",
                        &fused_heads,
                        &refr_heads,
                        &[x],
                        View::Contiguous,
                        2.0,
                    );
                }
            }
        }
    }
}

#[test]
fn swiglu_matches_reference() {
    let fused = |t: &[Tensor]| ops::swiglu(&t[0], &t[1]);
    let refr = |t: &[Tensor]| Ok(reference::swiglu(&t[0], &t[1])?);
    for dtype in DTYPES {
        for n in HIDDEN {
            for lead in LEADING {
                for view in VIEWS {
                    // Gates over both signs, far into silu's flat left tail and its linear right.
                    let gate = randn(&shape(lead, n), 0.0, 4.0, dtype).unwrap();
                    let up = randn(&shape(lead, n), 0.0, 1.0, dtype).unwrap();
                    compare("swiglu", &fused, &refr, &[gate, up], view, 2.0);
                }
            }
        }
    }
}

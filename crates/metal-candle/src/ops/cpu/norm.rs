//! RMSNorm and LayerNorm rows, forward and backward.
//!
//! Forward normalises each row in one pass over it (the row stays in cache between the
//! statistics and the output). Backward recomputes the row statistics from `x` instead of
//! saving them, so it reads `x` and `dy` once and writes `dx`; the weight (and bias) gradients
//! are summed per task in accumulation precision and combined at the end, so threads never
//! contend.

use rayon::prelude::*;

use super::simd::{self, Acc};
use super::{map_rows, row_blocks, Elem};

/// `y = x / sqrt(mean(x²) + eps) ⊙ w`
pub(crate) fn rms_forward<T: Elem>(x: &[T], w: &[T], n: usize, eps: f64) -> Vec<T> {
    let w = to_acc(w);
    let eps = T::A::from_f64(eps);
    map_rows(x, n, |xin, out, buf| {
        T::load(xin, buf);
        let rstd = T::A::ONE / (simd::dot(buf, buf) / T::A::from_usize(n) + eps).sqrt();
        for (v, &wv) in buf.iter_mut().zip(&w) {
            *v = *v * rstd * wv;
        }
        T::store(buf, out);
    })
}

/// Returns `(dx, dw)` for [`rms_forward`].
pub(crate) fn rms_backward<T: Elem>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>) {
    let w = to_acc(w);
    let eps = T::A::from_f64(eps);
    let nf = T::A::from_usize(n);
    backward_rows(x, dy, n, 1, |xb, gb, dw| {
        let rstd = T::A::ONE / (simd::dot(xb, xb) / nf + eps).sqrt();
        // dw += dy ⊙ x̂ ; with g = dy ⊙ w: dx = rstd·(g − x̂·mean(g ⊙ x̂))
        let mut gx = T::A::ZERO;
        for ((&x, g), (&wv, dwv)) in xb.iter().zip(gb.iter_mut()).zip(w.iter().zip(&mut dw[..n])) {
            let xhat = x * rstd;
            *dwv += *g * xhat;
            *g *= wv;
            gx += *g * xhat;
        }
        let c = gx / nf;
        for (g, &x) in gb.iter_mut().zip(xb.iter()) {
            *g = rstd * (*g - x * rstd * c);
        }
    })
}

/// `y = (x − mean) / sqrt(var + eps) ⊙ w + b`
pub(crate) fn layer_forward<T: Elem>(x: &[T], w: &[T], b: &[T], n: usize, eps: f64) -> Vec<T> {
    let w = to_acc(w);
    let b = to_acc(b);
    let eps = T::A::from_f64(eps);
    let nf = T::A::from_usize(n);
    map_rows(x, n, |xin, out, buf| {
        T::load(xin, buf);
        let (mean, rstd) = mean_rstd(buf, nf, eps);
        for ((v, &wv), &bv) in buf.iter_mut().zip(&w).zip(&b) {
            *v = (*v - mean) * rstd * wv + bv;
        }
        T::store(buf, out);
    })
}

/// Returns `(dx, dw, db)` for [`layer_forward`].
pub(crate) fn layer_backward<T: Elem>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let w = to_acc(w);
    let eps = T::A::from_f64(eps);
    let nf = T::A::from_usize(n);
    let (dx, dwb) = backward_rows(x, dy, n, 2, |xb, gb, dwb| {
        let (mean, rstd) = mean_rstd(xb, nf, eps);
        let (dw, db) = dwb.split_at_mut(n);
        // x̂ = (x − mean)·rstd ; g = dy ⊙ w ; dx = rstd·(g − mean(g) − x̂·mean(g ⊙ x̂))
        let (mut gsum, mut gxsum) = (T::A::ZERO, T::A::ZERO);
        for (((x, g), &wv), (dwv, dbv)) in xb
            .iter_mut()
            .zip(gb.iter_mut())
            .zip(w.iter())
            .zip(dw.iter_mut().zip(db.iter_mut()))
        {
            *x = (*x - mean) * rstd;
            *dwv += *g * *x;
            *dbv += *g;
            *g *= wv;
            gsum += *g;
            gxsum += *g * *x;
        }
        let (mg, mgx) = (gsum / nf, gxsum / nf);
        for (g, &xhat) in gb.iter_mut().zip(xb.iter()) {
            *g = rstd * (*g - mg - xhat * mgx);
        }
    });
    let db = dwb[n..].to_vec();
    let mut dw = dwb;
    dw.truncate(n);
    (dx, dw, db)
}

fn mean_rstd<A: Acc>(row: &[A], nf: A, eps: A) -> (A, A) {
    let mean = simd::sum(row) / nf;
    // Two passes over a cached row: exact even when |mean| ≫ std.
    let mut lanes = [A::ZERO; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            let d = c[l] - mean;
            lanes[l] += d * d;
        }
    }
    let mut var = A::ZERO;
    for &v in tail {
        var += (v - mean) * (v - mean);
    }
    let var = lanes.iter().fold(var, |a, &v| a + v) / nf;
    (mean, A::ONE / (var + eps).sqrt())
}

fn to_acc<T: Elem>(v: &[T]) -> Vec<T::A> {
    let mut out = vec![T::A::ZERO; v.len()];
    T::load(v, &mut out);
    out
}

/// Shared driver of the norm backward passes: for each row, loads `x` and `dy` into scratch,
/// calls `row(x, dy→dx, param_grads)` which turns the second buffer into `dx` and adds into
/// `param_grads` (`n_params·n` accumulators private to the task), then stores `dx`. Returns
/// `dx` and the summed parameter gradients rounded to `T`.
fn backward_rows<T: Elem>(
    x: &[T],
    dy: &[T],
    n: usize,
    n_params: usize,
    row: impl Fn(&mut [T::A], &mut [T::A], &mut [T::A]) + Sync,
) -> (Vec<T>, Vec<T>) {
    let rows = x.len().checked_div(n).unwrap_or(0);
    let mut dx = vec![T::from_acc(T::A::ZERO); x.len()];
    let blocks = row_blocks(rows, n);
    let mut dx_blocks: Vec<&mut [T]> = Vec::with_capacity(blocks.len());
    let mut rest = dx.as_mut_slice();
    for b in &blocks {
        let (head, tail) = rest.split_at_mut(b.len() * n);
        dx_blocks.push(head);
        rest = tail;
    }
    let partials: Vec<Vec<T::A>> = blocks
        .into_par_iter()
        .zip(dx_blocks)
        .map(|(range, dx_block)| {
            let mut grads = vec![T::A::ZERO; n_params * n];
            let (mut xb, mut gb) = (vec![T::A::ZERO; n], vec![T::A::ZERO; n]);
            for (i, r) in range.enumerate() {
                T::load(&x[r * n..(r + 1) * n], &mut xb);
                T::load(&dy[r * n..(r + 1) * n], &mut gb);
                row(&mut xb, &mut gb, &mut grads);
                T::store(&gb, &mut dx_block[i * n..(i + 1) * n]);
            }
            grads
        })
        .collect();
    let mut total = vec![T::A::ZERO; n_params * n];
    for p in &partials {
        for (t, &v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    let mut grads = vec![T::from_acc(T::A::ZERO); n_params * n];
    T::store(&total, &mut grads);
    (dx, grads)
}

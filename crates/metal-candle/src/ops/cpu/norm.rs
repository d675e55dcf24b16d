//! RMSNorm and LayerNorm rows, forward and backward.
//!
//! Forward normalises each row in one pass over memory (the row stays in cache between the
//! statistics and the output). Backward recomputes the row statistics from `x` instead of
//! saving them, so it reads `x` and `dy` once and writes `dx`; the weight (and bias) gradients
//! are summed per task in accumulation precision and combined at the end, so threads never
//! contend.

use super::simd::{self, Acc};
use super::{build_rows, map_rows, row_in_acc, Elem};

/// `y = x / sqrt(mean(x²) + eps) ⊙ w`
pub(crate) fn rms_forward<T: Elem>(x: &[T], w: &[T], n: usize, eps: f64) -> Vec<T> {
    let w = to_acc(w);
    let eps = T::A::from_f64(eps);
    let nf = T::A::from_usize(n);
    map_rows(
        x,
        n,
        #[inline(always)]
        |x, y, _fma| {
            let rstd = T::A::ONE / (simd::dot(x, x) / nf + eps).sqrt();
            for ((y, &xv), &wv) in y.iter_mut().zip(x).zip(&w) {
                *y = xv * rstd * wv;
            }
        },
    )
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
    backward_rows(
        x,
        dy,
        n,
        1,
        #[inline(always)]
        |x, dy, dx, dw| {
            let rstd = T::A::ONE / (simd::dot(x, x) / nf + eps).sqrt();
            // x̂ = x·rstd ; dw += dy ⊙ x̂ ; with g = dy ⊙ w: dx = rstd·(g − x̂·mean(g ⊙ x̂))
            for (((&xv, &g), (&wv, dwv)), d) in x.iter().zip(dy).zip(w.iter().zip(dw)).zip(&mut *dx)
            {
                *dwv += g * (xv * rstd);
                *d = g * wv;
            }
            let c = simd::dot(dx, x) * rstd / nf;
            for (d, &xv) in dx.iter_mut().zip(x) {
                *d = rstd * (*d - xv * rstd * c);
            }
        },
    )
}

/// `y = (x − mean) / sqrt(var + eps) ⊙ w + b`
pub(crate) fn layer_forward<T: Elem>(x: &[T], w: &[T], b: &[T], n: usize, eps: f64) -> Vec<T> {
    let w = to_acc(w);
    let b = to_acc(b);
    let eps = T::A::from_f64(eps);
    let nf = T::A::from_usize(n);
    map_rows(
        x,
        n,
        #[inline(always)]
        |x, y, _fma| {
            let (mean, rstd) = mean_rstd(x, nf, eps);
            for ((y, &xv), (&wv, &bv)) in y.iter_mut().zip(x).zip(w.iter().zip(&b)) {
                *y = (xv - mean) * rstd * wv + bv;
            }
        },
    )
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
    let (dx, dwb) = backward_rows(
        x,
        dy,
        n,
        2,
        #[inline(always)]
        |x, dy, dx, dwb| {
            let (mean, rstd) = mean_rstd(x, nf, eps);
            let (dw, db) = dwb.split_at_mut(n);
            // x̂ = (x − mean)·rstd ; g = dy ⊙ w ; dx = rstd·(g − mean(g) − x̂·mean(g ⊙ x̂))
            for (((&xv, &g), &wv), ((dwv, dbv), d)) in x
                .iter()
                .zip(dy)
                .zip(w.iter())
                .zip(dw.iter_mut().zip(db.iter_mut()).zip(dx.iter_mut()))
            {
                *dwv += g * ((xv - mean) * rstd);
                *dbv += g;
                *d = g * wv;
            }
            let mg = simd::sum(dx) / nf;
            let mgx = simd::dot_shifted(dx, x, mean) * rstd / nf;
            for (d, &xv) in dx.iter_mut().zip(x) {
                *d = rstd * (*d - mg - (xv - mean) * rstd * mgx);
            }
        },
    );
    let db = dwb[n..].to_vec();
    let mut dw = dwb;
    dw.truncate(n);
    (dx, dw, db)
}

#[inline(always)]
fn mean_rstd<A: Acc>(row: &[A], nf: A, eps: A) -> (A, A) {
    let mean = simd::sum(row) / nf;
    // Two passes over a cached row: exact even when |mean| ≫ std.
    let var = simd::dot_shifted_sq(row, mean) / nf;
    (mean, A::ONE / (var + eps).sqrt())
}

fn to_acc<T: Elem>(v: &[T]) -> Vec<T::A> {
    let mut out = vec![T::A::ZERO; v.len()];
    T::load(v, &mut out);
    out
}

/// Shared driver of the norm backward passes: for each row, calls
/// `row(x, dy, dx, param_grads)` with `x` and `dy` in accumulation precision; it fills `dx`
/// and adds into `param_grads` (`n_params·n` accumulators private to the task). Returns `dx`
/// and the summed parameter gradients rounded to `T`.
fn backward_rows<T: Elem>(
    x: &[T],
    dy: &[T],
    n: usize,
    n_params: usize,
    row: impl Fn(&[T::A], &[T::A], &mut [T::A], &mut [T::A]) + Sync,
) -> (Vec<T>, Vec<T>) {
    let rows = x.len().checked_div(n).unwrap_or(0);
    let (dx, partials) = build_rows::<T, _>(
        rows,
        n,
        || {
            (
                vec![T::A::ZERO; n_params * n],
                vec![T::A::ZERO; n],
                vec![T::A::ZERO; n],
            )
        },
        #[inline(always)]
        |(grads, xbuf, gbuf), r, dx, _fma| {
            let xr = row_in_acc(&x[r * n..(r + 1) * n], xbuf);
            let gr = row_in_acc(&dy[r * n..(r + 1) * n], gbuf);
            row(xr, gr, dx, grads);
        },
    );
    let mut total = vec![T::A::ZERO; n_params * n];
    for (p, _, _) in &partials {
        simd::axpy(T::A::ONE, p, &mut total);
    }
    let mut grads = vec![T::from_acc(T::A::ZERO); n_params * n];
    T::store(&total, &mut grads);
    (dx, grads)
}

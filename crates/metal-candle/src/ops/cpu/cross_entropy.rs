//! Cross-entropy of each row of logits against a target index: forward
//! `loss = logsumexp(x) − x[t]`, backward `dx = g·(softmax(x) − onehot(t))`. One read of the
//! logits per pass; nothing of the (rows × vocab) size is kept between the two.

use rayon::prelude::*;

use super::simd::{self, Acc};
use super::softmax::softmax_row;
use super::{build_rows, row_in_acc, rows_per_task, with_widest_simd, Elem};

/// The loss of every row of the row-major (rows × n) `x` against `targets` (one per row, each
/// `< n`: the caller checks).
pub(crate) fn forward<T: Elem>(x: &[T], targets: &[u32], n: usize) -> Vec<T::A> {
    if n == 0 {
        return Vec::new();
    }
    let per_task = rows_per_task(n);
    let mut loss = vec![T::A::ZERO; targets.len()];
    loss.par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task * n))
        .zip(targets.par_chunks(per_task))
        .for_each(|((loss, x), targets)| {
            let (mut xbuf, mut ebuf) = (vec![T::A::ZERO; n], vec![T::A::ZERO; n]);
            with_widest_simd(
                #[inline(always)]
                |fma| {
                    for ((l, row), &t) in loss.iter_mut().zip(x.chunks_exact(n)).zip(targets) {
                        let row = row_in_acc(row, &mut xbuf);
                        let m = simd::max(row);
                        if fma {
                            simd::exp_shifted_sum::<T::A, true>(row, m, &mut ebuf, &[], 0);
                        } else {
                            simd::exp_shifted_sum::<T::A, false>(row, m, &mut ebuf, &[], 0);
                        }
                        *l = m - row[t as usize] + ln_sum_shifted(row, m, &ebuf);
                    }
                },
            )
        });
    loss
}

/// `ln Σ e^(x − m)` from the exponentials `e` of the row `x` with maximum `m`, as `ln_1p` of
/// the sum without one maximal term: on a peaked row the full sum is `1 + ε` and its logarithm
/// would keep only the digits of `ε` that survive the rounding of `1 + ε`.
fn ln_sum_shifted<A: Acc>(x: &[A], m: A, e: &[A]) -> A {
    let (mut rest, mut maxima) = (A::ZERO, A::ZERO);
    for (&xv, &ev) in x.iter().zip(e) {
        if xv < m {
            rest += ev;
        } else {
            maxima += A::ONE;
        }
    }
    (rest + (maxima - A::ONE)).ln_1p()
}

/// The logits' gradient given `g`, the upstream gradient of each row's loss.
pub(crate) fn backward<T: Elem>(x: &[T], targets: &[u32], g: &[T::A], n: usize) -> Vec<T> {
    let (dx, _) = build_rows::<T, _>(
        targets.len(),
        n,
        || vec![T::A::ZERO; n],
        #[inline(always)]
        |xbuf, r, dx, fma| {
            softmax_row(row_in_acc(&x[r * n..(r + 1) * n], xbuf), dx, fma, &[]);
            // At the target, p_t − 1 = −Σ_{j≠t} p_j: summing the other probabilities avoids
            // the cancellation of p_t − 1 when the row is peaked on its target (p_t near 1).
            let t = targets[r] as usize;
            dx[t] = T::A::ZERO;
            let rest = simd::sum(dx);
            for v in dx.iter_mut() {
                *v *= g[r];
            }
            dx[t] = -(rest * g[r]);
        },
    );
    dx
}

//! Softmax over the last dimension: forward `y = e^(x−max) / Σ e^(x−max)`, backward
//! `dx = y ⊙ (dy − Σ dy ⊙ y)`. One read of each input and one write of the output per row.

use super::simd::{self, Acc};
use super::{build_rows, row_in_acc, Elem};

pub(crate) fn forward<T: Elem>(x: &[T], n: usize) -> Vec<T> {
    let rows = x.len().checked_div(n).unwrap_or(0);
    let (y, _) = build_rows::<T, _>(
        rows,
        n,
        || vec![T::A::ZERO; n],
        #[inline(always)]
        |xbuf, r, y, fma| {
            let row = row_in_acc(&x[r * n..(r + 1) * n], xbuf);
            softmax_row(row, y, fma, next_row_bytes(x, r, n));
        },
    );
    y
}

/// The bytes of row `r + 1` of `x` (empty after the last row), for prefetching.
fn next_row_bytes<T: Elem>(x: &[T], r: usize, n: usize) -> &[u8] {
    let next = x.get((r + 1) * n..(r + 2) * n).unwrap_or(&[]);
    // SAFETY: any initialised float slice is valid as bytes of the same total size.
    unsafe { std::slice::from_raw_parts(next.as_ptr().cast::<u8>(), std::mem::size_of_val(next)) }
}

/// `dx` for [`forward`] given the forward *input* `x` and the upstream gradient `dy`.
///
/// The probabilities are recomputed from `x` in accumulation precision rather than read back
/// from the stored output: the same bytes move (x instead of y), and for bf16/f16 it avoids
/// the cancellation in `dy − Σ dy ⊙ y` that a rounded `y` causes on peaked rows.
pub(crate) fn backward<T: Elem>(x: &[T], dy: &[T], n: usize) -> Vec<T> {
    let rows = x.len().checked_div(n).unwrap_or(0);
    let (dx, _) = build_rows::<T, _>(
        rows,
        n,
        || (vec![T::A::ZERO; n], vec![T::A::ZERO; n]),
        #[inline(always)]
        |(xbuf, gbuf), r, dx, fma| {
            // dx holds y until the last loop turns it into the gradient.
            softmax_row(row_in_acc(&x[r * n..(r + 1) * n], xbuf), dx, fma, &[]);
            let g = row_in_acc(&dy[r * n..(r + 1) * n], gbuf);
            let s = simd::dot(dx, g);
            for (d, &gv) in dx.iter_mut().zip(g) {
                *d *= gv - s;
            }
        },
    );
    dx
}

/// `y = softmax(x)` for one row, prefetching `next` (the next row's bytes, or empty) on the way.
#[inline(always)]
pub(crate) fn softmax_row<A: Acc>(x: &[A], y: &mut [A], fma: bool, next: &[u8]) {
    let m = simd::max(x);
    // The next row's bytes per 16 elements of this one.
    let stride = 16 * next.len() / x.len().max(1);
    let sum = if fma {
        simd::exp_shifted_sum::<A, true>(x, m, y, next, stride)
    } else {
        simd::exp_shifted_sum::<A, false>(x, m, y, next, stride)
    };
    let inv = A::ONE / sum;
    for v in y.iter_mut() {
        *v *= inv;
    }
}

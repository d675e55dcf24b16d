//! Softmax over the last dimension: forward `y = e^(x−max) / Σ e^(x−max)`, backward
//! `dx = y ⊙ (dy − Σ dy ⊙ y)`. One read of each input and one write of the output per row.

use super::simd::{self, Acc};
use super::{build_rows, map_rows, row_in_acc, Elem};

// A closure, not the fn item: the fn item is called through a shim that is not inlined into
// the wide-vector dispatch, which left softmax on 4-wide code (measured 3x slower).
#[allow(clippy::redundant_closure)]
pub(crate) fn forward<T: Elem>(x: &[T], n: usize) -> Vec<T> {
    map_rows(
        x,
        n,
        #[inline(always)]
        |x, y, fma| softmax_row(x, y, fma),
    )
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
            softmax_row(row_in_acc(&x[r * n..(r + 1) * n], xbuf), dx, fma);
            let g = row_in_acc(&dy[r * n..(r + 1) * n], gbuf);
            let s = simd::dot(dx, g);
            for (d, &gv) in dx.iter_mut().zip(g) {
                *d *= gv - s;
            }
        },
    );
    dx
}

/// `y = softmax(x)` for one row.
#[inline(always)]
fn softmax_row<A: Acc>(x: &[A], y: &mut [A], fma: bool) {
    let m = simd::max(x);
    let sum = if fma {
        simd::exp_shifted_sum::<A, true>(x, m, y)
    } else {
        simd::exp_shifted_sum::<A, false>(x, m, y)
    };
    let inv = A::ONE / sum;
    for v in y.iter_mut() {
        *v *= inv;
    }
}

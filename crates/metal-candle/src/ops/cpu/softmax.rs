//! Softmax over the last dimension: forward `y = e^(x−max) / Σ e^(x−max)`, backward
//! `dx = y ⊙ (dy − Σ dy ⊙ y)`. One read of each input and one write of the output per row.

use super::simd::{self, Acc};
use rayon::prelude::*;

use super::{map_rows, Elem};

pub(crate) fn forward<T: Elem>(x: &[T], n: usize) -> Vec<T> {
    map_rows(x, n, |xin, out, buf| {
        T::load(xin, buf);
        softmax_in_place(buf);
        T::store(buf, out);
    })
}

/// `dx` for [`forward`] given the forward *input* `x` and the upstream gradient `dy`.
///
/// The probabilities are recomputed from `x` in accumulation precision rather than read back
/// from the stored output: the same bytes move (x instead of y), and for bf16/f16 it avoids
/// the cancellation in `dy − Σ dy ⊙ y` that a rounded `y` causes on peaked rows.
pub(crate) fn backward<T: Elem>(x: &[T], dy: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::from_acc(T::A::ZERO); x.len()];
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(n)
        .enumerate()
        .with_min_len(super::rows_per_task(n))
        .for_each_init(
            || (vec![T::A::ZERO; n], vec![T::A::ZERO; n]),
            |(yb, gb), (r, o)| {
                T::load(&x[r * n..(r + 1) * n], yb);
                softmax_in_place(yb);
                T::load(&dy[r * n..(r + 1) * n], gb);
                let s = simd::dot(yb, gb);
                for (g, &yv) in gb.iter_mut().zip(yb.iter()) {
                    *g = yv * (*g - s);
                }
                T::store(gb, o);
            },
        );
    out
}

fn softmax_in_place<A: Acc>(buf: &mut [A]) {
    let m = simd::max(buf);
    for v in buf.iter_mut() {
        *v = (*v - m).exp();
    }
    let inv = A::ONE / simd::sum(buf);
    for v in buf.iter_mut() {
        *v *= inv;
    }
}

//! Softmax over the last dimension: forward `y = e^(x−max) / Σ e^(x−max)`, backward
//! `dx = y ⊙ (dy − Σ dy ⊙ y)`. One read of each input and one write of the output per row.

use super::simd::{self, Acc};
use super::{map_rows, Elem};

pub(crate) fn forward<T: Elem>(x: &[T], n: usize) -> Vec<T> {
    map_rows(x, n, |xin, out, buf| {
        T::load(xin, buf);
        let m = simd::max(buf);
        for v in buf.iter_mut() {
            *v = (*v - m).exp();
        }
        let inv = T::A::ONE / simd::sum(buf);
        for v in buf.iter_mut() {
            *v *= inv;
        }
        T::store(buf, out);
    })
}

/// `y` is the forward output, `dy` the gradient of the loss with respect to it.
pub(crate) fn backward<T: Elem>(y: &[T], dy: &[T], n: usize) -> Vec<T> {
    // Rows of y and dy are read together; dy's row is loaded into the second half of scratch.
    let rows = if n == 0 { 0 } else { y.len() / n };
    let mut out = vec![T::from_acc(T::A::ZERO); y.len()];
    use rayon::prelude::*;
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(n)
        .enumerate()
        .with_min_len(super::rows_per_task(n))
        .for_each_init(
            || (vec![T::A::ZERO; n], vec![T::A::ZERO; n]),
            |(yb, gb), (r, o)| {
                debug_assert!(r < rows);
                T::load(&y[r * n..(r + 1) * n], yb);
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

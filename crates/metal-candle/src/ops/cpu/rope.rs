//! The rotary embedding, row by row: each row of `head_dim` elements of x is rotated pairwise,
//! element j with element j + head_dim/2, by the angles of its (batch, position) table row.

use super::simd::Acc;
use super::{build_rows, row_in_acc, Elem};

/// The layout of a rope: x is (batch, heads, seq, head_dim) row-major, the tables (batch or 1,
/// seq, head_dim/2).
pub(crate) struct RopeDims {
    pub(crate) heads: usize,
    pub(crate) seq: usize,
    pub(crate) head_dim: usize,
    /// Whether the tables have a row per batch element (else one shared by all).
    pub(crate) tables_batched: bool,
}

impl RopeDims {
    /// The table row of x's row `r`.
    #[inline(always)]
    fn table_row(&self, r: usize) -> usize {
        let pos = r % self.seq;
        match self.tables_batched {
            true => r / (self.heads * self.seq) * self.seq + pos,
            false => pos,
        }
    }
}

/// `y = rope(x, cos, sin)`, or with `inverse` the opposite rotation `rope(x, cos, −sin)`, which
/// is the backward pass.
pub(crate) fn rotate<T: Elem>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: &RopeDims,
    inverse: bool,
) -> Vec<T> {
    let d = dims.head_dim;
    let half = d / 2;
    let rows = x.len().checked_div(d).unwrap_or(0);
    let sign = if inverse { -T::A::ONE } else { T::A::ONE };
    let (y, _) = build_rows::<T, _>(
        rows,
        d,
        || {
            (
                vec![T::A::ZERO; d],
                vec![T::A::ZERO; half],
                vec![T::A::ZERO; half],
            )
        },
        #[inline(always)]
        |(xbuf, cbuf, sbuf), r, y, _fma| {
            let t = dims.table_row(r);
            let x = row_in_acc(&x[r * d..(r + 1) * d], xbuf);
            let c = row_in_acc(&cos[t * half..(t + 1) * half], cbuf);
            let s = row_in_acc(&sin[t * half..(t + 1) * half], sbuf);
            rotate_row(x, c, s, sign, y);
        },
    );
    y
}

/// One row: `(x1, x2) → (x1·c − x2·s', x2·c + x1·s')` with `s' = sign·s`, a loop over the
/// pairs that the compiler vectorises.
#[inline(always)]
fn rotate_row<A: Acc>(x: &[A], c: &[A], s: &[A], sign: A, y: &mut [A]) {
    let half = c.len();
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    for (((y1, y2), (&a, &b)), (&c, &s)) in y1
        .iter_mut()
        .zip(y2.iter_mut())
        .zip(x1.iter().zip(x2))
        .zip(c.iter().zip(s))
    {
        let s = s * sign;
        *y1 = a * c - b * s;
        *y2 = b * c + a * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_and_batched_tables_pick_the_row_of_the_position() {
        let dims = |tables_batched| RopeDims {
            heads: 3,
            seq: 5,
            head_dim: 4,
            tables_batched,
        };
        // Row 17 of (2, 3, 5, ·) is batch 1, head 0, position 2.
        assert_eq!(dims(false).table_row(17), 2);
        assert_eq!(dims(true).table_row(17), 5 + 2);
    }

    #[test]
    fn inverse_undoes_the_rotation() {
        let dims = RopeDims {
            heads: 2,
            seq: 3,
            head_dim: 6,
            tables_batched: false,
        };
        let x: Vec<f64> = (0..36).map(|i| (i as f64 * 0.37).sin()).collect();
        let angles: Vec<f64> = (0..9).map(|i| i as f64 * 0.9).collect();
        let cos: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
        let y = rotate(&x, &cos, &sin, &dims, false);
        let back = rotate(&y, &cos, &sin, &dims, true);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }
}

//! Causal attention `softmax(scale·q·kᵀ + mask)·v` on the CPU, forward and backward, without
//! materialising the (queries × keys) matrices: each query row computes its scores, softmax
//! and weighted sum in a row-sized buffer, and the backward pass recomputes them.
//!
//! Shapes follow [`crate::ops::causal_attention`]: `q` (batch, heads, s, d), `k` and `v`
//! (batch, kv_heads, t, d), contiguous. Query `i` of a row sees keys `lo..=i + t − s`, `lo`
//! from `first_key` (or 0).

use rayon::prelude::*;

use super::simd::{self, Acc};
use super::Elem;

/// The problem's dimensions and mask.
pub(crate) struct Dims<'a> {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub s: usize,
    pub t: usize,
    pub d: usize,
    pub scale: f64,
    /// (batch, s): the first key each query may see.
    pub first_key: Option<&'a [u32]>,
}

impl Dims<'_> {
    /// The visible keys `lo..hi` of query `i` in batch `b` (empty when `lo ≥ hi`).
    fn visible(&self, b: usize, i: usize) -> (usize, usize) {
        let hi = (i + self.t + 1 - self.s).min(self.t);
        let lo = self.first_key.map_or(0, |f| f[b * self.s + i] as usize);
        (lo.min(hi), hi)
    }
}

fn widen<T: Elem>(x: &[T]) -> Vec<T::A> {
    x.iter().map(|v| v.to_acc()).collect()
}

/// `p[j] = softmax(scale·q·k_j)` over `lo..hi` (written to `p[lo..hi]`); returns nothing for
/// an empty range (the caller treats the row as all zeros).
fn probabilities<A: Acc>(
    q: &[A],
    k: &[A],
    d: usize,
    (lo, hi): (usize, usize),
    scale: A,
    p: &mut [A],
) {
    let mut mx = A::NEG_INFINITY;
    for j in lo..hi {
        let s = simd::dot(q, &k[j * d..(j + 1) * d]) * scale;
        p[j] = s;
        mx = mx.max(s);
    }
    let mut sum = A::ZERO;
    for pj in &mut p[lo..hi] {
        *pj = (*pj - mx).exp_nonpositive::<false>();
        sum += *pj;
    }
    let inv = A::ONE / sum;
    for pj in &mut p[lo..hi] {
        *pj *= inv;
    }
}

/// `acc += a·x`
fn axpy<A: Acc>(acc: &mut [A], a: A, x: &[A]) {
    for (o, &xv) in acc.iter_mut().zip(x) {
        *o += a * xv;
    }
}

/// The output (batch, heads, s, d).
pub(crate) fn forward<T: Elem>(q: &[T], k: &[T], v: &[T], dims: &Dims) -> Vec<T> {
    let Dims {
        heads,
        kv_heads,
        s,
        t,
        d,
        ..
    } = *dims;
    let rep = heads / kv_heads;
    let (q, k, v) = (widen(q), widen(k), widen(v));
    let scale = T::A::from_f64(dims.scale);
    let mut out = vec![T::from_acc(T::A::ZERO); q.len()];
    out.par_chunks_mut(d.max(1)).enumerate().for_each_init(
        || (vec![T::A::ZERO; t], vec![T::A::ZERO; d]),
        |(p, acc), (row, out)| {
            let (b, h, i) = (row / (heads * s), row / s % heads, row % s);
            let kv = (b * kv_heads + h / rep) * t * d;
            let (k, v) = (&k[kv..kv + t * d], &v[kv..kv + t * d]);
            let range = dims.visible(b, i);
            acc.fill(T::A::ZERO);
            if range.0 < range.1 {
                probabilities(&q[row * d..(row + 1) * d], k, d, range, scale, p);
                for j in range.0..range.1 {
                    axpy(acc, p[j], &v[j * d..(j + 1) * d]);
                }
            }
            T::store(acc, out);
        },
    );
    out
}

/// One key/value head's share of the gradients: its query heads' dq rows, its dk and dv.
type GroupGradients<A> = (Vec<A>, Vec<A>, Vec<A>);

/// `(dq, dk, dv)` for the upstream gradient `dy` (batch, heads, s, d).
pub(crate) fn backward<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    dy: &[T],
    dims: &Dims,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let Dims {
        batch,
        heads,
        kv_heads,
        s,
        t,
        d,
        ..
    } = *dims;
    let rep = heads / kv_heads;
    let (q, k, v, dy) = (widen(q), widen(k), widen(v), widen(dy));
    let scale = T::A::from_f64(dims.scale);
    let group_q = rep * s * d;
    let group_kv = t * d;
    // One task per key/value head: it owns that head's dk and dv and the dq rows of the query
    // heads that share it, so no two tasks write the same element.
    let results: Vec<GroupGradients<T::A>> = (0..batch * kv_heads)
        .into_par_iter()
        .map(|g| {
            let b = g / kv_heads;
            let (k, v) = (
                &k[g * group_kv..(g + 1) * group_kv],
                &v[g * group_kv..(g + 1) * group_kv],
            );
            let (mut dq, mut dk, mut dv) = (
                vec![T::A::ZERO; group_q],
                vec![T::A::ZERO; group_kv],
                vec![T::A::ZERO; group_kv],
            );
            let (mut p, mut ds) = (vec![T::A::ZERO; t], vec![T::A::ZERO; t]);
            for r in 0..rep * s {
                let i = r % s;
                let (lo, hi) = dims.visible(b, i);
                if lo >= hi {
                    continue;
                }
                let at = g * group_q + r * d;
                let (qr, gr) = (&q[at..at + d], &dy[at..at + d]);
                probabilities(qr, k, d, (lo, hi), scale, &mut p);
                // dp_j = dy·v_j; ds_j = scale·p_j·(dp_j − Σ p·dp)
                let mut delta = T::A::ZERO;
                for j in lo..hi {
                    ds[j] = simd::dot(gr, &v[j * d..(j + 1) * d]);
                    delta += p[j] * ds[j];
                }
                let dq_row = &mut dq[r * d..(r + 1) * d];
                for j in lo..hi {
                    let dsj = scale * p[j] * (ds[j] - delta);
                    axpy(dq_row, dsj, &k[j * d..(j + 1) * d]);
                    axpy(&mut dk[j * d..(j + 1) * d], dsj, qr);
                    axpy(&mut dv[j * d..(j + 1) * d], p[j], gr);
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let narrow = |x: &[T::A]| x.iter().map(|&a| T::from_acc(a)).collect::<Vec<T>>();
    let (mut dq, mut dk, mut dv) = (
        Vec::with_capacity(q.len()),
        Vec::with_capacity(k.len()),
        Vec::with_capacity(v.len()),
    );
    for (gq, gk, gv) in &results {
        dq.extend(narrow(gq));
        dk.extend(narrow(gk));
        dv.extend(narrow(gv));
    }
    (dq, dk, dv)
}

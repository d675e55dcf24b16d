//! The LoRA term `scale·(x·A)·B`, forward and backward, one row at a time.
//!
//! Layouts (all contiguous, row-major): `x` (M, K), `at` = Aᵀ (r, K), `b` (r, N). Aᵀ is used
//! rather than A so that every inner loop runs along a contiguous row: `t = x·A` is r dot
//! products of length K, and `t·B` is r axpys of length N. The rank r is small (4–64), so
//! A and B stay in cache while x streams through once.

use rayon::prelude::*;

use super::simd::{self, Acc};
use super::{build_rows, row_blocks, row_in_acc, rows_per_task, with_widest_simd, Elem};

/// Low-rank factors in accumulation precision.
pub(crate) struct Factors<A> {
    /// Aᵀ, (r, K)
    pub at: Vec<A>,
    /// B, (r, N)
    pub b: Vec<A>,
    pub rank: usize,
    pub k: usize,
    pub n: usize,
    pub scale: A,
}

impl<A: Acc> Factors<A> {
    fn at_row(&self, j: usize) -> &[A] {
        &self.at[j * self.k..(j + 1) * self.k]
    }
    fn b_row(&self, j: usize) -> &[A] {
        &self.b[j * self.n..(j + 1) * self.n]
    }
}

/// Converts factor storage to accumulation precision.
pub(crate) fn factors<T: Elem>(
    at: &[T],
    b: &[T],
    rank: usize,
    k: usize,
    n: usize,
    scale: f64,
) -> Factors<T::A> {
    let mut at_a = vec![T::A::ZERO; at.len()];
    T::load(at, &mut at_a);
    let mut b_a = vec![T::A::ZERO; b.len()];
    T::load(b, &mut b_a);
    Factors {
        at: at_a,
        b: b_a,
        rank,
        k,
        n,
        scale: T::A::from_f64(scale),
    }
}

/// `scale·(x·A)·B` as a new (M, N) output (`rows` = M).
pub(crate) fn forward<T: Elem>(x: &[T], f: &Factors<T::A>, rows: usize) -> Vec<T> {
    let (k, n) = (f.k, f.n);
    let (out, _) = build_rows::<T, _>(
        rows,
        n,
        || (vec![T::A::ZERO; k], vec![T::A::ZERO; f.rank]),
        #[inline(always)]
        |(xb, tb), r, y, fma| {
            y.fill(T::A::ZERO);
            add_lora_row(row_in_acc(&x[r * k..(r + 1) * k], xb), f, tb, y, fma);
        },
    );
    out
}

/// For every row: `out_row = init_row + bias + scale·(x_row·A)·B`, where `init` is the base
/// output already in `out`.
pub(crate) fn forward_into<T: Elem>(x: &[T], f: &Factors<T::A>, bias: Option<&[T]>, out: &mut [T]) {
    let (k, n) = (f.k, f.n);
    let bias: Option<Vec<T::A>> = bias.map(|b| {
        let mut v = vec![T::A::ZERO; b.len()];
        T::load(b, &mut v);
        v
    });
    if n == 0 {
        return;
    }
    out.par_chunks_mut(n)
        .enumerate()
        .with_min_len(rows_per_task(k.max(n)))
        .for_each_init(
            || {
                (
                    vec![T::A::ZERO; k],
                    vec![T::A::ZERO; n],
                    vec![T::A::ZERO; f.rank],
                )
            },
            |(xb, yb, tb), (r, o)| {
                with_widest_simd(
                    #[inline(always)]
                    |fma| {
                        let xr = row_in_acc(&x[r * k..(r + 1) * k], xb);
                        T::load(o, yb);
                        if let Some(bias) = &bias {
                            for (y, &bv) in yb.iter_mut().zip(bias) {
                                *y += bv;
                            }
                        }
                        add_lora_row(xr, f, tb, yb, fma);
                        T::store(yb, o);
                    },
                )
            },
        );
}

/// Dot products of `x` with four rows of Aᵀ at once: one pass over `x`, four independent
/// sets of lanes (written like `simd::dot`, the shape the compiler vectorises).
#[inline(always)]
fn dot4<A: Acc>(x: &[A], r: [&[A]; 4]) -> [A; 4] {
    const L: usize = 16;
    let k = x.len();
    let [r0, r1, r2, r3] = r.map(|row| &row[..k]);
    let (mut l0, mut l1, mut l2, mut l3) = ([A::ZERO; L], [A::ZERO; L], [A::ZERO; L], [A::ZERO; L]);
    for ((((xc, a0), a1), a2), a3) in x
        .chunks_exact(L)
        .zip(r0.chunks_exact(L))
        .zip(r1.chunks_exact(L))
        .zip(r2.chunks_exact(L))
        .zip(r3.chunks_exact(L))
    {
        for l in 0..L {
            l0[l] += xc[l] * a0[l];
            l1[l] += xc[l] * a1[l];
            l2[l] += xc[l] * a2[l];
            l3[l] += xc[l] * a3[l];
        }
    }
    let full = k - k % L;
    let finish = |lanes: [A; L], row: &[A]| {
        let tail = x[full..]
            .iter()
            .zip(&row[full..])
            .fold(A::ZERO, |s, (&xv, &av)| s + xv * av);
        lanes.iter().fold(tail, |s, &v| s + v)
    };
    [
        finish(l0, r0),
        finish(l1, r1),
        finish(l2, r2),
        finish(l3, r3),
    ]
}

/// `y += scale·(x·A)·B` for one row (`t`: r scratch values; `fma`: see `with_widest_simd`).
#[inline(always)]
fn add_lora_row<A: Acc>(x: &[A], f: &Factors<A>, t: &mut [A], y: &mut [A], fma: bool) {
    if fma {
        add_lora_row_with::<A, true>(x, f, t, y);
    } else {
        add_lora_row_with::<A, false>(x, f, t, y);
    }
}

/// [`add_lora_row`]: the r projections `t = scale·x·A` in groups (one pass over `x` per group
/// of 4), then `y` in blocks of columns as `Σ_j t_j·B_j`, so that `y` is read and written
/// once rather than once per rank.
#[inline(always)]
fn add_lora_row_with<A: Acc, const FMA: bool>(x: &[A], f: &Factors<A>, t: &mut [A], y: &mut [A]) {
    let mut j = 0;
    while j + 4 <= f.rank {
        let rows = std::array::from_fn(|g| f.at_row(j + g));
        t[j..j + 4].copy_from_slice(&dot4(x, rows));
        j += 4;
    }
    while j < f.rank {
        t[j] = simd::dot(x, f.at_row(j));
        j += 1;
    }
    for tj in t.iter_mut() {
        *tj *= f.scale;
    }
    // 64 columns: enough independent accumulators to hide the multiply-add latency.
    const L: usize = 64;
    let n = f.n;
    let y = &mut y[..n];
    let b_rows = || f.b.chunks_exact(n).zip(t.iter());
    let mut yc = y.chunks_exact_mut(L);
    for (ci, yv) in (&mut yc).enumerate() {
        let mut acc = [A::ZERO; L];
        for (b_row, &tj) in b_rows() {
            let bc: &[A; L] = b_row[ci * L..ci * L + L].try_into().unwrap();
            for l in 0..L {
                acc[l] = tj.madd::<FMA>(bc[l], acc[l]);
            }
        }
        for (yv, a) in yv.iter_mut().zip(acc) {
            *yv += a;
        }
    }
    let full = n - n % L;
    for (i, yv) in yc.into_remainder().iter_mut().enumerate() {
        *yv += b_rows().fold(A::ZERO, |s, (b_row, &tj)| s + tj * b_row[full + i]);
    }
}

/// Gradients of `scale·(x·A)·B` given `dy`: returns `(dx, dAᵀ, dB)` with dx (M, K),
/// dAᵀ (r, K), dB (r, N). `dx_init`, when given, is added into dx before its single rounding
/// to `T` (the base layer's dx, kept in accumulation precision).
pub(crate) fn backward<T: Elem>(
    x: &[T],
    dy: &[T],
    f: &Factors<T::A>,
    dx_init: Option<&[T::A]>,
    rows: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (k, n, rank) = (f.k, f.n, f.rank);
    let mut dx = vec![T::from_acc(T::A::ZERO); rows * k];
    let blocks = row_blocks(rows, k.max(n).max(1));
    let mut dx_blocks: Vec<&mut [T]> = Vec::with_capacity(blocks.len());
    let mut rest = dx.as_mut_slice();
    for blk in &blocks {
        let (head, tail) = rest.split_at_mut(blk.len() * k);
        dx_blocks.push(head);
        rest = tail;
    }
    // Each task's private (dAᵀ, dB) sums.
    type Partial<A> = (Vec<A>, Vec<A>);
    let partials: Vec<Partial<T::A>> = blocks
        .into_par_iter()
        .zip(dx_blocks)
        .map(|(range, dx_block)| {
            let mut dat = vec![T::A::ZERO; rank * k];
            let mut db = vec![T::A::ZERO; rank * n];
            let (mut xb, mut gb, mut dxb) = (
                vec![T::A::ZERO; k],
                vec![T::A::ZERO; n],
                vec![T::A::ZERO; k],
            );
            with_widest_simd(
                #[inline(always)]
                |_fma| {
                    for (i, r) in range.enumerate() {
                        let xr = row_in_acc(&x[r * k..(r + 1) * k], &mut xb);
                        let gr = row_in_acc(&dy[r * n..(r + 1) * n], &mut gb);
                        match dx_init {
                            Some(init) => dxb.copy_from_slice(&init[r * k..(r + 1) * k]),
                            None => dxb.fill(T::A::ZERO),
                        }
                        for j in 0..rank {
                            let t = simd::dot(xr, f.at_row(j)) * f.scale;
                            let g = simd::dot(gr, f.b_row(j)) * f.scale;
                            simd::axpy(g, f.at_row(j), &mut dxb);
                            simd::axpy(g, xr, &mut dat[j * k..(j + 1) * k]);
                            simd::axpy(t, gr, &mut db[j * n..(j + 1) * n]);
                        }
                        T::store(&dxb, &mut dx_block[i * k..(i + 1) * k]);
                    }
                },
            );
            (dat, db)
        })
        .collect();
    let mut dat = vec![T::A::ZERO; rank * k];
    let mut db = vec![T::A::ZERO; rank * n];
    for (pa, pb) in &partials {
        simd::axpy(T::A::ONE, pa, &mut dat);
        simd::axpy(T::A::ONE, pb, &mut db);
    }
    let mut dat_t = vec![T::from_acc(T::A::ZERO); rank * k];
    T::store(&dat, &mut dat_t);
    let mut db_t = vec![T::from_acc(T::A::ZERO); rank * n];
    T::store(&db, &mut db_t);
    (dx, dat_t, db_t)
}

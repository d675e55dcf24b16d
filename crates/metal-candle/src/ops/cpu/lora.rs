//! The LoRA term `scale·(x·A)·B`, forward and backward, one row at a time.
//!
//! Layouts (all contiguous, row-major): `x` (M, K), `at` = Aᵀ (r, K), `b` (r, N). Aᵀ is used
//! rather than A so that every inner loop runs along a contiguous row: `t = x·A` is r dot
//! products of length K, and `t·B` is r axpys of length N. The rank r is small (4–64), so
//! A and B stay in cache while x streams through once.

use rayon::prelude::*;

use super::simd::{self, Acc};
use super::{build_rows, row_in_acc, rows_per_task, with_widest_simd, Elem};

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
    project(x, &f.at, f.scale, t);
    add_combination(t, &f.b, y, fma);
}

/// `t[j] = scale·(x · rows_j)` for the rows of the row-major (t.len() × x.len()) matrix `rows`,
/// in groups of four (one pass over `x` per group).
#[inline(always)]
fn project<A: Acc>(x: &[A], rows: &[A], scale: A, t: &mut [A]) {
    let k = x.len();
    let row = |j: usize| &rows[j * k..(j + 1) * k];
    let rank = t.len();
    let mut j = 0;
    while j + 4 <= rank {
        t[j..j + 4].copy_from_slice(&dot4(x, std::array::from_fn(|g| row(j + g))));
        j += 4;
    }
    while j < rank {
        t[j] = simd::dot(x, row(j));
        j += 1;
    }
    for tj in t.iter_mut() {
        *tj *= scale;
    }
}

/// `y += Σ_j t[j]·rows_j` for the rows of the row-major (t.len() × y.len()) matrix `rows`.
#[inline(always)]
fn add_combination<A: Acc>(t: &[A], rows: &[A], y: &mut [A], fma: bool) {
    if fma {
        add_combination_with::<A, true>(t, rows, y);
    } else {
        add_combination_with::<A, false>(t, rows, y);
    }
}

/// [`add_combination`]: `y` in blocks of columns, each block read and written once rather than
/// once per rank.
#[inline(always)]
fn add_combination_with<A: Acc, const FMA: bool>(t: &[A], rows: &[A], y: &mut [A]) {
    // 64 columns: enough independent accumulators to hide the multiply-add latency.
    const L: usize = 64;
    let n = y.len();
    if n == 0 {
        return;
    }
    let weighted_rows = || rows.chunks_exact(n).zip(t.iter());
    let mut yc = y.chunks_exact_mut(L);
    for (ci, yv) in (&mut yc).enumerate() {
        let mut acc = [A::ZERO; L];
        for (row, &tj) in weighted_rows() {
            let rc: &[A; L] = row[ci * L..ci * L + L].try_into().unwrap();
            for l in 0..L {
                acc[l] = tj.madd::<FMA>(rc[l], acc[l]);
            }
        }
        for (yv, a) in yv.iter_mut().zip(acc) {
            *yv += a;
        }
    }
    let full = n - n % L;
    for (i, yv) in yc.into_remainder().iter_mut().enumerate() {
        *yv += weighted_rows().fold(A::ZERO, |s, (row, &tj)| s + tj * row[full + i]);
    }
}

/// Rows whose outer-product updates of dAᵀ and dB are applied together: each pass over a
/// gradient row then serves four input rows (per row, it was a load and a store of the whole
/// (r × K) and (r × N) sums).
const GROUP: usize = 4;

/// One task's share of the backward pass: its partial parameter gradients and the rows whose
/// updates are pending.
struct BackwardTask<A> {
    /// Σ over this task's rows of `g ⊗ x` so far: dAᵀ, (r, K).
    dat: Vec<A>,
    /// Σ of `t ⊗ dy`: dB, (r, N).
    db: Vec<A>,
    /// `scale·x·A` of the pending rows, (GROUP, r).
    t: Vec<A>,
    /// `scale·dy·Bᵀ` of the pending rows, (GROUP, r).
    g: Vec<A>,
    pending: Vec<usize>,
    /// Row scratch for storage types that are not the accumulation type: one row of x and
    /// dy for the current row, GROUP of each for a group update.
    xb: Vec<A>,
    gb: Vec<A>,
    x_group: Vec<A>,
    dy_group: Vec<A>,
    /// Stand-ins for the missing rows of a short last group (zero coefficients times zero rows).
    zero_k: Vec<A>,
    zero_n: Vec<A>,
}

impl<A: Acc> BackwardTask<A> {
    fn new(rank: usize, k: usize, n: usize) -> Self {
        Self {
            dat: vec![A::ZERO; rank * k],
            db: vec![A::ZERO; rank * n],
            t: vec![A::ZERO; GROUP * rank],
            g: vec![A::ZERO; GROUP * rank],
            pending: Vec::with_capacity(GROUP),
            xb: vec![A::ZERO; k],
            gb: vec![A::ZERO; n],
            x_group: vec![A::ZERO; GROUP * k],
            dy_group: vec![A::ZERO; GROUP * n],
            zero_k: vec![A::ZERO; k],
            zero_n: vec![A::ZERO; n],
        }
    }
}

/// Gradients of `scale·(x·A)·B` given `dy`: returns `(dx, dAᵀ, dB)` with dx (M, K),
/// dAᵀ (r, K), dB (r, N). `dx_init`, when given, is added into dx before its single rounding
/// to `T` (the base layer's dx, kept in accumulation precision).
///
/// Per row: `t = scale·x·A` and `g = scale·dy·Bᵀ` (four projections per pass), the dx row
/// `g·Aᵀ` in column blocks, then the outer products `g ⊗ x` and `t ⊗ dy` summed into the
/// task's dAᵀ and dB a group of rows at a time.
pub(crate) fn backward<T: Elem>(
    x: &[T],
    dy: &[T],
    f: &Factors<T::A>,
    dx_init: Option<&[T::A]>,
    rows: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (k, n, rank) = (f.k, f.n, f.rank);
    let (dx, mut tasks) = build_rows::<T, _>(
        rows,
        k,
        || BackwardTask::new(rank, k, n),
        #[inline(always)]
        |task, r, dxr, fma| {
            let i = task.pending.len();
            let xr = row_in_acc(&x[r * k..(r + 1) * k], &mut task.xb);
            let gr = row_in_acc(&dy[r * n..(r + 1) * n], &mut task.gb);
            project(xr, &f.at, f.scale, &mut task.t[i * rank..(i + 1) * rank]);
            let g = &mut task.g[i * rank..(i + 1) * rank];
            project(gr, &f.b, f.scale, g);
            match dx_init {
                Some(init) => dxr.copy_from_slice(&init[r * k..(r + 1) * k]),
                None => dxr.fill(T::A::ZERO),
            }
            add_combination(g, &f.at, dxr, fma);
            task.pending.push(r);
            if task.pending.len() == GROUP {
                flush_group(task, x, dy, rank, fma);
            }
        },
    );
    // Each task's last, short group.
    tasks
        .par_iter_mut()
        .for_each(|task| with_widest_simd(|fma| flush_group(task, x, dy, rank, fma)));
    let mut dat = vec![T::A::ZERO; rank * k];
    let mut db = vec![T::A::ZERO; rank * n];
    for task in &tasks {
        simd::axpy(T::A::ONE, &task.dat, &mut dat);
        simd::axpy(T::A::ONE, &task.db, &mut db);
    }
    let mut dat_t = vec![T::from_acc(T::A::ZERO); rank * k];
    T::store(&dat, &mut dat_t);
    let mut db_t = vec![T::from_acc(T::A::ZERO); rank * n];
    T::store(&db, &mut db_t);
    (dx, dat_t, db_t)
}

/// Adds the pending rows' outer products into the task's dAᵀ and dB, and empties the group.
#[inline(always)]
fn flush_group<T: Elem>(task: &mut BackwardTask<T::A>, x: &[T], dy: &[T], rank: usize, fma: bool) {
    let BackwardTask {
        dat,
        db,
        t,
        g,
        pending,
        x_group,
        dy_group,
        zero_k,
        zero_n,
        ..
    } = task;
    if pending.is_empty() {
        return;
    }
    let (k, n) = (zero_k.len(), zero_n.len());
    // The rows of a short group that do not exist get zero coefficients (and zero rows).
    t[pending.len() * rank..].fill(T::A::ZERO);
    g[pending.len() * rank..].fill(T::A::ZERO);
    let mut x_rows: [&[T::A]; GROUP] = [&zero_k[..]; GROUP];
    for ((slot, buf), &r) in x_rows
        .iter_mut()
        .zip(x_group.chunks_mut(k.max(1)))
        .zip(pending.iter())
    {
        *slot = row_in_acc(&x[r * k..(r + 1) * k], buf);
    }
    let mut dy_rows: [&[T::A]; GROUP] = [&zero_n[..]; GROUP];
    for ((slot, buf), &r) in dy_rows
        .iter_mut()
        .zip(dy_group.chunks_mut(n.max(1)))
        .zip(pending.iter())
    {
        *slot = row_in_acc(&dy[r * n..(r + 1) * n], buf);
    }
    if fma {
        add_outer_products::<T::A, true>(g, rank, x_rows, dat);
        add_outer_products::<T::A, true>(t, rank, dy_rows, db);
    } else {
        add_outer_products::<T::A, false>(g, rank, x_rows, dat);
        add_outer_products::<T::A, false>(t, rank, dy_rows, db);
    }
    pending.clear();
}

/// `out_j += Σ_i coef[i][j]·rows_i` for the rows `j` of the row-major (rank × len) `out`, with
/// `coef` (GROUP × rank) and GROUP rows of length `len`: column blocks of every input row
/// are loaded once and serve all `rank` output rows.
#[inline(always)]
fn add_outer_products<A: Acc, const FMA: bool>(
    coef: &[A],
    rank: usize,
    rows: [&[A]; GROUP],
    out: &mut [A],
) {
    const L: usize = 32;
    let len = rows[0].len();
    let full = len - len % L;
    for c in (0..full).step_by(L) {
        let chunks: [&[A; L]; GROUP] = rows.map(|row| row[c..c + L].try_into().unwrap());
        for j in 0..rank {
            let o: &mut [A; L] = (&mut out[j * len + c..j * len + c + L]).try_into().unwrap();
            let mut acc = *o;
            for (i, chunk) in chunks.iter().enumerate() {
                let cf = coef[i * rank + j];
                for l in 0..L {
                    acc[l] = cf.madd::<FMA>(chunk[l], acc[l]);
                }
            }
            *o = acc;
        }
    }
    for c in full..len {
        for j in 0..rank {
            let s = (0..GROUP).fold(out[j * len + c], |s, i| s + coef[i * rank + j] * rows[i][c]);
            out[j * len + c] = s;
        }
    }
}

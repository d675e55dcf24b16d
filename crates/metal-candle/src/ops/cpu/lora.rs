//! The LoRA term `scale·(x·A)·B`, forward and backward, four rows at a time.
//!
//! Layouts: `x` (M, K) and `dy` (M, N) row-major; the factors Aᵀ (r, K) and B (r, N) packed
//! in column blocks (see [`Packed`]). Aᵀ is used rather than A so that every inner loop runs
//! along the columns: `t = x·A` is r dot products of length K, and `t·B` is r axpys of length
//! N. The rank r is small (4–64), so the factors stay in cache while x streams through once;
//! a group of four rows shares every load of them. The backward's parameter gradients (the
//! outer products `g ⊗ x` and `t ⊗ dy`) are gathered over chunks of [`CHUNK`] rows, so that
//! their sums pass through the caches once per chunk rather than once per group.

use rayon::prelude::*;

use super::dispatch::{simd_level, SimdLevel};
use super::rows::build_row_groups_then;
use super::simd::{self, Acc};
use super::{build_row_groups, rows_per_task_for_work, with_widest_simd, Elem};

/// Columns per block of a [`Packed`] matrix: two 16-lane vectors of f32.
const BLOCK: usize = 32;

/// A row-major (rows × len) matrix stored as column blocks: block `c` holds rows `0..rows`
/// of columns `c·BLOCK..(c + 1)·BLOCK`, contiguous, zero past `len`. A kernel walking along
/// the columns then reads one contiguous stream instead of `rows` streams a row apart (which,
/// at power-of-two lengths, also collide in the same L1 sets and evict each other).
pub(crate) struct Packed<A> {
    data: Vec<A>,
    rows: usize,
    len: usize,
}

impl<A: Acc> Packed<A> {
    /// Zeros.
    fn zeros(rows: usize, len: usize) -> Self {
        Self {
            data: vec![A::ZERO; rows * len.div_ceil(BLOCK) * BLOCK],
            rows,
            len,
        }
    }

    /// Packs the (rows × len) matrix whose element (j, c) is `src[j·row_stride + c·col_stride]`,
    /// converting each element with `to_acc`: any strided 2-D view (a transpose included) is
    /// packed in this one pass, with no contiguous copy first. Each block is filled in the
    /// order that reads `src` contiguously where the view allows.
    fn from_strided<T: Copy>(
        src: &[T],
        (rows, len): (usize, usize),
        (row_stride, col_stride): (usize, usize),
        to_acc: impl Fn(T) -> A,
    ) -> Self {
        let mut packed = Self::zeros(rows, len);
        for (b, block) in packed.blocks_mut().enumerate() {
            let c0 = b * BLOCK;
            let width = BLOCK.min(len - c0);
            if row_stride == 1 && col_stride != 1 {
                // Column-major source (a transposed row-major matrix): column by column.
                for l in 0..width {
                    let col = &src[(c0 + l) * col_stride..][..rows];
                    for (j, &v) in col.iter().enumerate() {
                        block[j * BLOCK + l] = to_acc(v);
                    }
                }
            } else {
                for (j, dst) in block.chunks_exact_mut(BLOCK).enumerate() {
                    let row = &src[j * row_stride + c0 * col_stride..];
                    if col_stride == 1 {
                        for (d, &v) in dst.iter_mut().zip(&row[..width]) {
                            *d = to_acc(v);
                        }
                    } else {
                        for (l, d) in dst[..width].iter_mut().enumerate() {
                            *d = to_acc(row[l * col_stride]);
                        }
                    }
                }
            }
        }
        packed
    }

    /// Packs the row-major (rows × len) `src`.
    #[cfg(test)]
    fn from_rows(src: &[A], rows: usize, len: usize) -> Self {
        Self::from_strided(src, (rows, len), (len, 1), |v| v)
    }

    /// Back to a row-major (rows × len) matrix.
    fn to_rows(&self) -> Vec<A> {
        let mut out = vec![A::ZERO; self.rows * self.len];
        for (b, block) in self.blocks().enumerate() {
            let c = b * BLOCK;
            let width = BLOCK.min(self.len - c);
            for (j, src) in block.chunks_exact(BLOCK).enumerate() {
                out[j * self.len + c..j * self.len + c + width].copy_from_slice(&src[..width]);
            }
        }
        out
    }

    /// The column blocks, each `rows × BLOCK` values (row j of the block at `j·BLOCK`).
    fn blocks(&self) -> std::slice::ChunksExact<'_, A> {
        self.data.chunks_exact((self.rows * BLOCK).max(1))
    }

    fn blocks_mut(&mut self) -> std::slice::ChunksExactMut<'_, A> {
        self.data.chunks_exact_mut((self.rows * BLOCK).max(1))
    }

    fn add_assign(&mut self, other: &Self) {
        simd::axpy(A::ONE, &other.data, &mut self.data);
    }
}

/// Low-rank factors in accumulation precision, packed (see [`Packed`]).
pub(crate) struct Factors<A> {
    /// Aᵀ, (r, K)
    at: Packed<A>,
    /// B, (r, N)
    b: Packed<A>,
    pub rank: usize,
    pub k: usize,
    pub n: usize,
    scale: A,
}

/// A factor's storage: the elements and the (row, column) strides of the view to pack.
pub(crate) struct FactorView<'a, T> {
    pub data: &'a [T],
    pub strides: (usize, usize),
}

/// Packs the factors in accumulation precision: `at` is the view of Aᵀ (r, K) (for A stored
/// as (K, r), its transposed strides), `b` that of B (r, N).
pub(crate) fn factors<T: Elem>(
    at: FactorView<'_, T>,
    b: FactorView<'_, T>,
    rank: usize,
    k: usize,
    n: usize,
    scale: f64,
) -> Factors<T::A> {
    Factors {
        at: Packed::from_strided(at.data, (rank, k), at.strides, T::to_acc),
        b: Packed::from_strided(b.data, (rank, n), b.strides, T::to_acc),
        rank,
        k,
        n,
        scale: T::A::from_f64(scale),
    }
}

/// Rows of x (and of dy) a kernel handles together: every load of a row of Aᵀ or B then
/// serves four rows. One row at a time, the factors (2·r·K values, 128 KiB at K = N = 2048,
/// r = 8) are streamed from L2 for every row and bound the kernels.
const GROUP: usize = 4;

/// Multiply-adds of the forward per row: r·K for `x·A`, r·N for `t·B`.
fn forward_fmas_per_row<A>(f: &Factors<A>) -> usize {
    f.rank * (f.k + f.n)
}

/// `scale·(x·A)·B` as a new (M, N) output (`rows` = M), and the projections
/// `t = scale·x·A` (M, r) in accumulation precision: the backward pass needs them, and
/// handing them over saves it one of its five passes over a factor.
pub(crate) fn forward<T: Elem>(x: &[T], f: &Factors<T::A>, rows: usize) -> (Vec<T>, Vec<T::A>) {
    let (k, n, rank) = (f.k, f.n, f.rank);
    let (out, blocks) = build_row_groups::<T, _, GROUP>(
        rows,
        n,
        rows_per_task_for_work(forward_fmas_per_row(f)),
        || (RowGroup::new(k, rank), Vec::new()),
        #[inline(always)]
        |(group, t), first, count, y, fma| {
            group.lora_rows(x, first, count, f, y, Combine::Overwrite, fma);
            t.extend_from_slice(&group.proj[..count * rank]);
        },
    );
    // The blocks come back in row order, each with its rows' projections in order. (Copied
    // by slices: an iterator flattening the blocks moves one value per step, which took a
    // tenth of the forward's time at 1×128×512, rank 8.)
    let mut t = Vec::with_capacity(rows * rank);
    for (_, part) in &blocks {
        t.extend_from_slice(part);
    }
    (out, t)
}

/// For every row: `out_row = init_row + bias + scale·(x_row·A)·B`, where `init` is the base
/// output already in `out`.
pub(crate) fn forward_into<T: Elem>(x: &[T], f: &Factors<T::A>, bias: Option<&[T]>, out: &mut [T]) {
    let (k, n, rank) = (f.k, f.n, f.rank);
    let bias: Option<Vec<T::A>> = bias.map(|b| {
        let mut v = vec![T::A::ZERO; b.len()];
        T::load(b, &mut v);
        v
    });
    if n == 0 {
        return;
    }
    let groups_per_task = rows_per_task_for_work(forward_fmas_per_row(f)).div_ceil(GROUP);
    let init = || (RowGroup::new(k, rank), vec![T::A::ZERO; GROUP * n]);
    let run_group = |(group, yb): &mut (RowGroup<T::A>, Vec<T::A>), (g, o): (usize, &mut [T])| {
        with_widest_simd(
            #[inline(always)]
            |fma| {
                let count = o.len() / n;
                let y = &mut yb[..count * n];
                T::load(o, y);
                if let Some(bias) = &bias {
                    for row in y.chunks_exact_mut(n) {
                        for (v, &bv) in row.iter_mut().zip(bias) {
                            *v += bv;
                        }
                    }
                }
                group.lora_rows(x, g * GROUP, count, f, yb, Combine::Add, fma);
                T::store(&yb[..count * n], o);
            },
        )
    };
    // A problem of one task's size runs on the calling thread (see `rows_per_task_for_work`).
    let groups = (out.len() / n).div_ceil(GROUP);
    if groups <= groups_per_task {
        let mut state = init();
        out.chunks_mut(GROUP * n)
            .enumerate()
            .for_each(|item| run_group(&mut state, item));
    } else {
        out.par_chunks_mut(GROUP * n)
            .enumerate()
            .with_min_len(groups_per_task)
            .for_each_init(init, run_group);
    }
}

/// Scratch for one group of rows of an input: the rows in accumulation precision (for
/// storage types that are not the accumulation type; allocated on first use, and holding
/// several groups for the backward pass's chunks), a zero row standing in for the missing
/// rows of a short group, and the group's `scale·row·F` projections (GROUP × r).
struct RowGroup<A> {
    rows: Vec<A>,
    zero: Vec<A>,
    proj: Vec<A>,
}

impl<A: Acc> RowGroup<A> {
    fn new(len: usize, rank: usize) -> Self {
        Self {
            rows: Vec::new(),
            zero: vec![A::ZERO; len],
            proj: vec![A::ZERO; GROUP * rank],
        }
    }

    /// Rows `first..first + count` of the row-major `src` in accumulation precision; the
    /// missing rows of a short group are zero rows, so their projections are zero. Converted
    /// rows go to slots `slot..slot + count` of the buffer, where [`RowGroup::row`] finds them.
    #[inline(always)]
    fn load<'a, T: Elem<A = A>>(
        &'a mut self,
        src: &'a [T],
        first: usize,
        count: usize,
        slot: usize,
    ) -> [&'a [A]; GROUP] {
        let len = self.zero.len();
        let mut rows: [&[A]; GROUP] = [&self.zero[..]; GROUP];
        if T::as_acc(src).is_some() {
            for (i, row) in rows.iter_mut().take(count).enumerate() {
                *row = acc_row(src, first + i, len, &[]);
            }
        } else {
            let end = (slot + count) * len;
            if self.rows.len() < end {
                self.rows.resize(end, A::ZERO);
            }
            let bufs = self.rows[slot * len..end].chunks_exact_mut(len.max(1));
            for (i, (row, buf)) in rows.iter_mut().zip(bufs).enumerate() {
                let r = first + i;
                T::load(&src[r * len..(r + 1) * len], buf);
                *row = buf;
            }
        }
        rows
    }

    /// Row `r` of `src` in accumulation precision, loaded earlier into `slot` by
    /// [`RowGroup::load`] where it had to be converted.
    #[inline(always)]
    fn row<'a, T: Elem<A = A>>(&'a self, src: &'a [T], r: usize, slot: usize) -> &'a [A] {
        let len = self.zero.len();
        acc_row(src, r, len, &self.rows[(slot * len).min(self.rows.len())..])
    }

    /// `y_i (+)= scale·(x_i·A)·B` for the group's rows of `x` (`y`: GROUP × N, row i of the
    /// group in row i; rows past `count` get the zero row's term: zero, or nothing added).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn lora_rows<T: Elem<A = A>>(
        &mut self,
        x: &[T],
        first: usize,
        count: usize,
        f: &Factors<A>,
        y: &mut [A],
        how: Combine,
        fma: bool,
    ) {
        let mut proj = std::mem::take(&mut self.proj);
        let xs = self.load(x, first, count, 0);
        match (fma, wide_tiles()) {
            (true, true) => lora_group::<A, true, true>(xs, f, &mut proj, y, how),
            (true, false) => lora_group::<A, true, false>(xs, f, &mut proj, y, how),
            (false, true) => lora_group::<A, false, true>(xs, f, &mut proj, y, how),
            (false, false) => lora_group::<A, false, false>(xs, f, &mut proj, y, how),
        }
        self.proj = proj;
    }
}

/// Row `r` (of length `len`) of the row-major `src` in accumulation precision: borrowed from
/// `src` where that is the accumulation type, else the first row of `converted`.
#[inline(always)]
fn acc_row<'a, T: Elem>(src: &'a [T], r: usize, len: usize, converted: &'a [T::A]) -> &'a [T::A] {
    T::as_acc(&src[r * len..(r + 1) * len]).unwrap_or_else(|| &converted[..len])
}

/// `y_i (+)= scale·(x_i·A)·B` for a group's rows `xs`, their projections going through `proj`.
#[inline(always)]
fn lora_group<A: Acc, const FMA: bool, const WIDE: bool>(
    xs: [&[A]; GROUP],
    f: &Factors<A>,
    proj: &mut [A],
    y: &mut [A],
    how: Combine,
) {
    project_group::<A, FMA, WIDE>(xs, &f.at, f.scale, proj);
    combine_group::<A, FMA, WIDE>(proj, &f.b, y, how);
}

/// Whether [`combine_group`] adds its sums to the output rows or writes them over whatever the
/// rows hold. Overwriting spares the caller a pass that zeroes the rows and the kernel the read
/// of them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Combine {
    Add,
    Overwrite,
}

/// Whether the register tiles of the kernels below are sized for AVX-512 (32 registers of 16
/// f32 lanes) or for narrower code (AVX2 and below: 16 registers of at most 8 lanes), where
/// the AVX-512 tiles would not fit the register file and spill to the stack on every step.
#[inline(always)]
fn wide_tiles() -> bool {
    simd_level() == SimdLevel::Avx512
}

/// `t[i·r + j] = scale·(xs[i] · row_j)` for the GROUP rows `xs` and the r rows of the packed
/// (r × K) matrix `m`. One pass over the rows serves several ranks at once: GROUP × 4 ranks ×
/// 16 lanes of accumulators (half the AVX-512 register file at f32) when `WIDE`, else GROUP ×
/// 2 × 8 (half of AVX2's).
#[inline(always)]
fn project_group<A: Acc, const FMA: bool, const WIDE: bool>(
    xs: [&[A]; GROUP],
    m: &Packed<A>,
    scale: A,
    t: &mut [A],
) {
    let rank = m.rows;
    let mut j = 0;
    while j < rank {
        j += match (WIDE, rank - j) {
            (true, 4..) => project_ranks::<A, FMA, 4, 16>(xs, m, scale, j, t),
            (false, 2..) => project_ranks::<A, FMA, 2, 8>(xs, m, scale, j, t),
            (true, _) => project_ranks::<A, FMA, 1, 16>(xs, m, scale, j, t),
            (false, _) => project_ranks::<A, FMA, 1, 8>(xs, m, scale, j, t),
        };
    }
}

/// Ranks `j..j + R` of [`project_group`], `L` lanes per accumulator; returns R.
#[inline(always)]
fn project_ranks<A: Acc, const FMA: bool, const R: usize, const L: usize>(
    xs: [&[A]; GROUP],
    m: &Packed<A>,
    scale: A,
    j: usize,
    t: &mut [A],
) -> usize {
    let rank = m.rows;
    let d = dots::<A, FMA, R, L>(xs, m, j);
    for (i, di) in d.iter().enumerate() {
        for (q, &v) in di.iter().enumerate() {
            t[i * rank + j + q] = scale * v;
        }
    }
    R
}

/// The GROUP × R dot products of `xs[i]` with rows `j0..j0 + R` of the packed matrix `m`, in
/// one pass over the inputs, with accumulators of `L` lanes (`L` divides [`BLOCK`]).
#[inline(always)]
fn dots<A: Acc, const FMA: bool, const R: usize, const L: usize>(
    xs: [&[A]; GROUP],
    m: &Packed<A>,
    j0: usize,
) -> [[A; R]; GROUP] {
    let k = m.len;
    let xs = xs.map(|x| &x[..k]);
    let full_blocks = k / BLOCK;
    // One named accumulator set per row: written as a 3-D array, the loops are not vectorised.
    let (mut a0, mut a1, mut a2, mut a3) = (
        [[A::ZERO; L]; R],
        [[A::ZERO; L]; R],
        [[A::ZERO; L]; R],
        [[A::ZERO; L]; R],
    );
    for (b, block) in m.blocks().take(full_blocks).enumerate() {
        for h in 0..BLOCK / L {
            let c = b * BLOCK + h * L;
            // Copied out of the rows: as references, every rank's multiply-adds reload them.
            let [x0, x1, x2, x3]: [[A; L]; GROUP] = xs.map(|x| x[c..c + L].try_into().unwrap());
            for q in 0..R {
                let at = (j0 + q) * BLOCK + h * L;
                let rc: &[A; L] = block[at..at + L].try_into().unwrap();
                for l in 0..L {
                    a0[q][l] = x0[l].madd::<FMA>(rc[l], a0[q][l]);
                    a1[q][l] = x1[l].madd::<FMA>(rc[l], a1[q][l]);
                    a2[q][l] = x2[l].madd::<FMA>(rc[l], a2[q][l]);
                    a3[q][l] = x3[l].madd::<FMA>(rc[l], a3[q][l]);
                }
            }
        }
    }
    let acc = [a0, a1, a2, a3];
    // The last, partial block (zero-padded past k).
    let c0 = full_blocks * BLOCK;
    let tail = m.blocks().nth(full_blocks);
    std::array::from_fn(|i| {
        std::array::from_fn(|q| {
            let t = tail.map_or(A::ZERO, |block| {
                let row = &block[(j0 + q) * BLOCK..];
                (c0..k).fold(A::ZERO, |s, c| s + xs[i][c] * row[c - c0])
            });
            acc[i][q].iter().fold(t, |s, &v| s + v)
        })
    })
}

/// `y_i (+)= Σ_j t[i·r + j]·row_j` for the GROUP rows of `y` (GROUP × N, row-major) and the r
/// rows of the packed (r × N) matrix `m`: each block of `m` is loaded once for all GROUP rows,
/// and each block of `y` written once (and read once when adding). The GROUP sums of a block
/// stay in registers: the whole block (GROUP × 32 lanes) when `WIDE`, else half a block at a
/// time (GROUP × 16).
#[inline(always)]
fn combine_group<A: Acc, const FMA: bool, const WIDE: bool>(
    t: &[A],
    m: &Packed<A>,
    y: &mut [A],
    how: Combine,
) {
    if WIDE {
        combine_columns::<A, FMA, BLOCK>(t, m, y, how);
    } else {
        combine_columns::<A, FMA, { BLOCK / 2 }>(t, m, y, how);
    }
}

/// [`combine_group`] in column strips of `W` (a divisor of [`BLOCK`]).
#[inline(always)]
fn combine_columns<A: Acc, const FMA: bool, const W: usize>(
    t: &[A],
    m: &Packed<A>,
    y: &mut [A],
    how: Combine,
) {
    let (rank, n) = (m.rows, m.len);
    let t = &t[..GROUP * rank];
    for (b, block) in m.blocks().enumerate() {
        for h in 0..BLOCK / W {
            let c = b * BLOCK + h * W;
            if c >= n {
                break;
            }
            // One named accumulator set per row, as in `dots`: an array of them indexed in a
            // loop is kept on the stack when the compiler does not unroll that loop.
            let (mut a0, mut a1, mut a2, mut a3) =
                ([A::ZERO; W], [A::ZERO; W], [A::ZERO; W], [A::ZERO; W]);
            for (j, rc) in block.chunks_exact(BLOCK).enumerate() {
                let rc: &[A; W] = rc[h * W..(h + 1) * W].try_into().unwrap();
                let (t0, t1, t2, t3) = (t[j], t[rank + j], t[2 * rank + j], t[3 * rank + j]);
                for l in 0..W {
                    a0[l] = t0.madd::<FMA>(rc[l], a0[l]);
                    a1[l] = t1.madd::<FMA>(rc[l], a1[l]);
                    a2[l] = t2.madd::<FMA>(rc[l], a2[l]);
                    a3[l] = t3.madd::<FMA>(rc[l], a3[l]);
                }
            }
            let width = W.min(n - c);
            put_strip(&mut y[c..c + width], &a0, how);
            put_strip(&mut y[n + c..n + c + width], &a1, how);
            put_strip(&mut y[2 * n + c..2 * n + c + width], &a2, how);
            put_strip(&mut y[3 * n + c..3 * n + c + width], &a3, how);
        }
    }
}

/// Adds or writes the sums `acc` into the strip `y` (W values, or fewer for the last strip).
#[inline(always)]
fn put_strip<A: Acc, const W: usize>(y: &mut [A], acc: &[A; W], how: Combine) {
    if let Ok(y) = <&mut [A; W]>::try_from(&mut *y) {
        for l in 0..W {
            y[l] = match how {
                Combine::Add => y[l] + acc[l],
                Combine::Overwrite => acc[l],
            };
        }
    } else {
        // A copy for the indexing by a variable: on `acc` itself, it would keep the caller's
        // accumulators in memory (read and written around every strip's loop).
        let acc = *acc;
        for (v, &a) in y.iter_mut().zip(&acc) {
            *v = match how {
                Combine::Add => *v + a,
                Combine::Overwrite => a,
            };
        }
    }
}

/// Rows whose outer products a backward task gathers before adding them to its dAᵀ and dB
/// (a multiple of [`GROUP`]). Added group by group, each group of four rows would read and
/// write the whole of dAᵀ and dB (2·r·(K + N) values, 1 MiB at K = N = 4096, r = 16: more than
/// L2 along with the factors); a chunk's sums are instead gathered one column strip at a time
/// in registers (see [`add_outer_products`]), so that dAᵀ and dB pass through the caches once
/// per chunk.
const CHUNK: usize = 32;

/// One task's share of the backward pass: its partial parameter gradients and the chunk of
/// rows in flight.
struct BackwardTask<A> {
    /// Σ over this task's rows of `g ⊗ x`: dAᵀ, (r, K).
    dat: Packed<A>,
    /// Σ of `t ⊗ dy`: dB, (r, N).
    db: Packed<A>,
    /// The chunk's rows of x (converted, for storage types that need it).
    x: RowGroup<A>,
    /// The chunk's rows of dy.
    dy: RowGroup<A>,
    /// The chunk's projections `t = scale·x·A` and `g = scale·dy·Bᵀ`, (CHUNK × r) each.
    t: Vec<A>,
    g: Vec<A>,
    /// The chunk's first row and its number of rows so far.
    first: usize,
    rows: usize,
}

/// Gradients of `scale·(x·A)·B` given `dy`: returns `(dx, dAᵀ, dB)` with dx (M, K),
/// dAᵀ (r, K), dB (r, N). `dx_init`, when given, is added into dx before its single rounding
/// to `T` (the base layer's dx, kept in accumulation precision).
///
/// Per group of rows: `t = scale·x·A` and `g = scale·dy·Bᵀ` and the dx rows `g·Aᵀ`; per chunk
/// of rows, the outer products `g ⊗ x` and `t ⊗ dy` summed into the task's dAᵀ and dB.
///
/// `saved_t`, when given, is the forward pass's `t` (M, r) (see [`forward`]); otherwise `t`
/// is computed again here.
pub(crate) fn backward<T: Elem>(
    x: &[T],
    dy: &[T],
    f: &Factors<T::A>,
    dx_init: Option<&[T::A]>,
    saved_t: Option<&[T::A]>,
    rows: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (k, n, rank) = (f.k, f.n, f.rank);
    // Tasks of the forward's size in rows, though a row here costs about twice as much (g, dx
    // and two outer products, t too where not saved): each task also zeroes and hands back its
    // own dAᵀ and dB, and at the seed shapes fewer, larger tasks measured faster.
    let (dx, tasks) = build_row_groups_then::<T, _, GROUP>(
        rows,
        k,
        rows_per_task_for_work(forward_fmas_per_row(f)),
        || BackwardTask {
            dat: Packed::zeros(rank, k),
            db: Packed::zeros(rank, n),
            x: RowGroup::new(k, rank),
            dy: RowGroup::new(n, rank),
            t: vec![T::A::ZERO; CHUNK * rank],
            g: vec![T::A::ZERO; CHUNK * rank],
            first: 0,
            rows: 0,
        },
        #[inline(always)]
        |task, first, count, dxg, fma| match (fma, wide_tiles()) {
            (true, true) => {
                backward_group::<T, true, true>(task, x, dy, f, dx_init, saved_t, first, count, dxg)
            }
            (true, false) => backward_group::<T, true, false>(
                task, x, dy, f, dx_init, saved_t, first, count, dxg,
            ),
            (false, true) => backward_group::<T, false, true>(
                task, x, dy, f, dx_init, saved_t, first, count, dxg,
            ),
            (false, false) => backward_group::<T, false, false>(
                task, x, dy, f, dx_init, saved_t, first, count, dxg,
            ),
        },
        // The task's last chunk, short or not yet added.
        #[inline(always)]
        |task, fma| match (fma, wide_tiles()) {
            (true, true) => add_chunk::<T, true, true>(task, x, dy),
            (true, false) => add_chunk::<T, true, false>(task, x, dy),
            (false, true) => add_chunk::<T, false, true>(task, x, dy),
            (false, false) => add_chunk::<T, false, false>(task, x, dy),
        },
    );
    let mut dat = Packed::zeros(rank, k);
    let mut db = Packed::zeros(rank, n);
    for task in &tasks {
        dat.add_assign(&task.dat);
        db.add_assign(&task.db);
    }
    let mut dat_t = vec![T::from_acc(T::A::ZERO); rank * k];
    T::store(&dat.to_rows(), &mut dat_t);
    let mut db_t = vec![T::from_acc(T::A::ZERO); rank * n];
    T::store(&db.to_rows(), &mut db_t);
    (dx, dat_t, db_t)
}

/// The backward pass over rows `first..first + count`, writing their dx rows into `dxg`
/// (GROUP × K) and adding them to the task's chunk (whose outer products are added when it
/// is full).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_group<T: Elem, const FMA: bool, const WIDE: bool>(
    task: &mut BackwardTask<T::A>,
    x: &[T],
    dy: &[T],
    f: &Factors<T::A>,
    dx_init: Option<&[T::A]>,
    saved_t: Option<&[T::A]>,
    first: usize,
    count: usize,
    dxg: &mut [T::A],
) {
    let (k, rank) = (f.k, f.rank);
    if task.rows == 0 {
        task.first = first;
    }
    // Groups are whole but for a task's last one, so a group never straddles two chunks.
    let slot = task.rows;
    let proj = slot * rank..(slot + GROUP) * rank;
    let BackwardTask {
        x: xg,
        dy: dyg,
        t,
        g,
        ..
    } = &mut *task;
    let (t, g) = (&mut t[proj.clone()], &mut g[proj]);
    let xs = xg.load(x, first, count, slot);
    let dys = dyg.load(dy, first, count, slot);
    match saved_t {
        Some(saved) => {
            // Rows past `count` are zero rows: their projections are zero.
            t.fill(T::A::ZERO);
            t[..count * rank].copy_from_slice(&saved[first * rank..(first + count) * rank]);
        }
        None => project_group::<T::A, FMA, WIDE>(xs, &f.at, f.scale, t),
    }
    project_group::<T::A, FMA, WIDE>(dys, &f.b, f.scale, g);
    let how = match dx_init {
        Some(init) => {
            dxg[..count * k].copy_from_slice(&init[first * k..(first + count) * k]);
            Combine::Add
        }
        None => Combine::Overwrite,
    };
    combine_group::<T::A, FMA, WIDE>(g, &f.at, dxg, how);
    task.rows += count;
    if task.rows == CHUNK {
        add_chunk::<T, FMA, WIDE>(task, x, dy);
    }
}

/// Adds the outer products of the task's chunk, `g ⊗ x` and `t ⊗ dy`, to its dAᵀ and dB,
/// and empties the chunk.
#[inline(always)]
fn add_chunk<T: Elem, const FMA: bool, const WIDE: bool>(
    task: &mut BackwardTask<T::A>,
    x: &[T],
    dy: &[T],
) {
    let (count, first, rank) = (task.rows, task.first, task.dat.rows);
    if count == 0 {
        return;
    }
    let xs: [&[T::A]; CHUNK] = std::array::from_fn(|i| {
        if i < count {
            task.x.row(x, first + i, i)
        } else {
            &[]
        }
    });
    let dys: [&[T::A]; CHUNK] = std::array::from_fn(|i| {
        if i < count {
            task.dy.row(dy, first + i, i)
        } else {
            &[]
        }
    });
    add_outer_products::<T::A, FMA, WIDE>(&task.g[..count * rank], &xs[..count], &mut task.dat);
    add_outer_products::<T::A, FMA, WIDE>(&task.t[..count * rank], &dys[..count], &mut task.db);
    task.rows = 0;
}

/// `out_j += Σ_i coef[i·r + j]·rows_i` for the r rows `j` of the packed (r × len) `out`, with
/// `coef` (rows × r): column strip by column strip, each strip's sums for several ranks
/// (sixteen when `WIDE`, else eight, of 16 or 8 lanes) held in registers over all the rows,
/// so that `out` is read and written once.
#[inline(always)]
fn add_outer_products<A: Acc, const FMA: bool, const WIDE: bool>(
    coef: &[A],
    rows: &[&[A]],
    out: &mut Packed<A>,
) {
    let rank = out.rows;
    let mut j = 0;
    while j < rank {
        j += match (WIDE, rank - j) {
            (true, 16..) => outer_ranks::<A, FMA, 4, 4, 16>(coef, rows, out, j),
            (true, 8..) => outer_ranks::<A, FMA, 4, 2, 16>(coef, rows, out, j),
            (true, 4..) => outer_ranks::<A, FMA, 4, 1, 16>(coef, rows, out, j),
            (true, _) => outer_ranks::<A, FMA, 1, 1, 16>(coef, rows, out, j),
            (false, 8..) => outer_ranks::<A, FMA, 4, 2, 8>(coef, rows, out, j),
            (false, 4..) => outer_ranks::<A, FMA, 4, 1, 8>(coef, rows, out, j),
            (false, _) => outer_ranks::<A, FMA, 1, 1, 8>(coef, rows, out, j),
        };
    }
}

/// Ranks `j0..j0 + S·Q` of [`add_outer_products`] (S is 1 or 4), in strips of `L` columns
/// (`L` divides [`BLOCK`]); returns S·Q. The accumulators are S named sets of Q ranks, as in
/// `dots`: a single array of more ranks is vectorised across the ranks, with gathers and
/// scatters to the stack, instead of across the lanes.
#[inline(always)]
fn outer_ranks<A: Acc, const FMA: bool, const S: usize, const Q: usize, const L: usize>(
    coef: &[A],
    rows: &[&[A]],
    out: &mut Packed<A>,
    j0: usize,
) -> usize {
    let (rank, len) = (out.rows, out.len);
    for (b, block) in out.blocks_mut().enumerate() {
        for h in 0..BLOCK / L {
            let c = b * BLOCK + h * L;
            if c >= len {
                break;
            }
            // Set `s`'s accumulators, from and back to `block`.
            let load = |block: &[A], s: usize| -> [[A; L]; Q] {
                std::array::from_fn(|q| {
                    let at = (j0 + s * Q + q) * BLOCK + h * L;
                    block[at..at + L].try_into().unwrap()
                })
            };
            let store = |block: &mut [A], s: usize, acc: &[[A; L]; Q]| {
                for (q, a) in acc.iter().enumerate() {
                    let at = (j0 + s * Q + q) * BLOCK + h * L;
                    block[at..at + L].copy_from_slice(a);
                }
            };
            let mut a0 = load(block, 0);
            let (mut a1, mut a2, mut a3) = if S > 1 {
                (load(block, 1), load(block, 2), load(block, 3))
            } else {
                ([[A::ZERO; L]; Q], [[A::ZERO; L]; Q], [[A::ZERO; L]; Q])
            };
            if c + L <= len {
                for (i, row) in rows.iter().enumerate() {
                    // The rows' strips are a row apart, too many streams for the hardware
                    // prefetchers: ask for the strip PREFETCH columns ahead.
                    if let Some(ahead) = row.get(c + PREFETCH) {
                        simd::prefetch(ahead);
                    }
                    let xv = row[c..c + L].try_into().unwrap();
                    let sets = [&mut a0, &mut a1, &mut a2, &mut a3];
                    add_row::<A, FMA, S, Q, L>(sets, &coef[i * rank + j0..], xv);
                }
            } else {
                // The last, partial strip: zeros past `len` (the packed padding stays zero).
                for (i, row) in rows.iter().enumerate() {
                    let mut xv = [A::ZERO; L];
                    xv[..len - c].copy_from_slice(&row[c..len]);
                    let sets = [&mut a0, &mut a1, &mut a2, &mut a3];
                    add_row::<A, FMA, S, Q, L>(sets, &coef[i * rank + j0..], &xv);
                }
            }
            store(block, 0, &a0);
            if S > 1 {
                store(block, 1, &a1);
                store(block, 2, &a2);
                store(block, 3, &a3);
            }
        }
    }
    S * Q
}

/// How far ahead of the strip in work [`outer_ranks`] prefetches each row, in columns.
const PREFETCH: usize = 64;

/// `set_s[q] += cf[s·Q + q]·x` for the first S of the four sets of Q ranks.
#[inline(always)]
fn add_row<A: Acc, const FMA: bool, const S: usize, const Q: usize, const L: usize>(
    [a0, a1, a2, a3]: [&mut [[A; L]; Q]; 4],
    cf: &[A],
    x: &[A; L],
) {
    add_scaled::<A, FMA, Q, L>(a0, &cf[..Q], x);
    if S > 1 {
        add_scaled::<A, FMA, Q, L>(a1, &cf[Q..2 * Q], x);
        add_scaled::<A, FMA, Q, L>(a2, &cf[2 * Q..3 * Q], x);
        add_scaled::<A, FMA, Q, L>(a3, &cf[3 * Q..4 * Q], x);
    }
}

/// `acc[q] += cf[q]·x` for the Q ranks of a set of accumulators.
#[inline(always)]
fn add_scaled<A: Acc, const FMA: bool, const Q: usize, const L: usize>(
    acc: &mut [[A; L]; Q],
    cf: &[A],
    x: &[A; L],
) {
    let cf: &[A; Q] = cf.try_into().unwrap();
    for q in 0..Q {
        for l in 0..L {
            acc[q][l] = cf[q].madd::<FMA>(x[l], acc[q][l]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    /// Both register tilings (the AVX-512 one and the narrower one; which one a CPU runs is
    /// chosen at run time, so this test covers the other one too) against plain loops, for
    /// ranks that are and are not multiples of the tiles' rank counts and lengths around the
    /// 32-column blocks.
    #[test]
    fn both_tilings_match_plain_loops() {
        for rank in [1, 2, 3, 4, 5, 8, 9] {
            for len in [1, 7, 16, 31, 32, 33, 100] {
                let m_rows = values(rank * len, 1);
                let m = Packed::from_rows(&m_rows, rank, len);
                let xs_data = values(GROUP * len, 2);
                let xs: [&[f64]; GROUP] = std::array::from_fn(|i| &xs_data[i * len..(i + 1) * len]);
                let t: Vec<f64> = values(GROUP * rank, 3);
                let scale = 0.75;
                // t' = scale·xs·mᵀ and y = t·m, by plain loops.
                let mut want_t = vec![0.0; GROUP * rank];
                let mut want_y = vec![0.0; GROUP * len];
                for i in 0..GROUP {
                    for j in 0..rank {
                        let dot: f64 = (0..len).map(|c| xs[i][c] * m_rows[j * len + c]).sum();
                        want_t[i * rank + j] = scale * dot;
                    }
                    for c in 0..len {
                        want_y[i * len + c] = 1.0
                            + (0..rank)
                                .map(|j| t[i * rank + j] * m_rows[j * len + c])
                                .sum::<f64>();
                    }
                }
                for wide in [true, false] {
                    let mut got_t = vec![0.0; GROUP * rank];
                    let mut got_y = vec![1.0; GROUP * len];
                    if wide {
                        project_group::<f64, false, true>(xs, &m, scale, &mut got_t);
                        combine_group::<f64, false, true>(&t, &m, &mut got_y, Combine::Add);
                    } else {
                        project_group::<f64, false, false>(xs, &m, scale, &mut got_t);
                        combine_group::<f64, false, false>(&t, &m, &mut got_y, Combine::Add);
                    }
                    for (what, got, want) in [("x·A", &got_t, &want_t), ("t·B", &got_y, &want_y)]
                    {
                        for (g, w) in got.iter().zip(want.iter()) {
                            assert!(
                                (g - w).abs() <= 1e-12 * (1.0 + w.abs()),
                                "{what}, rank {rank}, length {len}, wide {wide}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Both tilings of [`add_outer_products`] against plain loops, for ranks around the tiles'
    /// rank counts (16, 8, 4, single), lengths around the strips and blocks, and row counts up
    /// to a whole chunk.
    #[test]
    fn outer_product_tilings_match_plain_loops() {
        for rank in [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 20, 33] {
            for len in [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100] {
                for count in [1, 3, 4, 5, CHUNK] {
                    let init = values(rank * len, 4);
                    let coef = values(count * rank, 5);
                    let rows_data = values(count * len, 6);
                    let rows: Vec<&[f64]> = rows_data.chunks_exact(len).collect();
                    let mut want = init.clone();
                    for j in 0..rank {
                        for c in 0..len {
                            for i in 0..count {
                                want[j * len + c] += coef[i * rank + j] * rows[i][c];
                            }
                        }
                    }
                    for wide in [true, false] {
                        let mut out = Packed::from_rows(&init, rank, len);
                        if wide {
                            add_outer_products::<f64, false, true>(&coef, &rows, &mut out);
                        } else {
                            add_outer_products::<f64, false, false>(&coef, &rows, &mut out);
                        }
                        for (g, w) in out.to_rows().iter().zip(&want) {
                            assert!(
                                (g - w).abs() <= 1e-12 * (1.0 + w.abs()),
                                "rank {rank}, length {len}, {count} rows, wide {wide}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// [`backward`] against plain loops over enough rows for several tasks of several chunks,
    /// each task ending in a short chunk whose last group is short; with and without the
    /// forward's `t` and a base dx, for a storage type read in place (f32) and one converted
    /// row by row (bf16).
    #[test]
    fn backward_matches_plain_loops() {
        fn check<T: Elem>(tol: f64) {
            let (k, n, scale) = (100, 70, 0.75);
            for (rows, rank) in [(1, 3), (37, 16), (700, 5), (700, 16)] {
                let round = |v: Vec<f64>| -> Vec<T> {
                    v.into_iter()
                        .map(|v| T::from_acc(T::A::from_f64(v)))
                        .collect()
                };
                let x = round(values(rows * k, 7));
                let dy = round(values(rows * n, 8));
                let at = round(values(rank * k, 9));
                let b = round(values(rank * n, 10));
                let f64s = |v: &[T]| -> Vec<f64> { v.iter().map(|&v| to_f64(v)).collect() };
                let (xf, dyf, atf, bf) = (f64s(&x), f64s(&dy), f64s(&at), f64s(&b));
                let init = values(rows * k, 11);
                let dot = |u: &[f64], v: &[f64]| u.iter().zip(v).map(|(a, b)| a * b).sum::<f64>();
                let proj = |m: &[f64], len: usize, fac: &[f64]| -> Vec<f64> {
                    (0..rows * rank)
                        .map(|e| {
                            let (i, j) = (e / rank, e % rank);
                            scale * dot(&m[i * len..][..len], &fac[j * len..][..len])
                        })
                        .collect()
                };
                let (t, g) = (proj(&xf, k, &atf), proj(&dyf, n, &bf));
                let outer = |coef: &[f64], m: &[f64], len: usize| -> Vec<f64> {
                    (0..rank * len)
                        .map(|e| {
                            let (j, c) = (e / len, e % len);
                            (0..rows).map(|i| coef[i * rank + j] * m[i * len + c]).sum()
                        })
                        .collect()
                };
                let (want_dat, want_db) = (outer(&g, &xf, k), outer(&t, &dyf, n));
                let f = factors(
                    FactorView {
                        data: &at,
                        strides: (k, 1),
                    },
                    FactorView {
                        data: &b,
                        strides: (n, 1),
                    },
                    rank,
                    k,
                    n,
                    scale,
                );
                let t_acc: Vec<T::A> = t.iter().map(|&v| T::A::from_f64(v)).collect();
                let init_acc: Vec<T::A> = init.iter().map(|&v| T::A::from_f64(v)).collect();
                for (saved, with_init) in [(false, false), (true, false), (true, true)] {
                    let (dx, dat, db) = backward(
                        &x,
                        &dy,
                        &f,
                        with_init.then_some(&init_acc[..]),
                        saved.then_some(&t_acc[..]),
                        rows,
                    );
                    let want_dx: Vec<f64> = (0..rows * k)
                        .map(|e| {
                            let (i, c) = (e / k, e % k);
                            let base = if with_init { init[e] } else { 0.0 };
                            base + (0..rank)
                                .map(|j| g[i * rank + j] * atf[j * k + c])
                                .sum::<f64>()
                        })
                        .collect();
                    for (what, got, want) in [
                        ("dx", dx, want_dx),
                        ("dAᵀ", dat, want_dat.clone()),
                        ("dB", db, want_db.clone()),
                    ] {
                        let norm = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
                        for (e, (&g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (to_f64(g) - w).abs() <= tol * norm,
                                "{what}[{e}], {rows} rows, rank {rank}, saved t {saved}, \
                                 init {with_init}: {} vs {w}",
                                to_f64(g)
                            );
                        }
                    }
                }
            }
        }
        fn to_f64<T: Elem>(v: T) -> f64 {
            candle_core::WithDType::to_f64(v)
        }
        check::<f32>(1e-5);
        check::<half::bf16>(2e-2);
    }
}

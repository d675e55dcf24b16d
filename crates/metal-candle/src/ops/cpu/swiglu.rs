//! SwiGLU `y = silu(g)·u`, element-wise. The backward pass writes both gradients in one loop,
//! `dg = dy·u·σ(g)·(1 + g·(1 − σ(g)))` and `du = dy·silu(g)`, reading each input once.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::simd::Acc;
use super::{row_in_acc, stream, with_widest_simd, Elem};

/// Elements converted to accumulation precision at a time: a few KiB per buffer, so that the
/// inputs, outputs and their conversions stay in L1.
const BLOCK: usize = 1024;
/// Elements per rayon task: enough work (as for the row kernels) to pay for the split.
const TASK: usize = 32 * 1024;

/// `silu(g)·u`
pub(crate) fn forward<T: Elem>(g: &[T], u: &[T]) -> Vec<T> {
    let [y] = build::<T, 2, 1>(
        [g, u],
        #[inline(always)]
        |[g, u], [y], fma| {
            if fma {
                forward_block::<T::A, true>(g, u, y)
            } else {
                forward_block::<T::A, false>(g, u, y)
            }
        },
    );
    y
}

/// `(dg, du)` for [`forward`] given the upstream gradient `dy`.
pub(crate) fn backward<T: Elem>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let [dg, du] = build::<T, 3, 2>(
        [g, u, dy],
        #[inline(always)]
        |[g, u, dy], [dg, du], fma| {
            if fma {
                backward_block::<T::A, true>(g, u, dy, dg, du)
            } else {
                backward_block::<T::A, false>(g, u, dy, dg, du)
            }
        },
    );
    (dg, du)
}

#[inline(always)]
fn forward_block<A: Acc, const FMA: bool>(g: &[A], u: &[A], y: &mut [A]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = g * sigmoid::<A, FMA>(g) * u;
    }
}

#[inline(always)]
fn backward_block<A: Acc, const FMA: bool>(g: &[A], u: &[A], dy: &[A], dg: &mut [A], du: &mut [A]) {
    for (((dg, du), (&g, &u)), &dy) in dg.iter_mut().zip(du).zip(g.iter().zip(u)).zip(dy) {
        let s = sigmoid::<A, FMA>(g);
        *du = dy * g * s;
        *dg = dy * u * s * (A::ONE + g * (A::ONE - s));
    }
}

/// `σ(g) = 1 / (1 + e^(−g))`, from `e^(−|g|)`: the exponential never overflows and has a
/// non-positive argument, so the f32 loops use the vectorisable `exp_nonpositive`.
#[inline(always)]
fn sigmoid<A: Acc, const FMA: bool>(g: A) -> A {
    let positive = g > A::ZERO;
    let e = (if positive { -g } else { g }).exp_nonpositive::<FMA>();
    let inv = A::ONE / (A::ONE + e);
    if positive {
        inv
    } else {
        e * inv
    }
}

/// Runs `f(inputs, outputs, fma)` over the `N` equally long inputs in blocks of [`BLOCK`]
/// elements in accumulation precision (tasks of [`TASK`] elements split across threads) and
/// returns the `K` outputs it fills. Outputs are never zeroed first (see `rows`); large ones are
/// written with streaming stores (see `stream`).
fn build<T: Elem, const N: usize, const K: usize>(
    inputs: [&[T]; N],
    f: impl Fn([&[T::A]; N], [&mut [T::A]; K], bool) + Sync,
) -> [Vec<T>; K] {
    let len = inputs[0].len();
    assert!(
        inputs.iter().all(|i| i.len() == len),
        "swiglu: inputs differ in length"
    );
    let streaming = stream::should_stream(K * len * std::mem::size_of::<T>());
    let mut outs: [Vec<T>; K] = std::array::from_fn(|_| Vec::with_capacity(len));
    {
        let mut chunks = outs
            .each_mut()
            .map(|o| o.spare_capacity_mut()[..len].chunks_mut(TASK));
        let tasks: Vec<[&mut [MaybeUninit<T>]; K]> = (0..len.div_ceil(TASK))
            .map(|_| {
                chunks
                    .each_mut()
                    .map(|c| c.next().expect("one chunk per task"))
            })
            .collect();
        tasks.into_par_iter().enumerate().for_each(|(t, mut task)| {
            let mut in_bufs: [Vec<T::A>; N] = std::array::from_fn(|_| vec![T::A::ZERO; BLOCK]);
            let mut out_bufs: [Vec<T::A>; K] = std::array::from_fn(|_| vec![T::A::ZERO; BLOCK]);
            let mut staging = Vec::new();
            let task_len = task[0].len();
            with_widest_simd(
                #[inline(always)]
                |fma| {
                    for at in (0..task_len).step_by(BLOCK) {
                        let n = BLOCK.min(task_len - at);
                        let from = t * TASK + at;
                        let mut i = 0;
                        let ins = in_bufs.each_mut().map(|buf| {
                            let row = row_in_acc(&inputs[i][from..from + n], &mut buf[..n]);
                            i += 1;
                            row
                        });
                        f(ins, out_bufs.each_mut().map(|b| &mut b[..n]), fma);
                        for (dst, src) in task.iter_mut().zip(&out_bufs) {
                            let (dst, src) = (&mut dst[at..at + n], &src[..n]);
                            if streaming {
                                T::store_uninit_streaming(src, dst, &mut staging);
                            } else {
                                T::store_uninit(src, dst);
                            }
                        }
                    }
                },
            );
            if streaming {
                stream::fence();
            }
        });
    }
    for o in &mut outs {
        // SAFETY: the tasks cover 0..len of every output exactly (chunks of TASK), the blocks
        // cover each task, and `store_uninit` wrote every element of each block (it asserts
        // equal lengths); a panic in `f` unwinds before this point.
        unsafe { o.set_len(len) };
    }
    outs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_formulas_across_blocks_and_tasks_in_every_type() {
        // Longer than one task, not a multiple of a block; g spans both signs and large |g|.
        let len = TASK + BLOCK + 7;
        let g: Vec<f64> = (0..len)
            .map(|i| ((i * 7919) % 4001) as f64 / 100.0 - 20.0)
            .collect();
        let u: Vec<f64> = (0..len)
            .map(|i| ((i * 31) % 17) as f64 / 4.0 - 2.0)
            .collect();
        let dy: Vec<f64> = (0..len)
            .map(|i| ((i * 13) % 11) as f64 / 5.0 - 1.0)
            .collect();
        let sig = |g: f64| 1.0 / (1.0 + (-g).exp());
        let y = forward(&g, &u);
        let (dg, du) = backward(&g, &u, &dy);
        for i in 0..len {
            let s = sig(g[i]);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * (1.0 + b.abs());
            assert!(close(y[i], g[i] * s * u[i]), "y[{i}]");
            assert!(close(du[i], dy[i] * g[i] * s), "du[{i}]");
            let want = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            assert!(close(dg[i], want), "dg[{i}]");
        }
        let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
        let u32_: Vec<f32> = u.iter().map(|&v| v as f32).collect();
        let y32 = forward(&g32, &u32_);
        let gb: Vec<half::bf16> = g32.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let ub: Vec<half::bf16> = u32_.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let yb = forward(&gb, &ub);
        for i in 0..len {
            assert!(
                (y32[i] as f64 - y[i]).abs() <= 1e-5 * (1.0 + y[i].abs()),
                "f32 y[{i}]"
            );
            let want =
                half::bf16::from_f32(gb[i].to_f32() * sig(gb[i].to_f64()) as f32 * ub[i].to_f32());
            assert!(
                (yb[i].to_f32() - want.to_f32()).abs() <= 1e-2 * (1.0 + want.to_f32().abs()),
                "bf16 y[{i}]"
            );
        }
        assert!(forward::<f32>(&[], &[]).is_empty());
    }
}

//! Row drivers: split a row-major tensor's rows across threads and build the output without
//! zeroing it first.
//!
//! A kernel writes each output row in accumulation precision into a scratch row that stays in
//! L1; the driver stores it, rounded, into the not-yet-initialised output. Outputs are never
//! pre-filled: at training sizes a zeroed allocation costs a whole extra write pass over
//! memory (a `memset`, or page faults on fresh pages), which on the CPU is as much as the op.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::stream;
use super::{with_widest_simd, Acc, Elem};

/// Number of rows handed to one rayon task: enough work (~32K elements) to pay for the split.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (32 * 1024 / row_len.max(1)).max(1)
}

/// Multiply-adds below which a task is not worth a thread of its own: about 60 µs of one
/// core's work. Handing a task to another thread means waking it, which on the shared 2-core
/// VMs this is developed on takes 10–40 µs and varies: the LoRA delta forward at 1×128×512,
/// rank 8 (1 M multiply-adds) took 33 µs at best in two tasks but 65 µs median, and 46–51 µs
/// median on the calling thread alone. Of 2^20, 2^21 and 2^22 (bench/results/cpu-2026-12-06/),
/// 2^21 was the fastest at the seed shapes, forward and backward.
const MIN_TASK_FMAS: usize = 1 << 21;

/// Rows per task for kernels that do `fmas_per_row` multiply-adds per row (the LoRA kernels,
/// whose rows cost r multiply-adds per element where a norm's cost a few operations).
pub(crate) fn rows_per_task_for_work(fmas_per_row: usize) -> usize {
    (MIN_TASK_FMAS / fmas_per_row.max(1)).max(1)
}

/// Splits `rows` rows into at most two tasks per thread and at least `min_rows` rows per
/// task (one task for small inputs), for kernels that keep per-task state such as partial
/// parameter gradients.
fn row_blocks(rows: usize, min_rows: usize) -> Vec<Range<usize>> {
    let threads = rayon::current_num_threads().max(1);
    let blocks = (rows / min_rows.max(1)).clamp(1, threads * 2);
    let per = rows.div_ceil(blocks);
    (0..rows)
        .step_by(per.max(1))
        .map(|s| s..(s + per).min(rows))
        .collect()
}

/// Builds a `rows × row_len` output in parallel blocks of rows. Each block gets a state from
/// `init`; `row(state, r, out, fma)` (an `#[inline(always)]` closure, so that it is compiled for the
/// CPU's widest vectors: see [`with_widest_simd`]) must fill `out` (row `r`, in accumulation precision, arriving
/// with unspecified contents) and may update the state. Returns the output and every block's
/// final state, in block order (for reductions across rows). Large outputs are written with
/// streaming stores (see `stream`).
pub(crate) fn build_rows<T: Elem, S: Send>(
    rows: usize,
    row_len: usize,
    init: impl Fn() -> S + Sync,
    row: impl Fn(&mut S, usize, &mut [T::A], bool) + Sync,
) -> (Vec<T>, Vec<S>) {
    build_row_groups::<T, S, 1>(
        rows,
        row_len,
        rows_per_task(row_len),
        init,
        #[inline(always)]
        |state, r, _count, out, fma| row(state, r, out, fma),
    )
}

/// [`build_rows`] for kernels that work on `G` rows at a time (so that each load of a shared
/// operand serves `G` rows): `group(state, first, count, out, fma)` must fill the first
/// `count` rows (1 ≤ count ≤ G; fewer than G only at the end of a block) of `out`,
/// `G × row_len` values holding rows `first..first + count` in order. Blocks have at least
/// `min_rows` rows (see [`rows_per_task`], [`rows_per_task_for_work`]).
pub(crate) fn build_row_groups<T: Elem, S: Send, const G: usize>(
    rows: usize,
    row_len: usize,
    min_rows: usize,
    init: impl Fn() -> S + Sync,
    group: impl Fn(&mut S, usize, usize, &mut [T::A], bool) + Sync,
) -> (Vec<T>, Vec<S>) {
    build_row_groups_then::<T, S, G>(rows, row_len, min_rows, init, group, |_, _| {})
}

/// [`build_row_groups`], then `finish(state, fma)` (`#[inline(always)]` too) once per block
/// after its last group, still on the block's thread: for kernels that gather work over
/// several groups (see `lora::backward`) and must complete what is pending.
pub(crate) fn build_row_groups_then<T: Elem, S: Send, const G: usize>(
    rows: usize,
    row_len: usize,
    min_rows: usize,
    init: impl Fn() -> S + Sync,
    group: impl Fn(&mut S, usize, usize, &mut [T::A], bool) + Sync,
    finish: impl Fn(&mut S, bool) + Sync,
) -> (Vec<T>, Vec<S>) {
    let streaming = stream::should_stream(rows * row_len * std::mem::size_of::<T>());
    let blocks = row_blocks(rows, min_rows);
    build_row_groups_with::<T, S, G>(row_len, &blocks, streaming, init, group, finish)
}

/// [`build_row_groups_then`] over the given blocks (consecutive ranges from row 0) with the
/// store kind chosen by the caller (tests cover both on small sizes, and one block and many).
fn build_row_groups_with<T: Elem, S: Send, const G: usize>(
    row_len: usize,
    blocks: &[Range<usize>],
    streaming: bool,
    init: impl Fn() -> S + Sync,
    group: impl Fn(&mut S, usize, usize, &mut [T::A], bool) + Sync,
    finish: impl Fn(&mut S, bool) + Sync,
) -> (Vec<T>, Vec<S>) {
    let rows = blocks.last().map_or(0, |b| b.end);
    let len = rows * row_len;
    let mut out: Vec<T> = Vec::with_capacity(len);
    let mut block_outs: Vec<&mut [MaybeUninit<T>]> = Vec::with_capacity(blocks.len());
    let mut rest = &mut out.spare_capacity_mut()[..len];
    for b in blocks {
        let (head, tail) = rest.split_at_mut(b.len() * row_len);
        block_outs.push(head);
        rest = tail;
    }
    let run_block = |(range, block_out): (Range<usize>, &mut [MaybeUninit<T>])| {
        let mut state = init();
        let mut acc = vec![T::A::ZERO; G * row_len];
        let mut staging = Vec::new();
        with_widest_simd(
            #[inline(always)]
            |fma| {
                for first in range.clone().step_by(G) {
                    let count = G.min(range.end - first);
                    group(&mut state, first, count, &mut acc, fma);
                    let at = (first - range.start) * row_len;
                    let out_rows = &mut block_out[at..at + count * row_len];
                    let values = &acc[..count * row_len];
                    if streaming {
                        T::store_uninit_streaming(values, out_rows, &mut staging);
                    } else {
                        T::store_uninit(values, out_rows);
                    }
                }
                finish(&mut state, fma);
            },
        );
        if streaming {
            stream::fence();
        }
        state
    };
    // One block runs on the calling thread: through rayon's pool it would wait for a worker
    // to wake up and take it (see `MIN_TASK_FMAS`).
    let states: Vec<S> = if blocks.len() == 1 {
        blocks
            .iter()
            .cloned()
            .zip(block_outs)
            .map(run_block)
            .collect()
    } else {
        blocks
            .par_iter()
            .cloned()
            .zip(block_outs)
            .map(run_block)
            .collect()
    };
    // SAFETY: the blocks cover rows 0..rows exactly, the groups cover each block, and
    // `store_uninit` wrote every element of each group's rows (it asserts equal lengths); a
    // panic in `group` unwinds before this point.
    unsafe { out.set_len(len) };
    (out, states)
}

/// `out_row = f(input_row)` for every row, in parallel (`f` `#[inline(always)]`, as for
/// [`build_rows`]): `f(x, y, fma)` gets the input row in
/// accumulation precision (borrowed without a copy where the storage type is the
/// accumulation type) and fills `y`.
pub(crate) fn map_rows<T: Elem>(
    input: &[T],
    row_len: usize,
    f: impl Fn(&[T::A], &mut [T::A], bool) + Sync,
) -> Vec<T> {
    if row_len == 0 {
        return Vec::new();
    }
    let rows = input.len() / row_len;
    let (out, _) = build_rows::<T, Vec<T::A>>(
        rows,
        row_len,
        || vec![T::A::ZERO; row_len],
        #[inline(always)]
        |xbuf, r, y, fma| {
            f(
                row_in_acc(&input[r * row_len..(r + 1) * row_len], xbuf),
                y,
                fma,
            )
        },
    );
    out
}

/// `src` in accumulation precision: `src` itself where the types agree, else loaded into `buf`.
#[inline(always)]
pub(crate) fn row_in_acc<'a, T: Elem>(src: &'a [T], buf: &'a mut [T::A]) -> &'a [T::A] {
    match T::as_acc(src) {
        Some(row) => row,
        None => {
            T::load(src, buf);
            buf
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_rows_fills_every_row_and_returns_block_states_in_order() {
        fn check<T: Elem + PartialEq + std::fmt::Debug>(streaming: bool) {
            check_groups::<T, 1>(streaming);
            check_groups::<T, 3>(streaming);
            check_groups::<T, 4>(streaming);
        }
        fn check_groups<T: Elem + PartialEq + std::fmt::Debug, const G: usize>(streaming: bool) {
            // (rows, row_len, min rows per block): one block, or several (up to two per thread).
            let cases = [
                (0usize, 3usize, 1usize),
                (1, 1, 1),
                (7, 5, 1),
                (7, 5, 7),
                (1000, 33, 1),
                (1000, 33, 1000),
                (3, 40_000, 1),
            ];
            for (rows, row_len, min_rows) in cases {
                let value = |i: usize| T::from_acc(T::A::from_usize(i % 251));
                // The state: the rows seen, and whether `finish` ran (after them all).
                let blocks = row_blocks(rows, min_rows);
                let one_block = rows > 0 && min_rows >= rows;
                assert_eq!(
                    one_block,
                    blocks.len() == 1,
                    "{rows} rows, min {min_rows}: {blocks:?}"
                );
                let (out, states) = build_row_groups_with::<T, (Vec<usize>, bool), G>(
                    row_len,
                    &blocks,
                    streaming,
                    || (Vec::new(), false),
                    |(seen, finished), first, count, y, _fma| {
                        assert!((1..=G).contains(&count), "group of {count} rows, G = {G}");
                        assert!(!*finished, "a group after `finish`");
                        for r in first..first + count {
                            seen.push(r);
                            let at = (r - first) * row_len;
                            for (c, v) in y[at..at + row_len].iter_mut().enumerate() {
                                *v = value(r * row_len + c).to_acc();
                            }
                        }
                    },
                    |(_, finished), _fma| {
                        assert!(!*finished, "`finish` twice");
                        *finished = true;
                    },
                );
                let expected: Vec<T> = (0..rows * row_len).map(value).collect();
                assert_eq!(out, expected, "{rows}x{row_len} streaming={streaming}");
                assert!(
                    states.iter().all(|s| s.1),
                    "{rows}x{row_len}: a block not finished"
                );
                let order: Vec<usize> = states.into_iter().flat_map(|s| s.0).collect();
                assert_eq!(order, (0..rows).collect::<Vec<_>>(), "{rows}x{row_len}");
            }
        }
        for streaming in [false, true] {
            check::<f32>(streaming);
            check::<f64>(streaming);
            check::<half::bf16>(streaming);
            check::<half::f16>(streaming);
        }
    }

    #[test]
    fn large_outputs_stream_and_small_ones_do_not() {
        assert!(!stream::should_stream(stream::STREAM_MIN_BYTES - 1));
        assert!(stream::should_stream(stream::STREAM_MIN_BYTES));
        // A streamed output through the public driver, bf16 (staged) and f32 (direct).
        let row_len = 4099;
        let rows = stream::STREAM_MIN_BYTES / (2 * row_len) + 1;
        let x: Vec<half::bf16> = (0..rows * row_len)
            .map(|i| half::bf16::from_f32((i % 97) as f32))
            .collect();
        let y = map_rows(&x, row_len, |row, out, _fma| out.copy_from_slice(row));
        assert_eq!(y, x);
        let x32: Vec<f32> = x.iter().map(|v| v.to_f32() + 0.5).collect();
        assert_eq!(
            map_rows(&x32, row_len, |row, out, _| out.copy_from_slice(row)),
            x32
        );
    }

    #[test]
    fn map_rows_rounds_each_row_once_to_the_storage_type() {
        let x: Vec<half::bf16> = (0..12).map(|i| half::bf16::from_f32(i as f32)).collect();
        let y = map_rows(&x, 4, |row, out, _fma| {
            for (o, &v) in out.iter_mut().zip(row) {
                *o = v / 3.0;
            }
        });
        let expected: Vec<half::bf16> = (0..12)
            .map(|i| half::bf16::from_f32(i as f32 / 3.0))
            .collect();
        assert_eq!(y, expected);
    }
}

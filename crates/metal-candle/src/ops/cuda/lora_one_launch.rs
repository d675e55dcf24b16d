//! The LoRA term `scale·(x·A)·B (+ bias)` in one kernel launch, for problems small enough
//! that launching, not arithmetic, sets the time (the seed's shapes: 1×128×{512,1024,2048},
//! r = 8). Two kernels of kernels/lora.cu: `lora_vec` (16-byte packs throughout, one row per
//! block) where the layouts allow, else `lora_small` (any strides).
//!
//! A third, `lora_cluster` (commit b6c86e5), split each row's work over a cluster of 8 blocks
//! on sm_90 so that A and B passed through L2 once per cluster rather than once per row. It
//! passed the GPU tests and ran slower on an H100: 24.9 µs against 17.3 from call to result at
//! f32 1×128×2048, 14.9 µs against 7.2 per queued call (bench/results/gpu-2026-12-07-session15).

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;

use super::common::{
    aligned16, element_strides, fit_threads, load, sm_count, Elem, Matrix, LORA_PTX,
};

const MODULE: &str = "metal_candle_lora";

/// The most rows one block of `lora_small` takes (`MAX_ROWS` in lora.cu).
const SMALL_MAX_ROWS: usize = 4;
/// `lora_small` keeps r partial sums per row and thread in registers (variants for r ≤ 8
/// and r ≤ 16).
const SMALL_MAX_RANK: usize = 16;

/// Whether the one-launch kernels serve this problem: small enough that launch overhead, not
/// the arithmetic, dominates (the seed's shapes: 128 × 2048 × 8 is 2 M multiply-adds).
pub(super) fn serves(m: usize, k: usize, r: usize, n: usize) -> bool {
    m > 0
        && r <= SMALL_MAX_RANK
        && m * k * r <= 1 << 22
        && m * n * r <= 1 << 22
        && k < i32::MAX as usize
}

/// x, A (as a matrix and its data), B likewise, and the bias.
pub(super) type SmallArgs<'a, 'b, T> = (
    &'a CudaView<'b, T>,
    &'a Matrix<'a>,
    &'a CudaView<'b, T>,
    &'a Matrix<'a>,
    &'a CudaView<'b, T>,
    Option<&'a CudaView<'b, T>>,
);

/// `y = scale·(x·A)·B (+ bias)` (y dense, m × n) in one launch: `lora_vec` where the layouts
/// allow, else `lora_small`, which takes any strides.
pub(super) fn launch<T: Elem>(
    dev: &CudaDevice,
    args: SmallArgs<'_, '_, T>,
    y: &mut CudaSlice<T>,
    dims: (usize, usize, usize, usize),
    scale: f32,
) -> Result<()> {
    if launch_vec::<T>(dev, args, y, dims, scale)? {
        return Ok(());
    }
    launch_small::<T>(dev, args, y, dims, scale)
}

/// Pushes the arguments both kernels take first: x, A, B and the bias (`null`, a zero
/// pointer, without one).
fn push_operands<'a, T: Elem>(
    l: &mut LaunchArgs<'a>,
    xv: &'a CudaView<'_, T>,
    av: &'a CudaView<'_, T>,
    bv: &'a CudaView<'_, T>,
    bias: Option<&'a CudaView<'_, T>>,
    null: &'a u64,
) {
    l.arg(xv).arg(av).arg(bv);
    match bias {
        Some(bias) => l.arg(bias),
        None => l.arg(null),
    };
}

/// `y = scale·(x·A)·B (+ bias)` in one launch (`lora_small` in lora.cu).
fn launch_small<T: Elem>(
    dev: &CudaDevice,
    (xv, a, av, b, bv, bias): SmallArgs<'_, '_, T>,
    y: &mut CudaSlice<T>,
    (m, k, r, n): (usize, usize, usize, usize),
    scale: f32,
) -> Result<()> {
    let ((sa0, sa1), (sb0, sb1)) = (element_strides(a), element_strides(b));
    let (sa0, sa1, sb0, sb1) = (sa0 as i64, sa1 as i64, sb0 as i64, sb1 as i64);
    let variant = if r <= 8 { 8 } else { 16 };
    let f = load(
        dev,
        &format!("lora_small_r{variant}_{}", T::NAME),
        MODULE,
        LORA_PTX,
    )?;
    // One row per block while the rows alone fill the GPU, up to 4 when there are many (each
    // block then reads A and B once for several rows).
    let rows_per_block = (m / sm_count(dev)? as usize).clamp(1, SMALL_MAX_ROWS);
    // About four k (and n) elements per thread: all of a thread's loads go out together.
    // Lowered (in whole warps) to what the kernel's register use allows.
    let threads = fit_threads(
        &f,
        (k.max(n).div_ceil(4).div_ceil(32) * 32).clamp(64, 512) as u32,
    )?;
    let (m_i, k_i, r_i, n_i) = (m as i32, k as i32, r as i32, n as i32);
    let rpb_i = rows_per_block as i32;
    let null = 0u64;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    push_operands(&mut l, xv, av, bv, bias, &null);
    l.arg(y)
        .arg(&m_i)
        .arg(&k_i)
        .arg(&r_i)
        .arg(&n_i)
        .arg(&rpb_i)
        .arg(&sa0)
        .arg(&sa1)
        .arg(&sb0)
        .arg(&sb1)
        .arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (m.div_ceil(rows_per_block) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x holds m·k, A k·r, B r·n, bias n (or null), y m·n elements, addressed by the
    // strides above; r ≤ the variant's rank, rows_per_block ≤ 4 and threads ≤ 1024 (a
    // multiple of 32) as the kernel requires.
    unsafe { l.launch(cfg) }.w()?;
    Ok(())
}

/// `y = scale·(x·A)·B (+ bias)` in one launch of `lora_vec` (lora.cu), when its layouts hold:
/// A (k, r) and B (r, n) stored row-major and dense, r = 8 or 16 (a row of A is whole 16-byte
/// packs), k and n whole packs that one block's threads cover (one pack each), every operand
/// 16-byte aligned. Returns `false`, launching nothing, otherwise (`lora_small` then serves).
fn launch_vec<T: Elem>(
    dev: &CudaDevice,
    (xv, a, av, b, bv, bias): SmallArgs<'_, '_, T>,
    y: &mut CudaSlice<T>,
    (m, k, r, n): (usize, usize, usize, usize),
    scale: f32,
) -> Result<bool> {
    let width = T::VEC;
    let dense_rows = |mat: &Matrix<'_>, cols: usize| !mat.trans && mat.ld == cols;
    if !(r == 8 || r == 16)
        || r % width != 0
        || k % width != 0
        || n % width != 0
        || !dense_rows(a, r)
        || !dense_rows(b, n)
    {
        return Ok(false);
    }
    let aligned = aligned16(xv, dev)
        && aligned16(av, dev)
        && aligned16(bv, dev)
        && bias.is_none_or(|v| aligned16(v, dev))
        && aligned16(&y.slice(..), dev);
    if !aligned {
        return Ok(false);
    }
    let f = load(dev, &format!("lora_vec_r{r}_{}", T::NAME), MODULE, LORA_PTX)?;
    let packs = (k / width).max(n / width);
    let threads = (packs.div_ceil(32) * 32).max(64);
    if threads > fit_threads(&f, 1024)? as usize {
        return Ok(false);
    }
    let (k_i, n_i) = (k as i32, n as i32);
    let null = 0u64;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    push_operands(&mut l, xv, av, bv, bias, &null);
    l.arg(y).arg(&k_i).arg(&n_i).arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (m as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x holds m·k, A k·r, B r·n, bias n (or null), y m·n elements, all 16-byte aligned,
    // A and B dense row-major; k/V and n/V ≤ threads ≤ what the kernel can launch; m < 2³¹
    // blocks (the caller's size limits keep m·k·r ≤ 2²²).
    unsafe { l.launch(cfg) }.w()?;
    Ok(true)
}

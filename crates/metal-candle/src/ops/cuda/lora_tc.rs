//! Launches of the tensor-core LoRA kernels (`kernels/lora_tc.cu`) that replace cuBLAS for the
//! LoRA linear layer's thin products at large sizes, bf16 and f16 on sm_80 and later:
//!
//! - [`outer`]: `y = alpha·L·Rᵀ (+ bias) (+ C)`, rank ≤ 32: the forward's `T·B`, the
//!   backward's `G·Aᵀ`, written at 80% of the memory's write rate (cuBLAS: 70% at 16384 × 4096,
//!   r = 16, on an H200), and the merged weight `W + scale·Bᵀ·Aᵀ` (C = W) of the LoRA linear
//!   forward and backward (see [`merge_pays`]).
//! - [`DyGrads`]: `G = dy·Bᵀ` and `dB = Tᵀ·dy` from one read of dy (cuBLAS reads it twice),
//!   rank ≤ 16.
//!
//! `dA = scale·xᵀ·G` stays with cuBLAS, which ran it faster than a kernel of this kind did.
//!
//! Each `*_fits` function says whether its kernel serves a problem; the callers fall back to
//! cuBLAS otherwise (f32, other ranks, rows not whole 16-byte packs, older GPUs).

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Result};

use super::common::{
    aligned16, alloc_out, allow_dynamic_smem, load, sm_count, tensor_cores, Elem, Kernel,
    LORA_TC_PTX,
};

const MODULE: &str = "metal_candle_lora_tc";
/// Output columns per warp in both kernels (`64` in lora_tc.cu).
const STRIP: usize = 64;
/// Columns per block of the gradient kernels (eight warps).
const SLAB: usize = 512;
/// Rows per mma tile.
const TILE_ROWS: usize = 16;
/// The most row tiles each warp of `lora_outer` writes (it loads its R fragments once for all
/// of them); fewer where that leaves the GPU short of warps.
const OUTER_TILES: usize = 8;
/// Warps per SM that `lora_outer`'s grid aims for before giving a warp more than one tile.
const OUTER_WARPS_PER_SM: usize = 32;
/// The fewest rows a block of `lora_dy_grads` takes: its setup (B's fragments, the ring's
/// first stages) and its partial sums (16·n floats per block) are paid once per block.
const GRAD_MIN_ROWS: usize = 256;
/// Warps per block of `lora_outer`.
const OUTER_WARPS: usize = 4;
/// Dynamic shared memory of the gradient kernels: their ring of `GRAD_STAGES` (lora_tc.cu)
/// stages of 20 KiB (eight warps, five 16-byte copies per lane).
const GRAD_RING_BYTES: usize = 4 * 8 * 5 * 32 * 16;
/// The leading dimension of the projections T and of G for the gradient kernels (`L_LD` in
/// lora_tc.cu): a row of up to 16 ranks in 32 bytes, which the kernels copy in 16-byte pieces.
/// Columns past the rank may hold anything.
pub(super) const PROJ_LD: usize = 16;

/// A matrix operand read through its strides: element (i, j) at `i·s0 + j·s1`.
pub(super) struct Strided<'a, 'b, T> {
    pub(super) data: &'a CudaView<'b, T>,
    pub(super) s0: usize,
    pub(super) s1: usize,
}

// By hand: a derive would ask T: Copy, which a reference to T's buffer does not need.
impl<T> Clone for Strided<'_, '_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Strided<'_, '_, T> {}

fn half_precision(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

fn fits_i32(values: &[usize]) -> bool {
    values.iter().all(|&v| v <= i32::MAX as usize)
}

/// Whether [`outer`] serves an output of `n` columns at rank `r` in `dtype` on `dev`.
pub(super) fn outer_fits(
    dev: &CudaDevice,
    dtype: DType,
    m: usize,
    n: usize,
    r: usize,
) -> Result<bool> {
    Ok(half_precision(dtype)
        && (1..=32).contains(&r)
        && n.is_multiple_of(8)
        && fits_i32(&[m, n])
        && tensor_cores(dev)?)
}

/// The leading dimension the projections T of rank `r` get: [`PROJ_LD`] where the gradient
/// kernels may read them, else `r`.
pub(super) fn projection_ld(dev: &CudaDevice, dtype: DType, r: usize) -> Result<usize> {
    Ok(
        if half_precision(dtype) && r <= PROJ_LD && tensor_cores(dev)? {
            PROJ_LD
        } else {
            r
        },
    )
}

/// Whether [`dy_grads`] serves `dy` (m, n) at rank `r`.
///
/// Only where the grid is full (two blocks per SM) of blocks of at least [`GRAD_MIN_ROWS`] rows:
/// with this kernel at every size (and the outer kernel's 8 row tiles per warp whatever the
/// size), one H200 lease measured SmolLM2-135M training (4096 tokens per step) at 76.7k tokens/s
/// against 85.4k for cuBLAS; with these limits, no loss.
pub(super) fn grads_fit<T: Elem>(
    dev: &CudaDevice,
    (m, n, r): (usize, usize, usize),
    dy: &CudaView<'_, T>,
) -> Result<bool> {
    if !(half_precision(T::DTYPE) && (1..=16).contains(&r) && n.is_multiple_of(8)) {
        return Ok(false);
    }
    let blocks = n.div_ceil(SLAB) * (m / GRAD_MIN_ROWS);
    Ok(blocks >= 2 * sm_count(dev)? as usize
        && fits_i32(&[m, n])
        && aligned16(dy, dev)
        && tensor_cores(dev)?)
}

/// Whether a LoRA linear pass should run its GEMM through the merged weight
/// `W' = W + scale·Bᵀ·Aᵀ` (out × in), written by [`outer`], rather than accumulate onto a
/// low-rank term of `rows × other` elements that it writes first: merging reads W and writes
/// W' (2·out·in elements) where the low-rank term is written and read back by the GEMM's
/// beta = 1 (about rows·other elements each, the read partly hidden in the GEMM), so it pays
/// once `other` (the layer's outputs for the backward's dx, its inputs for the forward's y) is
/// no more than the batch's rows. An H200, bf16, m 16384, in = out = 4096, r = 16: the
/// backward's time over the dX GEMM alone went from 1.193× to 1.167× (bench/kernel-lab/tclab.cu).
/// W' is rounded to the dtype once, so the result differs from the unmerged sum by about half a
/// unit in the last place (relative L2 3.4e-3 for dx in bf16), the size of its own rounding.
pub(super) fn merge_pays(rows: usize, other: usize) -> bool {
    other <= rows
}

/// The fewest elements of `y` (rows × outputs) for which the LoRA linear forward merges:
/// below it, what merging saves (writing the low-rank term into y and reading it back, about
/// 2·m·n elements of traffic) is a few microseconds at most, no more than the merge costs in
/// launches and the side stream's fork and join. Measured on an H100, bf16, batch 8 × 512, LoRA
/// r 16 on every projection: SmolLM2-135M (m·n at most 4096 × 1536) trained at 64.6k tokens/s
/// with every forward merged and 70.5k with none; Llama-3.2-1B (m·n from 4096 × 512 to 4096 ×
/// 8192) at 51.5k merged and 51.0k unmerged (bench/results/gpu-2026-12-07-session15).
pub(super) const FORWARD_MERGE_MIN_OUTPUTS: usize = 1 << 23;

/// [`merge_pays`] for the LoRA linear forward (y = x·W'ᵀ, W' out × in): the batch has at least
/// as many rows as the layer has inputs, and y is large enough (see
/// [`FORWARD_MERGE_MIN_OUTPUTS`]).
pub(super) fn forward_merge_pays(rows: usize, inputs: usize, outputs: usize) -> bool {
    merge_pays(rows, inputs) && rows.saturating_mul(outputs) >= FORWARD_MERGE_MIN_OUTPUTS
}

/// `y = alpha·L·Rᵀ + bias` or `alpha·L·Rᵀ + addend` into `y` (m, n) dense: L (m, r) and R (n, r)
/// through their strides (L's column stride must be 1 without an addend: the plain kernel takes
/// rows), `bias` n elements, `addend` (m, n) dense and 16-byte aligned. The caller checked
/// [`outer_fits`] (and the addend's layout).
#[allow(clippy::too_many_arguments)]
pub(super) fn outer<T: Elem>(
    dev: &CudaDevice,
    lm: Strided<'_, '_, T>,
    rm: Strided<'_, '_, T>,
    bias: Option<&CudaView<'_, T>>,
    addend: Option<&CudaView<'_, T>>,
    y: &mut CudaSlice<T>,
    (m, n, r): (usize, usize, usize),
    alpha: f32,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    // The kernel with the addend takes no bias; the one without reads L in rows.
    if addend.is_some() && bias.is_some() {
        candle_core::bail!("lora outer: a bias and an addend together are not supported")
    }
    if addend.is_none() && lm.s1 != 1 {
        candle_core::bail!("lora outer: L needs rows of consecutive ranks without an addend")
    }
    let chunks = if r <= 16 { 1 } else { 2 };
    // The addend has its own kernel (a template argument in lora_tc.cu): the plain one keeps
    // its registers, and with them its occupancy.
    let kind = if addend.is_some() {
        "lora_outer_add"
    } else {
        "lora_outer"
    };
    let f = load(
        dev,
        &format!("{kind}_k{chunks}_{}", T::NAME),
        MODULE,
        LORA_TC_PTX,
    )?;
    let (ld_l, l_col, rc, rk) = (lm.s0 as i64, lm.s1 as i64, rm.s0 as i64, rm.s1 as i64);
    // Row tiles per warp: as many as the GPU has warps to spare for, so that a medium problem
    // (a small model's layer) still spreads over every SM.
    let warp_tiles = n.div_ceil(STRIP) * m.div_ceil(TILE_ROWS);
    let target = sm_count(dev)? as usize * OUTER_WARPS_PER_SM;
    let tiles = (warp_tiles / target).clamp(1, OUTER_TILES);
    let (m_i, n_i, r_i, tiles_i) = (m as i32, n as i32, r as i32, tiles as i32);
    let null = 0u64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(lm.data)
        .arg(&ld_l)
        .arg(&l_col)
        .arg(rm.data)
        .arg(&rc)
        .arg(&rk);
    for v in [bias, addend] {
        match v {
            Some(v) => b.arg(v),
            None => b.arg(&null),
        };
    }
    b.arg(y)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&r_i)
        .arg(&tiles_i)
        .arg(&alpha);
    let cfg = LaunchConfig {
        grid_dim: (
            n.div_ceil(STRIP * OUTER_WARPS) as u32,
            m.div_ceil(TILE_ROWS * tiles) as u32,
            1,
        ),
        block_dim: (32 * OUTER_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: L and R hold m·r and n·r elements at the given strides, bias n
    // (or null), the addend m·n elements 16-byte aligned (or null), y m·n elements, 16-byte
    // aligned (a fresh allocation), n % 8 == 0, r ≤ 32; the grid covers m and n as the kernel
    // expects.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Loads gradient kernel `name` with its ring's shared memory allowed. Every sm_80 or later GPU
/// (which [`grads_fit`] asked for) allows it; an error here means a device that does not.
fn grad_kernel<T: Elem>(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let f = load(dev, &format!("{name}_{}", T::NAME), MODULE, LORA_TC_PTX)?;
    if !allow_dynamic_smem(dev, &f, GRAD_RING_BYTES)? {
        candle_core::bail!(
            "{name}: the device does not allow {GRAD_RING_BYTES} bytes of shared memory per block"
        )
    }
    Ok(f)
}

/// Row chunks of the gradient kernels: two blocks per SM in all (the kernel's registers allow
/// two), each chunk a whole number of 16-row tiles. Returns (chunks, rows per chunk).
fn row_chunks(dev: &CudaDevice, m: usize, slabs: usize) -> Result<(usize, usize)> {
    let wanted = (2 * sm_count(dev)? as usize).div_ceil(slabs).max(1);
    let rows = m.div_ceil(wanted).div_ceil(TILE_ROWS).max(1) * TILE_ROWS;
    Ok((m.div_ceil(rows).max(1), rows))
}

/// One sum of partial products as the kernel takes it (`PartSum` in lora_tc.cu, same layout):
/// `out[i·oi + j·oj] = scale · Σ_s P[s][i][j]` for i < iu, j < ju, P (S, I, J) dense f32.
#[repr(C)]
#[derive(Clone, Copy)]
struct PartSum {
    parts: u64,
    out: u64,
    oi: i64,
    oj: i64,
    s: i32,
    i: i32,
    j: i32,
    iu: i32,
    ju: i32,
    scale: f32,
}

// SAFETY: a plain #[repr(C)] struct of integers and floats, laid out as the kernel's PartSum.
unsafe impl DeviceRepr for PartSum {}

/// G's and dB's sums, one launch (`sum_two_parts`): `g_parts` (slabs, m, 16) into G
/// (m, [`PROJ_LD`]), `db_parts` (chunks, 16, n) into dB's first r rows.
#[allow(clippy::too_many_arguments)]
fn sum_two_parts<T: Elem>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    (g_parts, slabs): (&CudaSlice<f32>, usize),
    (db_parts, chunks): (&CudaSlice<f32>, usize),
    g: &mut CudaSlice<T>,
    db: &mut CudaSlice<T>,
    (m, n, r): (usize, usize, usize),
) -> Result<()> {
    let f = load(
        dev,
        &format!("sum_two_parts_{}", T::NAME),
        MODULE,
        LORA_TC_PTX,
    )?;
    let (gp, _gp) = g_parts.device_ptr(stream);
    let (dp, _dp) = db_parts.device_ptr(stream);
    let (go, _go) = g.device_ptr_mut(stream);
    let (dbo, _dbo) = db.device_ptr_mut(stream);
    let g_sum = PartSum {
        parts: gp,
        out: go,
        oi: PROJ_LD as i64,
        oj: 1,
        s: slabs as i32,
        i: m as i32,
        j: 16,
        iu: m as i32,
        // All 16 columns of G: those past r are zero sums (B's ranks past r read as zero).
        ju: PROJ_LD as i32,
        scale: 1.0,
    };
    let db_sum = PartSum {
        parts: dp,
        out: dbo,
        oi: n as i64,
        oj: 1,
        s: chunks as i32,
        i: 16,
        j: n as i32,
        iu: r as i32,
        ju: n as i32,
        scale: 1.0,
    };
    let most = (m * PROJ_LD).max(r * n);
    let blocks = most.div_ceil(256).min(4 * sm_count(dev)? as usize);
    let mut b = stream.launch_builder(&f);
    b.arg(&g_sum).arg(&db_sum);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 2, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the parts hold slabs·m·16 and chunks·16·n floats, G m·16 and dB r·n elements, all
    // alive (their guards above) until the launch is queued on this stream.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// `G = dy·Bᵀ` (m × [`PROJ_LD`], its first r columns; the rest zero) and `dB = Tᵀ·dy` (r, n)
/// from one read of `dy` (m, n) dense: the outputs and the partial sums they are added up from,
/// allocated by [`DyGrads::alloc`] on candle's stream and computed by [`DyGrads::run`] on any
/// stream ordered after the allocation (see `side`).
pub(super) struct DyGrads<T> {
    pub(super) g: CudaSlice<T>,
    pub(super) db: CudaSlice<T>,
    g_parts: CudaSlice<f32>,
    db_parts: CudaSlice<f32>,
    /// Column slabs, row chunks and rows per chunk of the kernel's grid.
    slabs: usize,
    chunks: usize,
    rows: usize,
    dims: (usize, usize, usize),
}

impl<T: Elem> DyGrads<T> {
    /// The buffers for `(m, n, r)`; the caller checked [`grads_fit`].
    pub(super) fn alloc(dev: &CudaDevice, (m, n, r): (usize, usize, usize)) -> Result<Self> {
        if m == 0 || n == 0 {
            // No rows or no columns: both products are sums over nothing.
            return Ok(Self {
                g: dev.alloc_zeros::<T>(m * PROJ_LD)?,
                db: dev.alloc_zeros::<T>(r * n)?,
                g_parts: dev.alloc_zeros::<f32>(0)?,
                db_parts: dev.alloc_zeros::<f32>(0)?,
                slabs: 0,
                chunks: 0,
                rows: 0,
                dims: (m, n, r),
            });
        }
        let slabs = n.div_ceil(SLAB);
        let (chunks, rows) = row_chunks(dev, m, slabs)?;
        Ok(Self {
            g: alloc_out::<T>(dev, m * PROJ_LD)?,
            db: alloc_out::<T>(dev, r * n)?,
            g_parts: alloc_out::<f32>(dev, slabs * m * 16)?,
            db_parts: alloc_out::<f32>(dev, chunks * 16 * n)?,
            slabs,
            chunks,
            rows,
            dims: (m, n, r),
        })
    }

    /// Computes G and dB on `stream`: `dy` (m, n) dense, T (m, [`PROJ_LD`]) 16-byte aligned,
    /// B (r, n) through its strides.
    pub(super) fn run(
        &mut self,
        dev: &CudaDevice,
        stream: &Arc<CudaStream>,
        dy: &CudaView<'_, T>,
        t: &CudaView<'_, T>,
        bm: Strided<'_, '_, T>,
    ) -> Result<()> {
        let (m, n, r) = self.dims;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if !aligned16(t, dev) {
            candle_core::bail!("lora backward: the projections are not 16-byte aligned")
        }
        let f = grad_kernel::<T>(dev, "lora_dy_grads")?;
        let (sb0, sb1) = (bm.s0 as i64, bm.s1 as i64);
        let (m_i, n_i, r_i, rows_i) = (m as i32, n as i32, r as i32, self.rows as i32);
        let mut b = stream.launch_builder(&f);
        b.arg(dy)
            .arg(t)
            .arg(bm.data)
            .arg(&sb0)
            .arg(&sb1)
            .arg(&mut self.g_parts)
            .arg(&mut self.db_parts)
            .arg(&m_i)
            .arg(&n_i)
            .arg(&r_i)
            .arg(&rows_i);
        let cfg = LaunchConfig {
            grid_dim: (self.slabs as u32, self.chunks as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: GRAD_RING_BYTES as u32,
        };
        // SAFETY: dy holds m·n elements (16-byte aligned, n % 8 == 0), T m·16 (16-byte
        // aligned), B r·n at its strides; the parts hold slabs·m·16 and chunks·16·n floats, all
        // of which the grid (slabs × chunks blocks of 256 threads, chunks · rows ≥ m) writes.
        unsafe { b.launch(cfg) }.w()?;
        sum_two_parts(
            dev,
            stream,
            (&self.g_parts, self.slabs),
            (&self.db_parts, self.chunks),
            &mut self.g,
            &mut self.db,
            (m, n, r),
        )
    }
}

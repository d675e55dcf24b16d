//! The LoRA term and the LoRA linear layer on CUDA, through cuBLAS.
//!
//! Small problems (the seed's shapes) take one custom kernel for the whole LoRA term (see
//! [`super::lora_one_launch`]); for `lora_linear` the base GEMM then accumulates into its
//! output.
//!
//! Forward, `lora_linear` (frozen W): `T = scale·(x·A)` (m × r, one small GEMM reading x),
//! then `y = T·B (+ bias)` written straight into the output, then the base GEMM
//! `y = x·Wᵀ + 1·y` accumulating into it (beta = 1). No (tokens × out) temporary exists besides
//! `y`. `T·B` runs on the tensor-core kernel of [`super::lora_tc`] (bf16 and f16, sm_80 and
//! later, rank ≤ 32, rows of whole 16-byte packs), which adds the bias as it writes; otherwise
//! through cuBLAS, with the bias as one more row of B against a column of ones in T, so that it
//! costs no pass of its own either way. Where W is dense, there is no bias, the batch has at
//! least as many rows as the layer has inputs, y has at least 2²³ elements (below, what the
//! merge saves does not pay for its launches) and the tensor-core kernel serves the merge
//! (bf16, f16), the forward instead takes one GEMM through the merged weight
//! `W' = W + scale·Bᵀ·Aᵀ` (a temporary of W's size, rounded to the dtype once: y differs from
//! the unmerged sum by about its own rounding), with T computed beside it on a second stream
//! (see [`super::side`]).
//!
//! Backward: `T = scale·x·A` comes from the forward pass where it computed one
//! ([`LoraProjections`]: the cuBLAS path; m × r values), else it is computed again; `G = dy·Bᵀ`;
//! `dB = scale·(x·A)ᵀ·dy`, `dA = scale·xᵀ·G`, `dx = scale·G·Aᵀ` (+ `dy·W` for the linear
//! layer, accumulated by the base GEMM with beta = 1). Past the one-launch kernel's sizes, bf16
//! and f16 at rank ≤ 16 with rows of whole packs take the tensor-core kernels: G and dB from
//! one read of dy, `G·Aᵀ` written at the memory's write rate; dA and the rest take cuBLAS. W never gets a gradient here: the fused linear op is only used when W and the
//! bias are frozen.

use candle_core::backend::{BackendDevice, BackendStorage};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cublas::CudaBlas;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape, Tensor};

use super::common::{
    aligned16, alloc_out, cuda_storage, element_strides, input, load, matrix, rows_and_len,
    to_tensor, with_elem, Elem, Input, Matrix, LORA_PTX,
};
use super::gemm::{gemm, gemm_on, Operand};
use super::lora_one_launch as one_launch;
use super::lora_tc::{self, Strided};
use super::side;

const MODULE: &str = "metal_candle_lora";

/// The projections `T = scale·x·A` (rows × r, in x's dtype) that the cuBLAS forward path
/// computes anyway, kept for the backward pass so that it does not read x once more to compute
/// them again (one pass over x: about 38 µs at bf16 8×2048×4096 on an H200).
pub struct LoraProjections {
    /// rows × `ld` elements; the first r columns are T (a bias adds a column of ones).
    storage: CudaStorage,
    rows: usize,
    rank: usize,
    ld: usize,
}

/// `scale · (x·A)·B` with `a` (in, r) and `b` (r, out); the output has x's leading dims and
/// `out` as its last dim. Also returns the projections where the forward computed them
/// (problems too large for the one-launch kernels).
pub fn lora_delta_forward(
    xs: &CudaStorage,
    xl: &Layout,
    as_: &CudaStorage,
    al: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    scale: f64,
) -> Result<(CudaStorage, Option<LoraProjections>)> {
    forward(xs, xl, as_, al, bs, bl, None, None, scale)
}

/// `T = scale·x·A` as the forward pass saves it, for benchmarks and tests that call the
/// backward functions themselves.
pub fn lora_projections(x: &Tensor, a: &Tensor, scale: f64) -> Result<LoraProjections> {
    let x = x.contiguous()?;
    let (m, k) = rows_and_len("lora projections", x.shape())?;
    let r = a.dim(1)?;
    let (xs, xl) = x.storage_and_layout();
    let (as_, al) = a.storage_and_layout();
    let xs = cuda_storage(&xs, "lora projections: x")?;
    let dev = xs.device().clone();
    let xi = input(xs, xl)?;
    let am = matrix(cuda_storage(&as_, "lora projections: A")?, al)?;
    let ld = lora_tc::projection_ld(&dev, x.dtype(), r)?;
    with_elem!(x.dtype(), "lora projections", T => {
        let (xv, av) = (xi.view::<T>()?, am.data.view::<T>()?);
        let t = project::<T>(&dev, &xv, &am, &av, (m, k, r), scale, ld)?;
        Ok(LoraProjections { storage: T::wrap_cuda_slice(t, dev.clone()), rows: m, rank: r, ld })
    })
}

/// `T = scale·x·A` into a fresh (m, ld) buffer (its first r columns), through cuBLAS.
fn project<T: Elem>(
    dev: &CudaDevice,
    xv: &CudaView<'_, T>,
    a: &Matrix<'_>,
    av: &CudaView<'_, T>,
    (m, k, r): (usize, usize, usize),
    scale: f64,
    ld: usize,
) -> Result<CudaSlice<T>> {
    let mut t = alloc_out::<T>(dev, m * ld)?;
    let (blas, stream) = (dev.cublas_handle(), dev.cuda_stream());
    project_on(&blas, &stream, (xv, a, av), (m, k, r), scale, (&mut t, ld))?;
    Ok(t)
}

/// [`project`] into `t` (m, ld) on `stream` (`blas` queues its work there).
fn project_on<T: Elem>(
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    (xv, a, av): (&CudaView<'_, T>, &Matrix<'_>, &CudaView<'_, T>),
    (m, k, r): (usize, usize, usize),
    scale: f64,
    (t, ld): (&mut CudaSlice<T>, usize),
) -> Result<()> {
    let x_op = Operand {
        data: xv,
        trans: false,
        ld: k.max(1),
    };
    let a_op = Operand {
        data: av,
        trans: a.trans,
        ld: a.ld,
    };
    gemm_on::<T>(
        blas,
        stream,
        (m, r, k),
        scale as f32,
        x_op,
        a_op,
        0.0,
        t,
        0,
        ld,
    )
}

/// `x·Wᵀ + bias + scale · (x·A)·B` with `w` (out, in) frozen; see the module docs for how the
/// base GEMM and the low-rank term share one output.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear_forward(
    xs: &CudaStorage,
    xl: &Layout,
    as_: &CudaStorage,
    al: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    w: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<(CudaStorage, Option<LoraProjections>)> {
    forward(xs, xl, as_, al, bs, bl, Some(w), bias, scale)
}

#[allow(clippy::too_many_arguments)]
fn forward(
    xs: &CudaStorage,
    xl: &Layout,
    as_: &CudaStorage,
    al: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    w: Option<&Tensor>,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<(CudaStorage, Option<LoraProjections>)> {
    let dev = xs.device().clone();
    let (m, k) = rows_and_len("lora", xl.shape())?;
    let (r, n) = (al.dims()[1], bl.dims()[1]);
    let x = input(xs, xl)?;
    let a = matrix(as_, al)?;
    let w_guard = w.map(|w| w.storage_and_layout());
    let wm = match &w_guard {
        Some((s, l)) => Some(matrix(cuda_storage(s, "lora_linear: W")?, l)?),
        None => None,
    };
    let bias_guard = bias.map(|b| b.storage_and_layout());
    let bias_s = match &bias_guard {
        Some((s, l)) => Some((cuda_storage(s, "lora_linear: bias")?, *l)),
        None => None,
    };
    if one_launch::serves(m, k, r, n) {
        let bm = matrix(bs, bl)?;
        let bias_in = bias_s.map(|(s, l)| input(s, l)).transpose()?;
        return with_elem!(xs.dtype(), "lora", T => {
            let (xv, av, bv) = (x.view::<T>()?, a.data.view::<T>()?, bm.data.view::<T>()?);
            let mut y = alloc_out::<T>(&dev, m * n)?;
            let bias_v = bias_in.as_ref().map(|b| b.view::<T>()).transpose()?;
            let args = (&xv, &a, &av, &bm, &bv, bias_v.as_ref());
            one_launch::launch::<T>(&dev, args, &mut y, (m, k, r, n), scale as f32)?;
            if let Some(wm) = &wm {
                let wv = wm.data.view::<T>()?;
                gemm::<T>(
                    &dev,
                    (m, n, k),
                    1.0,
                    Operand { data: &xv, trans: false, ld: k.max(1) },
                    Operand { data: &wv, trans: !wm.trans, ld: wm.ld },
                    1.0,
                    &mut y,
                    0,
                    n,
                )?;
            }
            Ok((T::wrap_cuda_slice(y, dev.clone()), None))
        });
    }
    // `T·B` (+ bias) through the tensor-core kernel where it serves, else through cuBLAS with
    // the bias as one more row of B against a column of ones in T.
    let tc = lora_tc::outer_fits(&dev, xs.dtype(), m, n, r)?;
    let bias_in = match bias_s {
        Some((s, l)) if tc => Some(input(s, l)?),
        _ => None,
    };
    // B, or [B; bias] (r + 1 rows) when cuBLAS carries a bias.
    let (bm, rp) = match bias_s {
        Some((bias_s, l)) if !tc => {
            // SAFETY: both copies below together write all (r + 1) · n elements.
            let mut ext = unsafe { dev.alloc_uninit(&Shape::from((r + 1, n)), bs.dtype()) }?;
            bs.copy_strided_src(&mut ext, 0, bl)?;
            bias_s.copy_strided_src(&mut ext, r * n, l)?;
            (
                Matrix {
                    data: Input::owned(ext, bs, (r + 1) * n),
                    trans: false,
                    ld: n.max(1),
                },
                r + 1,
            )
        }
        _ => (matrix(bs, bl)?, r),
    };
    with_elem!(xs.dtype(), "lora", T => {
        let (xv, av, bv) = (x.view::<T>()?, a.data.view::<T>()?, bm.data.view::<T>()?);
        // T in rows of 16 where the tensor-core gradient kernels can take it in the backward.
        let t_ld = if tc && r <= lora_tc::PROJ_LD { lora_tc::PROJ_LD } else { rp };
        // With a frozen W and no bias, y = x·(W + scale·Bᵀ·Aᵀ)ᵀ: one GEMM through the merged
        // weight where merging moves fewer bytes than writing T·B into y for the GEMM to read
        // back and y is large enough for that to outweigh the merge's fixed costs (see
        // `lora_tc::forward_merge_pays`). T, which only the backward reads, is then computed
        // on the side stream, beside the merge and the GEMM (see `side`).
        let merge = match &wm {
            Some(wm) if bias.is_none() && lora_tc::forward_merge_pays(m, k, n) && merge_fits::<T>(&dev, wm, (n, k, r))? => Some(wm),
            _ => None,
        };
        if let Some(wm) = merge {
            // Allocated before the fork: the side stream writes T (see `side`).
            let mut t = alloc_out::<T>(&dev, m * t_ld)?;
            let mut y = alloc_out::<T>(&dev, m * n)?;
            let fork = side::Fork::new(&dev)?;
            let side = fork.side();
            let on_side = project_on(&side.blas, &side.stream, (&xv, &a, &av), (m, k, r), scale, (&mut t, t_ld));
            let on_main = (|| {
                let merged = merged_weight::<T>(&dev, (&bm, &bv), (&a, &av), wm, (n, k, r), scale as f32)?;
                // W' is (out, in): the GEMM needs W'ᵀ.
                let w_op = Operand { data: &merged.slice(..), trans: true, ld: k };
                gemm::<T>(&dev, (m, n, k), 1.0, Operand { data: &xv, trans: false, ld: k.max(1) }, w_op, 0.0, &mut y, 0, n)
            })();
            // Joined before anything is returned or freed, errors included: the side stream may
            // still be writing T.
            fork.join()?;
            on_side?;
            on_main?;
            let saved = LoraProjections { storage: T::wrap_cuda_slice(t, dev.clone()), rows: m, rank: r, ld: t_ld };
            return Ok((T::wrap_cuda_slice(y, dev.clone()), Some(saved)));
        }
        let mut t = project::<T>(&dev, &xv, &a, &av, (m, k, r), scale, t_ld)?;
        if rp > r {
            set_column::<T>(&dev, &mut t, m, rp, r, 1.0)?;
        }
        let mut y = alloc_out::<T>(&dev, m * n)?;
        if tc {
            // R[col][j] = B[j][col].
            let (s0, s1) = element_strides(&bm);
            let bias_v = bias_in.as_ref().map(|b| b.view::<T>()).transpose()?;
            let rm = Strided { data: &bv, s0: s1, s1: s0 };
            let tm = Strided { data: &t.slice(..), s0: t_ld, s1: 1 };
            lora_tc::outer::<T>(&dev, tm, rm, bias_v.as_ref(), None, &mut y, (m, n, r), 1.0)?;
        } else {
            gemm::<T>(
                &dev,
                (m, n, rp),
                1.0,
                Operand { data: &t.slice(..), trans: false, ld: rp },
                Operand { data: &bv, trans: bm.trans, ld: bm.ld },
                0.0,
                &mut y,
                0,
                n,
            )?;
        }
        if let Some(wm) = &wm {
            let wv = wm.data.view::<T>()?;
            // W is (out, in): the base term needs Wᵀ.
            gemm::<T>(
                &dev,
                (m, n, k),
                1.0,
                Operand { data: &xv, trans: false, ld: k.max(1) },
                Operand { data: &wv, trans: !wm.trans, ld: wm.ld },
                1.0,
                &mut y,
                0,
                n,
            )?;
        }
        let saved = LoraProjections { storage: T::wrap_cuda_slice(t, dev.clone()), rows: m, rank: r, ld: t_ld };
        Ok((T::wrap_cuda_slice(y, dev.clone()), Some(saved)))
    })
}

/// Whether [`merged_weight`] serves W: W dense and 16-byte aligned, and the tensor-core kernel
/// serving the shape (not f32, rank at most 32, `in` a multiple of 8, sm_80 or later).
/// Otherwise the caller adds the low-rank term to dx itself.
fn merge_fits<T: Elem>(
    dev: &CudaDevice,
    wm: &Matrix<'_>,
    (n, k, r): (usize, usize, usize),
) -> Result<bool> {
    let wv = wm.data.view::<T>()?;
    let dense = !wm.trans && wm.ld == k && aligned16(&wv, dev);
    Ok(dense && lora_tc::outer_fits(dev, T::DTYPE, n, k, r)?)
}

/// The merged weight `W + alpha·Bᵀ·Aᵀ` (out × in, dense) for the LoRA linear backward's dx;
/// the caller checked [`merge_fits`].
#[rustfmt::skip]
fn merged_weight<T: Elem>(
    dev: &CudaDevice,
    (bm, bv): (&Matrix<'_>, &CudaView<'_, T>),
    (am, av): (&Matrix<'_>, &CudaView<'_, T>),
    wm: &Matrix<'_>,
    (n, k, r): (usize, usize, usize),
    alpha: f32,
) -> Result<CudaSlice<T>> {
    let wv = wm.data.view::<T>()?;
    // L[row][j] = B[j][row] (read through B's strides: no transposed copy), R[col][j] = A[col][j].
    let ((sb0, sb1), (sa0, sa1)) = (element_strides(bm), element_strides(am));
    let lm = Strided { data: bv, s0: sb1, s1: sb0 };
    let rm = Strided { data: av, s0: sa0, s1: sa1 };
    let mut merged = alloc_out::<T>(dev, n * k)?;
    lora_tc::outer::<T>(dev, lm, rm, None, Some(&wv), &mut merged, (n, k, r), alpha)?;
    Ok(merged)
}

/// What the backward's products over dy read: dy (m, n) dense, T (m, ld) with its leading
/// dimension, and B as a matrix and through its strides.
struct DyOperands<'a, 'b, T> {
    dy: &'a CudaView<'b, T>,
    t: (&'a CudaView<'b, T>, usize),
    b: (&'a Matrix<'b>, Strided<'a, 'b, T>),
}

/// The backward's products over dy, `G = dy·Bᵀ` (m, r) and `dB = Tᵀ·dy` (r, n), allocated
/// before they are computed, so that they can be computed on another stream (see `side`).
enum DyProducts<T> {
    /// The tensor-core kernel (G with leading dimension [`lora_tc::PROJ_LD`]).
    TensorCores(lora_tc::DyGrads<T>),
    /// Two cuBLAS GEMMs (G with leading dimension r).
    Cublas {
        g: CudaSlice<T>,
        db: CudaSlice<T>,
        r: usize,
    },
}

impl<T: Elem> DyProducts<T> {
    fn alloc(
        dev: &CudaDevice,
        tensor_cores: bool,
        (m, n, r): (usize, usize, usize),
    ) -> Result<Self> {
        Ok(if tensor_cores {
            Self::TensorCores(lora_tc::DyGrads::alloc(dev, (m, n, r))?)
        } else {
            Self::Cublas {
                g: alloc_out::<T>(dev, m * r)?,
                db: alloc_out::<T>(dev, r * n)?,
                r,
            }
        })
    }

    /// Computes G and dB on `stream` (`blas` is the cuBLAS handle that queues work on it).
    #[rustfmt::skip]
    fn run(&mut self, dev: &CudaDevice, blas: &CudaBlas, stream: &Arc<CudaStream>, ops: &DyOperands<'_, '_, T>, (m, n, r): (usize, usize, usize)) -> Result<()> {
        let (bm, b_strided) = &ops.b;
        match self {
            Self::TensorCores(grads) => {
                grads.run(dev, stream, ops.dy, ops.t.0, *b_strided)
            }
            Self::Cublas { g, db, .. } => {
                let dy_op = || Operand { data: ops.dy, trans: false, ld: n.max(1) };
                gemm_on::<T>(blas, stream, (m, r, n), 1.0, dy_op(), Operand { data: b_strided.data, trans: !bm.trans, ld: bm.ld }, 0.0, g, 0, r)?;
                gemm_on::<T>(blas, stream, (r, n, m), 1.0, Operand { data: ops.t.0, trans: true, ld: ops.t.1 }, dy_op(), 0.0, db, 0, n)
            }
        }
    }

    /// G and its leading dimension.
    fn g(&self) -> (&CudaSlice<T>, usize) {
        match self {
            Self::TensorCores(grads) => (&grads.g, lora_tc::PROJ_LD),
            Self::Cublas { g, r, .. } => (g, *r),
        }
    }

    /// `dA = alpha·xᵀ·G` (k, r) on `stream`, x (m, k) dense.
    #[rustfmt::skip]
    fn da(&self, blas: &CudaBlas, stream: &Arc<CudaStream>, x: &CudaView<'_, T>, (m, k, r): (usize, usize, usize), alpha: f32, da: &mut CudaSlice<T>) -> Result<()> {
        let (g, g_ld) = self.g();
        gemm_on::<T>(blas, stream, (k, r, m), alpha, Operand { data: x, trans: true, ld: k.max(1) }, Operand { data: &g.slice(..), trans: false, ld: g_ld }, 0.0, da, 0, r)
    }

    /// `(G, G's leading dimension, dB)`.
    fn into_parts(self) -> (CudaSlice<T>, usize, CudaSlice<T>) {
        match self {
            Self::TensorCores(grads) => {
                let lora_tc::DyGrads { g, db, .. } = grads;
                (g, lora_tc::PROJ_LD, db)
            }
            Self::Cublas { g, db, r } => (g, r, db),
        }
    }
}

/// Sets column `col` of the row-major (rows, ld) matrix `buf` to `value`.
fn set_column<T: Elem>(
    dev: &CudaDevice,
    buf: &mut CudaSlice<T>,
    rows: usize,
    ld: usize,
    col: usize,
    value: f32,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let f = load(dev, &format!("set_col_{}", T::NAME), MODULE, LORA_PTX)?;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    let (rows_i, ld_i, col_i) = (rows as i32, ld as i32, col as i32);
    l.arg(buf).arg(&rows_i).arg(&ld_i).arg(&col_i).arg(&value);
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(256).min(65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: buf holds rows * ld elements and col < ld.
    unsafe { l.launch(cfg) }.w()?;
    Ok(())
}

/// What the input gradient gets besides the LoRA term.
#[derive(Clone, Copy)]
enum Base<'a> {
    None,
    /// A precomputed gradient added into dx.
    Add(&'a Tensor),
    /// The frozen base weight W (out, in): `dy·W` accumulated into dx by the base GEMM.
    Weight(&'a Tensor),
}

/// Gradients of `scale·(x·A)·B` for x, A and B: `(dx, dA (in, r), dB (r, out))`; `dx_base`
/// (x's shape) is added into dx when given.
pub fn lora_backward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    scale: f64,
    dx_base: Option<&Tensor>,
    saved: Option<&LoraProjections>,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward(
        x,
        a,
        b,
        dy,
        scale,
        dx_base.map_or(Base::None, Base::Add),
        saved,
    )
}

/// Gradients of the LoRA linear layer `x·Wᵀ + bias + scale·(x·A)·B` with W and the bias
/// frozen: `(dx, dA, dB)`, where `dx = scale·(dy·Bᵀ)·Aᵀ + dy·W`: one GEMM through the merged
/// weight `W + scale·Bᵀ·Aᵀ` where that moves fewer bytes (with dA and dB computed beside it on
/// a second stream), else the base GEMM accumulating onto the low-rank term (beta = 1).
pub fn lora_linear_backward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    w: &Tensor,
    scale: f64,
    saved: Option<&LoraProjections>,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward(x, a, b, dy, scale, Base::Weight(w), saved)
}

/// The backward pass; `saved`, the forward's projections, is used when it matches x's rows,
/// A's rank and x's dtype (otherwise T is computed again).
fn backward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    scale: f64,
    base: Base<'_>,
    saved: Option<&LoraProjections>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (x, dy) = (x.contiguous()?, dy.contiguous()?);
    let (m, k) = rows_and_len("lora backward", x.shape())?;
    let (r, n) = (a.dim(1)?, b.dim(1)?);
    if dy.elem_count() != m * n {
        candle_core::bail!(
            "lora backward: dy has shape {:?}, expected {m} rows of {n}",
            dy.dims()
        )
    }
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = dy.storage_and_layout();
    let (as_, al) = a.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let xs = cuda_storage(&xs, "lora backward: x")?;
    let dev = xs.device().clone();
    let xi = input(xs, xl)?;
    let gi = input(cuda_storage(&gs, "lora backward: dy")?, gl)?;
    let am = matrix(cuda_storage(&as_, "lora backward: A")?, al)?;
    let bm = matrix(cuda_storage(&bs, "lora backward: B")?, bl)?;
    let base_t = match base {
        Base::None => None,
        Base::Add(t) => Some(t.contiguous()?),
        Base::Weight(w) => Some(w.clone()),
    };
    let base_guard = base_t.as_ref().map(|t| t.storage_and_layout());
    let base_in = match &base_guard {
        Some((s, l)) if matches!(base, Base::Add(_)) => {
            Some(input(cuda_storage(s, "lora backward: dx_base")?, l)?)
        }
        _ => None,
    };
    let base_w = match &base_guard {
        Some((s, l)) if matches!(base, Base::Weight(_)) => {
            Some(matrix(cuda_storage(s, "lora_linear backward: W")?, l)?)
        }
        _ => None,
    };
    let alpha = scale as f32;
    with_elem!(x.dtype(), "lora backward", T => {
        let (xv, gv, av, bv) = (xi.view::<T>()?, gi.view::<T>()?, am.data.view::<T>()?, bm.data.view::<T>()?);
        let dy_op = || Operand { data: &gv, trans: false, ld: n.max(1) };
        // T = scale·x·A (saved by the forward, or computed here) and G = dy·Bᵀ, both (m, r).
        // The tensor-core kernels where the forward took cuBLAS too: at the one-launch kernel's
        // sizes their extra launches would cost more than the memory passes they save. They
        // read T in rows of 16 (as the forward saves it for them).
        let large = !one_launch::serves(m, k, r, n);
        let tc_grads = large && lora_tc::grads_fit::<T>(&dev, (m, n, r), &gv)?;
        let want_ld = if tc_grads { lora_tc::PROJ_LD } else { r };
        let saved = saved.filter(|s| {
            s.rows == m && s.rank == r && s.storage.dtype() == x.dtype() && (!tc_grads || s.ld == want_ld)
        });
        let computed;
        let (tv, t_ld) = match saved {
            Some(s) => (s.storage.as_cuda_slice::<T>()?.slice(..), s.ld),
            None => {
                computed = project::<T>(&dev, &xv, &am, &av, (m, k, r), scale, want_ld)?;
                (computed.slice(..), want_ld)
            }
        };
        let mut dx = alloc_out::<T>(&dev, m * k)?;
        let mut da = alloc_out::<T>(&dev, k * r)?;
        let mut dy_products = DyProducts::<T>::alloc(&dev, tc_grads, (m, n, r))?;
        let (sb0, sb1) = element_strides(&bm);
        let b_op = Strided { data: &bv, s0: sb0, s1: sb1 };
        let operands = DyOperands { dy: &gv, t: (&tv, t_ld), b: (&bm, b_op) };
        // With a frozen base weight, dx = dy·W + scale·G·Aᵀ = dy·(W + scale·Bᵀ·Aᵀ): one GEMM
        // through the merged weight where that moves fewer bytes (see `lora_tc::merge_pays`).
        // That GEMM needs neither G nor dA, so the pass over dy (G, dB) and dA run on the side
        // stream, beside the merge and the GEMM (see `side`).
        let merge = match &base_w {
            Some(wm) if large && lora_tc::merge_pays(m, n) && merge_fits::<T>(&dev, wm, (n, k, r))? => Some(wm),
            _ => None,
        };
        if let Some(wm) = merge {
            let fork = side::Fork::new(&dev)?;
            let side = fork.side();
            let on_side = dy_products
                .run(&dev, &side.blas, &side.stream, &operands, (m, n, r))
                .and_then(|()| dy_products.da(&side.blas, &side.stream, &xv, (m, k, r), alpha, &mut da));
            let on_main = (|| {
                let merged = merged_weight::<T>(&dev, (&bm, &bv), (&am, &av), wm, (n, k, r), alpha)?;
                let w_op = Operand { data: &merged.slice(..), trans: false, ld: k };
                gemm::<T>(&dev, (m, k, n), 1.0, dy_op(), w_op, 0.0, &mut dx, 0, k.max(1))
            })();
            // Joined before anything is returned or freed, errors included: the side stream may
            // still be using the buffers.
            fork.join()?;
            on_side?;
            on_main?;
            let (_, _, db) = dy_products.into_parts();
            return Ok((to_tensor(dx, &dev, x.shape().clone()), to_tensor(da, &dev, (k, r)), to_tensor(db, &dev, (r, n))));
        }
        let (blas, stream) = (dev.cublas_handle(), dev.cuda_stream());
        dy_products.run(&dev, &blas, &stream, &operands, (m, n, r))?;
        dy_products.da(&blas, &stream, &xv, (m, k, r), alpha, &mut da)?;
        let (g, g_ld, db) = dy_products.into_parts();
        let g_view = g.slice(..);
        // dx = scale·G·Aᵀ (+ base): the tensor-core kernel writes the low-rank term where it
        // serves and nothing is to be added first; else cuBLAS, accumulating into dx_base.
        if large && base_in.is_none() && lora_tc::outer_fits(&dev, x.dtype(), m, k, r)? {
            // R[col][j] = A[col][j].
            let (sa0, sa1) = element_strides(&am);
            let rm = Strided { data: &av, s0: sa0, s1: sa1 };
            let gm = Strided { data: &g_view, s0: g_ld, s1: 1 };
            lora_tc::outer::<T>(&dev, gm, rm, None, None, &mut dx, (m, k, r), alpha)?;
        } else {
            let beta = match &base_in {
                Some(bi) => {
                    let bv = bi.view::<T>()?;
                    if bv.len() != m * k {
                        candle_core::bail!("lora backward: dx_base has {} elements, expected {}", bv.len(), m * k)
                    }
                    dev.memcpy_dtod(&bv, &mut dx)?;
                    1.0
                }
                None => 0.0,
            };
            gemm::<T>(&dev, (m, k, r), alpha, Operand { data: &g_view, trans: false, ld: g_ld }, Operand { data: &av, trans: !am.trans, ld: am.ld }, beta, &mut dx, 0, k.max(1))?;
        }
        if let Some(wm) = &base_w {
            let wv = wm.data.view::<T>()?;
            gemm::<T>(&dev, (m, k, n), 1.0, dy_op(), Operand { data: &wv, trans: wm.trans, ld: wm.ld }, 1.0, &mut dx, 0, k.max(1))?;
        }
        Ok((to_tensor(dx, &dev, x.shape().clone()), to_tensor(da, &dev, (k, r)), to_tensor(db, &dev, (r, n))))
    })
}

//! Row-major GEMM through candle's cuBLAS handle (the same handle and stream candle's own
//! matmul uses) or the side stream's, with `alpha` and `beta` so that results can accumulate
//! into an output.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cublas::{result, sys, CudaBlas};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Result};

use super::common::Elem;

/// A row-major operand: `rows × cols` as stored (before `trans`), leading dimension `ld`.
pub(super) struct Operand<'a, 'b, T> {
    pub(super) data: &'a CudaView<'b, T>,
    pub(super) trans: bool,
    pub(super) ld: usize,
}

/// `C[m×n] = alpha · op(A)[m×k] · op(B)[k×n] + beta · C`, all row-major, `C` with leading
/// dimension `ldc`. f32 accumulation (TF32 only when candle's f32 reduced-precision flag is set,
/// as for candle's own matmul).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm<T: Elem>(
    dev: &CudaDevice,
    dims: (usize, usize, usize),
    alpha: f32,
    a: Operand<'_, '_, T>,
    b: Operand<'_, '_, T>,
    beta: f32,
    c: &mut CudaSlice<T>,
    c_offset: usize,
    ldc: usize,
) -> Result<()> {
    let blas = dev.cublas_handle();
    gemm_on(
        &blas,
        &dev.cuda_stream(),
        dims,
        alpha,
        a,
        b,
        beta,
        c,
        c_offset,
        ldc,
    )
}

/// [`gemm`] through the cuBLAS handle `blas`, whose stream is `stream` (the side stream's, see
/// `side`).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_on<T: Elem>(
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Operand<'_, '_, T>,
    b: Operand<'_, '_, T>,
    beta: f32,
    c: &mut CudaSlice<T>,
    c_offset: usize,
    ldc: usize,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    for (what, v) in [
        ("m", m),
        ("n", n),
        ("k", k),
        ("lda", a.ld),
        ("ldb", b.ld),
        ("ldc", ldc),
    ] {
        if v > i32::MAX as usize {
            candle_core::bail!("GEMM dimension {what} = {v} exceeds cuBLAS's 32-bit limit")
        }
    }
    let dtype = cuda_type(T::DTYPE)?;
    let compute =
        if T::DTYPE == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32() {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
    let (pa, _ga) = a.data.device_ptr(stream);
    let (pb, _gb) = b.data.device_ptr(stream);
    let mut cv = c.slice_mut(c_offset..);
    let (pc, _gc) = cv.device_ptr_mut(stream);
    // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: swap the operands and m/n.
    // SAFETY: pointers are live device buffers, ordered for `stream` (the handle's) by the
    // callers and sized by them for these dimensions and leading dims; alpha/beta are host f32
    // as COMPUTE_32F requires.
    unsafe {
        result::gemm_ex(
            *blas.handle(),
            op(b.trans),
            op(a.trans),
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            pb as *const _,
            dtype,
            b.ld as i32,
            pa as *const _,
            dtype,
            a.ld as i32,
            (&beta) as *const f32 as *const _,
            pc as *mut _,
            dtype,
            ldc as i32,
            compute,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .w()
}

/// One operand of a strided-batched GEMM: matrix `i` starts `stride` elements after matrix
/// `i − 1`; otherwise as [`Operand`].
pub(super) struct BatchedOperand<'a, 'b, T> {
    pub(super) data: &'a CudaView<'b, T>,
    pub(super) trans: bool,
    pub(super) ld: usize,
    pub(super) stride: usize,
}

fn op(trans: bool) -> sys::cublasOperation_t {
    if trans {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    }
}

fn cuda_type(dtype: DType) -> Result<sys::cudaDataType_t> {
    Ok(match dtype {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        other => candle_core::bail!("GEMM: unsupported dtype {other:?}"),
    })
}

/// `C_i[m×n] = alpha · op(A_i)·op(B_i)` for `batches` matrices, row-major, `C` packed (leading
/// dimension `n`, stride `m·n`). The inputs are of type `T` and the output of type `C`, which may
/// be f32 for half-precision inputs (scores kept in f32). f32 accumulation.
pub(super) fn gemm_batched<T: Elem, C: Elem>(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    batches: usize,
    alpha: f32,
    a: BatchedOperand<'_, '_, T>,
    b: BatchedOperand<'_, '_, T>,
    c: &mut CudaSlice<C>,
) -> Result<()> {
    if m == 0 || n == 0 || batches == 0 {
        return Ok(());
    }
    for (what, v) in [
        ("m", m),
        ("n", n),
        ("k", k),
        ("lda", a.ld),
        ("ldb", b.ld),
        ("batches", batches),
    ] {
        if v > i32::MAX as usize {
            candle_core::bail!("GEMM dimension {what} = {v} exceeds cuBLAS's 32-bit limit")
        }
    }
    let compute = if T::DTYPE == DType::F32
        && C::DTYPE == DType::F32
        && candle_core::cuda_backend::gemm_reduced_precision_f32()
    {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let (in_type, out_type) = (cuda_type(T::DTYPE)?, cuda_type(C::DTYPE)?);
    let (alpha, beta) = (alpha, 0f32);
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let (pa, _ga) = a.data.device_ptr(&stream);
    let (pb, _gb) = b.data.device_ptr(&stream);
    let (pc, _gc) = c.device_ptr_mut(&stream);
    // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: swap the operands and m/n.
    // SAFETY: pointers are live device buffers on candle's stream, sized by the callers for
    // `batches` matrices of these dimensions, leading dims and strides; alpha/beta are host
    // f32 as COMPUTE_32F requires.
    unsafe {
        result::gemm_strided_batched_ex(
            *blas.handle(),
            op(b.trans),
            op(a.trans),
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            pb as *const _,
            in_type,
            b.ld as i32,
            b.stride as i64,
            pa as *const _,
            in_type,
            a.ld as i32,
            a.stride as i64,
            (&beta) as *const f32 as *const _,
            pc as *mut _,
            out_type,
            n as i32,
            (m * n) as i64,
            batches as i32,
            compute,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .w()
}

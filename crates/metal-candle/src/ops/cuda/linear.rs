//! The frozen linear layer `x·Wᵀ + bias` on CUDA: one cuBLAS GEMM, the bias written first and
//! accumulated into (beta = 1), so it costs no separate pass over the output.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout, Result, Tensor};

use super::common::{alloc_out, cuda_storage, input, matrix, rows_and_len, with_elem};
use super::gemm::{gemm, Operand};

/// `x·Wᵀ + bias` for `x` (storage `xs` under `xl`, (..., in)), `w` (out, in) and `bias` (out).
pub fn frozen_linear_forward(
    xs: &CudaStorage,
    xl: &Layout,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<CudaStorage> {
    let dev = xs.device().clone();
    let (m, k) = rows_and_len("frozen_linear", xl.shape())?;
    let n = w.dim(0)?;
    let x = input(xs, xl)?;
    let (ws, wl) = w.storage_and_layout();
    let wm = matrix(cuda_storage(&ws, "frozen_linear: W")?, wl)?;
    let bias_guard = bias.map(|b| b.storage_and_layout());
    with_elem!(xs.dtype(), "frozen_linear", T => {
        let (xv, wv) = (x.view::<T>()?, wm.data.view::<T>()?);
        let mut ys = T::wrap_cuda_slice(alloc_out::<T>(&dev, m * n)?, dev.clone());
        let beta = match &bias_guard {
            Some((bs, bl)) => {
                if m * n > u32::MAX as usize {
                    candle_core::bail!("frozen_linear: {m} x {n} outputs exceed the bias copy's 32-bit index")
                }
                // A source row stride of 0 repeats the bias in every output row.
                cuda_storage(bs, "frozen_linear: bias")?.copy2d(&mut ys, m, n, 0, n, bl.start_offset(), 0)?;
                1.0
            }
            None => 0.0,
        };
        let y = ys.as_cuda_slice_mut::<T>()?;
        // W is (out, in): the product needs Wᵀ.
        gemm::<T>(
            &dev,
            (m, n, k),
            1.0,
            Operand { data: &xv, trans: false, ld: k.max(1) },
            Operand { data: &wv, trans: !wm.trans, ld: wm.ld },
            beta,
            y,
            0,
            n,
        )?;
        Ok(ys)
    })
}

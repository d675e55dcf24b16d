//! Softmax over the last dimension.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use super::cpu::{self, with_float_type};
use super::{kernel_path, reference, KernelPath};
use crate::{Error, Result};

/// Softmax over the last dimension of `x`, any number of leading dims, differentiable.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// let x = Tensor::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu)?;
/// let y = metal_candle::ops::softmax_last_dim(&x)?;
/// let rows: Vec<f32> = y.sum(1)?.to_vec1()?;
/// assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-6));
/// # Ok(())
/// # }
/// ```
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        return Err(Error::shape(
            "softmax_last_dim",
            "x is a scalar; expected at least one dimension",
        ));
    }
    super::check_same("softmax_last_dim", &[("x", x)])?;
    Ok(match kernel_path(x.device(), x.dtype()) {
        KernelPath::Fused => x.apply_op1(SoftmaxLastDim)?,
        KernelPath::Reference => reference::softmax_last_dim(x)?,
    })
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "metal-candle-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(1);
        with_float_type!(s.dtype(), "softmax_last_dim", T => {
            let x = cpu::contiguous::<T>(s, l)?;
            Ok((cpu::to_storage(cpu::softmax::forward(&x, n)), l.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((super::cuda::softmax_forward(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(softmax_backward(x, y, dy)?))
    }
}

/// `dx = y ⊙ (dy − Σ dy ⊙ y)` through the device's kernel. Both kernels recompute `y` from
/// `x` in f32 (see `cpu::softmax::backward`).
fn softmax_backward(x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    let n = y.dim(candle_core::D::Minus1)?;
    match y.device() {
        candle_core::Device::Cpu => {
            let (xs, xl) = x.storage_and_layout();
            let (gs, gl) = dy.storage_and_layout();
            let (Storage::Cpu(xs), Storage::Cpu(gs)) = (&*xs, &*gs) else {
                candle_core::bail!("softmax backward: x and dy must both be on the CPU")
            };
            with_float_type!(y.dtype(), "softmax_last_dim backward", T => {
                let xv = cpu::contiguous::<T>(xs, xl)?;
                let gv = cpu::contiguous::<T>(gs, gl)?;
                cpu::to_tensor(cpu::softmax::backward(&xv, &gv, n), y.dims())
            })
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => super::cuda::softmax_backward(x, dy),
        _ => candle_core::bail!(
            "softmax backward: no fused kernel for {:?}",
            y.device().location()
        ),
    }
}

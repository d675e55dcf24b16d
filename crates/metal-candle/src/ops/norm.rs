//! RMSNorm and LayerNorm over the last dimension.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};

use super::cpu::{self, with_float_type};
use super::{check_same, kernel_path, reference, KernelPath};
use crate::{Error, Result};

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) ⊙ weight`. Differentiable in
/// `x` and `weight`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// let x = Tensor::randn(0f32, 1., (2, 8, 64), &Device::Cpu)?;
/// let w = Tensor::ones(64, candle_core::DType::F32, &Device::Cpu)?;
/// let y = metal_candle::ops::rms_norm(&x, &w, 1e-5)?;
/// assert_eq!(y.dims(), x.dims());
/// // A weight that does not match the last dim is rejected with both shapes named.
/// let bad = Tensor::ones(63, candle_core::DType::F32, &Device::Cpu)?;
/// assert!(metal_candle::ops::rms_norm(&x, &bad, 1e-5).is_err());
/// # Ok(())
/// # }
/// ```
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_norm_args("rms_norm", x, &[("weight", weight)], eps)?;
    Ok(match kernel_path(x.device(), x.dtype()) {
        KernelPath::Fused => x.apply_op2(weight, RmsNorm { eps })?,
        KernelPath::Reference => reference::rms_norm(x, weight, eps)?,
    })
}

/// LayerNorm over the last dimension: `(x − mean) / sqrt(var + eps) ⊙ weight + bias`, with the
/// biased variance (as PyTorch). Differentiable in `x`, `weight` and `bias`; when any of them
/// takes gradients, the CUDA forward of bf16/f16 rows keeps each row's mean and 1/σ (8 bytes
/// per row) for the backward pass, as PyTorch does.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// let x = Tensor::randn(0f32, 1., (4, 384), &Device::Cpu)?;
/// let (w, b) = (Tensor::ones(384, DType::F32, &Device::Cpu)?, Tensor::zeros(384, DType::F32, &Device::Cpu)?);
/// let y = metal_candle::ops::layer_norm(&x, &w, &b, 1e-12)?;
/// let mean: Vec<f32> = y.mean(1)?.to_vec1()?;
/// assert!(mean.iter().all(|m| m.abs() < 1e-5));
/// # Ok(())
/// # }
/// ```
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    check_norm_args("layer_norm", x, &[("weight", weight), ("bias", bias)], eps)?;
    // Only the 16-bit backward kernel reads saved statistics (f32 rows recompute them at 84% of
    // their bandwidth floor), so only 16-bit rows that will be differentiated save them.
    let save_stats =
        x.dtype().size_in_bytes() == 2 && (x.track_op() || weight.track_op() || bias.track_op());
    Ok(match kernel_path(x.device(), x.dtype()) {
        KernelPath::Fused => x.apply_op3(weight, bias, LayerNorm::new(eps, save_stats))?,
        KernelPath::Reference => reference::layer_norm(x, weight, bias, eps)?,
    })
}

pub(super) fn check_norm_args(
    op: &'static str,
    x: &Tensor,
    params: &[(&str, &Tensor)],
    eps: f64,
) -> Result<()> {
    let n = match x.dims().last() {
        Some(&n) => n,
        None => {
            return Err(Error::shape(
                op,
                "x is a scalar; expected at least one dimension",
            ))
        }
    };
    for &(name, p) in params {
        if p.dims() != [n] {
            return Err(Error::shape(
                op,
                format!("{name} has shape {:?} but x has shape {:?}; {name} must be [{n}] (x's last dim)", p.dims(), x.dims()),
            ));
        }
    }
    let mut all = vec![("x", x)];
    all.extend_from_slice(params);
    check_same(op, &all)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidConfig {
            name: "eps",
            value: eps.to_string(),
            expected: "a finite number >= 0",
        });
    }
    Ok(())
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "metal-candle-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = wl.shape().elem_count();
        with_float_type!(xs.dtype(), "rms_norm", T => {
            let x = cpu::contiguous::<T>(xs, xl)?;
            let w = cpu::contiguous::<T>(ws, wl)?;
            Ok((cpu::to_storage(cpu::norm::rms_forward(&x, &w, n, self.eps)), xl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            super::cuda::rms_norm_forward(xs, xl, ws, wl, self.eps)?,
            xl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        match x.device() {
            candle_core::Device::Cpu => {
                let (xs, xl) = x.storage_and_layout();
                let (ws, wl) = w.storage_and_layout();
                let (gs, gl) = dy.storage_and_layout();
                let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs)
                else {
                    candle_core::bail!("rms_norm backward: all tensors must be on the CPU")
                };
                with_float_type!(x.dtype(), "rms_norm backward", T => {
                    let (xv, wv, gv) = (cpu::contiguous::<T>(xs, xl)?, cpu::contiguous::<T>(ws, wl)?, cpu::contiguous::<T>(gs, gl)?);
                    let (dx, dw) = cpu::norm::rms_backward(&xv, &wv, &gv, n, self.eps);
                    Ok((Some(cpu::to_tensor(dx, x.dims())?), Some(cpu::to_tensor(dw, &[n])?)))
                })
            }
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(_) => {
                let (dx, dw) = super::cuda::rms_norm_backward(x, w, dy, self.eps)?;
                Ok((Some(dx), Some(dw)))
            }
            _ => candle_core::bail!(
                "rms_norm backward: no fused kernel for {:?}",
                x.device().location()
            ),
        }
    }
}

struct LayerNorm {
    eps: f64,
    /// The row statistics of the CUDA forward pass, kept for the backward (`None` when they are
    /// not to be saved: inference, and rows whose backward recomputes them).
    #[cfg(feature = "cuda")]
    saved: Option<std::sync::Mutex<Option<super::cuda::LayerNormStats>>>,
}

impl LayerNorm {
    /// `save_stats`: whether the CUDA forward keeps the row statistics for the backward.
    fn new(eps: f64, save_stats: bool) -> Self {
        #[cfg(not(feature = "cuda"))]
        let _ = save_stats;
        Self {
            eps,
            #[cfg(feature = "cuda")]
            saved: save_stats.then(|| std::sync::Mutex::new(None)),
        }
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "metal-candle-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = wl.shape().elem_count();
        with_float_type!(xs.dtype(), "layer_norm", T => {
            let x = cpu::contiguous::<T>(xs, xl)?;
            let w = cpu::contiguous::<T>(ws, wl)?;
            let b = cpu::contiguous::<T>(bs, bl)?;
            Ok((cpu::to_storage(cpu::norm::layer_forward(&x, &w, &b, n, self.eps)), xl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (y, stats) = super::cuda::layer_norm_forward(
            xs,
            xl,
            ws,
            wl,
            bs,
            bl,
            self.eps,
            self.saved.is_some(),
        )?;
        if let Some(slot) = &self.saved {
            // The slot only ever holds finished statistics: a poisoned lock is still consistent.
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = stats;
        }
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        match x.device() {
            candle_core::Device::Cpu => {
                let (xs, xl) = x.storage_and_layout();
                let (ws, wl) = w.storage_and_layout();
                let (gs, gl) = dy.storage_and_layout();
                let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(gs)) = (&*xs, &*ws, &*gs)
                else {
                    candle_core::bail!("layer_norm backward: all tensors must be on the CPU")
                };
                with_float_type!(x.dtype(), "layer_norm backward", T => {
                    let (xv, wv, gv) = (cpu::contiguous::<T>(xs, xl)?, cpu::contiguous::<T>(ws, wl)?, cpu::contiguous::<T>(gs, gl)?);
                    let (dx, dw, db) = cpu::norm::layer_backward(&xv, &wv, &gv, n, self.eps);
                    Ok((Some(cpu::to_tensor(dx, x.dims())?), Some(cpu::to_tensor(dw, &[n])?), Some(cpu::to_tensor(db, &[n])?)))
                })
            }
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(_) => {
                let guard = self
                    .saved
                    .as_ref()
                    .map(|slot| slot.lock().unwrap_or_else(|p| p.into_inner()));
                let stats = guard.as_ref().and_then(|g| g.as_ref());
                let (dx, dw, db) = super::cuda::layer_norm_backward(x, w, dy, self.eps, stats)?;
                Ok((Some(dx), Some(dw), Some(db)))
            }
            _ => candle_core::bail!(
                "layer_norm backward: no fused kernel for {:?}",
                x.device().location()
            ),
        }
    }
}

//! Cross-entropy against target indices: the language-model loss, fused.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};

use super::cpu::{self, with_float_type, Acc, Elem};
use super::{kernel_path, reference, KernelPath};
use crate::{Error, Result};

/// The cross-entropy of every row of `logits` (..., vocab) against `targets` (...), u32 class
/// indices: `logsumexp(logits_row) − logits_row[target]`, shaped like `targets`, in f32 (f64
/// for f64 logits). Differentiable in `logits`.
///
/// Fused, it reads the logits once forward and once backward and keeps nothing of their size
/// in between: candle's `log_softmax` composition materialises several (rows × vocab) f32
/// tensors, which for a language model's vocabulary are the largest tensors of a training step.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// let logits = Tensor::new(&[[2f32, 0., 0.], [0., 0., 0.]], &Device::Cpu)?;
/// let targets = Tensor::new(&[0u32, 2], &Device::Cpu)?;
/// let loss: Vec<f32> = metal_candle::ops::cross_entropy(&logits, &targets)?.to_vec1()?;
/// assert!((loss[1] - 3f32.ln()).abs() < 1e-6);
/// # Ok(())
/// # }
/// ```
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    let Some((&vocab, lead)) = logits.dims().split_last() else {
        return Err(Error::shape(
            OP,
            "logits is a scalar; expected (..., vocab)",
        ));
    };
    super::check_same(OP, &[("logits", logits)])?;
    if targets.dtype() != DType::U32 {
        return Err(Error::dtype(
            OP,
            format!(
                "targets must be u32 class indices, got {:?}",
                targets.dtype()
            ),
        ));
    }
    if targets.dims() != lead {
        return Err(Error::shape(
            OP,
            format!(
                "targets has shape {:?} but logits {:?} needs {lead:?} (one target per row)",
                targets.dims(),
                logits.dims()
            ),
        ));
    }
    if !targets.device().same_device(logits.device()) {
        return Err(Error::Msg(format!(
            "{OP}: targets are on {:?} but logits are on {:?}",
            targets.device().location(),
            logits.device().location()
        )));
    }
    if targets.elem_count() > 0 {
        let max = targets.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= vocab {
            return Err(Error::shape(
                OP,
                format!("target {max} is out of range for a vocabulary of {vocab}"),
            ));
        }
    }
    Ok(match kernel_path(logits.device(), logits.dtype()) {
        KernelPath::Fused => logits.apply_op2(&targets.contiguous()?, CrossEntropy)?,
        KernelPath::Reference => reference::cross_entropy(logits, targets)?,
    })
}

struct CrossEntropy;

/// The targets of a contiguous u32 tensor on the CPU.
fn cpu_targets<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::U32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("cross_entropy: targets must be a contiguous u32 tensor"),
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "metal-candle-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = xl.dims().last().copied().unwrap_or(1);
        let targets = cpu_targets(ts, tl)?;
        with_float_type!(xs.dtype(), "cross_entropy", T => {
            let x = cpu::contiguous::<T>(xs, xl)?;
            let loss = cpu::cross_entropy::forward(&x, targets, n);
            Ok((<<T as Elem>::A as Acc>::into_storage(loss), tl.shape().clone()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            super::cuda::cross_entropy_forward(xs, xl, ts, tl)?,
            tl.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(cross_entropy_backward(logits, targets, grad)?), None))
    }
}

/// `dlogits = g·(softmax(logits) − onehot(targets))` through the device's kernel.
fn cross_entropy_backward(
    logits: &Tensor,
    targets: &Tensor,
    g: &Tensor,
) -> candle_core::Result<Tensor> {
    let n = logits.dim(candle_core::D::Minus1)?;
    match logits.device() {
        candle_core::Device::Cpu => {
            let (xs, xl) = logits.storage_and_layout();
            let (ts, tl) = targets.storage_and_layout();
            let (Storage::Cpu(xs), Storage::Cpu(ts)) = (&*xs, &*ts) else {
                candle_core::bail!("cross_entropy backward: logits and targets must be on the CPU")
            };
            let targets = cpu_targets(ts, tl)?;
            with_float_type!(logits.dtype(), "cross_entropy backward", T => {
                let x = cpu::contiguous::<T>(xs, xl)?;
                let g = <<T as Elem>::A as Acc>::read_tensor(g)?;
                cpu::to_tensor(cpu::cross_entropy::backward(&x, targets, &g, n), logits.dims())
            })
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => super::cuda::cross_entropy_backward(logits, targets, g),
        _ => candle_core::bail!(
            "cross_entropy backward: no fused kernel for {:?}",
            logits.device().location()
        ),
    }
}
